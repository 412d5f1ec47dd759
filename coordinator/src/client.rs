//! The admin CLI's connection to a coordinator: the local admin socket (no token), or a remote
//! coordinator over HTTPS with the admin token, trusting it by pin.

use anyhow::{Context, bail};
use axum::http::{Method, Request, StatusCode, header};
use bytes::Bytes;
use homeport_proto::api::ApiError;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The CLI may run right after `serve` was started: wait this long for the admin socket.
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);

pub enum AdminClient {
    Local {
        socket: PathBuf,
        state_dir: PathBuf,
    },
    Remote {
        base: String,
        token: String,
        http: reqwest::Client,
    },
}

impl AdminClient {
    pub fn local(state_dir: PathBuf) -> AdminClient {
        AdminClient::Local {
            socket: state_dir.join(crate::server::ADMIN_SOCKET),
            state_dir,
        }
    }

    pub fn remote(url: &str, token: &str, pin: Option<&str>) -> anyhow::Result<AdminClient> {
        crate::config::check_public_url(url)
            .map_err(|e| anyhow::anyhow!("--url {url:?}: expected {e}"))?;
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(
                homeport_proto::api::CLIENT_POOL_IDLE_SECS,
            ));
        if let Some(pin) = pin {
            let cfg = homeport_proto::tls::pinned_client_config(pin)
                .map_err(|e| anyhow::anyhow!("--pin: {e}"))?;
            b = b.use_preconfigured_tls(cfg);
        }
        Ok(AdminClient::Remote {
            base: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: b.build().context("cannot build the HTTPS client")?,
        })
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        match self {
            AdminClient::Local { socket, state_dir } => {
                let deadline = Instant::now() + CONNECT_WAIT;
                let stream = loop {
                    match tokio::net::UnixStream::connect(socket).await {
                        Ok(s) => break s,
                        Err(e)
                            if Instant::now() < deadline
                                && matches!(
                                    e.kind(),
                                    std::io::ErrorKind::NotFound
                                        | std::io::ErrorKind::ConnectionRefused
                                ) =>
                        {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => bail!(
                            "cannot reach the coordinator at {}: {e}; is `homeport-coordinator serve --state-dir {}` running? \
                             (for a remote coordinator use --url, --token-file and --pin)",
                            socket.display(),
                            state_dir.display()
                        ),
                    }
                };
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .context("admin socket handshake failed")?;
                tokio::spawn(conn);
                let req = Request::builder()
                    .method(method)
                    .uri(path)
                    .header(header::HOST, "localhost")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
                let resp = sender
                    .send_request(req)
                    .await
                    .context("admin request failed")?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await?.to_bytes();
                Ok((status, bytes))
            }
            AdminClient::Remote { base, token, http } => {
                let mut rb = http
                    .request(method, format!("{base}{path}"))
                    .bearer_auth(token)
                    .header(header::CONTENT_TYPE, "application/json");
                if let Some(b) = body {
                    rb = rb.body(b);
                }
                let resp = rb
                    .send()
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot reach {base}: {}", error_chain(&e)))?;
                let status = resp.status();
                let bytes = resp.bytes().await?;
                Ok((status, bytes))
            }
        }
    }

    /// Sends a request; a non-2xx answer becomes an error carrying the API's `detail`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Bytes> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let (status, bytes) = self.raw(method, path, body).await?;
        if status.is_success() {
            return Ok(bytes);
        }
        match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => bail!("{}", e.detail),
            Err(_) => bail!("{status}: {}", String::from_utf8_lossy(&bytes).trim()),
        }
    }

    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<T> {
        let b = self.call(method, path, body).await?;
        serde_json::from_slice(&b).context("unexpected answer from the coordinator")
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
