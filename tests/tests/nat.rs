//! NAT traversal in network namespaces (DESIGN.md Labs): double NAT at home (carrier + home
//! router), easy (`masquerade`) and hard (`masquerade random`) NATs, the coordinator's relay,
//! and a standard STUN server (coturn) for the node's STUN client.

use anyhow::{Context, Result};
use homeport_tests::{Lab, NatKind, Node, VPS_IP, require_root_and, wait_until};
use std::time::{Duration, Instant};

fn peer_path(node: &Node, peer: &str) -> Result<serde_json::Value> {
    let st: serde_json::Value = serde_json::from_str(&node.cli(&["status", "--json"])?)?;
    st["peers"]
        .as_array()
        .context("peers")?
        .iter()
        .find(|p| p["name"] == peer)
        .map(|p| p["path"].clone())
        .with_context(|| format!("{peer} in {}'s status", node.hostname))
}

/// Packets the VPS received on its STUN/relay port so far (an nft counter in the VPS namespace).
fn relay_packets(lab: &Lab) -> Result<u64> {
    let out = lab.exec("vps", &["nft", "-j", "list", "table", "inet", "hptest"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    for item in v["nftables"].as_array().context("nftables")? {
        if let Some(rule) = item.get("rule")
            && let Some(expr) = rule["expr"].as_array()
        {
            for e in expr {
                if let Some(c) = e.get("counter") {
                    return c["packets"].as_u64().context("packets");
                }
            }
        }
    }
    anyhow::bail!("no counter in table hptest")
}

fn count_relay(lab: &Lab) -> Result<()> {
    lab.exec_stdin(
        "vps",
        &["nft", "-f", "-"],
        b"table inet hptest {\n chain rx {\n  type filter hook input priority -10;\n  udp dport 3478 counter\n }\n}\n",
    )?;
    Ok(())
}

/// An ISP one routed hop away from the shared ISP segment (its own link to the internet router,
/// 192.0.2.128/30, out of the viewers' range: the shared ISP /24 would make it look on-link), with Easy NAT and `host` behind it (100.64.9.2). On the real internet two
/// customers' NATs are never on one L2 segment; this keeps the lab honest about that, which
/// matters for hole punching: openers are TTL-limited to die just past our own NATs.
fn routed_isp_with_host(lab: &mut Lab, isp: &str, host: &str) -> Result<()> {
    lab.add_host(isp)?;
    let (_, wan) = lab.link("net", "192.0.2.129/30", isp, "192.0.2.130/30")?;
    lab.default_route(isp, "192.0.2.129")?;
    lab.forwarding(isp)?;
    lab.nat(isp, &wan, NatKind::Easy)?;
    lab.add_host(host)?;
    lab.link(isp, "100.64.9.1/24", host, "100.64.9.2/24")?;
    lab.default_route(host, "100.64.9.1")?;
    Ok(())
}

#[test]
fn double_nat_and_easy_nat_reach_a_direct_path() -> Result<()> {
    if !require_root_and(&["ping", "iperf3"]) {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    lab.internet()?;
    let carrier = lab.isp("carrier", NatKind::Easy)?;
    let router = lab.router_behind(&carrier, "router", "10.10.1", NatKind::Easy)?;
    lab.host_behind(&router, "home")?;
    routed_isp_with_host(&mut lab, "isp2", "laptop")?;
    count_relay(&lab)?;
    let coord = lab.start_coordinator("vps", VPS_IP)?;
    let key = coord.authkey(true)?;
    let home = lab.start_node("home", &coord, &key, "home")?;
    let t0 = Instant::now();
    let laptop = lab.start_node("laptop", &coord, &key, "laptop")?;
    let home_ip = home.ip()?;
    wait_until("laptop to reach home", Duration::from_secs(20), || {
        lab.ping("laptop", &home_ip)
    })?;
    let direct = wait_until(
        "a direct path laptop → home",
        Duration::from_secs(20),
        || peer_path(&laptop, "home").is_ok_and(|p| p["kind"] == "direct"),
    );
    if let Err(e) = direct {
        for h in ["carrier", "isp2", "router"] {
            eprintln!(
                "--- conntrack {h}:\n{}",
                lab.conntrack(h, &["-p", "udp"]).unwrap_or_default()
            );
        }
        eprintln!(
            "--- laptop status:\n{}",
            laptop.cli(&["status", "--json"]).unwrap_or_default()
        );
        eprintln!("--- home log:\n{}", lab.log(home.proc));
        eprintln!("--- laptop log:\n{}", lab.log(laptop.proc));
        return Err(e);
    }
    eprintln!("direct path after {:?} from laptop start", t0.elapsed());
    let p = peer_path(&laptop, "home")?;
    let addr = p["addr"].as_str().context("addr")?;
    assert!(
        addr.starts_with("203.0.113.") || addr.starts_with("192.0.2.130"),
        "the path goes to the peer NAT's public address: {p}"
    );
    // Traffic no longer passes the relay: 200 pings add (almost) nothing on the VPS's port.
    let before = relay_packets(&lab)?;
    lab.exec(
        "laptop",
        &["ping", "-q", "-c", "200", "-i", "0.01", &home_ip],
    )?;
    let after = relay_packets(&lab)?;
    assert!(
        after - before < 40,
        "relay saw {} packets during 200 pings",
        after - before
    );
    // homeport ping reports the direct path.
    let out = laptop.cli(&["ping", "home", "-c", "2"])?;
    assert!(out.contains("via direct "), "{out}");

    // The home NATs' mappings change mid-flow (conntrack flushed on both layers). Home's packets
    // are held at its router for half a second around the flush, so the laptop's next packets
    // reach the flushed carrier NAT first, as they would when a carrier reboots or reassigns
    // ports: the carrier keeps an entry for them, and Linux then gives home a new port towards
    // the laptop while STUN still sees the old one. The old direct path is dead. The flow must
    // survive: within 5 s it runs over the relay (the direct path's liveness timeout), and a
    // TCP stream running across the change keeps its connection and loses no data.
    let ping = lab.spawn(
        "laptop",
        "flood",
        &["ping", "-i", "0.05", "-c", "400", &home_ip],
    )?;
    lab.spawn(
        "home",
        "iperf3-server",
        &["iperf3", "-s", "-1", "-B", &home_ip],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let stream = lab.spawn(
        "laptop",
        "tcp-stream",
        &[
            "iperf3",
            "-c",
            &home_ip,
            "-t",
            "16",
            "-b",
            "20M",
            "-J",
            "--connect-timeout",
            "5000",
        ],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    lab.exec_stdin(
        "router",
        &["nft", "-f", "-"],
        b"table inet hphold {\n chain hold {\n  type filter hook forward priority -300;\n  ip saddr 10.10.1.0/24 drop\n }\n}\n",
    )?;
    lab.exec("router", &["conntrack", "-F"])?;
    lab.exec("carrier", &["conntrack", "-F"])?;
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    lab.exec("router", &["nft", "delete", "table", "inet", "hphold"])?;
    wait_until(
        "the flow to move off the dead path",
        Duration::from_secs(8),
        || peer_path(&laptop, "home").is_ok_and(|p| p["kind"] == "relay"),
    )?;
    wait_until(
        "the mesh to carry traffic again",
        Duration::from_secs(3),
        || lab.ping("laptop", &home_ip),
    )?;
    let back = t.elapsed();
    eprintln!("traffic back (relay) {back:?} after the NAT change");
    // Measured at 2.0-2.3 s (20 runs on an idle machine; 4.2 s with a TCP stream running and
    // both cores busy); the bound leaves room for a loaded CI machine.
    assert!(
        back < Duration::from_secs(7),
        "traffic back only after {back:?}"
    );
    // Stale NAT state pins the old port as long as anything is sent; a node whose direct path
    // worked and can no longer be found moves to a fresh port, and a direct path is found again
    // while the flow runs.
    // Measured at 7.9-9.0 s (20 runs); the bound leaves room for a loaded CI machine.
    let again = wait_until("a direct path again", Duration::from_secs(20), || {
        peer_path(&laptop, "home").is_ok_and(|p| p["kind"] == "direct")
    });
    if let Err(e) = again {
        for h in ["carrier", "isp2", "router"] {
            eprintln!(
                "--- conntrack {h}:\n{}",
                lab.conntrack(h, &["-p", "udp"]).unwrap_or_default()
            );
        }
        eprintln!("--- home log:\n{}", lab.log(home.proc));
        eprintln!("--- laptop log:\n{}", lab.log(laptop.proc));
        return Err(e);
    }
    eprintln!("direct again {:?} after the NAT change", t.elapsed());
    wait_until("the ping run to end", Duration::from_secs(30), || {
        lab.check_running(ping).is_err()
    })?;
    let status = lab.wait_exit(stream, Duration::from_secs(30))?;
    let out = lab.log(stream);
    let v: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("iperf3 gave no JSON ({status}):\n{out}"))?;
    let sent = v["end"]["sum_sent"]["bytes"].as_f64().unwrap_or(0.0);
    let got = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    eprintln!(
        "TCP stream across the NAT change: {:.1} MB sent, {:.1} MB received ({status})",
        sent / 1e6,
        got / 1e6
    );
    assert!(
        status.success() && v.get("error").is_none(),
        "the TCP stream survived the NAT change: {status}, {:?}",
        v.get("error")
    );
    assert!(
        sent > 10e6 && got >= sent * 0.95,
        "the stream carried its data across: {sent} bytes sent, {got} received"
    );
    let log = lab.log(ping);
    let received: u32 = log
        .split(" received")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .context("ping summary")?;
    eprintln!("{received}/400 pings answered across the NAT change");
    assert!(
        received >= 280,
        "the flow survived the mapping change: {received}/400 answered"
    );
    Ok(())
}

#[test]
fn hard_nats_fall_back_to_the_relay_and_say_why() -> Result<()> {
    if !require_root_and(&["ping"]) {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    lab.internet()?;
    let c1 = lab.isp("c1", NatKind::Hard)?;
    lab.host_behind(&c1, "home")?;
    let c2 = lab.isp("c2", NatKind::Hard)?;
    lab.host_behind(&c2, "laptop")?;
    count_relay(&lab)?;
    let coord = lab.start_coordinator("vps", VPS_IP)?;
    let key = coord.authkey(true)?;
    let home = lab.start_node("home", &coord, &key, "home")?;
    let laptop = lab.start_node("laptop", &coord, &key, "laptop")?;
    let home_ip = home.ip()?;
    wait_until(
        "laptop to reach home through the relay",
        Duration::from_secs(20),
        || lab.ping("laptop", &home_ip),
    )?;
    let before = relay_packets(&lab)?;
    lab.exec(
        "laptop",
        &["ping", "-q", "-c", "100", "-i", "0.01", &home_ip],
    )?;
    let after = relay_packets(&lab)?;
    assert!(
        after - before >= 200,
        "the relay carried the traffic: {} packets",
        after - before
    );
    let p = peer_path(&laptop, "home")?;
    assert_eq!(p["kind"], "relay", "{p}");
    let reason = p["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("answered"), "status says why: {reason}");
    let text = laptop.cli(&["status"])?;
    assert!(text.contains("relay ("), "{text}");
    let out = laptop.cli(&["ping", "home", "-c", "2"])?;
    assert!(out.contains("via relay"), "{out}");
    // netcheck sees the hard NAT: the coordinator's STUN and the peer saw different mappings.
    let nc = laptop.cli(&["netcheck"])?;
    assert!(nc.contains("relay 198.51.100.10:3478: bound"), "{nc}");
    Ok(())
}

#[test]
fn stun_client_against_coturn_reports_the_reflexive_address() -> Result<()> {
    if !require_root_and(&["turnserver"]) {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    lab.internet()?;
    let carrier = lab.isp("carrier", NatKind::Easy)?;
    let router = lab.router_behind(&carrier, "router", "10.10.1", NatKind::Easy)?;
    lab.host_behind(&router, "home")?;
    // A standard STUN server from Debian's coturn package, beside the coordinator on the VPS.
    let turn = lab.spawn(
        "vps",
        "coturn",
        &[
            "turnserver",
            "--stun-only",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "-n",
            "--listening-ip",
            VPS_IP,
            "--listening-port",
            "3479",
            "--log-file",
            "stdout",
            "--simple-log",
        ],
    )?;
    let coord = lab.start_coordinator("vps", VPS_IP)?;
    let key = coord.authkey(true)?;
    let home = lab.start_node("home", &coord, &key, "home")?;
    std::thread::sleep(Duration::from_secs(1));
    lab.check_running(turn)?;
    let out = home.cli(&["netcheck", "--stun", "198.51.100.10:3479", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let entry = v["stun"]
        .as_array()
        .context("stun")?
        .iter()
        .find(|e| e[0] == "198.51.100.10:3479")
        .with_context(|| format!("coturn in {out}"))?;
    let reflexive = entry[1]
        .as_str()
        .with_context(|| format!("coturn answered: {out}"))?;
    // The carrier's public address (the outer of the two NATs).
    assert!(
        reflexive.starts_with(&format!("{}:", carrier.wan_ip)),
        "{reflexive} vs {}",
        carrier.wan_ip
    );
    assert_eq!(v["udp"], true);
    // Two STUN servers saw one mapping: an easy NAT.
    assert!(
        v["mapping"]
            .as_str()
            .unwrap_or_default()
            .starts_with("easy"),
        "{out}"
    );
    Ok(())
}

#[test]
fn udp_blocked_to_the_vps_falls_back_to_the_relay_over_tcp() -> Result<()> {
    if !require_root_and(&["ping"]) {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    lab.internet()?;
    // Home's ISP drops every UDP datagram to the VPS (STUN, relay); TCP (the coordinator's
    // HTTPS port) passes. Both sides are behind hard NATs, so no direct path exists either.
    let c1 = lab.isp("c1", NatKind::Hard)?;
    lab.host_behind(&c1, "home")?;
    lab.exec_stdin(
        "c1",
        &["nft", "-f", "-"],
        format!(
            "table inet block {{\n chain drop_udp {{\n  type filter hook forward priority 0;\n  ip daddr {VPS_IP} meta l4proto udp drop\n }}\n}}\n"
        )
        .as_bytes(),
    )?;
    let c2 = lab.isp("c2", NatKind::Hard)?;
    lab.host_behind(&c2, "laptop")?;
    let coord = lab.start_coordinator("vps", VPS_IP)?;
    let key = coord.authkey(true)?;
    let home = lab.start_node("home", &coord, &key, "home")?;
    let laptop = lab.start_node("laptop", &coord, &key, "laptop")?;
    let home_ip = home.ip()?;
    let laptop_ip = laptop.ip()?;
    wait_until("laptop to reach home", Duration::from_secs(30), || {
        lab.ping("laptop", &home_ip)
    })?;
    assert!(lab.ping("home", &laptop_ip), "and back");
    let p = peer_path(&home, "laptop")?;
    assert_eq!(p["kind"], "relay", "{p}");
    assert!(
        p["reason"].as_str().unwrap_or_default().contains("TCP"),
        "status says the relay runs over TCP because UDP is blocked: {p}"
    );
    // A bulk transfer works over it too.
    let out = lab.exec(
        "laptop",
        &[
            "ping", "-q", "-c", "50", "-i", "0.02", "-s", "1200", &home_ip,
        ],
    )?;
    assert!(
        out.contains(" 0% packet loss") || out.contains(" 2% packet loss"),
        "{out}"
    );
    Ok(())
}
