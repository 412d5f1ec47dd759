//! The `homeport` command line: `up` runs the daemon; the other commands talk to a running
//! daemon over its control socket.

use crate::config::{NODE_DEFAULTS, UpArgs};
use crate::control::{self, Request, Response, Status};
use crate::datapath::PathInfo;
use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "homeport",
    version,
    about = "homeport node: joins this machine to the homeport WireGuard mesh"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
pub struct StateArg {
    /// State dir of the daemon to talk to
    #[arg(long, default_value = NODE_DEFAULTS.state_dir)]
    pub state_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the node daemon in the foreground (systemd runs it)
    Up(UpArgs),
    /// Print one mesh address: this node's, or a peer's
    Ip {
        /// IPv4 (default)
        #[arg(short = '4', conflicts_with = "v6")]
        v4: bool,
        /// IPv6
        #[arg(short = '6')]
        v6: bool,
        /// A peer's name (default: this node)
        peer: Option<String>,
        #[command(flatten)]
        s: StateArg,
    },
    /// This node, then each peer: mesh IPs, path in use, last handshake, bytes, online
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: StateArg,
    },
    /// Stop the daemon cleanly (TUN and routes removed)
    Down {
        #[command(flatten)]
        s: StateArg,
    },
}

pub async fn status(state_dir: &std::path::Path) -> Result<Status> {
    match control::call(state_dir, &Request::Status).await? {
        Response::Status(s) => Ok(*s),
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// Runs a CLI command (not `up`). Returns the process exit code.
pub async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Up(_) => unreachable!("up is handled by main"),
        Cmd::Ip { v6, peer, s, .. } => {
            let st = status(&s.state_dir).await?;
            let addrs = match peer {
                None => st.me.addrs,
                Some(name) => match st.peers.iter().find(|p| p.name.as_str() == name) {
                    Some(p) => p.addrs,
                    None => {
                        let known: Vec<&str> = st.peers.iter().map(|p| p.name.as_str()).collect();
                        bail!("no peer named {name:?}; peers: {}", known.join(", "))
                    }
                },
            };
            if v6 {
                println!("{}", addrs.ipv6);
            } else {
                println!("{}", addrs.ipv4);
            }
        }
        Cmd::Status { json, s } => {
            let st = status(&s.state_dir).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", render_status(&st));
            }
        }
        Cmd::Down { s } => match control::call(&s.state_dir, &Request::Down).await? {
            Response::Ok => {
                // Wait until the daemon has removed its socket (TUN and routes are gone then).
                let sock = s.state_dir.join(crate::state::SOCK_FILE);
                for _ in 0..100 {
                    if !sock.exists() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                println!("homeport stopped");
            }
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer {other:?}"),
        },
    }
    Ok(())
}

pub fn render_status(st: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} {} {}  tun {} udp {}  coordinator {} ({}, map v{})",
        st.me.name,
        st.me.addrs.ipv4,
        st.me.addrs.ipv6,
        st.me.tun,
        st.me.listen_port,
        st.me.coordinator,
        if st.me.connected {
            "connected"
        } else {
            "unreachable: running on the last map"
        },
        st.me.map_version
    );
    let _ = writeln!(
        o,
        "{:<16} {:<15} {:<26} {:<28} {:>10} {:>12} {:>12} {}",
        "PEER", "IPv4", "IPv6", "PATH", "HANDSHAKE", "RX", "TX", "ONLINE"
    );
    for p in &st.peers {
        let path = match &p.path {
            PathInfo::None => "-".to_string(),
            PathInfo::Direct { addr } => format!("direct {addr}"),
            PathInfo::Relay { reason } => format!("relay ({reason})"),
        };
        let hs = p
            .last_handshake_secs_ago
            .map(|s| format!("{s}s ago"))
            .unwrap_or_else(|| "never".into());
        let _ = writeln!(
            o,
            "{:<16} {:<15} {:<26} {:<28} {:>10} {:>12} {:>12} {}",
            p.name.as_str(),
            p.addrs.ipv4,
            p.addrs.ipv6,
            path,
            hs,
            p.rx_bytes,
            p.tx_bytes,
            if p.online { "yes" } else { "no" }
        );
    }
    o
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received; stopping");
        token.cancel();
    });
}
