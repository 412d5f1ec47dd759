//! Subnet routes and internet exits: what a node advertises, what the admin approves.
//!
//! A node advertises address ranges it can forward to (`homeport up --advertise-routes
//! 192.168.1.0/24`, its LAN) and, with `--advertise-exit-node`, the two default routes
//! `0.0.0.0/0` and `::/0` (it forwards to the internet). It reports them with
//! `POST /api/v1/node/routes`; nothing happens until the admin approves a route
//! (`homeport-coordinator routes approve home 192.168.1.0/24`). Only approved routes that the
//! node still advertises reach any map: as [`crate::map::Peer::routes`] (allowed IPs of that
//! peer: other nodes route the range to it and accept it as a source from it, from no one else)
//! and as [`crate::map::SelfNode::routes`] (the advertising node forwards only to those).
//! A default route is used by a node only when its user chose that peer as exit node.

use crate::names::NodeName;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// `POST` [`RoutesReport`] with the node credential: the routes this node advertises now
/// (replaces the previous report; approvals of routes no longer advertised are kept but unused).
pub const PATH_ROUTES: &str = "/api/v1/node/routes";
/// `GET` → `Vec<`[`NodeRoutes`]`>` (admin).
pub const PATH_ADMIN_ROUTES: &str = "/api/v1/admin/routes";
/// `POST` [`RouteChange`] (admin): approve advertised routes.
pub const PATH_ADMIN_ROUTES_APPROVE: &str = "/api/v1/admin/routes/approve";
/// `POST` [`RouteChange`] (admin): withdraw approvals.
pub const PATH_ADMIN_ROUTES_UNAPPROVE: &str = "/api/v1/admin/routes/unapprove";

/// Most routes one node may advertise (a home has a LAN or two; bounds maps and filters).
pub const MAX_ROUTES: usize = 32;

/// What an exit node advertises.
pub fn exit_routes() -> [IpNet; 2] {
    [
        "0.0.0.0/0".parse().expect("literal"),
        "::/0".parse().expect("literal"),
    ]
}

/// True for `0.0.0.0/0` and `::/0`: the internet, through an exit node.
pub fn is_default(net: &IpNet) -> bool {
    net.prefix_len() == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesReport {
    pub routes: Vec<IpNet>,
}

/// One node's routes, as `homeport-coordinator routes list` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRoutes {
    pub node: NodeName,
    pub advertised: Vec<IpNet>,
    pub approved: Vec<IpNet>,
}

/// Approve or unapprove `routes` of `node`. The word `exit` stands for both default routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteChange {
    pub node: String,
    pub routes: Vec<IpNet>,
}

/// Why `net` cannot be a subnet route, or None. Default routes are accepted here (exit nodes);
/// the caller decides whether it wants them.
pub fn route_problem(net: &IpNet) -> Option<String> {
    if net.trunc() != *net {
        return Some(format!(
            "{net} has host bits set; the network is {}",
            net.trunc()
        ));
    }
    if is_default(net) {
        return None;
    }
    let a = net.network();
    let bad = match a {
        IpAddr::V4(v) if v.is_loopback() => "a loopback range",
        IpAddr::V4(v) if v.is_multicast() || v.octets()[0] >= 224 => {
            "a multicast or reserved range"
        }
        IpAddr::V4(v) if v.is_link_local() => "a link-local range",
        IpAddr::V4(v) if v.octets()[0] == 0 => "in 0.0.0.0/8 (\"this network\")",
        IpAddr::V6(v) if v.is_loopback() || v.is_unspecified() => "a loopback range",
        IpAddr::V6(v) if v.is_multicast() => "a multicast range",
        IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80 => "a link-local range",
        _ => return None,
    };
    Some(format!(
        "{net} is {bad}; a route is a LAN range like 192.168.1.0/24"
    ))
}

/// Parses `--advertise-routes`: comma-separated networks (`192.168.1.0/24,fd00:1::/64`).
/// Default routes are refused here: an exit node says so with `--advertise-exit-node`.
pub fn parse_routes(s: &str) -> Result<Vec<IpNet>, String> {
    let mut out: Vec<IpNet> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net: IpNet = part.parse().map_err(|_| {
            format!("{part:?} is not a network: expected CIDR like 192.168.1.0/24 or fd00:1::/64")
        })?;
        if is_default(&net) {
            return Err(format!(
                "{part}: a default route; to offer this node as an internet exit use --advertise-exit-node"
            ));
        }
        if let Some(p) = route_problem(&net) {
            return Err(p);
        }
        if !out.contains(&net) {
            out.push(net);
        }
    }
    if out.len() > MAX_ROUTES {
        return Err(format!(
            "{} routes: at most {MAX_ROUTES} may be advertised",
            out.len()
        ));
    }
    Ok(out)
}

/// True when the two networks share an address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The addresses both networks hold (the smaller one), or None.
pub fn intersect(a: &IpNet, b: &IpNet) -> Option<IpNet> {
    if a.contains(b) {
        Some(*b)
    } else if b.contains(a) {
        Some(*a)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_routes_are_validated_with_clear_errors() {
        assert_eq!(
            parse_routes("192.168.1.0/24, fd00:1::/64,192.168.1.0/24").unwrap(),
            vec![
                "192.168.1.0/24".parse::<IpNet>().unwrap(),
                "fd00:1::/64".parse().unwrap()
            ]
        );
        assert!(
            parse_routes("192.168.1.1/24")
                .unwrap_err()
                .contains("192.168.1.0/24")
        );
        assert!(
            parse_routes("0.0.0.0/0")
                .unwrap_err()
                .contains("--advertise-exit-node")
        );
        assert!(
            parse_routes("127.0.0.0/8")
                .unwrap_err()
                .contains("loopback")
        );
        assert!(
            parse_routes("169.254.0.0/16")
                .unwrap_err()
                .contains("link-local")
        );
        assert!(parse_routes("lan").unwrap_err().contains("CIDR"));
        assert!(route_problem(&"::/0".parse().unwrap()).is_none());
        let a: IpNet = "10.0.0.0/8".parse().unwrap();
        let b: IpNet = "10.1.0.0/16".parse().unwrap();
        assert_eq!(intersect(&a, &b), Some(b));
        assert!(overlaps(&b, &a));
        assert!(!overlaps(&b, &"10.2.0.0/16".parse().unwrap()));
    }
}
