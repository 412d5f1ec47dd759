//! Invite links: a friend opens `http://EXIT:INVITE_PORT/i/TOKEN` in any browser and the address
//! the request comes from may connect to one published port for some days.
//!
//! The coordinator makes the token (256 random bits, shown once, stored hashed) and keeps the
//! invites; the exit serves the page, redeems the token over its node API (its node credential)
//! and puts the address into the rule's invite set with an nftables timeout, so it expires in
//! the kernel. Exits fetch the current grants ([`PATH_NODE_INVITES`]) so a revoked invite's
//! addresses go at once.

use crate::names::NodeName;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// `POST` ([`InviteCreate`] → [`InviteCreated`]), `GET` (→ `[InviteInfo]`), admin.
pub const PATH_ADMIN_INVITES: &str = "/api/v1/admin/invites";
/// `POST` ([`InviteRedeem`] → [`Grant`]), node credential of the invite's exit.
pub const PATH_NODE_INVITE_REDEEM: &str = "/api/v1/node/invites/redeem";
/// `GET` (→ `[Grant]`): the live grants on the calling exit.
pub const PATH_NODE_INVITES: &str = "/api/v1/node/invites";
/// The longest invite, in days.
pub const MAX_INVITE_DAYS: u32 = 366;
/// The most addresses one invite may add.
pub const MAX_INVITE_USES: u32 = 100;
/// Longest invite name.
pub const MAX_INVITE_NAME: usize = 64;

/// Admin request: invite `name` to `port` (tcp unless `proto`) on `exit` (optional when only one
/// exit publishes that port) for `days`, from up to `uses` addresses (default 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteCreate {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
    pub name: String,
    pub days: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteCreated {
    pub id: i64,
    /// The link to send the friend; the token in it is shown only here.
    pub link: String,
    /// Unix seconds: when the addresses it adds stop working.
    pub until: i64,
}

/// An address an invite let in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvitedAddr {
    pub addr: IpAddr,
    /// Unix seconds.
    pub added_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteInfo {
    pub id: i64,
    pub name: String,
    pub exit: NodeName,
    pub rule: i64,
    pub port: u16,
    pub proto: String,
    pub created_at: i64,
    pub until: i64,
    pub uses: u32,
    pub addrs: Vec<InvitedAddr>,
    pub revoked: bool,
}

/// The exit asks to let `addr` in with the token a browser brought.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteRedeem {
    pub token: String,
    pub addr: IpAddr,
}

/// One address an invite lets into one rule until `until`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Grant {
    pub rule: i64,
    pub addr: IpAddr,
    /// Unix seconds.
    pub until: i64,
    /// The invite's name (the audit log's label).
    pub name: String,
    pub invite: i64,
    /// The published port (for the page).
    #[serde(default)]
    pub port: u16,
}
