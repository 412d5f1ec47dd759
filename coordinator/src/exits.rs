//! Exits: which nodes run `homeport-exit` (they announce themselves with their node
//! credential), their public addresses and whether they hold a country database. Publish rules
//! are checked against them: a rule on a node that runs no exit would silently do nothing, and a
//! country rule on an exit without a database could not be enforced.
//!
//! Stored in the settings table as `exit:<node id>` (JSON), so no schema change is needed; a
//! removed node's entry is never read again (node ids are never reused).

use crate::api::{Admin, JsonBody, NodeAuth};
use crate::error::{ApiErr, ApiResult};
use crate::state::AppState;
use crate::store::now;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use homeport_proto::NodeId;
use homeport_proto::exit::{ExitAnnounce, ExitInfo, MAX_COUNTRY_DB_LEN, MAX_PUBLIC_ADDRS};
use homeport_proto::publish::PublishRule;
use serde::{Deserialize, Serialize};

pub use homeport_proto::exit::COUNTRY_DB_HINT;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    announce: ExitAnnounce,
    at: i64,
}

fn key(id: NodeId) -> String {
    format!("exit:{id}")
}

async fn stored(st: &AppState, id: NodeId) -> ApiResult<Option<Stored>> {
    Ok(st
        .store
        .setting(&key(id))
        .await?
        .and_then(|v| serde_json::from_str(&v).ok()))
}

/// `POST /api/v1/node/exit`: the calling node runs an exit.
pub async fn announce(
    State(st): State<AppState>,
    NodeAuth(id): NodeAuth,
    JsonBody(a): JsonBody<ExitAnnounce>,
) -> ApiResult<StatusCode> {
    if a.public_addrs.len() > MAX_PUBLIC_ADDRS {
        return Err(ApiErr::bad_request(format!(
            "public_addrs: {} addresses; at most {MAX_PUBLIC_ADDRS} are accepted",
            a.public_addrs.len()
        )));
    }
    if let Some(d) = &a.country_db
        && (d.len() > MAX_COUNTRY_DB_LEN || d.chars().any(char::is_control))
    {
        return Err(ApiErr::bad_request(format!(
            "country_db: expected a description of at most {MAX_COUNTRY_DB_LEN} characters without control characters"
        )));
    }
    let v = serde_json::to_string(&Stored {
        announce: a.clone(),
        at: now(),
    })
    .map_err(|e| ApiErr::bad_request(format!("body: {e}")))?;
    let _w = st.write_lock.lock().await;
    st.store.set_setting(&key(id), &v).await?;
    tracing::info!(node = %id, addrs = ?a.public_addrs, country_db = ?a.country_db, "exit announced");
    Ok(StatusCode::NO_CONTENT)
}

/// Every node that announced an exit, by name.
pub async fn exits(st: &AppState) -> ApiResult<Vec<ExitInfo>> {
    let nodes: Vec<(NodeId, homeport_proto::NodeName, bool)> = st
        .mesh()
        .nodes()
        .map(|n| (n.id, n.name.clone(), n.online))
        .collect();
    let mut out = Vec::new();
    for (id, name, online) in nodes {
        if let Some(s) = stored(st, id).await? {
            out.push(ExitInfo {
                node_id: id,
                name,
                online,
                public_addrs: s.announce.public_addrs,
                country_db: s.announce.country_db,
                announced_at: s.at,
                invite_port: s.announce.invite_port,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// `GET /api/v1/admin/exits`.
pub async fn list(_: Admin, State(st): State<AppState>) -> ApiResult<Json<Vec<ExitInfo>>> {
    Ok(Json(exits(&st).await?))
}

/// Refuses `rule` when its exit node runs no exit (naming the exits there are), or when it has
/// country rules and the exit has no country database (saying where to get one).
pub async fn check_publish(st: &AppState, rule: &PublishRule) -> ApiResult<()> {
    let all = exits(st).await?;
    let Some(exit) = all.iter().find(|e| e.node_id == rule.exit) else {
        let names: Vec<String> = all.iter().map(|e| e.name.to_string()).collect();
        return Err(ApiErr::bad_request(format!(
            "exit: node {} runs no exit (homeport-exit never announced itself there), so nothing would publish the port; {}",
            rule.exit_name,
            if names.is_empty() {
                "no node runs an exit yet: start `homeport-exit up` on the VPS".to_string()
            } else {
                format!("the exits are: {}", names.join(", "))
            }
        )));
    };
    if rule.guards.needs_countries() && exit.country_db.is_none() {
        return Err(ApiErr::bad_request(format!(
            "country/deny_country: exit {} has no country database, so it cannot tell a source's country; {COUNTRY_DB_HINT}",
            exit.name
        )));
    }
    Ok(())
}
