//! Path choice on a simulated internet stepped from deadline to deadline, as quinn-proto's test
//! `Pair` does: two engines behind NATs, a relay, a wire with a fixed one-way delay. Time jumps
//! to the next thing that happens — a datagram's arrival, an engine's `poll_timeout`, the test's
//! own traffic — never in fixed steps and never by sleeping. Keys and the engines' RNGs come from
//! fixed seeds, so every run is the same run. (boringtun still reads its own clock for its
//! handshakes; everything asserted here is engine time.)

use super::*;
use homeport_proto::disco::{DatagramKind, classify};
use homeport_proto::relay;

/// One-way delay of every hop.
const DELAY: Duration = Duration::from_millis(15);

/// What went on the wire, for the assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A low-TTL NAT opener: it opens our NAT and dies before the peer's.
    Opener,
    Probe,
    Pong,
    Ready,
    /// A WireGuard datagram straight to the peer.
    Wg,
    /// A WireGuard datagram inside a relay SEND.
    RelayedWg,
    RelayedDisco,
    Bind,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    host: usize,
    to: SocketAddr,
    kind: Kind,
}

/// A NAT: one public address, mappings made by outbound packets, inbound filtered by them.
struct SimNat {
    ip: IpAddr,
    /// Endpoint-dependent mapping and filtering (a new port per remote) instead of one port for
    /// every remote with address-dependent filtering.
    hard: bool,
    port: u16,
    /// (remote, public port) opened by outbound packets.
    open: Vec<(SocketAddr, u16)>,
    /// Inbound packets from this address are dropped (the path towards it broke).
    blocked: Option<IpAddr>,
}

impl SimNat {
    fn new(ip: &str, hard: bool) -> SimNat {
        SimNat {
            ip: ip.parse().unwrap(),
            hard,
            port: 40000,
            open: vec![],
            blocked: None,
        }
    }

    /// Outbound to `to`: the public source address it leaves with.
    fn out(&mut self, to: SocketAddr) -> SocketAddr {
        let port = match self.open.iter().find(|(r, _)| *r == to) {
            Some((_, p)) => *p,
            None if self.hard => 30000 + 7 * (self.open.len() as u16 + 1),
            None => self.port,
        };
        if !self.open.contains(&(to, port)) {
            self.open.push((to, port));
        }
        SocketAddr::new(self.ip, port)
    }

    fn admits(&self, from: SocketAddr, to: SocketAddr) -> bool {
        to.ip() == self.ip
            && self.blocked != Some(from.ip())
            && self
                .open
                .iter()
                .any(|(r, p)| *p == to.port() && r.ip() == from.ip() && (!self.hard || *r == from))
    }

    /// The NAT lost its state and maps us anew (a reboot, a CGNAT timeout).
    fn rebind(&mut self) {
        self.open.clear();
        self.port += 1000;
    }
}

struct Host {
    node: Node,
    nat: SimNat,
    /// Packets the engine wrote to its TUN.
    tun: usize,
}

struct Sim {
    now: Instant,
    hosts: Vec<Host>,
    relay: SocketAddr,
    /// Relay bindings: (key, public address).
    bound: Vec<([u8; 32], SocketAddr)>,
    /// In flight: (arrival, from, to, bytes).
    wire: Vec<(Instant, SocketAddr, SocketAddr, Vec<u8>)>,
    log: Vec<Sent>,
    /// The test's traffic: host `from` sends an echo to host `to` every `every`, next at `next`.
    stream: Option<(usize, usize, Duration, Instant)>,
    /// Rounds at the same instant: a deadline that never moves would spin here.
    same_instant: u32,
}

const STUN: &str = "198.51.100.20:3478";

/// Two hosts, `home` behind 203.0.113.2 and `laptop` behind 203.0.113.3 (both NATs `hard` or
/// easy), the relay at 198.51.100.1, everything started at `t0`.
fn sim(hard: bool, t0: Instant) -> Sim {
    let key = |seed: u8| -> PrivateKey {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode([seed; 32])
            .parse()
            .unwrap()
    };
    let mk = |id: i64, name: &'static str, nat: &str| {
        let k = key(id as u8);
        Host {
            node: Node {
                engine: Engine::new(&k, t0, 1_700_000_000_000, [id as u8 + 100; 32]),
                key: k,
                id: NodeId(id),
                name,
                addrs: MeshAddrs {
                    ipv4: Ipv4Addr::new(100, 96, 0, id as u8),
                    ipv6: format!("fd7a::{id}").parse().unwrap(),
                },
                udp: format!("10.0.{id}.2:41641").parse().unwrap(),
            },
            nat: SimNat::new(nat, hard),
            tun: 0,
        }
    };
    let mut s = Sim {
        now: t0,
        hosts: vec![mk(1, "home", "203.0.113.2"), mk(2, "laptop", "203.0.113.3")],
        relay: "198.51.100.1:3478".parse().unwrap(),
        bound: vec![],
        wire: vec![],
        log: vec![],
        stream: None,
        same_instant: 0,
    };
    // What STUN told each side: its mapping towards the STUN server (for a hard NAT useless
    // towards anyone else). The probe to STUN opened nothing that matters afterwards.
    let stun: SocketAddr = STUN.parse().unwrap();
    let reflexive: Vec<SocketAddr> = s.hosts.iter_mut().map(|h| h.nat.out(stun)).collect();
    for h in &mut s.hosts {
        h.nat.open.clear();
    }
    let relay_key = key(99).public_key();
    for i in 0..2 {
        let (me, peer) = (&s.hosts[i].node, &s.hosts[1 - i].node);
        let mut m = map_for(me, &[peer], PacketFilter::allow_all(), vec![]);
        m.peers.get_mut(&peer.id).unwrap().endpoints.push(Endpoint {
            addr: reflexive[1 - i],
            kind: EndpointKind::Stun,
        });
        m.relays = vec![homeport_proto::map::RelayInfo {
            udp: Some(s.relay),
            stun: None,
            public_key: Some(relay_key),
        }];
        me.engine.set_open_ttl(2);
        me.engine.set_reflexive(Some(reflexive[i]));
        me.engine.apply_map(&m, t0);
    }
    s.flush(0);
    s.flush(1);
    s
}

impl Sim {
    fn engine(&self, i: usize) -> &Engine {
        &self.hosts[i].node.engine
    }

    fn public(&self, i: usize) -> IpAddr {
        self.hosts[i].nat.ip
    }

    fn path(&self, i: usize) -> PathState {
        self.engine(i).snapshot().peers[0]
            .path
            .lock()
            .unwrap()
            .clone()
    }

    /// What host `i` sent to `to`, seen by whoever receives it.
    fn kind(&self, i: usize, to: SocketAddr, ttl: Option<u8>, d: &[u8]) -> Kind {
        if ttl.is_some() {
            return Kind::Opener;
        }
        let peer = &self.hosts[1 - i].node;
        let disco_kind = |d: &[u8]| {
            let k = disco::key(
                peer.key.secret(),
                self.hosts[i].node.key.public_key().as_bytes(),
            );
            let mut scratch = [0u8; disco::MAX_DISCO];
            match disco::open(&k, d, &mut scratch) {
                Some(disco::DiscoMsg::Ping { .. }) => Kind::Probe,
                Some(disco::DiscoMsg::Pong { .. }) => Kind::Pong,
                Some(disco::DiscoMsg::Ready { .. }) => Kind::Ready,
                None => Kind::Other,
            }
        };
        if to == self.relay {
            return match relay::parse(d) {
                _ if relay::kind(d) == Some(relay::RELAY_BIND) => Kind::Bind,
                Some((_, _, p)) if classify(p) == DatagramKind::WireGuard => Kind::RelayedWg,
                Some((_, _, p)) if classify(p) == DatagramKind::Disco => Kind::RelayedDisco,
                _ => Kind::Other,
            };
        }
        match classify(d) {
            DatagramKind::WireGuard => Kind::Wg,
            DatagramKind::Disco => disco_kind(d),
            _ => Kind::Other,
        }
    }

    /// Sends what host `i`'s engine queued, through its NAT.
    fn flush(&mut self, i: usize) {
        let mut buf = [0u8; MAX_TRANSMIT];
        while let Some(t) = self.engine(i).poll_transmit(&mut buf) {
            self.emit(i, t.to, t.ttl, buf[..t.len].to_vec());
        }
    }

    fn emit(&mut self, i: usize, to: SocketAddr, ttl: Option<u8>, d: Vec<u8>) {
        let kind = self.kind(i, to, ttl, &d);
        self.log.push(Sent {
            at: self.now,
            host: i,
            to,
            kind,
        });
        let from = self.hosts[i].nat.out(to);
        if ttl.is_none() {
            self.wire.push((self.now + DELAY, from, to, d));
        }
    }

    fn deliver(&mut self, from: SocketAddr, to: SocketAddr, d: Vec<u8>) {
        if to == self.relay {
            return self.relay_in(from, &d);
        }
        let Some(j) = self.hosts.iter().position(|h| h.nat.admits(from, to)) else {
            return;
        };
        let now = self.now;
        let e = &self.hosts[j].node.engine;
        let t = e.snapshot();
        let mut out = vec![0u8; 4096];
        let r = match classify(&d) {
            DatagramKind::Disco => {
                e.handle_disco(&t, from, &d, now);
                Decap::Done
            }
            DatagramKind::Relay => e.handle_relay(&t, from, &d, &mut out, now),
            DatagramKind::WireGuard => e.decapsulate(&t, from, &d, &mut out, now),
            _ => Decap::Done,
        };
        if let Decap::ToTun { .. } = r {
            self.hosts[j].tun += 1;
        }
        self.flush(j);
    }

    /// The relay: BIND answered with BOUND, SEND forwarded as RECV to the bound peer.
    fn relay_in(&mut self, from: SocketAddr, d: &[u8]) {
        let at = self.now + DELAY;
        if let Some(b) = relay::Bind::decode(d) {
            self.bound.retain(|(k, _)| *k != b.key);
            self.bound.push((b.key, from));
            self.wire
                .push((at, self.relay, from, relay::BOUND.to_vec()));
            return;
        }
        let Some((relay::RELAY_SEND, dst, payload)) = relay::parse(d) else {
            return;
        };
        let src = self.bound.iter().find(|(_, a)| *a == from).map(|(k, _)| *k);
        let to = self.bound.iter().find(|(k, _)| *k == dst).map(|(_, a)| *a);
        if let (Some(src), Some(to)) = (src, to) {
            let mut frame = vec![0u8; relay::RELAY_HEADER_LEN + payload.len()];
            let h = relay::write_header(&mut frame, relay::RELAY_RECV, &src);
            frame[h..].copy_from_slice(payload);
            self.wire.push((at, self.relay, to, frame));
        }
    }

    /// Advances to the next thing that happens, up to `until`, and handles it. False once
    /// `until` is reached.
    fn step(&mut self, until: Instant) -> bool {
        let wire = self.wire.iter().map(|w| w.0).min();
        let timers = (0..self.hosts.len())
            .map(|i| self.engine(i).poll_timeout())
            .min();
        let stream = self.stream.map(|s| s.3);
        let next = [wire, timers, stream].into_iter().flatten().min().unwrap();
        if next > until {
            self.now = until;
            return false;
        }
        if next <= self.now {
            self.same_instant += 1;
            assert!(
                self.same_instant < 10_000,
                "a deadline that does not move: the engine would spin"
            );
        } else {
            self.same_instant = 0;
            self.now = next;
        }
        let now = self.now;
        if let Some(k) = self.wire.iter().position(|w| w.0 <= now) {
            let (_, from, to, d) = self.wire.remove(k);
            self.deliver(from, to, d);
            return true;
        }
        for i in 0..self.hosts.len() {
            if self.engine(i).poll_timeout() <= now {
                self.engine(i).handle_timeout(now);
                self.flush(i);
            }
        }
        if let Some((from, to, every, at)) = self.stream
            && at <= now
        {
            self.stream = Some((from, to, every, now + every));
            let (a, b) = (&self.hosts[from].node, &self.hosts[to].node);
            let pkt = build::echo(a.addrs.ipv4, b.addrs.ipv4);
            let mut out = vec![0u8; pkt.len() + 200];
            let t = a.engine.snapshot();
            if let Encap::Send { to, len } = a.engine.encapsulate(&t, &pkt, &mut out, now) {
                self.emit(from, to, None, out[..len].to_vec());
            }
            self.flush(from);
        }
        true
    }

    /// Runs until `done` holds (returns the time) or until `until` (None).
    fn run_until(&mut self, until: Instant, done: impl Fn(&Sim) -> bool) -> Option<Instant> {
        loop {
            if done(self) {
                return Some(self.now);
            }
            if !self.step(until) {
                return done(self).then_some(self.now);
            }
        }
    }

    fn sent(&self, host: usize, since: Instant, what: impl Fn(&Sent) -> bool) -> Vec<Sent> {
        self.log
            .iter()
            .filter(|s| s.host == host && s.at >= since && what(s))
            .copied()
            .collect()
    }
}

fn direct(s: &Sim, i: usize) -> bool {
    s.path(i).direct_alive(s.now)
}

#[test]
fn openers_go_first_and_both_easy_nats_open_within_a_second() {
    let t0 = Instant::now();
    let mut s = sim(false, t0);
    let found = s
        .run_until(t0 + Duration::from_secs(10), |s| {
            direct(s, 0) && direct(s, 1)
        })
        .expect("a direct path through two easy NATs");
    assert!(
        found - t0 <= Duration::from_millis(1500),
        "direct after {:?}",
        found - t0
    );
    // Neither side's full probe reached the other's NAT before that NAT's own opener left
    // towards it (a full packet first would leave a conntrack entry that forces the peer onto
    // another port on a Linux NAT).
    for (me, peer) in [(0, 1), (1, 0)] {
        let probes = s.sent(me, t0, |x| {
            x.kind == Kind::Probe && x.to.ip() == s.public(peer)
        });
        assert!(
            !probes.is_empty(),
            "host {me} probed the peer's public address"
        );
        let first_opener = s
            .sent(peer, t0, |x| {
                x.kind == Kind::Opener && x.to.ip() == s.public(me)
            })
            .first()
            .map(|x| x.at)
            .expect("openers towards us");
        for p in probes {
            assert!(
                p.at + DELAY > first_opener,
                "host {me}'s full probe at {:?} reached host {peer}'s NAT before its opener at {:?}",
                p.at - t0,
                first_opener - t0
            );
        }
    }
    assert_eq!(
        s.path(0).punch,
        Punch::Idle,
        "the attempt ended with success"
    );
    assert_eq!(s.path(0).endpoint.unwrap().ip(), s.public(1));
}

#[test]
fn a_failed_attempt_is_followed_by_quiet_time_in_total_silence_while_the_relay_carries_data() {
    let t0 = Instant::now();
    let mut s = sim(true, t0);
    s.stream = Some((0, 1, Duration::from_millis(50), t0));
    let quiet = s
        .run_until(t0 + Duration::from_secs(20), |s| {
            s.path(0).punch.quiet(s.now)
        })
        .expect("the attempt between two hard NATs gives up");
    let give_up = quiet - t0;
    assert!(
        give_up >= SEARCH_FAST_FOR && give_up <= SEARCH_FAST_FOR + OPEN_FIRST + PROBE_KEEP,
        "gave up after {give_up:?}"
    );
    let Punch::Quiet { until, why } = s.path(0).punch else {
        unreachable!()
    };
    assert_eq!((why, until), (QuietReason::Failed, quiet + PROBE_QUIET));
    let before = s.hosts[1].tun;
    s.run_until(until - Duration::from_millis(1), |_| false);
    let peer = s.public(1);
    let noise = s.sent(0, quiet, |x| x.to.ip() == peer);
    assert!(
        noise.is_empty(),
        "nothing, openers included, towards the peer's NAT in quiet time: {noise:?}"
    );
    assert!(
        s.hosts[1].tun - before >= 600,
        "the relay carried the stream meanwhile: {} packets",
        s.hosts[1].tun - before
    );
    // Quiet time over: the next attempt starts with openers again, within a keep-alive round.
    s.run_until(until + PROBE_KEEP + Duration::from_millis(100), |_| false);
    let openers = s.sent(0, until, |x| x.kind == Kind::Opener && x.to.ip() == peer);
    assert!(!openers.is_empty(), "openers after the quiet time");
    assert!(matches!(s.path(0).punch, Punch::Punching { .. }));
}

#[test]
fn a_direct_path_that_goes_dark_fails_over_to_the_relay_in_about_two_seconds() {
    let t0 = Instant::now();
    let mut s = sim(false, t0);
    s.stream = Some((0, 1, Duration::from_millis(20), t0));
    let found = s
        .run_until(t0 + Duration::from_secs(5), |s| direct(s, 0))
        .expect("direct path");
    s.run_until(found + Duration::from_secs(1), |_| false);
    let peer = s.public(1);
    assert!(
        s.sent(0, found + Duration::from_millis(500), |x| x.kind
            == Kind::RelayedWg)
            .is_empty(),
        "data goes direct once the path is confirmed"
    );
    // The laptop's NAT stops letting the home node in (it lost its mapping, a firewall moved).
    let dark = s.now;
    s.hosts[1].nat.blocked = Some(s.public(0));
    let tun_at_dark = s.hosts[1].tun;
    let relayed = s
        .run_until(dark + Duration::from_secs(6), |s| {
            !s.sent(0, dark, |x| x.kind == Kind::RelayedWg).is_empty()
        })
        .expect("the stream moves to the relay");
    let after = relayed - dark;
    assert!(
        after >= SUSPECT_AFTER
            && after <= SUSPECT_AFTER + SUSPECT_GRACE + Duration::from_millis(600),
        "on the relay after {after:?}"
    );
    s.run_until(relayed + Duration::from_secs(1), |_| false);
    assert!(
        s.hosts[1].tun - tun_at_dark >= 40,
        "the stream arrives again through the relay"
    );
    assert!(
        s.sent(0, relayed + Duration::from_millis(100), |x| x.kind
            == Kind::Wg
            && x.to.ip() == peer)
            .is_empty(),
        "no data into the dark path once on the relay"
    );
}

#[test]
fn a_nat_that_maps_us_anew_is_followed_without_leaving_the_direct_path() {
    let t0 = Instant::now();
    let mut s = sim(false, t0);
    s.stream = Some((0, 1, Duration::from_millis(20), t0));
    let found = s
        .run_until(t0 + Duration::from_secs(5), |s| {
            direct(s, 0) && direct(s, 1)
        })
        .expect("direct path");
    s.run_until(found + Duration::from_secs(1), |_| false);
    // The home NAT reboots: new public port, no state.
    let at = s.now;
    s.hosts[0].nat.rebind();
    let new_home = SocketAddr::new(s.public(0), s.hosts[0].nat.port);
    let followed = s
        .run_until(at + Duration::from_secs(3), |s| {
            s.path(1).endpoint == Some(new_home)
        })
        .expect("the laptop follows the home node's new mapping");
    assert!(
        followed - at <= Duration::from_millis(100),
        "followed after {:?}",
        followed - at
    );
    let tun = s.hosts[1].tun;
    s.run_until(followed + Duration::from_secs(3), |_| false);
    assert!(s.hosts[1].tun - tun >= 140, "the stream keeps arriving");
    assert!(direct(&s, 0) && direct(&s, 1), "still direct on both sides");
    assert!(
        s.sent(0, at, |x| x.kind == Kind::RelayedWg).is_empty(),
        "the relay was never needed"
    );
}

#[test]
fn a_relay_that_never_answers_over_udp_is_reported_after_three_binds() {
    let t0 = Instant::now();
    let mut s = sim(false, t0);
    // UDP to the relay is blocked here: nothing the engines send to it arrives (the simulated
    // relay listens elsewhere).
    let configured = s.relay;
    s.relay = "198.51.100.99:3478".parse().unwrap();
    let failing = |s: &Sim| {
        std::iter::from_fn(|| s.engine(0).poll_event()).any(|e| {
            e == Event::RelayUdpFailing {
                relay: "198.51.100.1:3478".parse().unwrap(),
            }
        })
    };
    let at = s
        .run_until(t0 + Duration::from_secs(10), failing)
        .expect("the shell is told to try the TCP/TLS fallback");
    let binds = s.sent(0, t0, |x| x.to == configured).len();
    assert!(binds >= 3, "after three unanswered BINDs ({binds})");
    assert!(at - t0 <= Duration::from_secs(6), "after {:?}", at - t0);
}

#[test]
fn pongs_reach_the_shell_as_events() {
    let t0 = Instant::now();
    let mut s = sim(false, t0);
    s.run_until(t0 + Duration::from_secs(5), |s| direct(s, 0))
        .expect("direct path");
    let pong = std::iter::from_fn(|| s.engine(0).poll_event()).find_map(|e| match e {
        Event::Pong {
            peer,
            from,
            via_relay,
            rtt,
        } => Some((peer, from, via_relay, rtt)),
        _ => None,
    });
    let (peer, from, via_relay, rtt) = pong.expect("a Pong event");
    assert_eq!(peer, NodeId(2));
    assert!(!via_relay || from == s.relay);
    assert!(rtt >= 2 * DELAY, "round trip {rtt:?}");
}
