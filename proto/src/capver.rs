//! The capability version: one integer that says which protocol features a peer speaks.
//!
//! A node sends its version when it registers and when it opens the map stream; the coordinator
//! answers with its own. A side only uses a feature when both versions are at least the version
//! that introduced it.
//!
//! History (newest last; never reuse or renumber):
//! - 1 (2026-11-22): register, NDJSON map stream with full map then deltas, endpoint reports,
//!   compiled packet filter, publish rules, disco probes, UDP relay framing.

/// This build's capability version.
pub const CAPABILITY_VERSION: u32 = 1;
