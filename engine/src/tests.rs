//! Engine tests: engines exchange datagrams through an in-memory network; time is passed in.

use super::packet::build;
use super::*;
use homeport_proto::filter::{FilterRule, PacketFilter, PortRange, Proto};
use homeport_proto::map::{Endpoint, Peer, SelfNode};
use homeport_proto::publish::{Guards, PublishRule};
use ipnet::IpNet;
use std::collections::{BTreeMap, VecDeque};

struct Node {
    key: PrivateKey,
    id: NodeId,
    name: &'static str,
    addrs: MeshAddrs,
    udp: SocketAddr,
    engine: Engine,
}

fn node(id: i64, name: &'static str) -> Node {
    let key = PrivateKey::generate();
    let engine = Engine::new(&key, Instant::now(), 0, [id as u8; 32]);
    Node {
        key,
        id: NodeId(id),
        name,
        addrs: MeshAddrs {
            ipv4: Ipv4Addr::new(100, 96, 0, id as u8),
            ipv6: format!("fd7a::{id}").parse().unwrap(),
        },
        udp: format!("10.0.0.{id}:41641").parse().unwrap(),
        engine,
    }
}

fn map_for(
    me: &Node,
    peers: &[&Node],
    filter: PacketFilter,
    publish: Vec<PublishRule>,
) -> NetworkMap {
    NetworkMap {
        version: 1,
        self_node: SelfNode {
            id: me.id,
            name: NodeName::sanitize(me.name).unwrap(),
            public_key: me.key.public_key(),
            addrs: me.addrs,
            prefix_v4: "100.96.0.0/16".parse().unwrap(),
            prefix_v6: "fd7a::/64".parse().unwrap(),
            tags: vec![],
            routes: vec![],
            mesh_domain: None,
        },
        peers: peers
            .iter()
            .map(|p| {
                (
                    p.id,
                    Peer {
                        id: p.id,
                        name: NodeName::sanitize(p.name).unwrap(),
                        public_key: p.key.public_key(),
                        addrs: p.addrs,
                        endpoints: vec![Endpoint {
                            addr: p.udp,
                            kind: EndpointKind::Local,
                        }],
                        online: true,
                        tags: vec![],
                        routes: vec![],
                        via: None,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
        filter,
        publish,
        relays: vec![],
        coordinators: vec![],
        device_filters: vec![],
    }
}

/// Everything `e` queued for sending: the full-TTL datagrams (to, bytes) and where the openers
/// (low TTL) went.
fn drain(e: &Engine) -> (Vec<(SocketAddr, Vec<u8>)>, Vec<SocketAddr>) {
    let (mut sent, mut openers) = (vec![], vec![]);
    let mut buf = [0u8; MAX_TRANSMIT];
    while let Some(t) = e.poll_transmit(&mut buf) {
        match t.ttl {
            Some(_) => openers.push(t.to),
            None => sent.push((t.to, buf[..t.len].to_vec())),
        }
    }
    (sent, openers)
}

/// Runs `e`'s timers at `now`; returns the full-TTL datagrams it sent.
fn tick(e: &Engine, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
    e.handle_timeout(now);
    drain(e).0
}

/// Datagrams in flight: (from, to, bytes).
#[derive(Default)]
struct Net {
    q: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
}

impl Net {
    /// Delivers everything in flight; returns the packets that reached each node's TUN.
    fn run(&mut self, nodes: &[&Node], now: Instant) -> Vec<(NodeId, Vec<u8>)> {
        let mut tun = vec![];
        let mut guard = 0;
        while let Some((from, to, d)) = self.q.pop_front() {
            guard += 1;
            assert!(guard < 1000, "packet storm");
            let Some(n) = nodes.iter().find(|n| n.udp == to) else {
                continue;
            };
            let t = n.engine.snapshot();
            let mut out = vec![0u8; 2048];
            let r = n.engine.decapsulate(&t, from, &d, &mut out, now);
            for (dst, b) in drain(&n.engine).0 {
                self.q.push_back((n.udp, dst, b));
            }
            match r {
                Decap::ToTun { len } => tun.push((n.id, out[..len].to_vec())),
                Decap::Forward { to, len } => self.q.push_back((n.udp, to, out[..len].to_vec())),
                _ => {}
            }
        }
        tun
    }

    /// A packet read from `n`'s TUN.
    fn send(&mut self, n: &Node, pkt: &[u8], now: Instant) -> Encap {
        let t = n.engine.snapshot();
        let mut out = vec![0u8; pkt.len() + 200];
        let r = n.engine.encapsulate(&t, pkt, &mut out, now);
        match &r {
            Encap::Send { to, len } => self.q.push_back((n.udp, *to, out[..*len].to_vec())),
            _ => {
                for (to, b) in drain(&n.engine).0 {
                    self.q.push_back((n.udp, to, b));
                }
            }
        }
        r
    }
}

fn pair(
    fa: PacketFilter,
    fb: PacketFilter,
    pa: Vec<PublishRule>,
    pb: Vec<PublishRule>,
) -> (Node, Node) {
    let a = node(1, "a");
    let b = node(2, "b");
    a.engine
        .apply_map(&map_for(&a, &[&b], fa, pa), Instant::now());
    b.engine
        .apply_map(&map_for(&b, &[&a], fb, pb), Instant::now());
    (a, b)
}

#[test]
fn handshake_then_data_both_ways() {
    let (a, b) = pair(
        PacketFilter::allow_all(),
        PacketFilter::allow_all(),
        vec![],
        vec![],
    );
    let now = Instant::now();
    let mut net = Net::default();
    let ping = build::echo(a.addrs.ipv4, b.addrs.ipv4);
    assert!(matches!(net.send(&a, &ping, now), Encap::Queued));
    assert!(!net.q.is_empty(), "the initiation went out");
    let got = net.run(&[&a, &b], now);
    // The ping waited for the handshake and then arrived, intact, at b.
    assert_eq!(got, vec![(b.id, ping.clone())]);
    let pong = build::echo(b.addrs.ipv4, a.addrs.ipv4);
    assert!(matches!(net.send(&b, &pong, now), Encap::Send { .. }));
    assert_eq!(net.run(&[&a, &b], now), vec![(a.id, pong)]);
    let pa = a.engine.snapshot().peers[0].clone();
    assert_eq!(pa.path.lock().unwrap().endpoint, Some(b.udp));
    assert!(pa.stats().0.is_some(), "handshake time recorded");
}

#[test]
fn spoofed_source_is_dropped() {
    let (a, b) = pair(
        PacketFilter::allow_all(),
        PacketFilter::allow_all(),
        vec![],
        vec![],
    );
    let now = Instant::now();
    let mut net = Net::default();
    net.send(&a, &build::echo(a.addrs.ipv4, b.addrs.ipv4), now);
    net.run(&[&a, &b], now);
    // a claims another mesh node's address as source.
    let spoof = build::echo(Ipv4Addr::new(100, 96, 0, 9), b.addrs.ipv4);
    net.send(&a, &spoof, now);
    assert!(net.run(&[&a, &b], now).is_empty());
    // and a public address without any publish rule.
    let spoof = build::tcp(
        [192, 0, 2, 50].into(),
        4000,
        b.addrs.ipv4,
        22,
        packet::TCP_SYN,
    );
    net.send(&a, &spoof, now);
    assert!(net.run(&[&a, &b], now).is_empty());
}

#[test]
fn filter_admits_only_allowed_new_flows() {
    let a = node(1, "a");
    let b = node(2, "b");
    let only_ssh = PacketFilter {
        allow_all: false,
        rules: vec![FilterRule {
            sources: vec![IpNet::from(IpAddr::V4(a.addrs.ipv4))],
            protos: vec![Proto::Tcp],
            ports: vec![PortRange::single(22)],
            dests: vec![],
        }],
    };
    a.engine.apply_map(
        &map_for(&a, &[&b], PacketFilter::allow_all(), vec![]),
        Instant::now(),
    );
    b.engine
        .apply_map(&map_for(&b, &[&a], only_ssh, vec![]), Instant::now());
    let now = Instant::now();
    let mut net = Net::default();
    let syn22 = build::tcp(a.addrs.ipv4, 5000, b.addrs.ipv4, 22, packet::TCP_SYN);
    net.send(&a, &syn22, now);
    assert_eq!(net.run(&[&a, &b], now), vec![(b.id, syn22)]);
    let syn80 = build::tcp(a.addrs.ipv4, 5001, b.addrs.ipv4, 80, packet::TCP_SYN);
    net.send(&a, &syn80, now);
    assert!(
        net.run(&[&a, &b], now).is_empty(),
        "SYN to 80 must be filtered"
    );
    let ping = build::echo(a.addrs.ipv4, b.addrs.ipv4);
    net.send(&a, &ping, now);
    assert!(
        net.run(&[&a, &b], now).is_empty(),
        "echo request not allowed"
    );
    // An established-flow segment (ACK) passes: replies are not re-checked.
    let ack = build::tcp(a.addrs.ipv4, 5000, b.addrs.ipv4, 22, packet::TCP_ACK);
    net.send(&a, &ack, now);
    assert_eq!(net.run(&[&a, &b], now).len(), 1);
    // UDP: b opens a flow to a:53; a's reply passes b's filter, a fresh datagram does not.
    let out = build::udp(b.addrs.ipv4, 7000, a.addrs.ipv4, 53, b"q");
    net.send(&b, &out, now);
    assert_eq!(net.run(&[&a, &b], now).len(), 1);
    let reply = build::udp(a.addrs.ipv4, 53, b.addrs.ipv4, 7000, b"r");
    net.send(&a, &reply, now);
    assert_eq!(net.run(&[&a, &b], now), vec![(b.id, reply)]);
    let fresh = build::udp(a.addrs.ipv4, 53, b.addrs.ipv4, 7001, b"x");
    net.send(&a, &fresh, now);
    assert!(net.run(&[&a, &b], now).is_empty());
}

fn rule(exit: &Node, target: &Node, port: u16) -> PublishRule {
    PublishRule {
        id: 1,
        exit: exit.id,
        exit_name: NodeName::sanitize(exit.name).unwrap(),
        proto: PublishProto::Tcp,
        port,
        target: target.id,
        target_name: NodeName::sanitize(target.name).unwrap(),
        target_ipv4: target.addrs.ipv4,
        target_ipv6: target.addrs.ipv6,
        target_port: port,
        guards: Guards::default(),
    }
}

#[test]
fn published_flow_enters_only_via_exit_and_replies_return_to_it() {
    let exit = node(1, "vps");
    let home = node(2, "home");
    let other = node(3, "laptop");
    let r = rule(&exit, &home, 32400);
    exit.engine.apply_map(
        &map_for(
            &exit,
            &[&home, &other],
            PacketFilter::allow_all(),
            vec![r.clone()],
        ),
        Instant::now(),
    );
    home.engine.apply_map(
        &map_for(&home, &[&exit, &other], PacketFilter::allow_all(), vec![r]),
        Instant::now(),
    );
    other.engine.apply_map(
        &map_for(&other, &[&exit, &home], PacketFilter::allow_all(), vec![]),
        Instant::now(),
    );
    let all = [&exit, &home, &other];
    let now = Instant::now();
    let mut net = Net::default();
    let viewer = Ipv4Addr::new(192, 0, 2, 50);
    // Viewer's SYN, DNATed by the exit's kernel, read from the exit's TUN.
    let syn = build::tcp(viewer, 40000, home.addrs.ipv4, 32400, packet::TCP_SYN);
    net.send(&exit, &syn, now);
    assert_eq!(net.run(&all, now), vec![(home.id, syn)]);
    // Not the published port: dropped at home.
    let syn22 = build::tcp(viewer, 40001, home.addrs.ipv4, 22, packet::TCP_SYN);
    net.send(&exit, &syn22, now);
    assert!(net.run(&all, now).is_empty());
    // Another node cannot inject public sources even to the published port.
    let forged = build::tcp(viewer, 40002, home.addrs.ipv4, 32400, packet::TCP_SYN);
    net.send(&other, &forged, now);
    assert!(net.run(&all, now).is_empty());
    // Home's reply goes to the exit (flow table) and the exit accepts it for a public address.
    let synack = build::tcp(
        home.addrs.ipv4,
        32400,
        viewer,
        40000,
        packet::TCP_SYN | packet::TCP_ACK,
    );
    let r = net.send(&home, &synack, now);
    assert!(
        matches!(r, Encap::Send { to, .. } if to == exit.udp),
        "{r:?}"
    );
    assert_eq!(net.run(&all, now), vec![(exit.id, synack)]);
    // A packet to a public address without a flow has no route (home is no general gateway user).
    let stray = build::tcp(
        home.addrs.ipv4,
        32400,
        Ipv4Addr::new(192, 0, 2, 99),
        1,
        packet::TCP_ACK,
    );
    assert!(matches!(
        net.send(&home, &stray, now),
        Encap::Drop(DropReason::NoRoute)
    ));
    // The exit refuses a non-reply to a public address from the target (no gateway use).
    let sneaky = build::tcp(
        home.addrs.ipv4,
        5555,
        Ipv4Addr::new(192, 0, 2, 99),
        80,
        packet::TCP_SYN,
    );
    // Home would need a flow for that; force it through the exit's peer directly.
    home.engine.flows.inbound(
        FlowKey::new(
            packet::PROTO_TCP,
            Ipv4Addr::new(192, 0, 2, 99).into(),
            80,
            5555,
        ),
        exit.id,
        false,
        now,
    );
    net.send(&home, &sneaky, now);
    assert!(
        net.run(&all, now).is_empty(),
        "exit must refuse gateway use"
    );
}

#[test]
fn removed_peer_is_cut_off_and_rekeyed_peer_gets_a_new_session() {
    let (a, b) = pair(
        PacketFilter::allow_all(),
        PacketFilter::allow_all(),
        vec![],
        vec![],
    );
    let now = Instant::now();
    let mut net = Net::default();
    let ping = build::echo(a.addrs.ipv4, b.addrs.ipv4);
    net.send(&a, &ping, now);
    assert_eq!(net.run(&[&a, &b], now).len(), 1);
    // b's map loses a: a's packets are refused at once.
    b.engine.apply_map(
        &map_for(&b, &[], PacketFilter::allow_all(), vec![]),
        Instant::now(),
    );
    net.send(&a, &ping, now);
    assert!(net.run(&[&a, &b], now).is_empty());
    assert!(matches!(
        net.send(&b, &build::echo(b.addrs.ipv4, a.addrs.ipv4), now),
        Encap::Drop(DropReason::NoRoute)
    ));
    // a comes back with a new key: a new handshake is needed and works.
    let a2 = Node {
        key: PrivateKey::generate(),
        ..node(1, "a")
    };
    let a2 = Node {
        engine: Engine::new(&a2.key, Instant::now(), 0, [9; 32]),
        ..a2
    };
    a2.engine.apply_map(
        &map_for(&a2, &[&b], PacketFilter::allow_all(), vec![]),
        Instant::now(),
    );
    b.engine.apply_map(
        &map_for(&b, &[&a2], PacketFilter::allow_all(), vec![]),
        Instant::now(),
    );
    assert!(matches!(net.send(&a2, &ping, now), Encap::Queued));
    assert!(!net.q.is_empty(), "the initiation went out");
    assert_eq!(net.run(&[&a2, &b], now), vec![(b.id, ping)]);
}

#[test]
fn unchanged_peer_keeps_its_session_across_map_updates() {
    let (a, b) = pair(
        PacketFilter::allow_all(),
        PacketFilter::allow_all(),
        vec![],
        vec![],
    );
    let now = Instant::now();
    let mut net = Net::default();
    let ping = build::echo(a.addrs.ipv4, b.addrs.ipv4);
    net.send(&a, &ping, now);
    net.run(&[&a, &b], now);
    let before = a.engine.snapshot().peers[0].index;
    a.engine.apply_map(
        &map_for(&a, &[&b], PacketFilter::allow_all(), vec![]),
        Instant::now(),
    );
    assert_eq!(a.engine.snapshot().peers[0].index, before);
    // Still an established session: no new handshake.
    assert!(matches!(net.send(&a, &ping, now), Encap::Send { .. }));
}

#[test]
fn garbage_datagrams_are_dropped_without_panic() {
    let (a, b) = pair(
        PacketFilter::allow_all(),
        PacketFilter::allow_all(),
        vec![],
        vec![],
    );
    let t = b.engine.snapshot();
    let mut out = vec![0u8; 2048];
    let now = Instant::now();
    for d in [
        &[][..],
        &[1, 0, 0, 0][..],
        &[4, 0, 0, 0, 1, 2, 3][..],
        &[9u8; 200][..],
        &[2u8; 92][..],
    ] {
        let r = b.engine.decapsulate(&t, a.udp, d, &mut out, now);
        assert!(matches!(r, Decap::Drop(_)), "{r:?}");
        assert!(!b.engine.has_transmit(), "no answer to garbage");
    }
    let ta = a.engine.snapshot();
    assert!(matches!(
        a.engine.encapsulate(&ta, &[0x45, 1], &mut out, now),
        Encap::Drop(DropReason::Malformed)
    ));
}

/// With boringtun's clock mocked, timer behaviour is asserted exactly.
#[cfg(feature = "fake-time")]
mod fake_time {
    use super::*;
    use mock_instant::MockClock;

    fn tick_all(nodes: &[&Node], net: &mut Net, now: Instant) {
        for n in nodes {
            for (to, b) in tick(&n.engine, now) {
                net.q.push_back((n.udp, to, b));
            }
        }
    }

    #[test]
    fn keepalive_every_25s_and_rekey_after_120s() {
        let (a, b) = pair(
            PacketFilter::allow_all(),
            PacketFilter::allow_all(),
            vec![],
            vec![],
        );
        let mut now = Instant::now();
        let mut net = Net::default();
        net.send(&a, &build::echo(a.addrs.ipv4, b.addrs.ipv4), now);
        net.run(&[&a, &b], now);
        let hs0 = a.engine.snapshot().peers[0]
            .handshakes
            .load(Ordering::Relaxed);
        // Idle: nothing sent before the keepalive interval.
        let mut sent_at = vec![];
        for step in 1..=(130 * 4) {
            MockClock::advance(TICK);
            now += TICK;
            tick_all(&[&a, &b], &mut net, now);
            if net
                .q
                .iter()
                .any(|(f, _, d)| *f == a.udp && d.len() == 32 && d[0] == 4)
            {
                sent_at.push(step as f64 * 0.25);
            }
            net.run(&[&a, &b], now);
        }
        assert!(!sent_at.is_empty(), "persistent keepalive sent");
        let first = sent_at[0];
        assert!(
            (24.0..=26.5).contains(&first),
            "first keepalive at {first}s"
        );
        let hs1 = a.engine.snapshot().peers[0]
            .handshakes
            .load(Ordering::Relaxed)
            + b.engine.snapshot().peers[0]
                .handshakes
                .load(Ordering::Relaxed);
        assert!(hs1 > hs0, "a rekey handshake happened within 130 s");
    }

    #[test]
    fn lost_handshake_is_retried_every_5s_to_every_candidate() {
        let (a, b) = pair(
            PacketFilter::allow_all(),
            PacketFilter::allow_all(),
            vec![],
            vec![],
        );
        let mut now = Instant::now();
        let mut net = Net::default();
        assert!(matches!(
            net.send(&a, &build::echo(a.addrs.ipv4, b.addrs.ipv4), now),
            Encap::Queued
        ));
        net.q.clear(); // the first initiation is lost
        let mut inits = vec![];
        for step in 1..=(12 * 4) {
            MockClock::advance(TICK);
            now += TICK;
            tick_all(&[&a], &mut net, now);
            for (_, to, d) in net.q.drain(..) {
                if is_handshake_init(&d) {
                    assert_eq!(to, b.udp);
                    inits.push(step as f64 * 0.25);
                }
            }
        }
        assert!(inits.len() >= 2, "retries: {inits:?}");
        let gap = inits[1] - inits[0];
        assert!((4.5..=6.0).contains(&gap), "retry gap {gap}s ({inits:?})");
        // Once the network works again, the next retry completes the handshake and the queued
        // ping is delivered.
        let mut delivered = vec![];
        for _ in 0..(8 * 4) {
            MockClock::advance(TICK);
            now += TICK;
            tick_all(&[&a], &mut net, now);
            delivered.extend(net.run(&[&a, &b], now));
        }
        assert_eq!(delivered.len(), 1, "queued ping delivered after the retry");
    }
}

/// A simulated NAT in front of one node: endpoint-independent mapping (easy) or one public port
/// per destination (hard); both filter inbound to destinations the inside has sent to (Linux
/// conntrack behaviour).
struct Nat {
    public_ip: IpAddr,
    hard: bool,
    inside: SocketAddr,
    /// (remote, public port) pairs opened by outbound packets.
    open: Vec<(SocketAddr, u16)>,
    next_port: u16,
}

impl Nat {
    fn new(public: &str, inside: SocketAddr, hard: bool) -> Nat {
        Nat {
            public_ip: public.parse().unwrap(),
            hard,
            inside,
            open: vec![],
            next_port: 30000,
        }
    }
    fn easy_port(&self) -> u16 {
        40000
    }
    /// Outbound: returns the public source address.
    fn out(&mut self, to: SocketAddr) -> SocketAddr {
        let port = if self.hard {
            match self.open.iter().find(|(r, _)| *r == to) {
                Some((_, p)) => *p,
                None => {
                    self.next_port += 7;
                    self.next_port
                }
            }
        } else {
            self.easy_port()
        };
        if !self.open.contains(&(to, port)) {
            self.open.push((to, port));
        }
        SocketAddr::new(self.public_ip, port)
    }
    /// Inbound to `public` from `from`: the inside address when allowed.
    fn inbound(&self, from: SocketAddr, public: SocketAddr) -> Option<SocketAddr> {
        (public.ip() == self.public_ip && self.open.contains(&(from, public.port())))
            .then_some(self.inside)
    }
}

/// Runs `secs` of fake time (for the path logic; boringtun uses its own clock) over a network
/// where `a` is behind `na` and `b` behind `nb`. Returns when a direct path a→b was confirmed.
fn run_natted(a: &Node, b: &Node, na: &mut Nat, nb: &mut Nat, secs: u64) -> Option<f64> {
    let start = Instant::now();
    let mut now = start;
    let step = Duration::from_millis(50);
    let mut wire: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)> = VecDeque::new();
    let send_via = |nat: &mut Nat, to: SocketAddr, d: &[u8], wire: &mut VecDeque<_>| {
        let src = nat.out(to);
        wire.push_back((src, to, d.to_vec()));
    };
    while now.duration_since(start) < Duration::from_secs(secs) {
        now += step;
        for (to, d) in tick(&a.engine, now) {
            send_via(na, to, &d, &mut wire);
        }
        for (to, d) in tick(&b.engine, now) {
            send_via(nb, to, &d, &mut wire);
        }
        while let Some((from, to, d)) = wire.pop_front() {
            let (node, nat) = if to.ip() == na.public_ip {
                (a, &mut *na)
            } else {
                (b, &mut *nb)
            };
            let Some(_inside) = nat.inbound(from, to) else {
                continue;
            };
            let t = node.engine.snapshot();
            if homeport_proto::disco::classify(&d) == homeport_proto::disco::DatagramKind::Disco {
                node.engine.handle_disco(&t, from, &d, now);
            }
            for (to, x) in drain(&node.engine).0 {
                send_via(nat, to, &x, &mut wire);
            }
        }
        let t = a.engine.snapshot();
        let p = t.peers[0].path.lock().unwrap();
        if p.direct.is_some() {
            return Some(now.duration_since(start).as_secs_f64());
        }
    }
    None
}

fn natted_pair(hard: bool) -> (Node, Node, Nat, Nat) {
    let a = node(1, "home");
    let b = node(2, "laptop");
    let mut na = Nat::new("203.0.113.2", a.udp, hard);
    let mut nb = Nat::new("203.0.113.3", b.udp, hard);
    // What STUN would have told each side: its public mapping (for a hard NAT, the mapping seen
    // by the STUN server, useless towards anyone else).
    let stun = "198.51.100.10:3478".parse().unwrap();
    let ea = na.out(stun);
    let eb = nb.out(stun);
    na.open.clear();
    nb.open.clear();
    let mut ma = map_for(&a, &[&b], PacketFilter::allow_all(), vec![]);
    let mut mb = map_for(&b, &[&a], PacketFilter::allow_all(), vec![]);
    ma.peers.get_mut(&b.id).unwrap().endpoints.push(Endpoint {
        addr: eb,
        kind: EndpointKind::Stun,
    });
    mb.peers.get_mut(&a.id).unwrap().endpoints.push(Endpoint {
        addr: ea,
        kind: EndpointKind::Stun,
    });
    a.engine.apply_map(&ma, Instant::now());
    b.engine.apply_map(&mb, Instant::now());
    // The simulated NATs model mapping and filtering, not Linux's conntrack clash: no openers.
    a.engine.set_open_ttl(0);
    b.engine.set_open_ttl(0);
    (a, b, na, nb)
}

#[test]
fn simultaneous_probing_opens_two_easy_nats() {
    let (a, b, mut na, mut nb) = natted_pair(false);
    let t = run_natted(&a, &b, &mut na, &mut nb, 10).expect("direct path through two easy NATs");
    assert!(t <= 2.0, "direct path after {t}s");
    let ta = a.engine.snapshot();
    let p = ta.peers[0].path.lock().unwrap();
    assert_eq!(
        p.endpoint.unwrap().ip(),
        "203.0.113.3".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn hard_nats_find_no_direct_path() {
    let (a, b, mut na, mut nb) = natted_pair(true);
    assert_eq!(run_natted(&a, &b, &mut na, &mut nb, 10), None);
}

/// Runs `a` alone for `secs` of fake time from `start` (its peer unreachable), in 50 ms steps;
/// returns what it sent: (to, bytes), and the openers it queued.
fn run_alone(a: &Node, start: Instant, secs: u64) -> (Vec<(SocketAddr, Vec<u8>)>, Vec<SocketAddr>) {
    let mut sent = vec![];
    let mut openers = vec![];
    let mut now = start;
    while now.duration_since(start) < Duration::from_secs(secs) {
        now += Duration::from_millis(50);
        a.engine.handle_timeout(now);
        let (s, o) = drain(&a.engine);
        sent.extend(s);
        openers.extend(o);
    }
    (sent, openers)
}

/// A pair through two easy NATs with a confirmed direct path; then `a` is told it sits behind
/// NAT (opener TTL 2) so its punching is gated as in a real deployment.
fn pair_with_direct_path() -> (Node, Node, Instant) {
    let (a, b, mut na, mut nb) = natted_pair(false);
    run_natted(&a, &b, &mut na, &mut nb, 10).expect("a direct path first");
    a.engine.set_open_ttl(2);
    // run_natted steps its own clock from a real Instant; continue well after it.
    (a, b, Instant::now() + Duration::from_secs(20))
}

#[test]
fn a_lost_direct_path_that_cannot_be_found_again_asks_for_a_fresh_port() {
    let (a, _b, t0) = pair_with_direct_path();
    a.engine.set_rebind_allowed(true);
    // The peer's NAT answers nothing any more: the direct path dies (4.5 s), an attempt runs and
    // fails (LOST_PATH_ATTEMPT, 4 s: a path that worked moments ago comes back within a few round
    // trips if it can), and then the engine asks for a fresh port instead of waiting.
    let (_, _) = run_alone(&a, t0, 6);
    let t6 = t0 + Duration::from_secs(6);
    assert!(
        !a.engine.take_rebind(t6),
        "not while the attempt still runs"
    );
    let (_, _) = run_alone(&a, t6, 14);
    let t20 = t0 + Duration::from_secs(20);
    let events: Vec<Event> = std::iter::from_fn(|| a.engine.poll_event()).collect();
    assert!(
        events.contains(&Event::RebindWanted),
        "the shell is told: {events:?}"
    );
    assert!(
        a.engine.take_rebind(t20),
        "a fresh port after the failed attempt"
    );
    assert!(!a.engine.take_rebind(t20), "asked once");
    // After the move: no quiet time, no direct path claimed from the new port, punching starts
    // over at once (openers towards the peer's public address).
    let t1 = t0 + Duration::from_secs(21);
    a.engine.rebound(t1);
    {
        let t = a.engine.snapshot();
        let p = t.peers[0].path.lock().unwrap();
        assert!(p.direct.is_none() && p.last_rx.is_none() && p.punch == Punch::Idle);
        assert!(!p.direct_worked);
    }
    let (_, openers) = run_alone(&a, t1, 2);
    assert!(
        openers
            .iter()
            .any(|o| o.ip() == "203.0.113.3".parse::<IpAddr>().unwrap()),
        "openers towards the peer right after the move: {openers:?}"
    );
    // A second failure within REBIND_MIN_EVERY does not move the socket again (no direct path
    // worked from the new port either).
    let (_, _) = run_alone(&a, t1 + Duration::from_secs(2), 30);
    assert!(!a.engine.take_rebind(t1 + Duration::from_secs(32)));
}

#[test]
fn no_move_when_the_direct_path_came_back_before_the_socket_could_move() {
    let (a, _b, t0) = pair_with_direct_path();
    a.engine.set_rebind_allowed(true);
    let (_, _) = run_alone(&a, t0, 20);
    // The peer moved to a fresh port and its packets arrive again (the path is back) before
    // the IO shell acted on the request: moving now would only break the path again.
    let t = a.engine.snapshot();
    let t20 = t0 + Duration::from_secs(20);
    t.peers[0].saw("203.0.113.3:45555".parse().unwrap(), t20);
    assert!(!a.engine.take_rebind(t20));
}

#[test]
fn a_fixed_port_waits_out_stale_nat_state_in_silence_instead() {
    let (a, _b, t0) = pair_with_direct_path();
    a.engine.set_rebind_allowed(false);
    let (_, _) = run_alone(&a, t0, 20);
    assert!(!a.engine.take_rebind(t0 + Duration::from_secs(20)));
    // Quiet time: nothing at all towards the peer's public address, openers included.
    let (sent, openers) = run_alone(&a, t0 + Duration::from_secs(20), 20);
    let peer_ip: IpAddr = "203.0.113.3".parse().unwrap();
    assert!(
        !sent.iter().any(|(to, _)| to.ip() == peer_ip)
            && !openers.iter().any(|o| o.ip() == peer_ip),
        "silence during the quiet time: {:?} {:?}",
        sent.iter().map(|(to, d)| (to, d.len())).collect::<Vec<_>>(),
        openers
    );
}

#[test]
fn a_new_public_address_of_the_peer_ends_the_quiet_time() {
    let (a, b, t0) = pair_with_direct_path();
    a.engine.set_rebind_allowed(false);
    let (_, _) = run_alone(&a, t0, 20);
    // The peer moved to a fresh port and reported it: our quiet time concerned its old address.
    let moved: SocketAddr = "203.0.113.3:45555".parse().unwrap();
    let mut m = map_for(&a, &[&b], PacketFilter::allow_all(), vec![]);
    m.peers.get_mut(&b.id).unwrap().endpoints.push(Endpoint {
        addr: moved,
        kind: EndpointKind::Stun,
    });
    let t1 = t0 + Duration::from_secs(21);
    a.engine.apply_map(&m, t1);
    let (_, openers) = run_alone(&a, t1, 2);
    assert!(
        openers.contains(&moved),
        "openers to the new address at once: {openers:?}"
    );
}

#[test]
fn handshakes_go_through_the_relay_not_to_public_addresses_until_a_direct_path_is_alive() {
    let a = node(1, "home");
    let b = node(2, "laptop");
    let relay_key = PrivateKey::generate();
    let relay: SocketAddr = "198.51.100.10:3478".parse().unwrap();
    let public_b: SocketAddr = "203.0.113.3:40000".parse().unwrap();
    let mut m = map_for(&a, &[&b], PacketFilter::allow_all(), vec![]);
    m.peers.get_mut(&b.id).unwrap().endpoints.push(Endpoint {
        addr: public_b,
        kind: EndpointKind::Stun,
    });
    m.relays = vec![homeport_proto::map::RelayInfo {
        udp: Some(relay),
        stun: None,
        public_key: Some(relay_key.public_key()),
    }];
    let now = Instant::now();
    a.engine.apply_map(&m, now);
    let t = a.engine.snapshot();
    let mut bound = homeport_proto::relay::RELAY_MAGIC.to_vec();
    bound.push(homeport_proto::relay::RELAY_BOUND);
    let mut out = [0u8; 2048];
    a.engine.handle_relay(&t, relay, &bound, &mut out, now);
    assert!(a.engine.relay_bound(now).is_some());
    a.engine
        .send_handshake(&t.peers[0], &[1, 0, 0, 0, 9, 9], now);
    let sent: Vec<SocketAddr> = drain(&a.engine).0.into_iter().map(|(to, _)| to).collect();
    assert!(sent.contains(&relay), "through the relay: {sent:?}");
    assert!(
        sent.contains(&b.udp),
        "and to the private (LAN) address: {sent:?}"
    );
    assert!(
        !sent.contains(&public_b),
        "never to the public address yet: {sent:?}"
    );
    // Once a direct path is alive, initiations follow it.
    t.peers[0].saw(public_b, now);
    a.engine
        .send_handshake(&t.peers[0], &[1, 0, 0, 0, 9, 9], now);
    let sent: Vec<SocketAddr> = drain(&a.engine).0.into_iter().map(|(to, _)| to).collect();
    assert_eq!(sent, vec![public_b]);
}

/// `a` with one peer `b` whose direct path was confirmed at `t0`.
fn direct_pair_at(t0: Instant) -> (Node, Node, SocketAddr) {
    let a = node(1, "home");
    let b = node(2, "laptop");
    a.engine
        .apply_map(&map_for(&a, &[&b], PacketFilter::allow_all(), vec![]), t0);
    let t = a.engine.snapshot();
    {
        let mut p = t.peers[0].path.lock().unwrap();
        p.direct = Some((b.udp, Duration::from_millis(1), t0));
        p.endpoint = Some(b.udp);
        p.last_rx = Some(t0);
    }
    a.engine.set_open_ttl(0);
    let to = b.udp;
    (a, b, to)
}

#[test]
fn a_stream_that_hears_nothing_back_leaves_the_direct_path_in_about_two_seconds() {
    let t0 = Instant::now();
    let (a, _b, to) = direct_pair_at(t0);
    let t = a.engine.snapshot();
    let mut now = t0;
    let mut probes_while_suspect = 0;
    let dead_at = loop {
        now += Duration::from_millis(50);
        // We keep sending on the direct path (a stream); nothing comes back.
        t.peers[0].path.lock().unwrap().last_tx = Some(now);
        let sent = tick(&a.engine, now)
            .iter()
            .filter(|(dst, _)| *dst == to)
            .count();
        let since = now.duration_since(t0);
        if since > SUSPECT_AFTER + Duration::from_millis(250) {
            probes_while_suspect += sent;
        }
        if !t.peers[0].path.lock().unwrap().direct_alive(now) {
            break since;
        }
        assert!(since < DIRECT_TTL, "still direct after {since:?}");
    };
    assert!(
        dead_at >= SUSPECT_AFTER + SUSPECT_GRACE && dead_at <= Duration::from_millis(2600),
        "dead after {dead_at:?}"
    );
    assert!(
        probes_while_suspect >= 3,
        "probed every tick while suspect: {probes_while_suspect}"
    );
    // A late answer brings the path back at once, without a new punching attempt.
    t.peers[0].saw(to, now);
    assert!(t.peers[0].path.lock().unwrap().direct_alive(now));
}

#[test]
fn an_idle_direct_path_is_not_suspected() {
    let t0 = Instant::now();
    let (a, _b, _) = direct_pair_at(t0);
    let t = a.engine.snapshot();
    let mut now = t0;
    while now.duration_since(t0) < Duration::from_secs(4) {
        now += Duration::from_millis(50);
        a.engine.handle_timeout(now);
        drain(&a.engine);
    }
    assert!(t.peers[0].path.lock().unwrap().direct_alive(now));
    assert!(
        !t.peers[0]
            .path
            .lock()
            .unwrap()
            .direct_alive(t0 + DIRECT_TTL)
    );
}

#[test]
fn a_peer_that_turned_to_the_relay_is_answered_through_it() {
    let t0 = Instant::now();
    let (a, _b, to) = direct_pair_at(t0);
    let t = a.engine.snapshot();
    let p = &t.peers[0];
    p.path.lock().unwrap().relay_rx = Some(t0 + Duration::from_millis(100));
    assert!(
        !p.path
            .lock()
            .unwrap()
            .direct_alive(t0 + Duration::from_millis(150))
    );
    // Heard directly again: direct again.
    p.saw(to, t0 + Duration::from_millis(200));
    assert!(
        p.path
            .lock()
            .unwrap()
            .direct_alive(t0 + Duration::from_millis(250))
    );
}

/// A Ready from `from` to `to`, sealed with their disco key.
fn ready_from(from: &Node, to: &Node, me: Option<SocketAddr>, opened: &[&str]) -> Vec<u8> {
    let k = disco::key(from.key.secret(), to.key.public_key().as_bytes());
    let mut o = disco::Opened::default();
    for a in opened {
        o.push(a.parse().unwrap());
    }
    let msg = disco::DiscoMsg::Ready {
        tx: [3; 12],
        me,
        opened: o,
    };
    let mut out = [0u8; disco::MAX_DISCO];
    let n = disco::seal(
        &k,
        from.key.public_key().as_bytes(),
        [3; 12],
        &msg,
        &mut out,
    );
    out[..n].to_vec()
}

#[test]
fn full_probes_wait_until_the_peer_opened_towards_our_current_address() {
    let a = node(1, "home");
    let b = node(2, "laptop");
    let public_b: SocketAddr = "192.0.2.130:40000".parse().unwrap();
    let mut m = map_for(&a, &[&b], PacketFilter::allow_all(), vec![]);
    m.peers.get_mut(&b.id).unwrap().endpoints = vec![Endpoint {
        addr: public_b,
        kind: EndpointKind::Stun,
    }];
    let relayed: SocketAddr = "198.51.100.10:3478".parse().unwrap();
    m.relays = vec![homeport_proto::map::RelayInfo {
        udp: Some(relayed),
        stun: None,
        public_key: Some(PrivateKey::generate().public_key()),
    }];
    let t0 = Instant::now();
    a.engine.apply_map(&m, t0);
    a.engine.set_open_ttl(3);
    a.engine
        .set_reflexive(Some("203.0.113.2:41844".parse().unwrap()));
    let t = a.engine.snapshot();
    let mut bound = homeport_proto::relay::RELAY_MAGIC.to_vec();
    bound.push(homeport_proto::relay::RELAY_BOUND);
    let mut buf = [0u8; 2048];
    a.engine.handle_relay(&t, relayed, &bound, &mut buf, t0);
    let openers = std::cell::RefCell::new(vec![]);
    let full_probes = |now: Instant| {
        a.engine.handle_timeout(now);
        let (sent, o) = drain(&a.engine);
        openers.borrow_mut().extend(o);
        sent.iter().filter(|(to, _)| *to == public_b).count()
    };
    // The peer punches, but opened only towards our old address (its map is behind): it moved
    // to a new port too, and says so.
    let moved: SocketAddr = "192.0.2.130:56278".parse().unwrap();
    let r = ready_from(&b, &a, Some(moved), &["203.0.113.2:58450"]);
    assert!(a.engine.handle_disco(&t, relayed, &r, t0));
    let mut now = t0;
    let mut full = 0;
    for _ in 0..20 {
        now += Duration::from_millis(250);
        full += full_probes(now);
        // The relay's binding stays fresh.
        a.engine.handle_relay(&t, relayed, &bound, &mut buf, now);
    }
    assert_eq!(
        full, 0,
        "no full probe may reach the peer's NAT before it opened towards us"
    );
    let openers = openers.into_inner();
    assert!(
        openers.contains(&moved),
        "openers towards the peer's new address, learned from its Ready"
    );
    // Now it opened towards our current address: full probes at the next tick.
    let r = ready_from(&b, &a, Some(moved), &["203.0.113.2:41844"]);
    assert!(a.engine.handle_disco(&t, relayed, &r, now));
    now += Duration::from_millis(250);
    let sent = tick(&a.engine, now);
    assert!(
        sent.iter().any(|(to, _)| *to == moved || *to == public_b),
        "full probes once the peer is ready: {:?}",
        sent.iter().map(|(to, _)| to).collect::<Vec<_>>()
    );
}

mod attacks;
mod devices;
mod routes;
mod sim;

#[test]
fn route_is_direct_while_alive_else_relay_with_the_reason() {
    use crate::{PathState, RelayReason, Route};
    let now = Instant::now();
    let a: SocketAddr = "198.51.100.7:41641".parse().unwrap();
    let mut p = PathState::default();
    assert_eq!(p.route(now, false, false), Route::None);
    assert_eq!(
        p.route(now, true, false),
        Route::Relay(RelayReason::NoCandidates)
    );
    p.candidates = vec![a, "192.168.1.7:41641".parse().unwrap()];
    assert_eq!(
        p.route(now, true, false),
        Route::Relay(RelayReason::NoneAnswered(2))
    );
    // A Pong confirms the direct path: it is used, relay or not.
    p.endpoint = Some(a);
    p.direct = Some((a, Duration::from_millis(20), now));
    assert_eq!(p.route(now, true, false), Route::Direct(a));
    assert_eq!(p.route(now, false, false), Route::Direct(a));
    // Long silent: relayed, and the reason says the direct path stopped.
    let later = now + Duration::from_secs(600);
    assert_eq!(
        p.route(later, true, false),
        Route::Relay(RelayReason::DirectStopped)
    );
    assert_eq!(
        p.route(later, true, true),
        Route::Relay(RelayReason::OverTcp)
    );
    assert!(
        RelayReason::NoneAnswered(3)
            .to_string()
            .contains("none of 3")
    );
}
