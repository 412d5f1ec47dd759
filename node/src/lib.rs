//! The homeport node: `homeport up` and its CLI, as a library (the exit embeds it).
//!
//! Layout:
//! - the engine is the crate `homeport-engine` (`engine/`): sans-IO. It owns the WireGuard
//!   sessions, routing by destination, the packet filter, publish admission, flow tracking and
//!   path choice; time and randomness come in from here.
//! - [`datapath`]: the thin IO shell around the engine: TUN device (tun-rs, offload), one UDP
//!   socket (quinn-udp, GSO/GRO), addresses and routes.
//! - [`daemon`]: `homeport up`: state dir, registration, map stream, persistence, control socket.
//! - [`cli`]: the CLI commands that talk to a running daemon over its unix socket.
//! - [`plex`]: `homeport plex setup`/`check` (Plex's HTTP API and the daemon's published flows).

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod plex;
pub mod report;
pub mod state;
pub mod stun;
