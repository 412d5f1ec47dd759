//! Tells the coordinator that this node runs an exit: its public addresses (what viewers connect
//! to) and its country database. The coordinator refuses publish rules on nodes that never did.
//!
//! It calls as the node (the daemon's [`Api`], once it has registered), announces at once, again
//! whenever what it says changes, and retries with backoff on failure.

use crate::geo::CountryDb;
use anyhow::{Context, Result};
use homeport_node::coordinator::Api;
use homeport_proto::exit::{ExitAnnounce, MAX_PUBLIC_ADDRS, PATH_EXIT_ANNOUNCE};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the interface addresses are re-read: a VPS's public address rarely changes.
const RECHECK: Duration = Duration::from_secs(30);
/// Retry after a failed announcement: from 500 ms, doubling up to 30 s.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The public addresses of this host's interfaces (not loopback, private, CGNAT/mesh,
/// link-local or ULA), sorted.
pub fn public_addrs() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = homeport_host::net::interface_addrs()
        .into_iter()
        .filter(|a| homeport_proto::addr::is_public(*a))
        .collect();
    v.sort();
    v.dedup();
    v.truncate(MAX_PUBLIC_ADDRS);
    v
}

async fn send(api: &Api, a: &ExitAnnounce) -> Result<()> {
    let r = api
        .request(reqwest::Method::POST, PATH_EXIT_ANNOUNCE)
        .json(a)
        .send()
        .await
        .context("announcing the exit to the coordinator")?;
    if !r.status().is_success() {
        let st = r.status();
        let body = r.text().await.unwrap_or_default();
        anyhow::bail!("the coordinator answered {st} to the exit announcement: {body}");
    }
    Ok(())
}

/// Runs until `stop`.
pub async fn run(
    mut api: watch::Receiver<Option<Api>>,
    invite_port: Option<u16>,
    mut geo: watch::Receiver<Option<Arc<CountryDb>>>,
    stop: CancellationToken,
) {
    let mut sent: Option<ExitAnnounce> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        let current = api.borrow_and_update().clone();
        let wait = match current {
            // Registered: `api` changes.
            None => BACKOFF_MAX,
            Some(api) => {
                let a = ExitAnnounce {
                    public_addrs: public_addrs(),
                    country_db: geo.borrow_and_update().as_ref().map(|g| g.desc.clone()),
                    invite_port,
                };
                if sent.as_ref() == Some(&a) {
                    RECHECK
                } else {
                    match send(&api, &a).await {
                        Ok(()) => {
                            tracing::info!(addrs = ?a.public_addrs, country_db = ?a.country_db, "exit announced to the coordinator");
                            sent = Some(a);
                            backoff = BACKOFF_MIN;
                            RECHECK
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "exit announcement failed");
                            let w = backoff;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            w
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            r = api.changed() => if r.is_err() {
                stop.cancelled().await;
                return;
            },
            r = geo.changed() => if r.is_err() {
                // The publisher is gone: stop is coming.
                stop.cancelled().await;
                return;
            }
        }
    }
}
