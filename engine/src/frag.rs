//! Fragments of datagrams the filter admitted.
//!
//! The filter decides a fragmented datagram on its first fragment, the only one that carries the
//! transport header. Later fragments carry no ports, so they pass only when the first fragment
//! of the same datagram (source, destination, identification, from the same peer) was admitted,
//! and only when they do not overlap its transport header (RFC 1858: an overlapping fragment
//! could rewrite the ports the filter saw). Anything else is dropped: a datagram whose first
//! fragment was dropped never reassembles anyway.
//!
//! The table has a fixed number of slots allocated once; a datagram maps to two slots by hash
//! and takes the one free, expired or oldest. No per-packet allocation.

use super::packet::{Frag, PacketInfo};
use homeport_proto::NodeId;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Fragmented datagrams tracked at once (each slot ~64 bytes: 256 KiB). Fragments of one
/// datagram arrive within a round trip, so a slot is reused long before it matters; at more
/// than `FRAG_SLOTS / FRAG_LIFETIME` fragmented datagrams per second the oldest are forgotten
/// first, and those are complete already.
pub const FRAG_SLOTS: usize = 4096;
/// How long later fragments of an admitted datagram are accepted. Fragments of one datagram
/// leave the sender back to back; a few seconds covers any queueing. (Linux keeps incomplete
/// datagrams 30 s, `ipfrag_time`, but the filter need not wait for a reassembly that will fail.)
pub const FRAG_LIFETIME: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Slot {
    peer: NodeId,
    src: IpAddr,
    dst: IpAddr,
    id: u32,
    /// IPv4 identifies a datagram with its protocol too; IPv6 only by (src, dst, id).
    proto: u8,
    /// Length of the first fragment's transport header: later fragments must start at or after
    /// it (offsets count from the start of the fragmentable part, where the transport header
    /// starts; IPv6 destination options after the fragment header would only move it later).
    l4_hdr: u16,
    admitted: Instant,
}

pub struct Fragments {
    slots: Mutex<Box<[Option<Slot>]>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Fragments {
    fn default() -> Self {
        Fragments::new()
    }
}

impl Fragments {
    pub fn new() -> Fragments {
        Fragments {
            slots: Mutex::new(vec![None; FRAG_SLOTS].into_boxed_slice()),
            hasher: Default::default(),
        }
    }

    fn index(&self, src: IpAddr, dst: IpAddr, id: u32) -> usize {
        // Two candidate slots: i and i ^ 1.
        (self.hasher.hash_one((src, dst, id)) as usize) % FRAG_SLOTS
    }

    /// The first fragment of a datagram was admitted: its later fragments may pass.
    pub fn admitted_first(&self, peer: NodeId, info: &PacketInfo, now: Instant) {
        let Frag::First { id } = info.frag else {
            return;
        };
        let i = self.index(info.src, info.dst, id);
        let mut slots = self.slots.lock().unwrap();
        let pick = [i, i ^ 1]
            .into_iter()
            .min_by_key(|&j| match &slots[j] {
                None => (0, None),
                Some(s) if now.saturating_duration_since(s.admitted) >= FRAG_LIFETIME => (0, None),
                Some(s) => (1, Some(s.admitted)),
            })
            .unwrap_or(i);
        slots[pick] = Some(Slot {
            peer,
            src: info.src,
            dst: info.dst,
            id,
            proto: info.proto,
            l4_hdr: info.l4_hdr,
            admitted: now,
        });
    }

    /// A later fragment passes only for a datagram whose first fragment was admitted from the
    /// same peer, and only past the transport header.
    pub fn admits_later(&self, peer: NodeId, info: &PacketInfo, now: Instant) -> bool {
        let Frag::Later { id, offset } = info.frag else {
            return false;
        };
        let i = self.index(info.src, info.dst, id);
        let slots = self.slots.lock().unwrap();
        [i, i ^ 1].into_iter().any(|j| {
            slots[j].is_some_and(|s| {
                s.peer == peer
                    && s.src == info.src
                    && s.dst == info.dst
                    && s.id == id
                    && (info.src.is_ipv6() || s.proto == info.proto)
                    && now.saturating_duration_since(s.admitted) < FRAG_LIFETIME
                    && offset >= s.l4_hdr
            })
        })
    }
}
