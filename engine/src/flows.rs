//! The published-flow table of a target node: which exit each public (proto, ip, port, our port)
//! came in through, so replies go back the same way.
//!
//! Every public source that reaches us takes a slot, and spoofed sources cost an attacker
//! nothing, so the table tells flows that proved two-way apart from ones that did not. A flow is
//! *confirmed* once the remote sent a packet after we replied (for TCP: not a bare SYN), which
//! a spoofed source never does: it never sees our reply. Unconfirmed flows live
//! [`UNCONFIRMED_IDLE`] and, when the table is full, the oldest unconfirmed flow makes room for
//! a new one; confirmed flows live [`super::filter::FLOW_IDLE`] and are never evicted. So a flood
//! of spoofed SYNs can only push out other unconfirmed flows, a real viewer gets a slot (and
//! confirms within a round trip), and running flows keep theirs.

use super::filter::{FLOW_IDLE, FlowKey};
use homeport_proto::NodeId;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a flow that never proved two-way is kept. A real client's handshake completes in one
/// round trip (well under a second), and its SYN retransmissions (1 s, 3 s, 7 s) refresh the
/// entry; longer would only let a flood of spoofed sources hold slots longer.
pub const UNCONFIRMED_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Entry {
    peer: NodeId,
    last_seen: Instant,
    /// Insertion number, to tell a queued eviction candidate from a newer entry of the same key.
    seq: u64,
    /// We sent a packet of this flow back.
    replied: bool,
    /// The remote sent a packet after our reply: it sees our packets, not a spoofed source.
    confirmed: bool,
}

impl Entry {
    fn alive(&self, now: Instant) -> bool {
        let idle = if self.confirmed {
            FLOW_IDLE
        } else {
            UNCONFIRMED_IDLE
        };
        now.saturating_duration_since(self.last_seen) < idle
    }
}

#[derive(Default)]
struct Inner {
    map: HashMap<FlowKey, Entry>,
    /// Unconfirmed flows, oldest first (entries whose flow was confirmed, expired or replaced
    /// are skipped when popped, and pruned at every expiry).
    unconfirmed: VecDeque<(FlowKey, u64)>,
    seq: u64,
}

pub struct PublishedFlows {
    cap: usize,
    inner: Mutex<Inner>,
    /// Unconfirmed flows evicted to make room for a new one.
    pub evicted: AtomicU64,
    /// New flows not tracked because every slot held a confirmed flow.
    pub refused: AtomicU64,
}

impl PublishedFlows {
    pub fn new(cap: usize) -> PublishedFlows {
        PublishedFlows {
            cap,
            inner: Mutex::new(Inner {
                map: HashMap::with_capacity(1024),
                ..Default::default()
            }),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// A packet of flow `k` arrived from the remote through exit `peer`. `opening` is true for a
    /// packet that only opens a flow (TCP SYN without ACK): it does not confirm one.
    pub fn inbound(&self, k: FlowKey, peer: NodeId, opening: bool, now: Instant) {
        let mut g = self.inner.lock().unwrap();
        let inner = &mut *g;
        if let Some(e) = inner.map.get_mut(&k) {
            if e.alive(now) {
                e.confirmed |= e.replied && !opening;
                e.peer = peer;
                e.last_seen = now;
                return;
            }
            inner.map.remove(&k);
        }
        if inner.map.len() >= self.cap {
            if evict_unconfirmed(inner, now) {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            } else {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "published flow table full of confirmed flows; not tracking a new flow"
                );
                return;
            }
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.map.insert(
            k,
            Entry {
                peer,
                last_seen: now,
                seq,
                replied: false,
                confirmed: false,
            },
        );
        inner.unconfirmed.push_back((k, seq));
    }

    /// Our reply on flow `k`: the exit it goes back through, when the flow is known.
    pub fn reply(&self, k: &FlowKey, now: Instant) -> Option<NodeId> {
        let mut g = self.inner.lock().unwrap();
        let e = g.map.get_mut(k).filter(|e| e.alive(now))?;
        e.replied = true;
        Some(e.peer)
    }

    /// Whether flow `k` proved two-way (for tests and status).
    pub fn is_confirmed(&self, k: &FlowKey) -> bool {
        self.inner
            .lock()
            .unwrap()
            .map
            .get(k)
            .is_some_and(|e| e.confirmed)
    }

    pub fn expire(&self, now: Instant) {
        let mut g = self.inner.lock().unwrap();
        let inner = &mut *g;
        inner.map.retain(|_, e| e.alive(now));
        let map = &inner.map;
        inner
            .unconfirmed
            .retain(|(k, seq)| map.get(k).is_some_and(|e| e.seq == *seq && !e.confirmed));
    }

    pub fn retain(&self, mut keep: impl FnMut(&FlowKey, NodeId) -> bool) {
        self.inner
            .lock()
            .unwrap()
            .map
            .retain(|k, e| keep(k, e.peer));
    }

    /// The live flows: (key, exit, confirmed, idle), for `homeport plex check` and status.
    pub fn snapshot(&self, now: Instant) -> Vec<(FlowKey, NodeId, bool, Duration)> {
        let g = self.inner.lock().unwrap();
        g.map
            .iter()
            .filter(|(_, e)| e.alive(now))
            .map(|(k, e)| {
                (
                    *k,
                    e.peer,
                    e.confirmed,
                    now.saturating_duration_since(e.last_seen),
                )
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes the oldest unconfirmed (or expired) flow. False when every flow is confirmed and live.
fn evict_unconfirmed(inner: &mut Inner, now: Instant) -> bool {
    while let Some((k, seq)) = inner.unconfirmed.pop_front() {
        let victim = inner
            .map
            .get(&k)
            .is_some_and(|e| e.seq == seq && (!e.confirmed || !e.alive(now)));
        if victim {
            inner.map.remove(&k);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::PROTO_TCP;
    use std::net::{IpAddr, Ipv4Addr};

    fn key(i: u32, port: u16) -> FlowKey {
        FlowKey::new(PROTO_TCP, IpAddr::V4(Ipv4Addr::from(i)), port, 32400)
    }

    #[test]
    fn spoofed_syn_flood_cannot_keep_a_viewer_out_or_push_running_flows_out() {
        let cap = 1000;
        let t = PublishedFlows::new(cap);
        let exit = NodeId(1);
        let now = Instant::now();
        // A running flow: SYN in, SYN-ACK out, ACK in.
        let running = key(0xc000_0201, 40000);
        t.inbound(running, exit, true, now);
        assert_eq!(t.reply(&running, now), Some(exit));
        t.inbound(running, exit, false, now);
        assert!(t.is_confirmed(&running));
        // Spoofed SYNs from many sources fill the table (the home answers each with a SYN-ACK
        // that goes nowhere; no ACK ever comes back).
        for i in 0..(3 * cap as u32) {
            let k = key(0x0a00_0000 + i, 1024 + (i % 60000) as u16);
            t.inbound(k, exit, true, now);
            t.reply(&k, now);
        }
        assert_eq!(t.len(), cap);
        // A real viewer arrives mid-flood: it gets a slot, its SYN-ACK finds the way back...
        let viewer = key(0xc000_0232, 50000);
        t.inbound(viewer, exit, true, now);
        assert_eq!(
            t.reply(&viewer, now),
            Some(exit),
            "viewer's reply is routed"
        );
        // ...the flood goes on (less than a table's worth within one round trip)...
        for i in 0..(cap as u32 / 2) {
            t.inbound(key(0x0b00_0000 + i, 2000), exit, true, now);
        }
        // ...its ACK confirms it, and from then on no flood can push it out.
        t.inbound(viewer, exit, false, now);
        assert!(t.is_confirmed(&viewer));
        for i in 0..(3 * cap as u32) {
            t.inbound(key(0x0c00_0000 + i, 3000), exit, true, now);
        }
        assert_eq!(
            t.reply(&viewer, now),
            Some(exit),
            "viewer survives the flood"
        );
        assert_eq!(t.reply(&running, now), Some(exit), "running flow survives");
        assert!(t.evicted.load(Ordering::Relaxed) > 0);
        // Spoofed flows age out fast; confirmed ones stay.
        let later = now + UNCONFIRMED_IDLE + Duration::from_secs(1);
        t.expire(later);
        assert_eq!(t.len(), 2);
        assert_eq!(t.reply(&viewer, later), Some(exit));
    }

    #[test]
    fn a_table_full_of_confirmed_flows_refuses_new_ones() {
        let t = PublishedFlows::new(4);
        let now = Instant::now();
        for i in 0..4 {
            let k = key(i, 1);
            t.inbound(k, NodeId(1), true, now);
            t.reply(&k, now);
            t.inbound(k, NodeId(1), false, now);
        }
        t.inbound(key(9, 1), NodeId(1), true, now);
        assert_eq!(t.reply(&key(9, 1), now), None);
        assert_eq!(t.refused.load(Ordering::Relaxed), 1);
        assert!((0..4).all(|i| t.reply(&key(i, 1), now).is_some()));
    }
}
