//! homeport coordinator: the HTTPS node and admin API, storage, map streams with deltas, STUN,
//! and the admin CLI. `main` only parses arguments and calls [`run`] or [`cli::admin`].

#![recursion_limit = "256"]

pub mod alerts;
pub mod api;
pub mod challenge;
pub mod cli;
pub mod client;
pub mod config;
pub mod dashboard;
pub mod devices;
pub mod error;
pub mod exits;
pub mod invites;
pub mod limits;
pub mod mesh;
pub mod openapi;
pub mod reach;
pub mod relay;
pub mod replicas;
pub mod routes;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod stun;
pub mod tls;

pub use api::app;
pub use config::{Config, LogFormat};
pub use server::run;
pub use state::{AppState, StateOptions};

/// Logs to stderr, `RUST_LOG` filtering (default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        token.cancel();
    });
}
