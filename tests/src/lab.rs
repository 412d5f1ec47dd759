//! Network namespace labs: hosts, veth links, routes, NAT and processes, all removed on drop.

use crate::{command_line, random_hex4, run, sh};
use anyhow::{Context, Result, bail, ensure};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The VPS's public address in [`Lab::internet`].
pub const VPS_IP: &str = "198.51.100.10";
/// The remote viewer's address in [`Lab::internet`].
pub const VIEWER_IP: &str = "192.0.2.50";

/// How a router translates addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping (`masquerade`): a socket keeps one public port for every
    /// destination, and Linux keeps the source port when it is free. Hole punching works.
    Easy,
    /// Endpoint-dependent mapping (`masquerade random`): every new destination gets a random public
    /// port, like the symmetric NATs that defeat hole punching and need the relay.
    Hard,
}

/// A process started with [`Lab::spawn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId(usize);

struct Proc {
    name: String,
    host: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

/// A router or ISP whose inside network hosts can be put behind ([`Lab::router_behind`],
/// [`Lab::host_behind`]).
#[derive(Debug, Clone)]
pub struct Site {
    /// Short host name of the router.
    pub host: String,
    /// The router's address on the outside (what hosts behind it look like after NAT).
    pub wan_ip: String,
    /// The router's address on the inside (the default gateway of the hosts behind it).
    pub lan_ip: String,
    /// The inside /24 as its first three octets, e.g. "10.10.1".
    pub lan_prefix: String,
    lan_bridge: String,
}

/// A set of network namespaces that are deleted, with every process in them, when the lab is dropped.
pub struct Lab {
    prefix: String,
    hosts: Vec<String>,
    /// Next free interface index per host (interfaces are eth0, eth1, …).
    next_if: HashMap<String, u32>,
    /// Next free host number on a site's inside /24.
    next_addr: HashMap<String, u8>,
    next_isp: u8,
    next_isp_inside: u8,
    procs: Vec<Proc>,
    dir: tempfile::TempDir,
}

impl Lab {
    /// An empty lab with a fresh prefix (`hp` + 4 hex digits). Needs root: check [`crate::require_root`]
    /// first.
    pub fn new() -> Result<Lab> {
        let existing = sh("ip", &["netns", "list"]).context("listing network namespaces")?;
        let prefix = (0..20)
            .map(|_| format!("hp{}", random_hex4()))
            .find(|p| !existing.lines().any(|l| l.starts_with(&format!("{p}-"))))
            .context("no free lab prefix after 20 tries")?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("homeport-lab-{prefix}-"))
            .tempdir()
            .context("creating the lab's temporary directory")?;
        Ok(Lab {
            prefix,
            hosts: Vec::new(),
            next_if: HashMap::new(),
            next_addr: HashMap::new(),
            next_isp: 2,
            next_isp_inside: 0,
            procs: Vec::new(),
            dir,
        })
    }

    /// The per-lab prefix of every namespace name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A directory that lives as long as the lab (process logs, state directories, files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The namespace name of `host` (`<prefix>-<host>`).
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Creates host `name`: a namespace with loopback up. Names are short words: [a-z0-9], ≤ 12 chars.
    pub fn add_host(&mut self, name: &str) -> Result<String> {
        ensure!(
            !name.is_empty()
                && name.len() <= 12
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "host name {name:?}: use 1-12 characters a-z, 0-9"
        );
        ensure!(
            !self.hosts.iter().any(|h| h == name),
            "host {name:?} exists already"
        );
        let ns = self.ns(name);
        sh("ip", &["netns", "add", &ns])?;
        self.hosts.push(name.to_string());
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn next_ifname(&mut self, host: &str) -> String {
        let n = self.next_if.entry(host.to_string()).or_insert(0);
        let name = format!("eth{n}");
        *n += 1;
        name
    }

    /// Joins hosts `a` and `b` with a veth pair and brings both ends up. `a_cidr`/`b_cidr` (e.g.
    /// "10.0.0.1/24") are assigned when not empty. Returns the interface names in `a` and in `b`.
    pub fn link(
        &mut self,
        a: &str,
        a_cidr: &str,
        b: &str,
        b_cidr: &str,
    ) -> Result<(String, String)> {
        for h in [a, b] {
            ensure!(
                self.hosts.iter().any(|x| x == h),
                "no host {h:?} in this lab"
            );
        }
        let (ia, ib) = (self.next_ifname(a), self.next_ifname(b));
        let (na, nb) = (self.ns(a), self.ns(b));
        // Both ends are created directly in their namespaces, so eth0… never clash in the root namespace.
        sh(
            "ip",
            &[
                "link", "add", &ia, "netns", &na, "type", "veth", "peer", "name", &ib, "netns", &nb,
            ],
        )?;
        for (ns, ifname, cidr) in [(&na, &ia, a_cidr), (&nb, &ib, b_cidr)] {
            if !cidr.is_empty() {
                sh("ip", &["-n", ns, "addr", "add", cidr, "dev", ifname])?;
            }
            sh("ip", &["-n", ns, "link", "set", ifname, "up"])?;
        }
        Ok((ia, ib))
    }

    /// Sets `host`'s default route via `gateway`.
    pub fn default_route(&self, host: &str, gateway: &str) -> Result<()> {
        self.ip(host, &["route", "replace", "default", "via", gateway])
    }

    /// Runs `ip ARGS` inside `host`.
    pub fn ip(&self, host: &str, args: &[&str]) -> Result<()> {
        let ns = self.ns(host);
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full).map(drop)
    }

    /// Makes `host` a router (IPv4 and IPv6 forwarding).
    pub fn forwarding(&self, host: &str) -> Result<()> {
        self.exec(host, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        self.exec(host, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        Ok(())
    }

    /// Source-NATs everything `host` forwards out of `out_iface` (table `ip lab_nat`), the way a home
    /// router or carrier-grade NAT does.
    pub fn nat(&self, host: &str, out_iface: &str, kind: NatKind) -> Result<()> {
        let action = match kind {
            NatKind::Easy => "masquerade",
            NatKind::Hard => "masquerade random",
        };
        let rules = format!(
            "table ip lab_nat {{\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             oifname \"{out_iface}\" {action}\n  }}\n}}\n"
        );
        self.exec_stdin(host, &["nft", "-f", "-"], rules.as_bytes())
            .with_context(|| format!("installing {kind:?} NAT in {host}"))
            .map(drop)
    }

    /// A [`Command`] that runs `program` inside `host` (`ip netns exec <ns> program`).
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(self.ns(host)).arg(program);
        c
    }

    /// Runs `args` inside `host` to completion; returns stdout or an error with stderr.
    pub fn exec(&self, host: &str, args: &[&str]) -> Result<String> {
        ensure!(!args.is_empty(), "exec in {host}: empty command");
        run(self.command(host, args[0]).args(&args[1..]))
    }

    /// Like [`Lab::exec`], feeding `input` on stdin.
    pub fn exec_stdin(&self, host: &str, args: &[&str], input: &[u8]) -> Result<String> {
        use std::io::Write;
        ensure!(!args.is_empty(), "exec in {host}: empty command");
        let mut cmd = self.command(host, args[0]);
        cmd.args(&args[1..]);
        let line = command_line(&cmd);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        child.stdin.take().context("stdin")?.write_all(input)?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "`{line}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One ping from `host` to `addr` (2 s timeout); true if answered.
    pub fn ping(&self, host: &str, addr: &str) -> bool {
        self.command(host, "ping")
            .args(["-n", "-c", "1", "-W", "2", addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// The conntrack table of `host` (`conntrack -L` plus `extra` filters), one flow per line.
    pub fn conntrack(&self, host: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["conntrack", "-L"];
        args.extend_from_slice(extra);
        self.exec(host, &args)
    }

    /// Starts `args` inside `host` in the background; stdout and stderr go to `<lab dir>/<name>.log`.
    pub fn spawn(&mut self, host: &str, name: &str, args: &[&str]) -> Result<ProcId> {
        self.spawn_env(host, name, args, &[])
    }

    /// Like [`Lab::spawn`] with extra environment variables.
    pub fn spawn_env(
        &mut self,
        host: &str,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ProcId> {
        ensure!(!args.is_empty(), "spawn {name}: empty command");
        ensure!(
            self.hosts.iter().any(|h| h == host),
            "spawn {name}: no host {host:?}"
        );
        // A name may be reused once its process has exited (a daemon restarted in a test).
        for p in self
            .procs
            .iter_mut()
            .filter(|p| p.name == name && p.exited.is_none())
        {
            p.exited = p.child.try_wait()?;
        }
        ensure!(
            !self
                .procs
                .iter()
                .any(|p| p.name == name && p.exited.is_none()),
            "a process named {name:?} is running already"
        );
        let runs = self.procs.iter().filter(|p| p.name == name).count();
        let log = if runs == 0 {
            self.dir().join(format!("{name}.log"))
        } else {
            self.dir().join(format!("{name}.{runs}.log"))
        };
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = self.command(host, args[0]);
        cmd.args(&args[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let line = command_line(&cmd);
        // `ip netns exec` execs the program after entering the namespace: the child's pid is the program's.
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        self.procs.push(Proc {
            name: name.into(),
            host: host.into(),
            child,
            log,
            exited: None,
        });
        Ok(ProcId(self.procs.len() - 1))
    }

    /// The pid of a spawned process.
    pub fn pid(&self, id: ProcId) -> u32 {
        self.procs[id.0].child.id()
    }

    /// Whether a spawned process is still running (`Err` with its exit status if it ended).
    pub fn check_running(&mut self, id: ProcId) -> Result<()> {
        let p = &mut self.procs[id.0];
        if p.exited.is_none() {
            p.exited = p.child.try_wait()?;
        }
        match p.exited {
            None => Ok(()),
            Some(status) => bail!(
                "{} (in {}) exited ({status}); log {}:\n{}",
                p.name,
                p.host,
                p.log.display(),
                tail(&p.log, 40)
            ),
        }
    }

    /// Waits up to `within` for a spawned process to end by itself; its exit status.
    pub fn wait_exit(&mut self, id: ProcId, within: Duration) -> Result<ExitStatus> {
        let end = Instant::now() + within;
        loop {
            let p = &mut self.procs[id.0];
            if p.exited.is_none() {
                p.exited = p.child.try_wait()?;
            }
            if let Some(status) = p.exited {
                return Ok(status);
            }
            if Instant::now() >= end {
                bail!("{} (in {}) still running after {within:?}", p.name, p.host);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits up to 5 s (then SIGKILL). Returns the exit status.
    pub fn stop(&mut self, id: ProcId) -> Result<ExitStatus> {
        stop_proc(&mut self.procs[id.0], Duration::from_secs(5))
    }

    /// Everything a spawned process has written so far.
    pub fn log(&self, id: ProcId) -> String {
        std::fs::read_to_string(&self.procs[id.0].log).unwrap_or_default()
    }

    /// Path of a spawned process's log.
    pub fn log_path(&self, id: ProcId) -> &Path {
        &self.procs[id.0].log
    }

    // ---- standard topology (design "Labs" conventions) ----

    /// The internet: router `net` with the VPS `vps` (198.51.100.10, gateway 198.51.100.1), the viewer
    /// `viewer` (192.0.2.50, gateway 192.0.2.1), and a shared ISP segment 203.0.113.0/24 (bridge in
    /// `net`, 203.0.113.1) that [`Lab::isp`] plugs into. No NAT on the internet: everyone is seen
    /// with their real address.
    pub fn internet(&mut self) -> Result<()> {
        self.add_host("net")?;
        self.forwarding("net")?;
        self.ip("net", &["link", "add", "isp", "type", "bridge"])?;
        self.ip("net", &["addr", "add", "203.0.113.1/24", "dev", "isp"])?;
        self.ip("net", &["link", "set", "isp", "up"])?;
        self.add_host("vps")?;
        self.link("net", "198.51.100.1/24", "vps", &format!("{VPS_IP}/24"))?;
        self.default_route("vps", "198.51.100.1")?;
        self.add_host("viewer")?;
        self.link("net", "192.0.2.1/24", "viewer", &format!("{VIEWER_IP}/24"))?;
        self.default_route("viewer", "192.0.2.1")?;
        Ok(())
    }

    /// An ISP (needs [`Lab::internet`]): host `name` with public address 203.0.113.N (N = 2, 3, …) and
    /// an inside network 100.64.K.0/24 (its address 100.64.K.1; K = 0, 1, …), NATing with `nat`.
    /// Put routers or hosts behind it: a home behind an ISP's NAT is carrier-grade NAT.
    pub fn isp(&mut self, name: &str, nat: NatKind) -> Result<Site> {
        ensure!(
            self.hosts.iter().any(|h| h == "net"),
            "isp {name}: call Lab::internet first"
        );
        let n = self.next_isp;
        let k = self.next_isp_inside;
        self.next_isp += 1;
        self.next_isp_inside += 1;
        let wan_ip = format!("203.0.113.{n}");
        self.add_host(name)?;
        let (net_if, wan_if) = self.link("net", "", name, &format!("{wan_ip}/24"))?;
        self.ip("net", &["link", "set", &net_if, "master", "isp"])?;
        self.default_route(name, "203.0.113.1")?;
        self.site_inside(name, wan_ip, &wan_if, &format!("100.64.{k}"), nat)
    }

    /// A NAT router `name` with its WAN on `outside`'s inside network and a LAN `lan_prefix`.0/24
    /// (e.g. "10.10.1"; the router is .1). A home router behind [`Lab::isp`] gives the CGNAT double NAT.
    pub fn router_behind(
        &mut self,
        outside: &Site,
        name: &str,
        lan_prefix: &str,
        nat: NatKind,
    ) -> Result<Site> {
        let wan_ip = self.host_behind(outside, name)?;
        let wan_if = format!("eth{}", self.next_if[name] - 1);
        self.site_inside(name, wan_ip, &wan_if, lan_prefix, nat)
    }

    /// A host `name` on `site`'s inside network (addresses .2, .3, … in order); returns its address.
    pub fn host_behind(&mut self, site: &Site, name: &str) -> Result<String> {
        let n = self.next_addr.get(&site.host).copied().unwrap_or(2);
        ensure!(n < 255, "site {} is full", site.host);
        self.next_addr.insert(site.host.clone(), n + 1);
        let ip = format!("{}.{n}", site.lan_prefix);
        if !self.hosts.iter().any(|h| h == name) {
            self.add_host(name)?;
        }
        let (site_if, _) = self.link(&site.host, "", name, &format!("{ip}/24"))?;
        self.ip(
            &site.host,
            &["link", "set", &site_if, "master", &site.lan_bridge],
        )?;
        self.default_route(name, &site.lan_ip)?;
        Ok(ip)
    }

    fn site_inside(
        &mut self,
        name: &str,
        wan_ip: String,
        wan_if: &str,
        lan_prefix: &str,
        nat: NatKind,
    ) -> Result<Site> {
        // The inside is a bridge so any number of hosts can join it later.
        let lan_ip = format!("{lan_prefix}.1");
        self.forwarding(name)?;
        self.ip(name, &["link", "add", "lan", "type", "bridge"])?;
        self.ip(
            name,
            &["addr", "add", &format!("{lan_ip}/24"), "dev", "lan"],
        )?;
        self.ip(name, &["link", "set", "lan", "up"])?;
        self.nat(name, wan_if, nat)?;
        Ok(Site {
            host: name.to_string(),
            wan_ip,
            lan_ip,
            lan_prefix: lan_prefix.to_string(),
            lan_bridge: "lan".to_string(),
        })
    }
}

fn stop_proc(p: &mut Proc, grace: Duration) -> Result<ExitStatus> {
    if let Some(s) = p.exited {
        return Ok(s);
    }
    if let Some(s) = p.child.try_wait()? {
        p.exited = Some(s);
        return Ok(s);
    }
    let _ = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .stderr(Stdio::null())
        .status();
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Some(s) = p.child.try_wait()? {
            p.exited = Some(s);
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = p.child.kill();
    let s = p.child.wait()?;
    p.exited = Some(s);
    Ok(s)
}

/// The last `n` lines of a file.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for p in &mut self.procs {
            if panicking {
                eprintln!(
                    "---- {} (in {}) log {}, last 40 lines ----\n{}",
                    p.name,
                    p.host,
                    p.log.display(),
                    tail(&p.log, 40)
                );
            }
            let _ = stop_proc(p, Duration::from_secs(2));
        }
        for h in self.hosts.iter().rev() {
            let ns = format!("{}-{h}", self.prefix);
            // Anything else still running in the namespace (children of our processes) goes too.
            if let Ok(pids) = sh("ip", &["netns", "pids", &ns]) {
                for pid in pids.split_whitespace() {
                    let _ = Command::new("kill")
                        .args(["-KILL", pid])
                        .stderr(Stdio::null())
                        .status();
                }
            }
            if let Err(e) = sh("ip", &["netns", "del", &ns]) {
                eprintln!("lab cleanup: {e:#}");
            }
        }
        if panicking {
            eprintln!(
                "lab {} removed; its files were in {}",
                self.prefix,
                self.dir.path().display()
            );
        }
    }
}
