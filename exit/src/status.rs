//! The exit's status report: every [`REPORT_EVERY_SECS`] it tells the coordinator which publish
//! rules its table holds, the published connections open right now (from `conntrack -L`: viewer,
//! bytes each way, duration) and its last audit lines (`POST /api/v1/node/exit-status`, with the
//! credential of the exit's node). The dashboard shows them live.

use crate::audit::{Audit, AuditRecord, CtEvent, parse_ct_event};
use crate::nft::Exec;
use homeport_proto::status::{
    AuditLine, ExitStatusReport, MAX_REPORT_LIVE, MAX_REPORT_RECENT, PATH_EXIT_STATUS,
    REPORT_EVERY_SECS,
};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How much of the audit log's end is read for the recent lines: a few dozen lines.
const TAIL_BYTES: u64 = 16 * 1024;

/// The last `n` records of the audit log (newest last), reading only its end.
pub fn recent_lines(path: &Path, n: usize) -> Vec<AuditLine> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut text = String::new();
    if f.take(TAIL_BYTES).read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    // A cut first line is not JSON and is skipped.
    let recs: Vec<AuditLine> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<AuditRecord>(l).ok())
        .map(|r| AuditLine {
            time: r.time,
            source: r.source,
            rule: r.rule,
            verdict: r.verdict,
            bytes_in: r.bytes_in,
            bytes_out: r.bytes_out,
            duration_s: r.duration_s,
            packets: r.packets,
        })
        .collect();
    recs[recs.len().saturating_sub(n)..].to_vec()
}

/// The conntrack table as events (`conntrack -L` lines read like NEW events).
async fn conntrack_table(exec: &Exec) -> Vec<CtEvent> {
    let out = exec
        .tokio_command("conntrack")
        .args(["-L", "-o", "extended,id"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| parse_ct_event(&format!("[NEW] {l}")))
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "conntrack -L failed");
            Vec::new()
        }
    }
}

pub fn report(audit: &Audit, table: &[CtEvent], now_micros: i64) -> ExitStatusReport {
    let mut live = audit.live(table, now_micros);
    let omitted = live.len().saturating_sub(MAX_REPORT_LIVE);
    live.truncate(MAX_REPORT_LIVE);
    ExitStatusReport {
        version: format!("homeport-exit {}", env!("CARGO_PKG_VERSION")),
        rules_applied: {
            let mut ids = audit.installed_rule_ids();
            ids.truncate(homeport_proto::status::MAX_REPORT_RULES);
            ids
        },
        error: None,
        live,
        live_omitted: omitted as u64,
        recent: recent_lines(audit.path(), MAX_REPORT_RECENT),
    }
}

/// Reports until `stop`, as the exit's node (the daemon's [`Api`], once it has registered).
pub async fn run(
    api: tokio::sync::watch::Receiver<Option<homeport_node::coordinator::Api>>,
    audit: Arc<Audit>,
    exec: Exec,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(REPORT_EVERY_SECS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let Some(api) = api.borrow().clone() else {
            continue;
        };
        let table = conntrack_table(&exec).await;
        let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
        let rep = report(&audit, &table, now);
        if let Err(e) = api.post(PATH_EXIT_STATUS, &rep).await {
            tracing::debug!(error = %e, "exit status report failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::tests::sample;

    /// A `conntrack -L -o extended,id` line of a published flow (rule 7 of `sample()`).
    const LISTED: &str = "ipv4     2 tcp      6 431990 ESTABLISHED src=192.0.2.5 dst=198.51.100.10 sport=36853 dport=32400 packets=7 bytes=420 src=100.96.0.2 dst=192.0.2.5 sport=32400 dport=36853 packets=9 bytes=5468 [ASSURED] mark=0 use=1 id=257805110";
    const NEW: &str = "[1700000000.500000]\t    [NEW] ipv4     2 tcp      6 120 SYN_SENT src=192.0.2.5 dst=198.51.100.10 sport=36853 dport=32400 [UNREPLIED] src=100.96.0.2 dst=192.0.2.5 sport=32400 dport=36853 id=257805110";

    #[test]
    fn live_connections_come_from_the_table_with_rule_bytes_and_duration() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open(dir.path()).unwrap();
        a.set_rules(&sample());
        a.on_ct_event(&parse_ct_event(NEW).unwrap());
        let table: Vec<CtEvent> = [
            LISTED.to_string(),
            // Over: lingering in TIME_WAIT.
            LISTED
                .replace("ESTABLISHED", "TIME_WAIT")
                .replace("36853", "40000"),
            // Not published (the VPS's own SSH).
            LISTED
                .replace("dport=32400", "dport=22")
                .replace("src=100.96.0.2", "src=198.51.100.10"),
        ]
        .iter()
        .filter_map(|l| parse_ct_event(&format!("[NEW] {l}")))
        .collect();
        assert_eq!(table.len(), 3);
        let r = report(&a, &table, 1_700_000_012_500_000);
        assert_eq!(r.rules_applied.len(), sample().len());
        assert_eq!(r.live.len(), 1, "{:?}", r.live);
        let c = &r.live[0];
        assert_eq!((c.rule, c.source.as_str()), (7, "192.0.2.5:36853"));
        assert_eq!((c.bytes_in, c.bytes_out), (420, 5468));
        assert_eq!(c.duration_secs, Some(12));
        assert!(r.problem().is_none());
    }

    #[test]
    fn recent_lines_are_the_newest_of_the_log_end() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open(dir.path()).unwrap();
        for i in 0..500 {
            a.write(&AuditRecord {
                time: format!("t{i}"),
                source: "203.0.113.9".into(),
                rule: 7,
                proto: "tcp".into(),
                port: 32400,
                target: String::new(),
                verdict: "banned".into(),
                bytes_in: None,
                bytes_out: None,
                duration_s: None,
                packets: Some(i),
                country: None,
                label: None,
            });
        }
        let r = recent_lines(a.path(), MAX_REPORT_RECENT);
        assert_eq!(r.len(), MAX_REPORT_RECENT);
        assert_eq!(r.last().unwrap().time, "t499");
        assert_eq!(r[0].time, format!("t{}", 500 - MAX_REPORT_RECENT));
        assert!(recent_lines(&dir.path().join("none"), 5).is_empty());
    }
}
