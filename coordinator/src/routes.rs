//! Subnet routes and exit nodes (see `homeport_proto::routes`): the node reports what it
//! advertises, the admin approves; approved routes the node still advertises go into every map
//! that holds the node (its allowed IPs) and into its own map (what it may forward to).
//!
//! Stored in `node_routes` (migration 0004), one row per node and network.

use crate::api::{Admin, JsonBody, NodeAuth};
use crate::error::{ApiErr, ApiResult};
use crate::state::AppState;
use crate::store::{Store, StoreResult};
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use homeport_proto::NodeId;
use homeport_proto::routes::{
    MAX_ROUTES, NodeRoutes, PATH_ADMIN_ROUTES, PATH_ADMIN_ROUTES_APPROVE,
    PATH_ADMIN_ROUTES_UNAPPROVE, RouteChange, RoutesReport, overlaps, route_problem,
};
use ipnet::IpNet;
use sqlx::Row;
use std::collections::HashMap;

/// One node's stored routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub advertised: Vec<IpNet>,
    pub approved: Vec<IpNet>,
}

impl Stored {
    /// Approved and still advertised: what the maps carry.
    pub fn in_use(&self) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self
            .approved
            .iter()
            .filter(|r| self.advertised.contains(r))
            .copied()
            .collect();
        v.sort();
        v
    }
}

impl Store {
    /// Every node's routes.
    pub async fn load_routes(&self) -> StoreResult<HashMap<NodeId, Stored>> {
        let rows = sqlx::query("SELECT node_id, prefix, advertised, approved FROM node_routes")
            .fetch_all(&self.pool)
            .await?;
        let mut out: HashMap<NodeId, Stored> = HashMap::new();
        for r in rows {
            let prefix: String = r.try_get("prefix")?;
            let Ok(net) = prefix.parse::<IpNet>() else {
                tracing::warn!(%prefix, "stored route is not a network; ignored");
                continue;
            };
            let e = out.entry(NodeId(r.try_get("node_id")?)).or_default();
            if r.try_get::<i64, _>("advertised")? != 0 {
                e.advertised.push(net);
            }
            if r.try_get::<i64, _>("approved")? != 0 {
                e.approved.push(net);
            }
        }
        for s in out.values_mut() {
            s.advertised.sort();
            s.approved.sort();
        }
        Ok(out)
    }

    pub async fn routes_of(&self, id: NodeId) -> StoreResult<Stored> {
        Ok(self.load_routes().await?.remove(&id).unwrap_or_default())
    }

    /// Sets the `column` flag (advertised or approved) of `nets` to `on`; with `only`, clears it
    /// on every other row of the node first. Rows with neither flag go.
    async fn set_flag(
        &self,
        id: NodeId,
        column: &'static str,
        nets: &[IpNet],
        on: bool,
        only: bool,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let r = async {
            if only {
                sqlx::query(&format!(
                    "UPDATE node_routes SET {column} = 0 WHERE node_id = $1"
                ))
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
            }
            for n in nets {
                let r = sqlx::query(&format!(
                    "UPDATE node_routes SET {column} = $1 WHERE node_id = $2 AND prefix = $3"
                ))
                .bind(on as i64)
                .bind(id.0)
                .bind(n.to_string())
                .execute(&mut *tx)
                .await?;
                if r.rows_affected() == 0 && on {
                    sqlx::query(&format!(
                        "INSERT INTO node_routes (node_id, prefix, {column}) VALUES ($1, $2, 1)"
                    ))
                    .bind(id.0)
                    .bind(n.to_string())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            sqlx::query(
                "DELETE FROM node_routes WHERE node_id = $1 AND advertised = 0 AND approved = 0",
            )
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
            // The other replicas (PostgreSQL) reload this node, routes included.
            self.announce(&mut *tx, crate::replicas::Change::nodes(vec![id]))
                .await
        }
        .await;
        crate::store::finish(tx, r).await
    }
}

/// Stores the change, then hands the routes in use to the mesh (which tells every map that
/// holds the node, and the node itself).
async fn publish_change(st: &AppState, id: NodeId) -> ApiResult<Stored> {
    let stored = st.store.routes_of(id).await?;
    let mut mesh = st.mesh();
    if let Some(mut n) = mesh.node(id).cloned() {
        n.routes = stored.in_use();
        mesh.upsert_node(n);
    }
    Ok(stored)
}

/// `POST /api/v1/node/routes`: the calling node advertises these routes now.
pub async fn report(
    State(st): State<AppState>,
    NodeAuth(id): NodeAuth,
    JsonBody(rep): JsonBody<RoutesReport>,
) -> ApiResult<StatusCode> {
    if rep.routes.len() > MAX_ROUTES + 2 {
        return Err(ApiErr::bad_request(format!(
            "routes: {} reported; at most {MAX_ROUTES} subnet routes and the two exit routes are accepted",
            rep.routes.len()
        )));
    }
    let (v4, v6) = {
        let m = st.mesh();
        (IpNet::V4(m.prefix_v4), IpNet::V6(m.prefix_v6))
    };
    let mut routes: Vec<IpNet> = Vec::new();
    for (i, r) in rep.routes.iter().enumerate() {
        // Well-formed but unusable: 409, as for other requests that clash with what is
        // possible (the spec's pattern cannot express these).
        if let Some(p) = route_problem(r) {
            return Err(ApiErr::conflict(format!("routes[{i}]: {p}")));
        }
        if !homeport_proto::routes::is_default(r) && (overlaps(r, &v4) || overlaps(r, &v6)) {
            return Err(ApiErr::conflict(format!(
                "routes[{i}]: {r} overlaps the mesh's own addresses ({v4}, {v6}); a route is a range outside the mesh"
            )));
        }
        if !routes.contains(r) {
            routes.push(*r);
        }
    }
    let _w = st.write_lock.lock().await;
    st.store
        .set_flag(id, "advertised", &routes, true, true)
        .await?;
    let s = publish_change(&st, id).await?;
    tracing::info!(node = %id, advertised = ?routes, in_use = ?s.in_use(), "routes reported");
    Ok(StatusCode::NO_CONTENT)
}

pub fn admin_routes() -> Router<AppState> {
    Router::new()
        .route(PATH_ADMIN_ROUTES, get(list))
        .route(PATH_ADMIN_ROUTES_APPROVE, post(approve))
        .route(PATH_ADMIN_ROUTES_UNAPPROVE, post(unapprove))
}

async fn list(_: Admin, State(st): State<AppState>) -> ApiResult<Json<Vec<NodeRoutes>>> {
    let mut all = st.store.load_routes().await?;
    let nodes: Vec<(NodeId, homeport_proto::NodeName)> =
        st.mesh().nodes().map(|n| (n.id, n.name.clone())).collect();
    Ok(Json(
        nodes
            .into_iter()
            .filter_map(|(id, name)| {
                let s = all.remove(&id)?;
                Some(NodeRoutes {
                    node: name,
                    advertised: s.advertised,
                    approved: s.approved,
                })
            })
            .collect(),
    ))
}

async fn change(st: AppState, c: RouteChange, on: bool) -> ApiResult<Json<NodeRoutes>> {
    let (id, name) = {
        let m = st.mesh();
        let n = m.node_by_name(&c.node).ok_or_else(|| {
            ApiErr::not_found(format!(
                "node: no node named {:?} (see `homeport-coordinator nodes list`)",
                c.node
            ))
        })?;
        (n.id, n.name.clone())
    };
    if c.routes.is_empty() {
        return Err(ApiErr::bad_request(
            "routes: name at least one network (or `exit` for 0.0.0.0/0 and ::/0)",
        ));
    }
    let _w = st.write_lock.lock().await;
    let before = st.store.routes_of(id).await?;
    if on {
        for r in &c.routes {
            if !before.advertised.contains(r) {
                let adv: Vec<String> = before.advertised.iter().map(|r| r.to_string()).collect();
                return Err(ApiErr::conflict(format!(
                    "{name} does not advertise {r}; it advertises {} (routes come from `homeport up --advertise-routes` or `--advertise-exit-node` on that node)",
                    if adv.is_empty() {
                        "nothing".to_string()
                    } else {
                        adv.join(", ")
                    }
                )));
            }
        }
    }
    st.store
        .set_flag(id, "approved", &c.routes, on, false)
        .await?;
    let s = publish_change(&st, id).await?;
    tracing::info!(node = %name, routes = ?c.routes, approved = on, in_use = ?s.in_use(), "routes changed");
    Ok(Json(NodeRoutes {
        node: name,
        advertised: s.advertised,
        approved: s.approved,
    }))
}

async fn approve(
    _: Admin,
    State(st): State<AppState>,
    JsonBody(c): JsonBody<RouteChange>,
) -> ApiResult<Json<NodeRoutes>> {
    change(st, c, true).await
}

async fn unapprove(
    _: Admin,
    State(st): State<AppState>,
    JsonBody(c): JsonBody<RouteChange>,
) -> ApiResult<Json<NodeRoutes>> {
    change(st, c, false).await
}

/// `homeport-coordinator routes ...`
#[derive(Debug, clap::Subcommand)]
pub enum RoutesCmd {
    /// Nodes' advertised routes and which are approved (in use: approved and advertised)
    List {
        /// Print JSON (a list of NodeRoutes) instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Approve routes NODE advertises: other nodes then reach them through NODE. ROUTES are
    /// networks (192.168.1.0/24), comma-separated; `exit` approves 0.0.0.0/0 and ::/0 (NODE
    /// becomes an exit node nodes may choose with `homeport up --exit-node NODE`)
    Approve {
        node: String,
        #[arg(value_name = "ROUTES")]
        routes: String,
    },
    /// Withdraw approvals: every node drops the routes within a second or two
    Unapprove {
        node: String,
        #[arg(value_name = "ROUTES")]
        routes: String,
    },
}

/// Parses the CLI's ROUTES: networks and the word `exit`, comma-separated.
pub fn parse_cli_routes(s: &str) -> anyhow::Result<Vec<IpNet>> {
    let mut out = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if p == "exit" {
            out.extend(homeport_proto::routes::exit_routes());
            continue;
        }
        let n: IpNet = p.parse().map_err(|_| {
            anyhow::anyhow!("{p:?}: expected a network like 192.168.1.0/24, or `exit`")
        })?;
        if let Some(why) = route_problem(&n) {
            anyhow::bail!("{why}");
        }
        out.push(n);
    }
    if out.is_empty() {
        anyhow::bail!("no routes given: expected networks like 192.168.1.0/24, or `exit`");
    }
    Ok(out)
}

fn nets(v: &[IpNet]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn routes_table(v: &[NodeRoutes]) -> String {
    let rows = v
        .iter()
        .map(|r| {
            let in_use: Vec<IpNet> = r
                .approved
                .iter()
                .filter(|n| r.advertised.contains(n))
                .copied()
                .collect();
            let pending: Vec<IpNet> = r
                .advertised
                .iter()
                .filter(|n| !r.approved.contains(n))
                .copied()
                .collect();
            vec![
                r.node.to_string(),
                nets(&r.advertised),
                nets(&in_use),
                nets(&pending),
            ]
        })
        .collect();
    crate::cli::table(&["NODE", "ADVERTISED", "IN USE", "AWAITING APPROVAL"], rows)
}

pub async fn run_cli(c: &crate::client::AdminClient, cmd: RoutesCmd) -> anyhow::Result<()> {
    use reqwest::Method;
    match cmd {
        RoutesCmd::List { json } => {
            let v: Vec<NodeRoutes> = c.json(Method::GET, PATH_ADMIN_ROUTES, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", routes_table(&v));
            }
        }
        RoutesCmd::Approve { node, routes } => {
            change_cli(c, PATH_ADMIN_ROUTES_APPROVE, node, &routes).await?
        }
        RoutesCmd::Unapprove { node, routes } => {
            change_cli(c, PATH_ADMIN_ROUTES_UNAPPROVE, node, &routes).await?
        }
    }
    Ok(())
}

async fn change_cli(
    c: &crate::client::AdminClient,
    path: &str,
    node: String,
    routes: &str,
) -> anyhow::Result<()> {
    let body = RouteChange {
        node,
        routes: parse_cli_routes(routes)?,
    };
    let r: NodeRoutes = c
        .json(
            reqwest::Method::POST,
            path,
            Some(&serde_json::to_value(&body)?),
        )
        .await?;
    print!("{}", routes_table(std::slice::from_ref(&r)));
    Ok(())
}
