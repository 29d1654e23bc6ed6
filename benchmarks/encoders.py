"""Cost per event of the agent-UI encoders (issue 15), in process.

The benchmark runner's load generator speaks agentcast's own protocol only, so this measures
what an ``agentcast.agui`` or ``agentcast.vercel-ai`` connection adds on the server: the
translation of the writer's batches (the burst scenario's shape: NDJSON batches of
``BATCH`` events of a streaming run, ~200-byte text events). Run:
``python -m benchmarks.encoders``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Final

from agentcast import AgentEvent
from agentcast._events import encode_envelope
from agentcast.protocols.agui import AguiTranslator
from agentcast.protocols.vercel_ai import VercelTranslator

#: Events per writer batch (the burst scenario batches about this many).
BATCH: Final = 16
#: Batches timed per encoder.
BATCHES: Final = 2000
#: Repetitions; the best is reported (least disturbed by other work on the machine).
ROUNDS: Final = 5


def burst() -> list[str]:
    """NDJSON batches of one long run: start, then text deltas with a tool call now and then."""
    frames = [encode_envelope(AgentEvent("agent_started", {"agent_name": "bench"}, run_id="r-1"),
                              thread_id="t-1", seq=1, ts=1.0)]
    for seq in range(2, BATCH * BATCHES + 1):
        if seq % 50 == 0:
            event = AgentEvent("tool_executing", {"tool_name": "search", "arguments": {"q": "x"},
                                                  "tool_call_id": f"c-{seq}"}, run_id="r-1")
        else:
            event = AgentEvent("agent_text", {"text": "x" * 120}, run_id="r-1")
        frames.append(encode_envelope(event, thread_id="t-1", seq=seq, ts=1.0))
    return ["\n".join(frames[i:i + BATCH]) for i in range(0, len(frames), BATCH)]


def per_event_us(encode: Callable[[str], object], batches: list[str]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for batch in batches:
            encode(batch)
        best = min(best, time.perf_counter() - start)
    return best / (len(batches) * BATCH) * 1e6


def main() -> None:
    batches = burst()
    agui = AguiTranslator()
    agui.translate('{"type":"subscribed","thread_id":"t-1","seq":0,"epoch":"e","recovered":false}')
    vercel = VercelTranslator()
    vercel.upstream(json.dumps({"type": "send", "requestId": "q", "id": "t-1", "messages": [
        {"role": "user", "parts": [{"type": "text", "text": "go"}]}]}))
    results = {
        "native (pass-through)": per_event_us(lambda batch: batch, batches),
        "agentcast.agui": per_event_us(agui.encode, batches),
        "agentcast.vercel-ai": per_event_us(vercel.downstream, batches),
    }
    for name, cost in results.items():
        print(f"{name:24} {cost:6.2f} us/event")


if __name__ == "__main__":
    main()
