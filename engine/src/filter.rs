//! The packet filter compiled from the coordinator's [`PacketFilter`], and the flow tables.

use super::packet::{self, PacketInfo};
use homeport_proto::NodeId;
use homeport_proto::filter::{PacketFilter, PortRange, Proto};
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Published flows tracked at most (each ~64 bytes): bounds memory under a flood of sources.
pub const PUBLISH_FLOW_CAP: usize = 65_536;
/// UDP flows opened towards peers tracked at most.
pub const UDP_FLOW_CAP: usize = 16_384;
/// A flow idle this long is forgotten. Longer than the usual conntrack UDP stream timeout
/// (120 s) so a live UDP stream never loses its way back; TCP flows refresh with every packet.
pub const FLOW_IDLE: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Default)]
pub struct CompiledFilter {
    pub allow_all: bool,
    rules: Vec<CompiledRule>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    sources: Vec<IpNet>,
    /// Empty: our own addresses; else forwarded destinations.
    dests: Vec<IpNet>,
    protos: Vec<u8>,
    ports: Vec<PortRange>,
}

impl CompiledFilter {
    pub fn compile(f: &PacketFilter) -> CompiledFilter {
        CompiledFilter {
            allow_all: f.allow_all,
            rules: f
                .rules
                .iter()
                .map(|r| CompiledRule {
                    sources: r.sources.clone(),
                    dests: r.dests.clone(),
                    protos: if r.protos.is_empty() {
                        vec![
                            packet::PROTO_TCP,
                            packet::PROTO_UDP,
                            packet::PROTO_ICMP,
                            packet::PROTO_ICMPV6,
                        ]
                    } else {
                        r.protos
                            .iter()
                            .flat_map(|p| match p {
                                Proto::Tcp => vec![packet::PROTO_TCP],
                                Proto::Udp => vec![packet::PROTO_UDP],
                                Proto::Icmp => vec![packet::PROTO_ICMP, packet::PROTO_ICMPV6],
                                // A protocol this node does not know admits nothing.
                                Proto::Unknown => vec![],
                            })
                            .collect()
                    },
                    ports: r.ports.clone(),
                })
                .collect(),
        }
    }

    /// True when a rule admits this flow-opening packet; `to_self`: it is for this node (else
    /// forwarded along one of its routes: only rules with `dests` holding it admit it).
    pub fn allows(&self, i: &PacketInfo, to_self: bool) -> bool {
        self.allow_all
            || self.rules.iter().any(|r| {
                (if r.dests.is_empty() {
                    to_self
                } else {
                    !to_self && r.dests.iter().any(|d| d.contains(&i.dst))
                }) && r.sources.iter().any(|n| n.contains(&i.src))
                    && r.protos.contains(&i.proto)
                    && (i.is_icmp()
                        || r.ports.is_empty()
                        || r.ports.iter().any(|p| p.contains(i.dst_port)))
            })
    }
}

/// (protocol, remote address, remote port, local port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: u8,
    pub remote: IpAddr,
    pub remote_port: u16,
    pub local_port: u16,
}

impl FlowKey {
    pub fn new(proto: u8, remote: IpAddr, remote_port: u16, local_port: u16) -> FlowKey {
        FlowKey {
            proto,
            remote,
            remote_port,
            local_port,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub peer: NodeId,
    pub last_seen: Instant,
}

/// A bounded flow table shared by the data path threads.
pub struct FlowTable {
    cap: usize,
    map: Mutex<HashMap<FlowKey, Flow>>,
}

impl FlowTable {
    pub fn new(cap: usize) -> FlowTable {
        FlowTable {
            cap,
            map: Mutex::new(HashMap::with_capacity(1024)),
        }
    }

    pub fn get(&self, k: &FlowKey, now: Instant) -> Option<Flow> {
        let m = self.map.lock().unwrap();
        m.get(k)
            .copied()
            .filter(|f| now.saturating_duration_since(f.last_seen) < FLOW_IDLE)
    }

    /// Inserts or refreshes a flow. When the table is full, new flows are not tracked (their
    /// replies are dropped) rather than evicting live ones.
    pub fn touch(&self, k: FlowKey, peer: NodeId, now: Instant) {
        let mut m = self.map.lock().unwrap();
        let len = m.len();
        match m.get_mut(&k) {
            Some(f) => {
                f.peer = peer;
                f.last_seen = now;
            }
            None if len < self.cap => {
                m.insert(
                    k,
                    Flow {
                        peer,
                        last_seen: now,
                    },
                );
            }
            None => tracing::debug!("flow table full ({len}); not tracking a new flow"),
        }
    }

    pub fn expire(&self, now: Instant) {
        self.map
            .lock()
            .unwrap()
            .retain(|_, f| now.saturating_duration_since(f.last_seen) < FLOW_IDLE);
    }

    pub fn retain(&self, mut keep: impl FnMut(&FlowKey, &Flow) -> bool) {
        self.map.lock().unwrap().retain(|k, f| keep(k, f));
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
