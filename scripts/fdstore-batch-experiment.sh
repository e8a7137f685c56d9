#!/usr/bin/env bash
# Does systemd store descriptors faster when one FDSTORE=1 message carries many of them?
#
# In a throw-away container (scripts/container.sh; systemd never runs on the machine itself), a
# small Type=notify service (Python, no shellflip) opens N TCP sockets, says READY=1, waits
# 0.5 s, then sends them all to systemd's store, PER descriptors per FDSTORE=1 message (1, or
# 253: the most one message can carry). The time until `systemctl show -p NFileDescriptorStore`
# reaches N, less the 0.5 s pause, is how long systemd took to store them.
#
#   scripts/fdstore-batch-experiment.sh
#   NS="1000 3000" PERS="1 253" scripts/fdstore-batch-experiment.sh
#
# Needs root and /usr/bin/python3. Prints one line per (N, PER).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/container.sh
source scripts/container.sh

NS=${NS:-1000 3000}
PERS=${PERS:-1 253}

container_script_start fdstore-batch-experiment
work=$(mktemp -d "${TMPDIR:-/tmp}/shellflip-fdbatch.XXXXXX")
chmod 755 "$work"
cat >"$work/storer.py" <<'PY'
import array, os, socket, sys, time
n, per = int(sys.argv[1]), int(sys.argv[2])
socks = [socket.socket() for _ in range(n)]
addr = os.environ["NOTIFY_SOCKET"]
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.connect("\0" + addr[1:] if addr.startswith("@") else addr)
notify.send(b"READY=1")
time.sleep(0.5)
for i in range(0, n, per):
    fds = array.array("i", [s.fileno() for s in socks[i:i + per]])
    notify.sendmsg([f"FDSTORE=1\nFDNAME=b{i // per}\nFDPOLL=0".encode()],
                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
time.sleep(3600)
PY
container_boot "shellflip-fdbatch-$$" "$work"
c() { container_exec "$@"; }
echo "under $(c systemctl --version | head -1)"
for n in $NS; do
    for per in $PERS; do
        c tee /run/systemd/system/storer.service >/dev/null <<UNIT
[Service]
Type=notify
ExecStart=/usr/bin/python3 -u /opt/t/storer.py $n $per
FileDescriptorStoreMax=65536
LimitNOFILE=65536
UNIT
        c systemctl daemon-reload
        if ! c systemctl start storer; then
            c journalctl -u storer -b --no-pager -n 20 >&2
            exit 1
        fi
        t0=$(date +%s%N)
        until [[ $(c systemctl show -p NFileDescriptorStore --value storer) -ge $n ]]; do
            sleep 0.02
        done
        t1=$(date +%s%N)
        echo "$n descriptors, $per per message ($(((n + per - 1) / per)) messages): stored in $(((t1 - t0) / 1000000 - 500)) ms"
        c systemctl stop storer
    done
done
