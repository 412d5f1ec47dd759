//! WireGuard keys in the `wg` text format: 32 bytes, standard base64 with padding (44 characters).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "invalid WireGuard key {0:?}: expected 44 characters of standard base64 encoding 32 bytes (as printed by `wg genkey` / `wg pubkey`)"
    )]
    Invalid(String),
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let shown: String = s.chars().take(60).collect();
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|_| KeyError::Invalid(shown.clone()))?;
    bytes.try_into().map_err(|_| KeyError::Invalid(shown))
}

/// A node's WireGuard public key (Curve25519).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
    /// Short form for logs: the first 8 base64 characters.
    pub fn short(&self) -> String {
        self.to_base64()[..8].to_string()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}
impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}
impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PublicKey)
    }
}
impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}
impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
impl From<x25519_dalek::PublicKey> for PublicKey {
    fn from(k: x25519_dalek::PublicKey) -> Self {
        PublicKey(k.to_bytes())
    }
}
impl From<PublicKey> for x25519_dalek::PublicKey {
    fn from(k: PublicKey) -> Self {
        x25519_dalek::PublicKey::from(k.0)
    }
}

/// A node's WireGuard private key. Never leaves the node; `Debug` does not print it.
#[derive(Clone)]
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl PrivateKey {
    pub fn generate() -> Self {
        PrivateKey(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ))
    }
    pub fn public_key(&self) -> PublicKey {
        x25519_dalek::PublicKey::from(&self.0).into()
    }
    pub fn secret(&self) -> &x25519_dalek::StaticSecret {
        &self.0
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }
}
impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key().short())
    }
}
impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        // Never echo private key material in an error.
        decode32(s)
            .map(|b| PrivateKey(x25519_dalek::StaticSecret::from(b)))
            .map_err(|_| KeyError::Invalid("<private key>".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_wg_format() {
        // Pair produced by `wg genkey | tee k | wg pubkey`.
        let private: PrivateKey = "IDHWcBNIxJg8LpnibT/Ba9A/HucNHB/png4TwaV0VlM="
            .parse()
            .unwrap();
        assert_eq!(
            private.public_key().to_base64(),
            "eBXndh3FxQubKnsW3cw7nVug2v6Oe6VvWAJO3E/DKxA="
        );
    }

    #[test]
    fn json_round_trip_and_errors() {
        let k: PublicKey =
            serde_json::from_str("\"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"").unwrap();
        assert_eq!(
            serde_json::to_string(&k).unwrap(),
            "\"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\""
        );
        let err = serde_json::from_str::<PublicKey>("\"abc\"").unwrap_err();
        assert!(err.to_string().contains("44 characters"), "{err}");
        let err = "AAAA".parse::<PrivateKey>().err().unwrap();
        assert!(!err.to_string().contains("AAAA"));
    }
}
