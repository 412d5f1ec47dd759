//! Attacks on the engine, each performed and shown to fail: fragments past the filter, ICMP that
//! is no answer to anything, an exit posing as another node, handshake floods.

use super::*;

/// b admits from a only TCP 22 and UDP 5000 (both of a's addresses); a admits everything.
fn restricted_pair() -> (Node, Node, Net) {
    let a = node(1, "a");
    let b = node(2, "b");
    let srcs = vec![
        IpNet::from(IpAddr::V4(a.addrs.ipv4)),
        IpNet::from(IpAddr::V6(a.addrs.ipv6)),
    ];
    let policy = PacketFilter {
        allow_all: false,
        rules: vec![
            FilterRule {
                sources: srcs.clone(),
                protos: vec![Proto::Tcp],
                ports: vec![PortRange::single(22)],
                dests: vec![],
            },
            FilterRule {
                sources: srcs,
                protos: vec![Proto::Udp],
                ports: vec![PortRange::single(5000)],
                dests: vec![],
            },
        ],
    };
    a.engine.apply_map(
        &map_for(&a, &[&b], PacketFilter::allow_all(), vec![]),
        Instant::now(),
    );
    b.engine
        .apply_map(&map_for(&b, &[&a], policy, vec![]), Instant::now());
    let mut net = Net::default();
    let now = Instant::now();
    // Session up: b pings a (b's own traffic is not restricted).
    net.send(&b, &build::echo(b.addrs.ipv4, a.addrs.ipv4), now);
    assert_eq!(net.run(&[&a, &b], now).len(), 1);
    (a, b, net)
}

/// Sends `pkts` from a's TUN; returns what came out of b's TUN.
fn through(net: &mut Net, a: &Node, b: &Node, pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let now = Instant::now();
    for p in pkts {
        net.send(a, p, now);
    }
    net.run(&[a, b], now).into_iter().map(|(_, p)| p).collect()
}

fn addr_pairs(a: &Node, b: &Node) -> [(IpAddr, IpAddr); 2] {
    [
        (a.addrs.ipv4.into(), b.addrs.ipv4.into()),
        (a.addrs.ipv6.into(), b.addrs.ipv6.into()),
    ]
}

#[test]
fn fragments_cannot_open_what_the_filter_closes_v4_and_v6() {
    let (a, b, mut net) = restricted_pair();
    for (i, (src, dst)) in addr_pairs(&a, &b).into_iter().enumerate() {
        let id = 100 * i as u32;
        let v = if src.is_ipv4() { "v4" } else { "v6" };
        // A SYN to a forbidden port, in three fragments: the first one decides, and it is
        // dropped; so are the others.
        let syn80 = build::tcp_with(src, 5000, dst, 80, packet::TCP_SYN, &[1; 200]);
        let got = through(
            &mut net,
            &a,
            &b,
            &build::fragments(&syn80, id + 1, &[24, 104]),
        );
        assert!(got.is_empty(), "{v}: fragmented SYN to 80 passed: {got:?}");
        // The same SYN with a first fragment too short to show the TCP flags.
        let got = through(&mut net, &a, &b, &build::fragments(&syn80, id + 2, &[8]));
        assert!(got.is_empty(), "{v}: tiny first fragment passed");
        // Later fragments on their own (first fragment "lost").
        let f = build::fragments(&syn80, id + 3, &[24, 104]);
        assert!(
            through(&mut net, &a, &b, &f[1..]).is_empty(),
            "{v}: orphan fragments passed"
        );
        // RFC 1858 overlap: an ACK to 80 passes (no new flow), then a fragment at offset 8
        // rewrites its flags to SYN on reassembly. The overlapping fragment is dropped.
        let ack80 = build::tcp_with(src, 5001, dst, 80, packet::TCP_ACK, &[2; 200]);
        let first = build::fragment(&ack80, id + 4, 0, 24, true);
        let syn_bytes = build::tcp_with(src, 5001, dst, 80, packet::TCP_SYN, &[2; 200]);
        let overlap = build::fragment(&syn_bytes, id + 4, 8, 24, true);
        let rest = build::fragment(&ack80, id + 4, 24, 220, false);
        let got = through(&mut net, &a, &b, &[first.clone(), overlap, rest.clone()]);
        assert_eq!(got, vec![first, rest], "{v}: overlapping fragment passed");
        // UDP to a forbidden port, fragmented.
        let udp = build::udp_with(src, 7000, dst, 6000, &[3; 300]);
        let got = through(
            &mut net,
            &a,
            &b,
            &build::fragments(&udp, id + 5, &[104, 208]),
        );
        assert!(got.is_empty(), "{v}: fragmented UDP to 6000 passed");
        // Allowed traffic keeps working fragmented: UDP to 5000 and a SYN to 22.
        let ok = build::udp_with(src, 7000, dst, 5000, &[4; 300]);
        let f = build::fragments(&ok, id + 6, &[104, 208]);
        assert_eq!(
            through(&mut net, &a, &b, &f),
            f,
            "{v}: allowed UDP fragments"
        );
        let syn22 = build::tcp_with(src, 5002, dst, 22, packet::TCP_SYN, &[5; 100]);
        let f = build::fragments(&syn22, id + 7, &[40]);
        assert_eq!(
            through(&mut net, &a, &b, &f),
            f,
            "{v}: allowed SYN fragments"
        );
        // Fragments of another datagram cannot ride on an admitted one's slot.
        let udp2 = build::udp_with(src, 7000, dst, 6000, &[6; 300]);
        let f = build::fragments(&udp2, id + 8, &[104]);
        assert!(
            through(&mut net, &a, &b, &f[1..]).is_empty(),
            "{v}: id mismatch passed"
        );
    }
}

#[test]
fn icmp_other_than_echo_passes_only_as_an_error_about_our_own_packet() {
    let (a, b, mut net) = restricted_pair();
    for (src, dst) in addr_pairs(&a, &b) {
        let v4 = src.is_ipv4();
        let (unreach, redirect) = if v4 { (3u8, 5u8) } else { (1, 137) };
        // A redirect (v4) / redirect (v6): never an answer to anything.
        let p = build::ip(
            src,
            dst,
            packet::PROTO_ICMP,
            &[redirect, 0, 0, 0, 0, 0, 0, 0],
        );
        assert!(
            through(&mut net, &a, &b, &[p]).is_empty(),
            "redirect passed"
        );
        // IPv6 router advertisement.
        if !v4 {
            let p = build::ip(src, dst, packet::PROTO_ICMP, &[134, 0, 0, 0, 0, 0, 0, 0]);
            assert!(through(&mut net, &a, &b, &[p]).is_empty(), "RA passed");
        }
        // An echo reply passes (b may ping a).
        let p = build::ip(
            src,
            dst,
            packet::PROTO_ICMP,
            &[if v4 { 0 } else { 129 }, 0, 0, 0, 0, 1, 0, 1],
        );
        assert_eq!(through(&mut net, &a, &b, std::slice::from_ref(&p)), vec![p]);
        // Port unreachable about a datagram b sent to a: passes.
        let ours = build::udp_with(dst, 7000, src, 53, b"query");
        let mut l4 = vec![unreach, if v4 { 3 } else { 4 }, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&ours);
        let p = build::ip(src, dst, packet::PROTO_ICMP, &l4);
        assert_eq!(
            through(&mut net, &a, &b, std::slice::from_ref(&p)),
            vec![p],
            "our error"
        );
        // The same error about a packet b never sent (from another address): dropped.
        let other: IpAddr = if v4 {
            Ipv4Addr::new(100, 96, 0, 9).into()
        } else {
            "fd7a::9".parse().unwrap()
        };
        let theirs = build::udp_with(other, 7000, src, 53, b"query");
        let mut l4 = vec![unreach, 3, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&theirs);
        let p = build::ip(src, dst, packet::PROTO_ICMP, &l4);
        assert!(
            through(&mut net, &a, &b, &[p]).is_empty(),
            "foreign error passed"
        );
    }
}

#[test]
fn an_exit_cannot_pass_off_mesh_addresses_as_public_sources() {
    let exit = node(1, "vps");
    let home = node(2, "home");
    let laptop = node(3, "laptop");
    let r = rule(&exit, &home, 32400);
    exit.engine.apply_map(
        &map_for(
            &exit,
            &[&home, &laptop],
            PacketFilter::allow_all(),
            vec![r.clone()],
        ),
        Instant::now(),
    );
    // Home admits nothing from the mesh but its published port from the exit.
    let closed = PacketFilter {
        allow_all: false,
        rules: vec![],
    };
    home.engine.apply_map(
        &map_for(&home, &[&exit, &laptop], closed, vec![r]),
        Instant::now(),
    );
    let all = [&exit, &home, &laptop];
    let now = Instant::now();
    let mut net = Net::default();
    let viewer = Ipv4Addr::new(192, 0, 2, 50);
    let syn = build::tcp(viewer, 40000, home.addrs.ipv4, 32400, packet::TCP_SYN);
    net.send(&exit, &syn, now);
    assert_eq!(
        net.run(&all, now),
        vec![(home.id, syn)],
        "a real viewer passes"
    );
    let spoofs: [IpAddr; 4] = [
        laptop.addrs.ipv4.into(),
        Ipv4Addr::new(100, 96, 7, 7).into(), // in the mesh range, not (yet) assigned
        home.addrs.ipv4.into(),
        exit.addrs.ipv4.into(),
    ];
    for s in spoofs {
        let p = build::tcp_with(
            s,
            40001,
            home.addrs.ipv4.into(),
            32400,
            packet::TCP_SYN,
            b"",
        );
        net.send(&exit, &p, now);
        assert!(net.run(&all, now).is_empty(), "exit injected source {s}");
    }
    for s in [IpAddr::V6(laptop.addrs.ipv6), "fd7a::77".parse().unwrap()] {
        let p = build::tcp_with(
            s,
            40001,
            home.addrs.ipv6.into(),
            32400,
            packet::TCP_SYN,
            b"",
        );
        net.send(&exit, &p, now);
        assert!(net.run(&all, now).is_empty(), "exit injected source {s}");
    }
    // Nor did they take published-flow slots.
    assert_eq!(home.engine.flows.len(), 1);
}

/// A handshake initiation with a valid mac1 for `to` from a fresh, unknown key: what anyone who
/// knows a node's public key can send.
fn junk_initiation(to: &Node) -> Vec<u8> {
    let mut t = Tunn::new(
        x25519::StaticSecret::from(rand::random::<[u8; 32]>()),
        x25519::PublicKey::from(*to.key.public_key().as_bytes()),
        None,
        None,
        1,
        None,
    );
    let mut buf = [0u8; 256];
    match t.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(b) => b.to_vec(),
        _ => panic!("no initiation"),
    }
}

#[test]
fn a_handshake_flood_costs_a_hash_each_and_gets_cookies_under_load() {
    let (a, b, _) = restricted_pair();
    let t = b.engine.snapshot();
    let now = Instant::now();
    let from: SocketAddr = "198.51.100.66:5555".parse().unwrap();
    let mut out = [0u8; 2048];
    // Random junk shaped like an initiation: rejected on mac1, before any X25519.
    for _ in 0..200 {
        let mut d = [0u8; 148];
        for x in d.iter_mut() {
            *x = rand::random();
        }
        d[..4].copy_from_slice(&[1, 0, 0, 0]);
        let r = b.engine.decapsulate(&t, from, &d, &mut out, now);
        assert!(!b.engine.has_transmit(), "junk must get no answer");
        assert!(
            matches!(
                r,
                Decap::Drop(DropReason::WireGuard(WireGuardError::InvalidMac))
            ),
            "{r:?}"
        );
    }
    // Initiations with a valid mac1 (the sender knows b's public key): past the rate limit
    // they get a cookie reply (64 bytes, no Diffie-Hellman) instead of being processed.
    let mut cookies = 0;
    for _ in 0..300 {
        let d = junk_initiation(&b);
        b.engine.decapsulate(&t, from, &d, &mut out, now);
        let sent = drain(&b.engine).0;
        if let [(to, p)] = &sent[..] {
            assert_eq!((*to, p[0], p.len()), (from, 3, 64), "a cookie reply");
            cookies += 1;
        }
    }
    assert!(
        cookies >= 150,
        "only {cookies} of 300 got cookies under load"
    );
    // A real peer's initiation meanwhile gets a cookie its session accepts...
    let ta = a.engine.snapshot();
    let peer_b = ta.peers[0].clone();
    let mut init = [0u8; 256];
    let n = match peer_b
        .tunn
        .lock()
        .unwrap()
        .format_handshake_initiation(&mut init, true)
    {
        TunnResult::WriteToNetwork(p) => p.len(),
        _ => panic!("no initiation"),
    };
    b.engine.decapsulate(&t, a.udp, &init[..n], &mut out, now);
    let reply: Vec<Vec<u8>> = drain(&b.engine).0.into_iter().map(|(_, p)| p).collect();
    assert_eq!(reply.len(), 1);
    assert_eq!(reply[0][0], 3, "a cookie reply under load");
    let r = a.engine.decapsulate(&ta, b.udp, &reply[0], &mut out, now);
    assert!(matches!(r, Decap::Done), "the peer takes the cookie: {r:?}");
    // Its next initiation carries mac2 (the cookie): served at once, flood or not.
    let n = match peer_b
        .tunn
        .lock()
        .unwrap()
        .format_handshake_initiation(&mut init, true)
    {
        TunnResult::WriteToNetwork(p) => p.len(),
        _ => panic!("no initiation"),
    };
    b.engine.decapsulate(&t, a.udp, &init[..n], &mut out, now);
    let reply: Vec<Vec<u8>> = drain(&b.engine).0.into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        reply.first().map(|p| p[0]),
        Some(2),
        "a handshake response under load"
    );
}
