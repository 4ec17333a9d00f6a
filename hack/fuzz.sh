#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60), starting from the
# committed seeds plus whatever corpus earlier runs left in <crate>/fuzz/corpus.
#   hack/fuzz.sh [SECONDS] [TARGET]
# Uses the stable toolchain with RUSTC_BOOTSTRAP=1 for the sanitizer flags,
# so no nightly toolchain is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
only=${2:-}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "hack/fuzz.sh: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1

for dir in */fuzz; do
  for target in $(cargo fuzz list --fuzz-dir "$dir"); do
    [ -n "$only" ] && [ "$only" != "$target" ] && continue
    corpus="$dir/corpus/$target"
    mkdir -p "$corpus"
    echo "== fuzzing $dir/$target for ${secs}s"
    log=$(mktemp)
    if ! cargo fuzz run --fuzz-dir "$dir" "$target" "$corpus" "$dir/seeds/$target" -- \
      -max_total_time="$secs" -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
      # The build error or the crash report, not just cargo-fuzz's backtrace.
      grep -v -E '^\s+([0-9]+:|at )' "$log" | tail -n 60 >&2
      rm -f "$log"
      exit 1
    fi
    tail -n 15 "$log"
    rm -f "$log"
  done
done
