use super::*;
use homeport_proto::publish::Guards;
use serde_json::Value;

pub(crate) fn rule(id: i64, proto: PublishProto, port: u16, guards: Guards) -> PublishRule {
    PublishRule {
        id,
        exit: homeport_proto::NodeId(1),
        exit_name: "vps".parse().unwrap(),
        proto,
        port,
        target: homeport_proto::NodeId(2),
        target_name: "home".parse().unwrap(),
        target_ipv4: "100.96.0.2".parse().unwrap(),
        target_ipv6: "fd7a:115c:a1e0::2".parse().unwrap(),
        target_port: port,
        guards,
    }
}

pub(crate) fn cfg() -> NftConfig {
    let mut keep_open = default_keep_open();
    keep_open.push(PortSpec {
        proto: L4::Udp,
        port: 41641,
    });
    NftConfig {
        tun: "hpx0".into(),
        edge_protection: true,
        keep_open,
        ban_seconds: 600,
        ban_after: 5,
        set_size: DEFAULT_SET_SIZE,
        mtu: 1380,
    }
}

pub(crate) fn sample() -> Vec<PublishRule> {
    vec![
        rule(
            7,
            PublishProto::Tcp,
            32400,
            Guards {
                allow: vec![
                    "192.0.2.0/24".parse().unwrap(),
                    "2001:db8::/32".parse().unwrap(),
                ],
                rate_per_minute: Some(30),
                max_conns: Some(8),
                ..Guards::default()
            },
        ),
        rule(9, PublishProto::Udp, 5353, Guards::default()),
    ]
}

fn json(n: &impl serde::Serialize) -> Value {
    serde_json::to_value(n).unwrap()
}

/// The rule expressions of chain `chain`, as JSON values.
fn rules_of(v: &Value, chain: &str) -> Vec<Value> {
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.pointer("/add/rule"))
        .filter(|r| r["chain"] == chain)
        .map(|r| r["expr"].clone())
        .collect()
}
fn set_named(v: &Value, name: &str) -> Option<Value> {
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.pointer("/add/set"))
        .find(|s| s["name"] == name)
        .cloned()
}
fn has(exprs: &[Value], needle: serde_json::Value) -> bool {
    let n = needle.to_string();
    exprs
        .iter()
        .any(|e| e.to_string().contains(&n[1..n.len() - 1]))
}

#[test]
fn batch_replaces_the_table_atomically() {
    let v = json(&ruleset(&cfg(), &sample(), &[]));
    let objs = v["nftables"].as_array().unwrap();
    let t = serde_json::json!({"table": {"family": "inet", "name": "homeport_exit"}});
    assert_eq!(objs[0], serde_json::json!({"add": t}));
    assert_eq!(objs[1], serde_json::json!({"delete": t}));
    assert_eq!(objs[2], serde_json::json!({"add": t}));
    // Everything else is an add inside our own table.
    for o in &objs[3..] {
        let (cmd, body) = o.as_object().unwrap().iter().next().unwrap();
        assert_eq!(cmd, "add");
        let inner = body.as_object().unwrap().values().next().unwrap();
        assert_eq!(inner["table"], TABLE, "{o}");
        assert_eq!(inner["family"], "inet");
    }
    assert_eq!(json(&removal())["nftables"].as_array().unwrap().len(), 2);
    assert_eq!(
        json(&removal())["nftables"][1],
        serde_json::json!({"delete": t})
    );
}

#[test]
fn same_input_same_json() {
    let a = ruleset(&cfg(), &sample(), &[]);
    let mut rev = sample();
    rev.reverse();
    let b = ruleset(&cfg(), &rev, &[]);
    // Struct equality (flag sets compare as sets) and identical JSON.
    assert_eq!(a, b);
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
}

#[test]
fn dnat_v4_and_v6_without_masquerade() {
    let v = json(&ruleset(&cfg(), &sample(), &[]));
    let d = rules_of(&v, "dnat_pre");
    assert!(has(
        &d,
        serde_json::json!({"dnat": {"addr": "100.96.0.2", "family": "ip", "port": 32400}})
    ));
    assert!(has(
        &d,
        serde_json::json!({"dnat": {"addr": "fd7a:115c:a1e0::2", "family": "ip6", "port": 32400}})
    ));
    assert!(has(
        &d,
        serde_json::json!({"payload": {"protocol": "udp", "field": "dport"}})
    ));
    assert!(
        has(&d, serde_json::json!({"right": {"set": ["lo", "hpx0"]}})),
        "{d:?}"
    );
    assert!(!v.to_string().contains("masquerade") && !v.to_string().contains("snat"));
    let chain = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.pointer("/add/chain"))
        .find(|c| c["name"] == "dnat_pre")
        .unwrap()
        .clone();
    assert_eq!(
        (
            chain["type"].as_str(),
            chain["hook"].as_str(),
            chain["prio"].as_i64()
        ),
        (Some("nat"), Some("prerouting"), Some(-100))
    );
    let guard = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.pointer("/add/chain"))
        .find(|c| c["name"] == "guard_pre")
        .unwrap()
        .clone();
    assert!(
        guard["prio"].as_i64().unwrap() < -100,
        "guards must run before DNAT"
    );
}

#[test]
fn guards_allow_rate_conns() {
    let v = json(&ruleset(&cfg(), &sample(), &[]));
    let a4 = set_named(&v, "allow4_7").unwrap();
    assert_eq!(a4["flags"], serde_json::json!(["interval"]));
    assert_eq!(a4["type"], "ipv4_addr");
    assert_eq!(
        a4["elem"],
        serde_json::json!([{"prefix": {"addr": "192.0.2.0", "len": 24}}])
    );
    assert_eq!(
        set_named(&v, "allow6_7").unwrap()["elem"],
        serde_json::json!([{"prefix": {"addr": "2001:db8::", "len": 32}}])
    );
    // Rule 9 has no allow-list: no set, no check.
    assert!(set_named(&v, "allow4_9").is_none());
    let p = rules_of(&v, "pub_7");
    // The allow-list is checked in the admission chain (with the invited addresses): listed
    // sources return, everyone else is denied as not-in-allow-list.
    let adm = rules_of(&v, "adm_7");
    assert!(p.iter().any(|e| e.to_string().contains("adm_7")), "{p:?}");
    assert!(adm[0].to_string().contains("@allow4_7"), "{adm:?}");
    assert!(adm[2].to_string().contains("@inv4_7"), "{adm:?}");
    assert!(
        adm.last().unwrap().to_string().contains("deny_allow_7"),
        "{adm:?}"
    );
    assert!(
        has(
            &p,
            serde_json::json!({"limit": {"rate": 30, "rate_unit": "packets", "per": "minute", "burst": 30, "burst_unit": "packets"}})
        ),
        "{p:?}"
    );
    assert!(
        has(
            &rules_of(&v, "pubc_7"),
            serde_json::json!({"ct count": {"val": 8}})
        ),
        "{p:?}"
    );
    assert!(p.iter().any(|e| e.to_string().contains("@banned4")));
    let p9 = rules_of(&v, "pub_9");
    assert!(
        !p9.iter()
            .any(|e| e.to_string().contains("limit") || e.to_string().contains("ct count"))
    );
    // Each deny chain counts per source and then drops.
    let d = rules_of(&v, "deny_rate_7");
    assert!(
        has(&d, serde_json::json!({"meter": {"name": "deny4_rate_7"}}))
            || d[0].to_string().contains("deny4_rate_7")
    );
    assert_eq!(d.last().unwrap(), &serde_json::json!([{"drop": null}]));
}

#[test]
fn forward_and_edge() {
    let v = json(&ruleset(&cfg(), &sample(), &[]));
    let f = rules_of(&v, "fwd_mesh");
    assert!(has(
        &f,
        serde_json::json!({"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}}, "value": {"rt": {"key": "mtu"}}}})
    ));
    assert!(has(&f, serde_json::json!({"right": "dnat"})));
    assert_eq!(f.last().unwrap()[1], serde_json::json!({"drop": null}));
    let e = rules_of(&v, "edge_in");
    assert!(has(&e, serde_json::json!({"set": [22, 8443]})), "{e:?}");
    assert!(has(&e, serde_json::json!({"set": [3478, 41641]})), "{e:?}");
    assert_eq!(e.last().unwrap(), &serde_json::json!([{"drop": null}]));
    let bans = rules_of(&v, "probe");
    assert!(
        bans.iter().any(
            |b| b.to_string().contains("@banned4") && b.to_string().contains("\"timeout\":600")
        ),
        "{bans:?}"
    );
    // Edge protection off: no input chain at all.
    let mut c = cfg();
    c.edge_protection = false;
    assert!(rules_of(&json(&ruleset(&c, &sample(), &[])), "edge_in").is_empty());
}

#[test]
fn plan_skips_what_it_cannot_install() {
    let mut rules = sample();
    rules.push(rule(3, PublishProto::Tcp, 22, Guards::default()));
    rules.push(rule(11, PublishProto::Tcp, 32400, Guards::default()));
    rules.push(rule(12, PublishProto::Unknown, 9999, Guards::default()));
    let (ok, skipped) = plan(&cfg(), &rules);
    assert_eq!(ok.iter().map(|r| r.id).collect::<Vec<_>>(), vec![7, 9]);
    assert_eq!(
        skipped.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![3, 11, 12]
    );
    assert!(skipped[0].why.contains("keep-open"));
}

#[test]
fn carried_bans_become_elements() {
    let bans = [
        Ban {
            addr: "198.51.100.9".parse().unwrap(),
            secs_left: 30,
            port: Some(23),
        },
        Ban {
            addr: "2001:db9::9".parse().unwrap(),
            secs_left: 5000,
            port: None,
        },
    ];
    let v = json(&ruleset(&cfg(), &sample(), &bans));
    assert_eq!(
        set_named(&v, "banned4").unwrap()["elem"][0]["elem"]["timeout"],
        30
    );
    // Never longer than the configured ban.
    assert_eq!(
        set_named(&v, "banned6").unwrap()["elem"][0]["elem"]["timeout"],
        600
    );
    assert_eq!(
        set_named(&v, "banport4").unwrap()["elem"][0]["elem"]["val"],
        serde_json::json!({"concat": ["198.51.100.9", 23]})
    );
}

#[test]
fn allow_listed_sources_and_published_ports_lose_their_bans() {
    let ban = |a: &str, port| Ban {
        addr: a.parse().unwrap(),
        secs_left: 300,
        port,
    };
    let bans = [
        // In rule 7's allow-list: never banned.
        ban("192.0.2.77", Some(23)),
        // Banned for probing 32400 before it was published.
        ban("198.51.100.77", Some(32400)),
        ban("198.51.100.78", Some(5353)),
        ban("198.51.100.79", Some(24)),
    ];
    let v = json(&ruleset(&cfg(), &sample(), &bans));
    let b4 = set_named(&v, "banned4").unwrap()["elem"].to_string();
    assert!(
        !b4.contains("192.0.2.77") && !b4.contains(".100.77\"") && !b4.contains(".100.78\""),
        "{b4}"
    );
    assert!(b4.contains("198.51.100.79"), "{b4}");
    // The probe chain skips allow-listed sources and retries, and counts distinct ports.
    let p = rules_of(&v, "probe");
    assert!(p[0].to_string().contains("@nobans4"), "{p:?}");
    assert!(p[1].to_string().contains("@probed4"), "{p:?}");
    assert_eq!(
        set_named(&v, "nobans4").unwrap()["elem"],
        serde_json::json!([{"prefix": {"addr": "192.0.2.0", "len": 24}}])
    );
    // Explicit sizes on every dynamic set and meter.
    for name in ["banned4", "banned6", "banport4", "probed6"] {
        assert_eq!(set_named(&v, name).unwrap()["size"], 65536, "{name}");
    }
    fn meters(v: &Value, out: &mut Vec<Value>) {
        match v {
            Value::Object(o) => {
                if let Some(m) = o.get("meter") {
                    out.push(m.clone());
                }
                o.values().for_each(|x| meters(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| meters(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    meters(&v, &mut all);
    assert!(all.len() > 4);
    for m in all {
        assert_eq!(m["size"], 65536, "{m}");
    }
}

#[test]
fn tcp_ports_go_through_the_synproxy_and_targets_only_leave_by_the_tun() {
    let v = json(&ruleset(&cfg(), &sample(), &[]));
    let raw = rules_of(&v, "syn_raw");
    assert!(
        raw.iter()
            .any(|r| r.to_string().contains("notrack") && r.to_string().contains("32400"))
    );
    // UDP 5353 is not proxied.
    assert!(!raw.iter().any(|r| r.to_string().contains("5353")));
    let sp = rules_of(&v, "synproxy_in");
    assert!(
        has(
            &sp,
            serde_json::json!({"synproxy": {"mss": 1340, "wscale": 7}})
        ) || sp.iter().any(|r| r.to_string().contains("\"mss\":1340")),
        "{sp:?}"
    );
    assert!(
        sp.iter().any(|r| r.to_string().contains("\"mss\":1320")),
        "{sp:?}"
    );
    assert!(
        rules_of(&v, "guard_out")
            .iter()
            .any(|r| r.to_string().contains("pub_7"))
    );
    assert!(
        rules_of(&v, "dnat_out")
            .iter()
            .any(|r| r.to_string().contains("100.96.0.2"))
    );
    let post = rules_of(&v, "post_mesh");
    assert!(
        post.iter().any(|r| {
            let s = r.to_string();
            s.contains("100.96.0.2") && s.contains("!=") && s.contains("drop")
        }),
        "{post:?}"
    );
}

#[test]
fn enable_forwarding_writes_sysctls_and_restore_puts_them_back() {
    let d = tempfile::tempdir().unwrap();
    let p = &d.path().join("proc");
    let state = &d.path().join("state");
    std::fs::create_dir_all(state).unwrap();
    let before = [
        ("net/ipv4/ip_forward", "0"),
        ("net/ipv6/conf/all/forwarding", "0"),
        ("net/ipv6/conf/all/accept_ra", "0"),
        ("net/ipv6/conf/eth0/accept_ra", "1"),
        ("net/ipv6/conf/eth1/accept_ra", "0"),
        ("net/netfilter/nf_conntrack_acct", "0"),
        ("net/netfilter/nf_conntrack_tcp_loose", "1"),
    ];
    for (k, v) in before {
        std::fs::create_dir_all(p.join(k).parent().unwrap()).unwrap();
        std::fs::write(p.join(k), v).unwrap();
    }
    enable_forwarding(p, state).unwrap();
    let r = |k: &str| std::fs::read_to_string(p.join(k)).unwrap();
    assert_eq!(r("net/ipv4/ip_forward"), "1");
    assert_eq!(r("net/ipv6/conf/all/forwarding"), "1");
    assert_eq!(r("net/ipv6/conf/eth0/accept_ra"), "2");
    assert_eq!(r("net/ipv6/conf/eth1/accept_ra"), "0");
    assert_eq!(r("net/netfilter/nf_conntrack_acct"), "1");
    assert_eq!(r("net/netfilter/nf_conntrack_tcp_loose"), "0");
    assert!(!p.join("net/netfilter/nf_conntrack_timestamp").exists());
    use std::os::unix::fs::PermissionsExt;
    let saved = state.join(SYSCTL_BEFORE_FILE);
    assert_eq!(
        std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A second start after a kill: the saved values stay the ones from before the first.
    enable_forwarding(p, state).unwrap();
    assert!(restore_sysctls(p, state).unwrap());
    for (k, v) in before {
        assert_eq!(r(k), v, "{k}");
    }
    assert!(!saved.exists());
    assert!(
        !restore_sysctls(p, state).unwrap(),
        "nothing left to restore"
    );
}

#[test]
fn dump() {
    if let Ok(p) = std::env::var("HOMEPORT_EXIT_DUMP") {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&ruleset(&cfg(), &sample(), &[])).unwrap(),
        )
        .unwrap();
    }
}

#[test]
fn port_spec_parse() {
    assert_eq!(
        "tcp:22".parse::<PortSpec>().unwrap(),
        PortSpec {
            proto: L4::Tcp,
            port: 22
        }
    );
    assert_eq!("UDP:3478".parse::<PortSpec>().unwrap().proto, L4::Udp);
    for bad in ["22", "icmp:1", "tcp:0", "tcp:70000", "tcp:x"] {
        assert!(
            bad.parse::<PortSpec>().unwrap_err().contains("PROTO:PORT"),
            "{bad}"
        );
    }
}

#[test]
fn deny_meter_names_round_trip() {
    for r in DenyReason::ALL {
        for v6 in [false, true] {
            assert_eq!(
                parse_deny_meter_name(&deny_meter_name(r, -3, v6)),
                Some((r, -3))
            );
        }
    }
    assert_eq!(parse_deny_meter_name("rate4_7"), None);
    assert_eq!(parse_deny_meter_name("deny4_what_7"), None);
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn sa(s: &str) -> std::net::SocketAddr {
    s.parse().unwrap()
}
fn rule_count(exec: &Exec) -> usize {
    list(exec, &["table", "inet", TABLE])
        .unwrap()
        .iter()
        .filter(|o| o.get("rule").is_some())
        .count()
}

/// The whole ruleset against real kernels: DNAT v4/v6 with the viewer's address preserved,
/// allow-list, rate, max-conns, re-apply (no duplicates, established flows survive), bans
/// from closed-port probes and their expiry, removal.
#[test]
fn lab_publish() {
    if !crate::lab::available("nft::lab_publish") {
        return;
    }
    use crate::lab::Lab;
    use std::time::Duration;
    let lab = Lab::new();
    let exec = Exec::netns(&lab.vps);
    let mut c = cfg();
    c.ban_seconds = 2;
    c.ban_after = 1;
    let guards = |allow: &[&str], rate, conns| Guards {
        allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
        rate_per_minute: rate,
        max_conns: conns,
        ..Guards::default()
    };
    let rules = vec![
        rule(
            1,
            PublishProto::Tcp,
            32400,
            guards(&["192.0.2.5/32", "2001:db8:2::5/128"], None, None),
        ),
        rule(2, PublishProto::Tcp, 8080, guards(&[], Some(2), None)),
        rule(3, PublishProto::Tcp, 8081, guards(&[], None, Some(1))),
    ];
    apply(&exec, &ruleset(&c, &rules, &[])).expect("nft accepts the ruleset");
    for p in [32400, 8080, 8081] {
        lab.serve(p);
    }
    let (a4, b4, a6, b6) = (
        ip("192.0.2.5"),
        ip("192.0.2.6"),
        ip("2001:db8:2::5"),
        ip("2001:db8:2::6"),
    );
    let plex4 = sa("198.51.100.10:32400");
    let plex6 = sa("[2001:db8:100::10]:32400");

    // (a) DNAT into the "mesh"; the target sees the viewer's own address.
    let mut conn = lab.connect(a4, plex4).expect("allowed v4 source connects");
    let ans = Lab::ask(&mut conn, "hi").expect("answer");
    assert!(
        ans.starts_with("192.0.2.5:") && ans.ends_with(" hi"),
        "{ans}"
    );
    let mut conn6 = lab.connect(a6, plex6).expect("allowed v6 source connects");
    let ans = Lab::ask(&mut conn6, "hi6").expect("answer");
    assert!(ans.starts_with("[2001:db8:2::5]:"), "{ans}");

    // (b) Not in the allow-list: nothing at all, counted per source.
    assert!(lab.connect(b4, plex4).is_none());
    assert!(lab.connect(b6, plex6).is_none());
    let denied = deny_counts(&exec).unwrap();
    for src in [b4, b6] {
        assert!(
            denied
                .iter()
                .any(|d| d.0 == DenyReason::NotInAllowList && d.1 == 1 && d.2 == src && d.3 > 0),
            "{src} not counted: {denied:?}"
        );
    }

    // Rate: 2 new connections per minute from one source, the third is dropped. TCP goes
    // through the synproxy, which completes the handshake with the client before the guards
    // see the connection: a denied connection is one that never reaches the server.
    let reaches = |src, dst| {
        lab.connect(src, dst)
            .and_then(|mut c| Lab::ask(&mut c, "x").map(|a| (c, a)))
    };
    let web = sa("198.51.100.10:8080");
    let _w1 = reaches(b4, web).expect("rate 1");
    let _w2 = reaches(b4, web).expect("rate 2");
    assert!(
        reaches(b4, web).is_none(),
        "third connection within a minute passed the rate guard"
    );
    // Max conns: one at a time per source; another source is not affected.
    let cc = sa("198.51.100.10:8081");
    let _c1 = reaches(b4, cc).expect("first connection");
    assert!(
        reaches(b4, cc).is_none(),
        "second concurrent connection passed max-conns"
    );
    let _c2 = reaches(a4, cc).expect("other source");
    let denied = deny_counts(&exec).unwrap();
    assert!(
        denied
            .iter()
            .any(|d| d.0 == DenyReason::Rate && d.1 == 2 && d.2 == b4)
    );
    assert!(
        denied
            .iter()
            .any(|d| d.0 == DenyReason::MaxConns && d.1 == 3 && d.2 == b4)
    );

    // (c) Re-apply: exactly one copy of each rule; the established flow survives.
    let n = rule_count(&exec);
    for _ in 0..2 {
        apply(&exec, &ruleset(&c, &rules, &current_bans(&exec).unwrap())).unwrap();
        assert_eq!(rule_count(&exec), n);
    }
    let ans = Lab::ask(&mut conn, "still").expect("established flow survives a re-apply");
    assert!(ans.ends_with(" still"));

    // (d) A closed-port probe bans the source (ban_after 1) for ban_seconds (2).
    let cc6 = sa("[2001:db8:100::10]:8081");
    let probe = |src, port: u16| {
        let dst = SocketAddr::new(
            if src == b6 {
                ip("2001:db8:100::10")
            } else {
                ip("198.51.100.10")
            },
            port,
        );
        assert!(
            lab.connect_within(src, dst, Duration::from_millis(300))
                .is_none()
        );
    };
    use std::net::SocketAddr;
    probe(b6, 23);
    let bans = current_bans(&exec).unwrap();
    assert!(
        bans.iter().any(|b| b.addr == b6 && b.port == Some(23)),
        "not banned: {bans:?}"
    );
    // A ban survives a re-apply.
    apply(&exec, &ruleset(&c, &rules, &current_bans(&exec).unwrap())).unwrap();
    assert!(
        current_bans(&exec).unwrap().iter().any(|b| b.addr == b6),
        "ban lost on re-apply"
    );
    assert!(lab.connect(b6, cc6).is_none(), "banned source got through");
    std::thread::sleep(Duration::from_millis(2600));
    assert!(
        current_bans(&exec).unwrap().is_empty(),
        "ban did not time out"
    );
    assert!(
        reaches(b6, cc6).is_some(),
        "connection after the ban expired"
    );
    // Keep-open ports are never banned away: SSH stays reachable for a banned source.
    probe(b6, 24);
    assert!(current_bans(&exec).unwrap().iter().any(|b| b.addr == b6));
    let ssh = Lab::in_ns(&lab.vps, || {
        std::net::TcpListener::bind("[2001:db8:100::10]:22").unwrap()
    });
    assert!(
        lab.connect(b6, sa("[2001:db8:100::10]:22")).is_some(),
        "banned source lost SSH"
    );
    drop(ssh);
    // A source in an allow-list is never banned.
    probe(a4, 23);
    assert!(
        !current_bans(&exec).unwrap().iter().any(|b| b.addr == a4),
        "allow-listed source banned"
    );

    // ban_after 3: retries to one port count once; the third distinct port bans.
    c.ban_after = 3;
    apply(&exec, &ruleset(&c, &rules, &[])).unwrap();
    for (i, port) in [25, 25, 25, 26, 27].into_iter().enumerate() {
        probe(b4, port);
        let banned = current_bans(&exec).unwrap().iter().any(|b| b.addr == b4);
        assert_eq!(banned, i == 4, "after probe {} (port {port})", i + 1);
    }

    // Removal leaves no table; removing twice is fine.
    remove(&exec).unwrap();
    remove(&exec).unwrap();
    assert!(!table_exists(&exec).unwrap());
}

/// Issue 16: a rule with country guards is not installed without a country database (its port
/// stays closed) and the reason says where to get one; with one, its countries become interval
/// sets and `adm_<id>` checks the allow-list first, then the countries, failing closed.
#[test]
fn country_rules_need_a_database_and_compile_to_interval_sets() {
    let de = Guards {
        countries: vec!["DE".into()],
        allow: vec!["203.0.113.2/32".parse().unwrap()],
        ..Guards::default()
    };
    let rules = vec![rule(3, PublishProto::Tcp, 32400, de)];
    let (ok, skipped) = plan(&cfg(), &rules);
    assert!(ok.is_empty());
    assert!(skipped[0].why.contains("no country database") && skipped[0].why.contains("GeoLite2"));
    assert!(
        !json(&ruleset(&cfg(), &rules, &[]))
            .to_string()
            .contains("32400")
    );
    if !crate::geo::tests::have_writer() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "mmdb-writer missing: run deploy/setup.sh"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.mmdb");
    crate::geo::tests::write_test_db(&p, &[]).unwrap();
    let db = crate::geo::CountryDb::load(&p).unwrap();
    let grants = [(3, ip("192.0.2.200"), 3600)];
    let v = json(&ruleset_geo(&cfg(), &rules, &[], Some(&db), &grants));
    let s4 = set_named(&v, "geoa4_3").expect("the v4 country set");
    assert_eq!(s4["flags"], serde_json::json!(["interval"]), "{s4}");
    assert!(s4.to_string().contains("192.0.2.0"), "{s4}");
    assert!(
        set_named(&v, "geoa6_3")
            .unwrap()
            .to_string()
            .contains("2001:db8:1::")
    );
    let adm = rules_of(&v, "adm_3");
    // allow-list (v4, v6) → return; then not in the country set (v4, v6) → deny country.
    // allow-list (v4, v6) → return; invited (v4, v6) → return; then not in the country set
    // (v4, v6) → deny country.
    assert_eq!(adm.len(), 6, "{adm:#?}");
    assert!(adm[0].to_string().contains("@allow4_3") && adm[0].to_string().contains("return"));
    assert!(adm[2].to_string().contains("@inv4_3") && adm[2].to_string().contains("return"));
    assert!(
        adm[4].to_string().contains("@geoa4_3") && adm[4].to_string().contains("deny_country_3")
    );
    assert!(adm[4].to_string().contains("\"!=\""), "{}", adm[4]);
    let inv = set_named(&v, "inv4_3").unwrap();
    assert!(
        inv.to_string().contains("192.0.2.200") && inv.to_string().contains("3600"),
        "{inv}"
    );
}
