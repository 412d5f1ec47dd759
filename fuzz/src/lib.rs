//! The fuzz targets' bodies: one function per target, `fn(&[u8])`, that feeds the input to a
//! decoder network input reaches and checks what must hold whatever the input. A panic is a
//! finding.
//!
//! `fuzz_targets/*.rs` (cargo-fuzz, nightly) call these; `tests/tests/fuzz_corpus.rs` (stable,
//! part of `cargo test --workspace`) includes this file and runs every committed seed in
//! `fuzz/corpus/<target>/` through the same function, so a seed that stops passing shows up
//! without nightly.
//!
//! Inputs that carry several messages use [`records`]: a control byte, a big-endian u16 length,
//! then that many bytes (fewer if the input ends). The control byte picks the sender, the
//! framing the harness wraps around the bytes (a valid relay BIND, a disco packet sealed with
//! the right key, ...) and how far fake time moves, so the fuzzer gets past MACs and AEAD tags
//! it could never guess and reaches the parsers behind them.
//!
//! The node targets share one engine per process ([`World`]) with a small fixed map, because
//! building one costs a dozen X25519 operations. Each run starts an hour after the previous one
//! in the engine's (fake) time, so no flow, fragment or path state of an earlier run is alive.

#![allow(clippy::new_without_default)]

use homeport_engine::packet::{self, Frag, PacketInfo};
use homeport_engine::{Decap, Engine, disco};
use homeport_proto::NodeId;
use homeport_proto::disco::{DISCO_HEADER_LEN, DISCO_MAGIC, DatagramKind, classify};
use homeport_proto::filter::{FilterRule, PacketFilter, PortRange, Proto};
use homeport_proto::map::{
    Endpoint, EndpointKind, MapMessage, MeshAddrs, NetworkMap, Peer, RelayInfo, SelfNode,
};
use homeport_proto::publish::{Guards, PublishProto, PublishRule};
use homeport_proto::relay;
use ring::aead::{Aad, LessSafeKey, Nonce};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey, StaticSecret};

/// Every target: (name, body). The names are the files in `fuzz_targets/` and the directories
/// in `corpus/`.
/// A fuzz target: its name and the function that takes one input.
pub type Target = (&'static str, fn(&[u8]));

pub const TARGETS: &[Target] = &[
    ("ip_filter", ip_filter),
    ("disco", disco_open),
    ("relay_server_udp", relay_server_udp),
    ("relay_server_tcp", relay_server_tcp),
    ("node_socket", node_socket),
    ("stun_server", stun_server),
    ("stun_client", stun_client),
    ("map", map),
    ("conntrack", conntrack),
    ("config_coordinator", config_coordinator),
    ("config_node", config_node),
    ("config_exit", config_exit),
];

/// Records per input at most: bounds the time one input can take.
const MAX_RECORDS: usize = 64;

/// Splits `data` into (control byte, bytes) records; see the module docs.
pub fn records(data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = data;
    std::iter::from_fn(move || {
        let (&h, tail) = rest.split_first()?;
        let (n, tail) = match tail {
            [a, b, tail @ ..] => (u16::from_be_bytes([*a, *b]) as usize, tail),
            _ => (0, &[][..]),
        };
        let (d, tail) = tail.split_at(n.min(tail.len()));
        rest = tail;
        Some((h, d))
    })
    .take(MAX_RECORDS)
}

/// Encodes one record (for seeds and tests).
pub fn record(h: u8, d: &[u8]) -> Vec<u8> {
    let mut v = vec![h];
    v.extend_from_slice(&(d.len() as u16).to_be_bytes());
    v.extend_from_slice(d);
    v
}

// ---------------------------------------------------------------------------------------------
// The fixed mesh the node targets run in.

const HOME: i64 = 1;
const LAPTOP: i64 = 2;
const VPS: i64 = 3;
const NAS: i64 = 4;
/// Peers of the home node, in the order the control bytes pick them.
const PEERS: [i64; 3] = [LAPTOP, VPS, NAS];
/// The published ports home is the target of (through the VPS): (protocol, port).
const PUBLISHED_TO_HOME: [(u8, u16); 2] = [(packet::PROTO_TCP, 32400), (packet::PROTO_UDP, 443)];
/// Home is the exit of a rule to the NAS's TCP port 80.
const NAS_PORT: u16 = 80;
pub const RELAY_ADDR: &str = "198.51.100.10:3478";

fn secret(id: i64) -> StaticSecret {
    StaticSecret::from([id as u8; 32])
}

/// The public key of node `id` (0..16), computed once: a scalar multiplication per call would be
/// most of a run's time.
fn public(id: i64) -> [u8; 32] {
    static KEYS: OnceLock<Vec<[u8; 32]>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..16)
            .map(|i| PublicKey::from(&secret(i)).to_bytes())
            .collect()
    })[id as usize]
}

fn private_key(id: i64) -> homeport_proto::PrivateKey {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode([id as u8; 32])
        .parse()
        .expect("a valid key")
}

fn addrs(id: i64) -> MeshAddrs {
    MeshAddrs {
        ipv4: Ipv4Addr::new(100, 96, 0, id as u8),
        ipv6: format!("fd7a:115c:a1e0::{id}").parse().unwrap(),
    }
}

fn name(s: &str) -> homeport_proto::NodeName {
    s.parse().unwrap()
}

fn rule(
    id: i64,
    exit: i64,
    proto: PublishProto,
    port: u16,
    target: i64,
    tport: u16,
) -> PublishRule {
    let names = ["", "home", "laptop", "vps", "nas"];
    PublishRule {
        id,
        exit: NodeId(exit),
        exit_name: name(names[exit as usize]),
        proto,
        port,
        target: NodeId(target),
        target_name: name(names[target as usize]),
        target_ipv4: addrs(target).ipv4,
        target_ipv6: addrs(target).ipv6,
        target_port: tport,
        guards: Guards::default(),
    }
}

/// Home's map: a laptop the filter restricts (TCP 22 only; UDP 53 and 5000-6000 and ping from
/// any IPv4 mesh address), the VPS that publishes home's TCP 32400 and UDP 443, and a NAS whose
/// TCP 80 home publishes (home as an exit). The relay is the coordinator's.
pub fn home_map() -> NetworkMap {
    let peer = |id: i64, n: &str, ep: &str, kind: EndpointKind| Peer {
        id: NodeId(id),
        name: name(n),
        public_key: homeport_proto::PublicKey(public(id)),
        addrs: addrs(id),
        endpoints: vec![Endpoint {
            addr: ep.parse().unwrap(),
            kind,
        }],
        online: true,
        tags: vec![],
        routes: vec![],
        via: None,
    };
    let peers = [
        peer(LAPTOP, "laptop", "203.0.113.2:41641", EndpointKind::Stun),
        peer(VPS, "vps", "198.51.100.10:41641", EndpointKind::Static),
        peer(NAS, "nas", "10.10.1.4:41641", EndpointKind::Local),
    ];
    NetworkMap {
        version: 1,
        self_node: SelfNode {
            id: NodeId(HOME),
            name: name("home"),
            public_key: homeport_proto::PublicKey(public(HOME)),
            addrs: addrs(HOME),
            prefix_v4: "100.96.0.0/16".parse().unwrap(),
            prefix_v6: "fd7a:115c:a1e0::/64".parse().unwrap(),
            tags: vec![],
            routes: vec![],
            mesh_domain: None,
        },
        peers: peers
            .into_iter()
            .map(|p| (p.id, p))
            .collect::<BTreeMap<_, _>>(),
        filter: PacketFilter {
            allow_all: false,
            rules: vec![
                FilterRule {
                    sources: vec![
                        "100.96.0.2/32".parse().unwrap(),
                        "fd7a:115c:a1e0::2/128".parse().unwrap(),
                    ],
                    protos: vec![Proto::Tcp],
                    ports: vec![PortRange::single(22)],
                    dests: vec![],
                },
                FilterRule {
                    sources: vec!["100.96.0.0/16".parse().unwrap()],
                    protos: vec![Proto::Udp, Proto::Icmp],
                    ports: vec![
                        PortRange::single(53),
                        PortRange {
                            first: 5000,
                            last: 6000,
                        },
                    ],
                    dests: vec![],
                },
            ],
        },
        publish: vec![
            rule(1, VPS, PublishProto::Tcp, 32400, HOME, 32400),
            rule(2, VPS, PublishProto::Udp, 443, HOME, 443),
            rule(3, HOME, PublishProto::Tcp, 8080, NAS, NAS_PORT),
        ],
        relays: vec![RelayInfo {
            udp: Some(RELAY_ADDR.parse().unwrap()),
            stun: Some(RELAY_ADDR.parse().unwrap()),
            public_key: Some(homeport_proto::PublicKey(public(9))),
        }],
        coordinators: vec![],
        device_filters: vec![],
    }
}

/// The home node's engine with [`home_map`] applied, and the fake clock of the runs.
pub struct World {
    pub engine: Engine,
    base: Instant,
    runs: AtomicU64,
    /// Disco keys home shares with each peer (by id).
    disco: HashMap<i64, LessSafeKey>,
    /// One run at a time (the replay test may run targets on several threads).
    lock: Mutex<()>,
}

impl World {
    pub fn get() -> &'static World {
        static W: OnceLock<World> = OnceLock::new();
        W.get_or_init(|| {
            let base = Instant::now();
            let engine = Engine::new(&private_key(HOME), base, 0, [1; 32]);
            engine.apply_map(&home_map(), base);
            World {
                engine,
                base,
                runs: AtomicU64::new(0),
                disco: PEERS
                    .iter()
                    .map(|&p| (p, disco::key(&secret(HOME), &public(p))))
                    .collect(),
                lock: Mutex::new(()),
            }
        })
    }

    /// Starts a run: the time one hour after the last run's start, with the engine's tables
    /// expired (its once-a-second housekeeping runs in `tick`).
    fn begin(&self) -> (std::sync::MutexGuard<'_, ()>, Instant) {
        let g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.runs.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.base + Duration::from_secs(3600) * n as u32;
        self.engine.handle_timeout(now);
        // What the last run queued is sent nowhere.
        self.engine.flush_transmits(|_, _| {});
        (g, now)
    }
}

/// A disco packet from `sender` whose sealed body is `body` (any bytes: the fuzzer's), sealed
/// under `key` as [`disco::seal`] does, with a fixed nonce.
pub fn seal_disco_body(key: &LessSafeKey, sender: &[u8; 32], body: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(DISCO_HEADER_LEN + body.len() + 16);
    d.extend_from_slice(&DISCO_MAGIC);
    d.extend_from_slice(sender);
    d.extend_from_slice(&[0u8; 12]);
    let mut b = body.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0u8; 12]),
            Aad::from(&d[..DISCO_HEADER_LEN]),
            &mut b,
        )
        .expect("sealing a short body");
    d.extend_from_slice(&b);
    d.extend_from_slice(tag.as_ref());
    d
}

fn in_mesh_prefix(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.octets()[..2] == [100, 96],
        IpAddr::V6(a) => a.segments()[..4] == [0xfd7a, 0x115c, 0xa1e0, 0],
    }
}

// ---------------------------------------------------------------------------------------------
// IP packet parse + the filter decision.

/// Records are packets through the home node: control byte bits 0-1 pick the peer (laptop,
/// VPS, NAS, laptop), bit 2 the direction (0: decrypted from that peer, through the inbound
/// admission; 1: read from the TUN, through `encapsulate`), bits 3-7 advance time by that many
/// 250 ms steps first.
///
/// Checks the parser's invariants and the policy of [`home_map`] on every admitted packet: a
/// public source only from the VPS to a published port; a mesh source to elsewhere only as the
/// NAS's reply of the published flow; a TCP SYN only from the laptop to port 22; UDP only to
/// the allowed ports or as a reply to a flow home opened; no other protocol; non-echo ICMP only
/// as an error; a later fragment only after its admitted first fragment.
pub fn ip_filter(data: &[u8]) {
    let w = World::get();
    let (_g, mut now) = w.begin();
    let t = w.engine.snapshot();
    let home = addrs(HOME);
    // UDP flows home opened: (remote, remote port, local port).
    let mut udp_out: HashSet<(IpAddr, u16, u16)> = HashSet::new();
    // First fragments admitted: (peer, src, dst, id).
    let mut firsts: HashSet<(i64, IpAddr, IpAddr, u32)> = HashSet::new();
    let mut out = vec![0u8; 4096];
    for (h, pkt) in records(data) {
        now += Duration::from_millis(250) * (h >> 3) as u32;
        let peer = PEERS[(h & 3) as usize % PEERS.len()];
        let info = packet::parse(pkt);
        check_parse(pkt, info.as_ref());
        if h & 4 != 0 {
            if let Some(i) = &info
                && i.proto == packet::PROTO_UDP
                && !matches!(i.frag, Frag::Later { .. })
            {
                udp_out.insert((i.dst, i.dst_port, i.src_port));
            }
            if out.len() < pkt.len() + 200 {
                out.resize(pkt.len() + 200, 0);
            }
            let _ = w.engine.encapsulate(&t, pkt, &mut out, now);
            continue;
        }
        let admitted = w.engine.fuzz_admit(&t, NodeId(peer), pkt, now).is_ok();
        let Some(i) = info else {
            assert!(!admitted, "a packet that does not parse was admitted");
            continue;
        };
        if !admitted {
            continue;
        }
        let from = addrs(peer);
        if let Frag::Later { id, .. } = i.frag {
            assert!(
                firsts.contains(&(peer, i.src, i.dst, id)),
                "a later fragment passed without its first fragment: {i:?} from {peer}"
            );
            continue;
        }
        if let Frag::First { id } = i.frag {
            firsts.insert((peer, i.src, i.dst, id));
        }
        if !from.contains(i.src) {
            assert!(
                peer == VPS
                    && home.contains(i.dst)
                    && !in_mesh_prefix(i.src)
                    && PUBLISHED_TO_HOME.contains(&(i.proto, i.dst_port)),
                "a public source was admitted: {i:?} from {peer}"
            );
            continue;
        }
        if !home.contains(i.dst) {
            assert!(
                peer == NAS
                    && i.proto == packet::PROTO_TCP
                    && i.src_port == NAS_PORT
                    && !in_mesh_prefix(i.dst),
                "a mesh packet not for home was admitted: {i:?} from {peer}"
            );
            continue;
        }
        match i.proto {
            packet::PROTO_TCP => assert!(
                !i.opens_tcp() || (peer == LAPTOP && i.dst_port == 22),
                "a TCP SYN the filter forbids was admitted: {i:?} from {peer}"
            ),
            packet::PROTO_UDP => assert!(
                (i.src.is_ipv4() && (i.dst_port == 53 || (5000..=6000).contains(&i.dst_port)))
                    || udp_out.contains(&(i.src, i.src_port, i.dst_port)),
                "a UDP datagram the filter forbids was admitted: {i:?} from {peer}"
            ),
            packet::PROTO_ICMP | packet::PROTO_ICMPV6 => assert!(
                (i.is_echo_request() && i.src.is_ipv4()) || i.is_echo_reply() || i.is_icmp_error(),
                "ICMP the filter forbids was admitted: {i:?} from {peer}"
            ),
            p => panic!("protocol {p} was admitted under a restrictive filter: {i:?}"),
        }
    }
}

fn check_parse(pkt: &[u8], info: Option<&PacketInfo>) {
    let Some(i) = info else { return };
    assert_eq!(
        packet::dst_addr(pkt),
        Some(i.dst),
        "dst_addr disagrees with parse"
    );
    if let Frag::Later { .. } = i.frag {
        assert_eq!((i.src_port, i.dst_port, i.l4_hdr), (0, 0, 0));
        return;
    }
    assert!(
        i.l4_off as usize + i.l4_hdr as usize <= pkt.len(),
        "transport header past the packet's end: {i:?}, {} bytes",
        pkt.len()
    );
    match i.proto {
        packet::PROTO_TCP => assert!(i.l4_hdr >= 20),
        packet::PROTO_UDP | packet::PROTO_ICMP | packet::PROTO_ICMPV6 => assert_eq!(i.l4_hdr, 8),
        _ => {}
    }
    let _ = packet::quoted(pkt, i);
}

// ---------------------------------------------------------------------------------------------
// Disco.

/// Byte 0 bit 0: 0 = the rest is a datagram, opened as it is; 1 = the rest is a plaintext body,
/// sealed with the laptop's key first (what a mesh node could send). Bits 1-2 pick where the
/// engine sees it come from. Whatever `open` accepts must seal and open to the same message;
/// the datagram then goes to the home engine's `handle_disco`.
pub fn disco_open(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let w = World::get();
    let key = &w.disco[&LAPTOP];
    let d = if mode & 1 == 1 {
        seal_disco_body(key, &public(LAPTOP), rest)
    } else {
        rest.to_vec()
    };
    let mut scratch = [0u8; disco::MAX_DISCO];
    if let Some(msg) = disco::open(key, &d, &mut scratch) {
        let mut out = [0u8; disco::MAX_DISCO];
        let n = disco::seal(key, &public(LAPTOP), [5; 12], &msg, &mut out);
        assert!(n <= disco::MAX_DISCO);
        assert_eq!(
            disco::open(key, &out[..n], &mut scratch),
            Some(msg),
            "a message does not survive seal and open"
        );
        assert_eq!(disco::sender(&d), Some(public(LAPTOP)));
    }
    let (_g, now) = w.begin();
    let from: SocketAddr = match (mode >> 1) & 3 {
        0 => "203.0.113.2:41641",
        1 => "203.0.113.99:5000",
        2 => "[2001:db8::2]:41641",
        _ => "10.10.1.2:41641",
    }
    .parse()
    .unwrap();
    let t = w.engine.snapshot();
    w.engine.handle_disco(&t, from, &d, now);
}

// ---------------------------------------------------------------------------------------------
// The coordinator's relay.

/// Node keys the relay knows in the relay targets.
const RELAY_NODES: [i64; 2] = [LAPTOP, VPS];

fn relay_bind(node: i64, unix: u64) -> [u8; relay::BIND_LEN] {
    static MACS: OnceLock<Vec<ring::hmac::Key>> = OnceLock::new();
    let macs = MACS.get_or_init(|| {
        (0..16)
            .map(|i| {
                let shared = secret(i).diffie_hellman(&PublicKey::from(public(9)));
                ring::hmac::Key::new(ring::hmac::HMAC_SHA256, shared.as_bytes())
            })
            .collect()
    });
    let key = public(node);
    let tag = ring::hmac::sign(&macs[node as usize], &relay::Bind::signed(&key, unix));
    relay::Bind {
        key,
        unix,
        mac: tag.as_ref().try_into().unwrap(),
    }
    .encode()
}

fn relay_send(kind: u8, key: &[u8; 32], payload: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; relay::RELAY_HEADER_LEN];
    relay::write_header(&mut m, kind, key);
    m.extend_from_slice(payload);
    m
}

fn new_relay() -> Arc<homeport_coordinator::relay::Relay> {
    let r = homeport_coordinator::relay::Relay::new(secret(9));
    r.set_authorized(RELAY_NODES.map(public));
    r
}

/// Checks the proto framing functions on one datagram.
fn check_relay_framing(d: &[u8]) {
    if let Some(b) = relay::Bind::decode(d) {
        assert_eq!(&b.encode()[..], d, "a BIND does not encode back to itself");
    }
    if let Some((kind, key, payload)) = relay::parse(d) {
        assert_eq!(relay::kind(d), Some(kind));
        let mut again = relay_send(kind, &key, payload);
        again.truncate(d.len());
        assert_eq!(again, d);
    }
    let mut f = Vec::new();
    if relay::tcp_frame(&mut f, d).is_some() {
        assert_eq!(relay::tcp_frame_len([f[0], f[1]]), d.len());
        assert_eq!(&f[relay::TCP_FRAME_HEADER..], d);
    }
}

/// Records are UDP datagrams to the relay (`Relay::handle`). Control byte bits 0-1 pick the
/// source address; bits 2-3 the framing: 0 the bytes as they are, 1 a valid BIND of node
/// `d[0] & 1` made at the clock plus `d[1..3]` ms minus 32 s (so also replays), 2 a SEND to
/// node `d[0] & 1` carrying `d[1..]`, 3 the relay magic then the bytes; bits 4-7 advance time
/// by that many 8 s steps. A forward must go where the destination key was last bound, and
/// come from where the sender's key was last bound. Then all the datagrams go through once more
/// as one GRO run (`Relay::handle_batch`): whatever leaves is a RECV, or a BOUND or STUN answer
/// to the sender, and a GSO send holds more than one segment.
///
/// One relay serves every run (its X25519 work is cached per key, as in the coordinator); each
/// run starts a day after the last on both of its clocks, so no binding or BIND time of an
/// earlier run is in force.
pub fn relay_server_udp(data: &[u8]) {
    use homeport_coordinator::relay::Action;
    static RELAY: OnceLock<(Arc<homeport_coordinator::relay::Relay>, Instant, Mutex<u64>)> =
        OnceLock::new();
    let (r, base, runs) = RELAY.get_or_init(|| (new_relay(), Instant::now(), Mutex::new(0)));
    let mut runs = runs.lock().unwrap_or_else(|e| e.into_inner());
    *runs += 1;
    const DAY: Duration = Duration::from_secs(86_400);
    let mut now = *base + DAY * *runs as u32;
    let mut unix: u64 = 1_800_000_000_000 + DAY.as_millis() as u64 * *runs;
    let froms: [SocketAddr; 4] = [
        "203.0.113.2:1000".parse().unwrap(),
        "203.0.113.3:2000".parse().unwrap(),
        "[2001:db8::3]:2000".parse().unwrap(),
        "192.0.2.66:4000".parse().unwrap(),
    ];
    let mut bound: HashMap<[u8; 32], SocketAddr> = HashMap::new();
    let mut batch: Vec<Vec<u8>> = vec![];
    for (h, bytes) in records(data) {
        let step = Duration::from_secs(8) * (h >> 4) as u32;
        now += step;
        unix += step.as_millis() as u64;
        let from = froms[(h & 3) as usize];
        let pick = |d: &[u8]| RELAY_NODES[(d.first().copied().unwrap_or(0) & 1) as usize];
        let d: Vec<u8> = match (h >> 2) & 3 {
            0 => bytes.to_vec(),
            1 => {
                let off = bytes
                    .get(1..3)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]) as u64)
                    .unwrap_or(0);
                relay_bind(pick(bytes), (unix + off).saturating_sub(32_000)).to_vec()
            }
            2 => relay_send(
                relay::RELAY_SEND,
                &public(pick(bytes)),
                bytes.get(1..).unwrap_or(&[]),
            ),
            _ => [&relay::RELAY_MAGIC[..], bytes].concat(),
        };
        check_relay_framing(&d);
        match r.handle(from, &d, now, unix) {
            Action::Bound { to, key } => {
                assert_eq!(to, from);
                bound.insert(key, to);
            }
            Action::Forward { to, from_key } => {
                let (_, dst, _) = relay::parse(&d).expect("a forwarded SEND parses");
                assert_eq!(bound.get(&dst), Some(&to), "forwarded to a stale address");
                assert_eq!(
                    bound.get(&from_key),
                    Some(&from),
                    "forwarded for a stale sender"
                );
                assert_ne!(dst, from_key, "forwarded to itself");
            }
            Action::Drop(_) => {}
        }
        batch.push(d);
    }
    // The same datagrams once more as one GRO run (cut to the first one's length, the last
    // shorter), through the batched path the UDP socket takes.
    let Some(stride) = batch.first().map(|d| d.len().max(1)) else {
        return;
    };
    let mut run: Vec<u8> = vec![];
    for d in &batch {
        let mut d = d.clone();
        d.resize(stride, 0);
        run.extend_from_slice(&d);
    }
    if let Some(last) = batch.last() {
        run.truncate(run.len() - stride + last.len().clamp(1, stride));
    }
    let from = froms[data.len() & 3];
    r.handle_batch(from, &mut run, stride, now, &mut |to, out, seg| {
        if let Some(seg) = seg {
            assert!(out.len() > seg, "a GSO send holds more than one segment");
        }
        for d in out.chunks(seg.unwrap_or(out.len()).max(1)) {
            match relay::kind(d) {
                Some(relay::RELAY_RECV) => {}
                Some(relay::RELAY_BOUND) => assert_eq!(to, from, "BOUND to another address"),
                Some(k) => panic!("relay sent a datagram of kind {k}"),
                None => assert_eq!(to, from, "a STUN answer to another address"),
            }
        }
    });
}

/// Byte 0: bit 0 = the stream starts with a valid BIND frame of the laptop (else the fuzzer's
/// bytes must get past the BIND phase themselves), bit 1 = the VPS is bound over UDP first (so
/// SENDs to it are forwarded). The rest is the byte stream a TCP client sends to the relay's
/// fallback (`Relay::serve_stream`), read to its end on a paused clock.
pub fn relay_server_tcp(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut stream = Vec::with_capacity(rest.len() + 80);
    if mode & 1 == 1 {
        relay::tcp_frame(&mut stream, &relay_bind(LAPTOP, unix)).unwrap();
    }
    stream.extend_from_slice(rest);
    let r = new_relay();
    if mode & 2 == 2 {
        let vps: SocketAddr = "198.51.100.20:41641".parse().unwrap();
        r.handle(vps, &relay_bind(VPS, unix), Instant::now(), unix);
    }
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    });
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(stream.len().max(64));
        let slot = r.tcp_slot().expect("a free slot");
        let serve = tokio::spawn(r.clone().serve_stream(server, slot));
        let (mut cr, mut cw) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = cr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let _ = cw.write_all(&stream).await;
        let _ = cw.shutdown().await;
        if let Err(e) = serve.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        drop(cw);
        let _ = drain.await;
        assert_eq!(r.tcp_clients(), 0, "the slot was not given back");
    });
}

// ---------------------------------------------------------------------------------------------
// The node's UDP socket and the relay's TCP fallback, node side.

/// Byte 0 bit 0 = 1: the rest is the byte stream the relay's TCP fallback delivers, cut into
/// frames as the daemon does (length prefix, then `Engine::handle_relay` per frame). Else the
/// rest are records: datagrams arriving at the home node's WireGuard socket, dispatched as the
/// data path does (disco, relay, WireGuard, STUN). Control byte bits 0-1 pick the source (the
/// relay, the laptop, an unknown address, an IPv6 one), bits 2-4 the framing: 0 as they are,
/// 1 a relay RECV from peer `d[0] % 3` carrying `d[1..]`, 2 the same with `d[1..]` sealed as a
/// disco body with that peer's key, 3 `d[1..]` sealed as a disco body of peer `d[0] % 3`,
/// 4 the relay's BOUND, 5-7 as they are; bits 5-7 advance time by that many 500 ms steps.
pub fn node_socket(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let w = World::get();
    let (_g, mut now) = w.begin();
    let t = w.engine.snapshot();
    let relay_addr: SocketAddr = RELAY_ADDR.parse().unwrap();
    let mut out = vec![0u8; 70_000];
    if mode & 1 == 1 {
        // The daemon's tcp_relay_keeper read loop, on a buffer.
        let mut s = rest;
        while s.len() >= relay::TCP_FRAME_HEADER {
            let n = relay::tcp_frame_len([s[0], s[1]]);
            let Some(frame) = s.get(relay::TCP_FRAME_HEADER..relay::TCP_FRAME_HEADER + n) else {
                break;
            };
            check_decap(w.engine.handle_relay(&t, relay_addr, frame, &mut out, now));
            s = &s[relay::TCP_FRAME_HEADER + n..];
        }
        return;
    }
    let froms: [SocketAddr; 4] = [
        relay_addr,
        "203.0.113.2:41641".parse().unwrap(),
        "192.0.2.77:9999".parse().unwrap(),
        "[2001:db8::2]:41641".parse().unwrap(),
    ];
    for (h, bytes) in records(rest) {
        now += Duration::from_millis(500) * (h >> 5) as u32;
        let from = froms[(h & 3) as usize];
        let peer = PEERS[bytes.first().copied().unwrap_or(0) as usize % PEERS.len()];
        let body = bytes.get(1..).unwrap_or(&[]);
        let seg: Vec<u8> = match (h >> 2) & 7 {
            1 => relay_send(relay::RELAY_RECV, &public(peer), body),
            2 => relay_send(
                relay::RELAY_RECV,
                &public(peer),
                &seal_disco_body(&w.disco[&peer], &public(peer), body),
            ),
            3 => seal_disco_body(&w.disco[&peer], &public(peer), body),
            4 => relay::BOUND.to_vec(),
            _ => bytes.to_vec(),
        };
        match classify(&seg) {
            DatagramKind::Disco => {
                w.engine.handle_disco(&t, from, &seg, now);
            }
            DatagramKind::Relay => {
                check_decap(w.engine.handle_relay(&t, from, &seg, &mut out, now));
            }
            DatagramKind::WireGuard => {
                check_decap(w.engine.decapsulate(&t, from, &seg, &mut out, now));
            }
            DatagramKind::Stun => {
                let _ = homeport_node::stun::parse_binding_response(&seg);
            }
            DatagramKind::Unknown => {}
        }
    }
}

fn check_decap(d: Decap) {
    // No input here can make a WireGuard session: nothing may reach the TUN.
    assert!(
        !matches!(d, Decap::ToTun { .. }),
        "a forged datagram reached the TUN"
    );
}

// ---------------------------------------------------------------------------------------------
// STUN.

/// The whole input is a datagram to the coordinator's STUN port, from one of three clients
/// (picked by its length). An answer must be a Binding success the node's client decodes to
/// the request's transaction id and the client's address.
pub fn stun_server(data: &[u8]) {
    let peers: [SocketAddr; 3] = [
        "203.0.113.9:40000".parse().unwrap(),
        "[2001:db8::9]:1".parse().unwrap(),
        "[::ffff:198.51.100.7]:3478".parse().unwrap(),
    ];
    let peer = peers[data.len() % 3];
    let Some(resp) = homeport_coordinator::stun::answer(data, peer) else {
        return;
    };
    assert_eq!(classify(&resp), DatagramKind::Stun);
    let (tx, addr) = homeport_node::stun::parse_binding_response(&resp)
        .expect("the node decodes the coordinator's answer");
    assert_eq!(
        &tx[..],
        &data[8..20],
        "the answer carries another transaction id"
    );
    assert_eq!(addr, SocketAddr::new(peer.ip().to_canonical(), peer.port()));
}

/// The whole input is a datagram the node takes for a STUN answer.
pub fn stun_client(data: &[u8]) {
    if let Ok((tx, _)) = homeport_node::stun::parse_binding_response(data) {
        assert_eq!(&tx[..], &data[8..20]);
    }
}

// ---------------------------------------------------------------------------------------------
// Map messages and applying them.

/// Each line is one message of the map stream (JSON), applied as the daemon does: the first
/// full one makes the map, later ones apply to it. Every message must survive JSON, the map
/// must survive its own persistence (the node saves it and loads it at the next start), and
/// the map then goes to a node engine (peers, filter, publish rules, relay, probe requests)
/// and to the exit's ruleset builder.
pub fn map(data: &[u8]) {
    static ENGINE: OnceLock<(Engine, Instant)> = OnceLock::new();
    let (engine, base) = ENGINE.get_or_init(|| {
        let base = Instant::now();
        (Engine::new(&private_key(HOME), base, 0, [2; 32]), base)
    });
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let now = *base + Duration::from_secs(3600) * (RUNS.fetch_add(1, Ordering::Relaxed) + 1) as u32;
    let mut current: Option<NetworkMap> = None;
    for line in data.split(|b| *b == b'\n').take(MAX_RECORDS) {
        let Ok(m) = serde_json::from_slice::<MapMessage>(line) else {
            continue;
        };
        let again: MapMessage = serde_json::from_str(&serde_json::to_string(&m).unwrap())
            .expect("a map message survives JSON");
        assert_eq!(again, m);
        let probes = m.probe_requests.clone();
        match current.as_mut() {
            Some(map) => {
                if map.apply(m).is_err() {
                    continue;
                }
            }
            None => match NetworkMap::from_full(m) {
                Ok(map) => current = Some(map),
                Err(_) => continue,
            },
        }
        let map = current.as_ref().unwrap();
        let saved = serde_json::to_vec(map).unwrap();
        let loaded: NetworkMap =
            serde_json::from_slice(&saved).expect("a saved map loads at the next start");
        assert_eq!(&loaded, map);
        engine.apply_map(map, now);
        for p in probes.iter().take(4) {
            let eps: Vec<SocketAddr> = p.endpoints.iter().map(|e| e.addr).collect();
            engine.probe_now(p.from, &eps, now);
            engine.flush_transmits(|_, _| {});
        }
        exit_ruleset(map);
    }
}

fn exit_ruleset(map: &NetworkMap) {
    use homeport_exit::nft;
    static CFG: OnceLock<nft::NftConfig> = OnceLock::new();
    let cfg = CFG.get_or_init(|| {
        homeport_exit::config::resolve_publish(
            Default::default(),
            &toml::Table::new(),
            Path::new("exit.toml"),
        )
        .unwrap()
        .nft_config("hpx0", Some(41641))
    });
    let rules = homeport_exit::publisher::rules_for_me(map);
    let (planned, _) = nft::plan(cfg, &rules);
    let planned: Vec<PublishRule> = planned.into_iter().cloned().collect();
    let batch = nft::ruleset(cfg, &planned, &[]);
    serde_json::to_vec(&batch).expect("the ruleset serializes");
}

// ---------------------------------------------------------------------------------------------
// conntrack events.

/// A directory of this process's own for files the targets write.
fn scratch_dir() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("homeport-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// Each line is one line of `conntrack -E` output, parsed and handed to a fresh audit log
/// (rotating at 4 KiB) with rules for TCP 32400 and UDP 443 to home; then the metrics render.
pub fn conntrack(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let audit = homeport_exit::audit::Audit::open_rotating(
        &scratch_dir().join("audit"),
        homeport_exit::audit::Rotation {
            max_bytes: 4096,
            keep: 1,
        },
    )
    .unwrap();
    audit.set_rules(&[
        rule(1, VPS, PublishProto::Tcp, 32400, HOME, 32400),
        rule(2, VPS, PublishProto::Udp, 443, HOME, 443),
    ]);
    for line in text.lines().take(MAX_RECORDS) {
        if let Some(ev) = homeport_exit::audit::parse_ct_event(line) {
            audit.on_ct_event(&ev);
        }
    }
    audit.render_metrics();
}

// ---------------------------------------------------------------------------------------------
// Config files.

/// The input as the text of `coordinator.toml`.
pub fn config_coordinator(data: &[u8]) {
    use homeport_coordinator::config;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut cfg = config::Config::new("/var/lib/homeport-coordinator");
    if config::apply_file(&mut cfg, Path::new("coordinator.toml"), text).is_ok() {
        if let Some(u) = &cfg.public_url {
            config::check_public_url(u).expect("an accepted public-url checks again");
        }
        let _ = cfg.database_url();
    }
}

/// Writes `text` to this process's config file; returns its path.
fn config_file(text: &str) -> PathBuf {
    let p = scratch_dir().join("config.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The input as the text of `node.toml`, parsed and resolved as `homeport up --config` does.
pub fn config_node(data: &[u8]) {
    use homeport_node::config::{NODE_DEFAULTS, UpArgs, parse_config};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_config(text, Path::new("node.toml"), &[]);
    let args = UpArgs {
        config: Some(config_file(text)),
        ..Default::default()
    };
    let resolved = args.resolve(&NODE_DEFAULTS, &[]);
    if parsed.is_err() {
        assert!(
            resolved.is_err(),
            "resolve accepted a file parse_config refuses"
        );
    }
}

/// The input as the text of `exit.toml`, resolved as `homeport-exit up --config` does, then
/// turned into the ruleset's settings.
pub fn config_exit(data: &[u8]) {
    use homeport_node::config::UpArgs;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let args = UpArgs {
        config: Some(config_file(text)),
        ..Default::default()
    };
    if let Ok(c) = homeport_exit::config::resolve(args, Default::default()) {
        let n = c.publish.nft_config(&c.up.tun, c.up.listen_port);
        assert!(n.ban_after >= 1 && n.ban_seconds >= 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds.

/// The hand-made seeds committed under `fuzz/corpus/<target>/seed-<name>`: (target, name,
/// bytes). Written by `HOMEPORT_WRITE_SEEDS=1 cargo test -p homeport-tests --test fuzz_corpus committed_seeds`.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut s = Vec::new();
    ip_seeds(&mut s);
    disco_seeds(&mut s);
    relay_seeds(&mut s);
    node_socket_seeds(&mut s);
    stun_seeds(&mut s);
    map_seeds(&mut s);
    let ct = [
        "[1700000000.500000]\t    [NEW] ipv4     2 tcp      6 120 SYN_SENT src=192.0.2.5 dst=198.51.100.10 sport=36853 dport=32400 [UNREPLIED] src=100.96.0.1 dst=192.0.2.5 sport=32400 dport=36853 id=257805110",
        "[1700000012.000000]\t [UPDATE] ipv4     2 tcp      6 10 CLOSE src=192.0.2.5 dst=198.51.100.10 sport=36853 dport=32400 src=100.96.0.1 dst=192.0.2.5 sport=32400 dport=36853 [ASSURED] id=257805110",
        "[1700000022.000000]\t[DESTROY] ipv4     2 tcp      6 src=192.0.2.5 dst=198.51.100.10 sport=36853 dport=32400 packets=7 bytes=420 src=100.96.0.1 dst=192.0.2.5 sport=32400 dport=36853 packets=9 bytes=5468 [ASSURED] delta-time=22 id=257805110",
    ];
    s.push(("conntrack", "tcp-flow", ct.join("\n").into_bytes()));
    s.push((
        "conntrack",
        "udp-v6-destroy-only",
        b"[1.5] [DESTROY] ipv6 10 udp 17 src=2001:db8:2::5 dst=2001:db8:100::10 sport=5000 dport=443 packets=1 bytes=1200 src=fd7a:115c:a1e0::1 dst=2001:db8:2::5 sport=443 dport=5000 packets=1 bytes=80 id=3\nconntrack v1.4.7 (conntrack-tools): 4 flow events have been shown.".to_vec(),
    ));
    s.push((
        "config_coordinator",
        "example",
        include_bytes!("../../deploy/config/coordinator.toml").to_vec(),
    ));
    s.push((
        "config_coordinator",
        "all-keys",
        b"listen = \"[::]:8443\"\nstate_dir = \"/tmp/c\"\ndatabase-url = \"postgres://u:p@h/db\"\npublic-url = \"https://198.51.100.10:8443/\"\ntls-cert = \"a.pem\"\ntls-key = \"b.pem\"\nmetrics-listen = \"127.0.0.1:9101\"\nprefix-v4 = \"100.64.0.0/10\"\nprefix-v6 = \"fd00::/64\"\nlog-format = \"json\"\n".to_vec(),
    ));
    s.push((
        "config_node",
        "example",
        include_bytes!("../../deploy/config/node.toml").to_vec(),
    ));
    s.push((
        "config_node",
        "port-and-metrics",
        b"listen_port = 41641\nmetrics-listen = \"[::1]:9102\"\nlog-format = \"json\"\n".to_vec(),
    ));
    s.push((
        "config_exit",
        "example",
        include_bytes!("../../deploy/config/exit.toml").to_vec(),
    ));
    s.push((
        "config_exit",
        "sizes-and-lists",
        b"keep-open = \"tcp:22, udp:3478\"\nban-after = 1\nedge_protection = false\naudit-max-bytes = \"1MiB\"\naudit-keep = 0\nlisten-port = 41641\n".to_vec(),
    ));
    s
}

mod build {
    //! Packet builders for the seeds.
    use super::packet::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
    use std::net::IpAddr;

    pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
                p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(l4);
                p
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let proto = if proto == PROTO_ICMP { 58 } else { proto };
                let mut p = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
                p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(l4);
                p
            }
            _ => panic!("mixed families"),
        }
    }

    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
        let mut l4 = vec![0u8; 20];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = flags;
        ip(src.parse().unwrap(), dst.parse().unwrap(), PROTO_TCP, &l4)
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(payload);
        ip(src.parse().unwrap(), dst.parse().unwrap(), PROTO_UDP, &l4)
    }

    pub fn icmp(src: &str, dst: &str, ty: u8, rest: &[u8]) -> Vec<u8> {
        let mut l4 = vec![ty, 0, 0, 0, 0, 1, 0, 1];
        l4.extend_from_slice(rest);
        ip(src.parse().unwrap(), dst.parse().unwrap(), PROTO_ICMP, &l4)
    }

    /// Fragments of `p` (no extension headers) at the payload offsets `cuts` (multiples of 8).
    pub fn fragments(p: &[u8], id: u32, cuts: &[usize]) -> Vec<Vec<u8>> {
        let v4 = p[0] >> 4 == 4;
        let hdr = if v4 { 20 } else { 40 };
        let payload = &p[hdr..];
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(payload.len());
        let last = bounds.len() - 2;
        bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let more = i < last;
                let mut f = p[..hdr].to_vec();
                if v4 {
                    f[4..6].copy_from_slice(&(id as u16).to_be_bytes());
                    let fo = (w[0] / 8) as u16 | if more { 0x2000 } else { 0 };
                    f[6..8].copy_from_slice(&fo.to_be_bytes());
                    f.extend_from_slice(&payload[w[0]..w[1]]);
                    let n = f.len() as u16;
                    f[2..4].copy_from_slice(&n.to_be_bytes());
                } else {
                    let next = f[6];
                    f[6] = 44;
                    f.extend_from_slice(&[next, 0]);
                    f.extend_from_slice(&(w[0] as u16 | more as u16).to_be_bytes());
                    f.extend_from_slice(&id.to_be_bytes());
                    f.extend_from_slice(&payload[w[0]..w[1]]);
                    let n = (f.len() - 40) as u16;
                    f[4..6].copy_from_slice(&n.to_be_bytes());
                }
                f
            })
            .collect()
    }
}

fn ip_seeds(s: &mut Vec<(&'static str, &'static str, Vec<u8>)>) {
    use build::*;
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    // Control bytes: peer (0 laptop, 1 VPS, 2 NAS) | 4 for outbound | time steps << 3.
    let (lap, vps, nas, out) = (0u8, 1u8, 2u8, 4u8);
    let recs = |v: &[(u8, Vec<u8>)]| {
        v.iter()
            .flat_map(|(h, p)| record(*h, p))
            .collect::<Vec<u8>>()
    };
    s.push((
        "ip_filter",
        "laptop-ssh-allowed-http-refused",
        recs(&[
            (lap, tcp("100.96.0.2", 40000, "100.96.0.1", 22, SYN)),
            (lap, tcp("100.96.0.2", 40001, "100.96.0.1", 80, SYN)),
            (lap, tcp("100.96.0.2", 40001, "100.96.0.1", 80, ACK)),
            (
                lap,
                tcp("fd7a:115c:a1e0::2", 40002, "fd7a:115c:a1e0::1", 22, SYN),
            ),
        ]),
    ));
    s.push((
        "ip_filter",
        "udp-out-and-reply",
        recs(&[
            (out, udp("100.96.0.1", 7000, "100.96.0.2", 9000, b"query")),
            (
                lap | 1 << 3,
                udp("100.96.0.2", 9000, "100.96.0.1", 7000, b"answer"),
            ),
            (
                lap,
                udp("100.96.0.2", 9001, "100.96.0.1", 7000, b"stranger"),
            ),
            (nas, udp("100.96.0.4", 1000, "100.96.0.1", 53, b"dns")),
        ]),
    ));
    s.push((
        "ip_filter",
        "published-viewer",
        recs(&[
            (vps, tcp("192.0.2.50", 50000, "100.96.0.1", 32400, SYN)),
            (
                out | vps,
                tcp("100.96.0.1", 32400, "192.0.2.50", 50000, SYN | ACK),
            ),
            (vps, tcp("192.0.2.50", 50000, "100.96.0.1", 32400, ACK)),
            (vps, tcp("192.0.2.50", 50001, "100.96.0.1", 22, SYN)),
            (vps, tcp("100.96.0.2", 50002, "100.96.0.1", 32400, SYN)),
            (lap, tcp("192.0.2.51", 50003, "100.96.0.1", 32400, SYN)),
            (
                vps,
                udp("2001:db8::50", 5000, "fd7a:115c:a1e0::1", 443, b"quic"),
            ),
            (nas, tcp("100.96.0.4", 80, "192.0.2.50", 50004, SYN | ACK)),
            (nas, tcp("100.96.0.4", 80, "100.96.0.2", 50005, SYN | ACK)),
        ]),
    ));
    let big_udp = udp("100.96.0.2", 5353, "100.96.0.1", 53, &[7; 200]);
    let syn_v6 = {
        let mut p = tcp("fd7a:115c:a1e0::2", 40000, "fd7a:115c:a1e0::1", 22, SYN);
        p.extend_from_slice(&[1; 64]);
        let n = (p.len() - 40) as u16;
        p[4..6].copy_from_slice(&n.to_be_bytes());
        p
    };
    let syn_80 = {
        let mut p = tcp("100.96.0.2", 40000, "100.96.0.1", 80, SYN);
        p.extend_from_slice(&[1; 64]);
        p
    };
    let mut frag = Vec::new();
    for f in fragments(&big_udp, 77, &[64, 128]) {
        frag.push((lap, f));
    }
    for f in fragments(&syn_v6, 78, &[24]) {
        frag.push((lap, f));
    }
    // A forbidden SYN split after 8 bytes of its header, and its tail.
    for f in fragments(&syn_80, 79, &[8]) {
        frag.push((lap, f));
    }
    for f in fragments(&syn_80, 80, &[24]) {
        frag.push((lap, f));
    }
    s.push(("ip_filter", "fragments", recs(&frag)));
    let sent = udp("100.96.0.1", 7000, "100.96.0.2", 53, b"q");
    s.push((
        "ip_filter",
        "icmp",
        recs(&[
            (lap, icmp("100.96.0.2", "100.96.0.1", 8, b"ping")),
            (
                lap,
                icmp("fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1", 128, b"ping6"),
            ),
            (lap, icmp("100.96.0.2", "100.96.0.1", 3, &sent[..28])),
            (lap, icmp("100.96.0.2", "100.96.0.1", 5, &sent[..28])),
            (lap, icmp("100.96.0.2", "100.96.0.1", 0, b"pong")),
        ]),
    ));
}

fn disco_seeds(s: &mut Vec<(&'static str, &'static str, Vec<u8>)>) {
    let tx = [7u8; 12];
    let body = |ty: u8, rest: &[u8]| [&[ty][..], &tx, rest].concat();
    let v4 = |a: [u8; 4], port: u16| [&[4u8][..], &a, &port.to_be_bytes()].concat();
    let v6 = |port: u16| {
        let ip: Ipv6Addr = "2001:db8::2".parse().unwrap();
        [&[6u8][..], &ip.octets(), &port.to_be_bytes()].concat()
    };
    s.push(("disco", "ping", [&[1u8][..], &body(1, &[])].concat()));
    s.push((
        "disco",
        "pong-from-ipv6",
        [&[1u8 | 4][..], &body(2, &v4([203, 0, 113, 1], 41641))].concat(),
    ));
    let ready = body(
        3,
        &[
            v4([203, 0, 113, 1], 41641),
            vec![2],
            v4([203, 0, 113, 2], 1),
            v6(2),
        ]
        .concat(),
    );
    s.push(("disco", "ready", [&[1u8][..], &ready].concat()));
    s.push((
        "disco",
        "ready-unknown-address",
        [&[1u8 | 2][..], &body(3, &[0, 0])].concat(),
    ));
    let key = disco::key(&secret(HOME), &public(LAPTOP));
    s.push((
        "disco",
        "sealed-ping",
        [
            &[0u8][..],
            &seal_disco_body(&key, &public(LAPTOP), &body(1, &[])),
        ]
        .concat(),
    ));
}

fn relay_seeds(s: &mut Vec<(&'static str, &'static str, Vec<u8>)>) {
    // relay_server_udp control: source | framing << 2 | 8 s steps << 4.
    const BIND: u8 = 1 << 2;
    const SEND: u8 = 2 << 2;
    const MAGIC: u8 = 3 << 2;
    let now = [0x7d, 0x00]; // + 32000 ms - 32 s: the relay's clock
    let bind = |node: u8| [&[node][..], &now].concat();
    let mut ok = Vec::new();
    ok.extend(record(BIND, &bind(0)));
    ok.extend(record(1 | BIND, &bind(1)));
    ok.extend(record(SEND, b"\x01wireguard bytes"));
    ok.extend(record(1 | SEND, b"\x00back"));
    ok.extend(record(2 | SEND, b"\x00from nowhere"));
    ok.extend(record(SEND, b"\x00to itself"));
    s.push(("relay_server_udp", "bind-and-forward", ok));
    let mut replay = Vec::new();
    replay.extend(record(BIND, &bind(0)));
    replay.extend(record(3 | BIND, &bind(0)));
    replay.extend(record(3 | BIND, &[0, 0, 0]));
    replay.extend(record(2 | BIND, &[0, 0xff, 0xff]));
    replay.extend(record(BIND | 15 << 4, &bind(1)));
    replay.extend(record(SEND, b"\x01stale"));
    s.push(("relay_server_udp", "replays-and-stale", replay));
    let mut junk = Vec::new();
    junk.extend(record(0, b"\xF2hpr"));
    junk.extend(record(0, b"\xF2hpr\x02short"));
    junk.extend(record(MAGIC, &[9, 1, 2, 3]));
    junk.extend(record(MAGIC, &[1; 76]));
    junk.extend(record(0, b"\x00\x01\x00\x00\x21\x12\xa4\x42stun-looking"));
    s.push(("relay_server_udp", "junk", junk));

    // relay_server_tcp: mode (1 = BIND first, 2 = VPS bound over UDP), then the stream.
    let frame = |d: &[u8]| {
        let mut f = Vec::new();
        relay::tcp_frame(&mut f, d).unwrap();
        f
    };
    let send_vps = relay_send(relay::RELAY_SEND, &public(VPS), b"wireguard bytes");
    let send_self = relay_send(relay::RELAY_SEND, &public(LAPTOP), b"loop");
    s.push((
        "relay_server_tcp",
        "bound-then-send",
        [
            &[3u8][..],
            &frame(&send_vps),
            &frame(&send_self),
            &frame(&[1, 2, 3]),
        ]
        .concat(),
    ));
    s.push((
        "relay_server_tcp",
        "frames-before-bind",
        [&[2u8][..], &frame(&send_vps), &frame(&[0; 77])].concat(),
    ));
    s.push((
        "relay_server_tcp",
        "truncated-frame",
        [&[1u8][..], &[0xff, 0xff, 1, 2, 3][..]].concat(),
    ));
    s.push((
        "relay_server_tcp",
        "bind-for-another-key",
        [&[1u8][..], &frame(&relay_bind(VPS, 1_800_000_000_000))].concat(),
    ));
}

fn node_socket_seeds(s: &mut Vec<(&'static str, &'static str, Vec<u8>)>) {
    // Control: source (0 relay, 1 laptop's address, 2 unknown, 3 IPv6) | framing << 2 | time << 5.
    const RECV: u8 = 1 << 2;
    const RECV_DISCO: u8 = 2 << 2;
    const DISCO: u8 = 3 << 2;
    const BOUND: u8 = 4 << 2;
    let tx = [5u8; 12];
    let ping = [&[0u8, 1][..], &tx].concat();
    let ready = [
        &[0u8, 3][..],
        &tx,
        &[4, 203, 0, 113, 2, 0xa2, 0x69, 1, 4, 198, 51, 100, 1, 0, 1],
    ]
    .concat();
    let pong = [&[0u8, 2][..], &tx, &[4, 203, 0, 113, 1, 0xa2, 0x69]].concat();
    let mut wg_data = vec![0u8; 1 + 32 + 16];
    wg_data[1] = 4;
    let mut init = vec![0u8; 148];
    init[0] = 1;
    let stun = homeport_node::stun::binding_response([3; 12], "203.0.113.1:41641".parse().unwrap());
    let mut udp = vec![0u8];
    udp.extend(record(BOUND, &[]));
    udp.extend(record(RECV, &wg_data));
    udp.extend(record(RECV_DISCO, &ping));
    udp.extend(record(RECV_DISCO, &ready));
    udp.extend(record(1 | DISCO, &ping));
    udp.extend(record(1 | DISCO | 1 << 5, &pong));
    udp.extend(record(3 | DISCO, &ready));
    udp.extend(record(2, &init));
    udp.extend(record(0, &stun));
    udp.extend(record(2, b"\x05\x00\x00\x00junk"));
    s.push(("node_socket", "datagrams", udp));
    let frame = |d: &[u8]| {
        let mut f = Vec::new();
        relay::tcp_frame(&mut f, d).unwrap();
        f
    };
    let recv = relay_send(relay::RELAY_RECV, &public(LAPTOP), &wg_data[1..]);
    let recv_unknown = relay_send(relay::RELAY_RECV, &[8; 32], b"x");
    s.push((
        "node_socket",
        "tcp-frames",
        [
            &[1u8][..],
            &frame(&relay::BOUND),
            &frame(&recv),
            &frame(&recv_unknown),
            &frame(b""),
            &[0, 9, 1],
        ]
        .concat(),
    ));
}

fn stun_seeds(s: &mut Vec<(&'static str, &'static str, Vec<u8>)>) {
    let header = |class_method: u16, len: u16| {
        let mut h = Vec::new();
        h.extend_from_slice(&class_method.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        h.extend_from_slice(&[3; 12]);
        h
    };
    s.push(("stun_server", "binding-request", header(0x0001, 0)));
    let software = [&[0x80, 0x22, 0, 3][..], b"abc\0"].concat();
    s.push((
        "stun_server",
        "request-with-software",
        [header(0x0001, 8), software.clone()].concat(),
    ));
    s.push(("stun_server", "indication", header(0x0011, 0)));
    let resp = homeport_node::stun::binding_response([3; 12], "203.0.113.9:40000".parse().unwrap());
    s.push(("stun_server", "response-is-not-answered", resp.clone()));
    s.push(("stun_client", "xor-mapped-v4", resp));
    s.push((
        "stun_client",
        "xor-mapped-v6",
        homeport_node::stun::binding_response([4; 12], "[2001:db8::9]:1".parse().unwrap()),
    ));
    let mapped = [&[0x00, 0x01, 0, 8, 0, 1, 0x9c, 0x40][..], &[203, 0, 113, 9]].concat();
    s.push((
        "stun_client",
        "mapped-only",
        [header(0x0101, 12), mapped].concat(),
    ));
    s.push(("stun_client", "error-response", header(0x0111, 0)));
}

fn map_seeds(s: &mut Vec<(&'static str, &'static str, Vec<u8>)>) {
    let m = home_map();
    let full = MapMessage {
        version: m.version,
        full: true,
        self_node: Some(m.self_node.clone()),
        peers: m.peers.values().cloned().collect(),
        peers_removed: vec![],
        filter: Some(m.filter.clone()),
        publish: Some(m.publish.clone()),
        relays: Some(m.relays.clone()),
        coordinators: None,
        device_filters: None,
        probe_requests: vec![],
    };
    let line = |m: &MapMessage| serde_json::to_string(m).unwrap();
    let mut laptop = m.peers[&NodeId(LAPTOP)].clone();
    laptop.endpoints.push(Endpoint {
        addr: "[2001:db8::2]:41641".parse().unwrap(),
        kind: EndpointKind::Stun,
    });
    let lines = [
        line(&full),
        line(&MapMessage {
            version: 2,
            peers: vec![laptop.clone()],
            probe_requests: vec![homeport_proto::map::ProbeRequest {
                from: NodeId(LAPTOP),
                endpoints: laptop.endpoints.clone(),
            }],
            ..Default::default()
        }),
        line(&MapMessage {
            version: 3,
            peers_removed: vec![NodeId(NAS)],
            filter: Some(PacketFilter::allow_all()),
            publish: Some(vec![]),
            ..Default::default()
        }),
        line(&MapMessage {
            version: 3,
            ..Default::default()
        }),
    ];
    s.push(("map", "full-then-deltas", lines.join("\n").into_bytes()));
    s.push((
        "map",
        "delta-first-and-unknowns",
        [
            r#"{"version":1,"peers_removed":[2]}"#,
            r#"{"version":2,"full":true,"self_node":{"id":3,"name":"vps","public_key":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=","addrs":{"ipv4":"100.96.0.3","ipv6":"fd7a:115c:a1e0::3"},"prefix_v4":"100.96.0.0/16","prefix_v6":"fd7a:115c:a1e0::/64"},"peers":[{"id":1,"name":"home","public_key":"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=","addrs":{"ipv4":"100.96.0.1","ipv6":"fd7a:115c:a1e0::1"},"endpoints":[{"addr":"[2001:db8::1]:1","kind":"warp"}],"online":false}],"filter":{"allow_all":false,"rules":[{"sources":["100.96.0.1/32"],"protos":["sctp"]}]},"publish":[{"id":1,"exit":3,"exit_name":"vps","proto":"quic","port":32400,"target":1,"target_name":"home","target_ipv4":"100.96.0.1","target_ipv6":"fd7a:115c:a1e0::1","target_port":32400}],"relays":[{"udp":null,"stun":null,"public_key":null}],"future_field":42}"#,
        ]
        .join("\n")
        .into_bytes(),
    ));
}
