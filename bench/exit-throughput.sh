#!/usr/bin/env bash
# Published-port throughput, viewer -> VPS:32400 -> home, in one run:
#   recipe:   wireguard-go tunnel + nftables DNAT + masquerade on the VPS (the common hand-made setup)
#   rathole:  rathole 0.5 with its encrypted noise transport (installed from crates.io into $RATHOLE_ROOT if missing)
#   homeport: homeport-coordinator + homeport-exit on the VPS, homeport node at home, one publish rule
# Each line also shows which client address the home server saw. Last line: the ratios.
# Usage (root, project root, after `cargo build --release`): ./bench/exit-throughput.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd); . "$here/lib.sh"
need iperf3 wireguard-go wg nft python3
RATHOLE_ROOT=${RATHOLE_ROOT:-$HOME/.cache/homeport-bench/rathole}
[ -x $RATHOLE_ROOT/bin/rathole ] || cargo install -q rathole --version 0.5.0 --root $RATHOLE_ROOT
s=$(mktemp -d); trap 'lab_down; rm -rf $s' EXIT

# 1. the hand-made recipe
lab_chain_up; umask 077
wg genkey > $s/kv; wg pubkey < $s/kv > $s/pv; wg genkey > $s/kh; wg pubkey < $s/kh > $s/ph
ip netns exec $P-v wireguard-go -f $P-wv >/dev/null 2>&1 & ip netns exec $P-h wireguard-go -f $P-wh >/dev/null 2>&1 &
for i in $(seq 50); do [ -S /var/run/wireguard/$P-wv.sock ] && [ -S /var/run/wireguard/$P-wh.sock ] && break; sleep 0.1; done
ip netns exec $P-v wg set $P-wv private-key $s/kv listen-port 51820 peer $(cat $s/ph) allowed-ips 100.99.0.2/32
ip netns exec $P-h wg set $P-wh private-key $s/kh peer $(cat $s/pv) endpoint 198.51.100.10:51820 allowed-ips 100.99.0.1/32 persistent-keepalive 25
ip -n $P-v addr add 100.99.0.1/24 dev $P-wv; ip -n $P-h addr add 100.99.0.2/24 dev $P-wh
ip -n $P-v link set $P-wv mtu 1420 up; ip -n $P-h link set $P-wh mtu 1420 up
ip netns exec $P-v nft -f - <<NFT
table ip recipe {
  chain pre {
    type nat hook prerouting priority dstnat;
    iifname "$P-v0" tcp dport 32400 dnat to 100.99.0.2:32400
  }
  chain post {
    type nat hook postrouting priority srcnat;
    oifname "$P-wv" masquerade
  }
  chain mss {
    type filter hook forward priority 0;
    tcp flags syn tcp option maxseg size set rt mtu
  }
}
NFT
read m seen < <(download_mbps 192.0.2.1 h 32400); echo "recipe: $m Mbit/s, home saw $seen"; recipe=$m

# 2. rathole, encrypted
lab_chain_up
cat > $s/rs.toml <<T
[server]
bind_addr = "198.51.100.10:2333"
[server.transport]
type = "noise"
[server.transport.noise]
local_private_key = "R2Et740t3JAvsVFKv0sqlsPo7J6//MbAHEL5hqzWwoo="
[server.services.plex]
token = "bench"
bind_addr = "192.0.2.1:32400"
T
cat > $s/rc.toml <<T
[client]
remote_addr = "198.51.100.10:2333"
[client.transport]
type = "noise"
[client.transport.noise]
remote_public_key = "h8rmHag0NgEHuJhVlSNUNwJPIJiFDvjJ/L3TYhtawGU="
[client.services.plex]
token = "bench"
local_addr = "127.0.0.1:32400"
T
ip netns exec $P-v $RATHOLE_ROOT/bin/rathole -s $s/rs.toml >$s/rs.log 2>&1 &
ip netns exec $P-h $RATHOLE_ROOT/bin/rathole -c $s/rc.toml >$s/rc.log 2>&1 &
sleep 1.5
read m seen < <(download_mbps 192.0.2.1 h 32400); echo "rathole-noise: $m Mbit/s, home saw $seen"; rathole=$m

# 3. homeport
lab_chain_up
ip netns exec $P-v $BIN/homeport-coordinator serve --listen 198.51.100.10:8443 --stun-listen 198.51.100.10:3478 --state-dir $s/coord >$s/coord.log 2>&1 &
for i in $(seq 100); do PIN=$($BIN/homeport-coordinator pin --state-dir $s/coord 2>/dev/null) && break; sleep 0.1; done
KEY=$($BIN/homeport-coordinator authkey create --reusable --state-dir $s/coord)
export HOMEPORT_AUTHKEY=$KEY   # never in argv: every local user can read that
ip netns exec $P-v $BIN/homeport-exit up --coordinator https://198.51.100.10:8443 --pin "$PIN" --hostname vps --state-dir $s/exit >$s/exit.log 2>&1 &
ip netns exec $P-h $BIN/homeport up --coordinator https://198.51.100.10:8443 --pin "$PIN" --hostname home --state-dir $s/home --tun $P-th >$s/home.log 2>&1 &
for i in $(seq 100); do $BIN/homeport ip --state-dir $s/home >/dev/null 2>&1 && break; sleep 0.1; done
for i in $(seq 100); do $BIN/homeport-coordinator exits --json --state-dir $s/coord 2>/dev/null | grep -q '"vps"' && break; sleep 0.1; done
$BIN/homeport-coordinator publish add --state-dir $s/coord --exit vps --port 32400 --to home:32400 >/dev/null
for i in $(seq 100); do ip netns exec $P-v nft list ruleset 2>/dev/null | grep -q 32400 && break; sleep 0.1; done; sleep 0.5
read m seen < <(download_mbps 192.0.2.1 h 32400); echo "homeport: $m Mbit/s, home saw $seen"; hp=$m

python3 -c "print(f'ratios homeport/recipe: {$hp/$recipe:.2f}  homeport/rathole-noise: {$hp/$rathole:.2f}')"
