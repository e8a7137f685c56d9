#!/usr/bin/env bash
# End-to-end checks of shellflip under real systemds (SPEC section B), with the example
# service and the example units in examples/systemd/, unchanged: the same checks under each
# version of the matrix, one after the other, and the newer protocol where the version has it.
#
#   252  the machine's own systemd (Debian 12): the container's root is the machine's /usr
#   257  Debian 13's, from a root built once with debootstrap and cached on the machine
#        (scripts/systemd-root.sh), booted with --volatile=overlay
#
# systemd runs inside a throw-away container (scripts/container.sh; never on the machine
# itself). The binaries, the configuration and the units are in a temporary directory bound
# to /opt/t inside; a drop-in only sets the addresses (free ports) and the log level. The
# container shares the machine's network, so the clients below run on the machine.
#
# Under every version:
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
# From systemd 253 (here 257):
#   h  Type=notify-reload (restarter-reload.service): 5 `systemctl reload`s under keep-alive
#      load, each moving the main PID to the new process, which names itself with MAINPIDFD=1
#      (257); RELOADING=1 with MONOTONIC_USEC= in one message, accepted (with ExecReload=
#      cleared, reloads end on the notifications alone; a reload asked for while a restart on
#      the control socket runs waits for it, then reloads); a refused restart ends the reload
#      (never stuck "reloading"), fails `systemctl reload` through `shellflip await-restart`
#      with the reason in the journal, and the old main PID keeps serving
# From systemd 254 (here 257):
#   i  FileDescriptorStorePreserve=yes: `systemctl stop` then `start` resumes from the stored
#      state (the status shows its generation and age); a service that allows a state only so
#      old (max_state_age_secs) starts fresh and says why
#
# Every line names the version it ran under; the last line is the total, `N passed, N failed`.
# SHELLFLIP_SYSTEMD_VERSIONS="257" runs one version only (default "252 257"). A version that
# cannot be booted is a failure, never a skip.
#
# Needs root (systemd-nspawn, debootstrap), curl and /usr/bin/python3. Prints PASS/FAIL lines
# and exits non-zero when a check failed or a container could not be booted.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
# shellcheck source=scripts/container.sh
source scripts/container.sh

passed=0
failed=0
# The version the checks run under now, named on every line.
sd_label="systemd"
pass() {
    echo "PASS [$sd_label] $*"
    passed=$((passed + 1))
}
fail() {
    echo "FAIL [$sd_label] $*"
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
        if [[ -n $text ]]; then sed "s/^/    [$sd_label] /" <<<"$text"; fi
    done
}

work=""
totals_printed=""
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
        container_exec journalctl -u restarter -u restarter-forkexec -u restarter-reload -b \
            --no-pager | tail -n 80
    fi
    container_shutdown
    [[ -z $work ]] || rm -rf "$work"
    # Ended early (a command failed outside a check): the total still closes the output.
    if [[ -z $totals_printed ]]; then
        echo "$passed passed, $((failed > 0 ? failed : 1)) failed"
    fi
}
trap cleanup EXIT
# A command that fails outside a check ends the script (set -e): say which.
trap 'fail "line $LINENO: $BASH_COMMAND"' ERR

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
cp examples/systemd/restarter.service examples/systemd/restarter-forkexec.service \
    examples/systemd/restarter-reload.service "$work/"
config=$work/restarter.toml
write_config() {
    printf 'greeting = "systemd-test"\n%s' "$*" >"$config"
}
write_config ""

# suite VERSION ROOT: every check, under systemd VERSION booted from ROOT (empty: the machine's
# own). A container that cannot be booted is one failed check.
suite() {
local expected=$1 root=$2 started=$SECONDS
sd_label="systemd $expected"
local passed_before=$passed failed_before=$failed

# Six free ports: HTTP and echo for each unit.
read -r http_port echo_port fe_http_port fe_echo_port rl_http_port rl_echo_port < <(/usr/bin/python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

if ! container_boot "shellflip-test-$expected-$$" "$work" 60 "$root"; then
    fail "setup: cannot boot systemd $expected in a container (see above)"
    return 0
fi
full_version=$(container_exec systemctl --version | head -n 1)
version=$(sed -n 's/^systemd \([0-9]*\).*/\1/p' <<<"$full_version")
expect "setup: $full_version booted in a container (pid $CONTAINER_PID, root ${root:-of the machine})" \
    test "${version:-0}" = "$expected"

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

for unit in restarter restarter-forkexec restarter-reload; do
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
c tee /run/systemd/system/restarter-reload.service.d/test.conf >/dev/null <<EOF
[Service]
Environment=HTTP=127.0.0.1:$rl_http_port ECHO=127.0.0.1:$rl_echo_port RUST_LOG=info,shellflip=debug
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

# --- h: Type=notify-reload (systemd 253+): the reload signal restarts ---------------------------
if ((version >= 253)); then
    # systemd's own debug log shows each notification it got, and what it made of it.
    c systemctl log-level debug
    rl_sock=/run/restarter-reload/restarter.sock
    c systemctl start restarter-reload
    expect "h: restarter-reload.service (Type=notify-reload, ReloadSignal=SIGUSR1) starts, generation 0" \
        test "$(generation_at "$rl_http_port")" = 0 -a "$(pid_at "$rl_http_port")" = "$(main_pid restarter-reload)"
    start_load "$rl_http_port" notify-reloads || fail "h: the HTTP load did not start"
    # reload_times N WHAT: N reloads (each bounded: a reload systemd does not end is a failure);
    # appends to bad_reloads and new_pids, advances generation.
    reload_times() {
        local n=$1 what=$2 i old new state serving got result
        for i in $(seq "$n"); do
            old=$(main_pid restarter-reload)
            if ! c timeout 30 systemctl reload restarter-reload; then
                bad_reloads+=("$what $i: systemctl reload failed or did not end within 30 s")
            fi
            new=$(main_pid restarter-reload)
            state=$(active_state restarter-reload)
            result=$(c systemctl show -p ReloadResult --value restarter-reload)
            served_by "$rl_http_port" "$new" || true
            serving=$(pid_at "$rl_http_port")
            got=$(generation_at "$rl_http_port")
            if [[ $new == "$old" || $state != active || $result != success || $serving != "$new" ||
                $got != $((generation + 1)) ]]; then
                bad_reloads+=("$what $i: MainPID $old -> $new ($state, reload $result), GET / from $serving, generation ${got:-none} after $generation")
            fi
            new_pids+=("$new")
            generation=${got:-$generation}
        done
    }
    reloads=5
    generation=0
    bad_reloads=()
    new_pids=()
    reload_times "$reloads" reload
    show "${bad_reloads[@]}"
    expect "h: $reloads systemctl reloads: each moved MainPID to the new process, unit active, reload success, generation +1" \
        test "${#bad_reloads[@]}" = 0 -a "$generation" = "$reloads"
    journal=$(c journalctl -u restarter-reload -b --no-pager -o cat)
    stamped=$(grep -c 'Got notification message from PID [0-9]*: RELOADING=1, MONOTONIC_USEC=[0-9]\{6,\}' <<<"$journal" || true)
    expect "h: each restart said RELOADING=1 with MONOTONIC_USEC= in one message ($stamped of $reloads)" \
        test "$stamped" -ge "$reloads"
    # MAINPIDFD=1 (257): the new process names itself by its pidfd, and systemd takes it as the
    # main process from that message (the next line), before any MAINPID= arrives.
    named=0
    for pid in "${new_pids[@]}"; do
        # After its MAINPIDFD=1, systemd names it the main PID before its READY=1, MAINPID=.
        first=$(sed -n "/Got notification message from PID $pid: MAINPIDFD=1\$/,\$p" <<<"$journal" |
            grep -m1 -E "New main PID $pid |PID $pid: READY=1" || true)
        if [[ $first == *"New main PID $pid "* ]]; then
            named=$((named + 1))
        else
            show "$(grep -E "PID $pid[: ]" <<<"$journal" | head -n 8)"
        fi
    done
    if ((version >= 257)); then
        expect "h: each new process named itself with MAINPIDFD=1 (its pidfd), and systemd made it the main PID from that message ($named of $reloads)" \
            test "$named" = "$reloads"
    fi

    # The notifications alone (ExecReload= cleared): a reload ends only when systemd accepted
    # RELOADING=1 with a MONOTONIC_USEC= at or after its own reload start, then READY=1.
    c tee /run/systemd/system/restarter-reload.service.d/notify-only.conf >/dev/null <<UNIT
[Service]
ExecReload=
UNIT
    c systemctl daemon-reload
    bad_reloads=()
    before=$generation
    reload_times 3 "notification-only reload"
    show "${bad_reloads[@]}"
    expect "h: with ExecReload= cleared, 3 reloads end on RELOADING=1+MONOTONIC_USEC= and READY=1 alone: MONOTONIC_USEC accepted (generation $before -> $generation)" \
        test "${#bad_reloads[@]}" = 0 -a "$generation" = $((before + 3))
    # `systemctl reload` while a restart asked for on the control socket runs (its successor
    # slow to be ready): that restart said RELOADING=1, so the unit is "reloading" already, and
    # systemd holds the reload job until it ends, then reloads: two generations, both served.
    pid_before=$(main_pid restarter-reload)
    write_config 'startup_delay_ms = 1500'
    shellflip_cli restart --socket "$rl_sock" >"$work/joined.out" 2>&1 &
    joined_restart=$!
    sleep 0.5
    reloading_now=$(active_state restarter-reload)
    c timeout 30 systemctl reload restarter-reload && rc=0 || rc=$?
    wait "$joined_restart" && restart_rc=0 || restart_rc=$?
    write_config ""
    first=$(cat "$work/joined.out")
    last=$(main_pid restarter-reload)
    got=$(generation_at "$rl_http_port")
    show "while shellflip restart ran the unit was $reloading_now; systemctl reload: exit $rc; shellflip restart: exit $restart_rc: $first; MainPID now $last"
    expect "h: systemctl reload during a restart on the control socket waits for it (unit $reloading_now), then reloads: MainPID $pid_before -> $first -> $last, generation $generation -> ${got:-none}" \
        test "$reloading_now" = reloading -a "$rc" = 0 -a "$restart_rc" = 0 \
        -a "$first" != "$pid_before" -a "$last" != "$first" -a "$last" != "$pid_before" \
        -a "${got:-x}" = $((generation + 2))
    generation=${got:-$generation}
    # ... where a refused restart still ends the reload: READY=1 from the old process, with the
    # reason in STATUS= (without it systemd 257 would stay "reloading" for good).
    pid_before=$(main_pid restarter-reload)
    write_config 'state_format = 2'
    c timeout 30 systemctl reload restarter-reload && rc=0 || rc=$?
    write_config ""
    status_text=$(c systemctl show -p StatusText --value restarter-reload)
    show "systemctl reload: exit $rc; StatusText=$status_text"
    expect "h: ... and a refused restart ends the reload at once (exit $rc: systemd 257 cannot fail it by notification), unit active, not reloading, STATUS= says why" \
        test "$rc" != 124 -a "$(active_state restarter-reload)" = active \
        -a "$(main_pid restarter-reload)" = "$pid_before" \
        -a "$(grep -c 'restart failed, still serving: .*state format 1 is not the format 2' <<<"$status_text")" = 1
    c rm /run/systemd/system/restarter-reload.service.d/notify-only.conf
    c systemctl daemon-reload

    # The unit as shipped: `shellflip await-restart` makes a refused restart fail the reload.
    pid_before=$(main_pid restarter-reload)
    write_config 'state_format = 2'
    c timeout 30 systemctl reload restarter-reload 2>/dev/null && rc=0 || rc=$?
    write_config ""
    reason=$(c journalctl -u restarter-reload -b --no-pager | grep -c 'shellflip: restart failed: .*state format 1 is not the format 2' || true)
    show "systemctl reload: exit $rc"
    expect "h: systemctl reload fails when the new process refuses the state, and the journal says why" \
        test "$rc" != 0 -a "$rc" != 124 -a "$reason" -ge 1
    expect "h: ... and the same process ($pid_before) stays the active MainPID and serves, generation $generation" \
        test "$(main_pid restarter-reload)" = "$pid_before" -a "$(active_state restarter-reload)" = active \
        -a "$(pid_at "$rl_http_port")" = "$pid_before" -a "$(generation_at "$rl_http_port")" = "$generation"
    bad_reloads=()
    reload_times 1 "reload after the refusal"
    show "${bad_reloads[@]}"
    expect "h: with the configuration restored, the next reload succeeds (generation $generation)" \
        test "${#bad_reloads[@]}" = 0
    stop_load notify-reloads
    expect "h: keep-alive load across the reloads: $load_requests requests on $load_connections connections, $load_failed failed" \
        test "${load_failed:-x}" = 0 -a "${load_requests:-0}" -gt 0 -a "${load_connections:-0}" -gt "$reloads"
    c systemctl stop restarter-reload || true
    c systemctl log-level info
fi

# --- i: FileDescriptorStorePreserve=yes (systemd 254+): the store survives stop and start -------
if ((version >= 254)); then
    # The control socket's file must survive the stop too: its listener waits in the store.
    c tee /run/systemd/system/restarter.service.d/preserve.conf >/dev/null <<UNIT
[Service]
FileDescriptorStorePreserve=yes
RuntimeDirectoryPreserve=yes
UNIT
    c systemctl daemon-reload
    # Enabled, as a service in production is: under systemd 257 an inactive unit nothing refers
    # to is unloaded, and its store with it, whatever this setting says (systemd pull request
    # 41435 changed that later).
    c systemctl enable --runtime --quiet restarter
    c systemctl start restarter
    c systemctl restart restarter
    expect "i: with FileDescriptorStorePreserve=yes (unit enabled), restarter.service at generation 1" \
        test "$(generation_at "$http_port")" = 1
    c systemctl stop restarter
    kept=$(store_size restarter)
    expect "i: after systemctl stop the unit is inactive and its store kept ($kept entries)" \
        test "$(active_state restarter)" = inactive -a "${kept:-0}" -ge 4
    c systemctl start restarter
    status=$(shellflip_cli status --socket "$sock" 2>&1 || true)
    show "$(grep '^state on start' <<<"$status")"
    expect "i: systemctl start resumes (the policy): generation 2, the status names the state's generation and age" \
        test "$(generation_at "$http_port")" = 2 \
        -a "$(grep -c '^state on start: received from generation 1, written [0-9.]* s before this start$' <<<"$status")" = 1
    # The application's choice: a state older than it allows is not resumed.
    write_config 'max_state_age_secs = 1'
    c systemctl stop restarter
    sleep 1.5
    c systemctl start restarter
    write_config ""
    status=$(shellflip_cli status --socket "$sock" 2>&1 || true)
    show "$(grep '^state on start' <<<"$status")"
    expect "i: with max_state_age_secs = 1, a state kept 1.5 s is discarded: generation 0, the status says why, the listeners still serve" \
        test "$(generation_at "$http_port")" = 0 \
        -a "$(grep -c '^state on start: discarded: the state of generation 2 was written [0-9.]* s before this start, longer than the 1.0 s allowed' <<<"$status")" = 1
    c systemctl stop restarter
    c systemctl disable --runtime --quiet restarter
    c rm /run/systemd/system/restarter.service.d/preserve.conf
    c systemctl daemon-reload
fi

if ((failed > failed_before)); then
    echo "--- [$sd_label] journal of the units (last 80 lines) ---"
    c journalctl -u restarter -u restarter-forkexec -u restarter-reload -b --no-pager | tail -n 80
fi
echo "summary [$sd_label]: $((passed - passed_before)) passed, $((failed - failed_before)) failed, in $((SECONDS - started)) s"
container_shutdown
}

versions=${SHELLFLIP_SYSTEMD_VERSIONS:-252 257}
for v in $versions; do
    sd_label="systemd $v"
    case $v in
        252) root="" ;; # the machine's own
        257)
            if ! root=$(./scripts/systemd-root.sh); then
                fail "setup: cannot build the Debian 13 root with systemd 257 (see above)"
                continue
            fi
            ;;
        *)
            fail "setup: no systemd $v in the matrix (252, 257)"
            continue
            ;;
    esac
    suite "$v" "$root"
done

totals_printed=1
echo "$passed passed, $failed failed"
if ((failed > 0)); then exit 1; fi
