//! The UDP relay, sharing the STUN socket (one port to open on the VPS). It forwards opaque
//! WireGuard datagrams between nodes identified by their keys and never decrypts them.
//! Framing and the BIND proof are described in [`homeport_proto::relay`].
//!
//! Only registered, unrevoked nodes may bind: a BIND carries an HMAC under the X25519 secret
//! shared by the node key and the relay key, so it proves possession of the node's private key.
//! A removed node's key leaves the authorized set at once, and its datagrams stop at the next one.

use homeport_proto::relay::{
    RELAY_BIND, RELAY_BOUND, RELAY_HEADER_LEN, RELAY_MAGIC, RELAY_RECV, RELAY_SEND,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use x25519_dalek::{PublicKey, StaticSecret};

/// A BIND whose timestamp is further than this from our clock is refused (replay window).
const BIND_SKEW_SECS: u64 = 120;
/// Bindings not refreshed for this long are forgotten (nodes re-bind every 20 s).
const BINDING_TTL: Duration = Duration::from_secs(60);
const BIND_LEN: usize = 4 + 1 + 32 + 8 + 32;

pub struct Relay {
    secret: StaticSecret,
    pub public: PublicKey,
    /// Keys of registered, unrevoked nodes. Kept up to date by the mesh state.
    pub authorized: RwLock<HashSet<[u8; 32]>>,
    bindings: Mutex<Bindings>,
    /// The UDP socket (set by [`serve`]).
    udp: std::sync::OnceLock<Arc<UdpSocket>>,
    /// Clients on the TCP/TLS fallback, by the pseudo address that stands for them in the
    /// bindings (240.0.0.0/4, never a real source).
    tcp: Mutex<HashMap<SocketAddr, tokio::sync::mpsc::Sender<Vec<u8>>>>,
    next_tcp: std::sync::atomic::AtomicU32,
}

/// Frames queued per TCP client before new ones are dropped (like a full UDP buffer).
const TCP_QUEUE: usize = 1024;

#[derive(Default)]
struct Bindings {
    by_key: HashMap<[u8; 32], (SocketAddr, Instant)>,
    by_addr: HashMap<SocketAddr, [u8; 32]>,
}

/// What to do with one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes to that address.
    Reply(SocketAddr, Vec<u8>),
    /// Forward: write a RECV header for `from_key` followed by the payload to `to`.
    Forward {
        to: SocketAddr,
        from_key: [u8; 32],
    },
    Drop(&'static str),
}

impl Relay {
    pub fn new(secret: StaticSecret) -> Arc<Relay> {
        let public = PublicKey::from(&secret);
        Arc::new(Relay {
            secret,
            public,
            authorized: RwLock::new(HashSet::new()),
            bindings: Mutex::new(Bindings::default()),
            udp: std::sync::OnceLock::new(),
            tcp: Mutex::new(HashMap::new()),
            next_tcp: std::sync::atomic::AtomicU32::new(1),
        })
    }

    pub fn set_authorized(&self, keys: impl IntoIterator<Item = [u8; 32]>) {
        let keys: HashSet<[u8; 32]> = keys.into_iter().collect();
        let mut b = self.bindings.lock().unwrap();
        let gone: Vec<[u8; 32]> = b
            .by_key
            .keys()
            .filter(|k| !keys.contains(*k))
            .copied()
            .collect();
        for k in gone {
            if let Some((a, _)) = b.by_key.remove(&k) {
                b.by_addr.remove(&a);
            }
        }
        *self.authorized.write().unwrap() = keys;
    }

    /// Decides what to do with datagram `d` from `from`. `unix_now` is the wall clock (seconds).
    pub fn handle(&self, from: SocketAddr, d: &[u8], now: Instant, unix_now: u64) -> Action {
        if d.len() < 5 || d[..4] != RELAY_MAGIC {
            return Action::Drop("not a relay datagram");
        }
        match d[4] {
            RELAY_BIND => {
                if d.len() != BIND_LEN {
                    return Action::Drop("bad BIND length");
                }
                let key: [u8; 32] = d[5..37].try_into().expect("length checked");
                if !self.authorized.read().unwrap().contains(&key) {
                    return Action::Drop("BIND from an unknown or revoked node");
                }
                let t = u64::from_be_bytes(d[37..45].try_into().expect("length checked"));
                if t.abs_diff(unix_now) > BIND_SKEW_SECS {
                    return Action::Drop("BIND timestamp outside the replay window");
                }
                let shared = self.secret.diffie_hellman(&PublicKey::from(key));
                let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, shared.as_bytes());
                if ring::hmac::verify(&mac, &d[5..45], &d[45..77]).is_err() {
                    return Action::Drop("BIND with a bad proof");
                }
                let mut b = self.bindings.lock().unwrap();
                if let Some((old, _)) = b.by_key.insert(key, (from, now))
                    && old != from
                {
                    b.by_addr.remove(&old);
                }
                b.by_addr.insert(from, key);
                let mut ok = RELAY_MAGIC.to_vec();
                ok.push(RELAY_BOUND);
                Action::Reply(from, ok)
            }
            RELAY_SEND => {
                if d.len() < RELAY_HEADER_LEN {
                    return Action::Drop("short SEND");
                }
                let dst: [u8; 32] = d[5..37].try_into().expect("length checked");
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
            _ => Action::Drop("unknown relay message type"),
        }
    }
}

impl Relay {
    /// Sends `b` to `to`: a UDP address, or a TCP client's pseudo address.
    async fn deliver(&self, to: SocketAddr, b: &[u8]) {
        let tcp = self.tcp.lock().unwrap().get(&to).cloned();
        match tcp {
            Some(tx) => {
                let _ = tx.try_send(b.to_vec());
            }
            None => {
                if let Some(u) = self.udp.get() {
                    let _ = u.send_to(b, to).await;
                }
            }
        }
    }

    /// Handles one datagram from `from` (UDP or a TCP client) and delivers what it produces.
    async fn process(&self, from: SocketAddr, d: &[u8], out: &mut Vec<u8>) {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match self.handle(from, d, Instant::now(), unix) {
            Action::Reply(to, b) => self.deliver(to, &b).await,
            Action::Forward { to, from_key } => {
                let payload = &d[RELAY_HEADER_LEN..];
                out.resize(RELAY_HEADER_LEN + payload.len(), 0);
                let h = homeport_proto::relay::write_header(out, RELAY_RECV, &from_key);
                out[h..h + payload.len()].copy_from_slice(payload);
                self.deliver(to, &out[..h + payload.len()]).await;
            }
            Action::Drop(why) => tracing::trace!(%from, why, "relay: dropped"),
        }
    }

    /// Serves one client of the TCP/TLS fallback until it disconnects: length-prefixed relay
    /// datagrams both ways. It must BIND like a UDP client; the binding points at a pseudo
    /// address that routes to this connection.
    pub async fn serve_stream<S>(self: Arc<Self>, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let n = self
            .next_tcp
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pseudo = SocketAddr::from((
            [
                240 | ((n >> 24) as u8 & 0x0f),
                (n >> 16) as u8,
                (n >> 8) as u8,
                n as u8,
            ],
            1,
        ));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(TCP_QUEUE);
        self.tcp.lock().unwrap().insert(pseudo, tx);
        let (mut r, mut w) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                let mut frame = Vec::with_capacity(2 + b.len());
                frame.extend_from_slice(&(b.len() as u16).to_be_bytes());
                frame.extend_from_slice(&b);
                if w.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        tracing::debug!(%pseudo, "relay: TCP client connected");
        let mut buf = vec![0u8; 65536];
        let mut out = Vec::with_capacity(65536 + RELAY_HEADER_LEN);
        loop {
            let mut len = [0u8; 2];
            if r.read_exact(&mut len).await.is_err() {
                break;
            }
            let len = u16::from_be_bytes(len) as usize;
            if r.read_exact(&mut buf[..len]).await.is_err() {
                break;
            }
            self.process(pseudo, &buf[..len], &mut out).await;
        }
        self.tcp.lock().unwrap().remove(&pseudo);
        writer.abort();
        tracing::debug!(%pseudo, "relay: TCP client gone");
    }
}

/// Serves STUN and the relay on one UDP socket until `shutdown`.
pub async fn serve(sock: UdpSocket, relay: Arc<Relay>, shutdown: CancellationToken) {
    let sock = Arc::new(sock);
    let _ = relay.udp.set(sock.clone());
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::with_capacity(65536 + RELAY_HEADER_LEN);
    loop {
        let (n, from) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::trace!(error = %e, "relay recv");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let d = &buf[..n];
        if d.len() >= 4 && d[..4] == RELAY_MAGIC {
            relay.process(from, d, &mut out).await;
        } else if let Some(resp) = crate::stun::answer(d, from) {
            let _ = sock.send_to(&resp, from).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind_msg(node: &StaticSecret, relay: &PublicKey, unix: u64) -> Vec<u8> {
        let pk = PublicKey::from(node).to_bytes();
        let mut m = RELAY_MAGIC.to_vec();
        m.push(RELAY_BIND);
        m.extend_from_slice(&pk);
        m.extend_from_slice(&unix.to_be_bytes());
        let shared = node.diffie_hellman(relay);
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, shared.as_bytes());
        let tag = ring::hmac::sign(&k, &m[5..45]);
        m.extend_from_slice(tag.as_ref());
        m
    }

    fn send_msg(dst: &[u8; 32], payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; RELAY_HEADER_LEN];
        homeport_proto::relay::write_header(&mut m, RELAY_SEND, dst);
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn binds_forwards_and_refuses_strangers() {
        let relay = Relay::new(StaticSecret::random_from_rng(rand::rngs::OsRng));
        let a = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let b = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let (pa, pb) = (
            PublicKey::from(&a).to_bytes(),
            PublicKey::from(&b).to_bytes(),
        );
        relay.set_authorized([pa, pb]);
        let (aa, ab): (SocketAddr, SocketAddr) = (
            "203.0.113.2:1000".parse().unwrap(),
            "203.0.113.3:2000".parse().unwrap(),
        );
        let now = Instant::now();
        let unix = 1_800_000_000;
        assert!(
            matches!(relay.handle(aa, &bind_msg(&a, &relay.public, unix), now, unix), Action::Reply(to, _) if to == aa)
        );
        // b is not bound yet: nothing to forward to.
        assert_eq!(
            relay.handle(aa, &send_msg(&pb, b"x"), now, unix),
            Action::Drop("SEND to a node that is not bound")
        );
        assert!(matches!(
            relay.handle(ab, &bind_msg(&b, &relay.public, unix), now, unix),
            Action::Reply(..)
        ));
        assert_eq!(
            relay.handle(aa, &send_msg(&pb, b"x"), now, unix),
            Action::Forward {
                to: ab,
                from_key: pa
            }
        );
        // A stranger cannot bind, a replayed/old BIND is refused, a forged proof is refused.
        let c = StaticSecret::random_from_rng(rand::rngs::OsRng);
        assert!(matches!(
            relay.handle(aa, &bind_msg(&c, &relay.public, unix), now, unix),
            Action::Drop(_)
        ));
        assert!(matches!(
            relay.handle(aa, &bind_msg(&a, &relay.public, unix - 1000), now, unix),
            Action::Drop(_)
        ));
        let mut forged = bind_msg(&a, &relay.public, unix);
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
}
