//! The invite page: plain HTTP on `--invite-port`, `GET /i/TOKEN`.
//!
//! Why plain HTTP: the exit has no domain, so no certificate a browser trusts; a self-signed one
//! would show a warning that a friend on a TV cannot click through. What the page protects is a
//! 256-bit single-purpose token that only adds the requesting address to one port's allow-list
//! for a limited time and a limited number of addresses; it is stored hashed at the coordinator
//! and redeemed over the exit's authenticated node channel. An eavesdropper on the friend's path
//! who replays it could add their own address only while uses are left (and the owner sees it
//! in `invite list`, the audit log and the report, and can revoke it). Wrong tokens are
//! rate-limited per source, so guessing is hopeless twice over.
//!
//! Grants (addresses let in, with their end) come from the coordinator: at once from a redeem,
//! and every [`GRANTS_POLL`] in full, so revoking an invite takes its addresses out within that
//! time. The publisher puts them into per-rule nftables sets with element timeouts.

use anyhow::Result;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::Html;
use homeport_node::state::active_registration;
use homeport_proto::invite::{Grant, InviteRedeem, PATH_NODE_INVITE_REDEEM, PATH_NODE_INVITES};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the grants are fetched in full (revocations take effect within this).
pub const GRANTS_POLL: Duration = Duration::from_secs(3);
/// Wrong tokens one source may try per [`WRONG_WINDOW`]: a friend mistyping a link needs a few,
/// a guesser millions.
pub const WRONG_PER_SOURCE: u32 = 5;
pub const WRONG_WINDOW: Duration = Duration::from_secs(600);
/// Sources remembered for the rate limit at most (a flood of spoofed sources cannot grow it).
const WRONG_SOURCES: usize = 65_536;

struct Inner {
    state_dir: PathBuf,
    grants: watch::Sender<Vec<Grant>>,
    wrong: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Requests to the coordinator end within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn client(pin: &str) -> Result<reqwest::Client> {
    homeport_node::state::coordinator_client(pin, Some(REQUEST_TIMEOUT))
}

/// When the grant ends, in plain words: `Tuesday 29 December 2026 at 20:00 UTC`.
pub fn plain_until(t: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(t) {
        Ok(d) => format!(
            "{} {} {} {} at {:02}:{:02} UTC",
            d.weekday(),
            d.day(),
            d.month(),
            d.year(),
            d.hour(),
            d.minute()
        ),
        Err(_) => t.to_string(),
    }
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title></head><body style=\"font-family:sans-serif;max-width:40em;margin:2em auto;font-size:1.3em\">\
         <h1>{title}</h1><p>{body}</p></body></html>\n"
    ))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn open_link(
    State(inner): State<Arc<Inner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
) -> (StatusCode, Html<String>) {
    let ip = peer.ip().to_canonical();
    let now = Instant::now();
    {
        let w = inner.wrong.lock().unwrap();
        if let Some((n, since)) = w.get(&ip)
            && *n >= WRONG_PER_SOURCE
            && now.duration_since(*since) < WRONG_WINDOW
        {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                page(
                    "Too many tries",
                    "Too many wrong links from this address. Wait ten minutes and open the link you were sent again.",
                ),
            );
        }
    }
    let wrong = |inner: &Inner| {
        let mut w = inner.wrong.lock().unwrap();
        if w.len() >= WRONG_SOURCES {
            w.retain(|_, (_, since)| now.duration_since(*since) < WRONG_WINDOW);
            if w.len() >= WRONG_SOURCES {
                w.clear();
            }
        }
        let e = w.entry(ip).or_insert((0, now));
        if now.duration_since(e.1) >= WRONG_WINDOW {
            *e = (0, now);
        }
        e.0 += 1;
    };
    // A token is 43 characters of base64url; anything else never reaches the coordinator.
    if token.len() != 43
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        wrong(&inner);
        return (
            StatusCode::NOT_FOUND,
            page(
                "Link not valid",
                "This link is not valid. Check that it was copied completely.",
            ),
        );
    }
    let Some(reg) = active_registration(&inner.state_dir) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            page(
                "Not ready",
                "The server is starting. Try again in a minute.",
            ),
        );
    };
    let res = async {
        let r = client(&reg.pin)?
            .post(format!("{}{PATH_NODE_INVITE_REDEEM}", reg.coordinator))
            .bearer_auth(&reg.credential)
            .json(&InviteRedeem {
                token: token.clone(),
                addr: ip,
            })
            .send()
            .await?;
        let st = r.status();
        if st.is_success() {
            Ok::<_, anyhow::Error>(Ok(r.json::<Grant>().await?))
        } else {
            Ok(Err(st))
        }
    }
    .await;
    match res {
        Ok(Ok(g)) => {
            inner.grants.send_modify(|v| {
                if !v.contains(&g) {
                    v.push(g.clone());
                    v.sort();
                }
            });
            tracing::info!(name = %g.name, addr = %ip, rule = g.rule, "invite opened");
            let days = ((g.until - homeport_proto_now()) as f64 / 86_400.0).round() as i64;
            (
                StatusCode::OK,
                page(
                    &format!("Welcome, {}", esc(&g.name)),
                    &format!(
                        "You are in. This address ({ip}) may now connect to port {} of this server until <b>{}</b> ({} days from now).<br><br>\
                         Open your app now. If your address changes, open this link again.",
                        g.port,
                        plain_until(g.until),
                        days.max(0)
                    ),
                ),
            )
        }
        Ok(Err(st)) if st == StatusCode::NOT_FOUND => {
            wrong(&inner);
            (
                StatusCode::NOT_FOUND,
                page(
                    "Link not valid",
                    "This link is not valid. Check that it was copied completely.",
                ),
            )
        }
        Ok(Err(st)) if st == StatusCode::GONE => (
            StatusCode::GONE,
            page(
                "Link expired",
                "This link was withdrawn or has expired. Ask for a new one.",
            ),
        ),
        Ok(Err(st)) if st == StatusCode::CONFLICT => (
            StatusCode::CONFLICT,
            page(
                "Link used up",
                "This link was already used from as many places as it allows. Ask for a new one.",
            ),
        ),
        Ok(Err(st)) => {
            tracing::warn!(status = %st, "invite redeem refused");
            (
                StatusCode::BAD_GATEWAY,
                page(
                    "Try again later",
                    "The server could not check the link just now. Try again in a minute.",
                ),
            )
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "invite redeem failed");
            (
                StatusCode::BAD_GATEWAY,
                page(
                    "Try again later",
                    "The server could not check the link just now. Try again in a minute.",
                ),
            )
        }
    }
}

fn homeport_proto_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Serves the invite page on `port` (all addresses) until `stop`.
pub async fn serve(
    port: u16,
    state_dir: PathBuf,
    grants: watch::Sender<Vec<Grant>>,
    stop: CancellationToken,
) -> Result<()> {
    let inner = Arc::new(Inner {
        state_dir,
        grants,
        wrong: Mutex::new(HashMap::new()),
    });
    let app = axum::Router::new()
        .route("/i/{token}", axum::routing::get(open_link))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                page("Nothing here", "Open the invite link you were sent."),
            )
        })
        .with_state(inner);
    let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    sock.set_only_v6(false)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())
        .map_err(|e| anyhow::anyhow!("--invite-port {port}: cannot listen: {e}"))?;
    sock.listen(128)?;
    sock.set_nonblocking(true)?;
    let l = tokio::net::TcpListener::from_std(sock.into())?;
    tracing::info!(port, "invite pages served");
    axum::serve(l, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(stop.cancelled_owned())
        .await?;
    Ok(())
}

/// Fetches this exit's grants every [`GRANTS_POLL`] until `stop` (the coordinator is the truth:
/// revoked and expired ones go).
pub async fn follow_grants(
    state_dir: PathBuf,
    grants: watch::Sender<Vec<Grant>>,
    stop: CancellationToken,
) {
    loop {
        if let Some(reg) = active_registration(&state_dir) {
            let r = async {
                let r = client(&reg.pin)?
                    .get(format!("{}{PATH_NODE_INVITES}", reg.coordinator))
                    .bearer_auth(&reg.credential)
                    .send()
                    .await?
                    .error_for_status()?;
                Ok::<_, anyhow::Error>(r.json::<Vec<Grant>>().await?)
            }
            .await;
            match r {
                Ok(mut v) => {
                    v.sort();
                    grants.send_if_modified(|cur| {
                        if *cur != v {
                            *cur = v;
                            true
                        } else {
                            false
                        }
                    });
                }
                Err(e) => tracing::debug!(error = %format!("{e:#}"), "fetching invite grants"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(GRANTS_POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn until_in_plain_words() {
        assert_eq!(
            super::plain_until(1_798_574_400),
            "Tuesday 29 December 2026 at 20:00 UTC"
        );
    }
}
