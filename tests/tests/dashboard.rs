//! The web dashboard (issue 15), end to end in a namespace lab with the real binaries: the
//! coordinator and `homeport-exit up` on the VPS (198.51.100.10), `homeport up` at home behind
//! carrier-grade NAT, and a viewer on the internet (192.0.2.50).
//!
//! The coordinator serves the dashboard over plain HTTP on the VPS's mesh address only. A browser
//! on the home node (a device on the mesh) opens it: headless Chromium (Debian's `chromium`)
//! driven by playwright-core (`tests/browser/`, `npm ci` by deploy/setup.sh) through
//! `tests/browser/dashboard.js`. Screenshots go to `target/dashboard-screenshots/`.
//!
//! Needs root, `ip`, `nft`, `conntrack`, `curl`, `python3`, `node`, `/usr/bin/chromium`,
//! `tests/browser/node_modules/playwright-core` and the debug binaries (`cargo build --bins`).

use anyhow::{Context, Result, bail, ensure};
use homeport_tests::{
    Coordinator, Lab, NatKind, Node, VIEWER_IP, VPS_IP, in_ci, require_root_and, wait_for,
    wait_until,
};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::Duration;

const TOOLS: &[&str] = &["conntrack", "curl", "python3", "node"];
const CHROMIUM: &str = "/usr/bin/chromium";
/// The carrier's public address: what the whole home looks like from the internet.
const CARRIER_WAN: &str = "203.0.113.2";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

fn screenshot_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("target/dashboard-screenshots");
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Whether the browser half can run: Chromium and playwright-core. Missing under CI=true is a
/// failure, else a visible skip.
fn require_browser() -> bool {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).is_file() {
        missing.push(format!("{CHROMIUM} (Debian's chromium package)"));
    }
    if !browser_dir().join("node_modules/playwright-core").is_dir() {
        missing.push("tests/browser/node_modules/playwright-core (npm ci in tests/browser)".into());
    }
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if in_ci() {
        panic!("needs {what}; under CI=true this is a failure (run sudo ./deploy/setup.sh)");
    }
    eprintln!("SKIP: needs {what} (run sudo ./deploy/setup.sh)");
    false
}

/// Internet, VPS with coordinator and exit, home behind CGNAT with its node, all joined.
struct DashLab {
    lab: Lab,
    coord: Coordinator,
    exit: Node,
    home: Node,
}

impl DashLab {
    fn new() -> Result<DashLab> {
        let mut lab = Lab::new()?;
        lab.internet()?;
        let carrier = lab.isp("carrier", NatKind::Easy)?;
        ensure!(
            carrier.wan_ip == CARRIER_WAN,
            "carrier at {}",
            carrier.wan_ip
        );
        let router = lab.router_behind(&carrier, "router", "10.10.1", NatKind::Easy)?;
        lab.host_behind(&router, "home")?;
        let coord = lab.start_coordinator("vps", VPS_IP)?;
        let key = coord.authkey(true)?;
        let exit = lab.start_exit("vps", &coord, &key, "vps", &[])?;
        let home = lab.start_node("home", &coord, &key, "home")?;
        let exit_ip = exit.ip()?;
        wait_until(
            &format!("home to ping the exit's mesh address {exit_ip}"),
            Duration::from_secs(30),
            || lab.ping("home", &exit_ip),
        )?;
        Ok(DashLab {
            lab,
            coord,
            exit,
            home,
        })
    }

    /// `http://EXIT_MESH_IP:PORT`, once the coordinator listens there.
    fn dashboard_url(&self) -> Result<String> {
        let file = self.coord.state_dir.join("dashboard.addr");
        let want = self.exit.ip()?;
        let addr = wait_for(
            "the coordinator to serve the dashboard on the exit's mesh address",
            Duration::from_secs(20),
            || {
                std::fs::read_to_string(&file)
                    .ok()?
                    .lines()
                    .find(|l| l.starts_with(&format!("{want}:")))
                    .map(str::to_string)
            },
        )?;
        Ok(format!("http://{addr}"))
    }

    fn admin_token(&self) -> Result<String> {
        Ok(
            std::fs::read_to_string(self.coord.state_dir.join("admin.token"))?
                .trim()
                .to_string(),
        )
    }

    /// `curl` in `host`: (HTTP status or 0 when no answer, headers, body).
    fn curl(&self, host: &str, args: &[&str]) -> (u16, String, String) {
        let hdr = self.lab.dir().join(format!("curl-{host}.headers"));
        let out = self
            .lab
            .command(host, "curl")
            .args(["-sS", "--max-time", "5", "-D"])
            .arg(&hdr)
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .output();
        let headers = std::fs::read_to_string(&hdr).unwrap_or_default();
        let _ = std::fs::remove_file(&hdr);
        let Ok(out) = out else {
            return (0, headers, String::new());
        };
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), headers, body.to_string())
    }
}

fn with_lab(body: fn(&mut DashLab) -> Result<()>, browser: bool) {
    if !require_root_and(TOOLS) || (browser && !require_browser()) {
        return;
    }
    let mut p = DashLab::new().expect("building the lab");
    if let Err(e) = body(&mut p) {
        panic!("{e:#}");
    }
}

/// The dashboard is on the mesh only: a viewer on the internet that routes packets for the mesh
/// address through the VPS (edge protection is off in this lab, as on an exit without a fixed
/// `--listen-port`) gets no page, and neither does a non-mesh source on the VPS itself: the
/// dashboard closes every connection from outside the mesh prefixes (without that check the
/// local one gets the page; the viewer's replies are also routed into the exit's TUN, where
/// they die). From the mesh, every admin call needs a session (the token never in a URL), every
/// change its CSRF header, and the Host must be the mesh address.
#[test]
fn dashboard_is_mesh_only_and_refuses_the_api_without_login() {
    with_lab(
        dashboard_is_mesh_only_and_refuses_the_api_without_login_body,
        false,
    );
}

fn dashboard_is_mesh_only_and_refuses_the_api_without_login_body(p: &mut DashLab) -> Result<()> {
    let url = p.dashboard_url()?;
    let exit_ip = p.exit.ip()?;
    // From the mesh the page loads.
    let (code, _, body) = p.curl("home", &[&format!("{url}/")]);
    ensure!(
        code == 200 && body.contains("homeport"),
        "from home: {code} {body}"
    );

    // The public side: the viewer routes the mesh prefix to the VPS, as an attacker on the
    // VPS's network could.
    p.lab.ip(
        "viewer",
        &["route", "add", "100.96.0.0/16", "via", "192.0.2.1"],
    )?;
    p.lab
        .ip("net", &["route", "add", "100.96.0.0/16", "via", VPS_IP])?;
    let (code, _, body) = p.curl("viewer", &[&format!("{url}/")]);
    ensure!(
        code == 0,
        "the viewer must get no answer from the dashboard, got {code}: {body}"
    );
    // On the VPS itself, from its public address (not a mesh source).
    let (code, _, body) = p.curl("vps", &["--interface", VPS_IP, &format!("{url}/")]);
    ensure!(
        code == 0,
        "a non-mesh source on the VPS must get no answer, got {code}: {body}"
    );
    let log = p.lab.log(p.coord.proc);
    ensure!(
        log.contains("refused a connection from outside the mesh"),
        "the coordinator must say it refused them: {log}"
    );
    // Nothing listens on the public address.
    let (code, _, _) = p.curl("viewer", &[&format!("http://{VPS_IP}:8480/")]);
    ensure!(code == 0, "port 8480 on the public address answered {code}");

    // From the mesh, without a session: no admin API.
    let api = |path: &str| format!("{url}{path}");
    let (code, _, body) = p.curl("home", &[&api("/api/v1/admin/nodes")]);
    ensure!(code == 401, "admin API without login: {code} {body}");
    let (code, _, _) = p.curl(
        "home",
        &["-X", "POST", "-d", "{}", &api("/api/v1/admin/authkeys")],
    );
    ensure!(code == 401, "creating a key without login: {code}");
    // The node API is not served here at all.
    let (code, _, _) = p.curl("home", &[&api("/api/v1/node/map")]);
    ensure!(code == 404, "node API through the dashboard: {code}");
    // A wrong token.
    let bad = p.lab.dir().join("bad-login.json");
    std::fs::write(&bad, r#"{"token":"hpa_wrong"}"#)?;
    let (code, _, _) = p.curl(
        "home",
        &[
            "-d",
            &format!("@{}", bad.display()),
            &api("/dashboard/login"),
        ],
    );
    ensure!(code == 401, "wrong token: {code}");

    // The right token, from a file (never in argv or a URL): a session cookie and a CSRF token.
    let login = p.lab.dir().join("login.json");
    homeport_host::fs::write_private(
        &login,
        format!(r#"{{"token":"{}"}}"#, p.admin_token()?).as_bytes(),
    )?;
    let jar = p.lab.dir().join("cookies");
    let jar_s = jar.to_str().context("path")?;
    let (code, headers, body) = p.curl(
        "home",
        &[
            "-c",
            jar_s,
            "-d",
            &format!("@{}", login.display()),
            &api("/dashboard/login"),
        ],
    );
    ensure!(code == 200, "login: {code} {body}");
    let cookie = headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .context("login set no cookie")?;
    ensure!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "session cookie: {cookie}"
    );
    let csrf = serde_json::from_str::<serde_json::Value>(&body)?["csrf"]
        .as_str()
        .context("no csrf in the login answer")?
        .to_string();
    let (code, _, body) = p.curl("home", &["-b", jar_s, &api("/api/v1/admin/nodes")]);
    ensure!(
        code == 200 && body.contains("\"home\""),
        "nodes with a session: {code} {body}"
    );
    // A change without the CSRF header (what a forged cross-site form would send): refused.
    let (code, _, _) = p.curl(
        "home",
        &[
            "-b",
            jar_s,
            "-X",
            "POST",
            "-d",
            "{}",
            &api("/api/v1/admin/authkeys"),
        ],
    );
    ensure!(code == 403, "a change without the CSRF header: {code}");
    let (code, _, body) = p.curl(
        "home",
        &[
            "-b",
            jar_s,
            "-H",
            &format!("X-Homeport-CSRF: {csrf}"),
            "-X",
            "POST",
            "-d",
            "{}",
            &api("/api/v1/admin/authkeys"),
        ],
    );
    ensure!(code == 201, "a change with the CSRF header: {code} {body}");
    // Another Host (a DNS-rebinding page): refused even with the session.
    let (code, _, _) = p.curl(
        "home",
        &[
            "-b",
            jar_s,
            "-H",
            "Host: dashboard.example",
            &api("/api/v1/admin/nodes"),
        ],
    );
    ensure!(code == 421, "another Host: {code}");
    // The overview (the dashboard's data) is there and names the exit's table and the paths.
    let (code, _, body) = p.curl("home", &["-b", jar_s, &api("/api/v1/admin/overview")]);
    ensure!(code == 200, "overview: {code} {body}");
    ensure!(body.contains(&exit_ip), "overview: {body}");

    // The CLI reads the same overview: both nodes' paths and the exit's table.
    let status = wait_for(
        "`homeport-coordinator status` to list both paths",
        Duration::from_secs(15),
        || {
            let out = p.coord.admin(&["status"]).ok()?;
            (out.contains("-> vps")
                && out.contains("-> home")
                && out.contains("exit: homeport-exit"))
            .then_some(out)
        },
    )?;
    eprintln!("homeport-coordinator status:\n{status}");
    ensure!(status.contains("rules applied"), "{status}");
    Ok(())
}

/// The browser half: one Chromium page, driven by tests/browser/dashboard.js.
struct Browser {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Browser {
    fn start(lab: &Lab, host: &str, url: &str) -> Result<Browser> {
        let mut child = lab
            .command(host, "node")
            .arg(browser_dir().join("dashboard.js"))
            .arg(url)
            .arg(screenshot_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting node tests/browser/dashboard.js")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut b = Browser {
            child,
            stdin: Some(stdin),
            stdout,
        };
        b.answer()?;
        Ok(b)
    }

    fn answer(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        match line.trim_end().split_once(' ') {
            Some(("ok", v)) => Ok(serde_json::from_str(v)?),
            Some(("err", e)) => bail!("the browser: {e}"),
            _ => bail!("the browser script said {line:?}"),
        }
    }

    fn ask(&mut self, cmd: &str) -> Result<serde_json::Value> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the browser script has ended")?;
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        let shown = if cmd.starts_with("login ") {
            "login …"
        } else {
            cmd
        };
        self.answer()
            .with_context(|| format!("browser command {shown:?}"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing stdin ends the script (after `quit`, or on a failed test); kill it if it hangs.
        drop(self.stdin.take());
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The page lists the nodes with the path each takes to the other (the same the nodes' own
/// `homeport status` reports), publishes Plex from the form (a viewer downloads through it), shows
/// the viewer's connection live with its address, and shows the API's error for a bad CIDR next
/// to the allow-list field; removing the rule from the page shuts the viewer out, and a new auth
/// key comes with the `homeport up` line for this coordinator.
#[test]
fn dashboard_in_chromium_shows_paths_publishes_and_sees_the_viewer_live() {
    with_lab(dashboard_in_chromium_body, true);
}

fn dashboard_in_chromium_body(p: &mut DashLab) -> Result<()> {
    let url = p.dashboard_url()?;
    // The Plex stand-in at home, with a file a throttled viewer takes ~12 s to fetch (more than
    // the socket buffers along the way hold, so the connection stays open while the page looks).
    let media = p.lab.dir().join("media");
    std::fs::create_dir_all(&media)?;
    let data: Vec<u8> = (0..(24u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(media.join("movie"), &data)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace")?
        .join("deploy/plex-standin.py");
    let plex = p.lab.spawn(
        "home",
        "plex",
        &[
            "python3",
            script.to_str().context("path")?,
            media.to_str().context("path")?,
            "--bind",
            "0.0.0.0",
            "--port",
            "32400",
        ],
    )?;
    wait_until(
        "the Plex stand-in to listen",
        Duration::from_secs(10),
        || p.lab.log(plex).contains("serving"),
    )?;

    let mut b = Browser::start(&p.lab, "home", &format!("{url}/"))?;
    b.ask("screenshot login")?;
    b.ask(&format!("login {}", p.admin_token()?))?;

    // Paths: both nodes list the other, with the path its own daemon reports.
    let paths = b.ask("paths 2")?;
    eprintln!("paths on the page: {paths}");
    for (node, peer) in [(&p.home, "vps"), (&p.exit, "home")] {
        let status: serde_json::Value = serde_json::from_str(&node.cli(&["status", "--json"])?)?;
        let own = status["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|x| x["name"] == peer))
            .with_context(|| format!("{} status lists no {peer}: {status}", node.hostname))?;
        let shown = paths[&node.hostname][peer].as_str().with_context(|| {
            format!("the page shows no path {} → {peer}: {paths}", node.hostname)
        })?;
        match own["path"]["kind"].as_str() {
            Some("direct") => {
                let addr = own["path"]["addr"].as_str().unwrap_or_default();
                ensure!(
                    shown == format!("direct {addr}"),
                    "{} → {peer}: page {shown:?}, status {own}",
                    node.hostname
                );
            }
            Some("relay") => ensure!(
                shown.starts_with("relay: "),
                "{} → {peer}: page {shown:?}, status {own}",
                node.hostname
            ),
            other => bail!("{} → {peer}: status says {other:?}", node.hostname),
        }
    }
    // Here both see each other directly: home reaches the VPS's public address, the VPS the carrier's.
    let home_to_vps = paths["home"]["vps"].as_str().unwrap_or_default();
    ensure!(
        home_to_vps.starts_with(&format!("direct {VPS_IP}:")),
        "home → vps: {home_to_vps}"
    );

    // A bad CIDR: the API's own error, next to the allow-list field.
    let bad = b.ask("bad-allow 192.0.2.0/33")?;
    eprintln!("bad CIDR: {bad}");
    let err = bad["error"].as_str().unwrap_or_default();
    ensure!(
        err.starts_with("allow[0]: invalid CIDR \"192.0.2.0/33\"") && err.contains("192.0.2.0/24"),
        "the error next to the allow-list: {bad}"
    );
    ensure!(bad["invalid"] == "true" && bad["general"] == "", "{bad}");
    b.ask("screenshot bad-cidr")?;

    // Publish Plex from the page, open to the viewer's network only.
    let ok = b.ask("publish vps 32400 home 32400 192.0.2.0/24")?;
    eprintln!("published: {ok}");
    let rules = p.coord.admin(&["publish", "list", "--json"])?;
    ensure!(
        rules.contains("192.0.2.0/24") && rules.contains("32400"),
        "publish list: {rules}"
    );

    // The viewer downloads through it (throttled so that the connection stays open a while).
    let movie = format!("http://{VPS_IP}:32400/movie");
    let probe = p.lab.dir().join("probe");
    wait_until(
        "the viewer to reach the published port",
        Duration::from_secs(20),
        || {
            p.lab
                .command("viewer", "curl")
                .args(["-s", "--max-time", "3", "-r", "0-99", "-o"])
                .arg(&probe)
                .arg(&movie)
                .status()
                .is_ok_and(|s| s.success())
        },
    )?;
    let got = p.lab.dir().join("got");
    let dl = p.lab.spawn(
        "viewer",
        "download",
        &[
            "curl",
            "-sS",
            "--limit-rate",
            "2M",
            "-o",
            got.to_str().context("path")?,
            &movie,
        ],
    )?;
    let row = b.ask(&format!("live 32400 {VIEWER_IP}:"))?;
    eprintln!("live connection on the page: {row}");
    let cells: Vec<&str> = row
        .as_array()
        .context("row")?
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    ensure!(cells.len() == 5, "{row}");
    ensure!(
        cells[0].starts_with(&format!("{VIEWER_IP}:")),
        "viewer address: {row}"
    );
    ensure!(cells[1] == "192.0.2.0/24", "let in by: {row}");
    b.ask("screenshot live")?;
    let status = p.lab.wait_exit(dl, Duration::from_secs(60))?;
    ensure!(status.success(), "the download failed: {}", p.lab.log(dl));
    ensure!(
        std::fs::read(&got)? == data,
        "the download differs from the file at home"
    );
    let log = p.lab.log(plex);
    ensure!(
        log.contains(&format!("client={VIEWER_IP}:")),
        "Plex saw the viewer: {log}"
    );

    // A source outside the allow-list (the carrier's public address) is refused; the exit's
    // audit line for it shows among the rule's recent lines.
    let refused = p
        .lab
        .command("carrier", "curl")
        .args(["-s", "--max-time", "2", "-o", "/dev/null", &movie])
        .status()?;
    ensure!(
        !refused.success(),
        "a source outside the allow-list got through"
    );
    let deny = b.ask("recent 32400 not-in-allow-list")?;
    eprintln!("denial on the page: {deny}");
    ensure!(deny.to_string().contains(CARRIER_WAN), "{deny}");
    b.ask("screenshot recent")?;

    // Remove the rule from the page: the viewer is shut out again.
    b.ask("remove-rule 32400")?;
    let rules = p.coord.admin(&["publish", "list", "--json"])?;
    ensure!(
        rules.trim() == "[]",
        "after removing from the page: {rules}"
    );
    wait_until("the viewer to be shut out", Duration::from_secs(15), || {
        !p.lab
            .command("viewer", "curl")
            .args(["-s", "--max-time", "2", "-o", "/dev/null", &movie])
            .status()
            .is_ok_and(|s| s.success())
    })?;

    // A new auth key, shown once with the lines to join a device.
    let lines = b.ask("authkey")?;
    let lines = lines.as_str().context("key lines")?;
    eprintln!("auth key lines on the page:\n{lines}");
    ensure!(
        lines.contains("\nhpk_")
            && lines.contains(&format!(
                "homeport up --coordinator {} --pin {} --authkey-file /root/homeport.authkey",
                p.coord.url, p.coord.pin
            )),
        "auth key lines: {lines}"
    );
    let keys = p.coord.admin(&["authkey", "list", "--json"])?;
    let keys: serde_json::Value = serde_json::from_str(&keys)?;
    ensure!(keys.as_array().is_some_and(|k| k.len() == 2), "{keys}");

    let end = b.ask("quit")?;
    ensure!(
        end["consoleErrors"]
            .as_array()
            .is_some_and(|e| e.is_empty()),
        "the page logged errors: {end}"
    );
    Ok(())
}
