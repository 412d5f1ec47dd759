#!/usr/bin/env bash
# Prepare a fresh Debian (12+) machine to build, test and demo homeport. Run as root.
# Idempotent: installs only what is missing, so a second run takes a second or two.
#
#   sudo ./deploy/setup.sh
#
# Installs (Debian packages): the build toolchain, the network tools the lab tests and the demo drive
# (iproute2, nftables, conntrack), the standard peers the tests compare against (wireguard-go,
# wireguard-tools, coturn as a STUN server, iperf3; wireguard-go also plays a plain-WireGuard phone in
# tests/tests/devices.rs), dnsutils (dig, for the mesh-name tests), tcpdump, python3 (with python3-cryptography for
# bench/register-peers.py), ping, systemd (systemd-analyze), hping3 (spoofed-source SYN floods in the
# exit's lab tests, handshake floods in the data-plane tests) and postgresql (the coordinator tests run a
# throwaway cluster in a temp dir; the packaged service is disabled), and for the Debian packages
# (deploy/package.sh, tests/tests/packages.rs) dpkg-dev, lintian and help2man.
# Rust comes from rustup (minimal profile, stable) only if no cargo is found; cargo-fuzz (crates.io,
# pinned) for the fuzz targets and cargo-deb (crates.io, pinned) for deploy/package.sh are added when
# missing.
# schemathesis (PyPI, pinned) goes into its own virtualenv under /opt, linked as /usr/local/bin/schemathesis:
# coordinator/tests/spec.rs checks the API against its OpenAPI document with it.
# The browser tests (tests/tests/exit.rs opens an invite link; tests/tests/dashboard.rs): Debian's
# chromium, Node.js and npm (Debian's nodejs and npm unless a node with npm is there already), and
# playwright-core (npm, pinned by tests/browser/package-lock.json) installed by `npm ci` into
# tests/browser/node_modules (not committed). Building and running homeport needs none of them.
# mmdb-writer (PyPI, pinned, with netaddr) goes into its own virtualenv /opt/homeport-mmdb-writer: the
# exit's country-rule tests write small GeoLite2-Country-like databases of test-net ranges with it.
set -euo pipefail

PACKAGES=(
  build-essential pkg-config curl ca-certificates
  iproute2 nftables conntrack
  wireguard-go wireguard-tools iperf3 coturn dnsutils
  tcpdump python3 python3-venv python3-cryptography procps systemd iputils-ping shellcheck hping3
  postgresql
  dpkg-dev lintian help2man
  chromium
)
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV=/opt/homeport-schemathesis
MMDB_WRITER_VERSION=0.2.7
NETADDR_VERSION=1.3.0
MMDB_WRITER_VENV=/opt/homeport-mmdb-writer

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done

if ((${#missing[@]})); then
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]} — run this script as root (sudo $0)"
  command -v apt-get >/dev/null || die "apt-get not found: this script is for Debian/Ubuntu; install by hand: ${missing[*]}"
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # iperf3 asks whether to start a daemon; coturn's postinst may start a TURN server on 3478, the
  # coordinator's STUN port. Neither is wanted: answer no and keep services from starting during install.
  echo 'iperf3 iperf3/start_daemon boolean false' | debconf-set-selections 2>/dev/null || true
  policy_rc=/usr/sbin/policy-rc.d
  added_policy=0
  if [ ! -e "$policy_rc" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy_rc"; chmod 755 "$policy_rc"; added_policy=1
  fi
  restore_policy() { if [ "$added_policy" = 1 ]; then rm -f "$policy_rc"; fi; }
  trap restore_policy EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  restore_policy; trap - EXIT
  # The packages enable coturn's and postgresql's units; only their binaries are wanted (a standard STUN
  # server, and initdb/pg_ctl for throwaway test clusters).
  for svc in coturn postgresql; do
    if [[ " ${missing[*]} " == *" $svc "* ]] && command -v systemctl >/dev/null; then
      systemctl disable "$svc" >/dev/null 2>&1 || true
      if [ -d /run/systemd/system ]; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
    fi
  done
else
  log "Debian packages: all present"
fi

# Rust: use what is there (also a cargo in the invoking user's home under sudo), else install rustup.
find_cargo() {
  command -v cargo 2>/dev/null && return 0
  local h
  for h in "${CARGO_HOME:-$HOME/.cargo}" "$HOME/.cargo" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo"}; do
    [ -x "$h/bin/cargo" ] && { echo "$h/bin/cargo"; return 0; }
  done
  return 1
}
if cargo_bin=$(find_cargo); then
  log "cargo: $cargo_bin ($("$cargo_bin" --version 2>/dev/null || echo 'version unknown'))"
else
  log "cargo not found: installing Rust with rustup (minimal profile, stable)"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
  command -v cargo >/dev/null || die "rustup finished but cargo is still not on PATH"
  log "cargo: $(cargo --version)"
fi
# Fuzzing (deploy/test.sh's fuzz step, fuzz/README.md): cargo-fuzz from crates.io, pinned. It builds
# the targets with the stable toolchain (no sanitizer, so no -Z flags). Failing to get it does not
# stop setup (every other test still runs); test.sh then reports the fuzz step as skipped, which is
# a failure under CI=true.
CARGO_FUZZ_VERSION=0.13.2
# Debian packages (deploy/package.sh, tests/tests/packages.rs): cargo-deb from crates.io, pinned (the
# packages test relies on how this version treats --no-build --profile dev).
CARGO_DEB_VERSION=3.8.0
cargo_dir=$(dirname "$(find_cargo)")
export PATH="$cargo_dir:$PATH"
# cargo_tool SUBCOMMAND CRATE VERSION WHAT-CANNOT-RUN: installs a pinned cargo subcommand when missing.
cargo_tool() {
  if cargo "$1" --version 2>/dev/null | grep -qF "$3"; then
    log "$2: $3"
  else
    log "installing $2 $3 (crates.io)"
    cargo install --quiet --locked "$2" --version "$3" \
      || log "warning: could not install $2: $4 cannot run"
  fi
}
cargo_tool fuzz cargo-fuzz "$CARGO_FUZZ_VERSION" "the fuzz step of deploy/test.sh"
cargo_tool deb cargo-deb "$CARGO_DEB_VERSION" "deploy/package.sh and the packages test"
# schemathesis for the API spec test, pinned, in its own virtualenv (Debian's python refuses pip installs).
st_installed() { "$SCHEMATHESIS_VENV/bin/schemathesis" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; }
if st_installed; then
  log "schemathesis: $SCHEMATHESIS_VERSION"
else
  [ "$(id -u)" -eq 0 ] || die "schemathesis $SCHEMATHESIS_VERSION is missing — run this script as root (sudo $0)"
  log "installing schemathesis $SCHEMATHESIS_VERSION (PyPI) into $SCHEMATHESIS_VENV"
  python3 -m venv "$SCHEMATHESIS_VENV"
  "$SCHEMATHESIS_VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
  st_installed || die "schemathesis $SCHEMATHESIS_VERSION did not install into $SCHEMATHESIS_VENV"
fi
ln -sf "$SCHEMATHESIS_VENV/bin/schemathesis" /usr/local/bin/schemathesis 2>/dev/null || true
# Node.js for the browser tests; a node that came with its own npm (e.g. NodeSource's) is kept.
if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
  [ "$(id -u)" -eq 0 ] || die "node and npm are missing — run this script as root (sudo $0)"
  log "installing nodejs npm (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
fi
browser_dir="$(cd "$(dirname "$0")/.." && pwd)/tests/browser"
pw_want=$(sed -n 's/.*"playwright-core": "\([^"]*\)".*/\1/p' "$browser_dir/package.json")
pw_have=""
pw_pkg="$browser_dir/node_modules/playwright-core/package.json"
if [ -f "$pw_pkg" ]; then
  pw_have=$(sed -n 's/.*"version": "\([^"]*\)".*/\1/p' "$pw_pkg" | head -1)
fi
if [ -n "$pw_want" ] && [ "$pw_have" = "$pw_want" ]; then
  log "playwright-core: $pw_have"
else
  log "installing playwright-core $pw_want (npm ci) into $browser_dir/node_modules"
  (cd "$browser_dir" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci in $browser_dir failed"
fi
# mmdb-writer for the country-rule tests (tests/tests/exit.rs, exit/src/geo.rs), pinned, in its own virtualenv.
# (sed reads pip's whole output: `grep -q` would stop early, pip would die of SIGPIPE, and under
# pipefail the check would fail on an installed package.)
mw_installed() {
  [ -x "$MMDB_WRITER_VENV/bin/pip" ] &&
    [ "$("$MMDB_WRITER_VENV/bin/pip" show mmdb-writer 2>/dev/null | sed -n 's/^Version: //p')" = "$MMDB_WRITER_VERSION" ]
}
if mw_installed; then
  log "mmdb-writer: $MMDB_WRITER_VERSION"
else
  [ "$(id -u)" -eq 0 ] || die "mmdb-writer $MMDB_WRITER_VERSION is missing — run this script as root (sudo $0)"
  log "installing mmdb-writer $MMDB_WRITER_VERSION (PyPI) into $MMDB_WRITER_VENV"
  python3 -m venv "$MMDB_WRITER_VENV"
  "$MMDB_WRITER_VENV/bin/pip" install --quiet --disable-pip-version-check \
    "mmdb-writer==$MMDB_WRITER_VERSION" "netaddr==$NETADDR_VERSION"
  mw_installed || die "mmdb-writer $MMDB_WRITER_VERSION did not install into $MMDB_WRITER_VENV"
fi
# The TUN device the nodes use; a missing one is a kernel/container problem that no package fixes.
[ -c /dev/net/tun ] || log "warning: /dev/net/tun is missing: homeport nodes cannot create their interface here"
log "done"
