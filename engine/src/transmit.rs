//! The engine's own datagrams — handshake initiations and responses, cookie replies, probes and
//! their answers, NAT openers, relay BINDs — wait here until the IO shell polls them
//! ([`crate::Engine::poll_transmit`], [`crate::Engine::flush_transmits`]). Data packets do not:
//! [`crate::Engine::encapsulate`] and [`crate::Engine::decapsulate`] write those straight into the
//! caller's buffers.
//!
//! The queue is a ring of fixed slots allocated once: queueing copies into a slot and never
//! allocates. When every slot is taken (the shell stopped polling, or a flood outruns it) new
//! datagrams are dropped and counted; they are all ones the protocols retry.

use homeport_proto::relay::RELAY_HEADER_LEN;
use std::collections::VecDeque;
use std::net::SocketAddr;

/// The largest datagram the engine queues: a WireGuard packet of up to 2 KiB (a handshake, or a
/// data packet that waited for one) behind a relay header.
pub const MAX_TRANSMIT: usize = 2048 + RELAY_HEADER_LEN;

/// Slots in the ring: more than a flush ever needs (a tick's probes and openers for every peer,
/// a batch of handshake answers), few enough to cost about 1 MiB.
pub const TRANSMIT_SLOTS: usize = 512;

/// One queued datagram, as [`crate::Engine::poll_transmit`] hands it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    /// Send with this IP TTL (a NAT opener: it must die past our own NATs, before the peer's).
    pub ttl: Option<u8>,
    /// Bytes written into the caller's buffer.
    pub len: usize,
}

pub(crate) struct TxQueue {
    slots: Box<[u8]>,
    queued: VecDeque<(SocketAddr, Option<u8>, u16)>,
    head: usize,
    pub(crate) dropped: u64,
}

impl TxQueue {
    pub(crate) fn new() -> TxQueue {
        TxQueue {
            slots: vec![0u8; TRANSMIT_SLOTS * MAX_TRANSMIT].into_boxed_slice(),
            queued: VecDeque::with_capacity(TRANSMIT_SLOTS),
            head: 0,
            dropped: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.queued.len()
    }

    /// Queues a datagram written by `write` into a slot of [`MAX_TRANSMIT`] bytes (it returns
    /// the length, 0 for nothing). False when the ring is full.
    pub(crate) fn push_with(
        &mut self,
        to: SocketAddr,
        ttl: Option<u8>,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) -> bool {
        if self.queued.len() == TRANSMIT_SLOTS {
            self.dropped += 1;
            return false;
        }
        let slot = (self.head + self.queued.len()) % TRANSMIT_SLOTS;
        let buf = &mut self.slots[slot * MAX_TRANSMIT..(slot + 1) * MAX_TRANSMIT];
        let len = write(buf).min(MAX_TRANSMIT);
        if len == 0 {
            return false;
        }
        self.queued.push_back((to, ttl, len as u16));
        true
    }

    pub(crate) fn push(&mut self, to: SocketAddr, ttl: Option<u8>, data: &[u8]) -> bool {
        if data.len() > MAX_TRANSMIT {
            self.dropped += 1;
            return false;
        }
        self.push_with(to, ttl, |b| {
            b[..data.len()].copy_from_slice(data);
            data.len()
        })
    }

    /// The oldest datagram, copied into `out` (at least [`MAX_TRANSMIT`] bytes, or as long as
    /// the datagram; a shorter one drops it).
    pub(crate) fn pop(&mut self, out: &mut [u8]) -> Option<Transmit> {
        let (to, ttl, len) = self.queued.pop_front()?;
        let len = len as usize;
        let at = self.head * MAX_TRANSMIT;
        self.head = (self.head + 1) % TRANSMIT_SLOTS;
        let dst = out.get_mut(..len)?;
        dst.copy_from_slice(&self.slots[at..at + len]);
        Some(Transmit { to, ttl, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_through_wraparound_and_full_ring_drops_new_datagrams() {
        let mut q = TxQueue::new();
        let to: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let mut out = [0u8; MAX_TRANSMIT];
        // Go around the ring twice with the queue half full, checking order and contents.
        for round in 0..(2 * TRANSMIT_SLOTS) {
            assert!(q.push(to, None, &(round as u32).to_be_bytes()));
            if round >= TRANSMIT_SLOTS / 2 {
                let t = q.pop(&mut out).unwrap();
                let want = (round - TRANSMIT_SLOTS / 2) as u32;
                assert_eq!(&out[..t.len], &want.to_be_bytes());
            }
        }
        while q.pop(&mut out).is_some() {}
        for i in 0..TRANSMIT_SLOTS {
            assert!(q.push(to, Some(3), &[i as u8; 100]));
        }
        assert!(
            !q.push(to, None, &[0; 10]),
            "a full ring takes nothing more"
        );
        assert_eq!(q.dropped, 1);
        let t = q.pop(&mut out).unwrap();
        assert_eq!((t.ttl, t.len, out[0]), (Some(3), 100, 0));
        assert!(
            !q.push(to, None, &[0; MAX_TRANSMIT + 1]),
            "too long for a slot"
        );
    }
}
