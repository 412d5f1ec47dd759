//! Access policy: who in the mesh may open connections to whom.
//!
//! Nodes carry tags (given by the auth key they registered with). A policy is a list of rules
//! "from → to : ports". With no policy stored, every node may reach every node. With a policy,
//! a flow is allowed only when a rule matches it; the coordinator compiles the policy into one
//! [`crate::filter::PacketFilter`] per node (inbound rules for that node).
//!
//! Selectors: `"*"` (every node), `"tag:NAME"`, `"node:NAME"`, or a bare node name. In `to`
//! only, destinations beyond the nodes themselves: an address or network (`"192.168.1.0/24"`,
//! `"192.168.1.5"`) is the part of approved subnet routes it covers (reached through the node
//! that advertises them), and `"internet"` is the use of an approved exit node (a node named
//! `internet` is selected with `node:internet`). `"*"` in `to` covers every node and every
//! approved subnet route, but not the internet. Node and tag selectors name the nodes' own
//! addresses only, never the routes behind them.
//! Ports: `"*"`, `"22"`, `"8000-8100"`, optionally prefixed with a protocol: `"tcp:22"`, `"udp:*"`,
//! `"icmp"`.
//!
//! File form (TOML; JSON with the same shape is accepted too):
//! ```toml
//! [[rules]]
//! from = ["tag:admin"]
//! to = ["*"]
//! ports = ["*"]
//!
//! [[rules]]
//! from = ["tag:friends"]
//! to = ["node:home"]
//! ports = ["tcp:32400", "icmp"]
//! ```

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    pub from: Vec<String>,
    pub to: Vec<String>,
    #[serde(default = "any_ports")]
    pub ports: Vec<String>,
}

fn any_ports() -> Vec<String> {
    vec!["*".into()]
}

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Any,
    Tag(String),
    Node(String),
    /// Addresses behind subnet routes (`to` only).
    Addr(ipnet::IpNet),
    /// The internet through an exit node (`to` only).
    Internet,
}

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(Selector::Any);
        }
        if s == "internet" {
            return Ok(Selector::Internet);
        }
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return if net.trunc() == net {
                Ok(Selector::Addr(net))
            } else {
                Err(format!(
                    "invalid selector {s:?}: host bits set; the network is {}",
                    net.trunc()
                ))
            };
        }
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(Selector::Addr(ipnet::IpNet::from(ip)));
        }
        let bad = || {
            format!(
                "invalid selector {s:?}: expected \"*\", \"tag:NAME\", \"node:NAME\", a node name, \
                 or (in `to` only) an address/network behind a subnet route or \"internet\""
            )
        };
        let valid = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if let Some(t) = s.strip_prefix("tag:") {
            return if valid(t) {
                Ok(Selector::Tag(t.into()))
            } else {
                Err(bad())
            };
        }
        let n = s.strip_prefix("node:").unwrap_or(s);
        if valid(n) {
            Ok(Selector::Node(n.into()))
        } else {
            Err(bad())
        }
    }
}

/// A parsed port selector: protocol (None = tcp+udp+icmp) and range.
pub fn parse_port_spec(
    s: &str,
) -> Result<(Option<crate::filter::Proto>, crate::filter::PortRange), String> {
    use crate::filter::{PortRange, Proto};
    let s = s.trim();
    if s.eq_ignore_ascii_case("icmp") {
        return Ok((Some(Proto::Icmp), PortRange::ANY));
    }
    match s.split_once(':') {
        Some((p, r)) => {
            let proto = match Proto::parse(p) {
                Some(Proto::Icmp) | None => {
                    return Err(format!(
                        "invalid port spec {s:?}: protocol must be tcp or udp (or the bare word icmp)"
                    ));
                }
                Some(p) => p,
            };
            Ok((Some(proto), PortRange::parse(r)?))
        }
        None => Ok((None, PortRange::parse(s)?)),
    }
}

impl Policy {
    /// Checks every selector and port spec; the error names the rule and the bad entry.
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.rules.iter().enumerate() {
            if r.from.is_empty() || r.to.is_empty() {
                return Err(format!(
                    "rules[{i}]: `from` and `to` must each name at least one selector"
                ));
            }
            for s in r.from.iter().chain(r.to.iter()).chain(r.ports.iter()) {
                if s.chars().any(char::is_whitespace) {
                    return Err(format!(
                        "rules[{i}]: {s:?} contains spaces; write selectors and port specs without them"
                    ));
                }
            }
            for s in r.from.iter().chain(r.to.iter()) {
                Selector::parse(s).map_err(|e| format!("rules[{i}]: {e}"))?;
            }
            for s in &r.from {
                if matches!(
                    Selector::parse(s),
                    Ok(Selector::Addr(_) | Selector::Internet)
                ) {
                    return Err(format!(
                        "rules[{i}]: {s:?} in `from`: addresses and \"internet\" are destinations \
                         only (`to`); sources are nodes: \"*\", \"tag:NAME\", \"node:NAME\""
                    ));
                }
            }
            for p in &r.ports {
                parse_port_spec(p).map_err(|e| format!("rules[{i}]: {e}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn literal_json_and_validation() {
        let p: Policy = serde_json::from_str(
            r#"{"rules":[{"from":["tag:friends"],"to":["node:home"],"ports":["tcp:32400","icmp"]}]}"#,
        )
        .unwrap();
        p.validate().unwrap();
        let bad: Policy =
            serde_json::from_str(r#"{"rules":[{"from":["tag:"],"to":["*"]}]}"#).unwrap();
        assert!(bad.validate().unwrap_err().contains("rules[0]"));
        assert!(serde_json::from_str::<Policy>(r#"{"rulez":[]}"#).is_err());
        assert!(parse_port_spec("sctp:1").is_err());
    }

    #[test]
    fn routes_and_the_internet_are_destinations_only() {
        assert_eq!(
            Selector::parse("192.168.1.0/24").unwrap(),
            Selector::Addr("192.168.1.0/24".parse().unwrap())
        );
        assert_eq!(
            Selector::parse("192.168.1.5").unwrap(),
            Selector::Addr("192.168.1.5/32".parse().unwrap())
        );
        assert_eq!(Selector::parse("internet").unwrap(), Selector::Internet);
        assert_eq!(
            Selector::parse("node:internet").unwrap(),
            Selector::Node("internet".into())
        );
        assert!(
            Selector::parse("192.168.1.1/24")
                .unwrap_err()
                .contains("192.168.1.0/24")
        );
        let p = |from: &str, to: &str| Policy {
            rules: vec![PolicyRule {
                from: vec![from.into()],
                to: vec![to.into()],
                ports: vec!["*".into()],
            }],
        };
        p("tag:family", "192.168.1.0/24").validate().unwrap();
        p("laptop", "internet").validate().unwrap();
        assert!(
            p("192.168.1.0/24", "home")
                .validate()
                .unwrap_err()
                .contains("destinations")
        );
        assert!(
            p("internet", "home")
                .validate()
                .unwrap_err()
                .contains("destinations")
        );
    }
}
