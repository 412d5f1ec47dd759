//! The sans-IO mesh engine: WireGuard sessions (boringtun `Tunn` per peer), routing by
//! destination, handshake routing, allowed-source enforcement, the packet filter, publish
//! admission and the flow table that sends a published flow's replies back through its exit.
//!
//! Nothing here touches a socket, a TUN device or a clock: time is passed in, packets come in as
//! byte slices and leave as byte slices written into caller-owned buffers or the transmit queue.
//!
//! Driving contract (what the IO shell does; docs/architecture.md has the whole picture):
//! - a packet read from the TUN → [`Engine::encapsulate`]; send what it returns on the UDP socket;
//! - a datagram from the UDP socket → [`Engine::decapsulate`] (WireGuard), [`Engine::handle_disco`]
//!   or [`Engine::handle_relay`]; write [`Decap::ToTun`] packets to the TUN;
//! - after each batch → [`Engine::flush_transmits`]: the engine's own datagrams (handshakes,
//!   answers, probes, openers with their TTL, relay BINDs), and [`Engine::poll_event`];
//! - at [`Engine::poll_timeout`] → [`Engine::handle_timeout`] (boringtun timers, probes, BINDs);
//! - a new map → [`Engine::apply_map`] (peers added, removed, re-keyed, filter, publish rules).
//!
//! It reads no clock and draws no randomness of its own: [`Engine::new`] takes the time and a
//! CSPRNG seed.
//!
//! The peer table is copy-on-write: the data path takes one [`Arc<PeerTable>`] snapshot per batch,
//! so a map change never blocks it and a removed peer's packets stop at the next batch.

mod devices;
pub use devices::DNS_PORT;
pub mod disco;
pub mod filter;
pub mod flows;
pub mod frag;
pub mod packet;
pub mod transmit;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use filter::{CompiledFilter, FlowKey, FlowTable};
/// What counts as a public address is decided once, in proto (re-exported for the node's modules).
pub use homeport_proto::addr::is_public;
use homeport_proto::map::{EndpointKind, MeshAddrs, NetworkMap};
use homeport_proto::publish::PublishProto;
use homeport_proto::{NodeId, NodeName, PrivateKey, PublicKey};
use packet::PacketInfo;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use transmit::TxQueue;
pub use transmit::{MAX_TRANSMIT, Transmit};

/// How often [`Engine::handle_timeout`] runs boringtun's timers, which have 1 s resolution at
/// best (rekey 120 s, keepalive 10 s, handshake retry 5 s); 250 ms keeps their error small.
pub const TICK: Duration = Duration::from_millis(250);

/// Persistent keepalive for every peer: keeps NAT mappings open (typical UDP NAT timeouts are
/// 30-120 s) so the exit can reach a home node behind CGNAT at any time.
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;

/// While no authenticated packet arrived from a peer for this long, handshake initiations go
/// to every candidate address, not only the current endpoint: the first that answers wins.
pub const ENDPOINT_STALE: Duration = Duration::from_secs(15);

/// While no direct path is confirmed, probes go out this often for [`SEARCH_FAST_FOR`] after
/// something changed (new peer, new candidates, a peer's probe): NAT mappings open within one
/// round trip once both sides probe, so fast probing finds the path in about a second.
pub const PROBE_SEARCH: Duration = Duration::from_secs(1);
pub const SEARCH_FAST_FOR: Duration = Duration::from_secs(10);
/// Otherwise paths are re-probed this often: finds a better path, keeps NAT mappings warm
/// (shortest common UDP NAT timeout is 30 s) and notices a dead path quickly.
pub const PROBE_KEEP: Duration = Duration::from_secs(2);
/// A direct path with no Pong or authenticated packet for this long is dead (two lost probes
/// plus slack) even when nothing is sent on it; traffic moves to the relay then.
pub const DIRECT_TTL: Duration = Duration::from_millis(4500);
/// While we send on a direct path and hear nothing back for this long, the path is suspect and
/// probed every tick. A live peer answers within a round trip: TCP acknowledgements, replies, or
/// at least the Pongs (a saturated uplink delays our probes, never the peer's answers to data).
pub const SUSPECT_AFTER: Duration = Duration::from_secs(1);
/// A suspect path with no Pong or packet for this long (four probe rounds) is dead: a NAT that
/// lost its mapping costs a running stream about two seconds before the relay carries it.
pub const SUSPECT_GRACE: Duration = Duration::from_secs(1);
/// Before the first full-TTL probe of an attempt, low-TTL "openers" go out this long: they open
/// our own NATs towards the peer's candidates but die before the peer's NAT. A full packet that
/// reaches a Linux NAT before that NAT's own outbound packet leaves a conntrack entry there that
/// forces the peer's mapping to another port ("conntrack clash"), so openers go first.
pub const OPEN_FIRST: Duration = Duration::from_millis(400);
/// After an attempt that found no direct path, full probes pause this long so any stale
/// conntrack entries our probes left at the peer's NAT expire (Linux unreplied UDP: 30 s).
pub const PROBE_QUIET: Duration = Duration::from_secs(35);
/// An attempt to get back a direct path that worked from this socket is given up after this
/// long (instead of [`SEARCH_FAST_FOR`]): both NATs were open to each other moments ago, so when
/// both sides probe a Pong comes back within a round trip. Four probe rounds without one mean
/// stale NAT state pins the path, and only a fresh port helps ([`REBIND_MIN_EVERY`]).
pub const LOST_PATH_ATTEMPT: Duration = Duration::from_secs(4);
/// A node behind NAT moves its WireGuard socket to a fresh port at most this often. Moving is
/// how a lost direct path is recovered when stale NAT state pins it (see [`Engine::take_rebind`]);
/// it also breaks every other peer's direct path for a moment, so it must stay rare. A minute is
/// longer than Linux's unreplied-UDP conntrack timeout (30 s): a second move within it would
/// not find cleaner NAT state than the first.
pub const REBIND_MIN_EVERY: Duration = Duration::from_secs(60);
/// After asking the daemon to move the socket, punching towards that peer pauses this long so
/// the attempt restarts from the new port, not the old one (the daemon moves it when the
/// `RebindWanted` event reaches it, normally at once).
pub const REBIND_WAIT: Duration = Duration::from_secs(3);
/// At start, while a relay is configured but not bound yet, nothing goes to a peer's public
/// addresses for up to this long (the relay answers within a round trip): an early handshake
/// sent straight at a peer's NAT before the peer opened it spoils that NAT for the punching
/// that follows. After this, a relay that never answers is not waited for.
pub const RELAY_WAIT: Duration = Duration::from_secs(2);
/// `open_ttl` value while the NAT depth is not measured yet.
pub const TTL_UNKNOWN: u8 = 255;

/// Candidates probed per peer at most (bounds work and what a peer's map can make us send).
const MAX_CANDIDATES: usize = 8;

/// Handshake initiations per second the rate limiter allows before asking for cookies.
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Why a packet was dropped (counted, and logged at TRACE).
#[derive(Debug)]
pub enum DropReason {
    Malformed,
    NoRoute,
    UnknownPeer,
    SourceNotAllowed,
    Filtered,
    NotForThisNode,
    WireGuard(WireGuardError),
}

/// Result of [`Engine::encapsulate`].
#[derive(Debug)]
pub enum Encap {
    /// Send `out[..len]` to `to`.
    Send {
        to: SocketAddr,
        len: usize,
    },
    /// The packet waits inside the peer's session until its handshake completes; the handshake
    /// initiation went to the transmit queue ([`Engine::poll_transmit`]).
    Queued,
    Drop(DropReason),
}

/// Something the IO shell acts on, from [`Engine::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A Pong answered one of our Pings (`homeport ping`, probes): who, on which path, how fast.
    Pong {
        peer: NodeId,
        from: SocketAddr,
        rtt: Duration,
        via_relay: bool,
    },
    /// Move the WireGuard socket to a fresh port: confirm with [`Engine::take_rebind`] (the path
    /// may have come back meanwhile), then call [`Engine::rebound`].
    RebindWanted,
    /// The relay has not answered over UDP for three BINDs: start the TCP/TLS fallback. Repeats
    /// with every further unanswered BIND.
    RelayUdpFailing { relay: SocketAddr },
}

/// Events waiting for the shell at most; older ones are dropped first (each is also visible as
/// state: `last_pong`, `take_rebind`, `relay_udp_failing`).
const MAX_EVENTS: usize = 64;

/// Result of [`Engine::decapsulate`].
#[derive(Debug)]
pub enum Decap {
    /// Write `out[..len]` to the TUN.
    ToTun {
        len: usize,
    },
    /// Nothing for the TUN (handshake, keepalive, cookie).
    Done,
    /// A packet forwarded between a plain device and the mesh (see `devices.rs`), encrypted for
    /// its next hop: send `out[..len]` to `to`. `out` needs room for a relay header beyond the
    /// received datagram.
    Forward {
        to: SocketAddr,
        len: usize,
    },
    Drop(DropReason),
}

/// A path a peer's packets take.
#[derive(Debug, Clone, Default)]
pub struct PathState {
    /// Where packets go now: the best confirmed direct path, else the source of the last
    /// authenticated packet, else the first candidate.
    pub endpoint: Option<SocketAddr>,
    /// When an authenticated WireGuard packet last arrived from `endpoint`.
    pub last_rx: Option<Instant>,
    /// Candidates from the map and learned from the peer's probes, best first.
    pub candidates: Vec<SocketAddr>,
    /// The direct path confirmed by a Pong: (address, round-trip time, when confirmed).
    pub direct: Option<(SocketAddr, Duration, Instant)>,
    /// Pings in flight: (address, transaction id, sent).
    pending: Vec<(SocketAddr, [u8; 12], Instant)>,
    next_probe: Option<Instant>,
    /// When a packet from this peer last arrived through the relay.
    pub relay_rx: Option<Instant>,
    /// When we last sent data on the direct path.
    last_tx: Option<Instant>,
    /// Since when we send on the direct path and hear nothing ([`SUSPECT_AFTER`]).
    suspect_since: Option<Instant>,
    /// The last Pong: (from, round-trip time, when, through the relay).
    pub last_pong: Option<(SocketAddr, Duration, Instant, bool)>,
    /// Our address as this peer saw it in its last Pong (our NAT mapping towards it).
    pub observed: Option<SocketAddr>,
    /// Fast probing lasts until then.
    search_until: Option<Instant>,
    /// Where hole punching towards the peer stands.
    pub punch: Punch,
    /// The peer asked us (through the coordinator) to probe, or we asked it: it is sending its
    /// own openers now.
    peer_searching_until: Option<Instant>,
    /// The peer's last Ready: the addresses it had just opened its NAT towards, and when it
    /// arrived. Once a peer has sent one, full probes go to it only when our own address is
    /// among them (see `homeport_proto::disco`).
    peer_opened: Option<(disco::Opened, Instant)>,
    /// A direct path to this peer was confirmed since our socket was bound: if a later attempt
    /// fails, our NAT state (not the peers' NAT types) is the likely cause.
    direct_worked: bool,
}

/// Where hole punching towards one peer stands. Punching runs only while a NAT is in front of us
/// and no direct path is alive; see [`Engine`]'s probe logic for the moves between states.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Punch {
    /// No attempt runs: nothing needed one yet, a direct path is alive, or the socket moved.
    #[default]
    Idle,
    /// An attempt runs since `since`: low-TTL openers to the peer's public candidates first; full
    /// probes to a candidate once our opener went there [`OPEN_FIRST`] ago (or the peer's Ready
    /// says it opened towards us). It gives up after [`SEARCH_FAST_FOR`] ([`LOST_PATH_ATTEMPT`]
    /// when a direct path worked from this socket and a move is possible).
    Punching {
        since: Instant,
        /// When the first opener of this attempt went to each candidate.
        opened: Vec<(SocketAddr, Instant)>,
    },
    /// The last attempt failed: nothing at all goes to the peer's public candidates until
    /// `until`, openers included, so stale NAT state on both sides expires.
    Quiet { until: Instant, why: QuietReason },
}

/// Why punching towards a peer is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuietReason {
    /// The attempt found no path: [`PROBE_QUIET`], longer than Linux's unreplied-UDP timeout.
    Failed,
    /// The socket is about to move to a fresh port: [`REBIND_WAIT`], then start from the new one.
    Rebinding,
}

impl Punch {
    fn started(now: Instant) -> Punch {
        Punch::Punching {
            since: now,
            opened: Vec::new(),
        }
    }

    /// In quiet time at `now`.
    pub fn quiet(&self, now: Instant) -> bool {
        matches!(self, Punch::Quiet { until, .. } if now < *until)
    }

    /// An attempt runs, or quiet time forbids one.
    fn running(&self, now: Instant) -> bool {
        matches!(self, Punch::Punching { .. }) || self.quiet(now)
    }

    /// When the running attempt started.
    pub fn started_at(&self) -> Option<Instant> {
        match self {
            Punch::Punching { since, .. } => Some(*since),
            _ => None,
        }
    }

    /// Records the first opener of this attempt towards `to`.
    fn opened_towards(&mut self, to: SocketAddr, now: Instant) {
        if let Punch::Punching { opened, .. } = self
            && !opened.iter().any(|(a, _)| *a == to)
            && opened.len() < MAX_CANDIDATES * 2
        {
            opened.push((to, now));
        }
    }

    /// How long ago this attempt's first opener went to `to` (None: none did).
    fn opened_since(&self, to: &SocketAddr, now: Instant) -> Option<Duration> {
        match self {
            Punch::Punching { opened, .. } => opened
                .iter()
                .find(|(a, _)| a == to)
                .map(|(_, t)| now.saturating_duration_since(*t)),
            _ => None,
        }
    }
}

/// How a peer is reached now, as `homeport status` and the dashboard show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// No path yet: no live direct path, and no relay allocation.
    None,
    /// Direct UDP to this address.
    Direct(SocketAddr),
    /// Through the relay, for this reason.
    Relay(RelayReason),
}

/// Why a peer is relayed rather than reached directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayReason {
    /// UDP to the relay itself is blocked; frames go over the TCP/TLS fallback.
    OverTcp,
    /// The peer reported no direct candidates.
    NoCandidates,
    /// A direct path was confirmed, then stopped answering.
    DirectStopped,
    /// None of this many candidates answered probes.
    NoneAnswered(usize),
}

impl std::fmt::Display for RelayReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayReason::OverTcp => f.write_str(
                "UDP to the relay is blocked here: relayed over TCP/TLS to the coordinator",
            ),
            RelayReason::NoCandidates => f.write_str("the peer reported no direct candidates"),
            RelayReason::DirectStopped => f.write_str("the direct path stopped answering"),
            RelayReason::NoneAnswered(n) => write!(
                f,
                "none of {n} direct candidates answered probes (hard NAT or firewall)"
            ),
        }
    }
}

impl PathState {
    /// A direct path is in use and alive.
    /// How the peer is reached at `now`: direct while that path is alive, else through the
    /// relay when we hold an allocation (`relay_bound`), `over_tcp` when the relay is reached
    /// through its TCP/TLS fallback.
    pub fn route(&self, now: Instant, relay_bound: bool, over_tcp: bool) -> Route {
        match self.endpoint {
            Some(addr) if self.direct_alive(now) => Route::Direct(addr),
            _ if !relay_bound => Route::None,
            _ if over_tcp => Route::Relay(RelayReason::OverTcp),
            _ if self.candidates.is_empty() => Route::Relay(RelayReason::NoCandidates),
            _ if self.direct.is_some() => Route::Relay(RelayReason::DirectStopped),
            _ => Route::Relay(RelayReason::NoneAnswered(self.candidates.len())),
        }
    }

    pub fn direct_alive(&self, now: Instant) -> bool {
        let Some(heard) = self.heard() else {
            return false;
        };
        if now.saturating_duration_since(heard) >= DIRECT_TTL {
            return false;
        }
        if self
            .suspect_since
            .is_some_and(|s| now.saturating_duration_since(s) >= SUSPECT_GRACE)
        {
            return false;
        }
        // The peer sends through the relay: it lost the direct path (its side of a NAT change
        // shows first there); answer the same way until it is heard directly again.
        self.relay_rx.is_none_or(|r| r <= heard)
    }

    /// When the peer was last heard on the direct path (a Pong or an authenticated packet).
    fn heard(&self) -> Option<Instant> {
        let pong = self.direct.map(|(_, _, t)| t);
        match (pong, self.last_rx) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// A direct path in use is suspect when we keep sending on it and hear nothing back.
    fn check_suspect(&mut self, now: Instant) -> bool {
        let sending = self
            .last_tx
            .is_some_and(|t| now.saturating_duration_since(t) < SUSPECT_AFTER);
        let silent = self
            .heard()
            .is_some_and(|h| now.saturating_duration_since(h) >= SUSPECT_AFTER);
        if self.suspect_since.is_none() && sending && silent && self.direct_alive(now) {
            self.suspect_since = Some(now);
        }
        self.suspect_since.is_some() && self.direct_alive(now)
    }

    fn add_candidate(&mut self, a: SocketAddr) -> bool {
        if self.candidates.contains(&a) {
            return false;
        }
        if self.candidates.len() >= MAX_CANDIDATES {
            self.candidates.pop();
        }
        self.candidates.push(a);
        true
    }

    /// Starts a punching attempt unless one runs already (an attempt ends by success or by its
    /// quiet time).
    fn begin_attempt(&mut self, now: Instant) {
        if !self.punch.running(now) {
            self.punch = Punch::started(now);
        }
    }

    /// A new public address of the peer ends our quiet time at once: the quiet time lets stale
    /// NAT state about the peer's *old* addresses expire, and none of it concerns a new one.
    fn end_quiet(&mut self, now: Instant) {
        if self.punch.quiet(now) {
            self.punch = Punch::Idle;
        }
    }

    /// Starts fast probing now.
    fn search(&mut self, now: Instant) {
        self.search_until = Some(now + SEARCH_FAST_FOR);
        self.next_probe = Some(now);
    }
}

/// One peer: its WireGuard session and path. Shared by the data path threads.
pub struct PeerState {
    pub id: NodeId,
    pub name: NodeName,
    pub key: PublicKey,
    pub addrs: MeshAddrs,
    pub online: bool,
    /// A plain-WireGuard device this node is the via of: no disco, no relay, its endpoint is
    /// where its packets come from, and its filter is ours to enforce.
    pub device: bool,
    /// Our local index for this peer (boringtun receiver indexes are `index << 8 | n`).
    pub index: u32,
    disco: ring::aead::LessSafeKey,
    tunn: Mutex<Tunn>,
    pub path: Mutex<PathState>,
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub handshakes: AtomicU64,
    pub dropped: AtomicU64,
    /// Initiate a handshake at the next tick without waiting for traffic: a node that (re)starts
    /// makes its peers drop their stale sessions at once, and a node behind NAT opens the way
    /// for the exit before the first viewer arrives.
    eager: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerState")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("index", &self.index)
            .finish()
    }
}

impl PeerState {
    /// Where a handshake initiation goes: the endpoint, plus every candidate while the endpoint
    /// is not confirmed by a recent authenticated packet.
    pub fn handshake_targets(&self, now: Instant) -> Vec<SocketAddr> {
        let p = self.path.lock().unwrap();
        let fresh = p
            .last_rx
            .is_some_and(|t| now.saturating_duration_since(t) < ENDPOINT_STALE);
        let mut v = Vec::with_capacity(p.candidates.len() + 1);
        if let Some(e) = p.endpoint {
            v.push(e);
        }
        if !fresh {
            for c in &p.candidates {
                if !v.contains(c) {
                    v.push(*c);
                }
            }
        }
        v
    }

    fn endpoint(&self) -> Option<SocketAddr> {
        self.path.lock().unwrap().endpoint
    }

    /// Records an authenticated packet from `from` (WireGuard roaming: the last authenticated
    /// source is where replies go; a changed NAT mapping is followed at once).
    fn saw(&self, from: SocketAddr, now: Instant) {
        let mut p = self.path.lock().unwrap();
        if p.endpoint != Some(from) {
            tracing::debug!(peer = %self.name, %from, "endpoint changed");
            p.endpoint = Some(from);
            p.add_candidate(from);
        }
        p.last_rx = Some(now);
        p.suspect_since = None;
    }

    /// Seconds since the last handshake, bytes (rx, tx).
    pub fn stats(&self) -> (Option<Duration>, u64, u64) {
        let t = self.tunn.lock().unwrap();
        let (hs, _, _, _, _) = t.stats();
        (
            hs,
            self.rx_bytes.load(Ordering::Relaxed),
            self.tx_bytes.load(Ordering::Relaxed),
        )
    }
}

/// A publish rule as the engine needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishAdmit {
    /// The other side: the exit (for rules we are target of) or the target (rules we are exit of).
    pub peer: NodeId,
    pub proto: u8,
    pub target_port: u16,
}

/// An immutable snapshot of the peers and rules; replaced as a whole on every map change.
#[derive(Default)]
pub struct PeerTable {
    pub self_addrs: Option<MeshAddrs>,
    pub peers: Vec<Arc<PeerState>>,
    by_v4: HashMap<Ipv4Addr, usize>,
    by_v6: HashMap<Ipv6Addr, usize>,
    by_index: HashMap<u32, usize>,
    by_key: HashMap<[u8; 32], usize>,
    by_id: HashMap<NodeId, usize>,
    filter: CompiledFilter,
    /// Rules this node is the target of: public sources admitted from `peer` (the exit).
    publish_in: Vec<PublishAdmit>,
    /// Rules this node is the exit of: replies from `peer` (the target) to public addresses.
    publish_out: Vec<PublishAdmit>,
    /// The mesh's address ranges: never a public source, whoever claims them.
    mesh_prefixes: Option<(ipnet::Ipv4Net, ipnet::Ipv6Net)>,
    /// Peers' approved subnet routes (default routes excluded), longest prefix first: where
    /// packets to those ranges go, and the one peer a source in them is accepted from.
    routes: Vec<(ipnet::IpNet, usize)>,
    /// Per peer (same index as `peers`): its approved routes, default routes included.
    pub peer_routes: Vec<Vec<ipnet::IpNet>>,
    /// Our own approved routes: the only non-mesh destinations we forward to.
    self_routes: Vec<ipnet::IpNet>,
    /// The inbound filters of our devices, which we enforce for them.
    device_filters: HashMap<NodeId, CompiledFilter>,
}

impl PeerTable {
    pub fn peer_for_dst(&self, dst: IpAddr) -> Option<&Arc<PeerState>> {
        let i = match dst {
            IpAddr::V4(a) => self.by_v4.get(&a),
            IpAddr::V6(a) => self.by_v6.get(&a),
        }?;
        Some(&self.peers[*i])
    }
    pub fn peer_by_id(&self, id: NodeId) -> Option<&Arc<PeerState>> {
        self.by_id.get(&id).map(|i| &self.peers[*i])
    }
    fn is_self(&self, ip: IpAddr) -> bool {
        self.self_addrs.is_some_and(|a| a.contains(ip))
    }
    /// The peer whose approved subnet route holds `ip` (longest prefix wins).
    pub fn route_for(&self, ip: IpAddr) -> Option<&Arc<PeerState>> {
        self.routes
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .map(|(_, i)| &self.peers[*i])
    }
    /// True when peer `id` is an approved exit for `ip`'s family.
    fn is_exit_for(&self, id: NodeId, ip: IpAddr) -> bool {
        self.by_id.get(&id).is_some_and(|&i| {
            self.peer_routes[i]
                .iter()
                .any(|n| homeport_proto::routes::is_default(n) && n.contains(&ip))
        })
    }
    /// We forward to `ip`: one of our approved routes holds it, and it is no mesh address.
    fn forwards_to(&self, ip: IpAddr) -> bool {
        self.self_routes.iter().any(|n| n.contains(&ip)) && !self.in_mesh(ip)
    }
    /// `ip` is `peer`'s own address, or a device's reached through it (WireGuard's allowed IPs).
    fn sends_as(&self, peer: &PeerState, ip: IpAddr) -> bool {
        peer.addrs.contains(ip) || self.peer_for_dst(ip).is_some_and(|p| p.id == peer.id)
    }
    /// In the mesh's ranges (assigned to a node or not), or any node's address.
    fn in_mesh(&self, ip: IpAddr) -> bool {
        let in_prefix = self.mesh_prefixes.is_some_and(|(v4, v6)| match ip {
            IpAddr::V4(a) => v4.contains(&a),
            IpAddr::V6(a) => v6.contains(&a),
        });
        in_prefix || is_mesh(self, ip)
    }
}

/// The UDP relay this node is bound to (from the map's relay list).
pub struct RelayClient {
    pub addr: SocketAddr,
    key: [u8; 32],
    mac: ring::hmac::Key,
    last_bind: Option<Instant>,
    /// When the relay last confirmed our binding.
    pub bound: Option<Instant>,
    /// BIND → BOUND round-trip time.
    pub rtt: Option<Duration>,
    /// BINDs sent since the last BOUND.
    unanswered: u32,
    /// Our socket moved: BIND at the next tick, before the relay's binding goes stale.
    rebind_now: bool,
}

/// The relay binding is refreshed this often: the relay forgets bindings after 60 s, NAT
/// mappings towards it must not time out (30 s is the shortest common UDP timeout), and when
/// our NAT gives us a new mapping the relay must learn it by the time a stream's peer finds
/// the direct path dead ([`SUSPECT_AFTER`] + [`SUSPECT_GRACE`]) and turns to the relay.
pub const RELAY_REBIND: Duration = Duration::from_secs(2);
/// A binding not confirmed for this long is not used.
pub const RELAY_TTL: Duration = Duration::from_secs(60);

/// Whether and when the IO shell should move the WireGuard socket to a fresh port.
#[derive(Debug, Default)]
struct Rebind {
    /// The port is ours to change (not fixed by `--listen-port`) and a NAT is in front of us.
    allowed: bool,
    /// Asked for because of the path to this peer.
    wanted: Option<NodeId>,
    last: Option<Instant>,
}

pub struct Engine {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    rate_limiter: Arc<RateLimiter>,
    table: RwLock<Arc<PeerTable>>,
    next_index: AtomicU32,
    /// Published flows this node is the target of: public (proto, ip, port, our port) → exit.
    pub flows: flows::PublishedFlows,
    /// Fragmented datagrams whose first fragment was admitted.
    frags: frag::Fragments,
    /// Handshake initiations answered with a cookie reply (under load).
    cookies: AtomicU64,
    /// UDP flows this node opened towards peers, so their replies pass a restrictive filter.
    udp_out: FlowTable,
    /// UDP flows our devices opened, so the answers pass their filters.
    device_udp: FlowTable,
    last_reset: Mutex<Option<Instant>>,
    relay: Mutex<Option<RelayClient>>,
    /// TTL of opener packets: hops to just past our outermost NAT. 0 = no NAT in front of us,
    /// [`TTL_UNKNOWN`] = not measured yet.
    open_ttl: std::sync::atomic::AtomicU8,
    /// The engine's own datagrams (handshakes, answers, probes, openers, BINDs) in the order
    /// they must leave: a Ready that tells a peer what we just opened follows the openers.
    tx: Mutex<TxQueue>,
    /// Datagrams in `tx`, readable without its lock (the data path checks it every batch).
    tx_len: AtomicU32,
    /// Held while one caller drains `tx`, so two threads flushing at once keep the order.
    flushing: Mutex<()>,
    /// Events for the shell, oldest first ([`MAX_EVENTS`] at most).
    events: Mutex<std::collections::VecDeque<Event>>,
    /// When [`Engine::handle_timeout`] last ran boringtun's timers.
    last_timers: Mutex<Option<Instant>>,
    /// Our reflexive address (from STUN, through the WireGuard socket), for Ready messages and
    /// to know whether a peer opened towards us.
    reflexive: Mutex<Option<SocketAddr>>,
    /// When the engine was created (the relay wait counts from then).
    started: Instant,
    rebind: Mutex<Rebind>,
    /// Maps `Instant`s to unix time for relay bindings: (an instant, unix milliseconds then).
    clock_base: (Instant, u64),
    /// Transaction ids and disco nonces: a CSPRNG seeded by the caller (the OS in the daemon, a
    /// fixed seed in tests, so runs repeat exactly).
    rng: Mutex<rand::rngs::StdRng>,
    /// The peer this node sends its internet traffic to (`homeport up --exit-node`); 0: none.
    exit_node: std::sync::atomic::AtomicI64,
}

impl Engine {
    /// A new engine. It reads no clock and draws no randomness of its own: `now` and `unix_ms`
    /// (the same moment as unix milliseconds, for relay bindings) anchor its time, and `seed`
    /// seeds its CSPRNG (the daemon takes it from the OS; tests fix it).
    pub fn new(key: &PrivateKey, now: Instant, unix_ms: u64, seed: [u8; 32]) -> Engine {
        let secret = key.secret().clone();
        let public = x25519::PublicKey::from(&secret);
        Engine {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            table: RwLock::new(Arc::new(PeerTable::default())),
            next_index: AtomicU32::new(1),
            flows: flows::PublishedFlows::new(filter::PUBLISH_FLOW_CAP),
            frags: frag::Fragments::new(),
            cookies: AtomicU64::new(0),
            udp_out: FlowTable::new(filter::UDP_FLOW_CAP),
            device_udp: FlowTable::new(filter::UDP_FLOW_CAP),
            last_reset: Mutex::new(None),
            relay: Mutex::new(None),
            open_ttl: std::sync::atomic::AtomicU8::new(TTL_UNKNOWN),
            tx: Mutex::new(TxQueue::new()),
            tx_len: AtomicU32::new(0),
            flushing: Mutex::new(()),
            last_timers: Mutex::new(None),
            events: Mutex::new(std::collections::VecDeque::with_capacity(MAX_EVENTS)),
            reflexive: Mutex::new(None),
            started: now,
            rebind: Mutex::new(Rebind::default()),
            clock_base: (now, unix_ms),
            rng: Mutex::new(rand::SeedableRng::from_seed(seed)),
            exit_node: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Queues a datagram for the IO shell.
    fn send(&self, to: SocketAddr, data: &[u8]) {
        self.queue(to, None, data);
    }

    fn queue(&self, to: SocketAddr, ttl: Option<u8>, data: &[u8]) {
        let mut q = self.tx.lock().unwrap();
        q.push(to, ttl, data);
        self.tx_len.store(q.len() as u32, Ordering::Release);
    }

    /// Whether datagrams wait in the transmit queue (no lock: cheap enough for every batch).
    pub fn has_transmit(&self) -> bool {
        self.tx_len.load(Ordering::Acquire) != 0
    }

    /// The oldest datagram the engine wants sent, copied into `out` ([`MAX_TRANSMIT`] bytes).
    pub fn poll_transmit(&self, out: &mut [u8]) -> Option<Transmit> {
        let mut q = self.tx.lock().unwrap();
        let t = q.pop(out);
        self.tx_len.store(q.len() as u32, Ordering::Release);
        t
    }

    /// Hands every queued datagram to `send`, oldest first. Callers on several threads may
    /// flush at once: one drains, so datagrams leave in queue order.
    pub fn flush_transmits(&self, mut send: impl FnMut(Transmit, &[u8])) {
        while self.has_transmit() {
            // Another thread drains: it sends ours too, and looks again once it lets go, so
            // nothing queued before our look is left behind (and no data path thread ever
            // waits behind the low-priority handshake thread).
            let Ok(_one) = self.flushing.try_lock() else {
                return;
            };
            let mut buf = [0u8; MAX_TRANSMIT];
            while let Some(t) = self.poll_transmit(&mut buf) {
                send(t, &buf[..t.len]);
            }
        }
    }

    /// The oldest event the shell has not taken yet.
    pub fn poll_event(&self) -> Option<Event> {
        self.events.lock().unwrap().pop_front()
    }

    fn event(&self, e: Event) {
        let mut q = self.events.lock().unwrap();
        if q.len() == MAX_EVENTS {
            q.pop_front();
        }
        q.push_back(e);
    }

    /// Datagrams dropped because the transmit queue was full.
    pub fn transmits_dropped(&self) -> u64 {
        self.tx.lock().unwrap().dropped
    }

    /// When the engine next needs [`Engine::handle_timeout`]: boringtun's timers every [`TICK`],
    /// sooner when a peer's next probe (an opener wait, a suspect path) is due before that.
    pub fn poll_timeout(&self) -> Instant {
        let timers = self.last_timers.lock().unwrap().map(|t| t + TICK);
        let mut next = timers.unwrap_or(self.started);
        for peer in self.snapshot().peers.iter().filter(|p| !p.device) {
            if let Some(p) = peer.path.lock().unwrap().next_probe {
                next = next.min(p);
            }
        }
        next
    }

    /// 96 fresh bits from the engine's CSPRNG (transaction ids, disco nonces).
    fn random12(&self) -> [u8; 12] {
        rand::Rng::r#gen(&mut *self.rng.lock().unwrap())
    }

    /// Handshake initiations answered with a cookie reply so far.
    pub fn cookies_sent(&self) -> u64 {
        self.cookies.load(Ordering::Relaxed)
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(self.public)
    }

    /// Chooses the exit node: packets to addresses no peer owns go to it (when the map says it
    /// is an approved exit), and sources on the internet are accepted from it. None: no exit;
    /// such packets are dropped, and internet sources are accepted from no peer.
    pub fn set_exit_node(&self, peer: Option<NodeId>) {
        self.exit_node
            .store(peer.map_or(0, |p| p.0), Ordering::Relaxed);
    }

    pub fn exit_node(&self) -> Option<NodeId> {
        match self.exit_node.load(Ordering::Relaxed) {
            0 => None,
            id => Some(NodeId(id)),
        }
    }

    /// The peer `ip` goes to as the internet through our exit node, if one is chosen and the
    /// map makes it an exit for that family.
    fn via_exit<'t>(&self, t: &'t PeerTable, ip: IpAddr) -> Option<&'t Arc<PeerState>> {
        let id = self.exit_node()?;
        if t.in_mesh(ip) || !t.is_exit_for(id, ip) {
            return None;
        }
        t.peer_by_id(id)
    }

    /// The one peer a packet from `src` (not a mesh address) may come from: the owner of the
    /// subnet route that holds it, else our exit node.
    fn source_owner<'t>(&self, t: &'t PeerTable, src: IpAddr) -> Option<&'t Arc<PeerState>> {
        if t.in_mesh(src) {
            return None;
        }
        t.route_for(src).or_else(|| self.via_exit(t, src))
    }

    /// The current peer table. The data path takes one per batch.
    pub fn snapshot(&self) -> Arc<PeerTable> {
        self.table.read().unwrap().clone()
    }

    /// Applies a network map: builds a new peer table, keeping the sessions of peers whose key
    /// and addresses did not change. Peers no longer in the map lose their sessions at once.
    pub fn apply_map(&self, map: &NetworkMap, now: Instant) {
        let old = self.snapshot();
        let me = map.self_node.id;
        let mut t = PeerTable {
            self_addrs: Some(map.self_node.addrs),
            mesh_prefixes: Some((map.self_node.prefix_v4, map.self_node.prefix_v6)),
            filter: CompiledFilter::compile(&map.filter),
            self_routes: map.self_node.routes.clone(),
            device_filters: map
                .device_filters
                .iter()
                .map(|d| (d.device, CompiledFilter::compile(&d.filter)))
                .collect(),
            ..Default::default()
        };
        // Devices reached through other nodes: routed to those nodes once they are in the table.
        let mut routed: Vec<(MeshAddrs, NodeId)> = Vec::new();
        for r in &map.publish {
            let proto = match r.proto {
                PublishProto::Tcp => packet::PROTO_TCP,
                PublishProto::Udp => packet::PROTO_UDP,
                PublishProto::Unknown => continue,
            };
            if r.target == me && r.exit != me {
                t.publish_in.push(PublishAdmit {
                    peer: r.exit,
                    proto,
                    target_port: r.target_port,
                });
            }
            if r.exit == me && r.target != me {
                t.publish_out.push(PublishAdmit {
                    peer: r.target,
                    proto,
                    target_port: r.target_port,
                });
            }
        }
        for p in map.peers.values() {
            if p.id == me || p.public_key.as_bytes() == self.public.as_bytes() {
                continue;
            }
            let device = match p.via {
                None => false,
                Some(v) if v == me => true,
                Some(v) => {
                    routed.push((p.addrs, v));
                    continue;
                }
            };
            let mut candidates: Vec<SocketAddr> = Vec::new();
            // Reflexive and static candidates first: they work across NATs; local ones only on
            // a shared LAN.
            for kind in [
                EndpointKind::Static,
                EndpointKind::Stun,
                EndpointKind::Local,
            ] {
                for e in p.endpoints.iter().filter(|e| e.kind == kind) {
                    if !candidates.contains(&e.addr) {
                        candidates.push(e.addr);
                    }
                }
            }
            candidates.truncate(MAX_CANDIDATES);
            let reuse = old
                .peer_by_id(p.id)
                .filter(|o| {
                    o.key == p.public_key
                        && o.addrs == p.addrs
                        && o.name == p.name
                        && o.device == device
                })
                .cloned();
            let st = match reuse {
                Some(o) if o.online == p.online => {
                    let mut path = o.path.lock().unwrap();
                    if path.endpoint.is_none() {
                        path.endpoint = candidates.first().copied();
                    }
                    let mut changed = false;
                    let mut new_public = false;
                    for c in candidates {
                        let added = path.add_candidate(c);
                        changed |= added;
                        new_public |= added && is_public(c.ip());
                    }
                    if changed && !path.direct_alive(now) {
                        if new_public {
                            path.end_quiet(now);
                        }
                        path.search(now);
                    }
                    drop(path);
                    o
                }
                other => {
                    // A changed online flag alone keeps the session: move it to a new record.
                    let (tunn, path, index) = match other {
                        Some(o) => {
                            let tunn = std::mem::replace(
                                &mut *o.tunn.lock().unwrap(),
                                self.new_tunn(&p.public_key, o.index),
                            );
                            let mut path = o.path.lock().unwrap().clone();
                            for c in candidates {
                                path.add_candidate(c);
                            }
                            (tunn, path, o.index)
                        }
                        None => {
                            let index =
                                self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
                            let mut path = PathState {
                                endpoint: candidates.first().copied(),
                                candidates,
                                ..Default::default()
                            };
                            if !device {
                                path.search(now);
                            }
                            (self.new_tunn(&p.public_key, index), path, index)
                        }
                    };
                    Arc::new(PeerState {
                        id: p.id,
                        name: p.name.clone(),
                        key: p.public_key,
                        addrs: p.addrs,
                        online: p.online,
                        device,
                        index,
                        disco: disco::key(&self.secret, p.public_key.as_bytes()),
                        tunn: Mutex::new(tunn),
                        path: Mutex::new(path),
                        rx_bytes: AtomicU64::new(0),
                        tx_bytes: AtomicU64::new(0),
                        handshakes: AtomicU64::new(0),
                        dropped: AtomicU64::new(0),
                        // A device is behind its own NAT and speaks first.
                        eager: std::sync::atomic::AtomicBool::new(!device),
                    })
                }
            };
            let i = t.peers.len();
            t.by_v4.insert(st.addrs.ipv4, i);
            t.by_v6.insert(st.addrs.ipv6, i);
            t.by_index.insert(st.index, i);
            t.by_key.insert(*st.key.as_bytes(), i);
            t.by_id.insert(st.id, i);
            t.peers.push(st);
            for r in p
                .routes
                .iter()
                .filter(|r| !homeport_proto::routes::is_default(r))
            {
                t.routes.push((*r, i));
            }
            t.peer_routes.push(p.routes.clone());
        }
        // Longest prefix first; equal routes of two peers: the lower id, on every node alike.
        t.routes
            .sort_by_key(|(n, i)| (std::cmp::Reverse(n.prefix_len()), t.peers[*i].id));
        for (addrs, via) in routed {
            if let Some(&i) = t.by_id.get(&via) {
                t.by_v4.entry(addrs.ipv4).or_insert(i);
                t.by_v6.entry(addrs.ipv6).or_insert(i);
            }
        }
        let want = map
            .relays
            .iter()
            .find_map(|r| Some((r.udp?, *r.public_key?.as_bytes())));
        {
            let mut relay = self.relay.lock().unwrap();
            let same = match (&*relay, want) {
                (Some(r), Some((a, k))) => r.addr == a && r.key == k,
                (None, None) => true,
                _ => false,
            };
            if !same {
                *relay = want.map(|(addr, key)| {
                    let shared = self.secret.diffie_hellman(&x25519::PublicKey::from(key));
                    RelayClient {
                        addr,
                        key,
                        mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, shared.as_bytes()),
                        last_bind: None,
                        bound: None,
                        rtt: None,
                        unanswered: 0,
                        rebind_now: false,
                    }
                });
            }
        }
        // Flows through exits that are gone (or no longer exits for us) end now.
        let exits: Vec<NodeId> = t.publish_in.iter().map(|r| r.peer).collect();
        self.flows.retain(|_, peer| exits.contains(&peer));
        *self.table.write().unwrap() = Arc::new(t);
    }

    fn new_tunn(&self, peer: &PublicKey, index: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(*peer.as_bytes()),
            None,
            Some(PERSISTENT_KEEPALIVE_SECS),
            index,
            Some(self.rate_limiter.clone()),
        )
    }

    /// Outbound: an IP packet read from the TUN. `out` must hold `pkt.len() + 32` and at least
    /// 148 bytes.
    pub fn encapsulate(&self, t: &PeerTable, pkt: &[u8], out: &mut [u8], now: Instant) -> Encap {
        let Some(dst) = packet::dst_addr(pkt) else {
            return Encap::Drop(DropReason::Malformed);
        };
        let peer = match t.peer_for_dst(dst).or_else(|| t.route_for(dst)) {
            Some(p) => p,
            None => {
                // A reply of a published flow: back to the exit it came in through.
                let Some(info) = packet::parse(pkt) else {
                    return Encap::Drop(DropReason::Malformed);
                };
                let key = FlowKey::new(info.proto, info.dst, info.dst_port, info.src_port);
                match self.flows.reply(&key, now).and_then(|p| t.peer_by_id(p)) {
                    Some(p) => p,
                    // Otherwise the internet, through our exit node if we chose one.
                    None => match self.via_exit(t, dst) {
                        Some(p) => p,
                        None => return Encap::Drop(DropReason::NoRoute),
                    },
                }
            }
        };
        if peer.device {
            // The device's own filter, which it cannot enforce itself.
            let Some(info) = packet::parse(pkt) else {
                return Encap::Drop(DropReason::Malformed);
            };
            if let Err(r) = self.device_admits(t, peer, &info, now) {
                return Encap::Drop(r);
            }
        }
        if !t.filter.allow_all && pkt[0] >> 4 != 0 {
            // Remember UDP flows we open so the peer's replies pass our own filter.
            if let Some(info) = packet::parse(pkt)
                && info.proto == packet::PROTO_UDP
                && !matches!(info.frag, packet::Frag::Later { .. })
            {
                let key = FlowKey::new(info.proto, info.dst, info.dst_port, info.src_port);
                self.udp_out.touch(key, peer.id, now);
            }
        }
        self.seal_for(peer, pkt, out, now)
    }

    /// Encrypts `pkt` for `peer` into `out` and picks where it goes: the direct path, the relay
    /// while none is confirmed, a device's endpoint.
    fn seal_for(&self, peer: &PeerState, pkt: &[u8], out: &mut [u8], now: Instant) -> Encap {
        let mut tunn = peer.tunn.lock().unwrap();
        match tunn.encapsulate(pkt, out) {
            TunnResult::WriteToNetwork(b) => {
                let len = b.len();
                drop(tunn);
                if is_handshake_init(&out[..len]) {
                    self.send_handshake(peer, &out[..len], now);
                    return Encap::Queued;
                }
                peer.tx_bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
                let (direct, endpoint) = {
                    let mut p = peer.path.lock().unwrap();
                    let direct = p.direct_alive(now);
                    if direct {
                        p.last_tx = Some(now);
                    }
                    (direct, p.endpoint)
                };
                let route = if direct || peer.device {
                    None
                } else {
                    self.without_direct(now)
                };
                if route == Some(None) {
                    // Not straight at the peer's NAT before the relay is bound (RELAY_WAIT).
                    return Encap::Drop(DropReason::NoRoute);
                }
                if let Some(Some(relay)) = route {
                    // No direct path (yet): the relay carries the packet.
                    let h = homeport_proto::relay::RELAY_HEADER_LEN;
                    if out.len() < len + h {
                        return Encap::Drop(DropReason::NoRoute);
                    }
                    out.copy_within(..len, h);
                    homeport_proto::relay::write_header(
                        out,
                        homeport_proto::relay::RELAY_SEND,
                        peer.key.as_bytes(),
                    );
                    return Encap::Send {
                        to: relay,
                        len: len + h,
                    };
                }
                match endpoint {
                    Some(to) => Encap::Send { to, len },
                    None => Encap::Drop(DropReason::NoRoute),
                }
            }
            TunnResult::Done => Encap::Queued,
            TunnResult::Err(e) => Encap::Drop(DropReason::WireGuard(e)),
            _ => Encap::Queued,
        }
    }

    /// Inbound: a WireGuard datagram from `from`. Datagrams the engine must send in answer
    /// (handshake responses, packets queued during the handshake) go to `send`.
    pub fn decapsulate(
        &self,
        t: &PeerTable,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Decap {
        // mac1 first (a keyed hash: cheap), and cookies under load, before any X25519 work:
        // a flood of initiations costs a hash each, not a Diffie-Hellman each (WireGuard §5.3).
        let packet = match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, out)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.cookies.fetch_add(1, Ordering::Relaxed);
                self.send(from, cookie);
                return Decap::Done;
            }
            Err(TunnResult::Err(e)) => return Decap::Drop(DropReason::WireGuard(e)),
            Err(_) => return Decap::Drop(DropReason::Malformed),
        };
        let peer = match packet {
            Packet::HandshakeInit(h) => {
                match parse_handshake_anon(&self.secret, &self.public, &h) {
                    Ok(half) => t.by_key.get(&half.peer_static_public).map(|i| &t.peers[*i]),
                    Err(e) => return Decap::Drop(DropReason::WireGuard(e)),
                }
            }
            Packet::HandshakeResponse(h) => {
                t.by_index.get(&(h.receiver_idx >> 8)).map(|i| &t.peers[*i])
            }
            Packet::PacketCookieReply(c) => {
                t.by_index.get(&(c.receiver_idx >> 8)).map(|i| &t.peers[*i])
            }
            Packet::PacketData(d) => t.by_index.get(&(d.receiver_idx >> 8)).map(|i| &t.peers[*i]),
        };
        let Some(peer) = peer else {
            return Decap::Drop(DropReason::UnknownPeer);
        };
        self.decap_peer(t, peer, from, datagram, out, now, false)
    }

    /// Decapsulates a datagram known to come from `peer`, directly from `from` or through the
    /// relay (`via_relay`: answers go back through the relay and the direct path is not touched).
    #[allow(clippy::too_many_arguments)]
    fn decap_peer(
        &self,
        t: &PeerTable,
        peer: &PeerState,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        now: Instant,
        via_relay: bool,
    ) -> Decap {
        let seen = |peer: &PeerState| {
            if via_relay {
                peer.path.lock().unwrap().relay_rx = Some(now);
            } else {
                peer.saw(from, now);
            }
        };
        let reply = |b: &[u8]| {
            if via_relay {
                self.send_via_relay(peer, b);
            } else {
                self.send(from, b);
            }
        };
        let mut tunn = peer.tunn.lock().unwrap();
        let res = tunn.decapsulate(Some(from.ip()), datagram, out);
        let len = match res {
            TunnResult::Done => {
                drop(tunn);
                seen(peer);
                return Decap::Done;
            }
            TunnResult::Err(e) => {
                peer.dropped.fetch_add(1, Ordering::Relaxed);
                return Decap::Drop(DropReason::WireGuard(e));
            }
            TunnResult::WriteToNetwork(b) => {
                // A handshake response or cookie; then flush what waited for the session.
                let is_response = b.first() == Some(&2);
                reply(b);
                let mut flush = [0u8; 2048];
                while let TunnResult::WriteToNetwork(b) = tunn.decapsulate(None, &[], &mut flush) {
                    reply(b);
                }
                drop(tunn);
                if is_response {
                    peer.handshakes.fetch_add(1, Ordering::Relaxed);
                }
                seen(peer);
                return Decap::Done;
            }
            TunnResult::WriteToTunnelV4(b, _) => b.len(),
            TunnResult::WriteToTunnelV6(b, _) => b.len(),
        };
        drop(tunn);
        seen(peer);
        peer.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        match self.admit(t, peer, &out[..len], now) {
            Ok(None) => Decap::ToTun { len },
            Ok(Some(next)) => self.forward(next, out, len, now),
            Err(r) => {
                peer.dropped.fetch_add(1, Ordering::Relaxed);
                Decap::Drop(r)
            }
        }
    }

    /// A datagram from the relay (RELAY_MAGIC): a binding confirmation, or a WireGuard datagram
    /// from a peer.
    pub fn handle_relay(
        &self,
        t: &PeerTable,
        from: SocketAddr,
        d: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Decap {
        {
            let mut r = self.relay.lock().unwrap();
            let Some(r) = r.as_mut().filter(|r| r.addr == from) else {
                return Decap::Drop(DropReason::UnknownPeer);
            };
            if homeport_proto::relay::kind(d) == Some(homeport_proto::relay::RELAY_BOUND) {
                if r.bound.is_none() {
                    tracing::info!(relay = %from, "bound to the relay");
                }
                r.bound = Some(now);
                r.unanswered = 0;
                r.rtt = r.last_bind.map(|b| now.saturating_duration_since(b));
                return Decap::Done;
            }
        }
        let Some((kind, key, payload)) = homeport_proto::relay::parse(d) else {
            return Decap::Drop(DropReason::Malformed);
        };
        if kind != homeport_proto::relay::RELAY_RECV {
            return Decap::Drop(DropReason::Malformed);
        }
        let Some(peer) = t.by_key.get(&key).map(|i| t.peers[*i].clone()) else {
            return Decap::Drop(DropReason::UnknownPeer);
        };
        if homeport_proto::disco::classify(payload) == homeport_proto::disco::DatagramKind::Disco {
            if disco::sender(payload) == Some(key) {
                self.handle_disco_via(t, from, payload, now, true);
            }
            return Decap::Done;
        }
        self.decap_peer(t, &peer, from, payload, out, now, true)
    }

    /// Wraps `pkt` for `peer` in a relay SEND header and sends it to the relay.
    fn send_via_relay(&self, peer: &PeerState, pkt: &[u8]) {
        let Some(addr) = self.relay.lock().unwrap().as_ref().map(|r| r.addr) else {
            return;
        };
        let mut buf = [0u8; 2048 + homeport_proto::relay::RELAY_HEADER_LEN];
        if pkt.len() + homeport_proto::relay::RELAY_HEADER_LEN > buf.len() {
            return;
        }
        let h = homeport_proto::relay::write_header(
            &mut buf,
            homeport_proto::relay::RELAY_SEND,
            peer.key.as_bytes(),
        );
        buf[h..h + pkt.len()].copy_from_slice(pkt);
        self.send(addr, &buf[..h + pkt.len()]);
    }

    /// How packets without a live direct path reach `peer`'s public addresses: `Some(relay)`
    /// through the relay, `Some(None)` not at all yet (the relay is about to bind), `None`
    /// directly (no relay, or one that never answered).
    fn without_direct(&self, now: Instant) -> Option<Option<SocketAddr>> {
        if let Some(r) = self.relay_bound(now) {
            return Some(Some(r));
        }
        let configured = self.relay.lock().unwrap().is_some();
        (configured && self.age(now) < RELAY_WAIT).then_some(None)
    }

    /// Time since the engine was created.
    fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// The relay address when a binding is confirmed.
    pub fn relay_bound(&self, now: Instant) -> Option<SocketAddr> {
        self.relay
            .lock()
            .unwrap()
            .as_ref()
            .filter(|r| {
                r.bound
                    .is_some_and(|b| now.saturating_duration_since(b) < RELAY_TTL)
            })
            .map(|r| r.addr)
    }

    /// Sends a handshake initiation to every direct target and, while no direct path is alive,
    /// through the relay as well: whichever path answers first carries the session.
    ///
    /// While the relay carries the peer, initiations go to its public addresses only once a
    /// direct path is alive: a full-size packet that reaches the peer's NAT before the peer
    /// opened it (or that keeps hitting a NAT which just lost its mapping) leaves conntrack
    /// entries there that push the peer onto another port. Punching (openers first) finds the
    /// direct path; handshakes then follow it.
    pub fn send_handshake(&self, peer: &PeerState, pkt: &[u8], now: Instant) {
        let route = if peer.device || peer.path.lock().unwrap().direct_alive(now) {
            None
        } else {
            self.without_direct(now)
        };
        for to in peer.handshake_targets(now) {
            if route.is_none() || !is_public(to.ip()) {
                self.send(to, pkt);
            }
        }
        match route {
            Some(Some(_)) => self.send_via_relay(peer, pkt),
            // Sent at the next tick once the relay is bound (see the eager handshake).
            Some(None) => peer.eager.store(true, Ordering::Relaxed),
            None => {}
        }
    }

    /// Sends a relay BIND when due.
    fn bind_relay(&self, now: Instant) {
        let mut r = self.relay.lock().unwrap();
        let Some(r) = r.as_mut() else { return };
        let fresh = r
            .bound
            .is_some_and(|b| now.saturating_duration_since(b) < RELAY_REBIND);
        let recently = r
            .last_bind
            .is_some_and(|b| now.saturating_duration_since(b) < Duration::from_secs(2));
        if (fresh || recently) && !r.rebind_now {
            return;
        }
        r.rebind_now = false;
        r.last_bind = Some(now);
        r.unanswered = r.unanswered.saturating_add(1);
        let unix =
            self.clock_base.1 + now.saturating_duration_since(self.clock_base.0).as_millis() as u64;
        let key = self.public.to_bytes();
        let tag = ring::hmac::sign(&r.mac, &homeport_proto::relay::Bind::signed(&key, unix));
        let mut mac = [0u8; 32];
        mac.copy_from_slice(tag.as_ref());
        let msg = homeport_proto::relay::Bind { key, unix, mac }.encode();
        self.send(r.addr, &msg);
        let bound = r
            .bound
            .is_some_and(|b| now.saturating_duration_since(b) < RELAY_TTL);
        if !bound && r.unanswered >= 3 {
            self.event(Event::RelayUdpFailing { relay: r.addr });
        }
    }

    /// The inbound checks that [`Engine::decapsulate`] applies to a packet decrypted from peer
    /// `peer`, without the WireGuard session in front of them. Only for the fuzz targets in
    /// `fuzz/`, which cannot forge WireGuard sessions.
    #[doc(hidden)]
    pub fn fuzz_admit(
        &self,
        t: &PeerTable,
        peer: NodeId,
        pkt: &[u8],
        now: Instant,
    ) -> Result<(), DropReason> {
        let peer = t.peer_by_id(peer).ok_or(DropReason::UnknownPeer)?;
        self.admit(t, peer, pkt, now).map(drop)
    }

    /// The inbound checks on a decrypted packet from `peer`: Ok(None) for the TUN, Ok(Some(p))
    /// to forward to `p` (between a device and the mesh). A fragmented datagram is decided on
    /// its first fragment; later fragments follow that decision (see [`frag`]).
    fn admit<'t>(
        &self,
        t: &'t PeerTable,
        peer: &PeerState,
        pkt: &[u8],
        now: Instant,
    ) -> Result<Option<&'t PeerState>, DropReason> {
        let info = packet::parse(pkt).ok_or(DropReason::Malformed)?;
        if let packet::Frag::Later { .. } = info.frag {
            return if self.frags.admits_later(peer.id, &info, now) {
                Ok(self.forward_to(t, peer, &info))
            } else {
                Err(DropReason::Filtered)
            };
        }
        let next = self.admit_whole(t, peer, pkt, &info, now)?;
        self.frags.admitted_first(peer.id, &info, now);
        Ok(next)
    }

    /// Where a packet from `peer` that is not for us goes on: to one of our devices, or from
    /// one of them into the mesh. Nothing else passes through this node.
    fn forward_to<'t>(
        &self,
        t: &'t PeerTable,
        peer: &PeerState,
        info: &PacketInfo,
    ) -> Option<&'t PeerState> {
        if t.is_self(info.dst) {
            return None;
        }
        t.peer_for_dst(info.dst)
            .filter(|next| next.id != peer.id && (peer.device || next.device))
            .map(|p| &**p)
    }

    /// The checks on a whole datagram or a first fragment (which holds the transport header).
    fn admit_whole<'t>(
        &self,
        t: &'t PeerTable,
        peer: &PeerState,
        pkt: &[u8],
        info: &PacketInfo,
        now: Instant,
    ) -> Result<Option<&'t PeerState>, DropReason> {
        if t.sends_as(peer, info.src) {
            if peer.device {
                self.device_sent(peer, info, now);
            }
            if t.is_self(info.dst) {
                if peer.device && devices::is_dns(info) {
                    return Ok(None);
                }
                return self.filter_in(t, peer, pkt, info, true, now).map(|_| None);
            }
            if let Some(next) = self.forward_to(t, peer, info) {
                if next.device {
                    self.device_admits(t, next, info, now)?;
                }
                return Ok(Some(next));
            }
            // We forward it: to one of our approved routes (a LAN behind us, or the internet
            // when we are an approved exit), as the filter's `dests` rules allow.
            if t.forwards_to(info.dst) {
                return self.filter_in(t, peer, pkt, info, false, now).map(|_| None);
            }
            // We are an exit: the target's reply to a published flow, to a public address.
            let is_reply = t.publish_out.iter().any(|r| {
                r.peer == peer.id && r.proto == info.proto && r.target_port == info.src_port
            });
            return if is_reply && !t.in_mesh(info.dst) && peer.addrs.contains(info.src) {
                Ok(None)
            } else {
                Err(DropReason::NotForThisNode)
            };
        }
        // A public source: only from an exit of a rule we are the target of, only to its port,
        // and never a mesh address (an exit must not pass itself off as another node).
        if !t.is_self(info.dst) || t.in_mesh(info.src) {
            return Err(DropReason::SourceNotAllowed);
        }
        let ok = t
            .publish_in
            .iter()
            .any(|r| r.peer == peer.id && r.proto == info.proto && r.target_port == info.dst_port);
        if !ok {
            // A host behind the peer's approved subnet route, or the internet through the peer
            // we chose as exit node: from that peer only, never from another.
            return match self.source_owner(t, info.src) {
                Some(owner) if owner.id == peer.id => {
                    self.filter_in(t, peer, pkt, info, true, now).map(|_| None)
                }
                _ => Err(DropReason::SourceNotAllowed),
            };
        }
        let key = FlowKey::new(info.proto, info.src, info.src_port, info.dst_port);
        self.flows.inbound(key, peer.id, info.opens_tcp(), now);
        Ok(None)
    }

    /// `to_self`: the packet is for this node (else we forward it along one of our routes).
    fn filter_in(
        &self,
        t: &PeerTable,
        peer: &PeerState,
        pkt: &[u8],
        info: &PacketInfo,
        to_self: bool,
        now: Instant,
    ) -> Result<(), DropReason> {
        let f = &t.filter;
        if f.allow_all {
            return Ok(());
        }
        let opening = match info.proto {
            packet::PROTO_TCP => info.opens_tcp(),
            packet::PROTO_UDP => {
                let key = FlowKey::new(info.proto, info.src, info.src_port, info.dst_port);
                self.udp_out
                    .get(&key, now)
                    .is_none_or(|fl| fl.peer != peer.id)
            }
            packet::PROTO_ICMP | packet::PROTO_ICMPV6 => {
                if info.is_echo_request() {
                    true
                } else if info.is_echo_reply() {
                    false
                } else if quotes_our_packet_to(t, peer, pkt, info) {
                    // An error about a packet we sent this peer (unreachable, packet too big,
                    // time exceeded): part of a flow that is ours, so allowed.
                    false
                } else {
                    // Any other ICMP (redirects, router advertisements, errors about packets
                    // we never sent) opens nothing and informs nothing we need.
                    return Err(DropReason::Filtered);
                }
            }
            _ => true,
        };
        if !opening || f.allows(info, to_self) {
            Ok(())
        } else {
            Err(DropReason::Filtered)
        }
    }

    /// Runs boringtun's timers for every peer (handshake retries, rekey, keepalive) and expires
    /// flows. Datagrams to send go to `send`; handshake initiations to every target.
    pub fn handle_timeout(&self, now: Instant) {
        {
            let mut lr = self.last_reset.lock().unwrap();
            if lr.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                self.rate_limiter.reset_count();
                *lr = Some(now);
                self.flows.expire(now);
                self.udp_out.expire(now);
                self.device_udp.expire(now);
            }
        }
        let t = self.snapshot();
        self.bind_relay(now);
        self.probe_due(&t, now);
        {
            let mut last = self.last_timers.lock().unwrap();
            if last.is_some_and(|l| now.saturating_duration_since(l) < TICK) {
                // Woken early for a probe: boringtun's timers run at their own pace.
                return;
            }
            *last = Some(now);
        }
        let mut buf = [0u8; 2048];
        for peer in &t.peers {
            let mut tunn = peer.tunn.lock().unwrap();
            let age = self.age(now);
            let relay_ready =
                self.relay.lock().unwrap().is_none() || self.relay_bound(now).is_some();
            if (relay_ready || age > RELAY_WAIT)
                && peer.eager.swap(false, Ordering::Relaxed)
                && tunn.stats().0.is_none()
            {
                // Forced: an initiation held back while the relay was binding (see
                // `send_handshake`) counts as in progress for boringtun, which would otherwise
                // wait its 5 s retry before sending another.
                if let TunnResult::WriteToNetwork(b) =
                    tunn.format_handshake_initiation(&mut buf, true)
                {
                    let len = b.len();
                    drop(tunn);
                    self.send_handshake(peer, &buf[..len], now);
                    continue;
                }
            }
            match tunn.update_timers(&mut buf) {
                TunnResult::WriteToNetwork(b) => {
                    let len = b.len();
                    drop(tunn);
                    let pkt = &buf[..len];
                    if is_handshake_init(pkt) {
                        self.send_handshake(peer, pkt, now);
                    } else {
                        let direct = peer.path.lock().unwrap().direct_alive(now);
                        let route = if direct || peer.device {
                            None
                        } else {
                            self.without_direct(now)
                        };
                        match (route, peer.endpoint()) {
                            (Some(Some(_)), _) => self.send_via_relay(peer, pkt),
                            (Some(None), _) => {}
                            (None, Some(to)) => self.send(to, pkt),
                            (None, None) => {}
                        }
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => tracing::trace!(peer = %peer.name, ?e, "timer"),
                _ => {}
            }
        }
    }
}

impl Engine {
    /// A disco packet from `from`. Answers Pings with a Pong, learns the sender's address as a
    /// candidate, and confirms direct paths from Pongs. Returns false when it was not valid.
    pub fn handle_disco(&self, t: &PeerTable, from: SocketAddr, d: &[u8], now: Instant) -> bool {
        self.handle_disco_via(t, from, d, now, false)
    }

    fn handle_disco_via(
        &self,
        t: &PeerTable,
        from: SocketAddr,
        d: &[u8],
        now: Instant,
        via_relay: bool,
    ) -> bool {
        let Some(sender) = disco::sender(d) else {
            return false;
        };
        let Some(peer) = t.by_key.get(&sender).map(|i| &t.peers[*i]) else {
            return false;
        };
        let mut scratch = [0u8; disco::MAX_DISCO];
        let Some(msg) = disco::open(&peer.disco, d, &mut scratch) else {
            return false;
        };
        let me = self.public.to_bytes();
        let mut out = [0u8; disco::MAX_DISCO];
        match msg {
            disco::DiscoMsg::Ping { tx } if via_relay => {
                let n = disco::seal(
                    &peer.disco,
                    &me,
                    self.random12(),
                    &disco::DiscoMsg::Pong { tx, observed: from },
                    &mut out,
                );
                self.send_via_relay(peer, &out[..n]);
            }
            disco::DiscoMsg::Ping { tx } => {
                tracing::debug!(peer = %peer.name, %from, "probe received");
                let n = disco::seal(
                    &peer.disco,
                    &me,
                    self.random12(),
                    &disco::DiscoMsg::Pong { tx, observed: from },
                    &mut out,
                );
                self.send(from, &out[..n]);
                let mut p = peer.path.lock().unwrap();
                let new = p.add_candidate(from);
                if !p.direct_alive(now) {
                    // The peer is probing us: probe back at once, which opens our NAT to it.
                    let tx = self.random12();
                    let n = disco::seal(
                        &peer.disco,
                        &me,
                        self.random12(),
                        &disco::DiscoMsg::Ping { tx },
                        &mut out,
                    );
                    p.pending
                        .retain(|(_, _, t)| now.saturating_duration_since(*t) < DIRECT_TTL);
                    if p.pending.len() < 32 {
                        p.pending.push((from, tx, now));
                    }
                    if new {
                        p.search(now);
                    }
                    drop(p);
                    self.send(from, &out[..n]);
                }
            }
            disco::DiscoMsg::Pong { tx, observed } => {
                let mut p = peer.path.lock().unwrap();
                let Some(i) = p
                    .pending
                    .iter()
                    .position(|(a, id, _)| *id == tx && *a == from)
                else {
                    return false;
                };
                let (_, _, sent) = p.pending.swap_remove(i);
                let rtt = now.saturating_duration_since(sent);
                p.last_pong = Some((from, rtt, now, via_relay));
                self.event(Event::Pong {
                    peer: peer.id,
                    from,
                    rtt,
                    via_relay,
                });
                if via_relay {
                    return true;
                }
                p.observed = Some(observed);
                let better = match p.direct {
                    None => true,
                    Some((a, _, _)) if a == from => true,
                    Some((_, _, t)) if now.saturating_duration_since(t) >= DIRECT_TTL => true,
                    // Switch only for a clearly faster path, so two similar paths don't flap.
                    Some((_, old, _)) => rtt * 10 < old * 7,
                };
                if better {
                    if p.endpoint != Some(from) {
                        tracing::info!(peer = %peer.name, %from, ?rtt, "direct path");
                    }
                    p.direct = Some((from, rtt, now));
                    p.direct_worked = true;
                    // The attempt succeeded.
                    p.punch = Punch::Idle;
                    p.suspect_since = None;
                    p.endpoint = Some(from);
                }
            }
            disco::DiscoMsg::Ready { me, opened, .. } => {
                let mut p = peer.path.lock().unwrap();
                let mine = *self.reflexive.lock().unwrap();
                let newly_for_us = mine.is_some_and(|m| {
                    opened.contains(m) && !p.peer_opened.is_some_and(|(o, _)| o.contains(m))
                });
                p.peer_opened = Some((opened, now));
                if p.direct_alive(now) {
                    return true;
                }
                // The peer is punching: join in (our openers towards it and our own Ready go
                // out at the next tick), towards its current address too.
                if let Some(me) = me
                    && is_public(me.ip())
                    && p.add_candidate(me)
                {
                    p.end_quiet(now);
                }
                p.peer_searching_until = Some(now + SEARCH_FAST_FOR);
                p.begin_attempt(now);
                if newly_for_us || p.punch.started_at() == Some(now) {
                    p.next_probe = Some(now);
                }
            }
        }
        true
    }

    /// The coordinator relayed "probe me now" from `peer`: take its endpoints as candidates and
    /// probe them all at once.
    pub fn probe_now(&self, peer: NodeId, endpoints: &[SocketAddr], now: Instant) {
        self.attempt(peer, endpoints, now);
    }

    /// We are about to ask the coordinator to make `peer` probe us: start a fresh attempt so
    /// our openers go out first. Returns false when the peer is unknown.
    pub fn start_attempt(&self, peer: NodeId, now: Instant) -> bool {
        self.attempt(peer, &[], now)
    }

    /// Both sides probe now: `peer` asked us (through the coordinator), or we are asking it;
    /// either way it opens its side within a coordinator round trip.
    fn attempt(&self, peer: NodeId, endpoints: &[SocketAddr], now: Instant) -> bool {
        let t = self.snapshot();
        let Some(p) = t.peer_by_id(peer) else {
            return false;
        };
        {
            let mut ps = p.path.lock().unwrap();
            for e in endpoints {
                if ps.add_candidate(*e) && is_public(e.ip()) {
                    ps.end_quiet(now);
                }
            }
            ps.search(now);
            ps.peer_searching_until = Some(now + SEARCH_FAST_FOR);
            ps.begin_attempt(now);
        }
        self.probe(p, now);
        true
    }

    /// Whether `peer` has a public candidate to punch towards.
    pub fn has_public_candidate(&self, peer: NodeId) -> bool {
        let t = self.snapshot();
        t.peer_by_id(peer).is_some_and(|p| {
            p.path
                .lock()
                .unwrap()
                .candidates
                .iter()
                .any(|a| is_public(a.ip()))
        })
    }

    /// The opener TTL is known (or there is no NAT to open).
    pub fn nat_depth_known(&self) -> bool {
        self.open_ttl.load(Ordering::Relaxed) != TTL_UNKNOWN
    }

    /// `homeport ping`: one Ping on the path in use (the direct path, else every candidate and
    /// the relay). Replies show up in the peer's `last_pong`.
    pub fn ping(&self, peer: NodeId, now: Instant) -> bool {
        let t = self.snapshot();
        let Some(peer) = t.peer_by_id(peer) else {
            return false;
        };
        let me = self.public.to_bytes();
        let mut out = [0u8; disco::MAX_DISCO];
        let relay = self.relay_bound(now);
        let mut p = peer.path.lock().unwrap();
        let targets: Vec<SocketAddr> = match (p.direct_alive(now), p.endpoint) {
            (true, Some(e)) => vec![e],
            _ => p.candidates.clone(),
        };
        let direct_alive = p.direct_alive(now);
        for to in targets {
            let tx = self.random12();
            p.pending.push((to, tx, now));
            let n = disco::seal(
                &peer.disco,
                &me,
                self.random12(),
                &disco::DiscoMsg::Ping { tx },
                &mut out,
            );
            self.send(to, &out[..n]);
        }
        if let (Some(r), false) = (relay, direct_alive) {
            let tx = self.random12();
            p.pending.push((r, tx, now));
            let n = disco::seal(
                &peer.disco,
                &me,
                self.random12(),
                &disco::DiscoMsg::Ping { tx },
                &mut out,
            );
            drop(p);
            self.send_via_relay(peer, &out[..n]);
        }
        true
    }

    /// The relay's address when it does not answer over UDP (three BINDs unanswered and no
    /// live binding): UDP to it is probably blocked and the TCP/TLS fallback should carry it.
    pub fn relay_udp_failing(&self, now: Instant) -> Option<SocketAddr> {
        let r = self.relay.lock().unwrap();
        let r = r.as_ref()?;
        let bound = r
            .bound
            .is_some_and(|b| now.saturating_duration_since(b) < RELAY_TTL);
        (!bound && r.unanswered >= 3).then_some(r.addr)
    }

    /// Round-trip time of the last relay binding, when bound.
    pub fn relay_rtt(&self) -> Option<(SocketAddr, Duration)> {
        let r = self.relay.lock().unwrap();
        r.as_ref().and_then(|r| Some((r.addr, r.rtt?)))
    }

    /// Sends a Ping to each candidate of `peer` and schedules the next round.
    fn probe(&self, peer: &PeerState, now: Instant) {
        let me = self.public.to_bytes();
        let mut out = [0u8; disco::MAX_DISCO];
        let ttl = self.open_ttl.load(Ordering::Relaxed);
        let age = self.age(now);
        let mut p = peer.path.lock().unwrap();
        let alive = p.direct_alive(now);
        let fast = p.search_until.is_some_and(|u| now < u);
        p.next_probe = Some(
            now + if p.check_suspect(now) {
                TICK
            } else if !alive && fast {
                PROBE_SEARCH
            } else {
                PROBE_KEEP
            },
        );
        p.pending
            .retain(|(_, _, t)| now.saturating_duration_since(*t) < DIRECT_TTL);
        if ttl == TTL_UNKNOWN && !alive && age < Duration::from_secs(3) {
            // Wait briefly for the NAT depth: full probes now could poison the peer's NAT.
            p.next_probe = Some(now + Duration::from_millis(250));
            return;
        }
        let mut full = true;
        // Punching rules apply: a NAT is in front of us and no direct path is alive.
        let gated = ttl != 0 && ttl != TTL_UNKNOWN && !alive;
        let ready = self.peer_ready_for_us(&p, now);
        if gated {
            if p.punch.quiet(now) {
                // Total silence towards the peer's candidates, openers included: our NAT's
                // entries towards them must expire too, or it keeps the port it picked in the
                // clash.
                return;
            } else {
                if !matches!(p.punch, Punch::Punching { .. }) {
                    p.punch = Punch::started(now);
                }
                let start = p.punch.started_at().unwrap_or(now);
                let since = now.saturating_duration_since(start);
                let peer_open = p.peer_searching_until.is_some_and(|u| now < u);
                let give_up = if p.direct_worked && self.rebind_possible(now) {
                    LOST_PATH_ATTEMPT
                } else {
                    SEARCH_FAST_FOR
                };
                if since > give_up + OPEN_FIRST {
                    if p.direct_worked && self.want_rebind(peer.id, now) {
                        // A direct path worked from this socket and no longer can be found:
                        // our NAT lost its mapping, and Linux NATs keep stale entries about the
                        // old port alive for as long as anything is sent (they pick a new port
                        // for us towards the peer while STUN still sees the old one). Waiting
                        // cannot fix that; a fresh port can.
                        tracing::info!(peer = %peer.name, "direct path lost; moving to a fresh port");
                        p.punch = Punch::Quiet {
                            until: now + REBIND_WAIT,
                            why: QuietReason::Rebinding,
                        };
                    } else {
                        // This attempt failed: let stale NAT state expire before the next one.
                        p.punch = Punch::Quiet {
                            until: now + PROBE_QUIET,
                            why: QuietReason::Failed,
                        };
                    }
                    return;
                } else if ready == Some(false) {
                    // The peer has not opened towards our current address (yet).
                    full = false;
                } else if ready == Some(true) {
                    // It said so itself: no need to wait out OPEN_FIRST.
                } else if since < OPEN_FIRST {
                    full = false;
                    p.next_probe = Some(start + OPEN_FIRST);
                } else if !peer_open {
                    // Full probes only while the peer is opening its side too.
                    full = false;
                }
            }
            let public: Vec<SocketAddr> = p
                .candidates
                .iter()
                .copied()
                .filter(|a| is_public(a.ip()))
                .collect();
            // The Ready lists the newest candidates (learned ones come last).
            let mut opened = disco::Opened::default();
            for to in public
                .iter()
                .rev()
                .take(homeport_proto::disco::READY_MAX_OPENED)
            {
                opened.push(*to);
            }
            for to in public {
                p.punch.opened_towards(to, now);
                let tx = self.random12();
                let n = disco::seal(
                    &peer.disco,
                    &me,
                    self.random12(),
                    &disco::DiscoMsg::Ping { tx },
                    &mut out,
                );
                self.queue(to, Some(ttl), &out[..n]);
            }
            if self.relay_bound(now).is_some() {
                // After the openers in the queue: it tells the peer they went out.
                let msg = disco::DiscoMsg::Ready {
                    tx: self.random12(),
                    me: *self.reflexive.lock().unwrap(),
                    opened,
                };
                let n = disco::seal(&peer.disco, &me, self.random12(), &msg, &mut out);
                self.send_via_relay(peer, &out[..n]);
            }
        }
        if alive {
            p.punch = Punch::Idle;
        }
        // While punching, a full probe to a public candidate goes only where our opener went
        // first (long enough ago to have passed our NATs). A peer with only private candidates
        // (a routed network without NAT in between) is probed directly: no NAT to spoil there.
        let has_public = p.candidates.iter().any(|a| is_public(a.ip()));
        let targets: Vec<SocketAddr> = p
            .candidates
            .iter()
            .copied()
            .filter(|c| {
                if !is_public(c.ip()) {
                    return !has_public || full;
                }
                full && (!gated
                    || match ready {
                        Some(ready) => ready,
                        None => p.punch.opened_since(c, now) >= Some(OPEN_FIRST),
                    })
            })
            .collect();
        for to in targets {
            let tx = self.random12();
            if p.pending.len() >= 32 {
                p.pending.remove(0);
            }
            p.pending.push((to, tx, now));
            let n = disco::seal(
                &peer.disco,
                &me,
                self.random12(),
                &disco::DiscoMsg::Ping { tx },
                &mut out,
            );
            tracing::debug!(peer = %peer.name, %to, "probe");
            self.send(to, &out[..n]);
        }
    }

    /// Whether the IO shell may move our socket to a fresh port ([`Engine::take_rebind`]): false
    /// when the port is fixed by configuration.
    pub fn set_rebind_allowed(&self, allowed: bool) {
        self.rebind.lock().unwrap().allowed = allowed;
    }

    /// Asks for a fresh port unless that is not allowed, or a move happened recently. Returns
    /// whether one was asked for.
    fn want_rebind(&self, peer: NodeId, now: Instant) -> bool {
        if !self.rebind_possible(now) {
            return false;
        }
        let mut r = self.rebind.lock().unwrap();
        r.wanted = Some(peer);
        r.last = Some(now);
        drop(r);
        self.event(Event::RebindWanted);
        true
    }

    /// A move to a fresh port is allowed now: the port is not fixed, a NAT is in front of us
    /// and the last move was long enough ago.
    fn rebind_possible(&self, now: Instant) -> bool {
        let ttl = self.open_ttl.load(Ordering::Relaxed);
        let r = self.rebind.lock().unwrap();
        r.allowed
            && ttl != 0
            && ttl != TTL_UNKNOWN
            && r.last
                .is_none_or(|l| now.saturating_duration_since(l) >= REBIND_MIN_EVERY)
    }

    /// Whether the IO shell should move the WireGuard socket to a fresh port now (asked once;
    /// afterwards call [`Engine::rebound`]). A request is dropped when the direct path it was
    /// for came back meanwhile (the peer moved instead): moving then would only break it again.
    pub fn take_rebind(&self, now: Instant) -> bool {
        let mut r = self.rebind.lock().unwrap();
        let Some(id) = r.wanted.take() else {
            return false;
        };
        let t = self.snapshot();
        let back = t
            .peer_by_id(id)
            .is_some_and(|p| p.path.lock().unwrap().direct_alive(now));
        if back {
            r.last = None;
        }
        !back
    }

    /// Our socket moved to a fresh port: every direct path is unconfirmed from it, punching
    /// starts over (no quiet time: no stale NAT state concerns the new port), and the relay
    /// learns the new address at the next tick.
    pub fn rebound(&self, now: Instant) {
        let t = self.snapshot();
        for peer in &t.peers {
            let mut p = peer.path.lock().unwrap();
            p.direct = None;
            p.direct_worked = false;
            p.last_rx = None;
            p.pending.clear();
            p.punch = Punch::Idle;
            if !peer.device {
                p.search(now);
            }
        }
        if let Some(r) = self.relay.lock().unwrap().as_mut() {
            r.rebind_now = true;
        }
        // Unknown until STUN answers from the new port.
        *self.reflexive.lock().unwrap() = None;
    }

    /// Sets the opener TTL (see [`OPEN_FIRST`]): 0 when no NAT is in front of this node.
    pub fn set_open_ttl(&self, ttl: u8) {
        self.open_ttl.store(ttl, Ordering::Relaxed);
    }

    /// Whether `peer` opened its NAT towards our current address (its last Ready, within
    /// [`SEARCH_FAST_FOR`], lists it). None when that cannot be told: the peer never sent a
    /// Ready (an older node: the OPEN_FIRST timing rule applies), or our address is unknown.
    fn peer_ready_for_us(&self, p: &PathState, now: Instant) -> Option<bool> {
        let mine = (*self.reflexive.lock().unwrap())?;
        let (opened, at) = p.peer_opened.as_ref()?;
        Some(now.saturating_duration_since(*at) < SEARCH_FAST_FOR && opened.contains(mine))
    }

    /// Our reflexive address as STUN reports it through the WireGuard socket.
    pub fn set_reflexive(&self, addr: Option<SocketAddr>) {
        *self.reflexive.lock().unwrap() = addr;
    }

    /// Probes every peer whose next probe is due.
    fn probe_due(&self, t: &PeerTable, now: Instant) {
        // Devices speak no disco.
        for peer in t.peers.iter().filter(|p| !p.device) {
            let due = {
                let mut p = peer.path.lock().unwrap();
                // A newly suspect path is probed at once, not at its next keep-alive round.
                let newly_suspect = p.suspect_since.is_none() && p.check_suspect(now);
                newly_suspect || p.next_probe.is_none_or(|n| now >= n)
            };
            if due {
                self.probe(peer, now);
            }
        }
    }
}

fn is_handshake_init(d: &[u8]) -> bool {
    d.len() >= 4 && d[0] == 1 && d[1..4] == [0, 0, 0]
}

/// An ICMP error from `peer` that quotes a packet we sent to it (source ours, destination its).
fn quotes_our_packet_to(t: &PeerTable, peer: &PeerState, pkt: &[u8], info: &PacketInfo) -> bool {
    packet::quoted(pkt, info).is_some_and(|(src, dst, proto, _, _)| {
        t.is_self(src)
            && peer.addrs.contains(dst)
            && matches!(
                proto,
                packet::PROTO_TCP | packet::PROTO_UDP | packet::PROTO_ICMP | packet::PROTO_ICMPV6
            )
    })
}

/// True when `ip` belongs to any mesh node (ourselves or a peer).
fn is_mesh(t: &PeerTable, ip: IpAddr) -> bool {
    t.is_self(ip) || t.peer_for_dst(ip).is_some()
}

#[cfg(test)]
mod tests;
