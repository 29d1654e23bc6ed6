"""The manager's statistics totals are running totals (``ConnectionManager.get_stats`` reads
them in O(1) instead of summing every session's counters): after traffic, a slow consumer, a
refused frame, a run and a session that closed, they equal the sums of every session's own
counters, open and closed."""

from __future__ import annotations

import attrs
import trio
import trio.testing

import agentcast
from agentcast import Config, UserContext
from agentcast._stats import Counters

from .helpers import connect, settle, thinking

USERS = ("alice", "bob", "carol")


async def test_running_totals_equal_the_sums_over_open_and_closed_sessions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(send_queue_size=4, session_linger=1.0)
    async with agentcast.open_manager(config) as manager:
        sessions = {
            user: manager.get_websocket_manager(UserContext.from_request(user_id=user))
            for user in USERS
        }
        clients = {}
        for user, session in sessions.items():
            clients[user], _ = await connect(session, ("t1",), capacity=1024)
        # alice: a second tab that never reads (dropped events, a 4008) and a bad frame.
        _, stalled = await connect(sessions["alice"], ("t1",), capacity=1)
        await clients["alice"].send("not json")
        async with sessions["bob"].run("t1") as run:
            run.result = "done"
        for index in range(20):
            for session in sessions.values():
                await session.send_to_thread("t1", thinking(f"event {index}"))
            await settle()
        assert stalled.closed
        # carol leaves; her session closes after its linger and its counts stay in the totals.
        carol = sessions["carol"]
        await clients["carol"].transport.aclose()
        await trio.sleep(config.session_linger + 0.1)  # virtual time: past the linger
        await settle()
        assert carol.closed

        stats = manager.get_stats()
        expected = Counters()
        for session in sessions.values():
            expected.add(session.counters)
    assert "carol" not in stats.per_user
    for field in attrs.fields(Counters):
        assert getattr(stats, field.name) == getattr(expected, field.name), field.name
    # Every kind of count took part, so the equality is not between zeros.
    assert stats.events_published == 3 * 20 + 2  # bob's run: agent_started, agent_completed
    assert stats.events_sent >= 3 * 20
    assert stats.events_dropped > 0
    assert stats.slow_consumer_disconnects == 1
    assert stats.protocol_errors == 1
    assert stats.connections_opened == 4
    assert stats.runs_started == 1
    assert stats.messages_sent > 0
