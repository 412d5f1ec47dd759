//! `homeport up` settings: flags, the TOML config file whose keys mirror the flags, and defaults.
//! Flags win over the file; the file wins over defaults.

use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Flags of `homeport up` (and of `homeport-exit up`, which flattens them).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct UpArgs {
    /// Coordinator URL, e.g. https://203.0.113.7:8443
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Pin of the coordinator's TLS key, as printed by `homeport-coordinator pin` (sha256/...)
    #[arg(long)]
    pub pin: Option<String>,
    /// File holding the pre-auth key for registration (first line; not needed once registered).
    /// The key may instead come from the HOMEPORT_AUTHKEY environment variable; it is never
    /// taken on the command line, where every local user could read it
    #[arg(long, value_name = "PATH")]
    pub authkey_file: Option<PathBuf>,
    /// Name of this node in the mesh (default: the machine's hostname)
    #[arg(long)]
    pub hostname: Option<String>,
    /// Where keys and state live
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// TUN interface name
    #[arg(long)]
    pub tun: Option<String>,
    /// UDP port of the WireGuard socket (0 = any free port, kept across restarts)
    #[arg(long)]
    pub listen_port: Option<u16>,
    /// TOML config file whose keys mirror these flags
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// text or json
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default)
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub routing: crate::routes_sync::RouteArgs,
}

/// Defaults that differ between the home node and the exit.
#[derive(Debug, Clone)]
pub struct RoleDefaults {
    pub config: &'static str,
    pub state_dir: &'static str,
    pub tun: &'static str,
    pub listen_port: u16,
}

pub const NODE_DEFAULTS: RoleDefaults = RoleDefaults {
    config: "/etc/homeport/node.toml",
    state_dir: "/var/lib/homeport",
    tun: "hp0",
    listen_port: 0,
};

pub const EXIT_DEFAULTS: RoleDefaults = RoleDefaults {
    config: "/etc/homeport/exit.toml",
    state_dir: "/var/lib/homeport-exit",
    tun: "hpx0",
    // A fixed port on the VPS so its firewall and edge protection can name it.
    listen_port: 41641,
};

/// Resolved settings of a running daemon.
#[derive(Debug, Clone)]
pub struct UpConfig {
    pub coordinator: Option<String>,
    pub pin: Option<String>,
    /// Where the auth key comes from; read only when the node has to register.
    pub authkey: Option<AuthKeySource>,
    pub hostname: String,
    pub state_dir: PathBuf,
    pub tun: String,
    /// None = reuse the stored port, else pick one.
    pub listen_port: Option<u16>,
    pub log_format: LogFormat,
    pub metrics_listen: Option<SocketAddr>,
    /// Keys of the config file that the caller (the exit) handles itself.
    pub extra: toml::Table,
    /// Subnet routes and the exit node (`routes_sync`).
    pub routing: crate::routes_sync::RouteConfig,
}

/// The environment variable `homeport up` reads an auth key from.
pub const AUTHKEY_ENV: &str = "HOMEPORT_AUTHKEY";

/// Where the auth key of a registration comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthKeySource {
    /// `--authkey-file` or `authkey-file` in the config file.
    File(PathBuf),
    /// HOMEPORT_AUTHKEY, or `authkey` in the config file (itself a private file).
    Value(String),
}

impl std::fmt::Debug for AuthKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthKeySource::File(p) => write!(f, "File({})", p.display()),
            AuthKeySource::Value(_) => f.write_str("Value(<auth key>)"),
        }
    }
}

impl AuthKeySource {
    /// The key: the first line of the file, or the value.
    pub fn read(&self) -> Result<String> {
        let k = match self {
            AuthKeySource::Value(v) => v.trim().to_string(),
            AuthKeySource::File(p) => std::fs::read_to_string(p)
                .with_context(|| format!("--authkey-file {}: cannot read it", p.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        };
        if k.is_empty() {
            match self {
                AuthKeySource::File(p) => bail!(
                    "--authkey-file {}: empty; expected an auth key (hpk_...) from `homeport-coordinator authkey create` on its first line",
                    p.display()
                ),
                AuthKeySource::Value(_) => bail!(
                    "the auth key is empty; expected a key (hpk_...) from `homeport-coordinator authkey create`"
                ),
            }
        }
        Ok(k)
    }
}

/// Keys the node itself understands in its config file.
const NODE_KEYS: &[&str] = &[
    "coordinator",
    "pin",
    "authkey",
    "authkey-file",
    "hostname",
    "state-dir",
    "tun",
    "listen-port",
    "log-format",
    "metrics-listen",
];

impl UpArgs {
    /// Merges flags, config file and defaults. `extra_keys` are keys the caller accepts in the
    /// config file beyond the node's own (returned in `UpConfig::extra`).
    pub fn resolve(self, d: &RoleDefaults, extra_keys: &[&str]) -> Result<UpConfig> {
        let (path, explicit) = match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(d.config), false),
        };
        let file = load_file(&path, explicit, extra_keys)?;
        let get_str = |k: &str| file.get(k).and_then(|v| v.as_str().map(str::to_string));
        let hostname = match self.hostname.or_else(|| get_str("hostname")) {
            Some(h) => h,
            None => system_hostname(),
        };
        let listen_port = match self.listen_port {
            Some(p) => Some(p),
            None => match file.get("listen-port") {
                Some(v) => Some(v.as_integer().unwrap_or(0) as u16),
                None if d.listen_port != 0 => Some(d.listen_port),
                None => None,
            },
        };
        let log_format = match self.log_format {
            Some(f) => f,
            None => match get_str("log-format").as_deref() {
                Some("json") => LogFormat::Json,
                _ => LogFormat::Text,
            },
        };
        let metrics_listen = match self.metrics_listen {
            Some(a) => Some(a),
            None => match get_str("metrics-listen") {
                Some(s) => Some(s.parse().with_context(|| {
                    format!(
                        "{}: metrics-listen {s:?} is not an address like 127.0.0.1:9101",
                        path.display()
                    )
                })?),
                None => None,
            },
        };
        let routing = self.routing.resolve(&file, &path)?;
        let mut extra = toml::Table::new();
        for k in extra_keys {
            if let Some(v) = file.get(*k) {
                extra.insert(k.to_string(), v.clone());
            }
        }
        Ok(UpConfig {
            coordinator: self.coordinator.or_else(|| get_str("coordinator")),
            pin: self.pin.or_else(|| get_str("pin")),
            authkey: self
                .authkey_file
                .map(AuthKeySource::File)
                .or_else(|| {
                    std::env::var(AUTHKEY_ENV)
                        .ok()
                        .filter(|v| !v.trim().is_empty())
                        .map(AuthKeySource::Value)
                })
                .or_else(|| get_str("authkey-file").map(|p| AuthKeySource::File(p.into())))
                .or_else(|| get_str("authkey").map(AuthKeySource::Value)),
            hostname,
            state_dir: self
                .state_dir
                .or_else(|| get_str("state-dir").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(d.state_dir)),
            tun: self
                .tun
                .or_else(|| get_str("tun"))
                .unwrap_or_else(|| d.tun.to_string()),
            listen_port,
            log_format,
            metrics_listen,
            extra,
            routing,
        })
    }
}

/// Reads and checks a config file. Keys are normalised to kebab-case. A missing default file is
/// fine; a missing explicit one is an error. Errors name the file, the line and what is accepted.
pub fn load_file(path: &Path, explicit: bool, extra_keys: &[&str]) -> Result<toml::Table> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(toml::Table::new());
        }
        Err(e) => return Err(e).with_context(|| format!("reading config file {}", path.display())),
    };
    parse_config(&text, path, extra_keys)
}

pub fn parse_config(text: &str, path: &Path, extra_keys: &[&str]) -> Result<toml::Table> {
    let raw: toml::Table = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start].lines().count().max(1))
            .unwrap_or(0);
        anyhow::anyhow!("{}:{line}: {}", path.display(), e.message())
    })?;
    let line_of = |key: &str| {
        text.lines()
            .position(|l| {
                let l = l.trim_start();
                l.starts_with(key) && l[key.len()..].trim_start().starts_with('=')
            })
            .map(|i| i + 1)
            .unwrap_or(0)
    };
    let mut out = toml::Table::new();
    for (k, v) in raw {
        let norm = k.replace('_', "-");
        let line = line_of(&k);
        if !NODE_KEYS.contains(&norm.as_str())
            && !crate::routes_sync::ROUTE_KEYS.contains(&norm.as_str())
            && !extra_keys.contains(&norm.as_str())
        {
            let mut accepted: Vec<&str> = NODE_KEYS.to_vec();
            accepted.extend_from_slice(crate::routes_sync::ROUTE_KEYS);
            accepted.extend_from_slice(extra_keys);
            bail!(
                "{}:{line}: unknown key {k:?}; accepted keys: {}",
                path.display(),
                accepted.join(", ")
            );
        }
        let ok = match norm.as_str() {
            "listen-port" => v.as_integer().is_some_and(|p| (0..=65535).contains(&p)),
            "coordinator" | "pin" | "authkey" | "authkey-file" | "hostname" | "state-dir"
            | "tun" | "metrics-listen" => v.is_str(),
            "log-format" => matches!(v.as_str(), Some("text") | Some("json")),
            _ => true,
        };
        if !ok {
            let want = match norm.as_str() {
                "listen-port" => "an integer 0-65535",
                "log-format" => "\"text\" or \"json\"",
                _ => "a string",
            };
            bail!(
                "{}:{line}: bad value {v} for {k:?}: expected {want}",
                path.display()
            );
        }
        out.insert(norm, v);
    }
    Ok(out)
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_key_names_line_and_accepted() {
        let e = parse_config(
            "tun = \"x\"\nlisten_port = 7\nbogus = 1\n",
            Path::new("n.toml"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("n.toml:3"), "{e}");
        assert!(e.contains("accepted keys"), "{e}");
    }

    #[test]
    fn bad_value_is_reported() {
        let e = parse_config("listen-port = 70000\n", Path::new("n.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("n.toml:1") && e.contains("0-65535"), "{e}");
    }

    #[test]
    fn flags_win_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.toml");
        std::fs::write(
            &p,
            "tun = \"fromfile\"\nhostname = \"h1\"\nlisten_port = 5000\n",
        )
        .unwrap();
        let args = UpArgs {
            config: Some(p),
            tun: Some("flag0".into()),
            ..Default::default()
        };
        let c = args.resolve(&NODE_DEFAULTS, &[]).unwrap();
        assert_eq!(c.tun, "flag0");
        assert_eq!(c.hostname, "h1");
        assert_eq!(c.listen_port, Some(5000));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/homeport"));
    }

    #[test]
    fn authkey_comes_from_a_file_and_never_shows_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("authkey");
        std::fs::write(&p, "hpk_secret\n").unwrap();
        let args = UpArgs {
            authkey_file: Some(p.clone()),
            config: Some(dir.path().join("none.toml")),
            ..Default::default()
        };
        std::fs::write(dir.path().join("none.toml"), "").unwrap();
        let c = args.resolve(&NODE_DEFAULTS, &[]).unwrap();
        assert_eq!(c.authkey, Some(AuthKeySource::File(p.clone())));
        assert_eq!(c.authkey.as_ref().unwrap().read().unwrap(), "hpk_secret");
        let shown = format!("{:?}", AuthKeySource::Value("hpk_secret".into()));
        assert!(!shown.contains("hpk_secret"), "{shown}");
        std::fs::write(&p, "\n").unwrap();
        let e = AuthKeySource::File(p).read().unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("hpk_"), "{e}");
        let e = AuthKeySource::File(dir.path().join("missing"))
            .read()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--authkey-file"), "{e}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let args = UpArgs {
            config: Some("/nonexistent/homeport.toml".into()),
            ..Default::default()
        };
        assert!(args.resolve(&NODE_DEFAULTS, &[]).is_err());
    }
}
