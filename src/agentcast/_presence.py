"""Presence: how many connections a user holds and on how many nodes (pure value, no I/O).

Shared by the trio manager and the anyio publisher, so it imports neither trio nor coredis.
"""

from __future__ import annotations

import attrs

__all__ = ["Presence"]


@attrs.frozen
class Presence:
    """Where a user is connected: ``ConnectionManager.presence`` / ``RedisPublisher.presence``.

    Counts are places: connections open or in their handshake (a reserved slot), the same
    places the per-user connection limit counts. With Redis they cover every node whose
    heartbeat is current; a killed node's places stop counting within ``PRESENCE_TTL`` seconds.
    """

    #: Connections the user holds (open or being opened).
    connections: int
    #: Nodes holding at least one of them (0 or 1 without Redis).
    nodes: int

    @property
    def online(self) -> bool:
        """True when the user holds at least one connection somewhere."""
        return self.connections > 0
