//! The HTTP API: node endpoints, admin endpoints, OpenAPI. `app(state)` is the whole router; the
//! HTTPS listener and the admin unix socket both serve it (the socket marks its requests
//! [`LocalAdmin`] so they need no token).

use crate::challenge::Redeem;
use crate::error::{ApiErr, ApiResult};
use crate::mesh::NodeRec;
use crate::state::AppState;
use crate::store::now;
use axum::body::{Body, Bytes};
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Request, State,
};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use homeport_proto::api::{
    self, AuthKeyCreate, AuthKeyCreated, AuthKeyInfo, EndpointReport, NodeInfo, ProbeAsk,
    RegisterRequest, RegisterResponse,
};
use homeport_proto::map::MapMessage;
use homeport_proto::policy::Policy;
use homeport_proto::publish::{Guards, PublishProto, PublishRequest, PublishRule};
use homeport_proto::register::{self, RegisterChallenge};
use homeport_proto::status;
use homeport_proto::{CAPABILITY_VERSION, NodeId, NodeName};
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use std::convert::Infallible;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Largest accepted request body. Every legitimate body (a policy with hundreds of rules, an
/// endpoint report) is far smaller.
pub const MAX_BODY: usize = 64 * 1024;

/// How often an idle map stream gets a keepalive line: below [`homeport_proto::map::MAP_KEEPALIVE_SECS`]
/// so that network delay never makes a node miss one.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);

pub use homeport_proto::api::MAX_ENDPOINTS;

/// Marks a request that came over the local admin socket (trusted by file permissions).
#[derive(Debug, Clone, Copy)]
pub struct LocalAdmin;

pub fn app(state: AppState) -> Router {
    let admin = Router::new()
        .route(
            api::PATH_ADMIN_AUTHKEYS,
            post(authkey_create).get(authkey_list),
        )
        .route(
            &format!("{}/{{id}}", api::PATH_ADMIN_AUTHKEYS),
            delete(authkey_revoke),
        )
        .route(api::PATH_ADMIN_NODES, get(node_list))
        .route(
            &format!("{}/{{name}}", api::PATH_ADMIN_NODES),
            delete(node_remove),
        )
        .route(api::PATH_ADMIN_PUBLISH, post(publish_add).get(publish_list))
        .route(
            &format!("{}/{{id}}", api::PATH_ADMIN_PUBLISH),
            delete(publish_remove),
        )
        .route(api::PATH_ADMIN_POLICY, get(policy_get).put(policy_set))
        .merge(crate::routes::admin_routes())
        .route(
            homeport_proto::device::PATH_ADMIN_DEVICES,
            post(crate::devices::add).get(crate::devices::list),
        )
        .route(
            &format!("{}/{{name}}", homeport_proto::device::PATH_ADMIN_DEVICES),
            delete(crate::devices::remove),
        )
        .route(
            status::PATH_ADMIN_OVERVIEW,
            get(crate::dashboard::live::overview),
        )
        .route(
            homeport_proto::exit::PATH_ADMIN_EXITS,
            get(crate::exits::list),
        )
        .route(
            homeport_proto::invite::PATH_ADMIN_INVITES,
            post(crate::invites::create).get(crate::invites::list),
        )
        .route(
            &format!("{}/{{id}}", homeport_proto::invite::PATH_ADMIN_INVITES),
            delete(crate::invites::revoke),
        )
        // Every admin route needs an admin, whatever its handler takes: a route added later
        // cannot forget it.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ));
    Router::new()
        .route(api::PATH_CHALLENGE, post(challenge))
        .route(api::PATH_REGISTER, post(register))
        .route(api::PATH_MAP, get(map_stream))
        .route(api::PATH_ENDPOINTS, post(endpoints))
        .route(api::PATH_PROBE, post(probe))
        .route(
            homeport_proto::routes::PATH_ROUTES,
            post(crate::routes::report),
        )
        .route(
            status::PATH_NODE_STATUS,
            post(crate::dashboard::live::node_status),
        )
        .route(
            status::PATH_EXIT_STATUS,
            post(crate::dashboard::live::exit_status),
        )
        .route(
            homeport_proto::exit::PATH_EXIT_ANNOUNCE,
            post(crate::exits::announce),
        )
        .route(
            homeport_proto::invite::PATH_NODE_INVITE_REDEEM,
            post(crate::invites::redeem),
        )
        .route(
            homeport_proto::invite::PATH_NODE_INVITES,
            get(crate::invites::grants),
        )
        .route(api::PATH_RELAY_TCP, get(relay_tcp))
        .route(api::PATH_OPENAPI, get(openapi))
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// The router for the admin unix socket: same routes, no token needed.
pub fn local_app(state: AppState) -> Router {
    app(state).layer(axum::Extension(LocalAdmin))
}

async fn record(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let t = Instant::now();
    let resp = next.run(req).await;
    let secs = t.elapsed().as_secs_f64();
    st.metrics.record(&route, resp.status().as_u16(), secs);
    tracing::debug!(%method, route, status = resp.status().as_u16(), secs, "request");
    resp
}

async fn not_found(method: Method, uri: Uri) -> ApiErr {
    ApiErr::not_found(format!(
        "no endpoint {method} {}; the API is described at GET {}",
        uri.path(),
        api::PATH_OPENAPI
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiErr {
    ApiErr::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not accepted on {}; see GET {}",
            uri.path(),
            api::PATH_OPENAPI
        ),
    )
}

// ---- extractors ----

/// A JSON body whose every failure is an [`ApiErr`]: 413 over [`MAX_BODY`], 400 naming the field
/// otherwise. The content type is not required.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiErr;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiErr> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiErr::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("request body is larger than {MAX_BODY} bytes"),
                )
            } else {
                ApiErr::bad_request(r.body_text())
            }
        })?;
        // Every request body of this API is a JSON object; serde would also take an array as
        // the fields of a struct in order (`[]` as an empty policy), which the spec forbids.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiErr::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "expected a JSON object as the request body".to_string(),
            ));
        }
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(rej) => Err(ApiErr::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                rej.body_text(),
            )),
        }
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, tok) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(tok.trim())
        .filter(|t| !t.is_empty())
}

/// The node making the request, from its credential.
pub struct NodeAuth(pub NodeId);

impl FromRequestParts<AppState> for NodeAuth {
    type Rejection = ApiErr;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiErr> {
        let tok = bearer(parts).ok_or_else(|| {
            ApiErr::unauthorized(
                "missing `Authorization: Bearer <node credential>` (the credential comes from register)",
            )
        })?;
        match st.store.node_by_credential(tok).await? {
            Some(id) => Ok(NodeAuth(id)),
            None => Err(ApiErr::unauthorized(
                "unknown node credential: the node was removed or registered again; register with an auth key",
            )),
        }
    }
}

/// An admin: over the local socket, or with the admin token.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiErr;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiErr> {
        if parts.extensions.get::<LocalAdmin>().is_some() {
            return Ok(Admin);
        }
        let tok = bearer(parts).ok_or_else(|| {
            ApiErr::unauthorized(
                "missing `Authorization: Bearer <admin token>` (the coordinator wrote it to <state-dir>/admin.token on its first start)",
            )
        })?;
        if st.admin_token_hash.as_deref() == Some(api::token_hash(tok).as_str()) {
            Ok(Admin)
        } else {
            Err(ApiErr::unauthorized("wrong admin token"))
        }
    }
}

async fn require_admin(_: Admin, req: Request, next: Next) -> Response {
    next.run(req).await
}

// ---- node API ----

async fn challenge(State(st): State<AppState>) -> Json<RegisterChallenge> {
    use rand::RngCore;
    let mut b = [0u8; register::CHALLENGE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut b);
    st.challenges
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .issue(b, Instant::now());
    Json(RegisterChallenge {
        challenge: register::encode_challenge(&b),
        coordinator_key: st.identity.public_key(),
        expires_in: register::CHALLENGE_TTL_SECS,
    })
}

/// Checks that the caller holds the private key of `req.public_key` (401 otherwise), consuming
/// the challenge either way.
fn check_proof(st: &AppState, req: &RegisterRequest) -> ApiResult<()> {
    let (Some(ch), Some(_)) = (req.challenge.as_deref(), req.proof.as_deref()) else {
        return Err(ApiErr::new(
            StatusCode::UNAUTHORIZED,
            "bad_proof",
            format!(
                "challenge, proof: registration must prove possession of the node's private key: \
                 get a challenge from POST {} and send it with `proof` (capability version {} or later; \
                 update the node)",
                api::PATH_CHALLENGE,
                CAPABILITY_VERSION
            ),
        ));
    };
    let bad_challenge =
        |detail: String| ApiErr::new(StatusCode::UNAUTHORIZED, "bad_challenge", detail);
    let bytes = register::decode_challenge(ch).map_err(|e| bad_challenge(e.to_string()))?;
    let redeemed = st
        .challenges
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .redeem(&bytes, Instant::now());
    match redeemed {
        Redeem::Ok => {}
        Redeem::Unknown => {
            return Err(bad_challenge(format!(
                "challenge: unknown or already used; each challenge from POST {} works once",
                api::PATH_CHALLENGE
            )));
        }
        Redeem::Expired => {
            return Err(bad_challenge(format!(
                "challenge: expired (a challenge is valid for {} s); get a new one from POST {}",
                register::CHALLENGE_TTL_SECS,
                api::PATH_CHALLENGE
            )));
        }
    }
    register::verify(st.identity.secret(), &bytes, req)
        .map_err(|e| ApiErr::new(StatusCode::UNAUTHORIZED, "bad_proof", e.to_string()))
}

async fn register(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> ApiResult<Json<RegisterResponse>> {
    check_proof(&st, &req)?;
    let name = NodeName::sanitize(&req.hostname).ok_or_else(|| {
        ApiErr::bad_request(format!(
            "hostname: {:?} has no usable characters; use letters, digits and '-'",
            req.hostname.chars().take(80).collect::<String>()
        ))
    })?;
    let (v4, v6) = {
        let m = st.mesh();
        (m.prefix_v4, m.prefix_v6)
    };
    let _w = st.write_lock.lock().await;
    let reg = st
        .store
        .register(
            &req.authkey,
            req.public_key,
            name,
            v4,
            v6,
            req.previous_ipv4,
        )
        .await?;
    let mut rec = reg.node;
    {
        let mut mesh = st.mesh();
        if let Some(old) = mesh.node(rec.id) {
            rec.online = old.online;
            rec.last_seen = old.last_seen;
            rec.endpoints = old.endpoints.clone();
            rec.routes = old.routes.clone();
        }
        mesh.upsert_node(rec.clone());
    }
    tracing::info!(node = %rec.id, name = %rec.name, key = %rec.public_key.short(), ipv4 = %rec.addrs.ipv4, again = reg.existing, "node registered");
    Ok(Json(RegisterResponse {
        node_id: rec.id,
        name: rec.name,
        addrs: rec.addrs,
        prefix_v4: v4,
        prefix_v6: v6,
        credential: reg.credential,
        capver: CAPABILITY_VERSION,
    }))
}

/// Ends the node's online state when its stream body is dropped (client gone, replaced, closed).
struct StreamGuard {
    state: AppState,
    id: NodeId,
    generation: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let at = now();
        let ended = self.state.mesh().disconnect(self.id, self.generation, at);
        if ended {
            tracing::info!(node = %self.id, "map stream closed");
            self.state.note_stream(self.id, false, at);
        }
    }
}

struct StreamState {
    session: std::sync::Arc<crate::session::Session>,
    keepalive: tokio::time::Interval,
    last_version: u64,
    _guard: StreamGuard,
}

async fn map_stream(State(st): State<AppState>, NodeAuth(id): NodeAuth) -> ApiResult<Response> {
    let at = now();
    let conn = st
        .mesh()
        .connect(id, at)
        .ok_or_else(|| ApiErr::unauthorized("the node was removed"))?;
    st.note_stream(id, true, at);
    tracing::info!(node = %id, "map stream opened");
    let mut keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + KEEPALIVE_EVERY,
        KEEPALIVE_EVERY,
    );
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = StreamState {
        session: conn.session,
        keepalive,
        last_version: 0,
        _guard: StreamGuard {
            state: st.clone(),
            id,
            generation: conn.generation,
        },
    };
    let body = futures::stream::unfold(state, |mut s| async move {
        let msg = tokio::select! {
            // Whatever piled up while the connection was busy leaves as one merged message.
            m = s.session.next() => m?,
            _ = s.keepalive.tick() => MapMessage { version: s.last_version, ..Default::default() },
        };
        s.last_version = s.last_version.max(msg.version);
        s.keepalive.reset();
        let mut line = serde_json::to_vec(&msg).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, Infallible>(Bytes::from(line)), s))
    });
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

async fn endpoints(
    State(st): State<AppState>,
    NodeAuth(id): NodeAuth,
    JsonBody(rep): JsonBody<EndpointReport>,
) -> ApiResult<StatusCode> {
    st.limits.endpoint_report(id).map_err(|wait| {
        ApiErr::too_many(
            format!(
                "endpoint reports: at most {} at once and one per {} s after that; retry after the Retry-After seconds",
                crate::limits::ENDPOINT_BURST,
                crate::limits::ENDPOINT_EVERY.as_secs()
            ),
            wait,
        )
    })?;
    if rep.endpoints.len() > MAX_ENDPOINTS {
        return Err(ApiErr::bad_request(format!(
            "endpoints: {} candidates reported; at most {MAX_ENDPOINTS} are accepted",
            rep.endpoints.len()
        )));
    }
    for (i, e) in rep.endpoints.iter().enumerate() {
        if e.kind == homeport_proto::map::EndpointKind::Unknown {
            return Err(ApiErr::bad_request(format!(
                "endpoints[{i}].kind: expected \"local\", \"stun\" or \"static\""
            )));
        }
        if let Some(why) = api::endpoint_problem(e.addr) {
            return Err(ApiErr::bad_request(format!(
                "endpoints[{i}]: {} is {why}; expected a unicast address (not unspecified, loopback, multicast or broadcast) and a port 1-65535",
                e.addr
            )));
        }
    }
    let mut eps = rep.endpoints;
    let mut seen = std::collections::HashSet::new();
    eps.retain(|e| seen.insert(*e));
    let _w = st.write_lock.lock().await;
    st.store.set_endpoints(id, &eps).await?;
    st.mesh().set_endpoints(id, eps);
    Ok(StatusCode::NO_CONTENT)
}

async fn probe(
    State(st): State<AppState>,
    NodeAuth(id): NodeAuth,
    JsonBody(ask): JsonBody<ProbeAsk>,
) -> ApiResult<StatusCode> {
    st.limits.probe_ask(id).map_err(|wait| {
        ApiErr::too_many(
            format!(
                "probe asks: at most {} at once and {} per second after that; retry after the Retry-After seconds",
                crate::limits::PROBE_BURST,
                1000 / crate::limits::PROBE_EVERY.as_millis().max(1)
            ),
            wait,
        )
    })?;
    if ask.peer == id {
        // 404, not 400: the body is well formed, there is just no such peer for this node.
        return Err(ApiErr::not_found(format!(
            "peer: node {id} is this node, not one of its peers"
        )));
    }
    let here = {
        let mut mesh = st.mesh();
        let Some(peer) = mesh.node(ask.peer) else {
            return Err(ApiErr::not_found(format!(
                "peer: no node with id {}",
                ask.peer
            )));
        };
        if !mesh.may_talk(id, ask.peer) {
            return Err(ApiErr::forbidden(format!(
                "peer: the access policy lets no traffic flow between this node and node {} ({}) in either direction, so they have no path to open",
                ask.peer, peer.name
            )));
        }
        // An offline peer simply does not hear it; the asker's probes still open its own NAT.
        mesh.probe(id, ask.peer)
    };
    if !here {
        // The peer's stream may be held by another replica.
        let c = crate::replicas::Change {
            probe: Some((id, ask.peer)),
            ..Default::default()
        };
        st.store.announce(&st.store.pool, c).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

// ---- admin API ----

/// Checks tags as policy selectors accept them (`tag:NAME`); a `tag:` prefix is dropped.
pub fn normalize_tags(tags: &[String]) -> ApiResult<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for (i, t) in tags.iter().enumerate() {
        let t = t.as_str();
        let bare = t.strip_prefix("tag:").unwrap_or(t);
        let ok = !bare.is_empty()
            && bare.len() <= 63
            && bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(ApiErr::bad_request(format!(
                "tags[{i}]: invalid tag {t:?}: use 1-63 letters, digits, '-' or '_' (optionally written tag:NAME)"
            )));
        }
        if !out.iter().any(|x| x == bare) {
            out.push(bare.to_string());
        }
    }
    Ok(out)
}

async fn authkey_create(
    _: Admin,
    State(st): State<AppState>,
    JsonBody(req): JsonBody<AuthKeyCreate>,
) -> ApiResult<(StatusCode, Json<AuthKeyCreated>)> {
    let tags = normalize_tags(&req.tags)?;
    let expires_at = match req.expires_secs {
        None => None,
        Some(0) => {
            return Err(ApiErr::bad_request(
                "expires_secs: must be at least 1 (or absent for a key that never expires)",
            ));
        }
        Some(s) if s > api::MAX_EXPIRES_SECS => {
            return Err(ApiErr::bad_request(format!(
                "expires_secs: {s} is more than 100 years; expected 1-{}",
                api::MAX_EXPIRES_SECS
            )));
        }
        Some(s) => Some(now() + s as i64),
    };
    let max_uses = match req.max_uses {
        None => None,
        Some(n @ 1..=api::MAX_AUTHKEY_USES) => Some(n as i64),
        Some(n) => {
            return Err(ApiErr::bad_request(format!(
                "max_uses: {n} is out of range; expected 1-{} (or absent for no limit)",
                api::MAX_AUTHKEY_USES
            )));
        }
    };
    let _w = st.write_lock.lock().await;
    let (id, key) = st
        .store
        .create_authkey(req.reusable, &tags, expires_at, max_uses)
        .await?;
    tracing::info!(id, reusable = req.reusable, ?tags, "auth key created");
    Ok((StatusCode::CREATED, Json(AuthKeyCreated { id, key })))
}

async fn authkey_list(_: Admin, State(st): State<AppState>) -> ApiResult<Json<Vec<AuthKeyInfo>>> {
    let rows = st.store.list_authkeys().await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| AuthKeyInfo {
                id: r.id,
                prefix: r.prefix,
                reusable: r.reusable,
                tags: r.tags,
                created_at: r.created_at,
                expires_at: r.expires_at,
                used: r.used,
                revoked: r.revoked,
                max_uses: r.max_uses.map(|m| m as u64),
                uses: r.uses.max(0) as u64,
            })
            .collect(),
    ))
}

fn parse_id(what: &str, s: &str) -> ApiResult<i64> {
    s.parse::<i64>().ok().filter(|&i| i > 0).ok_or_else(|| {
        ApiErr::bad_request(format!(
            "{what}: {s:?} is not an id; expected a positive integer"
        ))
    })
}

async fn authkey_revoke(
    _: Admin,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = parse_id("id", &id)?;
    let _w = st.write_lock.lock().await;
    if st.store.revoke_authkey(id).await? {
        tracing::info!(id, "auth key revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiErr::not_found(format!("no auth key with id {id}")))
    }
}

pub(crate) fn node_info(n: &NodeRec, at: i64) -> NodeInfo {
    NodeInfo {
        id: n.id,
        name: n.name.clone(),
        public_key: n.public_key,
        addrs: n.addrs,
        tags: n.tags.clone(),
        online: n.online,
        last_seen: if n.online { Some(at) } else { n.last_seen },
        endpoints: n.endpoints.clone(),
        created_at: n.created_at,
    }
}

async fn node_list(_: Admin, State(st): State<AppState>) -> Json<Vec<NodeInfo>> {
    let at = now();
    let mesh = st.mesh();
    let mut v: Vec<NodeInfo> = mesh.nodes().map(|n| node_info(n, at)).collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Json(v)
}

async fn node_remove(
    _: Admin,
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let _w = st.write_lock.lock().await;
    let id = st.mesh().node_by_name(&name).map(|n| n.id).ok_or_else(|| {
        ApiErr::not_found(format!(
            "no node named {name:?}; see `homeport-coordinator nodes`"
        ))
    })?;
    st.store.remove_node(id).await?;
    let dropped = st.mesh().remove_node(id);
    st.live.forget(id);
    tracing::info!(node = %id, name, ?dropped, "node removed; its publish rules were removed with it");
    Ok(StatusCode::NO_CONTENT)
}

/// Checks a publish request against the mesh; the rule's `id` is 0 until stored.
pub fn validate_publish(req: &PublishRequest, mesh: &crate::mesh::Mesh) -> ApiResult<PublishRule> {
    if req.port == 0 {
        return Err(ApiErr::bad_request("port: must be 1-65535"));
    }
    let proto: PublishProto = req
        .proto
        .to_ascii_lowercase()
        .parse()
        .map_err(|e: String| ApiErr::bad_request(format!("proto: {e}")))?;
    let bad_to = || {
        ApiErr::bad_request(format!(
            "to: {:?} is not NODE:PORT (a node name and a port 1-65535, e.g. home:32400)",
            req.to
        ))
    };
    let (tname, tport) = req.to.rsplit_once(':').ok_or_else(bad_to)?;
    let tport: u16 = Some(tport)
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse().ok())
        .filter(|&p| p != 0)
        .ok_or_else(bad_to)?;
    let mut allow = Vec::new();
    for (i, a) in req.allow.iter().enumerate() {
        let a = a.trim();
        let net = a
            .parse::<IpNet>()
            .or_else(|_| a.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                ApiErr::bad_request(format!(
                    "allow[{i}]: invalid CIDR {a:?}: expected an address or a network like 192.0.2.0/24 or 2001:db8::/32"
                ))
            })?;
        allow.push(net.trunc());
    }
    if req.rate_per_minute == Some(0) {
        return Err(ApiErr::bad_request(
            "rate_per_minute: must be at least 1 (or absent for no limit)",
        ));
    }
    if req.max_conns == Some(0) {
        return Err(ApiErr::bad_request(
            "max_conns: must be at least 1 (or absent for no limit)",
        ));
    }
    let countries = |field: &str, v: &[String]| -> ApiResult<Vec<String>> {
        let mut out = Vec::new();
        for (i, c) in v.iter().enumerate() {
            out.push(
                homeport_proto::publish::parse_country(c)
                    .map_err(|e| ApiErr::bad_request(format!("{field}[{i}]: {e}")))?,
            );
        }
        out.sort();
        out.dedup();
        Ok(out)
    };
    let allow_countries = countries("country", &req.country)?;
    let deny_countries = countries("deny_country", &req.deny_country)?;
    let exit = mesh.node_by_name(req.exit.trim()).ok_or_else(|| {
        ApiErr::not_found(format!(
            "exit: no node named {:?}; see `homeport-coordinator nodes`",
            req.exit
        ))
    })?;
    let target = mesh.node_by_name(tname.trim()).ok_or_else(|| {
        ApiErr::not_found(format!(
            "to: no node named {tname:?}; see `homeport-coordinator nodes`"
        ))
    })?;
    Ok(PublishRule {
        id: 0,
        exit: exit.id,
        exit_name: exit.name.clone(),
        proto,
        port: req.port,
        target: target.id,
        target_name: target.name.clone(),
        target_ipv4: target.addrs.ipv4,
        target_ipv6: target.addrs.ipv6,
        target_port: tport,
        guards: Guards {
            allow,
            rate_per_minute: req.rate_per_minute,
            max_conns: req.max_conns,
            countries: allow_countries,
            deny_countries,
        },
    })
}

async fn publish_add(
    _: Admin,
    State(st): State<AppState>,
    JsonBody(req): JsonBody<PublishRequest>,
) -> ApiResult<(StatusCode, Json<PublishRule>)> {
    let _w = st.write_lock.lock().await;
    let rule = validate_publish(&req, &st.mesh())?;
    crate::exits::check_publish(&st, &rule).await?;
    let rule = st.store.add_publish(rule).await?;
    st.mesh().add_publish(rule.clone());
    tracing::info!(id = rule.id, exit = %rule.exit_name, port = rule.port, target = %rule.target_name, "publish rule added");
    Ok((StatusCode::CREATED, Json(rule)))
}

async fn publish_list(_: Admin, State(st): State<AppState>) -> Json<Vec<PublishRule>> {
    Json(st.mesh().publish_rules().cloned().collect())
}

async fn publish_remove(
    _: Admin,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = parse_id("id", &id)?;
    let _w = st.write_lock.lock().await;
    if !st.store.remove_publish(id).await? {
        return Err(ApiErr::not_found(format!("no publish rule with id {id}")));
    }
    st.mesh().remove_publish(id);
    tracing::info!(id, "publish rule removed");
    Ok(StatusCode::NO_CONTENT)
}

async fn policy_get(_: Admin, State(st): State<AppState>) -> Json<Policy> {
    Json(
        st.mesh()
            .policy()
            .cloned()
            .unwrap_or(Policy { rules: vec![] }),
    )
}

async fn policy_set(
    _: Admin,
    State(st): State<AppState>,
    JsonBody(p): JsonBody<Policy>,
) -> ApiResult<Json<Policy>> {
    p.validate().map_err(ApiErr::bad_request)?;
    let _w = st.write_lock.lock().await;
    st.store.set_policy(&p).await?;
    st.mesh().set_policy(Some(p.clone()));
    tracing::info!(rules = p.rules.len(), "policy replaced");
    Ok(Json(p))
}

/// `GET /api/v1/node/relay` with `Upgrade: homeport-relay`: the relay over this TLS connection,
/// for nodes whose network blocks UDP. Authentication happens inside (the relay BIND proves the
/// node key, as over UDP); a client that never binds gets nothing forwarded.
async fn relay_tcp(State(st): State<AppState>, mut req: Request) -> Response {
    let wants = req
        .headers()
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(api::RELAY_UPGRADE));
    if !wants {
        return ApiErr::bad_request(format!(
            "this endpoint needs `Connection: Upgrade` and `Upgrade: {}`",
            api::RELAY_UPGRADE
        ))
        .into_response();
    }
    let Some(relay) = st.mesh().relay() else {
        return ApiErr::not_found("no relay runs on this coordinator".to_string()).into_response();
    };
    let Some(slot) = relay.tcp_slot() else {
        let mut e = ApiErr::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "relay_full",
            format!(
                "the TCP relay serves at most {} connections and all are in use; retry later or use the UDP relay",
                crate::relay::MAX_TCP_CLIENTS
            ),
        );
        e.retry_after = Some(30);
        return e.into_response();
    };
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on.await {
            Ok(up) => {
                relay
                    .serve_stream(hyper_util::rt::TokioIo::new(up), slot)
                    .await
            }
            Err(e) => tracing::debug!(error = %e, "relay upgrade failed"),
        }
    });
    Response::builder()
        .status(axum::http::StatusCode::SWITCHING_PROTOCOLS)
        .header(axum::http::header::CONNECTION, "upgrade")
        .header(axum::http::header::UPGRADE, api::RELAY_UPGRADE)
        .body(axum::body::Body::empty())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_checked() {
        assert_eq!(
            normalize_tags(&["tag:a".into(), "a".into(), "b_c".into()]).unwrap(),
            vec!["a", "b_c"]
        );
        let e = normalize_tags(&["ok".into(), "no way".into()]).unwrap_err();
        assert!(e.detail.contains("tags[1]"), "{}", e.detail);
    }
}
