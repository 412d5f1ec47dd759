//! Single-use registration challenges (see `homeport_proto::register`), kept in a bounded store
//! so that strangers asking for challenges cannot grow memory: past [`MAX_OUTSTANDING`] the
//! oldest challenge is dropped (its node just asks for a new one). Time is an input.

use homeport_proto::register::{CHALLENGE_LEN, CHALLENGE_TTL_SECS};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Outstanding challenges kept at most: 16 Ki × ~80 bytes ≈ 1.3 MB. A real mesh asks for a
/// handful a minute; a flood beyond this only evicts the flood's own oldest entries.
pub const MAX_OUTSTANDING: usize = 16 * 1024;
pub const CHALLENGE_TTL: Duration = Duration::from_secs(CHALLENGE_TTL_SECS);

#[derive(Debug, PartialEq, Eq)]
pub enum Redeem {
    Ok,
    /// Never issued, already used, or evicted.
    Unknown,
    Expired,
}

#[derive(Default)]
pub struct Challenges {
    issued: HashMap<[u8; CHALLENGE_LEN], Instant>,
    /// Issue order, for expiry and eviction. May hold entries already redeemed.
    order: VecDeque<([u8; CHALLENGE_LEN], Instant)>,
}

impl Challenges {
    /// Stores a fresh challenge (`bytes` from the OS RNG) issued at `now`.
    pub fn issue(&mut self, bytes: [u8; CHALLENGE_LEN], now: Instant) {
        self.expire(now);
        while self.issued.len() >= MAX_OUTSTANDING {
            match self.order.pop_front() {
                Some((b, _)) => {
                    self.issued.remove(&b);
                }
                None => break,
            }
        }
        self.issued.insert(bytes, now);
        self.order.push_back((bytes, now));
    }

    /// Consumes a challenge: whatever the answer, it cannot be used again.
    pub fn redeem(&mut self, bytes: &[u8; CHALLENGE_LEN], now: Instant) -> Redeem {
        let r = match self.issued.remove(bytes) {
            None => Redeem::Unknown,
            Some(at) if now.saturating_duration_since(at) > CHALLENGE_TTL => Redeem::Expired,
            Some(_) => Redeem::Ok,
        };
        self.expire(now);
        r
    }

    fn expire(&mut self, now: Instant) {
        while let Some((b, at)) = self.order.front().copied() {
            if now.saturating_duration_since(at) <= CHALLENGE_TTL
                && self.order.len() <= 2 * MAX_OUTSTANDING
            {
                break;
            }
            self.order.pop_front();
            if self.issued.get(&b) == Some(&at) {
                self.issued.remove(&b);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.issued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.issued.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(i: u32) -> [u8; 32] {
        let mut x = [0u8; 32];
        x[..4].copy_from_slice(&i.to_be_bytes());
        x
    }

    #[test]
    fn a_challenge_works_once() {
        let mut c = Challenges::default();
        let t = Instant::now();
        c.issue(b(1), t);
        assert_eq!(c.redeem(&b(1), t), Redeem::Ok);
        assert_eq!(c.redeem(&b(1), t), Redeem::Unknown);
        assert_eq!(c.redeem(&b(2), t), Redeem::Unknown);
    }

    #[test]
    fn a_challenge_expires() {
        let mut c = Challenges::default();
        let t = Instant::now();
        c.issue(b(1), t);
        c.issue(b(2), t);
        assert_eq!(
            c.redeem(&b(1), t + CHALLENGE_TTL + Duration::from_secs(1)),
            Redeem::Expired
        );
        // Expired entries leave the store as time passes.
        assert!(c.is_empty());
    }

    #[test]
    fn a_flood_stays_bounded_and_evicts_the_oldest() {
        let mut c = Challenges::default();
        let t = Instant::now();
        for i in 0..(MAX_OUTSTANDING as u32 + 100) {
            c.issue(b(i), t);
        }
        assert_eq!(c.len(), MAX_OUTSTANDING);
        assert!(c.order.len() <= 2 * MAX_OUTSTANDING);
        assert_eq!(c.redeem(&b(0), t), Redeem::Unknown);
        assert_eq!(c.redeem(&b(MAX_OUTSTANDING as u32 + 99), t), Redeem::Ok);
    }
}
