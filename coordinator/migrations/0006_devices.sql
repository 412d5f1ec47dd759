-- Plain-WireGuard devices are rows of `nodes` with `via` set (the node they connect through), so
-- they share the nodes' unique names, keys, addresses and ids. A device's credential_hash is the
-- hash of a random token nobody was given: no one can open a map stream as a device.
ALTER TABLE nodes ADD COLUMN via BIGINT;
