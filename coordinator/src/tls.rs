//! TLS material: a user-supplied certificate, or a self-signed one made on first start and kept
//! in the state directory. Nodes trust it by its pin (hash of the public key), not by a CA.

use anyhow::{Context, bail};
use homeport_proto::api::pin_from_spki;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const PIN_FILE: &str = "pin";

/// TLS sessions the server remembers for resumption without a ticket: one per node of a
/// 10,000-node mesh, twice over (a few hundred bytes each).
const SESSION_CACHE: usize = 20_000;

/// Private files are written by the one helper every binary shares.
pub use homeport_host::fs::write_private;
/// Addresses of the local interfaces (for certificate names and the join hint).
pub use homeport_host::net::interface_addrs as local_ips;

/// The server side of TLS, and the pin clients check.
pub struct TlsMaterial {
    pub server_config: Arc<rustls::ServerConfig>,
    pub pin: String,
    /// True when a self-signed certificate was created by this call.
    pub created: bool,
    pub cert_path: PathBuf,
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read certificate {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{}: no certificate found; expected PEM (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read key {}", path.display()))?;
    rustls_pemfile::private_key(&mut &pem[..])
        .with_context(|| format!("{}: not a PEM key file", path.display()))?
        .with_context(|| {
            format!(
                "{}: no private key found; expected PEM (PKCS#8, PKCS#1 or SEC1)",
                path.display()
            )
        })
}

/// The pin of the first certificate in a PEM file.
pub fn pin_of_cert_file(path: &Path) -> anyhow::Result<String> {
    let certs = read_certs(path)?;
    let spki = homeport_proto::tls::spki_of_cert(certs[0].as_ref()).with_context(|| {
        format!(
            "{}: cannot find the public key in the certificate",
            path.display()
        )
    })?;
    Ok(pin_from_spki(spki))
}

/// The pin of the coordinator whose state directory is `dir`: the pin file the server writes on
/// start, else the self-signed certificate.
pub fn read_pin(dir: &Path) -> anyhow::Result<String> {
    let pin_file = dir.join(PIN_FILE);
    if let Ok(p) = std::fs::read_to_string(&pin_file) {
        let p = p.trim().to_string();
        if homeport_proto::tls::validate_pin(&p).is_ok() {
            return Ok(p);
        }
    }
    let cert = dir.join(CERT_FILE);
    if cert.exists() {
        return pin_of_cert_file(&cert);
    }
    bail!(
        "no certificate in {} yet: start the coordinator once (`homeport-coordinator serve --state-dir {}`) to create one",
        dir.display(),
        dir.display()
    )
}

/// Loads `cert`/`key` if given; else loads or creates the self-signed pair in `state_dir` with
/// `sans` as subject alternative names. Writes the pin file last.
pub fn load_or_create(
    state_dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
    sans: &[String],
) -> anyhow::Result<TlsMaterial> {
    let (cert_path, key_path, created) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf(), false),
        (None, None) => {
            let c = state_dir.join(CERT_FILE);
            let k = state_dir.join(KEY_FILE);
            let created = if c.exists() && k.exists() {
                false
            } else {
                let mut params = rcgen::CertificateParams::new(sans.to_vec())
                    .context("cannot build the self-signed certificate")?;
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, "homeport coordinator");
                let kp = rcgen::KeyPair::generate().context("cannot generate a key")?;
                let cert = params
                    .self_signed(&kp)
                    .context("cannot sign the certificate")?;
                // Key first, certificate last: the certificate's presence means both are complete.
                write_private(&k, kp.serialize_pem().as_bytes())?;
                write_private(&c, cert.pem().as_bytes())?;
                true
            };
            (c, k, created)
        }
        _ => bail!(
            "--tls-cert and --tls-key go together: give both or neither (neither = self-signed)"
        ),
    };
    let certs = read_certs(&cert_path)?;
    let key = read_key(&key_path)?;
    let pin = pin_of_cert_file(&cert_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "{} and {} do not form a usable certificate and key",
                cert_path.display(),
                key_path.display()
            )
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resumption, so that a reconnect storm of every node is not as many full handshakes (a
    // signature with the certificate key each): stateless tickets (the ticket key rotates and
    // is never stored), and a session cache large enough for every node of a large mesh.
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()
        .context("cannot create the TLS session ticket key")?;
    write_private(&state_dir.join(PIN_FILE), format!("{pin}\n").as_bytes())?;
    Ok(TlsMaterial {
        server_config: Arc::new(cfg),
        pin,
        created,
        cert_path,
    })
}

/// Names for a self-signed certificate: localhost, the listen address if specific, every
/// interface address, and the public URL's host.
pub fn cert_names(listen: IpAddr, public_host: Option<&str>) -> Vec<String> {
    let mut v = vec!["localhost".to_string()];
    if !listen.is_unspecified() {
        v.push(listen.to_string());
    }
    for ip in local_ips() {
        if !homeport_proto::addr::is_link_local(ip) {
            v.push(ip.to_string());
        }
    }
    if let Some(h) = public_host {
        v.push(h.trim_matches(|c| c == '[' || c == ']').to_string());
    }
    let mut seen = std::collections::HashSet::new();
    v.retain(|x| seen.insert(x.clone()));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn self_signed_is_created_once_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            read_pin(dir.path())
                .unwrap_err()
                .to_string()
                .contains("no certificate")
        );
        let names = cert_names("127.0.0.1".parse().unwrap(), Some("vps.example"));
        assert!(names.contains(&"vps.example".to_string()));
        let a = load_or_create(dir.path(), None, None, &names).unwrap();
        assert!(a.created);
        assert!(a.pin.starts_with("sha256/"));
        homeport_proto::tls::validate_pin(&a.pin).unwrap();
        let b = load_or_create(dir.path(), None, None, &names).unwrap();
        assert!(!b.created);
        assert_eq!(a.pin, b.pin);
        assert_eq!(read_pin(dir.path()).unwrap(), a.pin);
        std::fs::remove_file(dir.path().join(PIN_FILE)).unwrap();
        assert_eq!(
            read_pin(dir.path()).unwrap(),
            a.pin,
            "falls back to cert.pem"
        );
        for f in [CERT_FILE, KEY_FILE] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        assert!(load_or_create(dir.path(), Some(&dir.path().join(CERT_FILE)), None, &[]).is_err());
    }

    /// More nodes than rustls' default session cache (256) each reconnect: every one resumes.
    #[tokio::test]
    async fn every_node_of_a_storm_resumes_its_tls_session() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const NODES: usize = 300;
        let dir = tempfile::tempdir().unwrap();
        let m = load_or_create(dir.path(), None, None, &["localhost".into()]).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(m.server_config.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut s = acceptor.accept(tcp).await.unwrap();
                    s.write_all(b"x").await.unwrap();
                    s.flush().await.unwrap();
                    let _ = s.read(&mut [0u8; 1]).await;
                });
            }
        });
        // Each node has its own client config, as the node builds it; its sessions live there.
        let clients: Vec<_> = (0..NODES)
            .map(|_| Arc::new(homeport_proto::tls::pinned_client_config(&m.pin).unwrap()))
            .collect();
        let mut resumed = 0;
        for round in 0..2 {
            for c in &clients {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let mut conn = tokio_rustls::TlsConnector::from(c.clone())
                    .connect(name, tcp)
                    .await
                    .unwrap();
                // The ticket arrives before the first byte of data.
                conn.read_exact(&mut [0u8; 1]).await.unwrap();
                let kind = conn.get_ref().1.handshake_kind();
                if round == 1 && kind == Some(rustls::HandshakeKind::Resumed) {
                    resumed += 1;
                }
                conn.shutdown().await.unwrap();
            }
        }
        assert_eq!(resumed, NODES, "every reconnection resumes");
    }
}
