//! Edge protection of the VPS itself: the `edge_in` chain and the closed-port prober bans.

use super::*;

pub(super) fn edge(b: &mut Builder, cfg: &NftConfig, has_nobans: bool) {
    let c = "edge_in";
    b.chain(c, Some((NfChainType::Filter, NfHook::Input, 0)));
    b.chain("probe", None);
    b.rule(
        c,
        vec![
            m(
                meta(MetaKey::Iifname),
                Operator::IN,
                anon_set(vec![s("lo"), s(cfg.tun.clone())]),
            ),
            Statement::Accept(None),
        ],
    );
    b.rule(
        c,
        vec![
            m(
                ct("state"),
                Operator::IN,
                Expression::List(vec![s("established"), s("related")]),
            ),
            Statement::Accept(None),
        ],
    );
    // Keep-open ports before the invalid-state drop: strict TCP tracking (which the synproxy
    // needs) marks a connection conntrack never saw as invalid — an SSH session or a node's
    // connection to the coordinator made before anything loaded conntrack here, or after a
    // flush — and dropping it would hang that connection for good.
    let mut keep = cfg.keep_open.clone();
    keep.sort();
    keep.dedup();
    for l4 in [L4::Tcp, L4::Udp] {
        let ports: Vec<Expression<'static>> = keep
            .iter()
            .filter(|p| p.proto == l4)
            .map(|p| Expression::Number(p.port as u32))
            .collect();
        if ports.is_empty() {
            continue;
        }
        b.rule(
            c,
            vec![
                eq(meta(MetaKey::L4proto), s(l4.as_str())),
                eq(payload(l4.as_str(), "dport"), anon_set(ports)),
                Statement::Accept(None),
            ],
        );
    }
    b.rule(
        c,
        vec![
            m(ct("state"), Operator::IN, s("invalid")),
            Statement::Drop(None),
        ],
    );
    for (l4, proto, echo) in [
        ("icmp", "icmp", "echo-request"),
        ("ipv6-icmp", "icmpv6", "echo-request"),
    ] {
        let is_echo = || eq(payload(proto, "type"), s(echo));
        b.rule(
            c,
            vec![
                eq(meta(MetaKey::L4proto), s(l4)),
                is_echo(),
                Statement::Limit(Limit {
                    rate: ECHO_PER_SECOND,
                    rate_unit: Some("packets".into()),
                    per: Some("second".into()),
                    burst: Some(ECHO_PER_SECOND),
                    burst_unit: Some("packets".into()),
                    inv: None,
                }),
                Statement::Accept(None),
            ],
        );
        b.rule(
            c,
            vec![
                eq(meta(MetaKey::L4proto), s(l4)),
                is_echo(),
                Statement::Drop(None),
            ],
        );
        // Everything else ICMP: errors, and for IPv6 neighbour and router discovery.
        b.rule(
            c,
            vec![eq(meta(MetaKey::L4proto), s(l4)), Statement::Accept(None)],
        );
    }
    // DHCP replies (v4 renewals are conntracked, but the first exchange is broadcast).
    b.rule(
        c,
        vec![
            eq(meta(MetaKey::L4proto), s("udp")),
            eq(payload("udp", "sport"), Expression::Number(67)),
            eq(payload("udp", "dport"), Expression::Number(68)),
            Statement::Accept(None),
        ],
    );
    b.rule(
        c,
        vec![
            eq(
                payload("ip6", "saddr"),
                Expression::Named(NamedExpression::Prefix(Prefix {
                    addr: Box::new(s("fe80::")),
                    len: 10,
                })),
            ),
            eq(meta(MetaKey::L4proto), s("udp")),
            eq(payload("udp", "dport"), Expression::Number(546)),
            Statement::Accept(None),
        ],
    );
    // Probes of closed ports: a new TCP connection attempt (a bare SYN, so stray ACKs of old
    // flows never ban anyone) or a new UDP flow, addressed to this host.
    b.rule(
        c,
        vec![
            eq(meta(MetaKey::L4proto), s("tcp")),
            bare_syn(),
            to_local(),
            jump("probe".into()),
        ],
    );
    b.rule(
        c,
        vec![
            eq(meta(MetaKey::L4proto), s("udp")),
            ct_state_new(),
            to_local(),
            jump("probe".into()),
        ],
    );
    b.rule(c, vec![Statement::Drop(None)]);

    let ban_secs = cfg.ban_seconds.max(1);
    for v6 in [false, true] {
        // Allow-listed sources are never banned.
        if has_nobans {
            b.rule(
                "probe",
                vec![
                    eq(saddr(v6), s(format!("@nobans{}", fam(v6)))),
                    Statement::Return(None),
                ],
            );
        }
        // A retry to a port this source already probed is not a new probe (a viewer whose
        // client retries a port that is about to be published must not be banned for it).
        b.rule(
            "probe",
            vec![
                eq(saddr_dport(v6), s(format!("@probed{}", fam(v6)))),
                Statement::Return(None),
            ],
        );
        // One rule, so that a full `probed` set (the update cannot add) stops it: an
        // uncountable probe bans nobody.
        let mut e = vec![
            nfproto(v6),
            set_update(format!("@probed{}", fam(v6)), saddr_dport(v6)),
        ];
        if cfg.ban_after > 1 {
            // Over (ban_after - 1) distinct ports per window: the bucket holds ban_after - 1
            // tokens and refills at that rate per window, so port number ban_after is "over".
            let n = cfg.ban_after - 1;
            e.push(meter(
                format!("probe{}", fam(v6)),
                v6,
                Some(PROBE_WINDOW_SECS),
                Statement::Limit(Limit {
                    rate: n,
                    rate_unit: Some("packets".into()),
                    per: Some("minute".into()),
                    burst: Some(n),
                    burst_unit: Some("packets".into()),
                    inv: Some(true),
                }),
            ));
        }
        e.push(set_update(
            format!("@banned{}", fam(v6)),
            elem_timeout(saddr(v6), ban_secs),
        ));
        e.push(set_update(
            format!("@banport{}", fam(v6)),
            elem_timeout(saddr_dport(v6), ban_secs),
        ));
        b.rule("probe", e);
    }
}
