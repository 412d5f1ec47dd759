//! Plain-WireGuard devices with the real thing: wireguard-go and `wg` (Debian's packages) in a
//! namespace behind its own NAT play a phone, configured from exactly the config that
//! `homeport-coordinator device add` printed. The VPS (an exit) is its via node; home is a node
//! on its own network.

use anyhow::{Context, Result, bail};
use homeport_tests::{Coordinator, Lab, NatKind, Node, VPS_IP, require_root_and, wait_until};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the device's config says, split the way `wg setconf` and `ip` need it.
struct DeviceConf {
    /// The config less the wg-quick-only lines (Address, DNS): what `wg setconf` reads.
    wg: String,
    addresses: Vec<String>,
    allowed: Vec<String>,
    dns: Vec<String>,
}

/// Parses the wg-quick config at the start of `device add`'s output (it ends where the QR code
/// starts, at the first line that is neither a config line nor blank).
fn parse_config(printed: &str) -> Result<DeviceConf> {
    let mut c = DeviceConf {
        wg: String::new(),
        addresses: vec![],
        allowed: vec![],
        dns: vec![],
    };
    for line in printed.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if t.starts_with('[') {
            c.wg.push_str(t);
            c.wg.push('\n');
            continue;
        }
        let Some((k, v)) = t.split_once('=') else {
            break; // the QR code
        };
        let (k, v) = (k.trim(), v.trim());
        let list = || {
            v.split(',')
                .map(|s| s.trim().to_string())
                .collect::<Vec<_>>()
        };
        match k {
            "Address" => c.addresses = list(),
            "DNS" => c.dns = list(),
            _ => {
                if k == "AllowedIPs" {
                    c.allowed = list();
                }
                c.wg.push_str(&format!("{k} = {v}\n"));
            }
        }
    }
    if c.addresses.is_empty() || c.allowed.is_empty() || !c.wg.contains("PrivateKey") {
        bail!("no device config in the output:\n{printed}");
    }
    Ok(c)
}

/// Brings up wireguard-go in `host` as interface wg0 with `conf`, as wg-quick would.
fn wg_up(lab: &mut Lab, host: &str, conf: &DeviceConf) -> Result<()> {
    lab.spawn(host, "wireguard-go", &["wireguard-go", "-f", "wg0"])?;
    wait_until(
        "wireguard-go to create wg0",
        Duration::from_secs(10),
        || lab.exec(host, &["ip", "link", "show", "wg0"]).is_ok(),
    )?;
    let file = lab.dir().join(format!("{host}-wg0.conf"));
    homeport_host::fs::write_private(&file, conf.wg.as_bytes())?;
    lab.exec(
        host,
        &["wg", "setconf", "wg0", file.to_str().context("lab dir")?],
    )?;
    for a in &conf.addresses {
        let fam = if a.contains(':') { "-6" } else { "-4" };
        lab.exec(host, &["ip", fam, "addr", "add", a, "dev", "wg0"])?;
    }
    lab.exec(host, &["ip", "link", "set", "wg0", "up"])?;
    for r in &conf.allowed {
        let fam = if r.contains(':') { "-6" } else { "-4" };
        lab.exec(host, &["ip", fam, "route", "add", r, "dev", "wg0"])?;
    }
    Ok(())
}

/// internet + coordinator and exit on the VPS, home on a routed network, and the phone's host
/// behind an ISP's NAT (a phone on a mobile network).
fn device_lab() -> Result<(Lab, Coordinator, Node, Node)> {
    let mut lab = Lab::new()?;
    lab.internet()?;
    let coord = lab.start_coordinator("vps", VPS_IP)?;
    let key = coord.authkey(true)?;
    let vps = lab.start_exit("vps", &coord, &key, "vps", &[])?;
    lab.add_host("home")?;
    lab.link("net", "10.1.1.1/24", "home", "10.1.1.2/24")?;
    lab.default_route("home", "10.1.1.1")?;
    let home = lab.start_node("home", &coord, &key, "home")?;
    let isp = lab.isp("mobile", NatKind::Easy)?;
    lab.host_behind(&isp, "phone")?;
    Ok((lab, coord, vps, home))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[test]
fn a_wireguard_go_phone_joins_from_its_printed_config_obeys_the_policy_and_is_cut_on_removal()
-> Result<()> {
    if !require_root_and(&["wireguard-go", "wg", "python3"]) {
        return Ok(());
    }
    let (mut lab, coord, vps, home) = device_lab()?;
    let home_ip = home.ip()?;
    let vps_ip = vps.ip()?;
    // The VPS must have reported its endpoint before a config can name it.
    let printed =
        homeport_tests::wait_for("device add to succeed", Duration::from_secs(20), || {
            coord
                .admin(&["device", "add", "phone", "--via", "vps", "--tag", "family"])
                .ok()
        })?;
    assert!(
        printed.contains("▀") || printed.contains("█") || printed.contains("▄"),
        "a QR code follows the config:\n{printed}"
    );
    let conf = parse_config(&printed)?;
    assert!(
        conf.wg.contains(&format!("Endpoint = {VPS_IP}:")),
        "the endpoint is the VPS's public address:\n{}",
        conf.wg
    );
    let phone_ip = conf.addresses[0]
        .split('/')
        .next()
        .context("Address")?
        .to_string();
    let list = coord.admin(&["device", "list", "--json"])?;
    assert!(
        list.contains("\"phone\"") && list.contains(&phone_ip),
        "{list}"
    );
    assert!(
        !coord.admin(&["nodes"])?.contains("phone"),
        "a device is no node"
    );
    wg_up(&mut lab, "phone", &conf)?;

    // It pings home and home pings it (no policy yet: everyone may reach everyone).
    wait_until("the phone to ping home", Duration::from_secs(20), || {
        lab.ping("phone", &home_ip)
    })?;
    assert!(lab.ping("home", &phone_ip), "home reaches the phone");
    assert!(
        lab.ping("phone", &vps_ip),
        "the phone reaches the vps itself"
    );
    // The via node lists it with the endpoint it learned (the mobile ISP's NAT).
    let st = vps.cli(&["status"])?;
    assert!(
        st.lines()
            .any(|l| l.starts_with("phone") && l.contains("203.0.113.") && l.contains("device")),
        "{st}"
    );

    // It downloads from home: a file served on home's mesh address, checked by its hash.
    let served = lab.dir().join("served");
    std::fs::create_dir_all(&served)?;
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(served.join("video.bin"), &data)?;
    let dir = served.to_str().context("lab dir")?;
    lab.spawn(
        "home",
        "http-8000",
        &[
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            &home_ip,
            "--directory",
            dir,
        ],
    )?;
    lab.spawn(
        "home",
        "http-2222",
        &[
            "python3",
            "-m",
            "http.server",
            "2222",
            "--bind",
            &home_ip,
            "--directory",
            dir,
        ],
    )?;
    let fetch = |lab: &Lab, port: u16| -> Result<String> {
        lab.exec(
            "phone",
            &[
                "python3",
                "-c",
                &format!(
                    "import hashlib, urllib.request as u; \
                     print(hashlib.sha256(u.urlopen('http://{home_ip}:{port}/video.bin', timeout=5).read()).hexdigest())"
                ),
            ],
        )
        .map(|s| s.trim().to_string())
    };
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&data))
    };
    let mut got = String::new();
    wait_until(
        "the phone to download from home",
        Duration::from_secs(20),
        || {
            got = fetch(&lab, 8000).unwrap_or_default();
            !got.is_empty()
        },
    )?;
    assert_eq!(got, want, "4 MiB arrived intact");

    // Policy: family may reach home's port 8000 and ping it, nothing else; nobody may reach
    // family. The vps enforces the phone's side, home its own.
    let policy = lab.dir().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rules]]\nfrom = [\"tag:family\"]\nto = [\"node:home\"]\nports = [\"tcp:8000\", \"icmp\"]\n",
    )?;
    coord.admin(&["policy", "set", policy.to_str().context("lab dir")?])?;
    wait_until(
        "home to lose the way to the phone",
        Duration::from_secs(10),
        || !lab.ping("home", &phone_ip),
    )?;
    assert_eq!(fetch(&lab, 8000)?, want, "port 8000 is still allowed");
    assert!(lab.ping("phone", &home_ip), "ping is allowed");
    assert!(fetch(&lab, 2222).is_err(), "home's port 2222 is refused");
    assert!(
        !lab.ping("phone", &vps_ip),
        "the vps is not the phone's to reach"
    );
    assert!(
        !lab.ping("vps", &phone_ip),
        "the vps may not open a flow to the phone either"
    );

    // Removal cuts it within a second: a ping every 50 ms, timestamped, runs across it.
    let pinger = lab.spawn(
        "phone",
        "ping-home",
        &["ping", "-n", "-D", "-i", "0.05", "-W", "1", &home_ip],
    )?;
    wait_until(
        "the running ping to be answered",
        Duration::from_secs(10),
        || lab.log(pinger).contains("bytes from"),
    )?;
    let removed_at = unix_now();
    coord.admin(&["device", "remove", "phone"])?;
    std::thread::sleep(Duration::from_secs(3));
    lab.stop(pinger)?;
    let last_reply = lab
        .log(pinger)
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse::<f64>().ok())
        .fold(0.0f64, f64::max);
    let cut = last_reply - removed_at;
    eprintln!("last reply {cut:.3} s after `device remove` began");
    assert!(
        cut < 1.0,
        "the phone was answered {cut:.3} s after its removal"
    );
    assert!(!lab.ping("phone", &home_ip));
    assert!(
        !coord.admin(&["device", "list"])?.contains("phone"),
        "gone from the list"
    );
    Ok(())
}
