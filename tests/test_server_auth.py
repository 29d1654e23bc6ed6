"""Tokens: signed, expiring, bound to one user; every failure is one AuthError with a reason."""

from __future__ import annotations

import time

import jwt
import pytest

from agentcast import InvalidIdentifier
from agentcast.server import AuthError, issue_token, verify_token

SECRET = "s3cret-for-tests-that-is-long-enough-for-hs256"


def test_a_token_round_trips_user_and_threads() -> None:
    token = issue_token(SECRET, "alice", threads=["t1", "t2"], ttl=60)
    claims = verify_token(token, SECRET)
    assert claims.user_id == "alice"
    assert claims.threads == ("t1", "t2")
    assert claims.expires_at > time.time()


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("not-a-jwt", "invalid"),
        (issue_token("another-secret-that-is-long-enough-too", "alice"), "invalid"),
        (issue_token(SECRET, "alice", ttl=1, now=time.time() - 3600), "expired"),
        (jwt.encode({"sub": "None", "exp": int(time.time()) + 3600}, SECRET), "invalid"),
        (jwt.encode({"sub": "alice"}, SECRET), "invalid"),
        (jwt.encode({"sub": "alice", "exp": int(time.time()) + 3600}, SECRET * 2, "HS512"),
         "invalid"),
        (jwt.encode({"sub": "a", "exp": int(time.time()) + 3600, "threads": "t1"}, SECRET),
         "invalid"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(token: str | None, reason: str) -> None:
    with pytest.raises(AuthError) as refused:
        verify_token(token, SECRET)
    assert refused.value.reason == reason
    if token:
        assert token not in str(refused.value)


def test_a_token_for_another_user_is_refused() -> None:
    token = issue_token(SECRET, "alice")
    with pytest.raises(AuthError) as refused:
        verify_token(token, SECRET, claimed_user="bob")
    assert refused.value.reason == "wrong_user"


def test_the_none_algorithm_is_never_accepted() -> None:
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, "none")
    with pytest.raises(AuthError):
        verify_token(unsigned, SECRET)


def test_issuing_validates_its_inputs() -> None:
    with pytest.raises(InvalidIdentifier, match="user_id"):
        issue_token(SECRET, "null")
    with pytest.raises(ValueError, match="ttl"):
        issue_token(SECRET, "alice", ttl=0)
    with pytest.raises(ValueError, match="secret"):
        issue_token("", "alice")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        issue_token("short", "alice")
