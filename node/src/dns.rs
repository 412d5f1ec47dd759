//! Mesh names. Every node runs a name server on its mesh addresses, port 53 (UDP and TCP,
//! hickory-server): it answers the names of the nodes and plain devices in its map, `home` and
//! `home.<mesh domain>`, and forwards every other question to the system's resolvers
//! (hickory-resolver reading /etc/resolv.conf). Plain devices use their via node's server (their
//! config says so). Where systemd-resolved runs, the node registers its server for the mesh
//! domain on its TUN (`resolvectl dns|domain`), so `ping home` works from any program.
//!
//! Fed by the daemon's map channel ([`crate::daemon::MapObserver`]); [`Names`] is pure.

use hickory_resolver::TokioResolver;
use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::proto::op::{Header, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use homeport_proto::map::{MeshAddrs, NetworkMap};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub const DNS_PORT: u16 = homeport_engine::DNS_PORT;

/// TTL of mesh answers: short, so a removed device or a changed address is forgotten soon, long
/// enough that a busy client does not ask for every connection.
pub const MESH_TTL: u32 = 60;

/// A TCP client gets this long to send its question (hickory's own servers use the same order).
const TCP_TIMEOUT: Duration = Duration::from_secs(5);

/// Until the TUN carries the mesh address, binding to it fails: try again this often.
const BIND_RETRY: Duration = Duration::from_secs(1);

/// What a name is in the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A node or device of the mesh.
    Mesh(MeshAddrs),
    /// In the mesh domain but nobody's name: NXDOMAIN, never forwarded.
    NoSuchName,
    /// Not a mesh name: ask the system's resolvers.
    Elsewhere,
}

/// The mesh's names, from one map.
#[derive(Debug, Default)]
pub struct Names {
    domain: Option<String>,
    by_name: HashMap<String, MeshAddrs>,
}

impl Names {
    pub fn from_map(m: &NetworkMap) -> Names {
        let mut by_name: HashMap<String, MeshAddrs> = m
            .peers
            .values()
            .map(|p| (p.name.to_string(), p.addrs))
            .collect();
        by_name.insert(m.self_node.name.to_string(), m.self_node.addrs);
        Names {
            domain: m.self_node.mesh_domain.clone(),
            by_name,
        }
    }

    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// `qname` (any case, with or without the final dot): a bare name (`home`) or one in the mesh
    /// domain (`home.homeport.internal`).
    pub fn lookup(&self, qname: &str) -> Answer {
        let q = qname.trim_end_matches('.').to_ascii_lowercase();
        if let Some(d) = &self.domain {
            if q == *d {
                return Answer::NoSuchName;
            }
            if let Some(label) = q.strip_suffix(d.as_str()).and_then(|l| l.strip_suffix('.')) {
                return match self.by_name.get(label) {
                    Some(a) => Answer::Mesh(*a),
                    None => Answer::NoSuchName,
                };
            }
        }
        match self.by_name.get(&q) {
            Some(a) if !q.contains('.') => Answer::Mesh(*a),
            _ => Answer::Elsewhere,
        }
    }
}

struct Handler {
    names: Arc<RwLock<Arc<Names>>>,
    /// None: the system's resolver config could not be read; other names get SERVFAIL.
    resolver: Option<TokioResolver>,
}

impl Handler {
    /// The answer records and response code for one question.
    async fn answer(&self, qname: &Name, qtype: RecordType) -> (ResponseCode, Vec<Record>, bool) {
        let found = self.names.read().unwrap().lookup(&qname.to_ascii());
        match found {
            Answer::Mesh(a) => {
                let rdata = match qtype {
                    RecordType::A | RecordType::ANY => Some(RData::A(A(a.ipv4))),
                    RecordType::AAAA => Some(RData::AAAA(AAAA(a.ipv6))),
                    _ => None,
                };
                let recs = rdata
                    .map(|r| Record::from_rdata(qname.clone(), MESH_TTL, r))
                    .into_iter()
                    .collect();
                (ResponseCode::NoError, recs, true)
            }
            Answer::NoSuchName => (ResponseCode::NXDomain, vec![], true),
            Answer::Elsewhere => {
                let Some(r) = &self.resolver else {
                    return (ResponseCode::ServFail, vec![], false);
                };
                match r.lookup(qname.clone(), qtype).await {
                    Ok(l) => (ResponseCode::NoError, l.records().to_vec(), false),
                    Err(e) if e.is_nx_domain() => (ResponseCode::NXDomain, vec![], false),
                    Err(e) if e.is_no_records_found() => (ResponseCode::NoError, vec![], false),
                    Err(e) => {
                        tracing::debug!(name = %qname, error = %e, "forwarded question failed");
                        (ResponseCode::ServFail, vec![], false)
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut header = Header::response_from_request(request.header());
        header.set_recursion_available(true);
        let info = match request.request_info() {
            Ok(i) => i,
            Err(_) => {
                header.set_response_code(ResponseCode::FormErr);
                let msg = builder.build_no_records(header);
                return response
                    .send_response(msg)
                    .await
                    .unwrap_or_else(|_| header.into());
            }
        };
        let qname: Name = info.query.name().into();
        let (code, records, authoritative) = self.answer(&qname, info.query.query_type()).await;
        header.set_response_code(code);
        header.set_authoritative(authoritative);
        let msg = builder.build(header, records.iter(), [], [], []);
        match response.send_response(msg).await {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(error = %e, "DNS answer not sent");
                header.into()
            }
        }
    }
}

/// Runs the name server until `stop`: it follows `maps` (names, our address, the domain) and
/// registers with systemd-resolved on `tun` where that runs.
pub async fn run(
    mut maps: watch::Receiver<Option<Arc<NetworkMap>>>,
    tun: String,
    stop: CancellationToken,
) {
    let names = Arc::new(RwLock::new(Arc::new(Names::default())));
    let resolver = match TokioResolver::builder_tokio() {
        Ok(b) => Some(b.build()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the system's resolver config: only mesh names will resolve");
            None
        }
    };
    let mut resolver = resolver;
    let mut server: Option<(MeshAddrs, ServerFuture<Handler>)> = None;
    let mut warned = false;
    loop {
        let want = {
            let m = maps.borrow_and_update().clone();
            m.map(|m| {
                *names.write().unwrap() = Arc::new(Names::from_map(&m));
                (m.self_node.addrs, m.self_node.mesh_domain.clone())
            })
        };
        if let Some((addrs, domain)) = want
            && server.as_ref().map(|(a, _)| *a) != Some(addrs)
        {
            if let Some((_, mut old)) = server.take() {
                let _ = old.shutdown_gracefully().await;
            }
            let handler = Handler {
                names: names.clone(),
                resolver: resolver
                    .take()
                    .or_else(|| TokioResolver::builder_tokio().ok().map(|b| b.build())),
            };
            match bind(addrs, handler).await {
                Ok(s) => {
                    tracing::info!(ipv4 = %addrs.ipv4, ipv6 = %addrs.ipv6, port = DNS_PORT, "serving mesh names");
                    server = Some((addrs, s));
                    if let Some(d) = domain {
                        register_resolved(&tun, addrs.ipv4, &d).await;
                    }
                }
                // Until the TUN has the address; anything else (another server on port 53, say
                // a dnsmasq on 0.0.0.0) is said once, and retried.
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable || warned => {
                    tracing::debug!(ip = %addrs.ipv4, error = %e, "name server not bound yet")
                }
                Err(e) => {
                    warned = true;
                    tracing::warn!(
                        ip = %addrs.ipv4,
                        port = DNS_PORT,
                        error = %e,
                        "cannot serve mesh names (another DNS server on this port?); retrying"
                    )
                }
            }
        }
        let bound = server.is_some();
        tokio::select! {
            r = maps.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(BIND_RETRY), if !bound => {}
            _ = stop.cancelled() => break,
        }
    }
    if let Some((_, mut s)) = server {
        let _ = s.shutdown_gracefully().await;
    }
}

/// Binds port 53 on the mesh IPv4 address (needed) and the IPv6 one (when the TUN has it).
async fn bind(addrs: MeshAddrs, handler: Handler) -> std::io::Result<ServerFuture<Handler>> {
    let mut s = ServerFuture::new(handler);
    let v4 = SocketAddr::from((addrs.ipv4, DNS_PORT));
    s.register_socket(tokio::net::UdpSocket::bind(v4).await?);
    s.register_listener(tokio::net::TcpListener::bind(v4).await?, TCP_TIMEOUT);
    let v6 = SocketAddr::from((addrs.ipv6, DNS_PORT));
    match (
        tokio::net::UdpSocket::bind(v6).await,
        tokio::net::TcpListener::bind(v6).await,
    ) {
        (Ok(u), Ok(t)) => {
            s.register_socket(u);
            s.register_listener(t, TCP_TIMEOUT);
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(%v6, error = %e, "mesh names on IPv4 only");
        }
    }
    Ok(s)
}

/// `resolvectl dns TUN IP` and `resolvectl domain TUN DOMAIN`, when systemd-resolved runs: the
/// mesh domain (and bare names, through the search domain) go to our server, nothing else does.
async fn register_resolved(tun: &str, ip: Ipv4Addr, domain: &str) {
    if !std::path::Path::new("/run/systemd/resolve/io.systemd.Resolve").exists() {
        return;
    }
    for args in [
        vec!["dns".to_string(), tun.to_string(), ip.to_string()],
        vec!["domain".to_string(), tun.to_string(), domain.to_string()],
    ] {
        match tokio::process::Command::new("resolvectl")
            .args(&args)
            .output()
            .await
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::warn!(
                args = %args.join(" "),
                error = %String::from_utf8_lossy(&o.stderr).trim(),
                "resolvectl failed: mesh names resolve only when asked at the mesh address"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "resolvectl not run: mesh names resolve only when asked at the mesh address")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homeport_proto::map::{Peer, SelfNode};
    use homeport_proto::{NodeId, PublicKey};

    fn addrs(n: u8) -> MeshAddrs {
        MeshAddrs {
            ipv4: Ipv4Addr::new(100, 96, 0, n),
            ipv6: format!("fd7a::{n}").parse().unwrap(),
        }
    }

    fn map() -> NetworkMap {
        let peer = |n: u8, name: &str, via: Option<NodeId>| Peer {
            id: NodeId(n as i64),
            name: name.parse().unwrap(),
            public_key: PublicKey([n; 32]),
            addrs: addrs(n),
            endpoints: vec![],
            online: true,
            tags: vec![],
            routes: vec![],
            via,
        };
        NetworkMap {
            version: 1,
            self_node: SelfNode {
                id: NodeId(1),
                name: "home".parse().unwrap(),
                public_key: PublicKey([1; 32]),
                addrs: addrs(1),
                prefix_v4: "100.96.0.0/16".parse().unwrap(),
                prefix_v6: "fd7a::/64".parse().unwrap(),
                tags: vec![],
                routes: vec![],
                mesh_domain: Some("homeport.internal".into()),
            },
            peers: [peer(2, "vps", None), peer(3, "phone", Some(NodeId(2)))]
                .into_iter()
                .map(|p| (p.id, p))
                .collect(),
            filter: homeport_proto::filter::PacketFilter::allow_all(),
            publish: vec![],
            relays: vec![],
            coordinators: vec![],
            device_filters: vec![],
        }
    }

    #[test]
    fn nodes_devices_and_ourselves_answer_bare_and_in_the_domain() {
        let n = Names::from_map(&map());
        assert_eq!(n.lookup("home"), Answer::Mesh(addrs(1)));
        assert_eq!(n.lookup("VPS."), Answer::Mesh(addrs(2)));
        assert_eq!(n.lookup("phone.homeport.internal."), Answer::Mesh(addrs(3)));
        assert_eq!(n.lookup("nas.homeport.internal"), Answer::NoSuchName);
        assert_eq!(n.lookup("homeport.internal"), Answer::NoSuchName);
        assert_eq!(n.lookup("example.org"), Answer::Elsewhere);
        assert_eq!(n.lookup("home.example.org"), Answer::Elsewhere);
        assert_eq!(n.lookup("nas"), Answer::Elsewhere);
    }
}
