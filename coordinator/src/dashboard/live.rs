//! The live status nodes and exits report, and the admin overview made of it
//! (`GET /api/v1/admin/overview`: the dashboard's one poll, and `homeport-coordinator status`).

use crate::api::{Admin, JsonBody, NodeAuth};
use crate::error::{ApiErr, ApiResult};
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use homeport_proto::NodeId;
use homeport_proto::status::{
    ExitHealth, ExitStatusReport, LiveConnView, NodeOverview, NodeStatusReport, Overview, PathKind,
    PeerPathView, PublishOverview,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

/// The latest reports, in memory only (a view of now, never state).
#[derive(Default)]
pub struct Reports {
    inner: Mutex<ReportsInner>,
}

#[derive(Default)]
struct ReportsInner {
    nodes: HashMap<NodeId, (Instant, NodeStatusReport)>,
    exits: HashMap<NodeId, (Instant, ExitStatusReport)>,
    /// (URL nodes join with, TLS pin), for the `homeport up` line shown with a new auth key.
    join: Option<(String, String)>,
}

impl Reports {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReportsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How nodes join (set by `serve` once it knows its URL and pin).
    pub fn set_join(&self, url: String, pin: String) {
        self.lock().join = Some((url, pin));
    }

    /// Forgets what `id` reported (removed nodes).
    pub fn forget(&self, id: NodeId) {
        let mut r = self.lock();
        r.nodes.remove(&id);
        r.exits.remove(&id);
    }
}

/// `POST /api/v1/node/status`.
pub async fn node_status(
    State(st): State<AppState>,
    NodeAuth(id): NodeAuth,
    JsonBody(rep): JsonBody<NodeStatusReport>,
) -> ApiResult<StatusCode> {
    if let Some(p) = rep.problem() {
        return Err(ApiErr::bad_request(p));
    }
    st.live.lock().nodes.insert(id, (Instant::now(), rep));
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/node/exit-status`.
pub async fn exit_status(
    State(st): State<AppState>,
    NodeAuth(id): NodeAuth,
    JsonBody(rep): JsonBody<ExitStatusReport>,
) -> ApiResult<StatusCode> {
    if let Some(p) = rep.problem() {
        return Err(ApiErr::bad_request(p));
    }
    st.live.lock().exits.insert(id, (Instant::now(), rep));
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/admin/overview`.
pub async fn overview(_: Admin, State(st): State<AppState>) -> Json<Overview> {
    Json(make_overview(&st))
}

/// The allow-list entry `source` (`ip:port`) falls in, or "anyone" for an open rule.
fn label(allow: &[ipnet::IpNet], source: &str) -> String {
    if allow.is_empty() {
        return "anyone".into();
    }
    let ip = source.parse::<SocketAddr>().map(|s| s.ip()).ok();
    ip.and_then(|ip| allow.iter().find(|n| n.contains(&ip)))
        .map(|n| n.to_string())
        .unwrap_or_else(|| "not in the allow-list".into())
}

pub fn make_overview(st: &AppState) -> Overview {
    let at = crate::store::now();
    let now = Instant::now();
    let mesh = st.mesh();
    let reports = st.live.lock();
    let names: HashMap<NodeId, _> = mesh.nodes().map(|n| (n.id, n.name.clone())).collect();
    let rules: Vec<_> = mesh.publish_rules().cloned().collect();
    let (mut relayed, mut direct) = (0, 0);
    let mut nodes: Vec<NodeOverview> = mesh
        .nodes()
        .map(|n| {
            let info = crate::api::node_info(n, at);
            let rep = reports.nodes.get(&n.id);
            let peers: Vec<PeerPathView> = rep
                .map(|(_, r)| {
                    r.peers
                        .iter()
                        .filter_map(|p| {
                            Some(PeerPathView {
                                peer_name: names.get(&p.peer)?.clone(),
                                report: p.clone(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            for p in &peers {
                match p.report.path {
                    PathKind::Relay => relayed += 1,
                    PathKind::Direct => direct += 1,
                    PathKind::None => {}
                }
            }
            let exit = reports.exits.get(&n.id).map(|(t, e)| ExitHealth {
                version: e.version.clone(),
                reported_secs_ago: now.duration_since(*t).as_secs(),
                rules_in_sync: rules
                    .iter()
                    .filter(|r| r.exit == n.id)
                    .all(|r| e.rules_applied.contains(&r.id))
                    && e.error.is_none(),
                error: e.error.clone(),
            });
            NodeOverview {
                info,
                version: rep.map(|(_, r)| r.version.clone()),
                reported_secs_ago: rep.map(|(t, _)| now.duration_since(*t).as_secs()),
                peers,
                exit,
            }
        })
        .collect();
    nodes.sort_by(|a, b| a.info.name.cmp(&b.info.name));
    let publish = rules
        .into_iter()
        .map(|r| {
            let exit = reports.exits.get(&r.exit).map(|(_, e)| e);
            let live = exit
                .map(|e| {
                    e.live
                        .iter()
                        .filter(|c| c.rule == r.id)
                        .map(|c| LiveConnView {
                            label: label(&r.guards.allow, &c.source),
                            conn: c.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let recent = exit
                .map(|e| {
                    e.recent
                        .iter()
                        .filter(|l| l.rule == r.id)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            PublishOverview {
                applied: exit.map(|e| e.rules_applied.contains(&r.id)),
                live,
                recent,
                rule: r,
            }
        })
        .collect();
    let (join_url, pin) = reports.join.clone().unzip();
    Overview {
        join_url,
        pin,
        coordinator_version: format!("homeport-coordinator {}", env!("CARGO_PKG_VERSION")),
        now: at,
        nodes,
        publish,
        relayed_paths: relayed,
        direct_paths: direct,
    }
}

/// `homeport-coordinator status`: the overview as text.
pub fn render_text(o: &Overview) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{}", o.coordinator_version);
    for n in &o.nodes {
        let _ = writeln!(
            s,
            "\n{}  {} {}  {}  {}",
            n.info.name,
            n.info.addrs.ipv4,
            n.info.addrs.ipv6,
            if n.info.online { "online" } else { "offline" },
            n.version.as_deref().unwrap_or("not reporting")
        );
        if let Some(e) = &n.exit {
            let _ = writeln!(
                s,
                "  exit: {}, {}",
                e.version,
                match (&e.error, e.rules_in_sync) {
                    (Some(err), _) => format!("rules not applied: {err}"),
                    (None, true) => "rules applied".into(),
                    (None, false) => "rules not applied yet".into(),
                }
            );
        }
        for p in &n.peers {
            let path = match p.report.path {
                PathKind::Direct => format!("direct {}", p.report.addr.as_deref().unwrap_or("")),
                PathKind::Relay => format!("relay: {}", p.report.reason.as_deref().unwrap_or("")),
                PathKind::None => "no path yet".into(),
            };
            let hs = p
                .report
                .last_handshake_secs_ago
                .map(|h| format!("handshake {h} s ago"))
                .unwrap_or_else(|| "no handshake".into());
            let _ = writeln!(
                s,
                "  -> {:<20} {path}  ({hs}, rx {} B, tx {} B)",
                p.peer_name.as_str(),
                p.report.rx_bytes,
                p.report.tx_bytes
            );
        }
    }
    for r in &o.publish {
        let _ = writeln!(
            s,
            "\nrule {}: {}:{}/{} -> {}:{}  {}",
            r.rule.id,
            r.rule.exit_name.as_str(),
            r.rule.port,
            r.rule.proto.as_str(),
            r.rule.target_name.as_str(),
            r.rule.target_port,
            match r.applied {
                Some(true) => "live on the exit",
                Some(false) => "not applied on the exit",
                None => "exit not reporting",
            }
        );
        for c in &r.live {
            let _ = writeln!(
                s,
                "  connected: {}  let in by {}  in {} B  out {} B  {}",
                c.conn.source,
                c.label,
                c.conn.bytes_in,
                c.conn.bytes_out,
                c.conn
                    .duration_secs
                    .map(|d| format!("{d} s"))
                    .unwrap_or_else(|| "?".into())
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_the_allow_entry_a_viewer_matched() {
        let allow: Vec<ipnet::IpNet> = vec![
            "192.0.2.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        assert_eq!(label(&[], "192.0.2.50:4000"), "anyone");
        assert_eq!(label(&allow, "192.0.2.50:4000"), "192.0.2.0/24");
        assert_eq!(label(&allow, "[2001:db8::5]:1"), "2001:db8::/32");
        assert_eq!(label(&allow, "203.0.113.9:1"), "not in the allow-list");
    }
}
