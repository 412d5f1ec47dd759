//! The coordinator's in-memory view of the mesh and the registry of open map streams.
//!
//! The database is the source of truth; every mutation is committed there first and then applied
//! here, which computes the deltas for exactly the nodes the change concerns and pushes them to
//! their open streams. Nothing here does IO; sending is a non-blocking `try_send`.

use homeport_proto::filter::{FilterRule, PacketFilter, PortRange, Proto};
use homeport_proto::map::{
    Endpoint, MapMessage, MeshAddrs, Peer, ProbeRequest, RelayInfo, SelfNode,
};
use homeport_proto::policy::{Policy, Selector, parse_port_spec};
use homeport_proto::publish::PublishRule;
use homeport_proto::{NodeId, NodeName, PublicKey};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tokio::sync::mpsc;

/// Messages queued per stream before the stream counts as stuck. A stuck stream is closed; the
/// node reconnects and gets a fresh full map, which is cheaper than buffering without bound.
pub const STREAM_QUEUE: usize = 256;

/// A registered node as the coordinator knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRec {
    pub id: NodeId,
    pub name: NodeName,
    pub public_key: PublicKey,
    pub addrs: MeshAddrs,
    pub tags: Vec<String>,
    pub created_at: i64,
    pub last_seen: Option<i64>,
    pub endpoints: Vec<Endpoint>,
    pub online: bool,
}

impl NodeRec {
    pub fn peer(&self) -> Peer {
        Peer {
            id: self.id,
            name: self.name.clone(),
            public_key: self.public_key,
            addrs: self.addrs,
            endpoints: self.endpoints.clone(),
            online: self.online,
            tags: self.tags.clone(),
        }
    }
}

fn selector_matches(sel: &Selector, n: &NodeRec) -> bool {
    match sel {
        Selector::Any => true,
        Selector::Tag(t) => n.tags.iter().any(|x| x == t),
        Selector::Node(name) => n.name.as_str() == name,
    }
}

fn any_matches(sels: &[String], n: &NodeRec) -> bool {
    sels.iter().any(|s| {
        Selector::parse(s)
            .map(|sel| selector_matches(&sel, n))
            .unwrap_or(false)
    })
}

/// Compiles `policy` into the inbound packet filter of `target`. `None` (no policy, or a policy
/// without rules) means every node may reach every node.
pub fn compile_filter<'a>(
    policy: Option<&Policy>,
    nodes: impl Iterator<Item = &'a NodeRec> + Clone,
    target: &NodeRec,
) -> PacketFilter {
    let Some(policy) = policy.filter(|p| !p.rules.is_empty()) else {
        return PacketFilter::allow_all();
    };
    let mut out = Vec::new();
    for rule in &policy.rules {
        if !any_matches(&rule.to, target) {
            continue;
        }
        let mut sources: Vec<IpNet> = Vec::new();
        for n in nodes.clone() {
            if n.id != target.id && any_matches(&rule.from, n) {
                sources.push(IpNet::V4(Ipv4Net::from(n.addrs.ipv4)));
                sources.push(IpNet::V6(Ipv6Net::from(n.addrs.ipv6)));
            }
        }
        if sources.is_empty() {
            continue;
        }
        // One FilterRule per protocol group, so that "tcp:22" and "udp:53" do not admit udp:22.
        let mut groups: Vec<(Option<Proto>, Vec<PortRange>)> = Vec::new();
        for spec in &rule.ports {
            let Ok((proto, range)) = parse_port_spec(spec) else {
                continue; // validated when stored
            };
            match groups.iter_mut().find(|(p, _)| *p == proto) {
                Some((_, v)) => v.push(range),
                None => groups.push((proto, vec![range])),
            }
        }
        for (proto, mut ranges) in groups {
            if proto == Some(Proto::Icmp) || ranges.contains(&PortRange::ANY) {
                ranges.clear();
            }
            ranges.sort_by_key(|r| (r.first, r.last));
            ranges.dedup();
            out.push(FilterRule {
                sources: sources.clone(),
                protos: proto.into_iter().collect(),
                ports: ranges,
            });
        }
    }
    PacketFilter {
        allow_all: false,
        rules: out,
    }
}

/// The registered nodes whose filter may change when node `n` appears, disappears or changes
/// tags: those matched by `to` of a rule whose `from` matches `n`, plus `n` itself.
fn filter_dependents(
    policy: Option<&Policy>,
    nodes: &BTreeMap<NodeId, NodeRec>,
    n: &NodeRec,
) -> BTreeSet<NodeId> {
    let mut out = BTreeSet::new();
    out.insert(n.id);
    let Some(policy) = policy else { return out };
    for rule in &policy.rules {
        if !any_matches(&rule.from, n) {
            continue;
        }
        for m in nodes.values() {
            if any_matches(&rule.to, m) {
                out.insert(m.id);
            }
        }
    }
    out
}

struct Stream {
    /// None once the stream was cut for not keeping up: the node gets what is queued, then EOF,
    /// and the slot stays until the stream's guard reports the end (which marks it offline).
    tx: Option<mpsc::Sender<MapMessage>>,
    generation: u64,
    /// What this stream was last told, to send a filter/publish delta only when it changed.
    filter: PacketFilter,
    publish: Vec<PublishRule>,
}

/// The in-memory mesh and the open streams. Guarded by one mutex in [`crate::state::AppState`];
/// every method is short and never blocks.
pub struct Mesh {
    pub prefix_v4: Ipv4Net,
    pub prefix_v6: Ipv6Net,
    pub relays: Vec<RelayInfo>,
    nodes: BTreeMap<NodeId, NodeRec>,
    policy: Option<Policy>,
    publish: BTreeMap<i64, PublishRule>,
    streams: HashMap<NodeId, Stream>,
    version: u64,
    next_generation: u64,
    /// The relay learns here which keys may use it.
    relay: Option<std::sync::Arc<crate::relay::Relay>>,
}

/// What a connecting stream gets back.
pub struct Connected {
    pub rx: mpsc::Receiver<MapMessage>,
    pub generation: u64,
}

impl Mesh {
    /// `start_version` should grow across restarts (the caller passes a clock reading) so a
    /// node never sees the version go backwards.
    pub fn new(
        prefix_v4: Ipv4Net,
        prefix_v6: Ipv6Net,
        relays: Vec<RelayInfo>,
        nodes: Vec<NodeRec>,
        policy: Option<Policy>,
        publish: Vec<PublishRule>,
        start_version: u64,
    ) -> Mesh {
        Mesh {
            prefix_v4,
            prefix_v6,
            relays,
            nodes: nodes.into_iter().map(|n| (n.id, n)).collect(),
            policy: policy.filter(|p| !p.rules.is_empty()),
            publish: publish.into_iter().map(|r| (r.id, r)).collect(),
            streams: HashMap::new(),
            version: start_version,
            next_generation: 1,
            relay: None,
        }
    }

    /// Connects the relay: from now on it serves exactly the registered nodes.
    pub fn set_relay(&mut self, relay: std::sync::Arc<crate::relay::Relay>) {
        self.relay = Some(relay);
        self.sync_relay();
    }

    pub fn relay(&self) -> Option<std::sync::Arc<crate::relay::Relay>> {
        self.relay.clone()
    }

    fn sync_relay(&self) {
        if let Some(r) = &self.relay {
            r.set_authorized(self.nodes.values().map(|n| *n.public_key.as_bytes()));
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn node(&self, id: NodeId) -> Option<&NodeRec> {
        self.nodes.get(&id)
    }
    pub fn node_by_name(&self, name: &str) -> Option<&NodeRec> {
        self.nodes.values().find(|n| n.name.as_str() == name)
    }
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRec> {
        self.nodes.values()
    }
    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref()
    }
    pub fn publish_rules(&self) -> impl Iterator<Item = &PublishRule> {
        self.publish.values()
    }
    pub fn online_count(&self) -> usize {
        self.streams.len()
    }
    pub fn is_connected(&self, id: NodeId) -> bool {
        self.streams.contains_key(&id)
    }

    fn filter_for(&self, n: &NodeRec) -> PacketFilter {
        compile_filter(self.policy.as_ref(), self.nodes.values(), n)
    }

    fn publish_for(&self, id: NodeId) -> Vec<PublishRule> {
        self.publish
            .values()
            .filter(|r| r.exit == id || r.target == id)
            .cloned()
            .collect()
    }

    fn self_node(&self, n: &NodeRec) -> SelfNode {
        SelfNode {
            id: n.id,
            name: n.name.clone(),
            public_key: n.public_key,
            addrs: n.addrs,
            prefix_v4: self.prefix_v4,
            prefix_v6: self.prefix_v6,
            tags: n.tags.clone(),
        }
    }

    /// The full map for `n` at the current version.
    pub fn full_map(&self, n: &NodeRec) -> MapMessage {
        MapMessage {
            version: self.version,
            full: true,
            self_node: Some(self.self_node(n)),
            peers: self
                .nodes
                .values()
                .filter(|p| p.id != n.id)
                .map(NodeRec::peer)
                .collect(),
            peers_removed: vec![],
            filter: Some(self.filter_for(n)),
            publish: Some(self.publish_for(n.id)),
            relays: Some(self.relays.clone()),
            probe_requests: vec![],
        }
    }

    /// Sends `msg` to `id`'s stream if it has one; a stream that cannot take it is closed.
    fn send(&mut self, id: NodeId, msg: MapMessage) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(tx) = &s.tx else { return };
        if let Err(e) = tx.try_send(msg) {
            tracing::warn!(node = %id, error = %e, "map stream cannot keep up; closing it so the node reconnects");
            s.tx = None;
        }
    }

    /// Delivers one change: `peers`/`peers_removed` to every connected node except `subject`,
    /// and a recomputed filter to the connected nodes in `filter_check` whose filter changed.
    fn broadcast(
        &mut self,
        subject: NodeId,
        peers: Vec<Peer>,
        peers_removed: Vec<NodeId>,
        filter_check: BTreeSet<NodeId>,
    ) {
        self.version += 1;
        let version = self.version;
        let mut msgs: BTreeMap<NodeId, MapMessage> = BTreeMap::new();
        if !peers.is_empty() || !peers_removed.is_empty() {
            for &id in self.streams.keys() {
                if id != subject {
                    msgs.insert(
                        id,
                        MapMessage {
                            version,
                            peers: peers.clone(),
                            peers_removed: peers_removed.clone(),
                            ..Default::default()
                        },
                    );
                }
            }
        }
        for id in filter_check {
            let Some(n) = self.nodes.get(&id) else {
                continue;
            };
            if !self.streams.contains_key(&id) {
                continue;
            }
            let f = self.filter_for(n);
            let s = self.streams.get_mut(&id).expect("checked above");
            if s.filter != f {
                s.filter = f.clone();
                msgs.entry(id)
                    .or_insert_with(|| MapMessage {
                        version,
                        ..Default::default()
                    })
                    .filter = Some(f);
            }
        }
        for (id, m) in msgs {
            self.send(id, m);
        }
    }

    /// Sends the current publish list to `id` if it differs from what its stream last got.
    fn refresh_publish(&mut self, id: NodeId) {
        let list = self.publish_for(id);
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.publish == list {
            return;
        }
        s.publish = list.clone();
        let m = MapMessage {
            version: self.version,
            publish: Some(list),
            ..Default::default()
        };
        self.send(id, m);
    }

    /// A node registered, re-registered or changed (tags, endpoints, online state).
    pub fn upsert_node(&mut self, rec: NodeRec) {
        let old = self.nodes.insert(rec.id, rec.clone());
        if old.as_ref() == Some(&rec) {
            return;
        }
        if old.as_ref().map(|o| o.public_key) != Some(rec.public_key) {
            self.sync_relay();
        }
        let tags_changed = old.as_ref().map(|o| o.tags != rec.tags).unwrap_or(true);
        let mut check = BTreeSet::new();
        if tags_changed {
            check = filter_dependents(self.policy.as_ref(), &self.nodes, &rec);
            if let Some(o) = &old {
                check.extend(filter_dependents(self.policy.as_ref(), &self.nodes, o));
            }
        }
        let self_changed = old
            .as_ref()
            .map(|o| o.tags != rec.tags || o.name != rec.name || o.addrs != rec.addrs)
            .unwrap_or(false);
        self.broadcast(rec.id, vec![rec.peer()], vec![], check);
        if self_changed && self.streams.contains_key(&rec.id) {
            let m = MapMessage {
                version: self.version,
                self_node: Some(self.self_node(&rec)),
                ..Default::default()
            };
            self.send(rec.id, m);
        }
    }

    pub fn set_endpoints(&mut self, id: NodeId, endpoints: Vec<Endpoint>) {
        if let Some(mut n) = self.nodes.get(&id).cloned() {
            n.endpoints = endpoints;
            self.upsert_node(n);
        }
    }

    fn set_online(&mut self, id: NodeId, online: bool, now: i64) {
        if let Some(mut n) = self.nodes.get(&id).cloned() {
            n.online = online;
            n.last_seen = Some(now);
            // last_seen alone is not part of the map; only an online flip is news.
            if self.nodes.get(&id).map(|o| o.online) == Some(online) {
                self.nodes.insert(id, n);
            } else {
                self.upsert_node(n);
            }
        }
    }

    /// Removes a node: closes its stream at once, tells every other node, drops the publish
    /// rules it took part in and tells their other party. Returns the dropped rule ids.
    pub fn remove_node(&mut self, id: NodeId) -> Vec<i64> {
        self.streams.remove(&id);
        let Some(old) = self.nodes.remove(&id) else {
            return vec![];
        };
        self.sync_relay();
        let mut check = filter_dependents(self.policy.as_ref(), &self.nodes, &old);
        check.remove(&id);
        self.broadcast(id, vec![], vec![id], check);
        let dropped: Vec<PublishRule> = self
            .publish
            .values()
            .filter(|r| r.exit == id || r.target == id)
            .cloned()
            .collect();
        for r in &dropped {
            self.publish.remove(&r.id);
        }
        for r in &dropped {
            self.refresh_publish(r.exit);
            self.refresh_publish(r.target);
        }
        dropped.iter().map(|r| r.id).collect()
    }

    /// Replaces the policy (None or no rules = allow all) and sends changed filters.
    pub fn set_policy(&mut self, policy: Option<Policy>) {
        self.policy = policy.filter(|p| !p.rules.is_empty());
        // A policy change can concern every node: recompute each connected node's filter.
        let all: BTreeSet<NodeId> = self.streams.keys().copied().collect();
        self.broadcast(NodeId(0), vec![], vec![], all);
    }

    pub fn add_publish(&mut self, rule: PublishRule) {
        let (exit, target) = (rule.exit, rule.target);
        self.publish.insert(rule.id, rule);
        self.version += 1;
        self.refresh_publish(exit);
        self.refresh_publish(target);
    }

    pub fn remove_publish(&mut self, id: i64) -> Option<PublishRule> {
        let rule = self.publish.remove(&id)?;
        self.version += 1;
        self.refresh_publish(rule.exit);
        self.refresh_publish(rule.target);
        Some(rule)
    }

    /// True when the policy lets some traffic flow between `a` and `b` in either direction (no
    /// policy: always). Nodes that may not talk have no path worth opening.
    pub fn may_talk(&self, a: NodeId, b: NodeId) -> bool {
        let (Some(na), Some(nb)) = (self.nodes.get(&a), self.nodes.get(&b)) else {
            return false;
        };
        let Some(policy) = &self.policy else {
            return true;
        };
        policy.rules.iter().any(|r| {
            (any_matches(&r.from, na) && any_matches(&r.to, nb))
                || (any_matches(&r.from, nb) && any_matches(&r.to, na))
        })
    }

    /// Tells `peer` to probe `from` now. False when `peer` has no open stream.
    pub fn probe(&mut self, from: NodeId, peer: NodeId) -> bool {
        let Some(f) = self.nodes.get(&from) else {
            return false;
        };
        if !self.streams.contains_key(&peer) {
            return false;
        }
        let m = MapMessage {
            version: self.version,
            probe_requests: vec![ProbeRequest {
                from,
                endpoints: f.endpoints.clone(),
            }],
            ..Default::default()
        };
        self.send(peer, m);
        true
    }

    /// Opens (or replaces) `id`'s stream; its first message is the full map. None when the node
    /// does not exist (any more).
    pub fn connect(&mut self, id: NodeId, now: i64) -> Option<Connected> {
        let n = self.nodes.get(&id)?.clone();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let generation = self.next_generation;
        self.next_generation += 1;
        // Marking online first lets the full map carry the version that includes it.
        self.streams.remove(&id);
        self.set_online(id, true, now);
        let full = self.full_map(self.nodes.get(&id).unwrap_or(&n));
        tx.try_send(full.clone()).ok()?;
        let stream = Stream {
            tx: Some(tx),
            generation,
            filter: full.filter.clone().unwrap_or_else(PacketFilter::allow_all),
            publish: full.publish.unwrap_or_default(),
        };
        self.streams.insert(id, stream);
        Some(Connected { rx, generation })
    }

    /// The stream `generation` of `id` ended. A replaced stream's end changes nothing.
    pub fn disconnect(&mut self, id: NodeId, generation: u64, now: i64) -> bool {
        match self.streams.get(&id) {
            Some(s) if s.generation == generation => {
                self.streams.remove(&id);
                self.set_online(id, false, now);
                true
            }
            _ => false,
        }
    }

    /// Closes every stream (shutdown).
    pub fn close_all(&mut self) {
        self.streams.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homeport_proto::map::EndpointKind;
    use homeport_proto::policy::PolicyRule;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    fn node(id: i64, name: &str, tags: &[&str]) -> NodeRec {
        NodeRec {
            id: NodeId(id),
            name: name.parse().unwrap(),
            public_key: PublicKey([id as u8; 32]),
            addrs: MeshAddrs {
                ipv4: Ipv4Addr::new(100, 96, 0, id as u8),
                ipv6: Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, id as u16),
            },
            tags: tags.iter().map(|s| s.to_string()).collect(),
            created_at: 0,
            last_seen: None,
            endpoints: vec![],
            online: false,
        }
    }

    fn rule(from: &[&str], to: &[&str], ports: &[&str]) -> PolicyRule {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        PolicyRule {
            from: v(from),
            to: v(to),
            ports: v(ports),
        }
    }

    fn mesh(nodes: Vec<NodeRec>, policy: Option<Policy>) -> Mesh {
        Mesh::new(
            "100.96.0.0/16".parse().unwrap(),
            "fd7a:115c:a1e0::/64".parse().unwrap(),
            vec![],
            nodes,
            policy,
            vec![],
            100,
        )
    }

    #[test]
    fn no_policy_allows_all() {
        let a = node(1, "a", &[]);
        let f = compile_filter(None, [a.clone()].iter(), &a);
        assert_eq!(f, PacketFilter::allow_all());
        let empty = Policy { rules: vec![] };
        assert!(compile_filter(Some(&empty), [a.clone()].iter(), &a).allow_all);
    }

    #[test]
    fn policy_compiles_sources_and_port_groups() {
        let home = node(1, "home", &["server"]);
        let tv = node(2, "tv", &["friends"]);
        let laptop = node(3, "laptop", &["admin"]);
        let all = [home.clone(), tv.clone(), laptop.clone()];
        let p = Policy {
            rules: vec![
                rule(
                    &["tag:friends"],
                    &["node:home"],
                    &["tcp:32400", "icmp", "udp:53", "tcp:22"],
                ),
                rule(&["tag:admin"], &["*"], &["*"]),
            ],
        };
        p.validate().unwrap();
        let f = compile_filter(Some(&p), all.iter(), &home);
        assert!(!f.allow_all);
        // friends rule: tcp group, udp group, icmp group; admin rule: one any-rule.
        assert_eq!(f.rules.len(), 4);
        let tcp = f
            .rules
            .iter()
            .find(|r| r.protos == vec![Proto::Tcp])
            .unwrap();
        assert_eq!(
            tcp.ports,
            vec![PortRange::single(22), PortRange::single(32400)]
        );
        assert_eq!(
            tcp.sources,
            vec![
                "100.96.0.2/32".parse::<IpNet>().unwrap(),
                "fd7a:115c:a1e0::2/128".parse().unwrap()
            ]
        );
        let udp = f
            .rules
            .iter()
            .find(|r| r.protos == vec![Proto::Udp])
            .unwrap();
        assert_eq!(udp.ports, vec![PortRange::single(53)]);
        let icmp = f
            .rules
            .iter()
            .find(|r| r.protos == vec![Proto::Icmp])
            .unwrap();
        assert!(icmp.ports.is_empty());
        let any = f.rules.iter().find(|r| r.protos.is_empty()).unwrap();
        assert!(any.ports.is_empty());
        assert_eq!(any.sources[0], "100.96.0.3/32".parse::<IpNet>().unwrap());

        // The tv is reachable only from the admin laptop; the laptop from nobody.
        let f = compile_filter(Some(&p), all.iter(), &tv);
        assert_eq!(f.rules.len(), 1);
        assert_eq!(f.rules[0].sources.len(), 2);
        let f = compile_filter(Some(&p), all.iter(), &laptop);
        assert_eq!(
            f,
            PacketFilter {
                allow_all: false,
                rules: vec![]
            }
        );
    }

    #[test]
    fn bare_name_and_self_exclusion() {
        let a = node(1, "a", &["x"]);
        let b = node(2, "b", &["x"]);
        let p = Policy {
            rules: vec![rule(&["tag:x"], &["a"], &["8000-8100"])],
        };
        let f = compile_filter(Some(&p), [a.clone(), b.clone()].iter(), &a);
        assert_eq!(f.rules.len(), 1);
        // a itself is not a source of its own filter.
        assert_eq!(f.rules[0].sources.len(), 2);
        assert!(f.rules[0].protos.is_empty());
        assert_eq!(
            f.rules[0].ports,
            vec![PortRange {
                first: 8000,
                last: 8100
            }]
        );
    }

    #[test]
    fn deltas_reach_only_affected_streams() {
        let p = Policy {
            rules: vec![rule(&["tag:friends"], &["node:home"], &["tcp:32400"])],
        };
        let mut m = mesh(vec![node(1, "home", &[]), node(2, "other", &[])], Some(p));
        let mut home = m.connect(NodeId(1), 10).unwrap();
        let mut other = m.connect(NodeId(2), 10).unwrap();
        let full = home.rx.try_recv().unwrap();
        assert!(full.full);
        assert_eq!(full.filter.unwrap().rules.len(), 0);
        // home learns that "other" came online.
        let d = home.rx.try_recv().unwrap();
        assert!(d.peers[0].online && d.peers[0].id == NodeId(2));
        assert!(other.rx.try_recv().unwrap().full);
        assert!(other.rx.try_recv().is_err());

        // A friend registers: both get a peer delta; only home gets a new filter.
        m.upsert_node(node(3, "tv", &["friends"]));
        let d = home.rx.try_recv().unwrap();
        assert_eq!(d.peers.len(), 1);
        assert_eq!(d.filter.unwrap().rules[0].sources.len(), 2);
        let d = other.rx.try_recv().unwrap();
        assert_eq!(d.peers.len(), 1);
        assert!(d.filter.is_none());

        // Endpoints: a peer delta, no filter.
        m.set_endpoints(
            NodeId(2),
            vec![Endpoint {
                addr: "192.0.2.1:4000".parse().unwrap(),
                kind: EndpointKind::Local,
            }],
        );
        let d = home.rx.try_recv().unwrap();
        assert_eq!(d.peers[0].endpoints.len(), 1);
        assert!(d.filter.is_none());
        assert!(
            other.rx.try_recv().is_err(),
            "a node gets no delta about itself"
        );

        // Probe goes only to the named peer.
        assert!(m.probe(NodeId(2), NodeId(1)));
        let d = home.rx.try_recv().unwrap();
        assert_eq!(d.probe_requests[0].from, NodeId(2));
        assert_eq!(d.probe_requests[0].endpoints.len(), 1);

        // Removal closes the stream and tells the others.
        m.remove_node(NodeId(2));
        assert!(matches!(
            other.rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        let d = home.rx.try_recv().unwrap();
        assert_eq!(d.peers_removed, vec![NodeId(2)]);

        // A replaced stream's end does not mark the node offline.
        let second = m.connect(NodeId(1), 11).unwrap();
        assert!(!m.disconnect(NodeId(1), home.generation, 12));
        assert!(m.node(NodeId(1)).unwrap().online);
        assert!(m.disconnect(NodeId(1), second.generation, 12));
        assert!(!m.node(NodeId(1)).unwrap().online);
    }

    #[test]
    fn a_stuck_stream_is_cut_and_then_reported_offline() {
        let mut m = mesh(vec![node(1, "slow", &[]), node(2, "watcher", &[])], None);
        let mut slow = m.connect(NodeId(1), 0).unwrap();
        let mut watcher = m.connect(NodeId(2), 0).unwrap();
        while watcher.rx.try_recv().is_ok() {}
        for i in 0..(STREAM_QUEUE as u16 + 10) {
            m.set_endpoints(
                NodeId(2),
                vec![Endpoint {
                    addr: SocketAddr::from(([192, 0, 2, 1], 1000 + i)),
                    kind: EndpointKind::Local,
                }],
            );
        }
        let mut got = 0;
        while slow.rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, STREAM_QUEUE, "what was queued is delivered");
        assert!(matches!(
            slow.rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        // Still online until the stream's end is reported; then the watcher hears it.
        assert!(m.node(NodeId(1)).unwrap().online);
        assert!(m.disconnect(NodeId(1), slow.generation, 5));
        let d = watcher.rx.try_recv().unwrap();
        assert_eq!(d.peers[0].id, NodeId(1));
        assert!(!d.peers[0].online);
    }
}
