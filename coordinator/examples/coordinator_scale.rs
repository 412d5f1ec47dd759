//! Load generator for one coordinator: N simulated nodes with real keys register exactly as
//! `homeport up` does (challenge, proof of the private key, register), each holds its own map
//! stream over its own pinned TLS connection (its own session cache, as a real node has), and the
//! run prints ONE line of figures. `bench/coordinator-scale.sh N` starts a coordinator and runs it.
//!
//! Mesh shape (`--policy sites`, the default): nodes in sites of `--site-size` that reach each
//! other, plus one "hub" node every node may reach (a shared DNS server, say). The endpoint
//! change that is timed is the hub's, so it concerns every stream. `--policy none`: no policy,
//! every node sees every node (the map grows with N).
//!
//! Figures: registrations/s; seconds until every node holds its full map; propagation of one
//! endpoint change of the hub to every stream that has the hub (p50, p99, max); coordinator RSS
//! (now and peak) and CPU seconds over the whole run; stream cuts (streams the coordinator ended
//! while the node was reading); and a reconnect storm: every stream dropped at once, each node
//! reconnecting after a random 0-1 s (the node's first retry), until every node holds a full map
//! again and a change made then has reached all of them.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use homeport_proto::api::{
    self, AuthKeyCreate, AuthKeyCreated, EndpointReport, RegisterRequest, RegisterResponse,
};
use homeport_proto::map::{Endpoint, EndpointKind};
use homeport_proto::policy::{Policy, PolicyRule};
use homeport_proto::register::RegisterChallenge;
use homeport_proto::{CAPABILITY_VERSION, PrivateKey};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(about = "Load generator for the homeport coordinator (see bench/coordinator-scale.sh)")]
struct Args {
    /// The coordinator's HTTPS address (host:port).
    #[arg(long)]
    addr: SocketAddr,
    /// File holding the coordinator's pin (the state directory's `pin`).
    #[arg(long)]
    pin_file: std::path::PathBuf,
    /// File holding the admin token (the state directory's `admin.token`).
    #[arg(long)]
    token_file: std::path::PathBuf,
    /// The coordinator's process id, for its RSS and CPU time.
    #[arg(long)]
    pid: u32,
    /// Number of simulated nodes.
    #[arg(long)]
    nodes: usize,
    /// `sites` (sites of --site-size plus one hub everybody reaches) or `none` (no policy).
    #[arg(long, default_value = "sites")]
    policy: String,
    #[arg(long, default_value_t = 50)]
    site_size: usize,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// Each simulated node's TLS client keeps this many sessions to resume, like a real node's
/// (rustls' default for one client is 256; one server needs only a couple).
const NODE_SESSIONS: usize = 4;

fn tls_config(pin: &str) -> Result<Arc<rustls::ClientConfig>> {
    let mut cfg = homeport_proto::tls::pinned_client_config(pin).map_err(anyhow::Error::msg)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(NODE_SESSIONS);
    Ok(Arc::new(cfg))
}

async fn connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("coordinator")?.to_owned();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

fn request(
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Vec<u8>>,
) -> hyper::Request<Full<Bytes>> {
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "coordinator");
    if let Some(t) = bearer {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    b.body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("valid request")
}

async fn call<T: serde::de::DeserializeOwned>(
    send: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<Option<T>> {
    send.ready().await?;
    let resp = send
        .send_request(request(method, path, bearer, body))
        .await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "{method} {path}: {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    if bytes.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}"))?,
    ))
}

struct Registered {
    cred: String,
    id: i64,
}

async fn register(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    authkey: &str,
    i: usize,
) -> Result<Registered> {
    let key = PrivateKey::generate();
    let mut send = connect(addr, cfg).await?;
    let ch: RegisterChallenge = call(&mut send, "POST", api::PATH_CHALLENGE, None, None)
        .await?
        .context("empty challenge")?;
    let mut req = RegisterRequest {
        authkey: authkey.to_string(),
        public_key: key.public_key(),
        hostname: format!("n{i}"),
        capver: CAPABILITY_VERSION,
        previous_ipv4: None,
        challenge: Some(ch.challenge.clone()),
        proof: None,
    };
    req.proof = Some(homeport_proto::register::prove(
        &key,
        &ch.coordinator_key,
        &req,
    )?);
    let r: RegisterResponse = call(
        &mut send,
        "POST",
        api::PATH_REGISTER,
        None,
        Some(serde_json::to_vec(&req)?),
    )
    .await?
    .context("empty register answer")?;
    Ok(Registered {
        cred: r.credential,
        id: r.node_id.0,
    })
}

/// Only what the generator looks at in a map line; everything else is skipped by serde.
#[derive(Deserialize)]
struct Line {
    #[serde(default)]
    full: bool,
    #[serde(default)]
    peers: Vec<LinePeer>,
}
#[derive(Deserialize)]
struct LinePeer {
    id: i64,
    #[serde(default)]
    endpoints: Vec<LineEndpoint>,
}
#[derive(Deserialize)]
struct LineEndpoint {
    addr: SocketAddr,
}

/// What one simulated node has seen, written by its stream task.
#[derive(Default)]
struct Seen {
    /// Micros since the run's start when the last full map arrived (0: none since reset).
    full_at: AtomicU64,
    /// The node's map has the hub.
    has_hub: AtomicBool,
    /// The latest marker port seen on the hub, and when (micros since start).
    marker: AtomicU32,
    marker_at: AtomicU64,
}

struct Shared {
    start: Instant,
    hub: i64,
    seen: Vec<Seen>,
    /// Streams the coordinator ended while the node was reading.
    cuts: AtomicU64,
    /// Connections or stream requests that failed (retried after 1 s).
    failed: AtomicU64,
}

impl Shared {
    fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64 + 1
    }
}

fn note_line(sh: &Shared, i: usize, line: &[u8]) {
    let Ok(l) = serde_json::from_slice::<Line>(line) else {
        return;
    };
    let me = &sh.seen[i];
    let hub = l.peers.iter().find(|p| p.id == sh.hub);
    if l.full {
        me.has_hub.store(hub.is_some(), Ordering::Relaxed);
        me.full_at.store(sh.micros(), Ordering::Relaxed);
    }
    if let Some(h) = hub
        && let Some(port) = h.endpoints.first().map(|e| e.addr.port() as u32)
        && me.marker.swap(port, Ordering::Relaxed) != port
    {
        me.marker_at.store(sh.micros(), Ordering::Relaxed);
    }
}

/// Holds node `i`'s map stream: reconnects 1 s after the coordinator ends it (a cut), and at
/// once plus a random 0-1 s when the generator drops every stream (the storm).
async fn hold_stream(
    sh: Arc<Shared>,
    i: usize,
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    cred: String,
    mut storm: watch::Receiver<u32>,
) {
    let mut delay = Duration::ZERO;
    loop {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let run = async {
            let mut send = connect(addr, cfg.clone()).await?;
            send.ready().await?;
            let resp = send
                .send_request(request("GET", api::PATH_MAP, Some(&cred), None))
                .await?;
            if !resp.status().is_success() {
                bail!("map: {}", resp.status());
            }
            let mut body = resp.into_body();
            let mut buf: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                let mut start = 0;
                while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
                    note_line(&sh, i, &buf[start..start + nl]);
                    start += nl + 1;
                }
                buf.drain(..start);
            }
            anyhow::Ok(())
        };
        tokio::select! {
            r = run => {
                // The coordinator ended a stream the node was reading: a cut. Connection
                // failures (the coordinator was busy accepting) are retried the same way.
                match r {
                    Ok(()) => sh.cuts.fetch_add(1, Ordering::Relaxed),
                    Err(_) => sh.failed.fetch_add(1, Ordering::Relaxed),
                };
                delay = Duration::from_secs(1);
            }
            _ = storm.changed() => {
                delay = Duration::from_millis(rand::thread_rng().gen_range(0..1000));
            }
        }
    }
}

fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// (RSS MB, peak RSS MB, CPU seconds) of a process.
fn proc_usage(pid: u32) -> (f64, f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is field 14, stime 15.
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0))
        / tick.max(1.0);
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0, cpu)
}

async fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > timeout {
            bail!("{what}: not done after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Reports a new endpoint for the hub and waits until every stream that has the hub saw it.
/// Returns the per-stream delays (seconds).
async fn propagate(
    sh: &Shared,
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    hub_cred: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<f64>> {
    let mut send = connect(addr, cfg).await?;
    let rep = EndpointReport {
        endpoints: vec![Endpoint {
            addr: SocketAddr::from(([192, 0, 2, 1], port)),
            kind: EndpointKind::Static,
        }],
    };
    let t0 = sh.micros();
    call::<serde_json::Value>(
        &mut send,
        "POST",
        api::PATH_ENDPOINTS,
        Some(hub_cred),
        Some(serde_json::to_vec(&rep)?),
    )
    .await?;
    let port = port as u32;
    let concerned: Vec<usize> = (0..sh.seen.len())
        .filter(|&i| sh.seen[i].has_hub.load(Ordering::Relaxed))
        .collect();
    wait_until(timeout, "endpoint change reaching every stream", || {
        concerned
            .iter()
            .all(|&i| sh.seen[i].marker.load(Ordering::Relaxed) == port)
    })
    .await?;
    let mut d: Vec<f64> = concerned
        .iter()
        .map(|&i| {
            sh.seen[i]
                .marker_at
                .load(Ordering::Relaxed)
                .saturating_sub(t0) as f64
                / 1e6
        })
        .collect();
    d.sort_by(|a, b| a.total_cmp(b));
    Ok(d)
}

fn pct(d: &[f64], p: f64) -> f64 {
    if d.is_empty() {
        return 0.0;
    }
    d[((d.len() as f64 * p).ceil() as usize).clamp(1, d.len()) - 1]
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    raise_nofile();
    let timeout = Duration::from_secs(a.timeout);
    let pin = std::fs::read_to_string(&a.pin_file)
        .with_context(|| format!("{}", a.pin_file.display()))?;
    let token = std::fs::read_to_string(&a.token_file)
        .with_context(|| format!("{}", a.token_file.display()))?;
    let (pin, token) = (pin.trim().to_string(), token.trim().to_string());
    let base = tls_config(&pin)?;
    let n = a.nodes.max(2);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_before = loadavg.split_whitespace().next().unwrap_or("?").to_string();

    // Admin: one auth key per site (tags come from the key) and the policy.
    let mut admin = connect(a.addr, base.clone()).await?;
    let mk_key = |tags: Vec<String>| AuthKeyCreate {
        reusable: true,
        expires_secs: None,
        tags,
        max_uses: None,
    };
    let sites = if a.policy == "sites" {
        n.div_ceil(a.site_size)
    } else {
        1
    };
    let mut keys = Vec::new();
    let hub_tags = if a.policy == "sites" {
        vec!["hub".to_string()]
    } else {
        vec![]
    };
    let hub_key: AuthKeyCreated = call(
        &mut admin,
        "POST",
        api::PATH_ADMIN_AUTHKEYS,
        Some(&token),
        Some(serde_json::to_vec(&mk_key(hub_tags))?),
    )
    .await?
    .context("no key")?;
    for s in 0..sites {
        let tags = if a.policy == "sites" {
            vec![format!("site-{s}")]
        } else {
            vec![]
        };
        let k: AuthKeyCreated = call(
            &mut admin,
            "POST",
            api::PATH_ADMIN_AUTHKEYS,
            Some(&token),
            Some(serde_json::to_vec(&mk_key(tags))?),
        )
        .await?
        .context("no key")?;
        keys.push(k.key);
    }
    match a.policy.as_str() {
        "sites" => {
            let mut rules: Vec<PolicyRule> = (0..sites)
                .map(|s| PolicyRule {
                    from: vec![format!("tag:site-{s}")],
                    to: vec![format!("tag:site-{s}")],
                    ports: vec!["*".into()],
                })
                .collect();
            rules.push(PolicyRule {
                from: vec!["*".into()],
                to: vec!["tag:hub".into()],
                ports: vec!["udp:53".into(), "tcp:53".into()],
            });
            call::<serde_json::Value>(
                &mut admin,
                "PUT",
                api::PATH_ADMIN_POLICY,
                Some(&token),
                Some(serde_json::to_vec(&Policy { rules })?),
            )
            .await?;
        }
        "none" => {}
        other => bail!("--policy {other}: expected sites or none"),
    }
    drop(admin);

    // Register: node 0 is the hub; node i > 0 is in site (i-1)/site_size.
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let authkey = if i == 0 {
            hub_key.key.clone()
        } else {
            keys[((i - 1) / a.site_size).min(keys.len() - 1)].clone()
        };
        let (sem, base, addr) = (sem.clone(), base.clone(), a.addr);
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await;
            let mut tries = 0;
            loop {
                match register(addr, base.clone(), &authkey, i).await {
                    Ok(r) => return Ok(r),
                    Err(e) if tries < 5 => {
                        tries += 1;
                        tracing_like(&format!("register n{i}: {e:#}; retrying"));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }));
    }
    let mut regs = Vec::with_capacity(n);
    for t in tasks {
        regs.push(t.await??);
    }
    let reg_s = n as f64 / t.elapsed().as_secs_f64();

    let sh = Arc::new(Shared {
        start: Instant::now(),
        hub: regs[0].id,
        seen: (0..n).map(|_| Seen::default()).collect(),
        cuts: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let (storm_tx, storm_rx) = watch::channel(0u32);
    // Every node has its own TLS client (own session cache), as real nodes do.
    let t_streams = sh.micros();
    for (i, r) in regs.iter().enumerate() {
        let cfg = tls_config(&pin)?;
        tokio::spawn(hold_stream(
            sh.clone(),
            i,
            a.addr,
            cfg,
            r.cred.clone(),
            storm_rx.clone(),
        ));
    }
    wait_until(timeout, "every node holding its full map", || {
        sh.seen
            .iter()
            .all(|s| s.full_at.load(Ordering::Relaxed) != 0)
    })
    .await?;
    let last_full = sh
        .seen
        .iter()
        .map(|s| s.full_at.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    let full_s = (last_full - t_streams) as f64 / 1e6;
    // Let the online flips of the connect wave settle, as a real mesh would be before a change.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hub_cred = regs[0].cred.clone();
    let d = propagate(&sh, a.addr, base.clone(), &hub_cred, 40001, timeout).await?;
    let concerned = d.len();
    // Streams read for 12 s more: no cut may happen to a reading node. Then the resident size
    // of the coordinator holding every stream, settled.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (rss_held, _, _) = proc_usage(a.pid);
    let cuts_before_storm = sh.cuts.load(Ordering::Relaxed);

    // The storm: every stream dropped at once.
    for s in &sh.seen {
        s.full_at.store(0, Ordering::Relaxed);
    }
    let t_storm = Instant::now();
    storm_tx.send_modify(|v| *v += 1);
    wait_until(
        timeout,
        "every node holding a full map after the storm",
        || {
            sh.seen
                .iter()
                .all(|s| s.full_at.load(Ordering::Relaxed) != 0)
        },
    )
    .await?;
    let storm_full = t_storm.elapsed().as_secs_f64();
    propagate(&sh, a.addr, base.clone(), &hub_cred, 40002, timeout).await?;
    let storm_s = t_storm.elapsed().as_secs_f64();
    let (rss, peak, cpu) = proc_usage(a.pid);
    println!(
        "N={n} policy={} registrations/s={reg_s:.0} full_map_all_s={full_s:.2} propagation_s(streams={concerned}) p50={:.3} p99={:.3} max={:.3} \
         rss_mb={rss_held:.0} rss_after_storm_mb={rss:.0} peak_rss_mb={peak:.0} cpu_s={cpu:.1} cuts={cuts_before_storm} failed_connects={} storm_full_s={storm_full:.2} storm_current_s={storm_s:.2} load_before={load_before}",
        a.policy,
        pct(&d, 0.5),
        pct(&d, 0.99),
        pct(&d, 1.0),
        sh.failed.load(Ordering::Relaxed),
    );
    Ok(())
}

fn tracing_like(msg: &str) {
    eprintln!("coordinator-scale: {msg}");
}
