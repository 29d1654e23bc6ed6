"""The admin credential: a static bearer token that guards the operator endpoints.

Rules of this module: pure, no I/O. ``/stats``, ``/config``, ``/metrics`` and the admin actions
answer only a request whose ``Authorization`` header is ``Bearer <admin token>``; the comparison
is constant-time so the token cannot be guessed byte by byte from response times.
"""

from __future__ import annotations

import hmac
from typing import Final

__all__ = ["MIN_ADMIN_TOKEN_BYTES", "admin_refusal", "check_admin_token"]

#: Shortest admin token accepted, in bytes (as long as a token secret).
MIN_ADMIN_TOKEN_BYTES: Final = 32
#: Scheme of the ``Authorization`` header the admin endpoints accept.
BEARER_SCHEME: Final = "bearer"


def check_admin_token(token: str | None) -> str | None:
    """Return ``token`` (None stays None) if it is long enough to guard the admin endpoints.

    Raises:
        ValueError: it is empty or shorter than 32 bytes.
    """
    if token is None:
        return None
    if len(token.encode()) < MIN_ADMIN_TOKEN_BYTES:
        raise ValueError(
            f"the admin token must be at least {MIN_ADMIN_TOKEN_BYTES} bytes long, got "
            f"{len(token.encode())}; generate one with: python -c "
            "'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


def admin_refusal(authorization: str | None, admin_token: str | None) -> tuple[int, str] | None:
    """Decide an admin request: None to serve it, else (status, message) to refuse it.

    403 when the server has no admin token (the endpoints are off), 401 when the request does
    not carry ``Authorization: Bearer <admin token>``.
    """
    if admin_token is None:
        return 403, (
            "admin endpoints are disabled: start the server with --admin-token "
            "(or AGENTCAST_ADMIN_TOKEN) and send Authorization: Bearer <token>"
        )
    scheme, _, credential = (authorization or "").strip().partition(" ")
    if scheme.lower() != BEARER_SCHEME or not hmac.compare_digest(
        credential.strip().encode(), admin_token.encode()
    ):
        return 401, "this endpoint needs Authorization: Bearer <admin token>"
    return None
