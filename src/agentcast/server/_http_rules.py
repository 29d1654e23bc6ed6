"""What the HTTP front decides, as pure functions: upgrade or not, bad targets, paging, log limits.

Rules of this module: pure, no I/O, no trio; every function is tested synchronously in
tests/test_server_http.py. The front (``_front``/``_app``) only reads bytes and writes answers.

The upgrade rule is the heart of it: a request agentcast hands to trio-websocket must be one
wsproto's server handshake (``wsproto/handshake.py``, ``_process_connection_request``) accepts,
or trio-websocket answers 400 itself and its handshake waiter never returns (a task and ~12 KB
left behind per request). wsproto accepts a request when, after h11 parsed it:

- the method is ``GET``;
- the *last* ``Connection`` header has an ``upgrade`` token (it decodes that header as ASCII);
- the *last* ``Sec-WebSocket-Version`` is exactly ``13`` (else 426, or 400 when missing);
- a ``Sec-WebSocket-Key`` is present (any value; it hashes the joined values in its answer);
- the *last* ``Upgrade`` header is exactly ``websocket`` (case-insensitive; ``websocket, h2c``
  is refused);
- a ``Host`` is present and decodes as IDNA (an exception other than its own error otherwise);
- ``Sec-WebSocket-Protocol`` and ``Sec-WebSocket-Extensions`` decode as ASCII (same).

:func:`decide_upgrade` accepts a strict subset of that: one of each of those headers, the key
a base64 nonce of 16 bytes (RFC 6455 4.2.1), HTTP/1.1 (RFC 6455 4.1; h11 also parses 1.0, and
an HTTP/1.0 request carries no reliable ``Host``), and no request body.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping, Sequence
from typing import Final
from urllib.parse import urlsplit

import attrs

__all__ = [
    "ALLOW",
    "MAX_STATS_PAGE",
    "LogLimiter",
    "NotUpgrade",
    "Refusal",
    "Upgrade",
    "check_target",
    "decide_upgrade",
    "stats_page",
]

#: Methods the HTTP endpoints answer; sent as ``Allow`` with every 405.
ALLOW: Final = "GET, HEAD"
#: The WebSocket version wsproto speaks (RFC 6455).
WEBSOCKET_VERSION: Final = "13"
#: Bytes of a ``Sec-WebSocket-Key`` nonce once base64-decoded (RFC 6455 4.1).
KEY_BYTES: Final = 16
#: Most users one ``/stats?users=1`` page lists; a larger ``limit`` is capped to it.
MAX_STATS_PAGE: Final = 100
#: A ``%`` not followed by two hex digits.
_BAD_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")

Headers = Sequence[tuple[str, str]]


@attrs.frozen
class Upgrade:
    """A WebSocket handshake wsproto will accept: hand it to authorization."""


@attrs.frozen
class NotUpgrade:
    """Not a WebSocket request: answer it as plain HTTP."""


@attrs.frozen
class Refusal:
    """Answer ``status`` with ``message`` (and ``headers``) and close; nothing is upgraded."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


def _values(headers: Headers, name: str) -> list[str]:
    return [value for key, value in headers if key == name]


def _tokens(value: str) -> list[str]:
    return [token.strip().lower() for token in value.split(",") if token.strip()]


def decide_upgrade(
    method: str, http_version: str, headers: Headers
) -> Upgrade | NotUpgrade | Refusal:
    """Decide whether a parsed request head is a WebSocket handshake wsproto will accept.

    A request is a WebSocket attempt when any ``Upgrade`` header names ``websocket``; other
    requests (``Upgrade: h2c`` included) are plain HTTP. An attempt that breaks one of the rules
    in this module's docstring is refused here, before trio-websocket sees it.

    Args:
        method: the request method, e.g. ``"GET"``.
        http_version: ``"1.1"`` or ``"1.0"`` (what h11 parsed).
        headers: (lowercase name, latin-1 decoded value) pairs, in request order.
    """
    upgrades = _values(headers, "upgrade")
    if not any("websocket" in _tokens(value) for value in upgrades):
        return NotUpgrade()
    if method != "GET":
        return Refusal(405, "a WebSocket upgrade must be a GET", (("Allow", ALLOW),))
    if http_version != "1.1":
        return Refusal(400, "a WebSocket upgrade needs HTTP/1.1")
    if len(upgrades) != 1 or upgrades[0].strip().lower() != "websocket":
        return Refusal(400, "a WebSocket upgrade needs exactly one header 'Upgrade: websocket'")
    connections = _values(headers, "connection")
    if len(connections) != 1 or "upgrade" not in _tokens(connections[0]):
        return Refusal(400, "a WebSocket upgrade needs one Connection header with 'Upgrade'")
    versions = _values(headers, "sec-websocket-version")
    version_hint = (("Sec-WebSocket-Version", WEBSOCKET_VERSION),)
    if not versions:
        return Refusal(400, "missing Sec-WebSocket-Version (send 13)", version_hint)
    if versions != [WEBSOCKET_VERSION]:
        return Refusal(426, "only WebSocket version 13 is supported", version_hint)
    keys = _values(headers, "sec-websocket-key")
    if len(keys) != 1 or not _is_nonce(keys[0]):
        return Refusal(400, "Sec-WebSocket-Key must be one base64-encoded 16-byte nonce")
    hosts = _values(headers, "host")
    if len(hosts) != 1 or not _is_idna(hosts[0]):
        return Refusal(400, "a WebSocket upgrade needs exactly one valid Host header")
    for name in ("connection", "sec-websocket-protocol", "sec-websocket-extensions"):
        if not all(value.isascii() for value in _values(headers, name)):
            return Refusal(400, f"the {name} header must be ASCII")
    lengths = _values(headers, "content-length")
    if _values(headers, "transfer-encoding") or any(value.strip() != "0" for value in lengths):
        return Refusal(400, "a WebSocket upgrade carries no request body")
    return Upgrade()


def _is_nonce(value: str) -> bool:
    try:
        return len(base64.b64decode(value.strip(), validate=True)) == KEY_BYTES
    except (binascii.Error, ValueError):
        return False


def _is_idna(value: str) -> bool:
    try:
        value.encode("latin-1").decode("idna")
    except UnicodeError:
        return False
    return True


def check_target(target: str) -> str | None:
    """Why a request target cannot be served (a short message), or None if it can.

    h11 checks the characters; this checks what agentcast parses later: the URL split (an
    unclosed ``[`` of an IPv6 host raises there) and percent-escapes.
    """
    try:
        urlsplit(target)
    except ValueError:
        return "the request target is not a valid URL"
    if _BAD_PERCENT.search(target):
        return "the request target has a malformed percent-escape"
    return None


def stats_page(query: Mapping[str, list[str]]) -> tuple[int, int] | str:
    """``(offset, limit)`` of the per-user page ``/stats?users=1&offset=N&limit=M`` asks for,
    or a message saying what is wrong. ``limit`` defaults to and is capped at
    :data:`MAX_STATS_PAGE`."""
    values: dict[str, int] = {}
    for name, default in (("offset", 0), ("limit", MAX_STATS_PAGE)):
        given = query.get(name, [str(default)])[-1]
        if not given.isdigit() or len(given) > 9:
            return f"{name} must be a non-negative integer, got {given[:20]!r}"
        values[name] = int(given)
    return values["offset"], max(1, min(values["limit"], MAX_STATS_PAGE))


@attrs.define
class LogLimiter:
    """At most ``limit`` log lines per ``period`` seconds; counts the ones it holds back.

    ``admit(now)`` returns whether to log this line and how many lines were held back in the
    windows since the last admitted one, so the caller can report that count first.
    """

    limit: int
    period: float
    _window_start: float = -math.inf
    _logged: int = 0
    _held_back: int = 0

    def admit(self, now: float) -> tuple[bool, int]:
        """Decide one line at time ``now`` (seconds on any monotonic clock)."""
        if now - self._window_start >= self.period:
            self._window_start, self._logged = now, 0
        if self._logged >= self.limit:
            self._held_back += 1
            return False, 0
        self._logged += 1
        held_back, self._held_back = self._held_back, 0
        return True, held_back
