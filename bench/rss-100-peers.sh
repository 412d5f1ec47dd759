#!/usr/bin/env bash
# Resident memory of a homeport node whose map holds N peers (default 100).
# A coordinator runs in a namespace; N-1 extra nodes are registered through the node API by
# bench/register-peers.py (their keys exist and are proven, they never come online); one real
# `homeport up` joins and receives all of them.
# Usage (root, project root, after `cargo build --release`): bench/rss-100-peers.sh [N]
set -eu
N=${1:-100}
P=${P:-hpr}
BIN=${BIN:-target/release}
s=$(mktemp -d)
cleanup() { ip netns pids $P-a 2>/dev/null | xargs -r kill 2>/dev/null || true; sleep 0.3; ip netns del $P-a 2>/dev/null || true; rm -rf $s; }
trap cleanup EXIT
ip netns add $P-a; ip -n $P-a link set lo up
ip -n $P-a addr add 10.98.0.1/32 dev lo
ip netns exec $P-a $BIN/homeport-coordinator serve --listen 10.98.0.1:8443 --stun-listen 10.98.0.1:3478 --state-dir $s/coord >$s/coord.log 2>&1 &
for i in $(seq 100); do PIN=$($BIN/homeport-coordinator pin --state-dir $s/coord 2>/dev/null) && break; sleep 0.1; done
KEY=$($BIN/homeport-coordinator authkey create --reusable --state-dir $s/coord)
export HOMEPORT_AUTHKEY=$KEY   # never in argv: every local user can read that
ip netns exec $P-a python3 "$(dirname "$0")/register-peers.py" https://10.98.0.1:8443 $((N - 1))
ip netns exec $P-a $BIN/homeport up --coordinator https://10.98.0.1:8443 --pin "$PIN" \
  --hostname me --state-dir $s/me --tun hpr0 >$s/me.log 2>&1 &
for i in $(seq 100); do n=$($BIN/homeport status --json --state-dir $s/me 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))' 2>/dev/null || echo 0); [ "$n" -ge $((N - 1)) ] && break; sleep 0.2; done
sleep 2
pid=$(pgrep -f "state-dir $s/me" | head -1)
echo "peers in map: $n"
echo "homeport RSS with $N nodes in the mesh: $(awk '/VmRSS/ {print $2, $3}' /proc/$pid/status)"
