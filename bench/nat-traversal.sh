#!/usr/bin/env bash
# NAT traversal figures, in one run (release build):
#   1. time from both nodes started to the first direct path through a double NAT (home behind a
#      carrier NAT and a home router, laptop behind another NAT): median of ROUNDS (default 10)
#   2. relayed vs direct throughput on that same topology (direct UDP between the two ISPs
#      blocked for the relayed run, so the coordinator's relay carries it), and over the relay's
#      TCP/TLS fallback (no UDP at all between the networks)
# Usage (root, project root, after `cargo build --release --bins`): bench/nat-traversal.sh [ROUNDS]
set -eu
rounds=${1:-10}
P=${P:-hpn}
BIN=${BIN:-target/release}
SECS=${SECS:-8}
s=$(mktemp -d)

down() {
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
  done
  sleep 0.3
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do ip netns del "$ns"; done
}
trap 'down; rm -rf $s' EXIT

x() { ip netns exec "$P-$1" "${@:2}"; }
link() { # link A A_CIDR B B_CIDR IFA IFB
  ip link add "$5" netns "$P-$1" type veth peer name "$6" netns "$P-$3"
  [ -n "$2" ] && ip -n "$P-$1" addr add "$2" dev "$5"
  [ -n "$4" ] && ip -n "$P-$3" addr add "$4" dev "$6"
  ip -n "$P-$1" link set "$5" up; ip -n "$P-$3" link set "$6" up
}
nat() { x "$1" nft -f - <<EOF
table ip nat {
  chain post {
    type nat hook postrouting priority srcnat;
    oifname "$2" masquerade
  }
}
EOF
}

n_lab=0
lab_up() {
  down
  n_lab=$((n_lab + 1)); c="$s/coord$n_lab"
  for h in net vps carrier router home isp2 laptop; do ip netns add "$P-$h"; ip -n "$P-$h" link set lo up; done
  for h in net carrier router isp2; do x $h sysctl -qw net.ipv4.ip_forward=1; done
  link net 198.51.100.1/24 vps 198.51.100.10/24 n0 v0
  link net 203.0.113.1/24 carrier 203.0.113.2/24 n1 c0
  link net 192.0.2.129/30 isp2 192.0.2.130/30 n2 i0
  link carrier 100.64.0.1/24 router 100.64.0.2/24 c1 r0
  link router 10.10.1.1/24 home 10.10.1.2/24 r1 h0
  link isp2 100.64.9.1/24 laptop 100.64.9.2/24 i1 l0
  x vps ip route add default via 198.51.100.1
  x carrier ip route add default via 203.0.113.1
  x isp2 ip route add default via 192.0.2.129
  x router ip route add default via 100.64.0.1
  x home ip route add default via 10.10.1.1
  x laptop ip route add default via 100.64.9.1
  nat carrier c0; nat router r0; nat isp2 i0
  x vps "$BIN/homeport-coordinator" serve --listen 198.51.100.10:8443 --stun-listen 198.51.100.10:3478 \
    --state-dir "$c" >"$c.log" 2>&1 &
  for _ in $(seq 100); do PIN=$("$BIN/homeport-coordinator" pin --state-dir "$c" 2>/dev/null) && break; sleep 0.1; done
  KEY=$("$BIN/homeport-coordinator" authkey create --reusable --state-dir "$c")
  export HOMEPORT_AUTHKEY=$KEY   # never in argv: every local user can read that
}

nodes_up() { # $1 = run dir
  for h in home laptop; do
    x $h "$BIN/homeport" up --coordinator https://198.51.100.10:8443 --pin "$PIN" \
      --hostname $h --state-dir "$1/$h" --tun $P-t >"$1/$h.log" 2>&1 &
  done
}

path_kind() { "$BIN/homeport" status --json --state-dir "$1/laptop" 2>/dev/null |
  python3 -c 'import json,sys; print([p for p in json.load(sys.stdin)["peers"] if p["name"] == "home"][0]["path"]["kind"])' 2>/dev/null || echo none; }

times=()
for r in $(seq "$rounds"); do
  lab_up
  d="$s/r$r"; mkdir -p "$d"
  t0=$(date +%s.%N)
  nodes_up "$d"
  t=""
  for _ in $(seq 400); do
    if [ "$(path_kind "$d")" = direct ]; then t=$(python3 -c "import time; print(round(time.time() - $t0, 2))"); break; fi
    sleep 0.05
  done
  echo "round $r: direct path after ${t:-timeout (20 s)} s"
  times+=("${t:-20}")
done
python3 -c "import statistics,sys; print(f'time to direct path through double NAT, median of {len(sys.argv)-1}: {statistics.median(map(float, sys.argv[1:])):.2f} s')" "${times[@]}"

iperf_mbps() {
  x home iperf3 -s -1 -D --bind "$1" >/dev/null; sleep 0.3
  x laptop iperf3 -c "$1" -t "$SECS" -J | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))'
}

# Direct.
lab_up; d="$s/direct"; mkdir -p "$d"; nodes_up "$d"
for _ in $(seq 400); do [ "$(path_kind "$d")" = direct ] && break; sleep 0.05; done
HOME_IP=$("$BIN/homeport" ip --state-dir "$d/home")
direct=$(iperf_mbps "$HOME_IP"); echo "direct: $direct Mbit/s ($(path_kind "$d"))"
# Throughput laptop -> home on a fresh lab whose internet namespace loads the nft table given on
# stdin, in run directory $1, waiting up to $2 tenths of a second for the mesh; sets `mbps` and `d`.
through_table() {
  lab_up; d="$s/$1"; mkdir -p "$d"
  x net nft -f -
  nodes_up "$d"
  HOME_IP=""; for _ in $(seq 100); do HOME_IP=$("$BIN/homeport" ip --state-dir "$d/home" 2>/dev/null) && break; sleep 0.1; done
  for _ in $(seq "$2"); do x laptop ping -c 1 -W 1 "$HOME_IP" >/dev/null 2>&1 && break; sleep 0.1; done
  mbps=$(iperf_mbps "$HOME_IP")
}

# Relayed: the two ISPs cannot exchange UDP directly, everything else is the same.
through_table relay 100 <<EOF
table inet nodirect {
  chain f {
    type filter hook forward priority 0;
    ip saddr 203.0.113.0/24 ip daddr 192.0.2.128/30 meta l4proto udp drop
    ip saddr 192.0.2.128/30 ip daddr 203.0.113.0/24 meta l4proto udp drop
  }
}
EOF
relayed=$mbps; echo "relayed: $relayed Mbit/s ($(path_kind "$d"))"
python3 -c "print(f'ratio relayed/direct: {$relayed/$direct:.2f}')"
# Relayed over TCP/TLS: no UDP crosses between the networks at all (not even to the VPS), so
# both nodes fall back to the coordinator's relay over TCP/TLS.
through_table tcprelay 300 <<EOF
table inet noudp {
  chain f {
    type filter hook forward priority 0;
    meta l4proto udp drop
  }
}
EOF
tcp=$mbps; echo "relayed over TCP/TLS: $tcp Mbit/s ($(path_kind "$d"))"
python3 -c "print(f'ratio tcp-relayed/direct: {$tcp/$direct:.2f}')"
