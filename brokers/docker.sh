#!/usr/bin/env bash
# A private Docker engine and local images built from Debian packages (no registry is
# reachable here: no Docker Hub). ../shared/platform-notes.md §5 has the measurements.
#
#   brokers/docker.sh start    # install docker.io (+ docker-compose, debootstrap) if missing,
#                              # start dockerd on a socket of its own; idempotent
#   brokers/docker.sh images   # build the images below (cached: a second run takes seconds)
#   brokers/docker.sh env      # prints DOCKER_HOST, TESTCONTAINERS_* and image exports
#   brokers/docker.sh stop     # remove containers and networks, stop dockerd (by PID), undo
#                              # its host changes: docker0/br-* links, iptables DOCKER chains
#                              # and MASQUERADE rules, FORWARD policy, ip_forward, mounts
#   brokers/docker.sh check    # exit 1 (listing it) if any host change of dockerd is left
#   brokers/docker.sh remove   # stop, then delete the engine's data and the rootfs cache
#
# Images (tags of the official images, so compose/ and busreg.testing's defaults work):
#   rabbitmq:3.10-management  Debian bookworm's rabbitmq-server 3.10, behaving like the
#                             official image: guest may log in from anywhere
#                             (conf.d/10-defaults.conf: loopback_users.guest = false),
#                             management and prometheus enabled, logs on stdout, the
#                             RabbitMQ scripts on PATH, RABBITMQ_DEFAULT_USER/PASS and
#                             RABBITMQ_ERLANG_COOKIE honoured by its entrypoint
#   redis:7.0                 Debian bookworm's redis-server 7.0
#   busreg/python:3.11        python3 + python3-venv (bookworm), the base of the worker image
#   busreg:dev                compose/Dockerfile built on busreg/python:3.11 from this tree
#
# Directory: ${BUSREG_BROKERS_STATE:-/tmp/busreg-brokers}/docker (socket, pid file, log,
# exec root, the host's state before `start`, which `stop` restores) and docker-data (data
# root: images survive `stop`, so later runs skip the imports and reuse the build cache),
# rootfs tarballs in docker-rootfs (debootstrap runs once per recipe version). Needs root.
# dockerd runs in its default bridge mode, which `-p` port mappings (testcontainers,
# compose) need; `stop` undoes what that mode changes on the host.
set -euo pipefail

STATE=${BUSREG_BROKERS_STATE:-/tmp/busreg-brokers}
D=$STATE/docker
DATA=$STATE/docker-data
ROOTFS=$STATE/docker-rootfs
SOCK=$D/docker.sock
export DOCKER_HOST=unix://$SOCK
# Recipe version of the rootfs tarballs: bump it when a build_* function changes.
RECIPE=1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { echo "docker.sh: $*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}
alive() { [ -f "$D/dockerd.pid" ] && kill -0 "$(cat "$D/dockerd.pid")" 2>/dev/null; }
mirror() { grep -h "^URIs:" /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | cut -d" " -f2; }
elapsed() { echo "$(($(date +%s%N) / 1000000 - $1))ms"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

install() {
    local pkgs=()
    command -v dockerd >/dev/null || pkgs+=(docker.io)
    command -v docker-compose >/dev/null || pkgs+=(docker-compose)
    command -v debootstrap >/dev/null || pkgs+=(debootstrap)
    [ ${#pkgs[@]} = 0 ] && return 0
    say "apt-get install ${pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >"$STATE/docker-apt.log" 2>&1 || {
        apt-get update -q >/dev/null 2>&1 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >"$STATE/docker-apt.log" 2>&1
    } || die "apt-get install ${pkgs[*]} failed; see $STATE/docker-apt.log"
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root"
    mkdir -p "$D" "$DATA"
    install
    alive && return 0
    local t0
    t0=$(now_ms)
    # what stop restores (dockerd sets ip_forward=1 and the FORWARD policy to DROP)
    printf 'ip_forward=%s\nforward_policy=%s\nbridge_nf=%s\n' "$(cat /proc/sys/net/ipv4/ip_forward)" \
        "$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}')" \
        "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || true)" >"$D/host-baseline"
    # setsid: dockerd outlives no one by accident (stop kills it by PID), but a CI step
    # that kills its process group must not take dockerd down without the cleanup
    setsid dockerd --data-root "$DATA" --exec-root "$D/exec" -H "$DOCKER_HOST" \
        --pidfile "$D/dockerd.pid" --storage-driver overlay2 \
        >"$D/dockerd.log" 2>&1 </dev/null &
    local i
    for ((i = 0; i < 300; i++)); do
        docker version >/dev/null 2>&1 && break
        sleep 0.1
    done
    docker version >/dev/null 2>&1 || die "dockerd did not answer in 30 s; see $D/dockerd.log"
    say "dockerd $(docker version -f '{{.Server.Version}}') ready in $(elapsed "$t0") on $DOCKER_HOST"
}

# debootstrap SUITE DIR INCLUDE: a minbase rootfs with the given packages, trimmed
debootstrap_rootfs() {
    local m
    m=$(mirror)
    [ -n "$m" ] || m=http://deb.debian.org/debian
    rm -rf "$2" && mkdir -p "$2"
    debootstrap --variant=minbase --include="$3" "$1" "$2" "$m" >"$2.debootstrap.log" 2>&1 ||
        die "debootstrap $1 ($3) failed; see $2.debootstrap.log"
    printf '#!/bin/sh\nexit 101\n' >"$2/usr/sbin/policy-rc.d" # no service starts inside
    chmod +x "$2/usr/sbin/policy-rc.d"
}
trim_rootfs() {
    rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/usr/share/doc/* \
        "$1"/usr/share/man/* "$1"/usr/share/info/* "$1"/usr/share/locale/* "$1"/var/log/*.log \
        "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old
}

build_redis() {
    debootstrap_rootfs bookworm "$1" redis-server
    trim_rootfs "$1"
}

build_rabbitmq() {
    debootstrap_rootfs bookworm "$1" rabbitmq-server
    local r=$1
    trim_rootfs "$r"
    # The official image's settings, in files: busreg.testing (and users) replace the
    # image's command, so nothing may depend on the entrypoint having run a setup step.
    mkdir -p "$r/etc/rabbitmq/conf.d" "$r/var/lib/rabbitmq" "$r/var/log/rabbitmq"
    : >"$r/etc/rabbitmq/rabbitmq-env.conf" # Debian's would pin the node name and log files
    printf '%s\n' '## as in the official image: guest from anywhere, logs to stdout' \
        'loopback_users.guest = false' 'log.console = true' 'log.file = false' \
        >"$r/etc/rabbitmq/conf.d/10-defaults.conf"
    echo '[rabbitmq_management,rabbitmq_prometheus].' >"$r/etc/rabbitmq/enabled_plugins"
    cat >"$r/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
# The official image's environment variables that busreg's compose files use.
set -e
if [ -n "${RABBITMQ_ERLANG_COOKIE:-}" ]; then
    umask 077
    printf %s "$RABBITMQ_ERLANG_COOKIE" >"$HOME/.erlang.cookie"
    umask 022
fi
if [ -n "${RABBITMQ_DEFAULT_USER:-}${RABBITMQ_DEFAULT_PASS:-}" ]; then
    printf 'default_user = %s\ndefault_pass = %s\n' "${RABBITMQ_DEFAULT_USER:-guest}" \
        "${RABBITMQ_DEFAULT_PASS:-guest}" >/etc/rabbitmq/conf.d/20-default-user.conf
fi
exec "$@"
EOF
    chmod +x "$r/usr/local/bin/docker-entrypoint.sh"
}

build_python() {
    debootstrap_rootfs bookworm "$1" python3,python3-venv,ca-certificates
    # This machine reaches PyPI through a TLS-inspecting egress: the base image trusts
    # what the host trusts (its local CAs), as a company base image would.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/"
        chroot "$1" /usr/sbin/update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates"
    fi
    trim_rootfs "$1"
}

# rootfs NAME: path of the cached tarball of rootfs NAME, built if missing
rootfs() {
    local tar=$ROOTFS/$1-v$RECIPE.tar
    if [ ! -f "$tar" ]; then
        local t0 dir=$ROOTFS/$1.d
        t0=$(now_ms)
        mkdir -p "$ROOTFS"
        "build_$1" "$dir"
        tar -C "$dir" --numeric-owner -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
        rm -rf "$dir"
        say "rootfs $1 built in $(elapsed "$t0"): $(du -h "$tar" | cut -f1)"
    fi
    echo "$tar"
}

# import NAME TAG CHANGES...: docker import the rootfs unless TAG already holds this recipe
import() {
    local name=$1 tag=$2 tar
    shift 2
    local want="$name-v$RECIPE"
    [ "$(docker image inspect -f '{{index .Config.Labels "busreg.rootfs"}}' "$tag" 2>/dev/null)" = "$want" ] && return 0
    tar=$(rootfs "$name")
    local t0 args=()
    t0=$(now_ms)
    for c in "$@" "LABEL busreg.rootfs=$want"; do args+=(--change "$c"); done
    docker import "${args[@]}" "$tar" "$tag" >/dev/null
    say "imported $tag in $(elapsed "$t0")"
}

images() {
    alive || die "dockerd is not running (brokers/docker.sh start)"
    local pids=() n
    # the three debootstraps are mostly waiting on the mirror: run them side by side
    for n in redis rabbitmq python; do
        [ -f "$ROOTFS/$n-v$RECIPE.tar" ] || {
            rootfs "$n" >/dev/null &
            pids+=($!)
        }
    done
    for n in "${pids[@]}"; do wait "$n" || die "a rootfs build failed"; done
    import redis redis:7.0 'EXPOSE 6379' 'ENV LANG=C.UTF-8' \
        'CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]'
    import rabbitmq rabbitmq:3.10-management \
        'ENV PATH=/usr/lib/rabbitmq/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        'ENV HOME=/var/lib/rabbitmq' 'ENV LANG=C.UTF-8' \
        'EXPOSE 4369 5552 5672 15672 15692 25672' \
        'ENTRYPOINT ["docker-entrypoint.sh"]' 'CMD ["rabbitmq-server"]'
    import python busreg/python:3.11 'ENV LANG=C.UTF-8' 'CMD ["python3"]'
    # The worker image from this tree. The context is the files git knows (tracked and
    # untracked, minus ignored ones: no .venv), fed as a tar; --network host: the build
    # reaches PyPI without needing the bridge's NAT.
    # The build stage is tagged too (busreg:dev-build): the legacy builder's cache is its
    # layers, which the prune below would otherwise delete as dangling.
    local t0 target
    t0=$(now_ms)
    : >"$D/build.log"
    for target in build final; do
        (cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -T - -c) |
            docker build --network host -f compose/Dockerfile \
                --build-arg BASE_IMAGE=busreg/python:3.11 \
                $([ $target = build ] && echo "--target build -t busreg:dev-build" || echo "-t busreg:dev") \
                - >>"$D/build.log" 2>&1 || {
            tail -n 30 "$D/build.log" >&2
            die "docker build of compose/Dockerfile failed"
        }
    done
    say "busreg:dev built in $(elapsed "$t0")"
    docker image prune -f >/dev/null # earlier builds, now untagged
    docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -vE '<none>|dev-build' | sed 's/^/docker.sh:   /' >&2
}

env_() {
    echo "export DOCKER_HOST=$DOCKER_HOST"
    # no registry here: testcontainers' Ryuk image cannot be pulled (tests clean up instead)
    echo "export TESTCONTAINERS_RYUK_DISABLED=true"
    # /.dockerenv exists on these machines, so testcontainers would believe it runs in a
    # container and connect to a gateway address: published ports are on 127.0.0.1
    echo "export TESTCONTAINERS_CONNECTION_MODE=docker_host"
    echo "export TC_HOST=127.0.0.1"
    echo "export BUSREG_TEST_RABBITMQ_IMAGE=rabbitmq:3.10-management"
    echo "export BUSREG_TEST_REDIS_IMAGE=redis:7.0"
}

# host_leftovers: print every host change of dockerd still present (nothing: clean)
host_leftovers() {
    ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^(docker0|br-[0-9a-f]{12}|veth)' |
        sed 's/^/link /' || true
    local t
    for t in filter nat; do
        # the MASQUERADE rules name their bridge (! -o docker0, ! -o br-...)
        iptables -t "$t" -S 2>/dev/null | grep -E 'DOCKER|docker0|br-[0-9a-f]{12}' | sed "s/^/iptables -t $t /" || true
    done
    grep -E "^[^ ]+ ($D|$DATA)[/ ]" /proc/mounts | awk '{print "mount " $2 " (" $3 ")"}' || true
    if [ -f "$D/host-baseline" ]; then
        local want pol
        want=$(sed -n 's/^ip_forward=//p' "$D/host-baseline")
        [ "$(cat /proc/sys/net/ipv4/ip_forward)" = "$want" ] || echo "ip_forward is $(cat /proc/sys/net/ipv4/ip_forward), was $want"
        pol=$(sed -n 's/^forward_policy=//p' "$D/host-baseline")
        [ -z "$pol" ] || [ "$(iptables -S FORWARD | awk '$1 == "-P" {print $3}')" = "$pol" ] ||
            echo "iptables FORWARD policy is not $pol"
    fi
}

stop() {
    if alive; then
        local pid ids i
        pid=$(cat "$D/dockerd.pid")
        ids=$(docker ps -aq 2>/dev/null || true)
        [ -z "$ids" ] || docker rm -f -v $ids >/dev/null 2>&1 || true
        docker network prune -f >/dev/null 2>&1 || true
        docker volume prune -f >/dev/null 2>&1 || true
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 200; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    cleanup_host
    local left
    left=$(host_leftovers)
    [ -z "$left" ] || {
        printf '%s\n' "$left" >&2
        die "host changes left after stop"
    }
    say "stopped; host clean (no docker links, iptables rules or mounts)"
}

# Undo what dockerd (bridge mode) changed on the host; each step is a no-op when clean.
cleanup_host() {
    local m l rule c
    # the exec root's network namespace files (nsfs) and any overlay left by a hard kill
    for m in $(grep -E "^[^ ]+ ($D|$DATA)[/ ]" /proc/mounts | awk '{print $2}' | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" || true
    done
    for l in $(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^(docker0|br-[0-9a-f]{12}|veth)' || true); do
        ip link delete "$l" 2>/dev/null || true
    done
    # rules that jump to docker's chains or name its bridges (MASQUERADE: ! -o docker0),
    # then the chains themselves
    for t in filter nat; do
        iptables -t "$t" -S 2>/dev/null | grep -E '^-A ' | grep -E 'DOCKER|docker0|br-[0-9a-f]{12}' |
            grep -vE '^-A DOCKER' | while read -r rule; do
            # shellcheck disable=SC2086
            iptables -t "$t" ${rule/#-A/-D} 2>/dev/null || true
        done || true # (grep found nothing)
        for c in $(iptables -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
            iptables -t "$t" -F "$c" 2>/dev/null || true
        done
        for c in $(iptables -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
            iptables -t "$t" -X "$c" 2>/dev/null || true
        done
    done
    if [ -f "$D/host-baseline" ]; then
        local want pol
        want=$(sed -n 's/^ip_forward=//p' "$D/host-baseline")
        [ -z "$want" ] || echo "$want" >/proc/sys/net/ipv4/ip_forward
        pol=$(sed -n 's/^forward_policy=//p' "$D/host-baseline")
        [ -z "$pol" ] || iptables -P FORWARD "$pol"
        # dockerd turns on iptables for bridged traffic (br_netfilter)
        want=$(sed -n 's/^bridge_nf=//p' "$D/host-baseline")
        [ -z "$want" ] || echo "$want" >/proc/sys/net/bridge/bridge-nf-call-iptables
    fi
    rm -rf "$D/exec" "$D/docker.sock"
}

case "${1:-}" in
start) start ;;
images) images ;;
env) env_ ;;
stop) stop ;;
check)
    left=$(host_leftovers)
    [ -z "$left" ] || {
        printf '%s\n' "$left"
        exit 1
    }
    ;;
remove)
    stop
    rm -rf "$D" "$DATA" "$ROOTFS"
    ;;
*)
    sed -n '2,30p' "$0" >&2
    exit 2
    ;;
esac
