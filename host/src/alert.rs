//! Alerts to webhooks (`--alert-webhook URL`, repeatable), from the coordinator and the exit.
//!
//! [`Alerts::raise`] never blocks and never fails: the alert goes into a bounded queue (a full
//! queue drops it and counts it) and one task sends it to every webhook, retrying with backoff.
//! The same (kind, subject) is sent at most once per debounce period, so a flapping node or a
//! long flood makes one message, not thousands.
//!
//! Body formats, chosen per webhook by a prefix or by the host: generic JSON (the default:
//! `{"source","host","kind","subject","message","time"}`), `ntfy+URL` or an ntfy host (the
//! message as text, the kind as `Title`), `discord+URL` or `discord.com` (`{"content"}`),
//! `slack+URL` or `hooks.slack.com` (`{"text"}`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Alerts waiting to be sent at most: a burst beyond this is dropped (and counted), never
/// allowed to hold up the caller.
pub const QUEUE: usize = 256;
/// Default: the same alert at most once per 5 minutes.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_secs(300);
/// Attempts per webhook and alert, with backoff 1 s, 2 s, 4 s … between them.
pub const ATTEMPTS: u32 = 4;
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// A webhook that does not answer within this is retried.
const TIMEOUT: Duration = Duration::from_secs(10);

/// How a webhook wants its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Ntfy,
    Discord,
    Slack,
}

/// A webhook: its URL and body format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    pub format: Format,
}

impl std::str::FromStr for Webhook {
    type Err = String;
    fn from_str(s: &str) -> Result<Webhook, String> {
        let (format, url) = match s.split_once('+') {
            Some(("ntfy", u)) => (Some(Format::Ntfy), u),
            Some(("discord", u)) => (Some(Format::Discord), u),
            Some(("slack", u)) => (Some(Format::Slack), u),
            Some(("json", u)) => (Some(Format::Json), u),
            _ => (None, s),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
            return Err(format!(
                "invalid webhook {s:?}: expected an http:// or https:// URL, optionally prefixed \
                 ntfy+, discord+, slack+ or json+ for the body format"
            ));
        }
        let host = url.split('/').nth(2).unwrap_or("");
        let format = format.unwrap_or(if host.contains("ntfy") {
            Format::Ntfy
        } else if host.ends_with("discord.com") || host.ends_with("discordapp.com") {
            Format::Discord
        } else if host == "hooks.slack.com" {
            Format::Slack
        } else {
            Format::Json
        });
        Ok(Webhook {
            url: url.to_string(),
            format,
        })
    }
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// What happened, e.g. `node-offline`, `deny-spike`, `new-country`.
    pub kind: &'static str,
    /// What it concerns, e.g. a node name or `tcp/32400`: debouncing is per (kind, subject).
    pub subject: String,
    /// One sentence for a person.
    pub message: String,
}

impl Alert {
    /// The request body for `format` (content type, body, ntfy title).
    pub fn body(&self, source: &str, host: &str, format: Format, time: &str) -> (String, String) {
        let text = format!("[{source} on {host}] {}", self.message);
        match format {
            Format::Json => (
                "application/json".into(),
                serde_json::json!({
                    "source": source, "host": host, "kind": self.kind, "subject": self.subject,
                    "message": self.message, "time": time,
                })
                .to_string(),
            ),
            Format::Ntfy => ("text/plain".into(), text),
            Format::Discord => (
                "application/json".into(),
                serde_json::json!({ "content": text }).to_string(),
            ),
            Format::Slack => (
                "application/json".into(),
                serde_json::json!({ "text": text }).to_string(),
            ),
        }
    }
}

/// The sender's handle: cheap to clone, `raise` never blocks.
#[derive(Clone)]
pub struct Alerts {
    tx: Option<mpsc::Sender<Alert>>,
    dropped: Arc<AtomicU64>,
}

impl Alerts {
    /// No webhooks: every alert is only logged.
    pub fn none() -> Alerts {
        Alerts {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Starts the sending task for `hooks` (none: [`Alerts::none`]); `source` names the binary.
    pub fn start(
        hooks: Vec<Webhook>,
        source: &'static str,
        debounce: Duration,
        stop: CancellationToken,
    ) -> Alerts {
        if hooks.is_empty() {
            return Alerts::none();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(send_loop(rx, hooks, source, debounce, stop));
        Alerts {
            tx: Some(tx),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Queues `a` (logged in any case); a full queue drops it.
    pub fn raise(&self, a: Alert) {
        tracing::warn!(kind = a.kind, subject = %a.subject, "alert: {}", a.message);
        if let Some(tx) = &self.tx
            && tx.try_send(a).is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Alerts dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

async fn send_loop(
    mut rx: mpsc::Receiver<Alert>,
    hooks: Vec<Webhook>,
    source: &'static str,
    debounce: Duration,
    stop: CancellationToken,
) {
    let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "alerts: no HTTP client; alerts are only logged");
            return;
        }
    };
    let host = hostname();
    let mut last: HashMap<(&'static str, String), Instant> = HashMap::new();
    loop {
        let a = tokio::select! {
            _ = stop.cancelled() => return,
            a = rx.recv() => match a { Some(a) => a, None => return },
        };
        let now = Instant::now();
        let key = (a.kind, a.subject.clone());
        if last
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < debounce)
        {
            tracing::debug!(kind = a.kind, subject = %a.subject, "alert debounced");
            continue;
        }
        last.insert(key, now);
        if last.len() > 4096 {
            last.retain(|_, t| now.duration_since(*t) < debounce);
        }
        let time = time_now();
        // Each webhook on its own task: a dead one does not delay the others or the next alert.
        for h in &hooks {
            let (ctype, body) = a.body(source, &host, h.format, &time);
            let (client, h, title) = (client.clone(), h.clone(), format!("homeport: {}", a.kind));
            tokio::spawn(async move {
                let mut wait = BACKOFF_FIRST;
                for attempt in 1..=ATTEMPTS {
                    let mut req = client
                        .post(&h.url)
                        .header("content-type", ctype.as_str())
                        .body(body.clone());
                    if h.format == Format::Ntfy {
                        req = req.header("Title", title.as_str());
                    }
                    match req.send().await {
                        Ok(r) if r.status().is_success() => return,
                        Ok(r) => {
                            tracing::warn!(url = %h.url, status = %r.status(), attempt, "alert webhook refused")
                        }
                        Err(e) => {
                            tracing::warn!(url = %h.url, error = %e, attempt, "alert webhook failed")
                        }
                    }
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            });
        }
    }
}

fn time_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // RFC 3339 without a time crate here: seconds since the epoch as UTC.
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_formats_by_prefix_and_host() {
        let f = |s: &str| s.parse::<Webhook>().unwrap().format;
        assert_eq!(f("http://192.0.2.1:9/x"), Format::Json);
        assert_eq!(f("https://ntfy.sh/mytopic"), Format::Ntfy);
        assert_eq!(f("ntfy+http://192.0.2.1:9/t"), Format::Ntfy);
        assert_eq!(f("https://discord.com/api/webhooks/1/x"), Format::Discord);
        assert_eq!(f("https://hooks.slack.com/services/x"), Format::Slack);
        assert_eq!(
            "slack+http://h:1/x".parse::<Webhook>().unwrap().url,
            "http://h:1/x"
        );
        assert!(
            "ftp://x/y"
                .parse::<Webhook>()
                .unwrap_err()
                .contains("http://")
        );
        let a = Alert {
            kind: "deny-spike",
            subject: "tcp/32400".into(),
            message: "m".into(),
        };
        let (_, b) = a.body("homeport-exit", "vps", Format::Discord, "t");
        assert_eq!(b, r#"{"content":"[homeport-exit on vps] m"}"#);
        let (_, b) = a.body("homeport-exit", "vps", Format::Json, "t");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["kind"], "deny-spike");
        assert_eq!(civil_from_days(20_421), (2025, 11, 29));
    }
}
