"""An emulated network link for the benchmark: a TCP relay on loopback that delays every byte.

The relay listens on ``127.0.0.1`` and forwards each connection to the trunk server, holding each
chunk for half the round-trip time in each direction (order kept, many chunks in flight, no
bandwidth cap). It works below TLS and the channel, so every security mode crosses it unchanged.
The kernel's netem would do this per packet; it needs the ``sch_netem`` qdisc, which this project
cannot assume (it is a kernel module, and containers rarely may load one), so the relay is a
process of its own instead (this file run as a script, by :class:`._procs.LinkProcess`), started and
stopped by the benchmark, with its own interpreter: a relay thread in the device process would
share its GIL.

Its own cost is the asyncio event loop's timer resolution and one more loopback hop (about
0.1–0.3 ms on the machines we measured): the benchmark reports the added time per token against
the round trip it asked for, and the same run without the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

_CHUNK = 65536


async def _carry(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float, broken: asyncio.Event
) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay_s`` after it arrived; pass on the end of stream.
    A reset or failed write sets ``broken`` (the connection's other direction then ends too)."""
    loop = asyncio.get_running_loop()
    due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            when, data = await due.get()
            if when > loop.time():
                await asyncio.sleep(when - loop.time())
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(_CHUNK):
            due.put_nowait((loop.time() + delay_s, data))
        due.put_nowait((loop.time() + delay_s, b""))
        await delivering
    except (ConnectionError, OSError):
        delivering.cancel()
        broken.set()


async def _relay(listen_port: int, host: str, port: int, delay_s: float) -> None:
    async def connection(down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(host, port)
        except OSError:
            down_w.close()
            return
        broken = asyncio.Event()
        carries = [
            asyncio.create_task(_carry(r, w, delay_s, broken)) for r, w in ((down_r, up_w), (up_r, down_w))
        ]

        async def ended() -> None:
            await asyncio.gather(*carries)

        async def failed() -> None:
            await broken.wait()

        watches = [asyncio.create_task(ended()), asyncio.create_task(failed())]
        try:  # both directions to their end, or either broken
            await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in watches:
                task.cancel()
            for task in carries:
                task.cancel()
            for writer in (up_w, down_w):
                writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", listen_port)
    async with server:
        print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a loopback TCP relay that delays every byte")
    parser.add_argument("--to", required=True, help="HOST:PORT of the server")
    parser.add_argument("--rtt-ms", type=float, required=True, help="round trip to add, in milliseconds")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    if not host or not port.isdigit() or not 0 <= args.rtt_ms <= 10_000:
        parser.error("--to is HOST:PORT and --rtt-ms is 0..10000")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_relay(args.port, host, int(port), args.rtt_ms / 2000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
