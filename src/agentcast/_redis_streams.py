"""The Redis calls shared by :class:`RedisBroker` (trio) and :class:`RedisPublisher` (any
anyio backend): publish with an atomically assigned seq, live-only publish, and recovery.

Rules of this module: no trio import (the publisher must run under asyncio too); every Redis
failure surfaces as :class:`BrokerUnavailable`, whatever nesting of exception groups coredis
and anyio wrap it in.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs

from ._config import Config
from ._errors import BrokerUnavailable
from ._events import AgentEvent, encode_envelope
from ._history import Recovery, new_epoch
from ._redis_keys import (
    ALL_CHANNEL,
    META_GRACE,
    PUBLISH_SCRIPT,
    RECOVER_SCRIPT,
    meta_key,
    split_envelope,
    stream_key,
    user_channel,
    user_message,
)

if TYPE_CHECKING:
    import coredis

__all__ = ["StreamOps", "first_leaf", "redis_client", "redis_down", "redis_errors"]

#: Seconds one connection attempt to Redis may take.
CONNECT_TIMEOUT: Final = 2.0


# coredis is imported on first use, not with agentcast: it takes most of a second to import
# and single-process users never need it.


@functools.cache
def redis_down() -> tuple[type[BaseException], ...]:
    """What a lost or refused Redis connection raises (coredis lets anyio's closed-stream
    errors escape when a connection drops under a pending pub/sub command)."""
    import coredis.exceptions  # noqa: PLC0415 - deferred: slow to import

    return (
        coredis.exceptions.ConnectionError, TimeoutError, OSError,
        anyio.ClosedResourceError, anyio.BrokenResourceError,
    )


def redis_client(url: str) -> coredis.Redis[str]:
    """A coredis client for ``url`` (``redis://HOST:PORT/DB``) decoding replies to str."""
    import coredis  # noqa: PLC0415 - deferred: slow to import

    return coredis.Redis.from_url(url, decode_responses=True, connect_timeout=CONNECT_TIMEOUT)


def first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside ``exc`` (coredis nests them in task groups)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Turn a lost Redis connection (possibly inside exception groups) into BrokerUnavailable."""
    try:
        yield
    except* redis_down() as group:
        raise BrokerUnavailable(f"{what} failed: {first_leaf(group)}") from None


@attrs.define(eq=False)
class StreamOps:
    """The backplane's operations over one connected coredis client."""

    client: coredis.Redis[str]
    config: Config
    _publish: Any = None
    _recover: Any = None

    def __attrs_post_init__(self) -> None:
        self._publish = self.client.register_script(PUBLISH_SCRIPT)
        self._recover = self.client.register_script(RECOVER_SCRIPT)

    @property
    def _meta_ttl(self) -> int:
        return int(self.config.history_ttl) + META_GRACE

    async def publish(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        """Assign the next seq, append to the thread's stream and publish, in one script call.

        Raises:
            BrokerUnavailable: the call failed because Redis is unreachable.
        """
        prefix, suffix = split_envelope(event, thread_id, time.time())
        config = self.config
        args = [
            prefix, suffix, config.history_size, max(1, int(config.history_ttl)),
            new_epoch(), user_channel(user_id), thread_id, self._meta_ttl,
        ]
        keys = [meta_key(user_id, thread_id), stream_key(user_id, thread_id)]
        with redis_errors("publish"):
            seq = await self._publish(keys=keys, args=args)
        return int(seq)

    async def publish_user(self, user_id: str, event: AgentEvent) -> None:
        """Publish a live-only event on the user's channel."""
        frame = encode_envelope(event, thread_id=None, seq=None, ts=time.time())
        with redis_errors("publish"):
            await self.client.publish(user_channel(user_id), user_message(frame))

    async def publish_all(self, event: AgentEvent) -> None:
        """Publish a live-only event to every node."""
        frame = encode_envelope(event, thread_id=None, seq=None, ts=time.time())
        with redis_errors("publish"):
            await self.client.publish(ALL_CHANNEL, frame)

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None
    ) -> Recovery:
        """What was missed after ``since_seq``: complete, or ``recovered`` False and nothing.

        Raises:
            BrokerUnavailable: the call failed because Redis is unreachable.
        """
        since = -1 if since_seq is None else since_seq
        args = [new_epoch(), since, self.config.history_size, self._meta_ttl]
        keys = [meta_key(user_id, thread_id), stream_key(user_id, thread_id)]
        with redis_errors("recovery"):
            reply = await self._recover(keys=keys, args=args)
        current, latest, frames = str(reply[0]), int(reply[1]), [str(f) for f in reply[2]]
        if since_seq is None or (epoch is not None and epoch != current):
            return Recovery(False, current, latest, ())
        # Entry ids are the seqs and trimming only removes the oldest, so as many entries as
        # seqs missed means every one of them is there.
        complete = since_seq == latest or (
            since_seq < latest and len(frames) == latest - since_seq
        )
        return Recovery(complete, current, latest, frames if complete else ())
