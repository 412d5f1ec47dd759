//! Policy routing for published flows: packets sourced from this node's mesh addresses (the
//! replies of a home server to public viewers) go into the TUN, whatever the main table says,
//! so they return through the exit they came in on and never leak out of the home's uplink.

use anyhow::{Context, Result, bail};
use homeport_proto::map::MeshAddrs;
use std::process::Command;

/// Routing table and rule priority used for the mesh source rule. Chosen below the main table's
/// rule (32766) and away from the ranges other tools use (Tailscale 52xx, wg-quick 51820).
pub const TABLE: u32 = 5280;

pub struct PolicyRoutes {
    installed: Vec<Vec<String>>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl PolicyRoutes {
    pub fn install(tun: &str, addrs: MeshAddrs) -> Result<PolicyRoutes> {
        let table = TABLE.to_string();
        let v4 = addrs.ipv4.to_string();
        let v6 = addrs.ipv6.to_string();
        // Remove leftovers of an unclean stop first, so re-installs never duplicate.
        for fam in ["-4", "-6"] {
            while ip(&[fam, "rule", "del", "priority", &table]).is_ok() {}
        }
        ip(&[
            "-4", "route", "replace", "default", "dev", tun, "table", &table,
        ])?;
        ip(&[
            "-4", "rule", "add", "from", &v4, "lookup", &table, "priority", &table,
        ])?;
        let mut installed = vec![vec![
            "-4".into(),
            "rule".into(),
            "del".into(),
            "priority".into(),
            table.clone(),
        ]];
        // IPv6 may be disabled on the host; the mesh still works over IPv4 then.
        match ip(&[
            "-6", "route", "replace", "default", "dev", tun, "table", &table,
        ])
        .and_then(|_| {
            ip(&[
                "-6", "rule", "add", "from", &v6, "lookup", &table, "priority", &table,
            ])
        }) {
            Ok(()) => installed.push(vec![
                "-6".into(),
                "rule".into(),
                "del".into(),
                "priority".into(),
                table.clone(),
            ]),
            Err(e) => tracing::warn!(error = %e, "IPv6 policy route not installed"),
        }
        // The reverse-path check must accept public sources arriving on the TUN.
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{tun}/rp_filter"), "0");
        Ok(PolicyRoutes { installed })
    }

    /// Removes the rules (the routes go with the TUN device).
    pub fn remove(&mut self) {
        for args in self.installed.drain(..) {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = ip(&a);
        }
    }
}
