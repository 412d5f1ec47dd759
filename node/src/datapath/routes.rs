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

/// Firewall mark of replies to published UDP flows (see [`PublishedUdp`]).
pub const REPLY_MARK: u32 = 0x5280;

/// Replies of UDP servers bound to 0.0.0.0 / [::] on a published port.
///
/// A UDP server that answers with `sendto` from a wildcard socket gets its source address from
/// the main routing table (the LAN address, out of the home's uplink), not the mesh address
/// the request arrived on, so the policy rule for the mesh address would miss it: the reply
/// would leave through the home's own internet connection and reveal the home's public
/// address. This table remembers viewers (address and port) whose datagrams arrived through
/// the TUN on a published UDP port, marks replies to exactly those viewers from that port,
/// routes marked packets into the TUN (`ip rule fwmark`) and rewrites their source to the
/// mesh address, so they return through the exit like TCP replies do. The requests are not
/// tracked (`notrack`): their conntrack entry would own the reply's tuple and force the source
/// NAT onto another port.
pub struct PublishedUdp {
    tun: String,
    addrs: MeshAddrs,
    ports: Vec<u16>,
    rules: bool,
}

const NFT_TABLE: &str = "homeport_node";

fn nft(script: &str) -> Result<()> {
    let exec = homeport_host::nft::Exec::default();
    homeport_host::nft::run(&exec, &["-f", "-"], Some(script))?;
    Ok(())
}

impl PublishedUdp {
    pub fn new(tun: &str, addrs: MeshAddrs) -> PublishedUdp {
        PublishedUdp {
            tun: tun.to_string(),
            addrs,
            ports: vec![],
            rules: false,
        }
    }

    /// Installs (or removes, for an empty list) the rules for these published UDP target ports.
    /// Idempotent: the table is replaced as a whole.
    pub fn set_ports(&mut self, mut ports: Vec<u16>) -> Result<()> {
        ports.sort_unstable();
        ports.dedup();
        if ports == self.ports {
            return Ok(());
        }
        if ports.is_empty() {
            self.remove();
            return Ok(());
        }
        let list = ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let (tun, v4, v6) = (&self.tun, self.addrs.ipv4, self.addrs.ipv6);
        let script = format!(
            "table inet {NFT_TABLE} {{}}\n\
             delete table inet {NFT_TABLE}\n\
             table inet {NFT_TABLE} {{\n\
               set viewers4 {{ type ipv4_addr . inet_service; flags dynamic,timeout; timeout 180s; }}\n\
               set viewers6 {{ type ipv6_addr . inet_service; flags dynamic,timeout; timeout 180s; }}\n\
               chain raw_pre {{\n\
                 type filter hook prerouting priority raw; policy accept;\n\
                 iifname \"{tun}\" ip daddr {v4} udp dport {{ {list} }} notrack\n\
                 iifname \"{tun}\" ip6 daddr {v6} udp dport {{ {list} }} notrack\n\
               }}\n\
               chain pre {{\n\
                 type filter hook prerouting priority mangle; policy accept;\n\
                 iifname \"{tun}\" ip daddr {v4} udp dport {{ {list} }} update @viewers4 {{ ip saddr . udp sport }}\n\
                 iifname \"{tun}\" ip6 daddr {v6} udp dport {{ {list} }} update @viewers6 {{ ip6 saddr . udp sport }}\n\
               }}\n\
               chain out {{\n\
                 type route hook output priority mangle; policy accept;\n\
                 udp sport {{ {list} }} ip daddr . udp dport @viewers4 meta mark set {REPLY_MARK}\n\
                 udp sport {{ {list} }} ip6 daddr . udp dport @viewers6 meta mark set {REPLY_MARK}\n\
               }}\n\
               chain post {{\n\
                 type nat hook postrouting priority srcnat; policy accept;\n\
                 oifname \"{tun}\" meta mark {REPLY_MARK} ip saddr != {v4} snat ip to {v4}\n\
                 oifname \"{tun}\" meta mark {REPLY_MARK} ip6 saddr != {v6} snat ip6 to {v6}\n\
               }}\n\
             }}\n"
        );
        nft(&script)?;
        if !self.rules {
            let mark = REPLY_MARK.to_string();
            let prio = (TABLE - 1).to_string();
            let table = TABLE.to_string();
            for fam in ["-4", "-6"] {
                while ip(&[fam, "rule", "del", "priority", &prio]).is_ok() {}
                if let Err(e) = ip(&[
                    fam, "rule", "add", "fwmark", &mark, "lookup", &table, "priority", &prio,
                ]) {
                    tracing::warn!(error = %e, "fwmark rule for published UDP replies");
                }
            }
            self.rules = true;
        }
        tracing::info!(ports = %list, "published UDP ports: replies routed back through the exit");
        self.ports = ports;
        Ok(())
    }

    pub fn remove(&mut self) {
        if self.ports.is_empty() && !self.rules {
            return;
        }
        let _ = nft(&format!(
            "table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n"
        ));
        if self.rules {
            let prio = (TABLE - 1).to_string();
            for fam in ["-4", "-6"] {
                let _ = ip(&[fam, "rule", "del", "priority", &prio]);
            }
        }
        self.rules = false;
        self.ports.clear();
    }
}
