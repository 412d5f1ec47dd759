#!/usr/bin/env bash
# Mesh throughput: homeport node-to-node vs wireguard-go on the same netns pair, in one run.
# Usage (root, from the project root after `cargo build --release`): ./bench/mesh-throughput.sh [ROUNDS]
# Prints one line per measurement and, last, "ratio homeport/wireguard-go: R".
set -eu
here=$(cd "$(dirname "$0")" && pwd); . "$here/lib.sh"
need iperf3 wireguard-go wg python3
rounds=${1:-2}
s=$(mktemp -d); trap 'lab_down; rm -rf $s' EXIT
lab_pair_up
raw=$(iperf_mbps $P-a $P-b 10.99.0.2); echo "raw veth: $raw Mbit/s"
wg=0; hp=0
for r in $(seq $rounds); do
  wggo_pair_up; x=$(iperf_mbps $P-a $P-b 10.200.0.2); wggo_pair_down; echo "wireguard-go: $x Mbit/s"; wg=$((wg + x))
  homeport_pair_up $s/r$r; y=$(iperf_mbps $P-a $P-b "$IPB"); echo "homeport: $y Mbit/s"; hp=$((hp + y))
  lab_down; lab_pair_up
done
python3 -c "print(f'ratio homeport/wireguard-go: {$hp/$wg:.2f}')"
