"""Shared fixtures. Rules for every test here: no sockets (see tests of the server for those),
no sleeps used as synchronisation, ``autojump_clock`` for anything timed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import settings

import agentcast
from agentcast import Config, ConnectionManager

from .helpers import SCHEMA_VALIDATOR
from .redis_server import persistent_redis, redis_server

__all__ = ["SCHEMA_VALIDATOR", "persistent_redis", "redis_server"]

# Properties are checked by their examples, not their speed: a loaded CI machine must not turn
# a slow example into a failure (timing is measured in benchmarks/, never asserted here).
settings.register_profile("agentcast", deadline=None)
settings.load_profile("agentcast")


@pytest.fixture
def config() -> Config:
    """Defaults, with a short linger so teardown tests stay readable."""
    return Config(session_linger=5.0)


@pytest.fixture
async def manager(config: Config) -> AsyncIterator[ConnectionManager]:
    async with agentcast.open_manager(config) as running:
        yield running
