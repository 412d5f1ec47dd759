//! `homeport up`: the daemon. [`run`] registers the node, starts the data path and the IO
//! modules, then runs one event loop ([`Node`]) that owns the node's state (registration, map,
//! stream state, port) and acts on messages:
//!
//! - the map stream ([`crate::coordinator::map_stream`]): map messages, lost, revoked;
//! - the engine's events (through the data path): Pongs, rebind wanted, relay UDP failing;
//! - the control socket ([`crate::control::serve`]): `status`, `ping`, `netcheck`, ...;
//! - endpoint discovery ([`crate::endpoints`]): reflexive address, NAT depth, fresh reports;
//! - a one-second tick for probe requests.
//!
//! The modules own their own state, talk to the loop only by these messages, and none of them
//! imports this one. Read-only views go out through a `watch` ([`SelfStatus`], for metrics and
//! the status report) and the [`MapObserver`] (the exit).

mod probes;

use crate::config::{LogFormat, UpConfig};
use crate::control::{Ask, Published, Request, Response, SelfStatus, Status};
use crate::coordinator::{Api, Join, StreamEvent};
use crate::datapath::{DEFAULT_MTU, Datapath, DatapathConfig, EVENT_QUEUE, PathInfo};
use crate::endpoints::{Cmd, Endpoints, Found};
use crate::state::{Registration, SOCK_FILE, StateDir};
use crate::stun::StunClient;
use anyhow::{Context, Result, bail};
use homeport_engine::Event;
use homeport_proto::NodeId;
use homeport_proto::addr::is_public;
use homeport_proto::map::{MapMessage, NetworkMap};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::coordinator::Refused;

/// Map observers (the exit) receive every new map through this.
pub type MapObserver = watch::Sender<Option<Arc<NetworkMap>>>;
/// Whoever else in the process calls the coordinator as this node (the exit) gets the node's
/// [`Api`] through this once it is registered.
pub type ApiObserver = watch::Sender<Option<Api>>;

/// What a process that embeds the daemon (the exit) follows.
#[derive(Default)]
pub struct Hooks {
    pub maps: Option<MapObserver>,
    pub api: Option<ApiObserver>,
}

/// Exit status of a node the coordinator refuses (EX_CONFIG from sysexits.h): an admin has to
/// act (a new auth key), so systemd must not restart it (`RestartPreventExitStatus=78`).
pub const EXIT_REFUSED: u8 = 78;

/// How long `homeport ping` waits for the Pong.
const PING_WAIT: Duration = Duration::from_secs(1);
/// How often peers without a direct path are considered for a probe request.
const PROBE_ROUND: Duration = Duration::from_secs(1);
/// How long the modules get to finish after the daemon stops.
const MODULES_STOP_WAIT: Duration = Duration::from_secs(2);

/// The process exit code for the result of `run`: [`EXIT_REFUSED`] when the coordinator refused
/// this node, 1 for any other failure.
pub fn exit_code(r: &Result<()>) -> std::process::ExitCode {
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Refused>().is_some() => {
            std::process::ExitCode::from(EXIT_REFUSED)
        }
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

/// Sets up tracing for a daemon.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
}

/// The registration in the state dir, or a new one (with the key proof) when there is none for
/// this coordinator or it was refused.
async fn registration(
    cfg: &UpConfig,
    st: &StateDir,
    client: &reqwest::Client,
    coordinator: &str,
    pin: &str,
    shutdown: &CancellationToken,
) -> Result<Registration> {
    let stored = st.registration()?;
    if let Some(r) = &stored
        && r.coordinator == coordinator
        && !r.refused
    {
        return Ok(r.clone());
    }
    let dir = cfg.state_dir.display();
    let Some(source) = &cfg.authkey else {
        if stored.as_ref().is_some_and(|r| r.refused) {
            return Err(Refused(format!(
                "the coordinator refused this node's credential earlier (removed by its admin?); \
                 the private key and state in {dir} are kept. To join again with the same key and \
                 address: homeport up --authkey-file FILE (a new key from `homeport-coordinator authkey create`, \
                 or HOMEPORT_AUTHKEY); to forget the registration: homeport logout --state-dir {dir}"
            ))
            .into());
        }
        return Err(Refused(format!(
            "this node is not registered yet: pass --authkey-file FILE or set {} \
             (a key from `homeport-coordinator authkey create`)",
            crate::config::AUTHKEY_ENV
        ))
        .into());
    };
    let authkey = source.read()?;
    let key = st.private_key()?;
    let join = Join {
        pin,
        key: &key,
        authkey: &authkey,
        hostname: &cfg.hostname,
        previous_ipv4: stored
            .as_ref()
            .filter(|r| r.coordinator == coordinator)
            .map(|r| r.addrs.ipv4),
    };
    let r = crate::coordinator::register(client, coordinator, &join, shutdown).await?;
    st.save_registration(&r)?;
    tracing::info!(name = %r.name, ipv4 = %r.addrs.ipv4, ipv6 = %r.addrs.ipv6, "registered");
    Ok(r)
}

/// Runs `f` until it ends or `stop` is cancelled.
async fn until(stop: CancellationToken, f: impl Future<Output = ()>) {
    tokio::select! {
        _ = f => {}
        _ = stop.cancelled() => {}
    }
}

/// Runs the node until `shutdown` is cancelled, `homeport down` is asked, or the coordinator
/// revokes this node (an error).
pub async fn run(cfg: UpConfig, shutdown: CancellationToken, hooks: Hooks) -> Result<()> {
    let Hooks {
        maps,
        api: api_observer,
    } = hooks;
    // The map watch channel always exists: routes_sync follows it (the exit passes its own).
    let maps = maps.unwrap_or_else(|| watch::channel(None).0);
    let map_rx = maps.subscribe();
    let dns_maps = maps.subscribe();
    let st = StateDir::open(&cfg.state_dir)?;
    let key = st.private_key()?;
    let stored = st.registration()?;
    let coordinator = cfg
        .coordinator
        .clone()
        .or_else(|| stored.as_ref().map(|r| r.coordinator.clone()))
        .context("no coordinator: pass --coordinator https://VPS:8443 (and --pin, --authkey-file) on the first start")?;
    let coordinator = coordinator.trim_end_matches('/').to_string();
    if !coordinator.starts_with("https://") {
        bail!(
            "--coordinator {coordinator:?}: expected an https:// URL (the coordinator is TLS only)"
        );
    }
    let pin = cfg
        .pin
        .clone()
        .or_else(|| stored.as_ref().map(|r| r.pin.clone()))
        .context("no --pin: pass the pin printed by `homeport-coordinator pin`")?;
    let client = crate::state::coordinator_client(&pin, None).context("the coordinator's --pin")?;
    let reg = registration(&cfg, &st, &client, &coordinator, &pin, &shutdown).await?;

    let port = cfg.listen_port.unwrap_or(reg.listen_port);
    let public_key = key.public_key();
    let (side_tx, side_rx) = std::sync::mpsc::sync_channel(crate::stun::STUN_QUEUE);
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let dp = Arc::new(Datapath::start(
        &DatapathConfig {
            tun_name: cfg.tun.clone(),
            listen_port: port,
            private_key: key,
            mtu: DEFAULT_MTU,
            addrs: reg.addrs,
            prefix_v4: reg.prefix_v4,
            prefix_v6: reg.prefix_v6,
        },
        side_tx,
        events_tx,
    )?);
    let listen_port = dp.local_port();
    dp.engine.set_rebind_allowed(cfg.listen_port.is_none());
    if reg.listen_port != listen_port {
        let mut r = reg.clone();
        r.listen_port = listen_port;
        st.save_registration(&r)?;
    }
    let stop = shutdown.child_token();
    let sock_path = cfg.state_dir.join(SOCK_FILE);
    let _ = std::fs::remove_file(&sock_path);
    let listener = tokio::net::UnixListener::bind(&sock_path)
        .with_context(|| format!("binding the control socket {}", sock_path.display()))?;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))?;

    let replicas = Arc::new(crate::replicas::Replicas::open(
        &cfg.state_dir,
        &coordinator,
        &pin,
    )?);
    drop(client);
    let api = Api::new(replicas, &reg.credential);
    if let Some(o) = &api_observer {
        o.send_replace(Some(api.clone()));
    }
    let stun = StunClient::new(dp.clone(), crate::stun::bridge(side_rx)?);
    let tasks = TaskTracker::new();
    let (stream_tx, stream_rx) = mpsc::channel(crate::coordinator::STREAM_QUEUE);
    let (ask_tx, ask_rx) = mpsc::channel(16);
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let (found_tx, found_rx) = mpsc::channel(16);
    let relay_failing = Arc::new(Notify::new());
    let resync = Arc::new(Notify::new());
    let mut node = Node {
        me: watch::channel(SelfStatus {
            id: reg.node_id,
            name: reg.name.clone(),
            public_key,
            addrs: reg.addrs,
            tun: cfg.tun.clone(),
            listen_port,
            coordinator: reg.coordinator.clone(),
            connected: false,
            map_version: 0,
        })
        .0,
        reg,
        st,
        dp: dp.clone(),
        map: None,
        connected: false,
        fixed_port: cfg.listen_port.is_some(),
        maps: Some(maps),
        routes: crate::routes_sync::Handle::new(&cfg.tun, cfg.routing.clone()),
        endpoints: cmd_tx,
        stun_servers: vec![],
        relay_failing: relay_failing.clone(),
        resync: resync.clone(),
        api: api.clone(),
        stun: stun.clone(),
        pings: vec![],
        probes: Default::default(),
        tasks: tasks.clone(),
        stop: stop.clone(),
    };
    // The last map keeps the mesh working while the coordinator is unreachable.
    node.apply_stored_map()?;

    tasks.spawn(crate::control::serve(listener, ask_tx, stop.clone()));
    if let Some(addr) = cfg.metrics_listen {
        let l = homeport_host::metrics::bind(addr).await?;
        let mut registry = homeport_host::metrics::registry("node");
        registry.register_collector(Box::new(crate::metrics::NodeMetrics {
            me: node.me.subscribe(),
            dp: dp.clone(),
        }));
        tasks.spawn(homeport_host::metrics::serve(
            l,
            Arc::new(registry),
            stop.clone(),
        ));
    }
    tasks.spawn(until(
        stop.clone(),
        crate::relay_tcp::keep(api.clone(), dp.clone(), relay_failing, stop.clone()),
    ));
    tasks.spawn(until(
        stop.clone(),
        Endpoints {
            api: api.clone(),
            stun,
            mesh_v4: node.reg.prefix_v4,
            port: listen_port,
        }
        .run(cmd_rx, found_tx, stop.clone()),
    ));
    {
        // Paths, handshakes and traffic for the admin overview (the dashboard).
        let me = node.me.subscribe();
        let dp = dp.clone();
        tasks.spawn(until(
            stop.clone(),
            crate::report::run(
                api.clone(),
                format!("homeport {}", env!("CARGO_PKG_VERSION")),
                move || me.borrow().connected.then(|| dp.status()),
                stop.clone(),
            ),
        ));
    }
    // Mesh names (dns.rs) follow the map too.
    tasks.spawn(crate::dns::run(dns_maps, cfg.tun.clone(), stop.clone()));
    tasks.spawn(crate::routes_sync::run(
        node.routes.clone(),
        api.clone(),
        dp.engine.clone(),
        map_rx,
        stop.clone(),
    ));
    tasks.spawn(crate::coordinator::map_stream(
        api,
        stream_tx,
        resync,
        stop.clone(),
    ));
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(tun = %cfg.tun, port = listen_port, "homeport node up");

    let result = node
        .run(
            Inputs {
                stream: stream_rx,
                engine: events_rx,
                asks: ask_rx,
                found: found_rx,
            },
            &stop,
        )
        .await;
    stop.cancel();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tasks.close();
    if tokio::time::timeout(MODULES_STOP_WAIT, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
    }
    node.routes.cleanup();
    dp.stop();
    let _ = std::fs::remove_file(&sock_path);
    if let Err(e) = &result
        && e.downcast_ref::<Refused>().is_some()
    {
        // Keep the key and the registration (marked refused) so that `homeport up
        // --authkey-file NEW` joins again with the same key and address.
        let mut r = node.reg.clone();
        r.refused = true;
        if let Err(e) = node.st.save_registration(&r) {
            tracing::warn!(error = %e, "cannot mark the registration as refused");
        }
        tracing::error!("{e}");
    }
    drop(node);
    tracing::info!("homeport node stopped");
    result
}

/// The loop's inputs.
struct Inputs {
    stream: mpsc::Receiver<StreamEvent>,
    engine: mpsc::Receiver<Event>,
    asks: mpsc::Receiver<Ask>,
    found: mpsc::Receiver<Found>,
}

/// A `homeport ping` waiting for its Pong.
struct PingWait {
    peer: NodeId,
    name: String,
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<Response>,
}

/// The daemon's state, owned by its event loop.
struct Node {
    reg: Registration,
    st: StateDir,
    dp: Arc<Datapath>,
    map: Option<NetworkMap>,
    /// The map stream is up (its full map arrived and it has not ended since).
    connected: bool,
    /// The port is fixed by `--listen-port`: never moved.
    fixed_port: bool,
    /// What metrics, the status report and `homeport status` show of this node.
    me: watch::Sender<SelfStatus>,
    maps: Option<MapObserver>,
    /// Subnet routes and the exit node (`routes_sync`).
    routes: crate::routes_sync::Handle,
    endpoints: mpsc::Sender<Cmd>,
    /// The map's STUN servers, as last told to the endpoint module.
    stun_servers: Vec<SocketAddr>,
    relay_failing: Arc<Notify>,
    resync: Arc<Notify>,
    api: Api,
    stun: StunClient,
    pings: Vec<PingWait>,
    probes: probes::ProbeAsks,
    /// Short tasks the loop starts (probe asks, netcheck), stopped with the daemon.
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// What ends the loop.
enum Stop {
    /// `homeport down`, or the shutdown signal.
    Asked,
}

impl Node {
    async fn run(&mut self, mut inputs: Inputs, stop: &CancellationToken) -> Result<()> {
        let mut probe_round = tokio::time::interval(PROBE_ROUND);
        probe_round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ping_deadline = self.pings.iter().map(|p| p.deadline).min();
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                ev = inputs.stream.recv() => match ev {
                    Some(ev) => self.on_stream(ev).await?,
                    None => return Ok(()),
                },
                Some(ev) = inputs.engine.recv() => self.on_engine(ev).await,
                Some((req, reply)) = inputs.asks.recv() => {
                    if let Some(Stop::Asked) = self.on_request(req, reply) {
                        return Ok(());
                    }
                }
                Some(f) = inputs.found.recv() => self.on_found(f),
                _ = probe_round.tick() => self.ask_probes(),
                _ = tokio::time::sleep_until(ping_deadline.unwrap_or_else(tokio::time::Instant::now)),
                    if ping_deadline.is_some() => self.expire_pings(),
            }
        }
    }

    /// Publishes what changed of this node's own status.
    fn publish_me(&self) {
        let version = self.map.as_ref().map(|m| m.version).unwrap_or(0);
        let connected = self.connected;
        self.me.send_if_modified(|s| {
            let changed = s.map_version != version || s.connected != connected;
            s.map_version = version;
            s.connected = connected;
            changed
        });
    }

    async fn tell_endpoints(&self, cmd: Cmd) {
        // The module stopped only when the daemon stops.
        let _ = self.endpoints.send(cmd).await;
    }

    async fn on_stream(&mut self, ev: StreamEvent) -> Result<()> {
        match ev {
            StreamEvent::Message(msg) => {
                let full = msg.full;
                if full {
                    self.connected = true;
                    // The replica in use (the one registered with, or another after a failover).
                    let url = self.api.replicas().current().url.to_string();
                    self.me.send_if_modified(|s| {
                        let changed = s.coordinator != url;
                        s.coordinator = url;
                        changed
                    });
                    self.tell_endpoints(Cmd::Connected(true)).await;
                }
                if let Err(e) = self.apply_message(*msg) {
                    tracing::warn!(error = %format!("{e:#}"), "cannot apply a map message; resynchronising");
                    self.resync.notify_one();
                }
                self.stun_servers_changed().await;
                if full {
                    // A (re)connected stream: report our endpoints now (STUN needs the map's
                    // servers), and have peers probe us as soon as they are known.
                    self.tell_endpoints(Cmd::ReportNow).await;
                }
            }
            StreamEvent::Lost(_) => {
                self.connected = false;
                self.tell_endpoints(Cmd::Connected(false)).await;
            }
            StreamEvent::Revoked(why) => {
                self.connected = false;
                self.publish_me();
                return Err(Refused(format!(
                    "the coordinator no longer accepts this node's credential ({why}): its admin removed it, \
                     or this key registered again elsewhere. The node stops; its private key and state in {} are kept. \
                     To join again with the same key and address: homeport up --authkey-file FILE \
                     (a new key from `homeport-coordinator authkey create`, or HOMEPORT_AUTHKEY); \
                     to forget the registration: homeport logout",
                    self.st.dir.display()
                ))
                .into());
            }
        }
        self.publish_me();
        Ok(())
    }

    /// Applies the map stored by the last run, if it is this node's.
    fn apply_stored_map(&mut self) -> Result<()> {
        let Some(m) = self
            .st
            .map()?
            .filter(|m| m.self_node.id == self.reg.node_id)
        else {
            return Ok(());
        };
        self.dp.apply_map(&m);
        tracing::info!(
            version = m.version,
            peers = m.peers.len(),
            "applied the stored map"
        );
        if let Some(o) = &self.maps {
            o.send_replace(Some(Arc::new(m.clone())));
        }
        self.map = Some(m);
        self.publish_me();
        Ok(())
    }

    fn apply_message(&mut self, mut msg: MapMessage) -> Result<()> {
        let probes = std::mem::take(&mut msg.probe_requests);
        for p in &probes {
            let eps: Vec<SocketAddr> = p.endpoints.iter().map(|e| e.addr).collect();
            self.dp.probe_now(p.from, &eps);
        }
        if !probes.is_empty() && msg.is_keepalive() {
            return Ok(());
        }
        match &mut self.map {
            Some(m) => m.apply(msg)?,
            None => self.map = Some(NetworkMap::from_full(msg)?),
        }
        let Some(new) = &self.map else { return Ok(()) };
        self.dp.apply_map(new);
        tracing::debug!(
            version = new.version,
            peers = new.peers.len(),
            "map applied"
        );
        if let Err(e) = self.st.save_map(new) {
            tracing::warn!(error = %e, "could not persist the map");
        }
        self.api.replicas().update(&new.coordinators);
        if let Some(o) = &self.maps {
            o.send_replace(Some(Arc::new(new.clone())));
        }
        Ok(())
    }

    async fn stun_servers_changed(&mut self) {
        let servers: Vec<SocketAddr> = self
            .map
            .as_ref()
            .map(|m| m.relays.iter().filter_map(|r| r.stun).collect())
            .unwrap_or_default();
        if servers != self.stun_servers {
            self.stun_servers = servers.clone();
            self.tell_endpoints(Cmd::StunServers(servers)).await;
        }
    }

    async fn on_engine(&mut self, ev: Event) {
        match ev {
            Event::RebindWanted => self.rebind_if_asked().await,
            Event::RelayUdpFailing { .. } => self.relay_failing.notify_one(),
            Event::Pong {
                peer,
                from,
                rtt,
                via_relay,
            } => {
                // Nobody waiting is the usual case (probes get Pongs every few seconds).
                let (done, waiting) = std::mem::take(&mut self.pings)
                    .into_iter()
                    .partition(|w| w.peer == peer);
                self.pings = waiting;
                let path = if via_relay {
                    format!("relay {from}")
                } else {
                    format!("direct {from}")
                };
                for w in done {
                    let _ = w.reply.send(Response::Pong {
                        path: path.clone(),
                        rtt_ms: rtt.as_secs_f64() * 1000.0,
                    });
                }
            }
        }
    }

    /// Moves the WireGuard socket to a fresh port when the engine asks (a direct path that
    /// worked from this port cannot be found again: stale NAT state pins it), then has the new
    /// address learned by STUN and reported at once.
    async fn rebind_if_asked(&mut self) {
        if !self.dp.engine.take_rebind(Instant::now()) || self.fixed_port {
            return;
        }
        let port = match self.dp.rebind() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not move the WireGuard socket");
                return;
            }
        };
        let old = self.me.borrow().listen_port;
        self.me.send_modify(|s| s.listen_port = port);
        tracing::info!(old, new = port, "WireGuard socket moved to a fresh port");
        self.reg.listen_port = port;
        if let Err(e) = self.st.save_registration(&self.reg) {
            tracing::warn!(error = %e, "could not save the new port");
        }
        self.tell_endpoints(Cmd::Port(port)).await;
        self.tell_endpoints(Cmd::ReportNow).await;
    }

    fn on_found(&mut self, f: Found) {
        match f {
            Found::Reflexive(addr) => self.dp.engine.set_reflexive(Some(addr)),
            Found::OpenerTtl(ttl) => self.dp.set_open_ttl(ttl),
            Found::FreshReport => {
                // Our (new) address is at the coordinator: ask every peer again now.
                self.probes.reset();
                self.ask_probes();
            }
        }
    }

    /// Asks the coordinator to make peers without a direct path probe us now, so both sides
    /// probe at the same moment (that is what opens two NATs).
    fn ask_probes(&mut self) {
        if !self.connected || !self.dp.engine.nat_depth_known() {
            return;
        }
        let wanted: Vec<NodeId> = self
            .dp
            .status()
            .into_iter()
            .filter(|p| {
                p.online
                    && !matches!(p.path, PathInfo::Direct { .. })
                    && self.dp.engine.has_public_candidate(p.id)
            })
            .map(|p| p.id)
            .collect();
        for id in self.probes.due(Instant::now(), &wanted) {
            self.dp.start_attempt(id);
            let api = self.api.clone();
            self.tasks.spawn(until(self.stop.clone(), async move {
                if let Err(e) = api.ask_probe(id).await {
                    tracing::debug!(error = %e, "probe request failed");
                }
            }));
        }
    }

    fn status(&self) -> Status {
        Status {
            me: self.me.borrow().clone(),
            peers: self.dp.status(),
            routes: Some(self.routes.status()),
        }
    }

    fn on_request(&mut self, req: Request, reply: oneshot::Sender<Response>) -> Option<Stop> {
        let answer = match req {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Down => {
                let _ = reply.send(Response::Ok);
                return Some(Stop::Asked);
            }
            Request::Ping { peer } => return self.ping(peer, reply),
            Request::Netcheck { stun } => {
                let mut servers = self.stun_servers.clone();
                for e in stun {
                    if !servers.contains(&e) {
                        servers.push(e);
                    }
                }
                let seen = self.dp.observed();
                let relay = self
                    .dp
                    .engine
                    .relay_rtt()
                    .map(|(a, r)| (a, r.as_secs_f64() * 1000.0));
                let client = self.stun.clone();
                self.tasks.spawn(until(self.stop.clone(), async move {
                    let n = crate::netcheck::run(&client, servers, seen, relay).await;
                    let _ = reply.send(Response::Netcheck(Box::new(n)));
                }));
                return None;
            }
            Request::Published => Response::Published(Box::new(self.published())),
            Request::ExitNode { node, fallback } => {
                self.routes
                    .set_exit(crate::routes_sync::ExitChoice { node, fallback });
                Response::Ok
            }
        };
        let _ = reply.send(answer);
        None
    }

    fn ping(&mut self, name: String, reply: oneshot::Sender<Response>) -> Option<Stop> {
        let peers = self.dp.status();
        let Some(peer) = peers.iter().find(|p| p.name.as_str() == name) else {
            let known: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
            let _ = reply.send(Response::Error {
                message: format!("no peer named {name:?}; peers: {}", known.join(", ")),
            });
            return None;
        };
        if !self.dp.ping(peer.id) {
            let _ = reply.send(Response::Error {
                message: format!("{name} is not in the data path yet"),
            });
            return None;
        }
        self.pings.push(PingWait {
            peer: peer.id,
            name,
            deadline: tokio::time::Instant::now() + PING_WAIT,
            reply,
        });
        None
    }

    fn expire_pings(&mut self) {
        let now = tokio::time::Instant::now();
        let (late, waiting) = std::mem::take(&mut self.pings)
            .into_iter()
            .partition(|w| w.deadline <= now);
        self.pings = waiting;
        for w in late {
            let _ = w.reply.send(Response::Error {
                message: format!("no reply from {} within {PING_WAIT:?}", w.name),
            });
        }
    }

    /// The rules that publish a port of this node, with each exit's public addresses, and the
    /// live published flows (`homeport plex setup`/`check`).
    fn published(&self) -> Published {
        use crate::control::{LiveFlow, PublishedPort};
        let mut rules = Vec::new();
        let (mut prefix_v4, mut prefix_v6) = (None, None);
        let mut exit_names = std::collections::HashMap::new();
        if let Some(m) = &self.map {
            prefix_v4 = Some(m.self_node.prefix_v4);
            prefix_v6 = Some(m.self_node.prefix_v6);
            for p in m.peers.values() {
                exit_names.insert(p.id, p.name.clone());
            }
            for r in m.publish.iter().filter(|r| r.target == m.self_node.id) {
                let exit = m.peers.get(&r.exit);
                let mut exit_public: Vec<std::net::IpAddr> = exit
                    .map(|p| {
                        p.endpoints
                            .iter()
                            .map(|e| e.addr.ip())
                            .filter(|ip| is_public(*ip))
                            .collect()
                    })
                    .unwrap_or_default();
                exit_public.sort();
                exit_public.dedup();
                rules.push(PublishedPort {
                    rule: r.id,
                    exit: r.exit_name.clone(),
                    proto: r.proto,
                    port: r.port,
                    target_port: r.target_port,
                    exit_public,
                    exit_mesh: exit
                        .map(|p| p.addrs)
                        .unwrap_or(homeport_proto::map::MeshAddrs {
                            ipv4: std::net::Ipv4Addr::UNSPECIFIED,
                            ipv6: std::net::Ipv6Addr::UNSPECIFIED,
                        }),
                    exit_online: exit.is_some_and(|p| p.online),
                    allow: r.guards.allow.clone(),
                });
            }
        }
        let now = std::time::Instant::now();
        let flows = self
            .dp
            .engine
            .flows
            .snapshot(now)
            .into_iter()
            .map(|(k, exit, confirmed, idle)| LiveFlow {
                proto: match k.proto {
                    homeport_engine::packet::PROTO_TCP => "tcp".into(),
                    homeport_engine::packet::PROTO_UDP => "udp".into(),
                    p => p.to_string(),
                },
                remote: std::net::SocketAddr::new(k.remote, k.remote_port),
                local_port: k.local_port,
                exit: exit_names
                    .get(&exit)
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_else(|| exit.to_string()),
                confirmed,
                idle_secs: idle.as_secs(),
            })
            .collect();
        Published {
            me: self.reg.name.clone(),
            addrs: self.reg.addrs,
            prefix_v4,
            prefix_v6,
            rules,
            flows,
        }
    }
}
