# The pinned Apache Kafka release and where scripts/install-deps.sh caches its jars (sourced).
KAFKA_VERSION=4.1.1
KAFKA_HOME_DEFAULT="${KAFKA_CACHE_DIR:-$HOME/.cache/tierd}/kafka-$KAFKA_VERSION"
