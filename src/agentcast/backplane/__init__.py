"""The backplane: where seqs are assigned, history is kept and events reach every node.

- ``protocol``: the :class:`Broker` the manager talks to (and the ``EventSink`` it implements);
- ``memory``: the single-process broker;
- ``redis``: the Redis backplane: ``keys`` (key layout, Lua scripts, channel messages; pure),
  ``queue`` (the publish queue's rules; pure), ``pipeline`` and ``streams`` (the anyio calls
  shared by both Redis front ends), ``broker`` (the trio :class:`RedisBroker`) and
  ``publisher`` (the anyio :class:`RedisPublisher`, for asyncio programs too).

Rules of this package: its ``__init__`` modules import nothing, so importing
``agentcast.backplane.redis.publisher`` loads only what the publisher uses; nothing the publisher
imports imports trio (``tests/test_layout.py`` walks the import graph). The public names are
re-exported by ``agentcast`` itself.
"""
