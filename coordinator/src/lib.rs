//! homeport coordinator: the HTTPS node and admin API, storage, map streams with deltas, STUN,
//! and the admin CLI. `main` only parses arguments and calls [`run`] or the CLI.

pub mod api;
pub mod error;
pub mod mesh;
pub mod openapi;
pub mod state;
pub mod store;

pub use api::app;
pub use state::{AppState, StateOptions};
