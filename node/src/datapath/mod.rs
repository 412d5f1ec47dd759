//! The IO shell around the sans-IO [`Engine`]: the TUN device (tun-rs with offload), one UDP
//! socket (quinn-udp: GSO on send, GRO and recvmmsg on receive), policy routes.
//!
//! Two data threads, one per direction, so each of the two cores runs one crypto direction:
//! - `tun→udp`: reads TUN super-packets (TSO, split by tun-rs), encapsulates, and sends runs of
//!   equal-sized datagrams to one destination as a single GSO send;
//! - `udp→tun`: receives up to 32 GRO datagrams per syscall, decapsulates, and writes to the TUN
//!   through tun-rs's GRO table, which coalesces TCP segments back into super-packets.
//!
//! A third thread runs the engine's timers. Buffers are allocated once at start; nothing on the
//! per-packet path allocates.

pub mod routes;

use anyhow::{Context, Result};
use homeport_engine::{Decap, Encap, Engine, Event, Route, TICK};
use homeport_proto::disco::{DatagramKind, classify};
use homeport_proto::map::{MeshAddrs, NetworkMap};
use homeport_proto::relay::RELAY_HEADER_LEN;
use homeport_proto::{NodeId, NodeName, PrivateKey, PublicKey};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use serde::{Deserialize, Serialize};
use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tun_rs::{GROTable, InterruptEvent, SyncDevice, VIRTIO_NET_HDR_LEN};

/// TUN MTU: 1500 (typical underlay) − 40 (IPv6, the larger IP header) − 8 (UDP) − 32
/// (WireGuard header and tag) − 37 (relay header, so a full-size packet still fits in one
/// datagram when the relay carries it) = 1383, rounded down to 1380. wireguard-go's 1420 has no
/// room for the relay header: full-size packets through the relay would need fragmenting,
/// which the socket refuses (DF), and bulk TCP through the relay would stall.
pub const DEFAULT_MTU: u16 = 1380;

use homeport_udp::{BATCH as UDP_BATCH, GRO_BUF};
/// Packets from the relay's TCP/TLS fallback written to the TUN with one call.
const TUN_RELAY_BATCH: usize = 64;
/// TUN packets per batch (tun-rs's ideal batch size).
const TUN_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
/// Room per encapsulated datagram in the GSO send buffer: MTU + WireGuard overhead, rounded up.
const SEG_ROOM: usize = 2048;
/// Segments per GSO send (the kernel's UDP_MAX_SEGMENTS is 64).
const MAX_GSO: usize = 64;
/// Bytes per GSO send: one UDP datagram's payload limit (65535 − IP and UDP headers); more is
/// refused with EMSGSIZE.
const GSO_MAX_BYTES: usize = 65_000;

/// What the daemon passes to start the data path.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// TUN interface name (default `hp0`).
    pub tun_name: String,
    /// UDP port of the WireGuard socket; 0 = pick a free one.
    pub listen_port: u16,
    pub private_key: PrivateKey,
    /// TUN MTU (default [`DEFAULT_MTU`]).
    pub mtu: u16,
    pub addrs: MeshAddrs,
    pub prefix_v4: ipnet::Ipv4Net,
    pub prefix_v6: ipnet::Ipv6Net,
}

/// Path a peer's traffic currently takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum PathInfo {
    /// No path yet (no endpoint known / no handshake).
    None,
    /// Direct UDP to this address.
    Direct { addr: SocketAddr },
    /// Through the relay; `reason` says why no direct path is used.
    Relay { reason: String },
}

/// One peer's live state, as shown by `homeport status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: NodeId,
    pub name: NodeName,
    pub public_key: PublicKey,
    pub addrs: MeshAddrs,
    pub path: PathInfo,
    /// Seconds since the last completed handshake; None = never.
    pub last_handshake_secs_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub handshakes: u64,
    /// Online according to the coordinator.
    pub online: bool,
    /// A plain-WireGuard device this node carries (its path: where its packets come from).
    #[serde(default)]
    pub device: bool,
}

/// Counters of the data path as a whole.
#[derive(Debug, Default)]
pub struct Counters {
    pub tun_rx_packets: AtomicU64,
    pub udp_rx_datagrams: AtomicU64,
    pub dropped: AtomicU64,
    pub gso_sends: AtomicU64,
    /// STUN-looking datagrams dropped: not from a server asked recently, or the queue to the
    /// daemon was full.
    pub stun_dropped: AtomicU64,
}

/// STUN answers that arrived on the WireGuard socket, for the daemon: a bounded queue
/// ([`crate::stun::STUN_QUEUE`]); the data path never blocks on it and drops what does not fit.
pub type SideChannel = std::sync::mpsc::SyncSender<(SocketAddr, Vec<u8>)>;

/// The engine's events, forwarded to the daemon (bounded: a daemon that lags loses the oldest
/// Pongs, never blocks the data path).
pub type EventSink = tokio::sync::mpsc::Sender<Event>;

/// Events waiting for the daemon at most.
pub const EVENT_QUEUE: usize = 256;

/// Hands the engine's events to the daemon.
fn forward_events(engine: &Engine, events: &EventSink) {
    while let Some(e) = engine.poll_event() {
        if events.try_send(e).is_err() {
            tracing::debug!("engine event dropped: the daemon lags");
        }
    }
}

pub struct Datapath {
    pub engine: Arc<Engine>,
    /// The timer thread, to wake when the engine's next deadline may have moved earlier.
    timers: Option<std::thread::Thread>,
    socket: Arc<UdpSocket>,
    state: Arc<UdpSocketState>,
    stop: Arc<AtomicBool>,
    intr: Arc<InterruptEvent>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// The WireGuard socket's port (changes on [`Datapath::rebind`]).
    local_port: std::sync::atomic::AtomicU16,
    pub counters: Arc<Counters>,
    stun: Arc<crate::stun::StunGate>,
    routes: std::sync::Mutex<routes::PolicyRoutes>,
    published_udp: std::sync::Mutex<routes::PublishedUdp>,
    pub tun_name: String,
    dev: Arc<SyncDevice>,
    gro: std::sync::Mutex<(GROTable, Vec<Vec<u8>>)>,
    /// The relay's TCP/TLS fallback, when UDP to the relay is blocked.
    tcp_relay: Arc<TcpRelay>,
}

/// Datagrams for the relay's address go into this channel (to the TCP/TLS connection the daemon
/// keeps) instead of the UDP socket while it is active. One per data path, shared by its send
/// sites.
#[derive(Default)]
pub struct TcpRelay {
    active: std::sync::atomic::AtomicBool,
    link: std::sync::RwLock<Option<(SocketAddr, tokio::sync::mpsc::Sender<Vec<u8>>)>>,
}

impl TcpRelay {
    /// Sends `data` (one or more `seg`-sized datagrams) over the TCP relay when `to` is the
    /// relay and the fallback is active. Returns false when the caller should use UDP.
    fn divert(&self, to: SocketAddr, data: &[u8], seg: usize) -> bool {
        if !self.active.load(Ordering::Relaxed) {
            return false;
        }
        let link = self.link.read().unwrap();
        match link.as_ref() {
            Some((addr, tx)) if *addr == to => {
                for d in data.chunks(seg.max(1)) {
                    let _ = tx.try_send(d.to_vec());
                }
                true
            }
            _ => false,
        }
    }
}

impl Datapath {
    /// Creates the TUN device and UDP socket and starts the threads.
    pub fn start(cfg: &DatapathConfig, side: SideChannel, events: EventSink) -> Result<Datapath> {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let seed: [u8; 32] = rand::Rng::r#gen(&mut rand::rngs::OsRng);
        let engine = Arc::new(Engine::new(&cfg.private_key, Instant::now(), unix_ms, seed));
        let dev = tun_rs::DeviceBuilder::new()
            .name(&cfg.tun_name)
            .ipv4(cfg.addrs.ipv4, cfg.prefix_v4.prefix_len(), None)
            .ipv6(cfg.addrs.ipv6, cfg.prefix_v6.prefix_len())
            .mtu(cfg.mtu)
            .offload(true)
            .build_sync()
            .with_context(|| {
                format!(
                    "creating TUN device {} (needs root or CAP_NET_ADMIN and /dev/net/tun)",
                    cfg.tun_name
                )
            })?;
        tracing::info!(
            tun = %cfg.tun_name, tcp_gso = dev.tcp_gso(), udp_gso = dev.udp_gso(), "TUN device up"
        );
        let dev = Arc::new(dev);
        let routes = routes::PolicyRoutes::install(&cfg.tun_name, cfg.addrs)?;

        let (socket, state) = wireguard_socket(cfg.listen_port)?;
        let local_port = socket.local_addr()?.port();
        tracing::info!(
            port = local_port,
            gso = state.max_gso_segments(),
            gro = state.gro_segments(),
            "WireGuard UDP socket bound"
        );
        let socket = Arc::new(socket);
        let state = Arc::new(state);
        let stop = Arc::new(AtomicBool::new(false));
        let intr = Arc::new(InterruptEvent::new()?);
        let counters = Arc::new(Counters::default());
        let stun = Arc::new(crate::stun::StunGate::default());
        let tcp_relay = Arc::new(TcpRelay::default());
        let mut threads = vec![];
        {
            let (engine, dev, socket, state, relay, stop, intr, counters) = (
                engine.clone(),
                dev.clone(),
                socket.clone(),
                state.clone(),
                tcp_relay.clone(),
                stop.clone(),
                intr.clone(),
                counters.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name("tun→udp".into())
                    .spawn(move || {
                        tun_to_udp(
                            &engine, &dev, &socket, &state, &relay, &stop, &intr, &counters,
                        )
                    })?,
            );
        }
        {
            let (engine, dev, socket, state, stop, counters, stun) = (
                engine.clone(),
                dev.clone(),
                socket.clone(),
                state.clone(),
                stop.clone(),
                counters.clone(),
                stun.clone(),
            );
            let (hs_tx, hs_rx) = std::sync::mpsc::sync_channel(HANDSHAKE_QUEUE);
            {
                let (engine, socket, state, relay, stop, counters) = (
                    engine.clone(),
                    socket.clone(),
                    state.clone(),
                    tcp_relay.clone(),
                    stop.clone(),
                    counters.clone(),
                );
                threads.push(
                    std::thread::Builder::new()
                        .name("handshakes".into())
                        .spawn(move || {
                            handshakes(&engine, &socket, &state, &relay, &stop, &counters, hs_rx)
                        })?,
                );
            }
            let side = Side {
                tcp_relay: tcp_relay.clone(),
                events: events.clone(),
                stun_gate: stun,
                stun_tx: side,
                handshake_tx: hs_tx,
            };
            threads.push(
                std::thread::Builder::new()
                    .name("udp→tun".into())
                    .spawn(move || {
                        udp_to_tun(&engine, &dev, &socket, &state, &stop, &counters, side)
                    })?,
            );
        }
        {
            let (engine, socket, state, relay, stop) = (
                engine.clone(),
                socket.clone(),
                state.clone(),
                tcp_relay.clone(),
                stop.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name("timers".into())
                    .spawn(move || {
                        // Sleeps until the engine's next deadline (a probe, boringtun's timers);
                        // woken early when the daemon changes something (see `wake_timers`).
                        while !stop.load(Ordering::Relaxed) {
                            engine.handle_timeout(Instant::now());
                            flush(&engine, &socket, &state, &relay);
                            forward_events(&engine, &events);
                            let now = Instant::now();
                            let next = engine
                                .poll_timeout()
                                .clamp(now + TIMERS_MIN_SLEEP, now + TICK);
                            std::thread::park_timeout(next - now);
                        }
                    })?,
            );
        }
        let timers = threads.last().map(|t| t.thread().clone());
        Ok(Datapath {
            tcp_relay,
            timers,
            engine,
            socket,
            state,
            stop,
            intr,
            threads: std::sync::Mutex::new(threads),
            local_port: std::sync::atomic::AtomicU16::new(local_port),
            counters,
            stun,
            routes: std::sync::Mutex::new(routes),
            published_udp: std::sync::Mutex::new(routes::PublishedUdp::new(
                &cfg.tun_name,
                cfg.addrs,
            )),
            tun_name: cfg.tun_name.clone(),
            dev,
            gro: std::sync::Mutex::new((
                GROTable::new(),
                vec![Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65535)],
            )),
        })
    }

    /// The WireGuard socket's UDP port.
    pub fn local_port(&self) -> u16 {
        self.local_port.load(Ordering::Relaxed)
    }

    /// Moves the WireGuard socket to a fresh port, for when stale NAT state is tied to the old
    /// one (see [`Engine::take_rebind`]). The new socket takes the old one's descriptor number
    /// (dup2), so every thread's next syscall uses it without any handover; datagrams still
    /// queued on the old socket are lost, as on any path change. Returns the new port.
    pub fn rebind(&self) -> Result<u16> {
        let (new, _) = wireguard_socket(0)?;
        // SAFETY: both descriptors are open and owned by live sockets; dup2 atomically makes
        // the old number refer to the new socket and closes the old one. `new` keeps its own
        // descriptor, which is closed when it drops.
        if unsafe { libc::dup2(new.as_raw_fd(), self.socket.as_raw_fd()) } < 0 {
            return Err(std::io::Error::last_os_error())
                .context("dup2 of the new WireGuard socket");
        }
        drop(new);
        let port = self.socket.local_addr()?.port();
        self.local_port.store(port, Ordering::Relaxed);
        self.engine.rebound(Instant::now());
        self.wake_timers();
        Ok(port)
    }

    pub fn apply_map(&self, map: &NetworkMap) {
        self.engine.apply_map(map, Instant::now());
        self.wake_timers();
        let me = map.self_node.id;
        let ports: Vec<u16> = map
            .publish
            .iter()
            .filter(|r| {
                r.target == me
                    && r.exit != me
                    && r.proto == homeport_proto::publish::PublishProto::Udp
            })
            .map(|r| r.target_port)
            .collect();
        if let Err(e) = self.published_udp.lock().unwrap().set_ports(ports) {
            tracing::warn!(error = %e, "could not install the published UDP reply rules");
        }
    }

    /// Sends a raw datagram from the WireGuard socket (STUN requests: the reflexive address we
    /// learn must be this socket's).
    pub fn send_raw(&self, to: SocketAddr, data: &[u8]) {
        if homeport_proto::disco::classify(data) == DatagramKind::Stun {
            // Its answer may come back now (see [`crate::stun::StunGate`]).
            self.stun.asked(to, Instant::now());
        }
        send_one(&self.socket, &self.state, &self.tcp_relay, to, data);
    }

    /// The data path's own metrics (`homeport_node_*`, counters).
    pub fn encode_metrics(
        &self,
        enc: &mut homeport_host::metrics::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use homeport_host::metrics::counter;
        let c = &self.counters;
        let f = &self.engine.flows;
        let rows: [(&str, &str, u64); 6] = [
            (
                "udp_rx_datagrams",
                "Datagrams received on the WireGuard port",
                c.udp_rx_datagrams.load(Ordering::Relaxed),
            ),
            (
                "dropped_packets",
                "Packets and datagrams the data path dropped",
                c.dropped.load(Ordering::Relaxed),
            ),
            (
                "stun_dropped_datagrams",
                "STUN-looking datagrams dropped: from no server asked recently, or queue full",
                c.stun_dropped.load(Ordering::Relaxed),
            ),
            (
                "handshake_cookies",
                "Handshake initiations answered with a cookie (under load) instead of processed",
                self.engine.cookies_sent(),
            ),
            (
                "published_flows_evicted",
                "Unconfirmed published flows evicted to make room for new ones",
                f.evicted.load(Ordering::Relaxed),
            ),
            (
                "published_flows_refused",
                "New published flows not tracked: the table was full of confirmed flows",
                f.refused.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in rows {
            counter(enc, name, help, None, v)?;
        }
        Ok(())
    }

    /// Switches the relay's transport to the TCP/TLS fallback (`Some`) or back to UDP (`None`).
    pub fn set_tcp_relay(&self, link: Option<(SocketAddr, tokio::sync::mpsc::Sender<Vec<u8>>)>) {
        let on = link.is_some();
        *self.tcp_relay.link.write().unwrap() = link;
        self.tcp_relay.active.store(on, Ordering::Relaxed);
    }

    /// Whether the relay runs over the TCP/TLS fallback.
    pub fn tcp_relay_active(&self) -> bool {
        self.tcp_relay.active.load(Ordering::Relaxed)
    }

    /// A relay datagram that arrived over the TCP/TLS fallback.
    pub fn relay_input(&self, relay: SocketAddr, frame: &[u8]) {
        self.relay_input_each(relay, std::iter::once(frame));
    }

    /// Relay datagrams that arrived over the TCP/TLS fallback, as whole TCP frames: decrypted
    /// into the TUN batch and written with one call per [`TUN_RELAY_BATCH`] packets, so tun-rs
    /// can coalesce them (GRO) as it does for UDP.
    pub fn relay_input_frames(&self, relay: SocketAddr, frames: &[u8]) {
        self.relay_input_each(relay, homeport_proto::relay::tcp_frames(frames));
    }

    fn relay_input_each<'a>(&self, relay: SocketAddr, frames: impl Iterator<Item = &'a [u8]>) {
        let t = self.engine.snapshot();
        let mut g = self.gro.lock().unwrap();
        let (gro, bufs) = &mut *g;
        let now = Instant::now();
        let mut n = 0;
        for frame in frames {
            if n == bufs.len() {
                if n < TUN_RELAY_BATCH {
                    bufs.push(Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65535));
                } else {
                    write_tun(&self.dev, gro, &mut bufs[..n]);
                    n = 0;
                }
            }
            let out = &mut bufs[n];
            out.resize(
                VIRTIO_NET_HDR_LEN + frame.len().max(148) + RELAY_HEADER_LEN,
                0,
            );
            out[..VIRTIO_NET_HDR_LEN].fill(0);
            let r = self
                .engine
                .handle_relay(&t, relay, frame, &mut out[VIRTIO_NET_HDR_LEN..], now);
            match r {
                Decap::ToTun { len } => {
                    out.truncate(VIRTIO_NET_HDR_LEN + len);
                    n += 1;
                }
                Decap::Forward { to, len } => {
                    let b = &out[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len];
                    send_one(&self.socket, &self.state, &self.tcp_relay, to, b);
                }
                _ => {}
            }
        }
        if n > 0 {
            write_tun(&self.dev, gro, &mut bufs[..n]);
        }
        flush(&self.engine, &self.socket, &self.state, &self.tcp_relay);
    }

    /// Starts a hole-punching attempt towards `peer` (before asking it to probe us).
    pub fn start_attempt(&self, peer: NodeId) -> bool {
        let ok = self.engine.start_attempt(peer, Instant::now());
        // The openers leave now, before we ask the peer to probe us.
        self.flush_and_wake();
        ok
    }

    /// Sends what the engine queued and lets the timer thread look at its next deadline.
    fn flush_and_wake(&self) {
        flush(&self.engine, &self.socket, &self.state, &self.tcp_relay);
        self.wake_timers();
    }

    /// The engine's next deadline may have moved earlier: the timer thread looks again.
    fn wake_timers(&self) {
        if let Some(t) = &self.timers {
            t.unpark();
        }
    }

    /// Sets the TTL of NAT openers (see `engine::OPEN_FIRST`).
    pub fn set_open_ttl(&self, ttl: u8) {
        self.engine.set_open_ttl(ttl);
    }

    /// `homeport ping`: one probe on the path in use.
    pub fn ping(&self, peer: NodeId) -> bool {
        let ok = self.engine.ping(peer, Instant::now());
        self.flush_and_wake();
        ok
    }

    /// Our address as each peer last saw it (from their Pongs).
    pub fn observed(&self) -> Vec<(NodeName, SocketAddr)> {
        let t = self.engine.snapshot();
        t.peers
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.path.lock().unwrap().observed?)))
            .collect()
    }

    /// "Probe me now" from a peer, relayed by the coordinator.
    pub fn probe_now(&self, peer: NodeId, endpoints: &[SocketAddr]) {
        self.engine.probe_now(peer, endpoints, Instant::now());
        self.flush_and_wake();
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        let t = self.engine.snapshot();
        let now = Instant::now();
        let relay_bound = self.engine.relay_bound(now).is_some();
        let over_tcp = self.tcp_relay.active.load(Ordering::Relaxed);
        t.peers
            .iter()
            .map(|p| {
                let (hs, rx, tx) = p.stats();
                let route = {
                    let path = p.path.lock().unwrap();
                    if p.device {
                        // A plain WireGuard device: no disco, no relay; direct once it
                        // handshook from the endpoint we know.
                        match path.endpoint {
                            Some(addr) if hs.is_some() => Route::Direct(addr),
                            _ => Route::None,
                        }
                    } else {
                        path.route(now, relay_bound, over_tcp)
                    }
                };
                PeerStatus {
                    id: p.id,
                    name: p.name.clone(),
                    public_key: p.key,
                    addrs: p.addrs,
                    path: match route {
                        Route::None => PathInfo::None,
                        Route::Direct(addr) => PathInfo::Direct { addr },
                        Route::Relay(why) => PathInfo::Relay {
                            reason: why.to_string(),
                        },
                    },
                    last_handshake_secs_ago: hs.map(|d| d.as_secs()),
                    rx_bytes: rx,
                    tx_bytes: tx,
                    handshakes: p.handshakes.load(Ordering::Relaxed),
                    online: p.online,
                    device: p.device,
                }
            })
            .collect()
    }

    /// Stops the threads and removes the policy routes; the TUN device goes with the last
    /// handle. A second call does nothing.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.intr.trigger();
        self.wake_timers();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap());
        if threads.is_empty() {
            return;
        }
        for t in threads {
            let _ = t.join();
        }
        self.routes.lock().unwrap().remove();
        self.published_udp.lock().unwrap().remove();
    }
}

/// Sends what the engine queued (handshakes, answers, probes, BINDs), in order: NAT openers
/// with their low TTL, the rest as usual.
fn flush(engine: &Engine, socket: &UdpSocket, state: &UdpSocketState, relay: &TcpRelay) {
    engine.flush_transmits(|t, b| match t.ttl {
        Some(ttl) => send_with_ttl(socket, t.to, b, ttl),
        None => send_one(socket, state, relay, t.to, b),
    });
}

/// The timer thread sleeps at least this long between rounds (a deadline already past, or
/// several close together, cost one round, never a spin).
const TIMERS_MIN_SLEEP: Duration = Duration::from_millis(5);

/// A non-blocking UDP socket for WireGuard on `port` (0: any free port), with large buffers and
/// The WireGuard socket on `port` (0: any), with quinn-udp's options and large buffers
/// (see [`homeport_udp::prepare`]).
fn wireguard_socket(port: u16) -> Result<(UdpSocket, UdpSocketState)> {
    let bind: SocketAddr = ([0, 0, 0, 0], port).into();
    let s = homeport_udp::bind(bind)
        .with_context(|| format!("binding the WireGuard UDP socket to {bind}"))?;
    // Marked so that mesh routes (an exit node's default route) never capture the tunnel's
    // own packets: a policy rule sends this mark to the main table (`routes_sync`).
    let mark: libc::c_int = crate::routes_sync::SOCKET_MARK as libc::c_int;
    // SAFETY: a valid socket descriptor and a c_int option of its size.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s.0),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            &mark as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot mark the WireGuard socket (SO_MARK)");
    }
    Ok(s)
}

fn send_one(
    socket: &UdpSocket,
    state: &UdpSocketState,
    relay: &TcpRelay,
    to: SocketAddr,
    data: &[u8],
) {
    if relay.divert(to, data, data.len()) {
        return;
    }
    let t = Transmit {
        destination: to,
        ecn: None,
        contents: data,
        segment_size: None,
        src_ip: None,
    };
    if let Err(e) = homeport_udp::send(socket, state, &t) {
        tracing::debug!(%to, error = %e, "UDP send failed");
    }
}

/// Sends one datagram with its IP TTL set to `ttl` (an `IP_TTL` control message, so the
/// socket's default TTL for everything else is untouched).
fn send_with_ttl(socket: &UdpSocket, to: SocketAddr, data: &[u8], ttl: u8) {
    tracing::debug!(%to, ttl, "NAT opener");
    let SocketAddr::V4(v4) = to else { return };
    // SAFETY: all pointers refer to live locals for the duration of the call; the control
    // buffer is sized with CMSG_SPACE for one int.
    unsafe {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = v4.port().to_be();
        addr.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut cbuf = [0u8; 64];
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = &mut addr as *mut _ as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::IPPROTO_IP;
        (*c).cmsg_type = libc::IP_TTL;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        let v: libc::c_int = ttl as libc::c_int;
        std::ptr::copy_nonoverlapping(
            &v as *const libc::c_int as *const u8,
            libc::CMSG_DATA(c),
            std::mem::size_of::<libc::c_int>(),
        );
        if libc::sendmsg(socket.as_raw_fd(), &msg, 0) < 0 {
            tracing::warn!(%to, error = %std::io::Error::last_os_error(), "opener send failed");
        }
    }
}

/// A run of equal-sized datagrams to one destination, sent with one GSO call.
struct GsoBatch {
    buf: Vec<u8>,
    len: usize,
    dst: Option<SocketAddr>,
    seg: usize,
    count: usize,
    max_segs: usize,
    /// The last segment was shorter than `seg`: nothing more may join.
    closed: bool,
}

impl GsoBatch {
    fn new(max_segs: usize) -> GsoBatch {
        GsoBatch {
            buf: vec![0u8; MAX_GSO * SEG_ROOM],
            len: 0,
            dst: None,
            seg: 0,
            count: 0,
            max_segs: max_segs.clamp(1, MAX_GSO),
            closed: false,
        }
    }

    /// Room for the next datagram.
    fn slot(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..self.len + SEG_ROOM]
    }

    /// Whether a datagram of `len` bytes to `dst` can join the run.
    fn fits(&self, dst: SocketAddr, len: usize) -> bool {
        self.count == 0
            || (self.dst == Some(dst)
                && !self.closed
                && self.count < self.max_segs
                && len <= self.seg
                && self.len + len <= GSO_MAX_BYTES
                && self.len + SEG_ROOM <= self.buf.len())
    }

    /// Commits a datagram already written at `slot()`.
    fn push(&mut self, dst: SocketAddr, len: usize) {
        if self.count == 0 {
            self.dst = Some(dst);
            self.seg = len;
        } else if len < self.seg {
            self.closed = true;
        }
        self.len += len;
        self.count += 1;
    }

    fn flush(
        &mut self,
        socket: &UdpSocket,
        state: &UdpSocketState,
        relay: &TcpRelay,
        counters: &Counters,
    ) {
        if self.count == 0 {
            return;
        }
        if let Some(dst) = self.dst
            && relay.divert(dst, &self.buf[..self.len], self.seg)
        {
            self.len = 0;
            self.count = 0;
            self.closed = false;
            self.dst = None;
            return;
        }
        let t = Transmit {
            destination: self.dst.expect("dst set with first segment"),
            ecn: None,
            contents: &self.buf[..self.len],
            segment_size: (self.count > 1).then_some(self.seg),
            src_ip: None,
        };
        if let Err(e) = homeport_udp::send(socket, state, &t) {
            tracing::debug!(to = ?self.dst, error = %e, "UDP send failed");
        }
        if self.count > 1 {
            counters.gso_sends.fetch_add(1, Ordering::Relaxed);
        }
        self.len = 0;
        self.count = 0;
        self.closed = false;
        self.dst = None;
    }
}

#[allow(clippy::too_many_arguments)]
fn tun_to_udp(
    engine: &Engine,
    dev: &SyncDevice,
    socket: &UdpSocket,
    state: &UdpSocketState,
    relay: &TcpRelay,
    stop: &AtomicBool,
    intr: &InterruptEvent,
    counters: &Counters,
) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs: Vec<Vec<u8>> = (0..TUN_BATCH)
        .map(|_| vec![0u8; VIRTIO_NET_HDR_LEN + 4096])
        .collect();
    let mut sizes = vec![0usize; TUN_BATCH];
    let mut batch = GsoBatch::new(state.max_gso_segments());
    let mut scratch = vec![0u8; SEG_ROOM];
    while !stop.load(Ordering::Relaxed) {
        let n = match dev.recv_multiple_intr(
            &mut original,
            &mut bufs,
            &mut sizes,
            VIRTIO_NET_HDR_LEN,
            intr,
        ) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !stop.load(Ordering::Relaxed) {
                    tracing::warn!(error = %e, "TUN read failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        counters
            .tun_rx_packets
            .fetch_add(n as u64, Ordering::Relaxed);
        let now = Instant::now();
        let table = engine.snapshot();
        for i in 0..n {
            let pkt = &bufs[i][VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + sizes[i]];
            if pkt.len() + 32 > SEG_ROOM {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match engine.encapsulate(&table, pkt, batch.slot(), now) {
                Encap::Send { to, len } => {
                    if batch.fits(to, len) {
                        batch.push(to, len);
                    } else {
                        // Move the datagram out of the slot, flush the run, start a new one.
                        scratch[..len].copy_from_slice(&batch.slot()[..len]);
                        batch.flush(socket, state, relay, counters);
                        batch.slot()[..len].copy_from_slice(&scratch[..len]);
                        batch.push(to, len);
                    }
                }
                Encap::Queued => {}
                Encap::Drop(r) => {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(?r, "dropped outbound packet");
                }
            }
        }
        batch.flush(socket, state, relay, counters);
        // Handshake initiations the batch started.
        flush(engine, socket, state, relay);
    }
}

fn udp_to_tun(
    engine: &Engine,
    dev: &SyncDevice,
    socket: &UdpSocket,
    state: &UdpSocketState,
    stop: &AtomicBool,
    counters: &Counters,
    side: Side,
) {
    let mut rx: Vec<Vec<u8>> = (0..UDP_BATCH).map(|_| vec![0u8; GRO_BUF]).collect();
    let mut meta = vec![RecvMeta::default(); UDP_BATCH];
    let mut tunbufs: Vec<Vec<u8>> = (0..TUN_BATCH)
        .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65535))
        .collect();
    let mut gro = GROTable::new();
    while !stop.load(Ordering::Relaxed) {
        let n = {
            let mut iovs: Vec<IoSliceMut> = rx.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            if !homeport_udp::wait_ready(socket, libc::POLLIN, 200) {
                continue;
            }
            match state.recv(UdpSockRef::from(socket), &mut iovs, &mut meta) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive failed");
                    continue;
                }
            }
        };
        let now = Instant::now();
        let table = engine.snapshot();
        let mut k = 0;
        for (m, buf) in meta.iter().zip(rx.iter()).take(n) {
            let stride = if m.stride == 0 { m.len } else { m.stride };
            let from = m.addr;
            if stride == 0 {
                // An empty datagram (anyone can send one): nothing to split or decode.
                counters.udp_rx_datagrams.fetch_add(1, Ordering::Relaxed);
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            for seg in buf[..m.len].chunks(stride) {
                counters.udp_rx_datagrams.fetch_add(1, Ordering::Relaxed);
                let kind = classify(seg);
                match kind {
                    DatagramKind::WireGuard if seg.len() == HANDSHAKE_INIT_LEN && seg[0] == 1 => {
                        // Handshake initiations (the only message anyone can send unasked, and
                        // the costly one) go to their own thread, so a flood of them costs this
                        // thread a copy each, never a hash or a Diffie-Hellman.
                        let mut d = [0u8; HANDSHAKE_INIT_LEN];
                        d.copy_from_slice(seg);
                        if side.handshake_tx.try_send((from, d)).is_err() {
                            counters.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    DatagramKind::WireGuard => {}
                    DatagramKind::Disco => {
                        if !engine.handle_disco(&table, from, seg, now) {
                            counters.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    DatagramKind::Relay => {}
                    DatagramKind::Stun => {
                        // Only answers from a server we asked, and only as many as the queue
                        // holds: junk at the port costs a comparison, never memory.
                        let queued = side.stun_gate.expects(from, now)
                            && side.stun_tx.try_send((from, seg.to_vec())).is_ok();
                        if !queued {
                            counters.stun_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    DatagramKind::Unknown => {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                // A WireGuard datagram, directly or wrapped by the relay.
                let out = &mut tunbufs[k];
                // Room for a relay header: a packet forwarded for a device may leave through it.
                out.resize(
                    VIRTIO_NET_HDR_LEN + seg.len().max(148) + RELAY_HEADER_LEN,
                    0,
                );
                let tun_out = &mut out[VIRTIO_NET_HDR_LEN..];
                let r = if kind == DatagramKind::Relay {
                    engine.handle_relay(&table, from, seg, tun_out, now)
                } else {
                    engine.decapsulate(&table, from, seg, tun_out, now)
                };
                match r {
                    Decap::ToTun { len } => {
                        out.truncate(VIRTIO_NET_HDR_LEN + len);
                        k += 1;
                        if k == TUN_BATCH {
                            write_tun(dev, &mut gro, &mut tunbufs[..k]);
                            k = 0;
                        }
                    }
                    Decap::Forward { to, len } => {
                        let b = &out[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len];
                        send_one(socket, state, &side.tcp_relay, to, b);
                    }
                    Decap::Done => {}
                    Decap::Drop(r) => {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::trace!(?r, %from, "dropped inbound datagram");
                    }
                }
            }
        }
        if k > 0 {
            write_tun(dev, &mut gro, &mut tunbufs[..k]);
        }
        // Handshake responses, Pongs, probes back: what the batch asked to answer.
        flush(engine, socket, state, &side.tcp_relay);
        forward_events(engine, &side.events);
    }
}

/// Size of a WireGuard handshake initiation.
const HANDSHAKE_INIT_LEN: usize = 148;
/// Initiations waiting for the handshake thread at most. A real peer sends one every 5 s at
/// most; under a flood the excess is dropped here, before any work, and the peer's retry gets in.
const HANDSHAKE_QUEUE: usize = 256;
/// Nice value of the handshake thread (the data path threads keep 0).
const HANDSHAKE_NICE: libc::c_int = 10;

/// The handshake thread: initiations from the receive thread. mac1 is checked first and under
/// load they get cookie replies (see [`Engine::decapsulate`]); the responses and any packets
/// queued for the session go out on the socket from here.
fn handshakes(
    engine: &Engine,
    socket: &UdpSocket,
    state: &UdpSocketState,
    relay: &TcpRelay,
    stop: &AtomicBool,
    counters: &Counters,
    rx: std::sync::mpsc::Receiver<(SocketAddr, [u8; HANDSHAKE_INIT_LEN])>,
) {
    // Below the data path threads: under a flood on a busy machine the scheduler serves the
    // tunnel first, handshakes with what is left (a real peer retries every 5 s).
    // SAFETY: setpriority on our own thread id; no memory is touched.
    unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::gettid() as libc::id_t,
            HANDSHAKE_NICE,
        );
    }
    let mut out = vec![0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let (from, d) = match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(m) => m,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let table = engine.snapshot();
        let r = engine.decapsulate(&table, from, &d, &mut out, Instant::now());
        flush(engine, socket, state, relay);
        if let Decap::Drop(r) = r {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(?r, %from, "dropped handshake initiation");
        }
    }
}

/// Where the receive thread hands off what it does not decrypt itself.
struct Side {
    /// The relay's TCP/TLS fallback (answers to relayed datagrams go back through it).
    tcp_relay: Arc<TcpRelay>,
    /// The engine's events (Pongs arrive on this thread).
    events: EventSink,
    /// STUN answers: only from servers asked recently, into a bounded queue.
    stun_gate: Arc<crate::stun::StunGate>,
    stun_tx: SideChannel,
    /// Handshake initiations, to the handshake thread.
    handshake_tx: std::sync::mpsc::SyncSender<(SocketAddr, [u8; HANDSHAKE_INIT_LEN])>,
}

fn write_tun(dev: &SyncDevice, gro: &mut GROTable, bufs: &mut [Vec<u8>]) {
    if let Err(e) = dev.send_multiple(gro, bufs, VIRTIO_NET_HDR_LEN) {
        tracing::debug!(error = %e, "TUN write failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The opener TTL really lands in the IP header (read back with IP_RECVTTL).
    #[test]
    fn send_with_ttl_sets_the_ttl() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let on: libc::c_int = 1;
        // SAFETY: plain setsockopt/recvmsg on live sockets with correctly sized buffers.
        unsafe {
            assert_eq!(
                libc::setsockopt(
                    rx.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_RECVTTL,
                    &on as *const _ as *const libc::c_void,
                    4
                ),
                0
            );
        }
        send_with_ttl(&tx, rx.local_addr().unwrap(), b"x", 3);
        let mut data = [0u8; 16];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut cbuf = [0u64; 16];
        let ttl = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
            assert!(libc::recvmsg(rx.as_raw_fd(), &mut msg, 0) > 0);
            let c = libc::CMSG_FIRSTHDR(&msg);
            assert!(!c.is_null());
            assert_eq!(
                ((*c).cmsg_level, (*c).cmsg_type),
                (libc::IPPROTO_IP, libc::IP_TTL)
            );
            *(libc::CMSG_DATA(c) as *const libc::c_int)
        };
        assert_eq!(ttl, 3);
    }
}
