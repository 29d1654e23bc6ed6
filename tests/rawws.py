"""A deliberately minimal WebSocket client over a raw trio socket, for faults no well-behaved
client library will produce: invalid UTF-8, oversize fragments, a peer that stops reading or
never answers pings, a TCP reset."""

from __future__ import annotations

import base64
import os
import socket
import struct
from typing import Final

import attrs
import trio

TEXT: Final = 0x1
BINARY: Final = 0x2
CONTINUATION: Final = 0x0
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@attrs.define
class RawClient:
    """One raw connection; every read is bounded by the caller's cancel scope."""

    stream: trio.SocketStream
    _buffer: bytearray = attrs.Factory(bytearray)

    @classmethod
    async def open(
        cls, port: int, token: str, *, receive_buffer: int | None = None,
        subprotocol: str | None = None,
    ) -> RawClient:
        """Connect and complete the handshake (``receive_buffer`` shrinks SO_RCVBUF first;
        ``subprotocol`` is offered, e.g. ``agentcast.ndjson`` for batches)."""
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        client = cls(trio.SocketStream(sock))
        key = base64.b64encode(os.urandom(16)).decode()
        offer = "" if subprotocol is None else f"Sec-WebSocket-Protocol: {subprotocol}\r\n"
        await client.stream.send_all(
            f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{offer}\r\n".encode()
        )
        head = await client._read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return client

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise EOFError("the server closed the TCP connection")
        self._buffer += chunk

    async def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            await self._fill()
        end = self._buffer.index(marker) + len(marker)
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        return data

    async def _read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            await self._fill()
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def send(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        await self.stream.send_all(encode_frame(opcode, payload, fin=fin))

    async def read_frame(self) -> tuple[int, bytes]:
        """The next data or close frame as (opcode, payload), answering pings on the way
        (a client that reads is alive); our server never fragments."""
        while True:
            first, second = await self._read_exactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self._read_exactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self._read_exactly(8))
            opcode, payload = first & 0x0F, await self._read_exactly(length)
            if opcode != PING:
                return opcode, payload
            await self.send(PONG, payload)

    async def close_code(self) -> tuple[int, bytes]:
        """Read (ignoring data frames) until the server's close frame: (code, reason)."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if payload else 1005
                await self.send(CLOSE, payload[:2])  # complete the close handshake
                return code, payload[2:]

    async def reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed peer or NAT would."""
        self.stream.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.stream.socket.close()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
