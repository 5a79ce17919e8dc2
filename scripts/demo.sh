#!/usr/bin/env bash
# The whole thing on one machine: installs what is missing (redis-server, Apache Kafka from
# Maven Central), starts Redis and a single-node Apache Kafka (KRaft, through the launcher
# scripts/kafka/broker.sh) on free loopback ports, creates the topics, starts tierd with
# config/tierd.toml, feeds it a generated purchase stream, shows tier changes live and looks a
# customer up through the API. Ctrl-C stops everything it started.
# DEMO_EXIT=1 stops after the API look-up instead of waiting (for timing a fresh machine).
#
#   bash scripts/demo.sh [EVENTS] [CUSTOMERS] [RATE]     (defaults: 20000 1000 2000/s)
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${1:-20000}"; CUSTOMERS="${2:-1000}"; RATE="${3:-2000}"
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/install-deps.sh
echo "==> Building tierd (release) [${SECONDS}s since start]"
cargo build --release --locked --bins
BIN=target/release

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
DIR="$(mktemp -d -t tierd-demo.XXXXXX)"
PIDS=()
cleanup() {
  echo; echo "==> Stopping (logs kept in $DIR)"
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill "${PIDS[$i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { for _ in $(seq 1 300); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "$2 did not start; see $DIR" >&2; exit 1; }

. scripts/kafka/version.sh
REDIS_PORT=$(free_port); KAFKA_PORT=$(free_port); CONTROLLER_PORT=$(free_port); API_PORT=$(free_port)
echo "==> Redis on 127.0.0.1:$REDIS_PORT, Apache Kafka $KAFKA_VERSION (KRaft) on 127.0.0.1:$KAFKA_PORT, API on 127.0.0.1:$API_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
PIDS+=($!)
bash scripts/kafka/broker.sh --dir "$DIR/kafka" --port "$KAFKA_PORT" --controller-port "$CONTROLLER_PORT" \
  --heap 512m --watch-pid $$ &
PIDS+=($!)
wait_port "$REDIS_PORT" redis-server; wait_port "$KAFKA_PORT" "Apache Kafka (log: $DIR/kafka/broker.log)"

BROKERS="127.0.0.1:$KAFKA_PORT"
created=0
for _ in $(seq 1 50); do
  if $BIN/tierd-dev --brokers "$BROKERS" create-topics --partitions 4 purchases tier-changes purchases-dlq tier-history; then
    created=1; break
  fi
  sleep 0.2
done
[ "$created" = 1 ] || { echo "creating the topics failed; see $DIR/kafka/broker.log" >&2; exit 1; }

echo "==> Starting tierd (log: $DIR/tierd.log)"
TIERD_KAFKA__BROKERS="$BROKERS" TIERD_REDIS__URL="redis://127.0.0.1:$REDIS_PORT" \
TIERD_API__LISTEN="127.0.0.1:$API_PORT" \
  $BIN/tierd run --config config/tierd.toml >"$DIR/tierd.log" 2>&1 &
PIDS+=($!)
wait_port "$API_PORT" tierd

echo "==> [${SECONDS}s since start] Tier changes, live (customer, from → to, direction, reason, lifetime spend, time):"
$BIN/tierd-dev --brokers "$BROKERS" tail --topic tier-changes &
PIDS+=($!)
sleep 2
$BIN/tierd-dev --brokers "$BROKERS" produce --topic purchases --events "$EVENTS" --customers "$CUSTOMERS" --rate "$RATE" 2>"$DIR/produce.log"
sleep 3

echo; echo "==> API: GET /v1/customers/cust-000042"
curl -s "http://127.0.0.1:$API_PORT/v1/customers/cust-000042" | python3 -m json.tool
echo "==> GET /readyz/ingest: $(curl -s "http://127.0.0.1:$API_PORT/readyz/ingest")"
echo "==> Metrics:"
curl -s "http://127.0.0.1:$API_PORT/metrics" | grep -E '^tierd_(events_applied_total|events_deduplicated_total|tier_changes_total|partitions_assigned)' | head -20
[ "${DEMO_EXIT:-0}" = 1 ] && exit 0
echo; echo "tierd keeps running; produce more with:"
echo "  $BIN/tierd-dev --brokers $BROKERS produce --events 1000 --seed 2"
echo "Press Ctrl-C to stop everything."
wait
