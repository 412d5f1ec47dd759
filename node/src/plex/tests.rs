//! `homeport plex setup` and `check` end to end against the Plex stand-in
//! (deploy/plex-standin.py, the API endpoints and preference names `plex` uses) and a fake
//! daemon on the control socket that answers `Published`.

use super::*;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};

const TOKEN: &str = "standin-token";

struct StandIn {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl StandIn {
    /// Starts the stand-in on 127.0.0.1 (a free port) with a token; None (a skip) when python3
    /// is missing outside CI.
    fn start() -> Option<StandIn> {
        if Command::new("python3").arg("--version").output().is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "python3 is needed (deploy/setup.sh installs it)"
            );
            eprintln!("skipping: no python3");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), TOKEN).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/plex-standin.py");
        let media = dir.path().join("media");
        std::fs::create_dir(&media).unwrap();
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&media)
            .args(["--bind", "127.0.0.1", "--port", "0", "--token-file"])
            .arg(dir.path().join("token"))
            .arg("--prefs")
            .arg(dir.path().join("prefs.json"))
            .arg("--sessions")
            .arg(dir.path().join("sessions.json"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        // Keep reading its log: it writes a line per request and dies on a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("stand-in printed {line:?}"));
        Some(StandIn { child, port, dir })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn prefs(&self) -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(self.dir.path().join("prefs.json")).unwrap_or(b"{}".to_vec()),
        )
        .unwrap()
    }

    fn sessions(&self, list: serde_json::Value) {
        std::fs::write(
            self.dir.path().join("sessions.json"),
            serde_json::to_vec(&list).unwrap(),
        )
        .unwrap();
    }
}

/// What the daemon would say: exit "vps" publishes the stand-in's port, reachable at 127.0.0.1
/// (so the port check reaches the stand-in itself), and forwarded a viewer from 192.0.2.50.
fn published(port: u16) -> Published {
    super::plan::fixture(port, vec!["127.0.0.1".parse().unwrap()])
}

/// A fake daemon: answers every request on `<state_dir>/homeport.sock` with `p`.
fn fake_daemon(state_dir: &Path, p: Published) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let l = tokio::net::UnixListener::bind(state_dir.join(crate::state::SOCK_FILE)).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            let _ = tokio::io::BufReader::new(r).read_line(&mut line).await;
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(Request::Published) => Response::Published(Box::new(p.clone())),
                _ => Response::Error {
                    message: "fake daemon: only published".into(),
                },
            };
            let mut out = serde_json::to_string(&resp).unwrap();
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        }
    })
}

fn target(plex: &StandIn, state_dir: &Path, token_file: &Path) -> PlexTarget {
    PlexTarget {
        url: plex.url(),
        token_file: Some(token_file.to_path_buf()),
        preferences: None,
        s: StateArg {
            state_dir: state_dir.to_path_buf(),
        },
    }
}

fn setup(t: PlexTarget, undo: bool) -> PlexCmd {
    PlexCmd::Setup {
        t,
        yes: true,
        keep_relay: false,
        keep_port_mapping: false,
        mesh_as_lan: !undo,
        replace_urls: false,
        undo,
    }
}

#[tokio::test]
async fn setup_sets_the_prefs_and_undo_restores_them() {
    let Some(plex) = StandIn::start() else { return };
    let state = tempfile::tempdir().unwrap();
    let _d = fake_daemon(state.path(), published(plex.port));
    let token = plex.dir.path().join("token");
    // A URL the user already had stays.
    let client = api::Plex::new(&plex.url(), TOKEN.into()).unwrap();
    client
        .set_prefs(&[(
            "customConnections".into(),
            "https://mine.example:443".into(),
        )])
        .await
        .unwrap();
    let before = client.prefs().await.unwrap();

    run(setup(target(&plex, state.path(), &token), false))
        .await
        .unwrap();
    let p = plex.prefs();
    assert_eq!(
        p["customConnections"],
        format!("https://mine.example:443,http://127.0.0.1:{}", plex.port)
    );
    assert_eq!(p["RelayEnabled"], false);
    assert_eq!(p["PublishServerOnPlexOnlineKey"], false);
    assert_eq!(p["ManualPortMappingMode"], false);
    assert_eq!(
        p["LanNetworksBandwidth"],
        "100.96.0.0/16,fd7a:115c:a1e0::/64"
    );
    let undo = state.path().join(UNDO_FILE);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&undo).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        !std::fs::read_to_string(&undo).unwrap().contains(TOKEN),
        "the token must not be saved"
    );

    // A second run has nothing to change and keeps the first saved values.
    run(setup(target(&plex, state.path(), &token), false))
        .await
        .unwrap();

    run(setup(target(&plex, state.path(), &token), true))
        .await
        .unwrap();
    assert_eq!(client.prefs().await.unwrap(), before);
    assert!(!undo.exists());
    let e = run(setup(target(&plex, state.path(), &token), true))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing to undo"), "{e}");
}

#[tokio::test]
async fn check_passes_a_real_viewer_and_flags_a_mesh_address() {
    let Some(plex) = StandIn::start() else { return };
    let state = tempfile::tempdir().unwrap();
    let _d = fake_daemon(state.path(), published(plex.port));
    let token = plex.dir.path().join("token");
    let check = || PlexCmd::Check {
        t: target(&plex, state.path(), &token),
        json: true,
    };
    // Before setup: the custom URL does not name the exit.
    let e = run(check()).await.unwrap_err().to_string();
    assert!(e.contains("problem"), "{e}");
    run(setup(target(&plex, state.path(), &token), false))
        .await
        .unwrap();

    plex.sessions(serde_json::json!([{"address": "192.0.2.50", "user": "alice"}]));
    run(check()).await.unwrap();
    let client = api::Plex::new(&plex.url(), TOKEN.into()).unwrap();
    let sessions = client.sessions().await.unwrap();
    assert_eq!(sessions[0].address, "192.0.2.50");
    assert_eq!(sessions[0].user, "alice");

    plex.sessions(serde_json::json!([
        {"address": "192.0.2.50", "user": "alice"},
        {"address": "100.96.0.1", "user": "bob"},
    ]));
    let e = run(check()).await.unwrap_err().to_string();
    assert_eq!(e, "1 problem(s) found");
    let prefs = client.prefs().await.unwrap();
    let f = plan::check(
        &prefs,
        &client.sessions().await.unwrap(),
        &published(plex.port),
        plex.port,
    );
    let bob = f.iter().find(|f| f.subject.contains("bob")).unwrap();
    assert_eq!(bob.level, Level::Problem);
    assert!(bob.message.contains("mesh address of exit vps"), "{bob:?}");
}

#[tokio::test]
async fn plex_errors_name_the_cause() {
    let Some(plex) = StandIn::start() else { return };
    let bad = api::Plex::new(&plex.url(), "wrong".into()).unwrap();
    let e = format!("{:#}", bad.prefs().await.unwrap_err());
    assert!(e.contains("refused the token (401)"), "{e}");
    let good = api::Plex::new(&plex.url(), TOKEN.into()).unwrap();
    let e = format!(
        "{:#}",
        good.set_prefs(&[("NoSuchPref".into(), "1".into())])
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("answered 400") && e.contains("NoSuchPref"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        good.set_prefs(&[("RelayEnabled".into(), "maybe".into())])
            .await
            .unwrap_err()
    );
    assert!(e.contains("answered 400"), "{e}");
    assert_eq!(
        good.identity_at(&plex.url()).await.unwrap(),
        "0123456789abcdef0123456789abcdef01234567"
    );
}

#[tokio::test]
async fn a_published_port_that_does_not_answer_is_a_problem_unless_an_allow_list_may_explain_it() {
    let Some(plex) = StandIn::start() else { return };
    let token = plex.dir.path().join("token");
    // The exit's address is 127.0.0.2 here: nothing answers there (the stand-in is on 127.0.0.1).
    let mut p = published(plex.port);
    p.rules[0].exit_public = vec!["127.0.0.2".parse().unwrap()];
    let state = tempfile::tempdir().unwrap();
    let _d = fake_daemon(state.path(), p.clone());
    run(setup(target(&plex, state.path(), &token), false))
        .await
        .unwrap();
    let client = api::Plex::new(&plex.url(), TOKEN.into()).unwrap();
    let f = check_ports(&client, &plex.url(), &p).await;
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].level, Level::Problem, "{f:?}");
    assert!(f[0].message.contains("no answer through the exit"), "{f:?}");
    let e = run(PlexCmd::Check {
        t: target(&plex, state.path(), &token),
        json: false,
    })
    .await
    .unwrap_err();
    assert_eq!(e.to_string(), "1 problem(s) found");

    p.rules[0].allow = vec!["198.51.100.0/24".parse().unwrap()];
    let f = check_ports(&client, &plex.url(), &p).await;
    assert_eq!(f[0].level, Level::Warn, "{f:?}");
    assert!(f[0].message.contains("198.51.100.0/24"), "{f:?}");
}
