//! The daemon's control socket `<state-dir>/homeport.sock` (mode 0600): one JSON request line,
//! one JSON answer line. The CLI (`homeport status`, `ip`, `down`, `ping`, `netcheck`, `plex`) speaks it.

use crate::datapath::PeerStatus;
use homeport_proto::map::MeshAddrs;
use homeport_proto::{NodeId, NodeName, PublicKey};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Down,
    /// One disco probe to a peer (by name); answered with `Pong` or an error after 1 s.
    Ping {
        peer: String,
    },
    /// Reachability report; `stun` are extra STUN servers to ask besides the coordinator's.
    Netcheck {
        stun: Vec<std::net::SocketAddr>,
    },
    /// What this node publishes and who is connected through an exit right now
    /// (`homeport plex setup` and `plex check`).
    Published,
    /// Choose the exit node (`homeport exit-node NODE|off`); answered with `Ok`.
    #[serde(rename = "exit-node")]
    ExitNode {
        /// A peer's name; None: no exit.
        node: Option<String>,
        #[serde(default)]
        fallback: bool,
    },
}

/// The publish rules that target this node, the exits' public addresses, and the live
/// published flows (`Request::Published`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    pub me: NodeName,
    pub addrs: MeshAddrs,
    /// The mesh ranges (None before the first map).
    pub prefix_v4: Option<ipnet::Ipv4Net>,
    pub prefix_v6: Option<ipnet::Ipv6Net>,
    pub rules: Vec<PublishedPort>,
    pub flows: Vec<LiveFlow>,
}

/// One publish rule whose target is this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishedPort {
    pub rule: i64,
    pub exit: NodeName,
    pub proto: homeport_proto::publish::PublishProto,
    /// The public port on the exit.
    pub port: u16,
    /// The port on this node it is carried to.
    pub target_port: u16,
    /// The exit's public addresses, as its endpoints in the map say (interface addresses, STUN
    /// and static ones that are globally routable); empty when the exit reported none.
    pub exit_public: Vec<std::net::IpAddr>,
    pub exit_mesh: MeshAddrs,
    pub exit_online: bool,
    /// The rule's allow-list (empty: everyone may connect).
    #[serde(default)]
    pub allow: Vec<ipnet::IpNet>,
}

/// A published flow this node is the target of, live in its flow table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveFlow {
    /// "tcp" or "udp".
    pub proto: String,
    /// The viewer's address and port, as the exit forwarded them.
    pub remote: std::net::SocketAddr,
    pub local_port: u16,
    /// The exit it came through.
    pub exit: String,
    /// The remote answered our reply (not a spoofed source).
    pub confirmed: bool,
    pub idle_secs: u64,
}

/// `homeport netcheck`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Netcheck {
    /// Whether any STUN server answered over UDP.
    pub udp: bool,
    /// (STUN server, our reflexive address as it saw it, or None when it did not answer).
    pub stun: Vec<(std::net::SocketAddr, Option<std::net::SocketAddr>)>,
    /// (peer, our address as that peer saw it in its last Pong).
    pub seen_by_peers: Vec<(NodeName, std::net::SocketAddr)>,
    /// "easy", "hard" or "unknown", with the reason.
    pub mapping: String,
    /// (relay address, BIND round-trip in ms).
    pub relay: Option<(std::net::SocketAddr, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfStatus {
    pub id: NodeId,
    pub name: NodeName,
    pub public_key: PublicKey,
    pub addrs: MeshAddrs,
    pub tun: String,
    pub listen_port: u16,
    pub coordinator: String,
    /// The map stream is connected right now.
    pub connected: bool,
    pub map_version: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    #[serde(rename = "self")]
    pub me: SelfStatus,
    pub peers: Vec<PeerStatus>,
    /// Subnet routes and the exit node (None from a daemon without them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<crate::routes_sync::RoutesStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    Status(Box<Status>),
    /// `path`: "direct ADDR" or "relay ADDR".
    Pong {
        path: String,
        rtt_ms: f64,
    },
    Netcheck(Box<Netcheck>),
    Published(Box<Published>),
    Ok,
    Error {
        message: String,
    },
}

/// A request from the socket, with where its answer goes.
pub type Ask = (Request, tokio::sync::oneshot::Sender<Response>);

/// Serves the control socket until `stop`: each connection's request goes to `asks` and its
/// answer back to the connection. A line that is not a request is answered here.
pub async fn serve(
    listener: tokio::net::UnixListener,
    asks: tokio::sync::mpsc::Sender<Ask>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let (s, _) = tokio::select! {
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
            _ = stop.cancelled() => return,
        };
        let asks = asks.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(req) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if asks.send((req, tx)).await.is_err() {
                        return;
                    }
                    match rx.await {
                        Ok(r) => r,
                        Err(_) => Response::Error {
                            message: "the daemon is stopping".into(),
                        },
                    }
                }
                Err(e) => Response::Error {
                    message: format!(
                        "bad request {:?}: {e}; expected {{\"cmd\":\"status\"|\"down\"|\"ping\"|\"netcheck\"|\"published\"|\"exit-node\"}}",
                        line.trim()
                    ),
                },
            };
            let mut out = serde_json::to_string(&resp).unwrap_or_default();
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}

/// Sends one request to the daemon whose state dir is `state_dir`.
pub async fn call(state_dir: &Path, req: &Request) -> anyhow::Result<Response> {
    let sock = state_dir.join(crate::state::SOCK_FILE);
    let s = UnixStream::connect(&sock).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the homeport daemon at {}: {e} (is `homeport up --state-dir {}` running?)",
            sock.display(),
            state_dir.display()
        )
    })?;
    let (r, mut w) = s.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(r).read_line(&mut answer).await?;
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_reach_the_daemon_and_answers_the_caller_bad_lines_get_what_is_expected() {
        let dir = tempfile::tempdir().unwrap();
        let l = tokio::net::UnixListener::bind(dir.path().join(crate::state::SOCK_FILE)).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Ask>(4);
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve(l, tx, stop.clone()));
        // A stand-in daemon: answers pings with the peer's name as the path.
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(match req {
                    Request::Ping { peer } => Response::Pong {
                        path: peer,
                        rtt_ms: 1.0,
                    },
                    _ => Response::Ok,
                });
            }
        });
        match call(dir.path(), &Request::Ping { peer: "vps".into() })
            .await
            .unwrap()
        {
            Response::Pong { path, .. } => assert_eq!(path, "vps"),
            r => panic!("{r:?}"),
        }
        let s = UnixStream::connect(dir.path().join(crate::state::SOCK_FILE))
            .await
            .unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(b"{\"cmd\":\"reboot\"}\n").await.unwrap();
        let mut answer = String::new();
        BufReader::new(r).read_line(&mut answer).await.unwrap();
        match serde_json::from_str::<Response>(&answer).unwrap() {
            Response::Error { message } => {
                assert!(
                    message.contains("reboot") && message.contains("netcheck"),
                    "{message}"
                )
            }
            r => panic!("{r:?}"),
        }
        stop.cancel();
    }
}
