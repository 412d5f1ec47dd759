//! Proof of key possession for `POST /api/v1/node/register`.
//!
//! A node's public key is no secret (every peer sees it in its map), so registering with it must
//! prove that the caller holds the matching private key, or anyone with any auth key could take
//! over a node. The flow:
//! 1. `POST /api/v1/node/challenge` answers a fresh single-use [`RegisterChallenge`]: 32 random
//!    bytes and the coordinator's long-term X25519 key (the relay key), learned over the pinned
//!    TLS connection.
//! 2. The node sends [`crate::api::RegisterRequest`] with `challenge` and `proof`, where
//!    `proof = HMAC-SHA256(K, transcript)`, `K = HMAC-SHA256(X25519(node, coordinator),
//!    "homeport register proof v1")` and the transcript binds the challenge, both keys and every
//!    other field of the request (see [`transcript`]).
//!
//! The key derivation is domain-separated from the relay BIND (which MACs under the raw shared
//! secret), so a register proof can never be replayed as a BIND or the other way round.

use crate::api::RegisterRequest;
use crate::keys::{PrivateKey, PublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes of randomness in a challenge.
pub const CHALLENGE_LEN: usize = 32;
/// A challenge is accepted this long after it was handed out: a node uses it at once, and a
/// minute covers a slow link without leaving old challenges lying around.
pub const CHALLENGE_TTL_SECS: u64 = 60;

const KDF_LABEL: &[u8] = b"homeport register proof v1";
const TRANSCRIPT_LABEL: &[u8] = b"homeport-register-v1";

/// Answer of `POST /api/v1/node/challenge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterChallenge {
    /// 32 random bytes, base64url without padding; single use.
    pub challenge: String,
    /// The coordinator's X25519 key the proof is made against.
    pub coordinator_key: PublicKey,
    /// Seconds the challenge stays valid.
    pub expires_in: u64,
}

/// Why a proof was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error(
        "challenge: {0:?} is not 32 bytes in base64url without padding (as sent by POST /api/v1/node/challenge)"
    )]
    BadChallenge(String),
    #[error("proof: not 32 bytes in base64url without padding")]
    Malformed,
    #[error("public_key: a low-order key cannot prove anything; use the node's real WireGuard key")]
    WeakKey,
    #[error(
        "proof: does not match; it must be HMAC-SHA256 under the X25519 secret of the node's private key and the coordinator key, over this challenge and every field of the request"
    )]
    Mismatch,
}

/// Decodes a challenge string to its bytes.
pub fn decode_challenge(s: &str) -> Result<[u8; CHALLENGE_LEN], ProofError> {
    let shown = || ProofError::BadChallenge(s.chars().take(60).collect());
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| shown())?
        .try_into()
        .map_err(|_| shown())
}

/// Encodes challenge bytes for the wire.
pub fn encode_challenge(b: &[u8; CHALLENGE_LEN]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // RFC 2104 with a 64-byte block; keys here are 32 bytes, so no key hashing is needed, but
    // longer keys are handled for completeness.
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

fn push_lp(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// The bytes the proof covers: a label, the challenge, the coordinator key, then every field of
/// the request except the proof, each length-prefixed so no two requests share a transcript.
pub fn transcript(
    challenge: &[u8; CHALLENGE_LEN],
    coordinator_key: &PublicKey,
    req: &RegisterRequest,
) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    push_lp(&mut t, TRANSCRIPT_LABEL);
    push_lp(&mut t, challenge);
    push_lp(&mut t, coordinator_key.as_bytes());
    push_lp(&mut t, req.public_key.as_bytes());
    push_lp(&mut t, req.authkey.as_bytes());
    push_lp(&mut t, req.hostname.as_bytes());
    t.extend_from_slice(&req.capver.to_be_bytes());
    match req.previous_ipv4 {
        Some(a) => push_lp(&mut t, &a.octets()),
        None => push_lp(&mut t, &[]),
    }
    t
}

fn proof_key(shared: &[u8; 32]) -> [u8; 32] {
    hmac_sha256(shared, &[KDF_LABEL])
}

/// The node side: the proof for `req` (whose `challenge` must be set) against `coordinator_key`.
pub fn prove(
    node: &PrivateKey,
    coordinator_key: &PublicKey,
    req: &RegisterRequest,
) -> Result<String, ProofError> {
    let ch = decode_challenge(req.challenge.as_deref().unwrap_or(""))?;
    let shared = node
        .secret()
        .diffie_hellman(&x25519_dalek::PublicKey::from(*coordinator_key));
    let mac = hmac_sha256(
        &proof_key(shared.as_bytes()),
        &[&transcript(&ch, coordinator_key, req)],
    );
    Ok(URL_SAFE_NO_PAD.encode(mac))
}

/// The coordinator side: checks `req.proof` for the challenge bytes `challenge` (already looked
/// up and consumed by the caller) under the coordinator's secret.
pub fn verify(
    coordinator: &x25519_dalek::StaticSecret,
    challenge: &[u8; CHALLENGE_LEN],
    req: &RegisterRequest,
) -> Result<(), ProofError> {
    let proof: [u8; 32] = URL_SAFE_NO_PAD
        .decode(req.proof.as_deref().unwrap_or(""))
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or(ProofError::Malformed)?;
    let shared = coordinator.diffie_hellman(&x25519_dalek::PublicKey::from(req.public_key));
    if !shared.was_contributory() {
        return Err(ProofError::WeakKey);
    }
    let coord_pub = PublicKey::from(x25519_dalek::PublicKey::from(coordinator));
    let want = hmac_sha256(
        &proof_key(shared.as_bytes()),
        &[&transcript(challenge, &coord_pub, req)],
    );
    // Constant time: the comparison must not tell an attacker how many bytes were right.
    let diff = want
        .iter()
        .zip(proof.iter())
        .fold(0u8, |a, (x, y)| a | (x ^ y));
    if diff == 0 {
        Ok(())
    } else {
        Err(ProofError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(node: &PrivateKey) -> RegisterRequest {
        RegisterRequest {
            authkey: "hpk_x".into(),
            public_key: node.public_key(),
            hostname: "home".into(),
            capver: 2,
            previous_ipv4: None,
            challenge: Some(encode_challenge(&[9; 32])),
            proof: None,
        }
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn proof_by_the_key_holder_verifies() {
        let coord = PrivateKey::generate();
        let node = PrivateKey::generate();
        let mut r = req(&node);
        r.proof = Some(prove(&node, &coord.public_key(), &r).unwrap());
        assert_eq!(verify(coord.secret(), &[9; 32], &r), Ok(()));
    }

    #[test]
    fn proof_without_the_private_key_fails() {
        let coord = PrivateKey::generate();
        let home = PrivateKey::generate();
        let thief = PrivateKey::generate();
        // The thief claims home's public key but can only prove with its own private key.
        let mut r = req(&home);
        r.proof = Some(prove(&thief, &coord.public_key(), &r).unwrap());
        assert_eq!(
            verify(coord.secret(), &[9; 32], &r),
            Err(ProofError::Mismatch)
        );
    }

    #[test]
    fn proof_covers_every_field_and_the_challenge() {
        let coord = PrivateKey::generate();
        let node = PrivateKey::generate();
        let mut r = req(&node);
        r.proof = Some(prove(&node, &coord.public_key(), &r).unwrap());
        let changed: Vec<RegisterRequest> = vec![
            RegisterRequest {
                authkey: "hpk_y".into(),
                ..r.clone()
            },
            RegisterRequest {
                hostname: "homf".into(),
                ..r.clone()
            },
            RegisterRequest {
                capver: 3,
                ..r.clone()
            },
            RegisterRequest {
                previous_ipv4: Some("100.96.0.7".parse().unwrap()),
                ..r.clone()
            },
            RegisterRequest {
                public_key: PrivateKey::generate().public_key(),
                ..r.clone()
            },
        ];
        for c in &changed {
            assert_eq!(
                verify(coord.secret(), &[9; 32], c),
                Err(ProofError::Mismatch),
                "{c:?}"
            );
        }
        assert_eq!(
            verify(coord.secret(), &[8; 32], &r),
            Err(ProofError::Mismatch),
            "another challenge"
        );
        let other_coord = PrivateKey::generate();
        assert_eq!(
            verify(other_coord.secret(), &[9; 32], &r),
            Err(ProofError::Mismatch),
            "another coordinator"
        );
    }

    #[test]
    fn malformed_inputs_are_named() {
        let coord = PrivateKey::generate();
        let node = PrivateKey::generate();
        let mut r = req(&node);
        r.proof = Some("short".into());
        assert_eq!(
            verify(coord.secret(), &[9; 32], &r),
            Err(ProofError::Malformed)
        );
        r.proof = None;
        assert_eq!(
            verify(coord.secret(), &[9; 32], &r),
            Err(ProofError::Malformed)
        );
        let e = decode_challenge("abc").unwrap_err();
        assert!(e.to_string().contains("challenge"), "{e}");
        assert_eq!(
            decode_challenge(&encode_challenge(&[7; 32])).unwrap(),
            [7; 32]
        );
    }

    #[test]
    fn low_order_public_key_is_refused() {
        let coord = PrivateKey::generate();
        let node = PrivateKey::generate();
        let mut r = req(&node);
        r.public_key = PublicKey([0; 32]);
        r.proof = Some(URL_SAFE_NO_PAD.encode([0u8; 32]));
        assert_eq!(
            verify(coord.secret(), &[9; 32], &r),
            Err(ProofError::WeakKey)
        );
    }
}
