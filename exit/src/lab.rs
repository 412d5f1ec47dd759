//! Network-namespace lab for the exit's tests (root + nft + ip needed).
//!
//! Three namespaces, all named `hpxe-<pid>-<n>-*` and deleted on drop (also on panic):
//! - `viewer`: the internet. veth `eth0` 198.51.100.1/24 + 2001:db8:100::1/64, and viewer
//!   source addresses 192.0.2.5, 192.0.2.6, 2001:db8:2::5, 2001:db8:2::6 on `lo`.
//! - `vps`: the exit. veth `eth0` 198.51.100.10/24 + 2001:db8:100::10/64 (routes to the viewers
//!   via the viewer namespace) and veth `hpx0` (standing in for the TUN) 100.96.0.1/16 +
//!   fd7a:115c:a1e0::1/64.
//! - `home`: the target. veth `eth0` 100.96.0.2/16 + fd7a:115c:a1e0::2/64, default routes via
//!   the vps (like the home node routing replies into its TUN).
//!
//! Under CI=true a missing tool or missing root is a failure; otherwise the test is skipped
//! with a notice.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// False (after printing a notice) when the lab cannot run here and this is not CI.
pub fn available(test: &str) -> bool {
    available_with(test, &[])
}

/// Like [`available`], also needing `extra` tools (each answers `--version` or `-v`).
pub fn available_with(test: &str, extra: &[&str]) -> bool {
    let ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
    let root = unsafe { libc::geteuid() } == 0;
    let tools = [
        ("ip", "-V"),
        ("nft", "--version"),
        ("conntrack", "--version"),
    ]
    .iter()
    .all(|(t, v)| {
        Command::new(t)
            .arg(v)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }) && extra.iter().all(|t| {
        // hping3 exits non-zero for --version; being runnable is enough.
        Command::new(t).arg("--version").output().is_ok()
    });
    if root && tools {
        return true;
    }
    let why = format!(
        "{test}: needs root and ip, nft, conntrack {} (root={root}, tools={tools}; sudo ./deploy/setup.sh installs them)",
        extra.join(", ")
    );
    if ci {
        panic!("{why}; under CI=true this is a failure");
    }
    eprintln!("SKIPPED {why}");
    false
}

pub struct Lab {
    pub viewer: String,
    pub vps: String,
    pub home: String,
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    pub fn new() -> Lab {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = format!("hpxe-{}-{n}", std::process::id());
        let lab = Lab {
            viewer: format!("{p}-viewer"),
            vps: format!("{p}-vps"),
            home: format!("{p}-home"),
        };
        // From here on Drop cleans up, whatever fails.
        for ns in [&lab.viewer, &lab.vps, &lab.home] {
            sh(&["ip", "netns", "add", ns]);
        }
        let (v, x, h) = (lab.viewer.as_str(), lab.vps.as_str(), lab.home.as_str());
        sh(&[
            "ip", "-n", v, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            x,
        ]);
        sh(&[
            "ip", "-n", x, "link", "add", "hpx0", "type", "veth", "peer", "name", "eth0", "netns",
            h,
        ]);
        let cmds: Vec<(&str, Vec<&str>)> = vec![
            (v, vec!["addr", "add", "198.51.100.1/24", "dev", "eth0"]),
            (
                v,
                vec!["addr", "add", "2001:db8:100::1/64", "dev", "eth0", "nodad"],
            ),
            (v, vec!["addr", "add", "192.0.2.5/32", "dev", "lo"]),
            (v, vec!["addr", "add", "192.0.2.6/32", "dev", "lo"]),
            (v, vec!["addr", "add", "2001:db8:2::5/128", "dev", "lo"]),
            (v, vec!["addr", "add", "2001:db8:2::6/128", "dev", "lo"]),
            (x, vec!["addr", "add", "198.51.100.10/24", "dev", "eth0"]),
            (
                x,
                vec!["addr", "add", "2001:db8:100::10/64", "dev", "eth0", "nodad"],
            ),
            (x, vec!["addr", "add", "100.96.0.1/16", "dev", "hpx0"]),
            (
                x,
                vec![
                    "addr",
                    "add",
                    "fd7a:115c:a1e0::1/64",
                    "dev",
                    "hpx0",
                    "nodad",
                ],
            ),
            (h, vec!["addr", "add", "100.96.0.2/16", "dev", "eth0"]),
            (
                h,
                vec![
                    "addr",
                    "add",
                    "fd7a:115c:a1e0::2/64",
                    "dev",
                    "eth0",
                    "nodad",
                ],
            ),
        ];
        for (ns, c) in &cmds {
            let mut a = vec!["ip", "-n", ns];
            a.extend(c);
            sh(&a);
        }
        for ns in [v, x, h] {
            for dev in ["lo", "eth0"] {
                sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            }
        }
        sh(&["ip", "-n", x, "link", "set", "hpx0", "up"]);
        sh(&[
            "ip",
            "-n",
            x,
            "route",
            "add",
            "192.0.2.0/24",
            "via",
            "198.51.100.1",
        ]);
        sh(&[
            "ip",
            "-n",
            x,
            "-6",
            "route",
            "add",
            "2001:db8:2::/64",
            "via",
            "2001:db8:100::1",
        ]);
        sh(&[
            "ip",
            "-n",
            h,
            "route",
            "add",
            "default",
            "via",
            "100.96.0.1",
        ]);
        sh(&[
            "ip",
            "-n",
            h,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd7a:115c:a1e0::1",
        ]);
        for k in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            // What enable_forwarding sets on a real exit (the synproxy needs it).
            "net.netfilter.nf_conntrack_tcp_loose=0",
        ] {
            sh(&["ip", "netns", "exec", x, "sysctl", "-q", "-w", k]);
        }
        // Wait until both links carry v4 and v6 (a fresh veth needs a moment for IPv6).
        for (ns, src, dst) in [
            (v, "192.0.2.5", "198.51.100.10"),
            (v, "2001:db8:2::5", "2001:db8:100::10"),
            (x, "100.96.0.1", "100.96.0.2"),
            (x, "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"),
        ] {
            let ok = (0..30).any(|_| {
                Command::new("ip")
                    .args(["netns", "exec", ns, "ping", "-c1", "-W1", "-I", src, dst])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            });
            assert!(ok, "lab link {src} -> {dst} in {ns} never came up");
        }
        lab
    }

    /// Runs `f` on a thread inside namespace `ns`: sockets it creates live in that namespace.
    pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).expect("netns file");
            use std::os::fd::AsRawFd;
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in netns")
    }

    /// A TCP server in `home` on `port` (v4 and v6) that answers every line with
    /// `<peer address> <line>`.
    pub fn serve(&self, port: u16) {
        for addr in [
            format!("100.96.0.2:{port}"),
            format!("[fd7a:115c:a1e0::2]:{port}"),
        ] {
            let l = Lab::in_ns(&self.home, move || {
                TcpListener::bind(&addr).expect("bind in home")
            });
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(conn) = conn else { return };
                    std::thread::spawn(move || {
                        use std::io::{BufRead, BufReader, Write};
                        let peer = conn.peer_addr().unwrap();
                        let mut w = conn.try_clone().unwrap();
                        for line in BufReader::new(conn).lines() {
                            let Ok(line) = line else { return };
                            // `mss`: the segment size this socket uses (what the SYN it got
                            // announced, after any clamp on the way).
                            let line = if line == "mss" {
                                format!("mss {}", tcp_maxseg(&w))
                            } else {
                                line
                            };
                            if writeln!(w, "{peer} {line}").is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
    }

    /// Runs `args` in namespace `ns` (asserting success); returns stdout.
    pub fn run_in(ns: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .expect("spawn");
        assert!(
            out.status.success(),
            "{args:?} in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Connects from viewer source `src` to `dst`; None when nothing answers within a second.
    pub fn connect(&self, src: IpAddr, dst: SocketAddr) -> Option<TcpStream> {
        self.connect_within(src, dst, Duration::from_secs(1))
    }

    /// Like [`Lab::connect`] with a given timeout (below 1 s: exactly one SYN is sent).
    pub fn connect_within(
        &self,
        src: IpAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Option<TcpStream> {
        Lab::in_ns(&self.viewer, move || {
            let domain = if dst.is_ipv6() {
                socket2::Domain::IPV6
            } else {
                socket2::Domain::IPV4
            };
            let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).ok()?;
            s.bind(&SocketAddr::new(src, 0).into()).ok()?;
            s.connect_timeout(&dst.into(), timeout).ok()?;
            let t: TcpStream = s.into();
            t.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            Some(t)
        })
    }

    /// Sends a line and returns the answer (None on timeout or error).
    pub fn ask(conn: &mut TcpStream, line: &str) -> Option<String> {
        use std::io::{BufRead, BufReader, Write};
        writeln!(conn, "{line}").ok()?;
        let mut r = BufReader::new(conn.try_clone().ok()?);
        let mut s = String::new();
        r.read_line(&mut s).ok()?;
        (!s.is_empty()).then(|| s.trim().to_string())
    }
}

/// TCP_MAXSEG of a connected socket.
fn tcp_maxseg(s: &TcpStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            &mut v as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc == 0 { v } else { -1 }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("HOMEPORT_LAB_KEEP").is_some() {
            eprintln!(
                "HOMEPORT_LAB_KEEP: leaving {} {} {}",
                self.viewer, self.vps, self.home
            );
            return;
        }
        for ns in [&self.viewer, &self.vps, &self.home] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
