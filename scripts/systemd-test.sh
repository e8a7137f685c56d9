#!/usr/bin/env bash
# End-to-end checks of shellflip under a real systemd (SPEC section B), with the example
# service and the example units in examples/systemd/, unchanged.
#
# systemd runs inside a throw-away container (scripts/container.sh; never on the machine
# itself). The binaries, the configuration and the units are in a temporary directory bound
# to /opt/t inside; a drop-in only sets the addresses (free ports) and the log level. The
# container shares the machine's network, so the clients below run on the machine.
#
#   a  20 `systemctl restart`s under continuous keep-alive HTTP load: no request fails, and
#      the generation grows by exactly one each time
#   b  an echo client connected before the first restart still echoes after the last
#   c  `shellflip restart` on the control socket: prints the new PID, the unit's MainPID
#   d  a state the new executable refuses: `shellflip restart` fails with the reason, and the
#      same process keeps serving
#   e  a process killed while writing its state: the next one starts clean and reports the
#      torn state
#   f  `systemctl stop` then `start`: a fresh start, without complaint
#   g  the fork/exec lifecycle under systemd: `systemctl reload` moves the main PID to the
#      new process, and fails (changing nothing) when the new process refuses the state
#   j  300 echo clients kept in the store (in 2 bags, not 300 entries) across restarts: clients
#      that reset or close while they wait in the store are dropped, every other one echoes
#
# Needs root (systemd-nspawn), curl and /usr/bin/python3. Prints PASS/FAIL lines and exits
# non-zero when a check failed or the container could not be booted.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
# shellcheck source=scripts/container.sh
source scripts/container.sh

passed=0
failed=0
pass() {
    echo "PASS $*"
    passed=$((passed + 1))
}
fail() {
    echo "FAIL $*"
    failed=$((failed + 1))
}
# expect LABEL CMD...: PASS when CMD succeeds, FAIL otherwise.
expect() {
    local label=$1
    shift
    if "$@"; then pass "$label"; else fail "$label"; fi
}

# show LINE...: prints the lines (each may hold several), indented, below the check they explain.
show() {
    local text
    for text in "$@"; do
        if [[ -n $text ]]; then sed 's/^/    /' <<<"$text"; fi
    done
}

work=""
load_pid=""
echo_fd=""
clients_pid=""
cleanup() {
    local status=$?
    set +e
    if [[ -n $load_pid ]]; then
        kill -TERM "$load_pid" 2>/dev/null
        wait "$load_pid" 2>/dev/null
    fi
    if [[ -n $clients_pid ]]; then
        kill -TERM "$clients_pid" 2>/dev/null
        wait "$clients_pid" 2>/dev/null
    fi
    if [[ -n $echo_fd ]]; then
        exec {echo_fd}>&-
    fi
    if [[ -n $CONTAINER_PID ]] && ((failed > 0 || status != 0)); then
        echo "--- journal of the units (last 80 lines) ---"
        container_exec journalctl -u restarter -u restarter-forkexec -b --no-pager | tail -n 80
    fi
    container_shutdown
    [[ -z $work ]] || rm -rf "$work"
}
trap cleanup EXIT
# A command that fails outside a check ends the script (set -e): say which.
trap 'echo "FAIL line $LINENO: $BASH_COMMAND"' ERR

if [[ $(id -u) != 0 ]]; then
    fail "setup: systemd-nspawn needs root"
    exit 1
fi
container_ensure_nspawn
if ! command -v curl >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl >/dev/null
fi

# --- The binaries, configuration and units, in the directory bound to /opt/t -----------------
cargo build --all-features --example restarter --bin shellflip
target=$(cargo metadata --format-version 1 --no-deps |
    /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
work=$(mktemp -d "${TMPDIR:-/tmp}/shellflip-systemd.XXXXXX")
chmod 755 "$work"
mkdir "$work/bin"
cp "$target/debug/examples/restarter" "$target/debug/shellflip" "$work/bin/"
cp examples/systemd/restarter.service examples/systemd/restarter-forkexec.service "$work/"
config=$work/restarter.toml
write_config() {
    printf 'greeting = "systemd-test"\n%s' "$*" >"$config"
}
write_config ""

# Four free ports: HTTP and echo for each unit.
read -r http_port echo_port fe_http_port fe_echo_port < <(/usr/bin/python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

if ! container_boot "shellflip-test-$$" "$work"; then
    fail "setup: cannot boot systemd in a container (see above)"
    exit 1
fi
pass "setup: systemd booted in container (pid $CONTAINER_PID)"

# Inside the container.
c() { container_exec "$@"; }
sock=/run/restarter/restarter.sock
fe_sock=/run/restarter-forkexec/restarter.sock
shellflip_cli() { c /opt/t/bin/shellflip "$@"; }
main_pid() { c systemctl show -p MainPID --value "$1"; }
active_state() { c systemctl show -p ActiveState --value "$1"; }
store_size() { c systemctl show -p NFileDescriptorStore --value "$1"; }
# wait_state UNIT STATE: waits up to 30 s for the unit's ActiveState.
wait_state() {
    local deadline=$((SECONDS + 30))
    while [[ $(active_state "$1") != "$2" ]]; do
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}

for unit in restarter restarter-forkexec; do
    c cp "/opt/t/$unit.service" /run/systemd/system/
    c mkdir -p "/run/systemd/system/$unit.service.d"
done
c tee /run/systemd/system/restarter.service.d/test.conf >/dev/null <<EOF
[Service]
Environment=HTTP=127.0.0.1:$http_port ECHO=127.0.0.1:$echo_port RUST_LOG=info,shellflip=debug
EOF
c tee /run/systemd/system/restarter-forkexec.service.d/test.conf >/dev/null <<EOF
[Service]
Environment=HTTP=127.0.0.1:$fe_http_port ECHO=127.0.0.1:$fe_echo_port RUST_LOG=info,shellflip=debug
EOF
c systemctl daemon-reload

# GET / answers "generation=N pid=P greeting=G"; these print N or P (empty when unreachable).
get_root() { curl -sS --max-time 10 "http://127.0.0.1:$1/" 2>&1 || true; }
generation_at() { get_root "$1" | sed -n 's/^generation=\([0-9]*\) .*/\1/p'; }
pid_at() { get_root "$1" | sed -n 's/.* pid=\([0-9]*\) .*/\1/p'; }
# served_by PORT PID: waits up to 10 s until GET / is answered by PID. In the fork/exec
# lifecycle the old process may still accept for a moment after `systemctl reload` returned
# (it stops accepting once the new one is ready), and answers with `Connection: close`.
served_by() {
    local deadline=$((SECONDS + 10))
    until [[ $(pid_at "$1") == "$2" ]]; do
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}

# start_load PORT NAME: continuous keep-alive load in the background, until stop_load.
start_load() {
    rm -f "$work/$2.started"
    /usr/bin/python3 "$repo/scripts/keepalive-load.py" "127.0.0.1:$1" "$work/$2.summary" \
        "$work/$2.started" &
    load_pid=$!
    local deadline=$((SECONDS + 30))
    until [[ -e $work/$2.started ]]; do
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}
# stop_load NAME: stops the load and sets load_requests, load_failed, load_connections.
stop_load() {
    kill -TERM "$load_pid"
    wait "$load_pid" || true
    load_pid=""
    local summary=$work/$1.summary
    load_requests=$(sed -n '1s/.*requests=\([0-9]*\).*/\1/p' "$summary")
    load_failed=$(sed -n '1s/.*failed=\([0-9]*\).*/\1/p' "$summary")
    load_connections=$(sed -n '1s/.*connections=\([0-9]*\).*/\1/p' "$summary")
    show "$(tail -n +2 "$summary")"
}

# --- a, b: 20 `systemctl restart`s under load, with an echo client connected throughout --------
c systemctl start restarter
expect "a: restarter.service starts, generation 0" test "$(generation_at "$http_port")" = 0
stored=$(store_size restarter)
expect "a: its store holds the listeners, the control socket and the state ($stored)" \
    test "${stored:-0}" -ge 4

greeting=""
if exec {echo_fd}<>"/dev/tcp/127.0.0.1/$echo_port"; then
    read -r -t 10 -u "$echo_fd" greeting || true
else
    echo_fd=""
fi
expect "b: echo client connected (greeting: $greeting)" test -n "$greeting"

start_load "$http_port" restarts || fail "a: the HTTP load did not start"
restarts=20
generation=0
bad_restarts=()
bad_echoes=()
for i in $(seq "$restarts"); do
    if ! c systemctl restart restarter; then
        bad_restarts+=("restart $i: systemctl restart failed")
    fi
    got=$(generation_at "$http_port")
    if [[ $got != $((generation + 1)) ]]; then
        bad_restarts+=("restart $i: generation ${got:-none} after $generation")
    fi
    generation=${got:-$generation}
    reply=""
    if [[ -n $echo_fd ]] && echo "line $i" 2>/dev/null >&"$echo_fd"; then
        read -r -t 10 -u "$echo_fd" reply || true
    fi
    [[ $reply == "line $i" ]] || bad_echoes+=("after restart $i: got '${reply}'")
    if ((i == 1)); then stored_first=$(store_size restarter); fi
done
stored_last=$(store_size restarter)
stop_load restarts
show "${bad_restarts[@]}" "${bad_echoes[@]}"
expect "a: $restarts systemctl restarts, generation 0 -> $generation, one step each" \
    test "${#bad_restarts[@]}" = 0 -a "$generation" = "$restarts"
expect "a: keep-alive load across the restarts: $load_requests requests on $load_connections connections, $load_failed failed" \
    test "${load_failed:-x}" = 0 -a "${load_requests:-0}" -gt 0 -a "${load_connections:-0}" -gt "$restarts"
expect "b: the echo client connected before the first restart echoed a line after each of the $restarts" \
    test "${#bad_echoes[@]}" = 0
expect "a: the store does not grow from restart to restart ($stored_first after the first, $stored_last after the last)" \
    test "${stored_first:-x}" = "${stored_last:-y}"
if [[ -n $echo_fd ]]; then exec {echo_fd}>&-; fi
echo_fd=""

# --- j: many echo clients kept in the store, in bags ---------------------------------------------
# For these restarts the new process starts 1 s after the old one exited (a drop-in's
# ExecStartPre=), so that clients can leave while their connections wait in the store.
c tee /run/systemd/system/restarter.service.d/pause.conf >/dev/null <<EOF
[Service]
ExecStartPre=/bin/sleep 1
EOF
c systemctl daemon-reload
clients=300
coproc ECHO_CLIENTS { exec /usr/bin/python3 -u "$repo/scripts/echo-clients.py" "127.0.0.1:$echo_port" "$clients"; }
clients_pid=$ECHO_CLIENTS_PID
# clients_say CMD: sends one command to the clients, prints their answer.
clients_say() {
    local answer=""
    echo "$1" >&"${ECHO_CLIENTS[1]}"
    read -r -t 120 answer <&"${ECHO_CLIENTS[0]}" || true
    echo "$answer"
}
connected=""
read -r -t 120 connected <&"${ECHO_CLIENTS[0]}" || true
expect "j: $clients echo clients connected ($connected)" test "$connected" = "connected $clients"
# bags_read: what the newest generation said it read from the store's bags.
bags_read() {
    c journalctl -u restarter -b --no-pager -o cat | grep -o '[0-9]* stored connections read from [0-9]* bags' | tail -n 1
}
c systemctl restart --no-block restarter
wait_state restarter activating || true
left="$(clients_say "reset 5"), $(clients_say "close 5")"
wait_state restarter active || true
first=$(bags_read)
echoed=$(clients_say "check h1")
stored=$(store_size restarter)
expect "j: restart while $left: $first; the store holds $stored entries" \
    test "$first" = "$clients stored connections read from 2 bags" -a "${stored:-99}" -le 8
expect "j: after it, every client still there echoes ($echoed)" \
    test "$echoed" = "echoed $((clients - 10)) of $((clients - 10))"
c systemctl restart restarter
second=$(bags_read)
echoed=$(clients_say "check h2")
expect "j: the next restart hands on only those ($second), and each echoes ($echoed)" \
    test "$second" = "$((clients - 10)) stored connections read from 2 bags" \
    -a "$echoed" = "echoed $((clients - 10)) of $((clients - 10))"
kill -TERM "$clients_pid" 2>/dev/null || true
wait "$clients_pid" 2>/dev/null || true
clients_pid=""
c rm /run/systemd/system/restarter.service.d/pause.conf
c systemctl daemon-reload

# --- c: a restart on the control socket, through the command line ------------------------------
before=$(generation_at "$http_port")
out=$(shellflip_cli restart --socket "$sock" 2>&1) && rc=0 || rc=$?
show "shellflip restart: exit $rc: $out"
expect "c: shellflip restart exits 0 and prints the new PID" \
    test "$rc" = 0 -a -n "$out" -a -z "${out//[0-9]/}"
expect "c: the printed PID is the unit's MainPID and serves GET /" \
    test "$(main_pid restarter)" = "$out" -a "$(pid_at "$http_port")" = "$out"
expect "c: generation $before -> $((before + 1))" test "$(generation_at "$http_port")" = $((before + 1))

# --- d: the new executable refuses the state: the old process keeps serving ---------------------
pid_before=$(main_pid restarter)
before=$(generation_at "$http_port")
write_config 'state_format = 2'
out=$(shellflip_cli restart --socket "$sock" 2>&1) && rc=0 || rc=$?
write_config ""
show "shellflip restart: exit $rc: $out"
expect "d: shellflip restart fails and says why" \
    test "$rc" != 0 -a "$(grep -c 'rejected the state.*state format 1 is not the format 2' <<<"$out")" = 1
expect "d: the same process ($pid_before) is still the active MainPID and serves, generation $before" \
    test "$(main_pid restarter)" = "$pid_before" -a "$(active_state restarter)" = active \
    -a "$(pid_at "$http_port")" = "$pid_before" -a "$(generation_at "$http_port")" = "$before"
out=$(shellflip_cli restart --socket "$sock" 2>&1) && rc=0 || rc=$?
expect "d: with the configuration restored, the next restart succeeds (pid $out)" \
    test "$rc" = 0 -a "$(generation_at "$http_port")" = $((before + 1))

# --- e: killed in the middle of the state write: the next start reports a torn state -----------
# The old process reads its configuration when it starts: restart once to load a slow, large
# state write, then put the normal configuration back for the generation after the kill.
write_config $'state_mib = 64\nstate_write_delay_ms = 4000\n'
c systemctl restart restarter
write_config ""
victim=$(main_pid restarter)
c systemctl restart --no-block restarter
wait_state restarter deactivating || true
sleep 1 # the write is spread over 4 s
written=$(c journalctl -b --no-pager "_PID=$victim" | grep -c 'state written' || true)
expect "e: process $victim is writing its state (64 MiB over 4 s) when it is killed" \
    test "$(active_state restarter)" = deactivating -a "$written" = 0
c systemctl kill -s KILL restarter
wait_state restarter active || true
status=$(shellflip_cli status --socket "$sock" 2>&1 || true)
show "$status"
expect "e: a new process started, at generation 0" \
    test "$(main_pid restarter)" != "$victim" -a "$(generation_at "$http_port")" = 0
expect "e: its status reports the torn state" \
    test "$(grep -c '^state on start: unusable: .*torn' <<<"$status")" = 1

# --- f: stop, then start: fresh, without complaint -----------------------------------------------
c systemctl stop restarter
expect "f: after systemctl stop the unit is inactive and its store empty" \
    test "$(active_state restarter)" = inactive -a "$(store_size restarter)" = 0
c systemctl start restarter
fresh=$(main_pid restarter)
status=$(shellflip_cli status --socket "$sock" 2>&1 || true)
complaints=$(c journalctl -b --no-pager "_PID=$fresh" | grep -c ' ERROR ' || true)
expect "f: systemctl start: generation 0, state on start \"none\", no complaint in its log" \
    test "$(generation_at "$http_port")" = 0 -a "$(grep -c '^state on start: none$' <<<"$status")" = 1 \
    -a "$complaints" = 0
c systemctl stop restarter

# --- g: the fork/exec lifecycle under systemd, restarted with systemctl reload ------------------
c systemctl start restarter-forkexec
expect "g: restarter-forkexec.service starts, generation 0" \
    test "$(generation_at "$fe_http_port")" = 0 -a "$(pid_at "$fe_http_port")" = "$(main_pid restarter-forkexec)"
start_load "$fe_http_port" reloads || fail "g: the HTTP load did not start"
reloads=5
generation=0
bad_reloads=()
for i in $(seq "$reloads"); do
    old=$(main_pid restarter-forkexec)
    c systemctl reload restarter-forkexec || bad_reloads+=("reload $i: systemctl reload failed")
    new=$(main_pid restarter-forkexec)
    state=$(active_state restarter-forkexec)
    served_by "$fe_http_port" "$new" || true
    serving=$(pid_at "$fe_http_port")
    got=$(generation_at "$fe_http_port")
    if [[ $new == "$old" || $state != active || $serving != "$new" || $got != $((generation + 1)) ]]; then
        bad_reloads+=("reload $i: MainPID $old -> $new ($state), GET / from $serving, generation ${got:-none} after $generation")
    fi
    generation=${got:-$generation}
done
show "${bad_reloads[@]}"
expect "g: $reloads systemctl reloads: each moved MainPID to the new process, unit active, generation +1" \
    test "${#bad_reloads[@]}" = 0 -a "$generation" = "$reloads"
status=$(shellflip_cli status --socket "$fe_sock" 2>&1 || true)
expect "g: the inherited control socket answers: fork-exec lifecycle, generation $reloads" \
    test "$(grep -cxE "lifecycle: fork-exec|generation: $reloads" <<<"$status")" = 2
pid_before=$(main_pid restarter-forkexec)
write_config 'state_format = 2'
c systemctl reload restarter-forkexec 2>/dev/null && rc=0 || rc=$?
write_config ""
reason=$(c journalctl -u restarter-forkexec -b --no-pager | grep -c 'shellflip: restart failed: .*state format 1 is not the format 2' || true)
expect "g: systemctl reload fails when the new process refuses the state, and says why in the journal" \
    test "$rc" != 0 -a "$reason" -ge 1
expect "g: ... and the same process ($pid_before) stays the active MainPID and serves, generation $generation" \
    test "$(main_pid restarter-forkexec)" = "$pid_before" -a "$(active_state restarter-forkexec)" = active \
    -a "$(pid_at "$fe_http_port")" = "$pid_before" -a "$(generation_at "$fe_http_port")" = "$generation"
stop_load reloads
expect "g: keep-alive load across the reloads: $load_requests requests on $load_connections connections, $load_failed failed" \
    test "${load_failed:-x}" = 0 -a "${load_requests:-0}" -gt 0 -a "${load_connections:-0}" -gt "$reloads"
# Under this container's systemd (legacy cgroup hierarchy) a main process that systemd did not
# start itself is killed with SIGKILL at once on stop, and the unit ends "failed"; on a unified
# hierarchy systemd waits for the drain. Either way nothing may be left running.
c systemctl stop restarter-forkexec || true
state=$(active_state restarter-forkexec)
expect "g: systemctl stop leaves no process of any generation (unit $state)" \
    test "$state" != active -a "$state" != deactivating -a -z "$(c pgrep -x restarter || true)"

echo "systemd: $passed passed, $failed failed"
if ((failed > 0)); then exit 1; fi
