"""The admin credential's rules (pure): off without a token, bearer-only, long enough."""

from __future__ import annotations

import pytest

from agentcast.server._admin import admin_refusal, check_admin_token

TOKEN = "an-admin-token-that-is-at-least-32-bytes"


def test_without_an_admin_token_the_endpoints_are_off_and_say_how_to_enable_them() -> None:
    refusal = admin_refusal(f"Bearer {TOKEN}", None)
    assert refusal is not None
    status, message = refusal
    assert status == 403
    assert "--admin-token" in message


@pytest.mark.parametrize(
    "header",
    [None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer "],
)
def test_anything_but_the_exact_bearer_token_is_401(header: str | None) -> None:
    assert admin_refusal(header, TOKEN) == (
        401, "this endpoint needs Authorization: Bearer <admin token>"
    )


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"  Bearer  {TOKEN} "])
def test_the_bearer_token_is_accepted(header: str) -> None:
    assert admin_refusal(header, TOKEN) is None


def test_a_short_admin_token_is_refused_with_how_to_make_one() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        check_admin_token("short")
    assert check_admin_token(None) is None
    assert check_admin_token(TOKEN) == TOKEN
