//! The exit's nftables ruleset: DNAT of published ports into the mesh, guards (allow-lists,
//! per-source rate and connection limits, bans), the forward policy for the TUN and edge
//! protection of the VPS itself.
//!
//! Everything lives in one table of our own, `table inet homeport_exit`; no other table is ever
//! touched. [`ruleset`] is pure: it turns the config and the rules into one `nft -j` batch that
//! adds the table, deletes it and adds it again with its full contents. Applied, that batch is
//! atomic (the kernel commits it as one transaction) and idempotent (a re-apply replaces, never
//! duplicates). Conntrack entries are not part of the table, so established flows (and their
//! NAT bindings) survive a re-apply.
//!
//! Layout (hook, priority):
//! - `syn_raw` (prerouting, raw -300): a bare SYN to a published TCP port is not tracked, so a
//!   flood of spoofed SYNs creates no conntrack state on the VPS (and nothing reaches the home).
//!   `synproxy_in` (input, -10) answers it with a SYN cookie; only a client that returns a valid
//!   cookie (so owns its source address) gets a SYN sent on its behalf towards the target, through
//!   the output hooks, where `guard_out` (-150) applies the same guards and `dnat_out` (-100)
//!   the same DNAT as for other new flows. This needs `nf_conntrack_tcp_loose=0` (set by
//!   [`enable_forwarding`]) so the cookie-carrying ACK is `invalid` rather than picked up.
//! - `guard_pre` (prerouting, -150, before DNAT at -100): public traffic to a published port
//!   jumps to `pub_<id>`, which checks in order: banned set, allow-list (every packet, so taking
//!   a source off the list cuts its flows), then for new connections the per-source rate meter
//!   and the per-source `ct count`. A failed check jumps to `deny_<reason>_<id>`, which counts
//!   the packet per source in a dynamic meter (read by the audit task) and drops it. The rate
//!   and count checks pass only when their meter says so: a full meter (no room for a new
//!   source) denies rather than lets the connection through.
//! - `dnat_pre` (prerouting, dstnat): `dnat ip to target_ipv4:target_port` and the ip6
//!   equivalent. No masquerade: the target sees the viewer's address.
//! - `fwd_mesh` (forward, filter): MSS clamp on the TUN, accept DNATed flows (`ct status dnat`)
//!   to and from the TUN, drop everything else that enters or leaves through the TUN (no node
//!   may use the exit as a general gateway, and nothing public reaches the mesh un-published).
//! - `post_mesh` (postrouting, filter): a packet to a rule's target that would leave through
//!   anything but the TUN is dropped (when the TUN is gone, e.g. the exit was killed, DNATed
//!   packets would otherwise follow the default route out of the VPS), and the MSS clamp for
//!   SYNs the synproxy sends.
//! - `edge_in` (input, filter), when edge protection is on: on the public side (not `lo`, not
//!   the TUN) accept established/related, ICMP (echo rate-limited), DHCP replies and the
//!   keep-open ports; everything else is dropped. A source that probes `ban_after` distinct
//!   closed ports of this host (a new TCP SYN or UDP flow; retries to a port it already probed
//!   do not count) within a minute lands in `banned4`/`banned6` for `ban_seconds`; banned
//!   sources are dropped on published ports (keep-open ports such as SSH stay reachable, so a ban
//!   can never lock the admin out). A source in any rule's allow-list is never banned, and a ban
//!   whose last probe hit a port that is published when the table is (re)applied is dropped.
//!
//! Every dynamic set and meter has an explicit size ([`NftConfig::set_size`]).

use homeport_proto::publish::{PublishProto, PublishRule};
use nftables::expr::{
    BinaryOperation, CT, Elem, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression,
    Payload, PayloadField, Prefix, RT, RTKey, SetItem, TcpOption,
};
use nftables::schema::{
    Chain, NfListObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue, Table,
};
use nftables::stmt::{
    CTCount, Counter, JumpTarget, Limit, Mangle, Match, Meter, NAT, NATFamily, Operator, SetOp,
    Statement,
};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Name of homeport's own table (family inet).
pub const TABLE: &str = "homeport_exit";
/// Element timeout of the per-source deny counters: long enough that the audit task (which
/// reads them every few seconds) never misses an element, short enough that a flood of spoofed
/// sources does not fill the meter for long.
pub const DENY_COUNTER_SECS: u32 = 60;
/// Element timeout of the per-source rate meters. A token bucket refilled at N/minute with a
/// burst of N is full again after a minute of silence, so forgetting it then loses nothing.
pub const RATE_METER_SECS: u32 = 60;
/// Window of the closed-port probe counter behind `--ban-after`.
pub const PROBE_WINDOW_SECS: u32 = 60;
/// ICMP echo requests accepted per second on the public side (beyond: dropped).
pub const ECHO_PER_SECOND: u32 = 10;
/// Elements of each dynamic set and meter (per rule and family): bounds the kernel memory a
/// flood of sources can take (~100-200 bytes an element, so about 10 MB per full set).
pub const DEFAULT_SET_SIZE: u32 = 65_536;
/// Window scale the synproxy announces to clients; Linux's default for its receive buffers,
/// which is what the home node's TCP stack uses.
pub const SYNPROXY_WSCALE: u32 = 7;

/// Layer-4 protocol of a keep-open port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn as_str(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

/// A port kept reachable on the public side by edge protection, written `PROTO:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub proto: L4,
    pub port: u16,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.proto.as_str(), self.port)
    }
}

impl FromStr for PortSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid port {s:?}: expected PROTO:PORT with PROTO tcp or udp and PORT 1-65535, e.g. tcp:22"
            )
        };
        let (p, n) = s.split_once(':').ok_or_else(bad)?;
        let proto = match p.trim().to_ascii_lowercase().as_str() {
            "tcp" => L4::Tcp,
            "udp" => L4::Udp,
            _ => return Err(bad()),
        };
        let port: u16 = n.trim().parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        Ok(PortSpec { proto, port })
    }
}

/// The default keep-open ports: SSH, the coordinator's HTTPS API and its STUN server. The
/// node's WireGuard port is added by the caller.
pub fn default_keep_open() -> Vec<PortSpec> {
    vec![
        PortSpec {
            proto: L4::Tcp,
            port: 22,
        },
        PortSpec {
            proto: L4::Tcp,
            port: 8443,
        },
        PortSpec {
            proto: L4::Udp,
            port: 3478,
        },
    ]
}

/// Everything the ruleset depends on besides the publish rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftConfig {
    /// The node's TUN interface (mesh side).
    pub tun: String,
    /// Edge protection of the VPS itself (the `edge_in` chain).
    pub edge_protection: bool,
    /// Ports that stay reachable on the public side (include the WireGuard port).
    pub keep_open: Vec<PortSpec>,
    /// How long a closed-port prober stays banned.
    pub ban_seconds: u32,
    /// Distinct closed ports probed within a minute that get a source banned (1 = the first).
    pub ban_after: u32,
    /// Size of each dynamic set and meter (see [`DEFAULT_SET_SIZE`]).
    pub set_size: u32,
    /// MTU of the TUN: the synproxy announces an MSS that fits it.
    pub mtu: u16,
}

/// Why a packet to a published port was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DenyReason {
    NotInAllowList,
    Rate,
    MaxConns,
    Banned,
}

impl DenyReason {
    pub const ALL: [DenyReason; 4] = [
        DenyReason::NotInAllowList,
        DenyReason::Rate,
        DenyReason::MaxConns,
        DenyReason::Banned,
    ];
    /// The verdict as written in the audit log and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NotInAllowList => "not-in-allow-list",
            DenyReason::Rate => "rate",
            DenyReason::MaxConns => "max-conns",
            DenyReason::Banned => "banned",
        }
    }
    /// The short token used in chain and meter names.
    fn token(self) -> &'static str {
        match self {
            DenyReason::NotInAllowList => "allow",
            DenyReason::Rate => "rate",
            DenyReason::MaxConns => "conns",
            DenyReason::Banned => "banned",
        }
    }
    fn from_token(t: &str) -> Option<DenyReason> {
        DenyReason::ALL.into_iter().find(|r| r.token() == t)
    }
}

/// Name of the per-source deny counter meter of a rule, reason and address family.
pub fn deny_meter_name(reason: DenyReason, id: i64, v6: bool) -> String {
    format!("deny{}_{}_{}", if v6 { 6 } else { 4 }, reason.token(), id)
}

/// Inverse of [`deny_meter_name`]: (reason, rule id) of a deny meter, None for other sets.
pub fn parse_deny_meter_name(name: &str) -> Option<(DenyReason, i64)> {
    let rest = name
        .strip_prefix("deny4_")
        .or_else(|| name.strip_prefix("deny6_"))?;
    let (tok, id) = rest.split_once('_')?;
    Some((DenyReason::from_token(tok)?, id.parse().ok()?))
}

/// A ban carried over into a re-applied table, with the seconds it has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ban {
    pub addr: IpAddr,
    pub secs_left: u32,
    /// The closed port whose probe started the ban (None when not known).
    pub port: Option<u16>,
}

/// A publish rule the exit does not install, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub id: i64,
    pub why: String,
}

/// Picks the rules to install: known protocol, port not 0, not a keep-open port (that would
/// steal e.g. SSH), and at most one rule per (proto, port) (the lowest id wins). Sorted by id
/// so the ruleset does not depend on the map's order.
pub fn plan<'r>(cfg: &NftConfig, rules: &'r [PublishRule]) -> (Vec<&'r PublishRule>, Vec<Skipped>) {
    let mut sorted: Vec<&PublishRule> = rules.iter().collect();
    sorted.sort_by_key(|r| r.id);
    let mut seen = BTreeSet::new();
    let mut ok = Vec::new();
    let mut skipped = Vec::new();
    for r in sorted {
        let l4 = match r.proto {
            PublishProto::Tcp => L4::Tcp,
            PublishProto::Udp => L4::Udp,
            PublishProto::Unknown => {
                skipped.push(Skipped {
                    id: r.id,
                    why: "unknown protocol (this exit knows tcp and udp)".into(),
                });
                continue;
            }
        };
        if r.port == 0 || r.target_port == 0 {
            skipped.push(Skipped {
                id: r.id,
                why: "port 0".into(),
            });
            continue;
        }
        let spec = PortSpec {
            proto: l4,
            port: r.port,
        };
        if cfg.keep_open.contains(&spec) {
            skipped.push(Skipped {
                id: r.id,
                why: format!("{spec} is a keep-open port of this exit (it would be taken from the VPS itself)"),
            });
            continue;
        }
        if !seen.insert(spec) {
            skipped.push(Skipped {
                id: r.id,
                why: format!("{spec} is already published by a rule with a lower id"),
            });
            continue;
        }
        ok.push(r);
    }
    (ok, skipped)
}

// ---- small expression builders -------------------------------------------------------------

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}
fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}
fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}
fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}
fn m(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}
fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    m(left, Operator::EQ, right)
}
fn anon_set(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}
fn jump(target: String) -> Statement<'static> {
    Statement::Jump(JumpTarget {
        target: target.into(),
    })
}
fn saddr(v6: bool) -> Expression<'static> {
    payload(if v6 { "ip6" } else { "ip" }, "saddr")
}
fn elem_timeout(val: Expression<'static>, timeout: u32) -> Expression<'static> {
    Expression::Named(NamedExpression::Elem(Elem {
        val: Box::new(val),
        timeout: Some(timeout),
        expires: None,
        comment: None,
        counter: None,
    }))
}
/// `fib daddr type local`: addressed to this host (not broadcast, not routed through).
fn to_local() -> Statement<'static> {
    fib_daddr_type(Operator::EQ)
}
fn fib_daddr_type(op: Operator) -> Statement<'static> {
    let mut flags = HashSet::new();
    flags.insert(FibFlag::Daddr);
    m(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags,
        })),
        op,
        s("local"),
    )
}
fn ct_state_new() -> Statement<'static> {
    m(ct("state"), Operator::IN, s("new"))
}
/// `meta l4proto P P dport N`
fn dport(proto: L4, port: u16) -> [Statement<'static>; 2] {
    [
        eq(meta(MetaKey::L4proto), s(proto.as_str())),
        eq(
            payload(proto.as_str(), "dport"),
            Expression::Number(port as u32),
        ),
    ]
}
/// A per-source meter whose element times out.
fn meter(
    name: String,
    v6: bool,
    timeout: Option<u32>,
    stmt: Statement<'static>,
) -> Statement<'static> {
    let key = match timeout {
        Some(t) => elem_timeout(saddr(v6), t),
        None => saddr(v6),
    };
    Statement::Meter(Meter {
        name: name.into(),
        key,
        stmt: Box::new(stmt),
    })
}

struct Builder {
    objs: Vec<nftables::schema::NfObject<'static>>,
}

impl Builder {
    fn add(&mut self, o: NfListObject<'static>) {
        self.objs.push(nftables::schema::NfObject::CmdObject(
            nftables::schema::NfCmd::Add(o),
        ));
    }
    fn chain(&mut self, name: &str, base: Option<(NfChainType, NfHook, i32)>) {
        let mut c = Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.to_string().into(),
            ..Chain::default()
        };
        if let Some((t, h, p)) = base {
            c._type = Some(t);
            c.hook = Some(h);
            c.prio = Some(p);
            c.policy = Some(NfChainPolicy::Accept);
        }
        self.add(NfListObject::Chain(c));
    }
    fn rule(&mut self, chain: &str, expr: Vec<Statement<'static>>) {
        self.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: TABLE.into(),
            chain: chain.to_string().into(),
            expr: expr.into(),
            ..Rule::default()
        }));
    }
    #[allow(clippy::too_many_arguments)]
    fn set(
        &mut self,
        name: &str,
        set_type: SetTypeValue<'static>,
        flag: SetFlag,
        timeout: Option<u32>,
        size: Option<u32>,
        elem: Option<Vec<Expression<'static>>>,
    ) {
        let mut flags = HashSet::new();
        flags.insert(flag);
        self.add(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.to_string().into(),
            set_type,
            flags: Some(flags),
            timeout,
            size,
            elem: elem.map(Into::into),
            ..Set::default()
        })));
    }
}

fn addr_type(v6: bool) -> SetTypeValue<'static> {
    SetTypeValue::Single(if v6 {
        SetType::Ipv6Addr
    } else {
        SetType::Ipv4Addr
    })
}
/// `address . port`
fn addr_port_type(v6: bool) -> SetTypeValue<'static> {
    SetTypeValue::Concatenated(Cow::Owned(vec![
        if v6 {
            SetType::Ipv6Addr
        } else {
            SetType::Ipv4Addr
        },
        SetType::InetService,
    ]))
}
fn saddr_dport(v6: bool) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        saddr(v6),
        payload("th", "dport"),
    ]))
}
fn nfproto(v6: bool) -> Statement<'static> {
    eq(meta(MetaKey::Nfproto), s(if v6 { "ipv6" } else { "ipv4" }))
}
fn fam(v6: bool) -> u8 {
    if v6 { 6 } else { 4 }
}
/// `tcp flags & (syn | ack | fin | rst) == syn`: a bare SYN, the opening of a connection.
fn bare_syn() -> Statement<'static> {
    eq(
        Expression::BinaryOperation(Box::new(BinaryOperation::AND(
            payload("tcp", "flags"),
            flag_list(&["syn", "ack", "fin", "rst"]),
        ))),
        s("syn"),
    )
}
/// `iifname { lo, TUN } return` and `fib daddr type != local return`: only public traffic
/// addressed to this host goes on.
fn public_to_local_only(b: &mut Builder, chain: &str, cfg: &NftConfig) {
    b.rule(
        chain,
        vec![
            m(
                meta(MetaKey::Iifname),
                Operator::IN,
                anon_set(vec![s("lo"), s(cfg.tun.clone())]),
            ),
            Statement::Return(None),
        ],
    );
    b.rule(
        chain,
        vec![fib_daddr_type(Operator::NEQ), Statement::Return(None)],
    );
}
fn set_update(set: String, elem: Expression<'static>) -> Statement<'static> {
    Statement::Set(nftables::stmt::Set {
        op: SetOp::Update,
        elem,
        set: set.into(),
    })
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

/// The batch that removes homeport's table (adding it first makes the delete succeed whether or
/// not the table exists). Other tables are never touched.
pub fn removal() -> Nftables<'static> {
    let mut b = Builder { objs: Vec::new() };
    b.add(NfListObject::Table(table()));
    b.objs.push(nftables::schema::NfObject::CmdObject(
        nftables::schema::NfCmd::Delete(NfListObject::Table(table())),
    ));
    Nftables {
        objects: b.objs.into(),
    }
}

/// Every source address or network in any installed rule's allow-list: never banned.
fn never_banned(rules: &[&PublishRule]) -> Vec<ipnet::IpNet> {
    let mut nets: Vec<ipnet::IpNet> = rules
        .iter()
        .flat_map(|r| r.guards.allow.iter().map(|n| n.trunc()))
        .collect();
    nets.sort();
    nets.dedup();
    // An interval set refuses overlapping elements: keep only the outermost networks.
    ipnet::IpNet::aggregate(&nets)
}

fn prefix_elem(n: &ipnet::IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(n.addr().to_string())),
        len: n.prefix_len() as u32,
    }))
}

/// The complete ruleset as one atomic, idempotent batch (see the module docs). `rules` are the
/// rules of this exit; [`plan`] decides which are installed. `bans` are carried over from the
/// table being replaced, except bans of allow-listed sources and bans whose probe hit a port
/// that is now published.
pub fn ruleset(cfg: &NftConfig, rules: &[PublishRule], bans: &[Ban]) -> Batch {
    let (rules, _) = plan(cfg, rules);
    let mut b = Builder {
        objs: removal().objects.into_owned(),
    };
    b.add(NfListObject::Table(table()));
    let size = Some(cfg.set_size.max(1));
    let published: BTreeSet<u16> = rules.iter().map(|r| r.port).collect();
    let nobans = never_banned(&rules);

    // Bans: dynamic sets filled from the packet path (edge_in), carried over on re-apply.
    // `banport`: the port of the probe that started each ban.
    for v6 in [false, true] {
        let keep: Vec<&Ban> = bans
            .iter()
            .filter(|x| x.addr.is_ipv6() == v6 && x.secs_left > 0)
            .filter(|x| !x.port.is_some_and(|p| published.contains(&p)))
            .filter(|x| !nobans.iter().any(|n| n.contains(&x.addr)))
            .collect();
        let secs = |x: &Ban| x.secs_left.min(cfg.ban_seconds.max(1));
        let carried: Vec<Expression<'static>> = keep
            .iter()
            .map(|x| elem_timeout(s(x.addr.to_string()), secs(x)))
            .collect();
        let ports: Vec<Expression<'static>> = keep
            .iter()
            .filter_map(|x| {
                let p = x.port?;
                Some(elem_timeout(
                    Expression::Named(NamedExpression::Concat(vec![
                        s(x.addr.to_string()),
                        Expression::Number(p as u32),
                    ])),
                    secs(x),
                ))
            })
            .collect();
        b.set(
            &format!("banned{}", fam(v6)),
            addr_type(v6),
            SetFlag::Timeout,
            Some(cfg.ban_seconds.max(1)),
            size,
            (!carried.is_empty()).then_some(carried),
        );
        b.set(
            &format!("banport{}", fam(v6)),
            addr_port_type(v6),
            SetFlag::Timeout,
            Some(cfg.ban_seconds.max(1)),
            size,
            (!ports.is_empty()).then_some(ports),
        );
        if cfg.edge_protection {
            // Closed ports each source probed within the window (retries are not new probes).
            b.set(
                &format!("probed{}", fam(v6)),
                addr_port_type(v6),
                SetFlag::Timeout,
                Some(PROBE_WINDOW_SECS),
                size,
                None,
            );
            let elems: Vec<Expression<'static>> = nobans
                .iter()
                .filter(|n| n.addr().is_ipv6() == v6)
                .map(prefix_elem)
                .collect();
            b.set(
                &format!("nobans{}", fam(v6)),
                addr_type(v6),
                SetFlag::Interval,
                None,
                None,
                (!elems.is_empty()).then_some(elems),
            );
        }
    }

    // Allow-lists: one interval set per family for every rule that has one.
    for r in &rules {
        if r.guards.allow.is_empty() {
            continue;
        }
        for v6 in [false, true] {
            let elems: Vec<Expression<'static>> = r
                .guards
                .allow
                .iter()
                .filter(|n| n.addr().is_ipv6() == v6)
                .map(|n| prefix_elem(&n.trunc()))
                .collect();
            b.set(
                &allow_set(r.id, v6),
                addr_type(v6),
                SetFlag::Interval,
                None,
                None,
                (!elems.is_empty()).then_some(elems),
            );
        }
    }

    let tcp_rules: Vec<&&PublishRule> = rules
        .iter()
        .filter(|r| r.proto == PublishProto::Tcp)
        .collect();
    // SYN proxy: bare SYNs to published TCP ports are not tracked; the kernel answers them
    // with a SYN cookie before any state exists.
    b.chain(
        "syn_raw",
        Some((NfChainType::Filter, NfHook::Prerouting, -300)),
    );
    b.chain(
        "synproxy_in",
        Some((NfChainType::Filter, NfHook::Input, -10)),
    );
    public_to_local_only(&mut b, "syn_raw", cfg);
    b.rule(
        "synproxy_in",
        vec![
            m(
                meta(MetaKey::Iifname),
                Operator::IN,
                anon_set(vec![s("lo"), s(cfg.tun.clone())]),
            ),
            Statement::Return(None),
        ],
    );
    for r in &tcp_rules {
        let mut e = dport(L4::Tcp, r.port).to_vec();
        e.push(bare_syn());
        e.push(Statement::Notrack);
        b.rule("syn_raw", e);
        for v6 in [false, true] {
            let mut flags = HashSet::new();
            flags.insert(nftables::types::SynProxyFlag::Timestamp);
            flags.insert(nftables::types::SynProxyFlag::SackPerm);
            let mut e = vec![nfproto(v6)];
            e.extend(dport(L4::Tcp, r.port));
            e.push(m(
                ct("state"),
                Operator::IN,
                Expression::List(vec![s("invalid"), s("untracked")]),
            ));
            e.push(Statement::SynProxy(nftables::stmt::SynProxy {
                // The TUN's MTU less the IP and TCP headers.
                mss: Some(cfg.mtu as u32 - if v6 { 60 } else { 40 }),
                wscale: Some(SYNPROXY_WSCALE),
                flags: Some(flags),
            }));
            b.rule("synproxy_in", e);
        }
        let mut e = dport(L4::Tcp, r.port).to_vec();
        e.push(m(ct("state"), Operator::IN, s("invalid")));
        e.push(Statement::Drop(None));
        b.rule("synproxy_in", e);
    }

    // Guards, before DNAT.
    b.chain(
        "guard_pre",
        Some((NfChainType::Filter, NfHook::Prerouting, -150)),
    );
    b.chain(
        "dnat_pre",
        Some((NfChainType::NAT, NfHook::Prerouting, -100)),
    );
    // The SYN the synproxy sends for a validated client leaves through the output hooks.
    b.chain(
        "guard_out",
        Some((NfChainType::Filter, NfHook::Output, -150)),
    );
    b.chain("dnat_out", Some((NfChainType::NAT, NfHook::Output, -100)));
    b.chain("fwd_mesh", Some((NfChainType::Filter, NfHook::Forward, 0)));
    b.chain(
        "post_mesh",
        Some((NfChainType::Filter, NfHook::Postrouting, 0)),
    );
    for ch in ["guard_pre", "dnat_pre"] {
        public_to_local_only(&mut b, ch, cfg);
    }
    for r in &rules {
        let l4 = if r.proto == PublishProto::Udp {
            L4::Udp
        } else {
            L4::Tcp
        };
        let pc = format!("pub_{}", r.id);
        b.chain(&pc, None);
        let mut e = dport(l4, r.port).to_vec();
        e.push(jump(pc.clone()));
        b.rule("guard_pre", e);
        if l4 == L4::Tcp {
            let mut e = dport(l4, r.port).to_vec();
            e.push(bare_syn());
            e.push(ct_state_new());
            e.push(to_local());
            e.push(jump(pc.clone()));
            b.rule("guard_out", e);
        }

        let g = &r.guards;
        let used = [
            (DenyReason::Banned, true),
            (DenyReason::NotInAllowList, !g.allow.is_empty()),
            (DenyReason::Rate, g.rate_per_minute.is_some()),
            (DenyReason::MaxConns, g.max_conns.is_some()),
        ];
        for (reason, _) in used.into_iter().filter(|u| u.1) {
            let dc = format!("deny_{}_{}", reason.token(), r.id);
            b.chain(&dc, None);
            // Counting and dropping are separate rules: if the meter is full, the count is
            // lost but the packet is still dropped.
            for v6 in [false, true] {
                b.rule(
                    &dc,
                    vec![meter(
                        deny_meter_name(reason, r.id, v6),
                        v6,
                        Some(DENY_COUNTER_SECS),
                        Statement::Counter(Counter::Anonymous(None)),
                    )],
                );
            }
            b.rule(&dc, vec![Statement::Drop(None)]);
        }
        let deny = |reason: DenyReason| jump(format!("deny_{}_{}", reason.token(), r.id));
        for v6 in [false, true] {
            let set = if v6 { "@banned6" } else { "@banned4" };
            b.rule(&pc, vec![eq(saddr(v6), s(set)), deny(DenyReason::Banned)]);
        }
        if !r.guards.allow.is_empty() {
            for v6 in [false, true] {
                b.rule(
                    &pc,
                    vec![
                        m(
                            saddr(v6),
                            Operator::NEQ,
                            s(format!("@{}", allow_set(r.id, v6))),
                        ),
                        deny(DenyReason::NotInAllowList),
                    ],
                );
            }
        }
        // The limits only concern new connections.
        b.rule(
            &pc,
            vec![
                m(ct("state"), Operator::NEQ, s("new")),
                Statement::Return(None),
            ],
        );
        // Each limit lets a connection on only when its meter matched (under the limit); a
        // meter that has no room for the source does not match, and the rule after it denies.
        let conns_chain = format!("pubc_{}", r.id);
        let after_rate = |b: &mut Builder| -> Statement<'static> {
            if r.guards.max_conns.is_some() {
                b.chain(&conns_chain, None);
                Statement::Goto(JumpTarget {
                    target: conns_chain.clone().into(),
                })
            } else {
                Statement::Return(None)
            }
        };
        let conns_in = match r.guards.rate_per_minute {
            Some(0) => {
                b.rule(&pc, vec![deny(DenyReason::Rate)]);
                None
            }
            Some(n) => {
                let next = after_rate(&mut b);
                for v6 in [false, true] {
                    let lim = Statement::Limit(Limit {
                        rate: n,
                        rate_unit: Some("packets".into()),
                        per: Some("minute".into()),
                        burst: Some(n),
                        burst_unit: Some("packets".into()),
                        inv: None,
                    });
                    let name = format!("rate{}_{}", fam(v6), r.id);
                    b.rule(
                        &pc,
                        vec![
                            nfproto(v6),
                            meter(name, v6, Some(RATE_METER_SECS), lim),
                            next.clone(),
                        ],
                    );
                }
                b.rule(&pc, vec![deny(DenyReason::Rate)]);
                r.guards.max_conns.is_some().then(|| conns_chain.clone())
            }
            None => Some(pc.clone()),
        };
        match (r.guards.max_conns, conns_in) {
            (Some(0), Some(c)) => b.rule(&c, vec![deny(DenyReason::MaxConns)]),
            (Some(n), Some(c)) => {
                for v6 in [false, true] {
                    let cc = Statement::CTCount(CTCount {
                        val: Expression::Number(n),
                        inv: None,
                    });
                    let name = format!("conns{}_{}", fam(v6), r.id);
                    b.rule(
                        &c,
                        vec![
                            nfproto(v6),
                            meter(name, v6, None, cc),
                            Statement::Return(None),
                        ],
                    );
                }
                b.rule(&c, vec![deny(DenyReason::MaxConns)]);
            }
            _ => {}
        }

        // DNAT into the mesh; no masquerade. For TCP also in the output hook, where the
        // synproxy's SYN for a validated client passes.
        for v6 in [false, true] {
            let target = if v6 {
                r.target_ipv6.to_string()
            } else {
                r.target_ipv4.to_string()
            };
            let nat = Statement::DNAT(Some(NAT {
                addr: Some(s(target)),
                family: Some(if v6 { NATFamily::IP6 } else { NATFamily::IP }),
                port: Some(Expression::Number(r.target_port as u32)),
                flags: None,
            }));
            let mut e = vec![nfproto(v6)];
            e.extend(dport(l4, r.port));
            e.push(nat.clone());
            b.rule("dnat_pre", e);
            if l4 == L4::Tcp {
                let mut e = vec![nfproto(v6)];
                e.extend(dport(l4, r.port));
                e.push(to_local());
                e.push(nat);
                b.rule("dnat_out", e);
            }
        }
    }

    // Forward: only published flows cross the TUN.
    let tun = || s(cfg.tun.clone());
    for dir in [MetaKey::Iifname, MetaKey::Oifname] {
        b.rule(
            "fwd_mesh",
            vec![eq(meta(dir), tun()), syn_flag(), mss_clamp()],
        );
    }
    for dir in [MetaKey::Oifname, MetaKey::Iifname] {
        b.rule(
            "fwd_mesh",
            vec![
                eq(meta(dir), tun()),
                m(ct("status"), Operator::IN, s("dnat")),
                Statement::Accept(None),
            ],
        );
    }
    for dir in [MetaKey::Iifname, MetaKey::Oifname] {
        b.rule(
            "fwd_mesh",
            vec![eq(meta(dir), tun()), Statement::Drop(None)],
        );
    }

    // Nothing for a target leaves by any other way than the TUN (forwarded or sent by the
    // synproxy): with the TUN gone the main routing table would send it out of the VPS.
    for v6 in [false, true] {
        let mut targets: Vec<String> = rules
            .iter()
            .map(|r| {
                if v6 {
                    r.target_ipv6.to_string()
                } else {
                    r.target_ipv4.to_string()
                }
            })
            .collect();
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            continue;
        }
        b.rule(
            "post_mesh",
            vec![
                nfproto(v6),
                eq(
                    payload(if v6 { "ip6" } else { "ip" }, "daddr"),
                    anon_set(targets.into_iter().map(s).collect()),
                ),
                m(meta(MetaKey::Oifname), Operator::NEQ, tun()),
                Statement::Drop(None),
            ],
        );
    }
    b.rule(
        "post_mesh",
        vec![eq(meta(MetaKey::Oifname), tun()), syn_flag(), mss_clamp()],
    );

    if cfg.edge_protection {
        edge(&mut b, cfg, !nobans.is_empty());
    }
    Batch {
        nft: Nftables {
            objects: b.objs.into(),
        },
        meter_size: cfg.set_size.max(1),
    }
}

/// A ruleset batch: the `nftables` objects plus the size of every meter in it. Two gaps of the
/// `nftables` crate (0.6) are filled on serialization: its meter statement has no size field
/// (nft's JSON takes one), and it writes the notrack statement as a bare string where nft
/// expects `{"notrack": null}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub nft: Nftables<'static>,
    pub meter_size: u32,
}

impl serde::Serialize for Batch {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut v = serde_json::to_value(&self.nft).map_err(serde::ser::Error::custom)?;
        fix_for_nft(&mut v, self.meter_size);
        v.serialize(ser)
    }
}

/// Sets `"size": n` on every `meter` statement inside `v`, writes each `notrack` statement
/// of a rule as nft reads it, and puts synproxy flags in a fixed order.
fn fix_for_nft(v: &mut serde_json::Value, n: u32) {
    match v {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::Object(m)) = o.get_mut("meter") {
                m.insert("size".into(), n.into());
            }
            // Flags come from a HashSet: sort them, so the same ruleset is the same JSON.
            if let Some(serde_json::Value::Array(f)) =
                o.get_mut("synproxy").and_then(|s| s.get_mut("flags"))
            {
                f.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            }
            if let Some(serde_json::Value::Array(expr)) = o.get_mut("expr") {
                for st in expr.iter_mut().filter(|st| st.as_str() == Some("notrack")) {
                    *st = serde_json::json!({ "notrack": null });
                }
            }
            for x in o.values_mut() {
                fix_for_nft(x, n);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| fix_for_nft(x, n)),
        _ => {}
    }
}

/// `tcp flags syn`
fn syn_flag() -> Statement<'static> {
    m(payload("tcp", "flags"), Operator::IN, s("syn"))
}
/// `tcp option maxseg size set rt mtu`
fn mss_clamp() -> Statement<'static> {
    Statement::Mangle(Mangle {
        key: Expression::Named(NamedExpression::TcpOption(TcpOption {
            name: "maxseg".into(),
            field: Some("size".into()),
        })),
        value: Expression::Named(NamedExpression::RT(RT {
            key: RTKey::MTU,
            family: None,
        })),
    })
}

fn allow_set(id: i64, v6: bool) -> String {
    format!("allow{}_{}", if v6 { 6 } else { 4 }, id)
}

fn edge(b: &mut Builder, cfg: &NftConfig, has_nobans: bool) {
    let c = "edge_in";
    b.chain(c, Some((NfChainType::Filter, NfHook::Input, 0)));
    b.chain("probe", None);
    b.rule(
        c,
        vec![
            m(
                meta(MetaKey::Iifname),
                Operator::IN,
                anon_set(vec![s("lo"), s(cfg.tun.clone())]),
            ),
            Statement::Accept(None),
        ],
    );
    b.rule(
        c,
        vec![
            m(
                ct("state"),
                Operator::IN,
                Expression::List(vec![s("established"), s("related")]),
            ),
            Statement::Accept(None),
        ],
    );
    // Keep-open ports before the invalid-state drop: strict TCP tracking (which the synproxy
    // needs) marks a connection conntrack never saw as invalid — an SSH session or a node's
    // connection to the coordinator made before anything loaded conntrack here, or after a
    // flush — and dropping it would hang that connection for good.
    let mut keep = cfg.keep_open.clone();
    keep.sort();
    keep.dedup();
    for l4 in [L4::Tcp, L4::Udp] {
        let ports: Vec<Expression<'static>> = keep
            .iter()
            .filter(|p| p.proto == l4)
            .map(|p| Expression::Number(p.port as u32))
            .collect();
        if ports.is_empty() {
            continue;
        }
        b.rule(
            c,
            vec![
                eq(meta(MetaKey::L4proto), s(l4.as_str())),
                eq(payload(l4.as_str(), "dport"), anon_set(ports)),
                Statement::Accept(None),
            ],
        );
    }
    b.rule(
        c,
        vec![
            m(ct("state"), Operator::IN, s("invalid")),
            Statement::Drop(None),
        ],
    );
    for (l4, proto, echo) in [
        ("icmp", "icmp", "echo-request"),
        ("ipv6-icmp", "icmpv6", "echo-request"),
    ] {
        let is_echo = || eq(payload(proto, "type"), s(echo));
        b.rule(
            c,
            vec![
                eq(meta(MetaKey::L4proto), s(l4)),
                is_echo(),
                Statement::Limit(Limit {
                    rate: ECHO_PER_SECOND,
                    rate_unit: Some("packets".into()),
                    per: Some("second".into()),
                    burst: Some(ECHO_PER_SECOND),
                    burst_unit: Some("packets".into()),
                    inv: None,
                }),
                Statement::Accept(None),
            ],
        );
        b.rule(
            c,
            vec![
                eq(meta(MetaKey::L4proto), s(l4)),
                is_echo(),
                Statement::Drop(None),
            ],
        );
        // Everything else ICMP: errors, and for IPv6 neighbour and router discovery.
        b.rule(
            c,
            vec![eq(meta(MetaKey::L4proto), s(l4)), Statement::Accept(None)],
        );
    }
    // DHCP replies (v4 renewals are conntracked, but the first exchange is broadcast).
    b.rule(
        c,
        vec![
            eq(meta(MetaKey::L4proto), s("udp")),
            eq(payload("udp", "sport"), Expression::Number(67)),
            eq(payload("udp", "dport"), Expression::Number(68)),
            Statement::Accept(None),
        ],
    );
    b.rule(
        c,
        vec![
            eq(
                payload("ip6", "saddr"),
                Expression::Named(NamedExpression::Prefix(Prefix {
                    addr: Box::new(s("fe80::")),
                    len: 10,
                })),
            ),
            eq(meta(MetaKey::L4proto), s("udp")),
            eq(payload("udp", "dport"), Expression::Number(546)),
            Statement::Accept(None),
        ],
    );
    // Probes of closed ports: a new TCP connection attempt (a bare SYN, so stray ACKs of old
    // flows never ban anyone) or a new UDP flow, addressed to this host.
    b.rule(
        c,
        vec![
            eq(meta(MetaKey::L4proto), s("tcp")),
            bare_syn(),
            to_local(),
            jump("probe".into()),
        ],
    );
    b.rule(
        c,
        vec![
            eq(meta(MetaKey::L4proto), s("udp")),
            ct_state_new(),
            to_local(),
            jump("probe".into()),
        ],
    );
    b.rule(c, vec![Statement::Drop(None)]);

    let ban_secs = cfg.ban_seconds.max(1);
    for v6 in [false, true] {
        // Allow-listed sources are never banned.
        if has_nobans {
            b.rule(
                "probe",
                vec![
                    eq(saddr(v6), s(format!("@nobans{}", fam(v6)))),
                    Statement::Return(None),
                ],
            );
        }
        // A retry to a port this source already probed is not a new probe (a viewer whose
        // client retries a port that is about to be published must not be banned for it).
        b.rule(
            "probe",
            vec![
                eq(saddr_dport(v6), s(format!("@probed{}", fam(v6)))),
                Statement::Return(None),
            ],
        );
        // One rule, so that a full `probed` set (the update cannot add) stops it: an
        // uncountable probe bans nobody.
        let mut e = vec![
            nfproto(v6),
            set_update(format!("@probed{}", fam(v6)), saddr_dport(v6)),
        ];
        if cfg.ban_after > 1 {
            // Over (ban_after - 1) distinct ports per window: the bucket holds ban_after - 1
            // tokens and refills at that rate per window, so port number ban_after is "over".
            let n = cfg.ban_after - 1;
            e.push(meter(
                format!("probe{}", fam(v6)),
                v6,
                Some(PROBE_WINDOW_SECS),
                Statement::Limit(Limit {
                    rate: n,
                    rate_unit: Some("packets".into()),
                    per: Some("minute".into()),
                    burst: Some(n),
                    burst_unit: Some("packets".into()),
                    inv: Some(true),
                }),
            ));
        }
        e.push(set_update(
            format!("@banned{}", fam(v6)),
            elem_timeout(saddr(v6), ban_secs),
        ));
        e.push(set_update(
            format!("@banport{}", fam(v6)),
            elem_timeout(saddr_dport(v6), ban_secs),
        ));
        b.rule("probe", e);
    }
}

/// A flag mask `syn | ack | ...` as nft's JSON writes it: a plain list.
fn flag_list(items: &[&'static str]) -> Expression<'static> {
    Expression::List(items.iter().map(|i| s(*i)).collect())
}

// ---- applying and reading back -------------------------------------------------------------

/// How `nft` and `conntrack` are run: directly, or behind a wrapper such as
/// `ip netns exec NS` (the lab tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exec {
    pub wrap: Vec<String>,
}

impl Exec {
    /// Runs the tools inside network namespace `ns`.
    pub fn netns(ns: &str) -> Exec {
        Exec {
            wrap: vec!["ip".into(), "netns".into(), "exec".into(), ns.into()],
        }
    }
    pub fn command(&self, prog: &str) -> std::process::Command {
        match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = std::process::Command::new(first);
                c.args(rest).arg(prog);
                c
            }
            None => std::process::Command::new(prog),
        }
    }
    pub fn tokio_command(&self, prog: &str) -> tokio::process::Command {
        tokio::process::Command::from(self.command(prog))
    }
}

/// A failed `nft` run, with what nft said.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft (install Debian's nftables package): {0}")]
    Spawn(std::io::Error),
    #[error("nft {what} failed: {stderr}")]
    Failed { what: String, stderr: String },
    #[error("nft {what} printed JSON that is not understood: {err}")]
    Json { what: String, err: String },
}

fn run_nft(exec: &Exec, args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    use std::io::Write;
    use std::process::Stdio;
    let mut c = exec.command("nft");
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = c.spawn().map_err(NftError::Spawn)?;
    if let Some(input) = stdin {
        let mut w = child.stdin.take().expect("piped");
        w.write_all(input.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Failed {
            what: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies a batch as one transaction (`nft -j -f -`). The same as
/// `nftables::helper::apply_ruleset`, but nft's error message is kept for the log.
pub fn apply(exec: &Exec, batch: &impl serde::Serialize) -> Result<(), NftError> {
    let json = serde_json::to_string(batch).map_err(|e| NftError::Json {
        what: "batch".into(),
        err: e.to_string(),
    })?;
    run_nft(exec, &["-j", "-f", "-"], Some(&json)).map(|_| ())
}

/// Removes homeport's table (a no-op when it does not exist).
pub fn remove(exec: &Exec) -> Result<(), NftError> {
    apply(exec, &removal())
}

/// `nft -j list ...` as parsed JSON: the `nftables` array.
pub fn list(exec: &Exec, what: &[&str]) -> Result<Vec<serde_json::Value>, NftError> {
    let mut args = vec!["-j", "list"];
    args.extend_from_slice(what);
    let out = run_nft(exec, &args, None)?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| NftError::Json {
        what: what.join(" "),
        err: e.to_string(),
    })?;
    match v.get("nftables").and_then(|a| a.as_array()) {
        Some(a) => Ok(a.clone()),
        None => Err(NftError::Json {
            what: what.join(" "),
            err: "no nftables array".into(),
        }),
    }
}

/// True when homeport's table exists.
pub fn table_exists(exec: &Exec) -> Result<bool, NftError> {
    let tables = list(exec, &["tables", "inet"])?;
    Ok(tables
        .iter()
        .any(|o| o.pointer("/table/name").and_then(|n| n.as_str()) == Some(TABLE)))
}

/// One element of a set or meter as nft lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElem {
    pub addr: IpAddr,
    pub expires_secs: Option<u32>,
    pub packets: Option<u64>,
}

fn parse_elems(obj: &serde_json::Value) -> Vec<SetElem> {
    let Some(elems) = obj.get("elem").and_then(|e| e.as_array()) else {
        return Vec::new();
    };
    elems
        .iter()
        .filter_map(|e| {
            // A bare value, or {"elem": {"val": .., "expires": .., "counter": {..}}}.
            let (val, inner) = match e.get("elem") {
                Some(inner) => (inner.get("val")?, Some(inner)),
                None => (e, None),
            };
            let addr: IpAddr = val.as_str()?.parse().ok()?;
            let expires_secs = inner
                .and_then(|i| i.get("expires"))
                .and_then(|x| x.as_u64())
                .map(|x| x as u32);
            let packets = inner
                .and_then(|i| i.pointer("/counter/packets"))
                .and_then(|x| x.as_u64());
            Some(SetElem {
                addr,
                expires_secs,
                packets,
            })
        })
        .collect()
}

/// The elements of one of homeport's sets (`set`) or meters (`meter`).
pub fn elements(exec: &Exec, kind: &str, name: &str) -> Result<Vec<SetElem>, NftError> {
    let objs = list(exec, &[kind, "inet", TABLE, name])?;
    Ok(objs
        .iter()
        .filter_map(|o| o.get(kind))
        .flat_map(parse_elems)
        .collect())
}

/// The current bans with the time they have left and the port that started them (empty when
/// the table does not exist yet).
pub fn current_bans(exec: &Exec) -> Result<Vec<Ban>, NftError> {
    if !table_exists(exec)? {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for v6 in [false, true] {
        // A table from an older version may lack `banport`: no ports then.
        let ports = list(
            exec,
            &["set", "inet", TABLE, &format!("banport{}", fam(v6))],
        )
        .map(|objs| {
            objs.iter()
                .filter_map(|o| o.get("set"))
                .flat_map(parse_addr_ports)
                .collect::<std::collections::HashMap<IpAddr, u16>>()
        })
        .unwrap_or_default();
        for e in elements(exec, "set", &format!("banned{}", fam(v6)))? {
            // nft truncates to whole seconds; a listed element still has some time left.
            out.push(Ban {
                addr: e.addr,
                secs_left: e.expires_secs.unwrap_or(0).max(1),
                port: ports.get(&e.addr).copied(),
            });
        }
    }
    Ok(out)
}

/// The `address . port` elements of a set as nft lists them.
fn parse_addr_ports(obj: &serde_json::Value) -> Vec<(IpAddr, u16)> {
    let Some(elems) = obj.get("elem").and_then(|e| e.as_array()) else {
        return Vec::new();
    };
    elems
        .iter()
        .filter_map(|e| {
            let val = e.pointer("/elem/val").unwrap_or(e);
            let c = val.get("concat")?.as_array()?;
            let addr: IpAddr = c.first()?.as_str()?.parse().ok()?;
            let port = u16::try_from(c.get(1)?.as_u64()?).ok()?;
            Some((addr, port))
        })
        .collect()
}

/// Per-source drop counts of the deny meters: (reason, rule id, source, packets so far).
pub fn deny_counts(exec: &Exec) -> Result<Vec<(DenyReason, i64, IpAddr, u64)>, NftError> {
    let mut out = Vec::new();
    let meters = list(exec, &["meters"])?;
    for m in meters.iter().filter_map(|o| o.get("meter")) {
        if m.get("table").and_then(|t| t.as_str()) != Some(TABLE)
            || m.get("family").and_then(|f| f.as_str()) != Some("inet")
        {
            continue;
        }
        let Some(name) = m.get("name").and_then(|n| n.as_str()) else {
            continue;
        };
        let Some((reason, id)) = parse_deny_meter_name(name) else {
            continue;
        };
        for e in elements(exec, "meter", name)? {
            out.push((reason, id, e.addr, e.packets.unwrap_or(0)));
        }
    }
    Ok(out)
}

/// The DNAT targets (mesh addresses) of homeport's table as installed.
pub fn dnat_targets(exec: &Exec) -> Result<Vec<IpAddr>, NftError> {
    if !table_exists(exec)? {
        return Ok(Vec::new());
    }
    let mut out: Vec<IpAddr> = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<IpAddr>) {
        match v {
            serde_json::Value::Object(o) => {
                if let Some(a) = o
                    .get("dnat")
                    .and_then(|d| d.get("addr"))
                    .and_then(|a| a.as_str())
                    .and_then(|a| a.parse().ok())
                {
                    out.push(a);
                }
                o.values().for_each(|x| walk(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    for o in list(exec, &["table", "inet", TABLE])? {
        walk(&o, &mut out);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// What `homeport-exit cleanup` does after an exit that did not stop cleanly (systemd runs it
/// as `ExecStopPost`, also after SIGKILL): restores the sysctls saved in `state_dir`, deletes the
/// conntrack entries of flows to the table's DNAT targets, and removes the table. Returns what
/// it did, one line each.
pub fn cleanup(
    exec: &Exec,
    proc_sys: &std::path::Path,
    state_dir: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    let mut did = Vec::new();
    if restore_sysctls(proc_sys, state_dir)? {
        did.push(format!(
            "restored the sysctls saved in {}",
            state_dir.join(SYSCTL_BEFORE_FILE).display()
        ));
    }
    let targets = dnat_targets(exec)?;
    if table_exists(exec)? {
        remove(exec)?;
        did.push(format!("removed table inet {TABLE}"));
    }
    for t in targets {
        // Exit status 1 just means "no such flows".
        let _ = exec
            .command("conntrack")
            .args(["-D", "--reply-src", &t.to_string()])
            .output();
        did.push(format!("deleted the conntrack entries of flows to {t}"));
    }
    Ok(did)
}

/// File in the exit's state dir with the sysctl values from before the exit changed them.
pub const SYSCTL_BEFORE_FILE: &str = "sysctl-before.json";

/// Turns on what the exit needs from the kernel, under `proc_sys` (normally `/proc/sys`):
/// IPv4 and IPv6 forwarding, conntrack byte accounting and timestamps (for the audit log), and
/// strict TCP tracking (`nf_conntrack_tcp_loose=0`, which the synproxy needs). Before IPv6
/// forwarding is turned on, interfaces that accept router advertisements (`accept_ra` = 1) are
/// switched to 2, which keeps accepting them while forwarding: otherwise a VPS configured by
/// SLAAC would lose its IPv6 default route.
///
/// The values found are first saved in `<state_dir>/sysctl-before.json` (0600), for
/// [`restore_sysctls`] when the exit stops. A file that is already there was left by an exit
/// that did not stop cleanly: its values are the ones from before, and are kept.
pub fn enable_forwarding(
    proc_sys: &std::path::Path,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut wanted: Vec<(String, &str)> = vec![("net/ipv4/ip_forward".into(), "1")];
    if let Ok(dir) = std::fs::read_dir(proc_sys.join("net/ipv6/conf")) {
        let mut names: Vec<String> = dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let rel = format!("net/ipv6/conf/{n}/accept_ra");
            if std::fs::read_to_string(proc_sys.join(&rel))
                .map(|s| s.trim() == "1")
                .unwrap_or(false)
            {
                wanted.push((rel, "2"));
            }
        }
        wanted.push(("net/ipv6/conf/all/forwarding".into(), "1"));
    }
    // Exist only once nf_conntrack is loaded (the ruleset loads it).
    for (k, v) in [
        ("net/netfilter/nf_conntrack_acct", "1"),
        ("net/netfilter/nf_conntrack_timestamp", "1"),
        ("net/netfilter/nf_conntrack_tcp_loose", "0"),
    ] {
        if proc_sys.join(k).exists() {
            wanted.push((k.into(), v));
        }
    }
    let saved = state_dir.join(SYSCTL_BEFORE_FILE);
    let mut before: std::collections::BTreeMap<String, String> = std::fs::read(&saved)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let n = before.len();
    for (rel, _) in &wanted {
        if !before.contains_key(rel)
            && let Ok(v) = std::fs::read_to_string(proc_sys.join(rel))
        {
            before.insert(rel.clone(), v.trim().to_string());
        }
    }
    if before.len() != n || !saved.exists() {
        homeport_host::fs::write_private(&saved, &serde_json::to_vec_pretty(&before)?)
            .with_context(|| format!("saving the sysctls to restore in {}", saved.display()))?;
    }
    for (rel, v) in &wanted {
        let p = proc_sys.join(rel);
        std::fs::write(&p, v).with_context(|| format!("writing {v} to {}", p.display()))?;
    }
    Ok(())
}

/// Puts back the sysctl values [`enable_forwarding`] saved in `state_dir` and removes the file.
/// Returns whether there was anything to restore.
pub fn restore_sysctls(
    proc_sys: &std::path::Path,
    state_dir: &std::path::Path,
) -> anyhow::Result<bool> {
    use anyhow::Context;
    let saved = state_dir.join(SYSCTL_BEFORE_FILE);
    let bytes = match std::fs::read(&saved) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", saved.display())),
    };
    let before: std::collections::BTreeMap<String, String> = serde_json::from_slice(&bytes)
        .with_context(|| {
            format!(
                "{}: expected a JSON object of sysctl values",
                saved.display()
            )
        })?;
    // `all/forwarding` resets every interface's forwarding (and with it how accept_ra acts):
    // restore it first, then the per-interface values.
    let mut order: Vec<(&String, &String)> = before.iter().collect();
    order.sort_by_key(|(k, _)| !k.ends_with("/all/forwarding"));
    let mut failed = Vec::new();
    for (rel, v) in order {
        let p = proc_sys.join(rel);
        // An interface that is gone has nothing to restore.
        if p.exists()
            && let Err(e) = std::fs::write(&p, v)
        {
            failed.push(format!("{}: {e}", p.display()));
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("restoring sysctls failed: {}", failed.join("; "));
    }
    std::fs::remove_file(&saved).with_context(|| format!("removing {}", saved.display()))?;
    Ok(true)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use homeport_proto::publish::Guards;
    use serde_json::Value;

    pub(crate) fn rule(id: i64, proto: PublishProto, port: u16, guards: Guards) -> PublishRule {
        PublishRule {
            id,
            exit: homeport_proto::NodeId(1),
            exit_name: "vps".parse().unwrap(),
            proto,
            port,
            target: homeport_proto::NodeId(2),
            target_name: "home".parse().unwrap(),
            target_ipv4: "100.96.0.2".parse().unwrap(),
            target_ipv6: "fd7a:115c:a1e0::2".parse().unwrap(),
            target_port: port,
            guards,
        }
    }

    pub(crate) fn cfg() -> NftConfig {
        let mut keep_open = default_keep_open();
        keep_open.push(PortSpec {
            proto: L4::Udp,
            port: 41641,
        });
        NftConfig {
            tun: "hpx0".into(),
            edge_protection: true,
            keep_open,
            ban_seconds: 600,
            ban_after: 5,
            set_size: DEFAULT_SET_SIZE,
            mtu: 1380,
        }
    }

    pub(crate) fn sample() -> Vec<PublishRule> {
        vec![
            rule(
                7,
                PublishProto::Tcp,
                32400,
                Guards {
                    allow: vec![
                        "192.0.2.0/24".parse().unwrap(),
                        "2001:db8::/32".parse().unwrap(),
                    ],
                    rate_per_minute: Some(30),
                    max_conns: Some(8),
                },
            ),
            rule(9, PublishProto::Udp, 5353, Guards::default()),
        ]
    }

    fn json(n: &impl serde::Serialize) -> Value {
        serde_json::to_value(n).unwrap()
    }

    /// The rule expressions of chain `chain`, as JSON values.
    fn rules_of(v: &Value, chain: &str) -> Vec<Value> {
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.pointer("/add/rule"))
            .filter(|r| r["chain"] == chain)
            .map(|r| r["expr"].clone())
            .collect()
    }
    fn set_named(v: &Value, name: &str) -> Option<Value> {
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.pointer("/add/set"))
            .find(|s| s["name"] == name)
            .cloned()
    }
    fn has(exprs: &[Value], needle: serde_json::Value) -> bool {
        let n = needle.to_string();
        exprs
            .iter()
            .any(|e| e.to_string().contains(&n[1..n.len() - 1]))
    }

    #[test]
    fn batch_replaces_the_table_atomically() {
        let v = json(&ruleset(&cfg(), &sample(), &[]));
        let objs = v["nftables"].as_array().unwrap();
        let t = serde_json::json!({"table": {"family": "inet", "name": "homeport_exit"}});
        assert_eq!(objs[0], serde_json::json!({"add": t}));
        assert_eq!(objs[1], serde_json::json!({"delete": t}));
        assert_eq!(objs[2], serde_json::json!({"add": t}));
        // Everything else is an add inside our own table.
        for o in &objs[3..] {
            let (cmd, body) = o.as_object().unwrap().iter().next().unwrap();
            assert_eq!(cmd, "add");
            let inner = body.as_object().unwrap().values().next().unwrap();
            assert_eq!(inner["table"], TABLE, "{o}");
            assert_eq!(inner["family"], "inet");
        }
        assert_eq!(json(&removal())["nftables"].as_array().unwrap().len(), 2);
        assert_eq!(
            json(&removal())["nftables"][1],
            serde_json::json!({"delete": t})
        );
    }

    #[test]
    fn same_input_same_json() {
        let a = ruleset(&cfg(), &sample(), &[]);
        let mut rev = sample();
        rev.reverse();
        let b = ruleset(&cfg(), &rev, &[]);
        // Struct equality (flag sets compare as sets) and identical JSON.
        assert_eq!(a, b);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
    }

    #[test]
    fn dnat_v4_and_v6_without_masquerade() {
        let v = json(&ruleset(&cfg(), &sample(), &[]));
        let d = rules_of(&v, "dnat_pre");
        assert!(has(
            &d,
            serde_json::json!({"dnat": {"addr": "100.96.0.2", "family": "ip", "port": 32400}})
        ));
        assert!(has(
            &d,
            serde_json::json!({"dnat": {"addr": "fd7a:115c:a1e0::2", "family": "ip6", "port": 32400}})
        ));
        assert!(has(
            &d,
            serde_json::json!({"payload": {"protocol": "udp", "field": "dport"}})
        ));
        assert!(
            has(&d, serde_json::json!({"right": {"set": ["lo", "hpx0"]}})),
            "{d:?}"
        );
        assert!(!v.to_string().contains("masquerade") && !v.to_string().contains("snat"));
        let chain = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.pointer("/add/chain"))
            .find(|c| c["name"] == "dnat_pre")
            .unwrap()
            .clone();
        assert_eq!(
            (
                chain["type"].as_str(),
                chain["hook"].as_str(),
                chain["prio"].as_i64()
            ),
            (Some("nat"), Some("prerouting"), Some(-100))
        );
        let guard = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.pointer("/add/chain"))
            .find(|c| c["name"] == "guard_pre")
            .unwrap()
            .clone();
        assert!(
            guard["prio"].as_i64().unwrap() < -100,
            "guards must run before DNAT"
        );
    }

    #[test]
    fn guards_allow_rate_conns() {
        let v = json(&ruleset(&cfg(), &sample(), &[]));
        let a4 = set_named(&v, "allow4_7").unwrap();
        assert_eq!(a4["flags"], serde_json::json!(["interval"]));
        assert_eq!(a4["type"], "ipv4_addr");
        assert_eq!(
            a4["elem"],
            serde_json::json!([{"prefix": {"addr": "192.0.2.0", "len": 24}}])
        );
        assert_eq!(
            set_named(&v, "allow6_7").unwrap()["elem"],
            serde_json::json!([{"prefix": {"addr": "2001:db8::", "len": 32}}])
        );
        // Rule 9 has no allow-list: no set, no check.
        assert!(set_named(&v, "allow4_9").is_none());
        let p = rules_of(&v, "pub_7");
        assert!(
            has(&p, serde_json::json!({"op": "!=", "right": "@allow4_7"}))
                || has(&p, serde_json::json!({"right": "@allow4_7", "op": "!="}))
                || p.iter().any(|e| e.to_string().contains("@allow4_7"))
        );
        assert!(
            has(
                &p,
                serde_json::json!({"limit": {"rate": 30, "rate_unit": "packets", "per": "minute", "burst": 30, "burst_unit": "packets"}})
            ),
            "{p:?}"
        );
        assert!(
            has(
                &rules_of(&v, "pubc_7"),
                serde_json::json!({"ct count": {"val": 8}})
            ),
            "{p:?}"
        );
        assert!(p.iter().any(|e| e.to_string().contains("@banned4")));
        let p9 = rules_of(&v, "pub_9");
        assert!(
            !p9.iter()
                .any(|e| e.to_string().contains("limit") || e.to_string().contains("ct count"))
        );
        // Each deny chain counts per source and then drops.
        let d = rules_of(&v, "deny_rate_7");
        assert!(
            has(&d, serde_json::json!({"meter": {"name": "deny4_rate_7"}}))
                || d[0].to_string().contains("deny4_rate_7")
        );
        assert_eq!(d.last().unwrap(), &serde_json::json!([{"drop": null}]));
    }

    #[test]
    fn forward_and_edge() {
        let v = json(&ruleset(&cfg(), &sample(), &[]));
        let f = rules_of(&v, "fwd_mesh");
        assert!(has(
            &f,
            serde_json::json!({"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}}, "value": {"rt": {"key": "mtu"}}}})
        ));
        assert!(has(&f, serde_json::json!({"right": "dnat"})));
        assert_eq!(f.last().unwrap()[1], serde_json::json!({"drop": null}));
        let e = rules_of(&v, "edge_in");
        assert!(has(&e, serde_json::json!({"set": [22, 8443]})), "{e:?}");
        assert!(has(&e, serde_json::json!({"set": [3478, 41641]})), "{e:?}");
        assert_eq!(e.last().unwrap(), &serde_json::json!([{"drop": null}]));
        let bans = rules_of(&v, "probe");
        assert!(
            bans.iter()
                .any(|b| b.to_string().contains("@banned4")
                    && b.to_string().contains("\"timeout\":600")),
            "{bans:?}"
        );
        // Edge protection off: no input chain at all.
        let mut c = cfg();
        c.edge_protection = false;
        assert!(rules_of(&json(&ruleset(&c, &sample(), &[])), "edge_in").is_empty());
    }

    #[test]
    fn plan_skips_what_it_cannot_install() {
        let mut rules = sample();
        rules.push(rule(3, PublishProto::Tcp, 22, Guards::default()));
        rules.push(rule(11, PublishProto::Tcp, 32400, Guards::default()));
        rules.push(rule(12, PublishProto::Unknown, 9999, Guards::default()));
        let (ok, skipped) = plan(&cfg(), &rules);
        assert_eq!(ok.iter().map(|r| r.id).collect::<Vec<_>>(), vec![7, 9]);
        assert_eq!(
            skipped.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![3, 11, 12]
        );
        assert!(skipped[0].why.contains("keep-open"));
    }

    #[test]
    fn carried_bans_become_elements() {
        let bans = [
            Ban {
                addr: "198.51.100.9".parse().unwrap(),
                secs_left: 30,
                port: Some(23),
            },
            Ban {
                addr: "2001:db9::9".parse().unwrap(),
                secs_left: 5000,
                port: None,
            },
        ];
        let v = json(&ruleset(&cfg(), &sample(), &bans));
        assert_eq!(
            set_named(&v, "banned4").unwrap()["elem"][0]["elem"]["timeout"],
            30
        );
        // Never longer than the configured ban.
        assert_eq!(
            set_named(&v, "banned6").unwrap()["elem"][0]["elem"]["timeout"],
            600
        );
        assert_eq!(
            set_named(&v, "banport4").unwrap()["elem"][0]["elem"]["val"],
            serde_json::json!({"concat": ["198.51.100.9", 23]})
        );
    }

    #[test]
    fn allow_listed_sources_and_published_ports_lose_their_bans() {
        let ban = |a: &str, port| Ban {
            addr: a.parse().unwrap(),
            secs_left: 300,
            port,
        };
        let bans = [
            // In rule 7's allow-list: never banned.
            ban("192.0.2.77", Some(23)),
            // Banned for probing 32400 before it was published.
            ban("198.51.100.77", Some(32400)),
            ban("198.51.100.78", Some(5353)),
            ban("198.51.100.79", Some(24)),
        ];
        let v = json(&ruleset(&cfg(), &sample(), &bans));
        let b4 = set_named(&v, "banned4").unwrap()["elem"].to_string();
        assert!(
            !b4.contains("192.0.2.77") && !b4.contains(".100.77\"") && !b4.contains(".100.78\""),
            "{b4}"
        );
        assert!(b4.contains("198.51.100.79"), "{b4}");
        // The probe chain skips allow-listed sources and retries, and counts distinct ports.
        let p = rules_of(&v, "probe");
        assert!(p[0].to_string().contains("@nobans4"), "{p:?}");
        assert!(p[1].to_string().contains("@probed4"), "{p:?}");
        assert_eq!(
            set_named(&v, "nobans4").unwrap()["elem"],
            serde_json::json!([{"prefix": {"addr": "192.0.2.0", "len": 24}}])
        );
        // Explicit sizes on every dynamic set and meter.
        for name in ["banned4", "banned6", "banport4", "probed6"] {
            assert_eq!(set_named(&v, name).unwrap()["size"], 65536, "{name}");
        }
        fn meters(v: &Value, out: &mut Vec<Value>) {
            match v {
                Value::Object(o) => {
                    if let Some(m) = o.get("meter") {
                        out.push(m.clone());
                    }
                    o.values().for_each(|x| meters(x, out));
                }
                Value::Array(a) => a.iter().for_each(|x| meters(x, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        meters(&v, &mut all);
        assert!(all.len() > 4);
        for m in all {
            assert_eq!(m["size"], 65536, "{m}");
        }
    }

    #[test]
    fn tcp_ports_go_through_the_synproxy_and_targets_only_leave_by_the_tun() {
        let v = json(&ruleset(&cfg(), &sample(), &[]));
        let raw = rules_of(&v, "syn_raw");
        assert!(
            raw.iter()
                .any(|r| r.to_string().contains("notrack") && r.to_string().contains("32400"))
        );
        // UDP 5353 is not proxied.
        assert!(!raw.iter().any(|r| r.to_string().contains("5353")));
        let sp = rules_of(&v, "synproxy_in");
        assert!(
            has(
                &sp,
                serde_json::json!({"synproxy": {"mss": 1340, "wscale": 7}})
            ) || sp.iter().any(|r| r.to_string().contains("\"mss\":1340")),
            "{sp:?}"
        );
        assert!(
            sp.iter().any(|r| r.to_string().contains("\"mss\":1320")),
            "{sp:?}"
        );
        assert!(
            rules_of(&v, "guard_out")
                .iter()
                .any(|r| r.to_string().contains("pub_7"))
        );
        assert!(
            rules_of(&v, "dnat_out")
                .iter()
                .any(|r| r.to_string().contains("100.96.0.2"))
        );
        let post = rules_of(&v, "post_mesh");
        assert!(
            post.iter().any(|r| {
                let s = r.to_string();
                s.contains("100.96.0.2") && s.contains("!=") && s.contains("drop")
            }),
            "{post:?}"
        );
    }

    #[test]
    fn enable_forwarding_writes_sysctls_and_restore_puts_them_back() {
        let d = tempfile::tempdir().unwrap();
        let p = &d.path().join("proc");
        let state = &d.path().join("state");
        std::fs::create_dir_all(state).unwrap();
        let before = [
            ("net/ipv4/ip_forward", "0"),
            ("net/ipv6/conf/all/forwarding", "0"),
            ("net/ipv6/conf/all/accept_ra", "0"),
            ("net/ipv6/conf/eth0/accept_ra", "1"),
            ("net/ipv6/conf/eth1/accept_ra", "0"),
            ("net/netfilter/nf_conntrack_acct", "0"),
            ("net/netfilter/nf_conntrack_tcp_loose", "1"),
        ];
        for (k, v) in before {
            std::fs::create_dir_all(p.join(k).parent().unwrap()).unwrap();
            std::fs::write(p.join(k), v).unwrap();
        }
        enable_forwarding(p, state).unwrap();
        let r = |k: &str| std::fs::read_to_string(p.join(k)).unwrap();
        assert_eq!(r("net/ipv4/ip_forward"), "1");
        assert_eq!(r("net/ipv6/conf/all/forwarding"), "1");
        assert_eq!(r("net/ipv6/conf/eth0/accept_ra"), "2");
        assert_eq!(r("net/ipv6/conf/eth1/accept_ra"), "0");
        assert_eq!(r("net/netfilter/nf_conntrack_acct"), "1");
        assert_eq!(r("net/netfilter/nf_conntrack_tcp_loose"), "0");
        assert!(!p.join("net/netfilter/nf_conntrack_timestamp").exists());
        use std::os::unix::fs::PermissionsExt;
        let saved = state.join(SYSCTL_BEFORE_FILE);
        assert_eq!(
            std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A second start after a kill: the saved values stay the ones from before the first.
        enable_forwarding(p, state).unwrap();
        assert!(restore_sysctls(p, state).unwrap());
        for (k, v) in before {
            assert_eq!(r(k), v, "{k}");
        }
        assert!(!saved.exists());
        assert!(
            !restore_sysctls(p, state).unwrap(),
            "nothing left to restore"
        );
    }

    #[test]
    fn dump() {
        if let Ok(p) = std::env::var("HOMEPORT_EXIT_DUMP") {
            std::fs::write(
                p,
                serde_json::to_string_pretty(&ruleset(&cfg(), &sample(), &[])).unwrap(),
            )
            .unwrap();
        }
    }

    #[test]
    fn port_spec_parse() {
        assert_eq!(
            "tcp:22".parse::<PortSpec>().unwrap(),
            PortSpec {
                proto: L4::Tcp,
                port: 22
            }
        );
        assert_eq!("UDP:3478".parse::<PortSpec>().unwrap().proto, L4::Udp);
        for bad in ["22", "icmp:1", "tcp:0", "tcp:70000", "tcp:x"] {
            assert!(
                bad.parse::<PortSpec>().unwrap_err().contains("PROTO:PORT"),
                "{bad}"
            );
        }
    }

    #[test]
    fn deny_meter_names_round_trip() {
        for r in DenyReason::ALL {
            for v6 in [false, true] {
                assert_eq!(
                    parse_deny_meter_name(&deny_meter_name(r, -3, v6)),
                    Some((r, -3))
                );
            }
        }
        assert_eq!(parse_deny_meter_name("rate4_7"), None);
        assert_eq!(parse_deny_meter_name("deny4_what_7"), None);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn sa(s: &str) -> std::net::SocketAddr {
        s.parse().unwrap()
    }
    fn rule_count(exec: &Exec) -> usize {
        list(exec, &["table", "inet", TABLE])
            .unwrap()
            .iter()
            .filter(|o| o.get("rule").is_some())
            .count()
    }

    /// The whole ruleset against real kernels: DNAT v4/v6 with the viewer's address preserved,
    /// allow-list, rate, max-conns, re-apply (no duplicates, established flows survive), bans
    /// from closed-port probes and their expiry, removal.
    #[test]
    fn lab_publish() {
        if !crate::lab::available("nft::lab_publish") {
            return;
        }
        use crate::lab::Lab;
        use std::time::Duration;
        let lab = Lab::new();
        let exec = Exec::netns(&lab.vps);
        let mut c = cfg();
        c.ban_seconds = 2;
        c.ban_after = 1;
        let guards = |allow: &[&str], rate, conns| Guards {
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
            rate_per_minute: rate,
            max_conns: conns,
        };
        let rules = vec![
            rule(
                1,
                PublishProto::Tcp,
                32400,
                guards(&["192.0.2.5/32", "2001:db8:2::5/128"], None, None),
            ),
            rule(2, PublishProto::Tcp, 8080, guards(&[], Some(2), None)),
            rule(3, PublishProto::Tcp, 8081, guards(&[], None, Some(1))),
        ];
        apply(&exec, &ruleset(&c, &rules, &[])).expect("nft accepts the ruleset");
        for p in [32400, 8080, 8081] {
            lab.serve(p);
        }
        let (a4, b4, a6, b6) = (
            ip("192.0.2.5"),
            ip("192.0.2.6"),
            ip("2001:db8:2::5"),
            ip("2001:db8:2::6"),
        );
        let plex4 = sa("198.51.100.10:32400");
        let plex6 = sa("[2001:db8:100::10]:32400");

        // (a) DNAT into the "mesh"; the target sees the viewer's own address.
        let mut conn = lab.connect(a4, plex4).expect("allowed v4 source connects");
        let ans = Lab::ask(&mut conn, "hi").expect("answer");
        assert!(
            ans.starts_with("192.0.2.5:") && ans.ends_with(" hi"),
            "{ans}"
        );
        let mut conn6 = lab.connect(a6, plex6).expect("allowed v6 source connects");
        let ans = Lab::ask(&mut conn6, "hi6").expect("answer");
        assert!(ans.starts_with("[2001:db8:2::5]:"), "{ans}");

        // (b) Not in the allow-list: nothing at all, counted per source.
        assert!(lab.connect(b4, plex4).is_none());
        assert!(lab.connect(b6, plex6).is_none());
        let denied = deny_counts(&exec).unwrap();
        for src in [b4, b6] {
            assert!(
                denied.iter().any(|d| d.0 == DenyReason::NotInAllowList
                    && d.1 == 1
                    && d.2 == src
                    && d.3 > 0),
                "{src} not counted: {denied:?}"
            );
        }

        // Rate: 2 new connections per minute from one source, the third is dropped. TCP goes
        // through the synproxy, which completes the handshake with the client before the guards
        // see the connection: a denied connection is one that never reaches the server.
        let reaches = |src, dst| {
            lab.connect(src, dst)
                .and_then(|mut c| Lab::ask(&mut c, "x").map(|a| (c, a)))
        };
        let web = sa("198.51.100.10:8080");
        let _w1 = reaches(b4, web).expect("rate 1");
        let _w2 = reaches(b4, web).expect("rate 2");
        assert!(
            reaches(b4, web).is_none(),
            "third connection within a minute passed the rate guard"
        );
        // Max conns: one at a time per source; another source is not affected.
        let cc = sa("198.51.100.10:8081");
        let _c1 = reaches(b4, cc).expect("first connection");
        assert!(
            reaches(b4, cc).is_none(),
            "second concurrent connection passed max-conns"
        );
        let _c2 = reaches(a4, cc).expect("other source");
        let denied = deny_counts(&exec).unwrap();
        assert!(
            denied
                .iter()
                .any(|d| d.0 == DenyReason::Rate && d.1 == 2 && d.2 == b4)
        );
        assert!(
            denied
                .iter()
                .any(|d| d.0 == DenyReason::MaxConns && d.1 == 3 && d.2 == b4)
        );

        // (c) Re-apply: exactly one copy of each rule; the established flow survives.
        let n = rule_count(&exec);
        for _ in 0..2 {
            apply(&exec, &ruleset(&c, &rules, &current_bans(&exec).unwrap())).unwrap();
            assert_eq!(rule_count(&exec), n);
        }
        let ans = Lab::ask(&mut conn, "still").expect("established flow survives a re-apply");
        assert!(ans.ends_with(" still"));

        // (d) A closed-port probe bans the source (ban_after 1) for ban_seconds (2).
        let cc6 = sa("[2001:db8:100::10]:8081");
        let probe = |src, port: u16| {
            let dst = SocketAddr::new(
                if src == b6 {
                    ip("2001:db8:100::10")
                } else {
                    ip("198.51.100.10")
                },
                port,
            );
            assert!(
                lab.connect_within(src, dst, Duration::from_millis(300))
                    .is_none()
            );
        };
        use std::net::SocketAddr;
        probe(b6, 23);
        let bans = current_bans(&exec).unwrap();
        assert!(
            bans.iter().any(|b| b.addr == b6 && b.port == Some(23)),
            "not banned: {bans:?}"
        );
        // A ban survives a re-apply.
        apply(&exec, &ruleset(&c, &rules, &current_bans(&exec).unwrap())).unwrap();
        assert!(
            current_bans(&exec).unwrap().iter().any(|b| b.addr == b6),
            "ban lost on re-apply"
        );
        assert!(lab.connect(b6, cc6).is_none(), "banned source got through");
        std::thread::sleep(Duration::from_millis(2600));
        assert!(
            current_bans(&exec).unwrap().is_empty(),
            "ban did not time out"
        );
        assert!(
            reaches(b6, cc6).is_some(),
            "connection after the ban expired"
        );
        // Keep-open ports are never banned away: SSH stays reachable for a banned source.
        probe(b6, 24);
        assert!(current_bans(&exec).unwrap().iter().any(|b| b.addr == b6));
        let ssh = Lab::in_ns(&lab.vps, || {
            std::net::TcpListener::bind("[2001:db8:100::10]:22").unwrap()
        });
        assert!(
            lab.connect(b6, sa("[2001:db8:100::10]:22")).is_some(),
            "banned source lost SSH"
        );
        drop(ssh);
        // A source in an allow-list is never banned.
        probe(a4, 23);
        assert!(
            !current_bans(&exec).unwrap().iter().any(|b| b.addr == a4),
            "allow-listed source banned"
        );

        // ban_after 3: retries to one port count once; the third distinct port bans.
        c.ban_after = 3;
        apply(&exec, &ruleset(&c, &rules, &[])).unwrap();
        for (i, port) in [25, 25, 25, 26, 27].into_iter().enumerate() {
            probe(b4, port);
            let banned = current_bans(&exec).unwrap().iter().any(|b| b.addr == b4);
            assert_eq!(banned, i == 4, "after probe {} (port {port})", i + 1);
        }

        // Removal leaves no table; removing twice is fine.
        remove(&exec).unwrap();
        remove(&exec).unwrap();
        assert!(!table_exists(&exec).unwrap());
    }
}

#[cfg(test)]
mod lab_attacks {
    use super::tests::{cfg, rule};
    use super::*;
    use crate::lab::Lab;
    use homeport_proto::publish::Guards;
    use std::net::SocketAddr;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
    fn conntrack_count(ns: &str) -> u64 {
        Lab::run_in(ns, &["conntrack", "-C"])
            .trim()
            .parse()
            .unwrap()
    }
    /// hping3 in `ns` with `args`, killed when the returned guard drops.
    struct Hping(Child);
    impl Hping {
        fn start(ns: &str, args: &[&str]) -> Hping {
            Hping(
                Command::new("ip")
                    .args(["netns", "exec", ns, "hping3"])
                    .args(args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("hping3"),
            )
        }
        /// Stops it (SIGINT, so it prints its statistics); returns the packets it sent.
        fn stop(mut self) -> u64 {
            unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
            let out = std::mem::replace(&mut self.0, Command::new("true").spawn().unwrap())
                .wait_with_output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            text.split_whitespace()
                .zip(text.split_whitespace().skip(1))
                .find(|(_, w)| *w == "packets")
                .and_then(|(n, _)| n.parse().ok())
                .unwrap_or_else(|| panic!("no packet count in hping3's output: {text}"))
        }
    }
    impl Drop for Hping {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    /// Runs hping3 in `ns` to completion (it exits 1 when nothing answers, which is the point).
    fn hping(ns: &str, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "hping3", "-q"])
            .args(args)
            .output()
            .expect("hping3");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("packets transmitted"),
            "hping3 {args:?}: {text}"
        );
    }

    fn lab_with_flood_routes() -> Lab {
        let lab = Lab::new();
        // Spoofed sources: no reverse-path filter on the VPS, and a default route so its
        // answers to them leave like on a real VPS.
        for k in [
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.eth0.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            Lab::run_in(&lab.vps, &["sysctl", "-qw", k]);
        }
        Lab::run_in(
            &lab.vps,
            &["ip", "route", "add", "default", "via", "198.51.100.1"],
        );
        lab
    }

    /// A flood of spoofed-source SYNs at a published port (hping3 --flood --rand-source) leaves
    /// no conntrack state on the VPS and reaches nothing behind it; meanwhile a stream that was
    /// running keeps going, and a new viewer connects (its real address reaches home, its MSS
    /// is clamped to the TUN) and downloads. Prints the rate sent and the throughput with and
    /// without the flood.
    #[test]
    fn lab_spoofed_syn_flood_leaves_no_state_and_viewers_get_through() {
        if !crate::lab::available_with("nft::lab_spoofed_syn_flood", &["hping3", "iperf3"]) {
            return;
        }
        let lab = lab_with_flood_routes();
        // The TUN's MTU, so the clamp has something to do.
        Lab::run_in(&lab.vps, &["ip", "link", "set", "hpx0", "mtu", "1380"]);
        let exec = Exec::netns(&lab.vps);
        let rules = vec![
            rule(1, PublishProto::Tcp, 32400, Guards::default()),
            rule(2, PublishProto::Tcp, 32401, Guards::default()),
        ];
        apply(&exec, &ruleset(&cfg(), &rules, &[])).expect("ruleset");
        lab.serve(32400);
        // Throughput by iperf3 (download: the home sends), as a viewer watching a stream would.
        let _iperf = Hping(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &lab.home,
                    "iperf3",
                    "-s",
                    "-B",
                    "100.96.0.2",
                ])
                .args(["-p", "32401"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("iperf3 server"),
        );
        std::thread::sleep(Duration::from_millis(300));
        let iperf = || -> Option<f64> {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &lab.viewer,
                    "iperf3",
                    "-c",
                    "198.51.100.10",
                ])
                .args(["-p", "32401", "-B", "192.0.2.6", "-t", "2", "-R", "-J"])
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v.pointer("/end/sum_received/bits_per_second")?
                .as_f64()
                .map(|b| b / 1e6)
        };
        let (a4, b4) = (ip("192.0.2.5"), ip("192.0.2.6"));
        let plex = sa("198.51.100.10:32400");
        let unloaded = iperf().expect("unloaded download");
        let mut stream = lab.connect(a4, plex).expect("stream before the flood");
        assert!(Lab::ask(&mut stream, "before").is_some());
        let base = conntrack_count(&lab.vps);

        let flood = Hping::start(
            &lab.viewer,
            &[
                "--flood",
                "--rand-source",
                "-S",
                "-p",
                "32400",
                "198.51.100.10",
            ],
        );
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let during = conntrack_count(&lab.vps);
        let mut alive = 0;
        for i in 0..3 {
            alive += Lab::ask(&mut stream, &format!("during {i}")).is_some() as u32;
        }
        let mut viewer = lab.connect(b4, plex).expect("new viewer during the flood");
        let ans = Lab::ask(&mut viewer, "mss").expect("new viewer answered during the flood");
        let got = iperf();
        let after = conntrack_count(&lab.vps);
        let sent = flood.stop();
        let rate = sent as f64 / t0.elapsed().as_secs_f64();
        let loaded = got.expect("download during the flood");
        eprintln!(
            "SYN flood: {sent} spoofed SYNs in {:.1} s ({rate:.0}/s); conntrack entries on the VPS: {base} before, {during} and {after} during; download (iperf3 -R) {unloaded:.0} Mbit/s unloaded, {loaded:.0} Mbit/s during the flood",
            t0.elapsed().as_secs_f64()
        );
        assert!(sent > 10_000, "hping3 sent only {sent} packets");
        // The spoofed SYNs took no conntrack slot (the lab's own flows take a handful).
        assert!(
            during < base + 100 && after < base + 100,
            "conntrack grew under the flood: {base} -> {during}, {after}"
        );
        assert_eq!(alive, 3, "the running stream stalled during the flood");
        // The viewer's own address reached home, and the home socket's MSS fits the TUN.
        let mss: i32 = ans
            .strip_prefix("192.0.2.6:")
            .and_then(|r| r.split_once(" mss "))
            .map(|(_, m)| m.parse().unwrap())
            .unwrap_or_else(|| panic!("unexpected answer {ans:?}"));
        assert!(
            mss <= 1340,
            "MSS {mss} is not clamped to the TUN (1380 - 40)"
        );
        assert!(Lab::ask(&mut stream, "after").is_some());
        assert!(lab.connect(a4, plex).is_some(), "viewer after the flood");
    }

    /// Spoofed SYNs to closed ports never ban a source on an allow-list; a viewer whose client
    /// retries a port that is not published yet is not banned for it and connects once the rule
    /// is there; and a ban started by a probe of a port that is published by the time the table
    /// is applied again is lifted.
    #[test]
    fn lab_bans_spare_allow_lists_retries_and_published_ports() {
        if !crate::lab::available_with("nft::lab_bans_spare", &["hping3"]) {
            return;
        }
        let lab = lab_with_flood_routes();
        let exec = Exec::netns(&lab.vps);
        let mut c = cfg();
        c.ban_after = 3;
        c.ban_seconds = 600;
        let allow = Guards {
            allow: vec!["192.0.2.5/32".parse().unwrap()],
            ..Guards::default()
        };
        let mut rules = vec![rule(1, PublishProto::Tcp, 32400, allow)];
        apply(&exec, &ruleset(&c, &rules, &[])).unwrap();
        lab.serve(32400);
        lab.serve(32401);
        let banned = |a: IpAddr| {
            current_bans(&exec)
                .unwrap()
                .into_iter()
                .find(|b| b.addr == a)
        };
        let (a4, b4) = (ip("192.0.2.5"), ip("192.0.2.6"));

        // Someone spoofs the allow-listed address at ten closed ports: no ban.
        hping(
            &lab.viewer,
            &[
                "-S",
                "-a",
                "192.0.2.5",
                "-p",
                "++40",
                "-c",
                "10",
                "-i",
                "u20000",
                "198.51.100.10",
            ],
        );
        // The same from an address on no list bans it (the rule works at all).
        hping(
            &lab.viewer,
            &[
                "-S",
                "-a",
                "203.0.113.99",
                "-p",
                "++40",
                "-c",
                "10",
                "-i",
                "u20000",
                "198.51.100.10",
            ],
        );
        assert!(
            banned(ip("203.0.113.99")).is_some(),
            "the scanner rule banned nobody"
        );
        assert_eq!(banned(a4), None, "an allow-listed source was banned");
        let mut conn = lab
            .connect(a4, sa("198.51.100.10:32400"))
            .expect("allow-listed viewer");
        assert!(Lab::ask(&mut conn, "hi").is_some());

        // A viewer's client retries port 32401 before it is published: one probe, no ban.
        for _ in 0..6 {
            assert!(
                lab.connect_within(b4, sa("198.51.100.10:32401"), Duration::from_millis(200))
                    .is_none()
            );
        }
        assert_eq!(
            banned(b4),
            None,
            "a viewer was banned for retrying one port"
        );
        rules.push(rule(2, PublishProto::Tcp, 32401, Guards::default()));
        apply(&exec, &ruleset(&c, &rules, &current_bans(&exec).unwrap())).unwrap();
        let mut v = lab
            .connect(b4, sa("198.51.100.10:32401"))
            .expect("the viewer connects once the port is published");
        assert!(Lab::ask(&mut v, "hi").unwrap().starts_with("192.0.2.6:"));

        // Bans follow the probe that started them: 10.9.9.9 probes 23, 24 and then 32402,
        // which gets published; on the next apply its ban is lifted.
        for port in ["23", "24", "32402"] {
            hping(
                &lab.viewer,
                &[
                    "-S",
                    "-a",
                    "10.9.9.9",
                    "-p",
                    port,
                    "-c",
                    "1",
                    "198.51.100.10",
                ],
            );
        }
        let b = banned(ip("10.9.9.9")).expect("three distinct ports ban");
        assert_eq!(b.port, Some(32402));
        rules.push(rule(3, PublishProto::Tcp, 32402, Guards::default()));
        apply(&exec, &ruleset(&c, &rules, &current_bans(&exec).unwrap())).unwrap();
        assert_eq!(
            banned(ip("10.9.9.9")),
            None,
            "ban for a now-published port kept"
        );
        assert!(
            banned(ip("203.0.113.99")).is_some(),
            "other bans must survive"
        );
    }

    /// With every set and meter sized 4: a rate meter full of other sources denies a new
    /// source (it does not let it through unmetered), a full connection-count meter denies
    /// too, and a full ban set keeps its size while the probes are still dropped.
    #[test]
    fn lab_full_sets_fail_closed() {
        if !crate::lab::available_with("nft::lab_full_sets", &["hping3"]) {
            return;
        }
        let lab = lab_with_flood_routes();
        let exec = Exec::netns(&lab.vps);
        let mut c = cfg();
        c.set_size = 4;
        c.ban_after = 1;
        let rules = vec![
            rule(
                1,
                PublishProto::Udp,
                5000,
                Guards {
                    rate_per_minute: Some(1000),
                    ..Guards::default()
                },
            ),
            rule(
                2,
                PublishProto::Tcp,
                8081,
                Guards {
                    max_conns: Some(5),
                    ..Guards::default()
                },
            ),
        ];
        apply(&exec, &ruleset(&c, &rules, &[])).unwrap();
        lab.serve(8081);
        // A UDP echo at home.
        let echo = Lab::in_ns(&lab.home, || {
            std::net::UdpSocket::bind("100.96.0.2:5000").unwrap()
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let udp_answered = |src: &str| {
            let src: SocketAddr = format!("{src}:0").parse().unwrap();
            Lab::in_ns(&lab.viewer, move || {
                let s = std::net::UdpSocket::bind(src).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                s.send_to(b"ping", "198.51.100.10:5000").unwrap();
                let mut buf = [0u8; 16];
                s.recv_from(&mut buf).is_ok()
            })
        };
        assert!(udp_answered("192.0.2.5"), "UDP path works");
        // Three more sources fill the rate meter (4 elements, 60 s each).
        for n in 1..=3 {
            hping(
                &lab.viewer,
                &[
                    "-2",
                    "-a",
                    &format!("10.8.0.{n}"),
                    "-p",
                    "5000",
                    "-c",
                    "1",
                    "198.51.100.10",
                ],
            );
        }
        assert!(
            udp_answered("192.0.2.5"),
            "a source already metered goes on"
        );
        assert!(
            !udp_answered("192.0.2.6"),
            "a full rate meter let a new source through"
        );
        assert!(
            deny_counts(&exec)
                .unwrap()
                .iter()
                .any(|d| d.0 == DenyReason::Rate && d.2 == ip("192.0.2.6")),
            "the denial is counted"
        );

        // Connection-count meter: four sources hold a connection each; a fifth is denied.
        let mut held = Vec::new();
        for n in 10..14 {
            let a = format!("192.0.2.{n}");
            Lab::run_in(
                &lab.viewer,
                &["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"],
            );
            let mut s = lab
                .connect(ip(&a), sa("198.51.100.10:8081"))
                .expect("connects");
            assert!(Lab::ask(&mut s, "x").is_some(), "{a} under the limit");
            held.push(s);
        }
        let fifth = lab
            .connect(ip("192.0.2.5"), sa("198.51.100.10:8081"))
            .and_then(|mut s| Lab::ask(&mut s, "x"));
        assert!(
            fifth.is_none(),
            "a full connection-count meter let a new source through"
        );

        // Ban set: six spoofed probers, room for four.
        for n in 1..=6 {
            hping(
                &lab.viewer,
                &[
                    "-S",
                    "-a",
                    &format!("10.7.0.{n}"),
                    "-p",
                    "23",
                    "-c",
                    "1",
                    "198.51.100.10",
                ],
            );
        }
        let bans = current_bans(&exec).unwrap();
        assert_eq!(bans.len(), 4, "{bans:?}");
    }

    /// With the TUN gone (the exit was killed; the table stays until cleanup), a viewer's
    /// packets DNATed to the home's mesh address would follow the VPS's default route out to
    /// the internet: nothing addressed to a mesh target may leave the VPS's public side.
    #[test]
    fn lab_dnat_targets_leave_only_by_the_tun() {
        if !crate::lab::available("nft::lab_dnat_targets_leave_only_by_the_tun") {
            return;
        }
        let lab = lab_with_flood_routes();
        let exec = Exec::netns(&lab.vps);
        let rules = vec![
            rule(1, PublishProto::Tcp, 32400, Guards::default()),
            rule(2, PublishProto::Udp, 5000, Guards::default()),
        ];
        apply(&exec, &ruleset(&cfg(), &rules, &[])).unwrap();
        lab.serve(32400);
        // A stream that is running when the exit dies: its conntrack entry (and DNAT binding)
        // outlives the TUN.
        let mut running = lab
            .connect(ip("192.0.2.6"), sa("198.51.100.10:32400"))
            .expect("connects");
        assert!(Lab::ask(&mut running, "before").is_some());
        // The viewer's side of the link counts what arrives for the mesh.
        Lab::run_in(
            &lab.viewer,
            &[
                "nft",
                "add table inet watch; add chain inet watch pre { type filter hook prerouting priority -400; }; add rule inet watch pre ip daddr 100.96.0.0/16 counter; add rule inet watch pre ip6 daddr fd7a:115c:a1e0::/64 counter",
            ],
        );
        // The exit dies: its TUN goes with it.
        Lab::run_in(&lab.vps, &["ip", "link", "del", "hpx0"]);
        Lab::run_in(
            &lab.vps,
            &[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                "2001:db8:100::1",
            ],
        );
        for dst in ["198.51.100.10:32400", "[2001:db8:100::10]:32400"] {
            let src = if dst.starts_with('[') {
                "2001:db8:2::5"
            } else {
                "192.0.2.5"
            };
            let c = lab
                .connect_within(ip(src), sa(dst), Duration::from_millis(500))
                .and_then(|mut c| Lab::ask(&mut c, "x"));
            assert!(c.is_none(), "{dst} answered with the TUN gone");
        }
        assert!(
            Lab::ask(&mut running, "after").is_none(),
            "the running stream was answered with the TUN gone"
        );
        Lab::in_ns(&lab.viewer, || {
            let s = std::net::UdpSocket::bind("192.0.2.5:0").unwrap();
            for _ in 0..5 {
                s.send_to(b"x", "198.51.100.10:5000").unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let listed = Lab::run_in(&lab.viewer, &["nft", "list", "table", "inet", "watch"]);
        let leaked: Vec<&str> = listed
            .lines()
            .filter(|l| l.contains("counter packets") && !l.contains("packets 0 "))
            .collect();
        assert!(leaked.is_empty(), "DNATed packets left the VPS: {leaked:?}");
    }
}
