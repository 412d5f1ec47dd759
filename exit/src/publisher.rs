//! The publisher: keeps homeport's nftables table in line with the publish rules of the map.
//!
//! On every map change it takes the rules whose exit is this node and re-applies the ruleset
//! only when they changed (an atomic table replace: established flows of unchanged rules keep
//! their conntrack entries and go on undisturbed). Flows of a removed rule are cut (their
//! conntrack entries deleted), so unpublishing really ends access. Every
//! [`RECHECK`] it checks that the table is still there (a firewall reload elsewhere may flush
//! the whole ruleset) and puts it back. On stop it removes the table.

use crate::audit::Audit;
use crate::nft::{self, Exec, NftConfig};
use anyhow::{Context, Result};
use homeport_proto::map::NetworkMap;
use homeport_proto::publish::{PublishProto, PublishRule};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the table's presence is checked: a flushed ruleset leaves the VPS unprotected and
/// the published ports dead until then, so this is short; one `nft list tables` costs ~1 ms.
pub const RECHECK: Duration = Duration::from_secs(10);

/// The publish rules of `map` that this node is the exit of.
pub fn rules_for_me(map: &NetworkMap) -> Vec<PublishRule> {
    let me = map.self_node.id;
    let mut r: Vec<PublishRule> = map
        .publish
        .iter()
        .filter(|r| r.exit == me)
        .cloned()
        .collect();
    r.sort_by_key(|r| r.id);
    r
}

pub struct Publisher {
    cfg: NftConfig,
    exec: Exec,
    audit: Arc<Audit>,
    /// Where the kernel's sysctls live; None: leave them alone (tests in a namespace).
    proc_sys: Option<PathBuf>,
    /// The rules installed by the last apply (after `nft::plan`); None before the first.
    applied: Option<Vec<PublishRule>>,
}

impl Publisher {
    pub fn new(
        cfg: NftConfig,
        exec: Exec,
        audit: Arc<Audit>,
        proc_sys: Option<PathBuf>,
    ) -> Publisher {
        Publisher {
            cfg,
            exec,
            audit,
            proc_sys,
            applied: None,
        }
    }

    /// The rules currently installed.
    pub fn installed(&self) -> &[PublishRule] {
        self.applied.as_deref().unwrap_or(&[])
    }

    /// Installs `rules` (this exit's) unless exactly these are installed already. Returns
    /// whether the table was (re)applied.
    pub async fn update(&mut self, rules: &[PublishRule]) -> Result<bool> {
        let (planned, skipped) = nft::plan(&self.cfg, rules);
        let planned: Vec<PublishRule> = planned.into_iter().cloned().collect();
        if self.applied.as_ref() == Some(&planned) {
            return Ok(false);
        }
        for s in &skipped {
            tracing::warn!(rule = s.id, "publish rule not installed: {}", s.why);
        }
        self.apply(planned).await?;
        Ok(true)
    }

    async fn apply(&mut self, planned: Vec<PublishRule>) -> Result<()> {
        // Counts of the deny meters die with the old table: log them first.
        if self.applied.is_some() {
            if let Err(e) = self.audit.poll_denials(&self.exec).await {
                tracing::debug!(error = %e, "reading deny counters before re-apply");
            }
        }
        let exec = self.exec.clone();
        let cfg = self.cfg.clone();
        let rules = planned.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let bans = nft::current_bans(&exec).unwrap_or_default();
            nft::apply(&exec, &nft::ruleset(&cfg, &rules, &bans))?;
            Ok(())
        })
        .await
        .context("nft task")??;
        if let Some(p) = &self.proc_sys {
            nft::enable_forwarding(p)?;
        }
        let old = self.applied.replace(planned.clone()).unwrap_or_default();
        self.audit.set_rules(&planned);
        tracing::info!(
            rules = planned.len(),
            ports = %planned.iter().map(|r| format!("{}/{}", r.proto.as_str(), r.port)).collect::<Vec<_>>().join(","),
            "published ports applied"
        );
        let gone: Vec<PublishRule> = old.into_iter().filter(|o| !planned.contains(o)).collect();
        if !gone.is_empty() {
            let exec = self.exec.clone();
            tokio::task::spawn_blocking(move || cut_flows(&exec, &gone))
                .await
                .ok();
        }
        Ok(())
    }

    /// Puts the table back if something removed it.
    pub async fn ensure(&mut self) -> Result<()> {
        let Some(planned) = self.applied.clone() else {
            return Ok(());
        };
        let exec = self.exec.clone();
        let exists = tokio::task::spawn_blocking(move || nft::table_exists(&exec)).await??;
        if !exists {
            tracing::warn!(
                "table inet {} disappeared (ruleset flushed?); applying it again",
                nft::TABLE
            );
            self.applied = None;
            self.apply(planned).await?;
        }
        Ok(())
    }

    /// Removes the table.
    pub async fn remove(&mut self) -> Result<()> {
        let exec = self.exec.clone();
        tokio::task::spawn_blocking(move || nft::remove(&exec)).await??;
        self.applied = None;
        self.audit.set_rules(&[]);
        tracing::info!("published ports removed");
        Ok(())
    }

    /// Follows the maps until `stop`, then removes the table. Edge protection goes up at once,
    /// before any map arrives.
    pub async fn run(
        mut self,
        mut maps: watch::Receiver<Option<Arc<NetworkMap>>>,
        stop: CancellationToken,
    ) {
        let initial = maps
            .borrow_and_update()
            .as_deref()
            .map(rules_for_me)
            .unwrap_or_default();
        if let Err(e) = self.update(&initial).await {
            tracing::error!(error = %format!("{e:#}"), "applying the nftables ruleset failed");
        }
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                ch = maps.changed() => {
                    if ch.is_err() {
                        // The node is gone; stop is coming.
                        stop.cancelled().await;
                        break;
                    }
                    let rules = maps.borrow_and_update().as_deref().map(rules_for_me);
                    if let Some(rules) = rules {
                        if let Err(e) = self.update(&rules).await {
                            tracing::error!(error = %format!("{e:#}"), "applying the nftables ruleset failed");
                        }
                    }
                }
                _ = tick.tick() => {
                    let r = if self.applied.is_none() {
                        // The first apply failed (e.g. nft missing at start): keep trying.
                        let rules = maps.borrow().as_deref().map(rules_for_me).unwrap_or_default();
                        self.update(&rules).await.map(|_| ())
                    } else {
                        self.ensure().await
                    };
                    if let Err(e) = r {
                        tracing::warn!(error = %format!("{e:#}"), "nftables check failed");
                    }
                }
            }
        }
        if let Err(e) = self.remove().await {
            tracing::error!(error = %format!("{e:#}"), "removing the nftables table failed");
        }
    }
}

/// Deletes the conntrack entries of published flows of `rules` (their DNAT bindings would keep
/// them alive after the rule is gone).
fn cut_flows(exec: &Exec, rules: &[PublishRule]) {
    for r in rules {
        let proto = match r.proto {
            PublishProto::Tcp => "tcp",
            PublishProto::Udp => "udp",
            PublishProto::Unknown => continue,
        };
        for (family, target) in [
            ("ipv4", r.target_ipv4.to_string()),
            ("ipv6", r.target_ipv6.to_string()),
        ] {
            let port = r.port.to_string();
            let tport = r.target_port.to_string();
            // Exit status 1 just means "no such flows".
            let out = exec
                .command("conntrack")
                .args(["-D", "-f", family, "-p", proto, "--orig-port-dst", &port])
                .args(["--reply-src", &target, "--reply-port-src", &tport])
                .output();
            if let Ok(o) = out {
                let msg = String::from_utf8_lossy(&o.stderr);
                let n: u64 = msg
                    .split_whitespace()
                    .zip(msg.split_whitespace().skip(1))
                    .find(|(_, w)| *w == "flow")
                    .and_then(|(n, _)| n.parse().ok())
                    .unwrap_or(0);
                if n > 0 {
                    tracing::info!(
                        rule = r.id,
                        flows = n,
                        family,
                        "cut the flows of an unpublished port"
                    );
                }
            }
        }
    }
}
