//! Plain-WireGuard devices: a bare boringtun session plays the phone (no disco, no homeport),
//! `vps` is its via node, `home` a node the phone reaches through it.

use super::*;
use boringtun::noise::{Tunn, TunnResult};
use homeport_proto::device::DeviceFilter;

struct Phone {
    key: PrivateKey,
    id: NodeId,
    addrs: MeshAddrs,
    udp: SocketAddr,
    tunn: Tunn,
}

impl Phone {
    fn new(vps: &Node) -> Phone {
        let key = PrivateKey::generate();
        let tunn = Tunn::new(
            key.secret().clone(),
            x25519::PublicKey::from(*vps.key.public_key().as_bytes()),
            None,
            Some(25),
            7,
            None,
        );
        Phone {
            key,
            id: NodeId(3),
            addrs: MeshAddrs {
                ipv4: Ipv4Addr::new(100, 96, 0, 3),
                ipv6: "fd7a::3".parse().unwrap(),
            },
            udp: "192.0.2.77:5555".parse().unwrap(),
            tunn,
        }
    }

    fn peer(&self, via: NodeId) -> Peer {
        Peer {
            id: self.id,
            name: "phone".parse().unwrap(),
            public_key: self.key.public_key(),
            addrs: self.addrs,
            endpoints: vec![],
            online: false,
            tags: vec![],
            routes: vec![],
            via: Some(via),
        }
    }

    /// An IP packet the phone's app sends into its tunnel (to the via node's endpoint).
    fn send(&mut self, net: &mut Net, vps: &Node, pkt: &[u8]) {
        let mut out = vec![0u8; pkt.len() + 200];
        if let TunnResult::WriteToNetwork(b) = self.tunn.encapsulate(pkt, &mut out) {
            net.q.push_back((self.udp, vps.udp, b.to_vec()));
        }
    }
}

/// What reached each node's TUN, and the packets the phone's tunnel let out.
type Arrivals = (Vec<(NodeId, Vec<u8>)>, Vec<Vec<u8>>);

/// Delivers everything in flight, the phone included.
fn run(net: &mut Net, nodes: &[&Node], phone: &mut Phone, now: Instant) -> Arrivals {
    let (mut tun, mut at_phone) = (vec![], vec![]);
    let mut guard = 0;
    while let Some((from, to, d)) = net.q.pop_front() {
        guard += 1;
        assert!(guard < 1000, "packet storm");
        if to == phone.udp {
            let mut out = vec![0u8; 2048];
            match phone.tunn.decapsulate(Some(from.ip()), &d, &mut out) {
                TunnResult::WriteToNetwork(b) => {
                    net.q.push_back((phone.udp, from, b.to_vec()));
                    let mut more = vec![0u8; 2048];
                    while let TunnResult::WriteToNetwork(b) =
                        phone.tunn.decapsulate(None, &[], &mut more)
                    {
                        net.q.push_back((phone.udp, from, b.to_vec()));
                    }
                }
                TunnResult::WriteToTunnelV4(b, _) | TunnResult::WriteToTunnelV6(b, _) => {
                    at_phone.push(b.to_vec())
                }
                _ => {}
            }
            continue;
        }
        let Some(n) = nodes.iter().find(|n| n.udp == to) else {
            continue;
        };
        let t = n.engine.snapshot();
        let mut out = vec![0u8; 2048];
        let r = n.engine.decapsulate(&t, from, &d, &mut out, now);
        for (dst, b) in drain(&n.engine).0 {
            net.q.push_back((n.udp, dst, b));
        }
        match r {
            Decap::ToTun { len } => tun.push((n.id, out[..len].to_vec())),
            Decap::Forward { to, len } => net.q.push_back((n.udp, to, out[..len].to_vec())),
            _ => {}
        }
    }
    (tun, at_phone)
}

fn rule(src: IpAddr, protos: Vec<Proto>, ports: Vec<PortRange>) -> FilterRule {
    FilterRule {
        sources: vec![IpNet::from(src)],
        protos,
        ports,
        dests: vec![],
    }
}

fn only(rules: Vec<FilterRule>) -> PacketFilter {
    PacketFilter {
        allow_all: false,
        rules,
    }
}

/// home and vps are nodes, the phone a device through vps; `home_filter` is home's inbound
/// filter, `phone_filter` the phone's (vps enforces it).
fn lab(home_filter: PacketFilter, phone_filter: PacketFilter) -> (Node, Node, Phone) {
    let home = node(1, "home");
    let vps = node(2, "vps");
    let phone = Phone::new(&vps);
    let now = Instant::now();
    let mut mv = map_for(&vps, &[&home], PacketFilter::allow_all(), vec![]);
    mv.peers.insert(phone.id, phone.peer(vps.id));
    mv.device_filters = vec![DeviceFilter {
        device: phone.id,
        filter: phone_filter,
    }];
    vps.engine.apply_map(&mv, now);
    let mut mh = map_for(&home, &[&vps], home_filter, vec![]);
    mh.peers.insert(phone.id, phone.peer(vps.id));
    home.engine.apply_map(&mh, now);
    (home, vps, phone)
}

#[test]
fn a_device_reaches_home_through_its_via_node_and_home_sees_its_address() {
    let (home, vps, mut phone) = lab(PacketFilter::allow_all(), PacketFilter::allow_all());
    let now = Instant::now();
    let mut net = Net::default();
    let ping = build::echo(phone.addrs.ipv4, home.addrs.ipv4);
    phone.send(&mut net, &vps, &ping);
    let (tun, _) = run(&mut net, &[&home, &vps], &mut phone, now);
    assert_eq!(
        tun,
        vec![(home.id, ping)],
        "home got the phone's packet as sent"
    );
    // The vps learned the phone's endpoint from its handshake, and home routes the phone's
    // address to the vps.
    let dev = vps.engine.snapshot().peer_by_id(phone.id).cloned().unwrap();
    assert!(dev.device);
    assert_eq!(dev.path.lock().unwrap().endpoint, Some(phone.udp));
    assert_eq!(
        home.engine
            .snapshot()
            .peer_for_dst(IpAddr::V4(phone.addrs.ipv4))
            .map(|p| p.id),
        Some(vps.id)
    );
    let pong = build::echo(home.addrs.ipv4, phone.addrs.ipv4);
    assert!(matches!(net.send(&home, &pong, now), Encap::Send { .. }));
    let (tun, at_phone) = run(&mut net, &[&home, &vps], &mut phone, now);
    assert!(tun.is_empty(), "nothing for the vps's own TUN: {tun:?}");
    assert_eq!(at_phone, vec![pong]);
    // No disco towards a device: nothing but WireGuard ever went to it, and no probe of it is
    // ever due (the timer thread would wake at once, again and again).
    vps.engine.handle_timeout(now + Duration::from_secs(3));
    assert!(vps.engine.poll_timeout() > now + Duration::from_secs(3));
    for (to, b) in drain(&vps.engine).0 {
        assert!(
            to != phone.udp
                || homeport_proto::disco::classify(&b)
                    != homeport_proto::disco::DatagramKind::Disco,
            "a probe went to the device"
        );
    }
}

#[test]
fn the_policy_holds_both_ways_and_the_via_node_enforces_the_devices_side() {
    let phone_ip = IpAddr::V4(Ipv4Addr::new(100, 96, 0, 3));
    // home admits only tcp:80 from the phone; the phone admits nothing that opens a flow.
    let (home, vps, mut phone) = lab(
        only(vec![rule(
            phone_ip,
            vec![Proto::Tcp],
            vec![PortRange::single(80)],
        )]),
        only(vec![]),
    );
    let now = Instant::now();
    let mut net = Net::default();
    let (p4, h4) = (phone.addrs.ipv4, home.addrs.ipv4);
    phone.send(&mut net, &vps, &build::echo(p4, h4));
    let (tun, _) = run(&mut net, &[&home, &vps], &mut phone, now);
    assert!(
        tun.is_empty(),
        "home's filter refuses the phone's ping: {tun:?}"
    );
    let syn = build::tcp(p4, 40000, h4, 80, packet::TCP_SYN);
    phone.send(&mut net, &vps, &syn);
    let (tun, _) = run(&mut net, &[&home, &vps], &mut phone, now);
    assert_eq!(tun, vec![(home.id, syn)], "tcp:80 is allowed");
    // home's answer reaches the phone: it opens nothing.
    let synack = build::tcp(h4, 80, p4, 40000, packet::TCP_SYN | packet::TCP_ACK);
    net.send(&home, &synack, now);
    let (_, at_phone) = run(&mut net, &[&home, &vps], &mut phone, now);
    assert_eq!(at_phone, vec![synack]);
    // home may not open a flow to the phone: the vps drops it for the phone.
    net.send(&home, &build::tcp(h4, 41000, p4, 22, packet::TCP_SYN), now);
    net.send(&home, &build::echo(h4, p4), now);
    let (_, at_phone) = run(&mut net, &[&home, &vps], &mut phone, now);
    assert!(at_phone.is_empty(), "{at_phone:?}");
    // Nor may the vps itself.
    let t = vps.engine.snapshot();
    let mut out = vec![0u8; 256];
    let r = vps
        .engine
        .encapsulate(&t, &build::echo(vps.addrs.ipv4, p4), &mut out, now);
    assert!(matches!(r, Encap::Drop(DropReason::Filtered)), "{r:?}");
    // A UDP flow the phone opened is answered; one home opens is not.
    phone.send(&mut net, &vps, &build::udp(p4, 5000, h4, 53, b"q"));
    run(&mut net, &[&home, &vps], &mut phone, now);
    net.send(&home, &build::udp(h4, 53, p4, 5000, b"a"), now);
    net.send(&home, &build::udp(h4, 53, p4, 5001, b"x"), now);
    let (_, at_phone) = run(&mut net, &[&home, &vps], &mut phone, now);
    assert_eq!(at_phone, vec![build::udp(h4, 53, p4, 5000, b"a")]);
}

#[test]
fn a_device_cannot_pass_itself_off_as_another_node_or_leave_the_mesh() {
    let (home, vps, mut phone) = lab(PacketFilter::allow_all(), PacketFilter::allow_all());
    let now = Instant::now();
    let mut net = Net::default();
    let (p4, h4, v4) = (phone.addrs.ipv4, home.addrs.ipv4, vps.addrs.ipv4);
    phone.send(&mut net, &vps, &build::echo(p4, h4));
    assert_eq!(run(&mut net, &[&home, &vps], &mut phone, now).0.len(), 1);
    // The vps's address as source, towards home; home's towards the vps; an outside address.
    for spoof in [
        build::echo(v4, h4),
        build::echo(h4, v4),
        build::echo(p4, Ipv4Addr::new(198, 51, 100, 7)),
        build::echo(Ipv4Addr::new(192, 0, 2, 1), v4),
    ] {
        phone.send(&mut net, &vps, &spoof);
        let (tun, _) = run(&mut net, &[&home, &vps], &mut phone, now);
        assert!(tun.is_empty(), "{spoof:?} got through: {tun:?}");
    }
}

#[test]
fn removing_a_device_cuts_it_at_the_next_map() {
    let (home, vps, mut phone) = lab(PacketFilter::allow_all(), PacketFilter::allow_all());
    let now = Instant::now();
    let mut net = Net::default();
    let ping = build::echo(phone.addrs.ipv4, home.addrs.ipv4);
    phone.send(&mut net, &vps, &ping);
    assert_eq!(run(&mut net, &[&home, &vps], &mut phone, now).0.len(), 1);
    vps.engine.apply_map(
        &map_for(&vps, &[&home], PacketFilter::allow_all(), vec![]),
        now,
    );
    home.engine.apply_map(
        &map_for(&home, &[&vps], PacketFilter::allow_all(), vec![]),
        now,
    );
    phone.send(&mut net, &vps, &ping);
    let (tun, _) = run(&mut net, &[&home, &vps], &mut phone, now);
    assert!(tun.is_empty(), "{tun:?}");
    let t = home.engine.snapshot();
    let mut out = vec![0u8; 256];
    let r = home.engine.encapsulate(
        &t,
        &build::echo(home.addrs.ipv4, phone.addrs.ipv4),
        &mut out,
        now,
    );
    assert!(matches!(r, Encap::Drop(DropReason::NoRoute)), "{r:?}");
}
