//! `serve`: state directory, TLS, database, listeners, and graceful shutdown.

use crate::config::Config;
use crate::state::{AppState, StateOptions};
use anyhow::Context;
use axum::Router;
use homeport_proto::map::RelayInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const ADMIN_SOCKET: &str = "admin.sock";
pub const LISTEN_ADDR_FILE: &str = "listen.addr";
pub const STUN_ADDR_FILE: &str = "stun.addr";
pub const METRICS_ADDR_FILE: &str = "metrics.addr";
/// The dashboard's bound addresses, one per line (empty while the machine has no mesh address).
pub const DASHBOARD_ADDR_FILE: &str = "dashboard.addr";
/// The admin token, written once on first start (0600); only its hash is in the database.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// A TLS handshake that takes longer than this is a stuck or hostile client.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Headers must arrive this fast once a connection is up or idle between requests (slowloris
/// guard; clients drop pooled connections before this, see `api::CLIENT_POOL_IDLE_SECS`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(homeport_proto::api::SERVER_IDLE_SECS);
/// On shutdown, connections get this long to finish their current request.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

fn create_state_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set mode 0700 on {}", dir.display()))?;
    Ok(())
}

/// The address nodes should send STUN to: the public URL's host, else the listen address if it
/// is specific, else the first non-loopback interface address.
async fn reachable_ip(cfg: &Config) -> IpAddr {
    let public_host = cfg
        .public_url
        .as_deref()
        .and_then(|u| crate::config::check_public_url(u).ok());
    if let Some(host) = public_host {
        let host = host.trim_matches(|c| c == '[' || c == ']').to_string();
        if let Ok(ip) = host.parse::<IpAddr>() {
            return ip;
        }
        let resolved = tokio::net::lookup_host((host.as_str(), 0))
            .await
            .ok()
            .and_then(|mut a| a.next());
        if let Some(a) = resolved {
            return a.ip();
        }
    }
    if !cfg.listen.ip().is_unspecified() {
        return cfg.listen.ip();
    }
    crate::tls::local_ips()
        .into_iter()
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

fn join_url(cfg: &Config, bound: SocketAddr, host: IpAddr) -> String {
    if let Some(u) = &cfg.public_url {
        return u.trim_end_matches('/').to_string();
    }
    format!("https://{}", SocketAddr::new(host, bound.port()))
}

/// Connections waiting to be accepted. A reconnect storm (every node at once after a restart or
/// a network blip) arrives as thousands of SYNs within a second; with tokio's default of 1024 the
/// rest are dropped and their senders wait a 1 s, then 3 s SYN retransmission. The kernel caps
/// it at net.core.somaxconn (4096 by default).
const LISTEN_BACKLOG: u32 = 8192;

/// How often free heap memory is handed back to the kernel. glibc returns only the top of the
/// heap by itself; a reconnect storm (every connection torn down and set up again) leaves free
/// pages all through it, resident until trimmed. A trim of a few hundred MB takes milliseconds.
const MALLOC_TRIM_EVERY: Duration = Duration::from_secs(10);

/// Raises the soft limit of open files to the hard limit: each map stream holds a socket, so
/// 10,000 nodes need more than the usual soft limit of 1024. Under the systemd unit (which sets
/// LimitNOFILE= and forbids setrlimit) both limits are already equal. Returns the limit in force.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

async fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

/// Runs the coordinator until `shutdown` is cancelled.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let nofile = raise_nofile_limit();
    if nofile < 4096 {
        tracing::warn!(
            nofile,
            "the open-file limit is low: each node's map stream holds one; raise LimitNOFILE= (the unit sets 65536)"
        );
    }
    // Everything this process writes is private: files 0600, directories 0700.
    // SAFETY: umask only changes the process file-mode mask.
    unsafe {
        libc::umask(0o077);
    }
    let dir = cfg.state_dir.clone();
    create_state_dir(&dir)?;

    let public_host = cfg
        .public_url
        .as_deref()
        .and_then(|u| crate::config::check_public_url(u).ok());
    let names = crate::tls::cert_names(cfg.listen.ip(), public_host.as_deref());
    let tls = crate::tls::load_or_create(
        &dir,
        cfg.tls_cert.as_deref(),
        cfg.tls_key.as_deref(),
        &names,
    )?;
    if tls.created {
        tracing::info!(cert = %tls.cert_path.display(), names = ?names, "created a self-signed certificate");
    }

    let listener = bind_listener(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", cfg.listen))?;
    let bound = listener.local_addr()?;
    let stun_sock = std::net::UdpSocket::bind(cfg.stun_listen)
        .with_context(|| format!("cannot listen on UDP {} (--stun-listen)", cfg.stun_listen))?;
    let stun_bound = stun_sock.local_addr()?;
    let metrics_listener = match cfg.metrics_listen {
        Some(a) => Some(homeport_host::metrics::bind(a).await?),
        None => None,
    };

    let host = reachable_ip(&cfg).await;
    // One long-term X25519 key: relay BINDs and registrations both prove node keys against it
    // (under differently derived MAC keys, see homeport_proto::register).
    let identity = load_relay_key(&dir)?;
    let relay = crate::relay::Relay::new(identity.secret().clone());
    let db_url = cfg.database_url();
    if crate::store::redact(&db_url) != db_url {
        // The process list and the (0644) config file are readable by every local user.
        tracing::warn!(
            "the database URL carries a password that local users can read: leave it out and set PGPASSWORD \
             (e.g. in a root-only EnvironmentFile= of the unit)"
        );
    }
    if cfg.database_url.is_none() {
        // Create the file ourselves so it is 0600 from the start (WAL side files follow it).
        let f = dir.join("coordinator.db");
        if !f.exists() {
            crate::tls::write_private(&f, b"")?;
        }
    }
    let my_relay = RelayInfo {
        // The relay shares the STUN socket: one UDP port to open on the VPS.
        udp: Some(SocketAddr::new(host, stun_bound.port())),
        stun: Some(SocketAddr::new(host, stun_bound.port())),
        public_key: Some(homeport_proto::PublicKey::from(relay.public)),
    };
    let my_url = join_url(&cfg, bound, host);
    let (state, first) = AppState::open(StateOptions {
        database_url: db_url.clone(),
        prefix_v4: cfg.prefix_v4,
        prefix_v6: cfg.prefix_v6,
        relays: vec![my_relay.clone()],
        identity: Some(identity),
        replica_url: Some(my_url.clone()),
    })
    .await?;
    let me = crate::replicas::Replica {
        url: my_url.clone(),
        pin: tls.pin.clone(),
        relay: my_relay.clone(),
    };
    state.mesh().mesh_domain = Some(cfg.mesh_domain.clone());

    let sock_path = dir.join(ADMIN_SOCKET);
    let _ = std::fs::remove_file(&sock_path);
    let admin_listener = UnixListener::bind(&sock_path)
        .with_context(|| format!("cannot bind the admin socket {}", sock_path.display()))?;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))?;

    let tasks = TaskTracker::new();
    tasks.spawn(serve_https(
        listener,
        tokio_rustls::TlsAcceptor::from(tls.server_config.clone()),
        crate::api::app(state.clone()),
        shutdown.clone(),
    ));
    state.mesh().set_relay(relay.clone());
    if state.store.postgres {
        // Replicas sharing the database: each advertises itself, hears the others' changes.
        if cfg.public_url.is_none() {
            tracing::warn!(url = %me.url, "no --public-url: the other replicas advertise this replica to nodes under a guessed URL");
        }
        let (st, sd, url) = (state.clone(), shutdown.clone(), db_url.clone());
        crate::replicas::run_start(&st, &me).await?;
        tasks.spawn(async move {
            if let Err(e) = crate::replicas::run(st, me, url, sd).await {
                tracing::error!(error = %e, "replication stopped: changes on other replicas no longer reach this one's nodes");
            }
        });
    }
    // With SQLite there is one coordinator and the maps name none: nodes keep using the URL
    // they were given (a guessed URL, without --public-url, might not reach it from outside).
    {
        let sd = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = crate::relay::serve(stun_sock, relay, sd).await {
                tracing::error!(error = %e, "the STUN/relay UDP socket failed; STUN and the relay are down");
            }
        });
    }
    {
        let app = crate::api::local_app(state.clone());
        let sd = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = axum::serve(admin_listener, app)
                .with_graceful_shutdown(sd.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "admin socket server failed");
            }
        });
    }
    if cfg.dashboard_port != 0 {
        tasks.spawn(crate::dashboard::serve(
            state.clone(),
            cfg.dashboard_port,
            dir.join(DASHBOARD_ADDR_FILE),
            shutdown.clone(),
        ));
    }
    if let Some(l) = metrics_listener {
        crate::tls::write_private(
            &dir.join(METRICS_ADDR_FILE),
            format!("{}\n", l.local_addr()?).as_bytes(),
        )?;
        let registry = std::sync::Arc::new(state.metrics.registry(&state));
        tasks.spawn(homeport_host::metrics::serve(l, registry, shutdown.clone()));
    }
    tasks.spawn(crate::alerts::watch_nodes(
        state.clone(),
        homeport_host::alert::Alerts::start(
            cfg.alert_webhooks.clone(),
            "homeport-coordinator",
            cfg.alert_debounce,
            shutdown.clone(),
        ),
        cfg.alert_offline,
        shutdown.clone(),
    ));
    {
        let sd = shutdown.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(MALLOC_TRIM_EVERY);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = sd.cancelled() => return,
                }
                // SAFETY: malloc_trim only returns free heap pages to the kernel.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
    }
    tasks.close();

    crate::tls::write_private(&dir.join(LISTEN_ADDR_FILE), format!("{bound}\n").as_bytes())?;
    crate::tls::write_private(
        &dir.join(STUN_ADDR_FILE),
        format!("{stun_bound}\n").as_bytes(),
    )?;

    let join = format!(
        "homeport up --coordinator {} --pin {} --authkey-file <FILE holding a key from: homeport-coordinator authkey create>",
        join_url(&cfg, bound, host),
        tls.pin
    );
    state
        .live
        .set_join(join_url(&cfg, bound, host), tls.pin.clone());
    tracing::info!(listen = %bound, stun = %stun_bound, pin = %tls.pin, state_dir = %dir.display(), "coordinator ready");
    tracing::info!("join a node with: {join}");
    if let Some(token) = &first.admin_token {
        // Never into the log (journald keeps it, readable by the adm group): a 0600 file, and
        // the terminal of whoever started the coordinator by hand.
        let token_path = dir.join(ADMIN_TOKEN_FILE);
        crate::tls::write_private(&token_path, format!("{token}\n").as_bytes())?;
        tracing::info!(file = %token_path.display(), "first start: admin token written (mode 0600)");
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            println!(
                "\nhomeport coordinator: first start.\n\
                 Admin token (shown only now; also in {}; remote admin: --url https://HOST:PORT --token-file FILE --pin PIN):\n  {token}\n\
                 Join a node:\n  {join}\n",
                token_path.display()
            );
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // Map streams never end by themselves; closing them lets connections drain.
    state.mesh().close_all();
    if tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(1), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish in time");
    }
    let _ = std::fs::remove_file(&sock_path);
    state.flush_seen().await;
    state.store.pool.close().await;
    Ok(())
}

async fn serve_https(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    shutdown: CancellationToken,
) {
    let conns = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tls), svc)
                // The relay's TCP/TLS fallback upgrades its connection.
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
                }
            }
        });
    }
    conns.close();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, conns.wait()).await;
}

/// The relay's X25519 key, created on first start and kept (`relay.key`, 0600) so nodes'
/// maps stay valid across restarts.
fn load_relay_key(dir: &std::path::Path) -> anyhow::Result<homeport_proto::PrivateKey> {
    let p = dir.join("relay.key");
    match std::fs::read_to_string(&p) {
        Ok(s) => {
            let k: homeport_proto::PrivateKey = s
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            Ok(k)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = homeport_proto::PrivateKey::generate();
            crate::tls::write_private(&p, format!("{}\n", k.to_base64()).as_bytes())?;
            Ok(k)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}
