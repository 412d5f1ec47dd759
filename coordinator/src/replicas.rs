//! High availability: several coordinator replicas share one PostgreSQL database, the only thing
//! they share. Each replica has its own URL, TLS pin, STUN server and relay, registers itself in
//! the `replicas` table with a heartbeat, and advertises every live replica (URL, pin, relay) in
//! the maps it sends, so nodes can move to another replica when theirs dies.
//!
//! Every change a replica stores is announced in the same transaction (`NOTIFY`, see
//! [`crate::store::Store::announce`]) with a [`Change`] naming what to reload; the other
//! replicas LISTEN, reload exactly that from the database and apply it to their mesh through
//! the same methods their own API uses, so their streams get the same deltas. If the listening
//! connection drops, the replica reconnects and reloads everything (a notification sent
//! meanwhile is lost). With SQLite there is one coordinator and none of this runs.

use crate::mesh::NodeRec;
use crate::state::AppState;
use crate::store::{StoreResult, now};
use homeport_proto::NodeId;
use homeport_proto::map::{CoordinatorInfo, RelayInfo};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The NOTIFY channel replicas announce changes on.
pub const CHANNEL: &str = "homeport_changes";
/// How often a replica renews its heartbeat and rereads the live replicas.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// A replica silent this long (three missed heartbeats) is gone: its relay leaves the maps and
/// its nodes that did not move to another replica are offline.
pub const DEAD_AFTER_SECS: i64 = 6;
/// Wait before reconnecting a listener whose connection failed.
const RELISTEN_AFTER: Duration = Duration::from_secs(1);

/// What another replica changed; the receiver reloads it from the database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The announcing replica (its URL): it skips its own announcements.
    #[serde(default)]
    pub from: String,
    /// Nodes registered, changed, removed, or whose stream opened or closed somewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeId>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub publish: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub policy: bool,
    /// A replica joined or left.
    #[serde(default, skip_serializing_if = "is_false")]
    pub replicas: bool,
    /// Reload everything.
    #[serde(default, skip_serializing_if = "is_false")]
    pub all: bool,
    /// "Probe me now" from the first node to the second, whose stream this replica may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<(NodeId, NodeId)>,
}

fn is_false(b: &bool) -> bool {
    !b
}

impl Change {
    pub fn nodes(ids: Vec<NodeId>) -> Change {
        Change {
            nodes: ids,
            ..Default::default()
        }
    }
    pub fn publish() -> Change {
        Change {
            publish: true,
            ..Default::default()
        }
    }
    /// A replica joined or left.
    pub fn replica_set() -> Change {
        Change {
            replicas: true,
            ..Default::default()
        }
    }
    pub fn everything() -> Change {
        Change {
            all: true,
            ..Default::default()
        }
    }
}

/// This replica as the others and the nodes see it.
#[derive(Debug, Clone)]
pub struct Replica {
    pub url: String,
    pub pin: String,
    pub relay: RelayInfo,
}

/// Joins the replicas sharing the database (before serving, so the first maps name them all).
pub async fn run_start(st: &AppState, me: &Replica) -> anyhow::Result<()> {
    let relay = serde_json::to_string(&me.relay)?;
    // Two replicas under one URL would take each other's announcements for their own. A row
    // heard from just now is either that, or this replica before a crash and quick restart:
    // wait one heartbeat and see whether it is still being renewed.
    if let Some((beat, silent)) = st.store.replica_heartbeat().await?
        && silent < DEAD_AFTER_SECS
    {
        tokio::time::sleep(2 * HEARTBEAT_EVERY + Duration::from_millis(500)).await;
        if st
            .store
            .replica_heartbeat()
            .await?
            .is_some_and(|(b, _)| b != beat)
        {
            anyhow::bail!(
                "another coordinator replica is running as {} on this database; give each replica its own --public-url",
                me.url
            );
        }
    }
    st.store.register_replica(&me.pin, &relay, now()).await?;
    refresh_replicas(st).await?;
    tracing::info!(url = %me.url, "joined the coordinator replicas sharing the database");
    Ok(())
}

/// After [`run_start`]: keeps the heartbeat and the listener running until `shutdown`; on
/// shutdown leaves the set so the other replicas stop advertising this one at once.
pub async fn run(
    st: AppState,
    me: Replica,
    database_url: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let relay = serde_json::to_string(&me.relay)?;
    let listener = tokio::spawn(listen(st.clone(), database_url, shutdown.clone()));
    let mut every = tokio::time::interval(HEARTBEAT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        if let Err(e) = heartbeat(&st, &me, &relay).await {
            tracing::warn!(error = %e, "replica heartbeat failed");
        }
    }
    let _ = listener.await;
    if let Err(e) = st.store.unregister_replica().await {
        tracing::warn!(error = %e, "cannot leave the set of replicas");
    }
    Ok(())
}

async fn heartbeat(st: &AppState, me: &Replica, relay: &str) -> StoreResult<()> {
    let (reaped, present) = st.store.heartbeat(DEAD_AFTER_SECS).await?;
    if !present {
        // The others took this replica for dead (it was paused or cut off): join again and
        // tell them which streams it still holds.
        tracing::warn!("this replica was taken for dead by the others; joining again");
        st.store.rejoin_replica(&me.pin, relay, now()).await?;
        let held: Vec<(NodeId, bool)> = st
            .mesh()
            .connected()
            .into_iter()
            .map(|id| (id, true))
            .collect();
        let _w = st.write_lock.lock().await;
        st.store.set_presence(&held).await?;
    }
    // A replica that went silent leaves the live set here before any replica reaps it.
    let changed = refresh_replicas(st).await?;
    if reaped || changed {
        apply(st, Change::everything()).await?;
    }
    Ok(())
}

/// Listens for the other replicas' changes; reloads everything on every (re)connection.
async fn listen(st: AppState, database_url: String, shutdown: CancellationToken) {
    loop {
        let l = async {
            let mut l = sqlx::postgres::PgListener::connect(&database_url).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut l = tokio::select! {
            r = l => match r {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for the other replicas' changes; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(RELISTEN_AFTER) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
            },
            _ = shutdown.cancelled() => return,
        };
        // Whatever changed while nobody listened.
        if let Err(e) = apply(&st, Change::everything()).await {
            tracing::warn!(error = %e, "cannot reload the mesh from the database");
        }
        loop {
            let n = tokio::select! {
                n = l.try_recv() => n,
                _ = shutdown.cancelled() => return,
            };
            let n = match n {
                Ok(Some(n)) => n,
                Ok(None) => {
                    tracing::warn!(
                        "lost the connection that listens for the other replicas' changes; reconnecting"
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listening for the other replicas' changes failed; reconnecting");
                    break;
                }
            };
            let c: Change = match serde_json::from_str(n.payload()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "ignored an unreadable change announcement");
                    continue;
                }
            };
            if c.from == st.store.origin {
                continue;
            }
            if let Err(e) = apply(&st, c).await {
                // The next reload (reconnection, replica set change) catches up.
                tracing::warn!(error = %e, "cannot apply another replica's change");
            }
        }
    }
}

/// Reloads what `c` names from the database into the mesh.
pub async fn apply(st: &AppState, c: Change) -> StoreResult<()> {
    if let Some((from, peer)) = c.probe {
        st.mesh().probe(from, peer);
    }
    // Under the write lock: a change of this replica's own cannot interleave between the read
    // and the apply and be overwritten by an older read.
    let _w = st.write_lock.lock().await;
    if c.all || c.replicas {
        let changed = refresh_replicas(st).await?;
        if changed && !c.all {
            // A replica came or went: who is online elsewhere may differ for any node.
            return reload_all(st).await;
        }
    }
    if c.all {
        return reload_all(st).await;
    }
    if !c.nodes.is_empty() {
        let stored = st.store.nodes_by_id(&c.nodes).await?;
        apply_nodes(st, &c.nodes, stored);
    }
    if c.publish {
        reload_publish(st).await?;
    }
    if c.policy {
        let p = st.store.policy().await?;
        st.mesh().update_policy(p);
    }
    Ok(())
}

async fn reload_all(st: &AppState) -> StoreResult<()> {
    let stored = st.store.nodes_with_replica().await?;
    let mut ids: Vec<NodeId> = st.mesh().nodes().map(|n| n.id).collect();
    ids.extend(stored.iter().map(|(n, _)| n.id));
    apply_nodes(st, &ids, stored);
    let p = st.store.policy().await?;
    st.mesh().update_policy(p);
    reload_publish(st).await
}

async fn reload_publish(st: &AppState) -> StoreResult<()> {
    let nodes: Vec<NodeRec> = st.mesh().nodes().cloned().collect();
    let rules = st.store.load_publish(&nodes).await?;
    st.mesh().set_publish_rules(rules);
    Ok(())
}

/// Applies the stored state of `ids`: `stored` holds those that exist, the rest were removed.
fn apply_nodes(st: &AppState, ids: &[NodeId], stored: Vec<(NodeRec, Option<String>)>) {
    let live = st
        .live_replicas
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let me = st.store.origin.as_str();
    let present: HashSet<NodeId> = stored.iter().map(|(n, _)| n.id).collect();
    let mut mesh = st.mesh();
    for (rec, replica) in stored {
        let remote = replica.is_some_and(|r| r != me && live.contains(&r));
        mesh.apply_stored(rec, remote);
    }
    for id in ids {
        match mesh.node(*id).map(|n| n.via.is_some()) {
            Some(true) if !present.contains(id) => {
                mesh.remove_device(*id);
            }
            Some(false) if !present.contains(id) => {
                mesh.remove_node(*id);
            }
            _ => {}
        }
    }
}

/// Rereads the live replicas into the maps. True when the set changed.
async fn refresh_replicas(st: &AppState) -> StoreResult<bool> {
    let rows = st.store.replicas(DEAD_AFTER_SECS).await?;
    let mut coordinators = Vec::with_capacity(rows.len());
    let mut relays = Vec::with_capacity(rows.len());
    let mut live = HashSet::new();
    for (url, pin, relay) in rows {
        match serde_json::from_str::<RelayInfo>(&relay) {
            Ok(r) => relays.push(r),
            Err(e) => tracing::warn!(%url, error = %e, "a replica's stored relay is unreadable"),
        }
        live.insert(url.clone());
        coordinators.push(CoordinatorInfo { url, pin });
    }
    let changed = {
        let mut l = st.live_replicas.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *l != live;
        *l = live;
        changed
    };
    st.mesh().set_replicas(coordinators, relays);
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_compact_and_reads_back() {
        let mut c = Change::nodes(vec![NodeId(3), NodeId(4)]);
        c.from = "https://198.51.100.10:8443".into();
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(s, r#"{"from":"https://198.51.100.10:8443","nodes":[3,4]}"#);
        assert_eq!(serde_json::from_str::<Change>(&s).unwrap(), c);
        // 500 node ids (what one announcement carries at most) fit NOTIFY's 8000 bytes.
        let big = Change::nodes((1_000_000_000..1_000_000_500).map(NodeId).collect());
        assert!(serde_json::to_string(&big).unwrap().len() < 7000);
    }
}
