//! The pure part of `homeport plex setup` and `plex check`: which Plex preferences to change
//! for what the mesh publishes, and what Plex's sessions say about the path viewers take. No IO:
//! the shell in [`super`] fetches Plex's preferences and sessions and the daemon's view, and
//! prints what these functions return.

use crate::control::{Published, PublishedPort};
use homeport_proto::addr::is_public;
use homeport_proto::publish::PublishProto;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Plex's preference ids, as `GET /:/prefs` lists them (`Setting id=…`) and `PUT /:/prefs?id=value`
/// sets them. Sources: python-plexapi `plexapi/settings.py` (`Settings.key = '/:/prefs'`,
/// `Settings.save()` sends `PUT /:/prefs?<id>=<value>&…`, booleans as "true"/"false"), and the
/// ids of Plex Web's Settings → Network and Remote Access pages, as they appear in
/// Preferences.xml and in the community OpenAPI spec (github.com/LukeHagar/plex-api-spec).
///
/// "Custom server access URLs": comma-separated URLs plex.tv hands to clients.
pub const CUSTOM_URLS: &str = "customConnections";
/// "Enable Relay": clients that reach none of the server's URLs fall back to Plex's relay
/// (capped at about 1–2 Mbit/s).
pub const RELAY: &str = "RelayEnabled";
/// "Remote Access" on/off (publish the server to plex.tv with UPnP/NAT-PMP port mapping).
pub const REMOTE_ACCESS: &str = "PublishServerOnPlexOnlineKey";
/// "Manually specify public port" of Remote Access.
pub const MANUAL_PORT: &str = "ManualPortMappingMode";
/// "LAN Networks": comma-separated networks Plex counts as local (bandwidth rules, and which
/// sessions are "lan"). Not `allowedNetworks` ("allowed without auth"), which we never touch.
pub const LAN_NETWORKS: &str = "LanNetworksBandwidth";

/// Preferences as id → value, every value as text ("true"/"false" for booleans).
pub type Prefs = BTreeMap<String, String>;

/// A boolean preference's value as Plex may write it: true, 1 (the API) or "1" (Preferences.xml).
pub fn is_true(v: &str) -> bool {
    matches!(v.trim(), "1" | "true" | "True")
}

#[derive(Debug, Clone, Default)]
pub struct SetupOptions {
    /// The Plex server's own port (the publish rule's target port).
    pub plex_port: u16,
    pub keep_relay: bool,
    pub keep_port_mapping: bool,
    pub mesh_as_lan: bool,
    pub replace_urls: bool,
}

/// One preference to change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub name: String,
    pub before: String,
    pub after: String,
    /// Why, in a few words, for the plan printed before asking.
    pub why: String,
}

/// The rules that carry a public TCP port of an exit to `plex_port` on this node.
pub fn plex_rules(p: &Published, plex_port: u16) -> Vec<&PublishedPort> {
    p.rules
        .iter()
        .filter(|r| r.target_port == plex_port && r.proto == PublishProto::Tcp)
        .collect()
}

/// `http://IP:PORT` with brackets for IPv6.
pub fn url_for(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("http://{a}:{port}"),
        IpAddr::V6(a) => format!("http://[{a}]:{port}"),
    }
}

/// The custom URLs that point at the exits publishing `plex_port`: every exit, IPv4 and IPv6.
pub fn exit_urls(p: &Published, plex_port: u16) -> Result<Vec<String>, String> {
    let rules = plex_rules(p, plex_port);
    if rules.is_empty() {
        let have: Vec<String> = p
            .rules
            .iter()
            .map(|r| {
                format!(
                    "{}:{}/{} -> {}",
                    r.exit,
                    r.port,
                    r.proto.as_str(),
                    r.target_port
                )
            })
            .collect();
        return Err(format!(
            "no publish rule carries a TCP port to {}:{plex_port} (rules for this node: {}); on the VPS: `homeport-coordinator publish add --exit EXIT --port {plex_port} --to {}:{plex_port}`",
            p.me,
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            },
            p.me
        ));
    }
    let mut urls = Vec::new();
    for r in &rules {
        if r.exit_public.is_empty() {
            return Err(format!(
                "exit {} has reported no public address to the coordinator (online: {}); `homeport status` shows whether it is connected",
                r.exit, r.exit_online
            ));
        }
        for ip in &r.exit_public {
            let u = url_for(*ip, r.port);
            if !urls.contains(&u) {
                urls.push(u);
            }
        }
    }
    Ok(urls)
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// What `homeport plex setup` changes, given Plex's current preferences. Only preferences whose
/// value differs are listed; an empty plan means Plex is set up already.
pub fn plan(current: &Prefs, p: &Published, o: &SetupOptions) -> Result<Vec<Change>, String> {
    let want = exit_urls(p, o.plex_port)?;
    let mut changes = Vec::new();
    let mut need = |name: &str, after: String, why: &str| -> Result<(), String> {
        let Some(before) = current.get(name) else {
            return Err(format!(
                "Plex does not list the preference {name:?} in GET /:/prefs; is {name} a Plex Media Server (too old, or something else on this port)?"
            ));
        };
        let same = match (before.as_str(), after.as_str()) {
            (b, "true" | "false") => is_true(b) == is_true(&after),
            (b, a) => b == a,
        };
        if !same {
            changes.push(Change {
                name: name.to_string(),
                before: before.clone(),
                after,
                why: why.to_string(),
            });
        }
        Ok(())
    };
    let have = split_list(current.get(CUSTOM_URLS).map(String::as_str).unwrap_or(""));
    let urls = if o.replace_urls {
        want.clone()
    } else {
        let mut u = have.clone();
        u.extend(want.iter().filter(|w| !have.contains(w)).cloned());
        u
    };
    need(
        CUSTOM_URLS,
        urls.join(","),
        "plex.tv gives clients the exit's address and port",
    )?;
    if !o.keep_port_mapping {
        need(
            REMOTE_ACCESS,
            "false".into(),
            "Remote Access off: no UPnP/NAT-PMP mapping on the home router",
        )?;
        need(
            MANUAL_PORT,
            "false".into(),
            "no manual public port: the port is in the custom URL",
        )?;
    }
    if !o.keep_relay {
        need(
            RELAY,
            "false".into(),
            "no silent fallback to Plex's 1–2 Mbit/s relay",
        )?;
    }
    if o.mesh_as_lan {
        let mut nets = split_list(current.get(LAN_NETWORKS).map(String::as_str).unwrap_or(""));
        let mesh: Vec<String> = [
            p.prefix_v4.map(|n| n.to_string()),
            p.prefix_v6.map(|n| n.to_string()),
        ]
        .into_iter()
        .flatten()
        .collect();
        if mesh.is_empty() {
            return Err(
                "--mesh-as-lan: the daemon has no map yet, so the mesh ranges are unknown".into(),
            );
        }
        for m in mesh {
            if !nets.contains(&m) {
                nets.push(m);
            }
        }
        need(
            LAN_NETWORKS,
            nets.join(","),
            "mesh devices count as local; viewers through the exit stay remote",
        )?;
    }
    Ok(changes)
}

/// What `--undo` needs: the values before the first `setup` that changed them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The Plex server they belong to.
    pub url: String,
    pub previous: Prefs,
}

impl Saved {
    /// Adds the before-values of `changes`, keeping values saved by an earlier run (so that undo
    /// returns to how Plex was before homeport first touched it).
    pub fn remember(&mut self, url: &str, changes: &[Change]) {
        self.url = url.to_string();
        for c in changes {
            self.previous
                .entry(c.name.clone())
                .or_insert_with(|| c.before.clone());
        }
    }

    /// The changes that restore the saved values, given what Plex has now.
    pub fn restore(&self, current: &Prefs) -> Vec<Change> {
        self.previous
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(*v))
            .map(|(k, v)| Change {
                name: k.clone(),
                before: current.get(k).cloned().unwrap_or_default(),
                after: v.clone(),
                why: "saved before `homeport plex setup`".into(),
            })
            .collect()
    }
}

/// A playing session, as `GET /status/sessions` lists it (`MediaContainer.Metadata[]`: `User.title`,
/// `Player.address`, `Player.local`, `Player.relayed`, `Session.location`). Player.address is the
/// address Plex saw the client connect from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub user: String,
    pub title: String,
    pub player: String,
    pub address: String,
    /// Plex counts the client as on the LAN.
    pub local: bool,
    /// The client plays through Plex's relay.
    pub relayed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Problem,
}

/// One line of `plex check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub level: Level,
    /// What it is about: "session bob@192.0.2.50", "custom URLs", "port 198.51.100.10:32400".
    pub subject: String,
    pub message: String,
}

impl Finding {
    pub fn new(level: Level, subject: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            level,
            subject: subject.into(),
            message: message.into(),
        }
    }
}

/// Checks Plex's preferences and sessions against what the mesh publishes and the viewers the
/// exits forwarded (the live published flows of this node).
pub fn check(prefs: &Prefs, sessions: &[Session], p: &Published, plex_port: u16) -> Vec<Finding> {
    let mut out = Vec::new();
    let rules = plex_rules(p, plex_port);
    match exit_urls(p, plex_port) {
        Err(e) => out.push(Finding::new(Level::Problem, "publish rule", e)),
        Ok(want) => {
            let have = split_list(prefs.get(CUSTOM_URLS).map(String::as_str).unwrap_or(""));
            let missing: Vec<&String> = want.iter().filter(|w| !have.contains(w)).collect();
            if missing.is_empty() {
                out.push(Finding::new(
                    Level::Ok,
                    "custom URLs",
                    format!("name the exit: {}", want.join(", ")),
                ));
            } else {
                out.push(Finding::new(
                    Level::Problem,
                    "custom URLs",
                    format!(
                        "missing {} (Plex has {:?}): clients are not told the exit's address; run `homeport plex setup`",
                        missing
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        prefs.get(CUSTOM_URLS).cloned().unwrap_or_default()
                    ),
                ));
            }
        }
    }
    if prefs.get(RELAY).is_some_and(|v| is_true(v)) {
        out.push(Finding::new(
            Level::Warn,
            "relay",
            "Plex's relay is on: a client that cannot reach the exit silently plays through it at 1–2 Mbit/s (`homeport plex setup` turns it off)",
        ));
    }
    if prefs.get(REMOTE_ACCESS).is_some_and(|v| is_true(v)) {
        out.push(Finding::new(
            Level::Warn,
            "remote access",
            "Plex's Remote Access is on: it maps a port on the home router (UPnP/NAT-PMP) and may advertise the home's own address next to the exit's",
        ));
    }
    for s in sessions {
        out.push(classify(s, p, &rules));
    }
    out
}

fn classify(s: &Session, p: &Published, rules: &[&PublishedPort]) -> Finding {
    let subject = format!("session {}@{} ({})", s.user, s.address, s.player);
    let ip: IpAddr = match s.address.trim().parse() {
        Ok(ip) => ip,
        Err(_) => {
            return Finding::new(
                Level::Problem,
                subject,
                format!(
                    "Plex reports the address {:?}, not an IP address",
                    s.address
                ),
            );
        }
    };
    // An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 viewer on a dual-stack socket.
    let ip = match ip {
        IpAddr::V6(v) => v.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    if let Some(r) = rules.iter().find(|r| r.exit_public.contains(&ip)) {
        return Finding::new(
            Level::Problem,
            subject,
            format!(
                "the address of exit {} itself: something on the VPS (a reverse proxy, a docker port, masquerading) connects to Plex in the viewer's place; homeport's exit forwards with the viewer's own address",
                r.exit
            ),
        );
    }
    if let Some(r) = p.rules.iter().find(|r| r.exit_mesh.contains(ip)) {
        return Finding::new(
            Level::Problem,
            subject,
            format!(
                "the mesh address of exit {}: the exit masquerades (SNAT) published connections, or a proxy on the VPS connects over the mesh; the viewer's address is lost",
                r.exit
            ),
        );
    }
    let in_mesh = match ip {
        IpAddr::V4(a) => p.prefix_v4.is_some_and(|n| n.contains(&a)),
        IpAddr::V6(a) => p.prefix_v6.is_some_and(|n| n.contains(&a)),
    };
    if in_mesh {
        if s.local {
            return Finding::new(
                Level::Ok,
                subject,
                "a mesh device, counted as local (the mesh is in LAN Networks)",
            );
        }
        return Finding::new(
            Level::Problem,
            subject,
            "a mesh address Plex counts as remote: a device on the mesh connected to Plex's mesh address, or a proxy on another mesh node forwards to Plex; if it is your own device, `homeport plex setup --mesh-as-lan` makes the mesh local",
        );
    }
    if s.relayed {
        return Finding::new(
            Level::Problem,
            subject,
            "playing through Plex's relay: this client did not reach the exit's URL (check `plex check`'s port line and the custom URLs)",
        );
    }
    if !is_public(ip) {
        if s.local {
            return Finding::new(Level::Ok, subject, "a local viewer on the LAN");
        }
        return Finding::new(
            Level::Problem,
            subject,
            "a private address Plex counts as remote: a proxy or NAT at home sits between the viewer and Plex (docker bridge networking shows every client as its gateway, e.g. 172.17.0.1), or this LAN is missing from LAN Networks",
        );
    }
    match p.flows.iter().find(|f| f.remote.ip() == ip) {
        Some(f) => Finding::new(
            Level::Ok,
            subject,
            format!(
                "a real viewer address, forwarded by exit {} ({} {} to port {})",
                f.exit, f.proto, f.remote, f.local_port
            ),
        ),
        None => Finding::new(
            Level::Problem,
            subject,
            "a public address that no exit forwarded to this node: the viewer reached Plex another way (Remote Access through the home router, or straight to the home over IPv6; see docs/plex.md, \"Keep Plex off the public internet\")",
        ),
    }
}

/// What the daemon would say in a test: exit "vps" (at `exit_public`) publishes `port` to this
/// node "home", and forwarded a viewer from 192.0.2.50.
#[cfg(test)]
pub(crate) fn fixture(port: u16, exit_public: Vec<IpAddr>) -> Published {
    use crate::control::LiveFlow;
    use homeport_proto::map::MeshAddrs;
    Published {
        me: "home".parse().unwrap(),
        addrs: MeshAddrs {
            ipv4: "100.96.0.2".parse().unwrap(),
            ipv6: "fd7a:115c:a1e0::2".parse().unwrap(),
        },
        prefix_v4: Some("100.96.0.0/16".parse().unwrap()),
        prefix_v6: Some("fd7a:115c:a1e0::/64".parse().unwrap()),
        rules: vec![PublishedPort {
            rule: 1,
            exit: "vps".parse().unwrap(),
            proto: PublishProto::Tcp,
            port,
            target_port: port,
            exit_public,
            exit_mesh: MeshAddrs {
                ipv4: "100.96.0.1".parse().unwrap(),
                ipv6: "fd7a:115c:a1e0::1".parse().unwrap(),
            },
            exit_online: true,
            allow: vec![],
        }],
        flows: vec![LiveFlow {
            proto: "tcp".into(),
            remote: "192.0.2.50:40000".parse().unwrap(),
            local_port: port,
            exit: "vps".into(),
            confirmed: true,
            idle_secs: 1,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published() -> Published {
        fixture(
            32400,
            vec![
                "198.51.100.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
            ],
        )
    }

    fn prefs(pairs: &[(&str, &str)]) -> Prefs {
        let mut p: Prefs = [
            (CUSTOM_URLS, ""),
            (RELAY, "true"),
            (REMOTE_ACCESS, "true"),
            (MANUAL_PORT, "true"),
            (LAN_NETWORKS, "10.10.1.0/24"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in pairs {
            p.insert(k.to_string(), v.to_string());
        }
        p
    }

    fn session(addr: &str, local: bool) -> Session {
        Session {
            user: "bob".into(),
            title: "film".into(),
            player: "tv".into(),
            address: addr.into(),
            local,
            relayed: false,
        }
    }

    #[test]
    fn setup_adds_both_exit_urls_keeps_the_users_and_turns_mapping_and_relay_off() {
        let cur = prefs(&[(CUSTOM_URLS, "https://a.example:443")]);
        let o = SetupOptions {
            plex_port: 32400,
            ..Default::default()
        };
        let c = plan(&cur, &published(), &o).unwrap();
        let get = |n: &str| c.iter().find(|c| c.name == n).map(|c| c.after.clone());
        assert_eq!(
            get(CUSTOM_URLS).unwrap(),
            "https://a.example:443,http://198.51.100.10:32400,http://[2001:db8::10]:32400"
        );
        assert_eq!(get(RELAY).unwrap(), "false");
        assert_eq!(get(REMOTE_ACCESS).unwrap(), "false");
        assert_eq!(get(MANUAL_PORT).unwrap(), "false");
        assert_eq!(
            get(LAN_NETWORKS),
            None,
            "LAN networks only with --mesh-as-lan"
        );

        let o = SetupOptions {
            plex_port: 32400,
            keep_relay: true,
            keep_port_mapping: true,
            mesh_as_lan: true,
            replace_urls: true,
        };
        let c = plan(&cur, &published(), &o).unwrap();
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [CUSTOM_URLS, LAN_NETWORKS]);
        assert_eq!(
            c[0].after,
            "http://198.51.100.10:32400,http://[2001:db8::10]:32400"
        );
        assert_eq!(c[1].after, "10.10.1.0/24,100.96.0.0/16,fd7a:115c:a1e0::/64");
    }

    #[test]
    fn setup_twice_changes_nothing_and_undo_returns_to_the_first_values() {
        let o = SetupOptions {
            plex_port: 32400,
            ..Default::default()
        };
        let mut cur = prefs(&[]);
        let first = plan(&cur, &published(), &o).unwrap();
        let mut saved = Saved::default();
        saved.remember("http://127.0.0.1:32400", &first);
        let original = cur.clone();
        for c in &first {
            cur.insert(c.name.clone(), c.after.clone());
        }
        // Plex answers booleans as it likes ("0" in Preferences.xml, false in JSON).
        cur.insert(RELAY.into(), "0".into());
        assert_eq!(plan(&cur, &published(), &o).unwrap(), vec![]);
        saved.remember("http://127.0.0.1:32400", &[]);
        for c in saved.restore(&cur) {
            cur.insert(c.name, c.after);
        }
        assert_eq!(cur, original);
    }

    #[test]
    fn setup_without_a_rule_for_the_plex_port_says_how_to_add_one() {
        let mut p = published();
        p.rules[0].target_port = 8096;
        let e = plan(
            &prefs(&[]),
            &p,
            &SetupOptions {
                plex_port: 32400,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            e.contains("publish add --exit EXIT --port 32400 --to home:32400"),
            "{e}"
        );
        assert!(e.contains("vps:32400/tcp -> 8096"), "{e}");
    }

    #[test]
    fn check_flags_vps_mesh_private_and_unforwarded_sessions_and_passes_real_viewers() {
        let p = published();
        let cur = prefs(&[
            (
                CUSTOM_URLS,
                "http://198.51.100.10:32400,http://[2001:db8::10]:32400",
            ),
            (RELAY, "false"),
            (REMOTE_ACCESS, "false"),
        ]);
        let sessions = [
            session("192.0.2.50", false),
            session("::ffff:192.0.2.50", false),
            session("198.51.100.10", false),
            session("100.96.0.1", false),
            session("100.96.0.9", false),
            session("100.96.0.9", true),
            session("172.17.0.1", false),
            session("10.10.1.7", true),
            session("203.0.113.99", false),
        ];
        let f = check(&cur, &sessions, &p, 32400);
        let levels: Vec<(Level, &str)> = f
            .iter()
            .map(|f| (f.level, f.message.split(':').next().unwrap()))
            .collect();
        assert_eq!(f[0].level, Level::Ok, "{f:?}");
        let s = &levels[1..];
        assert_eq!(s[0].0, Level::Ok, "{f:?}");
        assert_eq!(s[1].0, Level::Ok, "{f:?}");
        assert_eq!(s[2], (Level::Problem, "the address of exit vps itself"));
        assert_eq!(s[3].0, Level::Problem);
        assert!(f[4].message.contains("mesh address of exit vps"));
        assert_eq!(s[4].0, Level::Problem);
        assert!(f[5].message.contains("--mesh-as-lan"));
        assert_eq!(s[5].0, Level::Ok);
        assert_eq!(s[6].0, Level::Problem);
        assert!(f[7].message.contains("docker"));
        assert_eq!(s[7].0, Level::Ok);
        assert_eq!(s[8].0, Level::Problem);
        assert!(f[9].message.contains("no exit forwarded"));
    }

    #[test]
    fn check_flags_missing_urls_relay_and_remote_access() {
        let f = check(&prefs(&[]), &[], &published(), 32400);
        assert_eq!(f[0].level, Level::Problem);
        assert!(f[0].message.contains("http://198.51.100.10:32400"), "{f:?}");
        assert_eq!(f[1].subject, "relay");
        assert_eq!(f[2].subject, "remote access");
    }
}
