"""The client protocol: close codes, inbound frame parsing and outbound control frames.

Rules of this module: pure functions, no I/O, no trio. Parsing turns text into one of the frame
values below or raises :class:`ProtocolError`, which carries the error code the client sees and,
when the fault ends the connection, the close code.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Final

import attrs
import orjson

from ._errors import InvalidIdentifier
from ._ids import check_id
from ._run_history import ActiveRun

__all__ = [
    "BATCH_SUBPROTOCOL",
    "PLAIN_SUBPROTOCOL",
    "CancelRun",
    "ClientFrame",
    "CloseCode",
    "CustomFrame",
    "Ping",
    "ProtocolError",
    "Refresh",
    "Subscribe",
    "Unsubscribe",
    "error_frame",
    "parse_client_frame",
    "pong_frame",
    "refreshed_frame",
    "subscribed_frame",
    "token_expiring_frame",
    "unsubscribed_frame",
]

#: The WebSocket subprotocol a client offers to receive newline-delimited batches.
BATCH_SUBPROTOCOL: Final = "agentcast.ndjson"
#: The WebSocket subprotocol of the plain protocol (one frame per message), for clients that
#: must offer a subprotocol (browsers sending ``bearer.<token>``) but do not batch.
PLAIN_SUBPROTOCOL: Final = "agentcast.v1"
#: Longest close reason allowed by RFC 6455 (the close frame payload is at most 125 bytes).
MAX_CLOSE_REASON_BYTES: Final = 123
#: Deepest nesting of arrays and objects accepted in a client frame (the frame object itself
#: is level 1). orjson parses far deeper structures than it can encode again (its encoder
#: stops at 255 levels), so a deeper frame is refused at parse time with ``bad_frame``.
MAX_FRAME_DEPTH: Final = 32
#: The message of the ``bad_frame`` error sent when a reply built from client data (a pong's
#: id, an error message echoing an id) cannot be encoded.
UNENCODABLE_REPLY: Final = "the answer to this frame could not be encoded; send plain JSON values"


class CloseCode(enum.IntEnum):
    """WebSocket close codes agentcast sends, documented in ``docs/protocol.md``."""

    NORMAL = 1000
    #: Server shutting down or session closed; reconnect and resume.
    GOING_AWAY = 1001
    #: A frame broke RFC 6455 (unmasked, reserved bits, unknown opcode, bad fragmentation or
    #: control frame); the standalone server sends it before dropping the connection.
    PROTOCOL_ERROR = 1002
    #: Binary frame where text JSON is expected.
    UNSUPPORTED_DATA = 1003
    #: Invalid UTF-8 in a text frame.
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    #: Inbound frame larger than ``Config.max_message_bytes``.
    MESSAGE_TOO_BIG = 1009
    #: A fault inside this user's session; the user's other sessions are unaffected.
    INTERNAL_ERROR = 1011
    #: The server lost its Redis backplane (scale-out mode) and may have missed live events;
    #: reconnect (with backoff) and resume with ``since_seq``.
    SERVICE_RESTART = 1012
    #: The client did not keep up (queue full or a write past ``Config.write_timeout``);
    #: reconnect and resume with ``since_seq``.
    SLOW_CONSUMER = 4008
    #: The token's ``exp`` (plus the leeway) passed without a valid ``refresh``; reconnect
    #: with a new token and resume with ``since_seq``.
    TOKEN_EXPIRED = 4001
    #: The user was revoked (``disconnect_user``, ``agentcast revoke``); tokens issued before
    #: the revocation are refused.
    REVOKED = 4003
    #: Too many connections for this user; the oldest was closed to admit a new one.
    CONNECTION_LIMIT = 4009
    #: The client kept sending past the inbound rate limit.
    RATE_LIMITED = 4029


def close_reason(text: str) -> str:
    """Trim ``text`` so its UTF-8 form fits a close frame (lone surrogates become ``?``)."""
    raw = text.encode("utf-8", "replace")[:MAX_CLOSE_REASON_BYTES]
    return raw.decode(errors="ignore")


@attrs.frozen
class ProtocolError(Exception):
    """A client frame was refused. ``close_code`` is set when the connection must close."""

    code: str
    message: str
    close_code: CloseCode | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@attrs.frozen
class Subscribe:
    """``{"type": "subscribe", "thread_id": T, "since_seq"?: N, "epoch"?: E, "compact"?: B}``."""

    thread_id: str
    since_seq: int | None = None
    epoch: str | None = None
    #: False asks for the replay one frame per ``agent_text`` delta, as it was live (a client
    #: that counts frames, like the Vercel AI translator's chunk sequences, needs it).
    compact: bool = True


@attrs.frozen
class Unsubscribe:
    """``{"type": "unsubscribe", "thread_id": T}``."""

    thread_id: str


@attrs.frozen
class CancelRun:
    """``{"type": "cancel_run", "run_id": R}``."""

    run_id: str


@attrs.frozen
class Ping:
    """``{"type": "ping", "id"?: any}``; answered with ``pong`` echoing ``id``."""

    id: Any = None


@attrs.frozen
class Refresh:
    """``{"type": "refresh", "token": NEW}``: renew the connection's credentials."""

    token: str = attrs.field(repr=False)


@attrs.frozen
class CustomFrame:
    """Any other type; handed to the application's message handler (e.g. ``user_message``)."""

    type: str
    payload: dict[str, Any]


ClientFrame = Subscribe | Unsubscribe | CancelRun | Ping | Refresh | CustomFrame


def _string_field(frame: dict[str, Any], name: str) -> str:
    value = frame.get(name)
    try:
        return check_id(name, value)
    except InvalidIdentifier as exc:
        raise ProtocolError("invalid_field", str(exc)) from None


def _optional_int(frame: dict[str, Any], name: str) -> int | None:
    value = frame.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError("invalid_field", f"{name} must be a non-negative integer")
    return value


def _too_deep(value: object, limit: int) -> bool:
    """Whether ``value`` nests arrays/objects more than ``limit`` levels (iterative, and it
    stops at the first branch past the limit, so a hostile frame costs at most one walk)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_client_frame(text: str | bytes, *, max_bytes: int) -> ClientFrame:
    """Parse one inbound WebSocket message.

    Raises:
        ProtocolError: binary data (closes with 1003), not valid UTF-8 (1007), too large
            (1009), not a JSON object, nested deeper than ``MAX_FRAME_DEPTH`` (``bad_frame``),
            missing or malformed fields (error frame only).
    """
    if isinstance(text, bytes | bytearray):
        raise ProtocolError(
            "binary_frame", "binary frames are not supported; send JSON text",
            CloseCode.UNSUPPORTED_DATA,
        )
    try:
        size = len(text) if len(text) > max_bytes else len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ProtocolError(
            "invalid_utf8", "text frames must be valid UTF-8", CloseCode.INVALID_PAYLOAD
        ) from None
    if size > max_bytes:
        raise ProtocolError(
            "message_too_big", f"frames are limited to {max_bytes} bytes",
            CloseCode.MESSAGE_TOO_BIG,
        )
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"frame is not valid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise ProtocolError("bad_frame", "frame must be a JSON object")
    # Cheap guard first: a frame with few brackets cannot be deep (most frames).
    if text.count("[") + text.count("{") > MAX_FRAME_DEPTH and _too_deep(frame, MAX_FRAME_DEPTH):
        raise ProtocolError(
            "bad_frame", f"frame nests arrays/objects deeper than {MAX_FRAME_DEPTH} levels"
        )
    kind = frame.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError("bad_frame", "frame needs a string field 'type'")
    if kind == "subscribe":
        epoch = frame.get("epoch")
        if epoch is not None and not isinstance(epoch, str):
            raise ProtocolError("invalid_field", "epoch must be a string")
        compact = frame.get("compact", True)
        if not isinstance(compact, bool):
            raise ProtocolError("invalid_field", "compact must be true or false")
        return Subscribe(
            _string_field(frame, "thread_id"), _optional_int(frame, "since_seq"), epoch,
            compact,
        )
    if kind == "unsubscribe":
        return Unsubscribe(_string_field(frame, "thread_id"))
    if kind == "cancel_run":
        return CancelRun(_string_field(frame, "run_id"))
    if kind == "ping":
        return Ping(frame.get("id"))
    if kind == "refresh":
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("invalid_field", "refresh needs a non-empty string 'token'")
        return Refresh(token)
    return CustomFrame(kind, frame)


def _dump(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def subscribed_frame(
    thread_id: str, *, seq: int, epoch: str, recovered: bool,
    active_runs: Sequence[ActiveRun] = (),
) -> str:
    """The ack of a subscribe: latest seq, stream epoch, whether the replay was complete, and
    the thread's runs that have not ended (``[{"run_id", "first_seq"}]``, oldest first), so a
    reloaded page can resume from ``first_seq - 1`` and rebuild a whole run."""
    return _dump(
        {"type": "subscribed", "thread_id": thread_id, "seq": seq, "epoch": epoch,
         "recovered": recovered, "active_runs": [run.as_json() for run in active_runs]}
    )


def unsubscribed_frame(thread_id: str) -> str:
    """The ack of an unsubscribe."""
    return _dump({"type": "unsubscribed", "thread_id": thread_id})


def pong_frame(ping_id: Any = None) -> str:
    """The answer to a client ``ping``."""
    frame: dict[str, Any] = {"type": "pong"}
    if ping_id is not None:
        frame["id"] = ping_id
    return _dump(frame)


def _unix_seconds(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def refreshed_frame(expires_at: float) -> str:
    """The answer to an accepted ``refresh``: the new expiry, Unix seconds."""
    return _dump({"type": "refreshed", "expires_at": _unix_seconds(expires_at)})


def token_expiring_frame(expires_at: float) -> str:
    """Sent once per token, ``TOKEN_EXPIRING_NOTICE`` seconds before it expires."""
    return _dump({"type": "token_expiring", "expires_at": _unix_seconds(expires_at)})


def error_frame(code: str, message: str, **extra: Any) -> str:
    """An ``{"type": "error", "code", "message"}`` frame; the connection stays usable.

    Never raises: when the message or an extra cannot be encoded (e.g. a lone surrogate an
    application echoed from client data), the answer is a ``bad_frame`` error instead.
    """
    try:
        return _dump({"type": "error", "code": code, "message": message, **extra})
    except orjson.JSONEncodeError:
        return _dump({"type": "error", "code": "bad_frame", "message": UNENCODABLE_REPLY})
