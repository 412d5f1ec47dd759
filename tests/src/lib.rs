//! Helpers for the integration tests: network namespace labs and process management.
//!
//! A [`Lab`] is a set of network namespaces named `<prefix>-<host>`, where the prefix is `hp` plus four
//! random hex digits, so tests run in parallel without seeing each other. Hosts are joined by veth links
//! (each host's interfaces are called `eth0`, `eth1`, … in the order they were linked), routers NAT with
//! nftables, and processes run inside a host with `ip netns exec`. Dropping the lab (also while a test
//! panics) stops every process it started and deletes its namespaces; on a panic it first prints the
//! tail of every process log so the failure explains itself.
//!
//! Every test that builds a lab starts with:
//! ```no_run
//! if !homeport_tests::require_root() { return; }
//! ```
//! which skips with a notice when not root, and fails under `CI=true` (never a silent green in CI).
//!
//! The standard addresses follow the design's lab conventions (documentation ranges only; traffic never
//! leaves the lab): see [`Lab::internet`], [`Lab::isp`], [`Lab::router_behind`] and [`Lab::host_behind`].

mod homeport;
mod lab;
mod postgres;

pub use homeport::{Coordinator, Node, bin, bin_dir};
pub use lab::{Lab, NatKind, ProcId, Site, VIEWER_IP, VPS_IP};
pub use postgres::Postgres;

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// True when running under CI (`CI=true` or `CI=1`): anything a test needs and lacks is then a failure.
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Whether this test may build a lab: root and the basic network tools (`ip`, `nft`).
///
/// Returns `false` with a notice when something is missing (the test should `return`), except under
/// `CI=true`, where it panics: in CI a test that needs root must never pass without running.
pub fn require_root() -> bool {
    require_root_and(&[])
}

/// Like [`require_root`], and also requires each program in `tools` on PATH (e.g. `conntrack`, `curl`).
pub fn require_root_and(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (effective uid 0)".to_string());
    }
    for tool in ["ip", "nft"].iter().chain(tools) {
        if which(tool).is_none() {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    let what = missing.join(", ");
    if in_ci() {
        panic!(
            "{test}: needs {what}; under CI=true this is a failure, not a skip \
             (run `sudo ./deploy/setup.sh`, then the tests as root)"
        );
    }
    let notice = format!("SKIP {test}: needs {what} (run as root after ./deploy/setup.sh)");
    // Written straight to the stderr handle, which libtest does not capture, so the skip is visible.
    let _ = writeln!(std::io::stderr(), "{notice}");
    if let Ok(path) = std::env::var("HOMEPORT_TEST_SKIP_LOG")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
    {
        let _ = writeln!(f, "{notice}");
    }
    false
}

fn is_root() -> bool {
    // Effective uid is the second field of "Uid:" in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Full path of `program` if it is on PATH.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `cmd` to completion; returns its stdout, or an error with the command line, exit status and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let line = command_line(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if out.stdout.is_empty() {
                String::new()
            } else {
                format!("\nstdout: {}", String::from_utf8_lossy(&out.stdout).trim())
            }
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args…` to completion (see [`run`]).
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    run(Command::new(program).args(args))
}

pub(crate) fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `timeout` naming `what` was awaited.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `f` every 50 ms until it is true, or fails after `timeout` naming `what` was awaited.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    wait_for(what, timeout, || f().then_some(()))
}

/// Four random hex digits (from the kernel's RNG), for per-test names.
pub(crate) fn random_hex4() -> String {
    let mut b = [0u8; 2];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    if b == [0, 0] {
        // No /dev/urandom: fall back to time and pid, still distinct between parallel tests.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let v = t ^ std::process::id().rotate_left(16);
        b = [(v >> 8) as u8, v as u8];
    }
    hex::encode(b)
}
