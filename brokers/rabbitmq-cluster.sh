#!/usr/bin/env bash
# A private 3-node RabbitMQ cluster (the host's RabbitMQ version, 3.10 here), on 127.0.0.1,
# everything under one directory and stopped by PID. ../shared/platform-notes.md §1 has the
# measurements and the traps (the Erlang cookie, the Debian wrappers, the dist port).
#
#   brokers/rabbitmq-cluster.sh start          # idempotent; ready (clustered) on return, ~20 s
#   brokers/rabbitmq-cluster.sh stop           # idempotent; removes the directory
#   brokers/rabbitmq-cluster.sh kill NODE      # SIGKILL node a, b or c
#   brokers/rabbitmq-cluster.sh restart NODE   # start a stopped/killed node on its data (it rejoins)
#   brokers/rabbitmq-cluster.sh bounce NODE    # graceful stop, then start again (rolling restart)
#   brokers/rabbitmq-cluster.sh ctl NODE ARGS  # rabbitmqctl against NODE
#   brokers/rabbitmq-cluster.sh leaders QUEUE-PREFIX  # "queue leader-node" lines
#   brokers/rabbitmq-cluster.sh urls           # BUSREG_AMQP_URL and BUSREG_STREAM_URL values
#
# Nodes rabbit-{a,b,c}@localhost: AMQP 5681-5683, stream 5561-5563, distribution
# 25681-25683. Directory: ${BUSREG_BROKERS_STATE:-/tmp/busreg-brokers}/rabbitmq-cluster.
# The nodes are not detached: they stay in the caller's process group (a CI step that kills
# its group takes them too). They register with the host's epmd, which the system RabbitMQ
# runs anyway.
set -euo pipefail

BASE=${BUSREG_BROKERS_STATE:-/tmp/busreg-brokers}/rabbitmq-cluster
BIN=/usr/lib/rabbitmq/bin # not /usr/sbin: those wrappers su to rabbitmq and its cookie
NODES=(a b c)

say() { echo "rabbitmq-cluster: $*" >&2; }
idx() { case "$1" in a) echo 1 ;; b) echo 2 ;; c) echo 3 ;; *)
    say "no node $1 (a, b or c)"
    exit 2
    ;;
esac; }

node_env() {
    local n=$1 i d
    i=$(idx "$n")
    d=$BASE/$n
    echo HOME=$BASE/home RABBITMQ_NODENAME=rabbit-$n@localhost \
        RABBITMQ_DIST_PORT=$((25680 + i)) RABBITMQ_CONF_ENV_FILE=$d/rabbitmq-env.conf \
        RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config \
        RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins RABBITMQ_MNESIA_BASE=$d/mnesia \
        RABBITMQ_LOG_BASE=$d/log RABBITMQ_PID_FILE=$d/beam.pid
}
ctl() { # ctl NODE ARGS...
    local n=$1
    shift
    env $(node_env "$n") "$BIN/rabbitmqctl" -n "rabbit-$n@localhost" "$@"
}
running() { [ -f "$BASE/$1/beam.pid" ] && kill -0 "$(cat "$BASE/$1/beam.pid")" 2>/dev/null; }

boot() { # boot NODE: start its server (config written on first boot)
    local n=$1 i d
    i=$(idx "$n")
    d=$BASE/$n
    running "$n" && return 0
    mkdir -p "$d/mnesia" "$d/log"
    : >"$d/rabbitmq-env.conf" # keeps /etc/rabbitmq/rabbitmq-env.conf out
    echo '[rabbitmq_stream].' >"$d/enabled_plugins"
    printf '%s\n' "listeners.tcp.1 = 127.0.0.1:$((5680 + i))" \
        "stream.listeners.tcp.1 = 127.0.0.1:$((5560 + i))" \
        "stream.advertised_host = 127.0.0.1" "stream.advertised_port = $((5560 + i))" \
        "log.console = false" >"$d/rabbitmq.conf"
    rm -f "$d/beam.pid"
    env $(node_env "$n") RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        "$BIN/rabbitmq-server" >>"$d/stdout.log" 2>&1 </dev/null &
    local k
    for ((k = 0; k < 100; k++)); do
        [ -f "$d/beam.pid" ] && break
        sleep 0.1
    done
}

await_node() { timeout 90 env $(node_env "$1") "$BIN/rabbitmqctl" -n "rabbit-$1@localhost" wait "$BASE/$1/beam.pid" >/dev/null; }

stop_node() { # stop_node NODE: graceful stop; SIGKILL only if it has not ended 30 s later
    local n=$1 pid k
    running "$n" || return 0
    pid=$(cat "$BASE/$n/beam.pid")
    timeout 30 env $(node_env "$n") "$BIN/rabbitmqctl" -n "rabbit-$n@localhost" stop >/dev/null 2>&1 ||
        kill -TERM "$pid" 2>/dev/null || true
    for ((k = 0; k < 300; k++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

rejoin() { # rejoin NODE: start it on its data and wait until the cluster has it again
    local k
    boot "$1"
    await_node "$1"
    for ((k = 0; k < 300; k++)); do
        clustered && return 0
        sleep 0.1
    done
}

clustered() { ctl a cluster_status --formatter json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if len(s.get("running_nodes", [])) == 3 else 1)'; }

case "${1:-}" in
start)
    if [ -f "$BASE/.clustered" ] && running a && running b && running c; then
        say "already running"
        exit 0
    fi
    mkdir -p "$BASE/home"
    if [ ! -f "$BASE/home/.erlang.cookie" ]; then
        printf %s BUSREGCLUSTERCOOKIE0123456789 >"$BASE/home/.erlang.cookie"
        chmod 400 "$BASE/home/.erlang.cookie"
    fi
    for n in "${NODES[@]}"; do boot "$n"; done
    for n in "${NODES[@]}"; do await_node "$n" || {
        say "node $n did not boot (see $BASE/$n/log)"
        exit 1
    }; done
    if [ ! -f "$BASE/.clustered" ]; then
        for n in b c; do
            ctl "$n" stop_app >/dev/null
            ctl "$n" reset >/dev/null
            ctl "$n" join_cluster rabbit-a@localhost >/dev/null 2>&1
            ctl "$n" start_app >/dev/null
        done
        touch "$BASE/.clustered"
    fi
    for ((k = 0; k < 300; k++)); do
        clustered && break
        sleep 0.1
    done
    clustered || {
        say "not clustered after 30 s"
        exit 1
    }
    say "ready: rabbit-{a,b,c}@localhost, AMQP 5681-5683, stream 5561-5563"
    ;;
stop)
    for n in "${NODES[@]}"; do stop_node "$n"; done
    rm -rf "$BASE"
    ;;
kill)
    n=${2:?kill NODE}
    running "$n" && kill -KILL "$(cat "$BASE/$n/beam.pid")"
    say "killed rabbit-$n"
    ;;
bounce)
    # a graceful restart (rolling upgrades): stop the node, start it again on its data
    n=${2:?bounce NODE}
    stop_node "$n"
    rejoin "$n"
    say "rabbit-$n restarted"
    ;;
restart)
    n=${2:?restart NODE}
    rejoin "$n"
    say "rabbit-$n is back"
    ;;
ctl)
    n=${2:?ctl NODE ARGS}
    shift 2
    ctl "$n" "$@"
    ;;
leaders)
    prefix=${2:?leaders QUEUE-PREFIX}
    for n in "${NODES[@]}"; do
        if running "$n"; then
            ctl "$n" list_queues name leader --quiet --no-table-headers 2>/dev/null | awk -v p="$prefix" 'index($1, p) == 1 { print $1, $2 }'
            exit 0
        fi
    done
    ;;
urls)
    echo "amqp://guest:guest@127.0.0.1:5681/,amqp://guest:guest@127.0.0.1:5682/,amqp://guest:guest@127.0.0.1:5683/"
    echo "rabbitmq-stream://guest:guest@127.0.0.1:5561/,rabbitmq-stream://guest:guest@127.0.0.1:5562/,rabbitmq-stream://guest:guest@127.0.0.1:5563/"
    ;;
*)
    sed -n '2,20p' "$0" >&2
    exit 2
    ;;
esac
