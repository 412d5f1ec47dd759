//! The exit's lab for its own tests: three hosts of a [`homeport_tests::Lab`] (the one netns lab
//! of the project: per-lab prefix, namespaces and their processes removed on drop, also on
//! panic), wired like a VPS between the internet and a home node:
//! - `viewer`: the internet. `eth0` 198.51.100.1/24 + 2001:db8:100::1/64, and viewer source
//!   addresses 192.0.2.5, 192.0.2.6, 2001:db8:2::5, 2001:db8:2::6 on `lo`.
//! - `vps`: the exit. `eth0` 198.51.100.10/24 + 2001:db8:100::10/64 (routes to the viewers via
//!   the viewer host) and `hpx0` (standing in for the TUN) 100.96.0.1/16 + fd7a:115c:a1e0::1/64.
//! - `home`: the target. `eth0` 100.96.0.2/16 + fd7a:115c:a1e0::2/64, default routes via the vps
//!   (like the home node routing replies into its TUN).
//!
//! Under CI=true a missing tool or missing root is a failure; otherwise the test is skipped
//! with a notice.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

/// False (after a notice) when the lab cannot run here and this is not CI; panics under CI.
pub fn available(_test: &str) -> bool {
    available_with(_test, &[])
}

/// Like [`available`], also needing the programs in `extra` on PATH.
pub fn available_with(_test: &str, extra: &[&str]) -> bool {
    let mut tools = vec!["conntrack"];
    tools.extend_from_slice(extra);
    homeport_tests::require_root_and(&tools)
}

pub struct Lab {
    /// Namespace names of the three hosts.
    pub viewer: String,
    pub vps: String,
    pub home: String,
    _lab: homeport_tests::Lab,
}

impl Lab {
    pub fn new() -> Lab {
        Lab::build().expect("building the exit lab")
    }

    fn build() -> anyhow::Result<Lab> {
        let mut lab = homeport_tests::Lab::new()?;
        let (viewer, vps, home) = (
            lab.add_host("viewer")?,
            lab.add_host("vps")?,
            lab.add_host("home")?,
        );
        lab.link("viewer", "198.51.100.1/24", "vps", "198.51.100.10/24")?;
        // The vps end of its link to home is `hpx0`, the TUN's stand-in.
        lab.link("home", "100.96.0.2/16", "vps", "")?;
        lab.ip("vps", &["link", "set", "eth1", "down"])?;
        lab.ip("vps", &["link", "set", "eth1", "name", "hpx0"])?;
        lab.ip("vps", &["addr", "add", "100.96.0.1/16", "dev", "hpx0"])?;
        lab.ip("vps", &["link", "set", "hpx0", "up"])?;
        for (host, cidr, dev) in [
            ("viewer", "2001:db8:100::1/64", "eth0"),
            ("viewer", "192.0.2.5/32", "lo"),
            ("viewer", "192.0.2.6/32", "lo"),
            ("viewer", "2001:db8:2::5/128", "lo"),
            ("viewer", "2001:db8:2::6/128", "lo"),
            ("vps", "2001:db8:100::10/64", "eth0"),
            ("vps", "fd7a:115c:a1e0::1/64", "hpx0"),
            ("home", "fd7a:115c:a1e0::2/64", "eth0"),
        ] {
            let mut args = vec!["addr", "add", cidr, "dev", dev];
            if cidr.contains(':') && dev != "lo" {
                args.push("nodad");
            }
            lab.ip(host, &args)?;
        }
        lab.ip(
            "vps",
            &["route", "add", "192.0.2.0/24", "via", "198.51.100.1"],
        )?;
        lab.ip(
            "vps",
            &[
                "-6",
                "route",
                "add",
                "2001:db8:2::/64",
                "via",
                "2001:db8:100::1",
            ],
        )?;
        lab.default_route("home", "100.96.0.1")?;
        lab.ip(
            "home",
            &["-6", "route", "add", "default", "via", "fd7a:115c:a1e0::1"],
        )?;
        lab.forwarding("vps")?;
        // What enable_forwarding sets on a real exit (the synproxy needs it).
        lab.exec(
            "vps",
            &["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"],
        )?;
        // Wait until both links carry v4 and v6 (a fresh veth needs a moment for IPv6).
        for (host, src, dst) in [
            ("viewer", "192.0.2.5", "198.51.100.10"),
            ("viewer", "2001:db8:2::5", "2001:db8:100::10"),
            ("vps", "100.96.0.1", "100.96.0.2"),
            ("vps", "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"),
        ] {
            let up = (0..30).any(|_| {
                lab.exec(host, &["ping", "-c1", "-W1", "-I", src, dst])
                    .is_ok()
            });
            anyhow::ensure!(up, "lab link {src} -> {dst} in {host} never came up");
        }
        Ok(Lab {
            viewer,
            vps,
            home,
            _lab: lab,
        })
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
