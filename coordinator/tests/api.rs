//! API tests: the router is called directly (`oneshot`), each test with a fresh SQLite file.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use futures::StreamExt;
use homeport_coordinator::api::local_app;
use homeport_coordinator::{AppState, StateOptions, app};
use homeport_proto::api::{self, RegisterRequest, RegisterResponse};
use homeport_proto::map::{MapMessage, NetworkMap};
use homeport_proto::register::RegisterChallenge;
use homeport_proto::{NodeId, PrivateKey};
use serde_json::{Value, json};
use std::time::Duration;
use tower::ServiceExt;

struct T {
    _dir: tempfile::TempDir,
    st: AppState,
    admin_token: String,
}

/// A fresh database: a SQLite file, or a new database on the PostgreSQL server named by
/// `HOMEPORT_TEST_POSTGRES` (e.g. `postgres://hp@127.0.0.1:5432`) to run the same suite there.
async fn fresh_db(dir: &std::path::Path) -> String {
    match std::env::var("HOMEPORT_TEST_POSTGRES") {
        Ok(base) => {
            use rand::Rng;
            sqlx::any::install_default_drivers();
            let db = format!("hp_test_{:016x}", rand::thread_rng().r#gen::<u64>());
            let admin = sqlx::AnyPool::connect(&format!("{base}/postgres"))
                .await
                .unwrap();
            sqlx::query(&format!("CREATE DATABASE {db}"))
                .execute(&admin)
                .await
                .unwrap();
            admin.close().await;
            format!("{base}/{db}")
        }
        Err(_) => format!("sqlite://{}?mode=rwc", dir.join("t.db").display()),
    }
}

async fn setup() -> T {
    setup_with(None).await
}

async fn setup_with(prefix_v4: Option<&str>) -> T {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_db(dir.path()).await;
    setup_on(dir, url, prefix_v4).await
}

async fn setup_on(dir: tempfile::TempDir, url: String, prefix_v4: Option<&str>) -> T {
    let (st, first) = AppState::open(StateOptions {
        database_url: url,
        prefix_v4: prefix_v4.map(|p| p.parse().unwrap()),
        prefix_v6: Some("fd7a:115c:a1e0::/64".parse().unwrap()),
        relays: vec![],
        identity: None,
        replica_url: None,
    })
    .await
    .unwrap();
    T {
        _dir: dir,
        st,
        admin_token: first
            .admin_token
            .expect("first start creates an admin token"),
    }
}

fn req(method: Method, path: &str, bearer: Option<&str>, body: Option<Value>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = bearer {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    match body {
        Some(v) => b
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(&v).unwrap()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

async fn send(r: Router, rq: Request<Body>) -> (StatusCode, Value) {
    let resp = r.oneshot(rq).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {bytes:?}"))
    };
    (status, v)
}

impl T {
    /// Admin call over the "local socket" router (no token).
    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        send(local_app(self.st.clone()), req(method, path, None, body)).await
    }
    async fn node(
        &self,
        method: Method,
        path: &str,
        cred: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        send(app(self.st.clone()), req(method, path, Some(cred), body)).await
    }
    /// The node with credential `cred` announces that it runs an exit (as homeport-exit does),
    /// with a country database or not.
    async fn announce_exit(&self, cred: &str, country_db: Option<&str>) {
        let (s, v) = self
            .node(
                Method::POST,
                homeport_proto::exit::PATH_EXIT_ANNOUNCE,
                cred,
                Some(json!({"public_addrs": ["198.51.100.10"], "country_db": country_db})),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    }
    async fn authkey(&self, body: Value) -> String {
        let (s, v) = self
            .admin(Method::POST, api::PATH_ADMIN_AUTHKEYS, Some(body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["key"].as_str().unwrap().to_string()
    }
    /// A fresh registration challenge (what a node asks for before register).
    async fn challenge(&self) -> RegisterChallenge {
        let (s, v) = send(
            app(self.st.clone()),
            req(Method::POST, api::PATH_CHALLENGE, None, None),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }
    /// The register body a node holding `node` sends, with a fresh challenge and its proof.
    async fn proven(&self, key: &str, node: &PrivateKey, host: &str) -> RegisterRequest {
        let ch = self.challenge().await;
        let mut r = RegisterRequest {
            authkey: key.to_string(),
            public_key: node.public_key(),
            hostname: host.to_string(),
            capver: homeport_proto::CAPABILITY_VERSION,
            previous_ipv4: None,
            challenge: Some(ch.challenge),
            proof: None,
        };
        r.proof = Some(homeport_proto::register::prove(node, &ch.coordinator_key, &r).unwrap());
        r
    }
    async fn register_body(&self, body: Value) -> (StatusCode, Value) {
        send(
            app(self.st.clone()),
            req(Method::POST, api::PATH_REGISTER, None, Some(body)),
        )
        .await
    }
    /// Registers as the holder of `node` (with a valid proof).
    async fn register_raw(&self, key: &str, node: &PrivateKey, host: &str) -> (StatusCode, Value) {
        let body = self.proven(key, node, host).await;
        self.register_body(serde_json::to_value(&body).unwrap())
            .await
    }
    async fn register(&self, key: &str, host: &str) -> RegisterResponse {
        let (s, v) = self.register_raw(key, &PrivateKey::generate(), host).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }
    async fn open_map(&self, cred: &str) -> MapStream {
        let resp = app(self.st.clone())
            .oneshot(req(Method::GET, api::PATH_MAP, Some(cred), None))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/x-ndjson");
        MapStream {
            body: resp.into_body().into_data_stream(),
            buf: Vec::new(),
        }
    }
}

struct MapStream {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
}

impl MapStream {
    /// The next line within `within`; None when the stream ended.
    async fn next(&mut self, within: Duration) -> Option<MapMessage> {
        self.try_next(within)
            .await
            .expect("no map line within the time limit")
    }

    /// The next line within `within`: Err when none came in time, Ok(None) when the stream ended.
    async fn try_next(
        &mut self,
        within: Duration,
    ) -> Result<Option<MapMessage>, tokio::time::error::Elapsed> {
        tokio::time::timeout(within, async {
            loop {
                if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=i).collect();
                    return Some(
                        serde_json::from_slice(&line).expect("each line is one MapMessage"),
                    );
                }
                match self.body.next().await {
                    Some(Ok(b)) => self.buf.extend_from_slice(&b),
                    _ => return None,
                }
            }
        })
        .await
    }
}

impl MapStream {
    /// True when no line comes within `within`.
    async fn quiet(&mut self, within: Duration) -> bool {
        !self.buf.contains(&b'\n')
            && tokio::time::timeout(within, self.body.next())
                .await
                .is_err()
    }
}

const SEC: Duration = Duration::from_secs(1);

#[tokio::test]
async fn register_good_key_and_reregister_keeps_name_addrs_and_tags() {
    let t = setup().await;
    let key = t
        .authkey(json!({"reusable": true, "tags": ["tag:home", "servers"]}))
        .await;
    let home = PrivateKey::generate();
    let (s, v) = t.register_raw(&key, &home, "Home-Server.lan").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r: RegisterResponse = serde_json::from_value(v).unwrap();
    assert_eq!(r.name.as_str(), "home-server");
    assert_eq!(r.addrs.ipv4.to_string(), "100.96.0.1");
    assert_eq!(r.addrs.ipv6.to_string(), "fd7a:115c:a1e0::1");
    assert_eq!(r.prefix_v4.to_string(), "100.96.0.0/16");
    assert!(r.credential.len() > 32);

    // The same key again, by its holder, with another auth key (other tags) and another
    // hostname: same id, name, addresses and tags; only the credential is new and the old one
    // stops working.
    let guest = t.authkey(json!({"reusable": true, "tags": ["tv"]})).await;
    let (s, v) = t.register_raw(&guest, &home, "renamed").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r2: RegisterResponse = serde_json::from_value(v).unwrap();
    assert_eq!(
        (r2.node_id, r2.addrs, r2.name.clone()),
        (r.node_id, r.addrs, r.name.clone())
    );
    assert_ne!(r2.credential, r.credential);
    let (_, nodes) = t.admin(Method::GET, api::PATH_ADMIN_NODES, None).await;
    assert_eq!(nodes[0]["tags"], json!(["home", "servers"]), "{nodes}");
    assert_eq!(nodes[0]["name"], "home-server");
    let (s, _) = t
        .node(
            Method::POST,
            api::PATH_ENDPOINTS,
            &r.credential,
            Some(json!({"endpoints": []})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = t
        .node(
            Method::POST,
            api::PATH_ENDPOINTS,
            &r2.credential,
            Some(json!({"endpoints": []})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // Another host with the same name gets a suffix and the next addresses; tags come from the key.
    let other = t.register(&key, "home-server").await;
    assert_eq!(other.name.as_str(), "home-server-2");
    assert_eq!(other.addrs.ipv4.to_string(), "100.96.0.2");
    let (_, nodes) = t.admin(Method::GET, api::PATH_ADMIN_NODES, None).await;
    assert_eq!(nodes.as_array().unwrap().len(), 2);
    assert_eq!(nodes[1]["tags"], json!(["home", "servers"]));
}

/// The attack of issue 11: a guest with any auth key and the home node's public key (which every
/// peer sees) asks for a credential for `home`. It must be refused, and home must keep its
/// name, tags, credential and map stream.
#[tokio::test]
async fn hijack_with_guest_key_and_home_public_key_is_refused() {
    let t = setup().await;
    let owner = t.authkey(json!({"tags": ["home"]})).await;
    let home_key = PrivateKey::generate();
    let (s, v) = t.register_raw(&owner, &home_key, "home").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let home: RegisterResponse = serde_json::from_value(v).unwrap();
    let mut stream = t.open_map(&home.credential).await;
    assert!(stream.next(SEC).await.unwrap().full);

    let guest = t.authkey(json!({"reusable": true, "tags": ["tv"]})).await;
    let home_pub = home_key.public_key().to_base64();
    let thief = PrivateKey::generate();
    let mut refused = vec![];
    // 1. The request from the issue, verbatim: no challenge, no proof.
    refused.push(
        t.register_body(json!({"authkey": guest, "public_key": home_pub, "hostname": "x"}))
            .await,
    );
    // 2. A fresh challenge, proven with the thief's own key while claiming home's public key.
    let mut body = t.proven(&guest, &thief, "x").await;
    body.public_key = home_key.public_key();
    refused.push(t.register_body(serde_json::to_value(&body).unwrap()).await);
    // 3. A proof of the right shape but made up.
    let mut body = t.proven(&guest, &thief, "x").await;
    body.public_key = home_key.public_key();
    body.proof = Some("A".repeat(43));
    refused.push(t.register_body(serde_json::to_value(&body).unwrap()).await);
    for (s, v) in &refused {
        assert_eq!(*s, StatusCode::UNAUTHORIZED, "{v}");
        assert_eq!(v["error"], "bad_proof", "{v}");
        assert!(v["detail"].as_str().unwrap().contains("proof"), "{v}");
    }

    // Home is untouched: name, tags, addresses, credential and its open map stream.
    let (_, nodes) = t.admin(Method::GET, api::PATH_ADMIN_NODES, None).await;
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
    assert_eq!(nodes[0]["name"], "home");
    assert_eq!(nodes[0]["tags"], json!(["home"]));
    assert_eq!(nodes[0]["online"], true);
    let (s, _) = t
        .node(
            Method::POST,
            api::PATH_ENDPOINTS,
            &home.credential,
            Some(json!({"endpoints": []})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "home's credential still works");
    let later = t.register(&guest, "tv").await;
    let d = stream.next(SEC).await.expect("home's stream is still open");
    assert!(d.peers.iter().any(|p| p.id == later.node_id), "{d:?}");
}

#[tokio::test]
async fn register_needs_a_fresh_single_use_challenge() {
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let node = PrivateKey::generate();

    // Without challenge or proof: 401 bad_proof naming what to do.
    let (s, v) = t
        .register_body(json!({"authkey": key, "public_key": node.public_key(), "hostname": "a"}))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"], "bad_proof");
    assert!(
        v["detail"].as_str().unwrap().contains(api::PATH_CHALLENGE),
        "{v}"
    );

    // A proof over other fields (the hostname changed after proving): bad_proof.
    let mut body = t.proven(&key, &node, "a").await;
    body.hostname = "b".into();
    let (s, v) = t.register_body(serde_json::to_value(&body).unwrap()).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_proof")),
        "{v}"
    );

    // A challenge never issued: bad_challenge.
    let mut body = t.proven(&key, &node, "a").await;
    body.challenge = Some(homeport_proto::register::encode_challenge(&[1; 32]));
    let (s, v) = t.register_body(serde_json::to_value(&body).unwrap()).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_challenge")),
        "{v}"
    );
    body.challenge = Some("not base64!".into());
    let (s, v) = t.register_body(serde_json::to_value(&body).unwrap()).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_challenge")),
        "{v}"
    );

    // A good registration, then the very same request replayed: the challenge is spent.
    let body = serde_json::to_value(t.proven(&key, &node, "a").await).unwrap();
    let (s, v) = t.register_body(body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = t.register_body(body).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"], "bad_challenge");
    assert!(
        v["detail"].as_str().unwrap().contains("already used"),
        "{v}"
    );

    // A challenge whose proof failed is spent too (no guessing against one challenge).
    let mut body = t.proven(&key, &node, "a").await;
    let good = body.proof.clone();
    body.proof = Some("A".repeat(43));
    let (s, _) = t.register_body(serde_json::to_value(&body).unwrap()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    body.proof = good;
    let (s, v) = t.register_body(serde_json::to_value(&body).unwrap()).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_challenge")),
        "{v}"
    );
}

/// 16 registrations race for one single-use key: exactly one node is created.
#[tokio::test]
async fn single_use_key_survives_a_16_way_race() {
    race_16_registrations_for_one_single_use_key(&setup().await).await;
}

/// The same race on PostgreSQL, where transactions really run side by side (SQLite serialises
/// writers, so only PostgreSQL shows a claim that is not one conditional UPDATE letting several
/// through). A throwaway cluster in a temp dir (deploy/setup.sh installs postgresql).
#[tokio::test]
async fn single_use_key_survives_a_16_way_race_on_postgres() {
    let Some(pg) = ThrowawayPostgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_postgres_db(&pg.url()).await;
    race_16_registrations_for_one_single_use_key(&setup_on(dir, url, None).await).await;
}

/// Two coordinator replicas sharing one PostgreSQL database (the high-availability setup) race
/// 16 registrations, 8 on each, for one single-use key: exactly one node is created. Each replica
/// issues its own challenges, so each node asks the replica it registers with.
#[tokio::test]
async fn single_use_key_stays_single_use_when_two_replicas_race_on_postgres() {
    let Some(pg) = ThrowawayPostgres::start() else {
        return;
    };
    let url = fresh_postgres_db(&pg.url()).await;
    let a = setup_on(tempfile::tempdir().unwrap(), url.clone(), None).await;
    let (st_b, first_b) = AppState::open(StateOptions {
        database_url: url,
        prefix_v4: None,
        prefix_v6: None,
        relays: vec![],
        identity: None,
        replica_url: None,
    })
    .await
    .unwrap();
    assert!(
        first_b.admin_token.is_none(),
        "the second replica uses the admin token the first one stored"
    );
    let b = T {
        _dir: tempfile::tempdir().unwrap(),
        st: st_b,
        admin_token: a.admin_token.clone(),
    };
    let key = a.authkey(json!({})).await;
    let mut racers = vec![];
    for i in 0..16 {
        let t = if i % 2 == 0 { &a } else { &b };
        let body = t
            .proven(&key, &PrivateKey::generate(), &format!("n{i}"))
            .await;
        racers.push((t.st.clone(), serde_json::to_value(body).unwrap()));
    }
    let tasks: Vec<_> = racers
        .into_iter()
        .map(|(st, body)| {
            tokio::spawn(async move {
                send(
                    app(st),
                    req(Method::POST, api::PATH_REGISTER, None, Some(body)),
                )
                .await
            })
        })
        .collect();
    let mut ok = 0;
    for h in tasks {
        let (s, v) = h.await.unwrap();
        if s == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
            assert!(
                v["detail"].as_str().unwrap().contains("already used"),
                "{v}"
            );
        }
    }
    assert_eq!(ok, 1, "one registration across both replicas");
    assert_eq!(a.st.store.load_nodes().await.unwrap().len(), 1);
    assert_eq!(b.st.store.load_nodes().await.unwrap().len(), 1);
}

async fn fresh_postgres_db(base: &str) -> String {
    use rand::Rng;
    sqlx::any::install_default_drivers();
    let db = format!("hp_test_{:016x}", rand::thread_rng().r#gen::<u64>());
    let admin = sqlx::AnyPool::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    format!("{base}/{db}")
}

/// A PostgreSQL cluster in a temp dir on a free loopback port, stopped on drop. As root it runs
/// as the `postgres` user (initdb refuses root). None (a skip notice) when PostgreSQL is not
/// installed, except under CI=true, where that is a failure.
struct ThrowawayPostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl ThrowawayPostgres {
    fn start() -> Option<ThrowawayPostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .find(|b| b.join("initdb").is_file())
        });
        let Some(bin) = bin else {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "PostgreSQL (initdb) is missing under CI=true: deploy/setup.sh installs postgresql"
            );
            eprintln!("skipped: PostgreSQL is not installed (deploy/setup.sh installs it)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = ThrowawayPostgres { dir, bin, port };
        if is_root() {
            let st = std::process::Command::new("chown")
                .args(["-R", "postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap();
            assert!(st.success(), "chown postgres failed");
        }
        let data = pg.dir.path().join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            pg.port,
            pg.dir.path().display()
        );
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
        );
        let log = pg.dir.path().join("log");
        pg.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        Some(pg)
    }

    fn run(&self, program: &str, args: &[&str]) {
        let exe = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let exe = self.bin.join("pg_ctl");
        let args = ["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"];
        let _ = if is_root() {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            std::process::Command::new(&exe).args(args).output()
        };
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

async fn race_16_registrations_for_one_single_use_key(t: &T) {
    let key = t.authkey(json!({})).await;
    let mut bodies = vec![];
    for i in 0..16 {
        let b = t
            .proven(&key, &PrivateKey::generate(), &format!("n{i}"))
            .await;
        bodies.push(serde_json::to_value(b).unwrap());
    }
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let st = t.st.clone();
            tokio::spawn(async move {
                send(
                    app(st),
                    req(Method::POST, api::PATH_REGISTER, None, Some(b)),
                )
                .await
            })
        })
        .collect();
    let mut ok = 0;
    for h in tasks {
        let (s, v) = h.await.unwrap();
        if s == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
            assert!(
                v["detail"].as_str().unwrap().contains("already used"),
                "{v}"
            );
        }
    }
    assert_eq!(ok, 1);
    let (_, nodes) = t.admin(Method::GET, api::PATH_ADMIN_NODES, None).await;
    assert_eq!(nodes.as_array().unwrap().len(), 1);

    // The same race straight against the store (no API write lock): the conditional UPDATE
    // alone lets one through.
    let key = t.authkey(json!({})).await;
    let (v4, v6) = {
        let m = t.st.mesh();
        (m.prefix_v4, m.prefix_v6)
    };
    let tasks: Vec<_> = (0..16u8)
        .map(|i| {
            let store = t.st.store.clone();
            let key = key.clone();
            tokio::spawn(async move {
                store
                    .register(
                        &key,
                        PrivateKey::generate().public_key(),
                        format!("s{i}").parse().unwrap(),
                        v4,
                        v6,
                        // Distinct names and addresses: nothing but the key claim can collide.
                        Some(std::net::Ipv4Addr::new(100, 96, 1, i)),
                    )
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for h in tasks {
        if h.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert_eq!(
        ok, 1,
        "exactly one store registration with a single-use key"
    );
}

#[tokio::test]
async fn ids_are_never_reused_after_deletion() {
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let vps = t.register(&key, "vps").await;
    t.announce_exit(&vps.credential, None).await;
    let a = t.register(&key, "a").await;
    let (s, _) = t
        .admin(
            Method::DELETE,
            &format!("{}/a", api::PATH_ADMIN_NODES),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let b = t.register(&key, "b").await;
    assert!(
        b.node_id.0 > a.node_id.0,
        "{:?} after {:?}",
        b.node_id,
        a.node_id
    );

    let rule = json!({"exit": "vps", "port": 8080, "to": "b:80"});
    let (s, r1) = t
        .admin(Method::POST, api::PATH_ADMIN_PUBLISH, Some(rule.clone()))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r1}");
    let id1 = r1["id"].as_i64().unwrap();
    let (s, _) = t
        .admin(
            Method::DELETE,
            &format!("{}/{id1}", api::PATH_ADMIN_PUBLISH),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, r2) = t
        .admin(Method::POST, api::PATH_ADMIN_PUBLISH, Some(rule))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r2}");
    assert!(r2["id"].as_i64().unwrap() > id1, "{r2} after {id1}");

    // Auth keys are revoked, not deleted; ids still only grow.
    let (_, list) = t.admin(Method::GET, api::PATH_ADMIN_AUTHKEYS, None).await;
    let k1 = list[0]["id"].as_i64().unwrap();
    t.admin(
        Method::DELETE,
        &format!("{}/{k1}", api::PATH_ADMIN_AUTHKEYS),
        None,
    )
    .await;
    t.authkey(json!({})).await;
    let (_, list) = t.admin(Method::GET, api::PATH_ADMIN_AUTHKEYS, None).await;
    assert!(
        list.as_array().unwrap().last().unwrap()["id"]
            .as_i64()
            .unwrap()
            > k1
    );
    let _ = vps;
}

#[tokio::test]
async fn ids_keep_growing_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StateOptions {
        database_url: fresh_db(dir.path()).await,
        ..Default::default()
    };
    let (st, _) = AppState::open(opts.clone()).await.unwrap();
    let (id, _) = st
        .store
        .create_authkey(false, &[], None, None)
        .await
        .unwrap();
    sqlx::query("DELETE FROM authkeys")
        .execute(&st.store.pool)
        .await
        .unwrap();
    st.store.pool.close().await;
    drop(st);
    let (st, _) = AppState::open(opts).await.unwrap();
    let (id2, _) = st
        .store
        .create_authkey(false, &[], None, None)
        .await
        .unwrap();
    assert!(id2 > id, "{id2} after {id}: the counter is in the database");
}

#[tokio::test]
async fn a_removed_node_joins_again_with_its_previous_address() {
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    t.register(&key, "a").await;
    let node = PrivateKey::generate();
    let (_, v) = t.register_raw(&key, &node, "home").await;
    let first: RegisterResponse = serde_json::from_value(v).unwrap();
    t.admin(
        Method::DELETE,
        &format!("{}/a", api::PATH_ADMIN_NODES),
        None,
    )
    .await;
    t.admin(
        Method::DELETE,
        &format!("{}/home", api::PATH_ADMIN_NODES),
        None,
    )
    .await;
    let ch = t.challenge().await;
    let mut body = RegisterRequest {
        authkey: key.clone(),
        public_key: node.public_key(),
        hostname: "home".into(),
        capver: homeport_proto::CAPABILITY_VERSION,
        previous_ipv4: Some(first.addrs.ipv4),
        challenge: Some(ch.challenge),
        proof: None,
    };
    body.proof = Some(homeport_proto::register::prove(&node, &ch.coordinator_key, &body).unwrap());
    let (s, v) = t.register_body(serde_json::to_value(&body).unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let again: RegisterResponse = serde_json::from_value(v).unwrap();
    assert_ne!(again.node_id, first.node_id);
    assert_eq!(
        again.addrs, first.addrs,
        "100.96.0.1 was free, .2 is the previous one"
    );
}

#[tokio::test]
async fn register_rejects_bad_keys() {
    let t = setup().await;
    let pk = || PrivateKey::generate().public_key().to_base64();
    let node = PrivateKey::generate;

    let (s, v) = t.register_raw("hpk_nonsense", &node(), "a").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"], "unauthorized");
    assert!(v["detail"].as_str().unwrap().contains("authkey"));

    // Revoked.
    let key = t.authkey(json!({"reusable": true})).await;
    let (_, list) = t.admin(Method::GET, api::PATH_ADMIN_AUTHKEYS, None).await;
    let id = list[0]["id"].as_i64().unwrap();
    assert!(key.starts_with(list[0]["prefix"].as_str().unwrap()));
    let (s, _) = t
        .admin(
            Method::DELETE,
            &format!("{}/{id}", api::PATH_ADMIN_AUTHKEYS),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = t.register_raw(&key, &node(), "a").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["detail"].as_str().unwrap().contains("revoked"), "{v}");
    let (s, _) = t
        .admin(
            Method::DELETE,
            &format!("{}/999", api::PATH_ADMIN_AUTHKEYS),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = t
        .admin(
            Method::DELETE,
            &format!("{}/abc", api::PATH_ADMIN_AUTHKEYS),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // Expired.
    let key = t.authkey(json!({"expires_secs": 3600})).await;
    sqlx::query("UPDATE authkeys SET expires_at = 1 WHERE expires_at IS NOT NULL")
        .execute(&t.st.store.pool)
        .await
        .unwrap();
    let (s, v) = t.register_raw(&key, &node(), "a").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["detail"].as_str().unwrap().contains("expired"), "{v}");

    // Single use: the second registration fails and leaves nothing behind.
    let key = t.authkey(json!({})).await;
    t.register(&key, "first").await;
    let (s, v) = t.register_raw(&key, &node(), "second").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        v["detail"].as_str().unwrap().contains("already used"),
        "{v}"
    );
    let (_, nodes) = t.admin(Method::GET, api::PATH_ADMIN_NODES, None).await;
    assert_eq!(nodes.as_array().unwrap().len(), 1);
    let (_, list) = t.admin(Method::GET, api::PATH_ADMIN_AUTHKEYS, None).await;
    let last = list.as_array().unwrap().last().unwrap();
    assert_eq!(last["used"], true);
    assert_eq!(last["reusable"], false);

    // Bad public key: 400 naming the field.
    let key = t.authkey(json!({"reusable": true})).await;
    let (s, v) = t
        .register_body(json!({"authkey": key, "public_key": "abc", "hostname": "a"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("public_key"), "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("44 characters"),
        "{v}"
    );

    // Unknown field, missing field, bad hostname.
    let (s, v) = send(
        app(t.st.clone()),
        req(
            Method::POST,
            api::PATH_REGISTER,
            None,
            Some(json!({"authkey": key, "public_key": pk(), "hostname": "a", "x": 1})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["detail"].as_str().unwrap().contains("unknown field `x`"),
        "{v}"
    );
    let (s, v) = send(
        app(t.st.clone()),
        req(
            Method::POST,
            api::PATH_REGISTER,
            None,
            Some(json!({"authkey": key})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("public_key"), "{v}");
    let (s, v) = t.register_raw(&key, &node(), "...").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("hostname"), "{v}");

    // Oversized body: 413 with an ApiError.
    let big = json!({"authkey": "x".repeat(70_000), "public_key": pk(), "hostname": "a"});
    let (s, v) = send(
        app(t.st.clone()),
        req(Method::POST, api::PATH_REGISTER, None, Some(big)),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"], "body_too_large");

    // Bad tag on key creation.
    let (s, v) = t
        .admin(
            Method::POST,
            api::PATH_ADMIN_AUTHKEYS,
            Some(json!({"tags": ["a b"]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("tags[0]"), "{v}");
}

#[tokio::test]
async fn admin_needs_token_over_https_router() {
    let t = setup().await;
    let (s, v) = send(
        app(t.st.clone()),
        req(Method::GET, api::PATH_ADMIN_NODES, None, None),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["detail"].as_str().unwrap().contains("admin token"));
    let (s, _) = send(
        app(t.st.clone()),
        req(Method::GET, api::PATH_ADMIN_NODES, Some("hpa_wrong"), None),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = send(
        app(t.st.clone()),
        req(
            Method::GET,
            api::PATH_ADMIN_NODES,
            Some(&t.admin_token),
            None,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!([]));
    // A node credential is not an admin token, and the map needs a credential.
    let (s, _) = send(
        app(t.st.clone()),
        req(Method::GET, api::PATH_MAP, None, None),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = send(app(t.st.clone()), req(Method::GET, "/nope", None, None)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"], "not_found");
    let (s, v) = send(
        app(t.st.clone()),
        req(Method::DELETE, api::PATH_REGISTER, None, None),
    )
    .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(v["error"], "method_not_allowed");
}

#[tokio::test]
async fn map_stream_full_then_deltas() {
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let a = t.register(&key, "a").await;
    let mut sa = t.open_map(&a.credential).await;
    let first = sa.next(SEC).await.unwrap();
    assert!(first.full);
    let mut map = NetworkMap::from_full(first).unwrap();
    assert_eq!(map.self_node.id, a.node_id);
    assert!(map.peers.is_empty());
    assert!(map.filter.allow_all);

    // A later registration reaches the open stream within a second.
    let b = t.register(&key, "b").await;
    let d = sa.next(SEC).await.unwrap();
    assert!(!d.full);
    assert_eq!(d.peers.len(), 1);
    assert_eq!(d.peers[0].id, b.node_id);
    assert!(!d.peers[0].online);
    let v0 = map.version;
    map.apply(d).unwrap();
    assert!(map.version > v0);

    // b comes online: a hears it; b's full map lists a as online.
    let mut sb = t.open_map(&b.credential).await;
    let fb = sb.next(SEC).await.unwrap();
    assert!(fb.full && fb.peers.len() == 1 && fb.peers[0].online);
    let d = sa.next(SEC).await.unwrap();
    assert!(d.peers[0].online);
    map.apply(d).unwrap();

    // Endpoints of b reach a; a probe from a reaches b.
    let (s, _) = t
        .node(
            Method::POST,
            api::PATH_ENDPOINTS,
            &b.credential,
            Some(json!({"endpoints": [{"addr": "203.0.113.5:41641", "kind": "stun"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let d = sa.next(SEC).await.unwrap();
    assert_eq!(
        d.peers[0].endpoints[0].addr.to_string(),
        "203.0.113.5:41641"
    );
    let (s, v) = t
        .node(
            Method::POST,
            api::PATH_ENDPOINTS,
            &b.credential,
            Some(json!({"endpoints": [{"addr": "0.0.0.0:1", "kind": "local"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("endpoints[0]"));
    let (s, _) = t
        .node(
            Method::POST,
            api::PATH_PROBE,
            &a.credential,
            Some(json!({"peer": b.node_id})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let p = sb.next(SEC).await.unwrap();
    assert_eq!(p.probe_requests[0].from, a.node_id);
    let (s, _) = t
        .node(
            Method::POST,
            api::PATH_PROBE,
            &a.credential,
            Some(json!({"peer": 999})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A second stream for b replaces the first, which ends; b stays online.
    let mut sb2 = t.open_map(&b.credential).await;
    assert!(sb2.next(SEC).await.unwrap().full);
    assert!(sb.next(SEC).await.is_none(), "the replaced stream ends");
    let (_, nodes) = t.admin(Method::GET, api::PATH_ADMIN_NODES, None).await;
    assert_eq!(nodes[1]["online"], true);

    // Dropping b's stream marks b offline for a.
    drop(sb2);
    let d = sa.next(SEC).await.unwrap();
    assert_eq!(d.peers[0].id, b.node_id);
    assert!(!d.peers[0].online);
}

#[tokio::test]
async fn keepalive_line_on_idle_stream() {
    let t = setup().await;
    let key = t.authkey(json!({})).await;
    let a = t.register(&key, "a").await;
    let mut s = t.open_map(&a.credential).await;
    let full = s.next(SEC).await.unwrap();
    // Pausing only now keeps the database's own timeouts on real time.
    tokio::time::pause();
    // Paused time auto-advances to the keepalive timer.
    let ka = s
        .next(Duration::from_secs(homeport_proto::map::MAP_KEEPALIVE_SECS))
        .await
        .unwrap();
    assert!(ka.is_keepalive());
    assert_eq!(ka.version, full.version);
}

#[tokio::test]
async fn node_removal_closes_stream_and_revokes() {
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let a = t.register(&key, "a").await;
    let b = t.register(&key, "b").await;
    let mut sa = t.open_map(&a.credential).await;
    let mut sb = t.open_map(&b.credential).await;
    // b came online before a read anything: a's full map already has it (coalesced).
    let full = sa.next(SEC).await.unwrap();
    assert!(full.full && full.peers[0].online);
    sb.next(SEC).await.unwrap();
    t.announce_exit(&a.credential, None).await;
    let (s, _) = t
        .admin(
            Method::POST,
            api::PATH_ADMIN_PUBLISH,
            Some(json!({"exit": "a", "port": 8080, "to": "b:80"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(sa.next(SEC).await.unwrap().publish.unwrap().len(), 1);
    assert_eq!(sb.next(SEC).await.unwrap().publish.unwrap().len(), 1);

    let (s, _) = t
        .admin(
            Method::DELETE,
            &format!("{}/b", api::PATH_ADMIN_NODES),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // b's stream ends at once.
    assert!(sb.next(SEC).await.is_none());
    // a learns b is gone and that the rule with it is gone, in one merged delta.
    let d = sa.next(SEC).await.unwrap();
    assert_eq!(d.peers_removed, vec![b.node_id]);
    assert_eq!(d.publish, Some(vec![]));
    // b's credential is dead.
    let resp = app(t.st.clone())
        .oneshot(req(Method::GET, api::PATH_MAP, Some(&b.credential), None))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let (s, _) = t
        .node(
            Method::POST,
            api::PATH_ENDPOINTS,
            &b.credential,
            Some(json!({"endpoints": []})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = t
        .admin(
            Method::DELETE,
            &format!("{}/b", api::PATH_ADMIN_NODES),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, rules) = t.admin(Method::GET, api::PATH_ADMIN_PUBLISH, None).await;
    assert_eq!(rules, json!([]));
}

#[tokio::test]
async fn publish_validation() {
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let vps = t.register(&key, "vps").await;
    let home = t.register(&key, "home").await;
    t.announce_exit(&vps.credential, None).await;
    let good = json!({"exit": "vps", "port": 32400, "to": "home:32400", "allow": ["192.0.2.0/24", "198.51.100.7", "2001:db8::/32"], "rate_per_minute": 30});
    let (s, rule) = t
        .admin(Method::POST, api::PATH_ADMIN_PUBLISH, Some(good.clone()))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{rule}");
    assert_eq!(rule["exit"], json!(vps.node_id));
    assert_eq!(rule["target"], json!(home.node_id));
    assert_eq!(rule["target_ipv4"], json!(home.addrs.ipv4));
    assert_eq!(rule["proto"], "tcp");
    assert_eq!(
        rule["guards"]["allow"],
        json!(["192.0.2.0/24", "198.51.100.7/32", "2001:db8::/32"])
    );

    // Duplicate (exit, port, proto): 409. Same port over udp is fine.
    let (s, v) = t
        .admin(Method::POST, api::PATH_ADMIN_PUBLISH, Some(good.clone()))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"], "conflict");
    let mut udp = good.clone();
    udp["proto"] = json!("udp");
    let (s, _) = t
        .admin(Method::POST, api::PATH_ADMIN_PUBLISH, Some(udp))
        .await;
    assert_eq!(s, StatusCode::CREATED);

    let cases = [
        (
            json!({"exit": "vps", "port": 1, "to": "home:1", "allow": ["10.0.0.0/33"]}),
            StatusCode::BAD_REQUEST,
            "10.0.0.0/33",
        ),
        (
            json!({"exit": "vps", "port": 1, "to": "home:1", "allow": ["nope"]}),
            StatusCode::BAD_REQUEST,
            "allow[0]",
        ),
        (
            json!({"exit": "vps", "port": 0, "to": "home:1"}),
            StatusCode::BAD_REQUEST,
            "port",
        ),
        (
            json!({"exit": "vps", "port": 70000, "to": "home:1"}),
            StatusCode::BAD_REQUEST,
            "port",
        ),
        (
            json!({"exit": "vps", "port": 1, "proto": "sctp", "to": "home:1"}),
            StatusCode::BAD_REQUEST,
            "tcp or udp",
        ),
        (
            json!({"exit": "vps", "port": 1, "to": "home"}),
            StatusCode::BAD_REQUEST,
            "NODE:PORT",
        ),
        (
            json!({"exit": "vps", "port": 1, "to": "home:0"}),
            StatusCode::BAD_REQUEST,
            "NODE:PORT",
        ),
        (
            json!({"exit": "ghost", "port": 1, "to": "home:1"}),
            StatusCode::NOT_FOUND,
            "ghost",
        ),
        (
            json!({"exit": "vps", "port": 1, "to": "ghost:1"}),
            StatusCode::NOT_FOUND,
            "ghost",
        ),
    ];
    for (body, status, needle) in cases {
        let (s, v) = t
            .admin(Method::POST, api::PATH_ADMIN_PUBLISH, Some(body.clone()))
            .await;
        assert_eq!(s, status, "{body} → {v}");
        assert!(
            v["detail"].as_str().unwrap().contains(needle),
            "{body} → {v}"
        );
    }
    let (_, list) = t.admin(Method::GET, api::PATH_ADMIN_PUBLISH, None).await;
    assert_eq!(
        list.as_array().unwrap().len(),
        2,
        "failed requests stored nothing"
    );

    let id = rule["id"].as_i64().unwrap();
    let (s, _) = t
        .admin(
            Method::DELETE,
            &format!("{}/{id}", api::PATH_ADMIN_PUBLISH),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = t
        .admin(
            Method::DELETE,
            &format!("{}/{id}", api::PATH_ADMIN_PUBLISH),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// Issue 16: a rule on a node that runs no exit is refused with the exits named; a country rule
/// needs an exit with a country database (the error says where to get one); country codes are
/// checked and normalised.
#[tokio::test]
async fn publish_needs_an_exit_and_country_rules_a_country_database() {
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let vps = t.register(&key, "vps").await;
    let home = t.register(&key, "home").await;
    let post = async |body: Value| {
        t.admin(Method::POST, api::PATH_ADMIN_PUBLISH, Some(body))
            .await
    };
    let (s, v) = post(json!({"exit": "vps", "port": 80, "to": "home:80"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("no node runs an exit yet"),
        "{v}"
    );
    t.announce_exit(&vps.credential, None).await;
    let (s, v) = post(json!({"exit": "home", "port": 80, "to": "home:80"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let d = v["detail"].as_str().unwrap();
    assert!(
        d.contains("home runs no exit") && d.contains("the exits are: vps"),
        "{d}"
    );
    let (s, v) = post(json!({"exit": "vps", "port": 80, "to": "home:80", "country": ["DE"]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let d = v["detail"].as_str().unwrap();
    assert!(
        d.contains("no country database")
            && d.contains("GeoLite2-Country")
            && d.contains("--country-db"),
        "{d}"
    );
    t.announce_exit(&vps.credential, Some("GeoLite2-Country 2026-11-20"))
        .await;
    for (body, needle) in [
        (
            json!({"exit": "vps", "port": 80, "to": "home:80", "country": ["DEU"]}),
            "country[0]",
        ),
        (
            json!({"exit": "vps", "port": 80, "to": "home:80", "deny_country": ["CN", "1"]}),
            "deny_country[1]",
        ),
    ] {
        let (s, v) = post(body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} → {v}");
        assert!(
            v["detail"].as_str().unwrap().contains(needle),
            "{body} → {v}"
        );
    }
    let (s, r) =
        post(json!({"exit": "vps", "port": 80, "to": "home:80", "country": ["at", "DE", "de"]}))
            .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    assert_eq!(r["guards"]["countries"], json!(["AT", "DE"]));
    let (_, exits) = t
        .admin(Method::GET, homeport_proto::exit::PATH_ADMIN_EXITS, None)
        .await;
    assert_eq!(exits[0]["name"], "vps");
    assert_eq!(exits[0]["public_addrs"], json!(["198.51.100.10"]));
    assert_eq!(exits[0]["country_db"], "GeoLite2-Country 2026-11-20");
    let _ = home;
}

#[tokio::test]
async fn policy_set_validates_and_pushes_filters() {
    let t = setup().await;
    let friends = t
        .authkey(json!({"reusable": true, "tags": ["friends"]}))
        .await;
    let plain = t.authkey(json!({"reusable": true})).await;
    let home = t.register(&plain, "home").await;
    let tv = t.register(&friends, "tv").await;
    let mut sh = t.open_map(&home.credential).await;
    let mut st = t.open_map(&tv.credential).await;
    // tv came online before home read anything: one full map that has it (coalesced).
    let full = sh.next(SEC).await.unwrap();
    assert!(full.filter.unwrap().allow_all);
    assert!(full.peers[0].online);
    st.next(SEC).await.unwrap();

    let (s, v) = t.admin(Method::GET, api::PATH_ADMIN_POLICY, None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"rules": []})));

    let (s, v) = t
        .admin(
            Method::PUT,
            api::PATH_ADMIN_POLICY,
            Some(json!({"rules": [{"from": ["tag:fr iends"], "to": ["*"]}]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["detail"].as_str().unwrap().contains("tag:fr iends"),
        "{v}"
    );
    let (s, v) = t
        .admin(
            Method::PUT,
            api::PATH_ADMIN_POLICY,
            Some(json!({"rules": [{"from": ["*"], "to": ["*"], "ports": ["tcp:0"]}]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("rules[0]"), "{v}");

    let p = json!({"rules": [{"from": ["tag:friends"], "to": ["node:home"], "ports": ["tcp:32400", "icmp"]}]});
    let (s, v) = t
        .admin(Method::PUT, api::PATH_ADMIN_POLICY, Some(p.clone()))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, got) = t.admin(Method::GET, api::PATH_ADMIN_POLICY, None).await;
    assert_eq!(got, p);

    let f = sh.next(SEC).await.unwrap().filter.unwrap();
    assert!(!f.allow_all);
    assert_eq!(f.rules.len(), 2);
    assert!(f.rules.iter().all(|r| r.sources.len() == 2));
    assert!(f.rules[0].sources[0].contains(&std::net::IpAddr::V4(tv.addrs.ipv4)));
    // The tv is reachable from nobody now.
    let ft = st.next(SEC).await.unwrap().filter.unwrap();
    assert!(!ft.allow_all && ft.rules.is_empty());

    // A new friend changes home's filter (and only adds a peer for the tv).
    let phone = t.register(&friends, "phone").await;
    let d = sh.next(SEC).await.unwrap();
    assert_eq!(d.peers[0].id, phone.node_id);
    assert_eq!(d.filter.unwrap().rules[0].sources.len(), 4);
    // Maps are trimmed by policy: two friends may not talk, so the tv hears nothing of it.
    assert!(st.quiet(Duration::from_millis(300)).await);

    // Clearing the policy (no rules) means allow all again.
    t.admin(
        Method::PUT,
        api::PATH_ADMIN_POLICY,
        Some(json!({"rules": []})),
    )
    .await;
    assert!(sh.next(SEC).await.unwrap().filter.unwrap().allow_all);
}

#[tokio::test]
async fn openapi_covers_every_endpoint() {
    let t = setup().await;
    let (s, v) = send(
        app(t.st.clone()),
        req(Method::GET, api::PATH_OPENAPI, None, None),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        api::PATH_CHALLENGE,
        api::PATH_REGISTER,
        api::PATH_MAP,
        api::PATH_ENDPOINTS,
        api::PATH_PROBE,
        api::PATH_ADMIN_AUTHKEYS,
        "/api/v1/admin/authkeys/{id}",
        api::PATH_ADMIN_NODES,
        "/api/v1/admin/nodes/{name}",
        api::PATH_ADMIN_PUBLISH,
        "/api/v1/admin/publish/{id}",
        api::PATH_ADMIN_POLICY,
        homeport_proto::device::PATH_ADMIN_DEVICES,
        "/api/v1/admin/devices/{name}",
    ] {
        assert!(v["paths"][p].is_object(), "{p} missing");
    }
}

#[tokio::test]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_db(dir.path()).await;
    let opts = StateOptions {
        database_url: url,
        ..Default::default()
    };
    let (st, first) = AppState::open(opts.clone()).await.unwrap();
    assert!(first.admin_token.is_some());
    let v6 = st.mesh().prefix_v6;
    assert!(v6.to_string().starts_with("fd"));
    assert_eq!(v6.prefix_len(), 64);
    drop(st);
    let (st, first) = AppState::open(opts.clone()).await.unwrap();
    assert!(
        first.admin_token.is_none(),
        "the admin token is created once"
    );
    assert_eq!(st.mesh().prefix_v6, v6, "the ULA prefix is persisted");
    let mut other = opts;
    other.prefix_v4 = Some("10.1.0.0/16".parse().unwrap());
    let e = AppState::open(other).await.err().unwrap().to_string();
    assert!(e.contains("prefix-v4"), "{e}");
    let _ = NodeId(0);
}

/// Every admin operation in the served spec answers 401 without a token and with a wrong one,
/// and no other method on an admin path does anything but 401 or 405 — walked from the spec, so
/// a new admin route is checked without editing this test.
#[tokio::test]
async fn every_admin_route_without_a_token_is_401() {
    let t = setup().await;
    let (s, spec) = send(
        app(t.st.clone()),
        req(Method::GET, api::PATH_OPENAPI, None, None),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let mut checked = 0;
    for (path, ops) in spec["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "1").replace("{name}", "home");
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            let op = &ops[method.to_ascii_lowercase()];
            let admin_op = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("adminToken").is_some()));
            if path.starts_with("/api/v1/admin") {
                assert!(
                    op.is_null() || admin_op,
                    "{method} {path} is under /api/v1/admin but its spec does not require the admin token"
                );
            }
            let m: Method = method.parse().unwrap();
            for bearer in [None, Some("hpa_wrong")] {
                let body = Some(json!({}));
                let (s, v) = send(app(t.st.clone()), req(m.clone(), &concrete, bearer, body)).await;
                if admin_op {
                    assert_eq!(
                        s,
                        StatusCode::UNAUTHORIZED,
                        "{method} {path} with {bearer:?}: {v}"
                    );
                    checked += 1;
                } else if path.starts_with("/api/v1/admin") {
                    assert!(
                        s == StatusCode::UNAUTHORIZED || s == StatusCode::METHOD_NOT_ALLOWED,
                        "{method} {path} (not in the spec) answered {s}: {v}"
                    );
                }
            }
        }
    }
    assert!(
        checked >= 2 * 10,
        "only {checked} admin operations found in the spec"
    );
}

// ---- abuse of the node API ----

/// Sends `method path` with `cred` and returns status, Retry-After and body.
async fn send_full(
    t: &T,
    method: Method,
    path: &str,
    cred: &str,
    body: Value,
) -> (StatusCode, Option<u64>, Value) {
    let resp = app(t.st.clone())
        .oneshot(req(method, path, Some(cred), Some(body)))
        .await
        .unwrap();
    let status = resp.status();
    let retry = resp
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        retry,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn endpoint_report_flood_is_rate_limited_per_node() {
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let a = t.register(&key, "a").await;
    let b = t.register(&key, "b").await;
    let report = json!({"endpoints": [{"addr": "198.51.100.7:41641", "kind": "stun"}]});
    let mut limited = None;
    for i in 0..50 {
        let (s, retry, v) = send_full(
            &t,
            Method::POST,
            api::PATH_ENDPOINTS,
            &a.credential,
            report.clone(),
        )
        .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert!(
                retry.is_some_and(|r| r >= 1),
                "429 without Retry-After: {v}"
            );
            assert!(
                v["detail"].as_str().unwrap().contains("endpoint reports"),
                "{v}"
            );
            limited = Some(i);
            break;
        }
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    }
    let at = limited.expect("50 reports in a burst were all accepted");
    assert!(at >= 5, "limited after only {at} reports");
    // Another node's budget is its own.
    let (s, _, v) = send_full(&t, Method::POST, api::PATH_ENDPOINTS, &b.credential, report).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
}

#[tokio::test]
async fn probe_ask_flood_is_rate_limited_per_node() {
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let a = t.register(&key, "a").await;
    let b = t.register(&key, "b").await;
    let ask = json!({"peer": b.node_id});
    let mut limited = None;
    for i in 0..200 {
        let (s, retry, v) = send_full(
            &t,
            Method::POST,
            api::PATH_PROBE,
            &a.credential,
            ask.clone(),
        )
        .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert!(
                retry.is_some_and(|r| r >= 1),
                "429 without Retry-After: {v}"
            );
            limited = Some(i);
            break;
        }
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    }
    assert!(limited.expect("200 probe asks in a burst were all accepted") >= 10);
    let (s, _, v) = send_full(
        &t,
        Method::POST,
        api::PATH_PROBE,
        &b.credential,
        json!({"peer": a.node_id}),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
}

#[tokio::test]
async fn unusable_endpoint_candidates_are_refused_by_name() {
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let a = t.register(&key, "a").await;
    for (bad, why) in [
        ("0.0.0.0:41641", "unspecified"),
        ("127.0.0.1:41641", "loopback"),
        ("224.0.0.251:5353", "multicast"),
        ("255.255.255.255:41641", "broadcast"),
        ("198.51.100.7:0", "port 0"),
        ("[::]:41641", "unspecified"),
        ("[::1]:41641", "loopback"),
        ("[ff02::1]:41641", "multicast"),
        ("[::ffff:127.0.0.1]:41641", "loopback"),
    ] {
        let body = json!({"endpoints": [
            {"addr": "198.51.100.7:41641", "kind": "stun"},
            {"addr": bad, "kind": "local"},
        ]});
        let (s, v) = t
            .node(Method::POST, api::PATH_ENDPOINTS, &a.credential, Some(body))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad} was accepted");
        let d = v["detail"].as_str().unwrap();
        assert!(d.contains("endpoints[1]") && d.contains(why), "{bad}: {d}");
    }
    let many: Vec<Value> = (1..=33)
        .map(|i| json!({"addr": format!("198.51.100.{i}:41641"), "kind": "local"}))
        .collect();
    let (s, v) = t
        .node(
            Method::POST,
            api::PATH_ENDPOINTS,
            &a.credential,
            Some(json!({"endpoints": many})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("at most 32"), "{v}");
    // Nothing bad was stored: the node has no endpoints.
    let (_, nodes) = t.admin(Method::GET, api::PATH_ADMIN_NODES, None).await;
    assert_eq!(nodes[0]["endpoints"], json!([]));
}

#[tokio::test]
async fn probe_ask_for_a_peer_the_policy_separates_is_403() {
    let t = setup().await;
    let guests = t
        .authkey(json!({"reusable": true, "tags": ["guest"]}))
        .await;
    let plain = t.authkey(json!({"reusable": true})).await;
    let home = t.register(&plain, "home").await;
    let tv = t.register(&guests, "tv").await;
    let laptop = t.register(&plain, "laptop").await;
    let mut sh = t.open_map(&home.credential).await;
    sh.next(SEC).await.unwrap();
    // Guests may reach home; nothing may reach the laptop from guests or the other way.
    let (s, v) = t
        .admin(
            Method::PUT,
            api::PATH_ADMIN_POLICY,
            Some(json!({"rules": [{"from": ["tag:guest"], "to": ["node:home"], "ports": ["tcp:32400"]},
                                  {"from": ["node:home"], "to": ["node:laptop"]}]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = t
        .node(
            Method::POST,
            api::PATH_PROBE,
            &tv.credential,
            Some(json!({"peer": laptop.node_id})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("policy"), "{v}");
    let (s, _) = t
        .node(
            Method::POST,
            api::PATH_PROBE,
            &laptop.credential,
            Some(json!({"peer": tv.node_id})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Either direction allowed is enough: home <-> tv both ways, and home is told to probe.
    let (s, v) = t
        .node(
            Method::POST,
            api::PATH_PROBE,
            &tv.credential,
            Some(json!({"peer": home.node_id})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    loop {
        let m = sh.next(SEC).await.unwrap();
        if let Some(p) = m.probe_requests.first() {
            assert_eq!(p.from, tv.node_id);
            break;
        }
    }
    let (s, _) = t
        .node(
            Method::POST,
            api::PATH_PROBE,
            &home.credential,
            Some(json!({"peer": tv.node_id})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn reusable_key_with_max_uses_stops_after_n() {
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true, "max_uses": 2})).await;
    t.register(&key, "one").await;
    t.register(&key, "two").await;
    let (s, v) = t.register_raw(&key, &PrivateKey::generate(), "three").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("max-uses"), "{v}");
    let (_, keys) = t.admin(Method::GET, api::PATH_ADMIN_AUTHKEYS, None).await;
    assert_eq!(
        (keys[0]["max_uses"].clone(), keys[0]["uses"].clone()),
        (json!(2), json!(2))
    );
    // Concurrent registrations never exceed the limit.
    let key = t.authkey(json!({"reusable": true, "max_uses": 3})).await;
    let mut tasks = vec![];
    for i in 0..10 {
        let st = t.st.clone();
        let body = t
            .proven(&key, &PrivateKey::generate(), &format!("race{i}"))
            .await;
        tasks.push(tokio::spawn(async move {
            send(
                app(st),
                req(
                    Method::POST,
                    api::PATH_REGISTER,
                    None,
                    Some(serde_json::to_value(body).unwrap()),
                ),
            )
            .await
            .0
        }));
    }
    let mut ok = 0;
    for task in tasks {
        if task.await.unwrap() == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 3);
    // Refused shapes, each named.
    for (body, needle) in [
        (json!({"reusable": true, "max_uses": 0}), "out of range"),
        (
            json!({"reusable": true, "max_uses": 1_000_001}),
            "out of range",
        ),
    ] {
        let (s, v) = t
            .admin(Method::POST, api::PATH_ADMIN_AUTHKEYS, Some(body))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["detail"].as_str().unwrap().contains(needle), "{v}");
    }
}

#[tokio::test]
async fn exhausted_address_pool_is_a_clear_409() {
    // A /30 holds two nodes (.1 and .2; .0 and .3 are network and broadcast).
    let t = setup_with(Some("100.96.0.0/30")).await;
    let key = t.authkey(json!({"reusable": true})).await;
    t.register(&key, "one").await;
    t.register(&key, "two").await;
    let (s, v) = t.register_raw(&key, &PrivateKey::generate(), "three").await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("no free address"),
        "{v}"
    );
    // The coordinator still serves.
    let (s, nodes) = t.admin(Method::GET, api::PATH_ADMIN_NODES, None).await;
    assert_eq!((s, nodes.as_array().unwrap().len()), (StatusCode::OK, 2));
}

#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_400() {
    // serde takes a JSON array as a struct's fields in order: `[]` was stored as an empty
    // policy (allow all). Every body of this API is an object.
    let t = setup().await;
    for body in [json!([]), json!([[]]), json!("rules"), json!(7)] {
        let (s, v) = t
            .admin(Method::PUT, api::PATH_ADMIN_POLICY, Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {v}");
        assert!(v["detail"].as_str().unwrap().contains("JSON object"), "{v}");
    }
    let (s, _) = t
        .admin(
            Method::PUT,
            api::PATH_ADMIN_POLICY,
            Some(json!({"rules": []})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
}

/// Nodes report their paths and the exit its live connections; the admin overview (what the
/// dashboard polls) joins them to names, rules and allow-list entries; bad reports name the field.
#[tokio::test]
async fn status_reports_make_the_overview() {
    use homeport_proto::status;
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let vps = t.register(&key, "vps").await;
    let home = t.register(&key, "home").await;
    t.announce_exit(&vps.credential, None).await;
    let (s, v) = t
        .admin(
            Method::POST,
            api::PATH_ADMIN_PUBLISH,
            Some(json!({"exit": "vps", "port": 32400, "to": "home:32400", "allow": ["192.0.2.0/24"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let rule = v["id"].as_i64().unwrap();

    let report = json!({"version": "homeport 0.1.0", "peers": [
        {"peer": vps.node_id.0, "path": "direct", "addr": "198.51.100.10:41641",
         "last_handshake_secs_ago": 3, "rx_bytes": 10, "tx_bytes": 20}]});
    let (s, v) = t
        .node(
            Method::POST,
            status::PATH_NODE_STATUS,
            &home.credential,
            Some(report),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let exit = json!({"version": "homeport-exit 0.1.0", "rules_applied": [rule],
        "live": [{"rule": rule, "source": "192.0.2.50:40000", "bytes_in": 300, "bytes_out": 9000, "duration_secs": 4}],
        "recent": [{"time": "2026-11-29T20:00:00Z", "source": "203.0.113.9", "rule": rule,
            "verdict": "not-in-allow-list", "packets": 3}]});
    let (s, v) = t
        .node(
            Method::POST,
            status::PATH_EXIT_STATUS,
            &vps.credential,
            Some(exit),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    // Without a credential: 401; without the admin token, no overview.
    let (s, _) = send(
        app(t.st.clone()),
        req(
            Method::POST,
            status::PATH_NODE_STATUS,
            None,
            Some(json!({"version": "x", "peers": []})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = send(
        app(t.st.clone()),
        req(Method::GET, status::PATH_ADMIN_OVERVIEW, None, None),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, o) = t
        .admin(Method::GET, status::PATH_ADMIN_OVERVIEW, None)
        .await;
    assert_eq!(s, StatusCode::OK, "{o}");
    let o: status::Overview = serde_json::from_value(o).unwrap();
    let h = o
        .nodes
        .iter()
        .find(|n| n.info.name.as_str() == "home")
        .unwrap();
    assert_eq!(h.version.as_deref(), Some("homeport 0.1.0"));
    assert_eq!(h.peers.len(), 1);
    assert_eq!(h.peers[0].peer_name.as_str(), "vps");
    assert_eq!(
        h.peers[0].report.addr.as_deref(),
        Some("198.51.100.10:41641")
    );
    let x = o
        .nodes
        .iter()
        .find(|n| n.info.name.as_str() == "vps")
        .unwrap();
    assert!(x.exit.as_ref().is_some_and(|e| e.rules_in_sync), "{x:?}");
    assert_eq!((o.direct_paths, o.relayed_paths), (1, 0));
    let p = &o.publish[0];
    assert_eq!(p.applied, Some(true));
    assert_eq!(p.live.len(), 1);
    assert_eq!(p.live[0].label, "192.0.2.0/24");
    assert_eq!(p.live[0].conn.bytes_out, 9000);
    assert_eq!(p.recent[0].verdict, "not-in-allow-list");

    // Too many peers, an unknown field: 400 naming it.
    let peers: Vec<Value> = (0..=status::MAX_REPORT_PEERS)
        .map(|i| json!({"peer": i, "path": "none", "rx_bytes": 0, "tx_bytes": 0}))
        .collect();
    let (s, v) = t
        .node(
            Method::POST,
            status::PATH_NODE_STATUS,
            &home.credential,
            Some(json!({"version": "x", "peers": peers})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["detail"].as_str().unwrap().starts_with("peers:"), "{v}");
    let (s, v) = t
        .node(
            Method::POST,
            status::PATH_NODE_STATUS,
            &home.credential,
            Some(json!({"version": "x", "peers": [], "extra": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // A removed node's report goes with it.
    let (s, _) = t
        .admin(
            Method::DELETE,
            &format!("{}/home", api::PATH_ADMIN_NODES),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, o) = t
        .admin(Method::GET, status::PATH_ADMIN_OVERVIEW, None)
        .await;
    let o: status::Overview = serde_json::from_value(o).unwrap();
    assert_eq!(o.nodes.len(), 1);
    assert!(o.publish.is_empty(), "the rule went with its target");
}

/// Issue 16: invites. Only for a restricted port on an exit that serves invite pages; the token
/// is shown once and redeemed only by that exit's credential; each new address takes a use; a
/// revoked invite's grants are gone.
#[tokio::test]
async fn invites_are_redeemed_by_their_exit_up_to_their_uses_and_revoked() {
    use homeport_proto::invite::{PATH_ADMIN_INVITES, PATH_NODE_INVITE_REDEEM, PATH_NODE_INVITES};
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let vps = t.register(&key, "vps").await;
    let other = t.register(&key, "other").await;
    let _home = t.register(&key, "home").await;
    t.announce_exit(&vps.credential, None).await;
    let (s, _) = t
        .admin(
            Method::POST,
            api::PATH_ADMIN_PUBLISH,
            Some(json!({"exit": "vps", "port": 80, "to": "home:80"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let invite = json!({"port": 80, "name": "alice", "days": 30, "uses": 2});
    let (s, v) = t
        .admin(Method::POST, PATH_ADMIN_INVITES, Some(invite.clone()))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "open to everyone: {v}");
    assert!(
        v["detail"].as_str().unwrap().contains("open to everyone"),
        "{v}"
    );
    let (s, _) = t
        .admin(
            Method::POST,
            api::PATH_ADMIN_PUBLISH,
            Some(json!({"exit": "vps", "port": 81, "to": "home:80", "allow": ["203.0.113.0/24"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let invite = json!({"port": 81, "name": "alice", "days": 30, "uses": 2});
    let (s, v) = t
        .admin(Method::POST, PATH_ADMIN_INVITES, Some(invite.clone()))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("--invite-port"),
        "{v}"
    );
    // The exit serves invite pages now.
    let (s, _) = t
        .node(
            Method::POST,
            homeport_proto::exit::PATH_EXIT_ANNOUNCE,
            &vps.credential,
            Some(json!({"public_addrs": ["198.51.100.10"], "invite_port": 8088})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = t
        .admin(Method::POST, PATH_ADMIN_INVITES, Some(invite))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let link = v["link"].as_str().unwrap();
    let token = link
        .strip_prefix("http://198.51.100.10:8088/i/")
        .expect(link);
    assert_eq!(token.len(), 43, "256 bits, base64url");
    let redeem = |cred: String, addr: &'static str| {
        let t = &t;
        let token = token.to_string();
        async move {
            t.node(
                Method::POST,
                PATH_NODE_INVITE_REDEEM,
                &cred,
                Some(json!({"token": token, "addr": addr})),
            )
            .await
        }
    };
    // Another node's credential cannot redeem it.
    let (s, _) = redeem(other.credential.clone(), "192.0.2.50").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, g) = redeem(vps.credential.clone(), "192.0.2.50").await;
    assert_eq!(s, StatusCode::OK, "{g}");
    assert_eq!(
        (g["name"].as_str(), g["port"].as_u64()),
        (Some("alice"), Some(81))
    );
    let (s, _) = redeem(vps.credential.clone(), "192.0.2.50").await;
    assert_eq!(s, StatusCode::OK, "the same address again takes no use");
    let (s, _) = redeem(vps.credential.clone(), "192.0.2.51").await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = redeem(vps.credential.clone(), "192.0.2.52").await;
    assert_eq!(s, StatusCode::CONFLICT, "uses spent");
    let (_, grants) = t
        .node(Method::GET, PATH_NODE_INVITES, &vps.credential, None)
        .await;
    assert_eq!(grants.as_array().unwrap().len(), 2, "{grants}");
    let (_, none) = t
        .node(Method::GET, PATH_NODE_INVITES, &other.credential, None)
        .await;
    assert_eq!(none, json!([]));
    let (_, list) = t.admin(Method::GET, PATH_ADMIN_INVITES, None).await;
    assert!(
        !list.to_string().contains(token),
        "the token is never listed"
    );
    let id = list[0]["id"].as_i64().unwrap();
    let (s, _) = t
        .admin(Method::DELETE, &format!("{PATH_ADMIN_INVITES}/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, grants) = t
        .node(Method::GET, PATH_NODE_INVITES, &vps.credential, None)
        .await;
    assert_eq!(grants, json!([]), "revoked: no grants");
    let (s, _) = redeem(vps.credential.clone(), "192.0.2.50").await;
    assert_eq!(s, StatusCode::GONE);
}

/// A coordinator replica on `url` (a PostgreSQL database other replicas share), joined to the
/// others and listening for their changes until the returned token is cancelled.
async fn replica(
    url: &str,
    public_url: &str,
    admin_token: Option<String>,
) -> (T, tokio_util::sync::CancellationToken) {
    let (st, first) = AppState::open(StateOptions {
        database_url: url.to_string(),
        prefix_v6: Some("fd7a:115c:a1e0::/64".parse().unwrap()),
        replica_url: Some(public_url.to_string()),
        ..Default::default()
    })
    .await
    .unwrap();
    let me = homeport_coordinator::replicas::Replica {
        url: public_url.to_string(),
        pin: format!("pin-of-{public_url}"),
        relay: homeport_proto::map::RelayInfo {
            udp: None,
            stun: None,
            public_key: None,
        },
    };
    homeport_coordinator::replicas::run_start(&st, &me)
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(homeport_coordinator::replicas::run(
        st.clone(),
        me,
        url.to_string(),
        stop.clone(),
    ));
    let admin_token = admin_token.or(first.admin_token).unwrap();
    (
        T {
            _dir: tempfile::tempdir().unwrap(),
            st,
            admin_token,
        },
        stop,
    )
}

impl MapStream {
    /// Reads lines until one satisfies `done`; how long that took. Fails after `within`.
    async fn until(
        &mut self,
        within: Duration,
        what: &str,
        done: impl Fn(&MapMessage) -> bool,
    ) -> Duration {
        let t0 = std::time::Instant::now();
        loop {
            let left = within
                .checked_sub(t0.elapsed())
                .unwrap_or_else(|| panic!("{what}: not within {within:?}"));
            let m = tokio::time::timeout(left, self.next(left + SEC))
                .await
                .unwrap_or_else(|_| panic!("{what}: not within {within:?}"))
                .unwrap_or_else(|| panic!("{what}: the stream ended"));
            if done(&m) {
                return t0.elapsed();
            }
        }
    }
}

/// High availability: two replicas share one PostgreSQL database (a throwaway cluster). Every
/// kind of change made on replica B (a node registers, its stream opens there, its endpoints,
/// the policy, a publish rule, its stream closes, its removal) reaches a map stream held on
/// replica A within 1 s; both replicas are in the map's coordinator list. Without the
/// LISTEN/NOTIFY between replicas none of it arrives.
#[tokio::test]
async fn a_change_on_one_replica_reaches_streams_on_the_other_within_1_s_on_postgres() {
    let Some(pg) = ThrowawayPostgres::start() else {
        return;
    };
    let url = fresh_postgres_db(&pg.url()).await;
    let (a, stop_a) = replica(&url, "https://198.51.100.10:8443", None).await;
    let (b, stop_b) = replica(
        &url,
        "https://198.51.100.11:8443",
        Some(a.admin_token.clone()),
    )
    .await;
    let key = a.authkey(json!({"reusable": true})).await;
    let vps = a.register(&key, "vps").await;
    a.announce_exit(&vps.credential, None).await;
    let mut on_a = a.open_map(&vps.credential).await;
    let full = on_a.next(SEC).await.unwrap();
    let urls: Vec<String> = full
        .coordinators
        .unwrap()
        .into_iter()
        .map(|c| c.url)
        .collect();
    assert_eq!(
        urls,
        ["https://198.51.100.10:8443", "https://198.51.100.11:8443"]
    );
    let limit = SEC;
    let mut took = vec![];

    let home = b.register(&key, "home").await;
    let id = home.node_id;
    took.push(
        on_a.until(limit, "a node registered on B", |m| {
            m.peers.iter().any(|p| p.id == id)
        })
        .await,
    );
    let mut on_b = b.open_map(&home.credential).await;
    took.push(
        on_a.until(limit, "its stream opened on B", |m| {
            m.peers.iter().any(|p| p.id == id && p.online)
        })
        .await,
    );
    let (s, v) = b
        .node(
            Method::POST,
            api::PATH_ENDPOINTS,
            &home.credential,
            Some(json!({"endpoints": [{"addr": "203.0.113.7:41641", "kind": "stun"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    took.push(
        on_a.until(limit, "its endpoints reported to B", |m| {
            m.peers
                .iter()
                .any(|p| p.id == id && p.endpoints.iter().any(|e| e.addr.port() == 41641))
        })
        .await,
    );
    let (s, v) = b
        .admin(
            Method::PUT,
            api::PATH_ADMIN_POLICY,
            Some(json!({"rules": [{"from": ["home"], "to": ["vps"], "ports": ["tcp:22"]}]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    took.push(
        on_a.until(limit, "a policy set on B", |m| {
            m.filter.as_ref().is_some_and(|f| !f.allow_all)
        })
        .await,
    );
    let (s, v) = b
        .admin(
            Method::POST,
            api::PATH_ADMIN_PUBLISH,
            Some(json!({"exit": "vps", "port": 32400, "to": "home:32400"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    took.push(
        on_a.until(limit, "a publish rule added on B", |m| {
            m.publish
                .as_ref()
                .is_some_and(|p| p.iter().any(|r| r.port == 32400))
        })
        .await,
    );
    drop(on_b.body);
    on_b.buf.clear();
    took.push(
        on_a.until(limit + SEC, "its stream closed on B", |m| {
            m.peers.iter().any(|p| p.id == id && !p.online)
        })
        .await,
    );
    let (s, _) = b
        .admin(
            Method::DELETE,
            &format!("{}/home", api::PATH_ADMIN_NODES),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    took.push(
        on_a.until(limit, "its removal on B", |m| m.peers_removed.contains(&id))
            .await,
    );
    eprintln!("replica B -> stream on A: {took:?}");

    // The listening connections drop (a database restart, a network blip) while something
    // changes unannounced: on reconnecting, A reloads everything and its stream catches up.
    let (s, v) = b
        .admin(
            Method::PUT,
            api::PATH_ADMIN_POLICY,
            Some(json!({"rules": []})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    on_a.until(limit, "the policy cleared on B", |m| {
        m.filter.as_ref().is_some_and(|f| f.allow_all)
    })
    .await;
    let laptop = b.register(&key, "laptop").await;
    let lid = laptop.node_id;
    on_a.until(limit, "another node registered on B", |m| {
        m.peers.iter().any(|p| p.id == lid)
    })
    .await;
    sqlx::query("UPDATE nodes SET endpoints = $1 WHERE id = $2")
        .bind(r#"[{"addr":"203.0.113.9:5555","kind":"stun"}]"#)
        .bind(lid.0)
        .execute(&a.st.store.pool)
        .await
        .unwrap();
    let killed = sqlx::query(
        "SELECT pg_terminate_backend(pid) AS gone FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
    )
    .fetch_all(&a.st.store.pool)
    .await
    .unwrap();
    assert_eq!(killed.len(), 2, "one listening connection per replica");
    let resync = on_a
        .until(3 * SEC, "a change made while nobody listened", |m| {
            m.peers
                .iter()
                .any(|p| p.id == lid && p.endpoints.iter().any(|e| e.addr.port() == 5555))
        })
        .await;
    eprintln!("caught up {resync:?} after the listeners' connections dropped");
    // The replica list follows a replica leaving.
    stop_b.cancel();
    on_a.until(3 * SEC, "replica B leaving", |m| {
        m.coordinators.as_ref().is_some_and(|c| c.len() == 1)
    })
    .await;
    stop_a.cancel();
}

/// Two replicas under one URL would take each other's announcements for their own and miss
/// them: the second is refused while the first renews its heartbeat.
#[tokio::test]
async fn a_second_replica_under_the_same_url_is_refused_on_postgres() {
    let Some(pg) = ThrowawayPostgres::start() else {
        return;
    };
    let url = fresh_postgres_db(&pg.url()).await;
    let (_a, stop_a) = replica(&url, "https://198.51.100.10:8443", None).await;
    let (st, _) = AppState::open(StateOptions {
        database_url: url.clone(),
        replica_url: Some("https://198.51.100.10:8443".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let me = homeport_coordinator::replicas::Replica {
        url: "https://198.51.100.10:8443".into(),
        pin: "p".into(),
        relay: homeport_proto::map::RelayInfo {
            udp: None,
            stun: None,
            public_key: None,
        },
    };
    let e = homeport_coordinator::replicas::run_start(&st, &me)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("its own --public-url"), "{e}");
    stop_a.cancel();
}

/// Routes: the node reports, the admin approves; only approved routes the node advertises reach
/// the maps, as the peer's allowed IPs, and they survive a restart (migration 0005).
async fn routes_are_reported_approved_and_carried_in_maps(t: &T) {
    use homeport_proto::routes as rt;
    let key = t.authkey(json!({"reusable": true})).await;
    let home = t.register(&key, "home").await;
    let laptop = t.register(&key, "laptop").await;
    let mut map = t.open_map(&laptop.credential).await;
    map.next(SEC).await.expect("full map");
    let cred = home.credential.as_str();
    let report = |routes: Value| async move {
        t.node(
            Method::POST,
            rt::PATH_ROUTES,
            cred,
            Some(json!({ "routes": routes })),
        )
        .await
    };
    let (s, v) = report(json!(["10.10.1.1/24"])).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        v["detail"].as_str().unwrap().contains("10.10.1.0/24"),
        "{v}"
    );
    let (s, v) = report(json!(["100.96.0.0/24"])).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(v["detail"].as_str().unwrap().contains("mesh"), "{v}");
    let (s, v) = report(json!(["10.10.1.0/24", "0.0.0.0/0", "::/0"])).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    // Advertised only: nothing in any map.
    assert!(map.quiet(SEC).await, "an unapproved route reached a map");
    let (s, v) = t.admin(Method::GET, rt::PATH_ADMIN_ROUTES, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["node"], "home");
    assert_eq!(v[0]["approved"], json!([]));
    let change = |path: &'static str, node: &'static str, routes: Value| async move {
        t.admin(
            Method::POST,
            path,
            Some(json!({ "node": node, "routes": routes })),
        )
        .await
    };
    let (s, v) = change(
        rt::PATH_ADMIN_ROUTES_APPROVE,
        "home",
        json!(["10.20.0.0/16"]),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        v["detail"].as_str().unwrap().contains("does not advertise"),
        "{v}"
    );
    let (s, _) = change(
        rt::PATH_ADMIN_ROUTES_APPROVE,
        "nas",
        json!(["10.10.1.0/24"]),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = change(
        rt::PATH_ADMIN_ROUTES_APPROVE,
        "home",
        json!(["10.10.1.0/24"]),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let d = map.next(SEC).await.expect("a delta");
    let p = d.peers.iter().find(|p| p.id == home.node_id).expect("home");
    assert_eq!(
        p.routes,
        vec!["10.10.1.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
    // Persisted: loading the nodes (what a restart does) gives the approved route back.
    let mesh_routes = |st: &AppState| {
        st.mesh()
            .node(home.node_id)
            .map(|n| n.routes.clone())
            .unwrap_or_default()
    };
    assert_eq!(mesh_routes(&t.st).len(), 1);
    let loaded = t.st.store.load_nodes().await.unwrap();
    let h = loaded.iter().find(|n| n.id == home.node_id).unwrap();
    assert_eq!(h.routes, mesh_routes(&t.st));
    // Unapproved: the delta takes it away again.
    let (s, _) = change(
        rt::PATH_ADMIN_ROUTES_UNAPPROVE,
        "home",
        json!(["10.10.1.0/24"]),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let d = map.next(SEC).await.expect("a delta");
    let p = d.peers.iter().find(|p| p.id == home.node_id).expect("home");
    assert!(p.routes.is_empty());
}

#[tokio::test]
async fn routes_are_reported_approved_and_carried_in_maps_on_sqlite() {
    routes_are_reported_approved_and_carried_in_maps(&setup().await).await;
}

#[tokio::test]
async fn routes_are_reported_approved_and_carried_in_maps_on_postgres() {
    let Some(pg) = ThrowawayPostgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_postgres_db(&pg.url()).await;
    routes_are_reported_approved_and_carried_in_maps(&setup_on(dir, url, None).await).await;
}

#[tokio::test]
async fn devices_are_added_listed_and_removed_and_reach_the_maps() {
    use homeport_proto::device::{DeviceAdded, PATH_ADMIN_DEVICES};
    let t = setup().await;
    let key = t.authkey(json!({"reusable": true})).await;
    let vps = t.register(&key, "vps").await;
    let home = t.register(&key, "home").await;
    let mut map = t.open_map(&home.credential).await;
    assert!(map.next(SEC).await.unwrap().full);
    let phone = PrivateKey::generate().public_key();
    let body =
        json!({"name": "phone", "via": "vps", "public_key": phone.to_base64(), "tags": ["family"]});
    // The vps has reported no endpoint yet: the config could not name one.
    let (s, v) = t
        .admin(Method::POST, PATH_ADMIN_DEVICES, Some(body.clone()))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("endpoint"), "{v}");
    let (s, v) = t
        .node(
            Method::POST,
            api::PATH_ENDPOINTS,
            &vps.credential,
            Some(json!({"endpoints": [{"addr": "198.51.100.10:41641", "kind": "local"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    while let Ok(Some(_)) = map.try_next(Duration::from_millis(300)).await {}
    let (s, v) = t
        .admin(Method::POST, PATH_ADMIN_DEVICES, Some(body.clone()))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let added: DeviceAdded = serde_json::from_value(v).unwrap();
    assert_eq!(added.device.via, vps.node_id);
    assert!(
        added.config.contains("Endpoint = 198.51.100.10:41641\n"),
        "{}",
        added.config
    );
    assert!(
        added.config.contains(&format!("DNS = {}", vps.addrs.ipv4)),
        "{}",
        added.config
    );
    assert!(
        added
            .config
            .contains(homeport_proto::device::PRIVATE_KEY_PLACEHOLDER)
    );
    // home's map learns the phone, reached through the vps.
    let mut peers = vec![];
    while let Ok(Some(d)) = map.try_next(Duration::from_millis(300)).await {
        peers.extend(d.peers);
    }
    let p = peers
        .iter()
        .find(|p| p.name.as_str() == "phone")
        .expect("the phone in home's map");
    assert_eq!(p.via, Some(vps.node_id));
    assert_eq!(p.public_key, phone);

    for (bad, status, what) in [
        (
            json!({"name": "phone", "via": "vps", "public_key": PrivateKey::generate().public_key().to_base64()}),
            StatusCode::CONFLICT,
            "name",
        ),
        (
            json!({"name": "vps", "via": "vps", "public_key": PrivateKey::generate().public_key().to_base64()}),
            StatusCode::CONFLICT,
            "name",
        ),
        (
            json!({"name": "tv", "via": "vps", "public_key": phone.to_base64()}),
            StatusCode::CONFLICT,
            "public_key",
        ),
        (
            json!({"name": "Bad Name", "via": "vps", "public_key": PrivateKey::generate().public_key().to_base64()}),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            json!({"name": "tv", "via": "nowhere", "public_key": PrivateKey::generate().public_key().to_base64()}),
            StatusCode::NOT_FOUND,
            "via",
        ),
        (
            json!({"name": "tv", "via": "vps", "public_key": PrivateKey::generate().public_key().to_base64(), "endpoint": "no port"}),
            StatusCode::BAD_REQUEST,
            "endpoint",
        ),
    ] {
        let (s, v) = t
            .admin(Method::POST, PATH_ADMIN_DEVICES, Some(bad.clone()))
            .await;
        assert_eq!(s, status, "{bad}: {v}");
        assert!(
            v["detail"].as_str().unwrap().starts_with(what),
            "{bad}: {v}"
        );
    }
    let (s, v) = t.admin(Method::GET, PATH_ADMIN_DEVICES, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    let (_, nodes) = t.admin(Method::GET, api::PATH_ADMIN_NODES, None).await;
    assert_eq!(
        nodes.as_array().unwrap().len(),
        2,
        "a device is no node: {nodes}"
    );

    let (s, _) = t
        .admin(Method::DELETE, &format!("{PATH_ADMIN_DEVICES}/phone"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let mut gone = false;
    while let Ok(Some(d)) = map.try_next(Duration::from_millis(300)).await {
        gone |= d.peers_removed.contains(&added.device.id);
    }
    assert!(gone, "home drops the phone");
    let (s, _) = t
        .admin(Method::DELETE, &format!("{PATH_ADMIN_DEVICES}/phone"), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// High availability with subnet routes and devices: a route approved and a device added on
/// replica B reach a stream held on A, and a later change of the route's node on B (its
/// endpoints) does not wipe the routes from A's maps; removing the device on B reaches A too.
#[tokio::test]
async fn routes_and_devices_changed_on_one_replica_reach_the_other_on_postgres() {
    use homeport_proto::device::PATH_ADMIN_DEVICES;
    use homeport_proto::routes as rt;
    let Some(pg) = ThrowawayPostgres::start() else {
        return;
    };
    let url = fresh_postgres_db(&pg.url()).await;
    let (a, stop_a) = replica(&url, "https://198.51.100.10:8443", None).await;
    let (b, stop_b) = replica(
        &url,
        "https://198.51.100.11:8443",
        Some(a.admin_token.clone()),
    )
    .await;
    let key = a.authkey(json!({"reusable": true})).await;
    let home = a.register(&key, "home").await;
    let vps = a.register(&key, "vps").await;
    let mut on_a = a.open_map(&vps.credential).await;
    assert!(on_a.next(SEC).await.unwrap().full);
    let (s, v) = b
        .node(
            Method::POST,
            rt::PATH_ROUTES,
            &home.credential,
            Some(json!({ "routes": ["10.20.0.0/16"] })),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, v) = b
        .admin(
            Method::POST,
            rt::PATH_ADMIN_ROUTES_APPROVE,
            Some(json!({ "node": "home", "routes": ["10.20.0.0/16"] })),
        )
        .await;
    assert!(s.is_success(), "{s} {v}");
    let net: ipnet::IpNet = "10.20.0.0/16".parse().unwrap();
    on_a.until(SEC, "the route approved on B", |m| {
        m.peers
            .iter()
            .any(|p| p.id == home.node_id && p.routes == vec![net])
    })
    .await;
    // home's endpoints change on B: A reloads home, and its route stays.
    let (s, _) = b
        .node(
            Method::POST,
            api::PATH_ENDPOINTS,
            &home.credential,
            Some(json!({"endpoints": [{"addr": "198.51.100.20:41641", "kind": "local"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    on_a.until(SEC, "home's new endpoint", |m| {
        m.peers.iter().any(|p| p.id == home.node_id)
    })
    .await;
    assert!(
        a.st.mesh()
            .node(home.node_id)
            .is_some_and(|n| n.routes == vec![net]),
        "A's record of home lost its route"
    );
    // A device through home, added on B, reaches the vps's stream on A; removed, it goes.
    let phone = PrivateKey::generate().public_key();
    let (s, v) = b
        .admin(
            Method::POST,
            PATH_ADMIN_DEVICES,
            Some(
                json!({"name": "phone", "via": "home", "public_key": phone.to_base64(),
                "endpoint": "198.51.100.20:41641"}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    on_a.until(SEC, "the device added on B", |m| {
        m.peers.iter().any(|p| p.public_key == phone)
    })
    .await;
    let (s, _) = b
        .admin(Method::DELETE, &format!("{PATH_ADMIN_DEVICES}/phone"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    on_a.until(SEC, "the device removed on B", |m| {
        !m.peers_removed.is_empty()
    })
    .await;
    stop_a.cancel();
    stop_b.cancel();
}
