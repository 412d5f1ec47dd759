//! Storage on sqlx's `Any` driver: SQLite (default, one file, WAL) or PostgreSQL, with the same
//! portable SQL (`$N` placeholders work on both). Every multi-step change runs in one transaction.

use crate::mesh::NodeRec;
use homeport_proto::map::{Endpoint, MeshAddrs};
use homeport_proto::policy::Policy;
use homeport_proto::publish::{Guards, PublishProto, PublishRule};
use homeport_proto::{NodeId, NodeName, PublicKey};
use ipnet::{Ipv4Net, Ipv6Net};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};
use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

#[derive(Clone, Debug)]
pub struct Store {
    pub pool: AnyPool,
    /// PostgreSQL: other replicas may share the database, and every change is announced to them
    /// (NOTIFY, in the changing transaction, so it is heard exactly when it commits).
    pub postgres: bool,
    /// This replica's id (its public URL) in what it announces, so it skips its own.
    pub origin: String,
}

/// What can go wrong in the store, in its own terms; `error.rs` maps each kind to one HTTP
/// status (the store knows nothing of HTTP).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The auth key does not admit this registration (unknown, revoked, expired, used up); the
    /// text says which and what to do.
    #[error("{0}")]
    KeyRefused(String),
    /// The change clashes with what is stored (a duplicate rule, no address left).
    #[error("{0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data could not be decoded: {0}")]
    Decode(#[from] serde_json::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The database's clock in unix seconds (PostgreSQL): replicas' heartbeats are compared in it.
const DB_NOW: &str = "CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)";

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// An auth key as stored.
#[derive(Debug, Clone)]
pub struct AuthKeyRow {
    pub id: i64,
    pub prefix: String,
    pub reusable: bool,
    pub tags: Vec<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub used: bool,
    pub revoked: bool,
    pub max_uses: Option<i64>,
    pub uses: i64,
}

/// The result of a registration.
#[derive(Debug, Clone)]
pub struct Registered {
    pub node: NodeRec,
    pub credential: String,
    /// The key was already registered: only the credential changed.
    pub existing: bool,
}

fn authkey_row(r: &AnyRow) -> Result<AuthKeyRow, sqlx::Error> {
    Ok(AuthKeyRow {
        id: r.try_get("id")?,
        prefix: r.try_get("prefix")?,
        reusable: r.try_get::<i64, _>("reusable")? != 0,
        tags: serde_json::from_str(&r.try_get::<String, _>("tags")?).unwrap_or_default(),
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        used: r.try_get::<i64, _>("used")? != 0,
        revoked: r.try_get::<i64, _>("revoked")? != 0,
        max_uses: r.try_get("max_uses")?,
        uses: r.try_get("uses")?,
    })
}

fn bad_row(what: &str, e: impl std::fmt::Display) -> sqlx::Error {
    sqlx::Error::Decode(format!("stored {what} is invalid: {e}").into())
}

pub(crate) fn node_row(r: &AnyRow) -> Result<NodeRec, sqlx::Error> {
    let name: String = r.try_get("name")?;
    let key: String = r.try_get("public_key")?;
    let v4: String = r.try_get("ipv4")?;
    let v6: String = r.try_get("ipv6")?;
    Ok(NodeRec {
        id: NodeId(r.try_get("id")?),
        name: name
            .parse::<NodeName>()
            .map_err(|e| bad_row("node name", e))?,
        public_key: key
            .parse::<PublicKey>()
            .map_err(|e| bad_row("public key", e))?,
        addrs: MeshAddrs {
            ipv4: v4.parse().map_err(|e| bad_row("ipv4", e))?,
            ipv6: v6.parse().map_err(|e| bad_row("ipv6", e))?,
        },
        tags: serde_json::from_str(&r.try_get::<String, _>("tags")?).unwrap_or_default(),
        created_at: r.try_get("created_at")?,
        last_seen: r.try_get("last_seen")?,
        endpoints: serde_json::from_str(&r.try_get::<String, _>("endpoints")?).unwrap_or_default(),
        online: false,
        routes: vec![],
        via: r.try_get::<Option<i64>, _>("via")?.map(NodeId),
    })
}

pub(crate) const NODE_COLS: &str =
    "id, name, public_key, ipv4, ipv6, tags, created_at, last_seen, endpoints, via";

/// Random token with a recognisable prefix: 32 random bytes, base64url without padding.
pub fn random_token(prefix: &str) -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

/// The next id of `table`, never handed out before (not even for a row since deleted, so an id
/// in an old log line, audit record or script always means the same thing). The counter lives in
/// `id_seq` and is bumped inside the inserting transaction.
pub(crate) async fn next_id(
    tx: &mut Transaction<'_, Any>,
    table: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query("UPDATE id_seq SET last = last + 1 WHERE name = $1")
        .bind(table)
        .execute(&mut **tx)
        .await?;
    let row = sqlx::query("SELECT last FROM id_seq WHERE name = $1")
        .bind(table)
        .fetch_one(&mut **tx)
        .await?;
    row.try_get("last")
}

/// Ends a transaction the way its body went: commit on success, an explicit rollback on failure.
/// A transaction that is only dropped rolls back lazily, when its connection is next used; on
/// SQLite it keeps the write lock until then, and the next writer gets "database is locked".
pub(crate) async fn finish<T>(tx: Transaction<'_, Any>, r: StoreResult<T>) -> StoreResult<T> {
    match r {
        Ok(v) => {
            tx.commit().await?;
            Ok(v)
        }
        Err(e) => {
            if let Err(rb) = tx.rollback().await {
                tracing::warn!(error = %rb, "rollback failed");
            }
            Err(e)
        }
    }
}

impl Store {
    /// Connects and migrates. A SQLite file is created if missing and switched to WAL.
    pub async fn open(url: &str) -> anyhow::Result<Store> {
        use anyhow::Context;
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if is_sqlite { 4 } else { 10 })
            .connect(url)
            .await
            .with_context(|| format!("cannot open database {}", redact(url)))?;
        if is_sqlite {
            // Persistent in the file: readers never block the writer.
            sqlx::query("PRAGMA journal_mode=WAL")
                .fetch_all(&pool)
                .await
                .context("cannot switch the SQLite database to WAL")?;
        }
        MIGRATOR
            .run(&pool)
            .await
            .context("database migration failed")?;
        Ok(Store {
            pool,
            postgres: url.starts_with("postgres"),
            origin: String::new(),
        })
    }

    /// Announces `c` to the other replicas (PostgreSQL only; nothing with SQLite). Inside a
    /// transaction it is delivered when that commits, never if it rolls back.
    pub async fn announce<'e, E>(&self, e: E, mut c: crate::replicas::Change) -> StoreResult<()>
    where
        E: sqlx::Executor<'e, Database = Any>,
    {
        if !self.postgres {
            return Ok(());
        }
        c.from = self.origin.clone();
        // pg_notify returns void, which the Any driver cannot decode: select a constant.
        sqlx::query("SELECT CAST(1 AS BIGINT) AS one FROM (SELECT pg_notify($1, $2)) AS n")
            .bind(crate::replicas::CHANNEL)
            .bind(serde_json::to_string(&c)?)
            .execute(e)
            .await?;
        Ok(())
    }

    // ---- settings ----

    pub async fn setting(&self, name: &str) -> StoreResult<Option<String>> {
        let r = sqlx::query("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => Some(r.try_get("value")?),
            None => None,
        })
    }

    pub async fn set_setting(&self, name: &str, value: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- auth keys ----

    pub async fn create_authkey(
        &self,
        reusable: bool,
        tags: &[String],
        expires_at: Option<i64>,
        max_uses: Option<i64>,
    ) -> StoreResult<(i64, String)> {
        let key = random_token("hpk_");
        let prefix: String = key.chars().take(12).collect();
        let mut tx = self.pool.begin().await?;
        let id = next_id(&mut tx, "authkeys").await?;
        sqlx::query(
            "INSERT INTO authkeys (id, hash, prefix, reusable, tags, created_at, expires_at, used, revoked, max_uses, uses) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, 0, $8, 0)",
        )
        .bind(id)
        .bind(homeport_proto::api::token_hash(&key))
        .bind(prefix)
        .bind(reusable as i64)
        .bind(serde_json::to_string(tags)?)
        .bind(now())
        .bind(expires_at)
        .bind(max_uses)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((id, key))
    }

    pub async fn list_authkeys(&self) -> StoreResult<Vec<AuthKeyRow>> {
        let rows = sqlx::query(
            "SELECT id, prefix, reusable, tags, created_at, expires_at, used, revoked, max_uses, uses FROM authkeys ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(authkey_row).collect::<Result<_, _>>()?)
    }

    /// True when a key with that id existed.
    pub async fn revoke_authkey(&self, id: i64) -> StoreResult<bool> {
        let r = sqlx::query("UPDATE authkeys SET revoked = 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    // ---- nodes ----

    pub async fn load_nodes(&self) -> StoreResult<Vec<NodeRec>> {
        let rows = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        let mut nodes: Vec<NodeRec> = rows.iter().map(node_row).collect::<Result<_, _>>()?;
        let routes = self.load_routes().await?;
        for n in &mut nodes {
            n.routes = routes.get(&n.id).map(|r| r.in_use()).unwrap_or_default();
        }
        Ok(nodes)
    }

    pub async fn node_by_credential(&self, credential: &str) -> StoreResult<Option<NodeId>> {
        let r = sqlx::query("SELECT id FROM nodes WHERE credential_hash = $1")
            .bind(homeport_proto::api::token_hash(credential))
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => Some(NodeId(r.try_get("id")?)),
            None => None,
        })
    }

    /// Registers (or re-registers) a node in one transaction: checks the auth key, marks a
    /// single-use key used, picks a free name and free addresses, stores a fresh credential.
    pub async fn register(
        &self,
        authkey: &str,
        public_key: PublicKey,
        name: NodeName,
        prefix_v4: Ipv4Net,
        prefix_v6: Ipv6Net,
        previous_ipv4: Option<Ipv4Addr>,
    ) -> StoreResult<Registered> {
        let mut tx = self.pool.begin().await?;
        let mut r = Self::register_in(
            &mut tx,
            authkey,
            public_key,
            name,
            prefix_v4,
            prefix_v6,
            previous_ipv4,
        )
        .await;
        if let Ok(reg) = &r
            && let Err(e) = self
                .announce(&mut *tx, crate::replicas::Change::nodes(vec![reg.node.id]))
                .await
        {
            r = Err(e);
        }
        finish(tx, r).await
    }

    async fn register_in(
        tx: &mut Transaction<'_, Any>,
        authkey: &str,
        public_key: PublicKey,
        name: NodeName,
        prefix_v4: Ipv4Net,
        prefix_v6: Ipv6Net,
        previous_ipv4: Option<Ipv4Addr>,
    ) -> StoreResult<Registered> {
        let now = now();
        let key = sqlx::query(
            "SELECT id, prefix, reusable, tags, created_at, expires_at, used, revoked, max_uses, uses FROM authkeys WHERE hash = $1",
        )
        .bind(homeport_proto::api::token_hash(authkey))
        .fetch_optional(&mut **tx)
        .await?;
        let Some(key) = key else {
            return Err(StoreError::KeyRefused(
                "authkey: unknown auth key; create one with `homeport-coordinator authkey create`"
                    .into(),
            ));
        };
        let key = authkey_row(&key)?;
        if key.revoked {
            return Err(StoreError::KeyRefused(format!(
                "authkey: auth key {} ({}…) was revoked",
                key.id, key.prefix
            )));
        }
        if let Some(exp) = key.expires_at.filter(|&e| e <= now) {
            return Err(StoreError::KeyRefused(format!(
                "authkey: auth key {} ({}…) expired at unix time {exp}",
                key.id, key.prefix
            )));
        }
        // Atomic claim: a single-use key is consumed by exactly one registration, a key with
        // max_uses by at most that many.
        let claimed = sqlx::query(
            "UPDATE authkeys SET used = 1, uses = uses + 1 WHERE id = $1 \
             AND ((max_uses IS NOT NULL AND uses < max_uses) \
                  OR (max_uses IS NULL AND (reusable = 1 OR used = 0)))",
        )
        .bind(key.id)
        .execute(&mut **tx)
        .await?;
        if claimed.rows_affected() == 0 {
            return Err(StoreError::KeyRefused(match key.max_uses {
                Some(max) => format!(
                    "authkey: auth key {} ({}…) was used {max} times, its --max-uses; create a new one",
                    key.id, key.prefix
                ),
                _ => format!(
                    "authkey: single-use auth key {} ({}…) was already used; create a new one or a --reusable one",
                    key.id, key.prefix
                ),
            }));
        }
        let credential = random_token("hpn_");
        let cred_hash = homeport_proto::api::token_hash(&credential);
        let tags_json = serde_json::to_string(&key.tags)?;

        let existing_row = sqlx::query(&format!(
            "SELECT {NODE_COLS} FROM nodes WHERE public_key = $1"
        ))
        .bind(public_key.to_base64())
        .fetch_optional(&mut **tx)
        .await?;
        let existing = existing_row.is_some();
        let node = if let Some(row) = existing_row {
            // Same key, proven by the caller: a new credential only. Name, addresses and tags
            // stay as they are; an auth key's tags apply only to the node it first creates.
            let n = node_row(&row)?;
            if let Some(via) = n.via {
                return Err(StoreError::Conflict(format!(
                    "public_key: this key belongs to the plain-WireGuard device {} (through node {via}); \
                     remove it with `homeport-coordinator device remove {}` before joining with it as a node",
                    n.name, n.name
                )));
            }
            sqlx::query("UPDATE nodes SET credential_hash = $1 WHERE id = $2")
                .bind(&cred_hash)
                .bind(n.id.0)
                .execute(&mut **tx)
                .await?;
            n
        } else {
            let names: BTreeSet<String> = sqlx::query("SELECT name FROM nodes")
                .fetch_all(&mut **tx)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>("name"))
                .collect::<Result<_, _>>()?;
            let name = unique_name(&name, &names);
            let used: BTreeSet<Ipv4Addr> = sqlx::query("SELECT ipv4 FROM nodes")
                .fetch_all(&mut **tx)
                .await?
                .iter()
                .filter_map(|r| r.try_get::<String, _>("ipv4").ok()?.parse().ok())
                .collect();
            let preferred = previous_ipv4.and_then(|a| host_addrs(prefix_v4, prefix_v6, a));
            let addrs = preferred
                .filter(|p| !used.contains(&p.ipv4))
                .or_else(|| allocate(prefix_v4, prefix_v6, &used))
                .ok_or_else(|| {
                    StoreError::Conflict(format!(
                        "the mesh prefix {prefix_v4} has no free address left"
                    ))
                })?;
            let id = next_id(tx, "nodes").await?;
            sqlx::query(
                "INSERT INTO nodes (id, name, public_key, ipv4, ipv6, tags, credential_hash, authkey_id, created_at, last_seen, endpoints) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, $10)",
            )
            .bind(id)
            .bind(name.as_str())
            .bind(public_key.to_base64())
            .bind(addrs.ipv4.to_string())
            .bind(addrs.ipv6.to_string())
            .bind(&tags_json)
            .bind(&cred_hash)
            .bind(key.id)
            .bind(now)
            .bind("[]")
            .execute(&mut **tx)
            .await?;
            NodeRec {
                id: NodeId(id),
                name,
                public_key,
                addrs,
                tags: key.tags.clone(),
                created_at: now,
                last_seen: None,
                endpoints: vec![],
                online: false,
                routes: vec![],
                via: None,
            }
        };
        Ok(Registered {
            node,
            credential,
            existing,
        })
    }

    pub async fn set_endpoints(&self, id: NodeId, endpoints: &[Endpoint]) -> StoreResult<()> {
        let json = serde_json::to_string(endpoints)?;
        let mut tx = self.pool.begin().await?;
        let r = async {
            sqlx::query("UPDATE nodes SET endpoints = $1 WHERE id = $2")
                .bind(json)
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
            self.announce(&mut *tx, crate::replicas::Change::nodes(vec![id]))
                .await
        }
        .await;
        finish(tx, r).await
    }

    pub async fn touch(&self, id: NodeId, at: i64) -> StoreResult<()> {
        sqlx::query("UPDATE nodes SET last_seen = $1 WHERE id = $2")
            .bind(at)
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores many last_seen times in one transaction (a reconnect storm is thousands).
    pub async fn touch_many(&self, seen: &[(NodeId, i64)]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let mut r = Ok(());
        for (id, at) in seen {
            r = sqlx::query("UPDATE nodes SET last_seen = $1 WHERE id = $2")
                .bind(*at)
                .bind(id.0)
                .execute(&mut *tx)
                .await
                .map(drop)
                .map_err(StoreError::from);
            if r.is_err() {
                break;
            }
        }
        finish(tx, r).await
    }

    /// Deletes a node, the devices reached through it and the publish rules it takes part in.
    /// False when there was no such node.
    pub async fn remove_node(&self, id: NodeId) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM nodes WHERE via = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM publish_rules WHERE exit_id = $1 OR target_id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM node_routes WHERE node_id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        let mut c = crate::replicas::Change::nodes(vec![id]);
        c.publish = true;
        self.announce(&mut *tx, c).await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    // ---- publish ----

    /// Loads the rules, filling names and addresses from `nodes`.
    pub async fn load_publish(&self, nodes: &[NodeRec]) -> StoreResult<Vec<PublishRule>> {
        let by_id: HashMap<NodeId, &NodeRec> = nodes.iter().map(|n| (n.id, n)).collect();
        let rows = sqlx::query(
            "SELECT id, exit_id, port, proto, target_id, target_port, guards FROM publish_rules ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let id: i64 = r.try_get("id")?;
            let exit = NodeId(r.try_get("exit_id")?);
            let target = NodeId(r.try_get("target_id")?);
            let (Some(e), Some(t)) = (by_id.get(&exit), by_id.get(&target)) else {
                tracing::warn!(rule = id, "publish rule refers to a missing node; ignored");
                continue;
            };
            let proto: String = r.try_get("proto")?;
            out.push(PublishRule {
                id,
                exit,
                exit_name: e.name.clone(),
                proto: proto.parse().unwrap_or(PublishProto::Unknown),
                port: r.try_get::<i64, _>("port")? as u16,
                target,
                target_name: t.name.clone(),
                target_ipv4: t.addrs.ipv4,
                target_ipv6: t.addrs.ipv6,
                target_port: r.try_get::<i64, _>("target_port")? as u16,
                guards: serde_json::from_str::<Guards>(&r.try_get::<String, _>("guards")?)?,
            });
        }
        Ok(out)
    }

    /// Stores a validated rule (its `id` is assigned here). 409 on a duplicate (exit, port, proto).
    pub async fn add_publish(&self, rule: PublishRule) -> StoreResult<PublishRule> {
        let mut tx = self.pool.begin().await?;
        let mut r = Self::add_publish_in(&mut tx, rule).await;
        if r.is_ok()
            && let Err(e) = self
                .announce(&mut *tx, crate::replicas::Change::publish())
                .await
        {
            r = Err(e);
        }
        finish(tx, r).await
    }

    async fn add_publish_in(
        tx: &mut Transaction<'_, Any>,
        mut rule: PublishRule,
    ) -> StoreResult<PublishRule> {
        let dup = sqlx::query(
            "SELECT id FROM publish_rules WHERE exit_id = $1 AND port = $2 AND proto = $3",
        )
        .bind(rule.exit.0)
        .bind(rule.port as i64)
        .bind(rule.proto.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(d) = dup {
            let other: i64 = d.try_get("id")?;
            return Err(StoreError::Conflict(format!(
                "{} port {} on exit {} is already published by rule {other}; remove it first (`publish remove {other}`)",
                rule.proto.as_str(),
                rule.port,
                rule.exit_name
            )));
        }
        let id = next_id(tx, "publish_rules").await?;
        sqlx::query(
            "INSERT INTO publish_rules (id, exit_id, port, proto, target_id, target_port, guards, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id)
        .bind(rule.exit.0)
        .bind(rule.port as i64)
        .bind(rule.proto.as_str())
        .bind(rule.target.0)
        .bind(rule.target_port as i64)
        .bind(serde_json::to_string(&rule.guards)?)
        .bind(now())
        .execute(&mut **tx)
        .await?;
        rule.id = id;
        Ok(rule)
    }

    pub async fn remove_publish(&self, id: i64) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("DELETE FROM publish_rules WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        self.announce(&mut *tx, crate::replicas::Change::publish())
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    // ---- policy ----

    pub async fn policy(&self) -> StoreResult<Option<Policy>> {
        let r = sqlx::query("SELECT body FROM policy WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => Some(serde_json::from_str(&r.try_get::<String, _>("body")?)?),
            None => None,
        })
    }

    pub async fn set_policy(&self, p: &Policy) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM policy WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO policy (id, body, updated_at) VALUES (1, $1, $2)")
            .bind(serde_json::to_string(p)?)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        let c = crate::replicas::Change {
            policy: true,
            ..Default::default()
        };
        self.announce(&mut *tx, c).await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- replicas (high availability; PostgreSQL only) ----

    /// The nodes among `ids` as stored (removed ones are missing), each with the replica that
    /// holds its map stream.
    pub async fn nodes_by_id(&self, ids: &[NodeId]) -> StoreResult<Vec<(NodeRec, Option<String>)>> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        // Integers only, so the list is safe to write into the statement.
        let list: Vec<String> = ids.iter().map(|i| i.0.to_string()).collect();
        self.nodes_where(&format!("WHERE id IN ({})", list.join(",")))
            .await
    }

    /// Every node with the replica holding its stream.
    pub async fn nodes_with_replica(&self) -> StoreResult<Vec<(NodeRec, Option<String>)>> {
        self.nodes_where("").await
    }

    async fn nodes_where(&self, cond: &str) -> StoreResult<Vec<(NodeRec, Option<String>)>> {
        let rows = sqlx::query(&format!(
            "SELECT {NODE_COLS}, replica FROM nodes {cond} ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        let routes = self.load_routes().await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut n = node_row(r)?;
            n.routes = routes.get(&n.id).map(|r| r.in_use()).unwrap_or_default();
            out.push((n, r.try_get::<Option<String>, _>("replica")?));
        }
        Ok(out)
    }

    /// Stores which nodes' streams this replica opened (true) or closed (false); a close never
    /// clears a stream another replica took over meanwhile. Announced to the other replicas.
    pub async fn set_presence(&self, changes: &[(NodeId, bool)]) -> StoreResult<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let r = async {
            for (id, online) in changes {
                let q = if *online {
                    "UPDATE nodes SET replica = $1 WHERE id = $2"
                } else {
                    "UPDATE nodes SET replica = NULL WHERE id = $2 AND replica = $1"
                };
                sqlx::query(q)
                    .bind(&self.origin)
                    .bind(id.0)
                    .execute(&mut *tx)
                    .await?;
            }
            // NOTIFY payloads are limited to 8000 bytes.
            for chunk in changes.chunks(500) {
                let ids = chunk.iter().map(|(id, _)| *id).collect();
                self.announce(&mut *tx, crate::replicas::Change::nodes(ids))
                    .await?;
            }
            Ok::<_, StoreError>(())
        }
        .await;
        finish(tx, r).await
    }

    /// Registers this replica (or renews it after a restart): its streams from before are gone.
    /// Heartbeats are in the database's clock, so replicas' clocks need not agree.
    pub async fn register_replica(&self, pin: &str, relay: &str, started: i64) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let r = async {
            sqlx::query(&format!(
                "INSERT INTO replicas (url, pin, relay, started_at, heartbeat) VALUES ($1, $2, $3, $4, {DB_NOW}) \
                 ON CONFLICT (url) DO UPDATE SET pin = excluded.pin, relay = excluded.relay, \
                 started_at = excluded.started_at, heartbeat = excluded.heartbeat"
            ))
            .bind(&self.origin)
            .bind(pin)
            .bind(relay)
            .bind(started)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE nodes SET replica = NULL WHERE replica = $1")
                .bind(&self.origin)
                .execute(&mut *tx)
                .await?;
            self.announce(&mut *tx, crate::replicas::Change::replica_set())
                .await
        }
        .await;
        finish(tx, r).await
    }

    /// Renews this replica's heartbeat and forgets replicas silent for more than `dead_after`
    /// seconds: their nodes' streams are gone with them. Returns (some replica was forgotten,
    /// this replica's own row was still there).
    pub async fn heartbeat(&self, dead_after: i64) -> StoreResult<(bool, bool)> {
        let mut tx = self.pool.begin().await?;
        let r = async {
            let mine = sqlx::query(&format!(
                "UPDATE replicas SET heartbeat = {DB_NOW} WHERE url = $1"
            ))
            .bind(&self.origin)
            .execute(&mut *tx)
            .await?;
            let cleared = sqlx::query(&format!(
                "UPDATE nodes SET replica = NULL WHERE replica IN \
                 (SELECT url FROM replicas WHERE heartbeat < {DB_NOW} - $1 AND url <> $2)"
            ))
            .bind(dead_after)
            .bind(&self.origin)
            .execute(&mut *tx)
            .await?;
            let gone = sqlx::query(&format!(
                "DELETE FROM replicas WHERE heartbeat < {DB_NOW} - $1 AND url <> $2"
            ))
            .bind(dead_after)
            .bind(&self.origin)
            .execute(&mut *tx)
            .await?;
            let changed = gone.rows_affected() > 0 || cleared.rows_affected() > 0;
            if changed {
                // Which nodes lost their replica is not known here: everyone reloads.
                self.announce(&mut *tx, crate::replicas::Change::everything())
                    .await?;
            }
            Ok::<_, StoreError>((changed, mine.rows_affected() > 0))
        }
        .await;
        finish(tx, r).await
    }

    /// This replica's URL's last heartbeat and the seconds since (None: no such row). One that
    /// is still being renewed at startup means another live replica uses the same URL.
    pub async fn replica_heartbeat(&self) -> StoreResult<Option<(i64, i64)>> {
        let r = sqlx::query(&format!(
            "SELECT heartbeat, {DB_NOW} - heartbeat AS silent FROM replicas WHERE url = $1"
        ))
        .bind(&self.origin)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match r {
            Some(r) => Some((r.try_get("heartbeat")?, r.try_get("silent")?)),
            None => None,
        })
    }

    /// Puts this replica back after the others took it for dead, keeping its nodes' streams.
    pub async fn rejoin_replica(&self, pin: &str, relay: &str, started: i64) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let r = async {
            sqlx::query(&format!(
                "INSERT INTO replicas (url, pin, relay, started_at, heartbeat) VALUES ($1, $2, $3, $4, {DB_NOW}) \
                 ON CONFLICT (url) DO UPDATE SET heartbeat = excluded.heartbeat"
            ))
            .bind(&self.origin)
            .bind(pin)
            .bind(relay)
            .bind(started)
            .execute(&mut *tx)
            .await?;
            self.announce(&mut *tx, crate::replicas::Change::replica_set())
                .await
        }
        .await;
        finish(tx, r).await
    }

    /// The replicas heard from within `alive_within` seconds, oldest first: (url, pin, relay
    /// JSON).
    pub async fn replicas(&self, alive_within: i64) -> StoreResult<Vec<(String, String, String)>> {
        let rows = sqlx::query(&format!(
            "SELECT url, pin, relay FROM replicas WHERE heartbeat >= {DB_NOW} - $1 ORDER BY started_at, url"
        ))
        .bind(alive_within)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push((r.try_get("url")?, r.try_get("pin")?, r.try_get("relay")?));
        }
        Ok(out)
    }

    /// Leaves the set of replicas (a clean shutdown): the others stop advertising it at once.
    pub async fn unregister_replica(&self) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let r = async {
            sqlx::query("DELETE FROM replicas WHERE url = $1")
                .bind(&self.origin)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE nodes SET replica = NULL WHERE replica = $1")
                .bind(&self.origin)
                .execute(&mut *tx)
                .await?;
            self.announce(&mut *tx, crate::replicas::Change::everything())
                .await
        }
        .await;
        finish(tx, r).await
    }
}

/// `base`, or `base-2`, `base-3`, … whichever is free (kept within 63 characters).
pub fn unique_name(base: &NodeName, taken: &BTreeSet<String>) -> NodeName {
    if !taken.contains(base.as_str()) {
        return base.clone();
    }
    for i in 2u32.. {
        let suffix = format!("-{i}");
        let mut stem = base.as_str().to_string();
        stem.truncate(63 - suffix.len());
        let stem = stem.trim_end_matches('-');
        let cand = format!("{stem}{suffix}");
        if taken.contains(&cand) {
            continue;
        }
        if let Ok(n) = cand.parse() {
            return n;
        }
    }
    unreachable!("an unbounded counter finds a free name")
}

/// The addresses of host `ipv4` in the mesh prefixes, when it is a host address of `v4` (not the
/// network or broadcast address) that `v6` has room for.
pub fn host_addrs(v4: Ipv4Net, v6: Ipv6Net, ipv4: Ipv4Addr) -> Option<MeshAddrs> {
    if !v4.contains(&ipv4) || ipv4 == v4.network() || ipv4 == v4.broadcast() {
        return None;
    }
    let h = (u32::from(ipv4) - u32::from(v4.network())) as u128;
    let v6_hosts: u128 = if v6.prefix_len() == 0 {
        u128::MAX
    } else {
        (1u128 << (128 - v6.prefix_len())) - 1
    };
    (h <= v6_hosts).then(|| MeshAddrs {
        ipv4,
        ipv6: Ipv6Addr::from(u128::from(v6.network()) + h),
    })
}

/// The lowest free host number h (skipping the network address and the v4 broadcast), giving
/// prefix_v4 + h and prefix_v6 + h.
pub fn allocate(v4: Ipv4Net, v6: Ipv6Net, used: &BTreeSet<Ipv4Addr>) -> Option<MeshAddrs> {
    let base4 = u32::from(v4.network());
    let hosts: u64 = 1u64 << (32 - v4.prefix_len());
    if hosts < 4 {
        return None;
    }
    let base6 = u128::from(v6.network());
    let v6_hosts: u128 = if v6.prefix_len() == 0 {
        u128::MAX
    } else {
        (1u128 << (128 - v6.prefix_len())) - 1
    };
    for h in 1..(hosts - 1) {
        if h as u128 > v6_hosts {
            return None;
        }
        let ip = Ipv4Addr::from(base4 + h as u32);
        if !used.contains(&ip) {
            return Some(MeshAddrs {
                ipv4: ip,
                ipv6: Ipv6Addr::from(base6 + h as u128),
            });
        }
    }
    None
}

/// The database URL without a password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_suffixes() {
        let base: NodeName = "home".parse().unwrap();
        let mut taken = BTreeSet::new();
        assert_eq!(unique_name(&base, &taken).as_str(), "home");
        taken.insert("home".to_string());
        assert_eq!(unique_name(&base, &taken).as_str(), "home-2");
        taken.insert("home-2".to_string());
        assert_eq!(unique_name(&base, &taken).as_str(), "home-3");
        let long: NodeName = "a".repeat(63).parse().unwrap();
        let taken: BTreeSet<String> = [long.as_str().to_string()].into();
        let n = unique_name(&long, &taken);
        assert_eq!(n.as_str().len(), 63);
        assert!(n.as_str().ends_with("-2"));
    }

    #[test]
    fn allocation_skips_network_and_broadcast() {
        let v4: Ipv4Net = "100.96.0.0/30".parse().unwrap();
        let v6: Ipv6Net = "fd00::/64".parse().unwrap();
        let mut used = BTreeSet::new();
        let a = allocate(v4, v6, &used).unwrap();
        assert_eq!(a.ipv4, Ipv4Addr::new(100, 96, 0, 1));
        assert_eq!(a.ipv6, "fd00::1".parse::<Ipv6Addr>().unwrap());
        used.insert(a.ipv4);
        assert_eq!(
            allocate(v4, v6, &used).unwrap().ipv4,
            Ipv4Addr::new(100, 96, 0, 2)
        );
        used.insert(Ipv4Addr::new(100, 96, 0, 2));
        assert!(allocate(v4, v6, &used).is_none(), ".3 is the broadcast");
    }

    #[test]
    fn a_previous_address_is_a_host_of_the_prefix() {
        let v4: Ipv4Net = "100.96.0.0/24".parse().unwrap();
        let v6: Ipv6Net = "fd00::/64".parse().unwrap();
        let a = host_addrs(v4, v6, Ipv4Addr::new(100, 96, 0, 9)).unwrap();
        assert_eq!(a.ipv6, "fd00::9".parse::<Ipv6Addr>().unwrap());
        assert!(host_addrs(v4, v6, Ipv4Addr::new(100, 96, 0, 0)).is_none());
        assert!(host_addrs(v4, v6, Ipv4Addr::new(100, 96, 0, 255)).is_none());
        assert!(host_addrs(v4, v6, Ipv4Addr::new(10, 0, 0, 9)).is_none());
    }

    #[test]
    fn redacts_password() {
        assert_eq!(
            redact("postgres://hp:secret@db/hp"),
            "postgres://hp:***@db/hp"
        );
        assert_eq!(redact("sqlite:///x.db"), "sqlite:///x.db");
    }
}
