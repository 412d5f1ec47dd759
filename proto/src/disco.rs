//! Disco: small authenticated path probes sent on the WireGuard UDP socket.
//!
//! A WireGuard message starts with a little-endian u32 type 1..=4, so its first byte is 1..=4
//! and the next three are zero. Disco packets start with [`DISCO_MAGIC`], whose first byte (0xF1)
//! no WireGuard message has, so one socket carries both and the receiver tells them apart by
//! looking at four bytes.
//!
//! Layout: `MAGIC(4) | sender public key (32) | nonce (12) | sealed(body) | tag (16)` where the
//! body is sealed with ChaCha20-Poly1305 under SHA-256("homeport disco v1" | X25519 shared secret
//! of sender and receiver keys), the header (magic, key, nonce) as associated data.
//! Body: `type(1) | tx id (12) | ...` where `...` is
//! - Ping: nothing;
//! - Pong: the observed source address of the Ping (`address` below);
//! - Ready (sent through the relay during hole punching): the sender's own reflexive address
//!   (family 0 when unknown), then a count (at most [`READY_MAX_OPENED`]) and that many
//!   addresses the sender has just sent NAT openers to.
//!
//! `address` = `family(1: 0, 4 or 6) | ip(0, 4 or 16) | port(2, absent for family 0)`.
//!
//! Ready exists because of Linux NATs: a probe that reaches a NAT before the host behind it sent
//! anything to the prober's address leaves a conntrack entry that forces the host onto another
//! port towards the prober. So a node sends full probes to a peer only once the peer said (Ready)
//! that it opened its NAT towards the node's *current* address; and the Ready carries the
//! sender's own address, so a peer that moved is found through the relay at once.

/// First four bytes of every disco packet.
pub const DISCO_MAGIC: [u8; 4] = [0xF1, b'h', b'p', b'd'];
pub const DISCO_HEADER_LEN: usize = 4 + 32 + 12;

pub const DISCO_PING: u8 = 1;
pub const DISCO_PONG: u8 = 2;
pub const DISCO_READY: u8 = 3;
/// Addresses one Ready lists at most (a peer has at most 8 candidates, of which few public).
pub const READY_MAX_OPENED: usize = 4;

/// What a datagram on the WireGuard socket is, judged from its first bytes alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    WireGuard,
    Disco,
    Relay,
    Stun,
    Unknown,
}

/// Classifies a datagram received on the node's UDP socket without parsing it.
pub fn classify(d: &[u8]) -> DatagramKind {
    if d.len() >= 4 {
        if d[..4] == DISCO_MAGIC {
            return DatagramKind::Disco;
        }
        if d[..4] == crate::relay::RELAY_MAGIC {
            return DatagramKind::Relay;
        }
        if (1..=4).contains(&d[0]) && d[1..4] == [0, 0, 0] {
            return DatagramKind::WireGuard;
        }
    }
    // STUN: top two bits zero and the magic cookie at bytes 4..8 (RFC 5389).
    if d.len() >= 20 && d[0] & 0xC0 == 0 && d[4..8] == [0x21, 0x12, 0xA4, 0x42] {
        return DatagramKind::Stun;
    }
    DatagramKind::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn classify_headers() {
        assert_eq!(classify(&[1, 0, 0, 0, 9]), DatagramKind::WireGuard);
        assert_eq!(classify(&[4, 0, 0, 0]), DatagramKind::WireGuard);
        assert_eq!(classify(&[5, 0, 0, 0]), DatagramKind::Unknown);
        assert_eq!(classify(&[0xF1, b'h', b'p', b'd', 0]), DatagramKind::Disco);
        let mut stun = [0u8; 20];
        stun[1] = 1;
        stun[4..8].copy_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        assert_eq!(classify(&stun), DatagramKind::Stun);
        assert_eq!(classify(&[]), DatagramKind::Unknown);
    }
}
