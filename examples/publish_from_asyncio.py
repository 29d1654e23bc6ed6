"""Publish an agent run onto the Redis backplane from a plain asyncio program.

Every ``agentcast serve --redis-url`` node holding user "alice" delivers these events to her
connections subscribed to "thread-1", in order, once, with seqs assigned in Redis.

Run it with:  python examples/publish_from_asyncio.py redis://127.0.0.1:6379/0
"""

import asyncio
import sys

import agentcast


async def main(redis_url: str) -> None:
    async with agentcast.RedisPublisher(redis_url) as pub:
        # A live-only notice: no seq, not replayed.
        await pub.send_to_user("alice", agentcast.AgentEvent(
            agentcast.EventType.SYSTEM_NOTICE, {"message": "a worker picked up your job"}))
        # A run: agent_started now, exactly one terminal event when the block ends
        # (return -> agent_completed, exception -> agent_error, cancellation -> agent_cancelled).
        async with pub.run("alice", "thread-1", agent_name="asyncio-worker") as run:
            await run.thinking("looking it up")
            await run.tool_executing("search", {"query": "structured concurrency"})
            await asyncio.sleep(0.01)  # the real work, in asyncio
            await run.tool_completed("search", ["trio", "anyio"], duration_ms=10)
            for word in ("Nurseries ", "own ", "their ", "tasks."):
                await run.text(word)
            run.result = "answered"
        print(f"published run {run.run_id}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"))
