//! HTTP API bodies and paths, node API and admin API. All bodies are JSON.
//!
//! Auth: node endpoints (except register) take `Authorization: Bearer <node credential>`; admin
//! endpoints take `Authorization: Bearer <admin token>` over HTTPS, or nothing over the local unix
//! socket `<state-dir>/admin.sock`.

use crate::keys::PublicKey;
use crate::map::{Endpoint, MeshAddrs};
use crate::names::{NodeId, NodeName};
use base64::Engine;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const PATH_REGISTER: &str = "/api/v1/node/register";
/// `POST`, no body: a fresh single-use challenge for register (see `register`).
pub const PATH_CHALLENGE: &str = "/api/v1/node/challenge";
pub const PATH_MAP: &str = "/api/v1/node/map";
pub const PATH_ENDPOINTS: &str = "/api/v1/node/endpoints";
pub const PATH_PROBE: &str = "/api/v1/node/probe";
pub const PATH_OPENAPI: &str = "/api/v1/openapi.json";
/// The relay over TCP/TLS for networks that block UDP: `GET` with `Connection: Upgrade` and
/// `Upgrade: homeport-relay`; after `101 Switching Protocols` both sides exchange relay datagrams
/// (the UDP relay's framing, see `relay`) each prefixed with its length as a big-endian u16.
pub const PATH_RELAY_TCP: &str = "/api/v1/node/relay";
pub const RELAY_UPGRADE: &str = "homeport-relay";
pub const PATH_ADMIN_AUTHKEYS: &str = "/api/v1/admin/authkeys";
pub const PATH_ADMIN_NODES: &str = "/api/v1/admin/nodes";
pub const PATH_ADMIN_PUBLISH: &str = "/api/v1/admin/publish";
pub const PATH_ADMIN_POLICY: &str = "/api/v1/admin/policy";

/// Every error answer: `{"error": "<short code>", "detail": "<what was wrong and what is accepted>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    pub detail: String,
}

/// The TLS pin of a coordinator: `sha256/` + base64 of the SHA-256 of the certificate's
/// SubjectPublicKeyInfo (DER). Survives certificate renewal with the same key.
pub fn pin_from_spki(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    format!(
        "sha256/{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// Hex SHA-256, used to store tokens, keys and credentials hashed.
pub fn token_hash(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub authkey: String,
    pub public_key: PublicKey,
    pub hostname: String,
    #[serde(default)]
    pub capver: u32,
    /// The mesh IPv4 address this node had before (after it was removed and joins again): given
    /// again when still free in the mesh prefix, so peers and rules that know it keep working.
    /// Ignored when the key is still registered (its addresses never change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_ipv4: Option<std::net::Ipv4Addr>,
    /// From `POST /api/v1/node/challenge`; single use. Required since capability version 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<String>,
    /// Proof of possession of the private key of `public_key`: see [`crate::register::prove`].
    /// Required since capability version 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub node_id: NodeId,
    pub name: NodeName,
    pub addrs: MeshAddrs,
    pub prefix_v4: Ipv4Net,
    pub prefix_v6: Ipv6Net,
    /// Bearer credential for the node API. Shown once; the coordinator stores only its hash.
    pub credential: String,
    pub capver: u32,
}

/// Most endpoint candidates one report may carry; a real node has a handful.
pub const MAX_ENDPOINTS: usize = 32;

/// Seconds the coordinator waits for the next request's headers on an open HTTPS connection
/// (also its slowloris guard); an idle keep-alive connection is closed after this.
pub const SERVER_IDLE_SECS: u64 = 30;
/// Seconds a client keeps an idle pooled connection to the coordinator: less than
/// [`SERVER_IDLE_SECS`], so a request never goes out on a connection the server is closing at
/// that moment (it would fail with no answer).
pub const CLIENT_POOL_IDLE_SECS: u64 = 20;

/// Why `addr` cannot be an endpoint candidate (a peer could never reach it there, or it would
/// point peers' probes at the peers themselves or at many hosts at once), or None when it can.
/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
pub fn endpoint_problem(addr: std::net::SocketAddr) -> Option<&'static str> {
    use std::net::IpAddr;
    if addr.port() == 0 {
        return Some("port 0");
    }
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) if ip.is_unspecified() => Some("an unspecified address"),
        IpAddr::V4(ip) if ip.is_loopback() => Some("a loopback address"),
        IpAddr::V4(ip) if ip.is_multicast() => Some("a multicast address"),
        IpAddr::V4(ip) if ip.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(ip) if ip.octets()[0] == 0 => Some("in 0.0.0.0/8 (\"this network\")"),
        IpAddr::V4(ip) if ip.octets()[0] >= 240 => Some("in the reserved 240.0.0.0/4"),
        IpAddr::V6(ip) if ip.is_unspecified() => Some("an unspecified address"),
        IpAddr::V6(ip) if ip.is_loopback() => Some("a loopback address"),
        // ff00::/8, link-local (ff02::) and every other scope.
        IpAddr::V6(ip) if ip.is_multicast() => Some("a multicast address"),
        // Link-local, unique-local, mapped, documentation-less odd ranges: a peer elsewhere
        // cannot reach them (and nodes report IPv6 candidates from 2000::/3 only).
        IpAddr::V6(ip) if ip.segments()[0] & 0xe000 != 0x2000 => {
            Some("not a global unicast IPv6 address (2000::/3)")
        }
        _ => None,
    }
}

/// `POST /api/v1/node/endpoints`: the node's current candidates (replaces the previous report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointReport {
    pub endpoints: Vec<Endpoint>,
}

/// `POST /api/v1/node/probe`: ask the coordinator to tell `peer` to probe us now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeAsk {
    pub peer: NodeId,
}

// ---- admin API ----

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthKeyCreate {
    #[serde(default)]
    pub reusable: bool,
    /// Lifetime in seconds; None = never expires.
    #[serde(default)]
    pub expires_secs: Option<u64>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// How many registrations the key allows (1..=[`MAX_AUTHKEY_USES`]), whatever `reusable`
    /// says; None = one, or no limit when reusable.
    #[serde(default)]
    pub max_uses: Option<u64>,
}

/// The largest `max_uses` of an auth key.
pub const MAX_AUTHKEY_USES: u64 = 1_000_000;

/// The longest auth key lifetime (`expires_secs`): 100 years.
pub const MAX_EXPIRES_SECS: u64 = 100 * 365 * 24 * 3600 + 25 * 24 * 3600;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthKeyCreated {
    pub id: i64,
    /// The key itself; shown once, stored hashed.
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthKeyInfo {
    pub id: i64,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub reusable: bool,
    pub tags: Vec<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub used: bool,
    pub revoked: bool,
    /// The key's limit of registrations (reusable keys only); None = no limit.
    #[serde(default)]
    pub max_uses: Option<u64>,
    /// Registrations made with the key.
    #[serde(default)]
    pub uses: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    pub name: NodeName,
    pub public_key: PublicKey,
    pub addrs: MeshAddrs,
    pub tags: Vec<String>,
    pub online: bool,
    /// Unix seconds of the last map stream activity.
    pub last_seen: Option<i64>,
    pub endpoints: Vec<Endpoint>,
    pub created_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_problems() {
        for bad in [
            "0.0.0.0:1",
            "127.0.0.1:51820",
            "224.0.0.1:5",
            "239.1.2.3:5",
            "255.255.255.255:5",
            "198.51.100.1:0",
            "[::]:1",
            "[::1]:1",
            "[ff02::1]:1",
            "[ff0e::1]:1",
            "[::ffff:127.0.0.1]:1",
            "[::ffff:255.255.255.255]:1",
            "0.1.2.3:1",
            "240.0.0.1:1",
            "[fe80::1]:1",
            "[fd00::1]:1",
        ] {
            assert!(endpoint_problem(bad.parse().unwrap()).is_some(), "{bad}");
        }
        for good in ["198.51.100.1:51820", "10.0.0.2:1", "[2001:db8::1]:41641"] {
            assert_eq!(endpoint_problem(good.parse().unwrap()), None, "{good}");
        }
    }
}
