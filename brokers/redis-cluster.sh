#!/usr/bin/env bash
# A private Redis Cluster: 3 masters + 3 replicas on 127.0.0.1, everything under one
# directory and stopped by PID.
#
#   brokers/redis-cluster.sh start         # idempotent; ready when it returns (~2-3 s)
#   brokers/redis-cluster.sh stop          # idempotent; removes the directory
#   brokers/redis-cluster.sh masters       # host:port of each master, one per line
#   brokers/redis-cluster.sh master-of KEY # host:port of the master serving KEY's slot
#   brokers/redis-cluster.sh kill PORT     # SIGKILL one node (its replica takes over)
#   brokers/redis-cluster.sh restart PORT  # start a killed node again (empty; rejoins as
#                                          # a replica of whoever holds its slots now)
#   brokers/redis-cluster.sh url           # prints the BUSREG_REDIS_URL for it
#
# Ports: 7001-7006 (override with BUSREG_CLUSTER_PORTS, six of them).
# Directory: ${BUSREG_BROKERS_STATE:-/tmp/busreg-brokers}/redis-cluster.
#
# The processes are not daemonized: they stay in the caller's process group, so a CI step
# that kills its group on exit takes them too. Timings follow ../shared/platform-notes.md
# §2: cluster-node-timeout 1000 ms (a replica is promoted 2.0-2.7 s after its master
# dies); repl-diskless-sync-delay 0 and a wait for master_link_status:up, because a
# replica that never finished its first sync can never be promoted.
set -euo pipefail

STATE=${BUSREG_BROKERS_STATE:-/tmp/busreg-brokers}/redis-cluster
read -r -a PORTS <<<"${BUSREG_CLUSTER_PORTS:-7001 7002 7003 7004 7005 7006}"
NODE_TIMEOUT=${BUSREG_CLUSTER_NODE_TIMEOUT_MS:-1000}

# shellcheck source=brokers/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

say() { echo "redis-cluster: $*" >&2; }

start_node() { # start_node PORT: an empty node (a node's files must not outlive it:
    # a replica writes the RDB it receives even with --save '', and would load it)
    local port=$1 dir=$STATE/$1
    alive "$dir/pid" && return 0
    rm -rf "$dir" && mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --protected-mode no --cluster-enabled yes \
        --cluster-config-file "$dir/nodes.conf" --cluster-node-timeout "$NODE_TIMEOUT" \
        --save "" --appendonly no --dir "$dir" --repl-diskless-sync-delay 0 --shutdown-timeout 0 \
        --logfile "$dir/redis.log" </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/pid"
    wait_port "$port" 10 || {
        say "node $port did not start (see $dir/redis.log)"
        exit 1
    }
}

any_node() { # the first node that answers
    local p
    for p in "${PORTS[@]}"; do
        redis-cli -p "$p" ping >/dev/null 2>&1 && {
            echo "$p"
            return 0
        }
    done
    return 1
}

masters() {
    redis-cli -p "$(any_node)" cluster nodes |
        awk '$3 ~ /master/ && $3 !~ /fail/ && $8 == "connected" && NF >= 9 { split($2, a, "@"); print a[1] }' | sort
}

ready() { # state ok everywhere, 3 masters with slots, 3 replicas in sync
    local p
    for p in "${PORTS[@]}"; do
        alive "$STATE/$p/pid" || continue
        redis-cli -p "$p" cluster info 2>/dev/null | grep -q cluster_state:ok || return 1
        if redis-cli -p "$p" info replication | grep -q role:slave; then
            redis-cli -p "$p" info replication | grep -q master_link_status:up || return 1
        fi
    done
    [ "$(redis-cli -p "$(any_node)" cluster nodes | grep -c 'slave' || true)" -ge 3 ]
}

cmd=${1:-}
case "$cmd" in
start)
    need redis-server
    mkdir -p "$STATE"
    if [ -f "$STATE/created" ] && ready 2>/dev/null; then
        say "already running: masters $(masters | paste -sd,)"
        exit 0
    fi
    for p in "${PORTS[@]}"; do start_node "$p"; done
    if [ ! -f "$STATE/created" ]; then
        redis-cli --cluster create $(printf '127.0.0.1:%s ' "${PORTS[@]}") \
            --cluster-replicas 1 --cluster-yes >"$STATE/create.log" 2>&1 || {
            say "cluster create failed (see $STATE/create.log)"
            exit 1
        }
        touch "$STATE/created"
    fi
    for ((i = 0; i < 300; i++)); do
        ready && break
        sleep 0.1
    done
    ready || {
        say "not ready after 30 s (see $STATE/*/redis.log)"
        exit 1
    }
    say "ready: masters $(masters | paste -sd,)"
    ;;
stop)
    stop_pids "$STATE"
    ;;
masters)
    masters
    ;;
master-of)
    key=${2:?master-of KEY}
    slot=$(redis-cli -p "$(any_node)" cluster keyslot "$key")
    redis-cli -p "$(any_node)" cluster nodes | awk -v s="$slot" '
        $3 ~ /master/ && $3 !~ /fail/ {
            for (i = 9; i <= NF; i++) { n = split($i, r, "-"); lo = r[1]; hi = (n > 1) ? r[2] : r[1]
                if (s >= lo && s <= hi) { split($2, a, "@"); print a[1]; exit } } }'
    ;;
kill)
    port=${2:?kill PORT}
    kill -KILL "$(cat "$STATE/$port/pid")"
    say "killed node $port"
    ;;
restart)
    port=${2:?restart PORT}
    alive "$STATE/$port/pid" && exit 0
    # an empty node knows nobody: it meets the cluster, then replicates the master that
    # now holds the slots it lost (the one with fewest replicas)
    start_node "$port"
    peer=$(for p in "${PORTS[@]}"; do [ "$p" != "$port" ] && alive "$STATE/$p/pid" && echo "$p" && break; done)
    redis-cli -p "$port" cluster meet 127.0.0.1 "$peer" >/dev/null
    for ((i = 0; i < 100; i++)); do
        redis-cli -p "$port" cluster nodes | grep -q myself,master && \
            [ "$(redis-cli -p "$port" cluster nodes | wc -l)" -ge 6 ] && break
        sleep 0.1
    done
    lonely=$(redis-cli -p "$peer" cluster nodes | awk '
        $3 ~ /master/ && $3 !~ /fail/ && NF >= 9 { m[$1] = 1 }
        $3 ~ /slave/ && $3 !~ /fail/ { r[$4]++ }
        END { for (id in m) if (!r[id]) { print id; exit } }')
    [ -n "$lonely" ] || {
        say "no master without a replica for $port"
        exit 1
    }
    for ((i = 0; i < 50; i++)); do
        redis-cli -p "$port" cluster replicate "$lonely" >/dev/null 2>&1 && break
        sleep 0.1
    done
    for ((i = 0; i < 300; i++)); do
        redis-cli -p "$port" info replication | grep -q master_link_status:up && ready && break
        sleep 0.1
    done
    redis-cli -p "$port" info replication | grep -q master_link_status:up || {
        say "node $port did not rejoin"
        exit 1
    }
    # the dead node's old identity stays listed as "fail,noaddr" until every node forgets it
    stale=$(for p in "${PORTS[@]}"; do
        alive "$STATE/$p/pid" && redis-cli -p "$p" cluster nodes | awk '$3 ~ /noaddr/ { print $1 }'
    done | sort -u)
    for old in $stale; do
        for p in "${PORTS[@]}"; do
            alive "$STATE/$p/pid" && redis-cli -p "$p" cluster forget "$old" >/dev/null 2>&1 || true
        done
    done
    say "node $port rejoined as a replica"
    ;;
url)
    hosts=$(printf '127.0.0.1:%s,' "${PORTS[@]}")
    echo "redis+cluster://${hosts%,}"
    ;;
*)
    sed -n '2,15p' "$0" >&2
    exit 2
    ;;
esac
