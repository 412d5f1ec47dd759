//! The coordinator's in-memory view of the mesh and the registry of open map streams.
//!
//! The database is the source of truth; every mutation is committed there first and then applied
//! here, which computes the deltas for exactly the nodes the change concerns and pushes them to
//! their open streams. Nothing here does IO; sending merges into the stream's
//! [`Session`](crate::session::Session), which never blocks and never cuts a slow reader.
//!
//! Maps are trimmed by the policy: a node's map holds the peers it may reach or that may reach
//! it, plus the other party of every publish rule it is exit or target of; with no policy,
//! everyone. A change of node X goes only to the streams of nodes whose map holds X.

use crate::reach::Reach;
use crate::session::Session;
use homeport_proto::device::DeviceFilter;
use homeport_proto::filter::{FilterRule, PacketFilter, PortRange, Proto};
use homeport_proto::map::{
    CoordinatorInfo, Endpoint, MapMessage, MeshAddrs, Peer, ProbeRequest, RelayInfo, SelfNode,
};
use homeport_proto::policy::{Policy, Selector, parse_port_spec};
use homeport_proto::publish::PublishRule;
use homeport_proto::{NodeId, NodeName, PublicKey};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

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
    /// Approved routes the node advertises (`crate::routes`): its allowed IPs in every map.
    pub routes: Vec<IpNet>,
    /// A plain-WireGuard device: the node it connects through (see `devices.rs`).
    pub via: Option<NodeId>,
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
            routes: self.routes.clone(),
            via: self.via,
        }
    }
}

fn selector_matches(sel: &Selector, n: &NodeRec) -> bool {
    match sel {
        Selector::Any => true,
        Selector::Tag(t) => n.tags.iter().any(|x| x == t),
        Selector::Node(name) => n.name.as_str() == name,
        Selector::Addr(_) | Selector::Internet => false,
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
        let to: Vec<Selector> = rule
            .to
            .iter()
            .filter_map(|s| Selector::parse(s).ok())
            .collect();
        let mut targets: Vec<Vec<IpNet>> = Vec::new();
        if any_matches(&rule.to, target) {
            targets.push(vec![]);
        }
        let dests = crate::reach::route_dests(&to, target);
        if !dests.is_empty() {
            targets.push(dests);
        }
        if targets.is_empty() {
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
            for dests in &targets {
                out.push(FilterRule {
                    sources: sources.clone(),
                    protos: proto.into_iter().collect(),
                    ports: ranges.clone(),
                    dests: dests.clone(),
                });
            }
        }
    }
    PacketFilter {
        allow_all: false,
        rules: out,
    }
}

struct Stream {
    session: Arc<Session>,
    generation: u64,
    /// What this stream was last told, to send a filter/publish delta only when it changed.
    /// The filter as a SHA-256 digest: a node's filter lists every source address that may
    /// reach it, kilobytes per stream that would sit here for nothing.
    filter: FilterDigest,
    publish: Vec<PublishRule>,
}

type FilterDigest = [u8; 32];

fn filter_digest(f: &PacketFilter, devices: &[DeviceFilter]) -> FilterDigest {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(serde_json::to_vec(f).unwrap_or_default());
    if !devices.is_empty() {
        h.update(serde_json::to_vec(devices).unwrap_or_default());
    }
    h.finalize().into()
}

/// The in-memory mesh and the open streams. Guarded by one mutex in [`crate::state::AppState`];
/// every method is short and never blocks.
pub struct Mesh {
    pub prefix_v4: Ipv4Net,
    pub prefix_v6: Ipv6Net,
    pub relays: Vec<RelayInfo>,
    /// The live coordinator replicas (empty: none advertised).
    coordinators: Vec<CoordinatorInfo>,
    /// The mesh's DNS domain, told to every node in its self record.
    pub mesh_domain: Option<String>,
    nodes: BTreeMap<NodeId, NodeRec>,
    /// Nodes whose map stream another live replica holds: online whatever happens here.
    remote_online: HashSet<NodeId>,
    policy: Option<Policy>,
    /// The policy indexed by rule membership.
    reach: Reach,
    publish: BTreeMap<i64, PublishRule>,
    /// The other parties of each node's publish rules: they see each other whatever the policy.
    publish_partners: HashMap<NodeId, BTreeSet<NodeId>>,
    streams: HashMap<NodeId, Stream>,
    /// The plain devices reached through each node.
    devices_by_via: HashMap<NodeId, BTreeSet<NodeId>>,
    version: u64,
    next_generation: u64,
    /// The relay learns here which keys may use it.
    relay: Option<std::sync::Arc<crate::relay::Relay>>,
}

/// What a connecting stream gets back.
pub struct Connected {
    pub session: Arc<Session>,
    pub generation: u64,
}

/// Who a change goes to: everyone, or exactly these nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Audience {
    Everyone,
    Only(BTreeSet<NodeId>),
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
        let nodes: BTreeMap<NodeId, NodeRec> = nodes.into_iter().map(|n| (n.id, n)).collect();
        let policy = policy.filter(|p| !p.rules.is_empty());
        let reach = Reach::new(policy.as_ref(), nodes.values());
        let mut m = Mesh {
            prefix_v4,
            prefix_v6,
            relays,
            coordinators: vec![],
            mesh_domain: None,
            nodes,
            remote_online: HashSet::new(),
            policy,
            reach,
            publish: publish.into_iter().map(|r| (r.id, r)).collect(),
            publish_partners: HashMap::new(),
            streams: HashMap::new(),
            devices_by_via: HashMap::new(),
            version: start_version,
            next_generation: 1,
            relay: None,
        };
        m.index_publish();
        for n in m.nodes.values() {
            if let Some(v) = n.via {
                m.devices_by_via.entry(v).or_default().insert(n.id);
            }
        }
        m
    }

    fn index_publish(&mut self) {
        self.publish_partners.clear();
        for r in self.publish.values() {
            self.publish_partners
                .entry(r.exit)
                .or_default()
                .insert(r.target);
            self.publish_partners
                .entry(r.target)
                .or_default()
                .insert(r.exit);
        }
    }

    /// The peers in `id`'s map (itself excluded): Everyone with no policy.
    fn audience(&self, id: NodeId) -> Audience {
        match self.reach.partners(id) {
            None => Audience::Everyone,
            Some(mut s) => {
                if let Some(p) = self.publish_partners.get(&id) {
                    s.extend(p.iter().copied());
                }
                // A via node carries its devices' traffic: it sees them and whom they see.
                if let Some(devs) = self.devices_by_via.get(&id) {
                    for d in devs {
                        s.insert(*d);
                        s.extend(self.reach.partners(*d).unwrap_or_default());
                    }
                }
                // A device's traffic goes through its via node: who sees a device sees that node.
                let vias: Vec<NodeId> = s.iter().filter_map(|x| self.nodes.get(x)?.via).collect();
                s.extend(vias);
                if let Some(v) = self.nodes.get(&id).and_then(|n| n.via) {
                    s.insert(v);
                }
                s.remove(&id);
                s.retain(|x| self.nodes.contains_key(x));
                Audience::Only(s)
            }
        }
    }

    /// True when `a`'s map holds `b` (and so `b`'s holds `a`).
    pub fn sees(&self, a: NodeId, b: NodeId) -> bool {
        a != b
            && self.nodes.contains_key(&a)
            && self.nodes.contains_key(&b)
            && match self.audience(a) {
                Audience::Everyone => true,
                Audience::Only(s) => s.contains(&b),
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
            r.set_authorized(
                self.nodes
                    .values()
                    .filter(|n| n.via.is_none())
                    .map(|n| *n.public_key.as_bytes()),
            );
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn node(&self, id: NodeId) -> Option<&NodeRec> {
        self.nodes.get(&id)
    }
    /// A node (not a device) by name.
    pub fn node_by_name(&self, name: &str) -> Option<&NodeRec> {
        self.nodes().find(|n| n.name.as_str() == name)
    }
    /// The nodes, without the plain devices.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRec> {
        self.nodes.values().filter(|n| n.via.is_none())
    }
    /// The plain devices.
    pub fn devices(&self) -> impl Iterator<Item = &NodeRec> {
        self.nodes.values().filter(|n| n.via.is_some())
    }
    pub fn device_by_name(&self, name: &str) -> Option<&NodeRec> {
        self.devices().find(|n| n.name.as_str() == name)
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
    /// The nodes whose map stream this coordinator holds.
    pub fn connected(&self) -> Vec<NodeId> {
        self.streams.keys().copied().collect()
    }

    fn filter_for(&self, n: &NodeRec) -> PacketFilter {
        self.reach.filter_for(n)
    }

    /// The inbound filters of the devices reached through `id`, which it enforces for them.
    fn device_filters_for(&self, id: NodeId) -> Vec<DeviceFilter> {
        self.devices_by_via
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|d| {
                Some(DeviceFilter {
                    device: *d,
                    filter: self.reach.filter_for(self.nodes.get(d)?),
                })
            })
            .collect()
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
            routes: n.routes.clone(),
            mesh_domain: self.mesh_domain.clone(),
        }
    }

    /// The full map for `n` at the current version.
    pub fn full_map(&self, n: &NodeRec) -> MapMessage {
        MapMessage {
            version: self.version,
            full: true,
            self_node: Some(self.self_node(n)),
            peers: match self.audience(n.id) {
                Audience::Everyone => self
                    .nodes
                    .values()
                    .filter(|p| p.id != n.id)
                    .map(NodeRec::peer)
                    .collect(),
                Audience::Only(ids) => ids
                    .iter()
                    .filter_map(|id| self.nodes.get(id))
                    .map(NodeRec::peer)
                    .collect(),
            },
            peers_removed: vec![],
            filter: Some(self.filter_for(n)),
            publish: Some(self.publish_for(n.id)),
            relays: Some(self.relays.clone()),
            coordinators: Some(self.coordinators.clone()),
            device_filters: Some(self.device_filters_for(n.id)),
            probe_requests: vec![],
        }
    }

    /// Merges `msg` into `id`'s stream if it has one. Never blocks, never cuts.
    fn send(&mut self, id: NodeId, msg: MapMessage) {
        if let Some(s) = self.streams.get(&id) {
            s.session.push(msg);
        }
    }

    /// The connected nodes among `aud`, `subject` excluded.
    fn connected_in(&self, aud: &Audience, subject: NodeId) -> Vec<NodeId> {
        match aud {
            Audience::Everyone => self
                .streams
                .keys()
                .copied()
                .filter(|&id| id != subject)
                .collect(),
            Audience::Only(ids) => ids
                .iter()
                .copied()
                .filter(|id| *id != subject && self.streams.contains_key(id))
                .collect(),
        }
    }

    /// Delivers one change: `peers` to the connected nodes in `to`, `peers_removed` to those in
    /// `gone_to` (both without `subject`), and a recomputed filter to the connected nodes in
    /// `filter_check` whose filter changed.
    fn broadcast(
        &mut self,
        subject: NodeId,
        to: &Audience,
        peers: Vec<Peer>,
        gone_to: &Audience,
        peers_removed: Vec<NodeId>,
        filter_check: BTreeSet<NodeId>,
    ) {
        self.version += 1;
        let version = self.version;
        let mut msgs: BTreeMap<NodeId, MapMessage> = BTreeMap::new();
        if !peers.is_empty() {
            for id in self.connected_in(to, subject) {
                msgs.insert(
                    id,
                    MapMessage {
                        version,
                        peers: peers.clone(),
                        ..Default::default()
                    },
                );
            }
        }
        if !peers_removed.is_empty() {
            for id in self.connected_in(gone_to, subject) {
                msgs.entry(id)
                    .or_insert_with(|| MapMessage {
                        version,
                        ..Default::default()
                    })
                    .peers_removed = peers_removed.clone();
            }
        }
        // A device's filter is enforced by its via node.
        let vias: Vec<NodeId> = filter_check
            .iter()
            .filter_map(|id| self.nodes.get(id)?.via)
            .collect();
        let mut filter_check = filter_check;
        filter_check.extend(vias);
        for id in filter_check {
            let Some(n) = self.nodes.get(&id) else {
                continue;
            };
            if !self.streams.contains_key(&id) {
                continue;
            }
            let f = self.filter_for(n);
            let df = self.device_filters_for(id);
            let digest = filter_digest(&f, &df);
            let s = self.streams.get_mut(&id).expect("checked above");
            if s.filter != digest {
                s.filter = digest;
                let m = msgs.entry(id).or_insert_with(|| MapMessage {
                    version,
                    ..Default::default()
                });
                m.filter = Some(f);
                m.device_filters = Some(df);
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

    /// Sends `id` the peers that entered or left its map since `before` (its audience then).
    fn resync_peers(&mut self, id: NodeId, before: &Audience) {
        if !self.streams.contains_key(&id) {
            return;
        }
        let after = self.audience(id);
        if &after == before {
            return;
        }
        let all =
            || -> BTreeSet<NodeId> { self.nodes.keys().copied().filter(|&x| x != id).collect() };
        let (b, a) = match (before, &after) {
            (Audience::Only(b), Audience::Only(a)) => (b.clone(), a.clone()),
            (Audience::Everyone, Audience::Only(a)) => (all(), a.clone()),
            (Audience::Only(b), Audience::Everyone) => (b.clone(), all()),
            (Audience::Everyone, Audience::Everyone) => return,
        };
        let peers: Vec<Peer> = a
            .difference(&b)
            .filter_map(|x| self.nodes.get(x))
            .map(NodeRec::peer)
            .collect();
        let removed: Vec<NodeId> = b.difference(&a).copied().collect();
        if peers.is_empty() && removed.is_empty() {
            return;
        }
        let m = MapMessage {
            version: self.version,
            peers,
            peers_removed: removed,
            ..Default::default()
        };
        self.send(id, m);
    }

    /// A node registered, re-registered or changed (tags, endpoints, online state).
    pub fn upsert_node(&mut self, rec: NodeRec) {
        let old = self.nodes.get(&rec.id).cloned();
        if old.as_ref() == Some(&rec) {
            return;
        }
        // Tags and name decide which rules select the node; addresses are filter sources.
        // Routes decide which `to` selectors reach it, and its filter's destinations.
        let reindex = old
            .as_ref()
            .map(|o| {
                o.tags != rec.tags
                    || o.name != rec.name
                    || o.addrs != rec.addrs
                    || o.routes != rec.routes
            })
            .unwrap_or(true);
        let mut check = BTreeSet::new();
        let mut before = None;
        if reindex {
            check = self.reach.filter_dependents(rec.id);
            if old.is_some() {
                before = Some(self.audience(rec.id));
            }
        }
        self.nodes.insert(rec.id, rec.clone());
        if reindex {
            self.reach.upsert(&rec);
            check.extend(self.reach.filter_dependents(rec.id));
        }
        if old.as_ref().map(|o| o.public_key) != Some(rec.public_key) {
            self.sync_relay();
        }
        let self_changed = old
            .as_ref()
            .map(|o| {
                o.tags != rec.tags
                    || o.name != rec.name
                    || o.addrs != rec.addrs
                    || o.routes != rec.routes
            })
            .unwrap_or(false);
        let to = self.audience(rec.id);
        // Nodes that saw it and may not any more are told it is gone.
        let gone_to = match (&before, &to) {
            (Some(Audience::Only(b)), Audience::Only(a)) => {
                Audience::Only(b.difference(a).copied().collect())
            }
            (Some(Audience::Everyone), Audience::Only(a)) => Audience::Only(
                self.nodes
                    .keys()
                    .copied()
                    .filter(|x| !a.contains(x))
                    .collect(),
            ),
            _ => Audience::Only(BTreeSet::new()),
        };
        self.broadcast(rec.id, &to, vec![rec.peer()], &gone_to, vec![rec.id], check);
        if let Some(b) = &before {
            self.resync_peers(rec.id, b);
        }
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

    /// Removes a node: closes its stream at once, tells the nodes whose map held it, drops the
    /// publish rules it took part in and tells their other party. Returns the dropped rule ids.
    pub fn remove_node(&mut self, id: NodeId) -> Vec<i64> {
        self.remote_online.remove(&id);
        for d in self.devices_by_via.get(&id).cloned().unwrap_or_default() {
            self.remove_device(d);
        }
        if let Some(s) = self.streams.remove(&id) {
            s.session.close();
        }
        if !self.nodes.contains_key(&id) {
            return vec![];
        }
        let gone_to = self.audience(id);
        let mut check = self.reach.filter_dependents(id);
        check.remove(&id);
        self.nodes.remove(&id);
        self.reach.remove(id);
        self.sync_relay();
        self.broadcast(
            id,
            &Audience::Only(BTreeSet::new()),
            vec![],
            &gone_to,
            vec![id],
            check,
        );
        let dropped: Vec<PublishRule> = self
            .publish
            .values()
            .filter(|r| r.exit == id || r.target == id)
            .cloned()
            .collect();
        for r in &dropped {
            self.publish.remove(&r.id);
        }
        self.index_publish();
        for r in &dropped {
            self.refresh_publish(r.exit);
            self.refresh_publish(r.target);
        }
        dropped.iter().map(|r| r.id).collect()
    }

    /// Replaces the policy (None or no rules = allow all), sends changed filters, and the peers
    /// that entered or left each connected node's map.
    pub fn set_policy(&mut self, policy: Option<Policy>) {
        let connected: Vec<NodeId> = self.streams.keys().copied().collect();
        let before: Vec<(NodeId, Audience)> = connected
            .iter()
            .map(|&id| (id, self.audience(id)))
            .collect();
        self.policy = policy.filter(|p| !p.rules.is_empty());
        self.reach = Reach::new(self.policy.as_ref(), self.nodes.values());
        // A policy change can concern every node: recompute each connected node's filter.
        let all: BTreeSet<NodeId> = connected.iter().copied().collect();
        let none = Audience::Only(BTreeSet::new());
        self.broadcast(NodeId(0), &none, vec![], &none, vec![], all);
        for (id, b) in before {
            self.resync_peers(id, &b);
        }
    }

    /// Adds a plain device (or replaces its record). Device changes are rare admin actions that
    /// can change who sees whom (through the via node), so every connected node's peers and
    /// filters are brought up to date, as a policy change does.
    pub fn upsert_device(&mut self, rec: NodeRec) {
        let Some(via) = rec.via else { return };
        let id = rec.id;
        let peer = rec.peer();
        self.reshape(|m| {
            m.nodes.insert(id, rec.clone());
            m.reach.upsert(&rec);
            m.devices_by_via.entry(via).or_default().insert(id);
        });
        let to = self.audience(id);
        let none = Audience::Only(BTreeSet::new());
        self.broadcast(id, &to, vec![peer], &none, vec![], BTreeSet::new());
    }

    /// Removes a plain device: its via node drops its session, every other node its route.
    pub fn remove_device(&mut self, id: NodeId) -> bool {
        let Some(via) = self.nodes.get(&id).and_then(|n| n.via) else {
            return false;
        };
        let gone_to = self.audience(id);
        self.reshape(|m| {
            m.nodes.remove(&id);
            m.reach.remove(id);
            if let Some(s) = m.devices_by_via.get_mut(&via) {
                s.remove(&id);
                if s.is_empty() {
                    m.devices_by_via.remove(&via);
                }
            }
        });
        let none = Audience::Only(BTreeSet::new());
        self.broadcast(id, &none, vec![], &gone_to, vec![id], BTreeSet::new());
        true
    }

    /// Applies `change` and then sends every connected node the peers that entered or left its
    /// map and its filters where they changed.
    fn reshape(&mut self, change: impl FnOnce(&mut Mesh)) {
        let connected: Vec<NodeId> = self.streams.keys().copied().collect();
        let before: Vec<(NodeId, Audience)> = connected
            .iter()
            .map(|&id| (id, self.audience(id)))
            .collect();
        change(self);
        let all: BTreeSet<NodeId> = connected.iter().copied().collect();
        let none = Audience::Only(BTreeSet::new());
        self.broadcast(NodeId(0), &none, vec![], &none, vec![], all);
        for (id, b) in before {
            self.resync_peers(id, &b);
        }
    }

    /// The audiences of the parties of a publish rule, before it changes.
    fn publish_parties(&self, exit: NodeId, target: NodeId) -> [(NodeId, Audience); 2] {
        [(exit, self.audience(exit)), (target, self.audience(target))]
    }

    pub fn add_publish(&mut self, rule: PublishRule) {
        let (exit, target) = (rule.exit, rule.target);
        let before = self.publish_parties(exit, target);
        self.publish.insert(rule.id, rule);
        self.index_publish();
        self.version += 1;
        for (id, b) in &before {
            self.resync_peers(*id, b);
        }
        self.refresh_publish(exit);
        self.refresh_publish(target);
    }

    pub fn remove_publish(&mut self, id: i64) -> Option<PublishRule> {
        let (exit, target) = {
            let r = self.publish.get(&id)?;
            (r.exit, r.target)
        };
        let before = self.publish_parties(exit, target);
        let rule = self.publish.remove(&id)?;
        self.index_publish();
        self.version += 1;
        self.refresh_publish(exit);
        self.refresh_publish(target);
        for (id, b) in &before {
            self.resync_peers(*id, b);
        }
        Some(rule)
    }

    /// True when the policy lets some traffic flow between `a` and `b` in either direction (no
    /// policy: always). Nodes that may not talk have no path worth opening.
    pub fn may_talk(&self, a: NodeId, b: NodeId) -> bool {
        self.nodes.contains_key(&a) && self.nodes.contains_key(&b) && self.reach.may_talk(a, b)
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
        let session = Arc::new(Session::default());
        let generation = self.next_generation;
        self.next_generation += 1;
        // Marking online first lets the full map carry the version that includes it.
        if let Some(old) = self.streams.remove(&id) {
            old.session.close();
        }
        self.set_online(id, true, now);
        let full = self.full_map(self.nodes.get(&id).unwrap_or(&n));
        let stream = Stream {
            session: session.clone(),
            generation,
            filter: filter_digest(
                full.filter.as_ref().unwrap_or(&PacketFilter::allow_all()),
                full.device_filters.as_deref().unwrap_or_default(),
            ),
            publish: full.publish.clone().unwrap_or_default(),
        };
        session.push(full);
        self.streams.insert(id, stream);
        Some(Connected {
            session,
            generation,
        })
    }

    /// The stream `generation` of `id` ended. A replaced stream's end changes nothing.
    pub fn disconnect(&mut self, id: NodeId, generation: u64, now: i64) -> bool {
        match self.streams.get(&id) {
            Some(s) if s.generation == generation => {
                self.streams.remove(&id);
                // A node that moved to another replica stays online.
                let elsewhere = self.remote_online.contains(&id);
                self.set_online(id, elsewhere, now);
                true
            }
            _ => false,
        }
    }

    /// The live coordinator replicas and their relays changed: every stream hears of it.
    pub fn set_replicas(&mut self, coordinators: Vec<CoordinatorInfo>, relays: Vec<RelayInfo>) {
        if coordinators == self.coordinators && relays == self.relays {
            return;
        }
        self.version += 1;
        let m = MapMessage {
            version: self.version,
            relays: (relays != self.relays).then(|| relays.clone()),
            coordinators: (coordinators != self.coordinators).then(|| coordinators.clone()),
            ..Default::default()
        };
        self.coordinators = coordinators;
        self.relays = relays;
        for s in self.streams.values() {
            s.session.push(m.clone());
        }
    }

    pub fn coordinators(&self) -> &[CoordinatorInfo] {
        &self.coordinators
    }

    /// A node as another replica stored it (registered, endpoints, who holds its stream):
    /// `remote` says whether another live replica holds its stream. What only this replica
    /// knows (its own stream, last_seen) is kept.
    pub fn apply_stored(&mut self, mut rec: NodeRec, remote: bool) {
        if remote {
            self.remote_online.insert(rec.id);
        } else {
            self.remote_online.remove(&rec.id);
        }
        rec.online = remote || self.streams.contains_key(&rec.id);
        if let Some(old) = self.nodes.get_mut(&rec.id) {
            rec.last_seen = old.last_seen.max(rec.last_seen);
            let same = NodeRec {
                last_seen: old.last_seen,
                ..rec.clone()
            } == *old;
            if same {
                // last_seen is not part of any map: nothing to tell (a reload of 10,000
                // nodes must not send 10,000 records).
                old.last_seen = rec.last_seen;
                return;
            }
        }
        if rec.via.is_some() {
            self.upsert_device(rec);
        } else {
            self.upsert_node(rec);
        }
    }

    /// Replaces the publish rules with `rules` (as stored), telling the parties of each rule
    /// that came, went or changed.
    pub fn set_publish_rules(&mut self, rules: Vec<PublishRule>) {
        let new: BTreeMap<i64, PublishRule> = rules.into_iter().map(|r| (r.id, r)).collect();
        let gone: Vec<i64> = self
            .publish
            .iter()
            .filter(|(id, r)| new.get(id) != Some(r))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove_publish(id);
        }
        for (id, r) in new {
            if !self.publish.contains_key(&id) {
                self.add_publish(r);
            }
        }
    }

    /// Replaces the policy if it differs from the current one.
    pub fn update_policy(&mut self, policy: Option<Policy>) {
        let policy = policy.filter(|p| !p.rules.is_empty());
        if policy != self.policy {
            self.set_policy(policy);
        }
    }

    /// Closes every stream (shutdown): each ends once what it holds is sent.
    pub fn close_all(&mut self) {
        for (_, s) in self.streams.drain() {
            s.session.close();
        }
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
            routes: vec![],
            via: None,
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

    fn take(c: &Connected) -> Option<MapMessage> {
        match c.session.take() {
            crate::session::Taken::Message(m) => Some(m),
            _ => None,
        }
    }

    fn closed(c: &Connected) -> bool {
        c.session.take() == crate::session::Taken::Closed
    }

    fn ep(port: u16) -> Vec<Endpoint> {
        vec![Endpoint {
            addr: SocketAddr::from(([192, 0, 2, 1], port)),
            kind: EndpointKind::Local,
        }]
    }

    #[test]
    fn deltas_reach_only_affected_streams() {
        let p = Policy {
            rules: vec![rule(&["tag:friends"], &["node:home"], &["tcp:32400"])],
        };
        let mut m = mesh(
            vec![node(1, "home", &[]), node(2, "other", &["friends"])],
            Some(p),
        );
        let home = m.connect(NodeId(1), 10).unwrap();
        let full = take(&home).unwrap();
        assert!(full.full);
        assert_eq!(full.filter.as_ref().unwrap().rules.len(), 1);
        let other = m.connect(NodeId(2), 10).unwrap();
        // home learns that "other" came online.
        let d = take(&home).unwrap();
        assert!(d.peers[0].online && d.peers[0].id == NodeId(2));
        assert!(take(&other).unwrap().full);
        assert!(take(&other).is_none());

        // A friend registers: home gets a peer delta and a new filter; "other" may not talk to
        // a fellow friend (no rule between them), so it hears nothing.
        m.upsert_node(node(3, "tv", &["friends"]));
        let d = take(&home).unwrap();
        assert_eq!(d.peers.len(), 1);
        assert_eq!(d.filter.unwrap().rules[0].sources.len(), 4);
        assert!(
            take(&other).is_none(),
            "a change reaches only the streams it concerns"
        );

        // Endpoints: a peer delta, no filter.
        m.set_endpoints(NodeId(2), ep(4000));
        let d = take(&home).unwrap();
        assert_eq!(d.peers[0].endpoints.len(), 1);
        assert!(d.filter.is_none());
        assert!(take(&other).is_none(), "a node gets no delta about itself");

        // Probe goes only to the named peer.
        assert!(m.probe(NodeId(2), NodeId(1)));
        let d = take(&home).unwrap();
        assert_eq!(d.probe_requests[0].from, NodeId(2));
        assert_eq!(d.probe_requests[0].endpoints.len(), 1);

        // Removal closes the stream and tells the others.
        m.remove_node(NodeId(2));
        assert!(closed(&other));
        let d = take(&home).unwrap();
        assert_eq!(d.peers_removed, vec![NodeId(2)]);

        // A replaced stream's end does not mark the node offline.
        let second = m.connect(NodeId(1), 11).unwrap();
        assert!(closed(&home), "the replaced stream ends");
        assert!(!m.disconnect(NodeId(1), home.generation, 12));
        assert!(m.node(NodeId(1)).unwrap().online);
        assert!(m.disconnect(NodeId(1), second.generation, 12));
        assert!(!m.node(NodeId(1)).unwrap().online);
    }

    #[test]
    fn a_slow_stream_is_never_cut_and_gets_one_merged_delta() {
        let mut m = mesh(vec![node(1, "slow", &[]), node(2, "watcher", &[])], None);
        let slow = m.connect(NodeId(1), 0).unwrap();
        let watcher = m.connect(NodeId(2), 0).unwrap();
        assert!(take(&slow).unwrap().full);
        while take(&watcher).is_some() {}
        for i in 0..10_000u16 {
            m.set_endpoints(NodeId(2), ep(1000 + i));
        }
        assert_eq!(slow.session.pending_peer_records(), 1);
        let d = take(&slow).unwrap();
        assert_eq!(d.peers.len(), 1);
        assert_eq!(d.peers[0].endpoints[0].addr.port(), 10_999);
        assert_eq!(d.version, m.version());
        assert!(take(&slow).is_none());
        assert!(!closed(&slow), "still open");
        assert!(m.is_connected(NodeId(1)));
        assert!(m.disconnect(NodeId(1), slow.generation, 5));
        let d = take(&watcher).unwrap();
        assert_eq!(d.peers[0].id, NodeId(1));
        assert!(!d.peers[0].online);
    }

    fn peer_ids(m: &MapMessage) -> Vec<i64> {
        m.peers.iter().map(|p| p.id.0).collect()
    }

    #[test]
    fn maps_are_trimmed_by_policy_and_follow_its_changes() {
        // Two sites and a hub everyone may reach; "lone" is in no rule.
        let p = Policy {
            rules: vec![
                rule(&["tag:a"], &["tag:a"], &["*"]),
                rule(&["tag:b"], &["tag:b"], &["*"]),
                rule(&["*"], &["tag:hub"], &["udp:53"]),
            ],
        };
        let nodes = vec![
            node(1, "hub", &["hub"]),
            node(2, "a1", &["a"]),
            node(3, "a2", &["a"]),
            node(4, "b1", &["b"]),
            node(5, "lone", &[]),
        ];
        let mut m = mesh(nodes, Some(p.clone()));
        let c: Vec<Connected> = (1..=5).map(|i| m.connect(NodeId(i), 0).unwrap()).collect();
        let full: Vec<MapMessage> = c.iter().map(|c| take(c).unwrap()).collect();
        assert!(full.iter().all(|f| f.full));
        assert_eq!(peer_ids(&full[0]), vec![2, 3, 4, 5], "the hub: everyone");
        assert_eq!(peer_ids(&full[1]), vec![1, 3], "a1: the hub and a2");
        assert_eq!(peer_ids(&full[3]), vec![1], "b1: the hub");
        assert_eq!(
            peer_ids(&full[4]),
            vec![1],
            "lone: the hub (it may reach it)"
        );
        assert!(m.sees(NodeId(2), NodeId(3)) && !m.sees(NodeId(2), NodeId(4)));

        // a2's endpoint change reaches the hub and a1 only.
        m.set_endpoints(NodeId(3), ep(7000));
        let got: Vec<bool> = c.iter().map(|c| take(c).is_some()).collect();
        assert_eq!(got, vec![true, true, false, false, false]);

        // b1 moves to site a (re-registered with another key's tags): a1 and a2 now see it, and
        // it sees them; the hub hears the new record.
        let mut b1 = m.node(NodeId(4)).unwrap().clone();
        b1.tags = vec!["a".into()];
        m.upsert_node(b1);
        assert_eq!(peer_ids(&take(&c[1]).unwrap()), vec![4]);
        assert_eq!(peer_ids(&take(&c[2]).unwrap()), vec![4]);
        let d = take(&c[3]).unwrap();
        assert_eq!(peer_ids(&d), vec![2, 3], "b1 gets its new site");
        assert_eq!(peer_ids(&take(&c[0]).unwrap()), vec![4]);
        assert!(take(&c[4]).is_none());

        // A publish rule between lone and a1 lets them see each other, whatever the policy.
        let rule_ = PublishRule {
            id: 9,
            exit: NodeId(5),
            exit_name: "lone".parse().unwrap(),
            proto: homeport_proto::publish::PublishProto::Tcp,
            port: 443,
            target: NodeId(2),
            target_name: "a1".parse().unwrap(),
            target_ipv4: Ipv4Addr::new(100, 96, 0, 2),
            target_ipv6: Ipv6Addr::LOCALHOST,
            target_port: 8443,
            guards: Default::default(),
        };
        m.add_publish(rule_);
        let d = take(&c[4]).unwrap();
        assert_eq!(peer_ids(&d), vec![2]);
        assert_eq!(d.publish.unwrap().len(), 1);
        assert_eq!(peer_ids(&take(&c[1]).unwrap()), vec![5]);
        m.remove_publish(9);
        assert_eq!(take(&c[4]).unwrap().peers_removed, vec![NodeId(2)]);
        assert_eq!(take(&c[1]).unwrap().peers_removed, vec![NodeId(5)]);

        // Dropping the policy: everyone sees everyone; each node gets exactly what it lacked.
        m.set_policy(None);
        let d = take(&c[4]).unwrap();
        assert_eq!(peer_ids(&d), vec![2, 3, 4]);
        assert!(d.filter.unwrap().allow_all);
        // And back: what is no longer allowed leaves the maps.
        m.set_policy(Some(p));
        let d = take(&c[4]).unwrap();
        assert_eq!(d.peers_removed, vec![NodeId(2), NodeId(3), NodeId(4)]);
        let d = take(&c[1]).unwrap();
        assert_eq!(d.peers_removed, vec![NodeId(5)]);

        // Removal reaches only the maps that held the node.
        while c.iter().any(|c| take(c).is_some()) {}
        m.remove_node(NodeId(5));
        let got: Vec<bool> = c.iter().map(|c| take(c).is_some()).collect();
        assert_eq!(got, vec![true, false, false, false, false]);
    }

    #[test]
    fn indexed_filters_equal_the_compiled_ones() {
        let p = Policy {
            rules: vec![
                rule(
                    &["tag:friends"],
                    &["node:home"],
                    &["tcp:32400", "icmp", "udp:53", "tcp:22"],
                ),
                rule(&["tag:admin"], &["*"], &["*"]),
                rule(&["tag:x", "b"], &["tag:friends"], &["8000-8100", "udp:1-2"]),
            ],
        };
        let nodes: Vec<NodeRec> = (1..40)
            .map(|i| {
                let tags: &[&str] = match i % 4 {
                    0 => &["friends"],
                    1 => &["admin", "x"],
                    2 => &["x"],
                    _ => &[],
                };
                node(
                    i,
                    if i == 7 {
                        "home"
                    } else if i == 8 {
                        "b"
                    } else {
                        "n"
                    },
                    tags,
                )
            })
            .map(|mut n| {
                if n.name.as_str() == "n" {
                    n.name = format!("n{}", n.id.0).parse().unwrap();
                }
                n
            })
            .collect();
        let reach = crate::reach::Reach::new(Some(&p), nodes.iter());
        for n in &nodes {
            assert_eq!(
                reach.filter_for(n),
                compile_filter(Some(&p), nodes.iter(), n),
                "{}",
                n.name
            );
        }
    }

    #[test]
    fn changes_from_other_replicas_reach_local_streams_and_online_follows_the_node() {
        let mut m = mesh(vec![node(1, "a", &[]), node(2, "b", &[])], None);
        let a = m.connect(NodeId(1), 0).unwrap();
        assert!(take(&a).unwrap().full);
        // b's stream opened on another replica: a hears b is online.
        let mut b = node(2, "b", &[]);
        b.endpoints = ep(5000);
        m.apply_stored(b.clone(), true);
        let d = take(&a).unwrap();
        assert!(d.peers[0].online && d.peers[0].endpoints == ep(5000));
        // The same record with a newer last_seen only: nothing to send.
        b.last_seen = Some(99);
        m.apply_stored(b.clone(), true);
        assert_eq!(take(&a), None);
        // b moves here, then its old stream elsewhere ends: still online; its stream here
        // ending while another replica holds it keeps it online too.
        let bs = m.connect(NodeId(2), 1).unwrap();
        assert_eq!(take(&a), None, "b was online already");
        assert!(m.disconnect(NodeId(2), bs.generation, 2));
        assert_eq!(take(&a), None, "another replica holds b's stream");
        m.apply_stored(b.clone(), false);
        assert!(!take(&a).unwrap().peers[0].online);
        // A removal stored elsewhere.
        m.remove_node(NodeId(2));
        assert_eq!(take(&a).unwrap().peers_removed, vec![NodeId(2)]);
        // The replica set: every stream hears it once.
        let c = |u: &str| CoordinatorInfo {
            url: u.into(),
            pin: "p".into(),
        };
        m.set_replicas(vec![c("https://x"), c("https://y")], vec![]);
        let d = take(&a).unwrap();
        assert_eq!(d.coordinators.unwrap().len(), 2);
        assert!(d.relays.is_none(), "the relays did not change");
        m.set_replicas(vec![c("https://x"), c("https://y")], vec![]);
        assert_eq!(take(&a), None);
    }

    #[test]
    fn approved_routes_are_allowed_ips_and_policy_destinations() {
        let mut home = node(1, "home", &[]);
        home.routes = vec![
            "192.168.1.0/24".parse().unwrap(),
            "0.0.0.0/0".parse().unwrap(),
        ];
        let laptop = node(2, "laptop", &[]);
        let other = node(3, "other", &[]);
        let policy = Policy {
            rules: vec![
                rule(&["laptop"], &["192.168.1.5"], &["tcp:80"]),
                rule(&["laptop"], &["internet"], &["*"]),
            ],
        };
        let m = mesh(
            vec![home.clone(), laptop.clone(), other.clone()],
            Some(policy.clone()),
        );
        // Home forwards the one LAN host and the internet for the laptop; nothing to itself.
        let f = m.filter_for(&home);
        let dests: Vec<Vec<IpNet>> = f.rules.iter().map(|r| r.dests.clone()).collect();
        assert_eq!(
            dests,
            vec![
                vec!["192.168.1.5/32".parse().unwrap()],
                vec!["0.0.0.0/0".parse().unwrap()]
            ]
        );
        assert_eq!(
            f,
            compile_filter(
                Some(&policy),
                [home.clone(), laptop.clone(), other.clone()].iter(),
                &home
            )
        );
        // Only the laptop's map holds home (with its routes); other's map does not.
        let lm = m.full_map(&laptop);
        assert_eq!(lm.peers[0].routes, home.routes);
        assert!(m.full_map(&other).peers.is_empty());
        // Without the routes, no rule selects home any more.
        let mut m = m;
        let mut bare = home.clone();
        bare.routes.clear();
        m.upsert_node(bare.clone());
        assert!(m.filter_for(&bare).rules.is_empty());
        assert!(!m.sees(laptop.id, home.id));
    }

    #[test]
    fn a_device_brings_its_via_node_into_the_maps_of_whom_it_may_talk_with() {
        // friends may reach home's port 80; nobody may reach the phone; home and vps may not
        // talk at all, until the phone (tag friends, through vps) makes vps carry its traffic.
        let policy = Policy {
            rules: vec![rule(&["tag:friends"], &["node:home"], &["tcp:80"])],
        };
        let mut m = mesh(
            vec![
                node(1, "home", &[]),
                node(2, "vps", &[]),
                node(4, "other", &[]),
            ],
            Some(policy),
        );
        let home = m.connect(NodeId(1), 0).unwrap();
        let vps = m.connect(NodeId(2), 0).unwrap();
        let other = m.connect(NodeId(4), 0).unwrap();
        assert!(take(&home).unwrap().peers.is_empty());
        assert!(take(&vps).unwrap().peers.is_empty());
        take(&other);
        let mut phone = node(3, "phone", &["friends"]);
        phone.via = Some(NodeId(2));
        m.upsert_device(phone);
        assert!(m.sees(NodeId(1), NodeId(2)) && m.sees(NodeId(1), NodeId(3)));
        assert!(!m.sees(NodeId(4), NodeId(3)));
        assert_eq!(m.nodes().count(), 3, "a device is not listed as a node");

        let mut got = MapMessage::default();
        while let Some(d) = take(&home) {
            got.peers.extend(d.peers);
            got.filter = d.filter.or(got.filter);
        }
        let mut ids: Vec<NodeId> = got.peers.iter().map(|p| p.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(
            ids,
            vec![NodeId(2), NodeId(3)],
            "home learns the phone and its via"
        );
        let phone_peer = got.peers.iter().find(|p| p.id == NodeId(3)).unwrap();
        assert_eq!(phone_peer.via, Some(NodeId(2)));
        let f = got.filter.expect("home's filter now admits the phone");
        assert!(
            f.rules[0]
                .sources
                .contains(&"100.96.0.3/32".parse().unwrap())
        );

        let mut filters = None;
        let mut peers = vec![];
        while let Some(d) = take(&vps) {
            peers.extend(d.peers.into_iter().map(|p| p.id));
            filters = d.device_filters.or(filters);
        }
        assert!(peers.contains(&NodeId(1)) && peers.contains(&NodeId(3)));
        let filters = filters.expect("the via node gets the phone's filter");
        assert_eq!(filters.len(), 1);
        assert_eq!(filters[0].device, NodeId(3));
        assert!(!filters[0].filter.allow_all && filters[0].filter.rules.is_empty());
        assert!(
            take(&other).is_none(),
            "a change reaches only the streams it concerns"
        );

        // Removed: home drops the phone and the vps, the vps its session and filter.
        assert!(m.remove_device(NodeId(3)));
        let mut removed = vec![];
        while let Some(d) = take(&home) {
            removed.extend(d.peers_removed);
        }
        assert!(removed.contains(&NodeId(3)) && removed.contains(&NodeId(2)));
        let mut filters = None;
        while let Some(d) = take(&vps) {
            filters = d.device_filters.or(filters);
        }
        assert_eq!(filters, Some(vec![]));
    }
}
