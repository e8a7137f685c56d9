# Shared set-up of the systemd benchmarks (scripts/bench-systemd.sh, bench-systemd-store.sh).
# Source it after scripts/container.sh, from a script whose EXIT trap removes "$work" and calls
# container_shutdown.
#
#   bench_systemd_setup LABEL
#
# Builds the example, the CLI and the bench crate (unless NO_BUILD=1), copies the binaries and
# the example units unchanged into a temporary directory bound to /opt/t, boots the container
# (the machine's systemd, or with SYSTEMD_ROOT=DIR the systemd of that root directory, left
# unchanged: see container_boot),
# installs both units with a drop-in that only sets free addresses and RUST_LOG=warn, and starts
# them. Sets: target, bench, work, http_port, echo_port, fe_http_port, fe_echo_port; defines
# `c CMD...` to run a command in the container.

bench_systemd_setup() {
    local label=$1 unit
    if [[ ${NO_BUILD:-} != 1 ]]; then
        cargo build --release --all-features --example restarter --bin shellflip
        cargo build --release -p shellflip-bench
    fi
    target=$(cargo metadata --format-version 1 --no-deps |
        /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    bench=$target/release/shellflip-bench
    work=$(mktemp -d "${TMPDIR:-/tmp}/shellflip-$label.XXXXXX")
    chmod 755 "$work"
    mkdir "$work/bin"
    cp "$target/release/examples/restarter" "$target/release/shellflip" "$work/bin/"
    cp examples/systemd/restarter.service examples/systemd/restarter-forkexec.service "$work/"
    printf 'greeting = "%s"\n' "$label" >"$work/restarter.toml"

    read -r http_port echo_port fe_http_port fe_echo_port < <(/usr/bin/python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

    container_boot "shellflip-$label-$$" "$work" 60 "${SYSTEMD_ROOT:-}"
    for unit in restarter restarter-forkexec; do
        c cp "/opt/t/$unit.service" /run/systemd/system/
        c mkdir -p "/run/systemd/system/$unit.service.d"
    done
    c tee /run/systemd/system/restarter.service.d/bench.conf >/dev/null <<CONF
[Service]
Environment=HTTP=127.0.0.1:$http_port ECHO=127.0.0.1:$echo_port RUST_LOG=warn
CONF
    c tee /run/systemd/system/restarter-forkexec.service.d/bench.conf >/dev/null <<CONF
[Service]
Environment=HTTP=127.0.0.1:$fe_http_port ECHO=127.0.0.1:$fe_echo_port RUST_LOG=warn
CONF
    c systemctl daemon-reload
    c systemctl start restarter restarter-forkexec
}

c() { container_exec "$@"; }
