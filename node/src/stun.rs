//! STUN Binding (RFC 5389) client codec, on top of the `stun_codec` crate.
//!
//! The node sends Binding requests from its WireGuard socket so the reflexive address it learns
//! is the NAT mapping of that very socket. Works with any standard STUN server (coturn,
//! stuntman, the coordinator's own).

use bytecodec::{DecodeExt, EncodeExt};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use stun_codec::rfc5389::{Attribute, attributes::Software, methods::BINDING};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StunError {
    #[error("not a STUN message: {0}")]
    Malformed(String),
    #[error("STUN message is not a Binding success response (class {0})")]
    NotSuccess(String),
    #[error("STUN Binding response carries neither XOR-MAPPED-ADDRESS nor MAPPED-ADDRESS")]
    NoAddress,
}

/// Encodes a Binding request with the given transaction id.
pub fn binding_request(txid: [u8; 12]) -> Vec<u8> {
    let mut m = Message::<Attribute>::new(MessageClass::Request, BINDING, TransactionId::new(txid));
    if let Ok(s) = Software::new("homeport".to_owned()) {
        m.add_attribute(s);
    }
    MessageEncoder::new()
        .encode_into_bytes(m)
        .expect("encoding a binding request cannot fail")
}

/// Decodes a Binding success response into (transaction id, reflexive address).
pub fn parse_binding_response(d: &[u8]) -> Result<([u8; 12], SocketAddr), StunError> {
    let m = MessageDecoder::<Attribute>::new()
        .decode_from_bytes(d)
        .map_err(|e| StunError::Malformed(e.to_string()))?
        .map_err(|e| StunError::Malformed(format!("{:?}", e.error())))?;
    if m.class() != MessageClass::SuccessResponse || m.method() != BINDING {
        return Err(StunError::NotSuccess(format!("{:?}", m.class())));
    }
    let tx = *m.transaction_id().as_bytes();
    for a in m.attributes() {
        if let Attribute::XorMappedAddress(x) = a {
            return Ok((tx, x.address()));
        }
    }
    for a in m.attributes() {
        if let Attribute::MappedAddress(x) = a {
            return Ok((tx, x.address()));
        }
    }
    Err(StunError::NoAddress)
}

/// Encodes a Binding success response (used by tests and by anyone serving STUN).
pub fn binding_response(txid: [u8; 12], reflexive: SocketAddr) -> Vec<u8> {
    use stun_codec::rfc5389::attributes::XorMappedAddress;
    let mut m = Message::<Attribute>::new(
        MessageClass::SuccessResponse,
        BINDING,
        TransactionId::new(txid),
    );
    m.add_attribute(XorMappedAddress::new(reflexive));
    MessageEncoder::new()
        .encode_into_bytes(m)
        .expect("encoding a binding response cannot fail")
}

/// STUN-looking datagrams queued for the daemon at most: a STUN transaction needs one answer,
/// and a few more cover retries to several servers. Beyond that they are dropped and counted.
pub const STUN_QUEUE: usize = 16;
/// Answers are taken only from a server we sent a request to this recently: a transaction
/// lasts 3 tries 300 ms apart, so 3 s is ample; anything else on the port is junk.
pub const STUN_ANSWER_WINDOW: Duration = Duration::from_secs(3);
/// Servers remembered at once (the coordinator's and a `netcheck --stun` one, with room).
const STUN_SERVERS: usize = 8;

/// Which STUN servers were asked recently: the data path lets their answers through to the
/// daemon and drops every other STUN-looking datagram. Fixed size; no allocation.
#[derive(Debug, Default)]
pub struct StunGate {
    asked: Mutex<[Option<(SocketAddr, Instant)>; STUN_SERVERS]>,
}

impl StunGate {
    /// A request went to `server` now.
    pub fn asked(&self, server: SocketAddr, now: Instant) {
        let mut a = self.asked.lock().unwrap();
        let slot = a
            .iter()
            .position(|e| e.is_some_and(|(s, _)| s == server))
            .or_else(|| a.iter().position(|e| e.is_none()))
            .unwrap_or_else(|| {
                // The oldest.
                (0..STUN_SERVERS)
                    .min_by_key(|&i| a[i].map(|(_, t)| t))
                    .unwrap_or(0)
            });
        a[slot] = Some((server, now));
    }

    /// Whether a datagram from `from` may be an answer we wait for.
    pub fn expects(&self, from: SocketAddr, now: Instant) -> bool {
        self.asked.lock().unwrap().iter().any(|e| {
            e.is_some_and(|(s, t)| {
                s == from && now.saturating_duration_since(t) < STUN_ANSWER_WINDOW
            })
        })
    }
}

/// Sends a datagram from the WireGuard socket: the data path, or a fake in tests.
pub trait SendRaw: Send + Sync {
    fn send_raw(&self, to: SocketAddr, data: &[u8]);
}

impl SendRaw for crate::datapath::Datapath {
    fn send_raw(&self, to: SocketAddr, data: &[u8]) {
        crate::datapath::Datapath::send_raw(self, to, data)
    }
}

/// An answer the data path let through: (from, datagram).
pub type Answer = (SocketAddr, Vec<u8>);

/// Tries of one STUN transaction, and the wait for an answer to each.
const STUN_TRIES: usize = 3;
const STUN_TRY_WAIT: Duration = Duration::from_millis(300);

/// STUN transactions from the WireGuard socket, so the reflexive address is that socket's NAT
/// mapping: requests leave through [`SendRaw`], the data path hands the answers back (see
/// [`StunGate`]). One transaction at a time; cheap to clone.
#[derive(Clone)]
pub struct StunClient {
    out: std::sync::Arc<dyn SendRaw>,
    answers: std::sync::Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Answer>>>,
}

impl StunClient {
    pub fn new(
        out: std::sync::Arc<dyn SendRaw>,
        answers: tokio::sync::mpsc::Receiver<Answer>,
    ) -> StunClient {
        StunClient {
            out,
            answers: std::sync::Arc::new(tokio::sync::Mutex::new(answers)),
        }
    }

    /// One Binding transaction with `server`: our address as it sees it, or None when it did
    /// not answer three tries, 300 ms apart.
    pub async fn query(&self, server: SocketAddr) -> Option<SocketAddr> {
        let mut rx = self.answers.lock().await;
        let txid: [u8; 12] = rand::random();
        let req = binding_request(txid);
        for _ in 0..STUN_TRIES {
            self.out.send_raw(server, &req);
            let deadline = tokio::time::Instant::now() + STUN_TRY_WAIT;
            while let Ok(Some((from, d))) = tokio::time::timeout_at(deadline, rx.recv()).await {
                if from == server
                    && let Ok((id, addr)) = parse_binding_response(&d)
                    && id == txid
                {
                    return Some(addr);
                }
            }
        }
        None
    }
}

/// Moves the data path's answers (a std channel its threads feed without blocking) onto a
/// tokio channel for [`StunClient`], through a small thread.
pub fn bridge(
    side: std::sync::mpsc::Receiver<Answer>,
) -> std::io::Result<tokio::sync::mpsc::Receiver<Answer>> {
    let (tx, rx) = tokio::sync::mpsc::channel(STUN_QUEUE);
    std::thread::Builder::new()
        .name("stun".into())
        .spawn(move || {
            while let Ok(m) = side.recv() {
                if tx.blocking_send(m).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A STUN server behind a fake socket: answers the `drop`-th first requests with nothing,
    /// then correctly; also sends junk with a wrong transaction id and from a wrong address.
    struct FakeServer {
        answers: tokio::sync::mpsc::Sender<Answer>,
        reflexive: SocketAddr,
        drop: std::sync::atomic::AtomicUsize,
        sent: std::sync::atomic::AtomicUsize,
    }

    impl SendRaw for FakeServer {
        fn send_raw(&self, to: SocketAddr, data: &[u8]) {
            use std::sync::atomic::Ordering::SeqCst;
            self.sent.fetch_add(1, SeqCst);
            let txid: [u8; 12] = data[8..20].try_into().unwrap();
            let _ = self
                .answers
                .try_send((to, binding_response([0; 12], self.reflexive)));
            let _ = self.answers.try_send((
                "192.0.2.99:3478".parse().unwrap(),
                binding_response(txid, "192.0.2.99:1".parse().unwrap()),
            ));
            if self.drop.load(SeqCst) > 0 {
                self.drop.fetch_sub(1, SeqCst);
                return;
            }
            let _ = self
                .answers
                .try_send((to, binding_response(txid, self.reflexive)));
        }
    }

    fn fake(drop: usize) -> (std::sync::Arc<FakeServer>, StunClient) {
        let (tx, rx) = tokio::sync::mpsc::channel(STUN_QUEUE);
        let s = std::sync::Arc::new(FakeServer {
            answers: tx,
            reflexive: "203.0.113.5:41641".parse().unwrap(),
            drop: drop.into(),
            sent: 0.into(),
        });
        (s.clone(), StunClient::new(s, rx))
    }

    #[tokio::test(start_paused = true)]
    async fn a_transaction_takes_only_its_own_answer_from_its_server_and_retries() {
        use std::sync::atomic::Ordering::SeqCst;
        let server: SocketAddr = "198.51.100.10:3478".parse().unwrap();
        let (s, c) = fake(0);
        assert_eq!(c.query(server).await, Some(s.reflexive));
        assert_eq!(s.sent.load(SeqCst), 1);
        // Two lost requests: the third try gets it.
        let (s, c) = fake(2);
        assert_eq!(c.query(server).await, Some(s.reflexive));
        assert_eq!(s.sent.load(SeqCst), 3);
        // Never answered: None after three tries.
        let (s, c) = fake(usize::MAX);
        let t = tokio::time::Instant::now();
        assert_eq!(c.query(server).await, None);
        assert_eq!(s.sent.load(SeqCst), STUN_TRIES);
        assert_eq!(t.elapsed(), STUN_TRY_WAIT * STUN_TRIES as u32);
    }

    #[test]
    fn only_servers_asked_recently_may_answer() {
        let g = StunGate::default();
        let now = Instant::now();
        let server: SocketAddr = "198.51.100.10:3478".parse().unwrap();
        assert!(!g.expects(server, now), "nobody asked yet");
        g.asked(server, now);
        assert!(g.expects(server, now + Duration::from_secs(1)));
        assert!(!g.expects("198.51.100.11:3478".parse().unwrap(), now));
        assert!(!g.expects("198.51.100.10:3479".parse().unwrap(), now));
        assert!(!g.expects(server, now + STUN_ANSWER_WINDOW));
        // Many servers: the oldest is forgotten, the table does not grow.
        for i in 0..20u16 {
            g.asked(
                SocketAddr::from(([192, 0, 2, 1], 1000 + i)),
                now + Duration::from_millis(i.into()),
            );
        }
        assert!(g.expects(SocketAddr::from(([192, 0, 2, 1], 1019)), now));
        assert!(!g.expects(SocketAddr::from(([192, 0, 2, 1], 1000)), now));
    }

    #[test]
    fn request_is_a_stun_datagram() {
        let r = binding_request([7; 12]);
        assert_eq!(
            homeport_proto::disco::classify(&r),
            homeport_proto::disco::DatagramKind::Stun
        );
        assert_eq!(&r[0..2], &[0, 1]);
    }

    #[test]
    fn response_round_trip() {
        let a: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        let r = binding_response([9; 12], a);
        assert_eq!(parse_binding_response(&r).unwrap(), ([9; 12], a));
        let a6: SocketAddr = "[2001:db8::5]:1".parse().unwrap();
        assert_eq!(
            parse_binding_response(&binding_response([1; 12], a6))
                .unwrap()
                .1,
            a6
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            parse_binding_response(b"hello"),
            Err(StunError::Malformed(_))
        ));
        assert!(matches!(
            parse_binding_response(&binding_request([1; 12])),
            Err(StunError::NotSuccess(_))
        ));
    }
}
