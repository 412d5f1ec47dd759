//! The API matches its spec: schemathesis (deploy/setup.sh installs it) runs against the real
//! coordinator binary over HTTPS with an admin token and a node credential, and finds no server
//! error and no mismatch between the served OpenAPI document and the server, either way (valid
//! data accepted, invalid data refused, every status, header and body as documented).
//!
//! Without schemathesis on PATH the test skips with a notice, except under `CI=true`, where it
//! fails.

use homeport_proto::{PrivateKey, api};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_homeport-coordinator");

fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

struct Server {
    child: Child,
    dir: tempfile::TempDir,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("coordinator.toml");
        std::fs::write(&config, "# empty: flags only\n").unwrap();
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--stun-listen",
                "127.0.0.1:0",
            ])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Server { child, dir, stderr }
    }

    fn wait_for<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never appeared; server log:\n{}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn state_file(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("state").join(name))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    fn listen(&self) -> String {
        self.wait_for("listen.addr", || self.state_file("listen.addr"))
    }

    /// The admin token: from the 0600 file in the state dir, or the first-start notice.
    fn admin_token(&self) -> String {
        self.wait_for("the admin token", || {
            self.state_file("admin.token").or_else(|| {
                self.stderr
                    .lock()
                    .unwrap()
                    .lines()
                    .map(str::trim)
                    .find(|l| l.starts_with("hpa_"))
                    .map(str::to_string)
            })
        })
    }

    fn pin(&self) -> String {
        self.wait_for("the pin", || {
            let o = Command::new(BIN)
                .arg("pin")
                .arg("--state-dir")
                .arg(self.dir.path().join("state"))
                .output()
                .ok()?;
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        })
    }
}

async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    bearer: &str,
    body: Value,
) -> Value {
    let r = c
        .request(method, url)
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{url}: {status} {v}");
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_mismatch() {
    let Some(st) = which("schemathesis") else {
        let msg = "schemathesis_finds_no_server_error_and_no_mismatch: `schemathesis` is not installed (deploy/setup.sh installs it)";
        assert!(!in_ci(), "{msg}; under CI=true that is a failure");
        eprintln!("SKIP {msg}");
        if let Some(log) = std::env::var_os("HOMEPORT_TEST_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(log)
            {
                let _ = writeln!(f, "{msg}");
            }
        }
        return;
    };
    let server = Server::start();
    let addr = server.listen();
    let base = format!("https://{addr}");
    let admin = server.admin_token();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(homeport_proto::tls::pinned_client_config(&server.pin()).unwrap())
        .build()
        .unwrap();

    // Two nodes, so that node calls (endpoint reports, probe asks) reach their success paths.
    let key = call(
        &client,
        reqwest::Method::POST,
        &format!("{base}{}", api::PATH_ADMIN_AUTHKEYS),
        &admin,
        json!({"reusable": true}),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_string();
    let mut creds = vec![];
    for host in ["st-a", "st-b"] {
        let k = PrivateKey::generate();
        // Registration proves the node key over a fresh challenge.
        let ch: homeport_proto::register::RegisterChallenge = client
            .post(format!("{base}{}", api::PATH_CHALLENGE))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut body = homeport_proto::api::RegisterRequest {
            authkey: key.clone(),
            public_key: k.public_key(),
            hostname: host.to_string(),
            capver: homeport_proto::CAPABILITY_VERSION,
            previous_ipv4: None,
            challenge: Some(ch.challenge),
            proof: None,
        };
        body.proof = Some(homeport_proto::register::prove(&k, &ch.coordinator_key, &body).unwrap());
        let r = client
            .post(format!("{base}{}", api::PATH_REGISTER))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "register {host}: {}", r.status());
        let v: Value = r.json().await.unwrap();
        creds.push(v["credential"].as_str().unwrap().to_string());
    }

    // Tokens go through the environment and a 0600 config file, never argv.
    let cfg = server.dir.path().join("schemathesis.toml");
    std::fs::write(
        &cfg,
        "[auth.openapi.adminToken]\nbearer = \"${HOMEPORT_ST_ADMIN}\"\n\n\
         [auth.openapi.nodeCredential]\nbearer = \"${HOMEPORT_ST_NODE}\"\n",
    )
    .unwrap();
    let report = server.dir.path().join("st-report");
    let t = Instant::now();
    let out = Command::new(st)
        .arg("--config-file")
        .arg(&cfg)
        .arg("--no-color")
        .args(["run", &format!("{base}{}", api::PATH_OPENAPI)])
        .args(["--tls-verify", "false"])
        // The map is an endless NDJSON stream (a request would never end): covered by
        // coordinator/tests/api.rs instead.
        .args(["--exclude-path", api::PATH_MAP])
        // The relay upgrade switches the connection to another protocol (a valid request gets
        // 101 and then a binary stream): covered by the relay tests in coordinator/src/relay.rs.
        .args(["--exclude-path", api::PATH_RELAY_TCP])
        .args(["--checks", "all"])
        // One worker: hypothesis in several threads trips a CPython 3.11 bug ("AST constructor
        // recursion depth mismatch") that schemathesis reports as an error of the API.
        .args(["--max-examples", "40", "--seed", "1", "--workers", "1"])
        // A request sent on a pooled connection just as the server closes it for idleness (after
        // api::SERVER_IDLE_SECS) fails with no answer; a client retries that, as the node's does
        // not need to (it drops idle connections first). A server that drops connections on a
        // request fails the retries too, and its panics are caught in the log below.
        .args(["--request-retries", "2"])
        .args(["--request-timeout", "10", "--max-time", "90"])
        .arg("--report-dir")
        .arg(&report)
        .env("HOMEPORT_ST_ADMIN", &admin)
        .env("HOMEPORT_ST_NODE", &creds[0])
        .current_dir(server.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("schemathesis ran for {:.0?}:\n{stdout}", t.elapsed());
    let log = server.stderr.lock().unwrap().clone();
    let trouble: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("panicked") || l.contains("ERROR"))
        .collect();
    let mut tail: Vec<&str> = log.lines().rev().take(30).collect();
    tail.reverse();
    assert!(
        out.status.success(),
        "schemathesis found problems (exit {}):\n{stdout}\n{}\nserver errors and panics:\n{}\nserver log tail:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        trouble.join("\n"),
        tail.join("\n")
    );
    // A handler that panics drops its connection without an answer: schemathesis would see a
    // network error, which its retries could hide.
    assert!(
        !log.contains("panicked"),
        "the coordinator panicked during the run:\n{}",
        trouble.join("\n")
    );
}
