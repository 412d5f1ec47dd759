//! Invite links (see `homeport_proto::invite`): created and listed by the admin, redeemed by the
//! exit that serves the invite page, and fetched by exits as grants.
//!
//! All invites are one JSON document in the settings table (`invites`): there are a handful,
//! every change happens under the write lock, and no schema change is needed. Tokens are stored
//! as their SHA-256 only.

use crate::api::{Admin, JsonBody, NodeAuth};
use crate::error::{ApiErr, ApiResult};
use crate::state::AppState;
use crate::store::now;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use homeport_proto::NodeId;
use homeport_proto::api::token_hash;
use homeport_proto::invite::{
    Grant, InviteCreate, InviteCreated, InviteInfo, InviteRedeem, InvitedAddr, MAX_INVITE_DAYS,
    MAX_INVITE_NAME, MAX_INVITE_USES,
};
use serde::{Deserialize, Serialize};

const KEY: &str = "invites";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Invite {
    id: i64,
    name: String,
    exit: NodeId,
    rule: i64,
    port: u16,
    proto: String,
    hash: String,
    created_at: i64,
    until: i64,
    uses: u32,
    addrs: Vec<InvitedAddr>,
    revoked: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Doc {
    last_id: i64,
    invites: Vec<Invite>,
}

async fn load(st: &AppState) -> ApiResult<Doc> {
    Ok(st
        .store
        .setting(KEY)
        .await?
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default())
}

async fn save(st: &AppState, d: &Doc) -> ApiResult<()> {
    let v = serde_json::to_string(d).map_err(|e| ApiErr::internal(format!("invites: {e}")))?;
    Ok(st.store.set_setting(KEY, &v).await?)
}

fn info(i: &Invite, st: &AppState) -> InviteInfo {
    InviteInfo {
        id: i.id,
        name: i.name.clone(),
        exit: st
            .mesh()
            .node(i.exit)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| "removed".parse().expect("a valid name")),
        rule: i.rule,
        port: i.port,
        proto: i.proto.clone(),
        created_at: i.created_at,
        until: i.until,
        uses: i.uses,
        addrs: i.addrs.clone(),
        revoked: i.revoked,
    }
}

/// `POST /api/v1/admin/invites`.
pub async fn create(
    _: Admin,
    State(st): State<AppState>,
    JsonBody(req): JsonBody<InviteCreate>,
) -> ApiResult<(StatusCode, Json<InviteCreated>)> {
    let name = req.name.as_str();
    if name.is_empty()
        || name.chars().count() > MAX_INVITE_NAME
        || name.chars().any(|c| c.is_control())
    {
        return Err(ApiErr::bad_request(format!(
            "name: expected 1-{MAX_INVITE_NAME} characters without control characters, e.g. alice"
        )));
    }
    if req.days == 0 || req.days > MAX_INVITE_DAYS {
        return Err(ApiErr::bad_request(format!(
            "days: expected 1-{MAX_INVITE_DAYS}"
        )));
    }
    let uses = req.uses.unwrap_or(1);
    if uses == 0 || uses > MAX_INVITE_USES {
        return Err(ApiErr::bad_request(format!(
            "uses: expected 1-{MAX_INVITE_USES} (how many addresses the link may add)"
        )));
    }
    let proto = req.proto.as_deref().unwrap_or("tcp").to_ascii_lowercase();
    if proto != "tcp" && proto != "udp" {
        return Err(ApiErr::bad_request("proto: expected tcp or udp"));
    }
    let _w = st.write_lock.lock().await;
    let rules: Vec<homeport_proto::publish::PublishRule> = st
        .mesh()
        .publish_rules()
        .filter(|r| r.port == req.port && r.proto.as_str() == proto)
        .filter(|r| {
            req.exit
                .as_deref()
                .is_none_or(|e| r.exit_name.as_str() == e.trim())
        })
        .cloned()
        .collect();
    let rule = match rules.as_slice() {
        [r] => r.clone(),
        [] => {
            return Err(ApiErr::not_found(format!(
                "port: no publish rule for {}/{proto}{}; see `homeport-coordinator publish list`",
                req.port,
                req.exit
                    .as_deref()
                    .map(|e| format!(" on exit {e}"))
                    .unwrap_or_default()
            )));
        }
        _ => {
            return Err(ApiErr::bad_request(format!(
                "exit: {}/{proto} is published on several exits ({}); say which with exit",
                req.port,
                rules
                    .iter()
                    .map(|r| r.exit_name.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    };
    if rule.guards.allow.is_empty() && !rule.guards.needs_countries() {
        return Err(ApiErr::bad_request(format!(
            "port: {}/{proto} is open to everyone already, so an invite would change nothing; \
             restrict it first (publish add … --allow CIDR or --country CC)",
            req.port
        )));
    }
    let exits = crate::exits::exits(&st).await?;
    let exit = exits
        .iter()
        .find(|e| e.node_id == rule.exit)
        .ok_or_else(|| ApiErr::bad_request(format!("exit {} runs no exit", rule.exit_name)))?;
    let (Some(invite_port), Some(addr)) = (exit.invite_port, exit.public_addrs.first()) else {
        return Err(ApiErr::bad_request(format!(
            "exit {} serves no invite pages: start homeport-exit with --invite-port N (e.g. 8088) \
             and a public address",
            rule.exit_name
        )));
    };
    let token = {
        use base64::Engine;
        use rand::RngCore;
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let mut d = load(&st).await?;
    d.last_id += 1;
    let at = now();
    let inv = Invite {
        id: d.last_id,
        name: name.to_string(),
        exit: rule.exit,
        rule: rule.id,
        port: rule.port,
        proto,
        hash: token_hash(&token),
        created_at: at,
        until: at + req.days as i64 * 86_400,
        uses,
        addrs: Vec::new(),
        revoked: false,
    };
    let out = InviteCreated {
        id: inv.id,
        link: format!(
            "http://{}/i/{token}",
            std::net::SocketAddr::new(*addr, invite_port)
        ),
        until: inv.until,
    };
    tracing::info!(id = inv.id, name = %inv.name, rule = inv.rule, until = inv.until, uses, "invite created");
    d.invites.push(inv);
    save(&st, &d).await?;
    Ok((StatusCode::CREATED, Json(out)))
}

/// `GET /api/v1/admin/invites`.
pub async fn list(_: Admin, State(st): State<AppState>) -> ApiResult<Json<Vec<InviteInfo>>> {
    let d = load(&st).await?;
    Ok(Json(d.invites.iter().map(|i| info(i, &st)).collect()))
}

/// `DELETE /api/v1/admin/invites/{id}`: its addresses lose access (exits fetch the grants).
pub async fn revoke(
    _: Admin,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<InviteInfo>> {
    let id: i64 = id.parse().ok().filter(|i| *i > 0).ok_or_else(|| {
        ApiErr::bad_request(format!(
            "id: {id:?} is not an invite id (see `invite list`)"
        ))
    })?;
    let _w = st.write_lock.lock().await;
    let mut d = load(&st).await?;
    let Some(i) = d.invites.iter_mut().find(|i| i.id == id) else {
        return Err(ApiErr::not_found(format!("no invite with id {id}")));
    };
    i.revoked = true;
    let out = info(i, &st);
    save(&st, &d).await?;
    tracing::info!(id, "invite revoked");
    Ok(Json(out))
}

fn grants_of(d: &Doc, exit: NodeId, at: i64) -> Vec<Grant> {
    let mut v: Vec<Grant> = d
        .invites
        .iter()
        .filter(|i| i.exit == exit && !i.revoked && i.until > at)
        .flat_map(|i| {
            i.addrs.iter().map(|a| Grant {
                rule: i.rule,
                addr: a.addr,
                until: i.until,
                name: i.name.clone(),
                invite: i.id,
                port: i.port,
            })
        })
        .collect();
    v.sort();
    v
}

/// `GET /api/v1/node/invites`: the live grants on the calling exit.
pub async fn grants(
    State(st): State<AppState>,
    NodeAuth(id): NodeAuth,
) -> ApiResult<Json<Vec<Grant>>> {
    let d = load(&st).await?;
    Ok(Json(grants_of(&d, id, now())))
}

/// `POST /api/v1/node/invites/redeem`: the exit that serves the page asks to let `addr` in.
/// 404 for an unknown token (the exit rate-limits wrong guesses per source), 410 for a revoked
/// or expired invite, 409 when its uses are spent on other addresses.
pub async fn redeem(
    State(st): State<AppState>,
    NodeAuth(node): NodeAuth,
    JsonBody(req): JsonBody<InviteRedeem>,
) -> ApiResult<Json<Grant>> {
    let hash = token_hash(req.token.trim());
    let addr = req.addr.to_canonical();
    let _w = st.write_lock.lock().await;
    let mut d = load(&st).await?;
    let at = now();
    let Some(i) = d
        .invites
        .iter_mut()
        .find(|i| i.hash == hash && i.exit == node)
    else {
        return Err(ApiErr::not_found("no such invite (check the link)"));
    };
    if i.revoked || i.until <= at {
        return Err(ApiErr::new(
            StatusCode::GONE,
            "gone",
            "this invite was revoked or has expired; ask for a new link",
        ));
    }
    if !i.addrs.iter().any(|a| a.addr == addr) {
        if i.addrs.len() as u32 >= i.uses {
            return Err(ApiErr::conflict(format!(
                "this link was already used from {} address(es), its limit; ask for a new link",
                i.uses
            )));
        }
        i.addrs.push(InvitedAddr { addr, added_at: at });
        tracing::info!(invite = i.id, name = %i.name, %addr, "invite redeemed");
    }
    let g = Grant {
        rule: i.rule,
        addr,
        until: i.until,
        name: i.name.clone(),
        invite: i.id,
        port: i.port,
    };
    save(&st, &d).await?;
    Ok(Json(g))
}
