#!/usr/bin/env bash
# The systemd half of the `load` benchmark: the example service under a real systemd, in a
# throw-away container (scripts/container.sh; systemd never runs on the machine itself), with
# the example units of examples/systemd/ unchanged (a drop-in only sets the addresses and the
# log level). The load generator runs on the machine (the container shares its network) and
# restarts the service every 250 ms, in three ways:
#
#   systemd lifecycle, `systemctl restart restarter`           (listeners and state in the store)
#   systemd lifecycle, `shellflip restart` on the control socket (validated, then exit 75)
#   fork/exec lifecycle under systemd, `systemctl reload restarter-forkexec`
#
# Each restart command runs inside the container through nsenter and returns once the restart
# is done, so the restart latencies include starting nsenter and systemctl (a few ms).
#
#   scripts/bench-systemd.sh                 # 3 repeats of 70 restarts per way and mode
#   RESTARTS=20 REPEATS=1 scripts/bench-systemd.sh
#
# Needs root. Writes bench/results/load-systemd.md (and one SVG per way).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
# shellcheck source=scripts/container.sh
source scripts/container.sh
# shellcheck source=scripts/bench-systemd-setup.sh
source scripts/bench-systemd-setup.sh

RESTARTS=${RESTARTS:-70}
REPEATS=${REPEATS:-3}
CONNECTIONS=${CONNECTIONS:-16}

container_script_start bench-systemd

bench_systemd_setup bench-systemd

ns="nsenter -t $CONTAINER_PID -a"
run() {
    local name=$1 label=$2 port=$3 cmd=$4
    "$bench" --no-build external --addr "127.0.0.1:$port" --label "$label" --name "$name" \
        --restart-cmd "$cmd" --restarts "$RESTARTS" --repeats "$REPEATS" \
        --connections "$CONNECTIONS"
}
out=$repo/bench/results/load-systemd.md
{
    echo "Machine: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(nproc) cores, Linux $(uname -r); systemd $(c systemctl --version | head -1 | cut -d' ' -f2) in a container"
    echo
    run load-systemd-restart "systemd lifecycle, systemctl restart" "$http_port" \
        "$ns systemctl restart restarter"
    run load-systemd-control "systemd lifecycle, shellflip restart (control socket)" "$http_port" \
        "$ns /opt/t/bin/shellflip restart --socket /run/restarter/restarter.sock"
    run load-systemd-forkexec "fork/exec under systemd, systemctl reload" "$fe_http_port" \
        "$ns systemctl reload restarter-forkexec"
    echo "Store after the runs: $(c systemctl show -p NFileDescriptorStore --value restarter) descriptors; restarter.service $(c systemctl show -p ActiveState --value restarter), restarter-forkexec.service $(c systemctl show -p ActiveState --value restarter-forkexec)"
} | tee "$out"
echo "results written to $out" >&2
