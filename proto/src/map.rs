//! The network map a node receives from the coordinator, and the pure rule for applying deltas.
//!
//! Stream: `GET /api/v1/node/map` answers with newline-delimited JSON, one [`MapMessage`] per line.
//! The first line is a full map (`full: true`); every later line is a delta against the node's
//! current map. An empty delta (nothing set) is a keepalive, sent at least every
//! [`MAP_KEEPALIVE_SECS`] seconds, so a node notices a dead stream.

use crate::device::DeviceFilter;
use crate::filter::PacketFilter;
use crate::keys::PublicKey;
use crate::names::{NodeId, NodeName};
use crate::publish::PublishRule;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The coordinator sends something (at worst an empty delta) at least this often. A node that
/// hears nothing for three times this long reconnects.
pub const MAP_KEEPALIVE_SECS: u64 = 15;

/// A node's two mesh addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MeshAddrs {
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl MeshAddrs {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v) => v == self.ipv4,
            IpAddr::V6(v) => v == self.ipv6,
        }
    }
}

/// Where an endpoint candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// An address of one of the node's interfaces.
    Local,
    /// The node's reflexive address as seen by a STUN server.
    Stun,
    /// Configured by hand.
    Static,
    #[serde(other)]
    Unknown,
}

/// One endpoint candidate: where a peer might reach this node's WireGuard socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub kind: EndpointKind,
}

/// A relay a node can use when no direct path answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// UDP relay address.
    pub udp: Option<SocketAddr>,
    /// STUN server address (the coordinator's own).
    pub stun: Option<SocketAddr>,
    /// The relay's X25519 key (nodes prove their own key to it with a MAC; see `relay`).
    pub public_key: Option<PublicKey>,
}

/// One coordinator replica: where nodes reach it and the pin of its TLS key. Several replicas
/// share one PostgreSQL database; a node whose replica dies streams from another.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CoordinatorInfo {
    pub url: String,
    pub pin: String,
}

/// The node itself, as the coordinator knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfNode {
    pub id: NodeId,
    pub name: NodeName,
    pub public_key: PublicKey,
    pub addrs: MeshAddrs,
    pub prefix_v4: Ipv4Net,
    pub prefix_v6: Ipv6Net,
    #[serde(default)]
    pub tags: Vec<String>,
    /// This node's approved routes (see [`crate::routes`]): it forwards packets to these
    /// ranges, and to no other non-mesh address. `0.0.0.0/0` / `::/0`: it is an approved exit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<ipnet::IpNet>,
    /// The mesh's DNS domain: every node and device answers as `NAME` and `NAME.<domain>` at
    /// each node's name server (`homeport_proto::names::DEFAULT_MESH_DOMAIN` unless configured).
    /// None: a coordinator without mesh names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_domain: Option<String>,
}

/// Another node in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub id: NodeId,
    pub name: NodeName,
    pub public_key: PublicKey,
    pub addrs: MeshAddrs,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    pub online: bool,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The peer's approved routes: its allowed IPs beyond its mesh addresses. Packets to these
    /// ranges go to it; packets from them are accepted from it and from no other peer. Default
    /// routes (an exit) count only while this node uses the peer as its exit node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<ipnet::IpNet>,
    /// A plain-WireGuard device (see [`crate::device`]) reached through this node: its via node
    /// holds its session, every other node routes its addresses to the via node. None: a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<NodeId>,
}

/// "Probe me now": `from` is about to send disco probes to your candidates; probe theirs at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRequest {
    pub from: NodeId,
    pub endpoints: Vec<Endpoint>,
}

/// One line of the map stream.
///
/// Delta rule, field by field (for `full: false`; for `full: true` every field is set, `peers` is
/// the complete peer set and `peers_removed` is empty):
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapMessage {
    /// Increases with every message that changes something for this node.
    pub version: u64,
    /// True: replace the whole map. False: apply as a delta.
    #[serde(default)]
    pub full: bool,
    /// None: unchanged. Some: replaces this node's own record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_node: Option<SelfNode>,
    /// Peers added or changed; each record replaces the whole previous record of that peer id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<Peer>,
    /// Peers removed (deleted or revoked): drop them and their sessions at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_removed: Vec<NodeId>,
    /// None: unchanged. Some: replaces this node's packet filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<PacketFilter>,
    /// None: unchanged. Some: the complete list of publish rules this node is exit or target of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<PublishRule>>,
    /// None: unchanged. Some: replaces the relay list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relays: Option<Vec<RelayInfo>>,
    /// None: unchanged. Some: replaces the list of live coordinator replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinators: Option<Vec<CoordinatorInfo>>,
    /// None: unchanged. Some: the inbound filters of all the devices this node is the via of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_filters: Option<Vec<DeviceFilter>>,
    /// Never part of the stored map: act on these now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_requests: Vec<ProbeRequest>,
}

impl MapMessage {
    /// True when the message carries no change (a keepalive).
    pub fn is_keepalive(&self) -> bool {
        !self.full
            && self.self_node.is_none()
            && self.peers.is_empty()
            && self.peers_removed.is_empty()
            && self.filter.is_none()
            && self.publish.is_none()
            && self.relays.is_none()
            && self.coordinators.is_none()
            && self.device_filters.is_none()
            && self.probe_requests.is_empty()
    }
}

/// A node's current view of the mesh: the result of applying the stream's messages in order.
/// Persisted by the node so the mesh keeps working while the coordinator is unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMap {
    pub version: u64,
    pub self_node: SelfNode,
    pub peers: BTreeMap<NodeId, Peer>,
    pub filter: PacketFilter,
    pub publish: Vec<PublishRule>,
    pub relays: Vec<RelayInfo>,
    /// Empty from a coordinator that sends none (older, or one not told its URL).
    #[serde(default)]
    pub coordinators: Vec<CoordinatorInfo>,
    #[serde(default)]
    pub device_filters: Vec<DeviceFilter>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("the first map message must be full (full: true), got a delta at version {0}")]
    DeltaWithoutBase(u64),
    #[error("full map at version {0} is missing field {1}")]
    IncompleteFull(u64, &'static str),
}

impl NetworkMap {
    /// Builds a map from a full message.
    pub fn from_full(m: MapMessage) -> Result<NetworkMap, MapError> {
        if !m.full {
            return Err(MapError::DeltaWithoutBase(m.version));
        }
        let v = m.version;
        Ok(NetworkMap {
            version: v,
            self_node: m
                .self_node
                .ok_or(MapError::IncompleteFull(v, "self_node"))?,
            peers: m.peers.into_iter().map(|p| (p.id, p)).collect(),
            filter: m.filter.ok_or(MapError::IncompleteFull(v, "filter"))?,
            publish: m.publish.unwrap_or_default(),
            relays: m.relays.unwrap_or_default(),
            coordinators: m.coordinators.unwrap_or_default(),
            device_filters: m.device_filters.unwrap_or_default(),
        })
    }

    /// Applies one stream message (full or delta) following the delta rules on [`MapMessage`].
    /// `probe_requests` are not part of the map; the caller acts on them.
    pub fn apply(&mut self, m: MapMessage) -> Result<(), MapError> {
        if m.full {
            *self = NetworkMap::from_full(m)?;
            return Ok(());
        }
        if m.version > self.version {
            self.version = m.version;
        }
        if let Some(s) = m.self_node {
            self.self_node = s;
        }
        for id in m.peers_removed {
            self.peers.remove(&id);
        }
        for p in m.peers {
            self.peers.insert(p.id, p);
        }
        if let Some(f) = m.filter {
            self.filter = f;
        }
        if let Some(p) = m.publish {
            self.publish = p;
        }
        if let Some(r) = m.relays {
            self.relays = r;
        }
        if let Some(c) = m.coordinators {
            self.coordinators = c;
        }
        if let Some(d) = m.device_filters {
            self.device_filters = d;
        }
        Ok(())
    }

    pub fn peer_by_name(&self, name: &str) -> Option<&Peer> {
        self.peers.values().find(|p| p.name.as_str() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{"version":3,"full":true,
        "self_node":{"id":1,"name":"home","public_key":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
          "addrs":{"ipv4":"100.96.0.1","ipv6":"fd7a:115c:a1e0::1"},
          "prefix_v4":"100.96.0.0/16","prefix_v6":"fd7a:115c:a1e0::/64"},
        "peers":[{"id":2,"name":"vps","public_key":"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
          "addrs":{"ipv4":"100.96.0.2","ipv6":"fd7a:115c:a1e0::2"},
          "endpoints":[{"addr":"198.51.100.10:41641","kind":"local"},{"addr":"[2001:db8::1]:1","kind":"warp"}],
          "online":true}],
        "filter":{"allow_all":true},"publish":[],"relays":[],"future_field":42}"#;

    #[test]
    fn full_then_deltas() {
        let m: MapMessage = serde_json::from_str(FULL).unwrap();
        let mut map = NetworkMap::from_full(m).unwrap();
        assert_eq!(
            map.peers[&NodeId(2)].endpoints[1].kind,
            EndpointKind::Unknown
        );
        let d: MapMessage = serde_json::from_str(r#"{"version":4,"peers_removed":[2]}"#).unwrap();
        map.apply(d).unwrap();
        assert!(map.peers.is_empty());
        assert_eq!(map.version, 4);
        let ka: MapMessage = serde_json::from_str(r#"{"version":4}"#).unwrap();
        assert!(ka.is_keepalive());
        let before = map.clone();
        map.apply(ka).unwrap();
        assert_eq!(map, before);
    }

    #[test]
    fn delta_first_is_an_error() {
        let d: MapMessage = serde_json::from_str(r#"{"version":1}"#).unwrap();
        assert_eq!(
            NetworkMap::from_full(d).unwrap_err(),
            MapError::DeltaWithoutBase(1)
        );
    }
}
