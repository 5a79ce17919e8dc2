#!/usr/bin/env bash
# Installs what is missing, then runs every test: formatting, lints, unit, property and
# integration tests (the integration tests start their own redis-server and Apache Kafka -- one
# broker shared by the whole run, plus their own for tests that kill it -- on free loopback
# ports), then a bounded fuzzing run of the decoder, money parsing, the rules parser and the
# state transition (scripts/fuzz.sh). This is the command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo clippy --all-targets --features failpoints --locked -- -D warnings
cargo nextest run --all-targets --features failpoints --locked --no-fail-fast
bash scripts/fuzz.sh
