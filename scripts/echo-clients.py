#!/usr/bin/env python3
"""Many clients of the example's echo port, held open and driven from standard input.

    echo-clients.py HOST:PORT N

Connects N clients (each reads its greeting), prints "connected N", then reads commands, one
per line, and answers each with one line:

    check TAG   every open client sends "TAG i" and must read it back: "echoed K of M"
    reset K     the first K open clients close with a reset (SO_LINGER 0): "reset K"
    close K     the next K open clients close normally: "closed K"

Used by scripts/systemd-test.sh (clients kept in systemd's store across restarts).
"""
import resource
import socket
import struct
import sys


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    n = int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    clients = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=10)
        f = s.makefile("rb")
        f.readline()
        clients.append((s, f))
    print("connected", n, flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "check":
            for i, (s, _) in enumerate(clients):
                try:
                    s.sendall(f"{arg} {i}\n".encode())
                except OSError:
                    pass
            ok = 0
            for i, (s, f) in enumerate(clients):
                try:
                    if f.readline() == f"{arg} {i}\n".encode():
                        ok += 1
                except OSError:
                    pass
            print("echoed", ok, "of", len(clients), flush=True)
        elif cmd in ("reset", "close"):
            k = int(arg)
            gone, clients = clients[:k], clients[k:]
            for s, f in gone:
                if cmd == "reset":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                f.close()
                s.close()
            print("reset" if cmd == "reset" else "closed", k, flush=True)
        else:
            print("unknown command", cmd, flush=True)


if __name__ == "__main__":
    main()
