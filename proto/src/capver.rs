//! The capability version: one integer that says which protocol features a peer speaks.
//!
//! A node sends its version when it registers and when it opens the map stream; the coordinator
//! answers with its own. A side only uses a feature when both versions are at least the version
//! that introduced it.
//!
//! History (newest last; never reuse or renumber):
//! - 1 (2026-11-22): register, NDJSON map stream with full map then deltas, endpoint reports,
//!   compiled packet filter, publish rules, disco probes, UDP relay framing.
//! - 2 (2026-11-29): register proves possession of the node's private key (`POST
//!   /api/v1/node/challenge`, then `challenge` and `proof` in the register body); a coordinator
//!   at 2 refuses a register without them.

/// This build's capability version.
pub const CAPABILITY_VERSION: u32 = 2;
