//! The packet filter the coordinator compiles for one node, and that node enforces on every
//! decrypted packet that arrives from the mesh.
//!
//! Semantics (the node's engine implements exactly this):
//! - `allow_all = true`: every packet from a peer whose source address the peer owns is accepted.
//! - otherwise a packet that *opens* a flow (TCP SYN without ACK, a UDP datagram that is not a reply
//!   to a flow this node opened, an ICMP echo request) is accepted only when some rule matches its
//!   source address, protocol and destination port. Replies to flows this node opened pass.
//! - ICMP echo matches a rule whose `protos` contains `icmp` (ports are ignored for ICMP).
//! - a packet to this node's own address matches only rules without `dests`; a packet this node
//!   forwards (to one of its approved routes) only rules whose `dests` hold its destination.
//!
//! Publish rules add their own admission (public sources, only from the exit, only to the
//! published port); they live in [`crate::publish`] and are not expressed as filter rules.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// IP protocols a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    #[serde(other)]
    Unknown,
}

impl Proto {
    pub fn parse(s: &str) -> Option<Proto> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            "icmp" => Some(Proto::Icmp),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Unknown => "unknown",
        }
    }
}

/// An inclusive port range. `PortRange { first: 0, last: 65535 }` is "any port".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ANY: PortRange = PortRange {
        first: 0,
        last: 65535,
    };
    pub fn single(p: u16) -> Self {
        PortRange { first: p, last: p }
    }
    pub fn contains(&self, p: u16) -> bool {
        self.first <= p && p <= self.last
    }
    /// Parses "*", "80" or "8000-8100".
    pub fn parse(s: &str) -> Result<PortRange, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(PortRange::ANY);
        }
        let bad = || {
            format!(
                "invalid port {s:?}: expected \"*\", a port 1-65535, or a range like \"8000-8100\""
            )
        };
        let (a, b) = match s.split_once('-') {
            Some((a, b)) => (a, b),
            None => (s, s),
        };
        let a: u16 = a.trim().parse().map_err(|_| bad())?;
        let b: u16 = b.trim().parse().map_err(|_| bad())?;
        // "8100-8000" means the same ports as "8000-8100".
        let (first, last) = (a.min(b), a.max(b));
        if first == 0 {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

/// One accept rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterRule {
    /// Source addresses (peers' mesh addresses as /32 and /128) this rule admits.
    pub sources: Vec<IpNet>,
    /// Protocols admitted; empty means tcp, udp and icmp.
    #[serde(default)]
    pub protos: Vec<Proto>,
    /// Destination ports admitted (tcp/udp); empty means any.
    #[serde(default)]
    pub ports: Vec<PortRange>,
    /// Destinations admitted: empty means this node's own mesh addresses; otherwise ranges of
    /// its approved routes (a LAN behind it, or `0.0.0.0/0` / `::/0` when it is an exit) that
    /// it forwards to. A rule never admits both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dests: Vec<IpNet>,
}

/// The whole filter for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketFilter {
    pub allow_all: bool,
    #[serde(default)]
    pub rules: Vec<FilterRule>,
}

impl PacketFilter {
    pub fn allow_all() -> Self {
        PacketFilter {
            allow_all: true,
            rules: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn literal_json() {
        let f: PacketFilter = serde_json::from_str(
            r#"{"allow_all":false,"rules":[{"sources":["100.96.0.2/32"],"protos":["tcp","sctp"],"ports":[{"first":22,"last":22}]}]}"#,
        )
        .unwrap();
        assert_eq!(f.rules[0].protos, vec![Proto::Tcp, Proto::Unknown]);
        assert!(f.rules[0].ports[0].contains(22));
        assert_eq!(PortRange::parse("*").unwrap(), PortRange::ANY);
        assert_eq!(
            PortRange::parse("80-90").unwrap(),
            PortRange {
                first: 80,
                last: 90
            }
        );
        // Written high-low, a range means the same ports (the API spec cannot express order).
        assert_eq!(PortRange::parse("90-80"), PortRange::parse("80-90"));
        assert!(PortRange::parse("0-80").unwrap_err().contains("range"));
        assert!(PortRange::parse("80-0").unwrap_err().contains("range"));
    }
}
