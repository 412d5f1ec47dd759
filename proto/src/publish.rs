//! Publish rules: a public port on an exit node carried over the mesh to a port on a target node.
//!
//! The coordinator validates and stores them, and delivers each rule in the map to its exit (which
//! installs nftables DNAT and guards) and to its target (which admits public sources from that exit
//! only to `target_port`, and routes replies back through that exit).

use crate::NodeId;
use crate::names::NodeName;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishProto {
    Tcp,
    Udp,
    #[serde(other)]
    Unknown,
}

impl PublishProto {
    pub fn as_str(&self) -> &'static str {
        match self {
            PublishProto::Tcp => "tcp",
            PublishProto::Udp => "udp",
            PublishProto::Unknown => "unknown",
        }
    }
}

impl std::str::FromStr for PublishProto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(PublishProto::Tcp),
            "udp" => Ok(PublishProto::Udp),
            _ => Err(format!("invalid protocol {s:?}: expected tcp or udp")),
        }
    }
}

/// Optional guards on a published port. All are enforced on the exit, per source address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guards {
    /// Only these source CIDRs may connect; empty = everyone. Others are dropped silently.
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// New connections per source per minute; over it, new connections are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_minute: Option<u32>,
    /// Concurrent connections per source; over it, new connections are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_conns: Option<u32>,
    /// Only sources in these countries (ISO 3166-1 alpha-2, upper case) may connect; empty = no
    /// country rule. A source the exit's country database does not know is dropped (fails
    /// closed). A source in `allow` is let in whatever its country.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countries: Vec<String>,
    /// Sources in these countries are dropped (unless in `allow`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_countries: Vec<String>,
}

impl Guards {
    /// Whether the exit needs a country database for these guards.
    pub fn needs_countries(&self) -> bool {
        !self.countries.is_empty() || !self.deny_countries.is_empty()
    }
}

/// `DE`, `at` → `DE`, `AT` (exactly two ASCII letters): a country code as the guards carry it (ISO 3166-1 alpha-2, upper
/// case), or an error naming the input and what is accepted.
pub fn parse_country(s: &str) -> Result<String, String> {
    let t = s;
    if t.len() == 2 && t.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(t.to_ascii_uppercase())
    } else {
        Err(format!(
            "invalid country {s:?}: expected a two-letter ISO 3166-1 code such as DE, AT or US"
        ))
    }
}

/// A stored, validated publish rule, as delivered in the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRule {
    pub id: i64,
    pub exit: NodeId,
    pub exit_name: NodeName,
    pub proto: PublishProto,
    /// The public port on the exit.
    pub port: u16,
    pub target: NodeId,
    pub target_name: NodeName,
    /// Target's mesh addresses (the DNAT destination).
    pub target_ipv4: Ipv4Addr,
    pub target_ipv6: Ipv6Addr,
    pub target_port: u16,
    #[serde(default)]
    pub guards: Guards,
}

/// Admin request to add a rule (`publish add`). Names refer to nodes by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub exit: String,
    pub port: u16,
    #[serde(default = "default_proto")]
    pub proto: String,
    /// "NODE:PORT"
    pub to: String,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_conns: Option<u32>,
    /// Allowed countries (two-letter codes); see [`Guards::countries`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub country: Vec<String>,
    /// Denied countries (two-letter codes); see [`Guards::deny_countries`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_country: Vec<String>,
}

fn default_proto() -> String {
    "tcp".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn literal_json() {
        let r: PublishRule = serde_json::from_str(
            r#"{"id":1,"exit":1,"exit_name":"vps","proto":"quic","port":32400,"target":2,
                "target_name":"home","target_ipv4":"100.96.0.2","target_ipv6":"fd7a:115c:a1e0::2",
                "target_port":32400,"guards":{"allow":["192.0.2.0/24"]}}"#,
        )
        .unwrap();
        assert_eq!(r.proto, PublishProto::Unknown);
        assert_eq!(r.guards.allow.len(), 1);
        let q: PublishRequest =
            serde_json::from_str(r#"{"exit":"vps","port":32400,"to":"home:32400"}"#).unwrap();
        assert_eq!(q.proto, "tcp");
        assert!(!r.guards.needs_countries());
    }

    #[test]
    fn country_codes() {
        assert_eq!(parse_country("de").unwrap(), "DE");
        for bad in ["", "D", "DEU", "D1", "é1", " DE"] {
            assert!(
                parse_country(bad).unwrap_err().contains("two-letter"),
                "{bad}"
            );
        }
    }
}
