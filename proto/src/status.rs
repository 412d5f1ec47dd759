//! Live status: what nodes and exits report to the coordinator, and the admin overview built
//! from it (the dashboard and `homeport-coordinator status` read the same overview).
//!
//! Nodes report what only they know — the path to each peer, handshakes, traffic, their version —
//! and an exit adds which publish rules its nftables table holds, the published connections live
//! right now and its recent audit lines. Reports are kept in memory only: they are a view of
//! now, never state (a restart of the coordinator forgets them until the next report).

use crate::api::NodeInfo;
use crate::names::{NodeId, NodeName};
use crate::publish::PublishRule;
use serde::{Deserialize, Serialize};

/// `POST` [`NodeStatusReport`] with the node credential.
pub const PATH_NODE_STATUS: &str = "/api/v1/node/status";
/// `POST` [`ExitStatusReport`] with the node credential of the exit.
pub const PATH_EXIT_STATUS: &str = "/api/v1/node/exit-status";
/// `GET` [`Overview`] (admin).
pub const PATH_ADMIN_OVERVIEW: &str = "/api/v1/admin/overview";

/// How often nodes and exits report: a dashboard polling every second or two sees a new
/// connection within about two seconds, and a report is a few hundred bytes per peer.
pub const REPORT_EVERY_SECS: u64 = 2;
/// A report older than this is shown as stale (the node missed several reports: offline or
/// an old version that does not report).
pub const REPORT_STALE_SECS: u64 = 10;

/// Most peers one report may carry (also bounded by the API's 64 KiB body limit).
pub const MAX_REPORT_PEERS: usize = 256;
/// Most live connections one exit report carries; the rest are counted in `live_omitted`.
pub const MAX_REPORT_LIVE: usize = 100;
/// Most recent audit lines one exit report carries.
pub const MAX_REPORT_RECENT: usize = 20;
/// Longest text field of a report in characters (version strings, reasons, addresses).
pub const MAX_REPORT_TEXT: usize = 200;
/// Longest error text of an exit report, in characters.
pub const MAX_REPORT_ERROR: usize = 1000;
/// Most rule ids in an exit report (an exit with more rules than this is not a home setup; the
/// largest report must stay under the API's 64 KiB body limit).
pub const MAX_REPORT_RULES: usize = 1024;

/// How a node reaches one peer right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// No path yet (no endpoint known, no handshake).
    None,
    Direct,
    Relay,
}

/// One peer as seen by the reporting node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerPathReport {
    pub peer: NodeId,
    pub path: PathKind,
    /// The direct path's `ip:port` (path = direct).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Why the relay is used (path = relay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds since the last completed WireGuard handshake; None = never.
    #[serde(default)]
    pub last_handshake_secs_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// `POST /api/v1/node/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeStatusReport {
    /// The node's program version (`homeport 0.1.0`).
    pub version: String,
    pub peers: Vec<PeerPathReport>,
}

/// A published connection open right now on the exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveConn {
    pub rule: i64,
    /// The viewer's `ip:port`.
    pub source: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Seconds since the connection started (None when it started before the exit listened).
    #[serde(default)]
    pub duration_secs: Option<u64>,
}

/// One recent line of the exit's audit log (see `homeport-exit log`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditLine {
    pub time: String,
    pub source: String,
    pub rule: i64,
    /// allowed | not-in-allow-list | rate | max-conns | banned
    pub verdict: String,
    #[serde(default)]
    pub bytes_in: Option<u64>,
    #[serde(default)]
    pub bytes_out: Option<u64>,
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// Packets dropped (denials).
    #[serde(default)]
    pub packets: Option<u64>,
}

/// `POST /api/v1/node/exit-status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatusReport {
    /// The exit's program version (`homeport-exit 0.1.0`).
    pub version: String,
    /// Ids of the publish rules its nftables table holds now.
    pub rules_applied: Vec<i64>,
    /// The last error applying the table, if the last attempt failed.
    #[serde(default)]
    pub error: Option<String>,
    pub live: Vec<LiveConn>,
    /// Live connections beyond [`MAX_REPORT_LIVE`], not listed.
    #[serde(default)]
    pub live_omitted: u64,
    /// Newest last.
    pub recent: Vec<AuditLine>,
}

/// `field: at most N characters` when `s` is longer than `max` characters.
fn text(field: &str, s: &str, max: usize) -> Result<(), String> {
    if s.chars().count() > max {
        return Err(format!("{field}: at most {max} characters"));
    }
    Ok(())
}

impl NodeStatusReport {
    /// What is wrong with a report (the field and what is accepted), if anything.
    pub fn problem(&self) -> Option<String> {
        self.check().err()
    }

    fn check(&self) -> Result<(), String> {
        text("version", &self.version, MAX_REPORT_TEXT)?;
        if self.peers.len() > MAX_REPORT_PEERS {
            return Err(format!(
                "peers: {} reported; at most {MAX_REPORT_PEERS} are accepted",
                self.peers.len()
            ));
        }
        for (i, p) in self.peers.iter().enumerate() {
            text(
                &format!("peers[{i}].addr"),
                p.addr.as_deref().unwrap_or(""),
                MAX_REPORT_TEXT,
            )?;
            text(
                &format!("peers[{i}].reason"),
                p.reason.as_deref().unwrap_or(""),
                MAX_REPORT_TEXT,
            )?;
        }
        Ok(())
    }
}

impl ExitStatusReport {
    /// What is wrong with a report (the field and what is accepted), if anything.
    pub fn problem(&self) -> Option<String> {
        self.check().err()
    }

    fn check(&self) -> Result<(), String> {
        text("version", &self.version, MAX_REPORT_TEXT)?;
        text(
            "error",
            self.error.as_deref().unwrap_or(""),
            MAX_REPORT_ERROR,
        )?;
        if self.live.len() > MAX_REPORT_LIVE {
            return Err(format!(
                "live: {} connections listed; at most {MAX_REPORT_LIVE} (count the rest in live_omitted)",
                self.live.len()
            ));
        }
        if self.recent.len() > MAX_REPORT_RECENT {
            return Err(format!(
                "recent: {} lines; at most {MAX_REPORT_RECENT}",
                self.recent.len()
            ));
        }
        if self.rules_applied.len() > MAX_REPORT_RULES {
            return Err(format!("rules_applied: at most {MAX_REPORT_RULES} ids"));
        }
        for (i, c) in self.live.iter().enumerate() {
            text(&format!("live[{i}].source"), &c.source, MAX_REPORT_TEXT)?;
        }
        for (i, l) in self.recent.iter().enumerate() {
            text(&format!("recent[{i}].time"), &l.time, MAX_REPORT_TEXT)?;
            text(&format!("recent[{i}].source"), &l.source, MAX_REPORT_TEXT)?;
            text(&format!("recent[{i}].verdict"), &l.verdict, MAX_REPORT_TEXT)?;
        }
        Ok(())
    }
}

/// One peer path in the overview: the report's line with the peer's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPathView {
    pub peer_name: NodeName,
    #[serde(flatten)]
    pub report: PeerPathReport,
}

/// A node in the overview.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeOverview {
    #[serde(flatten)]
    pub info: NodeInfo,
    /// Its program version, from its last report (None: it never reported).
    pub version: Option<String>,
    /// Seconds since its last report.
    pub reported_secs_ago: Option<u64>,
    /// The paths of its last report (stale after [`REPORT_STALE_SECS`], see `reported_secs_ago`).
    pub peers: Vec<PeerPathView>,
    /// For an exit: its version, the table's state and the error of the last apply.
    pub exit: Option<ExitHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitHealth {
    pub version: String,
    pub reported_secs_ago: u64,
    /// Every rule of this exit is in its table.
    pub rules_in_sync: bool,
    pub error: Option<String>,
}

/// A live connection in the overview, with the allow-list entry that let it in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveConnView {
    #[serde(flatten)]
    pub conn: LiveConn,
    /// The allow-list entry the viewer matched ("anyone" for a rule without one).
    pub label: String,
}

/// A publish rule in the overview.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishOverview {
    #[serde(flatten)]
    pub rule: PublishRule,
    /// Whether the exit's table holds it (None: the exit has not reported).
    pub applied: Option<bool>,
    pub live: Vec<LiveConnView>,
    /// Recent audit lines of this rule, newest last.
    pub recent: Vec<AuditLine>,
}

/// `GET /api/v1/admin/overview`: everything the dashboard shows, in one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    pub coordinator_version: String,
    /// The URL nodes join with and the coordinator's TLS pin (for `homeport up`).
    pub join_url: Option<String>,
    pub pin: Option<String>,
    /// Unix seconds when this was made.
    pub now: i64,
    pub nodes: Vec<NodeOverview>,
    pub publish: Vec<PublishOverview>,
    /// Peer paths reported over the relay, of all reported paths with a handshake.
    pub relayed_paths: u64,
    pub direct_paths: u64,
}
