#!/usr/bin/env bash
# Installs what tierd's build, demo, tests and benches need and a fresh machine lacks, each
# only once:
#   - Debian packages: redis-server (tests start their own), the -dev packages librdkafka's
#     ssl and zstd features build against, openssl (test certificates), Java 17 and Maven,
#     gdb (a failing test dumps the threads of a tierd still running, for the post-mortem),
#     prometheus for its promtool (tests check tierd's metrics and the alert rules with it),
#     docker-compose (its `config` checks deploy/compose.yaml; no engine), python3-venv,
#     nodejs and npm, chromium (headless: the status page) with a CJK font;
#   - pinned Python tools in a virtualenv (~/.cache/tierd/py-tools, PY_TOOLS_DIR moves it):
#     schemathesis (the API against its OpenAPI document), kubernetes-validate; pinned npm
#     packages (~/.cache/tierd/node-tools, NODE_TOOLS_DIR): kubernetes-models' schemas and types,
#     TypeScript (checks the manifests against those types: unknown fields refused);
#   - Apache Kafka (pinned in scripts/kafka/version.sh): the broker jars and their
#     dependencies from Maven Central into ~/.cache/tierd/kafka-VERSION/libs (KAFKA_CACHE_DIR
#     moves the cache); nothing is built;
#   - cargo-nextest (the test runner);
#   - a nightly Rust toolchain and cargo-fuzz (the fuzz targets in fuzz/, libFuzzer needs
#     nightly's sanitizer-coverage flags).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/kafka/version.sh
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

need=()
need_alone=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# Apache Kafka 4 needs Java 17 or newer.
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
[ "${java_major:-0}" -ge 17 ] 2>/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v gdb >/dev/null 2>&1 || need+=(gdb)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
for p in libssl-dev libzstd-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
# Prometheus and promtool alone: the package's recommended exporters are not needed.
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need_alone+=(prometheus)
# `docker-compose config` checks deploy/compose.yaml (no Docker engine: not its recommends).
command -v docker-compose >/dev/null 2>&1 || need_alone+=(docker-compose)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
# Headless Chromium renders the status page in tests/operate.rs; a CJK font shows the
# source material's Chinese tier names in its screenshot.
command -v chromium >/dev/null 2>&1 || need_alone+=(chromium)
dpkg -s fonts-wqy-microhei >/dev/null 2>&1 || need_alone+=(fonts-wqy-microhei)
if [ ${#need[@]} -gt 0 ] || [ ${#need_alone[@]} -gt 0 ]; then
  echo "==> Installing Debian packages: ${need[*]} ${need_alone[*]}"
  $SUDO apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  if [ ${#need_alone[@]} -gt 0 ]; then
    # The prometheus package starts its service when installed; the tests start their own
    # server. Where no policy forbids it, forbid starting services for this install only.
    policy=/usr/sbin/policy-rc.d
    own_policy=""
    if [ ! -e "$policy" ]; then
      # Removed however the install ends.
      trap '$SUDO rm -f "$policy"' EXIT
      printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
      $SUDO chmod +x "$policy"
      own_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_alone[@]}" >/dev/null
    if [ -n "$own_policy" ]; then
      $SUDO rm -f "$policy"
      trap - EXIT
    fi
  fi
fi
promtool --version 2>&1 | head -1
redis-server --version

LIBS="$KAFKA_HOME_DEFAULT/libs"
if ! ls "$LIBS"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1; then
  echo "==> Fetching Apache Kafka $KAFKA_VERSION and its dependencies from Maven Central into $LIBS"
  start=$(date +%s)
  rm -rf "$LIBS.partial"
  mvn -B -ntp -f scripts/kafka/pom.xml -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS.partial" \
    | grep -E 'Copying|BUILD|ERROR' | sed -u 's/^/    /' || true
  ls "$LIBS.partial"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1 \
    || { echo "fetching Apache Kafka failed (see the Maven output above)" >&2; exit 1; }
  mv "$LIBS.partial" "$LIBS"
  echo "    done in $(( $(date +%s) - start )) s"
fi
echo "Apache Kafka $KAFKA_VERSION: $LIBS ($(ls "$LIBS" | wc -l) jars)"

# Python tools the tests run, pinned, in a virtualenv of their own: schemathesis checks the
# API against its OpenAPI document (tests/operate.rs), kubernetes-validate the Kubernetes
# manifests (tests/deploy.rs).
PY_TOOLS="${PY_TOOLS_DIR:-$HOME/.cache/tierd/py-tools}"
PY_PINS=(schemathesis==4.32.5 kubernetes-validate==1.37.0 PyYAML==6.0.3)
pinned=$("$PY_TOOLS/bin/pip" freeze 2>/dev/null | grep -cxF -f <(printf '%s\n' "${PY_PINS[@]}") || true)
if [ "${pinned:-0}" -ne ${#PY_PINS[@]} ]; then
  echo "==> Installing ${PY_PINS[*]} into $PY_TOOLS"
  python3 -m venv "$PY_TOOLS"
  "$PY_TOOLS/bin/pip" install -q --disable-pip-version-check "${PY_PINS[@]}"
fi
echo "Python tools: $("$PY_TOOLS/bin/schemathesis" --version), kubernetes-validate $("$PY_TOOLS/bin/kubernetes-validate" --version)"

# Node tools, pinned: kubernetes-models' schemas (core, KEDA, Prometheus Operator kinds) for
# scripts/k8s/validate-models.mjs (tests/deploy.rs).
NODE_TOOLS="${NODE_TOOLS_DIR:-$HOME/.cache/tierd/node-tools}"
NODE_PINS=(kubernetes-models@5.1.0 @kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0 js-yaml@5.5.0 typescript@5.9.3)
if [ "$(cat "$NODE_TOOLS/.pins" 2>/dev/null)" != "${NODE_PINS[*]}" ]; then
  echo "==> Installing ${NODE_PINS[*]} into $NODE_TOOLS"
  mkdir -p "$NODE_TOOLS"
  npm install --prefix "$NODE_TOOLS" --no-audit --no-fund --silent "${NODE_PINS[@]}"
  echo "${NODE_PINS[*]}" > "$NODE_TOOLS/.pins"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "==> Installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "==> Installing a nightly Rust toolchain (for cargo-fuzz)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> Installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
