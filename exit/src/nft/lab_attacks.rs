use super::tests::{cfg, rule};
use super::*;
use crate::lab::Lab;
use homeport_proto::publish::Guards;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}
fn conntrack_count(ns: &str) -> u64 {
    Lab::run_in(ns, &["conntrack", "-C"])
        .trim()
        .parse()
        .unwrap()
}
/// hping3 in `ns` with `args`, killed when the returned guard drops.
struct Hping(Child);
impl Hping {
    fn start(ns: &str, args: &[&str]) -> Hping {
        Hping(
            Command::new("ip")
                .args(["netns", "exec", ns, "hping3"])
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("hping3"),
        )
    }
    /// Stops it (SIGINT, so it prints its statistics); returns the packets it sent.
    fn stop(mut self) -> u64 {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let out = std::mem::replace(&mut self.0, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        text.split_whitespace()
            .zip(text.split_whitespace().skip(1))
            .find(|(_, w)| *w == "packets")
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in hping3's output: {text}"))
    }
}
impl Drop for Hping {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
/// Runs hping3 in `ns` to completion (it exits 1 when nothing answers, which is the point).
fn hping(ns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "hping3", "-q"])
        .args(args)
        .output()
        .expect("hping3");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("packets transmitted"),
        "hping3 {args:?}: {text}"
    );
}

fn lab_with_flood_routes() -> Lab {
    let lab = Lab::new();
    // Spoofed sources: no reverse-path filter on the VPS, and a default route so its
    // answers to them leave like on a real VPS.
    for k in [
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.eth0.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ] {
        Lab::run_in(&lab.vps, &["sysctl", "-qw", k]);
    }
    Lab::run_in(
        &lab.vps,
        &["ip", "route", "add", "default", "via", "198.51.100.1"],
    );
    lab
}

/// A flood of spoofed-source SYNs at a published port (hping3 --flood --rand-source) leaves
/// no conntrack state on the VPS and reaches nothing behind it; meanwhile a stream that was
/// running keeps going, and a new viewer connects (its real address reaches home, its MSS
/// is clamped to the TUN) and downloads. Prints the rate sent and the throughput with and
/// without the flood.
#[test]
fn lab_spoofed_syn_flood_leaves_no_state_and_viewers_get_through() {
    if !crate::lab::available_with("nft::lab_spoofed_syn_flood", &["hping3", "iperf3"]) {
        return;
    }
    let lab = lab_with_flood_routes();
    // The TUN's MTU, so the clamp has something to do.
    Lab::run_in(&lab.vps, &["ip", "link", "set", "hpx0", "mtu", "1380"]);
    let exec = Exec::netns(&lab.vps);
    let rules = vec![
        rule(1, PublishProto::Tcp, 32400, Guards::default()),
        rule(2, PublishProto::Tcp, 32401, Guards::default()),
    ];
    apply(&exec, &ruleset(&cfg(), &rules, &[])).expect("ruleset");
    lab.serve(32400);
    // Throughput by iperf3 (download: the home sends), as a viewer watching a stream would.
    let _iperf = Hping(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.home,
                "iperf3",
                "-s",
                "-B",
                "100.96.0.2",
            ])
            .args(["-p", "32401"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 server"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let iperf = || -> Option<f64> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.viewer,
                "iperf3",
                "-c",
                "198.51.100.10",
            ])
            .args(["-p", "32401", "-B", "192.0.2.6", "-t", "2", "-R", "-J"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.pointer("/end/sum_received/bits_per_second")?
            .as_f64()
            .map(|b| b / 1e6)
    };
    let (a4, b4) = (ip("192.0.2.5"), ip("192.0.2.6"));
    let plex = sa("198.51.100.10:32400");
    let unloaded = iperf().expect("unloaded download");
    let mut stream = lab.connect(a4, plex).expect("stream before the flood");
    assert!(Lab::ask(&mut stream, "before").is_some());
    let base = conntrack_count(&lab.vps);

    let flood = Hping::start(
        &lab.viewer,
        &[
            "--flood",
            "--rand-source",
            "-S",
            "-p",
            "32400",
            "198.51.100.10",
        ],
    );
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let during = conntrack_count(&lab.vps);
    let mut alive = 0;
    for i in 0..3 {
        alive += Lab::ask(&mut stream, &format!("during {i}")).is_some() as u32;
    }
    let mut viewer = lab.connect(b4, plex).expect("new viewer during the flood");
    let ans = Lab::ask(&mut viewer, "mss").expect("new viewer answered during the flood");
    let got = iperf();
    let after = conntrack_count(&lab.vps);
    let sent = flood.stop();
    let rate = sent as f64 / t0.elapsed().as_secs_f64();
    let loaded = got.expect("download during the flood");
    eprintln!(
        "SYN flood: {sent} spoofed SYNs in {:.1} s ({rate:.0}/s); conntrack entries on the VPS: {base} before, {during} and {after} during; download (iperf3 -R) {unloaded:.0} Mbit/s unloaded, {loaded:.0} Mbit/s during the flood",
        t0.elapsed().as_secs_f64()
    );
    assert!(sent > 10_000, "hping3 sent only {sent} packets");
    // The spoofed SYNs took no conntrack slot (the lab's own flows take a handful).
    assert!(
        during < base + 100 && after < base + 100,
        "conntrack grew under the flood: {base} -> {during}, {after}"
    );
    assert_eq!(alive, 3, "the running stream stalled during the flood");
    // The viewer's own address reached home, and the home socket's MSS fits the TUN.
    let mss: i32 = ans
        .strip_prefix("192.0.2.6:")
        .and_then(|r| r.split_once(" mss "))
        .map(|(_, m)| m.parse().unwrap())
        .unwrap_or_else(|| panic!("unexpected answer {ans:?}"));
    assert!(
        mss <= 1340,
        "MSS {mss} is not clamped to the TUN (1380 - 40)"
    );
    assert!(Lab::ask(&mut stream, "after").is_some());
    assert!(lab.connect(a4, plex).is_some(), "viewer after the flood");
}

/// Spoofed SYNs to closed ports never ban a source on an allow-list; a viewer whose client
/// retries a port that is not published yet is not banned for it and connects once the rule
/// is there; and a ban started by a probe of a port that is published by the time the table
/// is applied again is lifted.
#[test]
fn lab_bans_spare_allow_lists_retries_and_published_ports() {
    if !crate::lab::available_with("nft::lab_bans_spare", &["hping3"]) {
        return;
    }
    let lab = lab_with_flood_routes();
    let exec = Exec::netns(&lab.vps);
    let mut c = cfg();
    c.ban_after = 3;
    c.ban_seconds = 600;
    let allow = Guards {
        allow: vec!["192.0.2.5/32".parse().unwrap()],
        ..Guards::default()
    };
    let mut rules = vec![rule(1, PublishProto::Tcp, 32400, allow)];
    apply(&exec, &ruleset(&c, &rules, &[])).unwrap();
    lab.serve(32400);
    lab.serve(32401);
    let banned = |a: IpAddr| {
        current_bans(&exec)
            .unwrap()
            .into_iter()
            .find(|b| b.addr == a)
    };
    let (a4, b4) = (ip("192.0.2.5"), ip("192.0.2.6"));

    // Someone spoofs the allow-listed address at ten closed ports: no ban.
    hping(
        &lab.viewer,
        &[
            "-S",
            "-a",
            "192.0.2.5",
            "-p",
            "++40",
            "-c",
            "10",
            "-i",
            "u20000",
            "198.51.100.10",
        ],
    );
    // The same from an address on no list bans it (the rule works at all).
    hping(
        &lab.viewer,
        &[
            "-S",
            "-a",
            "203.0.113.99",
            "-p",
            "++40",
            "-c",
            "10",
            "-i",
            "u20000",
            "198.51.100.10",
        ],
    );
    assert!(
        banned(ip("203.0.113.99")).is_some(),
        "the scanner rule banned nobody"
    );
    assert_eq!(banned(a4), None, "an allow-listed source was banned");
    let mut conn = lab
        .connect(a4, sa("198.51.100.10:32400"))
        .expect("allow-listed viewer");
    assert!(Lab::ask(&mut conn, "hi").is_some());

    // A viewer's client retries port 32401 before it is published: one probe, no ban.
    for _ in 0..6 {
        assert!(
            lab.connect_within(b4, sa("198.51.100.10:32401"), Duration::from_millis(200))
                .is_none()
        );
    }
    assert_eq!(
        banned(b4),
        None,
        "a viewer was banned for retrying one port"
    );
    rules.push(rule(2, PublishProto::Tcp, 32401, Guards::default()));
    apply(&exec, &ruleset(&c, &rules, &current_bans(&exec).unwrap())).unwrap();
    let mut v = lab
        .connect(b4, sa("198.51.100.10:32401"))
        .expect("the viewer connects once the port is published");
    assert!(Lab::ask(&mut v, "hi").unwrap().starts_with("192.0.2.6:"));

    // Bans follow the probe that started them: 10.9.9.9 probes 23, 24 and then 32402,
    // which gets published; on the next apply its ban is lifted.
    for port in ["23", "24", "32402"] {
        hping(
            &lab.viewer,
            &[
                "-S",
                "-a",
                "10.9.9.9",
                "-p",
                port,
                "-c",
                "1",
                "198.51.100.10",
            ],
        );
    }
    let b = banned(ip("10.9.9.9")).expect("three distinct ports ban");
    assert_eq!(b.port, Some(32402));
    rules.push(rule(3, PublishProto::Tcp, 32402, Guards::default()));
    apply(&exec, &ruleset(&c, &rules, &current_bans(&exec).unwrap())).unwrap();
    assert_eq!(
        banned(ip("10.9.9.9")),
        None,
        "ban for a now-published port kept"
    );
    assert!(
        banned(ip("203.0.113.99")).is_some(),
        "other bans must survive"
    );
}

/// With every set and meter sized 4: a rate meter full of other sources denies a new
/// source (it does not let it through unmetered), a full connection-count meter denies
/// too, and a full ban set keeps its size while the probes are still dropped.
#[test]
fn lab_full_sets_fail_closed() {
    if !crate::lab::available_with("nft::lab_full_sets", &["hping3"]) {
        return;
    }
    let lab = lab_with_flood_routes();
    let exec = Exec::netns(&lab.vps);
    let mut c = cfg();
    c.set_size = 4;
    c.ban_after = 1;
    let rules = vec![
        rule(
            1,
            PublishProto::Udp,
            5000,
            Guards {
                rate_per_minute: Some(1000),
                ..Guards::default()
            },
        ),
        rule(
            2,
            PublishProto::Tcp,
            8081,
            Guards {
                max_conns: Some(5),
                ..Guards::default()
            },
        ),
    ];
    apply(&exec, &ruleset(&c, &rules, &[])).unwrap();
    lab.serve(8081);
    // A UDP echo at home.
    let echo = Lab::in_ns(&lab.home, || {
        std::net::UdpSocket::bind("100.96.0.2:5000").unwrap()
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let udp_answered = |src: &str| {
        let src: SocketAddr = format!("{src}:0").parse().unwrap();
        Lab::in_ns(&lab.viewer, move || {
            let s = std::net::UdpSocket::bind(src).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s.send_to(b"ping", "198.51.100.10:5000").unwrap();
            let mut buf = [0u8; 16];
            s.recv_from(&mut buf).is_ok()
        })
    };
    assert!(udp_answered("192.0.2.5"), "UDP path works");
    // Three more sources fill the rate meter (4 elements, 60 s each).
    for n in 1..=3 {
        hping(
            &lab.viewer,
            &[
                "-2",
                "-a",
                &format!("10.8.0.{n}"),
                "-p",
                "5000",
                "-c",
                "1",
                "198.51.100.10",
            ],
        );
    }
    assert!(
        udp_answered("192.0.2.5"),
        "a source already metered goes on"
    );
    assert!(
        !udp_answered("192.0.2.6"),
        "a full rate meter let a new source through"
    );
    assert!(
        deny_counts(&exec)
            .unwrap()
            .iter()
            .any(|d| d.0 == DenyReason::Rate && d.2 == ip("192.0.2.6")),
        "the denial is counted"
    );

    // Connection-count meter: four sources hold a connection each; a fifth is denied.
    let mut held = Vec::new();
    for n in 10..14 {
        let a = format!("192.0.2.{n}");
        Lab::run_in(
            &lab.viewer,
            &["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"],
        );
        let mut s = lab
            .connect(ip(&a), sa("198.51.100.10:8081"))
            .expect("connects");
        assert!(Lab::ask(&mut s, "x").is_some(), "{a} under the limit");
        held.push(s);
    }
    let fifth = lab
        .connect(ip("192.0.2.5"), sa("198.51.100.10:8081"))
        .and_then(|mut s| Lab::ask(&mut s, "x"));
    assert!(
        fifth.is_none(),
        "a full connection-count meter let a new source through"
    );

    // Ban set: six spoofed probers, room for four.
    for n in 1..=6 {
        hping(
            &lab.viewer,
            &[
                "-S",
                "-a",
                &format!("10.7.0.{n}"),
                "-p",
                "23",
                "-c",
                "1",
                "198.51.100.10",
            ],
        );
    }
    let bans = current_bans(&exec).unwrap();
    assert_eq!(bans.len(), 4, "{bans:?}");
}

/// With the TUN gone (the exit was killed; the table stays until cleanup), a viewer's
/// packets DNATed to the home's mesh address would follow the VPS's default route out to
/// the internet: nothing addressed to a mesh target may leave the VPS's public side.
#[test]
fn lab_dnat_targets_leave_only_by_the_tun() {
    if !crate::lab::available("nft::lab_dnat_targets_leave_only_by_the_tun") {
        return;
    }
    let lab = lab_with_flood_routes();
    let exec = Exec::netns(&lab.vps);
    let rules = vec![
        rule(1, PublishProto::Tcp, 32400, Guards::default()),
        rule(2, PublishProto::Udp, 5000, Guards::default()),
    ];
    apply(&exec, &ruleset(&cfg(), &rules, &[])).unwrap();
    lab.serve(32400);
    // A stream that is running when the exit dies: its conntrack entry (and DNAT binding)
    // outlives the TUN.
    let mut running = lab
        .connect(ip("192.0.2.6"), sa("198.51.100.10:32400"))
        .expect("connects");
    assert!(Lab::ask(&mut running, "before").is_some());
    // The viewer's side of the link counts what arrives for the mesh.
    Lab::run_in(
        &lab.viewer,
        &[
            "nft",
            "add table inet watch; add chain inet watch pre { type filter hook prerouting priority -400; }; add rule inet watch pre ip daddr 100.96.0.0/16 counter; add rule inet watch pre ip6 daddr fd7a:115c:a1e0::/64 counter",
        ],
    );
    // The exit dies: its TUN goes with it.
    Lab::run_in(&lab.vps, &["ip", "link", "del", "hpx0"]);
    Lab::run_in(
        &lab.vps,
        &[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:100::1",
        ],
    );
    for dst in ["198.51.100.10:32400", "[2001:db8:100::10]:32400"] {
        let src = if dst.starts_with('[') {
            "2001:db8:2::5"
        } else {
            "192.0.2.5"
        };
        let c = lab
            .connect_within(ip(src), sa(dst), Duration::from_millis(500))
            .and_then(|mut c| Lab::ask(&mut c, "x"));
        assert!(c.is_none(), "{dst} answered with the TUN gone");
    }
    assert!(
        Lab::ask(&mut running, "after").is_none(),
        "the running stream was answered with the TUN gone"
    );
    Lab::in_ns(&lab.viewer, || {
        let s = std::net::UdpSocket::bind("192.0.2.5:0").unwrap();
        for _ in 0..5 {
            s.send_to(b"x", "198.51.100.10:5000").unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let listed = Lab::run_in(&lab.viewer, &["nft", "list", "table", "inet", "watch"]);
    let leaked: Vec<&str> = listed
        .lines()
        .filter(|l| l.contains("counter packets") && !l.contains("packets 0 "))
        .collect();
    assert!(leaked.is_empty(), "DNATed packets left the VPS: {leaked:?}");
}
