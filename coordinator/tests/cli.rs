//! End-to-end tests against the real binary: `serve`, the admin CLI, pinned TLS, STUN.

use bytecodec::{DecodeExt, EncodeExt};
use futures::StreamExt;
use homeport_proto::map::MapMessage;
use homeport_proto::{PrivateKey, api};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_homeport-coordinator");

struct Server {
    child: Child,
    dir: tempfile::TempDir,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start() -> Server {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
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
            .arg(&state)
            .arg("--config")
            .arg(&config)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Everything the process writes (as journald would keep it), stdout and stderr.
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for pipe in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        Server { child, dir, stderr }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn wait_file(&self, name: &str) -> String {
        let p = self.state().join(name);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = std::fs::read_to_string(&p) {
                return s.trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{name} never appeared; server log:\n{}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn listen(&self) -> SocketAddr {
        self.wait_file("listen.addr").parse().unwrap()
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--state-dir")
            .arg(self.state())
            .output()
            .unwrap()
    }

    /// Runs `pin` until it succeeds, as scripts do right after starting `serve`.
    fn pin(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = self.cli(&["pin"]);
            if o.status.success() {
                let out = String::from_utf8(o.stdout).unwrap();
                assert_eq!(out.lines().count(), 1, "pin prints one line: {out:?}");
                return out.trim().to_string();
            }
            assert!(Instant::now() < deadline, "pin never succeeded");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin token, from `<state-dir>/admin.token` (written on first start).
    fn admin_token(&self) -> String {
        let t = self.wait_file("admin.token");
        assert!(t.starts_with("hpa_"), "{t:?}");
        t
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "serve did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn fails_with(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected exit 1, stderr: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn cli_flow_and_file_modes() {
    let mut s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let pin = s.pin();
    assert!(pin.starts_with("sha256/") && pin.len() == 51, "{pin}");

    // Immediately after pin: the CLI waits for the admin socket.
    let key = ok(&s.cli(&["authkey", "create"]));
    assert_eq!(key.lines().count(), 1);
    assert!(key.trim().starts_with("hpk_"), "{key}");
    let key2 = ok(&s.cli(&[
        "authkey",
        "create",
        "--reusable",
        "--expires",
        "1h",
        "--tag",
        "friends",
    ]));
    assert_ne!(key, key2);
    let list: Vec<api::AuthKeyInfo> =
        serde_json::from_str(&ok(&s.cli(&["authkey", "list", "--json"]))).unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[1].reusable && list[1].expires_at.is_some());
    assert_eq!(list[1].tags, vec!["friends"]);
    let table = ok(&s.cli(&["authkey", "list"]));
    assert!(
        table.starts_with("ID") && table.contains("friends"),
        "{table}"
    );
    ok(&s.cli(&["authkey", "revoke", "1"]));
    fails_with(
        &s.cli(&["authkey", "revoke", "99"]),
        "no auth key with id 99",
    );
    let bad = s.cli(&["authkey", "create", "--expires", "1y"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("30m, 1h, 7d"));

    let nodes = ok(&s.cli(&["nodes", "--json"]));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&nodes).unwrap(),
        serde_json::json!([])
    );
    assert!(ok(&s.cli(&["nodes"])).starts_with("NAME"));

    fails_with(
        &s.cli(&[
            "publish", "add", "--exit", "vps", "--port", "80", "--to", "home:80",
        ]),
        "exit: no node named \"vps\"",
    );
    fails_with(
        &s.cli(&[
            "publish",
            "add",
            "--exit",
            "vps",
            "--port",
            "80",
            "--to",
            "home:80",
            "--allow",
            "10.0.0.0/99",
        ]),
        "allow[0]: invalid CIDR \"10.0.0.0/99\"",
    );
    fails_with(
        &s.cli(&[
            "publish", "add", "--exit", "vps", "--port", "80", "--proto", "sctp", "--to", "home:80",
        ]),
        "tcp or udp",
    );
    fails_with(
        &s.cli(&[
            "publish", "add", "--exit", "vps", "--port", "80", "--to", "home",
        ]),
        "NODE:PORT",
    );
    fails_with(
        &s.cli(&["publish", "remove", "5"]),
        "no publish rule with id 5",
    );
    fails_with(
        &s.cli(&["node", "remove", "ghost"]),
        "no node named \"ghost\"",
    );
    assert_eq!(ok(&s.cli(&["publish", "list", "--json"])).trim(), "[]");

    assert!(ok(&s.cli(&["policy", "get"])).contains("\"rules\": []"));
    let pfile = s.dir.path().join("policy.toml");
    std::fs::write(
        &pfile,
        "[[rules]]\nfrom = [\"tag:friends\"]\nto = [\"*\"]\nports = [\"tcp:22\"]\n",
    )
    .unwrap();
    ok(&s.cli(&["policy", "set", pfile.to_str().unwrap()]));
    assert!(ok(&s.cli(&["policy", "get"])).contains("tcp:22"));
    std::fs::write(&pfile, "[[rules]]\nfrom = [\"tag:\"]\nto = [\"*\"]\n").unwrap();
    fails_with(
        &s.cli(&["policy", "set", pfile.to_str().unwrap()]),
        "rules[0]",
    );

    let metrics = s.wait_file("metrics.addr");
    let text = tokio::runtime::Runtime::new().unwrap().block_on(async {
        reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        text.contains("homeport_coordinator_nodes_registered 0"),
        "{text}"
    );
    assert!(
        text.contains("homeport_coordinator_nodes_online 0"),
        "{text}"
    );
    assert!(text.contains("homeport_coordinator_map_version "), "{text}");
    assert!(
        text.contains(
            "homeport_coordinator_api_requests_total{path=\"/api/v1/admin/authkeys\",status=\"201\"} 2"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "homeport_coordinator_api_request_duration_seconds_count{path=\"/api/v1/admin/publish\"}"
        ),
        "{text}"
    );

    let st = s.state();
    assert_eq!(mode(&st), 0o700);
    for f in [
        "cert.pem",
        "key.pem",
        "pin",
        "listen.addr",
        "stun.addr",
        "coordinator.db",
        "admin.sock",
        "admin.token",
    ] {
        assert_eq!(mode(&st.join(f)), 0o600, "{f}");
    }
    for e in std::fs::read_dir(&st).unwrap() {
        let e = e.unwrap();
        assert_eq!(
            mode(&e.path()) & 0o077,
            0,
            "{:?} is readable by others",
            e.path()
        );
    }

    let status = s.terminate();
    assert!(status.success(), "{status}");
    assert!(!st.join("admin.sock").exists());
    // Without a running server the CLI gives up after a few seconds with a clear message.
    let t = Instant::now();
    fails_with(
        &s.cli(&["nodes"]),
        "is `homeport-coordinator serve --state-dir",
    );
    assert!(t.elapsed() < Duration::from_secs(15));
    // pin still works from the files.
    assert_eq!(ok(&s.cli(&["pin"])).trim(), pin);
}

/// The admin token goes to a 0600 file, never into the output a service manager logs (stdout
/// and stderr are not terminals here, as under systemd), and the database has only its hash.
#[test]
fn admin_token_goes_to_a_0600_file_and_never_to_the_log() {
    let mut s = Server::start();
    let token = s.admin_token();
    s.pin();
    let file = s.state().join("admin.token");
    assert_eq!(mode(&file), 0o600);
    let log = s.stderr.lock().unwrap().clone();
    assert!(
        log.contains("admin.token"),
        "the log says where the token is:\n{log}"
    );
    assert!(!log.contains(&token), "the token is in the log:\n{log}");
    assert!(!log.contains("hpa_"), "a token is in the log:\n{log}");
    assert!(s.terminate().success());
    for f in ["coordinator.db", "coordinator.db-wal"] {
        if let Ok(b) = std::fs::read(s.state().join(f)) {
            assert!(
                !b.windows(token.len()).any(|w| w == token.as_bytes()),
                "{f} holds the token in clear"
            );
        }
    }
    // A restart neither makes a new token nor prints one.
    let before = std::fs::read_to_string(&file).unwrap();
    let mut again = Command::new(BIN);
    again
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--stun-listen",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(s.state())
        .arg("--config")
        .arg(s.dir.path().join("coordinator.toml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = again.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.state().join("admin.sock").exists() {
        assert!(Instant::now() < deadline, "restart never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("hpa_"), "{text}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);
}

#[test]
fn pin_without_cert_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["pin", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no certificate"), "{err}");
}

#[test]
fn bad_config_file_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(&f, "listen = \"127.0.0.1:0\"\nlisten_adress = \"x\"\n").unwrap();
    let o = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{}:2", f.display()))
            && err.contains("listen_adress")
            && err.contains("stun-listen"),
        "{err}"
    );
    let o = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/coordinator.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/coordinator.toml"));
}

fn reqwest_pinned(pin: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(homeport_proto::tls::pinned_client_config(pin).unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn tls_pin_remote_admin_and_map_stream() {
    let s = Server::start();
    let pin = s.pin();
    let addr = s.listen();
    let token = s.admin_token();
    let base = format!("https://{addr}");

    // The right pin works.
    let c = reqwest_pinned(&pin);
    let r = c
        .get(format!("{base}{}", api::PATH_OPENAPI))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A wrong pin is refused during the handshake.
    let wrong = format!("sha256/{}", "A".repeat(43) + "=");
    let e = reqwest_pinned(&wrong)
        .get(format!("{base}{}", api::PATH_OPENAPI))
        .send()
        .await
        .unwrap_err();
    assert!(e.is_connect(), "{e:?}");
    // So is a client that trusts only public CAs.
    assert!(
        reqwest::get(format!("{base}{}", api::PATH_OPENAPI))
            .await
            .is_err()
    );

    // Remote admin CLI with a token file (or the environment) and pin; never a token in argv.
    // --state-dir points elsewhere so the server's own admin.token is not the one found.
    let files = tempfile::tempdir().unwrap();
    let token_file = files.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let wrong_file = files.path().join("wrong");
    std::fs::write(&wrong_file, "hpa_wrong\n").unwrap();
    let tf = token_file.to_str().unwrap().to_string();
    let remote = |extra: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(extra)
            .args(["--url", &base, "--pin", &pin])
            .arg("--state-dir")
            .arg(files.path())
            .env_remove("HOMEPORT_ADMIN_TOKEN");
        cmd
    };
    let key = ok(&remote(&["authkey", "create", "--reusable"])
        .args(["--token-file", &tf])
        .output()
        .unwrap());
    let key = key.trim().to_string();
    let o = remote(&["nodes", "--json"])
        .arg("--token-file")
        .arg(&wrong_file)
        .output()
        .unwrap();
    fails_with(&o, "wrong admin token");
    let o = remote(&["nodes"])
        .env("HOMEPORT_ADMIN_TOKEN", &token)
        .output()
        .unwrap();
    assert!(ok(&o).starts_with("NAME"));
    // No token at all: says where one comes from.
    fails_with(&remote(&["nodes"]).output().unwrap(), "--token-file");
    // The token is not accepted on the command line.
    let o = remote(&["nodes"])
        .args(["--token", &token])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--token"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // On the VPS itself the CLI finds <state-dir>/admin.token.
    let o = Command::new(BIN)
        .args(["nodes", "--url", &base, "--pin", &pin])
        .arg("--state-dir")
        .arg(s.state())
        .env_remove("HOMEPORT_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(ok(&o).starts_with("NAME"));

    // A node registers (challenge, then proof of its key) and streams its map over real TLS;
    // a later registration arrives at once.
    let register = |host: &'static str| {
        let c = c.clone();
        let key = key.clone();
        let base = base.clone();
        async move {
            let node = PrivateKey::generate();
            let ch: homeport_proto::register::RegisterChallenge = c
                .post(format!("{base}{}", api::PATH_CHALLENGE))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let mut body = api::RegisterRequest {
                authkey: key,
                public_key: node.public_key(),
                hostname: host.into(),
                capver: homeport_proto::CAPABILITY_VERSION,
                previous_ipv4: None,
                challenge: Some(ch.challenge),
                proof: None,
            };
            body.proof =
                Some(homeport_proto::register::prove(&node, &ch.coordinator_key, &body).unwrap());
            let r = c
                .post(format!("{base}{}", api::PATH_REGISTER))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<api::RegisterResponse>().await.unwrap()
        }
    };
    let home = register("home").await;
    let resp = c
        .get(format!("{base}{}", api::PATH_MAP))
        .bearer_auth(&home.credential)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut next_line = async move || -> MapMessage {
        loop {
            if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                return serde_json::from_slice(&line).unwrap();
            }
            let chunk = tokio::time::timeout(Duration::from_secs(1), body.next())
                .await
                .expect("no map line within 1 s")
                .unwrap()
                .unwrap();
            buf.extend_from_slice(&chunk);
        }
    };
    let full = next_line().await;
    assert!(full.full);
    let relays = full.relays.unwrap();
    assert_eq!(
        relays[0].public_key,
        Some(
            std::fs::read_to_string(s.state().join("relay.key"))
                .unwrap()
                .trim()
                .parse::<PrivateKey>()
                .unwrap()
                .public_key()
        ),
        "the relay key is the coordinator key registrations prove against"
    );
    assert_eq!(
        relays[0].stun.unwrap().to_string(),
        s.wait_file("stun.addr"),
        "the map names the coordinator's STUN address"
    );
    let vps = register("vps").await;
    let d = next_line().await;
    assert_eq!(d.peers[0].id, vps.node_id);
    // vps runs an exit (homeport-exit announces itself so): publish rules are accepted on it.
    let r = c
        .post(format!(
            "{base}{}",
            homeport_proto::exit::PATH_EXIT_ANNOUNCE
        ))
        .bearer_auth(&vps.credential)
        .json(&serde_json::json!({"public_addrs": ["198.51.100.10"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    let o = remote(&["nodes", "--json"])
        .args(["--token-file", &tf])
        .output()
        .unwrap();
    let nodes: Vec<api::NodeInfo> = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(nodes.len(), 2);
    assert!(
        nodes
            .iter()
            .find(|n| n.name.as_str() == "home")
            .unwrap()
            .online
    );
    let out = ok(&remote(&[
        "publish",
        "add",
        "--exit",
        "vps",
        "--port",
        "32400",
        "--to",
        "home:32400",
    ])
    .args(["--token-file", &tf])
    .output()
    .unwrap());
    // The rule as `publish list` shows it (header, row), then where viewers connect.
    let id: i64 = out
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("publish add printed {out:?}"));
    assert!(out.contains("viewers connect to"), "{out}");
    let d = next_line().await;
    assert_eq!(d.publish.unwrap()[0].id, id);
}

#[test]
fn stun_binding_answers_with_the_client_address() {
    use stun_codec::rfc5389::attributes::XorMappedAddress;
    use stun_codec::rfc5389::{Attribute, methods::BINDING};
    use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};

    let s = Server::start();
    let stun: SocketAddr = s.wait_file("stun.addr").parse().unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // Garbage first: the server must survive it and stay silent.
    sock.send_to(b"\x00\x01\x00\x00garbage-garbage!!", stun)
        .unwrap();
    sock.send_to(&[0xff; 3], stun).unwrap();

    let req =
        Message::<Attribute>::new(MessageClass::Request, BINDING, TransactionId::new([7; 12]));
    let bytes = MessageEncoder::new().encode_into_bytes(req).unwrap();
    sock.send_to(&bytes, stun).unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(from, stun);
    let m = MessageDecoder::<Attribute>::new()
        .decode_from_bytes(&buf[..n])
        .unwrap()
        .unwrap();
    assert_eq!(m.class(), MessageClass::SuccessResponse);
    assert_eq!(m.transaction_id().as_bytes(), &[7; 12]);
    let x = m.get_attribute::<XorMappedAddress>().unwrap();
    assert_eq!(x.address(), sock.local_addr().unwrap());
}
