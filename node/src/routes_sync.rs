//! Subnet routes and the exit node on this machine, kept in step with the map.
//!
//! Three jobs, all fed by the daemon's map watch channel and the exit choice:
//! - **Advertise.** `--advertise-routes` and `--advertise-exit-node` are reported to the
//!   coordinator (`POST /api/v1/node/routes`); nothing happens until the admin approves them.
//! - **Use.** Peers' approved subnet routes, and the default routes when an exit node is chosen,
//!   go into routing table [`TABLE`] through the TUN, consulted by policy rules only while there
//!   is something in it (so `--exit-node off` leaves the routing exactly as it was):
//!   - [`PRIO_MARK`] `fwmark` [`SOCKET_MARK`] `lookup main`: the WireGuard socket (peers, relay,
//!     STUN) never enters its own tunnel;
//!   - [`PRIO_EXCEPT`] `to <coordinator, relay> lookup main` (with an exit): the HTTPS map stream
//!     and the TCP relay stay outside the tunnel;
//!   - [`PRIO_MAIN`] `lookup main suppress_prefixlength 0`: the machine's own specific routes
//!     (its LAN) win over the mesh's; only its default route is overridden;
//!   - [`PRIO_TABLE`] `lookup` [`TABLE`].
//!
//!   The engine gets the chosen exit ([`Engine::set_exit_node`]). When the exit is offline or not
//!   (or no longer) an approved exit, its default route stays in the TUN and the engine drops
//!   what it cannot send: traffic stops rather than leaving outside the tunnel, unless the user
//!   asked for `--exit-node-fallback`, which then removes the default route until the exit is back.
//! - **Forward.** When this node has approved routes of its own, it forwards to them: IP
//!   forwarding on (restored when they go), and an nftables table [`NFT_TABLE`] that
//!   masquerades what leaves the TUN towards a subnet route (default; `--snat-routes false` keeps
//!   the mesh source for LANs whose router routes the mesh prefix back to this node) and,
//!   as an approved exit, everything that leaves the TUN for the internet. The engine has
//!   already admitted only the packets the policy allows to these destinations; the table marks
//!   their connections with [`CT_MARK`] so an exit's own firewall (`homeport-exit`'s `fwd_mesh`)
//!   lets them cross.

use crate::coordinator::Api;
use anyhow::{Context, Result, bail};
use homeport_engine::Engine;
use homeport_proto::NodeId;
use homeport_proto::map::NetworkMap;
use homeport_proto::routes::{exit_routes, is_default, parse_routes};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Routing table of mesh routes; next to the published-flow table 5280 (`datapath::routes`).
pub const TABLE: u32 = 5281;
/// Firewall mark of the WireGuard socket (`datapath::wireguard_socket`).
pub const SOCKET_MARK: u32 = 0x5281;
/// Conntrack mark of connections this node forwards to its routes or the internet.
pub const CT_MARK: u32 = 0x5282;
/// Rule priorities: after the published-flow rules (5279, 5280), before main (32766).
pub const PRIO_MARK: u32 = 5290;
pub const PRIO_EXCEPT: u32 = 5291;
pub const PRIO_MAIN: u32 = 5292;
pub const PRIO_TABLE: u32 = 5293;
pub const NFT_TABLE: &str = "homeport_fwd";
/// The coordinator may be down when the node starts: the report is retried this often.
const REPORT_RETRY: Duration = Duration::from_secs(2);

/// Config file keys of this module (`config.rs` accepts them).
pub const ROUTE_KEYS: &[&str] = &[
    "advertise-routes",
    "advertise-exit-node",
    "exit-node",
    "exit-node-fallback",
    "snat-routes",
];

/// `homeport up` flags for routes and the exit node.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RouteArgs {
    /// Offer these networks behind this node to the mesh (e.g. the LAN: 192.168.1.0/24),
    /// comma-separated; the coordinator's admin approves them (`routes approve`)
    #[arg(long, value_name = "CIDRS")]
    pub advertise_routes: Option<String>,
    /// Offer this node as an internet exit (0.0.0.0/0 and ::/0; approved with `routes approve
    /// NODE exit`)
    #[arg(long)]
    pub advertise_exit_node: bool,
    /// Send this machine's internet traffic out of NODE, an approved exit node; `off`: no exit
    /// (also changeable while running: `homeport exit-node NODE|off`)
    #[arg(long, value_name = "NODE|off")]
    pub exit_node: Option<String>,
    /// When the exit node is offline, use this machine's own internet connection instead of
    /// stopping internet traffic
    #[arg(long)]
    pub exit_node_fallback: bool,
    /// Masquerade what this node forwards to its advertised routes (default true): LAN hosts
    /// see this node's LAN address. false: they see the mesh source, for a LAN whose router
    /// routes the mesh prefix back to this node
    #[arg(long, value_name = "BOOL")]
    pub snat_routes: Option<bool>,
}

/// The exit node this machine uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitChoice {
    /// A peer's name; None: no exit.
    pub node: Option<String>,
    /// Use the machine's own internet connection while the exit is unusable.
    #[serde(default)]
    pub fallback: bool,
}

/// Resolved settings.
#[derive(Debug, Clone, Default)]
pub struct RouteConfig {
    /// What is reported to the coordinator (subnet routes, plus the exit routes).
    pub advertise: Vec<IpNet>,
    pub snat: bool,
    pub exit: ExitChoice,
}

/// `off` (or `none`, or nothing) means no exit node.
pub fn exit_name(s: &str) -> Option<String> {
    match s.trim() {
        "" | "off" | "none" => None,
        n => Some(n.to_string()),
    }
}

impl RouteArgs {
    /// Flags win over the config file (already checked for unknown keys).
    pub fn resolve(self, file: &toml::Table, path: &std::path::Path) -> Result<RouteConfig> {
        let where_ = |k: &str| format!("{}: {k}", path.display());
        let routes = match self.advertise_routes {
            Some(s) => Some(s),
            None => match file.get("advertise-routes") {
                None => None,
                Some(toml::Value::String(s)) => Some(s.clone()),
                Some(toml::Value::Array(a)) => Some(
                    a.iter()
                        .map(|v| v.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .with_context(|| {
                            format!(
                                "{}: expected networks as strings",
                                where_("advertise-routes")
                            )
                        })?
                        .join(","),
                ),
                Some(v) => bail!(
                    "{}: bad value {v}: expected \"192.168.1.0/24,...\" or a list of networks",
                    where_("advertise-routes")
                ),
            },
        };
        let mut advertise = match routes {
            Some(s) => parse_routes(&s).map_err(|e| anyhow::anyhow!("--advertise-routes: {e}"))?,
            None => vec![],
        };
        let get_bool = |k: &str| -> Result<Option<bool>> {
            match file.get(k) {
                None => Ok(None),
                Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
                Some(v) => bail!("{}: bad value {v}: expected true or false", where_(k)),
            }
        };
        if self.advertise_exit_node || get_bool("advertise-exit-node")?.unwrap_or(false) {
            advertise.extend(exit_routes());
        }
        let exit = match self.exit_node {
            Some(s) => exit_name(&s),
            None => match file.get("exit-node") {
                None => None,
                Some(toml::Value::String(s)) => exit_name(s),
                Some(v) => bail!(
                    "{}: bad value {v}: expected a node name or \"off\"",
                    where_("exit-node")
                ),
            },
        };
        Ok(RouteConfig {
            advertise,
            snat: match self.snat_routes {
                Some(b) => b,
                None => get_bool("snat-routes")?.unwrap_or(true),
            },
            exit: ExitChoice {
                node: exit,
                fallback: self.exit_node_fallback
                    || get_bool("exit-node-fallback")?.unwrap_or(false),
            },
        })
    }
}

/// What `homeport status` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesStatus {
    /// What this node advertises.
    pub advertised: Vec<IpNet>,
    /// Of those, approved (what it forwards to).
    pub approved: Vec<IpNet>,
    /// Peers' subnet routes installed here, with the peer's name.
    pub installed: Vec<(IpNet, String)>,
    pub exit: ExitChoice,
    /// The exit node's state: "in use", "offline: traffic stopped", "offline: using this
    /// machine's own connection (fallback)", "not an approved exit: ...".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_state: Option<String>,
}

/// The routes part of `homeport status`.
pub fn render(r: &RoutesStatus) -> String {
    use std::fmt::Write;
    let nets = |v: &[IpNet]| {
        v.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut o = String::new();
    if !r.advertised.is_empty() {
        let waiting: Vec<IpNet> = r
            .advertised
            .iter()
            .filter(|n| !r.approved.contains(n))
            .copied()
            .collect();
        let _ = writeln!(
            o,
            "advertised routes: {}; approved (forwarded): {}{}",
            nets(&r.advertised),
            if r.approved.is_empty() {
                "none".to_string()
            } else {
                nets(&r.approved)
            },
            if waiting.is_empty() {
                String::new()
            } else {
                format!("; awaiting approval: {}", nets(&waiting))
            }
        );
    }
    for (n, peer) in &r.installed {
        let _ = writeln!(o, "route {n} via {peer}");
    }
    match (&r.exit.node, &r.exit_state) {
        (Some(n), Some(s)) => {
            let _ = writeln!(o, "exit node: {n} ({s})");
        }
        (Some(n), None) => {
            let _ = writeln!(o, "exit node: {n}");
        }
        (None, _) => {}
    }
    o
}

/// What the kernel should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Desired {
    /// Routes in [`TABLE`] through the TUN (peers' subnet routes; default routes for the exit).
    table: BTreeSet<IpNet>,
    /// `to` exceptions that stay on the main table (with an exit's default route).
    except: BTreeSet<IpAddr>,
    /// Our own approved routes: forward to them.
    forward: Vec<IpNet>,
}

/// What this module installed, so it removes exactly that.
#[derive(Default)]
struct Installed {
    table: BTreeSet<IpNet>,
    rules: bool,
    except: BTreeSet<IpAddr>,
    nft: Option<String>,
    /// Forwarding sysctls before we turned them on: (path, old value).
    sysctl: Vec<(String, String)>,
}

/// Shared between the sync task, the control socket and the daemon's shutdown.
#[derive(Clone)]
pub struct Handle(Arc<Inner>);

struct Inner {
    tun: String,
    cfg: RouteConfig,
    choice: watch::Sender<ExitChoice>,
    installed: Mutex<Installed>,
    status: Mutex<RoutesStatus>,
}

impl Handle {
    pub fn new(tun: &str, cfg: RouteConfig) -> Handle {
        let status = RoutesStatus {
            advertised: cfg.advertise.clone(),
            exit: cfg.exit.clone(),
            ..Default::default()
        };
        Handle(Arc::new(Inner {
            tun: tun.to_string(),
            choice: watch::channel(cfg.exit.clone()).0,
            cfg,
            installed: Mutex::new(Installed::default()),
            status: Mutex::new(status),
        }))
    }

    /// `homeport exit-node NODE|off`: takes effect at once (the sync task reconciles).
    pub fn set_exit(&self, choice: ExitChoice) {
        self.0.choice.send_replace(choice);
    }

    pub fn status(&self) -> RoutesStatus {
        self.0.status.lock().unwrap().clone()
    }

    /// Removes everything this module installed (the daemon calls it on the way down).
    pub fn cleanup(&self) {
        let mut i = self.0.installed.lock().unwrap();
        apply(&self.0.tun, self.0.cfg.snat, &mut i, &Desired::default());
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn fam(n: &IpNet) -> &'static str {
    match n {
        IpNet::V4(_) => "-4",
        IpNet::V6(_) => "-6",
    }
}

/// Brings the kernel from `i` to `want`; every step that fails is logged and retried at the
/// next reconcile (a step that worked is recorded at once).
fn apply(tun: &str, snat: bool, i: &mut Installed, want: &Desired) {
    let table = TABLE.to_string();
    // Rules first on the way up (a route in the table is unused without them), last on the way
    // down, so nothing is ever half-routed.
    let need_rules = !want.table.is_empty();
    if need_rules && !i.rules {
        let mark = SOCKET_MARK.to_string();
        for f in ["-4", "-6"] {
            for p in [PRIO_MARK, PRIO_MAIN, PRIO_TABLE] {
                while ip(&[f, "rule", "del", "priority", &p.to_string()]).is_ok() {}
            }
            let r = ip(&[
                f,
                "rule",
                "add",
                "fwmark",
                &mark,
                "lookup",
                "main",
                "priority",
                &PRIO_MARK.to_string(),
            ])
            .and_then(|_| {
                ip(&[
                    f,
                    "rule",
                    "add",
                    "lookup",
                    "main",
                    "suppress_prefixlength",
                    "0",
                    "priority",
                    &PRIO_MAIN.to_string(),
                ])
            })
            .and_then(|_| {
                ip(&[
                    f,
                    "rule",
                    "add",
                    "lookup",
                    &table,
                    "priority",
                    &PRIO_TABLE.to_string(),
                ])
            });
            if let Err(e) = r {
                tracing::warn!(error = %e, family = f, "mesh route rules");
            }
        }
        i.rules = true;
    }
    for a in i.except.clone().difference(&want.except) {
        let f = if a.is_ipv4() { "-4" } else { "-6" };
        let _ = ip(&[
            f,
            "rule",
            "del",
            "to",
            &a.to_string(),
            "priority",
            &PRIO_EXCEPT.to_string(),
        ]);
        i.except.remove(a);
    }
    for a in want.except.difference(&i.except.clone()) {
        let f = if a.is_ipv4() { "-4" } else { "-6" };
        match ip(&[
            f,
            "rule",
            "add",
            "to",
            &a.to_string(),
            "lookup",
            "main",
            "priority",
            &PRIO_EXCEPT.to_string(),
        ]) {
            Ok(()) => {
                i.except.insert(*a);
            }
            Err(e) => tracing::warn!(error = %e, "coordinator route exception"),
        }
    }
    for n in i.table.clone().difference(&want.table) {
        let _ = ip(&[
            fam(n),
            "route",
            "del",
            &n.to_string(),
            "dev",
            tun,
            "table",
            &table,
        ]);
        i.table.remove(n);
    }
    for n in want.table.difference(&i.table.clone()) {
        match ip(&[
            fam(n),
            "route",
            "replace",
            &n.to_string(),
            "dev",
            tun,
            "table",
            &table,
        ]) {
            Ok(()) => {
                i.table.insert(*n);
            }
            Err(e) => tracing::warn!(error = %e, route = %n, "mesh route not installed"),
        }
    }
    if !need_rules && i.rules {
        for f in ["-4", "-6"] {
            for p in [PRIO_MARK, PRIO_MAIN, PRIO_TABLE] {
                let _ = ip(&[f, "rule", "del", "priority", &p.to_string()]);
            }
        }
        i.rules = false;
    }
    forward(tun, snat, i, &want.forward);
}

/// Removes what an unclean stop (SIGKILL, a crash) left: our rules, table and nftables table.
/// The forwarding sysctls it turned on stay on (their old values died with it).
fn leftovers() {
    for f in ["-4", "-6"] {
        for p in [PRIO_MARK, PRIO_EXCEPT, PRIO_MAIN, PRIO_TABLE] {
            while ip(&[f, "rule", "del", "priority", &p.to_string()]).is_ok() {}
        }
        let _ = ip(&[f, "route", "flush", "table", &TABLE.to_string()]);
    }
    let _ = homeport_host::nft::run(
        &homeport_host::nft::Exec::default(),
        &["-f", "-"],
        Some(&format!(
            "table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n"
        )),
    );
}

/// IP forwarding and the masquerade table for our own approved routes.
fn forward(tun: &str, snat: bool, i: &mut Installed, routes: &[IpNet]) {
    let script = if routes.is_empty() {
        None
    } else {
        let exit = routes.iter().any(is_default);
        let mut post = String::new();
        if exit {
            // The internet: everything that leaves the TUN for another interface.
            post.push_str(&format!(
                "    iifname \"{tun}\" oifname != \"{tun}\" masquerade\n"
            ));
        } else if snat {
            for (fam, sel) in [("ip", "V4"), ("ip6", "V6")] {
                let nets: Vec<String> = routes
                    .iter()
                    .filter(|n| matches!((n, sel), (IpNet::V4(_), "V4") | (IpNet::V6(_), "V6")))
                    .map(|n| n.to_string())
                    .collect();
                if !nets.is_empty() {
                    post.push_str(&format!(
                        "    iifname \"{tun}\" oifname != \"{tun}\" {fam} daddr {{ {} }} masquerade\n",
                        nets.join(", ")
                    ));
                }
            }
        }
        Some(format!(
            "table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n\
             table inet {NFT_TABLE} {{\n\
               chain pre {{\n\
                 type filter hook prerouting priority mangle; policy accept;\n\
                 iifname \"{tun}\" fib daddr type != local ct mark set {CT_MARK}\n\
               }}\n\
               chain post {{\n\
                 type nat hook postrouting priority srcnat; policy accept;\n{post}\
               }}\n\
             }}\n"
        ))
    };
    if script == i.nft {
        return;
    }
    let exec = homeport_host::nft::Exec::default();
    match &script {
        Some(s) => {
            if let Err(e) = homeport_host::nft::run(&exec, &["-f", "-"], Some(s)) {
                tracing::warn!(error = %e, "forwarding table for approved routes");
                return;
            }
            if i.sysctl.is_empty() {
                for p in [
                    "/proc/sys/net/ipv4/ip_forward",
                    "/proc/sys/net/ipv6/conf/all/forwarding",
                ] {
                    if let Ok(old) = std::fs::read_to_string(p)
                        && std::fs::write(p, "1").is_ok()
                    {
                        i.sysctl.push((p.to_string(), old.trim().to_string()));
                    }
                }
            }
            tracing::info!(routes = ?routes, snat, "forwarding to approved routes");
        }
        None => {
            let _ = homeport_host::nft::run(
                &exec,
                &["-f", "-"],
                Some(&format!(
                    "table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n"
                )),
            );
            for (p, old) in i.sysctl.drain(..) {
                let _ = std::fs::write(&p, old);
            }
            tracing::info!("no approved routes: forwarding off");
        }
    }
    i.nft = script;
}

/// The desired state for `map` and `choice`; also what `homeport status` says, and the exit the
/// engine should use.
fn desired(
    map: &NetworkMap,
    choice: &ExitChoice,
    coordinator: &[IpAddr],
) -> (Desired, RoutesStatus, Option<NodeId>) {
    let mut d = Desired::default();
    let mut st = RoutesStatus {
        approved: map.self_node.routes.clone(),
        exit: choice.clone(),
        ..Default::default()
    };
    d.forward = map.self_node.routes.clone();
    let mesh = [
        IpNet::V4(map.self_node.prefix_v4),
        IpNet::V6(map.self_node.prefix_v6),
    ];
    for p in map.peers.values() {
        for r in p.routes.iter().filter(|r| !is_default(r)) {
            // Never route the mesh itself elsewhere, whatever a map says.
            if mesh.iter().any(|m| homeport_proto::routes::overlaps(m, r)) {
                continue;
            }
            if d.table.insert(*r) {
                st.installed.push((*r, p.name.to_string()));
            }
        }
    }
    let mut engine_exit = None;
    if let Some(name) = &choice.node {
        let peer = map.peer_by_name(name);
        let defaults: Vec<IpNet> = peer
            .map(|p| p.routes.iter().filter(|r| is_default(r)).copied().collect())
            .unwrap_or_default();
        let usable = peer.is_some_and(|p| p.online) && !defaults.is_empty();
        let state = match peer {
            None => format!("no peer named {name:?} in this node's map"),
            Some(_) if defaults.is_empty() => format!(
                "{name} is not an approved exit (`homeport-coordinator routes approve {name} exit`)"
            ),
            Some(p) if !p.online => format!("{name} is offline"),
            Some(_) => "in use".to_string(),
        };
        st.exit_state = Some(if usable {
            state
        } else if choice.fallback {
            format!("{state}: using this machine's own connection (fallback)")
        } else {
            format!("{state}: internet traffic stopped (no fallback)")
        });
        if usable || !choice.fallback {
            // Without fallback the default routes stay in the TUN even while the exit is
            // unusable: the engine drops what it cannot send, nothing leaks outside.
            d.table.extend(exit_routes());
            d.except.extend(coordinator.iter().copied());
            for r in &map.relays {
                d.except
                    .extend(r.udp.iter().chain(r.stun.iter()).map(|a| a.ip()));
            }
            engine_exit = peer.filter(|_| usable).map(|p| p.id);
        }
    }
    st.installed.sort();
    (d, st, engine_exit)
}

/// Resolves the coordinator URL's host (an address, or a name) to its addresses.
async fn coordinator_addrs(url: &str) -> Vec<IpAddr> {
    let Ok(u) = reqwest::Url::parse(url) else {
        return vec![];
    };
    let Some(host) = u.host_str() else {
        return vec![];
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if let Ok(a) = host.parse::<IpAddr>() {
        return vec![a];
    }
    let port = u.port_or_known_default().unwrap_or(443);
    match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(it) => it.map(|a| a.ip()).collect(),
        Err(_) => vec![],
    }
}

/// Reports the advertised routes once (retrying while the coordinator is unreachable).
async fn report(api: Api, routes: Vec<IpNet>, stop: CancellationToken) {
    let body = homeport_proto::routes::RoutesReport { routes };
    loop {
        match api
            .request(reqwest::Method::POST, homeport_proto::routes::PATH_ROUTES)
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                if !body.routes.is_empty() {
                    tracing::info!(routes = ?body.routes, "routes advertised; the coordinator's admin approves them (`homeport-coordinator routes approve`)");
                }
                return;
            }
            Ok(r) if r.status().is_client_error() => {
                let s = r.status();
                let detail = r.text().await.unwrap_or_default();
                tracing::error!(status = %s, %detail, "the coordinator refused the advertised routes");
                return;
            }
            Ok(r) => tracing::debug!(status = %r.status(), "route report failed; retrying"),
            Err(e) => tracing::debug!(error = %e, "route report failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(REPORT_RETRY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Runs until `stop`: reports the advertised routes, then keeps the kernel and the engine in
/// step with the map and the exit choice. Removes what it installed when it ends.
pub async fn run(
    handle: Handle,
    api: Api,
    engine: Arc<Engine>,
    mut maps: watch::Receiver<Option<Arc<NetworkMap>>>,
    stop: CancellationToken,
) {
    let inner = handle.0.clone();
    tokio::spawn(report(
        api.clone(),
        inner.cfg.advertise.clone(),
        stop.clone(),
    ));
    leftovers();
    // Every coordinator replica stays reachable outside the tunnel (a failover must not depend
    // on the exit); resolved again when the list changes.
    let mut coord_urls: Vec<String> = vec![];
    let mut coord: Vec<IpAddr> = vec![];
    let mut choice = inner.choice.subscribe();
    loop {
        let map = maps.borrow_and_update().clone();
        let ch = choice.borrow_and_update().clone();
        if let Some(map) = map {
            let mut urls: Vec<String> = std::iter::once(api.replicas().current().url.to_string())
                .chain(map.coordinators.iter().map(|c| c.url.clone()))
                .collect();
            urls.sort();
            urls.dedup();
            if urls != coord_urls {
                coord.clear();
                for u in &urls {
                    coord.extend(coordinator_addrs(u).await);
                }
                coord.sort();
                coord.dedup();
                coord_urls = urls;
            }
            let (want, mut st, exit) = desired(&map, &ch, &coord);
            engine.set_exit_node(exit);
            let mut i = inner.installed.lock().unwrap();
            apply(&inner.tun, inner.cfg.snat, &mut i, &want);
            drop(i);
            st.advertised = inner.cfg.advertise.clone();
            *inner.status.lock().unwrap() = st;
        }
        tokio::select! {
            r = maps.changed() => if r.is_err() { break },
            r = choice.changed() => if r.is_err() { break },
            _ = stop.cancelled() => break,
        }
    }
    engine.set_exit_node(None);
    handle.cleanup();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_file_resolve_with_clear_errors() {
        let file: toml::Table = toml::from_str(
            "advertise-routes = [\"192.168.1.0/24\"]\nexit-node = \"off\"\nsnat-routes = false\n",
        )
        .unwrap();
        let p = std::path::Path::new("node.toml");
        let c = RouteArgs::default().resolve(&file, p).unwrap();
        assert_eq!(
            c.advertise,
            vec!["192.168.1.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(!c.snat && c.exit.node.is_none());
        let c = RouteArgs {
            advertise_exit_node: true,
            exit_node: Some("vps".into()),
            ..Default::default()
        }
        .resolve(&toml::Table::new(), p)
        .unwrap();
        assert_eq!(c.advertise.len(), 2);
        assert!(c.snat);
        assert_eq!(c.exit.node.as_deref(), Some("vps"));
        let e = RouteArgs {
            advertise_routes: Some("192.168.1.1/24".into()),
            ..Default::default()
        }
        .resolve(&toml::Table::new(), p)
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--advertise-routes") && e.contains("192.168.1.0/24"),
            "{e}"
        );
        let bad: toml::Table = toml::from_str("snat-routes = \"no\"").unwrap();
        let e = RouteArgs::default()
            .resolve(&bad, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("true or false"), "{e}");
    }
}
