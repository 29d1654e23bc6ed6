"""``agentcast.publisher``, kept importable: the publisher lives in
``agentcast.backplane.redis.publisher``; use ``agentcast.RedisPublisher``."""

from .backplane.redis.publisher import PublisherRun, RedisPublisher

__all__ = ["PublisherRun", "RedisPublisher"]
