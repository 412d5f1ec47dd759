//! The lab itself works: real namespaces, real routing, real NAT (as the mesh and exit tests assume).

use homeport_tests::{Lab, NatKind, VIEWER_IP, VPS_IP, require_root_and};

/// One flow from `conntrack -L`: the original direction and the reply direction.
#[derive(Debug)]
struct Flow {
    orig_src: String,
    orig_dst: String,
    reply_src: String,
    reply_dst: String,
    orig_sport: Option<u16>,
    reply_dport: Option<u16>,
}

fn parse_flows(table: &str) -> Vec<Flow> {
    table
        .lines()
        .filter_map(|line| {
            let field = |key: &str, nth: usize| {
                line.split_whitespace()
                    .filter_map(|w| w.strip_prefix(key))
                    .nth(nth)
                    .map(str::to_string)
            };
            Some(Flow {
                orig_src: field("src=", 0)?,
                orig_dst: field("dst=", 0)?,
                reply_src: field("src=", 1)?,
                reply_dst: field("dst=", 1)?,
                orig_sport: field("sport=", 0).and_then(|p| p.parse().ok()),
                reply_dport: field("dport=", 1).and_then(|p| p.parse().ok()),
            })
        })
        .collect()
}

/// Two homes behind one carrier-grade NAT (double NAT: home router + carrier) both reach the VPS,
/// and the carrier's conntrack table shows each flow translated to its one public address.
#[test]
fn hosts_behind_double_nat_reach_the_vps_and_conntrack_shows_the_translation() {
    if !require_root_and(&["conntrack", "ping"]) {
        return;
    }
    let mut lab = Lab::new().unwrap();
    lab.internet().unwrap();
    let carrier = lab.isp("carrier", NatKind::Easy).unwrap();
    let r1 = lab
        .router_behind(&carrier, "r1", "10.10.1", NatKind::Easy)
        .unwrap();
    let r2 = lab
        .router_behind(&carrier, "r2", "10.10.2", NatKind::Easy)
        .unwrap();
    let h1 = lab.host_behind(&r1, "h1").unwrap();
    let h2 = lab.host_behind(&r2, "h2").unwrap();
    assert_eq!((h1.as_str(), h2.as_str()), ("10.10.1.2", "10.10.2.2"));
    assert_eq!(carrier.wan_ip, "203.0.113.2");
    assert_eq!(
        (r1.wan_ip.as_str(), r2.wan_ip.as_str()),
        ("100.64.0.2", "100.64.0.3")
    );

    assert!(
        lab.ping("h1", VPS_IP),
        "h1 cannot ping the VPS through two NATs"
    );
    assert!(
        lab.ping("h2", VPS_IP),
        "h2 cannot ping the VPS through two NATs"
    );
    // Nothing routes into a home from outside: that is the CGNAT problem homeport solves.
    assert!(
        !lab.ping("vps", &h1),
        "the VPS reached a host behind CGNAT directly"
    );
    assert!(
        !lab.ping("viewer", &carrier.lan_ip),
        "the viewer reached the carrier's inside"
    );

    // Carrier: each home router's address is translated to the carrier's public address.
    let flows = parse_flows(&lab.conntrack("carrier", &["-p", "icmp"]).unwrap());
    for router_wan in [&r1.wan_ip, &r2.wan_ip] {
        assert!(
            flows.iter().any(|f| &f.orig_src == router_wan
                && f.orig_dst == VPS_IP
                && f.reply_src == VPS_IP
                && f.reply_dst == carrier.wan_ip),
            "no translated flow {router_wan} -> {VPS_IP} (reply to {}) in the carrier's table: {flows:#?}",
            carrier.wan_ip
        );
    }
    // Home router: the LAN host is translated to the router's address on the carrier network.
    let flows = parse_flows(&lab.conntrack("r1", &["-p", "icmp"]).unwrap());
    assert!(
        flows
            .iter()
            .any(|f| f.orig_src == h1 && f.orig_dst == VPS_IP && f.reply_dst == r1.wan_ip),
        "no translated flow {h1} -> {VPS_IP} (reply to {}) in r1's table: {flows:#?}",
        r1.wan_ip
    );
}

/// Sends one UDP datagram from local port `sport` to each of `dsts` (port 9; nobody listens there,
/// which is fine: the NAT mapping is made by the outgoing packet).
fn udp_from_port(lab: &Lab, host: &str, sport: u16, dsts: &[&str]) {
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', {sport}))\nfor d in {dsts:?}:\n    s.sendto(b'hp', (d, 9))\n"
    );
    lab.exec(host, &["python3", "-c", &script]).unwrap();
}

/// Easy NAT keeps a socket's public port for every destination; hard NAT gives each destination its
/// own random port. Hole punching (and the relay fallback) is tested against exactly these two.
#[test]
fn easy_nat_keeps_the_port_and_hard_nat_changes_it_per_destination() {
    if !require_root_and(&["conntrack", "python3"]) {
        return;
    }
    let mut lab = Lab::new().unwrap();
    lab.internet().unwrap();
    let easy = lab.isp("easy", NatKind::Easy).unwrap();
    let hard = lab.isp("hard", NatKind::Hard).unwrap();
    lab.host_behind(&easy, "a").unwrap();
    lab.host_behind(&hard, "b").unwrap();
    let dsts = [VPS_IP, VIEWER_IP, "198.51.100.1"];
    udp_from_port(&lab, "a", 41641, &dsts);
    udp_from_port(&lab, "b", 41641, &dsts);

    let public_ports = |site: &str, wan_ip: &str| -> Vec<u16> {
        let flows = parse_flows(&lab.conntrack(site, &["-p", "udp"]).unwrap());
        dsts.iter()
            .map(|d| {
                let f = flows
                    .iter()
                    .find(|f| f.orig_dst == *d && f.orig_sport == Some(41641))
                    .unwrap_or_else(|| panic!("no UDP flow to {d} in {site}: {flows:#?}"));
                assert_eq!(
                    f.reply_dst, wan_ip,
                    "{site}: flow to {d} not translated: {f:?}"
                );
                f.reply_dport.expect("reply dport")
            })
            .collect()
    };
    let easy_ports = public_ports("easy", &easy.wan_ip);
    assert!(
        easy_ports.iter().all(|p| *p == 41641),
        "easy NAT should keep source port 41641 for every destination, got {easy_ports:?}"
    );
    let hard_ports = public_ports("hard", &hard.wan_ip);
    let mut distinct = hard_ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    // Three random picks from ~64k ports: all equal by chance is ~1 in 4 billion.
    assert!(
        distinct.len() > 1,
        "hard NAT should map each destination to its own port, got {hard_ports:?}"
    );
}

/// Dropping a lab removes its namespaces and stops its processes, also when the test panics.
#[test]
fn dropping_the_lab_removes_namespaces_and_processes_even_on_panic() {
    if !require_root_and(&["sleep"]) {
        return;
    }
    let (prefix, pid) = {
        let mut lab = Lab::new().unwrap();
        lab.add_host("a").unwrap();
        let id = lab.spawn("a", "sleeper", &["sleep", "600"]).unwrap();
        (lab.prefix().to_string(), lab.pid(id))
    };
    let left = homeport_tests::sh("ip", &["netns", "list"]).unwrap();
    assert!(
        !left.contains(&format!("{prefix}-")),
        "namespaces left behind: {left}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still running"
    );

    let prefix = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let p2 = prefix.clone();
    let r = std::thread::spawn(move || {
        let mut lab = Lab::new().unwrap();
        lab.add_host("a").unwrap();
        *p2.lock().unwrap() = lab.prefix().to_string();
        panic!("deliberate panic inside a lab");
    })
    .join();
    assert!(r.is_err());
    let prefix = prefix.lock().unwrap().clone();
    assert!(!prefix.is_empty());
    let left = homeport_tests::sh("ip", &["netns", "list"]).unwrap();
    assert!(
        !left.contains(&format!("{prefix}-")),
        "namespaces left behind after a panic: {left}"
    );
}
