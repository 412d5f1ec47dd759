//! The UDP relay, sharing the STUN socket (one port to open on the VPS), and its TCP/TLS
//! fallback. It forwards opaque WireGuard datagrams between nodes identified by their keys and
//! never decrypts them. Framing and the BIND proof are encoded and decoded in
//! [`homeport_proto::relay`] only.
//!
//! Only registered, unrevoked nodes may bind: a BIND carries an HMAC under the X25519 secret
//! shared by the node key and the relay key, so it proves possession of the node's private key.
//! A removed node's key leaves the authorized set at once, and its datagrams stop at the next one.
//!
//! Abuse limits: a BIND's time must grow per key (no replay); the HMAC key derived for a node
//! key is cached, so a flood of BINDs for known keys costs one HMAC each, not an X25519 operation;
//! over TCP, nothing but a stack buffer of [`BIND_LEN`] bytes exists before the first frame
//! proved a key, that frame must come within [`TCP_BIND_DEADLINE`], one connection per key
//! (a new one replaces the old), at most [`MAX_TCP_CLIENTS`] connections, an idle connection
//! ends after [`TCP_IDLE`], and each connection's outbound queue holds at most
//! [`TCP_QUEUE_BYTES`] (a client that stops reading is cut after [`TCP_WRITE_STALL`]).

use homeport_proto::relay::{
    BIND_LEN, BOUND, Bind, RELAY_BIND, RELAY_HEADER_LEN, RELAY_RECV, RELAY_SEND, TCP_FRAME_HEADER,
};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use x25519_dalek::{PublicKey, StaticSecret};

/// Where the relay's UDP datagrams go: (to, bytes, GSO segment size when several).
pub type UdpOut<'a> = dyn FnMut(SocketAddr, &[u8], Option<usize>) + 'a;

/// A BIND whose timestamp is further than this from our clock is refused; within the window,
/// the time must also be later than the key's last accepted BIND. BIND times are milliseconds:
/// a node that moves its socket binds again at once, within the second of its last BIND.
const BIND_SKEW_MS: u64 = 120_000;
/// Bindings not refreshed for this long are forgotten (nodes re-bind every 20 s).
const BINDING_TTL: Duration = Duration::from_secs(60);
/// A TCP client must prove its key within this time of the upgrade (a node sends its BIND at
/// once; a slow link still manages in well under a second).
pub const TCP_BIND_DEADLINE: Duration = Duration::from_secs(10);
/// A TCP client that sends nothing for this long is dropped: nodes re-bind every 20 s, so a live
/// one is never idle this long.
pub const TCP_IDLE: Duration = Duration::from_secs(60);
/// Most TCP relay connections at once (bound or not). Each costs a 64 KiB read buffer and up to
/// [`TCP_QUEUE_BYTES`] of queue once bound: 512 of them stay under ~160 MiB.
pub const MAX_TCP_CLIENTS: usize = 512;
/// Bytes queued towards one TCP client before further datagrams for it are dropped (like a full
/// UDP socket buffer): about 170 full-size WireGuard packets, enough for a burst.
pub const TCP_QUEUE_BYTES: usize = 256 * 1024;
/// Bytes of queued frames written to a TCP client at once (and the read buffer of a bound one).
const TCP_WRITE_BATCH: usize = 64 * 1024;
/// A TCP client whose socket takes no data for this long is cut (it stopped reading).
pub const TCP_WRITE_STALL: Duration = Duration::from_secs(10);

pub struct Relay {
    secret: StaticSecret,
    pub public: PublicKey,
    /// Keys of registered, unrevoked nodes. Kept up to date by the mesh state.
    pub authorized: RwLock<HashSet<[u8; 32]>>,
    /// Per authorized key: its cached HMAC key and the time of its last accepted BIND.
    keys: Mutex<HashMap<[u8; 32], KeyState>>,
    bindings: Mutex<Bindings>,
    /// The UDP socket (set by [`serve`]).
    udp: std::sync::OnceLock<Arc<UdpIo>>,
    /// Clients on the TCP/TLS fallback, by the pseudo address that stands for them in the
    /// bindings (240.0.0.0/4, never a real source).
    tcp: Mutex<TcpClients>,
    next_tcp: AtomicU32,
    tcp_open: Arc<AtomicUsize>,
    /// X25519 operations done for BINDs (each is ~50 µs; the cache keeps this to one per key).
    x25519_ops: AtomicU64,
}

/// The relay's UDP socket: non-blocking, batched (see `homeport_udp`).
struct UdpIo {
    socket: std::net::UdpSocket,
    state: homeport_udp::UdpSocketState,
}

impl UdpIo {
    /// Sends `data` (segments of `seg` bytes when given: one GSO send), waiting briefly for
    /// room in the socket buffer (the relay's own thread only).
    fn transmit(&self, to: SocketAddr, data: &[u8], seg: Option<usize>) {
        let t = homeport_udp::Transmit {
            destination: to,
            ecn: None,
            contents: data,
            segment_size: seg,
            src_ip: None,
        };
        if let Err(e) = homeport_udp::send(&self.socket, &self.state, &t) {
            tracing::trace!(%to, error = %e, "relay: UDP send failed");
        }
    }

    /// Sends one datagram if the socket buffer has room now (dropped otherwise, as a router
    /// would: callers include async tasks, which must not wait).
    fn send_now(&self, to: SocketAddr, b: &[u8]) {
        let t = homeport_udp::Transmit {
            destination: to,
            ecn: None,
            contents: b,
            segment_size: None,
            src_ip: None,
        };
        if let Err(e) = homeport_udp::try_send(&self.socket, &self.state, &t) {
            tracing::trace!(%to, error = %e, "relay: UDP send failed");
        }
    }
}

#[derive(Default)]
struct KeyState {
    mac: Option<ring::hmac::Key>,
    last_bind: Option<u64>,
}

#[derive(Default)]
struct Bindings {
    by_key: HashMap<[u8; 32], (SocketAddr, Instant)>,
    by_addr: HashMap<SocketAddr, [u8; 32]>,
}

#[derive(Default)]
struct TcpClients {
    by_addr: HashMap<SocketAddr, TcpClient>,
    by_key: HashMap<[u8; 32], SocketAddr>,
}

struct TcpClient {
    /// Whole frames (length prefix included) for the writer.
    tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    close: CancellationToken,
}

/// What to do with one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// A BIND proved `key` from `to`: answer BOUND there.
    Bound {
        to: SocketAddr,
        key: [u8; 32],
    },
    /// Forward: write a RECV header for `from_key` followed by the payload to `to`.
    Forward {
        to: SocketAddr,
        from_key: [u8; 32],
    },
    Drop(&'static str),
}

/// One of the [`MAX_TCP_CLIENTS`] TCP relay slots; freed on drop.
pub struct TcpSlot(Arc<AtomicUsize>);

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn is_pseudo(a: SocketAddr) -> bool {
    matches!(a.ip(), IpAddr::V4(v4) if v4.octets()[0] & 0xf0 == 240)
}

impl Relay {
    pub fn new(secret: StaticSecret) -> Arc<Relay> {
        let public = PublicKey::from(&secret);
        Arc::new(Relay {
            secret,
            public,
            authorized: RwLock::new(HashSet::new()),
            keys: Mutex::new(HashMap::new()),
            bindings: Mutex::new(Bindings::default()),
            udp: std::sync::OnceLock::new(),
            tcp: Mutex::new(TcpClients::default()),
            next_tcp: AtomicU32::new(1),
            tcp_open: Arc::new(AtomicUsize::new(0)),
            x25519_ops: AtomicU64::new(0),
        })
    }

    /// Replaces the set of keys that may bind. A key that leaves it loses its binding, its
    /// cached HMAC key and its TCP connection at once.
    pub fn set_authorized(&self, keys: impl IntoIterator<Item = [u8; 32]>) {
        let keys: HashSet<[u8; 32]> = keys.into_iter().collect();
        {
            let mut b = self.bindings.lock().unwrap();
            let Bindings { by_key, by_addr } = &mut *b;
            by_key.retain(|k, (a, _)| {
                let keep = keys.contains(k);
                if !keep {
                    by_addr.remove(a);
                }
                keep
            });
        }
        self.keys.lock().unwrap().retain(|k, _| keys.contains(k));
        {
            let mut t = self.tcp.lock().unwrap();
            let TcpClients { by_addr, by_key } = &mut *t;
            by_key.retain(|k, a| {
                let keep = keys.contains(k);
                if !keep && let Some(c) = by_addr.remove(a) {
                    c.close.cancel();
                }
                keep
            });
        }
        *self.authorized.write().unwrap() = keys;
    }

    /// X25519 operations done so far for BIND proofs.
    pub fn x25519_ops(&self) -> u64 {
        self.x25519_ops.load(Ordering::Relaxed)
    }

    /// Open TCP relay connections.
    pub fn tcp_clients(&self) -> usize {
        self.tcp_open.load(Ordering::Acquire)
    }

    /// Bytes queued towards TCP clients, in total.
    pub fn tcp_queued_bytes(&self) -> usize {
        self.tcp
            .lock()
            .unwrap()
            .by_addr
            .values()
            .map(|c| c.queued.load(Ordering::Acquire))
            .sum()
    }

    /// Takes a TCP relay slot, or None when [`MAX_TCP_CLIENTS`] are open.
    pub fn tcp_slot(&self) -> Option<TcpSlot> {
        let mut cur = self.tcp_open.load(Ordering::Acquire);
        loop {
            if cur >= MAX_TCP_CLIENTS {
                return None;
            }
            match self.tcp_open.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(TcpSlot(self.tcp_open.clone())),
                Err(now) => cur = now,
            }
        }
    }

    fn check_bind(&self, d: &[u8], unix_now: u64) -> Result<[u8; 32], &'static str> {
        let Some(bind) = Bind::decode(d) else {
            return Err("bad BIND length");
        };
        if !self.authorized.read().unwrap().contains(&bind.key) {
            return Err("BIND from an unknown or revoked node");
        }
        if bind.unix.abs_diff(unix_now) > BIND_SKEW_MS {
            return Err("BIND timestamp outside the replay window");
        }
        let mut keys = self.keys.lock().unwrap();
        let st = keys.entry(bind.key).or_default();
        if st.last_bind.is_some_and(|last| bind.unix <= last) {
            return Err("BIND replayed: its time is not after the key's last BIND");
        }
        let mac = st.mac.get_or_insert_with(|| {
            self.x25519_ops.fetch_add(1, Ordering::Relaxed);
            let shared = self.secret.diffie_hellman(&PublicKey::from(bind.key));
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, shared.as_bytes())
        });
        if ring::hmac::verify(mac, &Bind::signed(&bind.key, bind.unix), &bind.mac).is_err() {
            return Err("BIND with a bad proof");
        }
        st.last_bind = Some(bind.unix);
        Ok(bind.key)
    }

    /// Decides what to do with datagram `d` from `from`. `unix_now` is the wall clock
    /// (milliseconds since the epoch).
    pub fn handle(&self, from: SocketAddr, d: &[u8], now: Instant, unix_now: u64) -> Action {
        match homeport_proto::relay::kind(d) {
            None => Action::Drop("not a relay datagram"),
            Some(RELAY_BIND) => {
                let key = match self.check_bind(d, unix_now) {
                    Ok(k) => k,
                    Err(why) => return Action::Drop(why),
                };
                let mut b = self.bindings.lock().unwrap();
                if let Some((old, _)) = b.by_key.insert(key, (from, now))
                    && old != from
                {
                    b.by_addr.remove(&old);
                }
                b.by_addr.insert(from, key);
                Action::Bound { to: from, key }
            }
            Some(RELAY_SEND) => {
                let Some((_, dst, _)) = homeport_proto::relay::parse(d) else {
                    return Action::Drop("short SEND");
                };
                let b = self.bindings.lock().unwrap();
                let Some(src) = b.by_addr.get(&from).copied() else {
                    return Action::Drop("SEND from an address that is not bound");
                };
                let Some((src_addr, src_at)) = b.by_key.get(&src) else {
                    return Action::Drop("SEND from a stale binding");
                };
                if *src_addr != from || now.saturating_duration_since(*src_at) > BINDING_TTL {
                    return Action::Drop("SEND from a stale binding");
                }
                if dst == src {
                    return Action::Drop("SEND to itself");
                }
                match b.by_key.get(&dst) {
                    Some((to, at)) if now.saturating_duration_since(*at) <= BINDING_TTL => {
                        Action::Forward {
                            to: *to,
                            from_key: src,
                        }
                    }
                    _ => Action::Drop("SEND to a node that is not bound"),
                }
            }
            Some(_) => Action::Drop("unknown relay message type"),
        }
    }
}

/// Milliseconds since the epoch (the unit of BIND times).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Relay {
    /// Sends `b` to `to`: a UDP address (dropped when the socket buffer is full, as a router
    /// would), or a TCP client's pseudo address (queued within the client's byte budget;
    /// dropped beyond it).
    fn deliver(&self, to: SocketAddr, b: &[u8]) {
        if is_pseudo(to) {
            let t = self.tcp.lock().unwrap();
            let Some(c) = t.by_addr.get(&to) else { return };
            let need = TCP_FRAME_HEADER + b.len();
            if c.queued.load(Ordering::Acquire) + need > TCP_QUEUE_BYTES {
                tracing::trace!(%to, "relay: TCP client queue full; dropped");
                return;
            }
            let mut f = Vec::with_capacity(need);
            if homeport_proto::relay::tcp_frame(&mut f, b).is_none() {
                return;
            }
            c.queued.fetch_add(need, Ordering::AcqRel);
            if c.tx.send(f).is_err() {
                c.queued.fetch_sub(need, Ordering::AcqRel);
            }
            return;
        }
        if let Some(u) = self.udp.get() {
            u.send_now(to, b);
        }
    }

    /// Handles one datagram from the TCP client at `pseudo`, bound to `key`: a BIND for
    /// another key is dropped (one connection speaks for one node).
    fn process_bound(&self, pseudo: SocketAddr, key: [u8; 32], d: &[u8], out: &mut Vec<u8>) {
        if Bind::decode(d).is_some_and(|b| b.key != key) {
            tracing::trace!(%pseudo, "relay: BIND for another key on a bound TCP connection; dropped");
            return;
        }
        self.process(pseudo, d, out);
    }

    /// Handles one datagram from a TCP client and delivers what it produces.
    fn process(&self, from: SocketAddr, d: &[u8], out: &mut Vec<u8>) {
        match self.handle(from, d, Instant::now(), unix_now()) {
            Action::Bound { to, .. } => self.deliver(to, &BOUND),
            Action::Forward { to, from_key } => {
                let payload = &d[RELAY_HEADER_LEN..];
                out.resize(RELAY_HEADER_LEN + payload.len(), 0);
                let h = homeport_proto::relay::write_header(out, RELAY_RECV, &from_key);
                out[h..h + payload.len()].copy_from_slice(payload);
                self.deliver(to, &out[..h + payload.len()]);
            }
            Action::Drop(why) => tracing::trace!(%from, why, "relay: dropped"),
        }
    }

    /// Handles one received UDP datagram from `from`: `buf` holds segments of `stride` bytes
    /// (a GRO run; the last may be shorter; 0: one segment). SENDs are turned into RECVs in
    /// place, and each run of consecutive segments bound for one UDP destination is handed to
    /// `udp_out(to, bytes, segment_size)` at once, so a batch that came in with one syscall
    /// usually leaves with one GSO send. BOUND and STUN answers go to `udp_out` too; datagrams
    /// for TCP clients are queued to them here. No IO of its own (the fuzz target drives it).
    pub fn handle_batch(
        &self,
        from: SocketAddr,
        buf: &mut [u8],
        stride: usize,
        now: Instant,
        udp_out: &mut UdpOut<'_>,
    ) {
        if is_pseudo(from) {
            // 240.0.0.0/4 stands for TCP clients in the bindings: a (spoofed) UDP source there
            // must not act as one.
            return;
        }
        let stride = if stride == 0 { buf.len() } else { stride };
        if stride == 0 {
            return;
        }
        // The run being built: destination and byte range in `buf`.
        let mut run: Option<(SocketAddr, usize, usize)> = None;
        let mut off = 0;
        while off < buf.len() {
            let end = (off + stride).min(buf.len());
            let seg = &mut buf[off..end];
            let forward = if homeport_proto::relay::kind(seg).is_some() {
                match self.handle(from, seg, now, unix_now_if_bind(seg)) {
                    Action::Forward { to, from_key } => {
                        homeport_proto::relay::write_header(seg, RELAY_RECV, &from_key);
                        Some(to)
                    }
                    Action::Bound { to, .. } => {
                        self.flush_run(buf, stride, run.take(), udp_out);
                        udp_out(to, &BOUND, None);
                        None
                    }
                    Action::Drop(why) => {
                        tracing::trace!(%from, why, "relay: dropped");
                        None
                    }
                }
            } else {
                self.flush_run(buf, stride, run.take(), udp_out);
                if let Some(resp) = crate::stun::answer(&buf[off..end], from) {
                    udp_out(from, &resp, None);
                }
                None
            };
            if let Some(to) = forward {
                match &mut run {
                    Some((dst, _, run_end)) if *dst == to && *run_end == off => *run_end = end,
                    _ => {
                        self.flush_run(buf, stride, run.take(), udp_out);
                        run = Some((to, off, end));
                    }
                }
            }
            off = end;
        }
        self.flush_run(buf, stride, run, udp_out);
    }

    /// Sends a run of RECV segments of `buf` to its destination: one transmit to a UDP
    /// address, or one frame each to a TCP client.
    fn flush_run(
        &self,
        buf: &[u8],
        stride: usize,
        run: Option<(SocketAddr, usize, usize)>,
        udp_out: &mut UdpOut<'_>,
    ) {
        let Some((to, start, end)) = run else { return };
        let data = &buf[start..end];
        if is_pseudo(to) {
            for seg in data.chunks(stride) {
                self.deliver(to, seg);
            }
            return;
        }
        udp_out(to, data, (data.len() > stride).then_some(stride));
    }

    /// Serves one client of the TCP/TLS fallback until it disconnects, goes idle or is replaced:
    /// length-prefixed relay datagrams both ways. It must send a valid BIND within
    /// [`TCP_BIND_DEADLINE`] (an invalid one closes it); frames before it are dropped, and until
    /// then only stack buffers of a few hundred bytes are used. The binding points at a pseudo
    /// address that routes to this connection.
    pub async fn serve_stream<S>(self: Arc<Self>, stream: S, slot: TcpSlot)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let _slot = slot;
        let n = self.next_tcp.fetch_add(1, Ordering::Relaxed);
        let pseudo = SocketAddr::from((
            [
                240 | ((n >> 24) as u8 & 0x0f),
                (n >> 16) as u8,
                (n >> 8) as u8,
                n as u8,
            ],
            1,
        ));
        let (mut r, mut w) = tokio::io::split(stream);

        let mut first = [0u8; BIND_LEN];
        let got = tokio::time::timeout(TCP_BIND_DEADLINE, async {
            // A node sends data as soon as its link is up, and its BIND when one is due (within
            // a few seconds): frames before the BIND are dropped, read through this stack buffer,
            // so nothing is allocated for a client that has not proved a key.
            let mut scratch = [0u8; 256];
            loop {
                let mut len = [0u8; TCP_FRAME_HEADER];
                r.read_exact(&mut len).await.ok()?;
                let n = homeport_proto::relay::tcp_frame_len(len);
                if n == BIND_LEN {
                    r.read_exact(&mut first).await.ok()?;
                    if homeport_proto::relay::kind(&first) == Some(RELAY_BIND) {
                        return Some(());
                    }
                    continue;
                }
                let mut left = n;
                while left > 0 {
                    let k = left.min(scratch.len());
                    r.read_exact(&mut scratch[..k]).await.ok()?;
                    left -= k;
                }
            }
        })
        .await;
        if !matches!(got, Ok(Some(()))) {
            tracing::debug!(%pseudo, "relay: TCP client sent no BIND in time; closed");
            return;
        }
        let key = match self.handle(pseudo, &first, Instant::now(), unix_now()) {
            Action::Bound { key, .. } => key,
            other => {
                tracing::debug!(%pseudo, ?other, "relay: TCP client's BIND is not valid; closed");
                return;
            }
        };

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let queued = Arc::new(AtomicUsize::new(0));
        let close = CancellationToken::new();
        {
            let mut t = self.tcp.lock().unwrap();
            if let Some(old) = t.by_key.insert(key, pseudo)
                && let Some(c) = t.by_addr.remove(&old)
            {
                tracing::debug!(old = %old, new = %pseudo, "relay: TCP client replaced by a new connection for its key");
                c.close.cancel();
            }
            t.by_addr.insert(
                pseudo,
                TcpClient {
                    tx,
                    queued: queued.clone(),
                    close: close.clone(),
                },
            );
        }
        let writer = {
            let close = close.clone();
            tokio::spawn(async move {
                // Frames queued meanwhile go out with the first one: one TLS record and one
                // write per batch, not per datagram.
                let mut batch = Vec::with_capacity(TCP_WRITE_BATCH);
                loop {
                    let f = tokio::select! {
                        f = rx.recv() => match f { Some(f) => f, None => break },
                        _ = close.cancelled() => break,
                    };
                    batch.clear();
                    batch.extend_from_slice(&f);
                    while batch.len() < TCP_WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(f) => batch.extend_from_slice(&f),
                            Err(_) => break,
                        }
                    }
                    match tokio::time::timeout(TCP_WRITE_STALL, w.write_all(&batch)).await {
                        Ok(Ok(())) => {
                            queued.fetch_sub(batch.len(), Ordering::AcqRel);
                        }
                        _ => {
                            tracing::debug!("relay: TCP client stopped reading; closed");
                            close.cancel();
                            break;
                        }
                    }
                }
            })
        };
        // Revoked between the BIND and the registration above: set_authorized missed it.
        if self.authorized.read().unwrap().contains(&key) {
            tracing::debug!(%pseudo, "relay: TCP client bound");
            self.deliver(pseudo, &BOUND);
            // Buffered only now that the client proved a key: whole frames already read are
            // handled without a read call each.
            let mut r = tokio::io::BufReader::with_capacity(TCP_WRITE_BATCH, r);
            let mut buf = vec![0u8; homeport_proto::relay::TCP_FRAME_MAX];
            let mut out = Vec::with_capacity(buf.len() + RELAY_HEADER_LEN);
            loop {
                let avail = tokio::select! {
                    _ = close.cancelled() => break,
                    a = tokio::time::timeout(TCP_IDLE, r.fill_buf()) => match a {
                        Ok(Ok(a)) if !a.is_empty() => a,
                        _ => break,
                    },
                };
                let whole = homeport_proto::relay::tcp_frames_len(avail);
                if whole > 0 {
                    for d in homeport_proto::relay::tcp_frames(&avail[..whole]) {
                        self.process_bound(pseudo, key, d, &mut out);
                    }
                    r.consume(whole);
                    continue;
                }
                // A frame cut by the buffer's end.
                let frame = tokio::time::timeout(TCP_IDLE, async {
                    let mut len = [0u8; TCP_FRAME_HEADER];
                    r.read_exact(&mut len).await?;
                    let n = homeport_proto::relay::tcp_frame_len(len);
                    r.read_exact(&mut buf[..n]).await?;
                    Ok::<usize, std::io::Error>(n)
                })
                .await;
                let Ok(Ok(n)) = frame else { break };
                self.process_bound(pseudo, key, &buf[..n], &mut out);
            }
        }
        close.cancel();
        writer.abort();
        {
            let mut t = self.tcp.lock().unwrap();
            t.by_addr.remove(&pseudo);
            if t.by_key.get(&key) == Some(&pseudo) {
                t.by_key.remove(&key);
            }
        }
        {
            let mut b = self.bindings.lock().unwrap();
            if b.by_addr.remove(&pseudo).is_some()
                && b.by_key.get(&key).is_some_and(|(a, _)| *a == pseudo)
            {
                b.by_key.remove(&key);
            }
        }
        tracing::debug!(%pseudo, "relay: TCP client gone");
    }
}

/// The wall clock for [`Relay::handle`]: read only for BINDs (the only messages that carry a
/// time), not for every forwarded datagram.
fn unix_now_if_bind(d: &[u8]) -> u64 {
    if homeport_proto::relay::kind(d) == Some(RELAY_BIND) {
        unix_now()
    } else {
        0
    }
}

/// Serves STUN and the relay on one UDP socket until `shutdown`, on a thread of its own:
/// up to [`homeport_udp::BATCH`] GRO runs per recvmmsg, forwarded with GSO, no allocation
/// per datagram.
pub async fn serve(
    sock: std::net::UdpSocket,
    relay: Arc<Relay>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (socket, state) = homeport_udp::prepare(sock)?;
    let io = Arc::new(UdpIo { socket, state });
    let _ = relay.udp.set(io.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("relay-udp".into())
            .spawn(move || udp_loop(&relay, &io, &stop))?
    };
    shutdown.cancelled().await;
    stop.store(true, Ordering::Release);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    Ok(())
}

fn udp_loop(relay: &Relay, io: &UdpIo, stop: &std::sync::atomic::AtomicBool) {
    use homeport_udp::{BATCH, GRO_BUF, RecvMeta};
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; GRO_BUF]).collect();
    let mut meta = [RecvMeta::default(); BATCH];
    while !stop.load(Ordering::Acquire) {
        if !homeport_udp::wait_ready(&io.socket, libc::POLLIN, 200) {
            continue;
        }
        let n = {
            let mut it = bufs.iter_mut();
            let mut iovs: [std::io::IoSliceMut; BATCH] = std::array::from_fn(|_| {
                std::io::IoSliceMut::new(it.next().expect("BATCH buffers"))
            });
            match homeport_udp::recv(&io.socket, &io.state, &mut iovs, &mut meta) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::trace!(error = %e, "relay recv");
                    continue;
                }
            }
        };
        let now = Instant::now();
        for (m, buf) in meta[..n].iter().zip(bufs.iter_mut()) {
            relay.handle_batch(
                m.addr,
                &mut buf[..m.len],
                m.stride,
                now,
                &mut |to, d, seg| io.transmit(to, d, seg),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homeport_proto::relay::tcp_frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn bind_msg(node: &StaticSecret, relay: &PublicKey, unix: u64) -> Vec<u8> {
        let key = PublicKey::from(node).to_bytes();
        let shared = node.diffie_hellman(relay);
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, shared.as_bytes());
        let tag = ring::hmac::sign(&k, &Bind::signed(&key, unix));
        Bind {
            key,
            unix,
            mac: tag.as_ref().try_into().unwrap(),
        }
        .encode()
        .to_vec()
    }

    fn send_msg(dst: &[u8; 32], payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; RELAY_HEADER_LEN];
        homeport_proto::relay::write_header(&mut m, RELAY_SEND, dst);
        m.extend_from_slice(payload);
        m
    }

    fn key() -> StaticSecret {
        StaticSecret::random_from_rng(rand::rngs::OsRng)
    }

    fn pk(k: &StaticSecret) -> [u8; 32] {
        PublicKey::from(k).to_bytes()
    }

    #[test]
    fn binds_forwards_and_refuses_strangers() {
        let relay = Relay::new(key());
        let (a, b) = (key(), key());
        let (pa, pb) = (pk(&a), pk(&b));
        relay.set_authorized([pa, pb]);
        let (aa, ab): (SocketAddr, SocketAddr) = (
            "203.0.113.2:1000".parse().unwrap(),
            "203.0.113.3:2000".parse().unwrap(),
        );
        let now = Instant::now();
        let unix = 1_800_000_000;
        assert_eq!(
            relay.handle(aa, &bind_msg(&a, &relay.public, unix), now, unix),
            Action::Bound { to: aa, key: pa }
        );
        // b is not bound yet: nothing to forward to.
        assert_eq!(
            relay.handle(aa, &send_msg(&pb, b"x"), now, unix),
            Action::Drop("SEND to a node that is not bound")
        );
        assert!(matches!(
            relay.handle(ab, &bind_msg(&b, &relay.public, unix), now, unix),
            Action::Bound { .. }
        ));
        assert_eq!(
            relay.handle(aa, &send_msg(&pb, b"x"), now, unix),
            Action::Forward {
                to: ab,
                from_key: pa
            }
        );
        // A stranger cannot bind, an old BIND is refused, a forged proof is refused.
        let c = key();
        assert!(matches!(
            relay.handle(aa, &bind_msg(&c, &relay.public, unix), now, unix),
            Action::Drop(_)
        ));
        assert!(matches!(
            relay.handle(
                aa,
                &bind_msg(&a, &relay.public, unix - 1_000_000),
                now,
                unix
            ),
            Action::Drop(_)
        ));
        let mut forged = bind_msg(&a, &relay.public, unix + 1);
        forged[60] ^= 1;
        assert_eq!(
            relay.handle(ab, &forged, now, unix),
            Action::Drop("BIND with a bad proof")
        );
        // An unbound address cannot send.
        let x: SocketAddr = "192.0.2.99:9".parse().unwrap();
        assert!(matches!(
            relay.handle(x, &send_msg(&pb, b"x"), now, unix),
            Action::Drop(_)
        ));
        // Revocation: b leaves the authorized set; nothing more reaches it or comes from it.
        relay.set_authorized([pa]);
        assert!(matches!(
            relay.handle(aa, &send_msg(&pb, b"x"), now, unix),
            Action::Drop(_)
        ));
        assert!(matches!(
            relay.handle(ab, &send_msg(&pa, b"x"), now, unix),
            Action::Drop(_)
        ));
        // Garbage.
        for g in [
            &b""[..],
            &[0xF2, b'h', b'p', b'r'][..],
            &[0xF2, b'h', b'p', b'r', 9, 9][..],
        ] {
            assert!(matches!(relay.handle(aa, g, now, unix), Action::Drop(_)));
        }
    }

    #[test]
    fn captured_bind_replayed_from_another_address_is_refused() {
        let relay = Relay::new(key());
        let (a, b) = (key(), key());
        relay.set_authorized([pk(&a), pk(&b)]);
        let home: SocketAddr = "203.0.113.2:1000".parse().unwrap();
        let thief: SocketAddr = "192.0.2.66:4000".parse().unwrap();
        let now = Instant::now();
        let unix = 1_800_000_000;
        let captured = bind_msg(&a, &relay.public, unix);
        assert!(matches!(
            relay.handle(home, &captured, now, unix),
            Action::Bound { .. }
        ));
        // Replayed within the clock window, from the thief's address: refused, and the binding
        // (where a's traffic goes) stays at home.
        assert_eq!(
            relay.handle(thief, &captured, now, unix + 5),
            Action::Drop("BIND replayed: its time is not after the key's last BIND")
        );
        relay.handle(
            "203.0.113.3:2000".parse().unwrap(),
            &bind_msg(&b, &relay.public, unix),
            now,
            unix,
        );
        assert_eq!(
            relay.handle(
                "203.0.113.3:2000".parse().unwrap(),
                &send_msg(&pk(&a), b"x"),
                now,
                unix
            ),
            Action::Forward {
                to: home,
                from_key: pk(&b)
            }
        );
        // The node's next BIND (a later time) is accepted.
        assert!(matches!(
            relay.handle(
                home,
                &bind_msg(&a, &relay.public, unix + 20),
                now,
                unix + 20
            ),
            Action::Bound { .. }
        ));
    }

    #[test]
    fn bind_flood_for_a_known_key_costs_one_x25519_operation() {
        let relay = Relay::new(key());
        let a = key();
        relay.set_authorized([pk(&a)]);
        let from: SocketAddr = "192.0.2.66:4000".parse().unwrap();
        let now = Instant::now();
        let unix = 1_800_000_000;
        for i in 0..1000u64 {
            let mut m = bind_msg(&a, &relay.public, unix + i % 100);
            m[50] ^= 0xff; // a bad proof: the flooder does not hold the key
            assert_eq!(
                relay.handle(from, &m, now, unix),
                Action::Drop("BIND with a bad proof")
            );
        }
        assert_eq!(relay.x25519_ops(), 1, "one derivation, then cached");
        assert!(matches!(
            relay.handle(from, &bind_msg(&a, &relay.public, unix), now, unix),
            Action::Bound { .. }
        ));
        assert_eq!(relay.x25519_ops(), 1);
        // Revocation drops the cached key: a re-authorized key derives afresh.
        relay.set_authorized([]);
        relay.set_authorized([pk(&a)]);
        relay.handle(from, &bind_msg(&a, &relay.public, unix + 1), now, unix);
        assert_eq!(relay.x25519_ops(), 2);
    }

    #[test]
    fn send_to_itself_is_dropped() {
        let relay = Relay::new(key());
        let a = key();
        relay.set_authorized([pk(&a)]);
        let from: SocketAddr = "203.0.113.2:1000".parse().unwrap();
        let (now, unix) = (Instant::now(), 1_800_000_000);
        relay.handle(from, &bind_msg(&a, &relay.public, unix), now, unix);
        assert_eq!(
            relay.handle(from, &send_msg(&pk(&a), b"loop"), now, unix),
            Action::Drop("SEND to itself")
        );
    }

    fn framed(d: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        tcp_frame(&mut f, d).unwrap();
        f
    }

    /// Starts serve_stream on one end of an in-memory pipe of `pipe` bytes; returns the other.
    fn tcp_client(relay: &Arc<Relay>, pipe: usize) -> tokio::io::DuplexStream {
        let (c, s) = tokio::io::duplex(pipe);
        let slot = relay.tcp_slot().expect("a free slot");
        tokio::spawn(relay.clone().serve_stream(s, slot));
        c
    }

    /// True when the server closed the stream (EOF) within `within`; frames before it are read.
    async fn closed_within(c: &mut tokio::io::DuplexStream, within: Duration) -> bool {
        let mut buf = [0u8; 4096];
        let t = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(t, c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// A TCP client bound as `k` with a BIND made at `unix`.
    async fn tcp_bound(
        relay: &Arc<Relay>,
        k: &StaticSecret,
        unix: u64,
        pipe: usize,
    ) -> tokio::io::DuplexStream {
        let mut c = tcp_client(relay, pipe);
        c.write_all(&framed(&bind_msg(k, &relay.public, unix)))
            .await
            .unwrap();
        let mut got = [0u8; 2 + BOUND.len()];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[2..], &BOUND);
        c
    }

    #[tokio::test(start_paused = true)]
    async fn tcp_client_must_bind_first_within_the_deadline() {
        let relay = Relay::new(key());
        // Silent: closed at the deadline, not before.
        let mut silent = tcp_client(&relay, 4096);
        assert!(!closed_within(&mut silent, TCP_BIND_DEADLINE - Duration::from_secs(1)).await);
        assert!(closed_within(&mut silent, Duration::from_secs(2)).await);
        // Frames before a BIND (a 64 KiB one here) are read through and dropped: without a
        // BIND the connection still ends at the deadline.
        let mut big = tcp_client(&relay, 4096);
        let started = tokio::time::Instant::now();
        big.write_all(&framed(&send_msg(&[7; 32], &[0u8; 65000])))
            .await
            .unwrap();
        assert!(closed_within(&mut big, TCP_BIND_DEADLINE + Duration::from_secs(1)).await);
        assert!(started.elapsed() >= TCP_BIND_DEADLINE - Duration::from_secs(1));
        // A BIND that is not valid (unknown key): closed at once.
        let mut stranger = tcp_client(&relay, 4096);
        stranger
            .write_all(&framed(&bind_msg(&key(), &relay.public, unix_now())))
            .await
            .unwrap();
        assert!(closed_within(&mut stranger, Duration::from_millis(100)).await);
        // A node whose data frames precede its BIND is bound once the BIND comes.
        let a = key();
        relay.set_authorized([pk(&a)]);
        let mut early = tcp_client(&relay, 1 << 17);
        early
            .write_all(&framed(&send_msg(&[7; 32], &[1u8; 1400])))
            .await
            .unwrap();
        early
            .write_all(&framed(&bind_msg(&a, &relay.public, unix_now())))
            .await
            .unwrap();
        let mut got = [0u8; 2 + BOUND.len()];
        early.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[2..], &BOUND);
        drop(early);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(relay.tcp_clients(), 0, "slots are given back");
    }

    #[tokio::test(start_paused = true)]
    async fn tcp_one_connection_per_key_and_idle_ones_end() {
        let relay = Relay::new(key());
        let a = key();
        relay.set_authorized([pk(&a)]);
        let mut first = tcp_bound(&relay, &a, unix_now(), 4096).await;
        // The next BIND carries a later time (a replayed one would be refused).
        let mut second = tcp_bound(&relay, &a, unix_now() + 1, 4096).await;
        assert!(
            closed_within(&mut first, Duration::from_millis(100)).await,
            "replaced"
        );
        assert!(!closed_within(&mut second, TCP_IDLE - Duration::from_secs(2)).await);
        assert!(
            closed_within(&mut second, Duration::from_secs(5)).await,
            "idle"
        );
        tokio::task::yield_now().await;
        assert_eq!(relay.tcp_clients(), 0);
    }

    #[test]
    fn tcp_connections_are_capped() {
        let relay = Relay::new(key());
        let slots: Vec<TcpSlot> = (0..MAX_TCP_CLIENTS)
            .map(|_| relay.tcp_slot().unwrap())
            .collect();
        assert!(relay.tcp_slot().is_none());
        drop(slots);
        assert!(relay.tcp_slot().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn tcp_client_that_never_reads_cannot_pin_memory() {
        let relay = Relay::new(key());
        let (a, b) = (key(), key());
        relay.set_authorized([pk(&a), pk(&b)]);
        // a: over TCP, never reads (a 4 KiB pipe fills at once). b: over UDP, floods a.
        let sink = tcp_bound(&relay, &a, unix_now(), 4096).await;
        let from_b: SocketAddr = "203.0.113.3:2000".parse().unwrap();
        let mut out = Vec::new();
        relay.process(from_b, &bind_msg(&b, &relay.public, unix_now()), &mut out);
        let flood = send_msg(&pk(&a), &[0u8; 1400]);
        for _ in 0..5000 {
            relay.process(from_b, &flood, &mut out);
            assert!(relay.tcp_queued_bytes() <= TCP_QUEUE_BYTES);
        }
        assert!(
            relay.tcp_queued_bytes() > TCP_QUEUE_BYTES / 2,
            "the queue did fill"
        );
        // The stalled client is cut, and its queue goes with it.
        tokio::time::sleep(TCP_WRITE_STALL + Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(relay.tcp_queued_bytes(), 0);
        assert_eq!(relay.tcp_clients(), 0);
        drop(sink);
    }

    /// A GRO run of SENDs becomes RECVs for the sender's key, in order, one GSO send per run of
    /// one destination; a dropped SEND splits a run; a STUN request in the batch is answered.
    #[test]
    fn a_gro_run_of_sends_is_forwarded_in_order_as_recvs() {
        let relay = Relay::new(key());
        let (a, b, c) = (key(), key(), key());
        relay.set_authorized([pk(&a), pk(&b), pk(&c)]);
        let (rs, rstate) = homeport_udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let io = UdpIo {
            socket: rs,
            state: rstate,
        };
        let sock = || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        };
        let (sa, sb, sc) = (sock(), sock(), sock());
        let now = Instant::now();
        for (k, s) in [(&a, &sa), (&b, &sb), (&c, &sc)] {
            let from = s.local_addr().unwrap();
            let act = relay.handle(
                from,
                &bind_msg(k, &relay.public, unix_now()),
                now,
                unix_now(),
            );
            assert!(matches!(act, Action::Bound { .. }), "{act:?}");
        }
        // Six 200-byte segments from a: to b, b, c, (an unbound key: dropped), b, b; then a
        // STUN request as the run's shorter last segment.
        let stride = 200;
        let nobody = key();
        let mut buf = vec![];
        for (i, dst) in [&b, &b, &c, &nobody, &b, &b].iter().enumerate() {
            let seg = send_msg(&pk(dst), &[i as u8; 200 - RELAY_HEADER_LEN]);
            assert_eq!(seg.len(), stride);
            buf.extend_from_slice(&seg);
        }
        let mut stun = vec![0u8; 20];
        stun[1] = 1; // binding request
        stun[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        stun[8..20].copy_from_slice(&[7; 12]);
        buf.extend_from_slice(&stun);
        let mut sends = vec![];
        relay.handle_batch(
            sa.local_addr().unwrap(),
            &mut buf,
            stride,
            now,
            &mut |to, d, seg| {
                sends.push((to, d.len(), seg));
                io.transmit(to, d, seg)
            },
        );
        let (a_at, b_at, c_at) = (
            sa.local_addr().unwrap(),
            sb.local_addr().unwrap(),
            sc.local_addr().unwrap(),
        );
        assert_eq!(
            sends[..3],
            [
                (b_at, 400, Some(200)),
                (c_at, 200, None),
                (b_at, 400, Some(200))
            ],
            "one send per run of one destination"
        );
        assert_eq!(sends.len(), 4);
        assert_eq!(sends[3].0, a_at, "then the STUN answer");

        let recv = |s: &std::net::UdpSocket| {
            let mut d = [0u8; 2048];
            let (n, from) = s.recv_from(&mut d).unwrap();
            assert_eq!(from, io.socket.local_addr().unwrap());
            d[..n].to_vec()
        };
        for want in [0u8, 1, 4, 5] {
            let d = recv(&sb);
            let (kind, k, payload) = homeport_proto::relay::parse(&d).unwrap();
            assert_eq!((kind, k), (RELAY_RECV, pk(&a)), "b gets RECVs from a's key");
            assert_eq!(payload, &[want; 200 - RELAY_HEADER_LEN][..], "in order");
        }
        let d = recv(&sc);
        assert_eq!(
            homeport_proto::relay::parse(&d).unwrap().2,
            &[2u8; 200 - RELAY_HEADER_LEN][..]
        );
        let d = recv(&sa);
        assert_eq!(&d[..2], &[0x01, 0x01], "a gets a STUN binding success");
        assert_eq!(&d[8..20], &[7; 12], "for its transaction");
        let mut d = [0u8; 2048];
        sb.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(sb.recv_from(&mut d).is_err(), "nothing more for b");
    }
}
