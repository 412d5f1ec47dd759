//! Starting homeport's own binaries in a lab: coordinator (with its pin and auth keys), nodes and exits.
//!
//! Written against the command line every binary documents (README.md): `homeport-coordinator serve |
//! pin | authkey create | publish add …`, `homeport up | ip | status`, `homeport-exit up`.

use crate::{Lab, ProcId, run, wait_for};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long a daemon may take to become usable in a lab (debug builds on a busy 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory with the workspace's binaries: `$HOMEPORT_BIN_DIR`, else `<target>/debug` where
/// `<target>` is `$CARGO_TARGET_DIR` or the workspace's `target/`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HOMEPORT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the workspace");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_relative() {
                workspace.join(t)
            } else {
                t
            }
        })
        .unwrap_or_else(|| workspace.join("target"));
    target.join("debug")
}

/// Path of workspace binary `name` (e.g. "homeport"), or an error saying how to build it.
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.is_file() {
        bail!(
            "{} not found: build the binaries first with `cargo build --workspace --bins` \
             (./deploy/test.sh does)",
            p.display()
        );
    }
    Ok(p)
}

/// A coordinator running in a lab host.
pub struct Coordinator {
    /// The URL nodes join with, e.g. `https://198.51.100.10:8443`.
    pub url: String,
    /// The TLS key pin printed by `homeport-coordinator pin`.
    pub pin: String,
    pub state_dir: PathBuf,
    pub proc: ProcId,
}

impl Coordinator {
    /// Runs the admin CLI (`homeport-coordinator ARGS --state-dir D`) and returns its stdout.
    /// It talks to the daemon over the unix socket in the state dir, so it runs outside the lab.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        run(Command::new(bin("homeport-coordinator")?)
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir))
    }

    /// Creates a pre-auth key (`authkey create [--reusable]`).
    pub fn authkey(&self, reusable: bool) -> Result<String> {
        let mut args = vec!["authkey", "create"];
        if reusable {
            args.push("--reusable");
        }
        let key = self.admin(&args)?.trim().to_string();
        if key.is_empty() || key.contains(char::is_whitespace) {
            bail!("`authkey create` printed {key:?}, expected just the key");
        }
        Ok(key)
    }

    /// `publish add --exit EXIT --port PORT --to TARGET` (tcp); returns what it printed (the rule
    /// as `publish list` shows it, and where viewers connect).
    pub fn publish(&self, exit: &str, port: u16, to: &str) -> Result<String> {
        self.admin(&[
            "publish",
            "add",
            "--exit",
            exit,
            "--port",
            &port.to_string(),
            "--to",
            to,
        ])
    }
}

/// A node (`homeport up`) or exit (`homeport-exit up`) running in a lab host.
pub struct Node {
    pub hostname: String,
    pub state_dir: PathBuf,
    pub proc: ProcId,
}

impl Node {
    /// The node's mesh IPv4 (`homeport ip -4 --state-dir D`), once it has one.
    pub fn ip(&self) -> Result<String> {
        let out = run(Command::new(bin("homeport")?)
            .args(["ip", "-4", "--state-dir"])
            .arg(&self.state_dir))?;
        let ip = out.trim().to_string();
        if ip.is_empty() {
            bail!("`homeport ip` printed nothing for {}", self.hostname);
        }
        Ok(ip)
    }

    /// `homeport ARGS --state-dir D` against this node (e.g. `status --json`).
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        run(Command::new(bin("homeport")?)
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir))
    }
}

impl Lab {
    /// Starts `homeport-coordinator serve` in `host`, listening on `ip` (API on 8443, STUN on 3478), and
    /// waits until `pin` answers.
    pub fn start_coordinator(&mut self, host: &str, ip: &str) -> Result<Coordinator> {
        self.start_coordinator_with(host, ip, &[])
    }

    /// [`Lab::start_coordinator`] with `extra` flags for `serve` (e.g. `--metrics-listen ADDR`).
    pub fn start_coordinator_with(
        &mut self,
        host: &str,
        ip: &str,
        extra: &[&str],
    ) -> Result<Coordinator> {
        self.start_coordinator_at(host, host, ip, 8443, 3478, extra)
    }

    /// A coordinator called `name` (its state dir and log) in `host` on `ip`:`port`, STUN and
    /// relay on `stun_port`: several can run in one host (replicas sharing a database).
    pub fn start_coordinator_at(
        &mut self,
        host: &str,
        name: &str,
        ip: &str,
        port: u16,
        stun_port: u16,
        extra: &[&str],
    ) -> Result<Coordinator> {
        let exe = bin("homeport-coordinator")?;
        let state_dir = self.dir().join(format!("coordinator-{name}"));
        let listen = format!("{ip}:{port}");
        let stun = format!("{ip}:{stun_port}");
        let mut argv = vec![
            exe.to_str().context("binary path is not UTF-8")?,
            "serve",
            "--listen",
            &listen,
            "--stun-listen",
            &stun,
            "--state-dir",
            state_dir.to_str().context("lab dir is not UTF-8")?,
        ];
        argv.extend_from_slice(extra);
        let proc = self.spawn(host, &format!("coordinator-{name}"), &argv)?;
        let pin = wait_for("the coordinator's pin", START_TIMEOUT, || {
            if let Err(e) = self.check_running(proc) {
                return Some(Err(e));
            }
            let out = Command::new(&exe)
                .arg("pin")
                .arg("--state-dir")
                .arg(&state_dir)
                .output()
                .ok()?;
            let pin = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (out.status.success() && !pin.is_empty()).then_some(Ok(pin))
        })??;
        Ok(Coordinator {
            url: format!("https://{ip}:{port}"),
            pin,
            state_dir,
            proc,
        })
    }

    /// Starts `homeport up` in `host` joining `coord` as `hostname`, and waits until it has a mesh IP.
    pub fn start_node(
        &mut self,
        host: &str,
        coord: &Coordinator,
        authkey: &str,
        hostname: &str,
    ) -> Result<Node> {
        self.start_node_with(host, coord, authkey, hostname, &[])
    }

    /// [`Lab::start_node`] with `extra` flags for `homeport up` (e.g. `--metrics-listen ADDR`).
    pub fn start_node_with(
        &mut self,
        host: &str,
        coord: &Coordinator,
        authkey: &str,
        hostname: &str,
        extra: &[&str],
    ) -> Result<Node> {
        self.start_daemon("homeport", host, coord, authkey, hostname, "hp0", extra)
    }

    /// Starts `homeport-exit up` in `host` joining `coord` as `hostname` (plus `extra` flags, e.g.
    /// `--keep-open tcp:22`), and waits until it has a mesh IP and the coordinator lists it as an
    /// exit (`homeport-coordinator exits`: publish rules are accepted only then).
    pub fn start_exit(
        &mut self,
        host: &str,
        coord: &Coordinator,
        authkey: &str,
        hostname: &str,
        extra: &[&str],
    ) -> Result<Node> {
        let node = self.start_daemon(
            "homeport-exit",
            host,
            coord,
            authkey,
            hostname,
            "hpx0",
            extra,
        )?;
        wait_for(
            &format!("{hostname} to announce itself as an exit"),
            START_TIMEOUT,
            || {
                if let Err(e) = self.check_running(node.proc) {
                    return Some(Err(e));
                }
                let out = coord.admin(&["exits", "--json"]).ok()?;
                let v: serde_json::Value = serde_json::from_str(&out).ok()?;
                v.as_array()?
                    .iter()
                    .any(|e| e["name"] == hostname)
                    .then_some(Ok(()))
            },
        )??;
        Ok(node)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_daemon(
        &mut self,
        binary: &str,
        host: &str,
        coord: &Coordinator,
        authkey: &str,
        hostname: &str,
        tun: &str,
        extra: &[&str],
    ) -> Result<Node> {
        let exe = bin(binary)?;
        let state_dir = self.dir().join(format!("{binary}-{hostname}"));
        // The auth key goes in a 0600 file, as a user would do: never on the command line.
        let key_file = self.dir().join(format!("{binary}-{hostname}.authkey"));
        write_private(&key_file, authkey)?;
        let mut args = vec![
            exe.to_str()
                .context("binary path is not UTF-8")?
                .to_string(),
            "up".into(),
            "--coordinator".into(),
            coord.url.clone(),
            "--pin".into(),
            coord.pin.clone(),
            "--authkey-file".into(),
            key_file.to_str().context("lab dir is not UTF-8")?.into(),
            "--hostname".into(),
            hostname.into(),
            "--state-dir".into(),
            state_dir.to_str().context("lab dir is not UTF-8")?.into(),
        ];
        args.extend(
            ["--tun", tun]
                .into_iter()
                .chain(extra.iter().copied())
                .map(String::from),
        );
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = self.spawn(host, &format!("{binary}-{hostname}"), &argv)?;
        let node = Node {
            hostname: hostname.into(),
            state_dir,
            proc,
        };
        wait_for(
            &format!("{hostname} ({binary}) to get a mesh IP"),
            START_TIMEOUT,
            || {
                if let Err(e) = self.check_running(proc) {
                    return Some(Err(e));
                }
                node.ip().ok().map(|_| Ok(()))
            },
        )??;
        Ok(node)
    }
}

/// Writes `text` and a newline to `p` with mode 0600 (the binaries' own helper).
pub fn write_private(p: &Path, text: &str) -> Result<()> {
    Ok(homeport_host::fs::write_private(
        p,
        format!("{text}\n").as_bytes(),
    )?)
}
