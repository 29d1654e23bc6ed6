"""Signed access tokens (JWT, HS256 by default): who the client is and which threads it may see.

PyJWT does the cryptography and the time checks; this module only decides what a valid
agentcast token holds and turns every failure into one :class:`AuthError` with a reason that is
safe to log (it never contains the token).

Rules of this module: claims fail closed. A ``threads`` claim that is present must be a
non-empty list of valid thread ids (``[]``, ``false``, ``0`` or ``""`` are refused, never read
as "every thread"); ``iat`` is required, because revocation refuses tokens issued before a
cut-off and a token without it could not be judged; a token may live at most
``MAX_TOKEN_LIFETIME``, the time a revocation cut-off is kept. No I/O here: the cut-off itself
is looked up by the server (in memory, or in Redis when scaled out) and judged by
:func:`is_revoked`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

import attrs
import jwt

from .._errors import AgentcastError, InvalidIdentifier
from .._ids import check_id

__all__ = [
    "AuthError",
    "Claims",
    "check_secret",
    "check_threads_claim",
    "is_revoked",
    "issue_token",
    "verify_token",
]

#: Algorithm used when none is configured.
DEFAULT_ALGORITHM: Final = "HS256"
#: Token lifetime when none is given, in seconds.
DEFAULT_TTL: Final = 3600
#: Seconds of clock difference tolerated between issuer and server.
LEEWAY: Final = 5
#: Shortest HMAC secret accepted, in bytes (RFC 7518 section 3.2 for HS256).
MIN_SECRET_BYTES: Final = 32
#: Longest lifetime (``exp - iat``) of a token accepted, in seconds (8 days: longer than the
#: demo page's week-long token). A revocation cut-off is kept this long, so no token issued
#: before a revocation can outlive it.
MAX_TOKEN_LIFETIME: Final = 8 * 24 * 3600


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
    #: Threads the token limits the client to; empty means the token has no ``threads``
    #: claim, so any thread of this user.
    threads: tuple[str, ...] = ()
    #: Expiry, Unix seconds.
    expires_at: float = 0.0
    #: Issue time (``iat``), Unix seconds; revocation refuses tokens issued before a cut-off.
    issued_at: float = 0.0


def is_revoked(claims: Claims, cutoff: float | None) -> bool:
    """Whether a revocation cut-off (Unix seconds, None: never revoked) refuses ``claims``.

    A token issued in the same second as the revocation is refused too (``iat`` has whole
    seconds, and failing closed is the safe side): mint new tokens a second later.
    """
    return cutoff is not None and claims.issued_at <= cutoff


def issue_token(
    secret: str,
    user_id: str,
    *,
    threads: Sequence[str] = (),
    ttl: float = DEFAULT_TTL,
    algorithm: str = DEFAULT_ALGORITHM,
    now: float | None = None,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """Return a signed token for ``user_id`` valid for ``ttl`` seconds.

    Args:
        issuer: the ``iss`` claim, for servers started with ``--token-issuer``.
        audience: the ``aud`` claim, for servers started with ``--token-audience``.

    Raises:
        InvalidIdentifier: the user or a thread id is invalid.
        ValueError: ``ttl`` is not positive or longer than ``MAX_TOKEN_LIFETIME``, or the
            secret is missing or short.
    """
    check_secret(secret)
    if ttl <= 0:
        raise ValueError(f"ttl must be > 0 seconds, got {ttl!r}")
    if ttl > MAX_TOKEN_LIFETIME:
        raise ValueError(
            f"ttl must be at most {MAX_TOKEN_LIFETIME} seconds (8 days): servers refuse longer "
            f"tokens, as a revocation is kept that long; got {ttl!r}"
        )
    check_id("user_id", user_id)
    for thread_id in threads:
        check_id("thread_id", thread_id)
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {"sub": user_id, "iat": int(issued), "exp": int(issued + ttl)}
    if threads:
        payload["threads"] = list(threads)
    if issuer is not None:
        payload["iss"] = issuer
    if audience is not None:
        payload["aud"] = audience
    return jwt.encode(payload, secret, algorithm=algorithm)


def verify_token(
    token: str | None,
    secret: str,
    *,
    claimed_user: str | None = None,
    algorithms: Sequence[str] = (DEFAULT_ALGORITHM,),
    leeway: float = LEEWAY,
    issuer: str | None = None,
    audience: str | None = None,
) -> Claims:
    """Check signature, expiry, subject (and issuer and audience when configured); return what
    the token grants.

    Args:
        token: the raw token, or None when the client sent none.
        claimed_user: the user the client says it is (e.g. ``?user=``); must match ``sub``.
        leeway: seconds of clock difference tolerated on ``exp`` and ``iat``.
        issuer: when set, ``iss`` must equal it.
        audience: when set, ``aud`` must name it. When None, an ``aud`` claim is not checked
            (PyJWT would refuse every token that carries one): the server then has no audience
            to compare with, and refusing would only break issuers that always set it.

    Raises:
        AuthError: with ``reason`` one of missing, expired, invalid, wrong_user.
    """
    if not token:
        raise AuthError(
            "missing", "no token: send Sec-WebSocket-Protocol bearer.<token> or ?token="
        )
    required = ["sub", "exp", "iat"]
    if issuer is not None:
        required.append("iss")
    if audience is not None:
        required.append("aud")
    try:
        payload = jwt.decode(
            token, secret, algorithms=list(algorithms), leeway=leeway,
            issuer=issuer, audience=audience,
            options={"require": required, "verify_aud": audience is not None},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("expired", "the token has expired") from None
    except jwt.PyJWTError as exc:
        raise AuthError("invalid", f"the token is invalid: {type(exc).__name__}") from None
    try:
        user_id = check_id("sub", payload.get("sub"))
        allowed = check_threads_claim(payload)
        issued_at, expires_at = _times(payload)
    except InvalidIdentifier as exc:
        raise AuthError("invalid", f"the token's claims are invalid: {exc}") from None
    if claimed_user is not None and claimed_user != user_id:
        raise AuthError("wrong_user", "the token was issued to a different user")
    return Claims(user_id, allowed, expires_at, issued_at)


def check_threads_claim(payload: dict[str, Any]) -> tuple[str, ...]:
    """The threads a token's claims confine it to; ``()`` when it has no ``threads`` claim.

    Fails closed: a claim that is present must be a non-empty list of valid thread ids.

    Raises:
        InvalidIdentifier: the claim is present but not such a list.
    """
    if "threads" not in payload:
        return ()
    threads = payload["threads"]
    if not isinstance(threads, list) or not threads:
        raise InvalidIdentifier(
            "threads must be a non-empty list of thread ids; leave the claim out to allow "
            "every thread of the user"
        )
    return tuple(check_id("thread_id", thread) for thread in threads)


def _times(payload: dict[str, Any]) -> tuple[float, float]:
    """(iat, exp) of a decoded token, with its lifetime checked against MAX_TOKEN_LIFETIME."""
    issued, expires = payload["iat"], payload["exp"]
    if isinstance(issued, bool) or not isinstance(issued, int | float):
        raise InvalidIdentifier("iat must be a number of seconds")
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise InvalidIdentifier("exp must be a number of seconds")
    if expires - issued > MAX_TOKEN_LIFETIME:
        raise InvalidIdentifier(
            f"the token lives longer than {MAX_TOKEN_LIFETIME} seconds (8 days); issue "
            "shorter tokens"
        )
    return float(issued), float(expires)
