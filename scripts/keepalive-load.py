#!/usr/bin/python3
"""Continuous HTTP/1.1 keep-alive load, counting every request that fails.

    keepalive-load.py HOST:PORT SUMMARY_FILE [STARTED_FILE]

Sends `GET /` back to back on one keep-alive connection, and opens a new connection when an
answer carries `Connection: close` (what a draining shellflip service answers) or after a
failure. A request fails when it cannot be sent, gets no complete answer within 10 s, or the
answer is not 200. STARTED_FILE, if given, is created after the first answer. Runs until
SIGTERM or SIGINT, then writes to SUMMARY_FILE:

    requests=N failed=M connections=C
    <one line per failure, at most 20>
"""

import http.client
import signal
import sys
import time

TIMEOUT_SECONDS = 10


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    summary_path = sys.argv[2]
    started_path = sys.argv[3] if len(sys.argv) > 3 else None
    stop = False

    def on_signal(_signum, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    requests = failed = connections = 0
    failures = []
    conn = None
    while not stop:
        if conn is None:
            conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_SECONDS)
            connections += 1
        requests += 1
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"status {response.status}: {body[:100]!r}")
            if started_path is not None:
                open(started_path, "w").close()
                started_path = None
            if response.will_close:
                conn.close()
                conn = None
        except Exception as e:  # every failure counts, whatever its kind
            failed += 1
            if len(failures) < 20:
                failures.append(f"{time.strftime('%H:%M:%S')} request {requests}: {e!r}")
            conn.close()
            conn = None
            time.sleep(0.01)
    with open(summary_path, "w") as f:
        f.write(f"requests={requests} failed={failed} connections={connections}\n")
        for line in failures:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
