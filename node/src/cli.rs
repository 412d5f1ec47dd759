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
    /// Probe a peer; print each reply's path (direct ip:port or relay) and round-trip time
    Ping {
        /// Peer name
        peer: String,
        /// Number of probes (one per second)
        #[arg(short = 'c', long, default_value_t = 5)]
        count: u32,
        #[command(flatten)]
        s: StateArg,
    },
    /// Reflexive address(es), NAT mapping kind (easy/hard), UDP reachability, relay round-trip
    Netcheck {
        /// Another STUN server to ask (any standard one), HOST:PORT; repeatable
        #[arg(long)]
        stun: Vec<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        s: StateArg,
    },
    /// Choose the exit node while running: NODE (an approved exit) carries this machine's
    /// internet traffic; `off` restores the routing exactly as it was
    ExitNode {
        /// A peer's name, or `off`
        #[arg(value_name = "NODE|off")]
        node: String,
        /// While NODE is offline, use this machine's own connection instead of stopping
        #[arg(long)]
        fallback: bool,
        #[command(flatten)]
        s: StateArg,
    },
    /// Stop the daemon cleanly (TUN and routes removed)
    Down {
        #[command(flatten)]
        s: StateArg,
    },
    /// Forget this node's registration and last map (the daemon must be stopped). The private
    /// key stays, so the next `homeport up --authkey-file FILE` registers the same key again;
    /// the node is removed from the mesh only by the coordinator's admin (`node remove NAME`)
    Logout {
        #[command(flatten)]
        s: StateArg,
    },
    /// Point a Plex Media Server at the exit publishing its port, and check that Plex sees its
    /// viewers' real addresses (docs/plex.md)
    Plex {
        #[command(subcommand)]
        cmd: crate::plex::PlexCmd,
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
        Cmd::ExitNode { node, fallback, s } => {
            let node = crate::routes_sync::exit_name(&node);
            let req = Request::ExitNode {
                node: node.clone(),
                fallback,
            };
            match control::call(&s.state_dir, &req).await? {
                Response::Ok => match node {
                    Some(n) => println!("exit node: {n} (see `homeport status`)"),
                    None => println!("exit node: off"),
                },
                Response::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer {other:?}"),
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
        Cmd::Ping { peer, count, s } => {
            let mut last: Option<String> = None;
            let mut replies = 0;
            for i in 0..count {
                if i > 0 {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                match control::call(&s.state_dir, &Request::Ping { peer: peer.clone() }).await? {
                    Response::Pong { path, rtt_ms } => {
                        replies += 1;
                        let kind = path.split(' ').next().unwrap_or("").to_string();
                        if let Some(l) = &last
                            && *l != kind
                        {
                            println!("path changed: {l} -> {kind}");
                        }
                        last = Some(kind);
                        println!("pong from {peer} via {path} in {rtt_ms:.2} ms");
                    }
                    Response::Error { message } => println!("{message}"),
                    other => bail!("unexpected answer {other:?}"),
                }
            }
            if replies == 0 {
                bail!("no reply from {peer}");
            }
        }
        Cmd::Netcheck { stun, json, s } => {
            let mut servers = vec![];
            for x in &stun {
                let a = tokio::net::lookup_host(x)
                    .await
                    .ok()
                    .and_then(|mut i| i.next())
                    .ok_or_else(|| anyhow::anyhow!("--stun {x:?}: expected HOST:PORT of a STUN server, e.g. 198.51.100.10:3478"))?;
                servers.push(a);
            }
            match control::call(&s.state_dir, &Request::Netcheck { stun: servers }).await? {
                Response::Netcheck(n) if json => println!("{}", serde_json::to_string_pretty(&n)?),
                Response::Netcheck(n) => {
                    println!(
                        "UDP: {}",
                        if n.udp {
                            "yes"
                        } else {
                            "no answer from any STUN server (UDP blocked?)"
                        }
                    );
                    for (server, addr) in &n.stun {
                        match addr {
                            Some(a) => println!("reflexive address {a} (STUN {server})"),
                            None => println!("no answer from STUN {server}"),
                        }
                    }
                    for (peer, a) in &n.seen_by_peers {
                        println!("seen by {peer} as {a}");
                    }
                    println!("NAT mapping: {}", n.mapping);
                    match n.relay {
                        Some((a, rtt)) => println!("relay {a}: bound, round trip {rtt:.2} ms"),
                        None => println!("relay: not bound"),
                    }
                }
                Response::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer {other:?}"),
            }
        }
        Cmd::Logout { s } => {
            if control::call(&s.state_dir, &Request::Status).await.is_ok() {
                bail!(
                    "the node daemon is running on {}; stop it first (`homeport down --state-dir {}`)",
                    s.state_dir.display(),
                    s.state_dir.display()
                );
            }
            let st = crate::state::StateDir::open(&s.state_dir)?;
            let removed = st.forget()?;
            if removed.is_empty() {
                println!("no registration in {}", s.state_dir.display());
            } else {
                for p in &removed {
                    println!("removed {}", p.display());
                }
            }
            println!(
                "kept {} (this node's key); the coordinator's admin removes the node with `homeport-coordinator node remove NAME`",
                st.path(crate::state::KEY_FILE).display()
            );
        }
        Cmd::Plex { cmd } => crate::plex::run(cmd).await?,
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
        "{:<16} {:<15} {:<26} {:<28} {:>10} {:>12} {:>12} ONLINE",
        "PEER", "IPv4", "IPv6", "PATH", "HANDSHAKE", "RX", "TX"
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
            match (p.device, p.online) {
                (true, _) => "device",
                (false, true) => "yes",
                (false, false) => "no",
            }
        );
    }
    if let Some(r) = &st.routes {
        o.push_str(&crate::routes_sync::render(r));
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
