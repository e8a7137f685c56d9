# Helpers to run a real systemd inside a throw-away container (systemd-nspawn), for tests and
# benchmarks. Source this file from a bash script that uses `set -euo pipefail`.
#
# The machine's process 1 is not systemd, and systemd must NEVER be started on the machine
# itself (it would move the machine's own processes between control groups). Inside the
# container it is safe: its root is an empty tmpfs with the machine's /usr mounted read-only
# (`-D / --volatile=yes`), so nothing on the machine changes. It shares the machine's network:
# a service inside listening on 127.0.0.1 is reachable from outside.
#
#   container_ensure_nspawn            install systemd-nspawn (package systemd-container) if missing
#   container_boot NAME DIR [TIMEOUT] [ROOT]
#                                      boot; DIR (absolute) is bound to /opt/t inside. Without
#                                      ROOT: the machine's own systemd (`-D / --volatile=yes`).
#                                      With ROOT: the systemd of that root directory
#                                      (scripts/systemd-root.sh), `--volatile=overlay`, so that
#                                      ROOT is never changed
#   container_exec CMD...              run CMD inside (its exit status is returned)
#   container_shutdown                 power off and wait; safe to call twice, or when not booted
#
# container_boot sets CONTAINER_NSPAWN_PID (the systemd-nspawn process) and CONTAINER_PID (the
# container's systemd, as seen from the machine). Call container_shutdown from an EXIT trap, so
# the container is stopped on every path.

CONTAINER_NSPAWN_PID=""
CONTAINER_PID=""
CONTAINER_LOG=""

container_ensure_nspawn() {
    if ! command -v systemd-nspawn >/dev/null 2>&1; then
        echo "systemd-nspawn is missing: installing systemd-container" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            systemd-container >/dev/null
    fi
}

# container_boot NAME DIR [TIMEOUT_SECONDS] [ROOT]: boots systemd in a container named NAME, with
# DIR bound to /opt/t, and waits until `systemctl is-system-running` says running or degraded.
# Returns non-zero (after shutting down whatever started) when that does not happen in time.
container_boot() {
    local name=$1 dir=$2 timeout=${3:-60} root=${4:-}
    local -a tree=(-D / --volatile=yes)
    if [[ -n $root ]]; then
        tree=(-D "$root" --volatile=overlay)
    fi
    CONTAINER_LOG=$(mktemp "${TMPDIR:-/tmp}/nspawn-$name.XXXXXX.log")
    systemd-nspawn --register=no --keep-unit "${tree[@]}" \
        --bind="$dir:/opt/t" --boot -M "$name" systemd.firstboot=off \
        </dev/null >"$CONTAINER_LOG" 2>&1 &
    CONTAINER_NSPAWN_PID=$!
    local deadline=$((SECONDS + timeout)) pid state
    while ((SECONDS < deadline)); do
        if ! kill -0 "$CONTAINER_NSPAWN_PID" 2>/dev/null; then
            echo "systemd-nspawn exited during boot; its output:" >&2
            cat "$CONTAINER_LOG" >&2
            wait "$CONTAINER_NSPAWN_PID" 2>/dev/null || true
            CONTAINER_NSPAWN_PID=""
            return 1
        fi
        # The container's systemd is the child of systemd-nspawn whose name is "systemd".
        for pid in $(pgrep -P "$CONTAINER_NSPAWN_PID" || true); do
            if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == systemd ]]; then
                CONTAINER_PID=$pid
            fi
        done
        if [[ -n $CONTAINER_PID ]]; then
            state=$(nsenter -t "$CONTAINER_PID" -a systemctl is-system-running 2>/dev/null || true)
            if [[ $state == running || $state == degraded ]]; then
                return 0
            fi
        fi
        sleep 0.2
    done
    echo "the container's systemd was not up after ${timeout} s; systemd-nspawn said:" >&2
    tail -n 30 "$CONTAINER_LOG" >&2
    container_shutdown
    return 1
}

# container_exec CMD...: runs CMD in every namespace of the container (as root, cwd /).
container_exec() {
    nsenter -t "$CONTAINER_PID" -a "$@"
}

# container_shutdown: `systemctl poweroff` inside, then waits for systemd-nspawn to exit
# (SIGTERM does not stop it). As a last resort, kills that one systemd-nspawn process.
container_shutdown() {
    local pid=$CONTAINER_NSPAWN_PID
    if [[ -n $pid ]]; then
        if [[ -n $CONTAINER_PID ]]; then
            nsenter -t "$CONTAINER_PID" -a systemctl poweroff >/dev/null 2>&1 || true
        fi
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "the container did not power off: killing systemd-nspawn $pid" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    fi
    CONTAINER_NSPAWN_PID=""
    CONTAINER_PID=""
    [[ -z $CONTAINER_LOG ]] || rm -f "$CONTAINER_LOG"
    CONTAINER_LOG=""
}

# For a script that boots a container of its own and keeps its files in $work:
# container_script_start NAME checks that it runs as root (systemd-nspawn needs it) and that
# systemd-nspawn is there, and installs container_script_cleanup as the EXIT trap, which shuts
# the container down and removes $work. A script with more to clean up installs its own trap
# and calls container_script_cleanup from it.
container_script_cleanup() {
    set +e
    container_shutdown
    [[ -z ${work:-} ]] || rm -rf "$work"
}

container_script_start() {
    local name=$1
    trap container_script_cleanup EXIT
    if [[ $(id -u) != 0 ]]; then
        echo "$name: systemd-nspawn needs root" >&2
        exit 1
    fi
    container_ensure_nspawn
}
