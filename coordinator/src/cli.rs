//! Command line: `serve`, `pin`, and the admin commands (over `<state-dir>/admin.sock`, or a
//! remote coordinator with `--url --token-file --pin`).

use crate::client::AdminClient;
use crate::config::{DEFAULT_STATE_DIR, ServeArgs};
use anyhow::{Context, bail};
use axum::http::Method;
use clap::{Args, Parser, Subcommand};
use homeport_proto::api::{self, AuthKeyCreated, AuthKeyInfo, NodeInfo};
use homeport_proto::exit::{ExitInfo, PATH_ADMIN_EXITS};
use homeport_proto::policy::Policy;
use homeport_proto::publish::{PublishRequest, PublishRule};
use serde_json::json;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "homeport-coordinator",
    version,
    about = "homeport coordinator: node registration, map streams, publish rules, policy, STUN",
    long_about = "homeport coordinator: node registration, map streams, publish rules, policy, STUN.\n\n\
        Start it with `homeport-coordinator serve`; on first start it creates a self-signed certificate, \
        writes the admin token to <state-dir>/admin.token (shown once when started on a terminal) and logs the \
        `homeport up` line for nodes. The admin commands talk to the \
        running coordinator over <state-dir>/admin.sock (root or the service user), or to a remote one \
        with --url https://HOST:PORT --token-file FILE --pin PIN (or the token in HOMEPORT_ADMIN_TOKEN; \
        on the VPS itself <state-dir>/admin.token is read). The token is never taken on the command line, \
        where every local user could read it."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the coordinator: HTTPS API, STUN server, admin socket
    Serve(ServeArgs),
    /// Print the TLS pin nodes use to trust this coordinator (one line)
    Pin {
        /// State directory of the coordinator
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Create, list and revoke auth keys (what nodes register with)
    Authkey {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: AuthkeyCmd,
    },
    /// List nodes: name, mesh addresses, online, last seen, tags
    Nodes {
        #[command(flatten)]
        conn: ConnArgs,
        /// Print JSON (a list of NodeInfo) instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Live status, as the web dashboard shows it: each node's version and path to each peer
    /// (direct ip:port or relay and why), the exits' rules, the published connections open now
    Status {
        #[command(flatten)]
        conn: ConnArgs,
        /// Print JSON (the Overview of GET /api/v1/admin/overview) instead of text
        #[arg(long)]
        json: bool,
    },
    /// Act on one node
    Node {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Plain-WireGuard devices (phones, TVs, routers with any WireGuard app): add one and get its
    /// config as text and a QR code, list, remove
    Device {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: crate::devices::DeviceCmd,
    },
    /// Publish ports of mesh nodes on an exit node
    Publish {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: PublishCmd,
    },
    /// Invite links: a friend opens the link in any browser and may then connect to the port
    /// from that address for the given days
    Invite {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: InviteCmd,
    },
    /// List the nodes that run an exit (homeport-exit): public addresses, country database
    Exits {
        #[command(flatten)]
        conn: ConnArgs,
        /// Print JSON (a list of ExitInfo) instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show or replace the access policy
    Policy {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Subnet routes and exit nodes: list what nodes advertise, approve or unapprove it
    Routes {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: crate::routes::RoutesCmd,
    },
}

/// How admin commands reach the coordinator.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection (local admin socket, or a remote coordinator)")]
pub struct ConnArgs {
    /// State directory of the local coordinator (its admin.sock is used)
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR, global = true)]
    pub state_dir: PathBuf,
    /// Remote coordinator, e.g. https://198.51.100.10:8443 (instead of the local socket); the
    /// admin token comes from --token-file, else HOMEPORT_ADMIN_TOKEN, else <state-dir>/admin.token
    #[arg(long, value_name = "URL", global = true)]
    pub url: Option<String>,
    /// File holding the admin token for --url (first line; the coordinator writes it to
    /// <state-dir>/admin.token on first start)
    #[arg(long, value_name = "PATH", global = true)]
    pub token_file: Option<PathBuf>,
    /// Pin of the remote coordinator's certificate (from `homeport-coordinator pin`); without
    /// it the certificate must be valid for the system's CAs
    #[arg(long, value_name = "PIN", global = true)]
    pub pin: Option<String>,
}

/// The environment variable remote admin reads the admin token from.
pub const ADMIN_TOKEN_ENV: &str = "HOMEPORT_ADMIN_TOKEN";

/// Reads a token from the first line of `p`.
pub fn read_token_file(p: &std::path::Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read the admin token file {}", p.display()))?;
    let t = s.lines().next().unwrap_or("").trim().to_string();
    if t.is_empty() {
        bail!(
            "{}: empty; expected the admin token (hpa_...) on its first line",
            p.display()
        );
    }
    Ok(t)
}

impl ConnArgs {
    /// The admin token for --url: --token-file, else $HOMEPORT_ADMIN_TOKEN, else
    /// `<state-dir>/admin.token` (on the VPS itself).
    pub fn token(&self) -> anyhow::Result<String> {
        if let Some(p) = &self.token_file {
            return read_token_file(p);
        }
        if let Ok(t) = std::env::var(ADMIN_TOKEN_ENV)
            && !t.trim().is_empty()
        {
            return Ok(t.trim().to_string());
        }
        let p = self.state_dir.join(crate::server::ADMIN_TOKEN_FILE);
        if p.exists() {
            return read_token_file(&p);
        }
        bail!(
            "--url needs the admin token: pass --token-file PATH or set {ADMIN_TOKEN_ENV} \
             (the coordinator wrote it to <state-dir>/{} on its first start)",
            crate::server::ADMIN_TOKEN_FILE
        )
    }

    pub fn client(&self) -> anyhow::Result<AdminClient> {
        match &self.url {
            Some(url) => AdminClient::remote(url, &self.token()?, self.pin.as_deref()),
            None => Ok(AdminClient::local(self.state_dir.clone())),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AuthkeyCmd {
    /// Create a key; prints only the key
    Create {
        /// Allow any number of registrations (default: single use)
        #[arg(long)]
        reusable: bool,
        /// Lifetime, e.g. 30m, 1h, 7d (s, m, h, d, w); default: never expires
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires: Option<u64>,
        /// Tag given to nodes registering with this key (repeatable), used by policy as tag:NAME
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Allow exactly up to N registrations (with --reusable; default: no limit)
        #[arg(long, value_name = "N", requires = "reusable")]
        max_uses: Option<u64>,
    },
    /// List keys
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id
    Revoke {
        /// Key id (from `authkey list`)
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Remove a node: its credential stops working at once, peers drop it, its publish rules go
    Remove {
        /// Node name (from `nodes`)
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PublishCmd {
    /// Publish EXIT's public port to NODE:PORT over the mesh; prints the rule as `publish list`
    /// shows it and the address viewers connect to. EXIT must run homeport-exit (`exits`)
    Add {
        /// Exit node (the one with the public IP)
        #[arg(long, value_name = "NODE")]
        exit: String,
        /// Public port on the exit (1-65535)
        #[arg(long, value_name = "N")]
        port: u16,
        /// tcp or udp
        #[arg(long, value_name = "PROTO", default_value = "tcp")]
        proto: String,
        /// Target, e.g. home:32400
        #[arg(long, value_name = "NODE:PORT")]
        to: String,
        /// Only these sources may connect (repeatable; CIDR or address); default everyone
        #[arg(long, value_name = "CIDR")]
        allow: Vec<String>,
        /// New connections per source per minute
        #[arg(long, value_name = "N")]
        rate_per_minute: Option<u32>,
        /// Concurrent connections per source
        #[arg(long, value_name = "N")]
        max_conns: Option<u32>,
        /// Only sources in these countries may connect (two-letter codes, comma-separated or
        /// repeated, e.g. DE,AT); a source the exit's country database does not know is dropped.
        /// A source in --allow is let in whatever its country. Needs --country-db on the exit
        #[arg(long, value_name = "CC", value_delimiter = ',')]
        country: Vec<String>,
        /// Sources in these countries are dropped (e.g. CN,RU), unless in --allow. Needs
        /// --country-db on the exit
        #[arg(long, value_name = "CC", value_delimiter = ',')]
        deny_country: Vec<String>,
    },
    /// List rules, with the address viewers connect to
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove a rule by id; prints the rule it removed
    Remove {
        /// Rule id (from `publish list`)
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum InviteCmd {
    /// Create an invite to a published port (one restricted by --allow or --country); prints the
    /// link (http://EXIT:INVITE_PORT/i/TOKEN, shown only now)
    Create {
        /// The published port
        #[arg(long, value_name = "N")]
        port: u16,
        /// tcp or udp
        #[arg(long, value_name = "PROTO", default_value = "tcp")]
        proto: String,
        /// The exit (needed only when several exits publish the port)
        #[arg(long, value_name = "NODE")]
        exit: Option<String>,
        /// Who it is for (the audit log and the report show this name)
        #[arg(long, value_name = "NAME")]
        name: String,
        /// How many days an address it lets in may connect
        #[arg(long, value_name = "N")]
        days: u32,
        /// How many addresses the link may let in (a new one each time the friend's IP changes)
        #[arg(long, value_name = "N", default_value_t = 1)]
        uses: u32,
    },
    /// List invites: name, port, until, addresses let in
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Revoke an invite: the addresses it let in lose access at once
    Revoke {
        /// Invite id (from `invite list`)
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Print the policy as JSON ({"rules":[]} = no policy: every node may reach every node)
    Get,
    /// Replace the policy from a TOML or JSON file (a file without rules = allow all)
    Set {
        /// Policy file (.toml or .json)
        file: PathBuf,
    },
}

/// Parses "30m", "1h", "7d", "2w", "90s" into seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid duration {s:?}: expected a number and a unit s, m, h, d or w, e.g. 30m, 1h, 7d"
        )
    };
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(bad()),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!("invalid duration {s:?}: must be more than 0")),
        Some(v) => Ok(v),
        None => Err(bad()),
    }
}

fn ago(now: i64, t: Option<i64>, online: bool) -> String {
    if online {
        return "now".into();
    }
    let Some(t) = t else { return "never".into() };
    let d = (now - t).max(0);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

pub(crate) fn table(head: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(head.iter().map(|s| s.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

/// Who may connect to a rule's port, in words: `everyone`, `192.0.2.0/24`, `DE,AT`,
/// `192.0.2.7/32 or from DE`, `everyone but CN,RU`.
fn who(r: &PublishRule) -> String {
    let g = &r.guards;
    let nets = g
        .allow
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut s = match (nets.is_empty(), g.countries.is_empty()) {
        (true, true) => "everyone".to_string(),
        (false, true) => nets,
        (true, false) => format!("from {}", g.countries.join(",")),
        (false, false) => format!("{nets} or from {}", g.countries.join(",")),
    };
    if !g.deny_countries.is_empty() {
        s.push_str(&format!(" but not from {}", g.deny_countries.join(",")));
    }
    s
}

/// `ip:port` of every public address of the rule's exit.
fn viewer_addrs_of(r: &PublishRule, exits: &[ExitInfo]) -> Vec<String> {
    exits
        .iter()
        .find(|e| e.node_id == r.exit)
        .map(|e| homeport_proto::exit::viewer_addrs(&e.public_addrs, r.port))
        .unwrap_or_default()
}

/// The line under `publish add`: where viewers connect.
fn viewers_line(r: &PublishRule, exits: &[ExitInfo]) -> String {
    let a = viewer_addrs_of(r, exits);
    if a.is_empty() {
        format!(
            "viewers connect to {}'s public address, port {} ({}; the exit has not reported a public address: see `homeport-coordinator exits`)",
            r.exit_name,
            r.port,
            r.proto.as_str()
        )
    } else {
        format!(
            "viewers connect to {} ({})",
            a.join(" or "),
            r.proto.as_str()
        )
    }
}

/// Publish rules as `publish list` shows them.
fn publish_table(v: &[PublishRule], exits: &[ExitInfo]) -> String {
    let rows = v
        .iter()
        .map(|r| {
            let mut limits = Vec::new();
            if let Some(n) = r.guards.rate_per_minute {
                limits.push(format!("{n}/min"));
            }
            if let Some(n) = r.guards.max_conns {
                limits.push(format!("{n} conns"));
            }
            let public = viewer_addrs_of(r, exits);
            vec![
                r.id.to_string(),
                r.exit_name.to_string(),
                format!("{}/{}", r.port, r.proto.as_str()),
                format!("{}:{}", r.target_name, r.target_port),
                who(r),
                limits.join(", "),
                if public.is_empty() {
                    "-".into()
                } else {
                    public.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "EXIT",
            "PORT",
            "TARGET",
            "ALLOW",
            "LIMITS",
            "VIEWERS USE",
        ],
        rows,
    )
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Reads a policy file: JSON for `.json`, TOML for `.toml`, otherwise whichever parses.
pub fn read_policy_file(path: &std::path::Path) -> anyhow::Result<Policy> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let p: Policy = match ext {
        "json" => {
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        "toml" => toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        _ => match serde_json::from_str(&text) {
            Ok(p) => p,
            Err(je) => toml::from_str(&text).map_err(|te| {
                anyhow::anyhow!("{}: neither JSON ({je}) nor TOML ({te})", path.display())
            })?,
        },
    };
    p.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(p)
}

/// Runs one admin command (everything but `serve`).
pub async fn admin(cmd: Cmd) -> anyhow::Result<()> {
    let now = crate::store::now();
    match cmd {
        Cmd::Serve(_) => bail!("serve is not an admin command"),
        Cmd::Pin { state_dir } => {
            println!("{}", crate::tls::read_pin(&state_dir)?);
        }
        Cmd::Authkey { conn, cmd } => {
            let c = conn.client()?;
            match cmd {
                AuthkeyCmd::Create {
                    reusable,
                    expires,
                    tags,
                    max_uses,
                } => {
                    let r: AuthKeyCreated = c
                        .json(
                            Method::POST,
                            api::PATH_ADMIN_AUTHKEYS,
                            Some(&json!({"reusable": reusable, "expires_secs": expires, "tags": tags, "max_uses": max_uses})),
                        )
                        .await?;
                    println!("{}", r.key);
                }
                AuthkeyCmd::List { json } => {
                    let v: Vec<AuthKeyInfo> =
                        c.json(Method::GET, api::PATH_ADMIN_AUTHKEYS, None).await?;
                    if json {
                        return print_json(&v);
                    }
                    let rows = v
                        .iter()
                        .map(|k| {
                            let state = if k.revoked {
                                "revoked"
                            } else if k.expires_at.is_some_and(|e| e <= now) {
                                "expired"
                            } else if k.used && !k.reusable {
                                "used"
                            } else if k.max_uses.is_some_and(|m| k.uses >= m) {
                                "used up"
                            } else {
                                "valid"
                            };
                            vec![
                                k.id.to_string(),
                                format!("{}…", k.prefix),
                                match (k.reusable, k.max_uses) {
                                    (false, _) => "single-use".into(),
                                    (true, None) => "reusable".into(),
                                    (true, Some(m)) => format!("reusable {}/{m}", k.uses),
                                },
                                state.into(),
                                match k.expires_at {
                                    Some(e) if e > now => format!(
                                        "in {}",
                                        ago(e, Some(now), false).trim_end_matches(" ago")
                                    ),
                                    Some(_) => "expired".into(),
                                    None => "never".into(),
                                },
                                k.tags.join(","),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(&["ID", "KEY", "KIND", "STATE", "EXPIRES", "TAGS"], rows)
                    );
                }
                AuthkeyCmd::Revoke { id } => {
                    c.call(
                        Method::DELETE,
                        &format!("{}/{id}", api::PATH_ADMIN_AUTHKEYS),
                        None,
                    )
                    .await?;
                    eprintln!("auth key {id} revoked");
                }
            }
        }
        Cmd::Nodes { conn, json } => {
            let v: Vec<NodeInfo> = conn
                .client()?
                .json(Method::GET, api::PATH_ADMIN_NODES, None)
                .await?;
            if json {
                return print_json(&v);
            }
            let rows = v
                .iter()
                .map(|n| {
                    vec![
                        n.name.to_string(),
                        n.addrs.ipv4.to_string(),
                        n.addrs.ipv6.to_string(),
                        if n.online { "yes" } else { "no" }.into(),
                        ago(now, n.last_seen, n.online),
                        n.tags.join(","),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["NAME", "IPV4", "IPV6", "ONLINE", "LAST SEEN", "TAGS"],
                    rows
                )
            );
        }
        Cmd::Status { conn, json } => {
            let o: homeport_proto::status::Overview = conn
                .client()?
                .json(
                    Method::GET,
                    homeport_proto::status::PATH_ADMIN_OVERVIEW,
                    None,
                )
                .await?;
            if json {
                return print_json(&o);
            }
            print!("{}", crate::dashboard::live::render_text(&o));
        }
        Cmd::Node { conn, cmd } => match cmd {
            NodeCmd::Remove { name } => {
                conn.client()?
                    .call(
                        Method::DELETE,
                        &format!("{}/{name}", api::PATH_ADMIN_NODES),
                        None,
                    )
                    .await?;
                eprintln!("node {name} removed");
            }
        },
        Cmd::Device { conn, cmd } => crate::devices::run_cli(conn.client()?, cmd).await?,
        Cmd::Invite { conn, cmd } => {
            use homeport_proto::invite::{
                InviteCreate, InviteCreated, InviteInfo, PATH_ADMIN_INVITES,
            };
            let c = conn.client()?;
            let day = |t: i64| {
                time::OffsetDateTime::from_unix_timestamp(t)
                    .ok()
                    .map(|t| {
                        format!(
                            "{}-{:02}-{:02} {:02}:{:02} UTC",
                            t.year(),
                            t.month() as u8,
                            t.day(),
                            t.hour(),
                            t.minute()
                        )
                    })
                    .unwrap_or_else(|| t.to_string())
            };
            match cmd {
                InviteCmd::Create {
                    port,
                    proto,
                    exit,
                    name,
                    days,
                    uses,
                } => {
                    let req = InviteCreate {
                        port,
                        proto: Some(proto),
                        exit,
                        name,
                        days,
                        uses: Some(uses),
                    };
                    let r: InviteCreated = c
                        .json(
                            Method::POST,
                            PATH_ADMIN_INVITES,
                            Some(&serde_json::to_value(&req)?),
                        )
                        .await?;
                    println!("{}", r.link);
                    eprintln!(
                        "invite {}: send this link; opened in any browser it lets that address connect until {} ({} address(es) at most)",
                        r.id,
                        day(r.until),
                        uses
                    );
                }
                InviteCmd::List { json } => {
                    let v: Vec<InviteInfo> = c.json(Method::GET, PATH_ADMIN_INVITES, None).await?;
                    if json {
                        return print_json(&v);
                    }
                    let rows = v
                        .iter()
                        .map(|i| {
                            vec![
                                i.id.to_string(),
                                i.name.clone(),
                                format!("{}:{}/{}", i.exit, i.port, i.proto),
                                day(i.until),
                                format!("{}/{}", i.addrs.len(), i.uses),
                                i.addrs
                                    .iter()
                                    .map(|a| a.addr.to_string())
                                    .collect::<Vec<_>>()
                                    .join(","),
                                if i.revoked {
                                    "revoked"
                                } else if i.until <= now {
                                    "expired"
                                } else {
                                    "active"
                                }
                                .into(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(
                            &["ID", "NAME", "PORT", "UNTIL", "USED", "ADDRESSES", "STATE"],
                            rows
                        )
                    );
                }
                InviteCmd::Revoke { id } => {
                    let i: InviteInfo = c
                        .json(Method::DELETE, &format!("{PATH_ADMIN_INVITES}/{id}"), None)
                        .await?;
                    println!(
                        "invite {id} ({}) revoked; these addresses lose access: {}",
                        i.name,
                        if i.addrs.is_empty() {
                            "none".to_string()
                        } else {
                            i.addrs
                                .iter()
                                .map(|a| a.addr.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    );
                }
            }
        }
        Cmd::Exits { conn, json } => {
            let v: Vec<ExitInfo> = conn
                .client()?
                .json(Method::GET, PATH_ADMIN_EXITS, None)
                .await?;
            if json {
                return print_json(&v);
            }
            let rows = v
                .iter()
                .map(|e| {
                    vec![
                        e.name.to_string(),
                        if e.online { "yes" } else { "no" }.into(),
                        e.public_addrs
                            .iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        e.country_db.clone().unwrap_or_else(|| "none".into()),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["NAME", "ONLINE", "PUBLIC ADDRESSES", "COUNTRY DB"], rows)
            );
        }
        Cmd::Routes { conn, cmd } => crate::routes::run_cli(&conn.client()?, cmd).await?,
        Cmd::Publish { conn, cmd } => {
            let c = conn.client()?;
            let exits = async || -> anyhow::Result<Vec<ExitInfo>> {
                c.json(Method::GET, PATH_ADMIN_EXITS, None).await
            };
            match cmd {
                PublishCmd::Add {
                    exit,
                    port,
                    proto,
                    to,
                    allow,
                    rate_per_minute,
                    max_conns,
                    country,
                    deny_country,
                } => {
                    let req = PublishRequest {
                        exit,
                        port,
                        proto,
                        to,
                        allow,
                        rate_per_minute,
                        max_conns,
                        country: country.iter().map(|c| c.trim().to_string()).collect(),
                        deny_country: deny_country.iter().map(|c| c.trim().to_string()).collect(),
                    };
                    let r: PublishRule = c
                        .json(
                            Method::POST,
                            api::PATH_ADMIN_PUBLISH,
                            Some(&serde_json::to_value(&req)?),
                        )
                        .await?;
                    let ex = exits().await.unwrap_or_default();
                    print!("{}", publish_table(std::slice::from_ref(&r), &ex));
                    println!("{}", viewers_line(&r, &ex));
                }
                PublishCmd::List { json } => {
                    let v: Vec<PublishRule> =
                        c.json(Method::GET, api::PATH_ADMIN_PUBLISH, None).await?;
                    if json {
                        return print_json(&v);
                    }
                    print!("{}", publish_table(&v, &exits().await?));
                }
                PublishCmd::Remove { id } => {
                    let v: Vec<PublishRule> =
                        c.json(Method::GET, api::PATH_ADMIN_PUBLISH, None).await?;
                    c.call(
                        Method::DELETE,
                        &format!("{}/{id}", api::PATH_ADMIN_PUBLISH),
                        None,
                    )
                    .await?;
                    if let Some(r) = v.iter().find(|r| r.id == id) {
                        let ex = exits().await.unwrap_or_default();
                        print!("{}", publish_table(std::slice::from_ref(r), &ex));
                        println!(
                            "removed: viewers can no longer connect to {}",
                            viewer_addrs_of(r, &ex).join(" or ")
                        );
                    }
                    eprintln!("publish rule {id} removed");
                }
            }
        }
        Cmd::Policy { conn, cmd } => {
            let c = conn.client()?;
            match cmd {
                PolicyCmd::Get => {
                    let p: Policy = c.json(Method::GET, api::PATH_ADMIN_POLICY, None).await?;
                    print_json(&p)?;
                }
                PolicyCmd::Set { file } => {
                    let p = read_policy_file(&file)?;
                    let p: Policy = c
                        .json(
                            Method::PUT,
                            api::PATH_ADMIN_POLICY,
                            Some(&serde_json::to_value(&p)?),
                        )
                        .await?;
                    if p.rules.is_empty() {
                        eprintln!("policy cleared: every node may reach every node");
                    } else {
                        eprintln!("policy set: {} rules", p.rules.len());
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), 1800);
        assert_eq!(parse_duration("1h").unwrap(), 3600);
        assert_eq!(parse_duration("7d").unwrap(), 7 * 86400);
        assert!(parse_duration("7").unwrap_err().contains("30m, 1h, 7d"));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn cli_shape() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "homeport-coordinator",
            "authkey",
            "create",
            "--reusable",
            "--tag",
            "a",
            "--tag",
            "b",
            "--expires",
            "1h",
            "--max-uses",
            "3",
            "--state-dir",
            "/tmp/x",
        ])
        .unwrap();
        match c.cmd {
            Cmd::Authkey {
                conn,
                cmd:
                    AuthkeyCmd::Create {
                        reusable,
                        expires,
                        tags,
                        max_uses,
                    },
            } => {
                assert!(reusable);
                assert_eq!(max_uses, Some(3));
                assert_eq!(expires, Some(3600));
                assert_eq!(tags, vec!["a", "b"]);
                assert_eq!(conn.state_dir, PathBuf::from("/tmp/x"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn policy_file_toml_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("p.toml");
        std::fs::write(
            &t,
            "[[rules]]\nfrom = [\"tag:a\"]\nto = [\"*\"]\nports = [\"tcp:22\"]\n",
        )
        .unwrap();
        assert_eq!(read_policy_file(&t).unwrap().rules.len(), 1);
        let j = dir.path().join("p");
        std::fs::write(&j, r#"{"rules":[{"from":["*"],"to":["home"]}]}"#).unwrap();
        assert_eq!(read_policy_file(&j).unwrap().rules[0].ports, vec!["*"]);
        std::fs::write(&j, r#"{"rules":[{"from":["tag:"],"to":["home"]}]}"#).unwrap();
        assert!(
            read_policy_file(&j)
                .unwrap_err()
                .to_string()
                .contains("rules[0]")
        );
    }
}
