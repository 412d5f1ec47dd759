//! Relay framing between a node and the coordinator's relay (UDP datagrams, and the same
//! datagrams length-prefixed over the TCP/TLS fallback). Encoded and decoded here only.
//!
//! The relay forwards opaque WireGuard packets between nodes identified by their public keys. It
//! never decrypts them. Every relay datagram starts with [`RELAY_MAGIC`] then a type byte:
//! - `BIND (1)`: node → relay, `public key (32) | unix time in milliseconds (8, BE) | mac (32)`; the mac is
//!   HMAC-SHA256 over key and time ([`Bind::signed`]) under the X25519 shared secret of the node
//!   key and the relay key, so only the holder of a registered node key can bind. The time must
//!   grow from one BIND of a key to the next (the relay remembers the last one per key), so a
//!   captured BIND cannot be replayed. Answered with `BOUND (4)`.
//! - `SEND (2)`: node → relay, `destination public key (32) | payload`.
//! - `RECV (3)`: relay → node, `source public key (32) | payload`.
//!
//! Over TCP each datagram is preceded by its length as a big-endian u16 ([`tcp_frame`]); the
//! first frame of a connection must be a BIND.

pub const RELAY_MAGIC: [u8; 4] = [0xF2, b'h', b'p', b'r'];
pub const RELAY_BIND: u8 = 1;
pub const RELAY_SEND: u8 = 2;
pub const RELAY_RECV: u8 = 3;
pub const RELAY_BOUND: u8 = 4;
/// Magic + type + key.
pub const RELAY_HEADER_LEN: usize = 4 + 1 + 32;
/// Magic + type + key + time + mac.
pub const BIND_LEN: usize = RELAY_HEADER_LEN + 8 + 32;
/// The BOUND answer.
pub const BOUND: [u8; 5] = [
    RELAY_MAGIC[0],
    RELAY_MAGIC[1],
    RELAY_MAGIC[2],
    RELAY_MAGIC[3],
    RELAY_BOUND,
];
/// Length of the TCP frame prefix.
pub const TCP_FRAME_HEADER: usize = 2;
/// Largest datagram a TCP frame can carry.
pub const TCP_FRAME_MAX: usize = u16::MAX as usize;

/// A relay BIND: a node proves it holds `key` at time `unix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind {
    pub key: [u8; 32],
    pub unix: u64,
    pub mac: [u8; 32],
}

impl Bind {
    /// The bytes the mac covers: key | unix time (BE).
    pub fn signed(key: &[u8; 32], unix: u64) -> [u8; 40] {
        let mut s = [0u8; 40];
        s[..32].copy_from_slice(key);
        s[32..].copy_from_slice(&unix.to_be_bytes());
        s
    }

    pub fn encode(&self) -> [u8; BIND_LEN] {
        let mut m = [0u8; BIND_LEN];
        m[..4].copy_from_slice(&RELAY_MAGIC);
        m[4] = RELAY_BIND;
        m[5..45].copy_from_slice(&Self::signed(&self.key, self.unix));
        m[45..].copy_from_slice(&self.mac);
        m
    }

    /// A BIND datagram, or None (wrong magic, type or length).
    pub fn decode(d: &[u8]) -> Option<Bind> {
        if d.len() != BIND_LEN || d[..4] != RELAY_MAGIC || d[4] != RELAY_BIND {
            return None;
        }
        Some(Bind {
            key: d[5..37].try_into().ok()?,
            unix: u64::from_be_bytes(d[37..45].try_into().ok()?),
            mac: d[45..77].try_into().ok()?,
        })
    }
}

/// The type byte of a relay datagram, or None when it is not one.
pub fn kind(d: &[u8]) -> Option<u8> {
    (d.len() >= 5 && d[..4] == RELAY_MAGIC).then(|| d[4])
}

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

/// Appends one TCP frame (length prefix, then `datagram`) to `out`. None when the datagram is
/// longer than [`TCP_FRAME_MAX`].
pub fn tcp_frame(out: &mut Vec<u8>, datagram: &[u8]) -> Option<()> {
    let len = u16::try_from(datagram.len()).ok()?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(datagram);
    Some(())
}

/// The datagram length announced by a TCP frame prefix.
pub fn tcp_frame_len(prefix: [u8; TCP_FRAME_HEADER]) -> usize {
    u16::from_be_bytes(prefix) as usize
}

/// How many leading bytes of `stream` are whole TCP frames (prefix and datagram).
pub fn tcp_frames_len(stream: &[u8]) -> usize {
    let mut off = 0;
    while let Some(p) = stream.get(off..off + TCP_FRAME_HEADER) {
        let end = off + TCP_FRAME_HEADER + tcp_frame_len([p[0], p[1]]);
        if end > stream.len() {
            break;
        }
        off = end;
    }
    off
}

/// The datagrams of `stream`, which holds whole TCP frames (see [`tcp_frames_len`]); a cut
/// frame at the end is left out.
pub fn tcp_frames(stream: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = &stream[..tcp_frames_len(stream)];
    std::iter::from_fn(move || {
        let p = rest.get(..TCP_FRAME_HEADER)?;
        let n = tcp_frame_len([p[0], p[1]]);
        let (d, tail) = rest[TCP_FRAME_HEADER..].split_at(n);
        rest = tail;
        Some(d)
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn tcp_frames_split_a_stream_and_leave_a_cut_frame() {
        let mut st = vec![];
        for d in [&b"one"[..], &[][..], &[7u8; 300][..]] {
            tcp_frame(&mut st, d).unwrap();
        }
        let whole = st.len();
        tcp_frame(&mut st, b"cut off").unwrap();
        st.truncate(st.len() - 2);
        assert_eq!(tcp_frames_len(&st), whole);
        let got: Vec<&[u8]> = super::tcp_frames(&st).collect();
        assert_eq!(got, vec![&b"one"[..], &[][..], &[7u8; 300][..]]);
        assert_eq!(tcp_frames_len(&st[..1]), 0);
        assert_eq!(super::tcp_frames(&[]).count(), 0);
    }

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

    #[test]
    fn bind_round_trip_and_rejects_other_lengths() {
        let b = Bind {
            key: [1; 32],
            unix: 1_800_000_000,
            mac: [9; 32],
        };
        let m = b.encode();
        assert_eq!(Bind::decode(&m), Some(b));
        assert_eq!(&m[5..45], &Bind::signed(&b.key, b.unix)[..]);
        assert_eq!(kind(&m), Some(RELAY_BIND));
        assert!(Bind::decode(&m[..BIND_LEN - 1]).is_none());
        let mut long = m.to_vec();
        long.push(0);
        assert!(Bind::decode(&long).is_none());
        assert_eq!(kind(&BOUND), Some(RELAY_BOUND));
    }

    #[test]
    fn tcp_frames() {
        let mut out = Vec::new();
        tcp_frame(&mut out, b"hello").unwrap();
        assert_eq!(tcp_frame_len([out[0], out[1]]), 5);
        assert_eq!(&out[2..], b"hello");
        assert!(tcp_frame(&mut out, &vec![0; TCP_FRAME_MAX + 1]).is_none());
    }
}
