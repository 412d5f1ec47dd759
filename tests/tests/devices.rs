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

/// Brings up wireguard-go in `host` with `conf`, as wg-quick would. The interface is named after
/// the lab (`wg` + its prefix): wireguard-go's control socket, /var/run/wireguard/NAME.sock, is
/// shared by every namespace.
fn wg_up(lab: &mut Lab, host: &str, conf: &DeviceConf) -> Result<()> {
    let wg = format!("wg{}", lab.prefix());
    let wg = wg.as_str();
    lab.spawn(host, "wireguard-go", &["wireguard-go", "-f", wg])?;
    wait_until(
        "wireguard-go to create its interface",
        Duration::from_secs(10),
        || lab.exec(host, &["ip", "link", "show", wg]).is_ok(),
    )?;
    let file = lab.dir().join(format!("{host}-{wg}.conf"));
    homeport_host::fs::write_private(&file, conf.wg.as_bytes())?;
    lab.exec(
        host,
        &["wg", "setconf", wg, file.to_str().context("lab dir")?],
    )?;
    for a in &conf.addresses {
        let fam = if a.contains(':') { "-6" } else { "-4" };
        lab.exec(host, &["ip", fam, "addr", "add", a, "dev", wg])?;
    }
    lab.exec(host, &["ip", "link", "set", wg, "up"])?;
    for r in &conf.allowed {
        let fam = if r.contains(':') { "-6" } else { "-4" };
        lab.exec(host, &["ip", fam, "route", "add", r, "dev", wg])?;
    }
    Ok(())
}

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` shows the namespace as /etc/resolv.conf:
/// home's "system resolver" is a server inside the lab. Removed on drop.
struct NetnsResolvConf(std::path::PathBuf);

impl NetnsResolvConf {
    fn new(ns: &str, nameserver: &str) -> Result<NetnsResolvConf> {
        let dir = std::path::PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\n"),
        )?;
        Ok(NetnsResolvConf(dir))
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// internet + coordinator and exit on the VPS, home on a routed network (its system resolver:
/// the internet router, 10.1.1.1), and the phone's host behind an ISP's NAT (a phone on a mobile
/// network).
fn device_lab() -> Result<(Lab, Coordinator, Node, Node, NetnsResolvConf)> {
    let mut lab = Lab::new()?;
    lab.internet()?;
    let coord = lab.start_coordinator("vps", VPS_IP)?;
    let key = coord.authkey(true)?;
    let vps = lab.start_exit("vps", &coord, &key, "vps", &[])?;
    lab.add_host("home")?;
    lab.link("net", "10.1.1.1/24", "home", "10.1.1.2/24")?;
    lab.default_route("home", "10.1.1.1")?;
    let resolv = NetnsResolvConf::new(&lab.ns("home"), "10.1.1.1")?;
    let home = lab.start_node("home", &coord, &key, "home")?;
    let isp = lab.isp("mobile", NatKind::Easy)?;
    lab.host_behind(&isp, "phone")?;
    Ok((lab, coord, vps, home, resolv))
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
    let (mut lab, coord, vps, home, _resolv) = device_lab()?;
    let home_ip = home.ip()?;
    let vps_ip = vps.ip()?;
    // The VPS must have reported its endpoint before a config can name it.
    let png = lab.dir().join("phone.png");
    let png_arg = png.to_str().context("lab dir")?;
    let printed =
        homeport_tests::wait_for("device add to succeed", Duration::from_secs(20), || {
            coord
                .admin(&[
                    "device", "add", "phone", "--via", "vps", "--tag", "family", "--png", png_arg,
                ])
                .ok()
        })?;
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&png)?;
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "the PNG holds the private key"
        );
        assert_eq!(&std::fs::read(&png)?[1..4], b"PNG");
    }
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

/// A DNS server outside the mesh (the lab's stand-in for the ISP's): every A question is
/// answered 192.0.2.123, anything else with no records.
const UPSTREAM_DNS: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 53))
while True:
    q, a = s.recvfrom(4096)
    i = 12
    while q[i] != 0: i += q[i] + 1
    qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
    ans = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton("192.0.2.123") if qtype == 1 else b""
    s.sendto(q[:2] + b"\x81\x80\x00\x01" + (b"\x00\x01" if ans else b"\x00\x00") + b"\x00\x00\x00\x00" + q[12:i + 5] + ans, a)
"#;

/// `dig @server name type +short` in `host`: the answer lines.
fn dig(lab: &Lab, host: &str, server: &str, name: &str, qtype: &str) -> Result<String> {
    lab.exec(
        host,
        &[
            "dig",
            "+time=2",
            "+tries=1",
            "+short",
            &format!("@{server}"),
            name,
            qtype,
        ],
    )
    .map(|s| s.trim().to_string())
}

/// The response code `dig` reports (NOERROR, NXDOMAIN, SERVFAIL, …).
fn dig_status(lab: &Lab, host: &str, server: &str, name: &str) -> Result<String> {
    let out = lab.exec(
        host,
        &["dig", "+time=2", "+tries=1", &format!("@{server}"), name],
    )?;
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .map(str::to_string)
        .with_context(|| format!("no status in dig's output:\n{out}"))
}

#[test]
fn names_answer_on_every_node_and_through_a_devices_via_node() -> Result<()> {
    if !require_root_and(&["wireguard-go", "wg", "dig", "python3"]) {
        return Ok(());
    }
    let (mut lab, coord, vps, home, _resolv) = device_lab()?;
    lab.spawn(
        "net",
        "upstream-dns",
        &["python3", "-c", UPSTREAM_DNS, "10.1.1.1"],
    )?;
    let (home_ip, vps_ip) = (home.ip()?, vps.ip()?);
    let printed =
        homeport_tests::wait_for("device add to succeed", Duration::from_secs(20), || {
            coord
                .admin(&[
                    "device", "add", "phone", "--via", "vps", "--tag", "family", "--no-qr",
                ])
                .ok()
        })?;
    let conf = parse_config(&printed)?;
    assert_eq!(
        conf.dns,
        vec![vps_ip.clone(), "homeport.internal".to_string()],
        "the device asks its via node, with the mesh domain to search"
    );
    let phone_ip = conf.addresses[0]
        .split('/')
        .next()
        .context("Address")?
        .to_string();
    wg_up(&mut lab, "phone", &conf)?;

    // From a node: bare names, names in the mesh domain, IPv6, the device, unknown names.
    wait_until(
        "home's name server to answer",
        Duration::from_secs(15),
        || dig(&lab, "home", &home_ip, "vps", "A").is_ok_and(|a| a == vps_ip),
    )?;
    assert_eq!(
        dig(&lab, "home", &home_ip, "home.homeport.internal", "A")?,
        home_ip
    );
    assert_eq!(dig(&lab, "home", &home_ip, "phone", "A")?, phone_ip);
    let home_v6 = home.cli(&["ip", "-6"])?.trim().to_string();
    assert_eq!(
        dig(&lab, "home", &home_ip, "HOME.homeport.internal.", "AAAA")?,
        home_v6
    );
    assert_eq!(
        dig_status(&lab, "home", &home_ip, "nas.homeport.internal")?,
        "NXDOMAIN"
    );
    assert_eq!(
        dig(&lab, "home", &home_v6, "vps", "A")?,
        vps_ip,
        "asked over IPv6"
    );
    // Other names go to the system's resolver (the lab's upstream server).
    assert_eq!(
        dig(&lab, "home", &home_ip, "www.example.org", "A")?,
        "192.0.2.123"
    );

    // From the plain device, at the name server its config names, also under a policy that
    // gives it nothing on the vps: its via node's name server stays its own.
    let policy = lab.dir().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rules]]\nfrom = [\"tag:family\"]\nto = [\"node:home\"]\nports = [\"icmp\"]\n",
    )?;
    coord.admin(&["policy", "set", policy.to_str().context("lab dir")?])?;
    let dns = conf.dns[0].clone();
    wait_until("the phone to resolve home", Duration::from_secs(20), || {
        dig(&lab, "phone", &dns, "home", "A").is_ok_and(|a| a == home_ip)
    })?;
    assert_eq!(
        dig(&lab, "phone", &dns, "phone.homeport.internal", "A")?,
        phone_ip
    );
    assert_eq!(
        dig(&lab, "phone", &dns, "home.homeport.internal", "AAAA")?,
        home_v6
    );
    assert!(
        lab.ping("phone", &home_ip),
        "and what it resolved, it reaches"
    );
    assert!(
        !lab.ping("phone", &vps_ip),
        "while the vps itself stays closed to it"
    );
    Ok(())
}
