//! The node's Prometheus metrics (`homeport_node_*`), read at each scrape from the daemon's
//! published state and the data path's counters. Served by `homeport_host::metrics`.

use crate::control::{SelfStatus, Status};
use crate::datapath::{Datapath, PathInfo};
use std::sync::Arc;
use tokio::sync::watch;

/// The collector: the daemon's latest [`SelfStatus`] and the data path.
pub struct NodeMetrics {
    pub me: watch::Receiver<SelfStatus>,
    pub dp: Arc<Datapath>,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeMetrics")
    }
}

impl homeport_host::metrics::Collector for NodeMetrics {
    fn encode(
        &self,
        mut enc: homeport_host::metrics::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let st = Status {
            me: self.me.borrow().clone(),
            peers: self.dp.status(),
            routes: None,
        };
        encode_status_metrics(&st, &mut enc)?;
        self.dp.encode_metrics(&mut enc)
    }
}

fn encode_status_metrics(
    st: &Status,
    enc: &mut homeport_host::metrics::DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    use homeport_host::metrics::{Unit, counter_family, gauge, gauge_family};
    gauge(
        enc,
        "map_version",
        "Version of the last map applied",
        st.me.map_version as i64,
    )?;
    gauge(
        enc,
        "connected",
        "1 while the map stream from the coordinator is open",
        st.me.connected as i64,
    )?;
    type Counter = fn(&crate::datapath::PeerStatus) -> u64;
    let counters: [(&str, &str, Option<Unit>, Counter); 3] = [
        (
            "peer_rx",
            "Bytes received from each peer",
            Some(Unit::Bytes),
            |p| p.rx_bytes,
        ),
        (
            "peer_tx",
            "Bytes sent to each peer",
            Some(Unit::Bytes),
            |p| p.tx_bytes,
        ),
        (
            "peer_handshakes",
            "WireGuard handshakes completed with each peer",
            None,
            |p| p.handshakes,
        ),
    ];
    for (name, help, unit, value) in counters {
        counter_family(
            enc,
            name,
            help,
            unit.as_ref(),
            st.peers
                .iter()
                .map(|p| ([("peer", p.name.as_str())], value(p))),
        )?;
    }
    gauge_family(
        enc,
        "peer_path",
        "1 for the path each peer's traffic takes now (kind: direct or relay)",
        st.peers.iter().flat_map(|p| {
            let (d, r) = match p.path {
                PathInfo::Direct { .. } => (1, 0),
                PathInfo::Relay { .. } => (0, 1),
                PathInfo::None => (0, 0),
            };
            [
                ([("peer", p.name.as_str()), ("kind", "direct")], d),
                ([("peer", p.name.as_str()), ("kind", "relay")], r),
            ]
        }),
    )
}
