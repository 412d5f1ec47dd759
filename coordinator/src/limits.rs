//! Per-node rate limits on the node API calls that make the coordinator do work for others
//! (endpoint reports are pushed to every peer; a probe ask makes a peer send probes).

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use homeport_proto::NodeId;
use std::num::NonZeroU32;
use std::time::Duration;

/// Endpoint reports: a node reports when its candidates change (a network change) and after
/// each reconnection; 10 at once and one every 3 s after that is far above that, and caps the
/// map deltas one node can make every peer receive.
pub const ENDPOINT_BURST: u32 = 10;
pub const ENDPOINT_EVERY: Duration = Duration::from_secs(3);
/// Probe asks: a node asks at most once per 10 s per peer without a direct path; 30 at once and
/// 5 a second covers 50 such peers, and caps how hard one node can make others probe.
pub const PROBE_BURST: u32 = 30;
pub const PROBE_EVERY: Duration = Duration::from_millis(200);

pub struct Limits {
    endpoints: DefaultKeyedRateLimiter<NodeId>,
    probes: DefaultKeyedRateLimiter<NodeId>,
}

fn quota(every: Duration, burst: u32) -> Quota {
    Quota::with_period(every)
        .expect("non-zero period")
        .allow_burst(NonZeroU32::new(burst).expect("non-zero burst"))
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            endpoints: RateLimiter::keyed(quota(ENDPOINT_EVERY, ENDPOINT_BURST)),
            probes: RateLimiter::keyed(quota(PROBE_EVERY, PROBE_BURST)),
        }
    }
}

fn check(l: &DefaultKeyedRateLimiter<NodeId>, id: NodeId) -> Result<(), Duration> {
    l.check_key(&id)
        .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
}

impl Limits {
    /// Ok, or how long until `id` may report endpoints again.
    pub fn endpoint_report(&self, id: NodeId) -> Result<(), Duration> {
        check(&self.endpoints, id)
    }

    /// Ok, or how long until `id` may ask for a probe again.
    pub fn probe_ask(&self, id: NodeId) -> Result<(), Duration> {
        check(&self.probes, id)
    }
}
