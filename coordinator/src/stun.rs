//! A STUN server (RFC 5389 Binding only): tells each client the address its request came from.

use bytecodec::{DecodeExt, EncodeExt};
use std::net::SocketAddr;
use stun_codec::rfc5389::attributes::{Software, XorMappedAddress};
use stun_codec::rfc5389::{Attribute, methods::BINDING};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// STUN magic cookie (RFC 5389 §6): a cheap test before decoding.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// The answer to one datagram: a Binding success response for a Binding request, None for
/// anything else (garbage, responses, indications, other methods).
pub fn answer(req: &[u8], peer: SocketAddr) -> Option<Vec<u8>> {
    if req.len() < 20 || req[0] & 0xC0 != 0 || req[4..8] != MAGIC_COOKIE {
        return None;
    }
    let m = MessageDecoder::<Attribute>::new()
        .decode_from_bytes(req)
        .ok()?
        .ok()?;
    if m.class() != MessageClass::Request || m.method() != BINDING {
        return None;
    }
    // A v4 client on a dual-stack socket shows up as ::ffff:a.b.c.d; answer with its v4 form.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let mut r =
        Message::<Attribute>::new(MessageClass::SuccessResponse, BINDING, m.transaction_id());
    r.add_attribute(XorMappedAddress::new(peer));
    if let Ok(s) = Software::new("homeport-coordinator".to_owned()) {
        r.add_attribute(s);
    }
    MessageEncoder::new().encode_into_bytes(r).ok()
}

/// Answers Binding requests on `sock` until `shutdown`.
pub async fn serve(sock: UdpSocket, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, peer) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; they concern one client only.
                    tracing::trace!(error = %e, "stun recv");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        match answer(&buf[..n], peer) {
            Some(resp) => {
                tracing::trace!(%peer, "stun binding");
                if let Err(e) = sock.send_to(&resp, peer).await {
                    tracing::trace!(%peer, error = %e, "stun send");
                }
            }
            None => tracing::trace!(%peer, len = n, "stun: ignored datagram"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_codec::TransactionId;

    fn request(method_ok: bool) -> Vec<u8> {
        let method = if method_ok {
            BINDING
        } else {
            stun_codec::Method::new(0x002).unwrap()
        };
        let m =
            Message::<Attribute>::new(MessageClass::Request, method, TransactionId::new([3; 12]));
        MessageEncoder::new().encode_into_bytes(m).unwrap()
    }

    #[test]
    fn answers_binding_and_ignores_the_rest() {
        let peer: SocketAddr = "[::ffff:203.0.113.9]:40000".parse().unwrap();
        let resp = answer(&request(true), peer).unwrap();
        let m = MessageDecoder::<Attribute>::new()
            .decode_from_bytes(&resp)
            .unwrap()
            .unwrap();
        assert_eq!(m.class(), MessageClass::SuccessResponse);
        assert_eq!(m.transaction_id().as_bytes(), &[3; 12]);
        let x = m.get_attribute::<XorMappedAddress>().unwrap();
        assert_eq!(x.address(), "203.0.113.9:40000".parse().unwrap());
        assert!(answer(&request(false), peer).is_none());
        assert!(answer(b"", peer).is_none());
        assert!(answer(&[0u8; 20], peer).is_none());
        let mut junk = request(true);
        junk.truncate(24);
        junk[3] = 200; // length beyond the datagram
        assert!(answer(&junk, peer).is_none());
        assert!(answer(&resp, peer).is_none(), "responses are not answered");
    }
}
