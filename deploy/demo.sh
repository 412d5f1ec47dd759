#!/usr/bin/env bash
# THE demo:  sudo ./deploy/demo.sh [--no-build] [--keep] [--size-mb N]
#
# Builds a small internet in network namespaces (all named hpdemo-*), puts a Plex stand-in at a home
# behind carrier-grade NAT (two NAT layers, no port forwarding possible), and publishes it through a
# "VPS" with homeport — then a remote viewer downloads a video from the VPS's public address, and the
# home server sees the viewer's real IP. Everything is removed at the end (also on Ctrl-C or failure).
#
#   viewer 192.0.2.50 ── net (the internet) ── VPS 198.51.100.10: homeport-coordinator + homeport-exit
#                          │
#                        carrier NAT 203.0.113.2 | 100.64.0.1   (masquerade)
#                          │
#                        home router 100.64.0.2 | 10.10.1.1     (masquerade)
#                          │
#                        home server 10.10.1.2: homeport up + Plex stand-in on :32400
#
#   --no-build    use the binaries already in target/release (or $BIN)
#   --keep        keep the lab running after the demo until you press Enter
#   --size-mb N   size of the sample video (default 50)
# Traffic never leaves the namespaces. Takes a minute or two after the build.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
P=hpdemo
build=1 keep=0 size_mb=50
while (($#)); do
  case $1 in
    --no-build) build=0 ;;
    --keep) keep=1 ;;
    --size-mb) size_mb=${2:?--size-mb needs a number}; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "demo: unknown argument $1 (accepted: --no-build, --keep, --size-mb N)" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ $size_mb =~ ^[0-9]+$ ]] || ((size_mb < 1)); then
  echo "demo: --size-mb wants a whole number ≥ 1, got $size_mb" >&2; exit 2
fi
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root: sudo $0" >&2; exit 1; }

if [ -t 1 ]; then B=$'\e[1m' G=$'\e[32m' R=$'\e[31m' D=$'\e[2m' N=$'\e[0m'; else B='' G='' R='' D='' N=''; fi
step=0
say()  { step=$((step + 1)); printf '\n%s[%d] %s%s\n' "$B" "$step" "$*" "$N"; }
info() { printf '    %s\n' "$*"; }
ok()   { printf '    %s✓ %s%s\n' "$G" "$*" "$N"; }
show() { printf '    %s$ %s%s\n' "$D" "$*" "$N"; }

S=$(mktemp -d /tmp/homeport-demo.XXXXXX)
pids=()
declare -A pid=()

lab_down() {
  local ns pid
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$P-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}

cleanup() {
  local rc=$? p _
  trap - EXIT INT TERM
  printf '\n%s[cleanup]%s stopping processes, deleting the hpdemo-* namespaces\n' "$B" "$N"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 30); do
    local running=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && running=1; done
    ((running)) || break
    sleep 0.1
  done
  lab_down
  if ((rc == 0)); then rm -rf "$S"; else echo "    logs kept in $S"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

logs() {
  local f
  for f in "$S"/*.log; do
    [ -e "$f" ] || continue
    printf '%s---- %s (last 25 lines) ----%s\n' "$D" "$(basename "$f")" "$N"
    tail -n 25 "$f"
  done
}
fail() { printf '\n%sdemo FAILED: %s%s\n' "$R" "$*" "$N" >&2; logs >&2; exit 1; }

# wait_for SECONDS WHAT COMMAND...: run COMMAND every 0.2 s until it succeeds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || fail "timed out after ${secs}s waiting for $what"
    sleep 0.2
  done
}
alive() { kill -0 "$1" 2>/dev/null || fail "$2 exited early"; }
in_ns() { local h=$1; shift; ip netns exec "$P-$h" "$@"; }
# start NAME HOST COMMAND...: run COMMAND in the background inside HOST, output to $S/NAME.log
start() {
  local name=$1 h=$2; shift 2
  ip netns exec "$P-$h" "$@" >"$S/$name.log" 2>&1 &
  pids+=("$!")
  pid[$name]=$!
}

# ---------------------------------------------------------------------------------------------------
say "Preparing this machine (deploy/setup.sh) and building homeport"
"$here/setup.sh" | sed 's/^/    /'
if [ -z "${BIN:-}" ]; then
  BIN=$root/target/release
  if ((build)); then
    if ! command -v cargo >/dev/null; then
      for h in "$HOME/.cargo" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo"}; do
        [ -x "$h/bin/cargo" ] && PATH="$h/bin:$PATH" && break
      done
    fi
    show "cargo build --release --bins"
    (cd "$root" && cargo build --release --bins) || fail "the release build failed"
  fi
fi
for b in homeport-coordinator homeport homeport-exit; do
  [ -x "$BIN/$b" ] || fail "$BIN/$b is missing (build with: cargo build --release --bins)"
done
COORD=$BIN/homeport-coordinator HP=$BIN/homeport EXIT=$BIN/homeport-exit
ok "binaries in $BIN"

# ---------------------------------------------------------------------------------------------------
say "Building the lab: an internet, a VPS, a viewer, and a home behind carrier-grade NAT"
lab_down
for h in net vps viewer carrier router home; do
  ip netns add "$P-$h"; ip -n "$P-$h" link set lo up
done
# link A A_IF A_CIDR B B_IF B_CIDR: a veth pair created directly inside the two namespaces
link() {
  ip link add "$2" netns "$P-$1" type veth peer name "$5" netns "$P-$4"
  ip -n "$P-$1" addr add "$3" dev "$2"; ip -n "$P-$1" link set "$2" up
  ip -n "$P-$4" addr add "$6" dev "$5"; ip -n "$P-$4" link set "$5" up
}
link net  eth0 198.51.100.1/24 vps     eth0 198.51.100.10/24
link net  eth1 192.0.2.1/24    viewer  eth0 192.0.2.50/24
link net  eth2 203.0.113.1/24  carrier eth0 203.0.113.2/24
link carrier eth1 100.64.0.1/24 router eth0 100.64.0.2/24
link router  eth1 10.10.1.1/24  home   eth0 10.10.1.2/24
ip -n $P-vps     route add default via 198.51.100.1
ip -n $P-viewer  route add default via 192.0.2.1
ip -n $P-carrier route add default via 203.0.113.1
ip -n $P-router  route add default via 100.64.0.1
ip -n $P-home    route add default via 10.10.1.1
for h in net carrier router vps; do in_ns "$h" sysctl -qw net.ipv4.ip_forward=1; done
nat() {  # nat HOST OUT_IF: source NAT like a home router / CGNAT box
  in_ns "$1" nft -f - <<NFT
table ip nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "$2" masquerade
  }
}
NFT
}
nat carrier eth0
nat router eth0
info "viewer   192.0.2.50     (somewhere on the internet)"
info "VPS      198.51.100.10  (the only public address you rent)"
info "carrier  203.0.113.2 -> 100.64.0.0/24   (the ISP's CGNAT)"
info "router   100.64.0.2  -> 10.10.1.0/24    (the home router, NAT again)"
info "home     10.10.1.2      (the Plex server)"

wait_for 5 "the home server to reach the VPS through both NATs" in_ns home ping -c 1 -W 1 198.51.100.10
ok "home -> VPS works (outbound through two NATs)"
seen=$(in_ns carrier conntrack -L -p icmp 2>/dev/null | awk '/dst=198.51.100.10/ {for (i=1;i<=NF;i++) if ($i ~ /^dst=/) d=$i; print d; exit}')
info "the VPS sees the home as ${seen#dst=} (the carrier's address, shared with its other customers)"
if in_ns viewer ping -c 1 -W 1 10.10.1.2 >/dev/null 2>&1; then fail "the viewer reached the home directly (lab broken)"; fi
ok "the viewer cannot reach the home: no route in, no port to forward — the CGNAT problem"

# ---------------------------------------------------------------------------------------------------
say "Starting the Plex stand-in at home (HTTP on :32400 with range requests, logs client addresses)"
mkdir -p "$S/media"
head -c "$((size_mb * 1024 * 1024))" /dev/urandom >"$S/media/sample.mp4"
sum_full=$(sha256sum <"$S/media/sample.mp4" | cut -d' ' -f1)
sum_part=$(head -c 1048576 "$S/media/sample.mp4" | sha256sum | cut -d' ' -f1)
start plex home python3 "$here/plex-standin.py" "$S/media" --port 32400
wait_for 10 "the Plex stand-in" in_ns home curl -sf -o /dev/null http://10.10.1.2:32400/
ok "sample.mp4 ($size_mb MiB of random bytes, sha256 ${sum_full:0:16}…) served on 10.10.1.2:32400"

# ---------------------------------------------------------------------------------------------------
say "On the VPS: starting the coordinator"
show "homeport-coordinator serve --listen 198.51.100.10:8443 --stun-listen 198.51.100.10:3478 --public-url https://198.51.100.10:8443 --state-dir $S/coord"
start coord vps "$COORD" serve --listen 198.51.100.10:8443 --stun-listen 198.51.100.10:3478 \
  --public-url https://198.51.100.10:8443 --state-dir "$S/coord" --metrics-listen 198.51.100.10:9100
get_pin() { alive "${pid[coord]}" "the coordinator"; PIN=$("$COORD" pin --state-dir "$S/coord" 2>/dev/null) && [ -n "$PIN" ]; }
PIN=
end=$((SECONDS + 30))
until get_pin; do ((SECONDS < end)) || fail "no pin from the coordinator after 30s"; sleep 0.2; done
ok "coordinator up; its TLS key pin: $PIN"
show "homeport-coordinator authkey create --reusable"
KEY=$("$COORD" authkey create --reusable --state-dir "$S/coord") || fail "authkey create failed"
[ -n "$KEY" ] || fail "authkey create printed nothing"
ok "auth key: ${KEY:0:12}…"
# Keys go in a private file, never on a command line (every local user can read argv).
(umask 077; printf '%s\n' "$KEY" >"$S/authkey")

# ---------------------------------------------------------------------------------------------------
say "Joining the mesh: the exit on the VPS, the node at home"
show "homeport-exit up --coordinator https://198.51.100.10:8443 --pin $PIN --authkey-file $S/authkey --hostname vps"
start exit vps "$EXIT" up --coordinator https://198.51.100.10:8443 --pin "$PIN" --authkey-file "$S/authkey" \
  --hostname vps --state-dir "$S/exit"
show "homeport up --coordinator https://198.51.100.10:8443 --pin $PIN --authkey-file $S/authkey --hostname home   (at home)"
start home home "$HP" up --coordinator https://198.51.100.10:8443 --pin "$PIN" --authkey-file "$S/authkey" \
  --hostname home --state-dir "$S/home"
end=$((SECONDS + 30))
until HOME_IP=$("$HP" ip -4 --state-dir "$S/home" 2>/dev/null) && [ -n "$HOME_IP" ]; do
  alive "${pid[home]}" "homeport up (home)"; alive "${pid[exit]}" "homeport-exit"
  ((SECONDS < end)) || fail "the home node got no mesh address in 30s"; sleep 0.2
done
end=$((SECONDS + 30))
until VPS_IP=$("$HP" ip -4 vps --state-dir "$S/home" 2>/dev/null) && [ -n "$VPS_IP" ]; do
  ((SECONDS < end)) || fail "the home node does not know the VPS after 30s"; sleep 0.2
done
ok "mesh addresses: home $HOME_IP, vps $VPS_IP"
wait_for 30 "a mesh ping home -> vps ($VPS_IP)" in_ns home ping -c 1 -W 1 "$VPS_IP"
ok "home pings the VPS over the WireGuard mesh"
# The relay carries the first packets; hole punching finds the direct path within seconds.
end=$((SECONDS + 15))
path=""
while ((SECONDS < end)); do
  path=$("$HP" status --json --state-dir "$S/home" 2>/dev/null |
    python3 -c 'import json,sys; print([p for p in json.load(sys.stdin)["peers"] if p["name"] == "vps"][0]["path"]["kind"])' 2>/dev/null || true)
  [ "$path" = direct ] && break
  sleep 0.3
done
ok "path home -> vps: ${path:-unknown}"
show "homeport-coordinator nodes"
"$COORD" nodes --state-dir "$S/coord" | sed 's/^/    /' || fail "nodes failed"

# ---------------------------------------------------------------------------------------------------
say "Publishing home:32400 on the VPS's public port 32400"
# publish add accepts only a node that runs an exit; the exit announces itself when it starts.
wait_for 20 "the exit to announce itself" sh -c "\"$COORD\" exits --json --state-dir \"$S/coord\" | grep -q '\"vps\"'"
show "homeport-coordinator publish add --exit vps --port 32400 --to home:32400"
"$COORD" publish add --state-dir "$S/coord" --exit vps --port 32400 --to home:32400 | sed 's/^/    /' \
  || fail "publish add failed"
wait_for 20 "the exit to install the rule for port 32400" sh -c "ip netns exec $P-vps nft list ruleset | grep -q 32400"
"$COORD" publish list --state-dir "$S/coord" | sed 's/^/    /' || fail "publish list failed"
ok "the exit installed its nftables rules"

# ---------------------------------------------------------------------------------------------------
say "The viewer (192.0.2.50) watches: http://198.51.100.10:32400/sample.mp4"
show "curl -r 0-1048575 http://198.51.100.10:32400/sample.mp4    (a player seeking: a range request)"
code=$(in_ns viewer curl -s --max-time 20 -r 0-1048575 -o "$S/part" -w '%{http_code}' \
  http://198.51.100.10:32400/sample.mp4) || fail "the range request failed (curl exit $?)"
[ "$code" = 206 ] || fail "the range request got HTTP $code, expected 206"
got=$(sha256sum <"$S/part" | cut -d' ' -f1)
[ "$got" = "$sum_part" ] || fail "the first MiB differs from the file at home"
ok "HTTP 206, 1 MiB, sha256 matches the file at home"
show "curl -o sample.mp4 http://198.51.100.10:32400/sample.mp4    (the whole file)"
speed=$(in_ns viewer curl -s --max-time 120 -o "$S/full" -w '%{speed_download}' \
  http://198.51.100.10:32400/sample.mp4) || fail "the full download failed"
got=$(sha256sum <"$S/full" | cut -d' ' -f1)
[ "$got" = "$sum_full" ] || fail "the downloaded file's sha256 $got differs from $sum_full"
ok "$size_mb MiB downloaded at $(awk -v s="$speed" 'BEGIN {printf "%.0f", s * 8 / 1e6}') Mbit/s, sha256 matches"
info "what the home server logged (it sees the viewer's real address, not the VPS's):"
grep 'client=192.0.2.50:' "$S/plex.log" | sed 's/^/      /' || fail "the home server never saw 192.0.2.50: $(tail -n 3 "$S/plex.log")"
ok "Plex/Tautulli at home would show 192.0.2.50"

# ---------------------------------------------------------------------------------------------------
say "What the node and the exit report"
show "homeport status"
"$HP" status --state-dir "$S/home" | sed 's/^/    /' || fail "homeport status failed"
show "homeport-exit log"
# A connection is recorded when it ends (with its byte counts): give the last one a moment.
for _ in $(seq 25); do
  audit=$("$EXIT" log --state-dir "$S/exit") || fail "homeport-exit log failed"
  [[ $audit == *192.0.2.50* ]] && break
  sleep 0.2
done
if [ -n "$audit" ]; then printf '%s\n' "$audit" | sed 's/^/    /'; else info "(no entries)"; fi
if [[ $audit == *192.0.2.50* ]]; then
  ok "the exit's audit log has the viewer's connections"
else
  info "note: the audit log does not show 192.0.2.50 yet"
fi

# ---------------------------------------------------------------------------------------------------
say "Point Plex at the VPS, and check that it sees real viewers"
(umask 077; echo demo-token >"$S/plex.token")   # the stand-in takes any token
show "homeport plex setup --yes --token-file plex.token"
in_ns home "$HP" plex setup --yes --token-file "$S/plex.token" --state-dir "$S/home" 2>&1 | sed 's/^/    /' \
  || fail "homeport plex setup failed"
show "homeport plex check"
in_ns home "$HP" plex check --token-file "$S/plex.token" --state-dir "$S/home" 2>&1 | sed 's/^/    /' \
  || fail "homeport plex check found a problem"
ok "Plex's custom URL is the VPS, and the viewer it saw came in through the exit"

printf '\n%sdemo OK%s: a server behind two NATs was published on a VPS, and saw its viewer'"'"'s real IP.\n' "$G" "$N"

if ((keep)) && [ -t 0 ]; then
  printf '\nThe lab is still up. Try, in another terminal:\n'
  info "ip netns exec $P-viewer curl -r 0-99 -s http://198.51.100.10:32400/sample.mp4 | xxd | head"
  info "$HP status --state-dir $S/home"
  info "$EXIT log --follow --state-dir $S/exit"
  read -r -p "Press Enter to tear it down. " _
fi

cat <<EOF

${B}Next, for real${N} (see README.md and docs/plex.md):
  On the VPS (Debian, public IP, open TCP 8443, UDP 3478 and the ports you publish):
      git clone <this repo> homeport && cd homeport
      sudo ./deploy/setup.sh && cargo build --release --bins
      sudo ./deploy/install.sh vps
    It starts homeport-coordinator and homeport-exit and prints the line to run at home.
  On the home server (same build), with what install.sh vps printed:
      sudo ./deploy/install.sh home --coordinator https://<VPS IP>:8443 --pin <pin> --authkey-file <file with the key>
  Back on the VPS:
      sudo homeport-coordinator publish add --exit vps --port 32400 --to home:32400
  Then point Plex at it: docs/plex.md.
EOF
