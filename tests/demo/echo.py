"""Helpers for tests/demo/up: an echo server, a client that holds connections open, and a
reader of an L4Proxy's status. Standard library only."""

import asyncio
import json
import socket
import sys
import time


async def serve(port: int) -> None:
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def hold(port: int, count: int) -> None:
    connections = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        message = b"hello %d\n" % i
        s.sendall(message)
        if s.recv(64) != message:
            sys.exit("demo: the echo through the proxy did not come back")
        connections.append(s)
    print(f"demo: {count} round trips through the proxy echoed; holding the connections open", file=sys.stderr)
    while True:
        time.sleep(3600)


def status(require: bool) -> None:
    s = json.load(sys.stdin).get("status", {})
    conditions = {c["type"]: c for c in s.get("conditions", [])}
    listeners = s.get("listeners", [])
    if require:
        programmed = conditions.get("Programmed", {}).get("status") == "True"
        pooled = [l.get("poolStats", {}).get("size") for l in listeners] == [3]
        sys.exit(0 if programmed and s.get("proxies", {}).get("summary") == "1/1" and pooled else 1)
    print("conditions:")
    for c in conditions.values():
        print(f"  {c['type']:<10} {c['status']:<7} {c['reason']:<18} {c['message']}")
    print("proxies:   ", json.dumps(s.get("proxies")))
    for l in listeners:
        print(f"listener {l['name']}: backends {l['backends']}, poolStats {json.dumps(l.get('poolStats'))}, "
              f"accepted {l['accepted']}, bytes received {l['bytesReceived']}, sent {l['bytesSent']}")


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "serve":
        asyncio.run(serve(int(sys.argv[2])))
    elif command == "hold":
        hold(int(sys.argv[2]), int(sys.argv[3]))
    elif command == "status":
        status("--require" in sys.argv)
    else:
        sys.exit(f"unknown command {command}")
