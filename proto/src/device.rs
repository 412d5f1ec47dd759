//! Plain-WireGuard devices: a phone, a TV box or a router that runs any standard WireGuard app and
//! no homeport. The admin adds one with a public key and a node to reach the mesh through (its
//! `via` node, usually the VPS); the coordinator gives it mesh addresses and a wg-quick config.
//!
//! In the map a device is a [`crate::map::Peer`] with `via: Some(node)`. Its via node holds a
//! WireGuard session with it (no disco, no relay: the device's endpoint is learned from its
//! handshakes), enforces the device's inbound filter on its behalf ([`DeviceFilter`]) and forwards
//! its packets into the mesh; every other node routes the device's addresses to the via node and
//! accepts them as sources from it, and its own filter judges them like any node's.

use crate::filter::PacketFilter;
use crate::keys::PublicKey;
use crate::map::MeshAddrs;
use crate::names::{NodeId, NodeName};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

pub const PATH_ADMIN_DEVICES: &str = "/api/v1/admin/devices";

/// What a device's config has instead of a private key the coordinator never saw.
pub const PRIVATE_KEY_PLACEHOLDER: &str = "<the device's private key>";

/// The keepalive the config asks the device for: keeps its NAT's mapping open so the via node can
/// reach it (typical UDP NAT timeouts are 30-120 s), the same value the nodes use.
pub const DEVICE_KEEPALIVE_SECS: u16 = 25;

/// `POST /api/v1/admin/devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceAdd {
    /// A DNS label, unique among nodes and devices.
    pub name: String,
    /// The node whose WireGuard socket the device connects to.
    pub via: String,
    /// The device's WireGuard public key (the admin CLI makes a key pair when none is given and
    /// keeps the private key to itself).
    pub public_key: PublicKey,
    #[serde(default)]
    pub tags: Vec<String>,
    /// HOST:PORT the device sends to, when the via node's own public endpoint is not the one
    /// (a DNS name, a port forwarded elsewhere). Default: the via node's public endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// A stored device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: NodeId,
    pub name: NodeName,
    pub via: NodeId,
    pub via_name: NodeName,
    pub public_key: PublicKey,
    pub addrs: MeshAddrs,
    pub tags: Vec<String>,
    /// Unix seconds.
    pub created_at: i64,
}

/// The answer to [`DeviceAdd`]: the device and its wg-quick config, with
/// [`PRIVATE_KEY_PLACEHOLDER`] where the private key goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAdded {
    pub device: DeviceInfo,
    pub config: String,
}

/// The inbound packet filter of a device, for its via node to enforce (map field
/// `device_filters`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFilter {
    pub device: NodeId,
    pub filter: PacketFilter,
}

/// Everything a device's wg-quick config says.
#[derive(Debug, Clone)]
pub struct DeviceConfig<'a> {
    pub name: &'a str,
    pub via_name: &'a str,
    pub addrs: MeshAddrs,
    pub via_key: PublicKey,
    /// HOST:PORT of the via node's WireGuard socket.
    pub endpoint: &'a str,
    /// The mesh prefixes (what the device routes into the tunnel).
    pub allowed: &'a [IpNet],
    /// Name server: the via node's mesh address, which answers mesh names.
    pub dns: Option<IpAddr>,
    /// The mesh's DNS domain, as the search domain (`phone` finds `phone.<domain>`).
    pub domain: Option<&'a str>,
}

impl DeviceConfig<'_> {
    /// The wg-quick config (also what `wg setconf` reads, less `Address` and `DNS`), with
    /// [`PRIVATE_KEY_PLACEHOLDER`] for the private key.
    pub fn render(&self) -> String {
        let allowed: Vec<String> = self.allowed.iter().map(|n| n.to_string()).collect();
        let mut s = format!(
            "# homeport device {name}, through {via}\n[Interface]\nPrivateKey = {PRIVATE_KEY_PLACEHOLDER}\nAddress = {v4}/32, {v6}/128\n",
            name = self.name,
            via = self.via_name,
            v4 = self.addrs.ipv4,
            v6 = self.addrs.ipv6,
        );
        if let Some(dns) = self.dns {
            match self.domain {
                Some(d) => s.push_str(&format!("DNS = {dns}, {d}\n")),
                None => s.push_str(&format!("DNS = {dns}\n")),
            }
        }
        s.push_str(&format!(
            "\n[Peer]\nPublicKey = {key}\nEndpoint = {ep}\nAllowedIPs = {allowed}\nPersistentKeepalive = {DEVICE_KEEPALIVE_SECS}\n",
            key = self.via_key,
            ep = self.endpoint,
            allowed = allowed.join(", "),
        ));
        s
    }
}

/// `config` with the placeholder replaced by `private_key` (base64).
pub fn with_private_key(config: &str, private_key: &str) -> String {
    config.replacen(PRIVATE_KEY_PLACEHOLDER, private_key, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_everything_the_device_needs() {
        let key: PublicKey = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
            .parse()
            .unwrap();
        let allowed: Vec<IpNet> = vec![
            "100.96.0.0/16".parse().unwrap(),
            "fd7a:115c:a1e0::/64".parse().unwrap(),
        ];
        let c = DeviceConfig {
            name: "phone",
            via_name: "vps",
            addrs: MeshAddrs {
                ipv4: "100.96.0.5".parse().unwrap(),
                ipv6: "fd7a:115c:a1e0::5".parse().unwrap(),
            },
            via_key: key,
            endpoint: "198.51.100.10:41641",
            allowed: &allowed,
            dns: Some("100.96.0.2".parse().unwrap()),
            domain: Some("homeport.internal"),
        }
        .render();
        assert!(c.contains("Address = 100.96.0.5/32, fd7a:115c:a1e0::5/128\n"));
        assert!(c.contains("DNS = 100.96.0.2, homeport.internal\n"));
        assert!(c.contains("Endpoint = 198.51.100.10:41641\n"));
        assert!(c.contains("AllowedIPs = 100.96.0.0/16, fd7a:115c:a1e0::/64\n"));
        assert!(c.contains(&format!("PublicKey = {key}\n")));
        let k = crate::PrivateKey::generate().to_base64();
        let filled = with_private_key(&c, &k);
        assert!(filled.contains(&format!("PrivateKey = {k}\n")));
        assert!(!filled.contains(PRIVATE_KEY_PLACEHOLDER));
    }
}
