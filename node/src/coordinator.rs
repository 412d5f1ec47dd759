//! The coordinator client: registration with the key proof, the map stream (reconnected with
//! backoff, its messages handed to the daemon as [`StreamEvent`]s), and the node's calls to the
//! coordinator's API (endpoint reports, probe requests, the status report, the relay over TCP).
//!
//! It owns the pinned HTTPS client, the URL and the credential; it knows nothing of the daemon.

use crate::replicas::{Replica, Replicas};
use crate::state::Registration;
use anyhow::{Context, Result, bail};
use homeport_proto::api::{
    ApiError, EndpointReport, PATH_CHALLENGE, PATH_ENDPOINTS, PATH_MAP, PATH_PROBE, PATH_REGISTER,
    PATH_RELAY_TCP, ProbeAsk, RELAY_UPGRADE, RegisterRequest, RegisterResponse,
};
use homeport_proto::map::{Endpoint, MAP_KEEPALIVE_SECS, MapMessage};
use homeport_proto::register::RegisterChallenge;
use homeport_proto::{CAPABILITY_VERSION, NodeId, PrivateKey};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Reconnect backoff: first retry after 500 ms, doubling up to 30 s. Short enough that a
/// restarted coordinator is found within seconds, long enough not to hammer a dead one.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// After a map stream that was up ends (the coordinator restarted, a network blip), retries stay
/// at most this far apart for [`MAP_FAST_RETRY_FOR`], so a node is current again within about
/// this long after the coordinator is back (doubling from 500 ms, a restart of a few seconds used
/// to cost 8-10 s). 10,000 nodes retrying every 2 s against a stopped coordinator are refused
/// connections, which cost it nothing.
const MAP_FAST_RETRY_MAX: Duration = Duration::from_secs(2);
const MAP_FAST_RETRY_FOR: Duration = Duration::from_secs(60);
/// The first retry after a lost stream waits a random part of this: prompt, but spread, so a
/// mesh whose streams all dropped at once does not reconnect in the same millisecond.
const MAP_FIRST_RETRY_JITTER: Duration = Duration::from_millis(500);

/// How long to wait before map stream attempt `attempt` (0: the first after the stream ended),
/// `since_lost` after the last stream that was up ended; `jitter` in [0, 1).
pub fn map_retry_delay(attempt: u32, since_lost: Duration, jitter: f64) -> Duration {
    if attempt == 0 {
        return MAP_FIRST_RETRY_JITTER.mul_f64(jitter);
    }
    let exp = BACKOFF_MIN.saturating_mul(1u32 << (attempt - 1).min(16));
    let cap = if since_lost < MAP_FAST_RETRY_FOR {
        MAP_FAST_RETRY_MAX
    } else {
        BACKOFF_MAX
    };
    // +-20 % so that nodes that lost their streams together drift apart.
    exp.min(cap).mul_f64(0.8 + 0.4 * jitter)
}

/// The coordinator refused this node (401): restarting will not help, an admin has to act. The
/// private key and state are kept.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Reads an error answer of the coordinator: its `detail`, or the status alone.
async fn api_error(resp: reqwest::Response) -> String {
    let status = resp.status();
    match resp.json::<ApiError>().await {
        Ok(e) => format!("{status} {}: {}", e.error, e.detail),
        Err(_) => status.to_string(),
    }
}

/// An error with its causes, for logs (reqwest hides the useful part in the sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// What to register as (`homeport up`'s first start).
pub struct Join<'a> {
    pub pin: &'a str,
    pub key: &'a PrivateKey,
    pub authkey: &'a str,
    pub hostname: &'a str,
    /// The address this key had before, to keep it.
    pub previous_ipv4: Option<std::net::Ipv4Addr>,
}

/// Registers this node's key, proving that it holds the private key: a fresh challenge from
/// the coordinator (over the pinned TLS connection), then the register request with the proof.
/// Retries while the coordinator is unreachable; a refusal (4xx) is final.
pub async fn register(
    client: &reqwest::Client,
    url: &str,
    join: &Join<'_>,
    shutdown: &CancellationToken,
) -> Result<Registration> {
    let mut backoff = BACKOFF_MIN;
    loop {
        match register_once(client, url, join).await {
            Ok(Ok(r)) => {
                return Ok(Registration {
                    coordinator: url.to_string(),
                    pin: join.pin.to_string(),
                    node_id: r.node_id,
                    name: r.name,
                    addrs: r.addrs,
                    prefix_v4: r.prefix_v4,
                    prefix_v6: r.prefix_v6,
                    credential: r.credential,
                    listen_port: 0,
                    refused: false,
                });
            }
            Ok(Err(refusal)) => return Err(refusal),
            Err(why) => tracing::warn!(reason = %why, "registration failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => bail!("stopped before registration"),
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One registration attempt. Outer error: worth retrying (network, 5xx); inner error: refused.
async fn register_once(
    client: &reqwest::Client,
    url: &str,
    join: &Join<'_>,
) -> std::result::Result<Result<RegisterResponse>, String> {
    let resp = client
        .post(format!("{url}{PATH_CHALLENGE}"))
        .send()
        .await
        .map_err(|e| format!("coordinator unreachable: {}", error_chain(&e)))?;
    if resp.status().is_server_error() {
        return Err(format!("challenge: {}", api_error(resp).await));
    }
    if !resp.status().is_success() {
        let why = api_error(resp).await;
        return Ok(Err(anyhow::anyhow!(
            "the coordinator gave no registration challenge ({why}); it may be older than this node (capability version {CAPABILITY_VERSION} needs POST {PATH_CHALLENGE})"
        )));
    }
    let ch: RegisterChallenge = resp
        .json()
        .await
        .map_err(|e| format!("reading the challenge: {}", error_chain(&e)))?;
    let mut body = RegisterRequest {
        authkey: join.authkey.to_string(),
        public_key: join.key.public_key(),
        hostname: join.hostname.to_string(),
        capver: CAPABILITY_VERSION,
        previous_ipv4: join.previous_ipv4,
        challenge: Some(ch.challenge.clone()),
        proof: None,
    };
    body.proof = match homeport_proto::register::prove(join.key, &ch.coordinator_key, &body) {
        Ok(p) => Some(p),
        Err(e) => {
            return Ok(Err(anyhow::anyhow!(
                "the coordinator's challenge is unusable: {e}"
            )));
        }
    };
    let resp = client
        .post(format!("{url}{PATH_REGISTER}"))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("coordinator unreachable: {}", error_chain(&e)))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp
            .json::<RegisterResponse>()
            .await
            .context("reading the registration answer"));
    }
    let why = api_error(resp).await;
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Ok(Err(Refused(format!(
            "the coordinator refused registration ({why}); the private key is kept. \
             Ask its admin for a new auth key (`homeport-coordinator authkey create`) and run \
             homeport up --authkey-file FILE (or set HOMEPORT_AUTHKEY)"
        ))
        .into()));
    }
    if status.is_client_error() {
        // A bad hostname or a full address pool does not heal by restarting either.
        return Ok(Err(Refused(format!(
            "the coordinator refused registration ({why}); fix what it names, then start again"
        ))
        .into()));
    }
    Err(format!("register: {why}"))
}

/// Requests to the coordinator (all but the map stream and the relay over TCP, which stay open)
/// end within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A registered node's calls to the coordinator (cheap to clone). The daemon hands it to whoever
/// else in the process calls the coordinator as this node (the exit's tasks).
#[derive(Clone)]
pub struct Api {
    /// The coordinator replicas (one, unless it runs in high availability); every call goes to
    /// the one in use.
    replicas: Arc<Replicas>,
    cred: Arc<str>,
}

impl Api {
    pub fn new(replicas: Arc<Replicas>, credential: &str) -> Api {
        Api {
            replicas,
            cred: credential.into(),
        }
    }

    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    /// A request to `path` with the node's credential, ending within [`REQUEST_TIMEOUT`], on
    /// the process's one pinned, pooled connection to the coordinator.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let cur = self.replicas.current();
        cur.client
            .request(method, format!("{}{path}", cur.url))
            .bearer_auth(&*self.cred)
            .timeout(REQUEST_TIMEOUT)
    }

    /// POSTs `body` as JSON to `path`; the coordinator's error, if any, in words.
    pub async fn post<T: serde::Serialize + ?Sized>(
        &self,
        path: &str,
        body: &T,
    ) -> std::result::Result<(), String> {
        let r = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(api_error(r).await)
        }
    }

    pub async fn report_endpoints(
        &self,
        endpoints: &[Endpoint],
    ) -> std::result::Result<(), String> {
        self.post(
            PATH_ENDPOINTS,
            &EndpointReport {
                endpoints: endpoints.to_vec(),
            },
        )
        .await
    }

    /// Asks the coordinator to have `peer` probe us now.
    pub async fn ask_probe(&self, peer: NodeId) -> std::result::Result<(), String> {
        self.post(PATH_PROBE, &ProbeAsk { peer }).await
    }

    /// The relay's TCP/TLS fallback: an upgraded connection through the coordinator's HTTPS port.
    pub async fn relay_over_tcp(&self) -> std::result::Result<reqwest::Upgraded, String> {
        let cur = self.replicas.current();
        let r = cur
            .client
            .get(format!("{}{PATH_RELAY_TCP}", cur.url))
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, RELAY_UPGRADE)
            .send()
            .await
            .map_err(|e| format!("no connection: {}", error_chain(&e)))?;
        if r.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            return Err(format!("refused: {}", r.status()));
        }
        r.upgrade()
            .await
            .map_err(|e| format!("upgrade failed: {}", error_chain(&e)))
    }
}

/// What the map stream tells the daemon.
#[derive(Debug)]
pub enum StreamEvent {
    /// One message of the stream (the first of each connection is `full`).
    Message(Box<MapMessage>),
    /// The stream ended; it is being reconnected.
    Lost(String),
    /// The coordinator does not know our credential any more: we were removed. The stream
    /// task has stopped.
    Revoked(String),
}

/// How many stream events may wait for the daemon (the coordinator coalesces what a slow
/// reader has not read yet, so waiting here costs nothing).
pub const STREAM_QUEUE: usize = 16;

/// Holds the map stream until `stop`, reconnecting with [`map_retry_delay`], to the next
/// coordinator replica when there are several. `resync` drops the current connection (the
/// daemon could not apply a message: the next connection starts with a full map).
pub async fn map_stream(
    api: Api,
    events: mpsc::Sender<StreamEvent>,
    resync: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut attempt: u32 = 0;
    let mut lost = std::time::Instant::now();
    loop {
        let mut was_up = false;
        let cur = api.replicas.current();
        let end = tokio::select! {
            e = stream_once(&api.cred, &cur, &events, &mut was_up) => e,
            _ = resync.notified() => Ended::Resync,
            _ = stop.cancelled() => return,
        };
        if !matches!(end, Ended::Resync) {
            // The next attempt goes to another replica if there is one.
            api.replicas.failed(&cur.url, was_up);
        }
        if was_up {
            attempt = 0;
            lost = std::time::Instant::now();
        }
        let backoff = map_retry_delay(attempt, lost.elapsed(), rand::random::<f64>());
        let ev = match end {
            Ended::Revoked(why) => {
                let _ = events.send(StreamEvent::Revoked(why)).await;
                return;
            }
            Ended::Lost(why) => {
                tracing::warn!(reason = %why, retry_in = ?backoff, "map stream ended; reconnecting");
                StreamEvent::Lost(why)
            }
            Ended::Resync => {
                StreamEvent::Lost("resynchronising after a map the node could not apply".into())
            }
        };
        if events.send(ev).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        attempt = attempt.saturating_add(1);
    }
}

enum Ended {
    Revoked(String),
    Lost(String),
    Resync,
}

async fn stream_once(
    cred: &str,
    replica: &Replica,
    events: &mpsc::Sender<StreamEvent>,
    was_up: &mut bool,
) -> Ended {
    let resp = match replica
        .client
        .get(format!("{}{PATH_MAP}", replica.url))
        .bearer_auth(cred)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Ended::Lost(error_chain(&e)),
    };
    if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Ended::Revoked(api_error(resp).await);
    }
    if !resp.status().is_success() {
        return Ended::Lost(format!("status {}", resp.status()));
    }
    let mut resp = resp;
    let mut lines = Lines::default();
    let silence = Duration::from_secs(3 * MAP_KEEPALIVE_SECS);
    loop {
        let chunk = match tokio::time::timeout(silence, resp.chunk()).await {
            Err(_) => return Ended::Lost(format!("nothing heard for {silence:?}")),
            Ok(Err(e)) => return Ended::Lost(error_chain(&e)),
            Ok(Ok(None)) => return Ended::Lost("closed by the coordinator".into()),
            Ok(Ok(Some(c))) => c,
        };
        for line in lines.push(&chunk) {
            let msg: MapMessage = match serde_json::from_slice(&line) {
                Ok(m) => m,
                Err(e) => return Ended::Lost(format!("bad map message: {e}")),
            };
            if msg.full {
                *was_up = true;
            } else if msg.is_keepalive() {
                continue;
            }
            if events
                .send(StreamEvent::Message(Box::new(msg)))
                .await
                .is_err()
            {
                return Ended::Lost("the daemon stopped".into());
            }
        }
    }
}

/// Splits a byte stream into its non-blank lines.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(chunk);
        let mut out = vec![];
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            line.pop();
            if !line.iter().all(u8::is_ascii_whitespace) {
                out.push(line);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_map_stream_is_retried_promptly_then_at_most_every_2_s_for_a_minute() {
        let s = Duration::from_secs;
        // The first retry: within 500 ms, spread by the jitter.
        assert_eq!(map_retry_delay(0, s(0), 0.0), Duration::ZERO);
        assert!(map_retry_delay(0, s(0), 0.999) < Duration::from_millis(500));
        // A coordinator restart of a few seconds: the attempts are never more than 2.4 s apart,
        // so the node is back within that of the coordinator.
        let mut t = Duration::ZERO;
        for attempt in 0..20 {
            let d = map_retry_delay(attempt, t, 0.999);
            assert!(d <= Duration::from_millis(2400), "attempt {attempt}: {d:?}");
            t += d;
        }
        // A coordinator gone for longer: back off up to 30 s.
        assert_eq!(map_retry_delay(20, s(120), 0.5), BACKOFF_MAX);
    }

    #[test]
    fn lines_are_split_across_chunks_and_blank_ones_dropped() {
        let mut l = Lines::default();
        assert!(l.push(b"{\"a\":").is_empty());
        assert_eq!(l.push(b"1}\n\n  \n{\"b\""), vec![b"{\"a\":1}".to_vec()]);
        assert_eq!(l.push(b":2}\n"), vec![b"{\"b\":2}".to_vec()]);
        assert!(l.buf.is_empty());
    }
}
