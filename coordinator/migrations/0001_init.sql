-- Portable SQL: runs unchanged on SQLite and PostgreSQL (through sqlx::Any).
-- Ids are allocated by the coordinator (MAX(id)+1 inside the inserting transaction) because the
-- two databases spell auto-increment differently. Booleans are BIGINT 0/1, times are unix seconds,
-- lists and objects are JSON text.

CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE authkeys (
    id BIGINT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    reusable BIGINT NOT NULL,
    tags TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    used BIGINT NOT NULL DEFAULT 0,
    revoked BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE nodes (
    id BIGINT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL UNIQUE,
    ipv4 TEXT NOT NULL UNIQUE,
    ipv6 TEXT NOT NULL UNIQUE,
    tags TEXT NOT NULL,
    credential_hash TEXT NOT NULL UNIQUE,
    authkey_id BIGINT,
    created_at BIGINT NOT NULL,
    last_seen BIGINT,
    endpoints TEXT NOT NULL
);

CREATE TABLE publish_rules (
    id BIGINT PRIMARY KEY,
    exit_id BIGINT NOT NULL,
    port BIGINT NOT NULL,
    proto TEXT NOT NULL,
    target_id BIGINT NOT NULL,
    target_port BIGINT NOT NULL,
    guards TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (exit_id, port, proto)
);

-- At most one row (id = 1).
CREATE TABLE policy (
    id BIGINT PRIMARY KEY,
    body TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
