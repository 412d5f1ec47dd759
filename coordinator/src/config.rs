//! `serve` configuration: defaults, then the TOML file, then flags (flags win).

use anyhow::{Context, bail};
use ipnet::{Ipv4Net, Ipv6Net};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/homeport/coordinator.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/homeport-coordinator";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
pub const DEFAULT_STUN_LISTEN: &str = "0.0.0.0:3478";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// None: `sqlite://<state-dir>/coordinator.db`.
    pub database_url: Option<String>,
    pub stun_listen: SocketAddr,
    /// How nodes reach this coordinator, e.g. `https://198.51.100.10:8443`.
    pub public_url: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub log_format: LogFormat,
    pub metrics_listen: Option<SocketAddr>,
    pub prefix_v4: Option<Ipv4Net>,
    pub prefix_v6: Option<Ipv6Net>,
    /// TCP port of the web dashboard on this machine's mesh address; 0 = no dashboard.
    pub dashboard_port: u16,
    /// Webhooks for alerts (node offline and back).
    pub alert_webhooks: Vec<homeport_host::alert::Webhook>,
    /// A node offline this long raises an alert.
    pub alert_offline: std::time::Duration,
    pub alert_debounce: std::time::Duration,
    /// The mesh's DNS domain: nodes and devices answer as NAME and NAME.<domain>.
    pub mesh_domain: String,
}

/// Default: a node offline for 2 minutes raises an alert (a restart or a DHCP renewal takes
/// seconds; a home without power or network stays away).
pub const DEFAULT_ALERT_OFFLINE_SECS: u64 = 120;

impl Config {
    pub fn new(state_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            state_dir: state_dir.into(),
            database_url: None,
            stun_listen: DEFAULT_STUN_LISTEN.parse().expect("valid default"),
            public_url: None,
            tls_cert: None,
            tls_key: None,
            log_format: LogFormat::Text,
            metrics_listen: None,
            prefix_v4: None,
            prefix_v6: None,
            dashboard_port: crate::dashboard::DEFAULT_PORT,
            alert_webhooks: Vec::new(),
            alert_offline: std::time::Duration::from_secs(DEFAULT_ALERT_OFFLINE_SECS),
            alert_debounce: homeport_host::alert::DEFAULT_DEBOUNCE,
            mesh_domain: homeport_proto::names::DEFAULT_MESH_DOMAIN.to_string(),
        }
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.state_dir.join("coordinator.db").display()
            )
        })
    }
}

/// Flags of `serve`; every one can also be a key of the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file whose keys mirror these flags (kebab-case or snake_case).
    /// [default: /etc/homeport/coordinator.toml, ignored if missing]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// HTTPS address for the node and admin API [default: 0.0.0.0:8443].
    /// Port 0 picks a free port; the bound address is written to <state-dir>/listen.addr.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Where the database, certificate, admin socket and other state live (created 0700)
    /// [default: /var/lib/homeport-coordinator]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// sqlite://FILE or postgres://USER@HOST/DB, the password in PGPASSWORD [default:
    /// sqlite://<state-dir>/coordinator.db];
    /// replicas given the same PostgreSQL database serve one mesh together (README "When one
    /// coordinator is not enough")
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// UDP address of the STUN server [default: 0.0.0.0:3478]; bound address in <state-dir>/stun.addr
    #[arg(long, value_name = "ADDR")]
    pub stun_listen: Option<SocketAddr>,
    /// The URL nodes use to reach this coordinator (its host goes into the certificate and the
    /// join command), e.g. https://198.51.100.10:8443; with PostgreSQL, also the name under which
    /// the other replicas advertise this one to nodes (each replica needs its own)
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// PEM certificate to serve instead of the self-signed one (needs --tls-key)
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log format [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default)
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Mesh IPv4 prefix, fixed on first start [default: 100.96.0.0/16]
    #[arg(long, value_name = "CIDR")]
    pub prefix_v4: Option<Ipv4Net>,
    /// Mesh IPv6 prefix, fixed on first start [default: a random ULA fdXX:XXXX:XXXX:XXXX::/64]
    #[arg(long, value_name = "CIDR")]
    pub prefix_v6: Option<Ipv6Net>,
    /// DNS domain of the mesh: every node answers names of nodes and devices as NAME and
    /// NAME.DOMAIN on its mesh address [default: homeport.internal]
    #[arg(long, value_name = "DOMAIN")]
    pub mesh_domain: Option<String>,
    /// Port of the web dashboard, plain HTTP on this machine's mesh address only (the exit's
    /// interface, once it is up): open http://MESH_IP:PORT/ from a device on the mesh and log in
    /// with the admin token. 0 = no dashboard [default: 8480]
    #[arg(long, value_name = "PORT")]
    pub dashboard_port: Option<u16>,
    /// Send alerts to this webhook (repeatable; flag only): generic JSON, or ntfy/Discord/Slack
    /// bodies (prefix ntfy+, discord+, slack+, or by the host). Alerts: a node offline for
    /// --alert-offline-secs, and back
    #[arg(long, value_name = "URL")]
    pub alert_webhook: Vec<homeport_host::alert::Webhook>,
    /// Seconds a node must be offline before an alert (flag only) [default: 120]
    #[arg(long, value_name = "SECS")]
    pub alert_offline_secs: Option<u64>,
    /// Seconds the same alert is not sent again (flag only) [default: 300]
    #[arg(long, value_name = "SECS")]
    pub alert_debounce: Option<u64>,
}

const KEYS: &[&str] = &[
    "listen",
    "state-dir",
    "database-url",
    "stun-listen",
    "public-url",
    "tls-cert",
    "tls-key",
    "log-format",
    "metrics-listen",
    "prefix-v4",
    "prefix-v6",
    "dashboard-port",
    "mesh-domain",
];

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Applies the keys of a config file's text onto `cfg`. Errors name the file, the line, and
/// what is accepted.
pub fn apply_file(cfg: &mut Config, path: &Path, text: &str) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    use toml::Spanned;
    let file = path.display();
    let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
        toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
            anyhow::anyhow!("{file}:{line}: invalid TOML: {}", e.message())
        })?;
    for (k, v) in table {
        let line = line_of(text, k.span().start);
        let key = k.get_ref().replace('_', "-");
        let val = match v.get_ref() {
            toml::Value::String(s) => s.clone(),
            other => bail!(
                "{file}:{line}: `{}` must be a string (in quotes), got {}",
                k.get_ref(),
                other.type_str()
            ),
        };
        let bad = |what: &str| {
            anyhow::anyhow!(
                "{file}:{line}: `{}` = {val:?} is invalid: expected {what}",
                k.get_ref()
            )
        };
        match key.as_str() {
            "listen" => {
                cfg.listen = val
                    .parse()
                    .map_err(|_| bad("an address like 0.0.0.0:8443"))?
            }
            "state-dir" => cfg.state_dir = PathBuf::from(&val),
            "database-url" => {
                if !(val.starts_with("sqlite:")
                    || val.starts_with("postgres:")
                    || val.starts_with("postgresql:"))
                {
                    return Err(bad(
                        "sqlite://FILE or postgres://USER@HOST/DB (the password in PGPASSWORD)",
                    ));
                }
                cfg.database_url = Some(val)
            }
            "stun-listen" => {
                cfg.stun_listen = val
                    .parse()
                    .map_err(|_| bad("an address like 0.0.0.0:3478"))?
            }
            "public-url" => {
                check_public_url(&val).map_err(|e| bad(&e))?;
                cfg.public_url = Some(val)
            }
            "tls-cert" => cfg.tls_cert = Some(PathBuf::from(&val)),
            "tls-key" => cfg.tls_key = Some(PathBuf::from(&val)),
            "log-format" => {
                cfg.log_format = match val.as_str() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(bad("text or json")),
                }
            }
            "metrics-listen" => {
                cfg.metrics_listen = Some(
                    val.parse()
                        .map_err(|_| bad("an address like 127.0.0.1:9090"))?,
                )
            }
            "prefix-v4" => {
                cfg.prefix_v4 = Some(
                    val.parse()
                        .map_err(|_| bad("an IPv4 CIDR like 100.96.0.0/16"))?,
                )
            }
            "mesh-domain" => {
                cfg.mesh_domain = homeport_proto::names::parse_mesh_domain(&val)
                    .map_err(|_| bad("a DNS domain like homeport.internal"))?
            }
            "prefix-v6" => {
                cfg.prefix_v6 = Some(
                    val.parse()
                        .map_err(|_| bad("an IPv6 CIDR like fd7a:115c:a1e0::/64"))?,
                )
            }
            "dashboard-port" => {
                cfg.dashboard_port = val
                    .parse()
                    .map_err(|_| bad("a port 1-65535, or 0 for no dashboard"))?
            }
            _ => bail!(
                "{file}:{line}: unknown key `{}`; accepted keys: {} (or the same in snake_case)",
                k.get_ref(),
                KEYS.join(", ")
            ),
        }
    }
    Ok(())
}

/// Returns the host of a public URL (`https://HOST[:PORT][/]`), or what is wrong with it.
pub fn check_public_url(u: &str) -> Result<String, String> {
    let uri: axum::http::Uri = u
        .parse()
        .map_err(|_| "a URL like https://198.51.100.10:8443".to_string())?;
    if uri.scheme_str() != Some("https") {
        return Err("an https:// URL like https://198.51.100.10:8443".into());
    }
    uri.host()
        .filter(|h| !h.is_empty())
        .map(|h| h.to_string())
        .ok_or_else(|| "a URL with a host, like https://198.51.100.10:8443".into())
}

/// Defaults, then the config file, then flags.
pub fn resolve(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut cfg = Config::new(DEFAULT_STATE_DIR);
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => apply_file(&mut cfg, &path, &text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read config file {}", path.display()));
        }
    }
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = &args.state_dir {
        cfg.state_dir = v.clone();
    }
    if let Some(v) = &args.database_url {
        cfg.database_url = Some(v.clone());
    }
    if let Some(v) = args.stun_listen {
        cfg.stun_listen = v;
    }
    if let Some(v) = &args.public_url {
        check_public_url(v).map_err(|e| anyhow::anyhow!("--public-url {v:?}: expected {e}"))?;
        cfg.public_url = Some(v.clone());
    }
    if args.tls_cert.is_some() {
        cfg.tls_cert = args.tls_cert.clone();
        cfg.tls_key = args.tls_key.clone();
    }
    if let Some(v) = args.log_format {
        cfg.log_format = v;
    }
    if let Some(v) = args.metrics_listen {
        cfg.metrics_listen = Some(v);
    }
    if let Some(v) = args.prefix_v4 {
        cfg.prefix_v4 = Some(v);
    }
    if let Some(v) = args.prefix_v6 {
        cfg.prefix_v6 = Some(v);
    }
    if let Some(v) = args.dashboard_port {
        cfg.dashboard_port = v;
    }
    if let Some(v) = &args.mesh_domain {
        cfg.mesh_domain = homeport_proto::names::parse_mesh_domain(v)
            .map_err(|e| anyhow::anyhow!("--mesh-domain: {e}"))?;
    }
    cfg.alert_webhooks = args.alert_webhook.clone();
    if let Some(v) = args.alert_offline_secs {
        cfg.alert_offline = std::time::Duration::from_secs(v.max(1));
    }
    if let Some(v) = args.alert_debounce {
        cfg.alert_debounce = std::time::Duration::from_secs(v);
    }
    if cfg.tls_cert.is_some() != cfg.tls_key.is_some() {
        bail!("tls-cert and tls-key go together: give both or neither (neither = self-signed)");
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_kebab_and_snake_and_flags_win() {
        let mut c = Config::new("/x");
        apply_file(
            &mut c,
            Path::new("c.toml"),
            "listen = \"127.0.0.1:1\"\nstate_dir = \"/s\"\nlog-format = \"json\"\n",
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(c.state_dir, PathBuf::from("/s"));
        assert_eq!(c.log_format, LogFormat::Json);

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:1\"\nstun-listen = \"127.0.0.1:2\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(f),
            listen: Some("127.0.0.1:9".parse().unwrap()),
            ..Default::default()
        };
        let c = resolve(&args).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9".parse().unwrap());
        assert_eq!(c.stun_listen, "127.0.0.1:2".parse().unwrap());
    }

    #[test]
    fn errors_name_file_line_and_accepted_values() {
        let mut c = Config::new("/x");
        let e = apply_file(
            &mut c,
            Path::new("c.toml"),
            "listen = \"0.0.0.0:1\"\n\nlsten = \"x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("c.toml:3") && e.contains("lsten") && e.contains("state-dir"),
            "{e}"
        );
        let e = apply_file(&mut c, Path::new("c.toml"), "\nlog_format = \"xml\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml:2") && e.contains("text or json"), "{e}");
        let e = apply_file(&mut c, Path::new("c.toml"), "listen = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml:1") && e.contains("string"), "{e}");
        let missing = ServeArgs {
            config: Some("/nonexistent/c.toml".into()),
            ..Default::default()
        };
        assert!(
            resolve(&missing)
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/c.toml")
        );
        assert!(check_public_url("http://x").is_err());
        assert_eq!(
            check_public_url("https://198.51.100.10:8443").unwrap(),
            "198.51.100.10"
        );
    }
}
