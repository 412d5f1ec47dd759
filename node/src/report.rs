//! The status report: every [`REPORT_EVERY_SECS`] the node tells the coordinator how it reaches
//! each peer (direct `ip:port` or relay and why), handshakes, traffic and its version, for the
//! admin overview and the dashboard (`POST /api/v1/node/status`).

use crate::datapath::{PathInfo, PeerStatus};
use homeport_proto::status::{
    MAX_REPORT_PEERS, MAX_REPORT_TEXT, NodeStatusReport, PATH_NODE_STATUS, PathKind,
    PeerPathReport, REPORT_EVERY_SECS,
};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The report of `peers` (pure; what is posted).
pub fn report(version: &str, peers: &[PeerStatus]) -> NodeStatusReport {
    let cut = |s: String| s.chars().take(MAX_REPORT_TEXT / 4).collect::<String>();
    NodeStatusReport {
        version: cut(version.to_string()),
        peers: peers
            .iter()
            .take(MAX_REPORT_PEERS)
            .map(|p| {
                let (path, addr, reason) = match &p.path {
                    PathInfo::None => (PathKind::None, None, None),
                    PathInfo::Direct { addr } => (PathKind::Direct, Some(addr.to_string()), None),
                    PathInfo::Relay { reason } => {
                        (PathKind::Relay, None, Some(cut(reason.clone())))
                    }
                };
                PeerPathReport {
                    peer: p.id,
                    path,
                    addr,
                    reason,
                    last_handshake_secs_ago: p.last_handshake_secs_ago,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                }
            })
            .collect(),
    }
}

/// Posts a report every [`REPORT_EVERY_SECS`] while `connected()` says the map stream is up,
/// until `stop`. A refused or failed report is only logged at debug: the dashboard shows the
/// report's age.
pub async fn run(
    api: crate::coordinator::Api,
    version: String,
    status: impl Fn() -> Option<Vec<PeerStatus>> + Send + 'static,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(REPORT_EVERY_SECS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let Some(peers) = status() else { continue };
        if let Err(e) = api.post(PATH_NODE_STATUS, &report(&version, &peers)).await {
            tracing::debug!(error = %e, "status report failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homeport_proto::map::MeshAddrs;
    use homeport_proto::{NodeId, NodeName, PrivateKey};

    fn peer(id: i64, path: PathInfo) -> PeerStatus {
        PeerStatus {
            id: NodeId(id),
            name: NodeName::sanitize(&format!("n{id}")).unwrap(),
            public_key: PrivateKey::generate().public_key(),
            addrs: MeshAddrs {
                ipv4: "100.96.0.9".parse().unwrap(),
                ipv6: "fd00::9".parse().unwrap(),
            },
            path,
            last_handshake_secs_ago: Some(4),
            rx_bytes: 10,
            tx_bytes: 20,
            handshakes: 1,
            online: true,
            device: false,
        }
    }

    #[test]
    fn report_says_direct_address_or_relay_reason_and_is_accepted() {
        let long = "x".repeat(5000);
        let r = report(
            "homeport 0.1.0",
            &[
                peer(
                    1,
                    PathInfo::Direct {
                        addr: "198.51.100.10:41641".parse().unwrap(),
                    },
                ),
                peer(2, PathInfo::Relay { reason: long }),
                peer(3, PathInfo::None),
            ],
        );
        assert_eq!(r.peers[0].path, PathKind::Direct);
        assert_eq!(r.peers[0].addr.as_deref(), Some("198.51.100.10:41641"));
        assert_eq!(r.peers[1].path, PathKind::Relay);
        assert_eq!(r.peers[2].path, PathKind::None);
        assert_eq!((r.peers[0].rx_bytes, r.peers[0].tx_bytes), (10, 20));
        // A long reason is cut to what the coordinator accepts.
        assert!(r.problem().is_none());
        let many: Vec<PeerStatus> = (0..MAX_REPORT_PEERS as i64 + 10)
            .map(|i| peer(i, PathInfo::None))
            .collect();
        assert!(report("v", &many).problem().is_none());
    }
}
