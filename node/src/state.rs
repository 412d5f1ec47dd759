//! The node's state directory: private key, registration and the last network map.
//! Every file is written atomically (temp file + rename) with mode 0600; the dir is 0700.

use anyhow::{Context, Result};
/// The one atomic 0600 writer (re-exported for the node's modules).
pub use homeport_host::fs::write_private;
use homeport_proto::PrivateKey;
use homeport_proto::map::{MeshAddrs, NetworkMap};
use homeport_proto::names::{NodeId, NodeName};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const KEY_FILE: &str = "private.key";
pub const REG_FILE: &str = "node.json";
pub const MAP_FILE: &str = "map.json";
pub const SOCK_FILE: &str = "homeport.sock";

/// What the coordinator gave us at registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub coordinator: String,
    pub pin: String,
    pub node_id: NodeId,
    pub name: NodeName,
    pub addrs: MeshAddrs,
    pub prefix_v4: ipnet::Ipv4Net,
    pub prefix_v6: ipnet::Ipv6Net,
    pub credential: String,
    /// The UDP port we listened on last time, reused so NAT mappings and firewall rules hold.
    #[serde(default)]
    pub listen_port: u16,
    /// The coordinator answered 401 to this credential: it is kept (key, name, address) so that
    /// `homeport up --authkey-file NEW` joins again as the same node, but not used.
    #[serde(default)]
    pub refused: bool,
}

pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn open(dir: &Path) -> Result<StateDir> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state dir {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting mode 0700 on {}", dir.display()))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// Loads the node's private key, creating it on first start.
    pub fn private_key(&self) -> Result<PrivateKey> {
        let p = self.path(KEY_FILE);
        match std::fs::read_to_string(&p) {
            Ok(s) => s
                .trim()
                .parse::<PrivateKey>()
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = PrivateKey::generate();
                write_private(&p, format!("{}\n", k.to_base64()).as_bytes())?;
                Ok(k)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn registration(&self) -> Result<Option<Registration>> {
        read_json(&self.path(REG_FILE))
    }

    pub fn save_registration(&self, r: &Registration) -> Result<()> {
        Ok(write_private(
            &self.path(REG_FILE),
            &serde_json::to_vec_pretty(r)?,
        )?)
    }

    pub fn map(&self) -> Result<Option<NetworkMap>> {
        read_json(&self.path(MAP_FILE))
    }

    pub fn save_map(&self, m: &NetworkMap) -> Result<()> {
        Ok(write_private(
            &self.path(MAP_FILE),
            &serde_json::to_vec(m)?,
        )?)
    }

    /// Forgets the registration, the map and the coordinator replicas (`homeport logout`); the
    /// private key stays. Returns the files removed.
    pub fn forget(&self) -> Result<Vec<PathBuf>> {
        let mut removed = vec![];
        for f in [REG_FILE, MAP_FILE, crate::replicas::REPLICAS_FILE] {
            let p = self.path(f);
            match std::fs::remove_file(&p) {
                Ok(()) => removed.push(p),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
        Ok(removed)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Result<Option<T>> {
    match std::fs::read(p) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// An HTTPS client for the coordinator, pinned to `pin`. Pooled connections are dropped before
/// the server's idle timeout ([`homeport_proto::api::CLIENT_POOL_IDLE_SECS`]); `timeout` bounds
/// each request (none for the map stream, which stays open).
pub fn coordinator_client(pin: &str, timeout: Option<Duration>) -> Result<reqwest::Client> {
    let tls =
        homeport_proto::tls::pinned_client_config(pin).map_err(|e| anyhow::anyhow!("pin: {e}"))?;
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(
            homeport_proto::api::CLIENT_POOL_IDLE_SECS,
        ));
    if let Some(t) = timeout {
        b = b.timeout(t);
    }
    Ok(b.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_with_mode_0600() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(&d.path().join("st")).unwrap();
        let k1 = s.private_key().unwrap();
        let k2 = s.private_key().unwrap();
        assert_eq!(k1.public_key(), k2.public_key());
        let mode = std::fs::metadata(s.path(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(&s.dir).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
    }
}
