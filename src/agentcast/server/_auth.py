"""Signed access tokens (JWT, HS256 by default): who the client is and which threads it may see.

PyJWT does the cryptography and the time checks; this module only decides what a valid
agentcast token holds and turns every failure into one :class:`AuthError` with a reason that is
safe to log (it never contains the token).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

import attrs
import jwt

from .._errors import AgentcastError, InvalidIdentifier
from .._ids import check_id

__all__ = ["AuthError", "Claims", "check_secret", "issue_token", "verify_token"]

#: Algorithm used when none is configured.
DEFAULT_ALGORITHM: Final = "HS256"
#: Token lifetime when none is given, in seconds.
DEFAULT_TTL: Final = 3600
#: Seconds of clock difference tolerated between issuer and server.
LEEWAY: Final = 5
#: Shortest HMAC secret accepted, in bytes (RFC 7518 section 3.2 for HS256).
MIN_SECRET_BYTES: Final = 32


def check_secret(secret: str | None) -> str:
    """Return ``secret`` if it is long enough to sign HS256 tokens safely.

    Raises:
        ValueError: it is missing or shorter than 32 bytes.
    """
    if not secret:
        raise ValueError("a secret is required to sign and verify tokens")
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the secret must be at least {MIN_SECRET_BYTES} bytes long, "
            f"got {len(secret.encode())}; generate one with: python -c "
            "'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return secret


class AuthError(AgentcastError):
    """A token was missing, malformed, expired, forged, or for another user.

    ``reason`` is a short label for metrics and logs (``missing``, ``expired``, ``invalid``,
    ``wrong_user``); the token itself never appears in it.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@attrs.frozen
class Claims:
    """What a verified token grants."""

    #: The user the token was issued to.
    user_id: str
    #: Threads the token limits the client to; empty means any thread of this user.
    threads: tuple[str, ...] = ()
    #: Expiry, Unix seconds.
    expires_at: float = 0.0


def issue_token(
    secret: str,
    user_id: str,
    *,
    threads: Sequence[str] = (),
    ttl: float = DEFAULT_TTL,
    algorithm: str = DEFAULT_ALGORITHM,
    now: float | None = None,
) -> str:
    """Return a signed token for ``user_id`` valid for ``ttl`` seconds.

    Raises:
        InvalidIdentifier: the user or a thread id is invalid.
        ValueError: ``ttl`` is not positive or the secret is missing or short.
    """
    check_secret(secret)
    if ttl <= 0:
        raise ValueError(f"ttl must be > 0 seconds, got {ttl!r}")
    check_id("user_id", user_id)
    for thread_id in threads:
        check_id("thread_id", thread_id)
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {"sub": user_id, "iat": int(issued), "exp": int(issued + ttl)}
    if threads:
        payload["threads"] = list(threads)
    return jwt.encode(payload, secret, algorithm=algorithm)


def verify_token(
    token: str | None,
    secret: str,
    *,
    claimed_user: str | None = None,
    algorithms: Sequence[str] = (DEFAULT_ALGORITHM,),
) -> Claims:
    """Check signature, expiry and subject; return what the token grants.

    Args:
        token: the raw token, or None when the client sent none.
        claimed_user: the user the client says it is (e.g. ``?user=``); must match ``sub``.

    Raises:
        AuthError: with ``reason`` one of missing, expired, invalid, wrong_user.
    """
    if not token:
        raise AuthError(
            "missing", "no token: send Sec-WebSocket-Protocol bearer.<token> or ?token="
        )
    try:
        payload = jwt.decode(
            token, secret, algorithms=list(algorithms), leeway=LEEWAY,
            options={"require": ["sub", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("expired", "the token has expired") from None
    except jwt.PyJWTError as exc:
        raise AuthError("invalid", f"the token is invalid: {type(exc).__name__}") from None
    try:
        user_id = check_id("sub", payload.get("sub"))
        threads = payload.get("threads") or []
        if not isinstance(threads, list):
            raise InvalidIdentifier("threads must be a list")
        allowed = tuple(check_id("thread_id", thread) for thread in threads)
    except InvalidIdentifier as exc:
        raise AuthError("invalid", f"the token's claims are invalid: {exc}") from None
    if claimed_user is not None and claimed_user != user_id:
        raise AuthError("wrong_user", "the token was issued to a different user")
    return Claims(user_id, allowed, float(payload["exp"]))
