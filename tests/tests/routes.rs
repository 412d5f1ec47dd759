//! Subnet routes and the internet exit in network namespaces, behind real NAT: a home node
//! advertises its LAN, where a "NAS" runs no homeport; a laptop in a café reaches the NAS only
//! once the admin approves the route and the policy allows it, and loses it within seconds of an
//! unapproval. The laptop sends its internet traffic out of the VPS with `exit-node`, and none
//! of it leaves its own uplink when the exit dies; `exit-node off` restores routing exactly.

use anyhow::{Context, Result};
use homeport_tests::{Coordinator, Lab, NatKind, Node, VIEWER_IP, VPS_IP};
use homeport_tests::{require_root_and, wait_until};
use std::time::{Duration, Instant};

const LAN: &str = "10.10.1.0/24";
const WEB_PORT: &str = "8080";

/// A web server on `host` that answers every GET with the peer address it saw.
fn web_server(lab: &mut Lab, host: &str, ip: &str) -> Result<()> {
    let code = format!(
        r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = self.client_address[0].encode()
        self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a): pass
http.server.HTTPServer(("{ip}", {WEB_PORT}), H).serve_forever()
"#
    );
    lab.spawn(host, &format!("web-{host}"), &["python3", "-c", &code])?;
    let url = format!("http://{ip}:{WEB_PORT}/");
    wait_until(
        &format!("the web server on {host}"),
        Duration::from_secs(10),
        || lab.exec(host, &["curl", "-s", "-m", "1", &url]).is_ok(),
    )
}

/// What `from` gets from `ip`'s web server (the address the server saw), or None.
fn fetch(lab: &Lab, from: &str, ip: &str) -> Option<String> {
    let url = format!("http://{ip}:{WEB_PORT}/");
    lab.exec(from, &["curl", "-s", "-m", "2", &url])
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Internet (with the coordinator on the VPS), a home behind CGNAT with a NAS on its LAN
/// 10.10.1.0/24, a laptop behind a café's NAT; both nodes joined.
fn lab(home_flags: &[&str]) -> Result<(Lab, Coordinator, Node, Node, String)> {
    let mut lab = Lab::new()?;
    lab.internet()?;
    let coord = lab.start_coordinator("vps", VPS_IP)?;
    let key = coord.authkey(true)?;
    let isp = lab.isp("isp", NatKind::Easy)?;
    let router = lab.router_behind(&isp, "router", "10.10.1", NatKind::Easy)?;
    lab.host_behind(&router, "home")?;
    let nas = lab.host_behind(&router, "nas")?;
    let cafe_isp = lab.isp("cafeisp", NatKind::Easy)?;
    let cafe = lab.router_behind(&cafe_isp, "cafe", "10.10.2", NatKind::Easy)?;
    lab.host_behind(&cafe, "laptop")?;
    web_server(&mut lab, "nas", &nas)?;
    let home = lab.start_node_with("home", &coord, &key, "home", home_flags)?;
    let laptop = lab.start_node("laptop", &coord, &key, "laptop")?;
    Ok((lab, coord, home, laptop, nas))
}

fn table_5281(lab: &Lab, host: &str) -> String {
    lab.exec(host, &["ip", "route", "show", "table", "5281"])
        .unwrap_or_default()
}

fn set_policy(lab: &Lab, coord: &Coordinator, toml: &str) -> Result<()> {
    let p = lab.dir().join("policy.toml");
    std::fs::write(&p, toml)?;
    coord.admin(&["policy", "set", p.to_str().context("utf-8")?])?;
    Ok(())
}

#[test]
fn a_lan_host_behind_home_is_reached_only_after_approval_and_as_policy_allows() -> Result<()> {
    if !require_root_and(&["curl", "python3"]) {
        return Ok(());
    }
    // A bad route is refused at once, naming what would be accepted.
    let bad = std::process::Command::new(homeport_tests::bin("homeport")?)
        .args([
            "up",
            "--advertise-routes",
            "10.10.1.1/24",
            "--state-dir",
            "/nonexistent",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("10.10.1.0/24"),
        "{err}"
    );

    let (lab, coord, home, laptop, nas) = lab(&["--advertise-routes", LAN])?;
    let home_ip = home.ip()?;
    wait_until("the laptop to ping home", Duration::from_secs(20), || {
        lab.ping("laptop", &home_ip)
    })?;
    wait_until(
        "the coordinator to list home's route",
        Duration::from_secs(10),
        || {
            coord
                .admin(&["routes", "list"])
                .is_ok_and(|o| o.contains("home") && o.contains(LAN))
        },
    )?;
    // Advertised but not approved: installed nowhere, unreachable.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!table_5281(&lab, "laptop").contains("10.10.1.0"));
    assert_eq!(fetch(&lab, "laptop", &nas), None, "reached before approval");
    let st = home.cli(&["status"])?;
    assert!(st.contains("awaiting approval: 10.10.1.0/24"), "{st}");
    // An approval of something home does not advertise is refused, naming what it does.
    let e = coord
        .admin(&["routes", "approve", "home", "10.20.0.0/16"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not advertise") && e.contains(LAN), "{e}");

    coord.admin(&["routes", "approve", "home", LAN])?;
    let seen = homeport_tests::wait_for(
        "the laptop to reach the NAS",
        Duration::from_secs(15),
        || fetch(&lab, "laptop", &nas),
    )?;
    // Masqueraded by home (the NAS's router has no route back to the mesh).
    assert_eq!(seen, "10.10.1.2", "the NAS saw home's LAN address");
    assert!(table_5281(&lab, "laptop").contains("10.10.1.0/24 dev hp0"));
    let st = laptop.cli(&["status"])?;
    assert!(st.contains("route 10.10.1.0/24 via home"), "{st}");

    // The policy names the route as a destination: the laptop may reach only the NAS's web
    // port; then a policy that leaves it out denies it.
    set_policy(
        &lab,
        &coord,
        "[[rules]]\nfrom = [\"laptop\"]\nto = [\"home\", \"10.10.1.3\"]\nports = [\"tcp:8080\"]\n",
    )?;
    // Applied once pings (not allowed any more) stop.
    wait_until("the policy to reach home", Duration::from_secs(10), || {
        !lab.ping("laptop", &home_ip)
    })?;
    assert!(fetch(&lab, "laptop", &nas).is_some(), "allowed by policy");
    set_policy(
        &lab,
        &coord,
        "[[rules]]\nfrom = [\"laptop\"]\nto = [\"home\"]\nports = [\"*\"]\n",
    )?;
    wait_until(
        "the policy to deny the NAS",
        Duration::from_secs(10),
        || fetch(&lab, "laptop", &nas).is_none(),
    )?;
    wait_until("home itself still allowed", Duration::from_secs(5), || {
        lab.ping("laptop", &home_ip)
    })?;
    set_policy(&lab, &coord, "rules = []\n")?;
    homeport_tests::wait_for("the NAS again", Duration::from_secs(10), || {
        fetch(&lab, "laptop", &nas)
    })?;

    // Unapproved: gone from the laptop within two seconds, and unreachable.
    let t = Instant::now();
    coord.admin(&["routes", "unapprove", "home", LAN])?;
    wait_until(
        "the route to leave the laptop",
        Duration::from_secs(2),
        || !table_5281(&lab, "laptop").contains("10.10.1.0"),
    )?;
    eprintln!(
        "route removed from the laptop {:?} after unapprove",
        t.elapsed()
    );
    assert_eq!(
        fetch(&lab, "laptop", &nas),
        None,
        "reached after unapproval"
    );
    Ok(())
}

/// The routing state `exit-node off` must restore exactly.
fn routing(lab: &Lab, host: &str) -> Result<String> {
    let mut out = String::new();
    for args in [
        &["-4", "rule", "show"][..],
        &["-6", "rule", "show"],
        &["-4", "route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ] {
        let mut a = vec!["ip"];
        a.extend_from_slice(args);
        out.push_str(&lab.exec(host, &a)?);
    }
    Ok(out)
}

/// Packets from `host` to the internet host that left by any interface but the TUN.
fn leaked(lab: &Lab, host: &str) -> Result<u64> {
    let t = lab.exec(host, &["nft", "list", "table", "inet", "leakcheck"])?;
    let n = t
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .context("counter in leakcheck")?;
    Ok(n.parse()?)
}

#[test]
fn the_exit_node_carries_the_internet_stops_when_it_dies_and_off_restores_routing() -> Result<()> {
    if !require_root_and(&["curl", "python3"]) {
        return Ok(());
    }
    let mut lab = Lab::new()?;
    lab.internet()?;
    let coord = lab.start_coordinator("vps", VPS_IP)?;
    let key = coord.authkey(true)?;
    let exit = lab.start_exit("vps", &coord, &key, "vps", &["--advertise-exit-node"])?;
    let cafe_isp = lab.isp("cafeisp", NatKind::Easy)?;
    let cafe = lab.router_behind(&cafe_isp, "cafe", "10.10.2", NatKind::Easy)?;
    lab.host_behind(&cafe, "laptop")?;
    let laptop = lab.start_node("laptop", &coord, &key, "laptop")?;
    web_server(&mut lab, "viewer", VIEWER_IP)?;
    let vps_ip = exit.ip()?;
    wait_until(
        "the laptop to ping the vps",
        Duration::from_secs(20),
        || lab.ping("laptop", &vps_ip),
    )?;
    // Without an exit the internet host sees the café's public address.
    let direct = fetch(&lab, "laptop", VIEWER_IP).context("direct fetch")?;
    assert!(direct.starts_with("203.0.113."), "{direct}");
    // The kernel adds a link-local address's route once its duplicate detection ends: wait for
    // that, so "before" is settled.
    wait_until(
        "IPv6 duplicate address detection",
        Duration::from_secs(10),
        || {
            lab.exec("laptop", &["ip", "-6", "addr", "show", "tentative"])
                .is_ok_and(|o| o.trim().is_empty())
        },
    )?;
    let before = routing(&lab, "laptop")?;
    lab.exec_stdin(
        "laptop",
        &["nft", "-f", "-"],
        format!(
            "table inet leakcheck {{\n chain post {{\n  type filter hook postrouting priority 0; policy accept;\n  \
             oifname != \"hp0\" ip daddr {VIEWER_IP} counter\n }}\n}}\n"
        )
        .as_bytes(),
    )?;
    let reset = |lab: &Lab| {
        lab.exec(
            "laptop",
            &["nft", "reset", "counters", "table", "inet", "leakcheck"],
        )
    };

    // Chosen before the admin approved vps as an exit: internet traffic stops, nothing leaks.
    laptop.cli(&["exit-node", "vps"])?;
    wait_until(
        "status to say vps is no approved exit",
        Duration::from_secs(5),
        || {
            laptop
                .cli(&["status"])
                .is_ok_and(|s| s.contains("exit node: vps (vps is not an approved exit"))
        },
    )?;
    reset(&lab)?;
    assert_eq!(
        fetch(&lab, "laptop", VIEWER_IP),
        None,
        "internet without an approved exit"
    );
    assert_eq!(
        leaked(&lab, "laptop")?,
        0,
        "packets left outside the tunnel"
    );

    coord.admin(&["routes", "approve", "vps", "exit"])?;
    let seen =
        homeport_tests::wait_for("the internet through vps", Duration::from_secs(15), || {
            fetch(&lab, "laptop", VIEWER_IP)
        })?;
    assert_eq!(seen, VPS_IP, "the internet host sees the VPS's address");
    let st = laptop.cli(&["status"])?;
    assert!(st.contains("exit node: vps (in use)"), "{st}");
    // The coordinator (same address as the exit here) stays outside the tunnel.
    let rules = lab.exec("laptop", &["ip", "rule", "show"])?;
    assert!(
        rules.contains(&format!("to {VPS_IP} lookup main")),
        "{rules}"
    );

    // The policy decides who may use the exit ("internet" as a destination), at the exit.
    set_policy(
        &lab,
        &coord,
        "[[rules]]\nfrom = [\"laptop\"]\nto = [\"vps\"]\n",
    )?;
    wait_until(
        "the policy to refuse the internet",
        Duration::from_secs(10),
        || fetch(&lab, "laptop", VIEWER_IP).is_none(),
    )?;
    set_policy(
        &lab,
        &coord,
        "[[rules]]\nfrom = [\"laptop\"]\nto = [\"vps\", \"internet\"]\n",
    )?;
    homeport_tests::wait_for(
        "the policy to allow the internet",
        Duration::from_secs(10),
        || fetch(&lab, "laptop", VIEWER_IP).filter(|s| s == VPS_IP),
    )?;

    // The exit dies: traffic stops, and not one packet to the internet host leaves the laptop
    // by its own uplink.
    lab.stop(exit.proc)?;
    wait_until(
        "status to say vps is offline",
        Duration::from_secs(10),
        || {
            laptop
                .cli(&["status"])
                .is_ok_and(|s| s.contains("vps is offline: internet traffic stopped"))
        },
    )?;
    reset(&lab)?;
    for _ in 0..3 {
        assert_eq!(
            fetch(&lab, "laptop", VIEWER_IP),
            None,
            "internet with the exit dead"
        );
    }
    assert_eq!(
        leaked(&lab, "laptop")?,
        0,
        "packets left outside the tunnel"
    );

    // Fallback asked for: the machine's own connection while the exit is down.
    laptop.cli(&["exit-node", "vps", "--fallback"])?;
    let seen = homeport_tests::wait_for("the fallback", Duration::from_secs(5), || {
        fetch(&lab, "laptop", VIEWER_IP)
    })?;
    assert_eq!(seen, direct, "fallback goes out of the café");

    // Off: the routing tables and rules are exactly as before.
    laptop.cli(&["exit-node", "off"])?;
    wait_until("routing as before", Duration::from_secs(5), || {
        routing(&lab, "laptop").is_ok_and(|r| r == before)
    })
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}\nbefore:\n{before}\nafter:\n{}",
            routing(&lab, "laptop").unwrap_or_default()
        )
    })?;
    assert_eq!(
        fetch(&lab, "laptop", VIEWER_IP).as_deref(),
        Some(direct.as_str())
    );
    Ok(())
}

#[test]
fn without_masquerade_the_lan_host_sees_the_mesh_source_when_its_router_routes_back() -> Result<()>
{
    if !require_root_and(&["curl", "python3"]) {
        return Ok(());
    }
    let (lab, coord, _home, laptop, nas) =
        lab(&["--advertise-routes", LAN, "--snat-routes", "false"])?;
    // The LAN routes the mesh prefix back to the home node (10.10.1.2).
    lab.ip(
        "nas",
        &["route", "add", "100.96.0.0/16", "via", "10.10.1.2"],
    )?;
    coord.admin(&["routes", "approve", "home", LAN])?;
    let seen = homeport_tests::wait_for(
        "the laptop to reach the NAS",
        Duration::from_secs(20),
        || fetch(&lab, "laptop", &nas),
    )?;
    assert_eq!(seen, laptop.ip()?, "the NAS saw the laptop's mesh address");
    Ok(())
}
