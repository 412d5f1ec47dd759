//! `homeport-exit report`: who connected to the published ports, and what stands out.
//!
//! Sans-IO: [`parse_lines`] turns audit lines into records, [`build`] turns records into a
//! per-source model with flags, [`render`] prints it. Only [`run`] reads files and the clock.
//!
//! The flags answer "who is this?" before anyone opens Grafana: a source seen for the first
//! time, a country never seen before, activity at hours when the server is otherwise quiet (the
//! forgotten friend's server that connects every night at 3–9 AM) or at hours new for that
//! source, connections that stay open for hours, and repeated denies. Hours are UTC.

use crate::audit::{AUDIT_FILE, AuditRecord, human_bytes, rotated_files};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A source (or country) first seen within this long before the report is "new", provided the
/// log reaches back further (otherwise everything would be new).
pub const NEW_WINDOW_SECS: i64 = 24 * 3600;
/// A connection open at least this long is flagged: video sessions last a film, not a day, and
/// a tunnel or a server-to-server link that never closes is worth a look.
pub const LONG_CONN_SECS: f64 = 3600.0;
/// An hour is quiet for the server when the other sources made at most this share of their
/// busiest hour's connections within [`QUIET_SPREAD`] hours of it.
pub const QUIET_SHARE: f64 = 0.05;
/// Hours either side that count as "around" an hour: an evening viewer who once starts at
/// 23:00 instead of 21:00 is not unusual, a connection at 4 AM when everyone watches at 20:00 is.
pub const QUIET_SPREAD: usize = 2;
/// A source whose connections fall mostly (at least this share) in quiet hours is flagged.
pub const UNUSUAL_SHARE: f64 = 0.5;
/// Fewest connections of a source (and of all others) before hours are judged: one late film
/// is not a pattern.
pub const MIN_CONNS_FOR_HOURS: u64 = 3;
/// Deny lines (or dropped packets) from one source that make "repeated denies".
pub const REPEATED_DENY_LINES: u64 = 3;
pub const REPEATED_DENY_PACKETS: u64 = 20;

/// Something about a source worth a look.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "flag", rename_all = "kebab-case")]
pub enum Flag {
    /// First seen within the last day.
    NewSource,
    /// Its country had not been seen before the last day.
    NewCountry { country: String },
    /// Most of its connections fall in hours when the other sources are quiet.
    UnusualHours { hours: String },
    /// In the last day it was active at hours it had never used before.
    NewHours { hours: String },
    /// A connection stayed open for hours (or is still open after an hour).
    LongConnection { hours: f64 },
    /// It was denied again and again.
    RepeatedDenies {
        lines: u64,
        packets: u64,
        reasons: Vec<String>,
    },
}

impl Flag {
    pub fn human(&self) -> String {
        match self {
            Flag::NewSource => "new source".into(),
            Flag::NewCountry { country } => format!("new country {country}"),
            Flag::UnusualHours { hours } => {
                format!("unusual hours {hours} (the server is quiet then)")
            }
            Flag::NewHours { hours } => format!("new hours {hours} for this source"),
            Flag::LongConnection { hours } => format!("connection open {hours:.1} h"),
            Flag::RepeatedDenies {
                lines,
                packets,
                reasons,
            } => format!(
                "denied {lines} times ({packets} packets: {})",
                reasons.join(",")
            ),
        }
    }
}

/// One source over the report's period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceReport {
    pub source: IpAddr,
    /// The allow-list label or invite name it came in by, else "unknown".
    pub who: String,
    pub country: Option<String>,
    /// RFC 3339.
    pub first_seen: String,
    pub last_seen: String,
    pub connections: u64,
    pub bytes: u64,
    /// Connections that started in each hour of the day (UTC), 0–23.
    pub hours: [u64; 24],
    /// The active hours as ranges, e.g. `03:00-09:00,20:00-23:00`.
    pub active: String,
    pub denied_packets: u64,
    pub flags: Vec<Flag>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub since: String,
    pub until: String,
    /// Sources with flags first (most flags first), then by last seen, newest first.
    pub sources: Vec<SourceReport>,
}

/// Parses audit lines; lines that are not records (or have no valid time) are skipped.
pub fn parse_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<(i64, AuditRecord)> {
    lines
        .into_iter()
        .filter_map(|l| {
            let r: AuditRecord = serde_json::from_str(l).ok()?;
            let t = OffsetDateTime::parse(&r.time, &Rfc3339).ok()?;
            Some((t.unix_timestamp(), r))
        })
        .collect()
}

fn ip_of(source: &str) -> Option<IpAddr> {
    source
        .parse::<SocketAddr>()
        .map(|s| s.ip())
        .or_else(|_| source.parse::<IpAddr>())
        .ok()
        .map(|ip| ip.to_canonical())
}

fn time_str(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

fn hour_of(t: i64) -> usize {
    (t.rem_euclid(86_400) / 3600) as usize
}

/// `{3,4,5,6,7,8,21}` → `03:00-09:00,21:00-22:00`.
pub fn hour_ranges(hours: &BTreeSet<usize>) -> String {
    let mut out = Vec::new();
    let mut it = hours.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end = it.next().unwrap_or(end);
        }
        out.push(format!("{start:02}:00-{:02}:00", end + 1));
    }
    out.join(",")
}

#[derive(Default)]
struct Acc {
    who: Option<String>,
    country: Option<String>,
    first: i64,
    last: i64,
    /// Connections by (source ip:port, start): the open line and the allowed line of one
    /// connection are one.
    conns: BTreeMap<(String, String), Conn>,
    deny_lines: u64,
    denied_packets: u64,
    reasons: BTreeSet<String>,
}

#[derive(Default, Clone, Copy)]
struct Conn {
    start: i64,
    closed: bool,
    bytes: u64,
    duration: f64,
}

/// The report over `records` from `since` to `now` (unix seconds). Records before `since`
/// only tell what was seen before (for "new" flags).
pub fn build(records: &[(i64, AuditRecord)], since: i64, now: i64) -> Report {
    let earliest = records.iter().map(|r| r.0).min().unwrap_or(now);
    let has_history = earliest < now - NEW_WINDOW_SECS;
    let mut by: BTreeMap<IpAddr, Acc> = BTreeMap::new();
    // When each source and country was first seen connecting, over the whole log.
    let mut first_conn: BTreeMap<IpAddr, i64> = BTreeMap::new();
    let mut first_country: BTreeMap<String, i64> = BTreeMap::new();
    for (t, r) in records {
        let Some(ip) = ip_of(&r.source) else { continue };
        let conn = r.verdict == "open" || r.verdict == "allowed";
        if conn {
            let e = first_conn.entry(ip).or_insert(*t);
            *e = (*e).min(*t);
            if let Some(c) = &r.country {
                let e = first_country.entry(c.clone()).or_insert(*t);
                *e = (*e).min(*t);
            }
        }
        if *t < since || *t > now {
            continue;
        }
        let a = by.entry(ip).or_insert_with(|| Acc {
            first: *t,
            last: *t,
            ..Acc::default()
        });
        a.first = a.first.min(*t);
        a.last = a.last.max(*t);
        if r.country.is_some() {
            a.country = r.country.clone();
        }
        if r.label.is_some() {
            a.who = r.label.clone();
        }
        if conn {
            let c = a
                .conns
                .entry((r.source.clone(), r.time.clone()))
                .or_insert(Conn {
                    start: *t,
                    ..Conn::default()
                });
            if r.verdict == "allowed" {
                c.closed = true;
                c.bytes = r
                    .bytes_in
                    .unwrap_or(0)
                    .saturating_add(r.bytes_out.unwrap_or(0));
                c.duration = r.duration_s.unwrap_or(0.0);
                a.last = a.last.max(*t + c.duration as i64);
            }
        } else {
            a.deny_lines += 1;
            a.denied_packets = a.denied_packets.saturating_add(r.packets.unwrap_or(0));
            a.reasons.insert(r.verdict.clone());
        }
    }
    // Hours of day per source, and of everyone.
    let hours_of = |a: &Acc| {
        let mut h = [0u64; 24];
        for c in a.conns.values() {
            h[hour_of(c.start)] += 1;
        }
        h
    };
    let all_hours: BTreeMap<IpAddr, [u64; 24]> =
        by.iter().map(|(ip, a)| (*ip, hours_of(a))).collect();
    let mut sources: Vec<SourceReport> = by
        .iter()
        .map(|(ip, a)| {
            let hours = all_hours[ip];
            let n: u64 = hours.iter().sum();
            let active: BTreeSet<usize> = (0..24).filter(|h| hours[*h] > 0).collect();
            let mut flags = Vec::new();
            if n > 0
                && has_history
                && first_conn
                    .get(ip)
                    .is_some_and(|f| *f >= now - NEW_WINDOW_SECS)
            {
                flags.push(Flag::NewSource);
            }
            if n > 0
                && has_history
                && let Some(c) = &a.country
                && first_country
                    .get(c)
                    .is_some_and(|f| *f >= now - NEW_WINDOW_SECS)
            {
                flags.push(Flag::NewCountry { country: c.clone() });
            }
            // Quiet hours of the server: by everyone else's connections.
            let mut others = [0u64; 24];
            for (o, h) in &all_hours {
                if o != ip {
                    for i in 0..24 {
                        others[i] += h[i];
                    }
                }
            }
            let others_n: u64 = others.iter().sum();
            let others_max = others.iter().copied().max().unwrap_or(0);
            let around = |h: usize| {
                (h + 24 - QUIET_SPREAD..=h + 24 + QUIET_SPREAD)
                    .map(|i| others[i % 24])
                    .max()
                    .unwrap_or(0)
            };
            if n >= MIN_CONNS_FOR_HOURS && others_n >= MIN_CONNS_FOR_HOURS {
                let quiet = |h: usize| (around(h) as f64) <= QUIET_SHARE * others_max as f64;
                let in_quiet: u64 = (0..24).filter(|h| quiet(*h)).map(|h| hours[h]).sum();
                if in_quiet as f64 >= UNUSUAL_SHARE * n as f64 {
                    let qh: BTreeSet<usize> =
                        active.iter().copied().filter(|h| quiet(*h)).collect();
                    flags.push(Flag::UnusualHours {
                        hours: hour_ranges(&qh),
                    });
                }
            }
            // Hours new for this source: active in the last day at hours its earlier
            // connections (at least a few, over more than a day) never used.
            let recent = now - NEW_WINDOW_SECS;
            let before: Vec<&Conn> = a.conns.values().filter(|c| c.start < recent).collect();
            if before.len() as u64 >= MIN_CONNS_FOR_HOURS {
                let old: BTreeSet<usize> = before.iter().map(|c| hour_of(c.start)).collect();
                let new: BTreeSet<usize> = a
                    .conns
                    .values()
                    .filter(|c| c.start >= recent)
                    .map(|c| hour_of(c.start))
                    .filter(|h| !old.contains(h))
                    .collect();
                if !new.is_empty() {
                    flags.push(Flag::NewHours {
                        hours: hour_ranges(&new),
                    });
                }
            }
            let longest = a
                .conns
                .values()
                .map(|c| {
                    if c.closed {
                        c.duration
                    } else {
                        (now - c.start) as f64
                    }
                })
                .fold(0.0f64, f64::max);
            if longest >= LONG_CONN_SECS {
                flags.push(Flag::LongConnection {
                    hours: (longest / 360.0).round() / 10.0,
                });
            }
            if a.deny_lines >= REPEATED_DENY_LINES || a.denied_packets >= REPEATED_DENY_PACKETS {
                flags.push(Flag::RepeatedDenies {
                    lines: a.deny_lines,
                    packets: a.denied_packets,
                    reasons: a.reasons.iter().cloned().collect(),
                });
            }
            SourceReport {
                source: *ip,
                who: a.who.clone().unwrap_or_else(|| "unknown".into()),
                country: a.country.clone(),
                first_seen: time_str(a.first),
                last_seen: time_str(a.last),
                connections: n,
                bytes: a.conns.values().map(|c| c.bytes).sum(),
                hours,
                active: hour_ranges(&active),
                denied_packets: a.denied_packets,
                flags,
            }
        })
        .collect();
    sources.sort_by(|x, y| {
        y.flags
            .len()
            .cmp(&x.flags.len())
            .then_with(|| y.last_seen.cmp(&x.last_seen))
    });
    Report {
        since: time_str(since),
        until: time_str(now),
        sources,
    }
}

/// The report as a table, flagged sources first, with the flags spelled out under each.
pub fn render(r: &Report) -> String {
    let head = [
        "SOURCE",
        "WHO",
        "COUNTRY",
        "FIRST SEEN",
        "LAST SEEN",
        "CONNS",
        "BYTES",
        "HOURS (UTC)",
        "DENIED",
    ];
    let rows: Vec<[String; 9]> = r
        .sources
        .iter()
        .map(|s| {
            [
                s.source.to_string(),
                s.who.clone(),
                s.country.clone().unwrap_or_else(|| "-".into()),
                s.first_seen.chars().take(16).collect(),
                s.last_seen.chars().take(16).collect(),
                s.connections.to_string(),
                human_bytes(s.bytes),
                if s.active.is_empty() {
                    "-".into()
                } else {
                    s.active.clone()
                },
                s.denied_packets.to_string(),
            ]
        })
        .collect();
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, c) in row.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = format!(
        "connections to published ports from {} to {}\n",
        r.since, r.until
    );
    out.push_str(&line(&head.map(String::from)));
    out.push('\n');
    for (row, s) in rows.iter().zip(&r.sources) {
        out.push_str(&line(row));
        out.push('\n');
        for f in &s.flags {
            out.push_str(&format!("  ! {}\n", f.human()));
        }
    }
    out
}

/// `7d`, `24h`, `30m`, `2w`, `90s` as seconds.
pub fn parse_since(s: &str) -> Result<i64, String> {
    let bad = || format!("invalid duration {s:?}: expected a number with s, m, h, d or w, e.g. 7d");
    let (n, unit) = s.trim().split_at(s.trim().len().saturating_sub(1));
    let n: i64 = n.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).filter(|v| *v > 0).ok_or_else(bad)
}

/// Flags of `homeport-exit report`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// How far back the report goes (s, m, h, d, w)
    #[arg(long, default_value = "7d", value_parser = parse_since)]
    pub since: i64,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// The exit's state dir (where audit.jsonl lives)
    #[arg(long, default_value = homeport_node::config::EXIT_DEFAULTS.state_dir)]
    pub state_dir: PathBuf,
}

/// Reads the audit log (rotated files too) and prints the report.
pub fn run(args: &ReportArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let path = args.state_dir.join(AUDIT_FILE);
    let mut text = String::new();
    for p in rotated_files(&path).into_iter().chain([path.clone()]) {
        match std::fs::read_to_string(&p) {
            Ok(t) => text.push_str(&t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }
    let records = parse_lines(text.lines());
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let r = build(&records, now - args.since, now);
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
    } else {
        write!(out, "{}", render(&r))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    /// 2026-11-01T00:00:00Z
    const T0: i64 = 1_793_491_200;

    fn line(t: i64, source: &str, verdict: &str, extra: serde_json::Value) -> String {
        let mut v = serde_json::json!({
            "time": time_str(t), "source": source, "rule": 1, "proto": "tcp", "port": 32400,
            "target": "home:32400", "verdict": verdict,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v.to_string()
    }

    /// A week of a household watching in the evening, the friend's forgotten server that
    /// connects every night between 3 and 9 AM (the background story), a new viewer from a new
    /// country yesterday, one connection left open for five hours, and a scanner.
    fn week() -> (Vec<String>, i64) {
        let mut l = Vec::new();
        let mut port = 40000;
        let mut conn =
            |l: &mut Vec<String>, t: i64, ip: &str, cc: &str, label: Option<&str>, dur: f64| {
                port += 1;
                let src = format!("{ip}:{port}");
                let mut x = serde_json::json!({"country": cc});
                if let Some(lb) = label {
                    x["label"] = lb.into();
                }
                l.push(line(t, &src, "open", x.clone()));
                // The allowed line is written when the flow ends, with the start time.
                let mut y = x;
                y["bytes_in"] = 1000.into();
                y["bytes_out"] = 2_000_000.into();
                y["duration_s"] = dur.into();
                l.push(line(t, &src, "allowed", y));
            };
        for d in 0..7 {
            let day = T0 + d * DAY;
            for h in [19, 20, 21, 22] {
                conn(
                    &mut l,
                    day + h * 3600 + 300,
                    "192.0.2.10",
                    "DE",
                    Some("allow:192.0.2.0/25"),
                    3000.0,
                );
            }
            conn(
                &mut l,
                day + 20 * 3600 + 900,
                "192.0.2.11",
                "DE",
                None,
                1800.0,
            );
            for h in [3, 5, 7, 8] {
                conn(
                    &mut l,
                    day + h * 3600 + 60,
                    "198.51.100.77",
                    "DE",
                    None,
                    40.0,
                );
            }
        }
        let now = T0 + 7 * DAY;
        conn(
            &mut l,
            now - 5 * 3600,
            "203.0.113.9",
            "CN",
            None,
            5.0 * 3600.0,
        );
        for i in 0..4 {
            l.push(line(
                now - 3600 + i * 10,
                "203.0.113.66",
                "not-in-allow-list",
                serde_json::json!({"packets": 9}),
            ));
        }
        l.push("garbage that is not a record".into());
        (l, now)
    }

    #[test]
    fn the_friends_server_at_3_to_9_am_stands_out() {
        let (lines, now) = week();
        let recs = parse_lines(lines.iter().map(String::as_str));
        let r = build(&recs, now - 7 * DAY, now);
        let by = |ip: &str| {
            r.sources
                .iter()
                .find(|s| s.source == ip.parse::<IpAddr>().unwrap())
                .unwrap()
        };
        let friend = by("198.51.100.77");
        assert_eq!(
            friend.flags,
            vec![Flag::UnusualHours {
                hours: "03:00-04:00,05:00-06:00,07:00-09:00".into()
            }]
        );
        assert_eq!(friend.who, "unknown");
        assert_eq!(friend.connections, 28);
        assert_eq!(friend.active, "03:00-04:00,05:00-06:00,07:00-09:00");
        // The household is quiet in the report.
        let home = by("192.0.2.10");
        assert!(home.flags.is_empty(), "{:?}", home.flags);
        assert_eq!(home.who, "allow:192.0.2.0/25");
        assert_eq!((home.connections, home.bytes), (28, 28 * 2_001_000));
        assert_eq!(home.hours[19], 7);
        assert!(by("192.0.2.11").flags.is_empty());
        // The new Chinese viewer with its five-hour connection.
        let new = by("203.0.113.9");
        assert_eq!(
            new.flags,
            vec![
                Flag::NewSource,
                Flag::NewCountry {
                    country: "CN".into()
                },
                Flag::LongConnection { hours: 5.0 }
            ]
        );
        let scanner = by("203.0.113.66");
        assert!(matches!(
            &scanner.flags[..],
            [Flag::RepeatedDenies {
                lines: 4,
                packets: 36,
                ..
            }]
        ));
        // Flagged sources first; the rendering spells the flags out.
        assert_eq!(r.sources[0].source, new.source);
        assert!(r.sources[..3].iter().any(|s| s.source == friend.source));
        let text = render(&r);
        eprintln!("{text}");
        assert!(text.contains("198.51.100.77") && text.contains("! unusual hours 03:00-04:00"));
        assert!(text.contains("! denied 4 times (36 packets: not-in-allow-list)"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["sources"][0]["flags"][0]["flag"], "new-source");
    }

    #[test]
    fn a_source_active_at_new_hours_is_flagged_and_a_short_log_flags_nothing_new() {
        let (mut lines, now) = week();
        // The household member watches at 4 AM for the first time.
        lines.push(line(
            now - 20 * 3600,
            "192.0.2.10:1",
            "open",
            serde_json::json!({}),
        ));
        let recs = parse_lines(lines.iter().map(String::as_str));
        let r = build(&recs, now - 7 * DAY, now);
        let home = r
            .sources
            .iter()
            .find(|s| s.source.to_string() == "192.0.2.10")
            .unwrap();
        assert!(
            home.flags
                .iter()
                .any(|f| matches!(f, Flag::NewHours { .. })),
            "{:?}",
            home.flags
        );
        // With only the last hours in the log nothing can be "new".
        let recent: Vec<_> = recs
            .iter()
            .filter(|r| r.0 > now - 6 * 3600)
            .cloned()
            .collect();
        let r = build(&recent, now - DAY, now);
        assert!(
            r.sources
                .iter()
                .all(|s| !s.flags.contains(&Flag::NewSource))
        );
    }

    #[test]
    fn since_and_hour_ranges() {
        assert_eq!(parse_since("7d"), Ok(7 * DAY));
        assert_eq!(parse_since("90s"), Ok(90));
        for bad in ["", "7", "d", "-1d", "0h", "7y"] {
            assert!(parse_since(bad).unwrap_err().contains("e.g. 7d"), "{bad}");
        }
        let h: BTreeSet<usize> = [0, 1, 2, 23].into();
        assert_eq!(hour_ranges(&h), "00:00-03:00,23:00-24:00");
    }
}
