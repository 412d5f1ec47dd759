//! Alerts when the path to a peer falls back from direct to the relay (and when it is direct
//! again). The exit is a node: it asks its own daemon (`homeport status` over the control
//! socket in its state dir), since only the nodes know their paths.

use crate::audit::Audit;
use homeport_node::control::{Request, Response};
use homeport_node::datapath::PathInfo;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the paths are looked at: a fallback happens within seconds of a NAT change.
pub const POLL: Duration = Duration::from_secs(2);

/// Remembers each peer's last path kind; pure.
#[derive(Default)]
pub struct PathTracker {
    direct: HashMap<String, bool>,
    fell_back: HashMap<String, bool>,
}

impl PathTracker {
    /// Feeds (peer, path) pairs; returns (kind, peer, message) alerts.
    pub fn step(&mut self, peers: &[(String, PathInfo)]) -> Vec<(&'static str, String, String)> {
        let mut out = Vec::new();
        for (name, path) in peers {
            match path {
                PathInfo::Direct { addr } => {
                    if self.fell_back.remove(name).is_some() {
                        out.push((
                            "path-direct",
                            name.clone(),
                            format!("the path to {name} is direct again ({addr})"),
                        ));
                    }
                    self.direct.insert(name.clone(), true);
                }
                PathInfo::Relay { reason } => {
                    if self.direct.insert(name.clone(), false) == Some(true) {
                        self.fell_back.insert(name.clone(), true);
                        out.push((
                            "relay-fallback",
                            name.clone(),
                            format!("the path to {name} fell back to the relay: {reason}"),
                        ));
                    }
                }
                PathInfo::None => {}
            }
        }
        out
    }
}

/// Runs until `stop`.
pub async fn run(state_dir: PathBuf, audit: Arc<Audit>, stop: CancellationToken) {
    let mut t = PathTracker::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        if let Ok(Response::Status(s)) =
            homeport_node::control::call(&state_dir, &Request::Status).await
        {
            let peers: Vec<(String, PathInfo)> = s
                .peers
                .iter()
                .map(|p| (p.name.to_string(), p.path.clone()))
                .collect();
            for (kind, subject, message) in t.step(&peers) {
                audit.alert(kind, subject, message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_then_relay_alerts_once_and_back() {
        let mut t = PathTracker::default();
        let d = || PathInfo::Direct {
            addr: "203.0.113.2:4000".parse().unwrap(),
        };
        let r = || PathInfo::Relay {
            reason: "no answer".into(),
        };
        let p = |x: PathInfo| vec![("home".to_string(), x)];
        assert!(
            t.step(&p(r())).is_empty(),
            "relayed from the start: no fallback"
        );
        assert!(t.step(&p(d())).is_empty());
        let a = t.step(&p(r()));
        assert_eq!(a[0].0, "relay-fallback");
        assert!(t.step(&p(r())).is_empty(), "once");
        assert_eq!(t.step(&p(d()))[0].0, "path-direct");
    }
}
