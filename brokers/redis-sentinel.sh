#!/usr/bin/env bash
# A private Redis Sentinel setup: one master, one replica, three Sentinels (quorum 2),
# on 127.0.0.1, everything under one directory and stopped by PID.
#
#   brokers/redis-sentinel.sh start        # idempotent; ready when it returns (~2-3 s)
#   brokers/redis-sentinel.sh stop         # idempotent; removes the directory
#   brokers/redis-sentinel.sh master       # prints host:port of the current master
#   brokers/redis-sentinel.sh kill-master  # SIGKILL the current master (a failover follows)
#   brokers/redis-sentinel.sh restart PORT # start a killed data node again (empty)
#   brokers/redis-sentinel.sh url [DB]     # prints the BUSREG_REDIS_URL for it
#
# Ports: data nodes 7011 and 7012, Sentinels 26391-26393 (override with
# BUSREG_SENTINEL_DATA_PORTS / BUSREG_SENTINEL_PORTS). Master name "busreg".
# Directory: ${BUSREG_BROKERS_STATE:-/tmp/busreg-brokers}/redis-sentinel.
#
# The processes are not daemonized and not detached: they stay in the caller's process
# group, so a CI step that kills its group on exit takes them too. Timings follow
# ../shared/platform-notes.md §3: down-after 1000 ms, failover-timeout 3000 ms;
# repl-diskless-sync-delay 0 so the replica is in sync (promotable) at once.
set -euo pipefail

STATE=${BUSREG_BROKERS_STATE:-/tmp/busreg-brokers}/redis-sentinel
read -r -a DATA <<<"${BUSREG_SENTINEL_DATA_PORTS:-7011 7012}"
read -r -a SENT <<<"${BUSREG_SENTINEL_PORTS:-26391 26392 26393}"
MASTER=busreg

# shellcheck source=brokers/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

say() { echo "redis-sentinel: $*" >&2; }

start_data() { # start_data PORT [replicaof-port]
    local port=$1 dir=$STATE/$1
    alive "$dir/pid" && return 0
    rm -rf "$dir" && mkdir -p "$dir"
    local args=(--port "$port" --bind 127.0.0.1 --save "" --appendonly no
        --repl-diskless-sync-delay 0 --dir "$dir" --logfile "$dir/redis.log")
    [ -n "${2:-}" ] && args+=(--replicaof 127.0.0.1 "$2")
    redis-server "${args[@]}" </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/pid"
    wait_port "$port" 10 || {
        say "data node $port did not start"
        exit 1
    }
}

start_sentinel() { # start_sentinel PORT MASTER_PORT
    local port=$1 dir=$STATE/s$1
    alive "$dir/pid" && return 0
    rm -rf "$dir" && mkdir -p "$dir"
    cat >"$dir/sentinel.conf" <<EOF
port $port
bind 127.0.0.1
dir $dir
logfile $dir/sentinel.log
sentinel monitor $MASTER 127.0.0.1 $2 2
sentinel down-after-milliseconds $MASTER 1000
sentinel failover-timeout $MASTER 3000
EOF
    redis-server "$dir/sentinel.conf" --sentinel </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/pid"
    wait_port "$port" 10 || {
        say "sentinel $port did not start"
        exit 1
    }
}

current_master() {
    local p out
    for p in "${SENT[@]}"; do
        if out=$(redis-cli -p "$p" sentinel get-master-addr-by-name "$MASTER" 2>/dev/null) &&
            [ "$(printf '%s\n' "$out" | wc -l)" = 2 ]; then
            printf '%s:%s\n' $(printf '%s\n' "$out")
            return 0
        fi
    done
    return 1
}

ready() { # every sentinel sees the master, one replica and the other two sentinels
    local p info
    for p in "${SENT[@]}"; do
        info=$(redis-cli -p "$p" sentinel master "$MASTER" 2>/dev/null | paste - - | tr '\t' '=') || return 1
        grep -q '^num-slaves=1$' <<<"$info" || return 1
        grep -q '^num-other-sentinels=2$' <<<"$info" || return 1
    done
    redis-cli -p "${DATA[1]}" info replication | grep -q master_link_status:up
}

cmd=${1:-}
case "$cmd" in
start)
    need redis-server
    mkdir -p "$STATE"
    start_data "${DATA[0]}"
    start_data "${DATA[1]}" "${DATA[0]}"
    for p in "${SENT[@]}"; do start_sentinel "$p" "${DATA[0]}"; done
    for ((i = 0; i < 300; i++)); do
        ready && break
        sleep 0.1
    done
    ready || {
        say "not ready after 30 s (see $STATE/*/*.log)"
        exit 1
    }
    say "ready: master $(current_master), sentinels ${SENT[*]}"
    ;;
stop)
    stop_pids "$STATE"
    ;;
master)
    current_master
    ;;
kill-master)
    m=$(current_master)
    port=${m##*:}
    kill -KILL "$(cat "$STATE/$port/pid")"
    say "killed master $m"
    echo "$port"
    ;;
restart)
    port=${2:?restart PORT}
    alive "$STATE/$port/pid" && exit 0
    m=$(current_master)
    start_data "$port" "${m##*:}" # rejoins as a replica of the current master
    ;;
url)
    hosts=$(printf '127.0.0.1:%s,' "${SENT[@]}")
    echo "redis+sentinel://${hosts%,}/$MASTER/${2:-0}"
    ;;
*)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
