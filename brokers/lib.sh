# Shared by the brokers/ scripts (sourced, not run).

# need COMMAND: stop with a clear message if COMMAND is not installed (uses the script's say)
need() {
    command -v "$1" >/dev/null || {
        say "$1 is not installed"
        exit 1
    }
}

# alive PIDFILE: the process it names is running
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_port PORT SECONDS: until a Redis (or Sentinel) on PORT answers PING
wait_port() {
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        redis-cli -p "$1" ping >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    return 1
}

# stop_pids DIR: SIGTERM every process whose pid file is DIR/*/pid, all at once (a Redis
# master stopped alone waits up to 10 s for its replica to catch up), SIGKILL what is
# left after 5 s, then remove DIR.
stop_pids() {
    local pids pid live i
    pids=$(cat "$1"/*/pid 2>/dev/null || true)
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 50; i++)); do
        live=0
        for pid in $pids; do kill -0 "$pid" 2>/dev/null && live=1; done
        [ "$live" = 0 ] && break
        sleep 0.1
    done
    for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$1"
}
