"""Flooder process of the ``floods`` scenario: hostile clients below the message level.

Run as ``python -m benchmarks.flooder``; it reads one JSON spec line on stdin (``port``,
``tokens``: one per flooding connection, ``kinds``: the flood of each connection, ``lifetime``),
opens every connection, prints ``{"flooding": ...}``, floods until ``stop`` (or end of stdin),
then prints ``{"flood": totals}`` and exits. Targets 127.0.0.1 only; SIGALRM ends it after
``lifetime`` seconds at the latest.

Kinds (raw frames over asyncio streams, masked as RFC 6455 requires):

- ``fragments``: one allowed 64 KiB text message as 65 536 one-byte fragments, in one write;
  the server closes past its fragment cap, and the flooder reconnects and starts again;
- ``pings``: pings as fast as the socket takes them; closed past the control-frame burst,
  then reconnects;
- ``tiny-frames``: 19 messages a second (the message rate is 20/s), each a small ``ping``
  split into 64 one-byte fragments (the cap): ~1 200 frames/s offered, within every limit but
  the frame rate, which reads them later (200 frames/s by default); answered, never closed.

A flooder closes its TCP connection as soon as it sees the server's close frame, without
answering it, as an attacker would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import struct
import sys
import threading
from collections import Counter
from contextlib import suppress
from typing import Any, Final

#: Messages per second of the ``tiny-frames`` flood: just under agentcast's default rate (20).
TINY_RATE: Final = 19.0
#: Fragments per message of the ``tiny-frames`` flood: agentcast's default cap.
TINY_FRAGMENTS: Final = 64
#: Pings per write of the ``pings`` flood.
PINGS_PER_WRITE: Final = 1000
#: Seconds a handshake or a close may take before the flooder gives up on that connection.
STEP_TIMEOUT: Final = 10.0
MASK: Final = b"\x11\x22\x33\x44"


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client frame (payloads here are under 126 bytes)."""
    assert len(payload) < 126
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + MASK + masked


def fragmented(message: bytes) -> bytes:
    """``message`` as one-byte fragments."""
    last = len(message) - 1
    return b"".join(
        frame(0x1 if i == 0 else 0x0, message[i:i + 1], fin=i == last) for i in range(len(message))
    )


FRAGMENT_FLOOD: Final = fragmented(b'{"type": "ping", "pad": "' + b"x" * (65536 - 27) + b'"}')
PING_FLOOD: Final = frame(0x9, b"p") * PINGS_PER_WRITE
TINY_MESSAGE: Final = fragmented(
    b'{"type": "ping", "pad": "' + b"x" * (TINY_FRAGMENTS - 27) + b'"}'
)


class Totals:
    def __init__(self) -> None:
        self.opened = 0
        self.refused = 0
        self.errors = 0
        self.bytes_sent = 0
        self.close_codes: Counter[int] = Counter()


async def read_until_close(reader: asyncio.StreamReader) -> int:
    """Skip the server's frames until its close frame; its code (1006 if TCP ended first)."""
    try:
        while True:
            first, second = await reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await reader.readexactly(8))
            payload = await reader.readexactly(length)
            if first & 0x0F == 0x8:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005
    except (asyncio.IncompleteReadError, OSError):
        return 1006


async def flood(writer: asyncio.StreamWriter, kind: str, totals: Totals) -> None:
    """Send ``kind``'s flood until cancelled or the socket breaks."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = 0
    while True:
        if kind == "fragments":
            chunk = FRAGMENT_FLOOD
        elif kind == "pings":
            chunk = PING_FLOOD
        else:
            sent += 1
            chunk = TINY_MESSAGE
            await asyncio.sleep(max(0.0, started + sent / TINY_RATE - loop.time()))
        writer.write(chunk)
        await writer.drain()
        totals.bytes_sent += len(chunk)


async def one_connection(spec: dict[str, Any], token: str, kind: str, totals: Totals,
                         opened: asyncio.Event) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", spec["port"]), STEP_TIMEOUT
    )
    try:
        writer.write(head)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
        if not answer.startswith(b"HTTP/1.1 101"):
            totals.refused += 1
            await asyncio.sleep(0.1)  # e.g. 429 while the server still counts the last one
            return
        totals.opened += 1
        opened.set()
        sender = asyncio.ensure_future(flood(writer, kind, totals))
        try:
            code = await read_until_close(reader)
        finally:
            sender.cancel()
            with suppress(asyncio.CancelledError, OSError, ConnectionError):
                await sender
        totals.close_codes[code] += 1
    finally:
        writer.transport.abort()  # no close reply, no lingering: as an attacker would


async def keep_flooding(spec: dict[str, Any], token: str, kind: str, totals: Totals,
                        opened: asyncio.Event) -> None:
    """One flooding client: reconnect each time the server closes it."""
    while True:
        try:
            await one_connection(spec, token, kind, totals, opened)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            totals.errors += 1
            await asyncio.sleep(0.1)


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def main() -> None:
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        loop.call_soon_threadsafe(lines.put_nowait, "stop")

    threading.Thread(target=pump, daemon=True).start()
    spec = json.loads(await lines.get())
    signal.alarm(int(spec.get("lifetime", 600)))
    totals = Totals()
    events = [asyncio.Event() for _ in spec["tokens"]]
    tasks = [
        asyncio.ensure_future(keep_flooding(spec, token, kind, totals, event))
        for token, kind, event in zip(spec["tokens"], spec["kinds"], events, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in events)), 60)
    emit({"flooding": {"connections": len(tasks)}})
    while await lines.get() != "stop":
        pass
    for task in tasks:
        task.cancel()
    _done, stuck = await asyncio.wait(tasks, timeout=STEP_TIMEOUT)
    emit({"flood": {
        "stuck": len(stuck),
        "opened": totals.opened, "refused": totals.refused, "errors": totals.errors,
        "bytes_sent": totals.bytes_sent,
        "close_codes": {str(code): n for code, n in sorted(totals.close_codes.items())},
    }})


if __name__ == "__main__":
    asyncio.run(main())
