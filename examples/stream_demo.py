"""Stream a simulated agent run to an in-memory client and print each event as it arrives.

Run it with:  python examples/stream_demo.py
"""

import functools
import json

import trio

import agentcast
from agentcast.demo import simulated_agent
from agentcast.testing import MemoryTransport

TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}


async def main(speed: float = 1.0) -> None:
    async with agentcast.open_manager():
        ctx = agentcast.UserContext.from_request(user_id="alice", thread_id="thread-1")
        session = agentcast.get_websocket_manager(ctx)  # synchronous: nothing to await
        server_side, browser = MemoryTransport.pair()
        await session.add_connection(server_side, threads=["thread-1"])
        agent = functools.partial(simulated_agent, speed=speed)
        session.start_run("thread-1", agent, "What is structured concurrency?",
                          agent_name="researcher")
        received = 0
        while True:
            frame = json.loads(await browser.get_message())
            detail = frame.get("data", {k: v for k, v in frame.items() if k != "type"})
            print(f"{frame.get('seq')!s:>4}  {frame['type']:<16} {json.dumps(detail)}")
            if frame.get("seq") is not None and frame["type"] != "subscribed":
                received += 1
            if frame["type"] in TERMINAL:
                break
        # Counted here, not read from the manager's stats: the server counts an event as sent
        # once its write returns, which can be after the client has already printed it.
        print(f"done: {received} events received, in seq order")


if __name__ == "__main__":
    trio.run(main)
