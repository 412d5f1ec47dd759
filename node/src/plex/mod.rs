//! `homeport plex setup` and `homeport plex check`: point a Plex Media Server at the exits that
//! publish its port, and check that Plex sees its viewers' real addresses.
//!
//! The daemon (over its control socket, `Request::Published`) says which exits publish which
//! port of this node, their public addresses, and the live published flows: every viewer an
//! exit forwarded here, with the address it came from. Plex's HTTP API ([`api`]) gives its
//! preferences and sessions. [`plan`] decides, without IO, what to change and what is wrong.

pub mod api;
pub mod plan;
#[cfg(test)]
mod tests;

use crate::cli::StateArg;
use crate::control::{self, Published, Request, Response};
use anyhow::{Context, Result, bail};
use plan::{Change, Finding, Level, Saved, SetupOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File in the node's state dir with the values `setup` replaced (mode 0600), for `--undo`.
pub const UNDO_FILE: &str = "plex-undo.json";
/// How long the check of the published port waits for Plex's answer through the exit: a round
/// trip to the VPS and back, with room for a slow path.
const PORT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args, Debug, Clone)]
pub struct PlexTarget {
    /// The Plex Media Server
    #[arg(long, default_value = "http://127.0.0.1:32400")]
    pub url: String,
    /// File with the server's X-Plex-Token (default: $HOMEPORT_PLEX_TOKEN, else PlexOnlineToken
    /// from Plex's Preferences.xml, readable by root)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Plex's Preferences.xml, when not at the Debian/Ubuntu/RPM or snap location (docker:
    /// <config volume>/Library/Application Support/Plex Media Server/Preferences.xml)
    #[arg(long, value_name = "FILE")]
    pub preferences: Option<PathBuf>,
    #[command(flatten)]
    pub s: StateArg,
}

#[derive(clap::Subcommand, Debug)]
pub enum PlexCmd {
    /// Point Plex at the exit(s) publishing its port: custom server access URLs, Remote Access
    /// and Relay off; shows the plan and asks first. Previous values are saved for --undo
    Setup {
        #[command(flatten)]
        t: PlexTarget,
        /// Apply without asking
        #[arg(long)]
        yes: bool,
        /// Leave Plex's Relay as it is
        #[arg(long)]
        keep_relay: bool,
        /// Leave Remote Access and its manual port mapping as they are
        #[arg(long)]
        keep_port_mapping: bool,
        /// Add the mesh ranges to LAN Networks: mesh devices count as local; viewers through the
        /// exit keep their real addresses and stay remote
        #[arg(long)]
        mesh_as_lan: bool,
        /// Replace the custom URLs with the exits' (default: keep the ones Plex has, add ours)
        #[arg(long)]
        replace_urls: bool,
        /// Restore the values saved by the first `setup`
        #[arg(long, conflicts_with_all = ["keep_relay", "keep_port_mapping", "mesh_as_lan", "replace_urls"])]
        undo: bool,
    },
    /// Compare Plex's sessions with the viewers the exits forwarded, check the custom URLs and
    /// that the published port answers through the exit. Exit status 1 on a problem
    Check {
        #[command(flatten)]
        t: PlexTarget,
        #[arg(long)]
        json: bool,
    },
}

async fn published(state_dir: &Path) -> Result<Published> {
    match control::call(state_dir, &Request::Published).await? {
        Response::Published(p) => Ok(*p),
        Response::Error { message } => bail!("{message}"),
        other => bail!(
            "unexpected answer {other:?} from the daemon (is it older than this `homeport`? restart it)"
        ),
    }
}

fn connect(t: &PlexTarget) -> Result<api::Plex> {
    let token = api::find_token(t.token_file.as_deref(), t.preferences.as_deref())?;
    tracing::debug!(source = %token.source, "Plex token");
    api::Plex::new(&t.url, token.value)
}

fn show(v: &str) -> &str {
    if v.is_empty() { "(empty)" } else { v }
}

fn print_changes(changes: &[Change]) {
    for c in changes {
        println!("  {}: {} -> {}", c.name, show(&c.before), show(&c.after));
        println!("      {}", c.why);
    }
}

fn confirm(yes: bool) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("not applied: no terminal to ask on; pass --yes to apply without asking");
    }
    print!("Apply? [y/N] ");
    std::io::stdout().flush()?;
    let mut a = String::new();
    std::io::stdin().lock().read_line(&mut a)?;
    if !matches!(a.trim(), "y" | "Y" | "yes") {
        bail!("not applied");
    }
    Ok(())
}

fn load_saved(p: &Path) -> Result<Option<Saved>> {
    match std::fs::read(p) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!("{}: not a saved Plex state; remove it", p.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Sets `changes`, reads the preferences back and checks that Plex took every value.
async fn apply(plex: &api::Plex, changes: &[Change]) -> Result<plan::Prefs> {
    let values: Vec<(String, String)> = changes
        .iter()
        .map(|c| (c.name.clone(), c.after.clone()))
        .collect();
    plex.set_prefs(&values).await?;
    let now = plex.prefs().await?;
    println!("Plex now reports:");
    let mut wrong = Vec::new();
    for c in changes {
        let got = now.get(&c.name).cloned().unwrap_or_default();
        println!("  {}: {}", c.name, show(&got));
        let same = match c.after.as_str() {
            "true" | "false" => plan::is_true(&got) == plan::is_true(&c.after),
            a => got == a,
        };
        if !same {
            wrong.push(format!("{} is {:?}, not {:?}", c.name, got, c.after));
        }
    }
    if !wrong.is_empty() {
        bail!("Plex did not take every value: {}", wrong.join("; "));
    }
    Ok(now)
}

pub async fn run(cmd: PlexCmd) -> Result<()> {
    match cmd {
        PlexCmd::Setup {
            t,
            yes,
            keep_relay,
            keep_port_mapping,
            mesh_as_lan,
            replace_urls,
            undo,
        } => {
            let st = crate::state::StateDir::open(&t.s.state_dir)?;
            let undo_path = st.path(UNDO_FILE);
            let plex = connect(&t)?;
            if undo {
                let Some(saved) = load_saved(&undo_path)? else {
                    bail!(
                        "nothing to undo: {} does not exist (`homeport plex setup` saves it when it changes something)",
                        undo_path.display()
                    );
                };
                if saved.url != t.url {
                    println!(
                        "note: the values were saved from {}, restoring them to {}",
                        saved.url, t.url
                    );
                }
                let cur = plex.prefs().await?;
                let changes = saved.restore(&cur);
                if changes.is_empty() {
                    println!("Plex already has the saved values");
                } else {
                    println!("Restore on {}:", t.url);
                    print_changes(&changes);
                    confirm(yes)?;
                    apply(&plex, &changes).await?;
                }
                std::fs::remove_file(&undo_path)
                    .with_context(|| format!("removing {}", undo_path.display()))?;
                println!("restored; removed {}", undo_path.display());
                return Ok(());
            }
            let p = published(&t.s.state_dir).await?;
            let cur = plex.prefs().await?;
            let o = SetupOptions {
                plex_port: plex.port(),
                keep_relay,
                keep_port_mapping,
                mesh_as_lan,
                replace_urls,
            };
            let changes = plan::plan(&cur, &p, &o).map_err(anyhow::Error::msg)?;
            if changes.is_empty() {
                println!(
                    "Plex at {} is set up already: {} = {}",
                    t.url,
                    plan::CUSTOM_URLS,
                    cur.get(plan::CUSTOM_URLS).map(String::as_str).unwrap_or("")
                );
                return Ok(());
            }
            println!("Plan for Plex at {}:", t.url);
            print_changes(&changes);
            if mesh_as_lan {
                println!(
                    "  With the mesh in LAN Networks, your devices on the mesh count as local (no remote bandwidth limits, local playback rules); viewers who come in through the exit keep their real, remote addresses and stay remote."
                );
            }
            confirm(yes)?;
            let mut saved = load_saved(&undo_path)?.unwrap_or_default();
            saved.remember(&t.url, &changes);
            crate::state::write_private(&undo_path, &serde_json::to_vec_pretty(&saved)?)?;
            apply(&plex, &changes).await?;
            println!(
                "previous values saved in {} (`homeport plex setup --undo` restores them)",
                undo_path.display()
            );
        }
        PlexCmd::Check { t, json } => {
            let p = published(&t.s.state_dir).await?;
            let plex = connect(&t)?;
            let prefs = plex.prefs().await?;
            let sessions = plex.sessions().await?;
            let mut findings = plan::check(&prefs, &sessions, &p, plex.port());
            findings.extend(check_ports(&plex, &t.url, &p).await);
            let ok = findings.iter().all(|f| f.level != Level::Problem);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "ok": ok,
                        "findings": findings,
                        "sessions": sessions,
                    }))?
                );
            } else {
                for f in &findings {
                    let l = match f.level {
                        Level::Ok => "ok     ",
                        Level::Warn => "warn   ",
                        Level::Problem => "PROBLEM",
                    };
                    println!("{l} {}: {}", f.subject, f.message);
                }
                if sessions.is_empty() {
                    println!("(no one is playing right now: sessions not checked)");
                }
            }
            if !ok {
                let n = findings
                    .iter()
                    .filter(|f| f.level == Level::Problem)
                    .count();
                bail!("{n} problem(s) found");
            }
        }
    }
    Ok(())
}

/// The published port answers through each exit with this Plex server's identity.
async fn check_ports(plex: &api::Plex, url: &str, p: &Published) -> Vec<Finding> {
    let mine = match plex.identity_at(url).await {
        Ok(id) => id,
        Err(e) => {
            return vec![Finding::new(Level::Problem, "identity", format!("{e:#}"))];
        }
    };
    let mut out = Vec::new();
    for r in plan::plex_rules(p, plex.port()) {
        for ip in &r.exit_public {
            let u = plan::url_for(*ip, r.port);
            let subject = format!("port {u} (exit {})", r.exit);
            let got = tokio::time::timeout(PORT_CHECK_TIMEOUT, plex.identity_at(&u)).await;
            out.push(match got {
                Ok(Ok(id)) if id == mine => {
                    Finding::new(Level::Ok, subject, "answers with this server's identity")
                }
                Ok(Ok(id)) => Finding::new(
                    Level::Problem,
                    subject,
                    format!(
                        "another Plex server answers there (machineIdentifier {id}, this one is {mine})"
                    ),
                ),
                Ok(Err(e)) => unreachable(r, subject, format!("{e:#}")),
                Err(_) => unreachable(
                    r,
                    subject,
                    format!("no answer within {}s", PORT_CHECK_TIMEOUT.as_secs()),
                ),
            });
        }
    }
    out
}

/// The published port did not answer this machine through the exit. With an allow-list on the
/// rule that may be only because this home's own address is not in it: then a warning.
fn unreachable(r: &crate::control::PublishedPort, subject: String, what: String) -> Finding {
    if r.allow.is_empty() {
        Finding::new(
            Level::Problem,
            subject,
            format!(
                "no answer through the exit: {what} (the VPS provider's firewall, or the exit is down: `homeport status`, `homeport-exit log`)"
            ),
        )
    } else {
        let allow: Vec<String> = r.allow.iter().map(|n| n.to_string()).collect();
        Finding::new(
            Level::Warn,
            subject,
            format!(
                "no answer through the exit: {what}; the rule allows only {}, which may leave out this home's own address, so this check cannot tell (`homeport-exit log` on the VPS shows the verdict)",
                allow.join(", ")
            ),
        )
    }
}
