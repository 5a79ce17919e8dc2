#!/usr/bin/env bash
# Fuzzes the decoder, money parsing, the rules parser and the state transition with libFuzzer
# (cargo-fuzz, nightly toolchain: scripts/install-deps.sh installs both). Each target starts
# from its committed corpus in fuzz/corpus/<target>/ and runs FUZZ_SECONDS (default 30: the
# bounded CI run); a crash, a panic, a failed invariant or an input slower than FUZZ_TIMEOUT
# seconds (default 10: a hang) fails the run and leaves the input in fuzz/artifacts/<target>/.
# New corpus entries found go to a scratch directory, so CI leaves the clone clean; to grow the
# committed corpus run e.g. `FUZZ_SECONDS=600 FUZZ_KEEP=1 bash scripts/fuzz.sh` and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
seconds="${FUZZ_SECONDS:-30}"
timeout_s="${FUZZ_TIMEOUT:-10}"
targets=(decode money rules transition)
cargo +nightly fuzz build -O
for t in "${targets[@]}"; do
  scratch=$(mktemp -d)
  if [ -n "${FUZZ_KEEP:-}" ]; then scratch=fuzz/corpus/$t; fi
  echo "==> fuzz $t for ${seconds}s"
  log=$(mktemp)
  set +e
  cargo +nightly fuzz run -O "$t" "$scratch" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout="$timeout_s" -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1
  status=$?
  set -e
  grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log" >&2
    echo "fuzz target $t failed (the input is in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  rm -f "$log"
  [ -n "${FUZZ_KEEP:-}" ] || rm -rf "$scratch"
done
