//! The IO shell around the sans-IO [`crate::engine::Engine`]: TUN device, UDP socket, routes.
//!
//! This is the seam between the data path and the daemon. The daemon only uses what is declared
//! here: start, apply_map, status, stop.

use homeport_proto::map::{MeshAddrs, NetworkMap};
use homeport_proto::{NodeId, NodeName, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// What the daemon passes to start the data path.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// TUN interface name (default `hp0`).
    pub tun_name: String,
    /// UDP port of the WireGuard socket; 0 = pick a free one.
    pub listen_port: u16,
    pub private_key: PrivateKey,
    /// TUN MTU (default 1280+? see DEFAULT_MTU).
    pub mtu: u16,
}

/// Path a peer's traffic currently takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum PathInfo {
    /// No path yet (no endpoint known / no handshake).
    None,
    /// Direct UDP to this address.
    Direct { addr: SocketAddr },
    /// Through the relay; `reason` says why no direct path is used.
    Relay { reason: String },
}

/// One peer's live state, as shown by `homeport status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: NodeId,
    pub name: NodeName,
    pub public_key: PublicKey,
    pub addrs: MeshAddrs,
    pub path: PathInfo,
    /// Seconds since the last completed handshake; None = never.
    pub last_handshake_secs_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Online according to the coordinator.
    pub online: bool,
}
