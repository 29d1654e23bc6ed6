"""Tokens on live connections: verification at the handshake and on ``refresh``, and the
revocation cut-offs both check.

Rules of this module: the core never sees PyJWT or the secret. The server hands each connection
a :class:`TokenGrant` (the core's ``Credentials``): its expiry and a ``refresh`` that verifies a
new token with the same checks as the handshake. Revocation cut-offs live in memory on a single
node (:class:`MemoryRevocations`) and in Redis when scaled out (:class:`RedisRevocations`), so
every node refuses a revoked user's old tokens. A cut-off that cannot be read refuses the token
(fails closed).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final, Protocol

import attrs
import trio

from .._errors import BrokerUnavailable, ClientError
from ..backplane.redis.keys import REVOCATION_TTL
from ._auth import LEEWAY, AuthError, Claims, is_revoked, verify_token

if TYPE_CHECKING:
    from ..backplane.redis.broker import RedisBroker

__all__ = [
    "REVOCATION_LOOKUP_TIMEOUT",
    "MemoryRevocations",
    "RedisRevocations",
    "Revocations",
    "TokenGrant",
    "TokenVerifier",
]

#: Seconds a revocation cut-off lookup (or store) in Redis may take; past it the token is
#: refused (the client retries), never admitted unchecked.
REVOCATION_LOOKUP_TIMEOUT: Final = 2.0


class Revocations(Protocol):
    """Where revocation cut-offs are kept: tokens of a user issued at or before it are refused."""

    async def revoke(self, user_id: str, cutoff: float) -> None:
        """Refuse ``user_id``'s tokens issued at or before ``cutoff`` (Unix seconds).

        Raises:
            BrokerUnavailable: the cut-off could not be stored.
        """

    async def cutoff(self, user_id: str) -> float | None:
        """The user's cut-off, Unix seconds, or None.

        Raises:
            BrokerUnavailable: it could not be read.
        """


@attrs.define(eq=False)
class MemoryRevocations:
    """Cut-offs of a single node, each forgotten ``REVOCATION_TTL`` after it was made (every
    token it refuses has expired by then), so the table only holds recent revocations."""

    _cutoffs: dict[str, float] = attrs.Factory(dict)

    async def revoke(self, user_id: str, cutoff: float) -> None:
        """Record the cut-off; forget those older than ``REVOCATION_TTL``."""
        await trio.lowlevel.checkpoint()
        horizon = time.time() - REVOCATION_TTL
        for user in [u for u, at in self._cutoffs.items() if at < horizon]:
            del self._cutoffs[user]
        self._cutoffs[user_id] = max(cutoff, self._cutoffs.get(user_id, cutoff))

    async def cutoff(self, user_id: str) -> float | None:
        """The user's cut-off, if revoked within ``REVOCATION_TTL``."""
        await trio.lowlevel.checkpoint()
        return self._cutoffs.get(user_id)


@attrs.define(eq=False)
class RedisRevocations:
    """Cut-offs in Redis (``agentcast:{user}:revoked``), shared by every node."""

    broker: RedisBroker

    async def revoke(self, user_id: str, cutoff: float) -> None:
        """Store the cut-off with a TTL of ``REVOCATION_TTL``."""
        with trio.move_on_after(REVOCATION_LOOKUP_TIMEOUT):
            await self.broker.set_revocation(user_id, cutoff)
            return
        raise BrokerUnavailable(
            f"storing the revocation took over {REVOCATION_LOOKUP_TIMEOUT} s"
        )

    async def cutoff(self, user_id: str) -> float | None:
        """Read the cut-off, within ``REVOCATION_LOOKUP_TIMEOUT``."""
        with trio.move_on_after(REVOCATION_LOOKUP_TIMEOUT):
            return await self.broker.revocation(user_id)
        raise BrokerUnavailable(
            f"the revocation lookup took over {REVOCATION_LOOKUP_TIMEOUT} s"
        )


@attrs.frozen
class TokenVerifier:
    """Every check a token passes, at the handshake and on ``refresh``."""

    secret: str = attrs.field(repr=False)
    revocations: Revocations
    leeway: float = LEEWAY
    issuer: str | None = None
    audience: str | None = None

    async def admit(self, token: str | None, *, claimed_user: str | None = None) -> Claims:
        """Verify ``token`` (signature, expiry, claims, issuer, audience) and its user's
        revocation cut-off.

        Raises:
            AuthError: reason missing, expired, invalid, wrong_user, revoked, or unavailable
                (the cut-off could not be read: refused, retry later).
        """
        claims = verify_token(
            token, self.secret, claimed_user=claimed_user, leeway=self.leeway,
            issuer=self.issuer, audience=self.audience,
        )
        if await self.revoked(claims):
            raise AuthError(
                "revoked", "the user's tokens issued before its revocation are refused"
            )
        return claims

    async def revoked(self, claims: Claims) -> bool:
        """Whether the user's cut-off refuses ``claims``.

        Raises:
            AuthError: reason ``unavailable``, the cut-off could not be read.
        """
        try:
            cutoff = await self.revocations.cutoff(claims.user_id)
        except BrokerUnavailable:
            raise AuthError(
                "unavailable", "the revocation list could not be read; retry shortly"
            ) from None
        return is_revoked(claims, cutoff)

    def grant(self, claims: Claims) -> TokenGrant:
        """The credentials a connection opened with ``claims`` holds."""
        return TokenGrant(claims, self)


@attrs.frozen
class TokenGrant:
    """A verified token as the core's ``Credentials``: expiry, leeway, threads, refresh."""

    claims: Claims
    verifier: TokenVerifier

    @property
    def user_id(self) -> str:
        """The token's ``sub``."""
        return self.claims.user_id

    @property
    def expires_at(self) -> float:
        """The token's ``exp``, Unix seconds."""
        return self.claims.expires_at

    @property
    def grace(self) -> float:
        """The server's clock leeway: the connection closes at ``exp`` plus this."""
        return self.verifier.leeway

    @property
    def threads(self) -> frozenset[str] | None:
        """The ``threads`` claim; None when the token has none (every thread)."""
        return frozenset(self.claims.threads) if self.claims.threads else None

    async def refresh(self, token: str) -> TokenGrant:
        """Verify a new token for the same user, with the handshake's checks.

        Raises:
            ClientError: ``bad_token``, with the reason it was refused.
        """
        try:
            claims = await self.verifier.admit(token, claimed_user=self.claims.user_id)
        except AuthError as exc:
            raise ClientError("bad_token", str(exc)) from None
        return TokenGrant(claims, self.verifier)
