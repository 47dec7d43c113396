#!/usr/bin/env bash
# A real Apache Kafka broker (KRaft, one node that is both broker and controller) for the tests. The jars come
# from Maven Central (e2e/testenv/kafka/pom.xml) and are cached by version under ${UMW_TESTENV_CACHE}; the
# machine's Java 17 runs them. Idempotent: a warm cache returns at once.
#
#   kafka.sh fetch                                   # copy the jars into the cache, once
#   kafka.sh --print-lib                             # print the lib directory (fetching it if missing)
#   kafka.sh start DIR PORT CONTROLLER_PORT          # run a broker on 127.0.0.1:PORT in the foreground
#                                                    # (KAFKA_HOST=address to listen there instead,
#                                                    # KAFKA_SASL_PLAIN_USERS="u:p ..." for SASL/PLAIN,
#                                                    # KAFKA_TLS_DIR=dir with server.pem and ca.crt for TLS)
#   kafka.sh topics BOOTSTRAP ARGS...                # org.apache.kafka.tools.TopicCommand
#   kafka.sh perf-producer BOOTSTRAP ARGS...         # org.apache.kafka.tools.ProducerPerformance
#
# `start` writes DIR/server.properties and DIR/log4j.properties, formats DIR/data unless it already holds a
# formatted log directory (a restart on the same DIR keeps its topics and records), then execs the JVM: the
# caller's child is the broker itself, to be stopped with SIGTERM (clean) or SIGKILL. It logs to DIR/kafka.log
# at WARN, except for the line "Kafka Server started", written once the broker serves clients; DIR/kafka.log
# is appended to across restarts, so look for that line past the size the file had at the spawn.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"
# shellcheck source=ports.sh
. "$HERE/ports.sh"

KAFKA_HOME="$UMW_TESTENV_CACHE/kafka-$KAFKA_VERSION"
LIB="$KAFKA_HOME/lib"
# A class-data archive of the classes a broker loads, made by `fetch`; every JVM below maps it.
ARCHIVE="$KAFKA_HOME/kafka.jsa"
READY_LINE="Kafka Server started"

log() { printf '[kafka] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The JVM, tuned to start fast on a small machine: the serial collector, C1 only, and the class-data archive
# (together they halve the broker's startup). JVM warnings go to stderr, so that tools' output stays clean;
# an archive the JVM cannot use (another JDK) is skipped with a warning. Sets JAVA=(java flags...).
jvm() {
  JAVA=(java -Xmx"$1" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto -Djava.awt.headless=true
    -Xlog:disable -Xlog:all=warning:stderr)
  if [ -f "$ARCHIVE" ]; then JAVA+=(-XX:SharedArchiveFile="$ARCHIVE"); fi
}


# A cluster id as Kafka makes them: 16 random bytes in URL-safe base64, unpadded, not starting with '-'.
cluster_id() {
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    [ "${id:0:1}" != - ] && { echo "$id"; return; }
  done
}

write_config() {
  local dir=$1 port=$2 cport=$3 host=${KAFKA_HOST:-127.0.0.1}
  mkdir -p "$dir"
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://$host:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://$host:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
# One node: every internal topic has one replica, and one partition is plenty for a test.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
default.replication.factor=1
min.insync.replicas=1
num.partitions=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
# Sized for a 2-core machine and a small heap (the log cleaner's buffer is 128 MiB by default).
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
log.cleaner.dedupe.buffer.size=16777216
# After SIGKILL the controller keeps the dead broker's registration until its session times out (9 s by
# default), and a broker restarted on the same DIR waits for that before it serves clients.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=3000
PROPS
  # With KAFKA_SASL_PLAIN_USERS="user:password ...", clients authenticate with SASL/PLAIN as those users
  # (the broker talks to itself as an internal admin user).
  if [ -n "${KAFKA_SASL_PLAIN_USERS:-}" ]; then
    local users="user_umw-internal=\"internal-secret\"" pair
    for pair in $KAFKA_SASL_PLAIN_USERS; do users="$users user_${pair%%:*}=\"${pair#*:}\""; done
    sed -i -e "s|^listeners=PLAINTEXT://|listeners=SASL_PLAINTEXT://|" \
      -e "s|^advertised.listeners=PLAINTEXT://|advertised.listeners=SASL_PLAINTEXT://|" \
      -e "s|^inter.broker.listener.name=PLAINTEXT|inter.broker.listener.name=SASL_PLAINTEXT|" \
      -e "s|^listener.security.protocol.map=.*|listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT|" \
      "$dir/server.properties"
    cat >> "$dir/server.properties" <<PROPS
sasl.enabled.mechanisms=PLAIN
sasl.mechanism.inter.broker.protocol=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="umw-internal" password="internal-secret" $users;
PROPS
  fi
  # With KAFKA_TLS_DIR (server.pem: private key and certificate chain; ca.crt: the authority), clients
  # and the broker itself speak TLS only.
  if [ -n "${KAFKA_TLS_DIR:-}" ]; then
    sed -i -e "s|^listeners=PLAINTEXT://|listeners=SSL://|" \
      -e "s|^advertised.listeners=PLAINTEXT://|advertised.listeners=SSL://|" \
      -e "s|^inter.broker.listener.name=PLAINTEXT|inter.broker.listener.name=SSL|" \
      -e "s|^listener.security.protocol.map=.*|listener.security.protocol.map=CONTROLLER:PLAINTEXT,SSL:SSL|" \
      "$dir/server.properties"
    cat >> "$dir/server.properties" <<PROPS
ssl.keystore.type=PEM
ssl.keystore.location=$KAFKA_TLS_DIR/server.pem
ssl.truststore.type=PEM
ssl.truststore.location=$KAFKA_TLS_DIR/ca.crt
ssl.endpoint.identification.algorithm=https
PROPS
  fi
  cat > "$dir/log4j.properties" <<L4J
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File=$dir/kafka.log
log4j.appender.file.Append=true
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
# "[KafkaRaftServer nodeId=1] $READY_LINE": the broker serves clients.
log4j.logger.kafka.server.KafkaRaftServer=INFO
L4J
}

# Formats DIR/data for a new single-node cluster, unless it is formatted already.
format() {
  local dir=$1
  [ -f "$dir/data/meta.properties" ] && return
  jvm 256m
  "${JAVA[@]}" -Dlog4j.configuration="file:$dir/log4j.properties" -cp "$LIB/*" \
    kafka.tools.StorageTool format --ignore-formatted -t "$(cluster_id)" -c "$dir/server.properties" \
    > "$dir/format.log" 2>&1 || { cat "$dir/format.log" >&2; die "formatting $dir/data failed"; }
}

# Sets BROKER to the command line of a broker in DIR; further arguments are JVM flags.
broker_cmd() {
  local dir=$1; shift
  jvm 512m
  BROKER=("${JAVA[@]}" -Xms64m -Dlog4j.configuration="file:$dir/log4j.properties" -Dkafka.logs.dir="$dir" \
    "$@" -cp "$LIB/*" kafka.Kafka "$dir/server.properties")
}

# Runs one of Kafka's command-line tools.
tool() {
  jvm 256m
  "${JAVA[@]}" -Dlog4j.configuration="file:$KAFKA_HOME/tools-log4j.properties" -cp "$LIB/*" "$@"
}

# Runs a broker once, with a topic and a few records, and archives the classes it loaded when it exits.
make_archive() {
  local dir="$KAFKA_HOME/archive-run" port cport pid ok=""
  reserve_port port; reserve_port cport
  rm -rf "$dir"
  write_config "$dir" "$port" "$cport"
  format "$dir"
  broker_cmd "$dir" -XX:ArchiveClassesAtExit="$ARCHIVE.tmp"
  "${BROKER[@]}" > "$dir/broker.out" 2>&1 &
  pid=$!
  trap 'kill -9 "$pid" 2>/dev/null' EXIT
  for _ in $(seq 1 600); do
    if grep -q "$READY_LINE" "$dir/kafka.log" 2>/dev/null; then ok=1; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -n "$ok" ]; then
    tool org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$port" --create --topic warm-up \
      --partitions 1 >/dev/null 2>&1 || ok=""
    tool org.apache.kafka.tools.ProducerPerformance --topic warm-up --num-records 10000 --record-size 100 \
      --throughput -1 --producer-props "bootstrap.servers=127.0.0.1:$port" acks=all >/dev/null 2>&1 || ok=""
  fi
  # The archive is written while the JVM exits after SIGTERM.
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  trap - EXIT
  if [ -n "$ok" ] && [ -s "$ARCHIVE.tmp" ]; then mv "$ARCHIVE.tmp" "$ARCHIVE"; rm -rf "$dir"; return 0; fi
  rm -f "$ARCHIVE.tmp"
  log "warning: no class-data archive (brokers start about 1 s slower); the trial broker's log: $dir"
}

fetch() {
  [ -f "$KAFKA_HOME/complete" ] && return
  command -v java >/dev/null || die "Java 17 is needed to run Kafka (install openjdk-17-jre-headless)"
  command -v mvn >/dev/null || die "Maven is needed to fetch Kafka from Maven Central (install maven)"
  mkdir -p "$UMW_TESTENV_CACHE"
  # One fetch at a time (tests may start several brokers at once); the others wait for it.
  exec 9> "$UMW_TESTENV_CACHE/kafka-$KAFKA_VERSION.lock"
  flock 9
  [ -f "$KAFKA_HOME/complete" ] && { exec 9>&-; return; }
  log "fetching Apache Kafka $KAFKA_VERSION from Maven Central"
  local t0=$SECONDS stage="$KAFKA_HOME.tmp"
  rm -rf "$stage" "$KAFKA_HOME"; mkdir -p "$stage"
  if ! mvn -q -B -f "$HERE/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DoutputDirectory="$stage/lib" -DincludeScope=runtime > "$stage/mvn.log" 2>&1; then
    cat "$stage/mvn.log" >&2; rm -rf "$stage"; die "mvn dependency:copy-dependencies failed"
  fi
  rm -f "$stage/mvn.log"
  cat > "$stage/tools-log4j.properties" <<'L4J'
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
L4J
  # The archive names the jars by path, so it is made in the final place; `complete` comes last.
  mv "$stage" "$KAFKA_HOME"
  log "Kafka $KAFKA_VERSION copied to $LIB ($(du -sh "$LIB" | cut -f1)) in $((SECONDS - t0))s; archiving a broker's classes"
  make_archive
  touch "$KAFKA_HOME/complete"
  exec 9>&-
  log "Kafka $KAFKA_VERSION ready in $KAFKA_HOME ($((SECONDS - t0))s)"
}

start() {
  local dir=$1 port=$2 cport=$3
  fetch
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  write_config "$dir" "$port" "$cport"
  format "$dir"
  broker_cmd "$dir"
  exec "${BROKER[@]}"
}

perf_producer() {
  local bootstrap=$1 config rc=0; shift
  # ProducerPerformance has no --bootstrap-server: the address goes in a config file, which --producer-props
  # may still override.
  config=$(mktemp)
  echo "bootstrap.servers=$bootstrap" > "$config"
  tool org.apache.kafka.tools.ProducerPerformance --producer.config "$config" "$@" || rc=$?
  rm -f "$config"
  return "$rc"
}

usage="usage: $0 fetch | --print-lib | start DIR PORT CONTROLLER_PORT | topics BOOTSTRAP ARGS... | perf-producer BOOTSTRAP ARGS..."
case "${1:-}" in
  fetch) fetch ;;
  --print-lib) fetch; echo "$LIB" ;;
  start)
    [ $# -eq 4 ] || die "usage: $0 start DIR PORT CONTROLLER_PORT"
    start "$2" "$3" "$4" ;;
  topics)
    [ $# -ge 2 ] || die "usage: $0 topics BOOTSTRAP ARGS..."
    b=$2; shift 2
    fetch
    tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$b" "$@" ;;
  perf-producer)
    [ $# -ge 2 ] || die "usage: $0 perf-producer BOOTSTRAP ARGS..."
    b=$2; shift 2
    fetch
    perf_producer "$b" "$@" ;;
  *) die "$usage" ;;
esac
