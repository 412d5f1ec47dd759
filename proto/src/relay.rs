//! UDP relay framing between a node and the coordinator's relay.
//!
//! The relay forwards opaque WireGuard packets between nodes identified by their public keys. It
//! never decrypts them. Every relay datagram starts with [`RELAY_MAGIC`] then a type byte:
//! - `BIND (1)`: node → relay, `public key (32) | unix time (8, BE) | mac (32)`; the mac is
//!   HMAC-SHA256 over key and time under the X25519 shared secret of the node key and the relay
//!   key, so only the holder of a registered node key can bind. Answered with `BOUND (4)`.
//! - `SEND (2)`: node → relay, `destination public key (32) | payload`.
//! - `RECV (3)`: relay → node, `source public key (32) | payload`.

pub const RELAY_MAGIC: [u8; 4] = [0xF2, b'h', b'p', b'r'];
pub const RELAY_BIND: u8 = 1;
pub const RELAY_SEND: u8 = 2;
pub const RELAY_RECV: u8 = 3;
pub const RELAY_BOUND: u8 = 4;
/// Magic + type + key.
pub const RELAY_HEADER_LEN: usize = 4 + 1 + 32;

/// Writes a SEND/RECV header for `key` into the start of `buf`; the payload follows at
/// [`RELAY_HEADER_LEN`]. Returns the header length.
pub fn write_header(buf: &mut [u8], kind: u8, key: &[u8; 32]) -> usize {
    buf[..4].copy_from_slice(&RELAY_MAGIC);
    buf[4] = kind;
    buf[5..37].copy_from_slice(key);
    RELAY_HEADER_LEN
}

/// Parses a SEND/RECV datagram into (type, key, payload).
pub fn parse(d: &[u8]) -> Option<(u8, [u8; 32], &[u8])> {
    if d.len() < RELAY_HEADER_LEN || d[..4] != RELAY_MAGIC {
        return None;
    }
    let key: [u8; 32] = d[5..37].try_into().ok()?;
    Some((d[4], key, &d[RELAY_HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn round_trip() {
        let mut buf = [0u8; 64];
        let n = write_header(&mut buf, RELAY_SEND, &[7; 32]);
        buf[n..n + 3].copy_from_slice(b"abc");
        let (t, k, p) = parse(&buf[..n + 3]).unwrap();
        assert_eq!((t, k, p), (RELAY_SEND, [7; 32], &b"abc"[..]));
        assert!(parse(&buf[..10]).is_none());
    }
}
