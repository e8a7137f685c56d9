#!/usr/bin/env bash
# Runs the example service and shows restarts happening: GET / goes from generation 0 to 1
# to 2 on the same port, a bad configuration is refused with its parse error while the old
# generation keeps serving, and the service stops cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

HTTP=${HTTP:-127.0.0.1:8080}
ECHO=${ECHO:-127.0.0.1:8081}
dir=$(mktemp -d)
sock=$dir/restarter.sock
config=$dir/restarter.toml
bin=target/release/examples/restarter
pid=

cleanup() {
  # Stop the generation serving now (SIGTERM: drain, then exit) and remove the temp dir.
  if [ -S "$sock" ]; then
    serving=$("$bin" status --socket "$sock" 2>/dev/null | sed -n 's/^pid: //p' || true)
    [ -n "$serving" ] && kill -TERM "$serving" 2>/dev/null || true
  fi
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  sleep 0.5
  rm -rf "$dir"
}
trap cleanup EXIT

get() { # GET / over bash's /dev/tcp: no curl needed
  exec 3<>"/dev/tcp/${HTTP%:*}/${HTTP##*:}"
  printf 'GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n' >&3
  tail -n 1 <&3
  exec 3<&-
}

echo "== building the example (release)"
cargo build --release --features hyper --example restarter

echo 'greeting = "hello from the first configuration"' >"$config"
echo "== starting: restarter --http $HTTP --echo $ECHO --socket $sock --config $config"
"$bin" --http "$HTTP" --echo "$ECHO" --socket "$sock" --config "$config" 2>"$dir/log" &
pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
sleep 0.2
echo "GET /  ->  $(get)"

echo "== restart through the control socket"
echo "new PID: $("$bin" restart --socket "$sock")"
echo "GET /  ->  $(get)"

echo 'greeting = "hello from the second configuration"' >"$config"
echo "== new configuration, restart again"
echo "new PID: $("$bin" restart --socket "$sock")"
echo "GET /  ->  $(get)"

echo 'greeting = "unterminated' >"$config"
echo "== a configuration that does not parse: the restart is refused"
"$bin" restart --socket "$sock" || echo "(restart exited with status $?)"
echo "GET /  ->  $(get)   (the old generation still serves)"

echo "== status"
"$bin" status --socket "$sock"
