"""The Vercel AI SDK's ``WebSocketChatTransport`` framing over agentcast.

Rules of this module: pure, no I/O, no trio. One :class:`VercelTranslator` per connection maps
both ways (the framing is the ``ai`` package's, read from its ``WebSocketChatTransport``):

- upstream ``send`` {requestId, id, messages} → native ``subscribe`` of thread ``id`` (live) and
  ``user_message`` with the last user message's text; the request then follows the next run
  that starts on that thread.
- upstream ``resume`` {requestId, id, lastSequence?} → native ``subscribe`` with ``since_seq: 0``
  and ``compact: false`` (the thread's retained history, one frame per ``agent_text`` delta
  as live: a compacted replay has fewer chunks than the live stream had, which shifted the
  sequences, so a resumed client skipped or repeated text): the latest run, if it has not
  ended, is replayed from its
  start (``start`` frame, then its chunks after ``lastSequence``) and followed live; otherwise
  the answer is ``no-active``. A history that no longer reaches back is an ``error``.
- upstream ``abort`` {requestId} → native ``cancel_run`` of the request's run.
- downstream: each event of the request's run becomes UI message stream chunks, framed as
  ``{"type":"chunk","requestId","sequence","chunk"}``; the run's terminal event ends it with
  ``end``. Chunk sequences count from 0 at the run's ``agent_started``, so they are the same on
  every replay: a client that has seen up to ``lastSequence`` gets exactly the rest.

Replies the translator must send upstream-triggered (a refused request) travel as a native
``ping`` whose ``id`` carries the reply; the connection's writer returns it as a ``pong``, so
every byte to the client goes through the connection's queue and write deadline. Control
frames the transport does not know (acks, heartbeats, pongs) are never sent: it closes the
socket on an unknown frame type.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import attrs
import orjson

from ._native import dump, frames_of, is_event

__all__ = [
    "MAX_REQUESTS",
    "VERCEL_SUBPROTOCOL",
    "VercelTranslator",
    "run_chunks",
]

#: The WebSocket subprotocol a client selects to speak the ``WebSocketChatTransport`` framing.
VERCEL_SUBPROTOCOL: Final = "agentcast.vercel-ai"
#: Requests one connection may have open at once; more are refused with an ``error`` frame.
MAX_REQUESTS: Final = 32
#: Longest ``requestId`` accepted (the transport's are short random ids).
MAX_REQUEST_ID: Final = 128
#: Longest user text passed to the message handler.
MAX_INPUT_TEXT: Final = 8000
#: Chunks one replayed run may hold in memory while its replay is read (history bounds it
#: already; this is the translator's own bound).
MAX_REPLAY_CHUNKS: Final = 20_000
#: The key of a native ping id that carries a reply of this translator.
REPLY_KEY: Final = "agentcast.vercel-ai"
#: Native event types that end a run.
TERMINAL: Final = frozenset({"agent_completed", "agent_cancelled", "agent_error"})


@attrs.define
class _RunChunks:
    """What chunk translation of one run needs to remember."""

    run_id: str
    text_open: bool = False
    done: bool = False


def run_chunks(state: _RunChunks, frame: dict[str, Any]) -> list[dict[str, Any]]:
    """The UI message stream chunks of one native event of ``state``'s run."""
    kind, data, run_id = frame["type"], frame["data"], state.run_id
    chunks: list[dict[str, Any]] = []
    if kind == "agent_started":
        chunks.append({"type": "start", "messageId": run_id})
    elif kind == "agent_thinking":
        part = f"{run_id}.thinking.{frame['seq']}"
        chunks.append({"type": "reasoning-start", "id": part})
        chunks.append({"type": "reasoning-delta", "id": part, "delta": str(data.get("text"))})
        chunks.append({"type": "reasoning-end", "id": part})
    elif kind == "agent_text":
        if not state.text_open:
            state.text_open = True
            chunks.append({"type": "text-start", "id": f"{run_id}.text"})
        chunks.append(
            {"type": "text-delta", "id": f"{run_id}.text", "delta": str(data.get("text"))}
        )
    elif kind == "tool_executing":
        chunks.append({
            "type": "tool-input-available", "toolCallId": _call_id(run_id, data),
            "toolName": str(data.get("tool_name")), "input": data.get("arguments", {}),
        })
    elif kind == "tool_completed":
        call_id = _call_id(run_id, data)
        if data.get("ok", True):
            chunks.append({
                "type": "tool-output-available", "toolCallId": call_id,
                "output": data.get("result"),
            })
        else:
            result = data.get("result")
            chunks.append({
                "type": "tool-output-error", "toolCallId": call_id,
                "errorText": result if isinstance(result, str) else dump(result),
            })
    elif kind in TERMINAL:
        state.done = True
        if state.text_open:
            state.text_open = False
            chunks.append({"type": "text-end", "id": f"{run_id}.text"})
        if kind == "agent_completed":
            chunks.append({"type": "finish", "finishReason": "stop"})
        elif kind == "agent_cancelled":
            chunks.append({"type": "abort", "reason": str(data.get("reason"))})
        else:
            chunks.append({"type": "error", "errorText": str(data.get("message"))})
    # Other (custom) event types have no UI chunk: they are not sent (see the docs).
    return chunks


def _call_id(run_id: str, data: dict[str, Any]) -> str:
    call_id = data.get("tool_call_id")
    return call_id if isinstance(call_id, str) else f"{run_id}.{data.get('tool_name')}"


@attrs.define
class _Request:
    request_id: str
    thread_id: str
    resume: bool
    #: Chunks up to this sequence were seen by the client (a resume's lastSequence).
    last_sequence: int = -1
    run: _RunChunks | None = None
    #: Sequence of the last chunk of the run (sent or skipped).
    sequence: int = -1
    #: A resume's ack seq: events up to it are the replay (None: ack not yet seen).
    replay_until: int | None = None
    live: bool = False
    buffered: list[dict[str, Any]] = attrs.Factory(list)


@attrs.define(eq=False)
class VercelTranslator:
    """Per-connection state of the ``WebSocketChatTransport`` mapping."""

    _requests: dict[str, _Request] = attrs.Factory(dict)
    #: The request following each thread (one per chat, the newest wins).
    _by_thread: dict[str, str] = attrs.Factory(dict)
    #: The newest request without a run yet: a native error frame is its answer.
    _pending: str | None = None

    # ---- upstream ---------------------------------------------------------------------------

    def upstream(self, message: str | bytes) -> list[str | bytes]:
        """The native frames for one client message (bad frames go on unchanged, so the
        native parser answers them; a refused request is answered with ``error``)."""
        if isinstance(message, bytes | bytearray):
            return [message]
        try:
            frame = orjson.loads(message)
        except orjson.JSONDecodeError:
            return [message]
        if not isinstance(frame, dict) or frame.get("type") not in ("send", "resume", "abort"):
            return [message]
        request_id = frame.get("requestId")
        if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID:
            return [_reply({"type": "error", "requestId": "",
                            "errorText": "requestId must be a short non-empty string"})]
        if frame["type"] == "abort":
            return self._abort(request_id)
        thread_id = frame.get("id")
        if not isinstance(thread_id, str):
            return [_error(request_id, "id (the chat id) must be a string")]
        if request_id not in self._requests and len(self._requests) >= MAX_REQUESTS:
            return [_error(request_id, f"at most {MAX_REQUESTS} open requests per connection")]
        if frame["type"] == "resume":
            last = frame.get("lastSequence")
            if last is not None and (isinstance(last, bool) or not isinstance(last, int)):
                return [_error(request_id, "lastSequence must be an integer")]
            self._track(_Request(request_id, thread_id, True, -1 if last is None else last))
            # compact: false: chunk sequences are counted per live event, so the replay must
            # have the live stream's events, not compacted text spans.
            return [dump({
                "type": "subscribe", "thread_id": thread_id, "since_seq": 0, "compact": False,
            })]
        text = _last_user_text(frame.get("messages"))
        if text is None:
            return [_error(request_id, "send needs a user message with a text part")]
        self._track(_Request(request_id, thread_id, False))
        self._pending = request_id
        return [
            dump({"type": "subscribe", "thread_id": thread_id}),
            dump({"type": "user_message", "thread_id": thread_id, "text": text}),
        ]

    def _track(self, request: _Request) -> None:
        reused = self._requests.get(request.request_id)
        if reused is not None:
            self._forget(reused)
        old = self._by_thread.get(request.thread_id)
        if old is not None:
            self._requests.pop(old, None)
        self._requests[request.request_id] = request
        self._by_thread[request.thread_id] = request.request_id

    def _forget(self, request: _Request) -> None:
        self._requests.pop(request.request_id, None)
        if self._by_thread.get(request.thread_id) == request.request_id:
            del self._by_thread[request.thread_id]
        if self._pending == request.request_id:
            self._pending = None

    def _abort(self, request_id: str) -> list[str | bytes]:
        request = self._requests.get(request_id)
        if request is None:
            return []
        self._forget(request)
        if request.run is None or request.run.done:
            # No run yet: nothing to cancel (see the docs: the run, once started, goes on).
            return []
        return [dump({"type": "cancel_run", "run_id": request.run.run_id})]

    # ---- downstream -------------------------------------------------------------------------

    def downstream(self, message: str | bytes) -> list[str]:
        """The ``WebSocketChatTransport`` frames for one outgoing native message, one JSON
        text per WebSocket message."""
        out: list[str] = []
        for frame in frames_of(message):
            if is_event(frame):
                self._event(frame, out)
            else:
                self._control(frame, out)
        return out

    def _control(self, frame: dict[str, Any], out: list[str]) -> None:
        kind = frame.get("type")
        reply = frame.get("id", {}).get(REPLY_KEY) if isinstance(frame.get("id"), dict) else None
        if kind == "pong" and isinstance(reply, dict):
            # A client may ping with such an id itself: it only ever gets its own id back.
            request = self._requests.get(str(reply.get("requestId")))
            if request is not None:
                self._forget(request)
            out.append(dump(reply))
        elif kind == "subscribed":
            request = self._requests.get(self._by_thread.get(str(frame.get("thread_id")), ""))
            if request is None or not request.resume or request.replay_until is not None:
                return
            if not frame.get("recovered"):
                self._forget(request)
                out.append(dump({
                    "type": "error", "requestId": request.request_id,
                    "errorText": "this chat's history no longer reaches back to its run's "
                                 "start; reload the chat",
                }))
                return
            request.replay_until = int(frame.get("seq", 0))
            if request.replay_until == 0:
                self._end_replay(request, out)
        elif kind == "error" and self._pending is not None:
            request = self._requests[self._pending]
            if request.run is None:
                self._forget(request)
                out.append(dump({
                    "type": "error", "requestId": request.request_id,
                    "errorText": f"{frame.get('code')}: {frame.get('message')}",
                }))

    def _event(self, frame: dict[str, Any], out: list[str]) -> None:
        request = self._requests.get(self._by_thread.get(str(frame.get("thread_id")), ""))
        run_id = frame.get("run_id")
        if request is None or not isinstance(run_id, str):
            return
        if request.resume and not request.live:
            self._replayed(request, frame, out)
            return
        if request.run is None:
            if frame["type"] != "agent_started":
                return  # another run, already going when this request was sent
            request.run = _RunChunks(run_id)
            if self._pending == request.request_id:
                self._pending = None
        elif request.run.run_id != run_id:
            return
        self._send(request, run_chunks(request.run, frame), out)
        if request.run.done:
            self._forget(request)
            out.append(dump({"type": "end", "requestId": request.request_id}))

    def _replayed(self, request: _Request, frame: dict[str, Any], out: list[str]) -> None:
        """One event of a resume's replay: keep the chunks of the latest run only."""
        if request.replay_until is None:
            return
        run_id = str(frame["run_id"])
        if frame["type"] == "agent_started":
            request.run, request.buffered = _RunChunks(run_id), []
        if request.run is not None and request.run.run_id == run_id and not request.run.done:
            request.buffered.extend(run_chunks(request.run, frame))
            if len(request.buffered) > MAX_REPLAY_CHUNKS:
                self._forget(request)
                out.append(dump({"type": "error", "requestId": request.request_id,
                                 "errorText": "the run is too long to replay"}))
                return
        if frame["seq"] >= request.replay_until:
            self._end_replay(request, out)

    def _end_replay(self, request: _Request, out: list[str]) -> None:
        if request.run is None or request.run.done:
            self._forget(request)
            out.append(dump({"type": "no-active", "requestId": request.request_id}))
            return
        request.live = True
        out.append(dump({"type": "start", "requestId": request.request_id}))
        chunks, request.buffered = request.buffered, []
        self._send(request, chunks, out)

    def _send(self, request: _Request, chunks: Iterable[dict[str, Any]], out: list[str]) -> None:
        for chunk in chunks:
            request.sequence += 1
            if request.sequence > request.last_sequence:
                out.append(dump({
                    "type": "chunk", "requestId": request.request_id,
                    "sequence": request.sequence, "chunk": chunk,
                }))


def _reply(frame: dict[str, Any]) -> str:
    """A native ping whose pong carries ``frame`` back through the connection's writer."""
    return dump({"type": "ping", "id": {REPLY_KEY: frame}})


def _error(request_id: str, text: str) -> str:
    return _reply({"type": "error", "requestId": request_id, "errorText": text})


def _last_user_text(messages: object) -> str | None:
    """The text parts of the last ``user`` UI message, joined; None if there is none."""
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        parts = message.get("parts")
        if not isinstance(parts, list):
            continue
        text = "".join(
            str(part.get("text", "")) for part in parts
            if isinstance(part, dict) and part.get("type") == "text"
        )
        if text.strip():
            return text[:MAX_INPUT_TEXT]
    return None
