//! Disco: authenticated path probes (Ping/Pong) on the WireGuard socket. Framing in
//! [`homeport_proto::disco`]. Only a holder of a mesh key can produce a probe another node
//! accepts, so a forged probe can never redirect a peer's traffic.

use boringtun::x25519;
use homeport_proto::disco::{
    DISCO_HEADER_LEN, DISCO_MAGIC, DISCO_PING, DISCO_PONG, DISCO_READY, READY_MAX_OPENED,
};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use sha2::{Digest, Sha256};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Largest encoded address: family, IPv6, port.
const MAX_ADDR: usize = 1 + 16 + 2;
/// Largest disco packet: header + type + tx + a Ready's addresses + tag.
pub const MAX_DISCO: usize =
    DISCO_HEADER_LEN + 1 + 12 + MAX_ADDR + 1 + READY_MAX_OPENED * MAX_ADDR + 16;

/// Addresses a Ready lists (at most [`READY_MAX_OPENED`]; no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Opened {
    n: u8,
    addrs: [Option<SocketAddr>; READY_MAX_OPENED],
}

impl Opened {
    /// Adds `a`; false when full.
    pub fn push(&mut self, a: SocketAddr) -> bool {
        let Some(slot) = self.addrs.get_mut(self.n as usize) else {
            return false;
        };
        *slot = Some(a);
        self.n += 1;
        true
    }
    pub fn iter(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.addrs[..self.n as usize].iter().flatten().copied()
    }
    pub fn contains(&self, a: SocketAddr) -> bool {
        self.iter().any(|x| x == a)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoMsg {
    Ping {
        tx: [u8; 12],
    },
    /// `observed`: the source address the Ping arrived from (our reflexive address as the peer sees it).
    Pong {
        tx: [u8; 12],
        observed: SocketAddr,
    },
    /// Hole punching (through the relay): "my reflexive address is `me`; I just sent openers to
    /// `opened`" — the receiver may now send full probes to the sender if its own address is
    /// among them, and opens towards `me`.
    Ready {
        tx: [u8; 12],
        me: Option<SocketAddr>,
        opened: Opened,
    },
}

/// Writes `a` at `out[0..]`; returns its length.
fn put_addr(out: &mut [u8], a: Option<SocketAddr>) -> usize {
    let Some(a) = a else {
        out[0] = 0;
        return 1;
    };
    let n = match a.ip() {
        IpAddr::V4(ip) => {
            out[0] = 4;
            out[1..5].copy_from_slice(&ip.octets());
            5
        }
        IpAddr::V6(ip) => {
            out[0] = 6;
            out[1..17].copy_from_slice(&ip.octets());
            17
        }
    };
    out[n..n + 2].copy_from_slice(&a.port().to_be_bytes());
    n + 2
}

/// Reads an address written by [`put_addr`]: (address, bytes used).
fn get_addr(b: &[u8]) -> Option<(Option<SocketAddr>, usize)> {
    let (ip, at) = match b.first()? {
        0 => return Some((None, 1)),
        4 => (
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b.get(1..5)?).ok()?)),
            5,
        ),
        6 => (
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b.get(1..17)?).ok()?)),
            17,
        ),
        _ => return None,
    };
    let port = u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?);
    Some((Some(SocketAddr::new(ip, port)), at + 2))
}

/// The symmetric key two nodes share for disco.
pub fn key(secret: &x25519::StaticSecret, peer: &[u8; 32]) -> LessSafeKey {
    let shared = secret.diffie_hellman(&x25519::PublicKey::from(*peer));
    let mut h = Sha256::new();
    h.update(b"homeport disco v1");
    h.update(shared.as_bytes());
    let k = h.finalize();
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &k).expect("32-byte key"))
}

/// Writes a sealed disco packet into `out` (at least [`MAX_DISCO`] bytes); returns its length.
/// `nonce` must never repeat under one key: the engine draws it from its CSPRNG (seeded from the
/// operating system by the IO shell).
pub fn seal(
    key: &LessSafeKey,
    sender: &[u8; 32],
    nonce: [u8; 12],
    msg: &DiscoMsg,
    out: &mut [u8],
) -> usize {
    out[..4].copy_from_slice(&DISCO_MAGIC);
    out[4..36].copy_from_slice(sender);
    out[36..48].copy_from_slice(&nonce);
    let mut n = DISCO_HEADER_LEN;
    match msg {
        DiscoMsg::Ping { tx } => {
            out[n] = DISCO_PING;
            out[n + 1..n + 13].copy_from_slice(tx);
            n += 13;
        }
        DiscoMsg::Pong { tx, observed } => {
            out[n] = DISCO_PONG;
            out[n + 1..n + 13].copy_from_slice(tx);
            n += 13;
            n += put_addr(&mut out[n..], Some(*observed));
        }
        DiscoMsg::Ready { tx, me, opened } => {
            out[n] = DISCO_READY;
            out[n + 1..n + 13].copy_from_slice(tx);
            n += 13;
            n += put_addr(&mut out[n..], *me);
            out[n] = opened.n;
            n += 1;
            for a in opened.iter() {
                n += put_addr(&mut out[n..], Some(a));
            }
        }
    }
    let (head, body) = out.split_at_mut(DISCO_HEADER_LEN);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&head[..]),
            &mut body[..n - DISCO_HEADER_LEN],
        )
        .expect("sealing cannot fail for short messages");
    out[n..n + 16].copy_from_slice(tag.as_ref());
    n + 16
}

/// The sender key of a disco packet (to find the peer and its key), without authenticating.
pub fn sender(d: &[u8]) -> Option<[u8; 32]> {
    if d.len() < DISCO_HEADER_LEN + 16 || d[..4] != DISCO_MAGIC {
        return None;
    }
    d[4..36].try_into().ok()
}

/// Authenticates and decodes a disco packet. `scratch` must hold `d.len()` bytes.
pub fn open(key: &LessSafeKey, d: &[u8], scratch: &mut [u8]) -> Option<DiscoMsg> {
    if d.len() < DISCO_HEADER_LEN + 16 + 13 || d.len() > MAX_DISCO || d[..4] != DISCO_MAGIC {
        return None;
    }
    let nonce: [u8; 12] = d[36..48].try_into().ok()?;
    let body = &mut scratch[..d.len() - DISCO_HEADER_LEN];
    body.copy_from_slice(&d[DISCO_HEADER_LEN..]);
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&d[..DISCO_HEADER_LEN]),
            body,
        )
        .ok()?;
    let tx: [u8; 12] = plain.get(1..13)?.try_into().ok()?;
    match plain[0] {
        DISCO_PING => Some(DiscoMsg::Ping { tx }),
        DISCO_PONG => {
            let (observed, _) = get_addr(&plain[13..])?;
            Some(DiscoMsg::Pong {
                tx,
                observed: observed?,
            })
        }
        DISCO_READY => {
            let mut rest = &plain[13..];
            let (me, used) = get_addr(rest)?;
            rest = &rest[used..];
            let count = *rest.first()? as usize;
            rest = &rest[1..];
            if count > READY_MAX_OPENED {
                return None;
            }
            let mut opened = Opened::default();
            for _ in 0..count {
                let (a, used) = get_addr(rest)?;
                opened.push(a?);
                rest = &rest[used..];
            }
            Some(DiscoMsg::Ready { tx, me, opened })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_forgery() {
        let a = x25519::StaticSecret::random_from_rng(rand_core_06());
        let b = x25519::StaticSecret::random_from_rng(rand_core_06());
        let pa = x25519::PublicKey::from(&a).to_bytes();
        let pb = x25519::PublicKey::from(&b).to_bytes();
        let ka = key(&a, &pb);
        let kb = key(&b, &pa);
        let mut out = [0u8; MAX_DISCO];
        let mut scratch = [0u8; MAX_DISCO];
        for (i, msg) in [
            DiscoMsg::Ping { tx: [7; 12] },
            DiscoMsg::Pong {
                tx: [8; 12],
                observed: "203.0.113.2:4444".parse().unwrap(),
            },
            DiscoMsg::Pong {
                tx: [9; 12],
                observed: "[2001:db8::1]:5".parse().unwrap(),
            },
            DiscoMsg::Ready {
                tx: [1; 12],
                me: None,
                opened: Opened::default(),
            },
            DiscoMsg::Ready {
                tx: [2; 12],
                me: Some("[2001:db8::1]:5".parse().unwrap()),
                opened: {
                    let mut o = Opened::default();
                    for a in ["203.0.113.2:1", "[2001:db8::2]:2", "192.0.2.1:3", "[::1]:4"] {
                        assert!(o.push(a.parse().unwrap()));
                    }
                    assert!(!o.push("192.0.2.9:9".parse().unwrap()));
                    o
                },
            },
        ]
        .into_iter()
        .enumerate()
        {
            let n = seal(&ka, &pa, [i as u8; 12], &msg, &mut out);
            assert_eq!(
                homeport_proto::disco::classify(&out[..n]),
                homeport_proto::disco::DatagramKind::Disco
            );
            assert_eq!(sender(&out[..n]), Some(pa));
            assert_eq!(open(&kb, &out[..n], &mut scratch), Some(msg));
            // One flipped bit anywhere: refused.
            for i in [5, 40, n - 1] {
                let mut bad = out;
                bad[i] ^= 1;
                assert_eq!(open(&kb, &bad[..n], &mut scratch), None);
            }
            // A third party's key cannot open it.
            let c = x25519::StaticSecret::random_from_rng(rand_core_06());
            assert_eq!(open(&key(&c, &pa), &out[..n], &mut scratch), None);
        }
        assert_eq!(open(&kb, &[0xF1, b'h', b'p', b'd'], &mut scratch), None);
    }

    fn rand_core_06() -> rand::rngs::OsRng {
        rand::rngs::OsRng
    }
}
