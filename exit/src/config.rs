//! `homeport-exit up` settings: the node's flags (flattened) plus the publisher's own, with the
//! same config file (`/etc/homeport/exit.toml` by default) whose keys mirror the long flags.

use crate::nft::{L4, NftConfig, PortSpec, default_keep_open};
use anyhow::{Result, bail};
use homeport_node::config::{EXIT_DEFAULTS, UpArgs, UpConfig};
use std::path::{Path, PathBuf};

/// Default ban for closed-port probers: long enough to stop a scan, short enough that a
/// mistaken ban (a user who typed the wrong port five times) heals by itself.
pub const DEFAULT_BAN_SECONDS: u32 = 600;
/// Closed-port hits per minute before a ban: scanners send dozens, a confused user a few.
pub const DEFAULT_BAN_AFTER: u32 = 5;

/// Keys of the config file the exit handles (beyond the node's own).
pub const EXIT_KEYS: &[&str] = &[
    "keep-open",
    "ban-seconds",
    "ban-after",
    "edge-protection",
    "audit-max-bytes",
    "audit-keep",
    "country-db",
    "invite-port",
];
/// Smallest `--audit-max-bytes`: a few records per file at least.
pub const MIN_AUDIT_MAX_BYTES: u64 = 1024;

/// The publisher's own flags of `homeport-exit up`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ExitArgs {
    /// Public ports kept open by edge protection, PROTO:PORT, repeatable or comma-separated.
    /// Giving any replaces the default list (tcp:22,tcp:8443,udp:3478); the node's WireGuard
    /// port is always kept open.
    #[arg(long, value_name = "PROTO:PORT", value_delimiter = ',')]
    pub keep_open: Vec<PortSpec>,
    /// Seconds a source that probed closed ports stays banned from published ports [default: 600]
    #[arg(long, value_name = "N")]
    pub ban_seconds: Option<u32>,
    /// Distinct closed ports a source probes within a minute that get it banned (1 = the first;
    /// retries to one port count once; allow-listed sources are never banned) [default: 5]
    #[arg(long, value_name = "N")]
    pub ban_after: Option<u32>,
    /// Size at which the audit log rotates (audit.jsonl becomes audit.jsonl.1), in bytes or with
    /// a K, M or G suffix (binary units) [default: 64M]
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub audit_max_bytes: Option<u64>,
    /// Rotated audit files kept (audit.jsonl.1 … .N; older ones are deleted) [default: 4]
    #[arg(long, value_name = "N")]
    pub audit_keep: Option<u32>,
    /// Edge protection of the VPS (drop everything public but the keep-open ports): on or off
    /// [default: on]
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub edge_protection: Option<bool>,
    /// Country database for country rules (`publish add --country/--deny-country`): an mmdb
    /// file, MaxMind GeoLite2-Country or DB-IP "IP to Country Lite"; reloaded when it changes.
    /// Without it, rules with countries are refused
    #[arg(long, value_name = "FILE")]
    pub country_db: Option<PathBuf>,
    /// Serve invite pages (`homeport-coordinator invite create`) over plain HTTP on this TCP
    /// port of every address (kept open by edge protection); without it invites are refused
    #[arg(long, value_name = "PORT")]
    pub invite_port: Option<u16>,
    /// Send alerts to this webhook (repeatable): generic JSON, or ntfy/Discord/Slack bodies
    /// (prefix ntfy+, discord+, slack+, or by the host). Alerts: a deny spike on a published
    /// port, a new country or an unknown source on one, the rules failing to apply, a peer's path
    /// falling back to the relay
    #[arg(long, value_name = "URL")]
    pub alert_webhook: Vec<homeport_host::alert::Webhook>,
    /// Denied packets on one published port within one 3 s read that make a deny spike
    /// [default: 200]
    #[arg(long, value_name = "N")]
    pub alert_deny_spike: Option<u64>,
    /// Seconds the same alert is not sent again [default: 300]
    #[arg(long, value_name = "SECS")]
    pub alert_debounce: Option<u64>,
}

/// `67108864`, `64M`, `64MiB`, `512K`, `1G` (binary units) as bytes, at least
/// [`MIN_AUDIT_MAX_BYTES`].
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid size {s:?}: expected bytes (at least {MIN_AUDIT_MAX_BYTES}), optionally with a K, M or G suffix, e.g. 64M"
        )
    };
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| {
            t.strip_suffix('B')
                .filter(|r| r.ends_with(['K', 'M', 'G', 'k', 'm', 'g']))
        })
        .unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    let n = n.checked_mul(mult).ok_or_else(bad)?;
    if n < MIN_AUDIT_MAX_BYTES {
        return Err(bad());
    }
    Ok(n)
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("invalid value {s:?}: expected on or off")),
    }
}

/// Publisher settings, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishSettings {
    pub keep_open: Vec<PortSpec>,
    pub ban_seconds: u32,
    pub ban_after: u32,
    pub edge_protection: bool,
    pub audit: crate::audit::Rotation,
    pub country_db: Option<PathBuf>,
    pub invite_port: Option<u16>,
    pub alert_webhooks: Vec<homeport_host::alert::Webhook>,
    pub alert_deny_spike: u64,
    pub alert_debounce: std::time::Duration,
}

/// Default deny spike: 200 dropped packets on one port within one read (3 s) is a flood or a
/// scan, not a friend with a stale address retrying.
pub const DEFAULT_DENY_SPIKE: u64 = 200;

impl PublishSettings {
    /// The ruleset config for a node with TUN `tun` and WireGuard port `wg_port` (None when
    /// not known: then edge protection is off, since it would block WireGuard).
    pub fn nft_config(&self, tun: &str, wg_port: Option<u16>) -> NftConfig {
        let mut keep_open = self.keep_open.clone();
        if let Some(p) = self.invite_port {
            keep_open.push(PortSpec {
                proto: L4::Tcp,
                port: p,
            });
        }
        let mut edge = self.edge_protection;
        match wg_port {
            Some(p) if p != 0 => keep_open.push(PortSpec {
                proto: L4::Udp,
                port: p,
            }),
            _ if edge => {
                tracing::warn!(
                    "edge protection is off: the WireGuard port is not fixed (pass --listen-port)"
                );
                edge = false;
            }
            _ => {}
        }
        keep_open.sort();
        keep_open.dedup();
        NftConfig {
            tun: tun.to_string(),
            edge_protection: edge,
            keep_open,
            ban_seconds: self.ban_seconds,
            ban_after: self.ban_after,
            set_size: crate::nft::DEFAULT_SET_SIZE,
            mtu: homeport_node::datapath::DEFAULT_MTU,
        }
    }
}

/// Everything `homeport-exit up` runs with.
#[derive(Debug, Clone)]
pub struct ExitConfig {
    pub up: UpConfig,
    pub publish: PublishSettings,
}

/// Merges flags, the config file and defaults (flags win). `up.config` names the file.
pub fn resolve(up: UpArgs, exit: ExitArgs) -> Result<ExitConfig> {
    let path = up
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(EXIT_DEFAULTS.config));
    let up = up.resolve(&EXIT_DEFAULTS, EXIT_KEYS)?;
    let publish = resolve_publish(exit, &up.extra, &path)?;
    Ok(ExitConfig { up, publish })
}

fn line_of(path: &Path, key: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let alt = key.replace('-', "_");
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            [key, alt.as_str()]
                .iter()
                .any(|k| l.starts_with(k) && l[k.len()..].trim_start().starts_with('='))
        })
        .map(|i| i + 1)
        .unwrap_or(0)
}

/// The publisher's part of the resolution; `file` holds the config file's exit keys.
pub fn resolve_publish(a: ExitArgs, file: &toml::Table, path: &Path) -> Result<PublishSettings> {
    let bad = |key: &str, v: &toml::Value, want: &str| -> anyhow::Error {
        anyhow::anyhow!(
            "{}:{}: bad value {v} for {key:?}: expected {want}",
            path.display(),
            line_of(path, key)
        )
    };
    let keep_open = if !a.keep_open.is_empty() {
        a.keep_open
    } else if let Some(v) = file.get("keep-open") {
        let items: Vec<String> = match v {
            toml::Value::String(s) => s.split(',').map(|x| x.trim().to_string()).collect(),
            toml::Value::Array(xs) => xs
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("keep-open", v, "a list of \"PROTO:PORT\" strings"))?,
            _ => return Err(bad("keep-open", v, "a list of \"PROTO:PORT\" strings")),
        };
        let mut out = Vec::new();
        for i in items.iter().filter(|i| !i.is_empty()) {
            out.push(i.parse::<PortSpec>().map_err(|e| {
                anyhow::anyhow!(
                    "{}:{}: keep-open: {e}",
                    path.display(),
                    line_of(path, "keep-open")
                )
            })?);
        }
        out
    } else {
        default_keep_open()
    };
    let num = |key: &str, flag: Option<u32>, default: u32| -> Result<u32> {
        if let Some(n) = flag {
            return Ok(n);
        }
        match file.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_integer()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(key, v, "a whole number >= 0")),
        }
    };
    let ban_seconds = num("ban-seconds", a.ban_seconds, DEFAULT_BAN_SECONDS)?;
    let ban_after = num("ban-after", a.ban_after, DEFAULT_BAN_AFTER)?;
    if ban_seconds == 0 {
        bail!("--ban-seconds 0: expected at least 1 second");
    }
    if ban_after == 0 {
        bail!("--ban-after 0: expected at least 1 (ban on the first probe)");
    }
    let edge_protection = match a.edge_protection {
        Some(b) => b,
        None => match file.get("edge-protection") {
            None => true,
            Some(toml::Value::Boolean(b)) => *b,
            Some(v @ toml::Value::String(s)) => {
                parse_on_off(s).map_err(|_| bad("edge-protection", v, "on or off"))?
            }
            Some(v) => return Err(bad("edge-protection", v, "on or off")),
        },
    };
    let audit_max_bytes = match (a.audit_max_bytes, file.get("audit-max-bytes")) {
        (Some(n), _) => n,
        (None, None) => crate::audit::DEFAULT_AUDIT_MAX_BYTES,
        (None, Some(toml::Value::String(s))) => parse_size(s).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: audit-max-bytes: {e}",
                path.display(),
                line_of(path, "audit-max-bytes")
            )
        })?,
        (None, Some(v)) => v
            .as_integer()
            .and_then(|n| u64::try_from(n).ok())
            .filter(|n| *n >= MIN_AUDIT_MAX_BYTES)
            .ok_or_else(|| {
                bad(
                    "audit-max-bytes",
                    v,
                    &format!("bytes (at least {MIN_AUDIT_MAX_BYTES}) or a string such as \"64M\""),
                )
            })?,
    };
    let audit_keep = num("audit-keep", a.audit_keep, crate::audit::DEFAULT_AUDIT_KEEP)?;
    if edge_protection
        && !keep_open.contains(&PortSpec {
            proto: L4::Tcp,
            port: 22,
        })
    {
        tracing::warn!("tcp:22 is not in --keep-open: SSH to this VPS will be dropped");
    }
    let country_db = match (a.country_db, file.get("country-db")) {
        (Some(p), _) => Some(p),
        (None, None) => None,
        (None, Some(toml::Value::String(s))) => Some(PathBuf::from(s)),
        (None, Some(v)) => return Err(bad("country-db", v, "a file name (string)")),
    };
    let invite_port = match (a.invite_port, file.get("invite-port")) {
        (Some(p), _) => Some(p),
        (None, None) => None,
        (None, Some(v)) => Some(
            v.as_integer()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
                .ok_or_else(|| bad("invite-port", v, "a TCP port 1-65535"))?,
        ),
    };
    if invite_port == Some(0) {
        bail!("--invite-port 0: expected a TCP port 1-65535");
    }
    Ok(PublishSettings {
        alert_webhooks: a.alert_webhook,
        alert_deny_spike: a.alert_deny_spike.unwrap_or(DEFAULT_DENY_SPIKE).max(1),
        alert_debounce: a
            .alert_debounce
            .map(std::time::Duration::from_secs)
            .unwrap_or(homeport_host::alert::DEFAULT_DEBOUNCE),
        country_db,
        invite_port,
        keep_open,
        ban_seconds,
        ban_after,
        edge_protection,
        audit: crate::audit::Rotation {
            max_bytes: audit_max_bytes,
            keep: audit_keep,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_flags_and_file() {
        let p = Path::new("/nonexistent/exit.toml");
        let d = resolve_publish(ExitArgs::default(), &toml::Table::new(), p).unwrap();
        assert_eq!(d.keep_open, default_keep_open());
        assert_eq!(
            (d.ban_seconds, d.ban_after, d.edge_protection),
            (600, 5, true)
        );

        let file: toml::Table = toml::from_str(
            "keep-open = [\"tcp:2222\"]\nban-seconds = 60\nedge-protection = \"off\"",
        )
        .unwrap();
        let f = resolve_publish(ExitArgs::default(), &file, p).unwrap();
        assert_eq!(f.keep_open, vec!["tcp:2222".parse().unwrap()]);
        assert_eq!((f.ban_seconds, f.edge_protection), (60, false));

        let flags = ExitArgs {
            keep_open: vec!["tcp:22".parse().unwrap()],
            ban_seconds: Some(2),
            ban_after: Some(1),
            edge_protection: Some(true),
            audit_max_bytes: None,
            audit_keep: None,
            country_db: None,
            invite_port: None,
            alert_webhook: Vec::new(),
            alert_deny_spike: None,
            alert_debounce: None,
        };
        let g = resolve_publish(flags, &file, p).unwrap();
        assert_eq!(g.keep_open, vec!["tcp:22".parse().unwrap()]);
        assert_eq!(
            (g.ban_seconds, g.ban_after, g.edge_protection),
            (2, 1, true)
        );
    }

    #[test]
    fn bad_values_name_file_line_and_what_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exit.toml");
        let text = "tun = \"hpx0\"\nkeep-open = [\"icmp:1\"]\n";
        std::fs::write(&p, text).unwrap();
        let file: toml::Table = toml::from_str(text).unwrap();
        let e = resolve_publish(ExitArgs::default(), &file, &p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exit.toml:2") && e.contains("PROTO:PORT"), "{e}");
        let file: toml::Table = toml::from_str("ban-seconds = -1").unwrap();
        let e = resolve_publish(ExitArgs::default(), &file, &p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ban-seconds") && e.contains("whole number"),
            "{e}"
        );
    }

    #[test]
    fn wireguard_port_is_kept_open() {
        let s = resolve_publish(ExitArgs::default(), &toml::Table::new(), Path::new("x")).unwrap();
        let c = s.nft_config("hpx0", Some(41641));
        assert!(c.edge_protection);
        assert!(c.keep_open.contains(&"udp:41641".parse().unwrap()));
        assert!(!s.nft_config("hpx0", None).edge_protection);
    }

    #[test]
    fn audit_rotation_from_flags_and_file() {
        let p = Path::new("/nonexistent/exit.toml");
        let d = resolve_publish(ExitArgs::default(), &toml::Table::new(), p).unwrap();
        assert_eq!(d.audit, crate::audit::Rotation::default());
        assert_eq!((d.audit.max_bytes, d.audit.keep), (64 << 20, 4));
        let file: toml::Table = toml::from_str("audit-max-bytes = \"1M\"\naudit-keep = 2").unwrap();
        let f = resolve_publish(ExitArgs::default(), &file, p).unwrap();
        assert_eq!((f.audit.max_bytes, f.audit.keep), (1 << 20, 2));
        let file: toml::Table = toml::from_str("audit-max-bytes = 5000").unwrap();
        assert_eq!(
            resolve_publish(ExitArgs::default(), &file, p)
                .unwrap()
                .audit
                .max_bytes,
            5000
        );
        let flags = ExitArgs {
            audit_max_bytes: Some(parse_size("64KiB").unwrap()),
            ..ExitArgs::default()
        };
        assert_eq!(
            resolve_publish(flags, &file, p).unwrap().audit.max_bytes,
            64 << 10
        );
        for ok in [
            ("4096", 4096),
            ("2k", 2048),
            ("3MB", 3 << 20),
            ("1G", 1 << 30),
        ] {
            assert_eq!(parse_size(ok.0), Ok(ok.1), "{}", ok.0);
        }
        for bad in ["", "12", "x", "-5M", "10T", "1023"] {
            assert!(parse_size(bad).unwrap_err().contains("e.g. 64M"), "{bad}");
        }
        let file: toml::Table = toml::from_str("audit-max-bytes = \"tiny\"").unwrap();
        let e = resolve_publish(ExitArgs::default(), &file, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("audit-max-bytes") && e.contains("64M"), "{e}");
    }
}
