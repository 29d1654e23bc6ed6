"""The HTTP front: read one request head with h11, answer plain HTTP, hand upgrades onward.

trio-websocket answers a non-upgrade request with 400 before any handler runs, so every TCP
connection starts here. The head is read under a deadline and a size limit (slowloris, garbage
and oversized headers end here); an upgrade request is replayed into trio-websocket through
:class:`PrefixedStream` so its handshake sees the exact bytes the client sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Final
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

__all__ = ["PrefixedStream", "RequestHead", "read_request_head", "send_response"]

#: Bytes read from the socket per call while reading a head.
READ_CHUNK: Final = 4096


@attrs.frozen
class RequestHead:
    """A parsed HTTP request line and headers (names lowercased)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    #: Every byte read from the socket so far, to replay into the WebSocket handshake.
    raw: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_tokens(self, name: str) -> list[str]:
        """Comma-separated values of every ``name`` header, stripped and lowercased."""
        return [
            token.strip().lower()
            for key, value in self.headers if key == name
            for token in value.split(",") if token.strip()
        ]

    @property
    def is_websocket_upgrade(self) -> bool:
        return "websocket" in self.header_tokens("upgrade") and "upgrade" in self.header_tokens(
            "connection"
        )


class HeadError(Exception):
    """The request head could not be read; ``status`` is what to answer (0: just close)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_request_head(stream: trio.abc.Stream, *, max_bytes: int) -> RequestHead:
    """Read one request head of at most ``max_bytes``; the caller bounds the time.

    Raises:
        HeadError: 400 for garbage, 431 for an oversized head, 0 when the peer went away.
    """
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=max_bytes)
    raw = bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            status = 431 if len(raw) >= max_bytes else 400
            raise HeadError(status, f"bad request: {exc}") from None
        if isinstance(event, h11.Request):
            # h11 bounds an incomplete head only; one that arrived whole is checked here.
            if raw.find(b"\r\n\r\n") + 4 > max_bytes:
                raise HeadError(431, f"request head larger than {max_bytes} bytes")
            headers = tuple(
                (name.decode("latin-1").lower(), value.decode("latin-1"))
                for name, value in event.headers
            )
            return RequestHead(
                event.method.decode("ascii"), event.target.decode("latin-1"), headers, bytes(raw)
            )
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise HeadError(0, "connection lost") from None
            if not data:
                raise HeadError(0, "connection closed before a request")
            raw += data
            parser.receive_data(bytes(data))
        else:  # pragma: no cover - h11 yields nothing else before a Request
            raise HeadError(400, "unexpected request")


async def send_response(
    stream: trio.abc.Stream,
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    extra_headers: Sequence[tuple[str, str]] = (),
) -> None:
    """Write a complete ``Connection: close`` response; the caller closes the stream."""
    reasons = {
        200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
        404: "Not Found", 405: "Method Not Allowed", 426: "Upgrade Required",
        429: "Too Many Requests", 431: "Request Header Fields Too Large",
        503: "Service Unavailable",
    }
    head = [
        f"HTTP/1.1 {status} {reasons.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
        *(f"{name}: {value}" for name, value in extra_headers),
    ]
    payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(payload)  # a client that left needs no answer


@attrs.define(eq=False)
class PrefixedStream(trio.abc.Stream):
    """A stream that first returns ``prefix`` (bytes already read), then reads ``inner``."""

    inner: trio.abc.Stream
    prefix: bytes

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            size = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:size], self.prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()
