//! The few Plex Media Server HTTP endpoints `homeport plex` uses, and finding the server's token.
//!
//! Endpoints (python-plexapi `plexapi/server.py` and `plexapi/settings.py`; the community OpenAPI
//! spec github.com/LukeHagar/plex-api-spec):
//! - `GET /identity`: `MediaContainer.machineIdentifier`, no token needed;
//! - `GET /:/prefs`: `MediaContainer.Setting[]` with `id` and `value`;
//! - `PUT /:/prefs?<id>=<value>&…`: sets preferences (400 for an unknown one);
//! - `GET /status/sessions`: `MediaContainer.Metadata[]` with `User`, `Player` and `Session`.
//!
//! Every request carries the token in the `X-Plex-Token` header (never in the URL, so it is in
//! no proxy or access log) and `Accept: application/json`, which makes Plex answer JSON instead
//! of XML.

use super::plan::{Prefs, Session};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where Plex Media Server keeps Preferences.xml (with `PlexOnlineToken`), by installation:
/// the Debian/Ubuntu and RPM packages, the snap. Docker images keep it under the container's
/// `/config` volume: pass the host path with `--preferences`.
pub const PREFERENCES_PATHS: &[&str] = &[
    "/var/lib/plexmediaserver/Library/Application Support/Plex Media Server/Preferences.xml",
    "/var/snap/plexmediaserver/common/Library/Application Support/Plex Media Server/Preferences.xml",
];

/// The environment variable that may hold the token (instead of `--token-file`).
pub const TOKEN_ENV: &str = "HOMEPORT_PLEX_TOKEN";

/// A token and where it came from (for messages; never the token itself).
pub struct Token {
    pub value: String,
    pub source: String,
}

/// The value of attribute `name` in the `<Preferences …/>` element of a Preferences.xml.
pub fn xml_attr(xml: &str, name: &str) -> Option<String> {
    let start = xml.find("<Preferences")?;
    let el = &xml[start..];
    let el = &el[..el.find('>').unwrap_or(el.len())];
    let needle = format!(" {name}=\"");
    let i = el.find(&needle)? + needle.len();
    let v = &el[i..];
    let v = &v[..v.find('"')?];
    Some(
        v.replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// Finds the token: `--token-file`, then `$HOMEPORT_PLEX_TOKEN`, then `PlexOnlineToken` in
/// `--preferences` or the Preferences.xml of a standard installation (readable by root).
pub fn find_token(token_file: Option<&Path>, preferences: Option<&Path>) -> Result<Token> {
    if let Some(f) = token_file {
        let v = std::fs::read_to_string(f)
            .with_context(|| format!("--token-file {}", f.display()))?
            .trim()
            .to_string();
        if v.is_empty() {
            bail!(
                "--token-file {}: the file is empty; expected the X-Plex-Token on one line",
                f.display()
            );
        }
        return Ok(Token {
            value: v,
            source: f.display().to_string(),
        });
    }
    if let Ok(v) = std::env::var(TOKEN_ENV)
        && !v.trim().is_empty()
    {
        return Ok(Token {
            value: v.trim().to_string(),
            source: format!("${TOKEN_ENV}"),
        });
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = preferences {
        candidates.push(p.to_path_buf());
    } else {
        // Plex's own override of its data dir (set in its systemd unit on some systems).
        if let Ok(d) = std::env::var("PLEX_MEDIA_SERVER_APPLICATION_SUPPORT_DIR") {
            candidates.push(Path::new(&d).join("Plex Media Server/Preferences.xml"));
        }
        candidates.extend(PREFERENCES_PATHS.iter().map(PathBuf::from));
    }
    let mut tried = Vec::new();
    for p in &candidates {
        match std::fs::read_to_string(p) {
            Ok(xml) => match xml_attr(&xml, "PlexOnlineToken") {
                Some(v) if !v.is_empty() => {
                    return Ok(Token {
                        value: v,
                        source: p.display().to_string(),
                    });
                }
                _ => tried.push(format!(
                    "{}: no PlexOnlineToken (server not signed in/claimed?)",
                    p.display()
                )),
            },
            Err(e) => tried.push(format!("{}: {e}", p.display())),
        }
    }
    bail!(
        "no Plex token found: pass --token-file FILE (the X-Plex-Token, https://support.plex.tv/articles/204059436-finding-an-authentication-token-x-plex-token/) or set {TOKEN_ENV}, or run as root so Preferences.xml can be read, or point --preferences at it (docker: <config volume>/Library/Application Support/Plex Media Server/Preferences.xml). Tried: {}",
        tried.join("; ")
    )
}

pub struct Plex {
    pub base: reqwest::Url,
    token: String,
    http: reqwest::Client,
}

/// How long one request to Plex may take: it is on this machine or the LAN, so seconds mean it
/// hangs.
const PLEX_TIMEOUT: Duration = Duration::from_secs(10);

/// A JSON value of a preference as text: booleans "true"/"false", numbers as written.
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn as_bool(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_i64() == Some(1),
        Some(Value::String(s)) => super::plan::is_true(s),
        _ => false,
    }
}

impl Plex {
    pub fn new(base: &str, token: String) -> Result<Plex> {
        let base = reqwest::Url::parse(base).map_err(|e| {
            anyhow::anyhow!("--url {base:?}: {e}; expected e.g. http://127.0.0.1:32400")
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            bail!(
                "--url {base}: expected an http:// or https:// URL of the Plex server, e.g. http://127.0.0.1:32400"
            );
        }
        let http = reqwest::Client::builder()
            .timeout(PLEX_TIMEOUT)
            // Plex's certificate is for *.plex.direct, not for 127.0.0.1; on this machine the
            // plain http port is what to use, and https is accepted without a name check.
            .danger_accept_invalid_certs(true)
            .build()?;
        Ok(Plex { base, token, http })
    }

    /// The server's port (the publish rule's target).
    pub fn port(&self) -> u16 {
        self.base.port_or_known_default().unwrap_or(32400)
    }

    fn url(&self, path: &str) -> reqwest::Url {
        let mut u = self.base.clone();
        u.set_path(path);
        u
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(m, self.url(path))
            .header("X-Plex-Token", &self.token)
            .header("Accept", "application/json")
            .header("X-Plex-Product", "homeport")
            .header("X-Plex-Client-Identifier", "homeport-plex")
    }

    async fn send(&self, rb: reqwest::RequestBuilder, what: &str) -> Result<Value> {
        self.send_to(rb, what, self.base.as_str()).await
    }

    async fn send_to(&self, rb: reqwest::RequestBuilder, what: &str, at: &str) -> Result<Value> {
        let r = rb
            .send()
            .await
            .with_context(|| format!("{what}: cannot reach Plex at {at}"))?;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        match status.as_u16() {
            200..=299 => {}
            401 => bail!(
                "{what}: Plex at {at} refused the token (401); the token must be the server owner's (from Preferences.xml or --token-file)"
            ),
            code => bail!("{what}: Plex at {at} answered {code}: {}", body.trim()),
        }
        if body.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&body).with_context(|| {
            format!(
                "{what}: Plex at {at} answered something that is not JSON: {:.200}",
                body
            )
        })
    }

    /// `machineIdentifier` from `/identity` at `base` (this server, or its published address).
    pub async fn identity_at(&self, base: &str) -> Result<String> {
        let mut u = reqwest::Url::parse(base)?;
        u.set_path("/identity");
        let v = self
            .send_to(
                self.http.get(u).header("Accept", "application/json"),
                "GET /identity",
                base,
            )
            .await?;
        v["MediaContainer"]["machineIdentifier"]
            .as_str()
            .map(str::to_string)
            .context("GET /identity: no MediaContainer.machineIdentifier in the answer")
    }

    pub async fn prefs(&self) -> Result<Prefs> {
        let v = self
            .send(self.req(reqwest::Method::GET, "/:/prefs"), "GET /:/prefs")
            .await?;
        let settings = v["MediaContainer"]["Setting"]
            .as_array()
            .context("GET /:/prefs: no MediaContainer.Setting list in the answer")?;
        Ok(settings
            .iter()
            .filter_map(|s| Some((s["id"].as_str()?.to_string(), value_text(&s["value"]))))
            .collect())
    }

    /// `PUT /:/prefs?name=value&…` (one request, as python-plexapi's `Settings.save()` does).
    pub async fn set_prefs(&self, values: &[(String, String)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = values.iter().map(|(k, _)| k.as_str()).collect();
        self.send(
            self.req(reqwest::Method::PUT, "/:/prefs").query(values),
            &format!("PUT /:/prefs ({})", names.join(", ")),
        )
        .await?;
        Ok(())
    }

    pub async fn sessions(&self) -> Result<Vec<Session>> {
        let v = self
            .send(
                self.req(reqwest::Method::GET, "/status/sessions"),
                "GET /status/sessions",
            )
            .await?;
        let items = v["MediaContainer"]["Metadata"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(items
            .iter()
            .map(|m| {
                let player = &m["Player"];
                Session {
                    user: m["User"]["title"].as_str().unwrap_or("?").to_string(),
                    title: m["title"].as_str().unwrap_or("").to_string(),
                    player: player["title"]
                        .as_str()
                        .or(player["product"].as_str())
                        .unwrap_or("?")
                        .to_string(),
                    address: player["address"].as_str().unwrap_or("").to_string(),
                    local: as_bool(player.get("local"))
                        || m["Session"]["location"].as_str() == Some("lan"),
                    relayed: as_bool(player.get("relayed")),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_read_from_the_preferences_element_only() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
<Preferences MachineIdentifier="abc" PlexOnlineToken="tok&amp;en" PlexOnlineUsername="bob"/>"#;
        assert_eq!(xml_attr(xml, "PlexOnlineToken").as_deref(), Some("tok&en"));
        assert_eq!(xml_attr(xml, "MachineIdentifier").as_deref(), Some("abc"));
        assert_eq!(xml_attr(xml, "Token"), None);
        assert_eq!(
            xml_attr("<Other PlexOnlineToken=\"x\"/>", "PlexOnlineToken"),
            None
        );
    }

    #[test]
    fn token_file_wins_and_an_empty_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("t");
        std::fs::write(&f, "secret\n").unwrap();
        assert_eq!(find_token(Some(&f), None).unwrap().value, "secret");
        std::fs::write(&f, "\n").unwrap();
        let e = find_token(Some(&f), None).err().unwrap().to_string();
        assert!(e.contains("empty"), "{e}");
        let x = d.path().join("Preferences.xml");
        std::fs::write(&x, r#"<Preferences PlexOnlineToken="fromxml"/>"#).unwrap();
        if std::env::var(TOKEN_ENV).is_err() {
            let t = find_token(None, Some(&x)).unwrap();
            assert_eq!(t.value, "fromxml");
            assert_eq!(t.source, x.display().to_string());
        }
    }
}
