"""The HTTP front: read one request head with h11, answer plain HTTP, hand upgrades onward.

Every TCP connection starts here. The head is read under a deadline and a size limit
(slowloris, garbage and oversized headers end here) and parsed once: an upgrade is answered
from this parse (``_wsstate.accept_response``), and bytes the client sent after its head are
its first WebSocket frames (``RequestHead.raw``).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
from collections.abc import Sequence
from typing import Final
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from ._http_rules import Upgrade, check_target, decide_upgrade
from ._settings import HTTP_WRITE_TIMEOUT

__all__ = ["RequestHead", "abort_stream", "read_request_head", "send_response"]

#: Bytes read from the socket per call while reading a head.
READ_CHUNK: Final = 4096
#: The client bytes h11 quotes at the end of its error messages (``: bytearray(b'...')``).
_QUOTED_INPUT: Final = re.compile(r":\s*(?:bytearray\()?b['\"].*$", re.DOTALL)
#: ``SO_LINGER`` on, zero seconds: close with a reset, dropping unsent bytes at once.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


@attrs.frozen
class RequestHead:
    """A parsed HTTP request line and headers (names lowercased)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    #: Every byte read from the socket so far (after the head: a client's first frames).
    raw: bytes
    #: ``"1.1"`` or ``"1.0"``.
    http_version: str = "1.1"

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
        """Whether this is a WebSocket handshake wsproto accepts (see ``decide_upgrade``)."""
        return isinstance(decide_upgrade(self.method, self.http_version, self.headers), Upgrade)


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
            # h11 quotes the offending line, which may hold a token: never echo or log it.
            reason = _QUOTED_INPUT.sub("", str(exc))
            raise HeadError(status, f"bad request: {reason}") from None
        if isinstance(event, h11.Request):
            # h11 bounds an incomplete head only; one that arrived whole is checked here.
            if raw.find(b"\r\n\r\n") + 4 > max_bytes:
                raise HeadError(431, f"request head larger than {max_bytes} bytes")
            target = event.target.decode("latin-1")
            problem = check_target(target)
            if problem is not None:
                raise HeadError(400, f"bad request: {problem}")
            headers = tuple(
                (name.decode("latin-1").lower(), value.decode("latin-1"))
                for name, value in event.headers
            )
            return RequestHead(
                event.method.decode("ascii"), target, headers, bytes(raw),
                event.http_version.decode("ascii"),
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
    head_only: bool = False,
    write_timeout: float = HTTP_WRITE_TIMEOUT,
) -> bool:
    """Write a complete ``Connection: close`` response within ``write_timeout`` seconds.

    ``head_only`` (an answer to ``HEAD``) sends the headers, with the ``Content-Length`` of
    ``body``, and no body. A write that does not finish in time (a client that stopped reading)
    may have sent part of the answer, so the stream is aborted (see :func:`abort_stream`):
    nothing of it stays buffered or open. Otherwise the caller closes the stream.

    Returns:
        True if the whole answer was written; False if the client left or was cut off.
    """
    reasons = {
        200: "OK", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
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
    payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    if not head_only:
        payload += body
    with trio.move_on_after(write_timeout) as deadline:
        try:
            await stream.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False  # a client that left needs no answer
    if deadline.cancelled_caught:
        await abort_stream(stream)
        return False
    return True


async def abort_stream(stream: trio.abc.Stream) -> None:
    """Close ``stream`` at once; a TCP socket is reset so the kernel drops what it still holds
    for a peer that does not read (a plain close would keep those bytes until TCP gives up)."""
    if isinstance(stream, trio.SocketStream):
        # Already closed or not TCP: closing below is all there is to do.
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    await trio.aclose_forcefully(stream)
