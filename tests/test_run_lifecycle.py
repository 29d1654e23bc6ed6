"""One run lifecycle, two shells: every test here runs against the trio ``Run`` (in-memory
manager) and the anyio ``PublisherRun`` (a real redis-server), and reads back what the thread's
history holds, which is what every client resumes from. Pure decisions are tested in
``test_lifecycle.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import coredis
import orjson
import pytest
import trio

import agentcast
from agentcast import Config, InvalidEvent, RedisPublisher, RunEnded, UserContext

from .redis_server import RedisServer

#: Seconds any one test may take (real Redis I/O for the publisher shell).
STEP = 10.0
CONFIG = Config(session_linger=0.5, error_message_limit=40)


class AnyRun(Protocol):
    run_id: str
    result: Any

    @property
    def ended(self) -> bool: ...

    def cancel(self, reason: str = ...) -> None: ...

    async def emit(self, event_type: str, data: dict[str, Any]) -> int: ...

    async def thinking(
        self, text: str, *, step: int | None = None, progress: float | None = None
    ) -> int: ...

    async def text(self, delta: str) -> int: ...

    async def tool_executing(
        self, tool_name: str, arguments: dict[str, Any], *, tool_call_id: str | None = None
    ) -> str: ...

    async def tool_completed(
        self, tool_name: str, result: Any, *, tool_call_id: str | None = None,
        duration_ms: float | None = None, ok: bool = True,
    ) -> int: ...

    def tool(
        self, tool_name: str, arguments: dict[str, Any], *, tool_call_id: str | None = None
    ) -> AbstractAsyncContextManager[Any]: ...


class Shell(Protocol):
    name: str

    def run(self, thread_id: str) -> AbstractAsyncContextManager[AnyRun]: ...

    async def history(self, thread_id: str) -> list[dict[str, Any]]: ...


class TrioShell:
    name = "trio"

    def __init__(self, manager: agentcast.ConnectionManager) -> None:
        self.manager = manager
        self.session = manager.get_websocket_manager(UserContext.from_request(user_id="alice"))

    def run(self, thread_id: str) -> AbstractAsyncContextManager[AnyRun]:
        return self.session.run(thread_id, agent_name="worker")

    async def history(self, thread_id: str) -> list[dict[str, Any]]:
        recovery = await self.manager.broker.recover("alice", thread_id, 0, None)
        return [orjson.loads(frame) for frame in recovery.frames]


class PublisherShell:
    name = "publisher"

    def __init__(self, publisher: RedisPublisher, url: str) -> None:
        self.publisher = publisher
        self.url = url

    def run(self, thread_id: str) -> AbstractAsyncContextManager[AnyRun]:
        return self.publisher.run(
            "alice", thread_id, agent_name="worker"
        )

    async def history(self, thread_id: str) -> list[dict[str, Any]]:
        async with coredis.Redis.from_url(self.url, decode_responses=True) as client:
            entries = await client.xrange(f"agentcast:{{alice}}:t:{thread_id}:events")
        return [orjson.loads(entry.field_values["f"]) for entry in entries]


@pytest.fixture(params=["trio", "publisher"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """None for the in-memory trio shell, else the URL of a fresh redis-server."""
    if request.param == "trio":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def shell(backend: str | None) -> AsyncIterator[Shell]:
    if backend is None:
        async with agentcast.open_manager(CONFIG) as manager:
            yield TrioShell(manager)
    else:
        async with RedisPublisher(backend, CONFIG) as publisher:
            yield PublisherShell(publisher, backend)


async def types_of(shell: Shell, thread_id: str = "t1") -> list[str]:
    return [frame["type"] for frame in await shell.history(thread_id)]


@asynccontextmanager
async def bounded() -> AsyncIterator[None]:
    with trio.fail_after(STEP):
        yield


async def test_a_run_that_returns_completes_with_its_result(shell: Shell) -> None:
    async with bounded():
        async with shell.run("t1") as run:
            await run.thinking("reading", step=2, progress=0.5)
            await run.text("hello ")
            run.result = {"answer": 42}
        frames = await shell.history("t1")
    assert [f["type"] for f in frames] == [
        "agent_started", "agent_thinking", "agent_text", "agent_completed"
    ]
    assert frames[0]["data"] == {"agent_name": "worker"}
    assert frames[1]["data"] == {"text": "reading", "step": 2, "progress": 0.5}
    assert frames[-1]["data"]["result"] == {"answer": 42}
    assert frames[-1]["data"]["duration_ms"] >= 0
    assert {f["run_id"] for f in frames} == {run.run_id}
    assert [f["seq"] for f in frames] == [1, 2, 3, 4]
    assert run.ended


async def test_a_tool_call_is_timed_by_the_run(shell: Shell) -> None:
    async with bounded():
        async with shell.run("t1") as run:
            await run.tool_executing("search", {"q": "trio"})
            await trio.sleep(0.02)  # the tool's work; its duration is what is measured
            await run.tool_completed("search", {"hits": 3})
            await run.tool_completed("unstarted", None, ok=False)
        frames = await shell.history("t1")
    completed = [f["data"] for f in frames if f["type"] == "tool_completed"]
    assert completed[0]["tool_name"] == "search"
    assert completed[0]["duration_ms"] > 0
    assert completed[1]["tool_call_id"] != completed[0]["tool_call_id"]
    del completed[1]["tool_call_id"]
    assert completed[1] == {"tool_name": "unstarted", "result": None, "duration_ms": 0.0,
                            "ok": False}


async def test_parallel_calls_of_one_tool_are_paired_by_their_call_ids(shell: Shell) -> None:
    async def lookup(run: AnyRun, query: str, delay: float) -> None:
        async with run.tool("search", {"q": query}) as call:
            await trio.sleep(delay)
            call.result = {"query": query}

    async with bounded():
        async with shell.run("t1") as run, trio.open_nursery() as nursery:
            nursery.start_soon(lookup, run, "slow", 0.05)
            nursery.start_soon(lookup, run, "fast", 0.0)
        frames = await shell.history("t1")
    started = {f["data"]["tool_call_id"]: f["data"]["arguments"]["q"]
               for f in frames if f["type"] == "tool_executing"}
    completed = {f["data"]["tool_call_id"]: f["data"]["result"]["query"]
                 for f in frames if f["type"] == "tool_completed"}
    assert len(started) == 2
    assert started == completed  # each result is paired with its own call
    order = [f["data"]["result"]["query"] for f in frames if f["type"] == "tool_completed"]
    assert order == ["fast", "slow"]


async def test_a_tool_block_that_raises_reports_the_failure_and_propagates(
    shell: Shell,
) -> None:
    async with bounded():
        with pytest.raises(LookupError):
            async with (
                shell.run("t1") as run,
                run.tool("fetch", {"url": "x"}, tool_call_id="c-1"),
            ):
                raise LookupError("not found")
        frames = await shell.history("t1")
    assert [f["type"] for f in frames] == [
        "agent_started", "tool_executing", "tool_completed", "agent_error"
    ]
    assert frames[2]["data"] == {
        "tool_name": "fetch", "result": {"error_type": "LookupError", "message": "not found"},
        "duration_ms": frames[2]["data"]["duration_ms"], "ok": False, "tool_call_id": "c-1",
    }


async def test_a_call_id_open_twice_is_refused(shell: Shell) -> None:
    async with bounded():
        async with shell.run("t1") as run:
            await run.tool_executing("a", {}, tool_call_id="c-1")
            with pytest.raises(InvalidEvent, match="already executing"):
                await run.tool_executing("b", {}, tool_call_id="c-1")
            with pytest.raises(agentcast.InvalidIdentifier):
                await run.tool_executing("b", {}, tool_call_id="bad id")
        assert await types_of(shell) == ["agent_started", "tool_executing", "agent_completed"]


async def test_a_run_that_raises_sends_agent_error_and_the_exception_propagates(
    shell: Shell,
) -> None:
    async with bounded():
        with pytest.raises(ValueError, match="boom"):  # noqa: PT012 - the run is the body
            async with shell.run("t1") as run:
                await run.text("partial")
                raise ValueError("boom" + "!" * 100)
        frames = await shell.history("t1")
    assert [f["type"] for f in frames] == ["agent_started", "agent_text", "agent_error"]
    assert frames[-1]["data"] == {"error_type": "ValueError", "message": "boom" + "!" * 36}


async def test_an_error_inside_an_exception_group_is_the_error_reported(shell: Shell) -> None:
    async with bounded():
        with pytest.raises(ExceptionGroup):  # noqa: PT012 - the run is the body
            async with shell.run("t1"), trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                raise KeyError("missing")
        frames = await shell.history("t1")
    assert [f["type"] for f in frames] == ["agent_started", "agent_error"]
    assert frames[-1]["data"]["error_type"] == "KeyError"


async def test_an_exception_whose_message_cannot_be_read_still_ends_the_run(
    shell: Shell,
) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no message")

    async with bounded():
        with pytest.raises(Unprintable):
            async with shell.run("t1"):
                raise Unprintable
        frames = await shell.history("t1")
    assert frames[-1]["type"] == "agent_error"
    assert frames[-1]["data"]["message"] == "<Unprintable: message unavailable>"


async def test_run_cancel_ends_the_block_quietly_with_agent_cancelled(shell: Shell) -> None:
    async with bounded():
        async with shell.run("t1") as run:
            run.cancel("user pressed stop")
            await trio.sleep_forever()
        frames = await shell.history("t1")
    assert [f["type"] for f in frames] == ["agent_started", "agent_cancelled"]
    assert frames[-1]["data"] == {"reason": "user pressed stop"}
    assert run.ended


@pytest.mark.parametrize("how", ["move_on_after", "fail_after", "cancel_scope"])
async def test_outer_cancellation_and_timeouts_send_agent_cancelled(
    shell: Shell, how: str
) -> None:
    async with bounded():
        # Each deadline expires inside the body, once the run has started: a deadline that
        # could expire before agent_started is published would test nothing of the run.
        if how == "move_on_after":
            with trio.move_on_after(STEP) as timeout:
                async with shell.run("t1"):
                    timeout.deadline = trio.current_time()
                    await trio.sleep_forever()
        elif how == "fail_after":
            with pytest.raises(trio.TooSlowError):  # noqa: PT012 - the run is the body
                with trio.fail_after(STEP) as timeout:
                    async with shell.run("t1"):
                        timeout.deadline = trio.current_time()
                        await trio.sleep_forever()
        else:
            with trio.CancelScope() as scope:
                async with shell.run("t1"):
                    scope.cancel()
                    await trio.sleep_forever()
        frames = await shell.history("t1")
    assert [f["type"] for f in frames] == ["agent_started", "agent_cancelled"]
    assert frames[-1]["data"] == {"reason": "cancelled"}


async def test_an_unserialisable_result_sends_agent_error_then_raises(shell: Shell) -> None:
    async with bounded():
        with pytest.raises(InvalidEvent, match=r"run\.result"):
            async with shell.run("t1") as run:
                run.result = {"value": object()}
        frames = await shell.history("t1")
    assert [f["type"] for f in frames] == ["agent_started", "agent_error"]
    assert frames[-1]["data"]["error_type"] == "InvalidEvent"
    assert run.ended


@pytest.mark.parametrize(
    "event_type", ["agent_started", "agent_completed", "agent_error", "agent_cancelled"]
)
async def test_emit_refuses_the_types_the_scope_sends(shell: Shell, event_type: str) -> None:
    async with bounded():
        async with shell.run("t1") as run:
            with pytest.raises(InvalidEvent, match="emitted by the run scope"):
                await run.emit(event_type, {"reason": "x"})
        assert await types_of(shell) == ["agent_started", "agent_completed"]


async def test_nothing_can_be_emitted_after_the_terminal_event(shell: Shell) -> None:
    emitters: list[Callable[[AnyRun], Any]] = [
        lambda run: run.text("late"),
        lambda run: run.thinking("late"),
        lambda run: run.emit("custom_note", {"x": 1}),
        lambda run: run.tool_executing("t", {}),
    ]
    async with bounded():
        async with shell.run("t1") as run:
            pass
        for emit in emitters:
            with pytest.raises(RunEnded):
                await emit(run)
        assert await types_of(shell) == ["agent_started", "agent_completed"]
