//! Who may reach whom under the access policy, indexed so that the coordinator answers "which
//! nodes does a change of node X concern" and "what is X's packet filter" in time proportional to
//! the answer, not to the size of the mesh.
//!
//! Each rule keeps its members: the nodes its `from` selects (with their addresses, the sources of
//! the filters it compiles to) and the nodes its `to` selects. Two nodes may talk when some rule
//! has one in `from` and the other in `to`. With no policy (or no rules) everyone may talk to
//! everyone and the answers are "everyone".

use crate::mesh::NodeRec;
use homeport_proto::NodeId;
use homeport_proto::filter::{FilterRule, PacketFilter, PortRange, Proto};
use homeport_proto::map::MeshAddrs;
use homeport_proto::policy::{Policy, Selector, parse_port_spec};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::{BTreeMap, BTreeSet, HashMap};

struct Rule {
    from: Vec<Selector>,
    to: Vec<Selector>,
    /// One filter rule per protocol group, so that "tcp:22" and "udp:53" do not admit udp:22.
    groups: Vec<(Option<Proto>, Vec<PortRange>)>,
    from_members: BTreeMap<NodeId, MeshAddrs>,
    to_members: BTreeSet<NodeId>,
}

/// The rules a node is in, as `from` and as `to`.
#[derive(Default, Clone)]
struct Membership {
    from: Vec<usize>,
    to: Vec<usize>,
}

/// True when a selector names the node itself (its own mesh addresses).
fn matches(sels: &[Selector], n: &NodeRec) -> bool {
    sels.iter().any(|sel| match sel {
        Selector::Any => true,
        Selector::Tag(t) => n.tags.iter().any(|x| x == t),
        Selector::Node(name) => n.name.as_str() == name,
        Selector::Addr(_) | Selector::Internet => false,
    })
}

/// What `to` selectors name behind node `n`: the parts of its approved subnet routes that an
/// address selector covers (`*`: all of them), and its default routes for `internet`.
pub fn route_dests(sels: &[Selector], n: &NodeRec) -> Vec<IpNet> {
    use homeport_proto::routes::{intersect, is_default};
    let mut out: Vec<IpNet> = Vec::new();
    for sel in sels {
        for r in &n.routes {
            let d = match sel {
                Selector::Any if !is_default(r) => Some(*r),
                Selector::Addr(a) if !is_default(r) => intersect(a, r),
                Selector::Internet if is_default(r) => Some(*r),
                _ => None,
            };
            if let Some(d) = d
                && !out.contains(&d)
            {
                out.push(d);
            }
        }
    }
    out.sort();
    out
}

/// `to` selects the node: itself, or something behind it.
fn matches_to(sels: &[Selector], n: &NodeRec) -> bool {
    matches(sels, n) || !route_dests(sels, n).is_empty()
}

fn parse_selectors(v: &[String]) -> Vec<Selector> {
    // Validated when stored; an unparsable selector selects nothing.
    v.iter().filter_map(|s| Selector::parse(s).ok()).collect()
}

fn port_groups(ports: &[String]) -> Vec<(Option<Proto>, Vec<PortRange>)> {
    let mut groups: Vec<(Option<Proto>, Vec<PortRange>)> = Vec::new();
    for spec in ports {
        let Ok((proto, range)) = parse_port_spec(spec) else {
            continue; // validated when stored
        };
        match groups.iter_mut().find(|(p, _)| *p == proto) {
            Some((_, v)) => v.push(range),
            None => groups.push((proto, vec![range])),
        }
    }
    for (proto, ranges) in &mut groups {
        if *proto == Some(Proto::Icmp) || ranges.contains(&PortRange::ANY) {
            ranges.clear();
        }
        ranges.sort_by_key(|r| (r.first, r.last));
        ranges.dedup();
    }
    groups
}

/// The policy, indexed by rule membership. None of its methods touch the whole mesh except
/// [`Reach::new`] and the "everyone" answers of a mesh without policy.
pub struct Reach {
    /// Empty: no policy, everyone may talk.
    rules: Vec<Rule>,
    members: HashMap<NodeId, Membership>,
}

impl Reach {
    pub fn new<'a>(policy: Option<&Policy>, nodes: impl Iterator<Item = &'a NodeRec>) -> Reach {
        let rules = policy
            .map(|p| {
                p.rules
                    .iter()
                    .map(|r| Rule {
                        from: parse_selectors(&r.from),
                        to: parse_selectors(&r.to),
                        groups: port_groups(&r.ports),
                        from_members: BTreeMap::new(),
                        to_members: BTreeSet::new(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut reach = Reach {
            rules,
            members: HashMap::new(),
        };
        for n in nodes {
            reach.upsert(n);
        }
        reach
    }

    /// True when a policy restricts who may talk.
    pub fn restricted(&self) -> bool {
        !self.rules.is_empty()
    }

    /// Adds or updates `n` (its tags, name or addresses changed).
    pub fn upsert(&mut self, n: &NodeRec) {
        self.remove(n.id);
        if !self.restricted() {
            return;
        }
        let mut m = Membership::default();
        for (i, r) in self.rules.iter_mut().enumerate() {
            if matches(&r.from, n) {
                r.from_members.insert(n.id, n.addrs);
                m.from.push(i);
            }
            if matches_to(&r.to, n) {
                r.to_members.insert(n.id);
                m.to.push(i);
            }
        }
        self.members.insert(n.id, m);
    }

    pub fn remove(&mut self, id: NodeId) {
        if let Some(m) = self.members.remove(&id) {
            for i in m.from {
                self.rules[i].from_members.remove(&id);
            }
            for i in m.to {
                self.rules[i].to_members.remove(&id);
            }
        }
    }

    /// True when some rule lets traffic flow between `a` and `b` in either direction (no
    /// policy: always).
    pub fn may_talk(&self, a: NodeId, b: NodeId) -> bool {
        if !self.restricted() {
            return true;
        }
        let (Some(ma), Some(mb)) = (self.members.get(&a), self.members.get(&b)) else {
            return false;
        };
        let meet = |x: &[usize], y: &[usize]| x.iter().any(|i| y.contains(i));
        meet(&ma.from, &mb.to) || meet(&mb.from, &ma.to)
    }

    /// The nodes `id` may talk with (itself excluded); None: everyone (no policy).
    pub fn partners(&self, id: NodeId) -> Option<BTreeSet<NodeId>> {
        if !self.restricted() {
            return None;
        }
        let mut out = BTreeSet::new();
        if let Some(m) = self.members.get(&id) {
            for &i in &m.from {
                out.extend(self.rules[i].to_members.iter().copied());
            }
            for &i in &m.to {
                out.extend(self.rules[i].from_members.keys().copied());
            }
        }
        out.remove(&id);
        Some(out)
    }

    /// The nodes whose filter may change when `id` appears, disappears or changes: those in
    /// `to` of a rule that has `id` in `from`, and `id` itself. Call before removing `id` for
    /// its old membership.
    pub fn filter_dependents(&self, id: NodeId) -> BTreeSet<NodeId> {
        let mut out = BTreeSet::new();
        out.insert(id);
        if let Some(m) = self.members.get(&id) {
            for &i in &m.from {
                out.extend(self.rules[i].to_members.iter().copied());
            }
        }
        out
    }

    /// The inbound packet filter of `target`; the same as [`crate::mesh::compile_filter`] over
    /// the indexed nodes.
    pub fn filter_for(&self, target: &NodeRec) -> PacketFilter {
        if !self.restricted() {
            return PacketFilter::allow_all();
        }
        let mut out = Vec::new();
        let to: &[usize] = self
            .members
            .get(&target.id)
            .map(|m| m.to.as_slice())
            .unwrap_or(&[]);
        for &i in to {
            let r = &self.rules[i];
            let mut sources: Vec<IpNet> = Vec::new();
            for (id, a) in &r.from_members {
                if *id != target.id {
                    sources.push(IpNet::V4(Ipv4Net::from(a.ipv4)));
                    sources.push(IpNet::V6(Ipv6Net::from(a.ipv6)));
                }
            }
            if sources.is_empty() {
                continue;
            }
            // The node itself, and what it forwards to: never both in one rule.
            let mut targets = Vec::new();
            if matches(&r.to, target) {
                targets.push(vec![]);
            }
            let dests = route_dests(&r.to, target);
            if !dests.is_empty() {
                targets.push(dests);
            }
            for dests in targets {
                for (proto, ranges) in &r.groups {
                    out.push(FilterRule {
                        sources: sources.clone(),
                        protos: proto.iter().copied().collect(),
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
}
