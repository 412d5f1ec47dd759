#!/usr/bin/env bash
# THE test command:  sudo ./deploy/test.sh [extra `cargo test` arguments, e.g. -p homeport-tests]
#
# 1. deploy/setup.sh (installs what is missing; needs root the first time)
# 2. cargo test -p homeport-engine --features fake-time fake_time   (engine timer tests on a
#    mocked boringtun clock; run first and alone, since that feature must never reach a real binary)
# 3. cargo build --workspace --bins   (the integration tests start these binaries from target/debug)
# 4. cargo test --workspace --no-fail-fast
# 5. the fuzz targets (fuzz/, cargo-fuzz): built once, then each run for HOMEPORT_FUZZ_SECONDS
#    (default 5) from its committed seeds (fuzz/corpus/<target>/seed-*); what it finds is kept in
#    fuzz/artifacts/<target>/ and fails the run. HOMEPORT_FUZZ_SECONDS=0 skips the step (a failure
#    under CI=true, as is a missing cargo-fuzz).
# then prints a summary. Tests that need root and network namespaces skip with a notice when run
# without root, except under CI=true, where anything missing is a failure (CI exports CI=true; so
# does .ci/run).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root" || exit 1

ci=${CI:-}
if [ "$ci" = true ] || [ "$ci" = 1 ]; then export CI=true; ci=true; else ci=false; fi

work=$(mktemp -d /tmp/homeport-test.XXXXXX)
trap 'rm -rf "$work"' EXIT
# Tests that skip for lack of root append a line here (see tests/src/lib.rs), so the summary can list them.
export HOMEPORT_TEST_SKIP_LOG="$work/skips"
: >"$HOMEPORT_TEST_SKIP_LOG"

step() { printf '\n==== %s ====\n' "$*"; }
setup_status=ok build_status=ok test_status=ok fuzz_status=ok

step "setup (deploy/setup.sh)"
if ! "$here/setup.sh"; then
  setup_status=FAILED
  if [ "$ci" = true ]; then
    echo "test: setup failed under CI=true; stopping" >&2
  else
    echo "test: setup failed (not root?); going on with what is installed — root-only tests will skip" >&2
  fi
fi

# sudo resets PATH: find the cargo that setup.sh found or installed.
if ! command -v cargo >/dev/null; then
  for h in "${CARGO_HOME:-$HOME/.cargo}" "$HOME/.cargo" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo"}; do
    if [ -x "$h/bin/cargo" ]; then PATH="$h/bin:$PATH"; break; fi
  done
  export PATH
fi

if [ "$setup_status" = ok ] || [ "$ci" = false ]; then
  step "engine timer tests with fake time (cargo test -p homeport-engine --features fake-time fake_time)"
  cargo test -p homeport-engine --features fake-time fake_time 2>&1 | tee "$work/fake-time.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || test_status=FAILED
fi

if [ "$setup_status" = ok ] || [ "$ci" = false ]; then
  step "build (cargo build --workspace --bins)"
  cargo build --workspace --bins || build_status=FAILED
else
  build_status=skipped
fi

if [ "$build_status" = ok ]; then
  step "tests (cargo test --workspace --no-fail-fast $*)"
  # --no-fail-fast: every test binary runs, so the summary below is complete.
  cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$work/test.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || test_status=FAILED
  cat "$work/fake-time.log" >>"$work/test.log" 2>/dev/null
else
  [ "$test_status" = FAILED ] || test_status=skipped
  : >"$work/test.log"
fi

# Coverage-guided fuzzing of every decoder network input reaches (fuzz/README.md), a few seconds a
# target. Inputs the fuzzer adds go to a scratch corpus; the committed seeds are only read.
fuzz_secs=${HOMEPORT_FUZZ_SECONDS:-5}
fuzz_failed=() fuzz_ran=0
# A debug build (overflow checks on) without a sanitizer: it builds on the stable toolchain (no -Z
# flags) and cold in about 5 minutes here, against 12 for an optimized one; the code under test is
# safe Rust, where ASan adds little. Long runs use an optimized build (fuzz/README.md).
fuzz_flags=(--dev -s none)
step "fuzz (cargo fuzz, ${fuzz_secs}s per target)"
fuzz_started=$(date +%s)
if [ "$setup_status" != ok ] && [ "$ci" = true ]; then
  fuzz_status=skipped
elif [ "$fuzz_secs" = 0 ]; then
  echo "test: HOMEPORT_FUZZ_SECONDS=0: fuzzing skipped"
  fuzz_status=skipped
elif ! cargo fuzz --version >/dev/null 2>&1; then
  echo "test: cargo-fuzz is missing (deploy/setup.sh installs it): fuzzing skipped" >&2
  fuzz_status=skipped
else
  # The fuzz crate is its own workspace: start it from the main lock file so it builds the same
  # dependency versions.
  [ -f fuzz/Cargo.lock ] || cp Cargo.lock fuzz/Cargo.lock
  if cargo fuzz build "${fuzz_flags[@]}"; then
    for t in $(cargo fuzz list); do
      mkdir -p "$work/fuzz-corpus/$t"
      fuzz_ran=$((fuzz_ran + 1))
      echo "-- fuzz $t"
      if ! cargo fuzz run "${fuzz_flags[@]}" "$t" "$work/fuzz-corpus/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$fuzz_secs" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$work/fuzz-$t.log" 2>&1; then
        fuzz_failed+=("$t")
        tail -n 40 "$work/fuzz-$t.log"
      fi
      grep -E '^(stat::number_of_executed_units|#[0-9]+.*DONE)' "$work/fuzz-$t.log" | sed 's/^/   /'
    done
    [ "${#fuzz_failed[@]}" -eq 0 ] || fuzz_status=FAILED
  else
    fuzz_status=FAILED
  fi
fi
fuzz_took=$(( $(date +%s) - fuzz_started ))

# Sum cargo's per-binary "test result:" lines.
read -r passed failed ignored suites < <(awk '
  /^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i+1) ~ /^passed/) p += $i
      if ($(i+1) ~ /^failed/) f += $i
      if ($(i+1) ~ /^ignored/) g += $i
    }
    s++
  }
  END { printf "%d %d %d %d\n", p, f, g, s }' "$work/test.log")

# Each fuzz target counts as a test in the totals; a fuzz step that could not run counts as one
# failure where it must run (CI).
passed=$((passed + fuzz_ran - ${#fuzz_failed[@]}))
failed=$((failed + ${#fuzz_failed[@]}))
if [ "$fuzz_status" = FAILED ] && [ "$fuzz_ran" -eq 0 ]; then failed=$((failed + 1)); fi
if [ "$fuzz_status" = skipped ] && [ "$ci" = true ]; then failed=$((failed + 1)); fi

step "summary"
printf '  CI mode:  %s\n' "$ci"
printf '  setup:    %s\n' "$setup_status"
printf '  build:    %s\n' "$build_status"
printf '  tests:    %s (%s test binaries: %s passed, %s failed, %s ignored)\n' \
  "$test_status" "$suites" "$passed" "$failed" "$ignored"
if grep -q ' \.\.\. FAILED$' "$work/test.log"; then
  echo "  failed tests:"
  grep ' \.\.\. FAILED$' "$work/test.log" | sed 's/^test /    /; s/ \.\.\. FAILED$//'
fi
printf '  fuzz:     %s (%s targets, %ss each, %ss in all with the build)\n' \
  "$fuzz_status" "$fuzz_ran" "$fuzz_secs" "$fuzz_took"
if [ "${#fuzz_failed[@]}" -gt 0 ]; then
  echo "  fuzz targets that found a crash (input in fuzz/artifacts/<target>/):"
  printf '    %s\n' "${fuzz_failed[@]}"
fi
if [ -s "$HOMEPORT_TEST_SKIP_LOG" ]; then
  echo "  skipped for lack of root or tools (they pass vacuously; run as root to exercise them):"
  sort -u "$HOMEPORT_TEST_SKIP_LOG" | sed 's/^/    /'
fi

rc=0
if [ "$setup_status" != ok ] && [ "$ci" = true ]; then rc=1; fi
if [ "$build_status" != ok ] || [ "$test_status" != ok ]; then rc=1; fi
if [ "$fuzz_status" = FAILED ] || { [ "$fuzz_status" != ok ] && [ "$ci" = true ]; }; then rc=1; fi
if [ "$rc" -eq 0 ]; then echo "  result:   OK"; else echo "  result:   FAILED"; fi
echo
# The plain closing line (read by CI as the test count).
echo "$passed passed, $failed failed"
exit "$rc"
