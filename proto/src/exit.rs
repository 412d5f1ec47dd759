//! Which nodes run an exit (`homeport-exit`), and what a viewer reaches them at.
//!
//! An exit announces itself over the node API (its node credential) when it starts and whenever
//! what it announces changes. The coordinator refuses publish rules on nodes that never did,
//! since nothing there would install them, and refuses country rules on an exit without a
//! country database.

use crate::names::{NodeId, NodeName};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// `POST` ([`ExitAnnounce`], node credential): this node runs an exit.
pub const PATH_EXIT_ANNOUNCE: &str = "/api/v1/node/exit";
/// `GET` (admin): the exits ([`ExitInfo`]).
pub const PATH_ADMIN_EXITS: &str = "/api/v1/admin/exits";
/// Most public addresses one announcement may carry (a VPS has one or two).
pub const MAX_PUBLIC_ADDRS: usize = 16;
/// Longest description of a country database.
pub const MAX_COUNTRY_DB_LEN: usize = 200;

/// Where to get a country database: said by every error about a missing one.
pub const COUNTRY_DB_HINT: &str = "download a country database in mmdb format: MaxMind's GeoLite2-Country \
(free account: https://dev.maxmind.com/geoip/geolite2-free-geolocation-data) or DB-IP's \"IP to Country Lite\" \
(no account: https://db-ip.com/db/download/ip-to-country-lite), then start homeport-exit with --country-db FILE \
(or country-db = \"FILE\" in exit.toml)";

/// What an exit tells the coordinator about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitAnnounce {
    /// The public addresses of the exit's interfaces: what viewers connect to.
    #[serde(default)]
    pub public_addrs: Vec<IpAddr>,
    /// The country database it loaded (type and build date, e.g. `GeoLite2-Country
    /// 2026-11-20`), None without one (then it cannot enforce country rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country_db: Option<String>,
    /// The plain-HTTP port its invite pages are served on (`--invite-port`), None without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invite_port: Option<u16>,
}

/// An exit as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub node_id: NodeId,
    pub name: NodeName,
    pub online: bool,
    pub public_addrs: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country_db: Option<String>,
    /// Unix seconds of the last announcement.
    pub announced_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invite_port: Option<u16>,
}

/// How a viewer reaches `port` on an exit with `addrs`: `198.51.100.10:32400`,
/// `[2001:db8::1]:32400`.
pub fn viewer_addrs(addrs: &[IpAddr], port: u16) -> Vec<String> {
    addrs
        .iter()
        .map(|a| std::net::SocketAddr::new(*a, port).to_string())
        .collect()
}
