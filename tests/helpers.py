"""Test helpers: a JSON-speaking client over MemoryTransport and the pinned event schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import jsonschema
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from agentcast import AgentEvent, EventType, UserSession
from agentcast.testing import MemoryTransport

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "event.schema.json"
SCHEMA_VALIDATOR = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
EVENT_TYPES = {
    "agent_started", "agent_thinking", "agent_text", "tool_executing", "tool_completed",
    "agent_completed", "agent_error", "agent_cancelled", "system_notice",
}


def check_event(frame: dict[str, Any]) -> None:
    """Assert an outgoing event frame matches docs/event.schema.json."""
    SCHEMA_VALIDATOR.validate(frame)


@attrs.define
class Client:
    """The browser side of a MemoryTransport: parses frames (batched or not) in order.

    Every event frame it receives is validated against the pinned schema.
    """

    transport: MemoryTransport
    messages: int = 0
    _pending: list[dict[str, Any]] = attrs.Factory(list)

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.transport.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def receive(self) -> dict[str, Any]:
        """The next frame; raises ConnectionClosed when the server closed."""
        while not self._pending:
            message = await self.transport.get_message()
            assert isinstance(message, str)
            self.messages += 1
            for line in message.split("\n"):
                frame = json.loads(line)
                if frame.get("type") in EVENT_TYPES:
                    check_event(frame)
                self._pending.append(frame)
        return self._pending.pop(0)

    async def receive_until(self, frame_type: str) -> list[dict[str, Any]]:
        """Frames up to and including the first of ``frame_type``."""
        frames = []
        while True:
            frame = await self.receive()
            frames.append(frame)
            if frame["type"] == frame_type:
                return frames

    async def receive_closed(self) -> tuple[list[dict[str, Any]], int]:
        """Read until the server closes; return the frames read and the close code."""
        frames = []
        try:
            while True:
                frames.append(await self.receive())
        except ConnectionClosed as exc:
            return frames, exc.reason.code if exc.reason is not None else 1006


async def connect(
    session: UserSession,
    threads: tuple[str, ...] = (),
    *,
    capacity: int = 64,
    batch: bool | None = None,
    subprotocol: str | None = None,
    allowed_threads: tuple[str, ...] | None = None,
) -> tuple[Client, Any]:
    """Attach a new in-memory client to ``session``; return (client, Connection)."""
    server, client = MemoryTransport.pair(capacity=capacity, subprotocol=subprotocol)
    connection = await session.add_connection(
        server, threads=threads, batch=batch, allowed_threads=allowed_threads
    )
    return Client(client), connection


async def settle() -> None:
    """Let every runnable task run until all are blocked (no time passes)."""
    await trio.testing.wait_all_tasks_blocked()


def thinking(text: str) -> AgentEvent:
    """An ``agent_thinking`` event, the everyday test payload."""
    return AgentEvent(EventType.AGENT_THINKING, {"text": text})
