"""What a connection was opened with: when its credentials expire and how a client renews them.

Rules of this module: pure, no I/O, no trio, no token library. The core never verifies a token
itself: whoever authenticates a client (the standalone server, from its secret) hands
``add_connection(credentials=...)`` an object satisfying :class:`Credentials`, and the
connection only asks it when it expires and to verify a ``refresh``. A connection without
credentials never expires. Expiry is judged by the manager's one watchdog sweep (the one that
cuts stuck writes), never by a task or a cancel scope per connection: idle connections are most
of a server's memory.
"""

from __future__ import annotations

import math
from typing import Final, Protocol

import attrs

__all__ = ["TOKEN_EXPIRING_NOTICE", "Credentials", "ExpiryPlan", "narrow_threads", "plan_expiry"]

#: Seconds before ``expires_at`` a connection is sent ``token_expiring`` (once per token), so
#: the client has time to send ``refresh``.
TOKEN_EXPIRING_NOTICE: Final = 30.0


class Credentials(Protocol):
    """A verified grant, e.g. a token's claims, and the means to renew it."""

    @property
    def user_id(self) -> str:
        """The user it was granted to; a refresh must be for the same user."""

    @property
    def expires_at(self) -> float:
        """Expiry, Unix seconds (what ``refreshed`` and ``token_expiring`` report)."""

    @property
    def grace(self) -> float:
        """Seconds past ``expires_at`` the connection is still served (clock leeway)."""

    @property
    def threads(self) -> frozenset[str] | None:
        """Threads it confines the connection to; None: every thread of the user."""

    async def refresh(self, token: str) -> Credentials:
        """Verify ``token`` and return the grant it carries.

        Raises:
            ClientError: the token is refused (code ``bad_token``); the old grant stands.
        """


@attrs.frozen
class ExpiryPlan:
    """When (in trio time, the watchdog's clock) to warn and to close a connection."""

    #: When ``token_expiring`` is due.
    warn_at: float
    #: When the connection is closed with 4001.
    close_at: float


#: The plan of a connection without credentials: never warned, never closed.
NEVER: Final = ExpiryPlan(math.inf, math.inf)


def plan_expiry(
    expires_at: float,
    grace: float,
    *,
    wall_now: float,
    clock_now: float,
    notice: float = TOKEN_EXPIRING_NOTICE,
) -> ExpiryPlan:
    """Translate a Unix expiry into the watchdog's clock.

    The close is due at ``expires_at + grace``; the notice ``notice`` seconds before
    ``expires_at`` (at once when that has passed: a token shorter than the notice is warned
    about on the first sweep).
    """
    offset = clock_now - wall_now
    return ExpiryPlan(expires_at - notice + offset, expires_at + grace + offset)


def narrow_threads(
    current: frozenset[str] | None, offered: frozenset[str] | None
) -> frozenset[str] | None:
    """The threads a connection may use after a refresh from ``current`` to ``offered``.

    Equal or narrower only: a connection confined to some threads stays confined to (a subset
    of) them, however the new token is written.

    Raises:
        ValueError: ``offered`` would allow a thread ``current`` does not.
    """
    if current is None:
        return offered
    if offered is None or not offered <= current:
        wider = "every thread" if offered is None else ", ".join(sorted(offered - current))
        raise ValueError(
            f"the new token allows more threads than this connection ({wider}); a refresh may "
            "only keep or narrow them: reconnect with the new token instead"
        )
    return offered
