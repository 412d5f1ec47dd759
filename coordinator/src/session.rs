//! One map stream's outbox: what its node has not been sent yet, coalesced.
//!
//! A stream is never cut for being slow. Every change for the node is merged into [`Pending`]:
//! the latest record per peer (or its removal), the latest self record, filter, publish rules and
//! relays, the latest probe request per asking peer. So whatever the rate of changes, what waits
//! for one stream is at most one map's worth, and a slow reader gets one merged delta (or, if its
//! full map has not gone out yet, one full map with every change folded in).
//!
//! [`Pending`] is pure (merge, take); [`Session`] adds the lock and the wakeup the stream task
//! waits on. The mesh pushes under its own lock without blocking; the stream task takes the
//! merged message when its connection can accept more and serializes it outside every lock.

use homeport_proto::NodeId;
use homeport_proto::device::DeviceFilter;
use homeport_proto::filter::PacketFilter;
use homeport_proto::map::{CoordinatorInfo, MapMessage, Peer, ProbeRequest, RelayInfo, SelfNode};
use homeport_proto::publish::PublishRule;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Unsent state of one stream. Empty after [`Pending::take`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    version: u64,
    /// The unsent part starts with a full map: `peers` is then the whole peer set.
    full: bool,
    self_node: Option<SelfNode>,
    /// Latest record per peer; None: removed.
    peers: BTreeMap<NodeId, Option<Peer>>,
    filter: Option<PacketFilter>,
    publish: Option<Vec<PublishRule>>,
    relays: Option<Vec<RelayInfo>>,
    coordinators: Option<Vec<CoordinatorInfo>>,
    device_filters: Option<Vec<DeviceFilter>>,
    /// Latest ask per asking peer: an older ask's endpoints are stale.
    probes: BTreeMap<NodeId, ProbeRequest>,
    /// Something is waiting (a version-only message counts: it is what a keepalive carries).
    dirty: bool,
}

impl Pending {
    /// Folds `m` in, following the delta rules of [`MapMessage`]: a full message replaces
    /// everything unsent; a delta overrides what it sets.
    pub fn merge(&mut self, m: MapMessage) {
        self.dirty = true;
        if m.full {
            let probes = std::mem::take(&mut self.probes);
            *self = Pending {
                version: self.version.max(m.version),
                full: true,
                self_node: m.self_node,
                peers: m.peers.into_iter().map(|p| (p.id, Some(p))).collect(),
                filter: m.filter,
                publish: m.publish,
                relays: m.relays,
                coordinators: m.coordinators,
                device_filters: m.device_filters,
                probes,
                dirty: true,
            };
        } else {
            self.version = self.version.max(m.version);
            if m.self_node.is_some() {
                self.self_node = m.self_node;
            }
            for id in m.peers_removed {
                if self.full {
                    // Not in the full map that has not gone out: simply absent.
                    self.peers.remove(&id);
                } else {
                    self.peers.insert(id, None);
                }
            }
            for p in m.peers {
                self.peers.insert(p.id, Some(p));
            }
            if m.filter.is_some() {
                self.filter = m.filter;
            }
            if m.publish.is_some() {
                self.publish = m.publish;
            }
            if m.relays.is_some() {
                self.relays = m.relays;
            }
            if m.coordinators.is_some() {
                self.coordinators = m.coordinators;
            }
            if m.device_filters.is_some() {
                self.device_filters = m.device_filters;
            }
        }
        for p in m.probe_requests {
            self.probes.insert(p.from, p);
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.dirty
    }

    /// Number of peer records waiting (at most one per peer, whatever happened to it).
    pub fn peer_records(&self) -> usize {
        self.peers.len()
    }

    /// The merged message, leaving nothing pending; None when nothing waits.
    pub fn take(&mut self) -> Option<MapMessage> {
        if !self.dirty {
            return None;
        }
        let version = self.version;
        let p = std::mem::take(self);
        self.version = version;
        let mut peers = Vec::new();
        let mut peers_removed = Vec::new();
        for (id, rec) in p.peers {
            match rec {
                Some(r) => peers.push(r),
                None => peers_removed.push(id),
            }
        }
        Some(MapMessage {
            version: p.version,
            full: p.full,
            self_node: p.self_node,
            peers,
            peers_removed,
            filter: p.filter,
            publish: p.publish,
            relays: p.relays,
            coordinators: p.coordinators,
            device_filters: p.device_filters,
            probe_requests: p.probes.into_values().collect(),
        })
    }
}

#[derive(Default)]
struct Outbox {
    pending: Pending,
    closed: bool,
}

/// What [`Session::take`] found. Returned once per message and matched at once: boxing the
/// message would cost an allocation per message to save a move.
#[derive(Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Taken {
    Message(MapMessage),
    /// Nothing waits; wait for a wakeup.
    Nothing,
    /// Closed and drained: end the stream.
    Closed,
}

/// The outbox of one open map stream, shared by the mesh (which pushes) and the stream task.
#[derive(Default)]
pub struct Session {
    outbox: Mutex<Outbox>,
    wake: Notify,
}

impl Session {
    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Merges `m` into what is unsent and wakes the stream task. Never blocks on the reader.
    pub fn push(&self, m: MapMessage) {
        let mut o = self.outbox();
        if o.closed {
            return;
        }
        o.pending.merge(m);
        drop(o);
        self.wake.notify_one();
    }

    /// Ends the stream once what is pending has been taken (node removed, shutdown).
    pub fn close(&self) {
        self.outbox().closed = true;
        self.wake.notify_one();
    }

    pub fn take(&self) -> Taken {
        let mut o = self.outbox();
        match o.pending.take() {
            Some(m) => Taken::Message(m),
            None if o.closed => Taken::Closed,
            None => Taken::Nothing,
        }
    }

    /// Peer records waiting (for tests and metrics).
    pub fn pending_peer_records(&self) -> usize {
        self.outbox().pending.peer_records()
    }

    /// The next merged message; None once closed and drained.
    pub async fn next(&self) -> Option<MapMessage> {
        loop {
            // notify_one stores a permit when nobody waits, so a push between take and
            // notified() is not lost.
            match self.take() {
                Taken::Message(m) => return Some(m),
                Taken::Closed => return None,
                Taken::Nothing => self.wake.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homeport_proto::PublicKey;
    use homeport_proto::map::{Endpoint, EndpointKind, MeshAddrs, NetworkMap};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    fn peer(id: i64, port: u16) -> Peer {
        Peer {
            id: NodeId(id),
            name: format!("n{id}").parse().unwrap(),
            public_key: PublicKey([id as u8; 32]),
            addrs: MeshAddrs {
                ipv4: Ipv4Addr::new(100, 96, (id >> 8) as u8, id as u8),
                ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, id as u16),
            },
            endpoints: vec![Endpoint {
                addr: SocketAddr::from(([192, 0, 2, 1], port)),
                kind: EndpointKind::Local,
            }],
            online: true,
            tags: vec![],
            routes: vec![],
            via: None,
        }
    }

    fn full(version: u64, peers: Vec<Peer>) -> MapMessage {
        MapMessage {
            version,
            full: true,
            self_node: Some(SelfNode {
                id: NodeId(1),
                name: "me".parse().unwrap(),
                public_key: PublicKey([1; 32]),
                addrs: MeshAddrs {
                    ipv4: Ipv4Addr::new(100, 96, 0, 1),
                    ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1),
                },
                prefix_v4: "100.96.0.0/16".parse().unwrap(),
                prefix_v6: "fd00::/64".parse().unwrap(),
                tags: vec![],
                routes: vec![],
                mesh_domain: None,
            }),
            peers,
            filter: Some(PacketFilter::allow_all()),
            publish: Some(vec![]),
            relays: Some(vec![]),
            ..Default::default()
        }
    }

    fn delta(version: u64, peers: Vec<Peer>, removed: Vec<i64>) -> MapMessage {
        MapMessage {
            version,
            peers,
            peers_removed: removed.into_iter().map(NodeId).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_slow_reader_under_an_event_storm_gets_one_merged_delta() {
        let peers: Vec<Peer> = (2..102).map(|i| peer(i, 1)).collect();
        let mut reader = NetworkMap::from_full(full(10, peers.clone())).unwrap();
        // What a reader that applied every message one by one would hold.
        let mut eager = reader.clone();
        let mut p = Pending::default();
        let mut v = 10;
        for round in 0..1000u16 {
            for i in 2..102 {
                v += 1;
                let d = delta(v, vec![peer(i, 2 + round)], vec![]);
                eager.apply(d.clone()).unwrap();
                p.merge(d);
            }
        }
        v += 1;
        let gone = delta(v, vec![], vec![50]);
        eager.apply(gone.clone()).unwrap();
        p.merge(gone);
        // 100,001 changes wait as one record per peer.
        assert_eq!(p.peer_records(), 100);
        let m = p.take().unwrap();
        assert!(!m.full);
        assert_eq!(m.peers.len(), 99);
        assert_eq!(m.peers_removed, vec![NodeId(50)]);
        assert_eq!(m.version, v);
        reader.apply(m).unwrap();
        assert_eq!(reader, eager, "the merged delta gives the same map");
        assert!(p.take().is_none(), "nothing left");
    }

    #[test]
    fn memory_is_bounded_by_one_map_not_by_the_number_of_events() {
        // Ports of one width, so the sizes compare records, not digits.
        let peers: Vec<Peer> = (2..202).map(|i| peer(i, 10000)).collect();
        let one_map = serde_json::to_vec(&full(1, peers.clone())).unwrap().len();
        let mut p = Pending::default();
        p.merge(full(1, peers));
        for round in 0..200u16 {
            for i in 2..202 {
                p.merge(delta(2, vec![peer(i, 20000 + round)], vec![]));
                // A probe storm from one peer keeps only its latest ask.
                p.merge(MapMessage {
                    version: 2,
                    probe_requests: vec![ProbeRequest {
                        from: NodeId(2),
                        endpoints: vec![],
                    }],
                    ..Default::default()
                });
            }
            let size = serde_json::to_vec(&p.clone().take().unwrap())
                .unwrap()
                .len();
            assert!(size <= one_map + 200, "round {round}: {size} > {one_map}");
        }
        // The full map has not gone out: it leaves as one full map with everything folded in.
        let m = p.take().unwrap();
        assert!(m.full);
        assert_eq!(m.peers.len(), 200);
        assert_eq!(m.probe_requests.len(), 1);
        assert!(m.peers.iter().all(|x| x.endpoints[0].addr.port() == 20199));
    }

    #[test]
    fn a_removal_before_the_full_map_went_out_just_drops_the_peer() {
        let mut p = Pending::default();
        p.merge(full(1, vec![peer(2, 1), peer(3, 1)]));
        p.merge(delta(2, vec![], vec![3]));
        p.merge(delta(3, vec![peer(4, 1)], vec![]));
        let m = p.take().unwrap();
        assert!(m.full && m.peers_removed.is_empty());
        assert_eq!(
            m.peers.iter().map(|x| x.id.0).collect::<Vec<_>>(),
            vec![2, 4]
        );
        // Later a removal is sent as one.
        p.merge(delta(4, vec![], vec![2]));
        assert_eq!(p.take().unwrap().peers_removed, vec![NodeId(2)]);
    }

    #[tokio::test]
    async fn session_wakes_its_reader_and_ends_after_close() {
        let s = std::sync::Arc::new(Session::default());
        let r = {
            let s = s.clone();
            tokio::spawn(async move {
                let mut got = vec![];
                while let Some(m) = s.next().await {
                    got.push(m);
                }
                got
            })
        };
        s.push(delta(5, vec![peer(2, 1)], vec![]));
        tokio::task::yield_now().await;
        s.push(delta(6, vec![peer(2, 2)], vec![]));
        s.close();
        s.push(delta(7, vec![peer(2, 3)], vec![]));
        let got = r.await.unwrap();
        let last = got.last().unwrap();
        assert_eq!(
            last.peers[0].endpoints[0].addr.port(),
            2,
            "nothing after close"
        );
        assert!(got.len() <= 2);
    }
}
