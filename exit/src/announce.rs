//! Tells the coordinator that this node runs an exit: its public addresses (what viewers connect
//! to) and its country database. The coordinator refuses publish rules on nodes that never did.
//!
//! It uses the node's own registration (credential, coordinator URL and pin from the state
//! dir), so it waits for the node daemon to register, then announces at once, again whenever
//! what it says changes, and retries with backoff on failure.

use crate::geo::CountryDb;
use anyhow::{Context, Result};
use homeport_node::state::Registration;
use homeport_proto::exit::{ExitAnnounce, MAX_PUBLIC_ADDRS, PATH_EXIT_ANNOUNCE};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the state dir is read for the registration before the first announcement: the
/// node registers within a second of starting, and publish commands wait on this.
const WAIT_REGISTRATION: Duration = Duration::from_millis(100);
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

/// Requests to the coordinator end within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn client(pin: &str) -> Result<reqwest::Client> {
    homeport_node::state::coordinator_client(pin, Some(REQUEST_TIMEOUT))
}

async fn send(reg: &Registration, a: &ExitAnnounce) -> Result<()> {
    let c = client(&reg.pin)?;
    let r = c
        .post(format!("{}{PATH_EXIT_ANNOUNCE}", reg.coordinator))
        .bearer_auth(&reg.credential)
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
    state_dir: PathBuf,
    invite_port: Option<u16>,
    mut geo: watch::Receiver<Option<Arc<CountryDb>>>,
    stop: CancellationToken,
) {
    let mut sent: Option<(String, ExitAnnounce)> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        let reg = homeport_node::state::active_registration(&state_dir);
        let wait = match reg {
            None => WAIT_REGISTRATION,
            Some(reg) => {
                let a = ExitAnnounce {
                    public_addrs: public_addrs(),
                    country_db: geo.borrow_and_update().as_ref().map(|g| g.desc.clone()),
                    invite_port,
                };
                let want = (reg.credential.clone(), a);
                if sent.as_ref() == Some(&want) {
                    RECHECK
                } else {
                    match send(&reg, &want.1).await {
                        Ok(()) => {
                            tracing::info!(addrs = ?want.1.public_addrs, country_db = ?want.1.country_db, "exit announced to the coordinator");
                            sent = Some(want);
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
            r = geo.changed() => if r.is_err() {
                // The publisher is gone: stop is coming.
                stop.cancelled().await;
                return;
            }
        }
    }
}
