#!/usr/bin/env bash
# Installs what tierd's demo and tests need and this machine lacks:
#   redis-server (Debian package) and the Kafka-API broker Tansu 0.6.0 (cargo install,
#   ~13-35 min on 2 cores the first time; progress is shown).
set -euo pipefail

if ! command -v redis-server >/dev/null 2>&1; then
  echo "==> Installing redis-server (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
redis-server --version

TANSU="${TANSU_BIN:-$HOME/.cargo/bin/tansu}"
if [ ! -x "$TANSU" ] && ! command -v tansu >/dev/null 2>&1; then
  echo "==> Installing the Tansu broker (cargo install tansu 0.6.0; takes ~13-35 min the first time)"
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql
fi
echo "tansu: $(command -v tansu || echo "$TANSU")"

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "==> Installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
