#!/usr/bin/env python3
"""Echo server and idle-connection holder for the per-connection memory benchmark.

    conns.py echo --port P
        Echo server on 127.0.0.1:P (everything read is written back). Prints "LISTENING"
        once bound.

    conns.py hold --port P --count N [--payload 16] [--parallel 256] [--timeout 120] [--hold-max 600]
        Opens N connections to 127.0.0.1:P; on each, sends `payload` bytes and reads the
        echo back (so every connection has carried data both ways through the proxy), then
        leaves it idle. Prints "READY <N>" once all N are open and verified, then holds them
        until SIGTERM/SIGINT (or --hold-max seconds), and closes them. Exits non-zero if any
        connection fails or setup exceeds --timeout seconds.

Standard library only (python3 >= 3.8).
"""

import argparse
import asyncio
import os
import signal
import sys


async def echo_server(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096, reuse_address=True)
    print("LISTENING", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


async def open_one(port: int, payload: bytes, sem: asyncio.Semaphore, io_timeout: float):
    async with sem:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), io_timeout)
        writer.write(payload)
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), io_timeout)
        if echoed != payload:
            raise RuntimeError("echo mismatch")
        return reader, writer


async def hold(port: int, count: int, payload_len: int, parallel: int, timeout: float, hold_max: float) -> int:
    payload = os.urandom(payload_len)
    sem = asyncio.Semaphore(parallel)
    tasks = [asyncio.ensure_future(open_one(port, payload, sem, 15.0)) for _ in range(count)]
    try:
        done = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    except Exception as exc:  # noqa: BLE001 - report any failure and exit non-zero
        ok = sum(1 for t in tasks if t.done() and not t.cancelled() and t.exception() is None)
        print(f"FAILED after {ok}/{count} connections: {exc!r}", file=sys.stderr, flush=True)
        for t in tasks:
            t.cancel()
        return 1
    print(f"READY {len(done)}", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    loop.call_later(hold_max, stop.set)
    await stop.wait()
    lost = 0
    for reader, writer in done:
        if reader.at_eof():
            lost += 1
        writer.close()
    if lost:
        print(f"WARNING {lost} connections were closed by the peer while idle", file=sys.stderr, flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--port", type=int, required=True)
    h = sub.add_parser("hold")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--count", type=int, required=True)
    h.add_argument("--payload", type=int, default=16)
    h.add_argument("--parallel", type=int, default=256)
    h.add_argument("--timeout", type=float, default=120.0)
    h.add_argument("--hold-max", type=float, default=600.0)
    args = parser.parse_args()
    if args.cmd == "echo":
        asyncio.run(echo_server(args.port))
        return 0
    return asyncio.run(hold(args.port, args.count, args.payload, args.parallel, args.timeout, args.hold_max))


if __name__ == "__main__":
    sys.exit(main())
