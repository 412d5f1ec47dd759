-- Subnet routes and exit nodes (portable SQL, as 0001). One row per (node, network): what the
-- node advertises now, and whether the admin approved it. A route reaches maps only when both
-- are set; an approval outlives a pause in advertising. Booleans are BIGINT 0/1.
CREATE TABLE node_routes (
    node_id BIGINT NOT NULL,
    prefix TEXT NOT NULL,
    advertised BIGINT NOT NULL DEFAULT 0,
    approved BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (node_id, prefix)
);
