"""The HTTP front as an attacker meets it: odd upgrade heads, unparseable targets, a client that
never reads its answer, HEAD and 405 conformance.

The rules (``_http_rules``) are tested synchronously; the server over real loopback sockets on
port 0, every wait bounded by ``fail_after``. Each server test checks that the attacked request
got its answer, that a bystander user's stream stays complete and in order, and that no
connection task or file descriptor is left.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator

import attrs
import h11
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from trio_websocket import WebSocketConnection, open_websocket_url

from agentcast import AgentEvent, Config, EventType, UserContext
from agentcast.server import issue_token
from agentcast.server._app import REFUSAL_LOG_LIMIT, Server
from agentcast.server._http_rules import (
    MAX_STATS_PAGE,
    LogLimiter,
    NotUpgrade,
    Refusal,
    Upgrade,
    check_target,
    decide_upgrade,
    stats_page,
)
from agentcast.server._serve import RunningServer
from agentcast.server._settings import ServerSettings

from .serverkit import open_fds, serving

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
#: A handshake every browser sends; the odd heads below are variations of it.
GOOD = ["Host: x", "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13"]


def without(name: str, *extra: str) -> list[str]:
    return [line for line in GOOD if not line.lower().startswith(f"{name}:")] + list(extra)


#: name -> (HTTP version, header lines): upgrade attempts wsproto refuses (or raises on), or
#: that it accepts but agentcast refuses to be safe (duplicate or malformed handshake headers).
ODD_HEADS: dict[str, tuple[str, list[str]]] = {
    "http/1.0": ("1.0", GOOD),
    "http/1.0 without host": ("1.0", without("host")),
    "upgrade list": ("1.1", without("upgrade", "Upgrade: websocket, h2c")),
    "upgrade h2c first": ("1.1", without("upgrade", "Upgrade: h2c, websocket")),
    "second upgrade header": ("1.1", [*GOOD, "Upgrade: h2c"]),
    "later connection header": ("1.1", [*GOOD, "Connection: keep-alive"]),
    "no connection header": ("1.1", without("connection")),
    "connection without upgrade": ("1.1", without("connection", "Connection: keep-alive")),
    "two keys": ("1.1", [*GOOD, f"Sec-WebSocket-Key: {KEY}"]),
    "short key": ("1.1", without("sec-websocket-key", "Sec-WebSocket-Key: eA==")),
    "empty key": ("1.1", without("sec-websocket-key", "Sec-WebSocket-Key:")),
    "two versions": ("1.1", [*GOOD, "Sec-WebSocket-Version: 13"]),
    "version 8": ("1.1", without("sec-websocket-version", "Sec-WebSocket-Version: 8")),
    "no version": ("1.1", without("sec-websocket-version")),
    "non-ascii host": ("1.1", without("host", "Host: \xe9t\xe9")),
    "bad punycode host": ("1.1", without("host", "Host: xn--zzzz")),
    "non-ascii connection": ("1.1", without("connection", "Connection: Upgrade, \xff")),
    "non-ascii subprotocol": ("1.1", [*GOOD, "Sec-WebSocket-Protocol: \xff"]),
    "non-ascii extension": ("1.1", [*GOOD, "Sec-WebSocket-Extensions: \xff"]),
    "body by length": ("1.1", [*GOOD, "Content-Length: 5"]),
    "chunked body": ("1.1", [*GOOD, "Transfer-Encoding: chunked"]),
}


def request(lines: list[str], *, version: str = "1.1", target: str = "/ws",
            method: str = "GET") -> bytes:
    head = f"{method} {target} HTTP/{version}\r\n" + "".join(f"{line}\r\n" for line in lines)
    return (head + "\r\n").encode("latin-1")


def parsed(raw: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    """What the front hands ``decide_upgrade`` for ``raw`` (h11, as ``read_request_head``)."""
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(raw)
    event = parser.next_event()
    assert isinstance(event, h11.Request)
    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
    return event.method.decode(), event.http_version.decode(), headers


def wsproto_accepts(raw: bytes) -> bool:
    """Whether wsproto's server handshake takes ``raw`` and can answer it with a 101."""
    connection = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    try:
        connection.receive_data(raw)
        events = list(connection.events())
        if not events or not isinstance(events[0], wsproto.events.Request):
            return False
        connection.send(wsproto.events.AcceptConnection())
    except (wsproto.utilities.RemoteProtocolError, UnicodeError):
        return False
    return True


# ---- the rules, synchronously ---------------------------------------------------------------


def test_a_browser_handshake_is_an_upgrade_that_wsproto_accepts() -> None:
    raw = request(GOOD)
    assert decide_upgrade(*parsed(raw)) == Upgrade()
    assert wsproto_accepts(raw)
    firefox = request(without("connection", "Connection: keep-alive, Upgrade"))
    assert decide_upgrade(*parsed(firefox)) == Upgrade()


@pytest.mark.parametrize("name", sorted(ODD_HEADS))
def test_every_odd_head_is_refused_before_the_upgrade(name: str) -> None:
    version, lines = ODD_HEADS[name]
    decision = decide_upgrade(*parsed(request(lines, version=version)))
    assert isinstance(decision, Refusal)
    assert decision.status in (400, 405, 426)
    assert decision.message


@pytest.mark.parametrize("name", sorted(ODD_HEADS))
def test_nothing_decide_upgrade_accepts_is_refused_by_wsproto(name: str) -> None:
    # The contract the front relies on: Upgrade implies wsproto accepts. Checked on every
    # variation, including the ones wsproto itself would take.
    version, lines = ODD_HEADS[name]
    raw = request(lines, version=version)
    if isinstance(decide_upgrade(*parsed(raw)), Upgrade):
        assert wsproto_accepts(raw)


def test_version_refusals_name_the_version_and_non_get_upgrades_get_allow() -> None:
    wrong = decide_upgrade(*parsed(request(ODD_HEADS["version 8"][1])))
    assert wrong == Refusal(426, "only WebSocket version 13 is supported",
                            (("Sec-WebSocket-Version", "13"),))
    post = decide_upgrade(*parsed(request(GOOD, method="POST")))
    assert isinstance(post, Refusal)
    assert (post.status, post.headers) == (405, (("Allow", "GET, HEAD"),))


def test_other_upgrades_and_plain_requests_are_plain_http() -> None:
    assert decide_upgrade("GET", "1.1", [("host", "x")]) == NotUpgrade()
    assert decide_upgrade(
        "GET", "1.1", [("host", "x"), ("upgrade", "h2c"), ("connection", "Upgrade")]
    ) == NotUpgrade()
    assert decide_upgrade("GET", "1.0", [("connection", "upgrade")]) == NotUpgrade()


@pytest.mark.parametrize(
    "target", ["http://[/", "/health?x=%zz", "/%G0", "/a%", "http://[::1/x"]
)
def test_unparseable_targets_are_named(target: str) -> None:
    problem = check_target(target)
    assert problem is not None
    assert target not in problem  # the message never echoes client bytes


@pytest.mark.parametrize("target", ["/", "/health", "/ws?token=a.b-c_d&user=x%40y", "*"])
def test_ordinary_targets_pass(target: str) -> None:
    assert check_target(target) is None


def test_stats_pages_are_capped_and_bad_numbers_named() -> None:
    assert stats_page({}) == (0, MAX_STATS_PAGE)
    assert stats_page({"offset": ["5"], "limit": ["2"]}) == (5, 2)
    assert stats_page({"limit": ["100000"]}) == (0, MAX_STATS_PAGE)
    assert stats_page({"limit": ["0"]}) == (0, 1)
    assert stats_page({"offset": ["-1"]}) == "offset must be a non-negative integer, got '-1'"
    assert isinstance(stats_page({"limit": ["9" * 40]}), str)


def test_the_log_limiter_admits_n_per_period_then_reports_what_it_held_back() -> None:
    limiter = LogLimiter(3, 60.0)
    assert [limiter.admit(t) for t in (0.0, 1.0, 2.0)] == [(True, 0)] * 3
    assert [limiter.admit(t) for t in (3.0, 4.0, 59.0)] == [(False, 0)] * 3
    assert limiter.admit(60.0) == (True, 3)  # a new window: the count comes with the line
    assert limiter.admit(61.0) == (True, 0)


# ---- the server over real sockets -----------------------------------------------------------


def handler_tasks() -> int:
    """Tasks running ``Server.handle`` (one per TCP connection the server holds)."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, stack = 0, [root]
    while stack:
        task = stack.pop()
        awaiting: object = task.coro
        while awaiting is not None:  # the handler runs inside trio's own wrapper coroutine
            if getattr(awaiting, "cr_code", None) is Server.handle.__code__:
                count += 1
                break
            awaiting = getattr(awaiting, "cr_await", None)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def wait_for(condition: object, what: str, *, seconds: float = 10.0) -> None:
    """Poll ``condition()`` until true; the bound is the test's failure, not its timing."""
    assert callable(condition)
    with trio.fail_after(seconds):
        # A task's end is no event one can wait on; what changes it is a real-time deadline.
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


@attrs.define
class Running:
    running: RunningServer

    @property
    def port(self) -> int:
        return self.running.port

    async def exchange(self, data: bytes) -> bytes:
        """Send ``data``, read until the server closes (bounded), return what came back."""
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            async with stream:
                await stream.send_all(data)
                answer = b""
                try:
                    while chunk := await stream.receive_some(65536):
                        answer += chunk
                except trio.BrokenResourceError:
                    pass  # a reset after the answer still leaves the answer
        return answer

    async def publish(self, user: str, count: int) -> None:
        manager = self.running.server.manager
        session = manager.get_websocket_manager(UserContext.from_request(user_id=user))
        for n in range(count):
            event = AgentEvent(EventType.AGENT_TEXT, {"text": f"{n:06d}"})
            await session.send_to_thread("t1", event)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    settings = ServerSettings(
        port=0, secret=SECRET, demo=True, handshake_timeout=5.0, http_write_timeout=1.0,
        core=Config(shutdown_timeout=2.0),
    )
    async with serving(settings, bound=60) as served:
        yield Running(served.running)


@pytest.fixture
async def bystander(server: Running) -> AsyncIterator[WebSocketConnection]:
    url = f"ws://127.0.0.1:{server.port}/ws?token={issue_token(SECRET, 'bystander')}"
    async with open_websocket_url(url, connect_timeout=10) as ws:
        with trio.fail_after(10):
            await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
            assert json.loads(await ws.get_message())["type"] == "subscribed"
        yield ws


async def check_bystander(server: Running, ws: WebSocketConnection, count: int = 20) -> None:
    """The bystander gets ``count`` fresh events, all of them, in order."""
    with trio.fail_after(10):
        await server.publish("bystander", count)
        values = [json.loads(await ws.get_message())["data"]["text"] for _ in range(count)]
    assert values == [f"{n:06d}" for n in range(count)]


async def test_odd_upgrade_heads_are_answered_and_leave_no_task(
    server: Running, bystander: WebSocketConnection
) -> None:
    baseline = handler_tasks()
    token = issue_token(SECRET, "attacker")
    for name, (version, lines) in ODD_HEADS.items():
        answer = await server.exchange(
            request(lines, version=version, target=f"/ws?token={token}")
        )
        assert status_of(answer) in (400, 405, 426), name
    # Every refused request's task ends with its answer (before this fix: each stayed until
    # trio-websocket's connect timeout, a minute).
    await trio.testing.wait_all_tasks_blocked()
    assert handler_tasks() == baseline
    assert server.running.server.manager.session("attacker") is None
    rejections = server.running.server.rejections
    assert sum(rejections.values()) == len(ODD_HEADS)
    await check_bystander(server, bystander)


async def test_unparseable_heads_get_400_and_one_short_line_each_rate_limited(
    server: Running, bystander: WebSocketConnection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentcast")
    bad = [b"GET http://[/ HTTP/1.1\r\nHost: x\r\n\r\n",
           b"GET /health?x=%zz HTTP/1.1\r\nHost: x\r\n\r\n",
           b"GET /\xe9t\xe9 HTTP/1.1\r\nHost: x\r\n\r\n",
           b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"]
    for data in bad:
        answer = await server.exchange(data)
        assert status_of(answer) == 400
        assert b"Content-Length" in answer
    # h11 quotes the bad line in its message; none of it is echoed or logged (a token could
    # be in it).
    leaky = b"GET /ws?token=tok-SECRET-123 HTTP/1.1 junk\r\nHost: x\r\n\r\n"
    answer = await server.exchange(leaky)
    assert status_of(answer) == 400
    assert b"tok-SECRET-123" not in answer
    bad.append(leaky)
    records = [r for r in caplog.records if r.name.startswith("agentcast")]
    assert not any("tok-SECRET-123" in r.getMessage() for r in records)
    assert len(records) == len(bad)
    assert all(r.exc_info is None and len(r.getMessage()) < 200 for r in records)
    # A flood of them logs at most REFUSAL_LOG_LIMIT lines a minute.
    caplog.clear()
    for _ in range(REFUSAL_LOG_LIMIT + 10):
        assert status_of(await server.exchange(bad[0])) == 400
    logged = [r for r in caplog.records if r.name.startswith("agentcast")]
    assert len(logged) <= REFUSAL_LOG_LIMIT
    assert all(r.exc_info is None for r in logged)
    await check_bystander(server, bystander)


async def test_a_client_that_never_reads_its_answer_is_cut_at_the_write_deadline(
    server: Running, bystander: WebSocketConnection
) -> None:
    page = b"<!-- big -->" + b"x" * (32 * 1024 * 1024)  # far more than both socket buffers
    server.running.server.demo_page = page
    tasks, fds = handler_tasks(), open_fds()
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with trio.fail_after(10):
        await sock.connect(("127.0.0.1", server.port))
        stream = trio.SocketStream(sock)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: handler_tasks() == tasks + 1, "the request is being answered")
        # Meanwhile others are served.
        assert status_of(await server.exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")) == 200
        # At the deadline the handler gives up: its task and its socket are gone while the
        # client still holds its end, unread.
        await wait_for(lambda: handler_tasks() == tasks, "the stuck answer is cut")
        assert open_fds() == fds + 1  # only the client's own socket
        received = 0
        try:
            while chunk := await stream.receive_some(1 << 20):
                received += len(chunk)
        except trio.BrokenResourceError:
            pass  # the server reset the connection: what it still held was dropped
        await stream.aclose()
    assert received < len(page)
    assert open_fds() == fds
    await check_bystander(server, bystander)


async def test_head_answers_carry_no_body_and_405_carries_allow(server: Running) -> None:
    get = await server.exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await server.exchange(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    _, _, get_body = get.partition(b"\r\n\r\n")
    head_head, _, head_body = head.partition(b"\r\n\r\n")
    assert head_body == b""
    assert f"Content-Length: {len(get_body)}".encode() in head_head
    assert status_of(head) == status_of(get) == 200
    page = await server.exchange(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert page.endswith(b"\r\n\r\n")
    assert b"text/html" in page
    for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS"):
        answer = await server.exchange(method + b" /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(answer) == 405
        assert b"\r\nAllow: GET, HEAD\r\n" in answer
