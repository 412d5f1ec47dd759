//! `homeport netcheck`: which STUN servers answer over UDP, how this node's NAT maps it (one
//! mapping for every destination, or one per destination), and the relay's round trip.

use crate::control::Netcheck;
use crate::stun::StunClient;
use homeport_proto::NodeName;
use homeport_proto::addr::is_public;
use std::net::SocketAddr;

/// Asks every server in `servers` (one at a time, through the WireGuard socket) and joins the
/// answers with what peers saw (`seen_by_peers`, from their Pongs) and the relay's round trip.
pub async fn run(
    stun: &StunClient,
    servers: Vec<SocketAddr>,
    seen_by_peers: Vec<(NodeName, SocketAddr)>,
    relay: Option<(SocketAddr, f64)>,
) -> Netcheck {
    let mut answers = vec![];
    for s in servers {
        answers.push((s, stun.query(s).await));
    }
    summarize(answers, seen_by_peers, relay)
}

/// The report from the STUN answers (server, our address as it saw it) and the peers' views.
pub fn summarize(
    stun: Vec<(SocketAddr, Option<SocketAddr>)>,
    seen_by_peers: Vec<(NodeName, SocketAddr)>,
    relay: Option<(SocketAddr, f64)>,
) -> Netcheck {
    let mut seen: Vec<SocketAddr> = stun.iter().filter_map(|(_, a)| *a).collect();
    seen.extend(
        seen_by_peers
            .iter()
            .map(|(_, a)| *a)
            // A peer's view of us counts only from outside our NATs.
            .filter(|a| is_public(a.ip())),
    );
    seen.sort();
    seen.dedup();
    let answered = stun.iter().filter(|(_, a)| a.is_some()).count() + seen_by_peers.len();
    let mapping = if answered < 2 {
        "unknown: only one outside view of this node (pass --stun HOST:PORT for a second STUN server)".to_string()
    } else if seen.len() <= 1 {
        "easy: one mapping for all destinations (endpoint-independent), direct paths work"
            .to_string()
    } else {
        format!(
            "hard: a different mapping per destination ({}), direct paths need the other side to be easy; the relay carries the rest",
            seen.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Netcheck {
        udp: stun.iter().any(|(_, a)| a.is_some()),
        stun,
        seen_by_peers,
        mapping,
        relay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_view_is_unknown_two_alike_easy_two_different_hard() {
        let s1 = a("198.51.100.1:3478");
        let s2 = a("198.51.100.2:3478");
        let me = a("203.0.113.5:41641");
        let n = summarize(vec![(s1, Some(me))], vec![], None);
        assert!(n.udp);
        assert!(n.mapping.starts_with("unknown"), "{}", n.mapping);
        let n = summarize(vec![(s1, Some(me)), (s2, Some(me))], vec![], None);
        assert!(n.mapping.starts_with("easy"), "{}", n.mapping);
        let n = summarize(
            vec![(s1, Some(me)), (s2, Some(a("203.0.113.5:50000")))],
            vec![],
            None,
        );
        assert!(n.mapping.starts_with("hard"), "{}", n.mapping);
        // A peer inside our own NAT sees a private address: it does not make us look hard.
        let peer = NodeName::sanitize("home").unwrap();
        let n = summarize(
            vec![(s1, Some(me))],
            vec![(peer, a("192.168.1.9:41641"))],
            None,
        );
        assert!(n.mapping.starts_with("easy"), "{}", n.mapping);
        // Nothing answered over UDP.
        let n = summarize(vec![(s1, None)], vec![], None);
        assert!(!n.udp);
    }
}
