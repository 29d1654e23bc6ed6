"""The pure rules of tokens (synchronous): claims fail closed, issuer and audience, the
revocation cut-off, the expiry plan on the watchdog's clock, narrowing on refresh, and the new
frames; then the core's side of it in process (``autojump_clock``, no sockets): an embedder's
own ``Credentials`` expire and refresh without PyJWT or the server."""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
import jwt
import pytest
import trio

import agentcast
from agentcast import ClientError, Config, UserContext
from agentcast._credentials import TOKEN_EXPIRING_NOTICE, narrow_threads, plan_expiry
from agentcast._protocol import (
    ProtocolError,
    Refresh,
    parse_client_frame,
    refreshed_frame,
    token_expiring_frame,
)
from agentcast.server import AuthError, issue_token, verify_token
from agentcast.server._auth import MAX_TOKEN_LIFETIME, Claims, is_revoked
from agentcast.testing import MemoryTransport

from .helpers import Client, connect

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
NOW = int(time.time())


def signed(**claims: Any) -> str:
    return jwt.encode({"sub": "alice", "iat": NOW, "exp": NOW + 600, **claims}, SECRET)


@pytest.mark.parametrize(
    "threads",
    [[], False, 0, "", None, {}, "t1", ["t1", ""], ["t1", 7], ["None"], [["t1"]], True],
)
def test_a_threads_claim_that_is_present_must_be_a_non_empty_list_of_ids(threads: Any) -> None:
    with pytest.raises(AuthError) as refused:
        verify_token(signed(threads=threads), SECRET)
    assert refused.value.reason == "invalid"


def test_no_threads_claim_means_every_thread_and_a_list_confines() -> None:
    assert verify_token(signed(), SECRET).threads == ()
    assert verify_token(signed(threads=["t1", "t2"]), SECRET).threads == ("t1", "t2")


def test_iat_is_required_and_the_lifetime_is_bounded() -> None:
    no_iat = jwt.encode({"sub": "alice", "exp": NOW + 600}, SECRET)
    too_long = signed(exp=NOW + MAX_TOKEN_LIFETIME + 1)
    for bad in (no_iat, too_long):
        with pytest.raises(AuthError) as refused:
            verify_token(bad, SECRET)
        assert refused.value.reason == "invalid"
    assert verify_token(signed(exp=NOW + MAX_TOKEN_LIFETIME), SECRET).issued_at == NOW
    with pytest.raises(ValueError, match="at most"):
        issue_token(SECRET, "alice", ttl=MAX_TOKEN_LIFETIME + 1)


@pytest.mark.parametrize(
    ("claims", "issuer", "audience", "ok"),
    [
        ({}, None, None, True),
        ({"aud": "anyone"}, None, None, True),  # no audience configured: aud not checked
        ({"aud": ["a", "b"]}, None, "b", True),
        ({"aud": "a"}, None, "b", False),
        ({}, None, "b", False),
        ({"iss": "me"}, "me", None, True),
        ({"iss": "them"}, "me", None, False),
        ({}, "me", None, False),
    ],
)
def test_issuer_and_audience(
    claims: dict[str, Any], issuer: str | None, audience: str | None, ok: bool
) -> None:
    token = signed(**claims)
    if ok:
        assert verify_token(token, SECRET, issuer=issuer, audience=audience).user_id == "alice"
    else:
        with pytest.raises(AuthError):
            verify_token(token, SECRET, issuer=issuer, audience=audience)


def test_issue_token_sets_issuer_and_audience() -> None:
    token = issue_token(SECRET, "alice", issuer="me", audience="app")
    assert verify_token(token, SECRET, issuer="me", audience="app").user_id == "alice"


def test_the_cut_off_refuses_tokens_issued_at_or_before_it() -> None:
    claims = Claims("alice", (), NOW + 600, NOW)
    assert not is_revoked(claims, None)
    assert is_revoked(claims, NOW + 0.5)
    assert is_revoked(claims, NOW)  # same second: refused (fail closed)
    assert not is_revoked(claims, NOW - 1)


def test_the_expiry_plan_maps_unix_time_onto_the_watchdog_clock() -> None:
    plan = plan_expiry(1000.0, 5.0, wall_now=900.0, clock_now=10.0)
    assert plan.close_at == 10.0 + 100.0 + 5.0
    assert plan.warn_at == 10.0 + 100.0 - TOKEN_EXPIRING_NOTICE
    short = plan_expiry(902.0, 0.0, wall_now=900.0, clock_now=10.0)
    assert short.warn_at < 10.0 < short.close_at == 12.0  # warned on the first sweep


def test_a_refresh_may_keep_or_narrow_the_threads_only() -> None:
    assert narrow_threads(None, None) is None
    assert narrow_threads(None, frozenset({"t1"})) == frozenset({"t1"})
    assert narrow_threads(frozenset({"t1", "t2"}), frozenset({"t1"})) == frozenset({"t1"})
    assert narrow_threads(frozenset({"t1"}), frozenset({"t1"})) == frozenset({"t1"})
    with pytest.raises(ValueError, match="t2"):
        narrow_threads(frozenset({"t1"}), frozenset({"t1", "t2"}))
    with pytest.raises(ValueError, match="every thread"):
        narrow_threads(frozenset({"t1"}), None)


def test_refresh_frames_parse_and_render() -> None:
    frame = parse_client_frame('{"type": "refresh", "token": "abc"}', max_bytes=100)
    assert frame == Refresh("abc")
    assert "abc" not in repr(Refresh("abc"))
    for bad in ('{"type": "refresh"}', '{"type": "refresh", "token": ""}',
                '{"type": "refresh", "token": 5}'):
        with pytest.raises(ProtocolError) as refused:
            parse_client_frame(bad, max_bytes=100)
        assert refused.value.code == "invalid_field"
        assert refused.value.close_code is None
    assert json.loads(refreshed_frame(1700000000.0)) == {
        "type": "refreshed", "expires_at": 1700000000
    }
    assert json.loads(token_expiring_frame(1700000000.5)) == {
        "type": "token_expiring", "expires_at": 1700000000.5
    }


def test_agentcast_token_sets_issuer_and_audience(capsys: pytest.CaptureFixture[str]) -> None:
    from agentcast.server._cli import main

    status = main(["token", "--user", "alice", "--secret", SECRET, "--issuer", "me",
                   "--audience", "app", "--ttl", "60"])
    assert status == 0
    claims = verify_token(capsys.readouterr().out.strip(), SECRET, issuer="me", audience="app")
    assert claims.user_id == "alice"
    assert main(["token", "--user", "alice", "--secret", SECRET, "--ttl", str(10**7)]) == 2
    assert "at most" in capsys.readouterr().err


@attrs.frozen
class FakeGrant:
    """An embedder's credentials: any token "ok-<seconds>" renews for that many seconds."""

    user_id: str
    expires_at: float
    grace: float = 0.0
    threads: frozenset[str] | None = None

    async def refresh(self, token: str) -> FakeGrant:
        await trio.lowlevel.checkpoint()
        if not token.startswith("ok-"):
            raise ClientError("bad_token", "not ok")
        return attrs.evolve(self, expires_at=time.time() + float(token[3:]))


async def test_injected_credentials_expire_and_refresh_in_the_core(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with agentcast.open_manager(Config(write_timeout=0.8)) as manager:
        session = manager.get_websocket_manager(UserContext(user_id="alice"))
        untimed, untimed_connection = await connect(session)
        server_side, client_side = MemoryTransport.pair()
        renewed = await session.add_connection(
            server_side, credentials=FakeGrant("alice", time.time() + 40)
        )
        client = Client(client_side)
        with trio.fail_after(60):
            assert (await client.receive())["type"] == "token_expiring"  # 30 s before
            await client.send({"type": "refresh", "token": "nope"})
            assert (await client.receive())["code"] == "bad_token"
            await client.send({"type": "refresh", "token": "ok-3600"})
            assert (await client.receive())["type"] == "refreshed"
            expired_side, expired_client = MemoryTransport.pair()
            expired = await session.add_connection(
                expired_side, credentials=FakeGrant("alice", time.time() + 5)
            )
            frames, code = await Client(expired_client).receive_closed()
        assert code == 4001
        assert [frame["type"] for frame in frames] == ["token_expiring"]
        assert expired.close_code == 4001
        # The refreshed one and the one without credentials stay open.
        assert renewed.close_code is None
        assert untimed_connection.close_code is None
        await untimed.send({"type": "refresh", "token": "ok-60"})
        assert (await untimed.receive())["code"] == "bad_token"
