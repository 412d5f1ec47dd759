//! [`ruleset`]: the whole table as one batch, built part by part in a fixed order: the ban and
//! allow-list sets, the SYN proxy, the base chains of the published ports, per rule its guards
//! and its DNAT, the forward and postrouting policy of the TUN, and edge protection.

use super::*;

/// The complete ruleset as one atomic, idempotent batch (see the module docs). `rules` are the
/// rules of this exit; [`plan`] decides which are installed. `bans` are carried over from the
/// table being replaced, except bans of allow-listed sources and bans whose probe hit a port
/// that is now published.
pub fn ruleset(cfg: &NftConfig, rules: &[PublishRule], bans: &[Ban]) -> Batch {
    ruleset_geo(cfg, rules, bans, None, &[])
}

/// [`ruleset`] with a country database (rules with country guards are installed only with one,
/// see [`plan_geo`]; their countries become interval sets) and invite grants: `(rule, address,
/// seconds left)`, elements of the rule's invite set that expire in the kernel.
pub fn ruleset_geo(
    cfg: &NftConfig,
    rules: &[PublishRule],
    bans: &[Ban],
    geo: Option<&crate::geo::CountryDb>,
    grants: &[(i64, IpAddr, u32)],
) -> Batch {
    let (rules, _) = plan_geo(cfg, rules, geo.is_some());
    let mut b = Builder {
        objs: removal().objects.into_owned(),
    };
    b.add(NfListObject::Table(table()));
    let nobans = never_banned(&rules);
    ban_sets(&mut b, cfg, &rules, bans, &nobans);
    allow_sets(&mut b, &rules);
    if let Some(geo) = geo {
        country_sets(&mut b, &rules, geo);
    }
    invite_sets(&mut b, cfg, &rules, grants);
    synproxy(&mut b, cfg, &rules);
    published_base_chains(&mut b, cfg);
    for r in &rules {
        let l4 = if r.proto == PublishProto::Udp {
            L4::Udp
        } else {
            L4::Tcp
        };
        guards(&mut b, r, l4);
        dnat(&mut b, r, l4);
    }
    forward_policy(&mut b, cfg);
    postrouting(&mut b, cfg, &rules);
    if cfg.edge_protection {
        edge(&mut b, cfg, !nobans.is_empty());
    }
    Batch {
        nft: Nftables {
            objects: b.objs.into(),
        },
        meter_size: cfg.set_size.max(1),
    }
}

/// Every source address or network in any installed rule's allow-list: never banned.
fn never_banned(rules: &[&PublishRule]) -> Vec<ipnet::IpNet> {
    let mut nets: Vec<ipnet::IpNet> = rules
        .iter()
        .flat_map(|r| r.guards.allow.iter().map(|n| n.trunc()))
        .collect();
    nets.sort();
    nets.dedup();
    // An interval set refuses overlapping elements: keep only the outermost networks.
    ipnet::IpNet::aggregate(&nets)
}

fn prefix_elem(n: &ipnet::IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(n.addr().to_string())),
        len: n.prefix_len() as u32,
    }))
}

fn allow_set(id: i64, v6: bool) -> String {
    format!("allow{}_{}", if v6 { 6 } else { 4 }, id)
}

/// The chain that counts and drops a rule's packets denied for `reason`.
fn deny_chain(reason: DenyReason, id: i64) -> String {
    format!("deny_{}_{}", reason.token(), id)
}

/// Bans: dynamic sets filled from the packet path (`edge_in`), carried over on re-apply.
/// `banport`: the port of the probe that started each ban. With edge protection also the
/// closed ports each source probed, and the sources never banned.
fn ban_sets(
    b: &mut Builder,
    cfg: &NftConfig,
    rules: &[&PublishRule],
    bans: &[Ban],
    nobans: &[ipnet::IpNet],
) {
    let size = Some(cfg.set_size.max(1));
    let published: BTreeSet<u16> = rules.iter().map(|r| r.port).collect();
    for v6 in [false, true] {
        let keep: Vec<&Ban> = bans
            .iter()
            .filter(|x| x.addr.is_ipv6() == v6 && x.secs_left > 0)
            .filter(|x| !x.port.is_some_and(|p| published.contains(&p)))
            .filter(|x| !nobans.iter().any(|n| n.contains(&x.addr)))
            .collect();
        let secs = |x: &Ban| x.secs_left.min(cfg.ban_seconds.max(1));
        let carried: Vec<Expression<'static>> = keep
            .iter()
            .map(|x| elem_timeout(s(x.addr.to_string()), secs(x)))
            .collect();
        let ports: Vec<Expression<'static>> = keep
            .iter()
            .filter_map(|x| {
                let p = x.port?;
                Some(elem_timeout(
                    Expression::Named(NamedExpression::Concat(vec![
                        s(x.addr.to_string()),
                        Expression::Number(p as u32),
                    ])),
                    secs(x),
                ))
            })
            .collect();
        b.set(
            &format!("banned{}", fam(v6)),
            addr_type(v6),
            SetFlag::Timeout,
            Some(cfg.ban_seconds.max(1)),
            size,
            (!carried.is_empty()).then_some(carried),
        );
        b.set(
            &format!("banport{}", fam(v6)),
            addr_port_type(v6),
            SetFlag::Timeout,
            Some(cfg.ban_seconds.max(1)),
            size,
            (!ports.is_empty()).then_some(ports),
        );
        if cfg.edge_protection {
            // Closed ports each source probed within the window (retries are not new probes).
            b.set(
                &format!("probed{}", fam(v6)),
                addr_port_type(v6),
                SetFlag::Timeout,
                Some(PROBE_WINDOW_SECS),
                size,
                None,
            );
            let elems: Vec<Expression<'static>> = nobans
                .iter()
                .filter(|n| n.addr().is_ipv6() == v6)
                .map(prefix_elem)
                .collect();
            b.set(
                &format!("nobans{}", fam(v6)),
                addr_type(v6),
                SetFlag::Interval,
                None,
                None,
                (!elems.is_empty()).then_some(elems),
            );
        }
    }
}

/// Allow-lists: one interval set per family for every rule that has one.
fn allow_sets(b: &mut Builder, rules: &[&PublishRule]) {
    for r in rules {
        if r.guards.allow.is_empty() {
            continue;
        }
        for v6 in [false, true] {
            let elems: Vec<Expression<'static>> = r
                .guards
                .allow
                .iter()
                .filter(|n| n.addr().is_ipv6() == v6)
                .map(|n| prefix_elem(&n.trunc()))
                .collect();
            b.set(
                &allow_set(r.id, v6),
                addr_type(v6),
                SetFlag::Interval,
                None,
                None,
                (!elems.is_empty()).then_some(elems),
            );
        }
    }
}

fn invite_set(id: i64, v6: bool) -> String {
    format!("inv{}_{}", if v6 { 6 } else { 4 }, id)
}

/// Whether a rule decides admission in `adm_<id>`: it has country guards, or an allow-list
/// (which invites add to).
fn uses_admission(r: &PublishRule) -> bool {
    r.guards.needs_countries() || !r.guards.allow.is_empty()
}

/// Invites: per rule with an admission chain and family, a set of addresses with timeouts (the
/// grants' time left), so an invited address leaves the allow-list in the kernel when its time
/// is up.
fn invite_sets(
    b: &mut Builder,
    cfg: &NftConfig,
    rules: &[&PublishRule],
    grants: &[(i64, IpAddr, u32)],
) {
    for r in rules.iter().filter(|r| uses_admission(r)) {
        for v6 in [false, true] {
            let elems: Vec<Expression<'static>> = grants
                .iter()
                .filter(|(id, a, secs)| *id == r.id && a.is_ipv6() == v6 && *secs > 0)
                .map(|(_, a, secs)| elem_timeout(s(a.to_string()), *secs))
                .collect();
            b.set(
                &invite_set(r.id, v6),
                addr_type(v6),
                SetFlag::Timeout,
                None,
                Some(cfg.set_size.max(1)),
                (!elems.is_empty()).then_some(elems),
            );
        }
    }
}

fn country_set(id: i64, deny: bool, v6: bool) -> String {
    format!(
        "geo{}{}_{}",
        if deny { "d" } else { "a" },
        if v6 { 6 } else { 4 },
        id
    )
}

/// Country rules: per rule and family one interval set with every network of its allowed
/// (`geoa`) or denied (`geod`) countries, from the country database.
fn country_sets(b: &mut Builder, rules: &[&PublishRule], geo: &crate::geo::CountryDb) {
    for r in rules {
        for (deny, codes) in [
            (false, &r.guards.countries),
            (true, &r.guards.deny_countries),
        ] {
            if codes.is_empty() {
                continue;
            }
            let (v4, v6) = geo.nets(codes);
            for fam6 in [false, true] {
                let elems: Vec<Expression<'static>> = if fam6 {
                    v6.iter()
                        .map(|n| prefix_elem(&ipnet::IpNet::V6(*n)))
                        .collect()
                } else {
                    v4.iter()
                        .map(|n| prefix_elem(&ipnet::IpNet::V4(*n)))
                        .collect()
                };
                b.set(
                    &country_set(r.id, deny, fam6),
                    addr_type(fam6),
                    SetFlag::Interval,
                    None,
                    None,
                    (!elems.is_empty()).then_some(elems),
                );
            }
        }
    }
}

/// SYN proxy: bare SYNs to published TCP ports are not tracked; the kernel answers them with a
/// SYN cookie before any state exists.
fn synproxy(b: &mut Builder, cfg: &NftConfig, rules: &[&PublishRule]) {
    let tcp_rules: Vec<&&PublishRule> = rules
        .iter()
        .filter(|r| r.proto == PublishProto::Tcp)
        .collect();
    b.chain(
        "syn_raw",
        Some((NfChainType::Filter, NfHook::Prerouting, -300)),
    );
    b.chain(
        "synproxy_in",
        Some((NfChainType::Filter, NfHook::Input, -10)),
    );
    public_to_local_only(b, "syn_raw", cfg);
    b.rule(
        "synproxy_in",
        vec![
            m(
                meta(MetaKey::Iifname),
                Operator::IN,
                anon_set(vec![s("lo"), s(cfg.tun.clone())]),
            ),
            Statement::Return(None),
        ],
    );
    for r in &tcp_rules {
        let mut e = dport(L4::Tcp, r.port).to_vec();
        e.push(bare_syn());
        e.push(Statement::Notrack);
        b.rule("syn_raw", e);
        for v6 in [false, true] {
            let mut flags = HashSet::new();
            flags.insert(nftables::types::SynProxyFlag::Timestamp);
            flags.insert(nftables::types::SynProxyFlag::SackPerm);
            let mut e = vec![nfproto(v6)];
            e.extend(dport(L4::Tcp, r.port));
            e.push(m(
                ct("state"),
                Operator::IN,
                Expression::List(vec![s("invalid"), s("untracked")]),
            ));
            e.push(Statement::SynProxy(nftables::stmt::SynProxy {
                // The TUN's MTU less the IP and TCP headers.
                mss: Some(cfg.mtu as u32 - if v6 { 60 } else { 40 }),
                wscale: Some(SYNPROXY_WSCALE),
                flags: Some(flags),
            }));
            b.rule("synproxy_in", e);
        }
        let mut e = dport(L4::Tcp, r.port).to_vec();
        e.push(m(ct("state"), Operator::IN, s("invalid")));
        e.push(Statement::Drop(None));
        b.rule("synproxy_in", e);
    }
}

/// The base chains of published ports: guards before DNAT, DNAT, the same two in the output
/// hook (the SYN the synproxy sends for a validated client leaves through it), and the forward
/// and postrouting chains of the TUN.
fn published_base_chains(b: &mut Builder, cfg: &NftConfig) {
    b.chain(
        "guard_pre",
        Some((NfChainType::Filter, NfHook::Prerouting, -150)),
    );
    b.chain(
        "dnat_pre",
        Some((NfChainType::NAT, NfHook::Prerouting, -100)),
    );
    // The SYN the synproxy sends for a validated client leaves through the output hooks.
    b.chain(
        "guard_out",
        Some((NfChainType::Filter, NfHook::Output, -150)),
    );
    b.chain("dnat_out", Some((NfChainType::NAT, NfHook::Output, -100)));
    b.chain("fwd_mesh", Some((NfChainType::Filter, NfHook::Forward, 0)));
    b.chain(
        "post_mesh",
        Some((NfChainType::Filter, NfHook::Postrouting, 0)),
    );
    for ch in ["guard_pre", "dnat_pre"] {
        public_to_local_only(b, ch, cfg);
    }
}

/// One rule's guards: its `pub_<id>` chain (jumped to from `guard_pre`, and for TCP from
/// `guard_out`), its `deny_<reason>_<id>` chains, then ban, allow-list and, for new
/// connections, the rate and connection limits.
fn guards(b: &mut Builder, r: &PublishRule, l4: L4) {
    let pc = format!("pub_{}", r.id);
    b.chain(&pc, None);
    let mut e = dport(l4, r.port).to_vec();
    e.push(jump(pc.clone()));
    b.rule("guard_pre", e);
    if l4 == L4::Tcp {
        let mut e = dport(l4, r.port).to_vec();
        e.push(bare_syn());
        e.push(ct_state_new());
        e.push(to_local());
        e.push(jump(pc.clone()));
        b.rule("guard_out", e);
    }

    let g = &r.guards;
    let used = [
        (DenyReason::Banned, true),
        (DenyReason::NotInAllowList, !g.allow.is_empty()),
        (DenyReason::Rate, g.rate_per_minute.is_some()),
        (DenyReason::MaxConns, g.max_conns.is_some()),
        (DenyReason::Country, g.needs_countries()),
    ];
    for (reason, _) in used.into_iter().filter(|u| u.1) {
        let dc = deny_chain(reason, r.id);
        b.chain(&dc, None);
        // Counting and dropping are separate rules: if the meter is full, the count is
        // lost but the packet is still dropped.
        for v6 in [false, true] {
            b.rule(
                &dc,
                vec![meter(
                    deny_meter_name(reason, r.id, v6),
                    v6,
                    Some(DENY_COUNTER_SECS),
                    Statement::Counter(Counter::Anonymous(None)),
                )],
            );
        }
        b.rule(&dc, vec![Statement::Drop(None)]);
    }
    let deny = |reason: DenyReason| jump(deny_chain(reason, r.id));
    for v6 in [false, true] {
        let set = if v6 { "@banned6" } else { "@banned4" };
        b.rule(&pc, vec![eq(saddr(v6), s(set)), deny(DenyReason::Banned)]);
    }
    // Who may connect at all: allow-list, invites, countries (see `admission`).
    if uses_admission(r) {
        admission(b, r, &pc);
    }
    // The limits only concern new connections.
    b.rule(
        &pc,
        vec![
            m(ct("state"), Operator::NEQ, s("new")),
            Statement::Return(None),
        ],
    );
    limits(b, r, &pc);
}

/// Who may connect to a rule with an allow-list or country guards, in this order (`adm_<id>`,
/// jumped to from `pub_<id>` for every packet, so a change cuts running flows too): a source in
/// the allow-list or invited (`inv4/6_<id>`, elements with timeouts) passes whatever its
/// country; a source in a denied country is dropped; with allowed countries,
/// a source outside them is dropped, including one the database does not know (fails closed);
/// without allowed countries but with an allow-list, everyone else is dropped as before.
fn admission(b: &mut Builder, r: &PublishRule, pc: &str) {
    let g = &r.guards;
    let ac = format!("adm_{}", r.id);
    b.chain(&ac, None);
    b.rule(pc, vec![jump(ac.clone())]);
    let deny = |reason: DenyReason| jump(deny_chain(reason, r.id));
    if !g.allow.is_empty() {
        for v6 in [false, true] {
            b.rule(
                &ac,
                vec![
                    eq(saddr(v6), s(format!("@{}", allow_set(r.id, v6)))),
                    Statement::Return(None),
                ],
            );
        }
    }
    // Invited addresses count as allow-listed.
    for v6 in [false, true] {
        b.rule(
            &ac,
            vec![
                eq(saddr(v6), s(format!("@{}", invite_set(r.id, v6)))),
                Statement::Return(None),
            ],
        );
    }
    if !g.deny_countries.is_empty() {
        for v6 in [false, true] {
            b.rule(
                &ac,
                vec![
                    eq(saddr(v6), s(format!("@{}", country_set(r.id, true, v6)))),
                    deny(DenyReason::Country),
                ],
            );
        }
    }
    if !g.countries.is_empty() {
        for v6 in [false, true] {
            b.rule(
                &ac,
                vec![
                    m(
                        saddr(v6),
                        Operator::NEQ,
                        s(format!("@{}", country_set(r.id, false, v6))),
                    ),
                    deny(DenyReason::Country),
                ],
            );
        }
    } else if !g.allow.is_empty() {
        b.rule(&ac, vec![deny(DenyReason::NotInAllowList)]);
    }
}

/// One rule's limits on new connections, in `pc` (its `pub_<id>` chain): each lets a connection
/// on only when its meter matched (under the limit); a meter that has no room for the source
/// does not match, and the rule after it denies.
fn limits(b: &mut Builder, r: &PublishRule, pc: &str) {
    let deny = |reason: DenyReason| jump(deny_chain(reason, r.id));
    let conns_chain = format!("pubc_{}", r.id);
    let after_rate = |b: &mut Builder| -> Statement<'static> {
        if r.guards.max_conns.is_some() {
            b.chain(&conns_chain, None);
            Statement::Goto(JumpTarget {
                target: conns_chain.clone().into(),
            })
        } else {
            Statement::Return(None)
        }
    };
    let conns_in = match r.guards.rate_per_minute {
        Some(0) => {
            b.rule(pc, vec![deny(DenyReason::Rate)]);
            None
        }
        Some(n) => {
            let next = after_rate(b);
            for v6 in [false, true] {
                let lim = Statement::Limit(Limit {
                    rate: n,
                    rate_unit: Some("packets".into()),
                    per: Some("minute".into()),
                    burst: Some(n),
                    burst_unit: Some("packets".into()),
                    inv: None,
                });
                let name = format!("rate{}_{}", fam(v6), r.id);
                b.rule(
                    pc,
                    vec![
                        nfproto(v6),
                        meter(name, v6, Some(RATE_METER_SECS), lim),
                        next.clone(),
                    ],
                );
            }
            b.rule(pc, vec![deny(DenyReason::Rate)]);
            r.guards.max_conns.is_some().then(|| conns_chain.clone())
        }
        None => Some(pc.to_string()),
    };
    match (r.guards.max_conns, conns_in) {
        (Some(0), Some(c)) => b.rule(&c, vec![deny(DenyReason::MaxConns)]),
        (Some(n), Some(c)) => {
            for v6 in [false, true] {
                let cc = Statement::CTCount(CTCount {
                    val: Expression::Number(n),
                    inv: None,
                });
                let name = format!("conns{}_{}", fam(v6), r.id);
                b.rule(
                    &c,
                    vec![
                        nfproto(v6),
                        meter(name, v6, None, cc),
                        Statement::Return(None),
                    ],
                );
            }
            b.rule(&c, vec![deny(DenyReason::MaxConns)]);
        }
        _ => {}
    }
}

/// DNAT into the mesh; no masquerade. For TCP also in the output hook, where the synproxy's SYN
/// for a validated client passes.
fn dnat(b: &mut Builder, r: &PublishRule, l4: L4) {
    for v6 in [false, true] {
        let target = if v6 {
            r.target_ipv6.to_string()
        } else {
            r.target_ipv4.to_string()
        };
        let nat = Statement::DNAT(Some(NAT {
            addr: Some(s(target)),
            family: Some(if v6 { NATFamily::IP6 } else { NATFamily::IP }),
            port: Some(Expression::Number(r.target_port as u32)),
            flags: None,
        }));
        let mut e = vec![nfproto(v6)];
        e.extend(dport(l4, r.port));
        e.push(nat.clone());
        b.rule("dnat_pre", e);
        if l4 == L4::Tcp {
            let mut e = vec![nfproto(v6)];
            e.extend(dport(l4, r.port));
            e.push(to_local());
            e.push(nat);
            b.rule("dnat_out", e);
        }
    }
}

/// Forward: only published flows cross the TUN, with the MSS clamped to it.
fn forward_policy(b: &mut Builder, cfg: &NftConfig) {
    let tun = || s(cfg.tun.clone());
    for dir in [MetaKey::Iifname, MetaKey::Oifname] {
        b.rule(
            "fwd_mesh",
            vec![eq(meta(dir), tun()), syn_flag(), mss_clamp()],
        );
    }
    for dir in [MetaKey::Oifname, MetaKey::Iifname] {
        b.rule(
            "fwd_mesh",
            vec![
                eq(meta(dir), tun()),
                m(ct("status"), Operator::IN, s("dnat")),
                Statement::Accept(None),
            ],
        );
    }
    // Connections this node forwards as an approved exit node (or to its approved subnet
    // routes): the node's own table (`homeport_node::routes_sync`) marks them at prerouting,
    // after its engine admitted them by the policy.
    b.rule(
        "fwd_mesh",
        vec![
            eq(
                ct("mark"),
                Expression::Number(homeport_node::routes_sync::CT_MARK),
            ),
            Statement::Accept(None),
        ],
    );
    for dir in [MetaKey::Iifname, MetaKey::Oifname] {
        b.rule(
            "fwd_mesh",
            vec![eq(meta(dir), tun()), Statement::Drop(None)],
        );
    }
}

/// Nothing for a target leaves by any other way than the TUN (forwarded or sent by the
/// synproxy): with the TUN gone the main routing table would send it out of the VPS. And the
/// MSS clamp for the synproxy's SYNs.
fn postrouting(b: &mut Builder, cfg: &NftConfig, rules: &[&PublishRule]) {
    let tun = || s(cfg.tun.clone());
    for v6 in [false, true] {
        let mut targets: Vec<String> = rules
            .iter()
            .map(|r| {
                if v6 {
                    r.target_ipv6.to_string()
                } else {
                    r.target_ipv4.to_string()
                }
            })
            .collect();
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            continue;
        }
        b.rule(
            "post_mesh",
            vec![
                nfproto(v6),
                eq(
                    payload(if v6 { "ip6" } else { "ip" }, "daddr"),
                    anon_set(targets.into_iter().map(s).collect()),
                ),
                m(meta(MetaKey::Oifname), Operator::NEQ, tun()),
                Statement::Drop(None),
            ],
        );
    }
    b.rule(
        "post_mesh",
        vec![eq(meta(MetaKey::Oifname), tun()), syn_flag(), mss_clamp()],
    );
}
