#!/usr/bin/env bash
# One coordinator under N simulated nodes (default 1000), on loopback, printing ONE line:
# registrations/s, seconds until every node holds its full map, propagation of one endpoint
# change to every stream (p50/p99/max), coordinator RSS/peak RSS and CPU seconds, stream cuts,
# and a reconnect storm (every stream dropped at once) until every node is current again.
# The nodes are coordinator/examples/coordinator_scale.rs: real keys, the registration proof, one
# pinned TLS connection and map stream each. POLICY=sites (default: sites of 50 nodes plus one
# hub everybody reaches) or POLICY=none (no policy: every node sees every node).
# Usage (project root; builds the release coordinator and the generator):
#   bench/coordinator-scale.sh [N]
set -eu
N=${1:-1000}
POLICY=${POLICY:-sites}
cargo build --release -q -p homeport-coordinator --bin homeport-coordinator --example coordinator_scale
BIN=target/release
s=$(mktemp -d)
cleanup() { [ -n "${cpid:-}" ] && kill "$cpid" 2>/dev/null; wait 2>/dev/null; rm -rf "$s"; }
trap cleanup EXIT
# Each simulated node holds one socket, the coordinator one per node: both need N + slack fds.
ulimit -n "$(ulimit -Hn)"
RUST_LOG=${RUST_LOG:-warn} $BIN/homeport-coordinator serve --listen 127.0.0.1:0 --stun-listen 127.0.0.1:0 \
  --state-dir "$s/coord" >"$s/coord.log" 2>&1 &
cpid=$!
for _ in $(seq 100); do [ -s "$s/coord/listen.addr" ] && [ -s "$s/coord/admin.token" ] && break; sleep 0.1; done
addr=$(cat "$s/coord/listen.addr")
$BIN/examples/coordinator_scale --addr "$addr" --pin-file "$s/coord/pin" --token-file "$s/coord/admin.token" \
  --pid "$cpid" --nodes "$N" --policy "$POLICY" || { tail -20 "$s/coord.log" >&2; exit 1; }
