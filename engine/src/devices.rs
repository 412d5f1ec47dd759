//! Plain-WireGuard devices (`homeport_proto::device`): the via node's side.
//!
//! A device is a peer without disco or relay: its endpoint is wherever its authenticated packets
//! come from. The device is untrusted, so its via node stands in for it twice: a packet that
//! would open a flow towards the device must pass the device's own inbound filter (compiled by
//! the coordinator, map field `device_filters`), and the device's packets leave only with its own
//! address as source and only into the mesh. The nodes they reach judge them by their own filters,
//! with the device's address as the source. Forwarding happens inside the engine (decrypt from
//! one peer, encrypt for the other), so the via node's kernel never routes mesh traffic.

use crate::filter::FlowKey;
use crate::packet::{self, PacketInfo};
use crate::{Decap, DropReason, Encap, Engine, PeerState, PeerTable};
use std::cell::RefCell;
use std::time::Instant;

/// The via node's name server is its devices' (their config names it): they may always ask it,
/// whatever the policy says about the rest of the node.
pub const DNS_PORT: u16 = 53;

/// A question to our name server.
pub(crate) fn is_dns(info: &PacketInfo) -> bool {
    matches!(info.proto, packet::PROTO_UDP | packet::PROTO_TCP) && info.dst_port == DNS_PORT
}

thread_local! {
    /// The plaintext of a packet being forwarded, while its new ciphertext is written over the
    /// caller's buffer: one per data path thread, allocated once.
    static FORWARD: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 65_536]);
}

impl Engine {
    /// Whether a packet may go to device `dev`: one that opens a flow (TCP SYN, UDP not answering
    /// a flow the device opened, ICMP echo or any other ICMP) needs a rule of the device's filter.
    pub(crate) fn device_admits(
        &self,
        t: &PeerTable,
        dev: &PeerState,
        info: &PacketInfo,
        now: Instant,
    ) -> Result<(), DropReason> {
        if matches!(info.frag, packet::Frag::Later { .. }) {
            // Decided on the first fragment, which holds the ports; the rest is useless alone.
            return Ok(());
        }
        let Some(f) = t.device_filters.get(&dev.id) else {
            // No filter for it in the map (yet): nothing may open a flow towards it.
            return if info.opens_tcp() || info.is_echo_request() || info.proto == packet::PROTO_UDP
            {
                Err(DropReason::Filtered)
            } else {
                Ok(())
            };
        };
        if f.allow_all {
            return Ok(());
        }
        let opening = match info.proto {
            packet::PROTO_TCP => info.opens_tcp(),
            packet::PROTO_UDP => {
                let key = FlowKey::new(info.proto, info.src, info.src_port, info.dst_port);
                self.device_udp
                    .get(&key, now)
                    .is_none_or(|fl| fl.peer != dev.id)
            }
            packet::PROTO_ICMP | packet::PROTO_ICMPV6 => !info.is_echo_reply(),
            _ => true,
        };
        if !opening || f.allows(info, true) {
            Ok(())
        } else {
            Err(DropReason::Filtered)
        }
    }

    /// A device sent a UDP datagram: remember the flow so the answers pass its filter.
    pub(crate) fn device_sent(&self, dev: &PeerState, info: &PacketInfo, now: Instant) {
        if info.proto == packet::PROTO_UDP && !matches!(info.frag, packet::Frag::Later { .. }) {
            let key = FlowKey::new(info.proto, info.dst, info.dst_port, info.src_port);
            self.device_udp.touch(key, dev.id, now);
        }
    }

    /// Sends the decrypted packet in `out[..len]` on to `to` (a device, or a node a device
    /// reaches), encrypted for it, into `out`.
    pub(crate) fn forward(
        &self,
        to: &PeerState,
        out: &mut [u8],
        len: usize,
        now: Instant,
    ) -> Decap {
        FORWARD.with(|b| {
            let mut b = b.borrow_mut();
            b[..len].copy_from_slice(&out[..len]);
            match self.seal_for(to, &b[..len], out, now) {
                Encap::Send { to, len } => Decap::Forward { to, len },
                Encap::Queued => Decap::Done,
                Encap::Drop(r) => Decap::Drop(r),
            }
        })
    }
}
