"""A simulated agent for demos and examples: realistic event shapes and small delays, no LLM.

``simulated_agent(run, message)`` thinks in a few steps, calls a pretend search tool, streams a
short answer and returns it. ``speed`` scales every delay (2.0 is twice as fast; use a large
value in tests, or ``autojump_clock``).
"""

from __future__ import annotations

from typing import Any, Final

import trio

from ._run import Run

__all__ = ["simulated_agent"]

#: Seconds between steps at speed 1.0.
STEP_DELAY: Final = 0.35
#: Seconds the pretend tool takes at speed 1.0.
TOOL_DELAY: Final = 0.8


async def simulated_agent(run: Run, message: str, *, speed: float = 1.0) -> dict[str, Any]:
    """Answer ``message`` the way a tool-using agent would, emitting every event type."""
    if speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed!r}")
    steps = [
        "Reading the question",
        f"Looking for what matters in {message[:60]!r}",
        "Deciding to search before answering",
    ]
    for number, text in enumerate(steps, start=1):
        await run.thinking(text, step=number, progress=round(number / (len(steps) + 2), 2))
        await trio.sleep(STEP_DELAY / speed)
    query = " ".join(message.split()[:8]) or "empty question"
    await run.tool_executing("search", {"query": query, "limit": 3})
    await trio.sleep(TOOL_DELAY / speed)
    hits = [f"Result {index} about {query}" for index in range(1, 4)]
    await run.tool_completed("search", {"hits": hits})
    await run.thinking("Writing the answer", step=len(steps) + 1, progress=0.9)
    answer = f"I found {len(hits)} sources about {query!r}; the first says: {hits[0]}."
    for word in answer.split(" "):
        await run.text(word + " ")
        await trio.sleep(STEP_DELAY / speed / 10)
    return {"answer": answer, "sources": len(hits)}
