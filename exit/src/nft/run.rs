//! Applying a batch and reading the table back: the `nft`/`conntrack` runner, sets, bans, deny
//! counts, DNAT targets and `homeport-exit cleanup`.

use super::*;

use homeport_host::nft::run as run_nft;
pub use homeport_host::nft::{Exec, NftError};

/// Applies a batch as one transaction (`nft -j -f -`). The same as
/// `nftables::helper::apply_ruleset`, but nft's error message is kept for the log.
pub fn apply(exec: &Exec, batch: &impl serde::Serialize) -> Result<(), NftError> {
    let json = serde_json::to_string(batch).map_err(|e| NftError::Json {
        what: "batch".into(),
        err: e.to_string(),
    })?;
    run_nft(exec, &["-j", "-f", "-"], Some(&json)).map(|_| ())
}

/// Removes homeport's table (a no-op when it does not exist).
pub fn remove(exec: &Exec) -> Result<(), NftError> {
    apply(exec, &removal())
}

/// `nft -j list ...` as parsed JSON: the `nftables` array.
pub fn list(exec: &Exec, what: &[&str]) -> Result<Vec<serde_json::Value>, NftError> {
    let mut args = vec!["-j", "list"];
    args.extend_from_slice(what);
    let out = run_nft(exec, &args, None)?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| NftError::Json {
        what: what.join(" "),
        err: e.to_string(),
    })?;
    match v.get("nftables").and_then(|a| a.as_array()) {
        Some(a) => Ok(a.clone()),
        None => Err(NftError::Json {
            what: what.join(" "),
            err: "no nftables array".into(),
        }),
    }
}

/// True when homeport's table exists.
pub fn table_exists(exec: &Exec) -> Result<bool, NftError> {
    let tables = list(exec, &["tables", "inet"])?;
    Ok(tables
        .iter()
        .any(|o| o.pointer("/table/name").and_then(|n| n.as_str()) == Some(TABLE)))
}

/// One element of a set or meter as nft lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElem {
    pub addr: IpAddr,
    pub expires_secs: Option<u32>,
    pub packets: Option<u64>,
}

pub(super) fn parse_elems(obj: &serde_json::Value) -> Vec<SetElem> {
    let Some(elems) = obj.get("elem").and_then(|e| e.as_array()) else {
        return Vec::new();
    };
    elems
        .iter()
        .filter_map(|e| {
            // A bare value, or {"elem": {"val": .., "expires": .., "counter": {..}}}.
            let (val, inner) = match e.get("elem") {
                Some(inner) => (inner.get("val")?, Some(inner)),
                None => (e, None),
            };
            let addr: IpAddr = val.as_str()?.parse().ok()?;
            let expires_secs = inner
                .and_then(|i| i.get("expires"))
                .and_then(|x| x.as_u64())
                .map(|x| x as u32);
            let packets = inner
                .and_then(|i| i.pointer("/counter/packets"))
                .and_then(|x| x.as_u64());
            Some(SetElem {
                addr,
                expires_secs,
                packets,
            })
        })
        .collect()
}

/// The elements of one of homeport's sets (`set`) or meters (`meter`).
pub fn elements(exec: &Exec, kind: &str, name: &str) -> Result<Vec<SetElem>, NftError> {
    let objs = list(exec, &[kind, "inet", TABLE, name])?;
    Ok(objs
        .iter()
        .filter_map(|o| o.get(kind))
        .flat_map(parse_elems)
        .collect())
}

/// The current bans with the time they have left and the port that started them (empty when
/// the table does not exist yet).
pub fn current_bans(exec: &Exec) -> Result<Vec<Ban>, NftError> {
    if !table_exists(exec)? {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for v6 in [false, true] {
        // A table from an older version may lack `banport`: no ports then.
        let ports = list(
            exec,
            &["set", "inet", TABLE, &format!("banport{}", fam(v6))],
        )
        .map(|objs| {
            objs.iter()
                .filter_map(|o| o.get("set"))
                .flat_map(parse_addr_ports)
                .collect::<std::collections::HashMap<IpAddr, u16>>()
        })
        .unwrap_or_default();
        for e in elements(exec, "set", &format!("banned{}", fam(v6)))? {
            // nft truncates to whole seconds; a listed element still has some time left.
            out.push(Ban {
                addr: e.addr,
                secs_left: e.expires_secs.unwrap_or(0).max(1),
                port: ports.get(&e.addr).copied(),
            });
        }
    }
    Ok(out)
}

/// The `address . port` elements of a set as nft lists them.
pub(super) fn parse_addr_ports(obj: &serde_json::Value) -> Vec<(IpAddr, u16)> {
    let Some(elems) = obj.get("elem").and_then(|e| e.as_array()) else {
        return Vec::new();
    };
    elems
        .iter()
        .filter_map(|e| {
            let val = e.pointer("/elem/val").unwrap_or(e);
            let c = val.get("concat")?.as_array()?;
            let addr: IpAddr = c.first()?.as_str()?.parse().ok()?;
            let port = u16::try_from(c.get(1)?.as_u64()?).ok()?;
            Some((addr, port))
        })
        .collect()
}

/// Per-source drop counts of the deny meters: (reason, rule id, source, packets so far).
pub fn deny_counts(exec: &Exec) -> Result<Vec<(DenyReason, i64, IpAddr, u64)>, NftError> {
    let mut out = Vec::new();
    let meters = list(exec, &["meters"])?;
    for m in meters.iter().filter_map(|o| o.get("meter")) {
        if m.get("table").and_then(|t| t.as_str()) != Some(TABLE)
            || m.get("family").and_then(|f| f.as_str()) != Some("inet")
        {
            continue;
        }
        let Some(name) = m.get("name").and_then(|n| n.as_str()) else {
            continue;
        };
        let Some((reason, id)) = parse_deny_meter_name(name) else {
            continue;
        };
        for e in elements(exec, "meter", name)? {
            out.push((reason, id, e.addr, e.packets.unwrap_or(0)));
        }
    }
    Ok(out)
}

/// The DNAT targets (mesh addresses) of homeport's table as installed.
pub fn dnat_targets(exec: &Exec) -> Result<Vec<IpAddr>, NftError> {
    if !table_exists(exec)? {
        return Ok(Vec::new());
    }
    let mut out: Vec<IpAddr> = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<IpAddr>) {
        match v {
            serde_json::Value::Object(o) => {
                if let Some(a) = o
                    .get("dnat")
                    .and_then(|d| d.get("addr"))
                    .and_then(|a| a.as_str())
                    .and_then(|a| a.parse().ok())
                {
                    out.push(a);
                }
                o.values().for_each(|x| walk(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    for o in list(exec, &["table", "inet", TABLE])? {
        walk(&o, &mut out);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// What `homeport-exit cleanup` does after an exit that did not stop cleanly (systemd runs it
/// as `ExecStopPost`, also after SIGKILL): restores the sysctls saved in `state_dir`, deletes the
/// conntrack entries of flows to the table's DNAT targets, and removes the table. Returns what
/// it did, one line each.
pub fn cleanup(
    exec: &Exec,
    proc_sys: &std::path::Path,
    state_dir: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    let mut did = Vec::new();
    if restore_sysctls(proc_sys, state_dir)? {
        did.push(format!(
            "restored the sysctls saved in {}",
            state_dir.join(SYSCTL_BEFORE_FILE).display()
        ));
    }
    let targets = dnat_targets(exec)?;
    if table_exists(exec)? {
        remove(exec)?;
        did.push(format!("removed table inet {TABLE}"));
    }
    for t in targets {
        // Exit status 1 just means "no such flows".
        let _ = exec
            .command("conntrack")
            .args(["-D", "--reply-src", &t.to_string()])
            .output();
        did.push(format!("deleted the conntrack entries of flows to {t}"));
    }
    Ok(did)
}
