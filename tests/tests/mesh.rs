//! The mesh in network namespaces: a coordinator on the "VPS" and three nodes on routed networks
//! reaching each other directly. Real TUN devices, real UDP, real processes.

use anyhow::{Context, Result, bail};
use homeport_tests::{Coordinator, Lab, Node, VPS_IP};
use homeport_tests::{require_root, wait_until};
use std::time::{Duration, Instant};

/// Hosts n1..nN, each on its own routed subnet 10.1.K.0/24 off the internet router.
fn mesh_lab(n: usize) -> Result<(Lab, Coordinator, Vec<Node>, String)> {
    let mut lab = Lab::new()?;
    lab.internet()?;
    let coord = lab.start_coordinator("vps", VPS_IP)?;
    let key = coord.authkey(true)?;
    let mut nodes = vec![];
    for k in 1..=n {
        let h = format!("n{k}");
        lab.add_host(&h)?;
        lab.link(
            "net",
            &format!("10.1.{k}.1/24"),
            &h,
            &format!("10.1.{k}.2/24"),
        )?;
        lab.default_route(&h, &format!("10.1.{k}.1"))?;
        nodes.push(lab.start_node(&h, &coord, &key, &h)?);
    }
    Ok((lab, coord, nodes, key))
}

fn can_ping(lab: &Lab, from: &str, ip: &str) -> bool {
    lab.ping(from, ip)
}

fn wait_ping(lab: &Lab, from: &str, ip: &str) -> Result<()> {
    wait_until(
        &format!("{from} to ping {ip}"),
        Duration::from_secs(15),
        || can_ping(lab, from, ip),
    )
}

/// Sends `mb` MiB of pseudo-random data over TCP from `from` to `to_ip` (served in `to`) and
/// returns (sent sha256, received sha256).
fn tcp_transfer(
    lab: &mut Lab,
    from: &str,
    to: &str,
    to_ip: &str,
    mb: usize,
) -> Result<(String, String)> {
    let server = format!(
        r#"
import socket, hashlib
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{to_ip}", 5201)); s.listen(1)
c, _ = s.accept(); h = hashlib.sha256()
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b)
print(h.hexdigest(), flush=True)
"#
    );
    let srv = lab.spawn(to, "sink", &["python3", "-c", &server])?;
    std::thread::sleep(Duration::from_millis(500));
    let client = format!(
        r#"
import socket, hashlib, random
r = random.Random(7); h = hashlib.sha256()
s = socket.create_connection(("{to_ip}", 5201), timeout=60)
for i in range({mb}):
    b = r.randbytes(1 << 20); h.update(b); s.sendall(b)
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
print(h.hexdigest())
"#
    );
    let sent = lab
        .exec(from, &["python3", "-c", &client])?
        .trim()
        .to_string();
    wait_until("the sink to finish", Duration::from_secs(30), || {
        lab.log(srv).trim().len() >= 64
    })?;
    let got = lab
        .log(srv)
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    Ok((sent, got))
}

#[test]
fn three_nodes_ping_all_pairs_and_carry_200mb_intact() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (mut lab, _coord, nodes, _) = mesh_lab(3)?;
    let ips: Vec<String> = nodes.iter().map(|n| n.ip()).collect::<Result<_>>()?;
    for (i, a) in nodes.iter().enumerate() {
        for (j, ip) in ips.iter().enumerate() {
            if i != j {
                wait_ping(&lab, &a.hostname, ip)?;
            }
        }
    }
    // IPv6 mesh addresses work too.
    let v6 = nodes[1].cli(&["ip", "-6"])?.trim().to_string();
    wait_until("n1 to ping n2 over IPv6", Duration::from_secs(10), || {
        lab.exec("n1", &["ping", "-6", "-c", "1", "-W", "1", &v6])
            .is_ok()
    })?;
    let t = Instant::now();
    let (sent, got) = tcp_transfer(&mut lab, "n1", "n3", &ips[2], 200)?;
    eprintln!("200 MiB n1→n3 in {:?}", t.elapsed());
    assert_eq!(sent, got, "the data arrived intact");
    // status shows the direct path and the bytes.
    let st: serde_json::Value = serde_json::from_str(&nodes[0].cli(&["status", "--json"])?)?;
    let n3 = st["peers"]
        .as_array()
        .context("peers")?
        .iter()
        .find(|p| p["name"] == "n3")
        .context("n3 in n1's status")?;
    assert_eq!(n3["path"]["kind"], "direct", "{n3}");
    assert!(n3["tx_bytes"].as_u64().unwrap_or(0) > 200 << 20, "{n3}");
    Ok(())
}

#[test]
fn policy_is_enforced_both_ways_and_revocation_cuts_off() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (mut lab, coord, nodes, _) = mesh_lab(3)?;
    let ips: Vec<String> = nodes.iter().map(|n| n.ip()).collect::<Result<_>>()?;
    wait_ping(&lab, "n1", &ips[2])?;
    wait_ping(&lab, "n3", &ips[0])?;
    // n1 and n3 may not talk; everyone may talk to and from n2.
    let policy = lab.dir().join("policy.toml");
    std::fs::write(
        &policy,
        r#"
[[rules]]
from = ["n1", "n3"]
to = ["n2"]
ports = ["*", "icmp"]

[[rules]]
from = ["n2"]
to = ["*"]
ports = ["*", "icmp"]
"#,
    )?;
    coord.admin(&["policy", "set", policy.to_str().unwrap()])?;
    wait_until(
        "the policy to stop n1 → n3",
        Duration::from_secs(5),
        || !can_ping(&lab, "n1", &ips[2]),
    )?;
    assert!(
        !can_ping(&lab, "n3", &ips[0]),
        "n3 → n1 must be refused too"
    );
    assert!(can_ping(&lab, "n1", &ips[1]), "n1 → n2 allowed");
    assert!(can_ping(&lab, "n2", &ips[0]), "n2 → n1 allowed");
    assert!(can_ping(&lab, "n3", &ips[1]), "n3 → n2 allowed");

    // Revoke n2: within a second nobody reaches it, and its daemon leaves with an error.
    coord.admin(&["node", "remove", "n2"])?;
    let t = Instant::now();
    wait_until("n1 to lose n2", Duration::from_secs(5), || {
        !can_ping(&lab, "n1", &ips[1])
    })?;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "revocation took {:?}",
        t.elapsed()
    );
    wait_until("n2's daemon to exit", Duration::from_secs(10), || {
        lab.check_running(nodes[1].proc).is_err()
    })?;
    let nodes_out = coord.admin(&["nodes", "--json"])?;
    assert!(!nodes_out.contains("\"n2\""), "{nodes_out}");
    Ok(())
}

#[test]
fn restart_keeps_address_and_coordinator_outage_keeps_traffic() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (mut lab, coord, nodes, key) = mesh_lab(2)?;
    let ip1 = nodes[0].ip()?;
    let ip2 = nodes[1].ip()?;
    wait_ping(&lab, "n1", &ip2)?;

    // A node restart (same state dir) keeps its mesh address and the mesh heals.
    lab.stop(nodes[1].proc)?;
    let tun_gone = lab.exec("n2", &["ip", "link", "show", "hp0"]).is_err();
    assert!(tun_gone, "the TUN is removed on a clean stop");
    let n2 = lab.start_node("n2", &coord, &key, "n2")?;
    assert_eq!(n2.ip()?, ip2, "restart keeps the mesh address");
    wait_ping(&lab, "n1", &ip2)?;

    // The coordinator goes away: traffic keeps flowing on the last map.
    lab.stop(coord.proc)?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(can_ping(&lab, "n1", &ip2));
    assert!(can_ping(&lab, "n2", &ip1));
    let st = n2.cli(&["status"])?;
    assert!(
        st.contains("unreachable"),
        "status says the coordinator is unreachable: {st}"
    );

    // An outage of about 9 s: a node that doubled its retry delay (0.5, 1, 2, 4, 8 s) would
    // next try 15.5 s after the loss, 6 s after the coordinator is back.
    std::thread::sleep(Duration::from_secs(6));

    // It comes back (same state dir): every node holds its stream again within 5 s, and a
    // change made then arrives: a third node joins and is reachable.
    let coord2 = lab.start_coordinator("vps", VPS_IP)?;
    let back = Instant::now();
    assert_eq!(coord2.pin, coord.pin, "the coordinator keeps its TLS key");
    for n in [&nodes[0], &n2] {
        wait_until(
            "every node connected again within 5 s of the coordinator's restart",
            Duration::from_secs(5),
            || n.cli(&["status"]).is_ok_and(|s| !s.contains("unreachable")),
        )?;
    }
    eprintln!(
        "nodes current again {:?} after the coordinator restart",
        back.elapsed()
    );
    lab.add_host("n3")?;
    lab.link("net", "10.1.3.1/24", "n3", "10.1.3.2/24")?;
    lab.default_route("n3", "10.1.3.1")?;
    let n3 = lab.start_node("n3", &coord2, &key, "n3")?;
    let ip3 = n3.ip()?;
    wait_ping(&lab, "n1", &ip3)?;
    wait_ping(&lab, "n3", &ip2)?;
    if ip3 == ip1 || ip3 == ip2 {
        bail!("address reused: {ip3}");
    }
    Ok(())
}

/// A node the coordinator refuses (its admin removed it) exits with status 78, keeps its private
/// key and registration, says how to come back, and joins again with a new auth key as the same
/// key and address. `homeport logout` is the only way its registration is forgotten.
#[test]
fn refused_node_exits_78_keeps_its_key_and_rejoins_with_the_same_address() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (mut lab, coord, nodes, _) = mesh_lab(2)?;
    let ip2 = nodes[1].ip()?;
    wait_ping(&lab, "n1", &ip2)?;
    let state = nodes[1].state_dir.clone();
    let key_file = state.join("private.key");
    let key_before = std::fs::read_to_string(&key_file)?;

    coord.admin(&["node", "remove", "n2"])?;
    wait_until("n2's daemon to exit", Duration::from_secs(10), || {
        lab.check_running(nodes[1].proc).is_err()
    })?;
    let status = lab.stop(nodes[1].proc)?;
    let log = lab.log(nodes[1].proc);
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("homeport up --authkey-file"), "{log}");
    assert_eq!(
        std::fs::read_to_string(&key_file)?,
        key_before,
        "the private key is kept"
    );
    let reg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("node.json"))?)?;
    assert_eq!(reg["refused"], true, "{reg}");

    // Started again without a new key (what systemd would do without RestartPreventExitStatus):
    // it exits 78 at once and says what to do.
    let exe = homeport_tests::bin("homeport")?;
    let p = lab.spawn(
        "n2",
        "n2-without-key",
        &[
            exe.to_str().context("utf-8")?,
            "up",
            "--tun",
            "hp0",
            "--state-dir",
            state.to_str().context("utf-8")?,
        ],
    )?;
    wait_until(
        "the keyless restart to exit",
        Duration::from_secs(10),
        || lab.check_running(p).is_err(),
    )?;
    let log = lab.log(p);
    assert_eq!(lab.stop(p)?.code(), Some(78), "{log}");
    assert!(log.contains("--authkey-file"), "{log}");

    // With a new auth key it joins again: the same key, the same address, reachable again.
    let new_key = coord.authkey(false)?;
    let n2 = lab.start_node("n2", &coord, &new_key, "n2")?;
    assert_eq!(n2.ip()?, ip2, "the previous address is given back");
    assert_eq!(std::fs::read_to_string(&key_file)?, key_before);
    wait_ping(&lab, "n1", &ip2)?;

    // logout refuses while the daemon runs, then forgets the registration and keeps the key.
    let logout = || {
        std::process::Command::new(&exe)
            .args(["logout", "--state-dir"])
            .arg(&state)
            .output()
    };
    let o = logout()?;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("homeport down"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    lab.stop(n2.proc)?;
    let o = logout()?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!state.join("node.json").exists());
    assert_eq!(std::fs::read_to_string(&key_file)?, key_before);
    Ok(())
}
