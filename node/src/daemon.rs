//! `homeport up`: registration, the data path, the map stream with live updates and persistence,
//! endpoint reports, the control socket and metrics.

use crate::config::{LogFormat, UpConfig};
use crate::control::{Request, Response, SelfStatus, Status};
use crate::datapath::{DEFAULT_MTU, Datapath, DatapathConfig, EVENT_QUEUE, PathInfo};
use crate::state::{Registration, SOCK_FILE, StateDir};
use anyhow::{Context, Result, bail};
use homeport_engine::Event;
use homeport_proto::addr::is_public;
use homeport_proto::api::{
    ApiError, EndpointReport, PATH_CHALLENGE, PATH_ENDPOINTS, PATH_MAP, PATH_REGISTER,
    RegisterRequest, RegisterResponse,
};
use homeport_proto::map::{Endpoint, EndpointKind, MAP_KEEPALIVE_SECS, MapMessage, NetworkMap};
use homeport_proto::register::RegisterChallenge;
use homeport_proto::{CAPABILITY_VERSION, PrivateKey};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Map observers (the exit) receive every new map through this.
pub type MapObserver = watch::Sender<Option<Arc<NetworkMap>>>;

/// Reconnect backoff: first retry after 500 ms, doubling up to 30 s. Short enough that a
/// restarted coordinator is found within seconds, long enough not to hammer a dead one.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// After a map stream that was up ends (the coordinator restarted, a network blip), retries stay
/// at most this far apart for [`MAP_FAST_RETRY_FOR`], so a node is current again within about
/// this long after the coordinator is back (doubling from 500 ms, a restart of a few seconds used
/// to cost 8-10 s). 10,000 nodes retrying every 2 s against a stopped coordinator are refused
/// connections, which cost it nothing.
const MAP_FAST_RETRY_MAX: Duration = Duration::from_secs(2);
const MAP_FAST_RETRY_FOR: Duration = Duration::from_secs(60);
/// The first retry after a lost stream waits a random part of this: prompt, but spread, so a
/// mesh whose streams all dropped at once does not reconnect in the same millisecond.
const MAP_FIRST_RETRY_JITTER: Duration = Duration::from_millis(500);

/// How long to wait before map stream attempt `attempt` (0: the first after the stream ended),
/// `since_lost` after the last stream that was up ended; `jitter` in [0, 1).
fn map_retry_delay(attempt: u32, since_lost: Duration, jitter: f64) -> Duration {
    if attempt == 0 {
        return MAP_FIRST_RETRY_JITTER.mul_f64(jitter);
    }
    let exp = BACKOFF_MIN.saturating_mul(1u32 << (attempt - 1).min(16));
    let cap = if since_lost < MAP_FAST_RETRY_FOR {
        MAP_FAST_RETRY_MAX
    } else {
        BACKOFF_MAX
    };
    // +-20 % so that nodes that lost their streams together drift apart.
    exp.min(cap).mul_f64(0.8 + 0.4 * jitter)
}
/// How often candidates are re-gathered (interfaces and STUN): NAT mappings and DHCP leases
/// change on the scale of minutes; 20 s finds a change well before a user gives up.
const ENDPOINT_REFRESH: Duration = Duration::from_secs(20);

/// Exit status of a node the coordinator refuses (EX_CONFIG from sysexits.h): an admin has to
/// act (a new auth key), so systemd must not restart it (`RestartPreventExitStatus=78`).
pub const EXIT_REFUSED: u8 = 78;

/// The coordinator refused this node (401): restarting will not help, an admin has to act. The
/// private key and state are kept.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

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

struct Shared {
    reg: Registration,
    dp: Mutex<Option<Datapath>>,
    map: RwLock<Option<NetworkMap>>,
    connected: AtomicBool,
    tun: String,
    /// The WireGuard socket's port (it moves when stale NAT state pins a lost path).
    listen_port: std::sync::atomic::AtomicU16,
    /// The port is fixed by `--listen-port`: never moved.
    fixed_port: bool,
    /// Wakes the endpoint reporter at once (a new map stream, or the socket moved).
    report_now: tokio::sync::Notify,
    /// Bumped after every endpoint report that [`Shared::report_now`] asked for: peers are then
    /// asked to probe at once, so they learn our (new) address and open towards it together.
    fresh_report: std::sync::atomic::AtomicU64,
    /// Wakes the probe asker after a fresh report.
    ask_now: tokio::sync::Notify,
    /// Wakes the TCP relay keeper: the engine found UDP to the relay unanswered.
    relay_failing: tokio::sync::Notify,
    /// The engine's Pongs, for `homeport ping`.
    pongs: tokio::sync::broadcast::Sender<Event>,
    public_key: homeport_proto::PublicKey,
    state: StateDir,
}

impl Shared {
    fn status(&self) -> Status {
        let map_version = self
            .map
            .read()
            .unwrap()
            .as_ref()
            .map(|m| m.version)
            .unwrap_or(0);
        let peers = self
            .dp
            .lock()
            .unwrap()
            .as_ref()
            .map(|d| d.status())
            .unwrap_or_default();
        Status {
            me: SelfStatus {
                id: self.reg.node_id,
                name: self.reg.name.clone(),
                public_key: self.public_key,
                addrs: self.reg.addrs,
                tun: self.tun.clone(),
                listen_port: self.listen_port.load(Ordering::Relaxed),
                coordinator: self.reg.coordinator.clone(),
                connected: self.connected.load(Ordering::Relaxed),
                map_version,
            },
            peers,
        }
    }
}

impl Shared {
    /// The rules that publish a port of this node, with each exit's public addresses, and the
    /// live published flows (`homeport plex setup`/`check`).
    fn published(&self) -> crate::control::Published {
        use crate::control::{LiveFlow, PublishedPort};
        let map = self.map.read().unwrap().clone();
        let mut rules = Vec::new();
        let (mut prefix_v4, mut prefix_v6) = (None, None);
        let mut exit_names = std::collections::HashMap::new();
        if let Some(m) = &map {
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
            .lock()
            .unwrap()
            .as_ref()
            .map(|d| d.engine.flows.snapshot(now))
            .unwrap_or_default()
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
        crate::control::Published {
            me: self.reg.name.clone(),
            addrs: self.reg.addrs,
            prefix_v4,
            prefix_v6,
            rules,
            flows,
        }
    }
}

/// Runs the node until `shutdown` is cancelled, `homeport down` is asked, or the coordinator
/// revokes this node (an error).
pub async fn run(
    cfg: UpConfig,
    shutdown: CancellationToken,
    maps: Option<MapObserver>,
) -> Result<()> {
    // Mesh names (dns.rs) follow the map, as the exit's publisher does.
    let maps = Some(maps.unwrap_or_else(|| watch::channel(None).0));
    let _dns = crate::dns::spawn(
        maps.as_ref().expect("set above").subscribe(),
        cfg.tun.clone(),
    );
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

    let reg = match stored {
        Some(r) if r.coordinator == coordinator && !r.refused => r,
        prev => {
            let dir = cfg.state_dir.display();
            let Some(source) = &cfg.authkey else {
                if prev.as_ref().is_some_and(|r| r.refused) {
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
            let previous_ipv4 = prev
                .as_ref()
                .filter(|r| r.coordinator == coordinator)
                .map(|r| r.addrs.ipv4);
            let r = register(
                &client,
                &coordinator,
                &pin,
                &key,
                &authkey,
                &cfg.hostname,
                previous_ipv4,
                &shutdown,
            )
            .await?;
            st.save_registration(&r)?;
            tracing::info!(name = %r.name, ipv4 = %r.addrs.ipv4, ipv6 = %r.addrs.ipv6, "registered");
            r
        }
    };
    let port = cfg.listen_port.unwrap_or(reg.listen_port);
    let public_key = key.public_key();
    let (side_tx, side_rx) = std::sync::mpsc::sync_channel(crate::stun::STUN_QUEUE);
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    let dp = Datapath::start(
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
    )?;
    let listen_port = dp.local_port();
    dp.engine.set_rebind_allowed(cfg.listen_port.is_none());
    if reg.listen_port != listen_port {
        let mut r = reg.clone();
        r.listen_port = listen_port;
        st.save_registration(&r)?;
    }
    // The last map keeps the mesh working while the coordinator is unreachable.
    let last = st.map()?.filter(|m| m.self_node.id == reg.node_id);
    if let Some(m) = &last {
        dp.apply_map(m);
        tracing::info!(
            version = m.version,
            peers = m.peers.len(),
            "applied the stored map"
        );
        if let Some(o) = &maps {
            o.send_replace(Some(Arc::new(m.clone())));
        }
    }
    let shared = Arc::new(Shared {
        reg: reg.clone(),
        dp: Mutex::new(Some(dp)),
        map: RwLock::new(last),
        connected: AtomicBool::new(false),
        tun: cfg.tun.clone(),
        listen_port: std::sync::atomic::AtomicU16::new(listen_port),
        fixed_port: cfg.listen_port.is_some(),
        report_now: tokio::sync::Notify::new(),
        fresh_report: std::sync::atomic::AtomicU64::new(0),
        ask_now: tokio::sync::Notify::new(),
        relay_failing: tokio::sync::Notify::new(),
        pongs: tokio::sync::broadcast::channel(16).0,
        public_key,
        state: st,
    });

    let stop = shutdown.child_token();
    let sock_path = cfg.state_dir.join(SOCK_FILE);
    let _ = std::fs::remove_file(&sock_path);
    let listener = tokio::net::UnixListener::bind(&sock_path)
        .with_context(|| format!("binding the control socket {}", sock_path.display()))?;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))?;
    let (stun_tx, stun_rx) = tokio::sync::mpsc::channel(crate::stun::STUN_QUEUE);
    let stun_rx = Arc::new(tokio::sync::Mutex::new(stun_rx));
    tokio::spawn(control_server(
        listener,
        shared.clone(),
        stun_rx.clone(),
        stop.clone(),
    ));
    if let Some(addr) = cfg.metrics_listen {
        let l = homeport_host::metrics::bind(addr).await?;
        let mut registry = homeport_host::metrics::registry("node");
        registry.register_collector(Box::new(NodeMetrics(shared.clone())));
        tokio::spawn(homeport_host::metrics::serve(
            l,
            Arc::new(registry),
            stop.clone(),
        ));
    }
    std::thread::Builder::new()
        .name("side".into())
        .spawn(move || {
            while let Ok(m) = side_rx.recv() {
                if stun_tx.blocking_send(m).is_err() {
                    break;
                }
            }
        })?;
    tokio::spawn(tcp_relay_keeper(
        client.clone(),
        coordinator.clone(),
        shared.clone(),
        stop.clone(),
    ));
    tokio::spawn(probe_asker(
        client.clone(),
        coordinator.clone(),
        reg.credential.clone(),
        shared.clone(),
        stop.clone(),
    ));
    tokio::spawn(engine_events(events_rx, shared.clone(), stop.clone()));
    tokio::spawn(endpoint_reporter(
        client.clone(),
        coordinator.clone(),
        reg.credential.clone(),
        shared.clone(),
        stun_rx,
        stop.clone(),
    ));
    {
        // Paths, handshakes and traffic for the admin overview (the dashboard).
        let s = shared.clone();
        tokio::spawn(crate::report::run(
            client.clone(),
            coordinator.clone(),
            reg.credential.clone(),
            format!("homeport {}", env!("CARGO_PKG_VERSION")),
            move || {
                s.connected
                    .load(Ordering::Relaxed)
                    .then(|| s.status().peers)
            },
            stop.clone(),
        ));
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(tun = %cfg.tun, port = listen_port, "homeport node up");

    let result = tokio::select! {
        r = map_loop(&client, &coordinator, &reg.credential, &shared, maps.as_ref(), &stop) => r,
        _ = stop.cancelled() => Ok(()),
    };
    stop.cancel();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    if let Some(dp) = shared.dp.lock().unwrap().take() {
        dp.stop();
    }
    let _ = std::fs::remove_file(&sock_path);
    if let Err(e) = &result
        && e.downcast_ref::<Refused>().is_some()
    {
        // Keep the key and the registration (marked refused) so that `homeport up
        // --authkey-file NEW` joins again with the same key and address.
        let mut r = shared.reg.clone();
        r.refused = true;
        if let Err(e) = shared.state.save_registration(&r) {
            tracing::warn!(error = %e, "cannot mark the registration as refused");
        }
        tracing::error!("{e}");
    }
    tracing::info!("homeport node stopped");
    result
}

/// Reads an error answer of the coordinator: its `detail`, or the status alone.
async fn api_error(resp: reqwest::Response) -> String {
    let status = resp.status();
    match resp.json::<ApiError>().await {
        Ok(e) => format!("{status} {}: {}", e.error, e.detail),
        Err(_) => status.to_string(),
    }
}

/// Registers this node's key, proving that it holds the private key: a fresh challenge from
/// the coordinator (over the pinned TLS connection), then the register request with the proof.
/// Retries while the coordinator is unreachable; a refusal (4xx) is final.
#[allow(clippy::too_many_arguments)]
async fn register(
    client: &reqwest::Client,
    url: &str,
    pin: &str,
    key: &PrivateKey,
    authkey: &str,
    hostname: &str,
    previous_ipv4: Option<std::net::Ipv4Addr>,
    shutdown: &CancellationToken,
) -> Result<Registration> {
    let mut backoff = BACKOFF_MIN;
    loop {
        match register_once(client, url, key, authkey, hostname, previous_ipv4).await {
            Ok(Ok(r)) => {
                return Ok(Registration {
                    coordinator: url.to_string(),
                    pin: pin.to_string(),
                    node_id: r.node_id,
                    name: r.name,
                    addrs: r.addrs,
                    prefix_v4: r.prefix_v4,
                    prefix_v6: r.prefix_v6,
                    credential: r.credential,
                    listen_port: 0,
                    refused: false,
                });
            }
            Ok(Err(refusal)) => return Err(refusal),
            Err(why) => tracing::warn!(reason = %why, "registration failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => bail!("stopped before registration"),
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One registration attempt. Outer error: worth retrying (network, 5xx); inner error: refused.
async fn register_once(
    client: &reqwest::Client,
    url: &str,
    key: &PrivateKey,
    authkey: &str,
    hostname: &str,
    previous_ipv4: Option<std::net::Ipv4Addr>,
) -> std::result::Result<Result<RegisterResponse>, String> {
    let resp = client
        .post(format!("{url}{PATH_CHALLENGE}"))
        .send()
        .await
        .map_err(|e| format!("coordinator unreachable: {}", error_chain(&e)))?;
    if resp.status().is_server_error() {
        return Err(format!("challenge: {}", api_error(resp).await));
    }
    if !resp.status().is_success() {
        let why = api_error(resp).await;
        return Ok(Err(anyhow::anyhow!(
            "the coordinator gave no registration challenge ({why}); it may be older than this node (capability version {CAPABILITY_VERSION} needs POST {PATH_CHALLENGE})"
        )));
    }
    let ch: RegisterChallenge = resp
        .json()
        .await
        .map_err(|e| format!("reading the challenge: {}", error_chain(&e)))?;
    let mut body = RegisterRequest {
        authkey: authkey.to_string(),
        public_key: key.public_key(),
        hostname: hostname.to_string(),
        capver: CAPABILITY_VERSION,
        previous_ipv4,
        challenge: Some(ch.challenge.clone()),
        proof: None,
    };
    body.proof = match homeport_proto::register::prove(key, &ch.coordinator_key, &body) {
        Ok(p) => Some(p),
        Err(e) => {
            return Ok(Err(anyhow::anyhow!(
                "the coordinator's challenge is unusable: {e}"
            )));
        }
    };
    let resp = client
        .post(format!("{url}{PATH_REGISTER}"))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("coordinator unreachable: {}", error_chain(&e)))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp
            .json::<RegisterResponse>()
            .await
            .context("reading the registration answer"));
    }
    let why = api_error(resp).await;
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Ok(Err(Refused(format!(
            "the coordinator refused registration ({why}); the private key is kept. \
             Ask its admin for a new auth key (`homeport-coordinator authkey create`) and run \
             homeport up --authkey-file FILE (or set HOMEPORT_AUTHKEY)"
        ))
        .into()));
    }
    if status.is_client_error() {
        // A bad hostname or a full address pool does not heal by restarting either.
        return Ok(Err(Refused(format!(
            "the coordinator refused registration ({why}); fix what it names, then start again"
        ))
        .into()));
    }
    Err(format!("register: {why}"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

enum StreamEnd {
    /// The coordinator does not know our credential any more: we were removed.
    Revoked(String),
    Closed(String),
}

async fn map_loop(
    client: &reqwest::Client,
    url: &str,
    cred: &str,
    shared: &Shared,
    maps: Option<&MapObserver>,
    stop: &CancellationToken,
) -> Result<()> {
    let mut attempt: u32 = 0;
    let mut lost = std::time::Instant::now();
    loop {
        let mut was_up = false;
        let end = map_stream(client, url, cred, shared, maps, &mut was_up).await;
        shared.connected.store(false, Ordering::Relaxed);
        if was_up {
            attempt = 0;
            lost = std::time::Instant::now();
        }
        let backoff = map_retry_delay(attempt, lost.elapsed(), rand::random::<f64>());
        match end {
            StreamEnd::Revoked(why) => {
                return Err(Refused(format!(
                    "the coordinator no longer accepts this node's credential ({why}): its admin removed it, \
                     or this key registered again elsewhere. The node stops; its private key and state in {} are kept. \
                     To join again with the same key and address: homeport up --authkey-file FILE \
                     (a new key from `homeport-coordinator authkey create`, or HOMEPORT_AUTHKEY); \
                     to forget the registration: homeport logout",
                    shared.state.dir.display()
                ))
                .into());
            }
            StreamEnd::Closed(why) => {
                tracing::warn!(reason = %why, retry_in = ?backoff, "map stream ended; reconnecting")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return Ok(()),
        }
        attempt = attempt.saturating_add(1);
    }
}

async fn map_stream(
    client: &reqwest::Client,
    url: &str,
    cred: &str,
    shared: &Shared,
    maps: Option<&MapObserver>,
    was_up: &mut bool,
) -> StreamEnd {
    let resp = match client
        .get(format!("{url}{PATH_MAP}"))
        .bearer_auth(cred)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return StreamEnd::Closed(error_chain(&e)),
    };
    if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
        return StreamEnd::Revoked(api_error(resp).await);
    }
    if !resp.status().is_success() {
        return StreamEnd::Closed(format!("status {}", resp.status()));
    }
    let mut resp = resp;
    let mut buf: Vec<u8> = Vec::new();
    let silence = Duration::from_secs(3 * MAP_KEEPALIVE_SECS);
    loop {
        let chunk = match tokio::time::timeout(silence, resp.chunk()).await {
            Err(_) => return StreamEnd::Closed(format!("nothing heard for {silence:?}")),
            Ok(Err(e)) => return StreamEnd::Closed(error_chain(&e)),
            Ok(Ok(None)) => return StreamEnd::Closed("closed by the coordinator".into()),
            Ok(Ok(Some(c))) => c,
        };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = &line[..line.len() - 1];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let msg: MapMessage = match serde_json::from_slice(line) {
                Ok(m) => m,
                Err(e) => return StreamEnd::Closed(format!("bad map message: {e}")),
            };
            if msg.full {
                shared.connected.store(true, Ordering::Relaxed);
                *was_up = true;
            }
            if msg.is_keepalive() {
                continue;
            }
            let full = msg.full;
            if let Err(e) = apply_message(shared, maps, msg) {
                return StreamEnd::Closed(e.to_string());
            }
            if full {
                // A (re)connected stream: report our endpoints now (STUN needs the map's
                // servers), and have peers probe us as soon as they are known.
                shared.report_now.notify_one();
            }
        }
    }
}

fn apply_message(shared: &Shared, maps: Option<&MapObserver>, mut msg: MapMessage) -> Result<()> {
    let probes = std::mem::take(&mut msg.probe_requests);
    if !probes.is_empty() {
        if let Some(dp) = shared.dp.lock().unwrap().as_ref() {
            for p in &probes {
                let eps: Vec<SocketAddr> = p.endpoints.iter().map(|e| e.addr).collect();
                dp.probe_now(p.from, &eps);
            }
        }
        if msg.is_keepalive() {
            return Ok(());
        }
    }
    let new = {
        let mut cur = shared.map.write().unwrap();
        let m = match cur.take() {
            Some(mut m) => {
                let r = m.apply(msg);
                if let Err(e) = r {
                    *cur = Some(m);
                    return Err(e.into());
                }
                m
            }
            None => NetworkMap::from_full(msg)?,
        };
        *cur = Some(m.clone());
        m
    };
    if let Some(dp) = shared.dp.lock().unwrap().as_ref() {
        dp.apply_map(&new);
    }
    tracing::debug!(
        version = new.version,
        peers = new.peers.len(),
        "map applied"
    );
    if let Err(e) = shared.state.save_map(&new) {
        tracing::warn!(error = %e, "could not persist the map");
    }
    if let Some(o) = maps {
        o.send_replace(Some(Arc::new(new)));
    }
    Ok(())
}

async fn control_server(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
    stun_rx: StunRx,
    stop: CancellationToken,
) {
    loop {
        let (s, _) = tokio::select! {
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
            _ = stop.cancelled() => return,
        };
        let shared = shared.clone();
        let stop = stop.clone();
        let stun_rx = stun_rx.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(Request::Status) => Response::Status(Box::new(shared.status())),
                Ok(Request::Down) => {
                    stop.cancel();
                    Response::Ok
                }
                Ok(Request::Ping { peer }) => ping(&shared, &peer).await,
                Ok(Request::Netcheck { stun }) => {
                    Response::Netcheck(Box::new(netcheck(&shared, &stun_rx, stun).await))
                }
                Ok(Request::Published) => Response::Published(Box::new(shared.published())),
                Err(e) => Response::Error {
                    message: format!(
                        "bad request {:?}: {e}; expected {{\"cmd\":\"status\"|\"down\"|\"ping\"|\"netcheck\"|\"published\"}}",
                        line.trim()
                    ),
                },
            };
            let mut out = serde_json::to_string(&resp).unwrap_or_default();
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}

async fn ping(shared: &Shared, name: &str) -> Response {
    let st = shared.status();
    let Some(peer) = st.peers.iter().find(|p| p.name.as_str() == name) else {
        let known: Vec<&str> = st.peers.iter().map(|p| p.name.as_str()).collect();
        return Response::Error {
            message: format!("no peer named {name:?}; peers: {}", known.join(", ")),
        };
    };
    let mut pongs = shared.pongs.subscribe();
    let ok = shared
        .dp
        .lock()
        .unwrap()
        .as_ref()
        .map(|d| d.ping(peer.id))
        .unwrap_or(false);
    if !ok {
        return Response::Error {
            message: "the data path is not running".into(),
        };
    }
    let pong = async {
        loop {
            match pongs.recv().await {
                Ok(Event::Pong {
                    peer: p,
                    from,
                    rtt,
                    via_relay,
                }) if p == peer.id => return Some((from, rtt, via_relay)),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    };
    if let Ok(Some((from, rtt, via_relay))) =
        tokio::time::timeout(Duration::from_secs(1), pong).await
    {
        let path = if via_relay {
            format!("relay {from}")
        } else {
            format!("direct {from}")
        };
        return Response::Pong {
            path,
            rtt_ms: rtt.as_secs_f64() * 1000.0,
        };
    }
    Response::Error {
        message: format!("no reply from {name} within 1 s"),
    }
}

async fn netcheck(
    shared: &Shared,
    stun_rx: &StunRx,
    extra: Vec<SocketAddr>,
) -> crate::control::Netcheck {
    let mut servers: Vec<SocketAddr> = shared
        .map
        .read()
        .unwrap()
        .as_ref()
        .map(|m| m.relays.iter().filter_map(|r| r.stun).collect())
        .unwrap_or_default();
    for e in extra {
        if !servers.contains(&e) {
            servers.push(e);
        }
    }
    let mut stun = vec![];
    for s in servers {
        stun.push((s, stun_query(shared, s, stun_rx).await));
    }
    let (seen_by_peers, relay) = {
        let dp = shared.dp.lock().unwrap();
        match dp.as_ref() {
            Some(d) => (
                d.observed(),
                d.engine
                    .relay_rtt()
                    .map(|(a, r)| (a, r.as_secs_f64() * 1000.0)),
            ),
            None => (vec![], None),
        }
    };
    let mut seen: Vec<SocketAddr> = stun.iter().filter_map(|(_, a)| *a).collect();
    seen.extend(
        seen_by_peers
            .iter()
            .map(|(_, a)| *a)
            // A peer's view of us counts only from outside our NATs.
            .filter(|a| is_public(a.ip())),
    );
    seen.sort();
    seen.dedup();
    let answered = stun.iter().filter(|(_, a)| a.is_some()).count() + seen_by_peers.len();
    let mapping = if answered < 2 {
        "unknown: only one outside view of this node (pass --stun HOST:PORT for a second STUN server)".to_string()
    } else if seen.len() <= 1 {
        "easy: one mapping for all destinations (endpoint-independent), direct paths work"
            .to_string()
    } else {
        format!(
            "hard: a different mapping per destination ({}), direct paths need the other side to be easy; the relay carries the rest",
            seen.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    crate::control::Netcheck {
        udp: stun.iter().any(|(_, a)| a.is_some()),
        stun,
        seen_by_peers,
        mapping,
        relay,
    }
}

/// Local candidates: this host's IPv4 addresses (not loopback, not the mesh) with our port.
fn local_candidates(port: u16, shared: &Shared) -> Vec<Endpoint> {
    let mut v = vec![];
    for ip in homeport_host::net::interface_addrs() {
        let IpAddr::V4(v4) = ip else { continue };
        if v4.is_loopback()
            || v4.is_link_local()
            || v4.is_unspecified()
            || shared.reg.prefix_v4.contains(&v4)
        {
            continue;
        }
        v.push(Endpoint {
            addr: SocketAddr::new(ip, port),
            kind: EndpointKind::Local,
        });
    }
    v
}

async fn endpoint_reporter(
    client: reqwest::Client,
    url: String,
    cred: String,
    shared: Arc<Shared>,
    stun_rx: StunRx,
    stop: CancellationToken,
) {
    let mut reported: Option<Vec<Endpoint>> = None;
    let mut was_connected = false;
    let mut asked_for = false;
    let mut depth_measured: Option<tokio::time::Instant> = None;
    loop {
        // How many NAT layers sit in front of us decides the TTL of hole-punching openers.
        let stun_server = shared
            .map
            .read()
            .unwrap()
            .as_ref()
            .and_then(|m| m.relays.iter().find_map(|r| r.stun));
        // Measured alongside STUN below: both take a round trip.
        let depth = match stun_server {
            Some(server)
                if depth_measured.is_none_or(|t| t.elapsed() > Duration::from_secs(300)) =>
            {
                depth_measured = Some(tokio::time::Instant::now());
                Some(tokio::task::spawn_blocking(move || nat_depth(server)))
            }
            _ => None,
        };
        let mut eps = local_candidates(shared.listen_port.load(Ordering::Relaxed), &shared);
        // STUN through the WireGuard socket, against the coordinator's STUN server(s).
        let servers: Vec<SocketAddr> = shared
            .map
            .read()
            .unwrap()
            .as_ref()
            .map(|m| m.relays.iter().filter_map(|r| r.stun).collect())
            .unwrap_or_default();
        let mut reflexive = None;
        for server in servers {
            if let Some(addr) = stun_query(&shared, server, &stun_rx).await {
                reflexive.get_or_insert(addr);
                if !eps.iter().any(|e| e.addr == addr) {
                    eps.push(Endpoint {
                        addr,
                        kind: EndpointKind::Stun,
                    });
                }
            }
        }
        if let Some(addr) = reflexive
            && let Some(dp) = shared.dp.lock().unwrap().as_ref()
        {
            dp.engine.set_reflexive(Some(addr));
        }
        if let Some(depth) = depth {
            let d = depth.await.ok().flatten();
            tracing::info!(opener_ttl = ?d, "NAT depth measured");
            if let Some(dp) = shared.dp.lock().unwrap().as_ref() {
                dp.set_open_ttl(d.unwrap_or(0));
            }
        }
        // What the coordinator would refuse (and the whole report with it).
        eps.retain(|e| homeport_proto::api::endpoint_problem(e.addr).is_none());
        eps.truncate(homeport_proto::api::MAX_ENDPOINTS);
        let connected = shared.connected.load(Ordering::Relaxed);
        // Report on change, and again after every reconnection (the coordinator may be new).
        if connected && (reported.as_ref() != Some(&eps) || !was_connected) {
            let r = client
                .post(format!("{url}{PATH_ENDPOINTS}"))
                .bearer_auth(&cred)
                .json(&EndpointReport {
                    endpoints: eps.clone(),
                })
                .send()
                .await;
            match r {
                Ok(resp) if resp.status().is_success() => {
                    tracing::info!(endpoints = ?eps.iter().map(|e| e.addr).collect::<Vec<_>>(), "endpoints reported");
                    reported = Some(eps);
                    if std::mem::take(&mut asked_for) {
                        shared.fresh_report.fetch_add(1, Ordering::Relaxed);
                        shared.ask_now.notify_one();
                    }
                }
                Ok(resp) => tracing::warn!(status = %resp.status(), "endpoint report refused"),
                Err(e) => tracing::debug!(error = %error_chain(&e), "endpoint report failed"),
            }
        }
        was_connected = connected;
        let wait = if reported.is_none() || !connected {
            Duration::from_secs(1)
        } else {
            ENDPOINT_REFRESH
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.report_now.notified() => asked_for = true,
            _ = stop.cancelled() => return,
        }
    }
}

/// Acts on the engine's events: the socket move it asks for, the TCP/TLS relay fallback, and
/// Pongs for whoever waits in `homeport ping`.
async fn engine_events(
    mut rx: tokio::sync::mpsc::Receiver<Event>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = stop.cancelled() => return,
        };
        match ev {
            None => return,
            Some(Event::RebindWanted) => rebind_if_asked(&shared),
            Some(Event::RelayUdpFailing { .. }) => shared.relay_failing.notify_one(),
            Some(pong @ Event::Pong { .. }) => {
                // Nobody waiting is the usual case (probes get Pongs every few seconds).
                let _ = shared.pongs.send(pong);
            }
        }
    }
}

/// Moves the WireGuard socket to a fresh port when the engine asks (a direct path that worked
/// from this port cannot be found again: stale NAT state pins it), then has the new address
/// learned by STUN and reported at once.
fn rebind_if_asked(shared: &Shared) {
    let port = {
        let dp = shared.dp.lock().unwrap();
        let Some(dp) = dp.as_ref() else { return };
        if !dp.engine.take_rebind(std::time::Instant::now()) || shared.fixed_port {
            return;
        }
        match dp.rebind() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not move the WireGuard socket");
                return;
            }
        }
    };
    let old = shared.listen_port.swap(port, Ordering::Relaxed);
    tracing::info!(old, new = port, "WireGuard socket moved to a fresh port");
    let mut r = shared.reg.clone();
    r.listen_port = port;
    if let Err(e) = shared.state.save_registration(&r) {
        tracing::warn!(error = %e, "could not save the new port");
    }
    shared.report_now.notify_one();
}

/// Asks the coordinator to make peers without a direct path probe us now, so both sides probe
/// at the same moment (that is what opens two NATs). At most once per [`PROBE_ASK_EVERY`] per
/// peer: enough to catch a peer whose NAT mapping changed, cheap for the coordinator.
async fn probe_asker(
    client: reqwest::Client,
    url: String,
    cred: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut asked: std::collections::HashMap<homeport_proto::NodeId, tokio::time::Instant> =
        Default::default();
    let mut reports_seen = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shared.ask_now.notified() => {}
            _ = stop.cancelled() => return,
        }
        let reports = shared.fresh_report.load(Ordering::Relaxed);
        if reports != reports_seen {
            // Our (new) address is at the coordinator: ask every peer again now.
            reports_seen = reports;
            asked.clear();
        }
        if !shared.connected.load(Ordering::Relaxed) {
            continue;
        }
        let want: Vec<homeport_proto::NodeId> = {
            let dp = shared.dp.lock().unwrap();
            let Some(dp) = dp.as_ref() else { continue };
            if !dp.engine.nat_depth_known() {
                continue;
            }
            dp.status()
                .into_iter()
                .filter(|p| {
                    p.online
                        && !matches!(p.path, PathInfo::Direct { .. })
                        && dp.engine.has_public_candidate(p.id)
                })
                .map(|p| p.id)
                .collect()
        };
        let now = tokio::time::Instant::now();
        for id in want {
            if asked
                .get(&id)
                .is_some_and(|t| now.duration_since(*t) < PROBE_ASK_EVERY)
            {
                continue;
            }
            asked.insert(id, now);
            if let Some(dp) = shared.dp.lock().unwrap().as_ref() {
                dp.start_attempt(id);
            }
            let r = client
                .post(format!("{url}{}", homeport_proto::api::PATH_PROBE))
                .bearer_auth(&cred)
                .json(&homeport_proto::api::ProbeAsk { peer: id })
                .send()
                .await;
            if let Err(e) = r {
                tracing::debug!(error = %error_chain(&e), "probe request failed");
            }
        }
    }
}

/// Keeps the relay's TCP/TLS fallback up while UDP to the relay goes unanswered: the node then
/// still reaches every peer (through the coordinator's HTTPS port, which it reaches anyway).
/// Bytes of relay frames written to, and read from, the TCP/TLS fallback at once.
const TCP_RELAY_BATCH: usize = 64 * 1024;

async fn tcp_relay_keeper(
    client: reqwest::Client,
    url: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    loop {
        tokio::select! {
            _ = shared.relay_failing.notified() => {}
            _ = stop.cancelled() => return,
        }
        let relay = {
            let dp = shared.dp.lock().unwrap();
            match dp.as_ref() {
                Some(d) if !d.tcp_relay_active() => {
                    d.engine.relay_udp_failing(std::time::Instant::now())
                }
                _ => None,
            }
        };
        let Some(relay) = relay else { continue };
        let resp = client
            .get(format!("{url}{}", homeport_proto::api::PATH_RELAY_TCP))
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, homeport_proto::api::RELAY_UPGRADE)
            .send()
            .await;
        let up = match resp {
            Ok(r) if r.status() == reqwest::StatusCode::SWITCHING_PROTOCOLS => {
                match r.upgrade().await {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::warn!(error = %error_chain(&e), "relay over TCP: upgrade failed");
                        continue;
                    }
                }
            }
            Ok(r) => {
                tracing::warn!(status = %r.status(), "relay over TCP refused");
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %error_chain(&e), "relay over TCP: no connection");
                continue;
            }
        };
        tracing::warn!(%relay, "UDP to the relay is blocked: relaying over TCP/TLS to the coordinator");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
        if let Some(d) = shared.dp.lock().unwrap().as_ref() {
            d.set_tcp_relay(Some((relay, tx)));
        }
        let (r, mut w) = tokio::io::split(up);
        let writer = tokio::spawn(async move {
            // Datagrams queued meanwhile go out with the first one: one TLS record and one
            // write per batch, not per datagram.
            let mut batch =
                Vec::with_capacity(TCP_RELAY_BATCH + homeport_proto::relay::TCP_FRAME_MAX);
            while let Some(b) = rx.recv().await {
                batch.clear();
                let _ = homeport_proto::relay::tcp_frame(&mut batch, &b);
                while batch.len() < TCP_RELAY_BATCH {
                    let Ok(b) = rx.try_recv() else { break };
                    let _ = homeport_proto::relay::tcp_frame(&mut batch, &b);
                }
                if w.write_all(&batch).await.is_err() {
                    break;
                }
            }
        });
        let mut r = tokio::io::BufReader::with_capacity(TCP_RELAY_BATCH, r);
        let mut buf = vec![0u8; 65536];
        loop {
            // The whole frames already read go to the data path at once (one TUN write for
            // the batch); a frame cut by the buffer's end is read on its own.
            let avail = tokio::select! {
                a = r.fill_buf() => match a { Ok(a) if !a.is_empty() => a, _ => break },
                _ = stop.cancelled() => break,
            };
            let whole = homeport_proto::relay::tcp_frames_len(avail);
            if whole > 0 {
                if let Some(d) = shared.dp.lock().unwrap().as_ref() {
                    d.relay_input_frames(relay, &avail[..whole]);
                }
                r.consume(whole);
                continue;
            }
            let mut len = [0u8; homeport_proto::relay::TCP_FRAME_HEADER];
            if r.read_exact(&mut len).await.is_err() {
                break;
            }
            let n = homeport_proto::relay::tcp_frame_len(len);
            if r.read_exact(&mut buf[..n]).await.is_err() {
                break;
            }
            if let Some(d) = shared.dp.lock().unwrap().as_ref() {
                d.relay_input(relay, &buf[..n]);
            }
        }
        writer.abort();
        if let Some(d) = shared.dp.lock().unwrap().as_ref() {
            d.set_tcp_relay(None);
        }
        tracing::warn!("relay over TCP/TLS ended");
    }
}

const PROBE_ASK_EVERY: Duration = Duration::from_secs(10);

/// Hops probed when measuring the NAT depth (home router + carrier NAT + a few ISP routers).
const NAT_DEPTH_MAX_TTL: u8 = 8;
/// How long the NAT depth measurement waits for hops that do not answer (silent routers).
const NAT_DEPTH_WAIT: Duration = Duration::from_millis(400);

/// What one TTL-limited probe towards the STUN server met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// Nothing yet (or a router that sends no ICMP).
    Silent,
    /// An ICMP time-exceeded from this router.
    Router(IpAddr),
    /// The STUN server itself answered.
    Target,
}

/// The opener TTL from a traceroute's hops (index 0 = TTL 1): the hop number of the first
/// public router or of the target when private/CGNAT routers come before it; Some(0) when none
/// do (no NAT in front of us). None while undecided: a lower hop is still `Silent` and `done`
/// is false, or nothing public was reached.
fn nat_depth_from_hops(hops: &[Hop], done: bool) -> Option<u8> {
    let mut last_private = 0u8;
    for (i, hop) in hops.iter().enumerate() {
        let ttl = i as u8 + 1;
        match hop {
            Hop::Target => return Some(if last_private == 0 { 0 } else { ttl }),
            Hop::Router(ip) if is_public(*ip) => {
                return Some(if last_private == 0 { 0 } else { ttl });
            }
            Hop::Router(_) => last_private = ttl,
            Hop::Silent if !done => return None,
            Hop::Silent => {}
        }
    }
    None
}

/// Traceroute towards `target` (a STUN server), every TTL at once from its own socket, so it
/// takes one round trip rather than one per hop: the TTL that just leaves our outermost NAT
/// (see [`nat_depth_from_hops`]); None when nothing answered.
fn nat_depth(target: SocketAddr) -> Option<u8> {
    use quinn_udp::{UdpSockRef, UdpSocketState};
    let mut probes = vec![];
    for ttl in 1..=NAT_DEPTH_MAX_TTL {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        let state = UdpSocketState::new(UdpSockRef::from(&sock)).ok()?;
        state
            .enable_transport_errors(UdpSockRef::from(&sock))
            .ok()?;
        sock.set_nonblocking(true).ok()?;
        sock.set_ttl(ttl as u32).ok()?;
        let txid: [u8; 12] = rand::random();
        let _ = sock.send_to(&crate::stun::binding_request(txid), target);
        probes.push((sock, state, txid));
    }
    let mut hops = vec![Hop::Silent; probes.len()];
    let deadline = std::time::Instant::now() + NAT_DEPTH_WAIT;
    let mut buf = [0u8; 1500];
    loop {
        for (i, (sock, state, txid)) in probes.iter().enumerate() {
            if hops[i] != Hop::Silent {
                continue;
            }
            while let Ok(Some(e)) = state.recv_transport_error(UdpSockRef::from(sock)) {
                if let Some(a) = e.addr
                    && a.ip() != target.ip()
                {
                    hops[i] = Hop::Router(a.ip());
                }
            }
            if let Ok((n, from)) = sock.recv_from(&mut buf)
                && from == target
                && crate::stun::parse_binding_response(&buf[..n]).is_ok_and(|(id, _)| id == *txid)
            {
                hops[i] = Hop::Target;
            }
        }
        let done = std::time::Instant::now() >= deadline;
        if let Some(d) = nat_depth_from_hops(&hops, done) {
            return Some(d);
        }
        if done {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One STUN Binding transaction from the WireGuard socket. Three tries, 300 ms apart.
type StunRx = Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<(SocketAddr, Vec<u8>)>>>;

async fn stun_query(shared: &Shared, server: SocketAddr, rx: &StunRx) -> Option<SocketAddr> {
    let mut rx = rx.lock().await;
    let txid: [u8; 12] = rand::random();
    let req = crate::stun::binding_request(txid);
    for _ in 0..3 {
        if let Some(dp) = shared.dp.lock().unwrap().as_ref() {
            dp.send_raw(server, &req);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some((_from, d))) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if let Ok((id, addr)) = crate::stun::parse_binding_response(&d)
                && id == txid
            {
                return Some(addr);
            }
        }
    }
    None
}

/// The node's metrics (`homeport_node_*`), read from the daemon and its data path at each
/// scrape.
struct NodeMetrics(Arc<Shared>);

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeMetrics")
    }
}

impl homeport_host::metrics::Collector for NodeMetrics {
    fn encode(
        &self,
        mut enc: homeport_host::metrics::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        encode_status_metrics(&self.0.status(), &mut enc)?;
        if let Some(dp) = self.0.dp.lock().unwrap().as_ref() {
            dp.encode_metrics(&mut enc)?;
        }
        Ok(())
    }
}

fn encode_status_metrics(
    st: &Status,
    enc: &mut homeport_host::metrics::DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    use homeport_host::metrics::{Unit, counter_family, gauge, gauge_family};
    gauge(
        enc,
        "map_version",
        "Version of the last map applied",
        st.me.map_version as i64,
    )?;
    gauge(
        enc,
        "connected",
        "1 while the map stream from the coordinator is open",
        st.me.connected as i64,
    )?;
    type Counter = fn(&crate::datapath::PeerStatus) -> u64;
    let counters: [(&str, &str, Option<Unit>, Counter); 3] = [
        (
            "peer_rx",
            "Bytes received from each peer",
            Some(Unit::Bytes),
            |p| p.rx_bytes,
        ),
        (
            "peer_tx",
            "Bytes sent to each peer",
            Some(Unit::Bytes),
            |p| p.tx_bytes,
        ),
        (
            "peer_handshakes",
            "WireGuard handshakes completed with each peer",
            None,
            |p| p.handshakes,
        ),
    ];
    for (name, help, unit, value) in counters {
        counter_family(
            enc,
            name,
            help,
            unit.as_ref(),
            st.peers
                .iter()
                .map(|p| ([("peer", p.name.as_str())], value(p))),
        )?;
    }
    gauge_family(
        enc,
        "peer_path",
        "1 for the path each peer's traffic takes now (kind: direct or relay)",
        st.peers.iter().flat_map(|p| {
            let (d, r) = match p.path {
                PathInfo::Direct { .. } => (1, 0),
                PathInfo::Relay { .. } => (0, 1),
                PathInfo::None => (0, 0),
            };
            [
                ([("peer", p.name.as_str()), ("kind", "direct")], d),
                ([("peer", p.name.as_str()), ("kind", "relay")], r),
            ]
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::{Hop, nat_depth_from_hops};

    #[test]
    fn a_lost_map_stream_is_retried_promptly_then_at_most_every_2_s_for_a_minute() {
        use super::{BACKOFF_MAX, map_retry_delay};
        use std::time::Duration;
        let s = Duration::from_secs;
        // The first retry: within 500 ms, spread by the jitter.
        assert_eq!(map_retry_delay(0, s(0), 0.0), Duration::ZERO);
        assert!(map_retry_delay(0, s(0), 0.999) < Duration::from_millis(500));
        // A coordinator restart of a few seconds: the attempts are never more than 2.4 s apart,
        // so the node is back within that of the coordinator.
        let mut t = Duration::ZERO;
        for attempt in 0..20 {
            let d = map_retry_delay(attempt, t, 0.999);
            assert!(d <= Duration::from_millis(2400), "attempt {attempt}: {d:?}");
            t += d;
        }
        // A coordinator gone for longer: back off up to 30 s.
        assert_eq!(map_retry_delay(20, s(120), 0.5), BACKOFF_MAX);
    }

    fn r(ip: &str) -> Hop {
        Hop::Router(ip.parse().unwrap())
    }

    #[test]
    fn nat_depth_is_the_first_public_hop_after_private_ones() {
        // Home router, carrier NAT, then the ISP's public router: openers need TTL 3.
        let hops = [
            r("10.10.1.1"),
            r("100.64.0.1"),
            r("203.0.113.1"),
            Hop::Target,
        ];
        assert_eq!(nat_depth_from_hops(&hops, false), Some(3));
        // No private router before the public internet: no NAT to open.
        let hops = [r("198.51.100.1"), Hop::Target];
        assert_eq!(nat_depth_from_hops(&hops, false), Some(0));
        // The STUN server right behind one NAT whose routers stay silent.
        let hops = [r("192.168.1.1"), Hop::Target];
        assert_eq!(nat_depth_from_hops(&hops, false), Some(2));
    }

    #[test]
    fn nat_depth_waits_for_lower_hops_then_skips_silent_ones() {
        // TTL 2 has not answered yet: a private router there would change the answer.
        let hops = [r("10.0.0.1"), Hop::Silent, r("203.0.113.1")];
        assert_eq!(nat_depth_from_hops(&hops, false), None);
        // Out of time: a silent router counts as neither.
        assert_eq!(nat_depth_from_hops(&hops, true), Some(3));
        // Nothing answered at all.
        assert_eq!(nat_depth_from_hops(&[Hop::Silent; 8], true), None);
    }
}
