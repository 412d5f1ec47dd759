//! The OpenAPI 3 description served at `GET /api/v1/openapi.json` (hand-written; the types are
//! in `homeport_proto::api`).

use homeport_proto::api;
use serde_json::{Value, json};

fn err(desc: &str) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApiError"}}}})
}

fn body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn ok(desc: &str, schema: Value) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": schema}}})
}

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn arr(name: &str) -> Value {
    json!({"type": "array", "items": r(name)})
}

// The patterns below state exactly what the server accepts (coordinator/tests/spec.rs runs
// schemathesis against them both ways: valid data accepted, invalid data refused).

/// A port 1-65535 in decimal, leading zeros allowed (as Rust's parsers allow them).
const PORT: &str =
    "0*(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})";
/// An IPv4 octet without leading zeros.
const OCTET: &str = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
/// The first octet of a usable endpoint address: not 0/8, 127/8 or 224.0.0.0 and above
/// (multicast, reserved, broadcast).
const OCTET_ENDPOINT: &str =
    "(22[0-3]|2[01][0-9]|1[3-9][0-9]|12[0-689]|1[01][0-9]|[1-9][0-9]|[1-9])";
const HEX: &str = "[0-9a-fA-F]{1,4}";

fn ipv4() -> String {
    format!("{OCTET}(\\.{OCTET}){{3}}")
}

/// Every textual IPv6 form (without an embedded IPv4 tail).
fn ipv6() -> String {
    let h = HEX;
    [
        format!("({h}:){{7}}{h}"),
        format!("({h}:){{1,7}}:"),
        format!("({h}:){{1,6}}:{h}"),
        format!("({h}:){{1,5}}(:{h}){{1,2}}"),
        format!("({h}:){{1,4}}(:{h}){{1,3}}"),
        format!("({h}:){{1,3}}(:{h}){{1,4}}"),
        format!("({h}:){{1,2}}(:{h}){{1,5}}"),
        format!("{h}:(:{h}){{1,6}}"),
        format!(":((:{h}){{1,7}}|:)"),
    ]
    .join("|")
}

/// IPv6 addresses in 2000::/3 (global unicast): the first group is written out and is
/// 2000-3fff.
fn ipv6_global() -> String {
    let (h, f) = (HEX, "[23][0-9a-fA-F]{3}");
    let mut alts = vec![format!("{f}(:{h}){{7}}"), format!("{f}(:{h}){{0,6}}::")];
    for k in 1..=6 {
        alts.push(format!("{f}(:{h}){{{}}}::{h}(:{h}){{0,{}}}", k - 1, 6 - k));
    }
    alts.join("|")
}

/// `ip:port` / `[ipv6]:port` of a usable endpoint candidate.
fn endpoint_addr() -> String {
    format!(
        "^({OCTET_ENDPOINT}(\\.{OCTET}){{3}}|\\[({})\\]):{PORT}$",
        ipv6_global()
    )
}

/// An address or a network (`address/length`).
fn cidr() -> String {
    format!(
        "^({v4}(/(3[0-2]|[12]?[0-9]))?|({v6})(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?)$",
        v4 = ipv4(),
        v6 = ipv6()
    )
}

fn port_spec() -> String {
    format!("^([Ii][Cc][Mm][Pp]|(([Tt][Cc][Pp]|[Uu][Dd][Pp]):)?(\\*|\\+?{PORT}(-\\+?{PORT})?))$")
}

const SELECTOR: &str = "^(\\*|(tag:|node:)?[A-Za-z0-9_-]+)$";
const TAG: &str = "^(tag:)?[A-Za-z0-9_-]{1,63}$";
/// What `hostname` must contain: an ASCII letter or digit among the first 63 characters of its
/// first label (the node name is made from them).
const HOSTNAME: &str = "^[^.]{0,62}[A-Za-z0-9]";
/// Standard base64 of 32 bytes: 43 characters (the last one with its low two bits zero) and `=`.
const KEY: &str = "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$";
const ID_MAX: i64 = i64::MAX;

fn id_param() -> Value {
    json!([{"name": "id", "in": "path", "required": true,
        "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": ID_MAX}}])
}

fn retry_after(desc: &str) -> Value {
    let mut e = err(desc);
    e["headers"] = json!({"Retry-After": {"description": "Seconds to wait before trying again", "required": true,
        "schema": {"type": "integer", "minimum": 1}}});
    e
}

pub fn document() -> Value {
    let admin = json!([{"adminToken": []}]);
    let node = json!([{"nodeCredential": []}]);
    let bad_token = err("Missing or wrong admin token");
    let bad_cred =
        err("Missing or unknown node credential (the node was removed or registered again)");
    let too_large = err("Body over 64 KiB");
    let mut paths = serde_json::Map::new();
    paths.insert(api::PATH_CHALLENGE.into(), json!({"post": {
        "summary": "A fresh single-use challenge (valid 60 s) and the coordinator key that register proves the node key against",
        "tags": ["node"],
        "responses": {"200": ok("The challenge", r("RegisterChallenge"))}}}));
    paths.insert(api::PATH_REGISTER.into(), json!({"post": {
        "summary": "Register a node (or re-register the same public key: a new credential, name, addresses and tags unchanged) with an auth key and a proof of possession of the node's private key",
        "tags": ["node"],
        "requestBody": body("RegisterRequest"),
        "responses": {"200": ok("Registered; the credential is shown only here", r("RegisterResponse")),
            "400": err("Bad body (names the field)"),
            "401": err("bad_proof (missing or wrong proof), bad_challenge (unknown, used or expired challenge), or an unknown, revoked, expired or used-up auth key"),
            "409": err("The mesh prefix has no free address left"), "413": too_large}}}));
    paths.insert(api::PATH_MAP.into(), json!({"get": {
        "summary": "The node's map stream: NDJSON, one MapMessage per line; first full, then deltas, keepalives at least every 15 s",
        "tags": ["node"], "security": node,
        "responses": {"200": {"description": "Stream of MapMessage lines", "content": {"application/x-ndjson": {"schema": r("MapMessage")}}},
            "401": bad_cred}}}));
    paths.insert(api::PATH_ENDPOINTS.into(), json!({"post": {
        "summary": "Report the node's endpoint candidates (replaces the previous report). Rate-limited per node.",
        "tags": ["node"], "security": node, "requestBody": body("EndpointReport"),
        "responses": {"204": {"description": "Stored and sent to peers"}, "400": err("Bad candidate (names it) or too many"),
            "401": bad_cred, "413": too_large,
            "429": retry_after("Too many reports from this node")}}}));
    paths.insert(api::PATH_PROBE.into(), json!({"post": {
        "summary": "Ask the coordinator to tell a peer to probe this node now. Rate-limited per node.",
        "tags": ["node"], "security": node, "requestBody": body("ProbeAsk"),
        "responses": {"204": {"description": "Forwarded (if the peer is online)"}, "400": err("Bad body"),
            "401": bad_cred, "403": err("The access policy lets no traffic flow between the two nodes"),
            "404": err("No such peer (or the node itself)"), "413": too_large, "429": retry_after("Too many probe asks from this node")}}}));
    paths.insert(api::PATH_RELAY_TCP.into(), json!({"get": {
        "summary": "The relay over TCP/TLS (for networks that block UDP): needs `Connection: Upgrade` and `Upgrade: homeport-relay`; the first frame must be a relay BIND (it authenticates the node)",
        "tags": ["node"],
        "parameters": [{"name": "Upgrade", "in": "header", "required": true,
            "schema": {"type": "string", "pattern": "^[Hh][Oo][Mm][Ee][Pp][Oo][Rr][Tt]-[Rr][Ee][Ll][Aa][Yy]$"},
            "description": "homeport-relay (any case)"}],
        "responses": {"101": {"description": "Switched to the relay protocol"},
            "400": err("Not an upgrade request"), "404": err("No relay runs on this coordinator"),
            "503": retry_after("All TCP relay connections are in use")}}}));
    paths.insert(
        api::PATH_OPENAPI.into(),
        json!({"get": {
        "summary": "This document", "tags": ["meta"],
        "responses": {"200": ok("OpenAPI 3 document", json!({"type": "object"}))}}}),
    );
    paths.insert(api::PATH_ADMIN_AUTHKEYS.into(), json!({
        "post": {"summary": "Create an auth key", "tags": ["admin"], "security": admin, "requestBody": body("AuthKeyCreate"),
            "responses": {"201": ok("The key (shown once)", r("AuthKeyCreated")), "400": err("Bad tag, lifetime or max_uses"),
                "401": bad_token, "413": too_large}},
        "get": {"summary": "List auth keys", "tags": ["admin"], "security": admin,
            "responses": {"200": ok("All keys (hashed; only a prefix is shown)", arr("AuthKeyInfo")), "401": bad_token}}}));
    paths.insert(format!("{}/{{id}}", api::PATH_ADMIN_AUTHKEYS), json!({
        "delete": {"summary": "Revoke an auth key", "tags": ["admin"], "security": admin,
            "parameters": id_param(),
            "responses": {"204": {"description": "Revoked"}, "400": err("Bad id"), "401": bad_token, "404": err("No such key")}}}));
    paths.insert(
        api::PATH_ADMIN_NODES.into(),
        json!({
        "get": {"summary": "List nodes", "tags": ["admin"], "security": admin,
            "responses": {"200": ok("All nodes", arr("NodeInfo")), "401": bad_token}}}),
    );
    paths.insert(format!("{}/{{name}}", api::PATH_ADMIN_NODES), json!({
        "delete": {"summary": "Remove a node: its credential stops working and its stream closes at once; its publish rules are removed",
            "tags": ["admin"], "security": admin,
            "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
            "responses": {"204": {"description": "Removed"}, "401": bad_token, "404": err("No such node")}}}));
    paths.insert(api::PATH_ADMIN_PUBLISH.into(), json!({
        "post": {"summary": "Publish a port on an exit node to a target node", "tags": ["admin"], "security": admin,
            "requestBody": body("PublishRequest"),
            "responses": {"201": ok("The stored rule", r("PublishRule")), "400": err("Bad port, proto, to or allow entry"),
                "401": bad_token, "404": err("Unknown exit or target node"), "409": err("Port already published on that exit"),
                "413": too_large}},
        "get": {"summary": "List publish rules", "tags": ["admin"], "security": admin,
            "responses": {"200": ok("All rules", arr("PublishRule")), "401": bad_token}}}));
    paths.insert(format!("{}/{{id}}", api::PATH_ADMIN_PUBLISH), json!({
        "delete": {"summary": "Remove a publish rule", "tags": ["admin"], "security": admin,
            "parameters": id_param(),
            "responses": {"204": {"description": "Removed"}, "400": err("Bad id"), "401": bad_token, "404": err("No such rule")}}}));
    paths.insert(homeport_proto::exit::PATH_EXIT_ANNOUNCE.into(), json!({"post": {
        "summary": "This node runs an exit (homeport-exit): its public addresses and country database. Publish rules are accepted only on such nodes.",
        "tags": ["node"], "security": node, "requestBody": body("ExitAnnounce"),
        "responses": {"204": {"description": "Stored"}, "400": err("Bad body (names the field)"),
            "401": bad_cred, "413": too_large}}}));
    paths.insert(
        homeport_proto::exit::PATH_ADMIN_EXITS.into(),
        json!({
        "get": {"summary": "The nodes that run an exit", "tags": ["admin"], "security": admin,
            "responses": {"200": ok("Every exit", arr("ExitInfo")), "401": bad_token}}}),
    );
    paths.insert(homeport_proto::invite::PATH_ADMIN_INVITES.into(), json!({
        "post": {"summary": "Create an invite link to a published port (restricted by --allow or --country) on an exit that serves invite pages", "tags": ["admin"], "security": admin,
            "requestBody": body("InviteCreate"),
            "responses": {"201": ok("The link (its token is shown only here)", r("InviteCreated")),
                "400": err("Bad name, days, uses or proto; a port open to everyone; an exit without invite pages"),
                "401": bad_token, "404": err("No publish rule for that port"), "413": too_large}},
        "get": {"summary": "List invites (no tokens)", "tags": ["admin"], "security": admin,
            "responses": {"200": ok("Every invite", arr("InviteInfo")), "401": bad_token}}}));
    paths.insert(format!("{}/{{id}}", homeport_proto::invite::PATH_ADMIN_INVITES), json!({
        "delete": {"summary": "Revoke an invite: the addresses it added lose access", "tags": ["admin"], "security": admin,
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "format": "int64", "minimum": 1}}],
            "responses": {"200": ok("The revoked invite", r("InviteInfo")), "400": err("Bad id"), "401": bad_token, "404": err("No such invite")}}}));
    paths.insert(homeport_proto::invite::PATH_NODE_INVITE_REDEEM.into(), json!({"post": {
        "summary": "The exit that served an invite page lets the browser's address in",
        "tags": ["node"], "security": node, "requestBody": body("InviteRedeem"),
        "responses": {"200": ok("The address is let in until `until`", r("Grant")), "400": err("Bad body"),
            "401": bad_cred, "404": err("No such invite on this exit"), "409": err("The invite's uses are spent on other addresses"),
            "410": err("Revoked or expired"), "413": too_large}}}));
    paths.insert(
        homeport_proto::invite::PATH_NODE_INVITES.into(),
        json!({"get": {
        "summary": "The live invite grants on the calling exit",
        "tags": ["node"], "security": node,
        "responses": {"200": ok("Grants", arr("Grant")), "401": bad_cred}}}),
    );
    paths.insert(api::PATH_ADMIN_POLICY.into(), json!({
        "get": {"summary": "The access policy ({\"rules\":[]} = none: every node may reach every node)", "tags": ["admin"], "security": admin,
            "responses": {"200": ok("The policy", r("Policy")), "401": bad_token}},
        "put": {"summary": "Replace the access policy (no rules = allow all)", "tags": ["admin"], "security": admin, "requestBody": body("Policy"),
            "responses": {"200": ok("The stored policy", r("Policy")), "400": err("Names the bad rule, selector or port"),
                "401": bad_token, "413": too_large}}}));

    let key = json!({"type": "string", "pattern": KEY,
        "description": "WireGuard public key: 44 characters of standard base64 encoding 32 bytes"});
    let id = json!({"type": "integer", "format": "int64", "minimum": 1, "maximum": ID_MAX});
    let u32_opt = json!({"type": "integer", "format": "int64", "minimum": 1, "maximum": u32::MAX, "nullable": true});
    let port = json!({"type": "integer", "minimum": 1, "maximum": 65535});
    let name = json!({"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"});
    let addrs = json!({"type": "object", "required": ["ipv4", "ipv6"], "properties": {"ipv4": {"type": "string", "format": "ipv4"}, "ipv6": {"type": "string", "format": "ipv6"}}});
    let endpoint = json!({"type": "object", "required": ["addr", "kind"], "properties": {
        "addr": {"type": "string", "pattern": endpoint_addr(),
            "description": "ip:port or [ipv6]:port: a unicast IPv4 address outside 0.0.0.0/8, 127.0.0.0/8 and 224.0.0.0/3 (multicast, reserved, broadcast), or a global unicast IPv6 address (2000::/3); port 1-65535"},
        "kind": {"type": "string", "enum": ["local", "stun", "static"]}}});
    let strings = json!({"type": "array", "items": {"type": "string"}});
    let tags = json!({"type": "array", "items": {"type": "string", "pattern": TAG}});
    let selectors = json!({"type": "array", "minItems": 1, "items": {"type": "string", "pattern": SELECTOR,
        "description": "\"*\", \"tag:NAME\", \"node:NAME\" or a node name"}});
    let b64_32 = "^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$";
    let register_request = json!({"type": "object", "required": ["authkey", "public_key", "hostname", "challenge", "proof"], "additionalProperties": false,
        "properties": {"authkey": {"type": "string"}, "public_key": key,
            "hostname": {"type": "string", "pattern": HOSTNAME,
                "description": "The node name is made from its first label: letters and digits kept (lowercased), other characters become '-', at most 63"},
            "capver": {"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX},
            "previous_ipv4": {"type": "string", "format": "ipv4", "nullable": true,
                "description": "The address this key had before it was removed: given back if still free"},
            "challenge": {"type": "string", "pattern": b64_32, "description": "From POST /api/v1/node/challenge: 32 bytes, base64url without padding"},
            "proof": {"type": "string", "pattern": b64_32, "description": "HMAC-SHA256 (base64url without padding), see homeport_proto::register"}}});
    let register_challenge = json!({"type": "object", "required": ["challenge", "coordinator_key", "expires_in"],
        "properties": {"challenge": {"type": "string", "pattern": b64_32}, "coordinator_key": key, "expires_in": {"type": "integer", "minimum": 1}}});
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {"title": "homeport coordinator API", "version": env!("CARGO_PKG_VERSION"),
            "description": "Node API (credential from register) and admin API (admin token over HTTPS, no token over the local admin socket). Every error is an ApiError. Every constraint the server enforces is stated here."},
        "paths": Value::Object(paths),
        "components": {
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "The admin token printed on first start"},
                "nodeCredential": {"type": "http", "scheme": "bearer", "description": "The credential from register"}
            },
            "schemas": {
                "ApiError": {"type": "object", "required": ["error", "detail"], "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}},
                "MeshAddrs": addrs,
                "Endpoint": endpoint,
                "RegisterRequest": register_request,
                "RegisterResponse": {"type": "object", "required": ["node_id", "name", "addrs", "prefix_v4", "prefix_v6", "credential", "capver"],
                    "properties": {"node_id": id, "name": name, "addrs": r("MeshAddrs"),
                    "prefix_v4": {"type": "string"}, "prefix_v6": {"type": "string"}, "credential": {"type": "string"}, "capver": {"type": "integer"}}},
                "EndpointReport": {"type": "object", "required": ["endpoints"], "additionalProperties": false,
                    "properties": {"endpoints": {"type": "array", "maxItems": api::MAX_ENDPOINTS, "items": r("Endpoint")}}},
                "ProbeAsk": {"type": "object", "required": ["peer"], "additionalProperties": false, "properties": {"peer": id}},
                "MapMessage": {"type": "object", "description": "See homeport_proto::map::MapMessage for the delta rule of each field",
                    "properties": {"version": {"type": "integer"}, "full": {"type": "boolean"}, "self_node": {"type": "object"},
                        "peers": {"type": "array", "items": {"type": "object"}}, "peers_removed": {"type": "array", "items": {"type": "integer"}},
                        "filter": {"type": "object"}, "publish": arr("PublishRule"), "relays": {"type": "array", "items": {"type": "object"}},
                        "coordinators": {"type": "array", "items": {"type": "object", "required": ["url", "pin"],
                            "properties": {"url": {"type": "string"}, "pin": {"type": "string"}}}},
                        "probe_requests": {"type": "array", "items": {"type": "object"}}}},
                "AuthKeyCreate": {"type": "object", "additionalProperties": false, "properties": {
                    "reusable": {"type": "boolean", "description": "Any number of registrations (default: one)"},
                    "expires_secs": {"type": "integer", "format": "int64", "minimum": 1, "maximum": api::MAX_EXPIRES_SECS, "nullable": true,
                        "description": "Lifetime in seconds (at most 100 years); null or absent: never expires"},
                    "tags": tags,
                    "max_uses": {"type": "integer", "format": "int64", "minimum": 1, "maximum": api::MAX_AUTHKEY_USES, "nullable": true,
                        "description": "How many registrations the key allows, whatever `reusable` says; null or absent: one, or no limit when reusable"}}},
                "AuthKeyCreated": {"type": "object", "required": ["id", "key"], "properties": {"id": id, "key": {"type": "string"}}},
                "AuthKeyInfo": {"type": "object", "required": ["id", "prefix", "reusable", "tags", "created_at", "expires_at", "used", "revoked", "max_uses", "uses"],
                    "properties": {"id": id, "prefix": {"type": "string"}, "reusable": {"type": "boolean"},
                    "tags": strings, "created_at": {"type": "integer"}, "expires_at": {"type": "integer", "nullable": true},
                    "used": {"type": "boolean"}, "revoked": {"type": "boolean"},
                    "max_uses": {"type": "integer", "nullable": true}, "uses": {"type": "integer", "minimum": 0}}},
                "NodeInfo": {"type": "object", "required": ["id", "name", "public_key", "addrs", "tags", "online", "last_seen", "endpoints", "created_at"],
                    "properties": {"id": id, "name": name, "public_key": key,
                    "addrs": r("MeshAddrs"), "tags": strings, "online": {"type": "boolean"}, "last_seen": {"type": "integer", "nullable": true},
                    "endpoints": arr("Endpoint"), "created_at": {"type": "integer"}}},
                "PublishRequest": {"type": "object", "required": ["exit", "port", "to"], "additionalProperties": false,
                    "properties": {"exit": {"type": "string", "description": "Name of the exit node"}, "port": port,
                        "proto": {"type": "string", "pattern": "^([Tt][Cc][Pp]|[Uu][Dd][Pp])$", "default": "tcp"},
                        "to": {"type": "string", "pattern": format!("^[\\s\\S]*:{PORT}$"), "description": "NODE:PORT, e.g. home:32400"},
                        "allow": {"type": "array", "items": {"type": "string", "pattern": cidr(), "description": "An address or a network (CIDR)"}},
                        "rate_per_minute": u32_opt, "max_conns": u32_opt}},
                "PublishRule": {"type": "object", "required": ["id", "exit", "exit_name", "proto", "port", "target", "target_name", "target_ipv4", "target_ipv6", "target_port", "guards"],
                    "properties": {"id": id, "exit": id, "exit_name": name,
                    "proto": {"type": "string", "enum": ["tcp", "udp"]}, "port": port, "target": id, "target_name": name,
                    "target_ipv4": {"type": "string", "format": "ipv4"}, "target_ipv6": {"type": "string", "format": "ipv6"}, "target_port": port,
                    "guards": {"type": "object", "properties": {"allow": strings, "rate_per_minute": {"type": "integer"}, "max_conns": {"type": "integer"}}}}},
                "Policy": {"type": "object", "additionalProperties": false, "properties": {"rules": {"type": "array", "items": {"type": "object",
                    "required": ["from", "to"], "additionalProperties": false,
                    "properties": {"from": selectors, "to": selectors,
                        "ports": {"type": "array", "items": {"type": "string", "pattern": port_spec(),
                            "description": "\"*\", a port or range (8000-8100), optionally tcp:/udp:, or icmp; default [\"*\"]"}}}}}}}
            }
        }
    });
    // Added here: one more entry in the literal above exceeds json!'s macro recursion limit.
    doc["components"]["schemas"]["RegisterChallenge"] = register_challenge;
    status_spec(&mut doc, &admin, &node);
    routes_spec(&mut doc, &admin, &node);
    doc["components"]["schemas"]["ExitAnnounce"] = json!({"type": "object", "additionalProperties": false, "properties": {
        "public_addrs": {"type": "array", "maxItems": homeport_proto::exit::MAX_PUBLIC_ADDRS,
            "items": {"type": "string", "description": "An IPv4 or IPv6 address", "pattern": format!("^({}|{})$", ipv4(), ipv6())}},
        "country_db": {"type": "string", "nullable": true, "maxLength": homeport_proto::exit::MAX_COUNTRY_DB_LEN,
            "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$",
            "description": "The country database the exit loaded (type and date); absent without one"}}});
    doc["components"]["schemas"]["ExitInfo"] = json!({"type": "object",
        "required": ["node_id", "name", "online", "public_addrs", "announced_at"],
        "properties": {"node_id": {"type": "integer"}, "name": {"type": "string"}, "online": {"type": "boolean"},
            "public_addrs": {"type": "array", "items": {"type": "string"}},
            "country_db": {"type": "string"}, "announced_at": {"type": "integer"}}});
    doc["components"]["schemas"]["InviteCreate"] = json!({"type": "object", "required": ["port", "name", "days"], "additionalProperties": false,
        "properties": {"port": {"type": "integer", "minimum": 0, "maximum": 65535},
            "proto": {"type": "string", "nullable": true, "pattern": "^([Tt][Cc][Pp]|[Uu][Dd][Pp])$"},
            "exit": {"type": "string", "nullable": true},
            "name": {"type": "string", "minLength": 1, "maxLength": homeport_proto::invite::MAX_INVITE_NAME,
                "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$", "description": "Who it is for, e.g. alice"},
            "days": {"type": "integer", "minimum": 1, "maximum": homeport_proto::invite::MAX_INVITE_DAYS},
            "uses": {"type": "integer", "minimum": 1, "maximum": homeport_proto::invite::MAX_INVITE_USES, "nullable": true,
                "description": "How many addresses the link may let in (default 1)"}}});
    doc["components"]["schemas"]["InviteCreated"] = json!({"type": "object", "required": ["id", "link", "until"],
        "properties": {"id": {"type": "integer"}, "link": {"type": "string"}, "until": {"type": "integer"}}});
    doc["components"]["schemas"]["InviteInfo"] = json!({"type": "object",
        "required": ["id", "name", "exit", "rule", "port", "proto", "created_at", "until", "uses", "addrs", "revoked"],
        "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "exit": {"type": "string"}, "rule": {"type": "integer"},
            "port": {"type": "integer"}, "proto": {"type": "string"}, "created_at": {"type": "integer"}, "until": {"type": "integer"},
            "uses": {"type": "integer"}, "revoked": {"type": "boolean"},
            "addrs": {"type": "array", "items": {"type": "object", "required": ["addr", "added_at"],
                "properties": {"addr": {"type": "string"}, "added_at": {"type": "integer"}}}}}});
    doc["components"]["schemas"]["InviteRedeem"] = json!({"type": "object", "required": ["token", "addr"], "additionalProperties": false,
        "properties": {"token": {"type": "string"}, "addr": {"type": "string", "pattern": format!("^({}|{})$", ipv4(), ipv6())}}});
    doc["components"]["schemas"]["Grant"] = json!({"type": "object", "required": ["rule", "addr", "until", "name", "invite"],
        "properties": {"rule": {"type": "integer"}, "addr": {"type": "string"}, "until": {"type": "integer"},
            "name": {"type": "string"}, "invite": {"type": "integer"}, "port": {"type": "integer"}}});
    doc["components"]["schemas"]["ExitAnnounce"]["properties"]["invite_port"] =
        json!({"type": "integer", "minimum": 0, "maximum": 65535, "nullable": true});
    let cc = json!({"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z]{2}$",
        "description": "A two-letter ISO 3166-1 country code"}});
    let req = &mut doc["components"]["schemas"]["PublishRequest"];
    req["properties"]["country"] = cc.clone();
    req["properties"]["deny_country"] = cc;
    req["description"] = json!(
        "country and deny_country cannot both be given; a rule with either needs an exit with a country database, and every rule an exit that announced itself (GET /api/v1/admin/exits)"
    );
    doc["components"]["schemas"]["PublishRule"]["properties"]["guards"]["properties"]["countries"] =
        json!({"type": "array", "items": {"type": "string"}});
    doc["components"]["schemas"]["PublishRule"]["properties"]["guards"]["properties"]["deny_countries"] =
        json!({"type": "array", "items": {"type": "string"}});
    device_spec(&mut doc, &admin);
    doc
}

/// Plain-WireGuard devices (`homeport_proto::device`).
fn device_spec(doc: &mut Value, admin: &Value) {
    use homeport_proto::device::PATH_ADMIN_DEVICES;
    let name = json!({"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"});
    let key = json!({"type": "string", "pattern": KEY});
    let id = json!({"type": "integer", "format": "int64", "minimum": 1, "maximum": ID_MAX});
    doc["paths"][PATH_ADMIN_DEVICES] = json!({
        "post": {"summary": "Add a plain-WireGuard device reached through a node; answers its wg-quick config with a placeholder for the private key (the coordinator never sees it)",
            "tags": ["admin"], "security": admin, "requestBody": body("DeviceAdd"),
            "responses": {"201": ok("The device and its config", r("DeviceAdded")),
                "400": err("Bad name, tag or endpoint (names the field)"), "401": err("Missing or wrong admin token"),
                "404": err("No node of that name to connect through"),
                "409": err("Name or key taken, no free address, or the via node has no known public endpoint (pass endpoint)"),
                "413": err("Body over 64 KiB")}},
        "get": {"summary": "List plain-WireGuard devices", "tags": ["admin"], "security": admin,
            "responses": {"200": ok("All devices", arr("DeviceInfo")), "401": err("Missing or wrong admin token")}}});
    doc["paths"][format!("{PATH_ADMIN_DEVICES}/{{name}}")] = json!({
        "delete": {"summary": "Remove a device: its via node drops its session at once", "tags": ["admin"], "security": admin,
            "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
            "responses": {"204": {"description": "Removed"}, "401": err("Missing or wrong admin token"), "404": err("No such device")}}});
    let s = &mut doc["components"]["schemas"];
    s["DeviceAdd"] = json!({"type": "object", "required": ["name", "via", "public_key"], "additionalProperties": false,
        "properties": {"name": name, "via": {"type": "string", "description": "Name of the node the device connects to"},
            "public_key": key, "tags": {"type": "array", "items": {"type": "string", "pattern": TAG}},
            "endpoint": {"type": "string", "nullable": true, "pattern": format!("^(\\[({})\\]|[A-Za-z0-9.-]{{1,253}}):{PORT}$", ipv6()),
                "description": "HOST:PORT the device sends to: a DNS name or IPv4 address, or [IPv6]; port 1-65535 (default: the via node's public endpoint)"}}});
    s["DeviceInfo"] = json!({"type": "object", "required": ["id", "name", "via", "via_name", "public_key", "addrs", "tags", "created_at"],
        "properties": {"id": id, "name": name, "via": id, "via_name": name, "public_key": key, "addrs": r("MeshAddrs"),
            "tags": {"type": "array", "items": {"type": "string"}}, "created_at": {"type": "integer"}}});
    s["DeviceAdded"] = json!({"type": "object", "required": ["device", "config"],
        "properties": {"device": r("DeviceInfo"), "config": {"type": "string", "description": "wg-quick config"}}});
}

/// The status reports of nodes and exits and the admin overview made of them
/// (`homeport_proto::status`; the dashboard polls the overview).
fn status_spec(doc: &mut Value, admin: &Value, node: &Value) {
    use homeport_proto::status as s;
    let text = |max: usize| json!({"type": "string", "maxLength": max});
    let text_opt = |max: usize| json!({"type": "string", "maxLength": max, "nullable": true});
    let u64_ = json!({"type": "integer", "minimum": 0, "maximum": u64::MAX});
    let u64_opt = json!({"type": "integer", "minimum": 0, "maximum": u64::MAX, "nullable": true});
    let i64_ =
        json!({"type": "integer", "format": "int64", "minimum": i64::MIN, "maximum": i64::MAX});
    let peer = json!({"type": "object", "required": ["peer", "path", "rx_bytes", "tx_bytes"], "additionalProperties": false,
        "properties": {"peer": i64_, "path": {"type": "string", "enum": ["none", "direct", "relay"]},
            "addr": text_opt(s::MAX_REPORT_TEXT), "reason": text_opt(s::MAX_REPORT_TEXT),
            "last_handshake_secs_ago": u64_opt, "rx_bytes": u64_, "tx_bytes": u64_}});
    let node_report = json!({"type": "object", "required": ["version", "peers"], "additionalProperties": false,
        "properties": {"version": text(s::MAX_REPORT_TEXT),
            "peers": {"type": "array", "maxItems": s::MAX_REPORT_PEERS, "items": r("PeerPathReport")}}});
    let live = json!({"type": "object", "required": ["rule", "source", "bytes_in", "bytes_out"], "additionalProperties": false,
        "properties": {"rule": i64_, "source": text(s::MAX_REPORT_TEXT), "bytes_in": u64_, "bytes_out": u64_,
            "duration_secs": u64_opt}});
    let audit_line = json!({"type": "object", "required": ["time", "source", "rule", "verdict"], "additionalProperties": false,
        "properties": {"time": text(s::MAX_REPORT_TEXT), "source": text(s::MAX_REPORT_TEXT), "rule": i64_,
            "verdict": text(s::MAX_REPORT_TEXT), "bytes_in": u64_opt, "bytes_out": u64_opt,
            "duration_s": {"type": "number", "nullable": true}, "packets": u64_opt}});
    let exit_report = json!({"type": "object", "required": ["version", "rules_applied", "live", "recent"], "additionalProperties": false,
        "properties": {"version": text(s::MAX_REPORT_TEXT),
            "rules_applied": {"type": "array", "maxItems": s::MAX_REPORT_RULES, "items": i64_},
            "error": text_opt(s::MAX_REPORT_ERROR),
            "live": {"type": "array", "maxItems": s::MAX_REPORT_LIVE, "items": r("LiveConn")},
            "live_omitted": u64_,
            "recent": {"type": "array", "maxItems": s::MAX_REPORT_RECENT, "items": r("AuditLine")}}});
    let overview = json!({"type": "object",
        "required": ["coordinator_version", "join_url", "pin", "now", "nodes", "publish", "relayed_paths", "direct_paths"],
        "properties": {"coordinator_version": {"type": "string"}, "join_url": {"type": "string", "nullable": true},
            "pin": {"type": "string", "nullable": true}, "now": {"type": "integer"},
            "nodes": {"type": "array", "description": "NodeInfo plus version, reported_secs_ago, peers (PeerPathReport plus peer_name) and exit (version, reported_secs_ago, rules_in_sync, error)",
                "items": {"type": "object", "required": ["id", "name", "addrs", "online", "version", "reported_secs_ago", "peers", "exit"]}},
            "publish": {"type": "array", "description": "PublishRule plus applied (null: the exit has not reported), live (LiveConn plus label: the allow-list entry that let the viewer in) and recent (AuditLine)",
                "items": {"type": "object", "required": ["id", "exit_name", "port", "target_name", "target_port", "applied", "live", "recent"]}},
            "relayed_paths": {"type": "integer", "minimum": 0}, "direct_paths": {"type": "integer", "minimum": 0}}});
    let bad_cred =
        err("Missing or unknown node credential (the node was removed or registered again)");
    let paths = doc["paths"].as_object_mut().expect("paths is an object");
    paths.insert(s::PATH_NODE_STATUS.into(), json!({"post": {
        "summary": "Report the path to each peer (direct ip:port or relay and why), handshakes, traffic and the node's version; kept in memory for the admin overview",
        "tags": ["node"], "security": node, "requestBody": body("NodeStatusReport"),
        "responses": {"204": {"description": "Stored"}, "400": err("Bad body (names the field)"),
            "401": bad_cred.clone(), "413": err("Body over 64 KiB")}}}));
    paths.insert(s::PATH_EXIT_STATUS.into(), json!({"post": {
        "summary": "An exit reports the rules its table holds, the published connections open now and its recent audit lines",
        "tags": ["node"], "security": node, "requestBody": body("ExitStatusReport"),
        "responses": {"204": {"description": "Stored"}, "400": err("Bad body (names the field)"),
            "401": bad_cred, "413": err("Body over 64 KiB")}}}));
    paths.insert(s::PATH_ADMIN_OVERVIEW.into(), json!({"get": {
        "summary": "Everything the dashboard shows: nodes with their reported paths and versions, publish rules with their live connections and recent audit lines, the exits' health",
        "tags": ["admin"], "security": admin,
        "responses": {"200": ok("The overview", r("Overview")), "401": err("Missing or wrong admin token")}}}));
    let schemas = doc["components"]["schemas"]
        .as_object_mut()
        .expect("schemas is an object");
    schemas.insert("PeerPathReport".into(), peer);
    schemas.insert("NodeStatusReport".into(), node_report);
    schemas.insert("LiveConn".into(), live);
    schemas.insert("AuditLine".into(), audit_line);
    schemas.insert("ExitStatusReport".into(), exit_report);
    schemas.insert("Overview".into(), overview);
}

/// Subnet routes and exit nodes (`homeport_proto::routes`, `coordinator/src/routes.rs`).
fn routes_spec(doc: &mut Value, admin: &Value, node: &Value) {
    use homeport_proto::routes as rt;
    let net_pattern = format!(
        "^({v4}/(3[0-2]|[12]?[0-9])|({v6})/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))$",
        v4 = ipv4(),
        v6 = ipv6()
    );
    let net = json!({"type": "string", "pattern": net_pattern,
        "description": "A network with its host bits zero (192.168.1.0/24, fd00:1::/64); not loopback, link-local or multicast, and outside the mesh's own prefixes; 0.0.0.0/0 and ::/0 offer the node as an exit"});
    let paths = doc["paths"].as_object_mut().expect("paths is an object");
    paths.insert(rt::PATH_ROUTES.into(), json!({"post": {
        "summary": "Report the routes this node advertises now (replaces the previous report); only those the admin approved reach any map",
        "tags": ["node"], "security": node, "requestBody": body("RoutesReport"),
        "responses": {"204": {"description": "Stored; approved ones sent to the peers"},
            "400": err("Bad body (names the field)"),
            "401": err("Missing or unknown node credential"),
            "409": err("A network with host bits set, a loopback/link-local/multicast range, or one overlapping the mesh prefixes (names it)"),
            "413": err("Body over 64 KiB")}}}));
    paths.insert(rt::PATH_ADMIN_ROUTES.into(), json!({"get": {
        "summary": "Every node's advertised and approved routes", "tags": ["admin"], "security": admin,
        "responses": {"200": ok("Routes by node", arr("NodeRoutes")), "401": err("Missing or wrong admin token")}}}));
    for (path, what) in [
        (
            rt::PATH_ADMIN_ROUTES_APPROVE,
            "Approve routes the node advertises: every node that may reach them routes them to it",
        ),
        (
            rt::PATH_ADMIN_ROUTES_UNAPPROVE,
            "Withdraw approvals: every node drops the routes at once",
        ),
    ] {
        paths.insert(path.into(), json!({"post": {
            "summary": what, "tags": ["admin"], "security": admin, "requestBody": body("RouteChange"),
            "responses": {"200": ok("The node's routes now", r("NodeRoutes")),
                "400": err("Bad body (names the field)"),
                "401": err("Missing or wrong admin token"), "404": err("No such node"),
                "409": err("(approve) a route the node does not advertise"), "413": err("Body over 64 KiB")}}}));
    }
    let schemas = doc["components"]["schemas"]
        .as_object_mut()
        .expect("schemas is an object");
    schemas.insert("RoutesReport".into(), json!({"type": "object", "required": ["routes"], "additionalProperties": false,
        "properties": {"routes": {"type": "array", "maxItems": rt::MAX_ROUTES + 2, "items": net.clone()}}}));
    schemas.insert("RouteChange".into(), json!({"type": "object", "required": ["node", "routes"], "additionalProperties": false,
        "properties": {"node": {"type": "string"}, "routes": {"type": "array", "minItems": 1, "items": net.clone()}}}));
    schemas.insert("NodeRoutes".into(), json!({"type": "object", "required": ["node", "advertised", "approved"],
        "properties": {"node": {"type": "string"}, "advertised": {"type": "array", "items": {"type": "string"}},
            "approved": {"type": "array", "items": {"type": "string"}}}}));
}
