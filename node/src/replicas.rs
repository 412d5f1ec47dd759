//! The coordinator replicas a node may talk to, and which one it uses now.
//!
//! Several coordinator replicas can share one PostgreSQL database; the map names every live one
//! (URL and pin, [`CoordinatorInfo`]). The node keeps that list (persisted in its state dir, so a
//! restart while its replica is down still finds another), uses one replica at a time for the
//! map stream and every API call, and moves to the next one when its stream fails: a replica
//! that failed is tried again only after a backoff, so a dead one is skipped while a live one
//! is there.
//!
//! [`Rotation`] is the pure choice (time passed in, tested without IO); [`Replicas`] adds a
//! pinned HTTPS client per replica and the lock.

use anyhow::Result;
use homeport_proto::map::CoordinatorInfo;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The list of replicas as last learned from a map (`replicas.json`, 0600), with the URL the
/// node registered with: a list learned in another mesh is never used.
pub const REPLICAS_FILE: &str = "replicas.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    registered_with: String,
    replicas: Vec<CoordinatorInfo>,
    /// The replica in use when stored.
    #[serde(default)]
    current: Option<CoordinatorInfo>,
}

/// A replica whose stream failed is skipped for this long, doubling per failure in a row up to
/// [`SKIP_MAX`]: long enough that a dead replica costs the others nothing, short enough that a
/// restarted one is used again within a minute.
const SKIP_MIN: Duration = Duration::from_secs(2);
const SKIP_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Entry {
    info: CoordinatorInfo,
    /// Failures in a row.
    failures: u32,
    /// Not to be used again before this.
    skip_until: Option<Instant>,
}

/// Which replica to use: the current one until it fails, then the next one that is not being
/// skipped (the one skipped the shortest if all are).
#[derive(Debug, Clone)]
pub struct Rotation {
    entries: Vec<Entry>,
    current: usize,
}

impl Rotation {
    /// `first` (what the node was started with) comes first and is always kept; `known` are
    /// the replicas learned before.
    pub fn new(first: CoordinatorInfo, known: &[CoordinatorInfo]) -> Rotation {
        let mut r = Rotation {
            entries: vec![Entry {
                info: first,
                failures: 0,
                skip_until: None,
            }],
            current: 0,
        };
        r.merge(known);
        r
    }

    pub fn current(&self) -> &CoordinatorInfo {
        &self.entries[self.current].info
    }

    pub fn all(&self) -> impl Iterator<Item = &CoordinatorInfo> {
        self.entries.iter().map(|e| &e.info)
    }

    /// The replicas a map names now. The first entry stays; others not named any more go
    /// (unless current: it stays until it fails). Returns whether the list changed.
    pub fn update(&mut self, named: &[CoordinatorInfo]) -> bool {
        if named.is_empty() {
            return false; // a coordinator that names none: keep what we know
        }
        let before: Vec<CoordinatorInfo> = self.all().cloned().collect();
        let cur = self.current().url.clone();
        let mut i = 0;
        self.entries.retain(|e| {
            let keep = i == 0 || e.info.url == cur || named.iter().any(|n| n.url == e.info.url);
            i += 1;
            keep
        });
        self.merge(named);
        self.current = self
            .entries
            .iter()
            .position(|e| e.info.url == cur)
            .unwrap_or(0);
        before != self.all().cloned().collect::<Vec<_>>()
    }

    fn merge(&mut self, named: &[CoordinatorInfo]) {
        let first = self.entries[0].info.url.clone();
        for n in named {
            match self.entries.iter_mut().find(|e| e.info.url == n.url) {
                // A replica's pin may change (a new certificate): the map is authoritative,
                // except for the URL the node was started with, whose pin the admin gave.
                Some(e) => {
                    if e.info.url != first {
                        e.info.pin = n.pin.clone();
                    }
                }
                None => self.entries.push(Entry {
                    info: n.clone(),
                    failures: 0,
                    skip_until: None,
                }),
            }
        }
    }

    /// The current replica served a full map: it is good again.
    pub fn succeeded(&mut self) {
        let e = &mut self.entries[self.current];
        e.failures = 0;
        e.skip_until = None;
    }

    /// The current replica failed at `now`: skip it for a while and move to the next replica
    /// not being skipped (in list order after it), else to the one whose skip ends first. The
    /// skip only orders the replicas: how long to wait between attempts is the caller's backoff
    /// (with a single replica, nothing changes).
    pub fn failed(&mut self, now: Instant) {
        let e = &mut self.entries[self.current];
        e.failures = e.failures.saturating_add(1);
        let skip = SKIP_MIN
            .saturating_mul(1u32 << (e.failures - 1).min(16))
            .min(SKIP_MAX);
        e.skip_until = Some(now + skip);
        let n = self.entries.len();
        let ready = (1..=n)
            .map(|k| (self.current + k) % n)
            .find(|&i| self.entries[i].skip_until.is_none_or(|t| t <= now));
        let next = ready.unwrap_or_else(|| {
            (0..n)
                .min_by_key(|&i| self.entries[i].skip_until)
                .unwrap_or(0)
        });
        self.current = next;
    }
}

/// The replica to use for one request or stream (cheap to clone).
#[derive(Clone)]
pub struct Replica {
    pub url: Arc<str>,
    pub client: reqwest::Client,
}

/// The shared [`Rotation`] with one pinned HTTPS client per replica, kept in the state dir.
pub struct Replicas {
    rotation: Mutex<Rotation>,
    clients: Mutex<std::collections::HashMap<(String, String), reqwest::Client>>,
    dir: PathBuf,
}

impl Replicas {
    /// Starts from `url` and `pin` (what the node registered with) and the replicas stored in
    /// `dir` for that registration.
    pub fn open(dir: &Path, url: &str, pin: &str) -> Result<Replicas> {
        let first = CoordinatorInfo {
            url: url.to_string(),
            pin: pin.to_string(),
        };
        let known = read(dir)
            .filter(|s| s.registered_with == url)
            .map(|s| s.replicas)
            .unwrap_or_default();
        let r = Replicas {
            rotation: Mutex::new(Rotation::new(first.clone(), &[])),
            clients: Mutex::new(Default::default()),
            dir: dir.to_path_buf(),
        };
        r.client_for(url, pin)?; // a bad pin is an error now, not at the first request
        let known = r.usable(&known);
        *r.rotation() = Rotation::new(first, &known);
        Ok(r)
    }

    fn rotation(&self) -> std::sync::MutexGuard<'_, Rotation> {
        self.rotation.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn client_for(&self, url: &str, pin: &str) -> Result<reqwest::Client> {
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let k = (url.to_string(), pin.to_string());
        if let Some(cl) = c.get(&k) {
            return Ok(cl.clone());
        }
        let cl = crate::state::coordinator_client(pin, None)?;
        c.insert(k, cl.clone());
        Ok(cl)
    }

    /// The replicas whose pin is usable (one that is not is left out: never reached unpinned).
    fn usable(&self, named: &[CoordinatorInfo]) -> Vec<CoordinatorInfo> {
        named
            .iter()
            .filter(|c| match self.client_for(&c.url, &c.pin) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(url = %c.url, error = %e, "coordinator replica with an unusable pin left out");
                    false
                }
            })
            .cloned()
            .collect()
    }

    /// The replica to use now.
    pub fn current(&self) -> Replica {
        let info = self.rotation().current().clone();
        // Replicas enter the rotation only with a usable pin (see `open`, `update`), and
        // clients are kept: this builds nothing new.
        let client = self
            .client_for(&info.url, &info.pin)
            .expect("replicas enter the rotation only with a usable pin");
        Replica {
            url: info.url.into(),
            client,
        }
    }

    /// The stream from `url` failed (after a full map from it when `was_up`): the next attempt
    /// goes to the next replica.
    pub fn failed(&self, url: &str, was_up: bool) {
        let stored = {
            let mut r = self.rotation();
            if r.current().url != url {
                return; // already moved on
            }
            if was_up {
                r.succeeded();
            }
            r.failed(Instant::now());
            if r.current().url == url {
                return;
            }
            tracing::info!(from = %url, to = %r.current().url, "moving to another coordinator replica");
            Stored::of(&r)
        };
        self.save(&stored);
    }

    /// The replicas a map names; stored when the list changed.
    pub fn update(&self, named: &[CoordinatorInfo]) {
        let named = self.usable(named);
        let stored = {
            let mut r = self.rotation();
            if !r.update(&named) {
                return;
            }
            Stored::of(&r)
        };
        let urls: Vec<&str> = stored.replicas.iter().map(|c| c.url.as_str()).collect();
        tracing::info!(replicas = ?urls, "coordinator replicas");
        self.save(&stored);
    }

    fn save(&self, s: &Stored) {
        let r = serde_json::to_vec_pretty(s)
            .map_err(anyhow::Error::from)
            .and_then(|b| {
                Ok(crate::state::write_private(
                    &self.dir.join(REPLICAS_FILE),
                    &b,
                )?)
            });
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot store the coordinator replicas");
        }
    }
}

impl Stored {
    fn of(r: &Rotation) -> Stored {
        let replicas: Vec<CoordinatorInfo> = r.all().cloned().collect();
        Stored {
            registered_with: replicas[0].url.clone(),
            current: Some(r.current().clone()),
            replicas,
        }
    }
}

fn read(dir: &Path) -> Option<Stored> {
    serde_json::from_slice(&std::fs::read(dir.join(REPLICAS_FILE)).ok()?).ok()
}

/// The replica the node in `dir`, registered with `registered_with`, uses now (None: the one
/// it registered with, or unknown). For the exit's own calls, so they follow a failover.
pub fn current(dir: &Path, registered_with: &str) -> Option<CoordinatorInfo> {
    read(dir)
        .filter(|s| s.registered_with == registered_with)
        .and_then(|s| s.current)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8) -> CoordinatorInfo {
        CoordinatorInfo {
            url: format!("https://198.51.100.{n}:8443"),
            // A well-formed pin (sha256/ and 32 bytes in base64), one per replica.
            pin: format!("sha256/{}{}=", (b'A' + n) as char, "A".repeat(42)),
        }
    }

    fn url(r: &Rotation) -> &str {
        &r.current().url
    }

    #[test]
    fn a_failed_replica_is_left_for_the_next_and_skipped_while_another_works() {
        let t0 = Instant::now();
        let mut r = Rotation::new(c(1), &[c(1), c(2), c(3)]);
        assert_eq!(r.all().count(), 3, "the first one is not listed twice");
        assert_eq!(url(&r), c(1).url);
        // 1 dies: the next one.
        r.failed(t0);
        assert_eq!(url(&r), c(2).url);
        // 2 dies too within the skip of 1: 3 next, not 1.
        r.failed(t0 + Duration::from_millis(100));
        assert_eq!(url(&r), c(3).url);
        // All failed: the one whose skip ends first (1, at t0 + 2 s).
        r.failed(t0 + Duration::from_millis(200));
        assert_eq!(url(&r), c(1).url);
        // 1 fails again: its skip doubles, 2's has ended, so 2.
        r.failed(t0 + Duration::from_secs(3));
        assert_eq!(url(&r), c(2).url);
        assert_eq!(
            r.entries[0].skip_until,
            Some(t0 + Duration::from_secs(3 + 4)),
            "the second failure in a row doubles the skip"
        );
        // 2 serves a full map: its failure is forgotten.
        r.succeeded();
        assert_eq!((r.entries[1].failures, r.entries[1].skip_until), (0, None));
    }

    #[test]
    fn a_single_replica_stays_current() {
        let mut r = Rotation::new(c(1), &[]);
        for k in 0..5 {
            r.failed(Instant::now() + Duration::from_secs(k));
            assert_eq!(url(&r), c(1).url);
        }
    }

    #[test]
    fn the_list_follows_the_map_but_keeps_the_first_and_the_current() {
        let mut r = Rotation::new(c(1), &[]);
        assert!(!r.update(&[]), "a map naming no replica changes nothing");
        assert!(r.update(&[c(2), c(3)]));
        let urls: Vec<String> = r.all().map(|i| i.url.clone()).collect();
        assert_eq!(urls, [c(1).url, c(2).url, c(3).url]);
        r.failed(Instant::now());
        assert_eq!(url(&r), c(2).url);
        // 2 left the list (the map comes from 2 itself during its shutdown): it stays while
        // current, and goes with the next map after the node moved on.
        assert!(!r.update(&[c(3)]));
        assert_eq!(url(&r), c(2).url);
        r.failed(Instant::now());
        assert_eq!(url(&r), c(3).url);
        assert!(r.update(&[c(3)]));
        assert_eq!(r.all().count(), 2);
        // A new pin for 3 is taken; the first URL keeps the pin the admin gave.
        let mut c3 = c(3);
        c3.pin = "new".into();
        let mut c1 = c(1);
        c1.pin = "other".into();
        assert!(r.update(&[c1, c3]));
        let pins: Vec<String> = r.all().map(|i| i.pin.clone()).collect();
        assert!(pins.contains(&"new".to_string()));
        assert_eq!(r.entries[0].info.pin, c(1).pin);
    }

    #[test]
    fn the_list_and_the_current_one_are_stored_0600_for_the_same_registration_only() {
        let d = tempfile::tempdir().unwrap();
        let r = Replicas::open(d.path(), &c(1).url, &c(1).pin).unwrap();
        r.update(&[c(1), c(2)]);
        assert_eq!(current(d.path(), &c(1).url), Some(c(1)));
        r.failed(&c(1).url, true);
        assert_eq!(&*r.current().url, c(2).url.as_str());
        assert_eq!(
            current(d.path(), &c(1).url),
            Some(c(2)),
            "the exit's calls follow"
        );
        // A restart knows both.
        let again = Replicas::open(d.path(), &c(1).url, &c(1).pin).unwrap();
        assert_eq!(again.rotation().all().count(), 2);
        // A node registered elsewhere since never uses them.
        let other = Replicas::open(d.path(), &c(7).url, &c(7).pin).unwrap();
        assert_eq!(other.rotation().all().count(), 1);
        assert_eq!(current(d.path(), &c(7).url), None);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(REPLICAS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
