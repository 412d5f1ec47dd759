//! Small builders of nft expressions and statements, the [`Builder`] that collects the
//! batch, and the [`Batch`] as nft reads it.

use super::*;

pub(super) fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}
pub(super) fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}
pub(super) fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}
pub(super) fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}
pub(super) fn m(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}
pub(super) fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    m(left, Operator::EQ, right)
}
pub(super) fn anon_set(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}
pub(super) fn jump(target: String) -> Statement<'static> {
    Statement::Jump(JumpTarget {
        target: target.into(),
    })
}
pub(super) fn saddr(v6: bool) -> Expression<'static> {
    payload(if v6 { "ip6" } else { "ip" }, "saddr")
}
pub(super) fn elem_timeout(val: Expression<'static>, timeout: u32) -> Expression<'static> {
    Expression::Named(NamedExpression::Elem(Elem {
        val: Box::new(val),
        timeout: Some(timeout),
        expires: None,
        comment: None,
        counter: None,
    }))
}
/// `fib daddr type local`: addressed to this host (not broadcast, not routed through).
pub(super) fn to_local() -> Statement<'static> {
    fib_daddr_type(Operator::EQ)
}
pub(super) fn fib_daddr_type(op: Operator) -> Statement<'static> {
    let mut flags = HashSet::new();
    flags.insert(FibFlag::Daddr);
    m(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags,
        })),
        op,
        s("local"),
    )
}
pub(super) fn ct_state_new() -> Statement<'static> {
    m(ct("state"), Operator::IN, s("new"))
}
/// `meta l4proto P P dport N`
pub(super) fn dport(proto: L4, port: u16) -> [Statement<'static>; 2] {
    [
        eq(meta(MetaKey::L4proto), s(proto.as_str())),
        eq(
            payload(proto.as_str(), "dport"),
            Expression::Number(port as u32),
        ),
    ]
}
/// A per-source meter whose element times out.
pub(super) fn meter(
    name: String,
    v6: bool,
    timeout: Option<u32>,
    stmt: Statement<'static>,
) -> Statement<'static> {
    let key = match timeout {
        Some(t) => elem_timeout(saddr(v6), t),
        None => saddr(v6),
    };
    Statement::Meter(Meter {
        name: name.into(),
        key,
        stmt: Box::new(stmt),
    })
}

pub(super) struct Builder {
    pub(super) objs: Vec<nftables::schema::NfObject<'static>>,
}

impl Builder {
    pub(super) fn add(&mut self, o: NfListObject<'static>) {
        self.objs.push(nftables::schema::NfObject::CmdObject(
            nftables::schema::NfCmd::Add(o),
        ));
    }
    pub(super) fn chain(&mut self, name: &str, base: Option<(NfChainType, NfHook, i32)>) {
        let mut c = Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.to_string().into(),
            ..Chain::default()
        };
        if let Some((t, h, p)) = base {
            c._type = Some(t);
            c.hook = Some(h);
            c.prio = Some(p);
            c.policy = Some(NfChainPolicy::Accept);
        }
        self.add(NfListObject::Chain(c));
    }
    pub(super) fn rule(&mut self, chain: &str, expr: Vec<Statement<'static>>) {
        self.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: TABLE.into(),
            chain: chain.to_string().into(),
            expr: expr.into(),
            ..Rule::default()
        }));
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) fn set(
        &mut self,
        name: &str,
        set_type: SetTypeValue<'static>,
        flag: SetFlag,
        timeout: Option<u32>,
        size: Option<u32>,
        elem: Option<Vec<Expression<'static>>>,
    ) {
        let mut flags = HashSet::new();
        flags.insert(flag);
        self.add(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.to_string().into(),
            set_type,
            flags: Some(flags),
            timeout,
            size,
            elem: elem.map(Into::into),
            ..Set::default()
        })));
    }
}

pub(super) fn addr_type(v6: bool) -> SetTypeValue<'static> {
    SetTypeValue::Single(if v6 {
        SetType::Ipv6Addr
    } else {
        SetType::Ipv4Addr
    })
}
/// `address . port`
pub(super) fn addr_port_type(v6: bool) -> SetTypeValue<'static> {
    SetTypeValue::Concatenated(Cow::Owned(vec![
        if v6 {
            SetType::Ipv6Addr
        } else {
            SetType::Ipv4Addr
        },
        SetType::InetService,
    ]))
}
pub(super) fn saddr_dport(v6: bool) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        saddr(v6),
        payload("th", "dport"),
    ]))
}
pub(super) fn nfproto(v6: bool) -> Statement<'static> {
    eq(meta(MetaKey::Nfproto), s(if v6 { "ipv6" } else { "ipv4" }))
}
pub(super) fn fam(v6: bool) -> u8 {
    if v6 { 6 } else { 4 }
}
/// `tcp flags & (syn | ack | fin | rst) == syn`: a bare SYN, the opening of a connection.
pub(super) fn bare_syn() -> Statement<'static> {
    eq(
        Expression::BinaryOperation(Box::new(BinaryOperation::AND(
            payload("tcp", "flags"),
            flag_list(&["syn", "ack", "fin", "rst"]),
        ))),
        s("syn"),
    )
}
/// `iifname { lo, TUN } return` and `fib daddr type != local return`: only public traffic
/// addressed to this host goes on.
pub(super) fn public_to_local_only(b: &mut Builder, chain: &str, cfg: &NftConfig) {
    b.rule(
        chain,
        vec![
            m(
                meta(MetaKey::Iifname),
                Operator::IN,
                anon_set(vec![s("lo"), s(cfg.tun.clone())]),
            ),
            Statement::Return(None),
        ],
    );
    b.rule(
        chain,
        vec![fib_daddr_type(Operator::NEQ), Statement::Return(None)],
    );
}
pub(super) fn set_update(set: String, elem: Expression<'static>) -> Statement<'static> {
    Statement::Set(nftables::stmt::Set {
        op: SetOp::Update,
        elem,
        set: set.into(),
    })
}

pub(super) fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

/// The batch that removes homeport's table (adding it first makes the delete succeed whether or
/// not the table exists). Other tables are never touched.
pub fn removal() -> Nftables<'static> {
    let mut b = Builder { objs: Vec::new() };
    b.add(NfListObject::Table(table()));
    b.objs.push(nftables::schema::NfObject::CmdObject(
        nftables::schema::NfCmd::Delete(NfListObject::Table(table())),
    ));
    Nftables {
        objects: b.objs.into(),
    }
}

/// A ruleset batch: the `nftables` objects plus the size of every meter in it. Two gaps of the
/// `nftables` crate (0.6) are filled on serialization: its meter statement has no size field
/// (nft's JSON takes one), and it writes the notrack statement as a bare string where nft
/// expects `{"notrack": null}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub nft: Nftables<'static>,
    pub meter_size: u32,
}

impl serde::Serialize for Batch {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut v = serde_json::to_value(&self.nft).map_err(serde::ser::Error::custom)?;
        fix_for_nft(&mut v, self.meter_size);
        v.serialize(ser)
    }
}

/// Sets `"size": n` on every `meter` statement inside `v`, writes each `notrack` statement
/// of a rule as nft reads it, and puts synproxy flags in a fixed order.
pub(super) fn fix_for_nft(v: &mut serde_json::Value, n: u32) {
    match v {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::Object(m)) = o.get_mut("meter") {
                m.insert("size".into(), n.into());
            }
            // Flags come from a HashSet: sort them, so the same ruleset is the same JSON.
            if let Some(serde_json::Value::Array(f)) =
                o.get_mut("synproxy").and_then(|s| s.get_mut("flags"))
            {
                f.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            }
            if let Some(serde_json::Value::Array(expr)) = o.get_mut("expr") {
                for st in expr.iter_mut().filter(|st| st.as_str() == Some("notrack")) {
                    *st = serde_json::json!({ "notrack": null });
                }
            }
            for x in o.values_mut() {
                fix_for_nft(x, n);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| fix_for_nft(x, n)),
        _ => {}
    }
}

/// `tcp flags syn`
pub(super) fn syn_flag() -> Statement<'static> {
    m(payload("tcp", "flags"), Operator::IN, s("syn"))
}
/// `tcp option maxseg size set rt mtu`
pub(super) fn mss_clamp() -> Statement<'static> {
    Statement::Mangle(Mangle {
        key: Expression::Named(NamedExpression::TcpOption(TcpOption {
            name: "maxseg".into(),
            field: Some("size".into()),
        })),
        value: Expression::Named(NamedExpression::RT(RT {
            key: RTKey::MTU,
            family: None,
        })),
    })
}

/// A flag mask `syn | ack | ...` as nft's JSON writes it: a plain list.
pub(super) fn flag_list(items: &[&'static str]) -> Expression<'static> {
    Expression::List(items.iter().map(|i| s(*i)).collect())
}
