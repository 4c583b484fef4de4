#!/usr/bin/env bash
# A private RabbitMQ 4.x node from Debian packages, in a debootstrap chroot (the host runs
# 3.10; no registry or Docker needed). ../shared/platform-notes.md §4 has the measurements.
#
#   brokers/rabbitmq4.sh build SUITE   # trixie: 4.0.5, forky: 4.3.6; idempotent (~35 s once)
#   brokers/rabbitmq4.sh start SUITE   # idempotent; ready (stream plugin on) when it returns
#   brokers/rabbitmq4.sh stop SUITE    # stop the node, unmount /proc; keeps the chroot
#   brokers/rabbitmq4.sh env SUITE     # prints BUSREG_TEST_AMQP_URL / _STREAM_URL exports
#   brokers/rabbitmq4.sh version SUITE # prints the server version
#   brokers/rabbitmq4.sh remove SUITE  # stop, then delete the chroot
#
# Ports: trixie AMQP 5691, stream 5591, distribution 25691; forky 5692 / 5592 / 25692.
# Directory: ${BUSREG_BROKERS_STATE:-/tmp/busreg-brokers}/rabbitmq4-<suite> (the chroot;
# reused by later runs, so only the first build pays for debootstrap). Needs root and
# debootstrap (apt-get install debootstrap). The node is not detached: it stays in the
# caller's process group (a CI step that kills its group takes it too); the node name
# registers with the host's epmd, which the system RabbitMQ runs anyway.
set -euo pipefail

SUITE=${2:-}
case "$SUITE" in
trixie) N=1 ;;
forky) N=2 ;;
*)
    sed -n '2,18p' "$0" >&2
    exit 2
    ;;
esac
AMQP=$((5690 + N))
STREAM=$((5590 + N))
DIST=$((25690 + N))
NODE=rabbit4$SUITE@localhost
ROOT=${BUSREG_BROKERS_STATE:-/tmp/busreg-brokers}/rabbitmq4-$SUITE
D=/srv/rmq4 # inside the chroot

say() { echo "rabbitmq4[$SUITE]: $*" >&2; }

node_env() {
    echo PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=$D/home RABBITMQ_NODENAME=$NODE \
        RABBITMQ_DIST_PORT=$DIST RABBITMQ_CONF_ENV_FILE=$D/rabbitmq-env.conf \
        RABBITMQ_CONFIG_FILE=$D/rabbitmq.conf RABBITMQ_ENABLED_PLUGINS_FILE=$D/enabled_plugins \
        RABBITMQ_MNESIA_BASE=$D/mnesia RABBITMQ_LOG_BASE=$D/log RABBITMQ_PID_FILE=$D/beam.pid
}
ctl() { # ctl SECONDS ARGS...
    local t=$1
    shift
    timeout "$t" chroot "$ROOT" /usr/bin/env -i $(node_env) /usr/lib/rabbitmq/bin/rabbitmqctl -n "$NODE" "$@"
}
running() { [ -f "$ROOT$D/beam.pid" ] && kill -0 "$(cat "$ROOT$D/beam.pid")" 2>/dev/null; }
mirror() { grep -h "^URIs:" /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | cut -d" " -f2; }

build() {
    [ -f "$ROOT/.busreg-built" ] && return 0
    command -v debootstrap >/dev/null || {
        say "debootstrap is not installed (apt-get install -y debootstrap)"
        exit 1
    }
    local m script=()
    m=$(mirror)
    [ -n "$m" ] || m=http://deb.debian.org/debian
    # debootstrap has no forky script yet: testing bootstraps like sid
    [ "$SUITE" = forky ] && script=(/usr/share/debootstrap/scripts/sid)
    rm -rf "$ROOT" && mkdir -p "$(dirname "$ROOT")"
    say "debootstrap $SUITE from $m"
    debootstrap --variant=minbase "$SUITE" "$ROOT" "$m" "${script[@]}" >"$ROOT.debootstrap.log" 2>&1 || {
        say "debootstrap failed; see $ROOT.debootstrap.log"
        exit 1
    }
    printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d" # no service starts inside
    chmod +x "$ROOT/usr/sbin/policy-rc.d"
    # the mirror is a dated snapshot: testing's Release reads as expired
    echo 'Acquire::Check-Valid-Until "false";' >"$ROOT/etc/apt/apt.conf.d/99busreg"
    cp /etc/hosts /etc/resolv.conf "$ROOT/etc/"
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        bash -c 'apt-get update -q && apt-get install -y -q --no-install-recommends rabbitmq-server' \
        >"$ROOT.apt.log" 2>&1 || {
        say "installing rabbitmq-server failed; see $ROOT.apt.log"
        exit 1
    }
    rm -rf "$ROOT"/var/cache/apt/archives/*.deb
    touch "$ROOT/.busreg-built"
    say "built: $(chroot "$ROOT" dpkg-query -W -f '${Version}' rabbitmq-server)"
}

start() {
    build
    running && return 0
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    rm -rf "$ROOT$D" && mkdir -p "$ROOT$D/home" "$ROOT$D/mnesia" "$ROOT$D/log"
    printf %s "BUSREGRMQ4COOKIE$SUITE" >"$ROOT$D/home/.erlang.cookie"
    chmod 400 "$ROOT$D/home/.erlang.cookie"
    : >"$ROOT$D/rabbitmq-env.conf"
    echo '[rabbitmq_stream].' >"$ROOT$D/enabled_plugins"
    printf '%s\n' "listeners.tcp.1 = 127.0.0.1:$AMQP" "stream.listeners.tcp.1 = 127.0.0.1:$STREAM" \
        "stream.advertised_host = 127.0.0.1" "stream.advertised_port = $STREAM" \
        "log.console = false" >"$ROOT$D/rabbitmq.conf"
    chroot "$ROOT" /usr/bin/env -i $(node_env) /usr/lib/rabbitmq/bin/rabbitmq-server \
        >"$ROOT$D/stdout.log" 2>&1 </dev/null &
    local i
    for ((i = 0; i < 100; i++)); do
        [ -f "$ROOT$D/beam.pid" ] && break
        sleep 0.1
    done
    ctl 60 wait "$D/beam.pid" >/dev/null 2>&1 || {
        say "node did not start; see $ROOT$D/log and $ROOT$D/stdout.log"
        exit 1
    }
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$STREAM") 2>/dev/null && break
        sleep 0.1
    done
    say "ready: $(version), AMQP 127.0.0.1:$AMQP, stream 127.0.0.1:$STREAM"
}

stop() {
    if running; then
        local pid
        pid=$(cat "$ROOT$D/beam.pid")
        ctl 30 stop >/dev/null 2>&1 || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    if [ -d "$ROOT/proc" ] && mountpoint -q "$ROOT/proc"; then umount "$ROOT/proc" || umount -l "$ROOT/proc"; fi
}

version() { ctl 20 eval 'rabbit_misc:version().' 2>/dev/null | tr -d '"'; }

case "${1:-}" in
build) build ;;
start) start ;;
stop) stop ;;
version) version ;;
env)
    echo "export BUSREG_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:$AMQP/"
    echo "export BUSREG_TEST_STREAM_URL=rabbitmq-stream://guest:guest@127.0.0.1:$STREAM/"
    ;;
remove)
    stop
    rm -rf "$ROOT" "$ROOT".*.log
    ;;
*)
    sed -n '2,18p' "$0" >&2
    exit 2
    ;;
esac
