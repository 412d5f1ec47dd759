//! `homeport-exit log`: prints the audit log, optionally following it.

use crate::audit::{AUDIT_FILE, AuditRecord, rotated_files};
use anyhow::{Context, Result};
use std::io::{BufRead, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Flags of `homeport-exit log`.
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Keep printing new lines as they are written
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print the raw JSON lines
    #[arg(long)]
    pub json: bool,
    /// The exit's state dir (where audit.jsonl lives)
    #[arg(long, default_value = homeport_node::config::EXIT_DEFAULTS.state_dir)]
    pub state_dir: PathBuf,
}

/// Renders one stored line: raw with `json`, else human-readable (unparsable lines as they are).
pub fn render(line: &str, json: bool) -> String {
    if json {
        return line.to_string();
    }
    match serde_json::from_str::<AuditRecord>(line) {
        Ok(r) => r.human(),
        Err(_) => line.to_string(),
    }
}

/// Prints the log to `out`, the rotated files (oldest first) before the current one; with
/// `follow`, keeps going until `stop` returns true, also across rotations.
pub fn print(args: &LogArgs, out: &mut dyn Write, stop: &dyn Fn() -> bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let path = args.state_dir.join(AUDIT_FILE);
    let rotated = rotated_files(&path);
    for old in &rotated {
        // Rotated away meanwhile: it is in a later file now.
        if let Ok(mut f) = std::fs::File::open(old) {
            read_new_lines(&mut f, &mut 0, out, args.json)?;
        }
    }
    let mut f = open(&path, args.follow || !rotated.is_empty())?;
    let mut pos = 0u64;
    loop {
        if let Some(file) = f.as_mut() {
            read_new_lines(file, &mut pos, out, args.json)?;
            // Rotated (the path is another file now, or none yet): finish the old file, which
            // is complete, then start on the new one.
            let now = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
            let was = file.metadata().ok().map(|m| (m.dev(), m.ino()));
            if args.follow && now != was {
                read_new_lines(file, &mut pos, out, args.json)?;
                f = open(&path, true)?;
                pos = 0;
                continue;
            }
        }
        out.flush()?;
        if !args.follow || stop() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
        if f.is_none() {
            f = open(&path, true)?;
        }
    }
}

/// Prints the complete lines of `file` from `pos` on and advances `pos` past them.
fn read_new_lines(
    file: &mut std::fs::File,
    pos: &mut u64,
    out: &mut dyn Write,
    json: bool,
) -> Result<()> {
    // A truncated or replaced file starts over.
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len < *pos {
        *pos = 0;
    }
    file.seek(SeekFrom::Start(*pos))?;
    let mut r = std::io::BufReader::new(&*file);
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            break; // a half-written last line is read next time
        }
        *pos += n as u64;
        writeln!(out, "{}", render(line.trim_end(), json))?;
    }
    Ok(())
}

fn open(path: &Path, follow: bool) -> Result<Option<std::fs::File>> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && follow => Ok(None),
        Err(e) => Err(e).with_context(|| {
            format!(
                "reading {} (pass --state-dir if the exit keeps its state elsewhere)",
                path.display()
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_human_and_json() {
        let d = tempfile::tempdir().unwrap();
        let line = r#"{"time":"2024-01-01T00:00:00Z","source":"192.0.2.6","rule":7,"proto":"tcp","port":32400,"verdict":"rate","packets":3}"#;
        std::fs::write(d.path().join(AUDIT_FILE), format!("{line}\nnot json\n")).unwrap();
        let mut args = LogArgs {
            follow: false,
            json: false,
            state_dir: d.path().into(),
        };
        let mut out = Vec::new();
        print(&args, &mut out, &|| true).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("rate") && s.contains("3 packets dropped") && s.contains("not json"),
            "{s}"
        );
        args.json = true;
        let mut out = Vec::new();
        print(&args, &mut out, &|| true).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap().lines().next().unwrap(),
            line
        );
        let missing = LogArgs {
            follow: false,
            json: false,
            state_dir: d.path().join("nope"),
        };
        assert!(
            print(&missing, &mut Vec::new(), &|| true)
                .unwrap_err()
                .to_string()
                .contains("--state-dir")
        );
    }

    /// `log` prints the rotated files before the current one, and `log --follow` goes on
    /// across rotations without losing or repeating a line.
    #[test]
    fn log_and_follow_read_across_rotations() {
        use crate::audit::{Audit, Rotation};
        let d = tempfile::tempdir().unwrap();
        let rot = Rotation {
            max_bytes: 1024,
            keep: 3,
        };
        let a = std::sync::Arc::new(Audit::open_rotating(d.path(), rot).unwrap());
        let rec = |i: u32| AuditRecord {
            time: "2024-01-01T00:00:00Z".into(),
            source: format!("192.0.2.{}", i % 250),
            rule: i as i64,
            proto: "tcp".into(),
            port: 32400,
            target: String::new(),
            verdict: "rate".into(),
            bytes_in: None,
            bytes_out: None,
            duration_s: None,
            packets: Some(1),
            country: None,
            label: None,
        };
        // 20 lines (~120 bytes each): two rotations before `log` runs.
        for i in 0..20 {
            a.write(&rec(i));
        }
        let args = LogArgs {
            follow: false,
            json: true,
            state_dir: d.path().into(),
        };
        let rules_of = |out: &[u8]| -> Vec<i64> {
            String::from_utf8_lossy(out)
                .lines()
                .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().rule)
                .collect()
        };
        let mut out = Vec::new();
        print(&args, &mut out, &|| true).unwrap();
        assert_eq!(rules_of(&out), (0..20).collect::<Vec<_>>());

        // Follow while the writer rotates three more times.
        let follow = LogArgs {
            follow: true,
            ..args
        };
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (a, done) = (a.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 20..50 {
                    a.write(&rec(i));
                    std::thread::sleep(Duration::from_millis(40));
                }
                std::thread::sleep(Duration::from_millis(700));
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        let mut out = Vec::new();
        let d2 = done.clone();
        print(&follow, &mut out, &move || {
            d2.load(std::sync::atomic::Ordering::SeqCst)
        })
        .unwrap();
        writer.join().unwrap();
        // The oldest lines rotated away before follow started may be gone (keep 3); from
        // there on every line exactly once, in order.
        let got = rules_of(&out);
        let first = got[0];
        assert_eq!(got, (first..50).collect::<Vec<_>>(), "{got:?}");
        assert!(first <= 20);
    }
}
