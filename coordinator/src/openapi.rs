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

pub fn document() -> Value {
    let admin = json!([{"adminToken": []}]);
    let node = json!([{"nodeCredential": []}]);
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
            "401": err("bad_proof (missing or wrong proof), bad_challenge (unknown, used or expired challenge), or an unknown, revoked, expired or used auth key"),
            "413": err("Body over 64 KiB")}}}));
    paths.insert(api::PATH_MAP.into(), json!({"get": {
        "summary": "The node's map stream: NDJSON, one MapMessage per line; first full, then deltas, keepalives at least every 15 s",
        "tags": ["node"], "security": node,
        "responses": {"200": {"description": "Stream of MapMessage lines", "content": {"application/x-ndjson": {"schema": r("MapMessage")}}},
            "401": err("Missing or unknown credential (node removed)")}}}));
    paths.insert(api::PATH_ENDPOINTS.into(), json!({"post": {
        "summary": "Report the node's endpoint candidates (replaces the previous report)",
        "tags": ["node"], "security": node, "requestBody": body("EndpointReport"),
        "responses": {"204": {"description": "Stored and sent to peers"}, "400": err("Bad candidate"), "401": err("Bad credential")}}}));
    paths.insert(api::PATH_PROBE.into(), json!({"post": {
        "summary": "Ask the coordinator to tell a peer to probe this node now",
        "tags": ["node"], "security": node, "requestBody": body("ProbeAsk"),
        "responses": {"204": {"description": "Forwarded (if the peer is online)"}, "401": err("Bad credential"), "404": err("No such peer")}}}));
    paths.insert(
        api::PATH_OPENAPI.into(),
        json!({"get": {
        "summary": "This document", "tags": ["meta"],
        "responses": {"200": ok("OpenAPI 3 document", json!({"type": "object"}))}}}),
    );
    paths.insert(api::PATH_ADMIN_AUTHKEYS.into(), json!({
        "post": {"summary": "Create an auth key", "tags": ["admin"], "security": admin, "requestBody": body("AuthKeyCreate"),
            "responses": {"201": ok("The key (shown once)", r("AuthKeyCreated")), "400": err("Bad tag or lifetime"), "401": err("Bad admin token")}},
        "get": {"summary": "List auth keys", "tags": ["admin"], "security": admin,
            "responses": {"200": ok("All keys (hashed; only a prefix is shown)", arr("AuthKeyInfo")), "401": err("Bad admin token")}}}));
    paths.insert(format!("{}/{{id}}", api::PATH_ADMIN_AUTHKEYS), json!({
        "delete": {"summary": "Revoke an auth key", "tags": ["admin"], "security": admin,
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
            "responses": {"204": {"description": "Revoked"}, "400": err("Bad id"), "401": err("Bad admin token"), "404": err("No such key")}}}));
    paths.insert(api::PATH_ADMIN_NODES.into(), json!({
        "get": {"summary": "List nodes", "tags": ["admin"], "security": admin,
            "responses": {"200": ok("All nodes", arr("NodeInfo")), "401": err("Bad admin token")}}}));
    paths.insert(format!("{}/{{name}}", api::PATH_ADMIN_NODES), json!({
        "delete": {"summary": "Remove a node: its credential stops working and its stream closes at once; its publish rules are removed",
            "tags": ["admin"], "security": admin,
            "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
            "responses": {"204": {"description": "Removed"}, "401": err("Bad admin token"), "404": err("No such node")}}}));
    paths.insert(api::PATH_ADMIN_PUBLISH.into(), json!({
        "post": {"summary": "Publish a port on an exit node to a target node", "tags": ["admin"], "security": admin,
            "requestBody": body("PublishRequest"),
            "responses": {"201": ok("The stored rule", r("PublishRule")), "400": err("Bad port, proto, to or allow entry"),
                "401": err("Bad admin token"), "404": err("Unknown exit or target node"), "409": err("Port already published on that exit")}},
        "get": {"summary": "List publish rules", "tags": ["admin"], "security": admin,
            "responses": {"200": ok("All rules", arr("PublishRule")), "401": err("Bad admin token")}}}));
    paths.insert(format!("{}/{{id}}", api::PATH_ADMIN_PUBLISH), json!({
        "delete": {"summary": "Remove a publish rule", "tags": ["admin"], "security": admin,
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
            "responses": {"204": {"description": "Removed"}, "400": err("Bad id"), "401": err("Bad admin token"), "404": err("No such rule")}}}));
    paths.insert(api::PATH_ADMIN_POLICY.into(), json!({
        "get": {"summary": "The access policy ({\"rules\":[]} = none: every node may reach every node)", "tags": ["admin"], "security": admin,
            "responses": {"200": ok("The policy", r("Policy")), "401": err("Bad admin token")}},
        "put": {"summary": "Replace the access policy (no rules = allow all)", "tags": ["admin"], "security": admin, "requestBody": body("Policy"),
            "responses": {"200": ok("The stored policy", r("Policy")), "400": err("Names the bad rule, selector or port"), "401": err("Bad admin token")}}}));

    let key =
        json!({"type": "string", "description": "WireGuard public key, 44 characters of base64"});
    let addrs = json!({"type": "object", "required": ["ipv4", "ipv6"], "properties": {"ipv4": {"type": "string", "format": "ipv4"}, "ipv6": {"type": "string", "format": "ipv6"}}});
    let endpoint = json!({"type": "object", "required": ["addr", "kind"], "properties": {"addr": {"type": "string", "description": "ip:port"}, "kind": {"type": "string", "enum": ["local", "stun", "static"]}}});
    let strings = json!({"type": "array", "items": {"type": "string"}});
    let register_request = json!({"type": "object", "required": ["authkey", "public_key", "hostname", "challenge", "proof"], "additionalProperties": false,
        "properties": {"authkey": {"type": "string"}, "public_key": key, "hostname": {"type": "string"}, "capver": {"type": "integer"},
            "previous_ipv4": {"type": "string", "format": "ipv4"},
            "challenge": {"type": "string", "description": "From POST /api/v1/node/challenge (base64url, 32 bytes)"},
            "proof": {"type": "string", "description": "base64url HMAC-SHA256, see homeport_proto::register"}}});
    let register_challenge = json!({"type": "object", "required": ["challenge", "coordinator_key", "expires_in"],
        "properties": {"challenge": {"type": "string"}, "coordinator_key": key, "expires_in": {"type": "integer"}}});
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {"title": "homeport coordinator API", "version": env!("CARGO_PKG_VERSION"),
            "description": "Node API (credential from register) and admin API (admin token over HTTPS, no token over the local admin socket). Every error is an ApiError."},
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
                "RegisterResponse": {"type": "object", "properties": {"node_id": {"type": "integer"}, "name": {"type": "string"}, "addrs": r("MeshAddrs"),
                    "prefix_v4": {"type": "string"}, "prefix_v6": {"type": "string"}, "credential": {"type": "string"}, "capver": {"type": "integer"}}},
                "EndpointReport": {"type": "object", "required": ["endpoints"], "additionalProperties": false, "properties": {"endpoints": arr("Endpoint")}},
                "ProbeAsk": {"type": "object", "required": ["peer"], "additionalProperties": false, "properties": {"peer": {"type": "integer"}}},
                "MapMessage": {"type": "object", "description": "See homeport_proto::map::MapMessage for the delta rule of each field",
                    "properties": {"version": {"type": "integer"}, "full": {"type": "boolean"}, "self_node": {"type": "object"},
                        "peers": {"type": "array", "items": {"type": "object"}}, "peers_removed": {"type": "array", "items": {"type": "integer"}},
                        "filter": {"type": "object"}, "publish": arr("PublishRule"), "relays": {"type": "array", "items": {"type": "object"}},
                        "probe_requests": {"type": "array", "items": {"type": "object"}}}},
                "AuthKeyCreate": {"type": "object", "additionalProperties": false, "properties": {"reusable": {"type": "boolean"},
                    "expires_secs": {"type": "integer", "minimum": 1}, "tags": strings}},
                "AuthKeyCreated": {"type": "object", "properties": {"id": {"type": "integer"}, "key": {"type": "string"}}},
                "AuthKeyInfo": {"type": "object", "properties": {"id": {"type": "integer"}, "prefix": {"type": "string"}, "reusable": {"type": "boolean"},
                    "tags": strings, "created_at": {"type": "integer"}, "expires_at": {"type": "integer", "nullable": true},
                    "used": {"type": "boolean"}, "revoked": {"type": "boolean"}}},
                "NodeInfo": {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "public_key": key,
                    "addrs": r("MeshAddrs"), "tags": strings, "online": {"type": "boolean"}, "last_seen": {"type": "integer", "nullable": true},
                    "endpoints": arr("Endpoint"), "created_at": {"type": "integer"}}},
                "PublishRequest": {"type": "object", "required": ["exit", "port", "to"], "additionalProperties": false,
                    "properties": {"exit": {"type": "string"}, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "proto": {"type": "string", "enum": ["tcp", "udp"], "default": "tcp"}, "to": {"type": "string", "description": "NODE:PORT"},
                        "allow": {"type": "array", "items": {"type": "string", "description": "CIDR or address"}},
                        "rate_per_minute": {"type": "integer", "minimum": 1}, "max_conns": {"type": "integer", "minimum": 1}}},
                "PublishRule": {"type": "object", "properties": {"id": {"type": "integer"}, "exit": {"type": "integer"}, "exit_name": {"type": "string"},
                    "proto": {"type": "string"}, "port": {"type": "integer"}, "target": {"type": "integer"}, "target_name": {"type": "string"},
                    "target_ipv4": {"type": "string"}, "target_ipv6": {"type": "string"}, "target_port": {"type": "integer"},
                    "guards": {"type": "object", "properties": {"allow": strings, "rate_per_minute": {"type": "integer"}, "max_conns": {"type": "integer"}}}}},
                "Policy": {"type": "object", "additionalProperties": false, "properties": {"rules": {"type": "array", "items": {"type": "object",
                    "required": ["from", "to"], "properties": {"from": strings, "to": strings, "ports": strings}}}}}
            }
        }
    });
    // Added here: one more entry in the literal above exceeds json!'s macro recursion limit.
    doc["components"]["schemas"]["RegisterChallenge"] = register_challenge;
    doc
}
