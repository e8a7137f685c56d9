#!/usr/bin/env bash
# Where a `systemctl restart` with N echo clients kept in systemd's store spends its time, under
# a real systemd in a throw-away container (scripts/container.sh; systemd never runs on the
# machine itself), with the example unit of examples/systemd/ (a drop-in sets the addresses,
# RUST_LOG=info and LimitNOFILE=65536):
#
#   1. RESTARTS plain restarts, each timed, every client echoing after each; then the journal of
#      the last one (systemd's and the service's lines, on the container's monotonic clock): the
#      old process stopping, storing, exiting; the new one starting, reading its bags, READY=1.
#   2. One more restart under `strace -c -f` of the container's systemd (process 1 inside; -f
#      follows it into the new service process it starts): the system calls of both, counted.
#
#   N=1000 scripts/profile-systemd-store.sh
#   N=10000 RESTARTS=5 scripts/profile-systemd-store.sh
#
# Needs root, strace and /usr/bin/python3. Changes nothing in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
# shellcheck source=scripts/container.sh
source scripts/container.sh
# shellcheck source=scripts/bench-systemd-setup.sh
source scripts/bench-systemd-setup.sh

N=${N:-1000}
RESTARTS=${RESTARTS:-3}

clients_pid=""
strace_pid=""
cleanup() {
    set +e
    [[ -z $strace_pid ]] || kill -INT "$strace_pid" 2>/dev/null
    if [[ -n $clients_pid ]]; then
        kill -TERM "$clients_pid" 2>/dev/null
        wait "$clients_pid" 2>/dev/null
    fi
    container_script_cleanup
}
container_script_start profile-systemd-store
trap cleanup EXIT
command -v strace >/dev/null || { echo "profile-systemd-store: strace is missing" >&2; exit 1; }

bench_systemd_setup profile-store
c systemctl stop restarter-forkexec
c tee /run/systemd/system/restarter.service.d/profile.conf >/dev/null <<CONF
[Service]
LimitNOFILE=65536
Environment=RUST_LOG=info
CONF
c systemctl daemon-reload
c systemctl restart restarter
echo "under $(c systemctl --version | head -1); $N echo clients" >&2

coproc CLIENTS { exec /usr/bin/python3 -u "$repo/scripts/echo-clients.py" "127.0.0.1:$echo_port" "$N"; }
clients_pid=$CLIENTS_PID
say() {
    local answer=""
    echo "$1" >&"${CLIENTS[1]}"
    read -r -t 300 answer <&"${CLIENTS[0]}" || true
    echo "$answer"
}
read -r -t 300 connected <&"${CLIENTS[0]}" || connected="not connected"
echo "$connected" >&2

restart() {
    local t0 t1
    t0=$(date +%s%N)
    c systemctl restart restarter || echo "systemctl restart failed" >&2
    t1=$(date +%s%N)
    echo "restart $1: $(((t1 - t0) / 1000000)) ms; $(say "check $1")" >&2
}
restart warm-up
for i in $(seq "$RESTARTS"); do restart "$i"; done

echo "--- the last restart, from the journal (seconds since the container's boot) ---" >&2
c journalctl -u restarter -b --no-pager -o short-monotonic |
    grep -E 'Stopping|restart requested|state written|drained|put in|exits|Deactivated|Starting|stored connections read|ready|Started' |
    tail -n 12 | sed -E 's/^\[ *([0-9.]+)\] [^ ]+ /\1 /' >&2

echo "--- one restart under strace -c -f of the container's systemd and the service it starts ---" >&2
out=$(mktemp "${TMPDIR:-/tmp}/profile-store.XXXXXX")
strace -c -f -p "$CONTAINER_PID" -o "$out" 2>/dev/null &
strace_pid=$!
sleep 1
restart traced
kill -INT "$strace_pid"
wait "$strace_pid" 2>/dev/null || true
strace_pid=""
head -n 12 "$out" >&2
rm -f "$out"
