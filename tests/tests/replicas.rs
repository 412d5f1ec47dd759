//! High availability: two coordinator replicas share one PostgreSQL database (a throwaway cluster
//! in the VPS's namespace), each with its own URL, pin, STUN and relay. Real nodes and an exit in
//! a namespace lab stream from the first; it is killed (SIGKILL, no goodbye) and they must be
//! current on the second within 5 s, never shown offline, and rules added on the second (a
//! policy rule, a published port) must apply.

use anyhow::{Context, Result, bail};
use homeport_tests::{Lab, Node, Postgres, VPS_IP, require_root_and, wait_until};
use std::time::{Duration, Instant};

const A_URL: &str = "https://198.51.100.10:8443";
const B_URL: &str = "https://198.51.100.10:9443";

fn policy(lab: &Lab, c: &homeport_tests::Coordinator, name: &str, body: &str) -> Result<()> {
    let f = lab.dir().join(name);
    std::fs::write(&f, body)?;
    c.admin(&["policy", "set", f.to_str().context("lab dir is not UTF-8")?])?;
    Ok(())
}

/// The replica a node streams from, when its stream is up (`homeport status`).
fn streaming_from(n: &Node) -> Option<String> {
    let s = n.cli(&["status"]).ok()?;
    let first = s.lines().next()?;
    let rest = first.split(" coordinator ").nth(1)?;
    rest.contains("(connected")
        .then(|| rest.split_whitespace().next().unwrap_or("").to_string())
}

/// Names of the nodes coordinator `c` shows online.
fn online(c: &homeport_tests::Coordinator) -> Vec<String> {
    let Ok(out) = c.admin(&["nodes", "--json"]) else {
        return vec![];
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|n| n["online"] == true)
                .filter_map(|n| n["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn nodes_and_an_exit_fail_over_to_another_replica_within_5_s_and_rules_added_there_apply()
-> Result<()> {
    if !require_root_and(&["curl", "python3"]) {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    lab.internet()?;
    let Some(pg) = Postgres::start_in(&lab, "vps", 5432)? else {
        return Ok(());
    };
    let a = lab.start_coordinator_at(
        "vps",
        "a",
        VPS_IP,
        8443,
        3478,
        &["--database-url", &pg.url, "--public-url", A_URL],
    )?;
    let b = lab.start_coordinator_at(
        "vps",
        "b",
        VPS_IP,
        9443,
        3479,
        &["--database-url", &pg.url, "--public-url", B_URL],
    )?;
    assert_ne!(a.pin, b.pin, "each replica has its own TLS key");
    // Nobody may reach anybody yet (a rule that selects no node).
    policy(
        &lab,
        &a,
        "deny.json",
        r#"{"rules":[{"from":["tag:nobody"],"to":["tag:nobody"]}]}"#,
    )?;
    let key = a.authkey(true)?;
    let mut nodes = vec![];
    for k in 1..=2 {
        let h = format!("n{k}");
        lab.add_host(&h)?;
        lab.link(
            "net",
            &format!("10.1.{k}.1/24"),
            &h,
            &format!("10.1.{k}.2/24"),
        )?;
        lab.default_route(&h, &format!("10.1.{k}.1"))?;
        nodes.push(lab.start_node(&h, &a, &key, &h)?);
    }
    // The exit runs on A's VPS, as it would; edge protection off: two coordinators' ports.
    nodes.push(lab.start_exit("vps", &a, &key, "vps", &["--edge-protection", "off"])?);
    let web = lab.spawn(
        "n2",
        "web",
        &["python3", "-m", "http.server", "8000", "--bind", "0.0.0.0"],
    )?;
    let ip2 = nodes[1].ip()?;
    for n in &nodes {
        wait_until(
            &format!("{} to stream from A and know both replicas", n.hostname),
            Duration::from_secs(10),
            || {
                streaming_from(n).as_deref() == Some(A_URL)
                    && std::fs::read_to_string(n.state_dir.join("replicas.json"))
                        .is_ok_and(|s| s.contains(A_URL) && s.contains(B_URL))
            },
        )?;
    }
    wait_until("every node online on B", Duration::from_secs(5), || {
        online(&b).len() == 3
    })?;
    assert!(!lab.ping("n1", &ip2), "the policy keeps n1 from n2");

    // SIGKILL: A says goodbye to nobody; its nodes' TCP connections are reset by the kernel.
    let killed = Instant::now();
    homeport_tests::run(
        std::process::Command::new("kill").args(["-9", &lab.pid(a.proc).to_string()]),
    )?;
    let mut offline_seen: Vec<(Duration, Vec<String>)> = vec![];
    let mut moved = [None, None, None];
    while moved.iter().any(Option::is_none) {
        if killed.elapsed() > Duration::from_secs(5) {
            bail!("not every node streams from B 5 s after A was killed: {moved:?}");
        }
        for (i, n) in nodes.iter().enumerate() {
            if moved[i].is_none() && streaming_from(n).as_deref() == Some(B_URL) {
                moved[i] = Some(killed.elapsed());
            }
        }
        let on = online(&b);
        if on.len() != 3 {
            offline_seen.push((killed.elapsed(), on));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("failed over to B after {moved:?}");

    // Right away, a rule on B: n1 and n2 may talk. It reaches both nodes through B.
    policy(
        &lab,
        &b,
        "allow.json",
        r#"{"rules":[{"from":["n1","n2"],"to":["n1","n2"]}]}"#,
    )?;
    let ruled = Instant::now();
    wait_until(
        "n1 to ping n2 under the rule added on B",
        Duration::from_secs(10),
        || lab.ping("n1", &ip2),
    )?;
    eprintln!("rule added on B applied after {:?}", ruled.elapsed());
    // And a port published on B: the exit (which streamed from A) opens it to the viewer.
    b.publish("vps", 8080, "n2:8000")?;
    let published = Instant::now();
    wait_until(
        "the viewer to reach the port published on B",
        Duration::from_secs(10),
        || {
            lab.exec(
                "viewer",
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "2",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://198.51.100.10:8080/",
                ],
            )
            .is_ok_and(|c| c.trim() == "200")
        },
    )?;
    eprintln!("port published on B open after {:?}", published.elapsed());
    lab.check_running(web)?;

    // B never shows them offline, also past the time A's heartbeat counts as dead.
    while killed.elapsed() < Duration::from_secs(9) {
        let on = online(&b);
        if on.len() != 3 {
            offline_seen.push((killed.elapsed(), on));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        offline_seen.is_empty(),
        "B showed nodes offline after A died (time, online): {offline_seen:?}"
    );
    // A's relay is gone from the maps: only B's STUN port is left.
    let map = std::fs::read_to_string(nodes[0].state_dir.join("map.json"))?;
    let m: serde_json::Value = serde_json::from_str(&map)?;
    let coordinators: Vec<&str> = m["coordinators"]
        .as_array()
        .context("the map lists the coordinators")?
        .iter()
        .filter_map(|c| c["url"].as_str())
        .collect();
    assert_eq!(coordinators, [B_URL], "A left the map's replica list");
    assert_eq!(
        m["relays"].as_array().map(Vec::len),
        Some(1),
        "{}",
        m["relays"]
    );
    drop(pg);
    Ok(())
}
