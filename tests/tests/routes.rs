//! Subnet routes and the internet exit in network namespaces, behind real NAT: a home node
//! advertises its LAN, where a "NAS" runs no homeport; a laptop in a café reaches the NAS only
//! once the admin approves the route and the policy allows it, and loses it within seconds of an
//! unapproval. The laptop sends its internet traffic out of the VPS with `exit-node`, and none
//! of it leaves its own uplink when the exit dies; `exit-node off` restores routing exactly.

use anyhow::{Context, Result};
use homeport_tests::{Coordinator, Lab, NatKind, Node, VPS_IP};
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
