#!/usr/bin/env bash
# Build the Debian packages homeport-coordinator, homeport-exit and homeport (the node) into dist/.
#
#   ./deploy/package.sh                 release build of the three binaries, then the three .debs
#   ./deploy/package.sh --dev           package the debug binaries that `cargo build --workspace --bins`
#                                       made (no build: the tests use it, a release build takes ~15 min)
#   Options: --deb-revision N (Debian revision, default 1), --out DIR (default dist/), --fast (quick
#   compression). Prints the path of each .deb.
#
# Needs cargo-deb (crates.io) and help2man (the man pages, made from --help); deploy/setup.sh installs both.
# The packages hold the binaries, the units of deploy/systemd/, the example configs of deploy/config/ as
# conffiles, man pages, bash/zsh/fish completions and the maintainer scripts of deploy/debian/PACKAGE/.
# Install on a machine (no Rust needed there): sudo apt install ./homeport-coordinator_*.deb … (README,
# "Install from packages").
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
caller=$PWD
cd "$root"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
die() { printf 'package: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'package: %s\n' "$*" >&2; }

profile=release revision=1 out=$root/dist fast=() zip=(-Zxz)
while (($#)); do
  case $1 in
    --dev) profile=dev ;;
    --deb-revision) revision=${2:?--deb-revision needs a number, e.g. 2}; shift ;;
    --out) out=${2:?--out needs a directory}; shift; [[ $out == /* ]] || out=$caller/$out ;;
    --fast) fast=(--fast) zip=(-Zgzip -z1) ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (accepted: --dev, --deb-revision N, --out DIR, --fast; see --help)" ;;
  esac
  shift
done
[[ $revision =~ ^[0-9][0-9a-z.+~]*$ ]] \
  || die "--deb-revision '$revision': expected a Debian revision such as 1 or 2"
cargo deb --version >/dev/null 2>&1 \
  || die "cargo-deb is not installed: run deploy/setup.sh (or: cargo install --locked cargo-deb)"
command -v help2man >/dev/null \
  || die "help2man is not installed: run deploy/setup.sh (or: apt-get install help2man)"

# crate:binary for each package (the package names are set in each crate's [package.metadata.deb]).
crates=(homeport-coordinator:homeport-coordinator homeport-exit:homeport-exit homeport-node:homeport)
target_dir=$(cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
if [ "$profile" = release ]; then
  log "building the release binaries (cargo build --release)"
  pkgs=()
  for c in "${crates[@]}"; do pkgs+=(-p "${c%%:*}"); done
  cargo build --release "${pkgs[@]}" --bins >&2 || die "cargo build --release failed"
  bin_dir=$target_dir/release
else
  bin_dir=$target_dir/debug
fi
for c in "${crates[@]}"; do
  [ -x "$bin_dir/${c#*:}" ] \
    || die "$bin_dir/${c#*:} is missing: build it first (cargo build --workspace --bins for --dev)"
done

# Man pages from --help/--version, and shell completions. The crates' package metadata reads them from
# dist/.gen/.
gen=$root/dist/.gen
mkdir -p "$gen" "$out"
for c in "${crates[@]}"; do
  b=${c#*:}
  # The whatis line: the first line of --help without its "homeport node: " prefix.
  what=$("$bin_dir/$b" --help | head -n1 | sed -e 's/^[^:]*: //' -e 's/\.$//')
  help2man --no-info --no-discard-stderr --section 1 --name "$what" --output "$gen/$b.1" "$bin_dir/$b" \
    || die "help2man could not run $bin_dir/$b --help"
  gzip -9n -f "$gen/$b.1"
  # Shell completions from clap (a hidden subcommand of each binary).
  "$bin_dir/$b" completions bash >"$gen/$b.bash"
  "$bin_dir/$b" completions zsh >"$gen/_$b"
  "$bin_dir/$b" completions fish >"$gen/$b.fish"
done

for c in "${crates[@]}"; do
  crate=${c%%:*}
  deb=$(cargo deb -p "$crate" --no-build --profile "$profile" --deb-revision "$revision" \
        --output "$out" "${fast[@]}" 2>"$gen/$crate.log" | tail -n1) \
    || die "cargo deb -p $crate failed: $(cat "$gen/$crate.log")"
  # cargo-deb writes no md5sums: add them, so that `dpkg --verify` (and debsums) can check the files.
  tree=$(mktemp -d) && chmod 0755 "$tree"
  dpkg-deb --raw-extract "$deb" "$tree"
  (cd "$tree" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 --no-run-if-empty md5sum >DEBIAN/md5sums)
  chmod 0644 "$tree/DEBIAN/md5sums"
  dpkg-deb --root-owner-group "${zip[@]}" --build "$tree" "$deb" >/dev/null
  rm -rf "$tree"
  printf '%s\n' "$deb"
done
