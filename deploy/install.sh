#!/usr/bin/env bash
# Install homeport as systemd services on a real machine. Run from a checkout after
# `cargo build --release --bins` (deploy/setup.sh installs the toolchain), or with the Debian packages
# of deploy/package.sh in dist/ (then they are installed with apt and no build is needed).
#
#   sudo ./deploy/install.sh vps  [--public-ip IP] [--hostname vps]
#       The VPS: homeport-coordinator (control plane) + homeport-exit (publishes ports), both joined.
#       Prints the exact command for the home server, with a fresh auth key.
#   sudo ./deploy/install.sh home [--coordinator URL --pin PIN --authkey-file FILE] [--hostname NAME]
#       A home server (or any machine): the homeport node, joined to the coordinator. FILE holds the auth
#       key (first line); it is copied to /etc/homeport/node.authkey (0600). Run it again with a new
#       --authkey-file to re-join after the coordinator refused the node (same key and address).
#
# Common options: --bin-dir DIR (binaries from DIR, not packages; default target/release), --no-start,
# --packages DIR (the .debs of deploy/package.sh in DIR; default dist/ of this checkout when it has them).
# With packages (homeport-coordinator, homeport-exit and homeport for vps; homeport for home):
# `apt-get install ./dist/….deb` puts binaries in /usr/bin, units in /lib/systemd/system. Otherwise
# binaries go to /usr/local/bin, units to /etc/systemd/system/, docs to /usr/local/share/doc/homeport/.
# Configs: /etc/homeport/ (an edited config is never overwritten; the packages' example is filled in).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'install: %s\n' "$*"; }

role=${1:-}
case $role in
  vps|home) shift ;;
  -h|--help) usage; exit 0 ;;
  '') usage >&2; exit 2 ;;
  *) die "unknown role '$role': accepted are 'vps' (coordinator + exit) and 'home' (a node)" ;;
esac

bin_dir='' pkg_dir='' public_ip='' hostname='' coordinator='' pin='' authkey='' start=1
# Secrets never go on a command line (every local user can read argv): auth keys come from files.
read_key() { # read_key FILE: the first line of FILE, trimmed
  [ -r "$1" ] || die "--authkey-file $1: cannot read it"
  local k; k=$(head -n1 -- "$1" | tr -d '[:space:]')
  [ -n "$k" ] || die "--authkey-file $1: empty; expected a key from 'homeport-coordinator authkey create' on its first line"
  printf '%s' "$k"
}
# write_key DST KEY: DST (mode 0600) holds KEY; printf is a shell builtin, so the key is in no argv.
write_key() { install -m 0600 /dev/null "$1"; printf '%s\n' "$2" >"$1"; }
while (($#)); do
  case $1 in
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift ;;
    --packages) pkg_dir=${2:?--packages needs the directory with the .deb files}; shift ;;
    --public-ip) public_ip=${2:?--public-ip needs an address}; shift ;;
    --hostname) hostname=${2:?--hostname needs a name}; shift ;;
    --coordinator) coordinator=${2:?--coordinator needs a URL}; shift ;;
    --pin) pin=${2:?--pin needs the pin}; shift ;;
    --authkey-file) authkey=$(read_key "${2:?--authkey-file needs a file}"); shift ;;
    --authkey) die "--authkey KEY would show the key to every local user (argv); put it in a file and pass --authkey-file FILE" ;;
    --no-start) start=0 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' for $role (see: $0 --help)" ;;
  esac
  shift
done
[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0 $role …"
if [ "$role" = vps ] && [ -n "$coordinator$pin$authkey" ]; then
  die "--coordinator/--pin/--authkey-file are for 'home'; 'vps' runs its own coordinator"
fi
if [ "$role" = home ] && [ -n "$public_ip" ]; then die "--public-ip is for 'vps'"; fi
if [ -n "$coordinator" ] && [[ $coordinator != https://* ]]; then
  die "--coordinator '$coordinator': expected https://HOST:PORT, e.g. https://203.0.113.7:8443"
fi

systemd=0
[ -d /run/systemd/system ] && systemd=1
if ((start)) && ((!systemd)); then
  log "systemd is not running on this machine: installing files only (as with --no-start)"
  start=0
fi

# ---- binaries, units, docs --------------------------------------------------------------------------
if [ "$role" = vps ]; then
  bins=(homeport-coordinator homeport-exit homeport)
  units=(homeport-coordinator.service homeport-exit.service)
else
  bins=(homeport)
  units=(homeport.service)
fi
# newest_deb PKG: the newest dist/PKG_*.deb of this machine's architecture, or nothing.
newest_deb() {
  local arch; arch=$(dpkg --print-architecture 2>/dev/null) || return 0
  find "${pkg_dir:-$root/dist}" -maxdepth 1 -name "$1_*_$arch.deb" 2>/dev/null | sort -V | tail -n1
}
debs=()
if [ -n "$bin_dir" ] && [ -n "$pkg_dir" ]; then die "--bin-dir and --packages exclude each other"; fi
if [ -n "$pkg_dir" ]; then
  [ -d "$pkg_dir" ] || die "--packages $pkg_dir: no such directory"
  pkg_dir=$(cd "$pkg_dir" && pwd)   # apt-get takes a .deb by a path with a slash
fi
if [ -z "$bin_dir" ]; then
  for b in "${bins[@]}"; do
    d=$(newest_deb "$b")
    [ -n "$d" ] && debs+=("$d")
  done
  if { [ -n "$pkg_dir" ] || ((${#debs[@]})); } && ((${#debs[@]} < ${#bins[@]})); then
    die "${pkg_dir:-dist/} lacks some of the packages ${bins[*]} (has: ${debs[*]:-none}): run deploy/package.sh, or pass --bin-dir target/release"
  fi
fi
if ((${#debs[@]})); then
  # apt resolves the packages' dependencies (nftables, conntrack, iproute2); they do not start anything.
  log "packages: ${debs[*]#"$root"/}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${debs[@]}" >&2
  doc_dir=/usr/share/doc/homeport
else
  bin_dir=${bin_dir:-$root/target/release}
  for b in "${bins[@]}"; do
    [ -x "$bin_dir/$b" ] || die "$bin_dir/$b not found: build first with 'cargo build --release --bins' (or pass --bin-dir, or put packages from deploy/package.sh into dist/)"
  done
  for b in "${bins[@]}"; do
    install -m 0755 "$bin_dir/$b" "/usr/local/bin/$b.new"
    mv -f "/usr/local/bin/$b.new" "/usr/local/bin/$b"   # atomic: a running daemon keeps its old inode
  done
  log "binaries: ${bins[*]} -> /usr/local/bin"
  doc_dir=/usr/local/share/doc/homeport
  install -d -m 0755 "$doc_dir"
  [ -f "$root/README.md" ] && install -m 0644 "$root/README.md" "$doc_dir/README.md"
  [ -f "$root/docs/plex.md" ] && install -m 0644 "$root/docs/plex.md" "$doc_dir/plex.md"
  # The units name the packages' paths (/usr/bin, /usr/share/doc/PKG): here they are under /usr/local.
  for u in "${units[@]}"; do
    sed -e 's#/usr/bin/#/usr/local/bin/#g' -e 's#/usr/share/doc/homeport[a-z-]*/#/usr/local/share/doc/homeport/#g' \
      "$here/systemd/$u" >"/etc/systemd/system/$u.new"
    chmod 0644 "/etc/systemd/system/$u.new"
    mv -f "/etc/systemd/system/$u.new" "/etc/systemd/system/$u"
  done
  log "units: ${units[*]} -> /etc/systemd/system"
  ((systemd)) && systemctl daemon-reload
fi

# ---- configs ----------------------------------------------------------------------------------------
install -d -m 0755 /etc/homeport
# unconfigured ROLE: /etc/homeport/ROLE.toml is missing or still the example (as a package installs it).
unconfigured() { [ ! -e "/etc/homeport/$1.toml" ] || cmp -s "$here/config/$1.toml" "/etc/homeport/$1.toml"; }
# put_config ROLE MODE KEY=VALUE…: install deploy/config/ROLE.toml unless an edited one exists, setting KEYs.
put_config() {
  local name=$1 mode=$2 dst=/etc/homeport/$1.toml kv k v tmp; shift 2
  if ! unconfigured "$name"; then
    log "config: $dst exists, kept as it is"
    return 1
  fi
  tmp=$(mktemp /etc/homeport/.new.XXXXXX)
  cp "$here/config/$name.toml" "$tmp"
  for kv in "$@"; do
    k=${kv%%=*} v=${kv#*=}
    [ -n "$v" ] || continue
    # Only the plain `key = "..."` line at the start of a line is replaced (values are quoted TOML strings).
    v=${v//\\/\\\\}; v=${v//\"/\\\"}
    python3 - "$tmp" "$k" "$v" <<'PY'
import re, sys
path, key, val = sys.argv[1:4]
text = open(path).read()
line = f'{key} = "{val}"'
text, n = re.subn(r'(?m)^#?\s*' + re.escape(key) + r'\s*=.*$', lambda _: line, text, count=1)
if n == 0:
    text += f'{key} = "{val}"\n'
open(path, 'w').write(text)
PY
  done
  chmod "$mode" "$tmp"
  mv "$tmp" "$dst"
  log "config: $dst written"
  return 0
}

# ---- home: the node ---------------------------------------------------------------------------------
if [ "$role" = home ]; then
  if [ -n "$authkey" ]; then
    write_key /etc/homeport/node.authkey "$authkey"
    log "auth key: /etc/homeport/node.authkey (0600)"
  fi
  if put_config node 0600 coordinator="$coordinator" pin="$pin" authkey-file=/etc/homeport/node.authkey hostname="${hostname:-$(hostname -s)}"; then
    if [ -z "$coordinator" ] || [ -z "$pin" ] || [ ! -s /etc/homeport/node.authkey ]; then
      log "fill in coordinator and pin in /etc/homeport/node.toml and the auth key in /etc/homeport/node.authkey"
      log "(install.sh vps on the VPS prints them), then: systemctl enable --now homeport"
      start=0
    fi
  elif [ -n "$coordinator$pin" ]; then
    log "note: --coordinator/--pin were not applied because /etc/homeport/node.toml exists; edit it"
  fi
  if ((start)); then
    systemctl enable --now homeport.service
    for _ in $(seq 150); do ip4=$(homeport ip -4 2>/dev/null) && [ -n "$ip4" ] && break; sleep 0.2; done
    [ -n "${ip4:-}" ] || die "homeport did not join within 30 s: journalctl -u homeport -n 50"
    log "joined the mesh as $ip4"
    cat <<EOF

Done. This machine is in the mesh:
  homeport status              peers, paths (direct or relay), traffic
  journalctl -u homeport -f    logs
To publish this machine's Plex, on the VPS:
  sudo homeport-coordinator publish add --exit vps --port 32400 --to $(grep -E '^hostname' /etc/homeport/node.toml | cut -d'"' -f2):32400
Then configure Plex: $doc_dir/plex.md
EOF
  else
    log "installed; not started"
  fi
  exit 0
fi

# ---- vps: coordinator + exit ------------------------------------------------------------------------
if [ -z "$public_ip" ]; then
  # The address of the default route's interface: no traffic is sent to find it.
  public_ip=$(ip -4 route get 198.51.100.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
  case $public_ip in
    ''|10.*|192.168.*|172.1[6-9].*|172.2[0-9].*|172.3[01].*|100.6[4-9].*|100.[7-9][0-9].*|100.1[01][0-9].*|100.12[0-7].*)
      log "warning: this machine's address '${public_ip:-?}' is not public (cloud 1:1 NAT?): rerun with --public-ip <the VPS's public IP>"
      public_ip='' ;;
  esac
fi
# With an unknown public address the coordinator picks its own default; the join line shows a placeholder.
put_config coordinator 0644 ${public_ip:+public-url="https://$public_ip:8443"} || true
public_ip=${public_ip:-VPS_PUBLIC_IP}
# Forwarding is not set here: homeport-exit turns it on while it runs and puts back the value it
# found when it stops (ExecStopPost=homeport-exit cleanup, also after a crash). An older install's
# persistent setting would keep the VPS forwarding while the exit is down: remove it.
if [ -f /etc/sysctl.d/60-homeport-exit.conf ]; then
  rm -f /etc/sysctl.d/60-homeport-exit.conf
  log "removed /etc/sysctl.d/60-homeport-exit.conf (the exit manages forwarding itself now)"
fi

if ((!start)); then
  cat <<EOF
install: installed; not started. To start:
  systemctl enable --now homeport-coordinator
  homeport-coordinator pin                                   # the TLS pin nodes join with
  homeport-coordinator pin                                   # put it into /etc/homeport/exit.toml
  homeport-coordinator authkey create >/etc/homeport/exit.authkey   # a key for the exit (umask 077)
  systemctl enable --now homeport-exit
EOF
  exit 0
fi

systemctl enable --now homeport-coordinator.service
pin=''
for _ in $(seq 150); do pin=$(homeport-coordinator pin 2>/dev/null) && [ -n "$pin" ] && break; sleep 0.2; done
[ -n "$pin" ] || die "the coordinator did not come up within 30 s: journalctl -u homeport-coordinator -n 50"
log "coordinator up, pin $pin"

port=8443
if [ -r /var/lib/homeport-coordinator/listen.addr ]; then
  port=$(sed -E 's/.*:([0-9]+)\s*$/\1/' /var/lib/homeport-coordinator/listen.addr)
fi
if unconfigured exit; then
  write_key /etc/homeport/exit.authkey "$(homeport-coordinator authkey create --expires 1h)"
  # The exit joins the coordinator on this same machine over loopback (the pin, not the address, is checked).
  put_config exit 0600 coordinator="https://127.0.0.1:$port" pin="$pin" authkey-file=/etc/homeport/exit.authkey hostname="${hostname:-vps}"
fi
systemctl enable --now homeport-exit.service
exit_name=$(grep -E '^hostname' /etc/homeport/exit.toml | cut -d'"' -f2)
for _ in $(seq 150); do homeport-coordinator nodes 2>/dev/null | grep -qw "${exit_name:-vps}" && break; sleep 0.2; done
homeport-coordinator nodes 2>/dev/null | grep -qw "${exit_name:-vps}" \
  || log "warning: the exit has not shown up in 'homeport-coordinator nodes' yet: journalctl -u homeport-exit -n 50"

home_key=$(homeport-coordinator authkey create --expires 24h)
url="https://$public_ip:$port"
# The web dashboard listens on the exit's mesh address once its interface is up (coordinator.toml: dashboard-port).
dash_file=/var/lib/homeport-coordinator/dashboard.addr
for _ in $(seq 25); do [ -s "$dash_file" ] && break; sleep 0.2; done
dashboard=$(head -n1 "$dash_file" 2>/dev/null || true)
cat <<EOF

Done: homeport-coordinator and homeport-exit ("${exit_name:-vps}") run on this VPS.
Open in the provider's firewall: TCP $port (API), UDP 3478 (STUN), and each port you publish (TCP 32400 for Plex).

Next, on the home server. First put this auth key (valid for 24 h, single use) into a private file:
  sudo sh -c 'umask 077; cat >/root/homeport.authkey'      # paste the line below, then Ctrl-D
  $home_key
then either run the node in the foreground:
  sudo homeport up --coordinator $url --pin $pin --authkey-file /root/homeport.authkey --hostname home
or install it as a service from a checkout there:
  sudo ./deploy/install.sh home --coordinator $url --pin $pin --authkey-file /root/homeport.authkey --hostname home

Then, here on the VPS, publish Plex and check:
  sudo homeport-coordinator publish add --exit ${exit_name:-vps} --port 32400 --to home:32400
  sudo homeport-coordinator nodes
  sudo homeport-exit log --follow
${dashboard:+Or in a browser on any device of the mesh (the home server, a laptop that ran homeport up):
  http://$dashboard/   (log in with the admin token: sudo cat /var/lib/homeport-coordinator/admin.token)
}Plex settings: $doc_dir/plex.md
EOF
