#!/usr/bin/env bash
# Creates ACLs on a running Apache Kafka cluster (one with an authorizer), as its super user:
#
#   bash scripts/kafka/acl.sh BOOTSTRAP 'PRINCIPAL|RESOURCE_TYPE|PATTERN_TYPE|NAME|OPERATION|PERMISSION'...
#
# e.g. 'User:tierd|TOPIC|LITERAL|purchases|READ|ALLOW' or
# 'User:tierd|TRANSACTIONAL_ID|PREFIXED|tierd:|WRITE|ALLOW'. Runs scripts/kafka/AclAdmin.java
# with the pinned release's Admin client (Java's single-file launcher: nothing is built), then
# prints every binding the cluster holds. The jars come from scripts/install-deps.sh
# (KAFKA_LIBS overrides).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/kafka/version.sh
. "$HERE/version.sh"
LIBS="${KAFKA_LIBS:-$KAFKA_HOME_DEFAULT/libs}"
exec java -Xmx128m -cp "$LIBS/*" -Dlog4j2.configurationFile="$HERE/log4j2.properties" \
  "$HERE/AclAdmin.java" "$@"
