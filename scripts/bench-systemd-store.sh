#!/usr/bin/env bash
# The systemd lifecycle measured from outside, in a throw-away container (scripts/container.sh;
# systemd never runs on the machine itself), with the example units of examples/systemd/
# unchanged (a drop-in sets the addresses, RUST_LOG=warn and, for the 10,000 echo clients, a
# descriptor limit: see below):
#
#   systemd-gap     `systemctl restart restarter` RESTARTS times while a probe on the machine
#                   opens a new connection to the HTTP port every millisecond: issued → READY=1,
#                   and the gap between the old process's last answer and the new one's first;
#                   the same probe across `systemctl reload restarter-forkexec` for comparison
#   systemd-store   0, 1,000 and 10,000 echo clients kept in systemd's store across
#                   STORE_RESTARTS `systemctl restart`s each; every client must echo after each
#
#   scripts/bench-systemd-store.sh
#   RESTARTS=60 STORE_RESTARTS=20 CLIENTS=0,1000,10000 scripts/bench-systemd-store.sh
#   SYSTEMD_ROOT=/var/cache/shellflip/debian13-systemd scripts/bench-systemd-store.sh
#
# SYSTEMD_ROOT=DIR boots the systemd of that root directory (a Debian 13 root for systemd 257,
# built by scripts/systemd-root.sh) instead of the machine's; DIR is never changed.
#
# Needs root. Writes bench/results/systemd-gap.md, systemd-gap-forkexec.md, systemd-store.md
# (with SYSTEMD_ROOT: systemd-gap-<version>.md, ... for systemd <version>).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/container.sh
source scripts/container.sh
# shellcheck source=scripts/bench-systemd-setup.sh
source scripts/bench-systemd-setup.sh

RESTARTS=${RESTARTS:-60}
STORE_RESTARTS=${STORE_RESTARTS:-20}
CLIENTS=${CLIENTS:-0,1000,10000}
# The service holds one descriptor per echo client while it serves them; systemd's default
# soft limit (1024) is too low for 1000. Only this test's drop-in raises it. (A container cannot
# go above the hard limit of the process that starts systemd-nspawn: the unit's limit is capped
# there, and the summary prints the limit the service really had.)
NOFILE=${NOFILE:-65536}

container_script_start bench-systemd-store

bench_systemd_setup bench-systemd-store
default_nofile=$(c systemctl show -p LimitNOFILE,LimitNOFILESoft restarter | tr '\n' ' ')
systemd_version=$(c systemctl --version | head -1)
suffix=""
if [[ -n ${SYSTEMD_ROOT:-} ]]; then
    suffix=-$(cut -d' ' -f2 <<<"$systemd_version")
fi
echo "under $systemd_version" >&2

systemctl_cmd="nsenter -t $CONTAINER_PID -a systemctl"
"$bench" --no-build systemd-gap --addr "127.0.0.1:$http_port" --systemctl "$systemctl_cmd" \
    --unit restarter --verb restart --restarts "$RESTARTS" \
    --name "systemd-gap$suffix" --systemd "$systemd_version"
"$bench" --no-build systemd-gap --addr "127.0.0.1:$fe_http_port" --systemctl "$systemctl_cmd" \
    --unit restarter-forkexec --verb reload --restarts "$RESTARTS" \
    --name "systemd-gap-forkexec$suffix" --systemd "$systemd_version"
c systemctl stop restarter-forkexec || true

echo "the unit's default descriptor limit: $default_nofile; raising it to $NOFILE in the test drop-in" >&2
c tee /run/systemd/system/restarter.service.d/nofile.conf >/dev/null <<CONF
[Service]
LimitNOFILE=$NOFILE
CONF
c systemctl daemon-reload
c systemctl restart restarter
"$bench" --no-build systemd-store --echo "127.0.0.1:$echo_port" --systemctl "$systemctl_cmd" \
    --unit restarter --clients "$CLIENTS" --restarts "$STORE_RESTARTS" \
    --name "systemd-store$suffix" --systemd "$systemd_version"
main_pid=$(c systemctl show -p MainPID --value restarter)
echo "the service's real descriptor limit: $(c grep 'open files' "/proc/$main_pid/limits" | tr -s ' ')" >&2
echo "journal warnings of restarter (last 20):" >&2
c journalctl -u restarter -b --no-pager -p warning | tail -n 20 >&2 || true
