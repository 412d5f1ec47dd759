//! The homeport node: `homeport up` and its CLI, as a library (the exit embeds it).
//!
//! Layout:
//! - the engine is the crate `homeport-engine` (`engine/`): sans-IO. It owns the WireGuard
//!   sessions, routing by destination, the packet filter, publish admission, flow tracking and
//!   path choice; time and randomness come in from here.
//! - [`datapath`]: the thin IO shell around the engine: TUN device (tun-rs, offload), one UDP
//!   socket (quinn-udp, GSO/GRO), addresses and routes.
//! - [`daemon`]: `homeport up`: one event loop that owns the node's state (registration, map,
//!   stream state) and acts on messages from the IO modules:
//!   - [`coordinator`]: registration, the map stream, the node's API calls;
//!   - [`control`]: the control socket (and its client);
//!   - [`endpoints`]: candidates, STUN ([`stun`]), NAT depth ([`natdepth`]), endpoint reports;
//!   - [`relay_tcp`]: the relay's TCP/TLS fallback; [`metrics`]; [`report`]; [`netcheck`].
//! - [`cli`]: the CLI commands that talk to a running daemon over its unix socket.
//! - [`routes_sync`]: subnet routes and the exit node: advertising, kernel routes and rules,
//!   forwarding, fed by the map watch channel.
//! - [`plex`]: `homeport plex setup`/`check` (Plex's HTTP API and the daemon's published flows).

pub mod cli;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod endpoints;
pub mod metrics;
pub mod natdepth;
pub mod netcheck;
pub mod plex;
pub mod relay_tcp;
pub mod replicas;
pub mod report;
pub mod routes_sync;
pub mod state;
pub mod stun;
