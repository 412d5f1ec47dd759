-- Reusable auth keys may carry a maximum number of registrations (NULL: no limit). `uses` counts
-- the registrations made with a key.
ALTER TABLE authkeys ADD COLUMN max_uses BIGINT;
ALTER TABLE authkeys ADD COLUMN uses BIGINT NOT NULL DEFAULT 0;
