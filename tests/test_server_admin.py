"""The admin surface over real sockets: ``/stats``, ``/config`` and ``/metrics`` behind the admin
token, ``/health`` public and credential-free, ``/stats`` totals-only unless paged, and no
password of the Redis URL in any answer or log line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from agentcast import Config, UserContext, open_manager
from agentcast._redact import redact_text, redact_url
from agentcast.server import issue_token
from agentcast.server._serve import RunningServer
from agentcast.server._settings import ServerSettings

from .serverkit import serving

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
ADMIN = "an-admin-token-that-is-at-least-32-bytes-long"
PASSWORD = "hunter2-redis-password"
USERS = ["ann@example.com", "bob@example.com", "cy@example.com", "di@example.com",
         "ed@example.com"]


@attrs.define
class Running:
    running: RunningServer

    async def get(
        self, path: str, *, token: str | None = None, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lowercase names) and body of one request; bounded."""
        auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", self.running.port)
            async with stream:
                await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(": ")
            headers[name.lower()] = value
        return int(lines[0].split()[1]), headers, body


@pytest.fixture
async def admin_server(request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    settings: ServerSettings = getattr(request, "param", None) or ServerSettings(
        port=0, secret=SECRET, admin_token=ADMIN, core=Config(shutdown_timeout=2.0)
    )
    async with serving(settings, bound=60) as served:
        yield Running(served.running)


ADMIN_PATHS = ["/stats", "/config", "/metrics"]


@pytest.mark.parametrize("path", ADMIN_PATHS)
async def test_admin_endpoints_need_the_bearer_token(admin_server: Running, path: str) -> None:
    for token in (None, "wrong", ADMIN + "x", ADMIN[:-1]):
        status, headers, body = await admin_server.get(path, token=token)
        assert status == 401
        assert headers["www-authenticate"] == "Bearer"
        assert json.loads(body) == {
            "error": "this endpoint needs Authorization: Bearer <admin token>"
        }
    status, _, head_body = await admin_server.get(path, method="HEAD")
    assert (status, head_body) == (401, b"")
    status, _, _ = await admin_server.get(path, token=ADMIN)
    assert status == 200


@pytest.mark.parametrize(
    "admin_server",
    [ServerSettings(port=0, secret=SECRET, core=Config(shutdown_timeout=2.0))],
    indirect=True,
)
@pytest.mark.parametrize("path", ADMIN_PATHS)
async def test_without_an_admin_token_they_are_off_and_say_how_to_enable_them(
    admin_server: Running, path: str
) -> None:
    status, _, body = await admin_server.get(path, token=ADMIN)
    assert status == 403
    assert "--admin-token" in json.loads(body)["error"]


async def test_stats_has_totals_only_and_pages_users_on_request(admin_server: Running) -> None:
    port = admin_server.running.port
    async with trio.open_nursery() as nursery:
        opened = trio.Semaphore(0)
        done = trio.Event()

        async def tab(user: str) -> None:
            url = f"ws://127.0.0.1:{port}/ws?token={issue_token(SECRET, user)}"
            async with open_websocket_url(url, connect_timeout=10):
                opened.release()
                await done.wait()

        for user in USERS:
            nursery.start_soon(tab, user)
        with trio.fail_after(10):
            for _ in USERS:
                await opened.acquire()
        manager = admin_server.running.server.manager
        while manager.get_stats(per_user=False).connections != len(USERS):
            await trio.testing.wait_all_tasks_blocked()

        status, _, body = await admin_server.get("/stats", token=ADMIN)
        assert status == 200
        stats = json.loads(body)
        assert (stats["users"], stats["connections"]) == (len(USERS), len(USERS))
        assert "per_user" not in stats
        assert "example.com" not in body.decode()  # no user id without ?users=1
        _, _, metrics = await admin_server.get("/metrics", token=ADMIN)
        assert "example.com" not in metrics.decode()

        _, _, body = await admin_server.get("/stats?users=1&limit=2", token=ADMIN)
        first = json.loads(body)
        assert first["page"] == {"offset": 0, "limit": 2, "total": 5, "next_offset": 2}
        assert list(first["per_user"]) == sorted(USERS)[:2]
        assert first["per_user"][sorted(USERS)[0]]["connections"] == 1
        _, _, body = await admin_server.get("/stats?users=1&offset=4&limit=2", token=ADMIN)
        last = json.loads(body)
        assert last["page"]["next_offset"] is None
        assert list(last["per_user"]) == sorted(USERS)[4:]
        _, _, body = await admin_server.get("/stats?users=1&limit=100000", token=ADMIN)
        assert json.loads(body)["page"]["limit"] == 100
        status, _, body = await admin_server.get("/stats?users=1&limit=lots", token=ADMIN)
        assert status == 400
        assert "limit must be a non-negative integer" in json.loads(body)["error"]
        done.set()


async def test_get_stats_without_per_user_keeps_the_totals() -> None:
    async with open_manager(Config()) as manager:
        for user in USERS:
            manager.get_websocket_manager(UserContext(user_id=user))
        full, cheap = manager.get_stats(), manager.get_stats(per_user=False)
        assert set(full.per_user) == set(USERS)
        assert cheap.per_user == {}
        assert attrs.evolve(cheap, per_user=full.per_user) == full
        assert manager.user_ids() == sorted(USERS)


REDIS_SETTINGS = ServerSettings(
    port=0, secret=SECRET, admin_token=ADMIN,
    # Nothing listens on port 1: the broker starts not ready, with a reason naming the URL.
    redis_url=f"redis://agentcast:{PASSWORD}@127.0.0.1:1/0",
    core=Config(shutdown_timeout=2.0),
)


@pytest.fixture
def agentcast_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every agentcast log record, from before the server starts (list it first)."""
    caplog.set_level(logging.DEBUG, logger="agentcast")
    return caplog


@pytest.mark.parametrize("admin_server", [REDIS_SETTINGS], indirect=True)
async def test_the_redis_password_is_in_no_answer_and_no_log_line(
    agentcast_logs: pytest.LogCaptureFixture, admin_server: Running
) -> None:
    caplog = agentcast_logs
    status, _, body = await admin_server.get("/health")
    health = json.loads(body)
    assert status == 503
    assert set(health) == {"status", "ready", "draining", "reason"}
    assert "redis://agentcast:***@127.0.0.1:1/0" in health["reason"]
    _, _, config = await admin_server.get("/config", token=ADMIN)
    assert json.loads(config)["redis_url"] == "redis://agentcast:***@127.0.0.1:1/0"
    assert json.loads(config)["admin_token"] == "***"
    answers = [body, config]
    for path in ("/stats", "/metrics"):
        answers.append((await admin_server.get(path, token=ADMIN))[2])
    for answer in answers:
        for credential in (PASSWORD, SECRET, ADMIN):
            assert credential.encode() not in answer
    assert caplog.records  # the broker did log its failed connection
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()
    assert PASSWORD not in repr(admin_server.running.server.manager.broker)
    assert PASSWORD not in repr(admin_server.running.server.settings)


async def test_health_is_public_and_says_only_readiness(admin_server: Running) -> None:
    status, _, body = await admin_server.get("/health")
    assert status == 200
    assert json.loads(body) == {"status": "ok", "ready": True, "draining": False}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@host", "redis://:***@host"),
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://user:p@ss:w0rd@host/1", "rediss://user:***@host/1"),
        ("redis://host:6379/0?password=pw&db=1", "redis://host:6379/0?password=***&db=1"),
        ("redis://user@host", "redis://user@host"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://[", "redis://["),
        ("not a url", "not a url"),
    ],
)
def test_redact_url_masks_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_masks_the_url_and_its_password_anywhere_in_a_message() -> None:
    url = "redis://app:s3cret-pw@db:6379/0"
    text = f"connecting to {url} failed: AUTH s3cret-pw refused"
    assert redact_text(text, url) == (
        "connecting to redis://app:***@db:6379/0 failed: AUTH *** refused"
    )
    assert redact_text("no url here", None) == "no url here"
