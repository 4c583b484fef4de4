#!/usr/bin/env bash
# Start the local brokers busreg's tests, CI and examples use, if they are not running yet:
#
#   RabbitMQ 3.10  AMQP 127.0.0.1:5672 (as configured), stream protocol 127.0.0.1:5552
#                  (rabbitmq_stream plugin enabled, listener bound to loopback only)
#   Redis 7.0      127.0.0.1:6379 (and ::1 if available), no persistence, noeviction
#
# Idempotent: run it any number of times; it only changes what is missing and prints what
# it did. Changing the RabbitMQ config or starting servers needs root (the system packages'
# rabbitmq-server/rabbitmqctl wrappers switch to the rabbitmq user themselves); checking an
# already correct setup does not.
#
# Why the restart logic: once rabbitmq_stream is enabled, its listener binds every
# interface on 5552 unless rabbitmq.conf said otherwise *when the node booted*; a line added
# to the file later does not rebind a running listener. If we find 5552 bound anywhere but
# 127.0.0.1, we restart the node so it binds where we mean it. (Seen on 3.10.8: enabling the
# plugin online on a node that booted with the line present binds 127.0.0.1 directly.)
#
# Environment overrides: RABBITMQ_CONF (default /etc/rabbitmq/rabbitmq.conf),
# START_LOCAL_WAIT (seconds to wait for each server, default 120). For testing this script
# against throwaway servers: START_LOCAL_STREAM_PORT (default 5552), START_LOCAL_REDIS_PORT
# (default 6379) and the RABBITMQ_* variables the RabbitMQ scripts honour
# (RABBITMQ_NODENAME, RABBITMQ_CONF_ENV_FILE, RABBITMQ_ENABLED_PLUGINS_FILE, ...).
set -euo pipefail

RABBITMQ_CONF=${RABBITMQ_CONF:-/etc/rabbitmq/rabbitmq.conf}
WAIT=${START_LOCAL_WAIT:-120}
STREAM_ADDR=127.0.0.1
STREAM_PORT=${START_LOCAL_STREAM_PORT:-5552}
STREAM_LINE="stream.listeners.tcp.1 = ${STREAM_ADDR}:${STREAM_PORT}"
REDIS_HOST=127.0.0.1
REDIS_PORT=${START_LOCAL_REDIS_PORT:-6379}

say() { echo "start-local: $*"; }
die() {
    echo "start-local: ERROR: $*" >&2
    exit 1
}
is_root() { [ "$(id -u)" = 0 ]; }
need_root() { is_root || die "$1 needs root: run 'sudo bash $0'"; }
have() { command -v "$1" >/dev/null 2>&1; }

for tool in ss redis-cli redis-server rabbitmqctl rabbitmq-plugins rabbitmq-server rabbitmq-diagnostics; do
    have "$tool" || die "'$tool' not found: install RabbitMQ 3.10+, Redis 7+ and iproute2"
done

# Local addresses (as ss prints them) listening on TCP port $1.
listeners_on() {
    ss -ltn | awk -v suffix=":$1" 'NR > 1 && substr($4, length($4) - length(suffix) + 1) == suffix { print $4 }' | sort -u
}

# ---------------------------------------------------------------------------- RabbitMQ

# rabbitmqctl & co. only work for root or the rabbitmq user (they need its Erlang cookie).
can_manage_rabbit() { is_root || [ "$(id -un)" = rabbitmq ]; }

rabbit_up() { timeout 30 rabbitmq-diagnostics -q ping >/dev/null 2>&1; }

# Wait until the node's Erlang VM answers, then until the rabbit application has booted.
rabbit_await() {
    local deadline=$((SECONDS + WAIT))
    until rabbit_up; do
        [ "$SECONDS" -lt "$deadline" ] || die "RabbitMQ did not come up within ${WAIT}s (see /var/log/rabbitmq/)"
        sleep 1
    done
    timeout "$WAIT" rabbitmqctl -q await_startup || die "RabbitMQ did not finish booting (see /var/log/rabbitmq/)"
}

rabbit_start() {
    need_root "starting RabbitMQ"
    say "RabbitMQ: starting (rabbitmq-server -detached)"
    rabbitmq-server -detached
    rabbit_await
}

rabbit_restart() {
    need_root "restarting RabbitMQ"
    say "RabbitMQ: restarting so the stream listener binds ${STREAM_ADDR}:${STREAM_PORT} only"
    # shutdown (unlike stop without a pid file) returns once the Erlang VM has exited.
    timeout "$WAIT" rabbitmqctl -q shutdown || timeout "$WAIT" rabbitmqctl -q stop || true
    local deadline=$((SECONDS + WAIT))
    while rabbit_up || [ -n "$(listeners_on "$STREAM_PORT")" ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "RabbitMQ did not stop within ${WAIT}s"
        sleep 1
    done
    rabbit_start
}

# Make $RABBITMQ_CONF bind the stream listener to loopback. Prints "changed" if it did.
ensure_stream_conf() {
    local pattern='^[[:space:]]*stream\.listeners\.tcp\.'
    local exact="^[[:space:]]*stream\\.listeners\\.tcp\\.1[[:space:]]*=[[:space:]]*${STREAM_ADDR//./\\.}:${STREAM_PORT}[[:space:]]*\$"
    if [ -f "$RABBITMQ_CONF" ]; then
        # Exactly our line and no other stream listener: nothing to do.
        if grep -Eq "$exact" "$RABBITMQ_CONF" &&
            [ "$(grep -Ec "$pattern" "$RABBITMQ_CONF")" = 1 ]; then
            return 0
        fi
        need_root "editing $RABBITMQ_CONF"
        local tmp
        tmp=$(mktemp)
        # Comment out other stream listener lines; write in place to keep owner and mode.
        sed -E "s/${pattern}/## disabled by busreg brokers\/start-local.sh: &/" "$RABBITMQ_CONF" >"$tmp"
        {
            echo
            echo "## busreg (brokers/start-local.sh): stream protocol on loopback only"
            echo "$STREAM_LINE"
        } >>"$tmp"
        cat "$tmp" >"$RABBITMQ_CONF"
        rm -f "$tmp"
    else
        need_root "creating $RABBITMQ_CONF"
        mkdir -p "$(dirname "$RABBITMQ_CONF")"
        cat >"$RABBITMQ_CONF" <<EOF
## Written by busreg brokers/start-local.sh: a loopback-only development broker.
listeners.tcp.local = 127.0.0.1:5672
$STREAM_LINE
EOF
        chmod 644 "$RABBITMQ_CONF"
    fi
    echo changed
}

# Wait (briefly) for the stream listener, then print its addresses.
stream_listeners_settled() {
    local deadline=$((SECONDS + 30)) found
    while :; do
        found=$(listeners_on "$STREAM_PORT")
        if [ -n "$found" ] || [ "$SECONDS" -ge "$deadline" ]; then
            printf '%s\n' "$found"
            return 0
        fi
        sleep 1
    done
}

ensure_rabbitmq() {
    local did=()

    if ! can_manage_rabbit; then
        # Without root we can only check what is there.
        [ "$(listeners_on "$STREAM_PORT")" = "${STREAM_ADDR}:${STREAM_PORT}" ] ||
            die "RabbitMQ stream listener is not exactly ${STREAM_ADDR}:${STREAM_PORT}; fixing it needs root: run 'sudo bash $0'"
        [ -n "$(listeners_on 5672)" ] || die "RabbitMQ AMQP is not listening on 5672; starting it needs root"
        say "RabbitMQ: already running (checked as non-root: AMQP :5672, stream ${STREAM_ADDR}:${STREAM_PORT})"
        return 0
    fi

    local running=0
    rabbit_up && running=1

    # 1. The stream plugin. With the node down, enable it in the enabled_plugins file (on
    #    3.10 `is_enabled --offline` answers "enabled" regardless, so just enable: it is
    #    idempotent and says "unchanged" when there was nothing to do).
    local out
    if [ "$running" = 0 ]; then
        need_root "enabling rabbitmq_stream"
        out=$(timeout 120 rabbitmq-plugins -q enable --offline rabbitmq_stream 2>&1) ||
            die "rabbitmq-plugins enable --offline rabbitmq_stream failed: $out"
        case "$out" in
        *unchanged*) ;;
        *) did+=("enabled rabbitmq_stream (offline)") ;;
        esac
    fi

    # 2. The listener address in the config file (assigned first so a failure stops us).
    local conf_result
    conf_result=$(ensure_stream_conf)
    if [ "$conf_result" = changed ]; then
        did+=("set '$STREAM_LINE' in $RABBITMQ_CONF")
    fi

    # 3. The node itself, then the plugin as the running node sees it.
    if [ "$running" = 0 ]; then
        rabbit_start
        did+=("started the node")
    else
        rabbit_await
    fi
    if ! timeout 60 rabbitmq-plugins -q is_enabled rabbitmq_stream --online >/dev/null 2>&1; then
        need_root "enabling rabbitmq_stream"
        out=$(timeout 120 rabbitmq-plugins -q enable rabbitmq_stream 2>&1) ||
            die "rabbitmq-plugins enable rabbitmq_stream failed: $out"
        did+=("enabled rabbitmq_stream (online)")
    fi

    # 4. Where the stream listener actually is.
    local found
    found=$(stream_listeners_settled)
    if [ "$found" != "${STREAM_ADDR}:${STREAM_PORT}" ]; then
        say "RabbitMQ: stream port ${STREAM_PORT} listens on: ${found:-nothing}"
        rabbit_restart
        did+=("restarted the node to rebind the stream listener")
        found=$(stream_listeners_settled)
        if [ "$found" != "${STREAM_ADDR}:${STREAM_PORT}" ]; then
            ss -ltnp 2>/dev/null | awk -v p=":${STREAM_PORT}" 'NR == 1 || index($4, p)' >&2 || true
            die "after a restart, port ${STREAM_PORT} listens on '${found:-nothing}', not ${STREAM_ADDR}:${STREAM_PORT} (another process? a conf.d override?)"
        fi
    fi

    if [ "${#did[@]}" = 0 ]; then
        say "RabbitMQ: already running, stream plugin enabled, stream listener ${found}"
    else
        local item
        for item in "${did[@]}"; do say "RabbitMQ: $item"; done
        say "RabbitMQ: ready, stream listener ${found}"
    fi
}

# ------------------------------------------------------------------------------- Redis

redis_ping() { timeout 5 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null || true; }

ensure_redis() {
    local reply
    reply=$(redis_ping)
    case "$reply" in
    PONG)
        local policy
        policy=$(timeout 5 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" config get maxmemory-policy 2>/dev/null | sed -n 2p || true)
        say "Redis: already running on ${REDIS_HOST}:${REDIS_PORT} (maxmemory-policy ${policy:-unknown})"
        if [ -n "$policy" ] && [ "$policy" != noeviction ]; then
            say "Redis: WARNING: maxmemory-policy is '$policy'; busreg needs noeviction (evicted lease keys would be invented expiries)"
        fi
        return 0
        ;;
    *NOAUTH* | *WRONGPASS*)
        say "Redis: running on ${REDIS_HOST}:${REDIS_PORT} with authentication (put credentials in the Redis URLs)"
        return 0
        ;;
    esac

    need_root "starting Redis"
    say "Redis: starting (redis-server --daemonize yes, no persistence, ${REDIS_HOST}:${REDIS_PORT})"
    # Started from / so that no stray file can land in the caller's working directory.
    (cd / && redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --maxmemory-policy noeviction)
    local deadline=$((SECONDS + WAIT))
    until [ "$(redis_ping)" = PONG ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "Redis did not answer PING within ${WAIT}s"
        sleep 0.2
    done
    say "Redis: ready on ${REDIS_HOST}:${REDIS_PORT}"
}

ensure_rabbitmq
ensure_redis
say "done: AMQP amqp://guest:guest@127.0.0.1:5672/, streams 127.0.0.1:${STREAM_PORT}, redis://${REDIS_HOST}:${REDIS_PORT}"
