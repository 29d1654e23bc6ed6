"""AG-UI's own HTTP transport: ``POST /agui`` with a ``RunAgentInput``, answered with an SSE
stream of that run's AG-UI events, so the unmodified ``HttpAgent`` of ``@ag-ui/client`` runs
an agent on agentcast.

The stream is an ordinary agentcast connection over :class:`SseTransport`: the request becomes
native frames (``subscribe`` + ``user_message``, so the run starts through the server's message
handler exactly as over ``/ws``), and the connection's writer sends the run's events through
the AG-UI translator. Same token and verifier as ``/ws`` (``Authorization: Bearer``), same
per-user connection limit, each write within ``http_write_timeout``.

Every SSE event has ``id: <seq>:<epoch>``. A POST with ``Last-Event-ID`` resumes: the thread is
subscribed with ``since_seq``/``epoch`` from it and no new run starts; the stream continues the
run with the events after that id (opened by a synthetic ``RUN_STARTED``). The stream ends
after the run's ``RUN_FINISHED`` or ``RUN_ERROR``. A client that drops the stream does not
cancel the run (it may resume); ``POST /agui/cancel`` with ``{"runId"}`` does.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import orjson
import trio
from trio_websocket import CloseReason, ConnectionClosed

from .._context import UserContext
from .._errors import BrokerUnavailable, SessionClosed, TooManyConnections
from .._manager import ConnectionManager
from .._protocol import CloseCode
from .._session import UserSession
from ..protocols._native import dump, frames_of, is_event
from ..protocols.agui import AGUI_SUBPROTOCOL, AguiTranslator, last_user_text
from ._auth import AuthError, Claims
from ._front import RequestHead, abort_stream
from ._settings import ServerSettings
from ._tokens import TokenVerifier

__all__ = ["AGUI_CANCEL_PATH", "AGUI_PATH", "SseTransport", "parse_last_event_id", "serve_agui"]

log = logging.getLogger("agentcast.server")

#: The AG-UI HTTP endpoint (POST a RunAgentInput, read SSE).
AGUI_PATH: Final = "/agui"
#: Cancels one of the caller's runs (POST ``{"runId": R}``).
AGUI_CANCEL_PATH: Final = "/agui/cancel"
#: Bytes read per call from the request body and from a client that keeps sending.
READ_CHUNK: Final = 4096
#: The SSE response head; no Content-Length, the stream ends with the connection.
SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
    b"X-Accel-Buffering: no\r\nConnection: close\r\n\r\n"
)
#: The AG-UI events that end a stream.
TERMINAL_EVENTS: Final = frozenset({"RUN_FINISHED", "RUN_ERROR"})

Respond = Callable[..., Awaitable[Any]]


def parse_last_event_id(value: str | None) -> tuple[int, str] | None:
    """``"<seq>:<epoch>"`` (the ids this endpoint writes) as (seq, epoch); None otherwise."""
    if not value:
        return None
    seq, _, epoch = value.strip().partition(":")
    if not seq.isdigit() or not epoch or len(seq) > 18:
        return None
    return int(seq), epoch


@attrs.define(eq=False)
class SseTransport:
    """The Transport surface over one HTTP response: writes SSE, reads the request's frames.

    ``get_message`` hands out the native frames of the request, then waits for the client to
    leave (EOF) or the run to end, and raises ``ConnectionClosed``; ``send_message``
    translates a native message, keeps the stream's run only, and writes SSE events.
    """

    stream: trio.abc.Stream
    frames: deque[str]
    write_timeout: float
    #: True for a ``Last-Event-ID`` resume: the first run replayed is the stream's run.
    resumed: bool
    max_inbound_bytes: int
    subprotocol: str = AGUI_SUBPROTOCOL
    translator: AguiTranslator = attrs.Factory(AguiTranslator)
    run_id: str | None = None
    finished: bool = False
    _reading: trio.CancelScope | None = None

    async def send_message(self, message: str | bytes) -> None:
        chunks: list[str] = []
        for frame in frames_of(message):
            chunks.extend(self._translate(frame))
            if self.finished:
                break
        if chunks:
            await self._write("".join(chunks).encode())
        if self.finished and self._reading is not None:
            self._reading.cancel()

    def _translate(self, frame: dict[str, Any]) -> list[str]:
        if not is_event(frame):
            if frame.get("type") == "subscribed":
                self.translator.translate_frame(frame)  # remembers the epoch
                if self.resumed and not frame.get("recovered"):
                    self.finished = True
                    return [_sse(None, {
                        "type": "RUN_ERROR", "code": "resume_failed",
                        "message": "the events after Last-Event-ID are no longer retained; "
                                   "start the run again",
                    })]
            elif frame.get("type") == "error" and self.run_id is None:
                self.finished = True
                return [_sse(None, {
                    "type": "RUN_ERROR", "code": str(frame.get("code")),
                    "message": str(frame.get("message")),
                })]
            return []  # acks, pongs, heartbeats: an AG-UI stream starts with RUN_STARTED
        run_id = frame.get("run_id")
        if self.run_id is None and isinstance(run_id, str):
            if self.resumed and frame["type"] == "agent_started":
                # The run being resumed had ended: this is the thread's next one.
                self.finished = True
                return [_sse(None, {
                    "type": "RUN_ERROR", "code": "run_ended",
                    "message": "the run after Last-Event-ID has already ended",
                })]
            if self.resumed or frame["type"] == "agent_started":
                self.run_id = run_id
        if run_id is None or run_id != self.run_id:
            return []
        out = []
        for event in self.translator.translate_frame(frame):
            meta = event.get("metadata") or {}
            out.append(_sse(f"{meta.get('seq')}:{meta.get('epoch')}", event))
            if event["type"] in TERMINAL_EVENTS:
                self.finished = True
        return out

    async def _write(self, data: bytes) -> None:
        with trio.move_on_after(self.write_timeout) as deadline:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionClosed(CloseReason(1006, "the client left")) from None
        if deadline.cancelled_caught:
            await abort_stream(self.stream)
            raise ConnectionClosed(CloseReason(1006, "the client stopped reading"))

    async def get_message(self) -> str | bytes:
        if self.frames:
            return self.frames.popleft()
        received = 0
        with trio.CancelScope() as self._reading:
            while not self.finished:
                try:
                    data = await self.stream.receive_some(READ_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                received += len(data)
                if not data or received > self.max_inbound_bytes:
                    break  # the client left (or sends what this endpoint never reads)
        raise ConnectionClosed(CloseReason(1000, "the stream ended"))

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await trio.aclose_forcefully(self.stream)


async def transport_error(stream: trio.abc.Stream, within: float, message: str) -> None:
    """Write one ``RUN_ERROR`` event (``code: unavailable``) on a stream whose head is out."""
    event = _sse(None, {"type": "RUN_ERROR", "code": "unavailable", "message": message})
    with trio.move_on_after(within):
        try:
            await stream.send_all(event.encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _sse(event_id: str | None, event: dict[str, Any]) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {dump(event)}\n\n"


async def _read_body(stream: trio.abc.Stream, head: RequestHead, limit: int) -> bytes | str:
    """The request body (what came with the head, then the rest), or an error message."""
    length = head.header("content-length")
    if head.header("transfer-encoding") or length is None or not length.isdigit():
        return "send the body with a Content-Length"
    size = int(length)
    if size > limit:
        return f"the body is limited to {limit} bytes"
    body = bytearray(head.raw.partition(b"\r\n\r\n")[2])
    while len(body) < size:
        data = await stream.receive_some(READ_CHUNK)
        if not data:
            return "the body ended early"
        body += data
    return bytes(body[:size])


async def _read_json(
    stream: trio.abc.Stream, head: RequestHead, settings: ServerSettings
) -> dict[str, Any] | str:
    """The request body as a JSON object (within ``handshake_timeout``), or what is wrong."""
    body: bytes | str = "the request body did not arrive in time"
    with trio.move_on_after(settings.handshake_timeout):
        body = await _read_body(stream, head, settings.core.max_message_bytes)
    if isinstance(body, str):
        return body
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "the body must be JSON (a RunAgentInput)"
    return request if isinstance(request, dict) else "the body must be a JSON object"


def _native_frames(
    thread_id: str, request: dict[str, Any], resume: tuple[int, str] | None
) -> list[str] | str:
    """The native frames a request stands for: a resume subscribes from its seq and starts
    nothing; a new run subscribes (live) and sends the last user message as ``user_message``."""
    if resume is not None:
        return [dump({"type": "subscribe", "thread_id": thread_id, "since_seq": resume[0],
                      "epoch": resume[1]})]
    text = last_user_text(request.get("messages"))
    if text is None:
        return "messages needs a user message with text"
    return [dump({"type": "subscribe", "thread_id": thread_id}),
            dump({"type": "user_message", "thread_id": thread_id, "text": text})]


async def _admit(
    stream: trio.abc.Stream, head: RequestHead, respond: Respond, tokens: TokenVerifier,
    origin_allowed: Callable[[str | None], bool],
) -> Claims | None:
    if head.method != "POST":
        await respond(stream, 405, {"error": f"use POST {head.path}"},
                      extra_headers=[("Allow", "POST")])
        return None
    if not origin_allowed(head.header("origin")):
        await respond(stream, 403, {"error": "this Origin is not allowed"})
        return None
    authorization = head.header("authorization") or ""
    scheme, _, token = authorization.partition(" ")
    try:
        return await tokens.admit(token.strip() if scheme.lower() == "bearer" else None)
    except AuthError as exc:
        await respond(stream, 503 if exc.reason == "unavailable" else 401, {"error": str(exc)},
                      extra_headers=[("WWW-Authenticate", "Bearer")])
        return None


async def serve_agui(
    stream: trio.abc.Stream, head: RequestHead, *, settings: ServerSettings,
    manager: ConnectionManager, tokens: TokenVerifier, respond: Respond,
    origin_allowed: Callable[[str | None], bool], draining: bool = False,
) -> None:
    """Answer ``POST /agui`` (an SSE stream of a run) or ``POST /agui/cancel``."""
    if head.path not in (AGUI_PATH, AGUI_CANCEL_PATH):
        await respond(stream, 404, {"error": f"no such endpoint {head.path!r}"})
        return
    if draining:
        await respond(stream, 503, {"error": "the server is shutting down"})
        return
    claims = await _admit(stream, head, respond, tokens, origin_allowed)
    if claims is None:
        return
    request = await _read_json(stream, head, settings)
    if isinstance(request, str):
        await respond(stream, 400, {"error": request})
        return
    allowed = frozenset(claims.threads) if claims.threads else None
    session = manager.get_websocket_manager(UserContext(user_id=claims.user_id))
    if head.path == AGUI_CANCEL_PATH:
        run_id = request.get("runId")
        if isinstance(run_id, str) and session.cancel_run(
            run_id, "cancelled by client", threads=allowed
        ):
            await respond(stream, 200, {"cancelled": True})
        else:
            await respond(stream, 404, {"error": f"no active run {run_id!r} of yours"})
        return
    thread_id = request.get("threadId")
    if not isinstance(thread_id, str) or (allowed is not None and thread_id not in allowed):
        await respond(stream, 403 if isinstance(thread_id, str) else 400,
                      {"error": "threadId must be a thread this token may use"})
        return
    resume = parse_last_event_id(head.header("last-event-id"))
    frames = _native_frames(thread_id, request, resume)
    if isinstance(frames, str):
        await respond(stream, 400, {"error": frames})
        return
    await _stream(stream, frames, resume is not None, claims, session, settings=settings,
                  manager=manager, tokens=tokens, respond=respond)


async def _stream(
    stream: trio.abc.Stream, frames: list[str], resumed: bool, claims: Claims,
    session: UserSession, *, settings: ServerSettings, manager: ConnectionManager,
    tokens: TokenVerifier, respond: Respond,
) -> None:
    """Reserve the connection's place, write the SSE head and serve the connection."""
    allowed = frozenset(claims.threads) if claims.threads else None
    try:
        slot = session.reserve_connection()
    except TooManyConnections as exc:
        await respond(stream, 429, {"error": str(exc)})
        return
    try:
        # With Redis the per-user limit holds over the cluster, as for /ws.
        await manager.reserve_cluster_connection(session)
    except (TooManyConnections, BrokerUnavailable) as exc:
        slot.release()
        status = 429 if isinstance(exc, TooManyConnections) else 503
        await respond(stream, status, {"error": str(exc)})
        return
    try:
        with trio.move_on_after(settings.http_write_timeout) as deadline:
            await stream.send_all(SSE_HEAD)
        if deadline.cancelled_caught:
            await abort_stream(stream)
            return
        transport = SseTransport(
            stream, deque(frames), settings.http_write_timeout, resumed,
            settings.core.max_message_bytes,
        )
        connection = await session.add_connection(
            transport, batch=True, allowed_threads=allowed, slot=slot,
            credentials=tokens.grant(claims),
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return  # the client left before its stream began
    except (SessionClosed, BrokerUnavailable) as exc:
        # The head is out: end the stream with the reason as its only event.
        await transport_error(stream, settings.http_write_timeout, str(exc))
        return
    finally:
        slot.release()
    await session.hold_connection(connection)
    if connection.close_code not in (None, CloseCode.NORMAL):
        log.info("an AG-UI stream ended with %s", connection.close_code)
