//! The invite page: plain HTTP on `--invite-port`, `GET /i/TOKEN`.
//!
//! Why plain HTTP: the exit has no domain, so no certificate a browser trusts; a self-signed one
//! would show a warning that a friend on a TV cannot click through. What the page protects is a
//! 256-bit single-purpose token that only adds the requesting address to one port's allow-list
//! for a limited time and a limited number of addresses; it is stored hashed at the coordinator
//! and redeemed over the exit's authenticated node channel. An eavesdropper on the friend's path
//! who replays it could add their own address only while uses are left (and the owner sees it
//! in `invite list`, the audit log and the report, and can revoke it). Wrong tokens are
//! rate-limited per source (an IPv4 address, or an IPv6 /64: one host has a whole /64 to choose
//! from), so guessing is hopeless twice over; and checks reach the coordinator at most at
//! [`CHECKS_PER_SEC`] whatever the number of sources, so a flood of well-formed tokens from a
//! botnet cannot load it.
//!
//! Grants (addresses let in, with their end) come from the coordinator: at once from a redeem,
//! and every [`GRANTS_POLL`] in full, so revoking an invite takes its addresses out within that
//! time. The publisher puts them into per-rule nftables sets with element timeouts.

use anyhow::Result;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::Html;
use homeport_node::coordinator::Api;
use homeport_proto::invite::{Grant, InviteRedeem, PATH_NODE_INVITE_REDEEM, PATH_NODE_INVITES};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
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
/// Sources remembered for the rate limit at most (a flood of sources cannot grow it).
const WRONG_SOURCES: usize = 65_536;
/// Token checks sent to the coordinator per second at most, from all sources together (with a
/// burst of [`CHECKS_BURST`]): friends open a link now and then; more is an attack.
pub const CHECKS_PER_SEC: f64 = 5.0;
pub const CHECKS_BURST: f64 = 20.0;

/// What the wrong-token limit counts by: an IPv4 address, an IPv6 /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Wrong tokens per source: at most [`WRONG_PER_SOURCE`] per [`WRONG_WINDOW`], in a table of
/// at most [`WRONG_SOURCES`].
#[derive(Default)]
pub struct WrongTries {
    by_source: HashMap<IpAddr, (u32, Instant)>,
}

impl WrongTries {
    /// Whether `ip` used up its tries.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> bool {
        self.by_source
            .get(&source_key(ip))
            .is_some_and(|(n, since)| {
                *n >= WRONG_PER_SOURCE && now.duration_since(*since) < WRONG_WINDOW
            })
    }

    /// `ip` sent a wrong token.
    pub fn record(&mut self, ip: IpAddr, now: Instant) {
        let w = &mut self.by_source;
        if w.len() >= WRONG_SOURCES {
            w.retain(|_, (_, since)| now.duration_since(*since) < WRONG_WINDOW);
            if w.len() >= WRONG_SOURCES {
                // Full of live entries: a flood from more sources than the table holds. The
                // global check rate still bounds what reaches the coordinator.
                w.clear();
            }
        }
        let e = w.entry(source_key(ip)).or_insert((0, now));
        if now.duration_since(e.1) >= WRONG_WINDOW {
            *e = (0, now);
        }
        e.0 += 1;
    }
}

/// A token bucket: [`CHECKS_PER_SEC`], bursts of [`CHECKS_BURST`].
pub struct CheckRate {
    tokens: f64,
    at: Instant,
}

impl CheckRate {
    pub fn new(now: Instant) -> CheckRate {
        CheckRate {
            tokens: CHECKS_BURST,
            at: now,
        }
    }

    /// Takes one check if the rate allows it now.
    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + dt * CHECKS_PER_SEC).min(CHECKS_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Inner {
    /// The exit node's calls to the coordinator (None until it has registered).
    api: watch::Receiver<Option<Api>>,
    grants: watch::Sender<Vec<Grant>>,
    wrong: Mutex<WrongTries>,
    checks: Mutex<CheckRate>,
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
    if inner.wrong.lock().unwrap().blocked(ip, now) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            page(
                "Too many tries",
                "Too many wrong links from this address. Wait ten minutes and open the link you were sent again.",
            ),
        );
    }
    let wrong = |inner: &Inner| inner.wrong.lock().unwrap().record(ip, now);
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
    let Some(api) = inner.api.borrow().clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            page(
                "Not ready",
                "The server is starting. Try again in a minute.",
            ),
        );
    };
    if !inner.checks.lock().unwrap().take(now) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            page("Busy", "The server is busy. Try again in a minute."),
        );
    }
    let res = async {
        let r = api
            .request(reqwest::Method::POST, PATH_NODE_INVITE_REDEEM)
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
    api: watch::Receiver<Option<Api>>,
    grants: watch::Sender<Vec<Grant>>,
    stop: CancellationToken,
) -> Result<()> {
    let inner = Arc::new(Inner {
        api,
        grants,
        wrong: Mutex::new(WrongTries::default()),
        checks: Mutex::new(CheckRate::new(Instant::now())),
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
    api: watch::Receiver<Option<Api>>,
    grants: watch::Sender<Vec<Grant>>,
    stop: CancellationToken,
) {
    loop {
        let current = api.borrow().clone();
        if let Some(api) = current {
            let r = async {
                let r = api
                    .request(reqwest::Method::GET, PATH_NODE_INVITES)
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
    use super::*;

    #[test]
    fn wrong_tokens_are_limited_per_ipv4_address_and_per_ipv6_64() {
        let now = Instant::now();
        let mut w = WrongTries::default();
        // A host rotating through its /64 (2^64 addresses) is one source.
        for i in 0..WRONG_PER_SOURCE {
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            assert!(!w.blocked(ip, now));
            w.record(ip, now);
        }
        assert!(w.blocked("2001:db8:1:2:ffff::9".parse().unwrap(), now));
        assert!(!w.blocked("2001:db8:1:3::1".parse().unwrap(), now));
        // IPv4: per address (and a v4-mapped v6 is that address).
        for _ in 0..WRONG_PER_SOURCE {
            w.record("198.51.100.7".parse().unwrap(), now);
        }
        assert!(w.blocked("::ffff:198.51.100.7".parse().unwrap(), now));
        assert!(!w.blocked("198.51.100.8".parse().unwrap(), now));
        // Forgiven after the window.
        assert!(!w.blocked("198.51.100.7".parse().unwrap(), now + WRONG_WINDOW));
        // A flood of sources does not grow the table past its bound.
        for i in 0..(WRONG_SOURCES as u32 + 10) {
            w.record(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(w.by_source.len() <= WRONG_SOURCES);
    }

    #[test]
    fn checks_reach_the_coordinator_at_a_bounded_rate_whatever_the_sources() {
        let t = Instant::now();
        let mut r = CheckRate::new(t);
        let burst = (0..1000).filter(|_| r.take(t)).count();
        assert_eq!(burst, CHECKS_BURST as usize);
        // A minute of flood lets through the rate, not the flood.
        let mut passed = 0;
        for ms in 0..60_000u64 {
            let now = t + Duration::from_millis(ms);
            passed += (0..10).filter(|_| r.take(now)).count();
        }
        let want = (60.0 * CHECKS_PER_SEC) as usize;
        assert!((want - 1..=want + 1).contains(&passed), "{passed}");
        // Quiet again: a friend's check passes at once.
        assert!(r.take(t + Duration::from_secs(120)));
    }

    #[test]
    fn until_in_plain_words() {
        assert_eq!(
            super::plain_until(1_798_574_400),
            "Tuesday 29 December 2026 at 20:00 UTC"
        );
    }
}
