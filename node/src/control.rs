//! The daemon's control socket `<state-dir>/homeport.sock` (mode 0600): one JSON request line,
//! one JSON answer line. The CLI (`homeport status`, `ip`, `down`) speaks it.

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    Status(Box<Status>),
    Ok,
    Error { message: String },
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
