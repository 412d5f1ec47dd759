//! Shared state of the API: the store, the in-memory mesh with its open streams, and metrics.

use crate::mesh::Mesh;
use crate::store::Store;
use anyhow::Context;
use homeport_proto::map::RelayInfo;
use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::BTreeMap;
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
}

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
        let store = Store::open(&opts.database_url).await?;
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
            })),
            first,
        ))
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

/// Request counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    /// (route, status) → (count, latency sum in seconds)
    requests: Mutex<BTreeMap<(String, u16), (u64, f64)>>,
}

impl Metrics {
    pub fn record(&self, route: &str, status: u16, secs: f64) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry((route.to_string(), status)).or_default();
        e.0 += 1;
        e.1 += secs;
    }

    /// Prometheus text exposition.
    pub fn render(&self, state: &AppState) -> String {
        use std::fmt::Write;
        let (online, total, version) = {
            let mesh = state.mesh();
            (mesh.online_count(), mesh.nodes().count(), mesh.version())
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP homeport_nodes_online Nodes with an open map stream.\n# TYPE homeport_nodes_online gauge\nhomeport_nodes_online {online}"
        );
        let _ = writeln!(
            s,
            "# HELP homeport_nodes_total Registered nodes.\n# TYPE homeport_nodes_total gauge\nhomeport_nodes_total {total}"
        );
        let _ = writeln!(
            s,
            "# HELP homeport_map_version Current map version.\n# TYPE homeport_map_version gauge\nhomeport_map_version {version}"
        );
        let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            s,
            "# HELP homeport_api_requests_total API requests by route and status.\n# TYPE homeport_api_requests_total counter"
        );
        for ((route, status), (n, _)) in m.iter() {
            let _ = writeln!(
                s,
                "homeport_api_requests_total{{path=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP homeport_api_request_seconds API request latency (time to response head).\n# TYPE homeport_api_request_seconds summary"
        );
        let mut per_route: BTreeMap<&str, (u64, f64)> = BTreeMap::new();
        for ((route, _), (n, sum)) in m.iter() {
            let e = per_route.entry(route).or_default();
            e.0 += n;
            e.1 += sum;
        }
        for (route, (n, sum)) in per_route {
            let _ = writeln!(
                s,
                "homeport_api_request_seconds_sum{{path=\"{route}\"}} {sum}\nhomeport_api_request_seconds_count{{path=\"{route}\"}} {n}"
            );
        }
        s
    }
}
