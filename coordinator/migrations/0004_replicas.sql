-- Coordinator replicas sharing this database (high availability on PostgreSQL): each one's
-- public URL, TLS pin and relay, and a heartbeat; one whose heartbeat is older than
-- replicas::DEAD_AFTER is gone. `nodes.replica` is the replica holding the node's map stream
-- (NULL: none), so that every replica tells its nodes who is online.
CREATE TABLE replicas (
    url TEXT PRIMARY KEY,
    pin TEXT NOT NULL,
    relay TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat BIGINT NOT NULL
);

ALTER TABLE nodes ADD COLUMN replica TEXT;
