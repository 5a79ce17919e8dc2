#!/usr/bin/env bash
# Starts one Apache Kafka node (KRaft, combined broker + controller) in the foreground: the
# launcher of the tests (tests/support), the demo and the benches alike.
#
#   bash scripts/kafka/broker.sh --dir DIR --port P --controller-port C [options]
#
#   --dir DIR             node directory: server.properties, data/ (log.dirs), broker.log
#   --port P              PLAINTEXT listener on 127.0.0.1:P (the clients' bootstrap address)
#   --controller-port C   CONTROLLER listener on 127.0.0.1:C
#   --node-id N           node.id (default 1)
#   --voters V            controller.quorum.voters, e.g. 1@127.0.0.1:C1,2@127.0.0.1:C2,3@…;
#                         without it the node formats itself as a standalone controller
#   --cluster-id ID       the KRaft cluster id (the same on every node of a cluster; default:
#                         a fresh one)
#   --props FILE          extra server properties appended to the generated ones (later keys
#                         win: extra listeners, SASL, replication defaults…)
#   --format-arg ARG      extra argument to `StorageTool format` (repeatable; e.g.
#                         --add-scram 'SCRAM-SHA-512=[name=tierd,password=…]')
#   --heap SIZE           JVM heap (default 512m)
#   --watch-pid PID       stop the node (SIGKILL) once process PID has exited
#   --drop-data           with --watch-pid: then also delete DIR/data (broker.log stays)
#
# The first start writes server.properties and formats DIR/data; a restart on the same DIR
# reuses both (the log survives, like a real broker's disk). The script then `exec`s the JVM,
# so its process id is the broker's: SIGTERM stops it cleanly, SIGKILL kills it. Its output
# goes to DIR/broker.log. The jars come from scripts/install-deps.sh (KAFKA_LIBS overrides).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/kafka/version.sh
. "$HERE/version.sh"
LIBS="${KAFKA_LIBS:-$KAFKA_HOME_DEFAULT/libs}"

DIR=""; PORT=""; CPORT=""; NODE_ID=1; VOTERS=""; CLUSTER_ID=""; PROPS=""; HEAP=512m; WATCH=""
DROP_DATA=0
FORMAT_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --controller-port) CPORT="$2"; shift 2 ;;
    --node-id) NODE_ID="$2"; shift 2 ;;
    --voters) VOTERS="$2"; shift 2 ;;
    --cluster-id) CLUSTER_ID="$2"; shift 2 ;;
    --props) PROPS="$2"; shift 2 ;;
    --format-arg) FORMAT_ARGS+=("$2"); shift 2 ;;
    --heap) HEAP="$2"; shift 2 ;;
    --watch-pid) WATCH="$2"; shift 2 ;;
    --drop-data) DROP_DATA=1; shift ;;
    *) echo "broker.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
for v in DIR PORT CPORT; do
  [ -n "${!v}" ] || { echo "broker.sh: --$(echo "$v" | tr 'A-Z' 'a-z' | sed 's/cport/controller-port/') is required" >&2; exit 2; }
done
if ! ls "$LIBS"/kafka_2.13-*.jar >/dev/null 2>&1; then
  echo "broker.sh: no Apache Kafka jars in $LIBS (run scripts/install-deps.sh)" >&2; exit 2
fi
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
CP="$LIBS/*"
JAVA_OPTS=(-Xms"$HEAP" -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError
  -Djava.awt.headless=true -Dlog4j2.configurationFile="$HERE/log4j2.properties")

if [ ! -f "$DIR/server.properties" ]; then
  {
    echo "process.roles=broker,controller"
    echo "node.id=$NODE_ID"
    if [ -n "$VOTERS" ]; then
      echo "controller.quorum.voters=$VOTERS"
    else
      echo "controller.quorum.bootstrap.servers=127.0.0.1:$CPORT"
    fi
    echo "listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT"
    echo "advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT"
    echo "inter.broker.listener.name=PLAINTEXT"
    echo "controller.listener.names=CONTROLLER"
    echo "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL"
    echo "log.dirs=$DIR/data"
    echo "num.partitions=1"
    echo "num.network.threads=2"
    echo "num.io.threads=4"
    echo "background.threads=4"
    echo "num.recovery.threads.per.data.dir=1"
    echo "offsets.topic.num.partitions=4"
    echo "group.initial.rebalance.delay.ms=0"
    echo "auto.create.topics.enable=false"
    # KIP-848 groups (group.protocol=consumer): the broker owns session timing; short, so a
    # killed member's partitions move on within seconds in tests and the demo.
    echo "group.consumer.min.session.timeout.ms=6000"
    echo "group.consumer.session.timeout.ms=6000"
    echo "group.consumer.min.heartbeat.interval.ms=500"
    echo "group.consumer.heartbeat.interval.ms=500"
    if [ -n "$VOTERS" ]; then
      n=$(echo "$VOTERS" | tr ',' '\n' | wc -l)
      isr=$(( n > 1 ? 2 : 1 ))
      echo "offsets.topic.replication.factor=$n"
      echo "transaction.state.log.replication.factor=$n"
      echo "transaction.state.log.min.isr=$isr"
      echo "share.coordinator.state.topic.replication.factor=$n"
      echo "share.coordinator.state.topic.min.isr=$isr"
    else
      echo "offsets.topic.replication.factor=1"
      echo "transaction.state.log.replication.factor=1"
      echo "transaction.state.log.min.isr=1"
      echo "share.coordinator.state.topic.replication.factor=1"
      echo "share.coordinator.state.topic.min.isr=1"
    fi
    # Small machines: keep segments and the log cleaner light.
    echo "log.segment.bytes=67108864"
    echo "log.cleaner.dedupe.buffer.size=8388608"
    echo "log.retention.check.interval.ms=300000"
    if [ -n "$PROPS" ]; then cat "$PROPS"; fi
  } >"$DIR/server.properties"
fi

if [ ! -f "$DIR/data/meta.properties" ]; then
  [ -n "$CLUSTER_ID" ] || CLUSTER_ID="$(java -Xmx128m -cp "$CP" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
  # A static quorum (--voters) needs no initial-controller flag; one node bootstraps itself.
  if [ -n "$VOTERS" ]; then MODE=(); else MODE=(--standalone); fi
  java -Xmx256m -cp "$CP" -Dlog4j2.configurationFile="$HERE/log4j2.properties" kafka.tools.StorageTool format \
    -t "$CLUSTER_ID" -c "$DIR/server.properties" ${MODE[@]+"${MODE[@]}"} ${FORMAT_ARGS[@]+"${FORMAT_ARGS[@]}"} \
    >>"$DIR/broker.log" 2>&1 || { echo "broker.sh: formatting $DIR failed; see $DIR/broker.log" >&2; tail -20 "$DIR/broker.log" >&2; exit 1; }
fi

if [ -n "$WATCH" ]; then
  me=$$
  # Only a watched process that is gone stops the node; a node that died (or was killed by a
  # test) first ends the watchdog without touching its pid (it may be reused) or its data.
  ( trap '' HUP; while kill -0 "$WATCH" 2>/dev/null && kill -0 "$me" 2>/dev/null; do sleep 1; done
    if ! kill -0 "$WATCH" 2>/dev/null && kill -0 "$me" 2>/dev/null; then
      kill -9 "$me" 2>/dev/null || true
      if [ "$DROP_DATA" = 1 ]; then sleep 1; rm -rf "$DIR/data"; fi
    fi ) </dev/null >/dev/null 2>&1 &
fi
exec java "${JAVA_OPTS[@]}" -cp "$CP" kafka.Kafka "$DIR/server.properties" >>"$DIR/broker.log" 2>&1
