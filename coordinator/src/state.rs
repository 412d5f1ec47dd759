//! Shared state of the API: the store, the in-memory mesh with its open streams, and metrics.

use crate::mesh::Mesh;
use crate::store::Store;
use anyhow::Context;
use homeport_host::metrics::{Collector, DescriptorEncoder, Registry, Unit, gauge};
use homeport_proto::map::RelayInfo;
use ipnet::{Ipv4Net, Ipv6Net};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::sync::{Arc, Mutex, MutexGuard};

pub const DEFAULT_PREFIX_V4: &str = "100.96.0.0/16";

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Store,
    mesh: Mutex<Mesh>,
    /// Serialises mutations (database write + mesh update) so the mesh sees changes in commit
    /// order and SQLite never sees two writers.
    pub write_lock: tokio::sync::Mutex<()>,
    pub admin_token_hash: Option<String>,
    pub metrics: Metrics,
    /// Per-node rate limits of the node API.
    pub limits: crate::limits::Limits,
    /// The coordinator's long-term X25519 key (the relay key on a real server): registrations
    /// prove possession of the node key against it.
    pub identity: homeport_proto::PrivateKey,
    /// Outstanding registration challenges.
    pub challenges: Mutex<crate::challenge::Challenges>,
    /// What nodes and exits last reported (paths, live connections): the dashboard's view.
    pub live: crate::dashboard::live::Reports,
    /// last_seen times not stored yet: written in batches, not one transaction per stream
    /// opened or closed (a reconnect storm of 10,000 nodes is 20,000 of them).
    last_seen: Mutex<LastSeen>,
    /// The coordinator replicas alive at the last look (high availability on PostgreSQL).
    pub live_replicas: Mutex<std::collections::HashSet<String>>,
}

#[derive(Default)]
struct LastSeen {
    pending: std::collections::HashMap<homeport_proto::NodeId, i64>,
    /// Streams opened (true) or closed (false) here, told to the other replicas with the batch.
    presence: std::collections::HashMap<homeport_proto::NodeId, bool>,
    flush_scheduled: bool,
}

/// How long last_seen times gather before one transaction stores them. last_seen is
/// informational (the admin's node list shows the live value for online nodes).
const LAST_SEEN_BATCH: std::time::Duration = std::time::Duration::from_millis(500);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Options for [`AppState::open`].
#[derive(Debug, Clone, Default)]
pub struct StateOptions {
    pub database_url: String,
    /// Used on first start; later starts must agree with what is stored (or leave it None).
    pub prefix_v4: Option<Ipv4Net>,
    pub prefix_v6: Option<Ipv6Net>,
    pub relays: Vec<RelayInfo>,
    /// The key registrations prove against (the server passes the relay key); a fresh one when
    /// None.
    pub identity: Option<homeport_proto::PrivateKey>,
    /// This replica's public URL, its name among replicas sharing a PostgreSQL database (a
    /// random name when None).
    pub replica_url: Option<String>,
}

/// What [`AppState::open`] created on a first start.
#[derive(Debug, Clone, Default)]
pub struct FirstStart {
    /// The admin token, to show once. None when one already existed.
    pub admin_token: Option<String>,
}

fn random_ula() -> Ipv6Net {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b[1..8]);
    b[0] = 0xfd;
    Ipv6Net::new(std::net::Ipv6Addr::from(b), 64).expect("64 is a valid prefix length")
}

impl AppState {
    /// Opens (and migrates) the database, settles the mesh prefixes and the admin token, and
    /// loads the mesh.
    pub async fn open(opts: StateOptions) -> anyhow::Result<(AppState, FirstStart)> {
        let mut store = Store::open(&opts.database_url).await?;
        store.origin = opts
            .replica_url
            .clone()
            .unwrap_or_else(|| crate::store::random_token("replica-"));
        let mut first = FirstStart::default();

        let v4 = settle_prefix(&store, "prefix_v4", opts.prefix_v4, || {
            DEFAULT_PREFIX_V4.parse().expect("valid default")
        })
        .await?;
        let v6 = settle_prefix(&store, "prefix_v6", opts.prefix_v6, random_ula).await?;

        let admin_token_hash = match store.setting("admin_token_hash").await? {
            Some(h) => h,
            None => {
                let token = crate::store::random_token("hpa_");
                let h = homeport_proto::api::token_hash(&token);
                store.set_setting("admin_token_hash", &h).await?;
                first.admin_token = Some(token);
                h
            }
        };

        let nodes = store.load_nodes().await?;
        let policy = store.policy().await?;
        let publish = store.load_publish(&nodes).await?;
        // Versions keep growing across restarts: start from the clock (milliseconds).
        let start_version = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mesh = Mesh::new(v4, v6, opts.relays, nodes, policy, publish, start_version);
        Ok((
            AppState(Arc::new(Inner {
                store,
                mesh: Mutex::new(mesh),
                write_lock: tokio::sync::Mutex::new(()),
                admin_token_hash: Some(admin_token_hash),
                metrics: Metrics::default(),
                limits: Default::default(),
                identity: opts
                    .identity
                    .unwrap_or_else(homeport_proto::PrivateKey::generate),
                challenges: Mutex::new(crate::challenge::Challenges::default()),
                live: Default::default(),
                last_seen: Mutex::new(LastSeen::default()),
                live_replicas: Mutex::new(Default::default()),
            })),
            first,
        ))
    }

    /// Records that `id` was seen at `at`; stored with others within [`LAST_SEEN_BATCH`].
    pub fn note_seen(&self, id: homeport_proto::NodeId, at: i64) {
        self.note(id, at, None);
    }

    /// `id`'s map stream opened (`online`) or closed here at `at`: last_seen, and on PostgreSQL
    /// which replica holds the stream, stored with others within [`LAST_SEEN_BATCH`].
    pub fn note_stream(&self, id: homeport_proto::NodeId, online: bool, at: i64) {
        self.note(id, at, Some(online));
    }

    fn note(&self, id: homeport_proto::NodeId, at: i64, online: Option<bool>) {
        let mut l = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        l.pending.insert(id, at);
        if let Some(o) = online.filter(|_| self.store.postgres) {
            l.presence.insert(id, o);
        }
        if l.flush_scheduled {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // stored by the next flush
        };
        l.flush_scheduled = true;
        let st = self.clone();
        rt.spawn(async move {
            tokio::time::sleep(LAST_SEEN_BATCH).await;
            st.flush_seen().await;
        });
    }

    /// Stores the pending last_seen times now (also on shutdown).
    pub async fn flush_seen(&self) {
        let (batch, presence) = {
            let mut l = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            l.flush_scheduled = false;
            let b: Vec<(homeport_proto::NodeId, i64)> = l.pending.drain().collect();
            let p: Vec<(homeport_proto::NodeId, bool)> = l.presence.drain().collect();
            (b, p)
        };
        if batch.is_empty() {
            return;
        }
        let _w = self.write_lock.lock().await;
        if let Err(e) = self.store.set_presence(&presence).await {
            // The other replicas show these nodes' online state late (until the next resync).
            tracing::warn!(nodes = presence.len(), error = %e, "cannot store which streams this replica holds");
        }
        if let Err(e) = self.store.touch_many(&batch).await {
            // last_seen is informational; the streams are what matters.
            tracing::warn!(nodes = batch.len(), error = %e, "cannot store last_seen");
        }
    }

    /// The mesh. Hold the guard briefly and never across an await.
    pub fn mesh(&self) -> MutexGuard<'_, Mesh> {
        self.mesh.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn settle_prefix<T>(
    store: &Store,
    key: &str,
    wanted: Option<T>,
    default: impl FnOnce() -> T,
) -> anyhow::Result<T>
where
    T: std::str::FromStr + std::fmt::Display + PartialEq + Copy,
    T::Err: std::fmt::Display,
{
    let stored = store.setting(key).await?;
    match stored {
        Some(s) => {
            let cur: T = s
                .parse()
                .map_err(|e| anyhow::anyhow!("stored {key} {s:?} is invalid: {e}"))?;
            if let Some(w) = wanted.filter(|w| *w != cur) {
                anyhow::bail!(
                    "--{} {w} differs from the prefix {cur} this coordinator already allocates from; \
                         changing the mesh prefix of an existing mesh is not supported (drop the option or use {cur})",
                    key.replace('_', "-")
                );
            }
            Ok(cur)
        }
        None => {
            let v = wanted.unwrap_or_else(default);
            store
                .set_setting(key, &v.to_string())
                .await
                .with_context(|| format!("cannot store {key}"))?;
            Ok(v)
        }
    }
}

/// The API's request metrics, and the registry `--metrics-listen` serves
/// (`homeport_coordinator_*`).
pub struct Metrics {
    requests: Family<[(&'static str, String); 2], Counter>,
    latency: Family<[(&'static str, String); 1], Histogram>,
}

/// Latency buckets from 1 ms to about 16 s (a map stream's head, a slow database).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 8))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl Metrics {
    pub fn record(&self, route: &str, status: u16, secs: f64) {
        self.requests
            .get_or_create(&[("path", route.to_string()), ("status", status.to_string())])
            .inc();
        self.latency
            .get_or_create(&[("path", route.to_string())])
            .observe(secs);
    }

    /// Every coordinator metric: the request counters and, read from the mesh at each scrape,
    /// the node and map gauges.
    pub fn registry(&self, state: &AppState) -> Registry {
        let mut r = homeport_host::metrics::registry("coordinator");
        r.register(
            "api_requests",
            "API requests by route and status",
            self.requests.clone(),
        );
        r.register_with_unit(
            "api_request_duration",
            "API request latency (time to response head) by route",
            Unit::Seconds,
            self.latency.clone(),
        );
        r.register_collector(Box::new(MeshGauges(state.clone())));
        r
    }
}

/// Gauges read from the mesh at scrape time.
struct MeshGauges(AppState);

impl std::fmt::Debug for MeshGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshGauges")
    }
}

impl Collector for MeshGauges {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (online, total, version, replicas) = {
            let mesh = self.0.mesh();
            (
                mesh.online_count(),
                mesh.nodes().count(),
                mesh.version(),
                mesh.coordinators().len(),
            )
        };
        gauge(
            &mut enc,
            "nodes_online",
            "Nodes with an open map stream to this coordinator",
            online as i64,
        )?;
        gauge(
            &mut enc,
            "nodes_registered",
            "Registered nodes",
            total as i64,
        )?;
        gauge(
            &mut enc,
            "map_version",
            "Current map version",
            version as i64,
        )?;
        gauge(
            &mut enc,
            "replicas",
            "Live coordinator replicas sharing the PostgreSQL database (0 with SQLite)",
            replicas as i64,
        )
    }
}
