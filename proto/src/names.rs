//! Node identities: a numeric id assigned by the coordinator and a DNS-label name.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::str::FromStr;

/// Coordinator-assigned node id. Stable for the life of the node's registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub i64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "invalid node name {0:?}: use 1-63 characters of lowercase letters, digits and '-', not starting or ending with '-'"
    )]
    Invalid(String),
}

/// A node's name: a DNS label (lowercase ASCII letters, digits, '-'; 1–63 characters).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct NodeName(String);

impl NodeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Turns a free-form hostname ("Home-Server.lan") into a valid name ("home-server").
    /// Returns None when nothing usable is left.
    pub fn sanitize(raw: &str) -> Option<NodeName> {
        let first = raw.split('.').next().unwrap_or("");
        let mut s: String = first
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        s.truncate(63);
        let s = s.trim_matches('-').to_string();
        s.parse().ok()
    }
}

impl FromStr for NodeName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && !s.starts_with('-')
            && !s.ends_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(NodeName(s.to_string()))
        } else {
            Err(NameError::Invalid(s.chars().take(80).collect()))
        }
    }
}

impl<'de> Deserialize<'de> for NodeName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The mesh's DNS domain when the coordinator is not told another (`--mesh-domain`): `.internal`
/// is reserved for private use (ICANN, 2024), so it never clashes with a real name.
pub const DEFAULT_MESH_DOMAIN: &str = "homeport.internal";

/// Checks a mesh DNS domain: dot-separated DNS labels (lowercase letters, digits, '-', not at
/// either end of a label), at most 253 characters. A trailing dot is dropped.
pub fn parse_mesh_domain(s: &str) -> Result<String, String> {
    let d = s.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty() && d.len() <= 253 && d.split('.').all(|l| l.parse::<NodeName>().is_ok());
    if ok {
        Ok(d)
    } else {
        Err(format!(
            "invalid mesh domain {s:?}: expected DNS labels of lowercase letters, digits and '-' joined by dots, e.g. {DEFAULT_MESH_DOMAIN}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_domains() {
        assert_eq!(
            parse_mesh_domain("Home.Internal.").unwrap(),
            "home.internal"
        );
        assert!(parse_mesh_domain("a..b").is_err());
        assert!(parse_mesh_domain("-a.b").is_err());
        assert!(parse_mesh_domain("").is_err());
    }
    #[test]
    fn names() {
        assert!("home".parse::<NodeName>().is_ok());
        assert!("Home".parse::<NodeName>().is_err());
        assert!("-a".parse::<NodeName>().is_err());
        assert_eq!(
            NodeName::sanitize("Home_Server.lan").unwrap().as_str(),
            "home-server"
        );
        assert!(NodeName::sanitize("...").is_none());
        assert!(serde_json::from_str::<NodeName>("\"a b\"").is_err());
    }
}
