//! The web dashboard: static pages embedded in the binary, served over plain HTTP on this
//! machine's mesh address only, in front of the same admin API (no second backend).
//!
//! Why plain HTTP on the mesh address: the coordinator shares the VPS with the exit, whose
//! node has a mesh address on its TUN. A browser on any of the owner's mesh devices reaches
//! `http://MESH_IP:PORT/` through WireGuard, which already encrypts and authenticates both
//! ends, so there is no certificate to warn about and nothing new on the public interface.
//! Who on the mesh reaches it is the access policy's decision, and then the admin token:
//!
//! - Listens only on local addresses inside the mesh prefixes, and (re)binds when they appear
//!   or change (the exit's TUN comes and goes with it). Without such an address there is no
//!   listener at all.
//! - Accepts connections only from mesh sources: a public host that routes a packet to the mesh
//!   address over the VPS's public interface is closed at once.
//! - `Host` must be the address it listens on (no DNS rebinding from a web page).
//! - `POST /dashboard/login` exchanges the admin token (in the body, never in a URL) for a
//!   random session id in an `HttpOnly; SameSite=Strict` cookie, and a CSRF token the page
//!   keeps in memory and sends as `X-Homeport-CSRF` on every API call that changes anything.
//! - `/api/v1/admin/*` and the OpenAPI document are the admin API's own router, reached only
//!   with a valid session.

pub mod live;

use crate::state::AppState;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Default TCP port of the dashboard on the mesh address.
pub const DEFAULT_PORT: u16 = 8480;
/// How often the local addresses are checked for a (new) mesh address: the exit's TUN appears
/// a few seconds after both daemons start.
const REBIND_EVERY: Duration = Duration::from_secs(2);
/// A session lasts a working day; logging in again needs the token again.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (the oldest goes first): a handful of browsers is the real use.
const MAX_SESSIONS: usize = 64;
/// A wrong token costs this long: guessing a 256-bit token is hopeless anyway, this keeps a
/// confused script from filling the log.
const LOGIN_FAIL_DELAY: Duration = Duration::from_millis(500);
pub const SESSION_COOKIE: &str = "hp_session";
pub const CSRF_HEADER: &str = "x-homeport-csrf";

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

struct Session {
    csrf: String,
    expires: Instant,
}

#[derive(Clone)]
struct Dash {
    st: AppState,
    /// By the hash of the session id.
    sessions: Arc<Mutex<HashMap<String, Session>>>,
}

impl Dash {
    fn session(&self, headers: &HeaderMap) -> Option<String> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let key = homeport_proto::api::token_hash(&id);
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.retain(|_, v| v.expires > now);
        s.get(&key).map(|v| v.csrf.clone())
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The mesh addresses of this machine, if any (the exit's TUN).
pub fn mesh_addrs(st: &AppState) -> Vec<IpAddr> {
    let (v4, v6) = {
        let m = st.mesh();
        (m.prefix_v4, m.prefix_v6)
    };
    let mut out: Vec<IpAddr> = homeport_host::net::interface_addrs()
        .into_iter()
        .filter(|ip| match ip {
            IpAddr::V4(a) => v4.contains(a),
            IpAddr::V6(a) => v6.contains(a),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn is_mesh(st: &AppState, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let m = st.mesh();
    match ip {
        IpAddr::V4(a) => m.prefix_v4.contains(&a),
        IpAddr::V6(a) => m.prefix_v6.contains(&a),
    }
}

/// Serves the dashboard on `port` of every mesh address of this machine until `shutdown`,
/// following the addresses as they come and go. The bound addresses are written to
/// `<state-dir>/dashboard.addr` (one per line) for scripts and tests.
pub async fn serve(
    st: AppState,
    port: u16,
    addr_file: std::path::PathBuf,
    shutdown: CancellationToken,
) {
    let dash = Dash {
        st: st.clone(),
        sessions: Arc::default(),
    };
    let mut bound: Vec<IpAddr> = Vec::new();
    let mut running: Option<CancellationToken> = None;
    loop {
        let want = mesh_addrs(&st);
        if want != bound {
            if let Some(r) = running.take() {
                r.cancel();
            }
            let stop = shutdown.child_token();
            let mut lines = String::new();
            for ip in &want {
                let sa = SocketAddr::new(*ip, port);
                match tokio::net::TcpListener::bind(sa).await {
                    Ok(l) => {
                        tracing::info!(url = %format!("http://{sa}/"), "dashboard listening on the mesh address");
                        lines.push_str(&format!("{sa}\n"));
                        tokio::spawn(serve_on(l, sa, dash.clone(), stop.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(addr = %sa, error = %e, "cannot listen for the dashboard (--dashboard-port)")
                    }
                }
            }
            if want.is_empty() {
                tracing::info!(
                    "no mesh address on this machine (yet): the dashboard waits for the exit's interface"
                );
            }
            let _ = crate::tls::write_private(&addr_file, lines.as_bytes());
            running = Some(stop);
            bound = want;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REBIND_EVERY) => {}
        }
    }
}

async fn serve_on(
    l: tokio::net::TcpListener,
    local: SocketAddr,
    dash: Dash,
    stop: CancellationToken,
) {
    let host = match local {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let app = router(dash.clone(), host);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        };
        if !is_mesh(&dash.st, peer.ip()) {
            // Routed to the mesh address from outside the mesh (the VPS's public side).
            tracing::warn!(%peer, "dashboard: refused a connection from outside the mesh");
            drop(tcp);
            continue;
        }
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            use hyper_util::rt::{TokioIo, TokioTimer};
            let svc = hyper_util::service::TowerToHyperService::new(
                app.layer(axum::Extension(ConnectInfo(peer))),
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

fn router(dash: Dash, host: String) -> Router {
    let api = crate::api::local_app(dash.st.clone());
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { page(STYLE_CSS, "text/css; charset=utf-8") }),
        )
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/session", get(session))
        .fallback_service(api)
        .layer(axum::middleware::from_fn_with_state(dash.clone(), guard))
        .layer(axum::Extension(HostName(host)))
        .with_state(dash)
}

#[derive(Clone)]
struct HostName(String);

fn page(body: &'static str, ctype: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(ctype)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
                ),
            ),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        ],
        body,
    )
        .into_response()
}

fn refuse(status: StatusCode, error: &'static str, detail: &str) -> Response {
    crate::error::ApiErr::new(status, error, detail.to_string()).into_response()
}

/// Every request: the Host check; API paths need a session, and a CSRF token unless they only
/// read; everything else under /api is not served here.
async fn guard(State(dash): State<Dash>, req: Request, next: Next) -> Response {
    let host_ok = req
        .extensions()
        .get::<HostName>()
        .zip(
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok()),
        )
        .is_some_and(|(want, got)| want.0.eq_ignore_ascii_case(got));
    if !host_ok {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_host",
            "open the dashboard by its mesh address (http://MESH_IP:PORT/), not by another name",
        );
    }
    let path = req.uri().path();
    let is_api = path.starts_with("/api/");
    if !is_api {
        return next.run(req).await;
    }
    let admin_api = path.starts_with("/api/v1/admin/") || path == homeport_proto::api::PATH_OPENAPI;
    if !admin_api {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "the dashboard serves only the admin API (/api/v1/admin/...) and the OpenAPI document",
        );
    }
    let Some(csrf) = dash.session(req.headers()) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no dashboard session: log in with the admin token (POST /dashboard/login)",
        );
    };
    let reads = matches!(*req.method(), Method::GET | Method::HEAD);
    if !reads {
        let sent = req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if sent != Some(csrf.as_str()) {
            return refuse(
                StatusCode::FORBIDDEN,
                "csrf",
                "missing or wrong X-Homeport-CSRF header (the dashboard page sends the token it got at login)",
            );
        }
    }
    next.run(req).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

async fn login(State(dash): State<Dash>, body: axum::body::Bytes) -> Response {
    let Ok(Login { token }) = serde_json::from_slice::<Login>(&body) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "expected {\"token\": \"<admin token>\"}",
        );
    };
    let want = dash.st.admin_token_hash.as_deref();
    if want != Some(homeport_proto::api::token_hash(token.trim()).as_str()) {
        tokio::time::sleep(LOGIN_FAIL_DELAY).await;
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong admin token: it is in <state-dir>/admin.token on the VPS (sudo cat /var/lib/homeport-coordinator/admin.token)",
        );
    }
    let id = crate::store::random_token("");
    let csrf = crate::store::random_token("");
    {
        let mut s = dash.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.retain(|_, v| v.expires > now);
        while s.len() >= MAX_SESSIONS {
            let oldest = s
                .iter()
                .min_by_key(|(_, v)| v.expires)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => s.remove(&k),
                None => break,
            };
        }
        s.insert(
            homeport_proto::api::token_hash(&id),
            Session {
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
    }
    tracing::info!("dashboard: logged in");
    let cookie = format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    (
        [(header::SET_COOKIE, cookie)],
        axum::Json(serde_json::json!({ "csrf": csrf })),
    )
        .into_response()
}

async fn logout(State(dash): State<Dash>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        let key = homeport_proto::api::token_hash(&id);
        let mut s = dash.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let ok = s.get(&key).is_some_and(|v| {
            headers.get(CSRF_HEADER).and_then(|h| h.to_str().ok()) == Some(v.csrf.as_str())
        });
        if ok {
            s.remove(&key);
        }
    }
    (
        StatusCode::NO_CONTENT,
        [(
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
        Body::empty(),
    )
        .into_response()
}

/// The CSRF token of the current session (a reload of the page keeps its session).
async fn session(State(dash): State<Dash>, headers: HeaderMap) -> Response {
    match dash.session(&headers) {
        Some(csrf) => axum::Json(serde_json::json!({ "csrf": csrf })).into_response(),
        None => refuse(StatusCode::UNAUTHORIZED, "unauthorized", "not logged in"),
    }
}
