"""A message handler whose agent stops half-way through its answer until the test opens a
gate: resume tests drop a connection mid-run without depending on how fast anything runs."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from agentcast import MessageHandler, Run, UserSession


@attrs.define
class GatedAgent:
    """``handler`` starts, per ``user_message``, a run that emits start, a tool call and the
    first half of its text, then waits for ``gate`` before the rest and completes."""

    gate: trio.Event = attrs.Factory(trio.Event)
    started: trio.Event = attrs.Factory(trio.Event)

    async def agent(self, run: Run, text: str) -> dict[str, Any]:
        call = await run.tool_executing("search", {"query": text})
        await run.tool_completed("search", {"hits": 1}, tool_call_id=call)
        await run.text("Hello, ")
        self.started.set()
        await self.gate.wait()
        await run.text("world.")
        return {"answer": "Hello, world."}

    @property
    def handler(self) -> MessageHandler:
        async def handle(session: UserSession, connection: Any, frame: dict[str, Any]) -> None:
            await trio.lowlevel.checkpoint()
            session.start_run(frame["thread_id"], self.agent, frame["text"], agent_name="gated")

        return handle
