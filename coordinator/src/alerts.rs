//! Coordinator alerts: a node offline for longer than `--alert-offline-secs`, and back.
//!
//! A task looks at the mesh's online flags once a second (cheap: one pass over the nodes);
//! sending is [`homeport_host::alert::Alerts`]' job (bounded queue, debounce, retries).

use crate::state::AppState;
use homeport_host::alert::{Alert, Alerts};
use homeport_proto::NodeId;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the online flags are looked at.
const TICK: Duration = Duration::from_secs(1);

/// What changed since the last look: (went offline, came back) bookkeeping, pure.
#[derive(Default)]
pub struct OfflineTracker {
    /// Nodes seen online since the coordinator started (only those can go "offline").
    seen_online: HashSet<NodeId>,
    offline_since: HashMap<NodeId, Instant>,
    alerted: HashSet<NodeId>,
}

impl OfflineTracker {
    /// Feeds the current state; returns the alerts to raise.
    pub fn step(
        &mut self,
        nodes: &[(NodeId, String, bool)],
        now: Instant,
        after: Duration,
    ) -> Vec<Alert> {
        let mut out = Vec::new();
        for (id, name, online) in nodes {
            if *online {
                self.offline_since.remove(id);
                self.seen_online.insert(*id);
                if self.alerted.remove(id) {
                    out.push(Alert {
                        kind: "node-online",
                        subject: name.clone(),
                        message: format!("node {name} is back online"),
                    });
                }
            } else if self.seen_online.contains(id) {
                let since = *self.offline_since.entry(*id).or_insert(now);
                if now.duration_since(since) >= after && self.alerted.insert(*id) {
                    out.push(Alert {
                        kind: "node-offline",
                        subject: name.clone(),
                        message: format!(
                            "node {name} has been offline for {} s",
                            now.duration_since(since).as_secs()
                        ),
                    });
                }
            }
        }
        out
    }
}

/// Runs until `stop`.
pub async fn watch_nodes(st: AppState, alerts: Alerts, after: Duration, stop: CancellationToken) {
    let mut t = OfflineTracker::default();
    loop {
        let nodes: Vec<(NodeId, String, bool)> = st
            .mesh()
            .nodes()
            .map(|n| (n.id, n.name.to_string(), n.online))
            .collect();
        for a in t.step(&nodes, Instant::now(), after) {
            alerts.raise(a);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_after_the_delay_then_back_once() {
        let mut t = OfflineTracker::default();
        let t0 = Instant::now();
        let d = Duration::from_secs(5);
        let n = |on: bool| {
            vec![
                (NodeId(1), "home".to_string(), on),
                (NodeId(2), "old".to_string(), false),
            ]
        };
        assert!(t.step(&n(true), t0, d).is_empty());
        assert!(t.step(&n(false), t0 + Duration::from_secs(1), d).is_empty());
        let a = t.step(&n(false), t0 + Duration::from_secs(7), d);
        assert_eq!(a.len(), 1, "only home, never seen offline-only 'old'");
        assert_eq!((a[0].kind, a[0].subject.as_str()), ("node-offline", "home"));
        assert!(
            t.step(&n(false), t0 + Duration::from_secs(9), d).is_empty(),
            "once"
        );
        let b = t.step(&n(true), t0 + Duration::from_secs(10), d);
        assert_eq!(b[0].kind, "node-online");
        // A short blip raises nothing.
        assert!(
            t.step(&n(false), t0 + Duration::from_secs(11), d)
                .is_empty()
        );
        assert!(t.step(&n(true), t0 + Duration::from_secs(12), d).is_empty());
    }
}
