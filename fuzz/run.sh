#!/usr/bin/env bash
# fuzz/run.sh SECONDS -- build every fuzz target, replay its kept crash
# inputs (fuzz/regressions/<target>/), then fuzz it for SECONDS from its
# seed corpus (fuzz/corpus/<target>/). Exits non-zero on any crash or
# failed property; libFuzzer leaves the input in fuzz/artifacts/<target>/.
#
# Works on the stable toolchain: cargo-fuzz's coverage flags are stable, its
# -Z flags are let through by RUSTC_BOOTSTRAP=1, and `--sanitizer none`
# skips AddressSanitizer (the code under test has no unsafe). Installs
# cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
SECONDS_EACH=${1:?usage: fuzz/run.sh SECONDS}
log() { echo "[fuzz/run.sh $(date +%T)] $*" >&2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
FLAGS=(--sanitizer none --release --debug-assertions)

start=$(date +%s)
log "building"
cargo fuzz build "${FLAGS[@]}"
log "built in $(( $(date +%s) - start )) s"

for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t"
  if compgen -G "regressions/$t/*" >/dev/null; then
    log "$t: replaying regressions/$t"
    cargo fuzz run "${FLAGS[@]}" "$t" regressions/"$t"/* -- -runs=1
  fi
  log "$t: fuzzing for $SECONDS_EACH s"
  # a scratch copy of the seeds: what the run adds is not committed
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/"
  if ! cargo fuzz run "${FLAGS[@]}" "$t" "$work" -- -max_total_time="$SECONDS_EACH" -max_len=65536 \
      -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 >"$work.log" 2>&1; then
    tail -40 "$work.log"
    log "$t FAILED (the input is in fuzz/artifacts/$t/)"
    exit 1
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$work.log" | sed "s/^/  $t: /" >&2 || true
  rm -f "$work.log"
  rm -rf "$work"
done
log "every target ran $SECONDS_EACH s without a failure (total $(( $(date +%s) - start )) s)"
