"""AG-UI over agentcast: native frames to AG-UI events, AG-UI run input to native frames.

Rules of this module: pure, no I/O, no trio, no pydantic (the ``ag-ui-protocol`` models are a
test-only dependency that checks this module's output). One :class:`AguiTranslator` per
connection (or SSE stream) holds what the mapping needs across events: each thread's epoch
(from its ``subscribed`` ack) and, per run, whether this stream has started it and which text
message is open. Bounded: a run is forgotten at its terminal event, and at most
:data:`MAX_TRACKED_RUNS` unfinished runs are remembered (the oldest is dropped).

Every event carries ``metadata: {"thread_id", "seq", "epoch"}`` so a client resumes exactly as
on the native protocol (``subscribe`` with ``since_seq`` = the last ``metadata.seq`` seen and
that ``epoch``). Each stream is valid on its own: a run first seen mid-way (after a resume)
gets a ``RUN_STARTED`` marked ``metadata.synthetic: true``, and its first text event on this
stream opens a ``TEXT_MESSAGE_START``; both carry the seq of the event that caused them.

Thinking is mapped to ``ACTIVITY_SNAPSHOT`` (activityType ``thinking``, one activity message
per run), not ``STEP_STARTED``/``STEP_FINISHED``: an agentcast thinking event is a point-in-time
state (text, step, progress), not a span, and a snapshot needs no pairing that a resume
in the middle could break (AG-UI clients refuse ``STEP_FINISHED`` for a step they did not see
start, and ``RUN_FINISHED`` while a step is open).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

import attrs
import orjson

from ._native import dump, frames_of, is_event

__all__ = [
    "AGUI_SUBPROTOCOL",
    "MAX_TRACKED_RUNS",
    "MAX_TRACKED_THREADS",
    "AguiTranslator",
    "input_to_native",
    "last_user_text",
]

#: The WebSocket subprotocol a client selects to receive AG-UI events (NDJSON: one event per
#: line; a message holds one or more lines).
AGUI_SUBPROTOCOL: Final = "agentcast.agui"
#: Unfinished runs one translator remembers; past it the oldest is forgotten (its next event
#: would open it again, marked synthetic).
MAX_TRACKED_RUNS: Final = 256
#: Threads whose epoch one translator remembers (a connection subscribes to at most
#: ``Config.max_subscriptions`` at once; this bounds one that keeps changing them).
MAX_TRACKED_THREADS: Final = 1024
#: Name prefix of the CUSTOM events that carry agentcast's control frames and custom events.
CUSTOM_PREFIX: Final = "agentcast."
#: Longest user text taken from a ``RunAgentInput`` (the demo agent reads 2000 characters).
MAX_INPUT_TEXT: Final = 8000


@attrs.define
class _RunState:
    thread_id: str
    text_open: bool = False


@attrs.define(eq=False)
class AguiTranslator:
    """Per-connection state of the agentcast → AG-UI mapping."""

    _epochs: dict[str, str] = attrs.Factory(dict)
    _runs: OrderedDict[str, _RunState] = attrs.Factory(OrderedDict)

    def translate(self, message: str | bytes) -> list[dict[str, Any]]:
        """The AG-UI events for one outgoing native message (a frame or an NDJSON batch)."""
        out: list[dict[str, Any]] = []
        for frame in frames_of(message):
            if is_event(frame):
                self._event(frame, out)
            else:
                self._control(frame, out)
        return out

    def translate_frame(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        """The AG-UI events for one parsed native frame (an event or a control frame)."""
        out: list[dict[str, Any]] = []
        if is_event(frame):
            self._event(frame, out)
        else:
            self._control(frame, out)
        return out

    def encode(self, message: str | bytes) -> str:
        """:meth:`translate` as the NDJSON text sent to an ``agentcast.agui`` client."""
        return "\n".join(dump(event) for event in self.translate(message))

    # ---- control frames ---------------------------------------------------------------------

    def _control(self, frame: dict[str, Any], out: list[dict[str, Any]]) -> None:
        kind = str(frame.get("type"))
        if kind == "subscribed" and isinstance(frame.get("epoch"), str):
            self._epochs[str(frame.get("thread_id"))] = frame["epoch"]
            if len(self._epochs) > MAX_TRACKED_THREADS:
                del self._epochs[next(iter(self._epochs))]
        value = {key: item for key, item in frame.items() if key != "type"}
        out.append({"type": "CUSTOM", "name": CUSTOM_PREFIX + kind, "value": value})

    # ---- events -----------------------------------------------------------------------------

    def _meta(self, frame: dict[str, Any], *, synthetic: bool = False) -> dict[str, Any]:
        thread_id = frame.get("thread_id")
        meta: dict[str, Any] = {
            "thread_id": thread_id, "seq": frame["seq"],
            "epoch": self._epochs.get(str(thread_id)),
        }
        if synthetic:
            meta["synthetic"] = True
        return meta

    def _run(self, frame: dict[str, Any], out: list[dict[str, Any]]) -> tuple[str, _RunState]:
        """The run's state, opened (with a synthetic RUN_STARTED) if this stream has not
        started it."""
        run_id = str(frame["run_id"])
        state = self._runs.get(run_id)
        if state is None:
            state = self._open(run_id, str(frame.get("thread_id")))
            if frame["type"] != "agent_started":
                out.append(self._started(frame, run_id, synthetic=True))
        return run_id, state

    def _open(self, run_id: str, thread_id: str) -> _RunState:
        state = self._runs[run_id] = _RunState(thread_id)
        while len(self._runs) > MAX_TRACKED_RUNS:
            self._runs.popitem(last=False)
        return state

    def _started(self, frame: dict[str, Any], run_id: str, *, synthetic: bool) -> dict[str, Any]:
        return {
            "type": "RUN_STARTED", "threadId": str(frame.get("thread_id")), "runId": run_id,
            "metadata": self._meta(frame, synthetic=synthetic),
        }

    def _event(self, frame: dict[str, Any], out: list[dict[str, Any]]) -> None:
        kind, data = frame["type"], frame["data"]
        if frame.get("run_id") is None:
            # Not part of a run (system_notice, an application's broadcast).
            out.append({
                "type": "CUSTOM", "name": CUSTOM_PREFIX + str(kind), "value": data,
                "metadata": self._meta(frame),
            })
            return
        run_id, state = self._run(frame, out)
        meta = self._meta(frame)
        if kind == "agent_started":
            out.append(self._started(frame, run_id, synthetic=False))
        elif kind == "agent_thinking":
            content = {key: data[key] for key in ("text", "step", "progress") if key in data}
            out.append({
                "type": "ACTIVITY_SNAPSHOT", "messageId": f"{run_id}.thinking",
                "activityType": "thinking", "content": content, "replace": True,
                "metadata": meta,
            })
        elif kind == "agent_text":
            text = data.get("text")
            if not isinstance(text, str) or not text:
                return  # AG-UI refuses an empty delta; the seq is simply not carried
            from_seq = data.get("from_seq")
            if isinstance(from_seq, int) and not isinstance(from_seq, bool):
                # A compacted replay frame: one CONTENT for seqs from_seq .. seq.
                meta = {**meta, "from_seq": from_seq}
            if not state.text_open:
                state.text_open = True
                out.append({
                    "type": "TEXT_MESSAGE_START", "messageId": f"{run_id}.text",
                    "role": "assistant", "metadata": meta,
                })
            out.append({
                "type": "TEXT_MESSAGE_CONTENT", "messageId": f"{run_id}.text", "delta": text,
                "metadata": meta,
            })
        elif kind == "tool_executing":
            call_id = _call_id(run_id, data)
            start: dict[str, Any] = {
                "type": "TOOL_CALL_START", "toolCallId": call_id,
                "toolCallName": str(data.get("tool_name")), "metadata": meta,
            }
            if state.text_open:
                start["parentMessageId"] = f"{run_id}.text"
            out.append(start)
            out.append({
                "type": "TOOL_CALL_ARGS", "toolCallId": call_id,
                "delta": dump(data.get("arguments", {})), "metadata": meta,
            })
            out.append({"type": "TOOL_CALL_END", "toolCallId": call_id, "metadata": meta})
        elif kind == "tool_completed":
            call_id = _call_id(run_id, data)
            result = data.get("result")
            out.append({
                "type": "TOOL_CALL_RESULT", "messageId": f"{run_id}.result.{call_id}",
                "toolCallId": call_id, "role": "tool",
                "content": result if isinstance(result, str) else dump(result),
                "metadata": {**meta, "ok": data.get("ok"), "duration_ms": data.get("duration_ms")},
            })
        elif kind in ("agent_completed", "agent_cancelled", "agent_error"):
            self._finish(frame, run_id, state, out)
        else:
            out.append({
                "type": "CUSTOM", "name": CUSTOM_PREFIX + str(kind), "value": data,
                "metadata": meta,
            })

    def _finish(
        self, frame: dict[str, Any], run_id: str, state: _RunState, out: list[dict[str, Any]]
    ) -> None:
        kind, data, meta = frame["type"], frame["data"], self._meta(frame)
        if state.text_open:
            out.append(
                {"type": "TEXT_MESSAGE_END", "messageId": f"{run_id}.text", "metadata": meta}
            )
        self._runs.pop(run_id, None)
        if kind == "agent_error":
            out.append({
                "type": "RUN_ERROR", "message": str(data.get("message")),
                "code": str(data.get("error_type")), "metadata": meta,
            })
            return
        finished: dict[str, Any] = {
            "type": "RUN_FINISHED", "threadId": state.thread_id, "runId": run_id,
            "metadata": {**meta, "duration_ms": data.get("duration_ms")},
        }
        if kind == "agent_cancelled":
            finished["outcome"] = {"type": "cancelled"}
            finished["metadata"]["reason"] = data.get("reason")
        else:
            finished["outcome"] = {"type": "success"}
            finished["result"] = data.get("result")
        out.append(finished)


def _call_id(run_id: str, data: dict[str, Any]) -> str:
    call_id = data.get("tool_call_id")
    # Events from before tool-call ids pair by name, as agentcast did then.
    return call_id if isinstance(call_id, str) else f"{run_id}.{data.get('tool_name')}"


def last_user_text(messages: object) -> str | None:
    """The text of the last ``user`` message of an AG-UI ``messages`` list (string content, or
    the ``text`` parts of a content list), trimmed to :data:`MAX_INPUT_TEXT`; None if none."""
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                str(part.get("text", "")) for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
        if isinstance(content, str) and content.strip():
            return content[:MAX_INPUT_TEXT]
    return None


def input_to_native(message: str | bytes) -> list[str | bytes]:
    """Upstream: an AG-UI ``RunAgentInput`` (an object with ``threadId`` and ``messages`` and
    no ``type``) becomes ``subscribe`` + ``user_message`` for its thread; anything else is
    passed on unchanged for the native parser (``subscribe`` to resume, ``cancel_run``,
    ``ping``, ``refresh``, application frames), which answers bad input with an error frame.
    """
    if isinstance(message, bytes | bytearray) or "threadId" not in message:
        return [message]
    try:
        frame = orjson.loads(message)
    except orjson.JSONDecodeError:
        return [message]
    if not isinstance(frame, dict) or "type" in frame or "threadId" not in frame:
        return [message]
    thread_id = frame.get("threadId")
    text = last_user_text(frame.get("messages"))
    native: dict[str, Any] = {"type": "user_message", "thread_id": thread_id, "text": text}
    return [dump({"type": "subscribe", "thread_id": thread_id}), dump(native)]
