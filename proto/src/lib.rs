//! Every homeport type that crosses a process boundary: coordinator ⇄ node API, the map and its
//! deltas, admin API bodies, policy, publish rules, the packet filter, disco and relay framing.
//!
//! No IO and no CLI parsing live here. Every enum that a newer peer could extend decodes an unknown
//! variant to an explicit `Unknown` instead of failing, so an old node keeps working against a newer
//! coordinator.

pub mod addr;
pub mod api;
pub mod capver;
pub mod device;
pub mod disco;
pub mod exit;
pub mod filter;
pub mod invite;
pub mod keys;
pub mod map;
pub mod names;
pub mod policy;
pub mod publish;
pub mod register;
pub mod relay;
pub mod routes;
pub mod status;
#[cfg(feature = "tls")]
pub mod tls;

pub use capver::CAPABILITY_VERSION;
pub use keys::{KeyError, PrivateKey, PublicKey};
pub use names::{NameError, NodeId, NodeName};
