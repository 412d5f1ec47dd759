//! What every homeport binary does with the machine it runs on, written once: its command line
//! ([`cli::parse_or_print_completions`]), private files
//! ([`fs::write_private`]), the interface addresses ([`net::interface_addrs`]), the
//! `--metrics-listen` endpoint ([`metrics`]), the `nft` runner ([`nft::run`]) and webhook alerts
//! ([`alert`]). Wire types and pure rules stay in
//! `homeport-proto`, which does no IO; this crate is the small shared piece that does.

pub mod alert;
pub mod cli;
pub mod fs;
pub mod metrics;
pub mod net;
pub mod nft;
