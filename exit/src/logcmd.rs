//! `homeport-exit log`: prints the audit log, optionally following it.

use crate::audit::{AUDIT_FILE, AuditRecord};
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

/// Prints the log to `out`; with `follow`, keeps going until `stop` returns true.
pub fn print(args: &LogArgs, out: &mut dyn Write, stop: &dyn Fn() -> bool) -> Result<()> {
    let path = args.state_dir.join(AUDIT_FILE);
    let mut f = open(&path, args.follow)?;
    let mut pos = 0u64;
    loop {
        if let Some(file) = f.as_mut() {
            // A truncated or replaced file starts over.
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            if len < pos {
                pos = 0;
            }
            file.seek(SeekFrom::Start(pos))?;
            let mut r = std::io::BufReader::new(&*file);
            let mut line = String::new();
            loop {
                line.clear();
                let n = r.read_line(&mut line)?;
                if n == 0 || !line.ends_with('\n') {
                    break; // a half-written last line is read next time
                }
                pos += n as u64;
                writeln!(out, "{}", render(line.trim_end(), args.json))?;
            }
            out.flush()?;
        }
        if !args.follow || stop() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
        if f.is_none() {
            f = open(&path, true)?;
        }
    }
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
}
