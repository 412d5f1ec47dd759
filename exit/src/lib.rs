//! homeport-exit: a mesh node (the node crate's daemon) plus the publisher: nftables rules for
//! published ports, edge protection of the VPS, and the audit log.
//!
//! - [`nft`]: the ruleset (pure) and applying it.
//! - [`publisher`]: follows the node's map and keeps the table in line with it.
//! - [`audit`]: audit log from conntrack events and deny meters, per-rule metrics.
//! - [`config`]: flags and config file of `homeport-exit up`.
//! - [`logcmd`]: `homeport-exit log`.
//! - [`report`]: `homeport-exit report` (per source: who, country, hours, flags).
//! - [`status`]: the status report for the coordinator's dashboard (rules, live connections).
//! - [`geo`]: the country database; [`announce`]: telling the coordinator this node is an exit.

pub mod announce;
pub mod audit;
pub mod config;
pub mod geo;
pub mod invite;
#[cfg(test)]
mod lab;
pub mod logcmd;
pub mod nft;
pub mod pathwatch;
pub mod publisher;
pub mod report;
pub mod status;

use anyhow::Result;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use config::{ExitArgs, ExitConfig};

/// Runs the exit until `shutdown` is cancelled (or the node stops): the node daemon, the
/// publisher, the audit tasks and (with `--metrics-listen`) the exit's /metrics. On the way
/// out the nftables table is removed.
///
/// The exit serves `--metrics-listen` itself (publish metrics), so the node's own metrics
/// server is not started.
pub async fn run(mut cfg: ExitConfig, shutdown: CancellationToken) -> Result<()> {
    let audit = Arc::new(audit::Audit::open_rotating(
        &cfg.up.state_dir,
        cfg.publish.audit,
    )?);
    let nft_cfg = cfg.publish.nft_config(&cfg.up.tun, cfg.up.listen_port);
    let alerts_stop = CancellationToken::new();
    audit.set_alerts(
        homeport_host::alert::Alerts::start(
            cfg.publish.alert_webhooks.clone(),
            "homeport-exit",
            cfg.publish.alert_debounce,
            alerts_stop.clone(),
        ),
        cfg.publish.alert_deny_spike,
    );
    let exec = nft::Exec::default();
    let stop = CancellationToken::new();
    let metrics_listen = cfg.up.metrics_listen.take();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = metrics_listen {
        let l = homeport_host::metrics::bind(addr).await?;
        tasks.spawn(homeport_host::metrics::serve(
            l,
            Arc::new(audit.metrics_registry()),
            stop.clone(),
        ));
    }
    let (tx, rx) = tokio::sync::watch::channel(None);
    let mut publisher = publisher::Publisher::new(
        nft_cfg,
        exec.clone(),
        audit.clone(),
        Some("/proc/sys".into()),
    );
    if let Some(p) = &cfg.publish.country_db {
        publisher = publisher.with_country_db(p)?;
    }
    let geo = publisher.country_db();
    // The audit log's `country` follows the loaded database (from the first record on).
    audit.set_country_db(geo.borrow().clone());
    let a = audit.clone();
    tasks.spawn(follow(geo.clone(), stop.clone(), move |db| {
        a.set_country_db(db)
    }));
    let (grants_tx, grants_rx) = tokio::sync::watch::channel(Vec::new());
    let publisher = publisher.with_grants(grants_rx.clone());
    // The audit log's labels know the invites' names.
    let a = audit.clone();
    tasks.spawn(follow(grants_rx, stop.clone(), move |g| a.set_grants(g)));
    // The exit's tasks call the coordinator as the node, on the daemon's connection.
    let (api_tx, api_rx) = tokio::sync::watch::channel(None);
    if let Some(port) = cfg.publish.invite_port {
        let (d, g, s) = (api_rx.clone(), grants_tx.clone(), stop.clone());
        tasks.spawn(async move {
            if let Err(e) = invite::serve(port, d, g, s).await {
                tracing::error!(error = %format!("{e:#}"), "invite pages stopped");
            }
        });
        tasks.spawn(invite::follow_grants(
            api_rx.clone(),
            grants_tx,
            stop.clone(),
        ));
    }
    tasks.spawn(publisher.run(rx, stop.clone()));
    tasks.spawn(pathwatch::run(
        cfg.up.state_dir.clone(),
        audit.clone(),
        stop.clone(),
    ));
    tasks.spawn(announce::run(
        api_rx.clone(),
        cfg.publish.invite_port,
        geo.clone(),
        stop.clone(),
    ));
    {
        let (a, e, s) = (audit.clone(), exec.clone(), stop.clone());
        tasks.spawn(async move { a.run_conntrack(e, s).await });
    }
    {
        let (a, e, s) = (audit.clone(), exec.clone(), stop.clone());
        tasks.spawn(async move { a.run_deny_poller(e, s).await });
    }
    tasks.spawn(status::run(
        api_rx,
        audit.clone(),
        exec.clone(),
        stop.clone(),
    ));
    tracing::info!(audit = %audit.path().display(), "homeport exit starting");
    let res = homeport_node::daemon::run(
        cfg.up,
        shutdown.clone(),
        homeport_node::daemon::Hooks {
            maps: Some(tx),
            api: Some(api_tx),
        },
    )
    .await;
    // Whatever ended the node: take the published ports down with it.
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    alerts_stop.cancel();
    res
}

/// Hands `apply` the channel's value now and after every change, until `stop` or until the
/// sender is gone.
async fn follow<T: Clone>(
    mut rx: tokio::sync::watch::Receiver<T>,
    stop: CancellationToken,
    apply: impl Fn(T),
) {
    loop {
        apply(rx.borrow_and_update().clone());
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
            }
        }
    }
}
