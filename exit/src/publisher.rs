//! The publisher: keeps homeport's nftables table in line with the publish rules of the map.
//!
//! On every map change it takes the rules whose exit is this node and re-applies the ruleset
//! only when they changed (an atomic table replace: established flows of unchanged rules keep
//! their conntrack entries and go on undisturbed). Flows of a removed rule are cut (their
//! conntrack entries deleted), so unpublishing really ends access. Every
//! [`RECHECK`] it checks that the table is still there (a firewall reload elsewhere may flush
//! the whole ruleset) and puts it back. On stop it removes the table.

use crate::audit::Audit;
use crate::geo::{CountryDb, Stamp};
use crate::nft::{self, Exec, NftConfig};
use anyhow::{Context, Result};
use homeport_proto::invite::Grant;
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
    /// The country database file (`--country-db`), if any.
    geo_path: Option<PathBuf>,
    /// The loaded country database (None without a file, or when it could never be read).
    geo: Option<Arc<CountryDb>>,
    /// The file stamp last loaded or tried.
    geo_tried: Option<Stamp>,
    /// The database the last apply used (by file stamp): a reload re-applies.
    applied_geo: Option<Option<Stamp>>,
    /// Who wants to know the loaded database (the announcement to the coordinator, the audit).
    geo_tx: watch::Sender<Option<Arc<CountryDb>>>,
    /// Invite grants (addresses let into a rule until a time), from the invite task.
    grants: Option<watch::Receiver<Vec<Grant>>>,
    /// The grants the last apply installed (the live ones of installed rules).
    applied_grants: Vec<Grant>,
}

/// How often the country database file is checked for a change (one stat).
pub const GEO_RECHECK: Duration = Duration::from_secs(2);

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
            geo_path: None,
            geo: None,
            geo_tried: None,
            applied_geo: None,
            geo_tx: watch::channel(None).0,
            grants: None,
            applied_grants: Vec::new(),
        }
    }

    /// Follows invite grants: each becomes an element of its rule's invite set with a timeout.
    pub fn with_grants(mut self, rx: watch::Receiver<Vec<Grant>>) -> Publisher {
        self.grants = Some(rx);
        self
    }

    /// The live grants of `planned` rules at `now` (unix seconds).
    fn live_grants(&self, planned: &[PublishRule], now: i64) -> Vec<Grant> {
        let Some(rx) = &self.grants else {
            return Vec::new();
        };
        let mut v: Vec<Grant> = rx
            .borrow()
            .iter()
            .filter(|g| g.until > now && planned.iter().any(|r| r.id == g.rule))
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Uses the country database at `path` (loaded now: an unreadable file is an error at
    /// start) and reloads it when the file changes.
    pub fn with_country_db(mut self, path: &std::path::Path) -> Result<Publisher> {
        let db = Arc::new(CountryDb::load(path)?);
        tracing::info!(path = %path.display(), db = %db.desc, countries = db.countries().len(), "country database loaded");
        self.geo_path = Some(path.to_path_buf());
        self.geo_tried = db.stamp;
        self.geo_tx.send_replace(Some(db.clone()));
        self.geo = Some(db);
        Ok(self)
    }

    /// Follows the loaded country database.
    pub fn country_db(&self) -> watch::Receiver<Option<Arc<CountryDb>>> {
        self.geo_tx.subscribe()
    }

    /// Reloads the country database when its file changed. True when a new one was loaded.
    pub async fn reload_country_db(&mut self) -> bool {
        let Some(path) = self.geo_path.clone() else {
            return false;
        };
        let now = Stamp::of(&path);
        // A file that cannot be read is tried again only once it changes once more.
        if now.is_none() || self.geo_tried == now {
            return false;
        }
        self.geo_tried = now;
        match tokio::task::spawn_blocking(move || CountryDb::load(&path)).await {
            Ok(Ok(db)) => {
                tracing::info!(db = %db.desc, countries = db.countries().len(), "country database reloaded");
                let db = Arc::new(db);
                self.geo_tx.send_replace(Some(db.clone()));
                self.geo = Some(db);
                true
            }
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "country database changed but cannot be read; keeping the one loaded");
                false
            }
            Err(_) => false,
        }
    }

    /// The rules currently installed.
    pub fn installed(&self) -> &[PublishRule] {
        self.applied.as_deref().unwrap_or(&[])
    }

    /// Installs `rules` (this exit's) unless exactly these are installed already. Returns
    /// whether the table was (re)applied.
    pub async fn update(&mut self, rules: &[PublishRule]) -> Result<bool> {
        let (planned, skipped) = nft::plan_geo(&self.cfg, rules, self.geo.is_some());
        let planned: Vec<PublishRule> = planned.into_iter().cloned().collect();
        let geo_now = self.geo.as_ref().and_then(|g| g.stamp);
        let uses_geo = planned.iter().any(|r| r.guards.needs_countries());
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let grants = self.live_grants(&planned, now);
        // Expired grants leave the kernel set by their own timeout: only new or revoked ones
        // need a re-apply.
        let expired_only = self
            .applied_grants
            .iter()
            .filter(|g| g.until > now)
            .eq(grants.iter());
        if self.applied.as_ref() == Some(&planned)
            && (!uses_geo || self.applied_geo == Some(geo_now))
            && expired_only
        {
            return Ok(false);
        }
        self.applied_grants = grants;
        for s in &skipped {
            tracing::warn!(rule = s.id, "publish rule not installed: {}", s.why);
        }
        self.apply(planned).await?;
        Ok(true)
    }

    async fn apply(&mut self, planned: Vec<PublishRule>) -> Result<()> {
        let r = self.apply_inner(planned).await;
        if let Err(e) = &r {
            self.audit.alert(
                "rules-failed",
                "nftables".into(),
                format!("the exit's nftables rules failed to apply: {e:#}"),
            );
        }
        r
    }

    async fn apply_inner(&mut self, planned: Vec<PublishRule>) -> Result<()> {
        // Counts of the deny meters die with the old table: log them first.
        if self.applied.is_some()
            && let Err(e) = self.audit.poll_denials(&self.exec).await
        {
            tracing::debug!(error = %e, "reading deny counters before re-apply");
        }
        let exec = self.exec.clone();
        let cfg = self.cfg.clone();
        let rules = planned.clone();
        let geo = self.geo.clone();
        self.applied_geo = Some(geo.as_ref().and_then(|g| g.stamp));
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let grants: Vec<(i64, std::net::IpAddr, u32)> = self
            .applied_grants
            .iter()
            .filter(|g| g.until > now)
            .map(|g| {
                (
                    g.rule,
                    g.addr,
                    u32::try_from(g.until - now).unwrap_or(u32::MAX),
                )
            })
            .collect();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let bans = nft::current_bans(&exec).unwrap_or_default();
            nft::apply(
                &exec,
                &nft::ruleset_geo(&cfg, &rules, &bans, geo.as_deref(), &grants),
            )?;
            Ok(())
        })
        .await
        .context("nft task")??;
        if let Some(p) = &self.proc_sys {
            nft::enable_forwarding(p, self.state_dir())?;
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

    /// Where the sysctl values to restore are kept: the state dir (the audit log's dir).
    fn state_dir(&self) -> &std::path::Path {
        self.audit
            .path()
            .parent()
            .unwrap_or(std::path::Path::new("."))
    }

    /// Leaves the VPS as it was: the sysctls get their values from before the exit back, the
    /// table goes, and so do the conntrack entries of published flows (their NAT bindings would
    /// otherwise go on forwarding an established flow's packets, with the TUN gone, by the main
    /// routing table).
    pub async fn remove(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        if let Some(p) = &self.proc_sys {
            match nft::restore_sysctls(p, self.state_dir()) {
                Ok(true) => tracing::info!("forwarding and conntrack sysctls restored"),
                Ok(false) => {}
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        let exec = self.exec.clone();
        let installed = self.applied.take().unwrap_or_default();
        let r = tokio::task::spawn_blocking(move || {
            let r = nft::remove(&exec);
            cut_flows(&exec, &installed);
            r
        })
        .await?;
        if let Err(e) = r {
            errors.push(e.to_string());
        }
        self.audit.set_rules(&[]);
        if !errors.is_empty() {
            anyhow::bail!("{}", errors.join("; "));
        }
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
        let mut geo_tick = tokio::time::interval(GEO_RECHECK);
        geo_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                ok = grants_changed(&mut self.grants) => {
                    if !ok {
                        self.grants = None;
                        continue;
                    }
                    let rules = maps.borrow().as_deref().map(rules_for_me).unwrap_or_default();
                    if let Err(e) = self.update(&rules).await {
                        tracing::error!(error = %format!("{e:#}"), "applying the nftables ruleset failed");
                    }
                }
                _ = geo_tick.tick(), if self.geo_path.is_some() => {
                    if self.reload_country_db().await {
                        let rules = maps.borrow().as_deref().map(rules_for_me).unwrap_or_default();
                        if let Err(e) = self.update(&rules).await {
                            tracing::error!(error = %format!("{e:#}"), "applying the nftables ruleset failed");
                        }
                    }
                }
                ch = maps.changed() => {
                    if ch.is_err() {
                        // The node is gone; stop is coming.
                        stop.cancelled().await;
                        break;
                    }
                    let rules = maps.borrow_and_update().as_deref().map(rules_for_me);
                    if let Some(rules) = rules
                        && let Err(e) = self.update(&rules).await {
                            tracing::error!(error = %format!("{e:#}"), "applying the nftables ruleset failed");
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

/// Waits for new grants: true on a change, false when the sender is gone (never, without one).
async fn grants_changed(rx: &mut Option<watch::Receiver<Vec<Grant>>>) -> bool {
    match rx {
        Some(r) => r.changed().await.is_ok(),
        None => std::future::pending().await,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::Lab;
    use crate::nft::tests::{cfg, rule};
    use homeport_proto::publish::Guards;
    use std::net::IpAddr;
    use std::time::Instant;

    fn map(rules: Vec<PublishRule>) -> Arc<NetworkMap> {
        let m: homeport_proto::map::MapMessage = serde_json::from_value(serde_json::json!({
            "version": 1, "full": true,
            "self_node": {"id": 1, "name": "vps", "public_key": "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
                "addrs": {"ipv4": "100.96.0.1", "ipv6": "fd7a:115c:a1e0::1"},
                "prefix_v4": "100.96.0.0/16", "prefix_v6": "fd7a:115c:a1e0::/64"},
            "peers": [], "filter": {"allow_all": true}, "publish": rules, "relays": []
        }))
        .unwrap();
        Arc::new(NetworkMap::from_full(m).unwrap())
    }

    #[test]
    fn only_rules_of_this_exit() {
        let mut other = rule(5, PublishProto::Tcp, 80, Guards::default());
        other.exit = homeport_proto::NodeId(9);
        let m = map(vec![
            other,
            rule(4, PublishProto::Tcp, 81, Guards::default()),
        ]);
        assert_eq!(
            rules_for_me(&m).iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![4]
        );
    }

    /// Waits up to `secs` for `f` to hold.
    fn eventually(secs: f64, mut f: impl FnMut() -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < secs {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Live map changes against real kernels: add/remove a rule within a second, other flows
    /// undisturbed, the removed rule's flows cut; the audit log gets the allowed connection
    /// (bytes, from conntrack) and the denials; stop removes the table.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lab_live_updates_and_audit() {
        if !crate::lab::available("publisher::lab_live_updates_and_audit") {
            return;
        }
        let lab = Lab::new();
        let exec = Exec::netns(&lab.vps);
        for k in [
            "net.netfilter.nf_conntrack_acct=1",
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
            "net.netfilter.nf_conntrack_tcp_timeout_close=1",
            "net.netfilter.nf_conntrack_tcp_timeout_fin_wait=1",
            "net.netfilter.nf_conntrack_tcp_timeout_last_ack=1",
            "net.netfilter.nf_conntrack_tcp_timeout_close_wait=1",
        ] {
            // nf_conntrack may not be loaded before the first ruleset: best effort here,
            // set again below.
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", &lab.vps, "sysctl", "-q", "-w", k])
                .output();
        }
        let dir = tempfile::tempdir().unwrap();
        let audit = Arc::new(Audit::open(dir.path()).unwrap());
        let p = Publisher::new(cfg(), exec.clone(), audit.clone(), None);
        let (tx, rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let task = tokio::spawn(p.run(rx, stop.clone()));
        let ct = {
            let (a, e, s) = (audit.clone(), exec.clone(), stop.clone());
            tokio::spawn(async move { a.run_conntrack(e, s).await })
        };
        for port in [32400, 8080] {
            lab.serve(port);
        }
        let a4: IpAddr = "192.0.2.5".parse().unwrap();
        let b4: IpAddr = "192.0.2.6".parse().unwrap();
        let plex: std::net::SocketAddr = "198.51.100.10:32400".parse().unwrap();
        let web: std::net::SocketAddr = "198.51.100.10:8080".parse().unwrap();
        let plex_rule = rule(
            1,
            PublishProto::Tcp,
            32400,
            Guards {
                allow: vec!["192.0.2.5/32".parse().unwrap()],
                ..Guards::default()
            },
        );
        let web_rule = rule(2, PublishProto::Tcp, 8080, Guards::default());

        let lab = Arc::new(lab);
        let blocking = |f: Box<dyn FnOnce(&Lab) -> bool + Send>| {
            let lab = lab.clone();
            tokio::task::spawn_blocking(move || f(&lab))
        };

        // Publish one rule: reachable within a second.
        tx.send(Some(map(vec![plex_rule.clone()]))).unwrap();
        let ok = blocking(Box::new(move |lab| {
            eventually(1.5, || lab.connect(a4, plex).is_some())
        }))
        .await
        .unwrap();
        assert!(ok, "published port not reachable within a second");
        for k in [
            "net.netfilter.nf_conntrack_acct=1",
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
            "net.netfilter.nf_conntrack_tcp_timeout_close=1",
        ] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", &lab.vps, "sysctl", "-q", "-w", k])
                .output();
        }

        // A long flow on plex; add the web rule live.
        let lab2 = lab.clone();
        let mut plex_conn = tokio::task::spawn_blocking(move || lab2.connect(a4, plex))
            .await
            .unwrap()
            .expect("plex flow");
        tx.send(Some(map(vec![plex_rule.clone(), web_rule.clone()])))
            .unwrap();
        let t = Instant::now();
        let lab2 = lab.clone();
        let web_conn = tokio::task::spawn_blocking(move || {
            let mut c = None;
            eventually(1.5, || {
                c = lab2.connect(b4, web);
                c.is_some()
            });
            c
        })
        .await
        .unwrap();
        let mut web_conn = web_conn.expect("added rule reachable");
        assert!(t.elapsed() < Duration::from_millis(1500));
        let (mut pc, ans) = tokio::task::spawn_blocking(move || {
            let a = Lab::ask(&mut plex_conn, "after-add");
            (plex_conn, a)
        })
        .await
        .unwrap();
        assert!(
            ans.expect("plex flow survives adding a rule")
                .ends_with(" after-add")
        );

        // Remove the web rule: its flow is cut, new connections fail, plex is undisturbed.
        tx.send(Some(map(vec![plex_rule.clone()]))).unwrap();
        let lab2 = lab.clone();
        let gone = tokio::task::spawn_blocking(move || {
            eventually(1.5, || {
                lab2.connect_within(b4, web, Duration::from_millis(300))
                    .is_none()
            })
        })
        .await
        .unwrap();
        assert!(gone, "removed rule still reachable");
        let (web_alive, plex_ans, pc) = tokio::task::spawn_blocking(move || {
            let w = Lab::ask(&mut web_conn, "x").is_some();
            let p = Lab::ask(&mut pc, "after-remove");
            (w, p, pc)
        })
        .await
        .unwrap();
        assert!(!web_alive, "flow of a removed rule still works");
        assert!(
            plex_ans
                .expect("plex flow survives removing another rule")
                .ends_with(" after-remove")
        );

        // Close the plex flow: its audit line arrives when conntrack destroys it.
        drop(pc);
        let path = audit.path().to_path_buf();
        let logged = tokio::task::spawn_blocking(move || {
            eventually(20.0, || {
                std::fs::read_to_string(&path)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| {
                        let r: crate::audit::AuditRecord = serde_json::from_str(l).unwrap();
                        r.verdict == "allowed"
                            && r.source.starts_with("192.0.2.5:")
                            && r.rule == 1
                            && r.bytes_in.unwrap_or(0) > 0
                            && r.bytes_out.unwrap_or(0) > 0
                    })
            })
        })
        .await
        .unwrap();
        assert!(
            logged,
            "no allowed line: {}",
            std::fs::read_to_string(audit.path()).unwrap()
        );

        // A denied source: one aggregated line.
        let lab2 = lab.clone();
        tokio::task::spawn_blocking(move || assert!(lab2.connect(b4, plex).is_none()))
            .await
            .unwrap();
        let recs = audit.poll_denials(&exec).await.unwrap();
        assert!(
            recs.iter().any(|r| r.verdict == "not-in-allow-list"
                && r.source == "192.0.2.6"
                && r.packets.unwrap_or(0) >= 1),
            "{recs:?}"
        );

        stop.cancel();
        task.await.unwrap();
        ct.await.unwrap();
        assert!(
            !nft::table_exists(&exec).unwrap(),
            "table left behind after stop"
        );
    }
}
