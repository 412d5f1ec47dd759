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
//! By topic:
//! - here: the config ([`NftConfig`], [`PortSpec`]), [`DenyReason`] and the deny meters' names,
//!   carried-over [`Ban`]s, and [`plan`] (which rules get installed);
//! - `ruleset.rs`: [`ruleset`], one function per part of the table, in the order of the layout
//!   below; `edge.rs`: edge protection (`edge_in`);
//! - `build.rs`: expression and statement builders, the batch builder, and [`Batch`] with the
//!   fixes nft needs on serialization;
//! - `run.rs`: running `nft` and `conntrack` ([`Exec`], [`apply`], reading sets, bans, deny
//!   counts and DNAT targets back, [`cleanup`]); `sysctl.rs`: [`enable_forwarding`] and
//!   [`restore_sysctls`].
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
//!   to and from the TUN, accept connections marked `ct mark` `CT_MARK` (what this node
//!   forwards as an approved exit node or to its approved routes, see
//!   `homeport_node::routes_sync`), drop everything else that enters or leaves through the TUN
//!   (no node may use the exit as a general gateway unless the admin approved it as an exit
//!   node and the policy lets it, and nothing public reaches the mesh un-published).
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

mod build;
mod edge;
#[cfg(test)]
mod lab_attacks;
mod ruleset;
mod run;
mod sysctl;
#[cfg(test)]
pub(crate) mod tests;

use build::*;
pub use build::{Batch, removal};
use edge::edge;
pub use ruleset::{ruleset, ruleset_geo};
pub use run::*;
pub use sysctl::*;

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
    /// A country rule (`--country` / `--deny-country`) refused the source.
    Country,
}

impl DenyReason {
    pub const ALL: [DenyReason; 5] = [
        DenyReason::NotInAllowList,
        DenyReason::Rate,
        DenyReason::MaxConns,
        DenyReason::Banned,
        DenyReason::Country,
    ];
    /// The verdict as written in the audit log and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NotInAllowList => "not-in-allow-list",
            DenyReason::Rate => "rate",
            DenyReason::MaxConns => "max-conns",
            DenyReason::Banned => "banned",
            DenyReason::Country => "country",
        }
    }
    /// The short token used in chain and meter names.
    fn token(self) -> &'static str {
        match self {
            DenyReason::NotInAllowList => "allow",
            DenyReason::Rate => "rate",
            DenyReason::MaxConns => "conns",
            DenyReason::Banned => "banned",
            DenyReason::Country => "country",
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
    plan_geo(cfg, rules, false)
}

/// [`plan`], where `have_geo` says whether a country database is loaded: without one a rule
/// with country guards is not installed at all (its port stays closed: failing closed).
pub fn plan_geo<'r>(
    cfg: &NftConfig,
    rules: &'r [PublishRule],
    have_geo: bool,
) -> (Vec<&'r PublishRule>, Vec<Skipped>) {
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
        if r.guards.needs_countries() && !have_geo {
            skipped.push(Skipped {
                id: r.id,
                why: format!(
                    "{spec} has country rules and this exit has no country database (its port stays closed); {}",
                    crate::geo::COUNTRY_DB_HINT
                ),
            });
            continue;
        }
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
