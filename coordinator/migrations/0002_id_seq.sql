-- Ids are never reused: each table's counter only grows, also when its newest row is deleted
-- (MAX(id)+1 handed a deleted node's id to the next node). Seeded from what exists.
CREATE TABLE id_seq (
    name TEXT PRIMARY KEY,
    last BIGINT NOT NULL
);

INSERT INTO id_seq (name, last) SELECT 'authkeys', CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM authkeys;
INSERT INTO id_seq (name, last) SELECT 'nodes', CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM nodes;
INSERT INTO id_seq (name, last) SELECT 'publish_rules', CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM publish_rules;
