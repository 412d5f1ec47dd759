//! The audit log of published connections and the per-rule metrics.
//!
//! - Allowed connections come from conntrack events (`conntrack -E`): a published flow is one
//!   whose original destination port is a published port and whose reply comes from the rule's
//!   target. Its line is written when the flow ends (DESTROY carries the byte counts; this needs
//!   `nf_conntrack_acct=1`), with the start time, the source, bytes each way and the duration
//!   (start to the first CLOSE/TIME_WAIT state, else to DESTROY).
//! - Denials are never logged per packet: each deny chain counts per source in a dynamic meter
//!   (see `nft`), and [`Audit::poll_denials`] reads them every [`DENY_POLL`] and writes one line
//!   per (source, rule, reason) with the packets dropped since the last read.
//!
//! Every record is one JSON line in `<state-dir>/audit.jsonl` (mode 0600) and an INFO event
//! with target `audit`. The file rotates by size: before a line would take it over
//! `--audit-max-bytes` it becomes `audit.jsonl.1` (`.1` becomes `.2`, and so on; the oldest
//! beyond `--audit-keep` is deleted), so a flood of denials cannot fill the disk: the log takes
//! at most (keep + 1) × max-bytes.

use crate::nft::{self, DenyReason, Exec, L4};
use anyhow::{Context, Result};
use homeport_proto::publish::{PublishProto, PublishRule};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

/// File name of the audit log in the state dir.
pub const AUDIT_FILE: &str = "audit.jsonl";
/// How often the deny meters are read: often enough that a log reader sees an attack within
/// seconds, rarely enough that listing the meters (one `nft` run each) costs nothing.
pub const DENY_POLL: Duration = Duration::from_secs(3);
/// Default size at which the audit log rotates: weeks of a busy Plex server's connections.
pub const DEFAULT_AUDIT_MAX_BYTES: u64 = 64 << 20;
/// Default number of rotated audit files kept.
pub const DEFAULT_AUDIT_KEEP: u32 = 4;

/// When the audit log rotates and how many old files it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub max_bytes: u64,
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Rotation {
        Rotation {
            max_bytes: DEFAULT_AUDIT_MAX_BYTES,
            keep: DEFAULT_AUDIT_KEEP,
        }
    }
}

/// `audit.jsonl.N`: the N-th newest rotated audit file.
pub fn rotated_path(current: &Path, n: u32) -> PathBuf {
    let mut s = current.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The rotated audit files next to `current` that exist, oldest first.
pub fn rotated_files(current: &Path) -> Vec<PathBuf> {
    let Some(dir) = current.parent() else {
        return Vec::new();
    };
    let Some(name) = current
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let f = e.file_name().to_string_lossy().into_owned();
                    let n: u32 = f.strip_prefix(&name)?.strip_prefix('.')?.parse().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

fn open_private_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The open audit file and its size.
struct LogFile {
    file: std::fs::File,
    len: u64,
}

/// Open flows remembered at most (a lost DESTROY event must not grow memory forever).
const MAX_OPEN_FLOWS: usize = 262_144;

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339: when the connection started (allowed) or when the drops were counted (denied).
    pub time: String,
    /// `ip:port` for a connection, `ip` for aggregated denials.
    pub source: String,
    pub rule: i64,
    pub proto: String,
    pub port: u16,
    /// `target_name:target_port`
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// open (a connection started; its `allowed` line comes when it ends) | allowed |
    /// not-in-allow-list | rate | max-conns | banned | country
    pub verdict: String,
    /// Bytes from the viewer (allowed connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// Bytes to the viewer (allowed connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// Packets dropped since the previous line for this (source, rule, reason) (denials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
    /// The source's country (two letters) by the exit's country database, when it has one and
    /// knows the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Who the source is, as far as the rule knows: `allow:CIDR` for the allow-list entry that
    /// let it in (or the invite's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl AuditRecord {
    /// A one-line human rendering (for `homeport-exit log`).
    pub fn human(&self) -> String {
        let what = format!("rule {} {}/{}", self.rule, self.proto, self.port);
        let who = match (&self.country, &self.label) {
            (None, None) => String::new(),
            (c, l) => format!(
                "  [{}]",
                [c.as_deref(), l.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        };
        if self.verdict == "open" {
            format!(
                "{}  {:<17}  {:<46}  {} -> {}{who}",
                self.time, self.verdict, self.source, what, self.target
            )
        } else if self.verdict == "allowed" {
            format!(
                "{}  {:<17}  {:<46}  {} -> {}  in {}  out {}  {:.1}s",
                self.time,
                self.verdict,
                self.source,
                what,
                self.target,
                human_bytes(self.bytes_in.unwrap_or(0)),
                human_bytes(self.bytes_out.unwrap_or(0)),
                self.duration_s.unwrap_or(0.0)
            ) + &who
        } else {
            format!(
                "{}  {:<17}  {:<46}  {}  {} packets dropped{who}",
                self.time,
                self.verdict,
                self.source,
                what,
                self.packets.unwrap_or(0)
            )
        }
    }
}

/// Bytes for people: `950 B`, `1.2 MB` (powers of 1000).
pub(crate) fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < U.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// What the audit needs to know of an installed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub id: i64,
    pub proto: L4,
    pub port: u16,
    pub target_ipv4: Ipv4Addr,
    pub target_ipv6: Ipv6Addr,
    pub target_port: u16,
    pub target: String,
    pub allow: Vec<ipnet::IpNet>,
}

impl RuleInfo {
    /// `allow:CIDR` of the allow-list entry that holds `ip`.
    fn label(&self, ip: IpAddr) -> Option<String> {
        let ip = ip.to_canonical();
        self.allow
            .iter()
            .find(|n| n.contains(&ip))
            .map(|n| format!("allow:{n}"))
    }
    pub fn from_rule(r: &PublishRule) -> Option<RuleInfo> {
        let proto = match r.proto {
            PublishProto::Tcp => L4::Tcp,
            PublishProto::Udp => L4::Udp,
            PublishProto::Unknown => return None,
        };
        Some(RuleInfo {
            id: r.id,
            proto,
            port: r.port,
            target_ipv4: r.target_ipv4,
            target_ipv6: r.target_ipv6,
            target_port: r.target_port,
            target: format!("{}:{}", r.target_name.as_str(), r.target_port),
            allow: r.guards.allow.clone(),
        })
    }
    fn matches(&self, ev: &CtEvent) -> bool {
        let target: IpAddr = match ev.reply_src {
            IpAddr::V4(_) => self.target_ipv4.into(),
            IpAddr::V6(_) => self.target_ipv6.into(),
        };
        ev.proto == self.proto.as_str()
            && ev.orig_dst.port() == self.port
            && ev.reply_src == target
            && ev.reply_sport == self.target_port
    }
}

/// Per-rule counters for /metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub proto: &'static str,
    pub port: u16,
    pub conns: u64,
    pub denied: [u64; DenyReason::ALL.len()],
    pub bytes_in: u64,
    pub bytes_out: u64,
}

fn reason_index(r: DenyReason) -> usize {
    DenyReason::ALL.iter().position(|x| *x == r).unwrap_or(0)
}

/// The address of an audit `source` (`ip:port` or `ip`).
fn source_ip(s: &str) -> Option<IpAddr> {
    s.parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| s.parse())
        .ok()
}

/// One parsed `conntrack -E -o timestamp,extended,id` line.
#[derive(Debug, Clone, PartialEq)]
pub struct CtEvent {
    pub kind: CtKind,
    /// Microseconds since the epoch, from conntrack's timestamp.
    pub at: i64,
    pub proto: String,
    pub state: Option<String>,
    pub orig_src: SocketAddr,
    pub orig_dst: SocketAddr,
    pub reply_src: IpAddr,
    pub reply_sport: u16,
    pub bytes_orig: Option<u64>,
    pub bytes_reply: Option<u64>,
    pub id: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtKind {
    New,
    Update,
    Destroy,
}

/// `SECS.FRACTION` as microseconds; None when it does not fit (an i64 of microseconds spans
/// ±292,000 years: anything beyond is not a clock reading).
fn parse_micros(ts: &str) -> Option<i64> {
    let (s, f) = ts.split_once('.').unwrap_or((ts, ""));
    let secs: i64 = s.parse().ok()?;
    let mut frac = f.chars().take(6).collect::<String>();
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while frac.len() < 6 {
        frac.push('0');
    }
    secs.checked_mul(1_000_000)?
        .checked_add(frac.parse::<i64>().ok()?)
}

/// Parses one event line; None for anything else (summaries, ICMP without ports, garbage).
pub fn parse_ct_event(line: &str) -> Option<CtEvent> {
    let mut toks = line.split_whitespace().peekable();
    let mut at = None;
    if let Some(t) = toks.peek()
        && let Some(ts) = t.strip_prefix('[').and_then(|t| t.strip_suffix(']'))
        && let Some(v) = parse_micros(ts)
    {
        at = Some(v);
        toks.next();
    }
    let kind = match toks.next()? {
        "[NEW]" => CtKind::New,
        "[UPDATE]" => CtKind::Update,
        "[DESTROY]" => CtKind::Destroy,
        _ => return None,
    };
    let _l3 = toks.next()?;
    let _l3num = toks.next()?;
    let proto = toks.next()?.to_string();
    let _l4num = toks.next()?;
    let mut state = None;
    // [dir][0] = original, [1] = reply
    let mut src: [Option<IpAddr>; 2] = [None, None];
    let mut dst: [Option<IpAddr>; 2] = [None, None];
    let mut sport: [Option<u16>; 2] = [None, None];
    let mut dport: [Option<u16>; 2] = [None, None];
    let mut bytes: [Option<u64>; 2] = [None, None];
    let mut dir = 0usize;
    let mut id = None;
    for t in toks {
        match t.split_once('=') {
            Some(("src", v)) => {
                if src[0].is_some() {
                    dir = 1;
                }
                src[dir] = v.parse().ok();
            }
            Some(("dst", v)) => dst[dir] = v.parse().ok(),
            Some(("sport", v)) => sport[dir] = v.parse().ok(),
            Some(("dport", v)) => dport[dir] = v.parse().ok(),
            Some(("bytes", v)) => bytes[dir] = v.parse().ok(),
            Some(("id", v)) => id = v.parse().ok(),
            Some(_) => {}
            None => {
                if src[0].is_none() && t.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                    state = Some(t.to_string());
                }
            }
        }
    }
    Some(CtEvent {
        kind,
        at: at.unwrap_or_else(|| (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64),
        proto,
        state,
        orig_src: SocketAddr::new(src[0]?, sport[0]?),
        orig_dst: SocketAddr::new(dst[0]?, dport[0]?),
        reply_src: src[1]?,
        reply_sport: sport[1]?,
        bytes_orig: bytes[0],
        bytes_reply: bytes[1],
        id,
    })
}

struct OpenFlow {
    rule: i64,
    start: i64,
    end: Option<i64>,
}

/// The audit log writer, the flow and denial trackers and the metrics.
pub struct Audit {
    file: Mutex<Option<LogFile>>,
    path: PathBuf,
    rotation: Rotation,
    rules: Mutex<Vec<RuleInfo>>,
    stats: Arc<Mutex<BTreeMap<i64, RuleStats>>>,
    open: Mutex<HashMap<(u64, SocketAddr), OpenFlow>>,
    denied_seen: Mutex<HashMap<(DenyReason, i64, IpAddr), u64>>,
    geo: Mutex<Option<Arc<crate::geo::CountryDb>>>,
    grants: Mutex<Vec<homeport_proto::invite::Grant>>,
    alerts: Mutex<(homeport_host::alert::Alerts, u64)>,
    /// Per country (or "unknown"): connections opened, packets denied (the Grafana panels).
    countries: Arc<Mutex<BTreeMap<String, (u64, u64)>>>,
    /// (rule, country) and (rule, source address) seen connecting (from the log at start):
    /// a new one raises an alert.
    seen: Mutex<std::collections::HashSet<(i64, String)>>,
}

impl Audit {
    /// Opens (creates, 0600) `<state_dir>/audit.jsonl` for appending, with the default
    /// rotation.
    pub fn open(state_dir: &Path) -> Result<Audit> {
        Audit::open_rotating(state_dir, Rotation::default())
    }

    /// Opens (creates, 0600) `<state_dir>/audit.jsonl` for appending; it rotates as `rotation`
    /// says.
    pub fn open_rotating(state_dir: &Path, rotation: Rotation) -> Result<Audit> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let path = state_dir.join(AUDIT_FILE);
        let f = open_private_append(&path)
            .with_context(|| format!("opening audit log {}", path.display()))?;
        // An older file may have been created with other permissions.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Audit {
            file: Mutex::new(Some(LogFile { file: f, len })),
            path,
            rotation,
            rules: Mutex::new(Vec::new()),
            stats: Arc::new(Mutex::new(BTreeMap::new())),
            open: Mutex::new(HashMap::new()),
            denied_seen: Mutex::new(HashMap::new()),
            geo: Mutex::new(None),
            grants: Mutex::new(Vec::new()),
            alerts: Mutex::new((homeport_host::alert::Alerts::none(), u64::MAX)),
            // "unknown" from the start: the families always have a sample (and their label).
            countries: Arc::new(Mutex::new(BTreeMap::from([(
                "unknown".to_string(),
                (0, 0),
            )]))),
            seen: Mutex::new(std::collections::HashSet::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The country database the records' `country` comes from (None: no country).
    pub fn set_country_db(&self, db: Option<Arc<crate::geo::CountryDb>>) {
        *self.geo.lock().unwrap() = db;
    }

    /// Where alerts go, and the denied packets per port and read that make a deny spike. Seeds
    /// what was seen from the log, so a restart does not alert on every old source.
    pub fn set_alerts(&self, alerts: homeport_host::alert::Alerts, deny_spike: u64) {
        *self.alerts.lock().unwrap() = (alerts, deny_spike);
        let mut seen = self.seen.lock().unwrap();
        if let Ok(recs) = read_records(&self.path) {
            for r in recs.into_iter().filter_map(|(_, r)| r) {
                if r.verdict == "open" || r.verdict == "allowed" {
                    if let Some(c) = &r.country {
                        seen.insert((r.rule, format!("cc:{c}")));
                    }
                    if let Some(ip) = source_ip(&r.source) {
                        seen.insert((r.rule, format!("ip:{ip}")));
                    }
                }
            }
        }
    }

    /// Counts a connection or denied packets for a country ("unknown" without one). Countries
    /// are two letters, so the label set is bounded (~250).
    fn count_country(&self, c: &Option<String>, conns: u64, denied: u64) {
        let mut m = self.countries.lock().unwrap();
        let e = m
            .entry(c.clone().unwrap_or_else(|| "unknown".into()))
            .or_default();
        e.0 = e.0.saturating_add(conns);
        e.1 = e.1.saturating_add(denied);
    }

    /// Raises an alert (never blocks).
    pub fn alert(&self, kind: &'static str, subject: String, message: String) {
        self.alerts
            .lock()
            .unwrap()
            .0
            .raise(homeport_host::alert::Alert {
                kind,
                subject,
                message,
            });
    }

    /// New country or unknown source on a rule: an alert.
    fn check_new(&self, rec: &AuditRecord) {
        let Some(ip) = source_ip(&rec.source) else {
            return;
        };
        let port = format!("{}/{}", rec.proto, rec.port);
        let mut seen = self.seen.lock().unwrap();
        if let Some(c) = &rec.country
            && seen.insert((rec.rule, format!("cc:{c}")))
        {
            self.alert(
                "new-country",
                format!("{port} {c}"),
                format!("first connection from {c} to {port}: {ip}"),
            );
        }
        if seen.insert((rec.rule, format!("ip:{ip}"))) && rec.label.is_none() {
            self.alert(
                "unknown-source",
                format!("{port} {ip}"),
                format!(
                    "a source never seen before connected to {port}: {ip} ({}), in no allow-list and no invite",
                    rec.country.as_deref().unwrap_or("country unknown")
                ),
            );
        }
    }

    /// The invite grants (their names label the sources they let in).
    pub fn set_grants(&self, g: Vec<homeport_proto::invite::Grant>) {
        *self.grants.lock().unwrap() = g;
    }

    /// Who `ip` is for rule `rule`: `invite:NAME` when an invite let it in, else the allow-list
    /// entry.
    fn label(&self, rule: &RuleInfo, ip: IpAddr) -> Option<String> {
        let ip = ip.to_canonical();
        self.grants
            .lock()
            .unwrap()
            .iter()
            .find(|g| g.rule == rule.id && g.addr == ip)
            .map(|g| format!("invite:{}", g.name))
            .or_else(|| rule.label(ip))
    }

    fn country(&self, ip: IpAddr) -> Option<String> {
        self.geo.lock().unwrap().as_ref()?.country(ip)
    }

    /// The installed rules (the publisher calls this after every apply).
    pub fn set_rules(&self, rules: &[PublishRule]) {
        let infos: Vec<RuleInfo> = rules.iter().filter_map(RuleInfo::from_rule).collect();
        let mut stats = self.stats.lock().unwrap();
        for i in &infos {
            let s = stats.entry(i.id).or_default();
            s.proto = i.proto.as_str();
            s.port = i.port;
        }
        stats.retain(|id, _| infos.iter().any(|i| i.id == *id));
        *self.rules.lock().unwrap() = infos;
    }

    pub fn write(&self, rec: &AuditRecord) {
        let line = match serde_json::to_string(rec) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "audit record not serializable");
                return;
            }
        };
        tracing::info!(target: "audit", "{line}");
        let mut f = self.file.lock().unwrap();
        let need = line.len() as u64 + 1;
        if f.as_ref()
            .is_some_and(|lf| lf.len > 0 && lf.len + need > self.rotation.max_bytes)
        {
            match self.rotate() {
                Ok(file) => *f = Some(LogFile { file, len: 0 }),
                Err(e) => {
                    tracing::warn!(error = %e, path = %self.path.display(), "rotating the audit log failed");
                }
            }
        }
        if let Some(lf) = f.as_mut() {
            match writeln!(lf.file, "{line}") {
                Ok(()) => lf.len += need,
                Err(e) => {
                    tracing::warn!(error = %e, path = %self.path.display(), "writing the audit log failed")
                }
            }
        }
    }

    /// `audit.jsonl` becomes `audit.jsonl.1` (and each `.N` becomes `.N+1`, the oldest beyond
    /// `keep` is deleted); returns a new, empty `audit.jsonl`. Called with the file locked.
    fn rotate(&self) -> std::io::Result<std::fs::File> {
        let keep = self.rotation.keep;
        for old in rotated_files(&self.path) {
            let n: u32 = old
                .to_string_lossy()
                .rsplit('.')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(u32::MAX);
            if n >= keep {
                std::fs::remove_file(&old)?;
            } else {
                std::fs::rename(&old, rotated_path(&self.path, n + 1))?;
            }
        }
        if keep > 0 {
            std::fs::rename(&self.path, rotated_path(&self.path, 1))?;
        } else {
            std::fs::remove_file(&self.path)?;
        }
        open_private_append(&self.path)
    }

    /// Handles one conntrack event; returns the record written, if any.
    pub fn on_ct_event(&self, ev: &CtEvent) -> Option<AuditRecord> {
        let key = (ev.id.unwrap_or(0), ev.orig_src);
        match ev.kind {
            CtKind::New => {
                let (rule, target, label) = {
                    let rules = self.rules.lock().unwrap();
                    let r = rules.iter().find(|r| r.matches(ev))?;
                    (r.id, r.target.clone(), self.label(r, ev.orig_src.ip()))
                };
                if let Some(s) = self.stats.lock().unwrap().get_mut(&rule) {
                    s.conns += 1;
                }
                let mut open = self.open.lock().unwrap();
                if open.len() >= MAX_OPEN_FLOWS {
                    tracing::warn!(
                        "audit: too many open flows tracked (lost conntrack events?); forgetting them"
                    );
                    open.clear();
                }
                open.insert(
                    key,
                    OpenFlow {
                        rule,
                        start: ev.at,
                        end: None,
                    },
                );
                drop(open);
                // The open line: who connected, at once (the `allowed` line with the bytes
                // comes when the flow ends, after TIME_WAIT for TCP).
                let rec = AuditRecord {
                    time: rfc3339(
                        OffsetDateTime::from_unix_timestamp_nanos(ev.at as i128 * 1000)
                            .unwrap_or_else(|_| OffsetDateTime::now_utc()),
                    ),
                    source: ev.orig_src.to_string(),
                    rule,
                    proto: ev.proto.clone(),
                    port: ev.orig_dst.port(),
                    target,
                    verdict: "open".into(),
                    bytes_in: None,
                    bytes_out: None,
                    duration_s: None,
                    packets: None,
                    country: self.country(ev.orig_src.ip()),
                    label,
                };
                self.write(&rec);
                self.check_new(&rec);
                self.count_country(&rec.country, 1, 0);
                Some(rec)
            }
            CtKind::Update => {
                if matches!(
                    ev.state.as_deref(),
                    Some("TIME_WAIT" | "CLOSE" | "LAST_ACK" | "FIN_WAIT")
                ) && let Some(f) = self.open.lock().unwrap().get_mut(&key)
                {
                    f.end.get_or_insert(ev.at);
                }
                None
            }
            CtKind::Destroy => {
                let flow = self.open.lock().unwrap().remove(&key);
                let rules = self.rules.lock().unwrap();
                let (rule_id, start, end) = match flow {
                    Some(f) => (f.rule, f.start, f.end.unwrap_or(ev.at)),
                    // Started before we listened (e.g. a restart): no start time known.
                    None => (rules.iter().find(|r| r.matches(ev))?.id, ev.at, ev.at),
                };
                let info = rules.iter().find(|r| r.id == rule_id);
                let rec = AuditRecord {
                    time: rfc3339(
                        OffsetDateTime::from_unix_timestamp_nanos(start as i128 * 1000)
                            .unwrap_or_else(|_| OffsetDateTime::now_utc()),
                    ),
                    source: ev.orig_src.to_string(),
                    rule: rule_id,
                    proto: ev.proto.clone(),
                    port: ev.orig_dst.port(),
                    target: info.map(|i| i.target.clone()).unwrap_or_default(),
                    verdict: "allowed".into(),
                    bytes_in: Some(ev.bytes_orig.unwrap_or(0)),
                    bytes_out: Some(ev.bytes_reply.unwrap_or(0)),
                    duration_s: Some((end.saturating_sub(start).max(0) / 100_000) as f64 / 10.0),
                    packets: None,
                    country: None,
                    label: info.and_then(|i| self.label(i, ev.orig_src.ip())),
                };
                drop(rules);
                let rec = AuditRecord {
                    country: self.country(ev.orig_src.ip()),
                    ..rec
                };
                if let Some(s) = self.stats.lock().unwrap().get_mut(&rule_id) {
                    // Counters of what conntrack reports: saturate rather than wrap.
                    s.bytes_in = s.bytes_in.saturating_add(rec.bytes_in.unwrap_or(0));
                    s.bytes_out = s.bytes_out.saturating_add(rec.bytes_out.unwrap_or(0));
                }
                self.write(&rec);
                Some(rec)
            }
        }
    }

    /// Turns the current per-source deny counters into records of what is new since the last
    /// call (a counter lower than last time was recreated: all of it is new).
    pub fn on_deny_counts(&self, counts: &[(DenyReason, i64, IpAddr, u64)]) -> Vec<AuditRecord> {
        let now = rfc3339(OffsetDateTime::now_utc());
        let rules = self.rules.lock().unwrap().clone();
        let mut seen = self.denied_seen.lock().unwrap();
        let mut next = HashMap::new();
        let mut recs = Vec::new();
        for &(reason, id, addr, packets) in counts {
            let key = (reason, id, addr);
            // v4 and v6 meters are separate, but one address is only in one of them.
            let prev = seen.get(&key).copied().unwrap_or(0);
            let delta = if packets >= prev {
                packets - prev
            } else {
                packets
            };
            next.insert(key, packets);
            if delta == 0 {
                continue;
            }
            let info = rules.iter().find(|r| r.id == id);
            recs.push(AuditRecord {
                time: now.clone(),
                source: addr.to_string(),
                rule: id,
                proto: info
                    .map(|i| i.proto.as_str().to_string())
                    .unwrap_or_default(),
                port: info.map(|i| i.port).unwrap_or(0),
                target: info.map(|i| i.target.clone()).unwrap_or_default(),
                verdict: reason.as_str().into(),
                bytes_in: None,
                bytes_out: None,
                duration_s: None,
                packets: Some(delta),
                country: None,
                label: None,
            });
            if let Some(s) = self.stats.lock().unwrap().get_mut(&id) {
                s.denied[reason_index(reason)] += delta;
            }
        }
        *seen = next;
        drop(seen);
        for r in recs.iter_mut() {
            r.country = r.source.parse().ok().and_then(|ip| self.country(ip));
            self.write(r);
            self.count_country(&r.country, 0, r.packets.unwrap_or(0));
        }
        let spike = self.alerts.lock().unwrap().1;
        let mut per_port: BTreeMap<(String, u16), (u64, usize)> = BTreeMap::new();
        for r in &recs {
            let e = per_port.entry((r.proto.clone(), r.port)).or_default();
            e.0 += r.packets.unwrap_or(0);
            e.1 += 1;
        }
        for ((proto, port), (packets, sources)) in per_port {
            if packets >= spike {
                self.alert(
                    "deny-spike",
                    format!("{proto}/{port}"),
                    format!(
                        "{packets} packets to {proto}/{port} denied in {} s from {sources} source(s)",
                        DENY_POLL.as_secs()
                    ),
                );
            }
        }
        recs
    }

    /// Reads the deny meters once and logs what is new.
    pub async fn poll_denials(&self, exec: &Exec) -> Result<Vec<AuditRecord>> {
        let exec = exec.clone();
        let counts = tokio::task::spawn_blocking(move || nft::deny_counts(&exec)).await??;
        Ok(self.on_deny_counts(&counts))
    }

    /// Reads the deny meters every [`DENY_POLL`] until `stop`.
    pub async fn run_deny_poller(&self, exec: Exec, stop: CancellationToken) {
        let mut warned = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(DENY_POLL) => {}
            }
            match self.poll_denials(&exec).await {
                Ok(_) => warned = false,
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "reading the deny counters failed");
                }
                Err(_) => {}
            }
        }
    }

    /// Follows `conntrack -E` until `stop`, restarting it if it dies.
    pub async fn run_conntrack(&self, exec: Exec, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let started = std::time::Instant::now();
            match self.conntrack_once(&exec, &stop).await {
                Ok(()) if stop.is_cancelled() => return,
                Ok(()) => tracing::warn!("conntrack -E ended; restarting"),
                Err(e) => {
                    tracing::warn!(error = %e, "conntrack -E failed (is Debian's conntrack package installed?)")
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_millis(500);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn conntrack_once(&self, exec: &Exec, stop: &CancellationToken) -> Result<()> {
        let mut cmd = exec.tokio_command("conntrack");
        // A large socket buffer so bursts of new flows are not lost (ENOBUFS).
        cmd.args([
            "-E",
            "-e",
            "NEW,UPDATE,DESTROY",
            "-o",
            "timestamp,extended,id",
            "-b",
            "8388608",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawning conntrack -E")?;
        let out = child.stdout.take().context("conntrack stdout")?;
        let mut lines = tokio::io::BufReader::new(out).lines();
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    let _ = child.kill().await;
                    return Ok(());
                }
                l = lines.next_line() => match l? {
                    Some(line) => {
                        if let Some(ev) = parse_ct_event(&line) {
                            self.on_ct_event(&ev);
                        }
                    }
                    None => {
                        let _ = child.wait().await;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The exit's metrics (`homeport_exit_*`), read from the per-rule counters at each scrape.
    pub fn metrics_registry(&self) -> homeport_host::metrics::Registry {
        let mut r = homeport_host::metrics::registry("exit");
        r.register_collector(Box::new(ExitMetrics(
            self.stats.clone(),
            self.countries.clone(),
        )));
        r
    }

    /// [`Audit::metrics_registry`] as OpenMetrics text.
    pub fn render_metrics(&self) -> String {
        homeport_host::metrics::render(&self.metrics_registry())
    }
}

/// The per-rule counters, as metrics.
#[derive(Debug)]
struct ExitMetrics(
    Arc<Mutex<BTreeMap<i64, RuleStats>>>,
    Arc<Mutex<BTreeMap<String, (u64, u64)>>>,
);

impl homeport_host::metrics::Collector for ExitMetrics {
    fn encode(
        &self,
        mut enc: homeport_host::metrics::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use homeport_host::metrics::{counter_family, gauge};
        let stats = self.0.lock().unwrap();
        let ids: Vec<String> = stats.keys().map(|id| id.to_string()).collect();
        let ports: Vec<String> = stats.values().map(|r| r.port.to_string()).collect();
        let rules = || {
            stats
                .values()
                .zip(ids.iter().zip(&ports))
                .map(|(r, (id, port))| {
                    (
                        r,
                        [
                            ("rule", id.as_str()),
                            ("proto", r.proto),
                            ("port", port.as_str()),
                        ],
                    )
                })
        };
        gauge(
            &mut enc,
            "rules",
            "Publish rules installed on this exit",
            stats.len() as i64,
        )?;
        counter_family(
            &mut enc,
            "connections",
            "Allowed connections per rule",
            None,
            rules().map(|(r, l)| (l, r.conns)),
        )?;
        counter_family(
            &mut enc,
            "denied_packets",
            "Packets dropped per rule and reason",
            None,
            rules().flat_map(|(r, [rule, proto, port])| {
                DenyReason::ALL.iter().enumerate().map(move |(i, reason)| {
                    (
                        [rule, proto, port, ("reason", reason.as_str())],
                        r.denied[i],
                    )
                })
            }),
        )?;
        counter_family(
            &mut enc,
            "bytes",
            "Bytes of ended connections per rule (direction in = from viewers)",
            None,
            rules().flat_map(|(r, [rule, proto, port])| {
                [("in", r.bytes_in), ("out", r.bytes_out)]
                    .map(|(dir, v)| ([rule, proto, port, ("direction", dir)], v))
            }),
        )?;
        let countries = self.1.lock().unwrap();
        counter_family(
            &mut enc,
            "country_connections",
            "Connections opened to published ports per source country (unknown: not in the country database, or none)",
            None,
            countries
                .iter()
                .map(|(c, v)| ([("country", c.as_str())], v.0)),
        )?;
        counter_family(
            &mut enc,
            "country_denied_packets",
            "Packets to published ports dropped per source country",
            None,
            countries
                .iter()
                .map(|(c, v)| ([("country", c.as_str())], v.1)),
        )
    }
}

/// What the status report (`crate::status`) reads of the audit state.
impl Audit {
    /// Ids of the rules the table holds (set after every apply).
    pub fn installed_rule_ids(&self) -> Vec<i64> {
        self.rules.lock().unwrap().iter().map(|r| r.id).collect()
    }

    /// The published connections among `table` (a `conntrack -L` listing), with the rule each
    /// belongs to and how long it has been open (when its start was seen).
    pub fn live(
        &self,
        table: &[CtEvent],
        now_micros: i64,
    ) -> Vec<homeport_proto::status::LiveConn> {
        let rules = self.rules.lock().unwrap();
        let open = self.open.lock().unwrap();
        table
            .iter()
            // A closed connection lingers in TIME_WAIT for two minutes: it is over.
            .filter(|ev| !matches!(ev.state.as_deref(), Some("TIME_WAIT" | "CLOSE")))
            .filter_map(|ev| {
                let rule = rules.iter().find(|r| r.matches(ev))?.id;
                let start = open
                    .get(&(ev.id.unwrap_or(0), ev.orig_src))
                    .map(|f| f.start);
                Some(homeport_proto::status::LiveConn {
                    rule,
                    source: ev.orig_src.to_string(),
                    bytes_in: ev.bytes_orig.unwrap_or(0),
                    bytes_out: ev.bytes_reply.unwrap_or(0),
                    duration_secs: start
                        .map(|s| (now_micros.saturating_sub(s).max(0) / 1_000_000) as u64),
                })
            })
            .collect()
    }
}

/// Reads the audit log for `homeport-exit log`.
pub fn read_records(path: &Path) -> Result<Vec<(String, Option<AuditRecord>)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| (l.to_string(), serde_json::from_str(l).ok()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::tests::{rule, sample};
    use homeport_proto::publish::Guards;

    const NEW: &str = "[1700000000.500000]\t    [NEW] ipv4     2 tcp      6 120 SYN_SENT src=192.0.2.5 dst=198.51.100.10 sport=36853 dport=32400 [UNREPLIED] src=100.96.0.2 dst=192.0.2.5 sport=32400 dport=36853 id=257805110";
    const CLOSE: &str = "[1700000012.000000]\t [UPDATE] ipv4     2 tcp      6 10 CLOSE src=192.0.2.5 dst=198.51.100.10 sport=36853 dport=32400 src=100.96.0.2 dst=192.0.2.5 sport=32400 dport=36853 [ASSURED] id=257805110";
    const DESTROY: &str = "[1700000022.000000]\t[DESTROY] ipv4     2 tcp      6 src=192.0.2.5 dst=198.51.100.10 sport=36853 dport=32400 packets=7 bytes=420 src=100.96.0.2 dst=192.0.2.5 sport=32400 dport=36853 packets=9 bytes=5468 [ASSURED] delta-time=22 id=257805110";

    #[test]
    fn parses_conntrack_lines() {
        let e = parse_ct_event(NEW).unwrap();
        assert_eq!(e.kind, CtKind::New);
        assert_eq!(e.state.as_deref(), Some("SYN_SENT"));
        assert_eq!(e.orig_src, "192.0.2.5:36853".parse().unwrap());
        assert_eq!(e.orig_dst.port(), 32400);
        assert_eq!(e.reply_src, "100.96.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(e.id, Some(257805110));
        let d = parse_ct_event(DESTROY).unwrap();
        assert_eq!((d.bytes_orig, d.bytes_reply), (Some(420), Some(5468)));
        let v6 = "[1.0] [NEW] ipv6 10 tcp 6 120 SYN_SENT src=2001:db8:2::5 dst=2001:db8:100::10 sport=1 dport=32400 [UNREPLIED] src=fd7a:115c:a1e0::2 dst=2001:db8:2::5 sport=32400 dport=1 id=3";
        assert_eq!(
            parse_ct_event(v6).unwrap().reply_src,
            "fd7a:115c:a1e0::2".parse::<IpAddr>().unwrap()
        );
        assert!(
            parse_ct_event("conntrack v1.4.7 (conntrack-tools): 4 flow events have been shown.")
                .is_none()
        );
        assert!(parse_ct_event("[1.0] [NEW] ipv4 2 icmp 1 30 src=1.2.3.4 dst=5.6.7.8 type=8 code=0 id=1 src=5.6.7.8 dst=1.2.3.4 type=0 code=0 id=1").is_none());
        assert!(parse_ct_event("").is_none());
    }

    /// Found by the `conntrack` fuzz target: a timestamp whose microseconds overflow an i64
    /// panicked (debug) or wrapped (release).
    #[test]
    fn absurd_timestamps_and_counters_are_refused_or_saturate_never_overflow() {
        let huge = NEW.replace("[1700000000.500000]", "[17000000000012.000000]");
        assert_eq!(parse_ct_event(&huge), None);
        assert_eq!(parse_micros("9223372036854.775808"), None);
        assert_eq!(parse_micros("-9223372036855.0"), None);
        // The widest times that fit, start and end at either end, and byte counters at the top.
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open(dir.path()).unwrap();
        a.set_rules(&sample());
        let new = NEW.replace("[1700000000.500000]", "[-9223372036854.000000]");
        let open = a.on_ct_event(&parse_ct_event(&new).unwrap()).unwrap();
        assert_eq!(open.verdict, "open");
        let destroy = DESTROY
            .replace("[1700000022.000000]", "[9223372036854.775807]")
            .replace("bytes=420", "bytes=18446744073709551615");
        let rec = a.on_ct_event(&parse_ct_event(&destroy).unwrap()).unwrap();
        assert!(rec.duration_s.unwrap() > 0.0);
        let again = destroy.replace("[9223372036854.775807]", "[1.0]");
        a.on_ct_event(&parse_ct_event(&again).unwrap()).unwrap();
        assert!(
            a.render_metrics().contains("18446744073709551615"),
            "bytes saturate"
        );
    }

    #[test]
    fn flow_becomes_one_record_with_bytes_and_duration() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open(dir.path()).unwrap();
        a.set_rules(&sample());
        // The open line comes at once, with the allow-list entry that let the source in.
        let open = a.on_ct_event(&parse_ct_event(NEW).unwrap()).unwrap();
        assert_eq!(
            (
                open.verdict.as_str(),
                open.source.as_str(),
                open.time.as_str()
            ),
            ("open", "192.0.2.5:36853", "2023-11-14T22:13:20.5Z")
        );
        assert_eq!(open.label.as_deref(), Some("allow:192.0.2.0/24"));
        assert_eq!((open.bytes_in, open.country.as_deref()), (None, None));
        assert!(a.on_ct_event(&parse_ct_event(CLOSE).unwrap()).is_none());
        let rec = a.on_ct_event(&parse_ct_event(DESTROY).unwrap()).unwrap();
        assert_eq!(rec.verdict, "allowed");
        assert_eq!(rec.rule, 7);
        assert_eq!(rec.source, "192.0.2.5:36853");
        assert_eq!(rec.target, "home:32400");
        assert_eq!((rec.bytes_in, rec.bytes_out), (Some(420), Some(5468)));
        assert_eq!(rec.duration_s, Some(11.5));
        assert_eq!(rec.time, "2023-11-14T22:13:20.5Z");
        // Not a published flow (port 22 of the VPS itself): nothing.
        let other = NEW.replace(
            "dport=32400 [UNREPLIED] src=100.96.0.2",
            "dport=22 [UNREPLIED] src=198.51.100.10",
        );
        assert!(a.on_ct_event(&parse_ct_event(&other).unwrap()).is_none());
        let text = std::fs::read_to_string(a.path()).unwrap();
        assert_eq!(
            text.lines().count(),
            2,
            "the open line and the allowed line: {text}"
        );
        let back: AuditRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(back, open);
        let back: AuditRecord = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(back, rec);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(a.path()).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let m = a.render_metrics();
        assert!(
            m.contains(
                "homeport_exit_connections_total{rule=\"7\",proto=\"tcp\",port=\"32400\"} 1"
            ),
            "{m}"
        );
        assert!(m.contains("direction=\"out\"} 5468"), "{m}");
    }

    #[test]
    fn denials_are_aggregated_per_source_rule_reason() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open(dir.path()).unwrap();
        a.set_rules(&[rule(7, PublishProto::Tcp, 32400, Guards::default())]);
        let src: IpAddr = "192.0.2.6".parse().unwrap();
        let r = a.on_deny_counts(&[(DenyReason::Rate, 7, src, 5)]);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].verdict.as_str(), r[0].packets, r[0].source.as_str()),
            ("rate", Some(5), "192.0.2.6")
        );
        // Nothing new: no line. More: the difference.
        assert!(
            a.on_deny_counts(&[(DenyReason::Rate, 7, src, 5)])
                .is_empty()
        );
        assert_eq!(
            a.on_deny_counts(&[(DenyReason::Rate, 7, src, 8)])[0].packets,
            Some(3)
        );
        // Recreated counter (re-apply or timeout): all of it is new.
        assert_eq!(
            a.on_deny_counts(&[(DenyReason::Rate, 7, src, 2)])[0].packets,
            Some(2)
        );
        assert!(a.render_metrics().contains("reason=\"rate\"} 10"));
        let human = r[0].human();
        assert!(
            human.contains("rate") && human.contains("5 packets dropped"),
            "{human}"
        );
    }

    /// A flood of denials (one line per spoofed source) cannot grow the log past
    /// (keep + 1) × max-bytes: the file rotates, the oldest rotated file goes, and every file
    /// stays 0600.
    #[test]
    fn a_flood_of_denials_rotates_the_log_within_its_bound() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let rot = Rotation {
            max_bytes: 4096,
            keep: 2,
        };
        let a = Audit::open_rotating(dir.path(), rot).unwrap();
        a.set_rules(&[rule(7, PublishProto::Tcp, 32400, Guards::default())]);
        let mut lines = 0u64;
        for i in 0..2000u32 {
            let src = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            lines += a
                .on_deny_counts(&[(DenyReason::NotInAllowList, 7, src, 1)])
                .len() as u64;
        }
        assert_eq!(lines, 2000);
        let cur = dir.path().join(AUDIT_FILE);
        let rotated = rotated_files(&cur);
        assert_eq!(
            rotated,
            vec![rotated_path(&cur, 2), rotated_path(&cur, 1)],
            "keeps exactly 2 rotated files, oldest first"
        );
        let mut total = 0;
        for p in rotated.iter().chain([&cur]) {
            let m = std::fs::metadata(p).unwrap();
            assert!(
                m.len() <= rot.max_bytes,
                "{} has {} bytes",
                p.display(),
                m.len()
            );
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", p.display());
            total += m.len();
            // Whole JSON lines only: a line never straddles two files.
            for l in std::fs::read_to_string(p).unwrap().lines() {
                serde_json::from_str::<AuditRecord>(l).unwrap();
            }
        }
        assert!(total <= 3 * rot.max_bytes);
        // The newest lines are in the current file; the last one is the last source.
        let last = std::fs::read_to_string(&cur).unwrap();
        assert!(last.trim_end().ends_with("\"packets\":1}"));
        assert!(last.contains("\"10.0.7.207\""), "{last}");
        // A reopened audit (exit restart) goes on with the current file's size.
        drop(a);
        let len = std::fs::metadata(&cur).unwrap().len();
        let a = Audit::open_rotating(dir.path(), rot).unwrap();
        a.set_rules(&[rule(7, PublishProto::Tcp, 32400, Guards::default())]);
        while std::fs::metadata(&cur).unwrap().len() >= len {
            let src = IpAddr::from([10, 9, 9, 9]);
            a.on_deny_counts(&[(DenyReason::Rate, 7, src, 1)]);
            a.on_deny_counts(&[(DenyReason::Rate, 7, src, 0)]);
        }
        assert!(std::fs::metadata(rotated_path(&cur, 1)).unwrap().len() <= rot.max_bytes);
        assert!(!rotated_path(&cur, 3).exists());
    }
}
