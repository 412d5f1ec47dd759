//! Which peers to ask the coordinator to have probe us, and when: peers without a direct path
//! are asked at most once per [`PROBE_ASK_EVERY`] (enough to catch a peer whose NAT mapping
//! changed, cheap for the coordinator), and all again at once after a fresh endpoint report.

use homeport_proto::NodeId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const PROBE_ASK_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct ProbeAsks {
    asked: HashMap<NodeId, Instant>,
}

impl ProbeAsks {
    /// Of `wanted` (peers without a direct path that we could reach), those to ask for now;
    /// they count as asked from `now`.
    pub fn due(&mut self, now: Instant, wanted: &[NodeId]) -> Vec<NodeId> {
        // Expired entries say nothing any more (and peers leave the map).
        self.asked
            .retain(|_, t| now.saturating_duration_since(*t) < PROBE_ASK_EVERY);
        let mut due = vec![];
        for &id in wanted {
            if self
                .asked
                .get(&id)
                .is_some_and(|t| now.saturating_duration_since(*t) < PROBE_ASK_EVERY)
            {
                continue;
            }
            self.asked.insert(id, now);
            due.push(id);
        }
        due
    }

    /// Our (new) address is at the coordinator: every peer may be asked again at once.
    pub fn reset(&mut self) {
        self.asked.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_asked_once_per_period_and_again_after_a_fresh_report() {
        let mut p = ProbeAsks::default();
        let t = Instant::now();
        let (a, b) = (NodeId(1), NodeId(2));
        assert_eq!(p.due(t, &[a, b]), [a, b]);
        assert!(p.due(t + Duration::from_secs(9), &[a, b]).is_empty());
        assert_eq!(p.due(t + PROBE_ASK_EVERY, &[a, b]), [a, b]);
        // A fresh report: at once, whatever the period says.
        p.reset();
        assert_eq!(p.due(t + PROBE_ASK_EVERY, &[a]), [a]);
        // A peer that flaps between direct and relayed is not asked more often for it.
        assert!(p.due(t + PROBE_ASK_EVERY, &[]).is_empty());
        assert!(p.due(t + PROBE_ASK_EVERY, &[a]).is_empty());
    }
}
