//! STUN Binding (RFC 5389) client codec, on top of the `stun_codec` crate.
//!
//! The node sends Binding requests from its WireGuard socket so the reflexive address it learns
//! is the NAT mapping of that very socket. Works with any standard STUN server (coturn,
//! stuntman, the coordinator's own).

use bytecodec::{DecodeExt, EncodeExt};
use std::net::SocketAddr;
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

#[cfg(test)]
mod tests {
    use super::*;

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
