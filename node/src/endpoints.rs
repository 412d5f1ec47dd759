//! Where peers can reach this node: local interface addresses and the STUN-learned (reflexive)
//! address of the WireGuard socket, gathered every [`ENDPOINT_REFRESH`] and reported to the
//! coordinator when they change or the map stream reconnects. Also measures the NAT depth,
//! which decides the hole-punching openers' TTL.
//!
//! A task that owns what it last reported; the daemon drives it with [`Cmd`] and hears back
//! [`Found`].

use crate::coordinator::Api;
use crate::stun::StunClient;
use homeport_proto::map::{Endpoint, EndpointKind};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often candidates are re-gathered (interfaces and STUN): NAT mappings and DHCP leases
/// change on the scale of minutes; 20 s finds a change well before a user gives up.
const ENDPOINT_REFRESH: Duration = Duration::from_secs(20);
/// Until a report went through: try again every second.
const ENDPOINT_RETRY: Duration = Duration::from_secs(1);
/// The NAT depth is measured again this often (a new router, a new carrier NAT).
const NAT_DEPTH_EVERY: Duration = Duration::from_secs(300);

/// What the daemon tells the task.
#[derive(Debug)]
pub enum Cmd {
    /// The map stream is up (or down): reports are sent only while it is up, and again after
    /// every reconnection (the coordinator may be new).
    Connected(bool),
    /// Gather and report now (a new map stream, or the socket moved); say `asked` when done.
    ReportNow,
    /// The WireGuard socket's port changed.
    Port(u16),
    /// The map's STUN servers.
    StunServers(Vec<SocketAddr>),
}

/// What the task found.
#[derive(Debug, PartialEq)]
pub enum Found {
    /// Our WireGuard socket's address as the first STUN server saw it.
    Reflexive(SocketAddr),
    /// The TTL that just leaves our outermost NAT (0: no NAT, or unknown).
    OpenerTtl(u8),
    /// A report asked for by [`Cmd::ReportNow`] reached the coordinator: peers may now learn
    /// our (new) address.
    FreshReport,
}

/// This host's IPv4 addresses that peers may reach with `port`: not loopback, link-local or
/// unspecified, and not inside the mesh (`mesh`).
pub fn local_candidates(
    addrs: impl IntoIterator<Item = IpAddr>,
    port: u16,
    mesh: ipnet::Ipv4Net,
) -> Vec<Endpoint> {
    addrs
        .into_iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4)
                if !(v4.is_loopback()
                    || v4.is_link_local()
                    || v4.is_unspecified()
                    || mesh.contains(&v4)) =>
            {
                Some(Endpoint {
                    addr: SocketAddr::new(ip, port),
                    kind: EndpointKind::Local,
                })
            }
            _ => None,
        })
        .collect()
}

/// The endpoints a report carries: what the coordinator would refuse (and the whole report
/// with it) dropped, at most [`homeport_proto::api::MAX_ENDPOINTS`].
fn reportable(mut eps: Vec<Endpoint>) -> Vec<Endpoint> {
    eps.retain(|e| homeport_proto::api::endpoint_problem(e.addr).is_none());
    eps.truncate(homeport_proto::api::MAX_ENDPOINTS);
    eps
}

pub struct Endpoints {
    pub api: Api,
    pub stun: StunClient,
    /// The mesh's IPv4 range (never a candidate).
    pub mesh_v4: ipnet::Ipv4Net,
    pub port: u16,
}

impl Endpoints {
    /// Runs until `stop` (or the daemon goes away).
    pub async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        found: mpsc::Sender<Found>,
        stop: CancellationToken,
    ) {
        let mut servers: Vec<SocketAddr> = vec![];
        let mut connected = false;
        let mut reported: Option<Vec<Endpoint>> = None;
        let mut was_connected = false;
        let mut asked_for = false;
        let mut depth_measured: Option<tokio::time::Instant> = None;
        loop {
            // Measured alongside STUN below: both take a round trip.
            let depth = match servers.first() {
                Some(&server) if depth_measured.is_none_or(|t| t.elapsed() > NAT_DEPTH_EVERY) => {
                    depth_measured = Some(tokio::time::Instant::now());
                    Some(tokio::task::spawn_blocking(move || {
                        crate::natdepth::nat_depth(server)
                    }))
                }
                _ => None,
            };
            let mut eps = local_candidates(
                homeport_host::net::interface_addrs(),
                self.port,
                self.mesh_v4,
            );
            let mut reflexive = None;
            for &server in &servers {
                if let Some(addr) = self.stun.query(server).await {
                    reflexive.get_or_insert(addr);
                    if !eps.iter().any(|e| e.addr == addr) {
                        eps.push(Endpoint {
                            addr,
                            kind: EndpointKind::Stun,
                        });
                    }
                }
            }
            if let Some(addr) = reflexive
                && found.send(Found::Reflexive(addr)).await.is_err()
            {
                return;
            }
            if let Some(depth) = depth {
                let d = depth.await.ok().flatten();
                tracing::info!(opener_ttl = ?d, "NAT depth measured");
                if found.send(Found::OpenerTtl(d.unwrap_or(0))).await.is_err() {
                    return;
                }
            }
            let eps = reportable(eps);
            // Report on change, and again after every reconnection.
            if connected && (reported.as_ref() != Some(&eps) || !was_connected) {
                match self.api.report_endpoints(&eps).await {
                    Ok(()) => {
                        tracing::info!(endpoints = ?eps.iter().map(|e| e.addr).collect::<Vec<_>>(), "endpoints reported");
                        reported = Some(eps);
                        if std::mem::take(&mut asked_for)
                            && found.send(Found::FreshReport).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "endpoint report failed"),
                }
            }
            was_connected = connected;
            let wait = if reported.is_none() || !connected {
                ENDPOINT_RETRY
            } else {
                ENDPOINT_REFRESH
            };
            let next = tokio::time::Instant::now() + wait;
            loop {
                let cmd = tokio::select! {
                    _ = tokio::time::sleep_until(next) => break,
                    c = cmds.recv() => c,
                    _ = stop.cancelled() => return,
                };
                match cmd {
                    None => return,
                    Some(Cmd::ReportNow) => {
                        asked_for = true;
                        break;
                    }
                    Some(Cmd::Connected(c)) => {
                        if !c {
                            was_connected = false;
                        }
                        connected = c;
                    }
                    Some(Cmd::Port(p)) => self.port = p,
                    Some(Cmd::StunServers(s)) => servers = s,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_this_hosts_outside_ipv4_addresses_with_our_port() {
        let mesh: ipnet::Ipv4Net = "100.96.0.0/12".parse().unwrap();
        let addrs = [
            "127.0.0.1",
            "169.254.3.4",
            "0.0.0.0",
            "100.96.0.7",
            "192.168.1.20",
            "2001:db8::1",
            "203.0.113.9",
        ]
        .map(|a| a.parse().unwrap());
        let c = local_candidates(addrs, 41641, mesh);
        let got: Vec<String> = c.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(got, ["192.168.1.20:41641", "203.0.113.9:41641"]);
        assert!(c.iter().all(|e| e.kind == EndpointKind::Local));
    }

    #[test]
    fn a_report_keeps_what_the_coordinator_accepts_and_no_more_than_it_takes() {
        let mut eps: Vec<Endpoint> = (0..100u16)
            .map(|i| Endpoint {
                addr: SocketAddr::from(([198, 51, 100, 1], 1000 + i)),
                kind: EndpointKind::Local,
            })
            .collect();
        eps.insert(
            0,
            Endpoint {
                addr: "0.0.0.0:0".parse().unwrap(),
                kind: EndpointKind::Local,
            },
        );
        let r = reportable(eps);
        assert_eq!(r.len(), homeport_proto::api::MAX_ENDPOINTS);
        assert!(
            r.iter()
                .all(|e| homeport_proto::api::endpoint_problem(e.addr).is_none())
        );
    }
}
