//! Plain-WireGuard devices (`homeport-coordinator device add|list|remove`, `/api/v1/admin/devices`):
//! stored as rows of `nodes` with `via` set, so names, keys, addresses and ids are shared with the
//! nodes and unique across both. The coordinator never sees a device's private key: the admin CLI
//! makes the key pair and fills the private key into the config it prints.

use crate::api::{Admin, JsonBody, normalize_tags};
use crate::error::{ApiErr, ApiResult};
use crate::mesh::NodeRec;
use crate::state::AppState;
use crate::store::{Store, StoreError, StoreResult, allocate, finish, next_id, now};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use homeport_proto::device::{DeviceAdd, DeviceAdded, DeviceConfig, DeviceInfo};
use homeport_proto::map::{Endpoint, EndpointKind};
use homeport_proto::{NodeId, NodeName, PublicKey, addr::is_public};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sqlx::Row;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

/// The address a device sends to: the via node's public WireGuard endpoint. A configured
/// (static) one first, then what STUN saw, then a public interface address; IPv4 before IPv6
/// (phones on IPv4-only networks are common).
pub fn public_endpoint(eps: &[Endpoint]) -> Option<SocketAddr> {
    let rank = |e: &Endpoint| {
        let kind = match e.kind {
            EndpointKind::Static => 0,
            EndpointKind::Stun => 1,
            EndpointKind::Local if is_public(e.addr.ip()) => 2,
            _ => return None,
        };
        Some((kind, e.addr.is_ipv6()))
    };
    eps.iter()
        .filter_map(|e| Some((rank(e)?, e.addr)))
        .min_by_key(|(r, _)| *r)
        .map(|(_, a)| a)
}

fn info(d: &NodeRec, via_name: NodeName) -> DeviceInfo {
    DeviceInfo {
        id: d.id,
        name: d.name.clone(),
        via: d.via.unwrap_or(NodeId(0)),
        via_name,
        public_key: d.public_key,
        addrs: d.addrs,
        tags: d.tags.clone(),
        created_at: d.created_at,
    }
}

impl Store {
    /// Stores a device in one transaction: a unique name (taken names are refused, not renamed:
    /// the admin chose it), a unique key, the lowest free addresses.
    pub async fn add_device(
        &self,
        name: &NodeName,
        via: NodeId,
        public_key: PublicKey,
        tags: &[String],
        prefix_v4: Ipv4Net,
        prefix_v6: Ipv6Net,
    ) -> StoreResult<NodeRec> {
        let mut tx = self.pool.begin().await?;
        let r = async {
            let clash = sqlx::query("SELECT name FROM nodes WHERE name = $1 OR public_key = $2")
                .bind(name.as_str())
                .bind(public_key.to_base64())
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = clash {
                let other: String = row.try_get("name")?;
                return Err(StoreError::Conflict(if other == name.as_str() {
                    format!("name: {name:?} is taken by a node or device; choose another name")
                } else {
                    format!("public_key: already used by {other:?}; every device needs its own key")
                }));
            }
            let used: BTreeSet<Ipv4Addr> = sqlx::query("SELECT ipv4 FROM nodes")
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .filter_map(|r| r.try_get::<String, _>("ipv4").ok()?.parse().ok())
                .collect();
            let addrs = allocate(prefix_v4, prefix_v6, &used).ok_or_else(|| {
                StoreError::Conflict(format!(
                    "the mesh prefix {prefix_v4} has no free address left"
                ))
            })?;
            let id = next_id(&mut tx, "nodes").await?;
            let at = now();
            sqlx::query(
                "INSERT INTO nodes (id, name, public_key, ipv4, ipv6, tags, credential_hash, authkey_id, created_at, last_seen, endpoints, via) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8, NULL, $9, $10)",
            )
            .bind(id)
            .bind(name.as_str())
            .bind(public_key.to_base64())
            .bind(addrs.ipv4.to_string())
            .bind(addrs.ipv6.to_string())
            .bind(serde_json::to_string(tags)?)
            // Nobody holds this token: a device can never open a map stream.
            .bind(homeport_proto::api::token_hash(&crate::store::random_token("hpd_")))
            .bind(at)
            .bind("[]")
            .bind(via.0)
            .execute(&mut *tx)
            .await?;
            self.announce(&mut *tx, crate::replicas::Change::nodes(vec![NodeId(id)]))
                .await?;
            Ok(NodeRec {
                id: NodeId(id),
                name: name.clone(),
                public_key,
                addrs,
                tags: tags.to_vec(),
                created_at: at,
                last_seen: None,
                endpoints: vec![],
                online: false,
                routes: vec![],
                via: Some(via),
            })
        }
        .await;
        finish(tx, r).await
    }

    /// Deletes a device. False when there was no such device.
    pub async fn remove_device(&self, id: NodeId) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let r = async {
            let r = sqlx::query("DELETE FROM nodes WHERE id = $1 AND via IS NOT NULL")
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
            self.announce(&mut *tx, crate::replicas::Change::nodes(vec![id]))
                .await?;
            Ok(r.rows_affected() > 0)
        }
        .await;
        finish(tx, r).await
    }
}

/// The config a device gets: its addresses, the via node's key and endpoint, the mesh prefixes.
pub fn config_for(
    d: &NodeRec,
    via: &NodeRec,
    endpoint: &str,
    prefixes: (Ipv4Net, Ipv6Net),
    domain: Option<&str>,
) -> String {
    let allowed = [IpNet::V4(prefixes.0), IpNet::V6(prefixes.1)];
    DeviceConfig {
        name: d.name.as_str(),
        via_name: via.name.as_str(),
        addrs: d.addrs,
        via_key: via.public_key,
        endpoint,
        allowed: &allowed,
        // The via node answers mesh names on its mesh address and forwards the rest.
        dns: Some(std::net::IpAddr::V4(via.addrs.ipv4)),
        domain,
    }
    .render()
}

/// `POST /api/v1/admin/devices`.
pub async fn add(
    _: Admin,
    State(st): State<AppState>,
    JsonBody(req): JsonBody<DeviceAdd>,
) -> ApiResult<(StatusCode, Json<DeviceAdded>)> {
    let name: NodeName = req
        .name
        .parse()
        .map_err(|e| ApiErr::bad_request(format!("name: {e}")))?;
    let tags = normalize_tags(&req.tags)?;
    let endpoint_override = match req.endpoint.as_deref() {
        None => None,
        Some(e) => Some(check_endpoint(e)?),
    };
    let _w = st.write_lock.lock().await;
    let (via, prefixes, domain) = {
        let mesh = st.mesh();
        let via = mesh.node_by_name(req.via.trim()).cloned().ok_or_else(|| {
            ApiErr::not_found(format!(
                "via: no node named {:?}; a device connects through a node (see `homeport-coordinator nodes`)",
                req.via
            ))
        })?;
        (
            via,
            (mesh.prefix_v4, mesh.prefix_v6),
            mesh.mesh_domain.clone(),
        )
    };
    let endpoint = match endpoint_override {
        Some(e) => e,
        None => public_endpoint(&via.endpoints)
            .map(|a| a.to_string())
            .ok_or_else(|| {
                ApiErr::conflict(format!(
                    "endpoint: node {} has reported no public endpoint yet (is it up?); pass the \
                     address devices reach its WireGuard port at as HOST:PORT (--endpoint)",
                    via.name
                ))
            })?,
    };
    let dev = st
        .store
        .add_device(&name, via.id, req.public_key, &tags, prefixes.0, prefixes.1)
        .await?;
    st.mesh().upsert_device(dev.clone());
    tracing::info!(device = %dev.name, via = %via.name, ipv4 = %dev.addrs.ipv4, "device added");
    let config = config_for(&dev, &via, &endpoint, prefixes, domain.as_deref());
    Ok((
        StatusCode::CREATED,
        Json(DeviceAdded {
            device: info(&dev, via.name.clone()),
            config,
        }),
    ))
}

/// HOST:PORT: a DNS name or IPv4 address, or an IPv6 address in brackets; a port 1-65535.
fn check_endpoint(e: &str) -> ApiResult<String> {
    let bad = || {
        ApiErr::bad_request(format!(
            "endpoint: {e:?} is not HOST:PORT (e.g. 198.51.100.10:41641, [2001:db8::1]:41641 or vpn.example.net:41641)"
        ))
    };
    let (host, port) = e.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        }
    };
    if port_ok && host_ok {
        Ok(e.to_string())
    } else {
        Err(bad())
    }
}

/// `GET /api/v1/admin/devices`.
pub async fn list(_: Admin, State(st): State<AppState>) -> Json<Vec<DeviceInfo>> {
    let mesh = st.mesh();
    let mut v: Vec<DeviceInfo> = mesh
        .devices()
        .map(|d| {
            let via = d
                .via
                .and_then(|v| mesh.node(v))
                .map(|n| n.name.clone())
                .unwrap_or_else(|| "unknown".parse().expect("a valid name"));
            info(d, via)
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Json(v)
}

/// `DELETE /api/v1/admin/devices/{name}`: the via node drops the session at its next map delta.
pub async fn remove(
    _: Admin,
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let _w = st.write_lock.lock().await;
    let id = st
        .mesh()
        .device_by_name(&name)
        .map(|n| n.id)
        .ok_or_else(|| {
            ApiErr::not_found(format!(
                "no device named {name:?}; see `homeport-coordinator device list`"
            ))
        })?;
    st.store.remove_device(id).await?;
    st.mesh().remove_device(id);
    tracing::info!(device = %id, name, "device removed");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, clap::Subcommand)]
pub enum DeviceCmd {
    /// Add a device reached through node VIA; prints its wg-quick config and the same config as
    /// a QR code (scan it with the WireGuard app). The private key is made here and shown only
    /// in this output: it is never sent to the coordinator or stored
    Add {
        /// Device name (a DNS label: lowercase letters, digits, '-')
        name: String,
        /// The node the device connects to (usually the VPS)
        #[arg(long, value_name = "NODE")]
        via: String,
        /// Tag for the access policy (repeatable; tag:NAME or NAME)
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// The device's own WireGuard public key (its app made the key pair); the config then
        /// has a placeholder where the app fills in its private key
        #[arg(long, value_name = "KEY")]
        public_key: Option<String>,
        /// HOST:PORT the device sends to, when not the via node's own public endpoint
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: Option<String>,
        /// Also write the QR code as a PNG image to FILE (mode 0600: it holds the private key)
        #[arg(long, value_name = "FILE")]
        png: Option<std::path::PathBuf>,
        /// Print only the config, no QR code
        #[arg(long)]
        no_qr: bool,
    },
    /// List devices: name, via node, mesh addresses, tags
    List {
        /// Print JSON (a list of DeviceInfo) instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove a device: its via node drops its session within a second
    Remove {
        /// Device name (from `device list`)
        name: String,
    },
}

/// A QR code of `text` for a terminal: two modules per character cell (upper and lower half
/// blocks), dark on light with the quiet zone, which phone cameras read from a dark terminal too.
pub fn qr_text(text: &str) -> anyhow::Result<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("the config does not fit a QR code: {e}"))?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// Modules per side of a PNG module, and the quiet zone in modules (the standard asks for 4).
const PNG_SCALE: usize = 8;
const PNG_QUIET: usize = 4;

/// A QR code of `text` as a grayscale PNG.
pub fn qr_png(text: &str) -> anyhow::Result<Vec<u8>> {
    let code = qrcode::QrCode::new(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("the config does not fit a QR code: {e}"))?;
    let w = code.width();
    let colors = code.to_colors();
    let side = (w + 2 * PNG_QUIET) * PNG_SCALE;
    let mut px = vec![255u8; side * side];
    for y in 0..w {
        for x in 0..w {
            if colors[y * w + x] == qrcode::Color::Dark {
                for dy in 0..PNG_SCALE {
                    let row = (y + PNG_QUIET) * PNG_SCALE + dy;
                    let col = (x + PNG_QUIET) * PNG_SCALE;
                    px[row * side + col..row * side + col + PNG_SCALE].fill(0);
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, side as u32, side as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header()?;
        wr.write_image_data(&px)?;
    }
    Ok(out)
}

pub async fn run_cli(client: crate::client::AdminClient, cmd: DeviceCmd) -> anyhow::Result<()> {
    use axum::http::Method;
    use homeport_proto::device::{PATH_ADMIN_DEVICES, with_private_key};
    match cmd {
        DeviceCmd::Add {
            name,
            via,
            tags,
            public_key,
            endpoint,
            png,
            no_qr,
        } => {
            let (public_key, private) = match public_key {
                Some(k) => (
                    k.trim().parse::<PublicKey>().map_err(|e| {
                        anyhow::anyhow!("--public-key: {e}; expected the device's WireGuard public key (44 characters of base64)")
                    })?,
                    None,
                ),
                None => {
                    let k = homeport_proto::PrivateKey::generate();
                    (k.public_key(), Some(k))
                }
            };
            let req = DeviceAdd {
                name,
                via,
                public_key,
                tags,
                endpoint,
            };
            let added: DeviceAdded = client
                .json(
                    Method::POST,
                    PATH_ADMIN_DEVICES,
                    Some(&serde_json::to_value(&req)?),
                )
                .await?;
            let config = match &private {
                Some(k) => with_private_key(&added.config, &k.to_base64()),
                None => added.config.clone(),
            };
            if let Some(path) = &png {
                homeport_host::fs::write_private(path, &qr_png(&config)?)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            }
            print!("{config}");
            if !no_qr {
                println!();
                print!("{}", qr_text(&config)?);
            }
            let d = &added.device;
            eprintln!(
                "device {} added: {} and {} through {}{}",
                d.name,
                d.addrs.ipv4,
                d.addrs.ipv6,
                d.via_name,
                if private.is_some() {
                    "; its private key is in this output only"
                } else {
                    ""
                }
            );
            if let Some(path) = png {
                eprintln!("QR code written to {}", path.display());
            }
        }
        DeviceCmd::List { json } => {
            let v: Vec<DeviceInfo> = client.json(Method::GET, PATH_ADMIN_DEVICES, None).await?;
            if json {
                return crate::cli::print_json(&v);
            }
            let rows = v
                .iter()
                .map(|d| {
                    vec![
                        d.name.to_string(),
                        d.via_name.to_string(),
                        d.addrs.ipv4.to_string(),
                        d.addrs.ipv6.to_string(),
                        d.tags.join(","),
                    ]
                })
                .collect();
            print!(
                "{}",
                crate::cli::table(&["NAME", "VIA", "IPV4", "IPV6", "TAGS"], rows)
            );
        }
        DeviceCmd::Remove { name } => {
            client
                .call(
                    Method::DELETE,
                    &format!("{PATH_ADMIN_DEVICES}/{name}"),
                    None,
                )
                .await?;
            eprintln!("device {name} removed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_prefers_configured_then_stun_then_public_local() {
        let ep = |a: &str, kind| Endpoint {
            addr: a.parse().unwrap(),
            kind,
        };
        let local_private = ep("10.0.0.2:41641", EndpointKind::Local);
        let local_public = ep("198.51.100.10:41641", EndpointKind::Local);
        let stun = ep("203.0.113.7:41641", EndpointKind::Stun);
        assert_eq!(public_endpoint(&[local_private]), None);
        assert_eq!(
            public_endpoint(&[local_private, local_public]),
            Some(local_public.addr)
        );
        assert_eq!(public_endpoint(&[local_public, stun]), Some(stun.addr));
        assert!(check_endpoint("vpn.example.net:41641").is_ok());
        assert!(check_endpoint("[2001:db8::1]:41641").is_ok());
        assert!(check_endpoint("vpn.example.net").is_err());
        assert!(check_endpoint("a b:1").is_err());
        assert!(check_endpoint("[::1:1").is_err());
        assert!(check_endpoint("host:0").is_err());
        assert!(check_endpoint("").is_err());
    }

    #[test]
    fn qr_codes_hold_a_whole_config() {
        let text = "[Interface]\nPrivateKey = x\n".repeat(12);
        let t = qr_text(&text).unwrap();
        assert!(t.lines().count() > 20);
        let png = qr_png(&text).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
