"""Redis key layout, the two Lua scripts, and the pub/sub message format of the backplane.

Rules of this module: pure, no I/O, no trio. Every key of one user carries the hash tag
``{user_id}``, so all of a user's keys (and the channel name) hash to one cluster slot and a
script may touch them together. Ids are restricted to ``[A-Za-z0-9_.:@+-]`` (see ``_ids``),
so they never contain braces or spaces and can be joined into keys and messages unescaped.

Layout, for user ``u`` and thread ``t``:

- ``agentcast:{u}:t:<t>:meta``   hash ``epoch`` (text), ``seq`` (last seq assigned)
- ``agentcast:{u}:t:<t>:events`` stream; entry id ``<seq>-0``, field ``f`` = encoded frame
- ``agentcast:{u}:threads``       sorted set: thread ids of the user with a meta hash, scored by
  last use (Redis ``TIME`` seconds); bounds a user's streams (``Config.max_threads_per_user``)
- ``agentcast:{u}:live``          pub/sub channel of the user (thread and user events)
- ``agentcast:{u}:revoked``       string: revocation cut-off, Unix seconds; tokens of ``u``
  issued at or before it are refused. Expires ``REVOCATION_TTL`` after the revocation (longer
  than any token the server accepts lives).
- ``agentcast:{u}:presence``      hash: node id -> ``"<places> <expires> <seq>"``, the
  connections (open or being opened) ``u`` holds on that node, when that entry stops counting
  (Redis ``TIME`` seconds) and the node's write seq of that count. Each node rewrites its
  entries at least every ``PRESENCE_TTL / 3`` seconds, so a killed node's entries stop
  counting within ``PRESENCE_TTL`` seconds of its last heartbeat; every script that reads the
  hash drops expired entries.
- ``agentcast:all``              pub/sub channel every node subscribes to (broadcasts)

Channel messages: ``t <thread_id> <seq> <frame>`` for a thread event, ``u <frame>`` for a
live-only user event, ``x <code> <reason>`` to close every connection of the user (revocation:
only nodes holding the user subscribe to its channel, and only they have connections to
close); on ``agentcast:all`` the message is the frame itself.
"""

from __future__ import annotations

from typing import Final

from ._events import AgentEvent, encode_envelope

#: Seconds a revocation cut-off key lives: a day more than the longest token lifetime the
#: server accepts (``server._auth.MAX_TOKEN_LIFETIME``, 8 days), so every token it refuses has
#: expired before the key does.
REVOCATION_TTL: Final = 9 * 24 * 3600

__all__ = [
    "ALL_CHANNEL",
    "REVOCATION_TTL",
    "disconnect_message",
    "parse_disconnect_message",
    "revocation_key",
    "PRESENCE_SCRIPT",
    "PRESENCE_TTL",
    "PUBLISH_SCRIPT",
    "RECOVER_SCRIPT",
    "meta_key",
    "parse_user_message",
    "presence_key",
    "split_envelope",
    "stream_key",
    "thread_message",
    "threads_key",
    "user_channel",
    "user_message",
]

#: The channel every node subscribes to, for ``publish_all`` broadcasts.
ALL_CHANNEL: Final = "agentcast:all"
#: How much longer than the events a stream's epoch and seq counter live, in seconds: a
#: subscriber idle for longer than ``history_ttl`` must not see its stream restart at seq 1.
META_GRACE: Final = 86400

#: KEYS: meta, events, threads. ARGV: prefix, suffix, maxlen, ttl seconds, candidate epoch,
#: channel, thread id, meta ttl seconds. Creates the epoch if missing, assigns the next seq,
#: builds the frame (prefix .. seq .. suffix), appends it (trimmed to about maxlen), records
#: the thread's use, refreshes the TTLs and publishes it on the user's channel, atomically.
#: Returns the seq. A publish is never refused (a run must be able to end).
PUBLISH_SCRIPT: Final = """
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[5]) == 1 then
  redis.call('HSET', KEYS[1], 'seq', 0)
end
redis.call('ZADD', KEYS[3], redis.call('TIME')[1], ARGV[7])
redis.call('EXPIRE', KEYS[3], ARGV[8])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local frame = ARGV[1] .. seq .. ARGV[2]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'f', frame)
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('PUBLISH', ARGV[6], 't ' .. ARGV[7] .. ' ' .. seq .. ' ' .. frame)
return seq
"""

#: KEYS: meta, events, threads. ARGV: candidate epoch, since seq (or -1 for live only), max
#: count, meta ttl seconds, thread id, max threads per user. Returns {epoch, latest seq,
#: frames after since (oldest first) or nothing when since is -1 / out of range}, or -1 when
#: the stream is new and the user already has max threads (nothing is created). Creating the
#: epoch here too means the epoch a subscriber is told stays the epoch of the events that
#: follow. Members older than the meta ttl are dropped first: their meta hash has expired.
RECOVER_SCRIPT: Final = """
local now = tonumber(redis.call('TIME')[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[4]))
  if not redis.call('ZSCORE', KEYS[3], ARGV[5])
      and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then
    return -1
  end
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'seq', 0)
end
redis.call('ZADD', KEYS[3], now, ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local latest = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local since = tonumber(ARGV[2])
local frames = {}
if since >= 0 and since < latest and latest - since <= tonumber(ARGV[3]) then
  local entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+', 'COUNT', latest - since)
  for i, entry in ipairs(entries) do
    frames[i] = entry[2][2]
  end
end
return {epoch, latest, frames}
"""

#: Seconds a node's presence entry counts without a heartbeat (see the layout above): the
#: longest a SIGKILLed node's connections keep counting towards presence and the per-user limit.
PRESENCE_TTL: Final = 15

#: KEYS: presence. ARGV: node id ("" to only read), places this node holds (including the one
#: being reserved), limit (-1: none), ttl seconds, write seq (grows with every count the node
#: computes). Drops expired entries, then, for a node: if its entry already holds a count with
#: a higher seq (computed later, so it includes this place), only checks that count against the
#: limit; otherwise, if the other nodes' places plus this node's exceed the limit, refuses
#: (recording one place fewer: the one refused), else records this node's places (deleting the
#: entry at 0). Returns {1 admitted / 0 refused, total places, nodes with places}, atomically:
#: simultaneous reservations on several nodes never pass the limit together, and a node's
#: calls overtaking each other on the way never record an older, smaller count.
PRESENCE_SCRIPT: Final = """
local now = tonumber(redis.call('TIME')[1])
local total, nodes = 0, 0
local stored, stored_seq = 0, -1
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local places, expires, seq = string.match(entries[i + 1], '^(%d+) (%d+) (%d+)$')
  if not expires or tonumber(expires) <= now then
    redis.call('HDEL', KEYS[1], entries[i])
  elseif entries[i] == ARGV[1] then
    stored, stored_seq = tonumber(places), tonumber(seq)
  elseif tonumber(places) > 0 then
    total = total + tonumber(places)
    nodes = nodes + 1
  end
end
if ARGV[1] == '' then
  return {1, total, nodes}
end
local limit = tonumber(ARGV[3])
local admitted = 1
if stored_seq >= tonumber(ARGV[5]) then
  if limit >= 0 and stored > 0 and total + stored > limit then
    admitted = 0
  end
  if stored > 0 then
    total = total + stored
    nodes = nodes + 1
  end
  return {admitted, total, nodes}
end
local mine = tonumber(ARGV[2])
if limit >= 0 and mine > 0 and total + mine > limit then
  admitted = 0
  mine = mine - 1
end
if mine > 0 then
  local value = mine .. ' ' .. (now + tonumber(ARGV[4])) .. ' ' .. ARGV[5]
  redis.call('HSET', KEYS[1], ARGV[1], value)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  total = total + mine
  nodes = nodes + 1
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return {admitted, total, nodes}
"""


def meta_key(user_id: str, thread_id: str) -> str:
    """The hash holding the stream's epoch and last seq."""
    return f"agentcast:{{{user_id}}}:t:{thread_id}:meta"


def stream_key(user_id: str, thread_id: str) -> str:
    """The Redis Stream holding the thread's retained frames."""
    return f"agentcast:{{{user_id}}}:t:{thread_id}:events"


def threads_key(user_id: str) -> str:
    """The sorted set of the user's thread ids with a meta hash, scored by last use."""
    return f"agentcast:{{{user_id}}}:threads"


def user_channel(user_id: str) -> str:
    """The pub/sub channel of one user; a node subscribes while it holds the user."""
    return f"agentcast:{{{user_id}}}:live"


def presence_key(user_id: str) -> str:
    """The hash of the user's connection places per node (presence and the per-user limit)."""
    return f"agentcast:{{{user_id}}}:presence"


def revocation_key(user_id: str) -> str:
    """The string holding the user's revocation cut-off (Unix seconds)."""
    return f"agentcast:{{{user_id}}}:revoked"


def disconnect_message(code: int, reason: str) -> str:
    """The user-channel message that closes every connection of the user on every node."""
    return f"x {code} {reason}"


def parse_disconnect_message(message: str) -> tuple[int, str] | None:
    """(code, reason) of a disconnect message, or None if ``message`` is not one.

    Raises:
        ValueError: it starts like one but its code is not a number.
    """
    if not message.startswith("x "):
        return None
    code, _, reason = message[2:].partition(" ")
    return int(code), reason


def split_envelope(event: AgentEvent, thread_id: str | None, ts: float) -> tuple[str, str]:
    """The envelope as (prefix, suffix) around its seq, so Redis can put the seq in between.

    Encoding is string assembly and the envelope's ``"seq":`` comes before ``data``, so the
    first occurrence is the envelope's own.
    """
    frame = encode_envelope(event, thread_id=thread_id, seq=None, ts=ts)
    prefix, marker, suffix = frame.partition('"seq":null')
    assert marker, "encode_envelope always writes a seq field"
    return prefix + '"seq":', suffix


def thread_message(thread_id: str, seq: int, frame: str) -> str:
    """The channel message of a thread event (the script builds the same form)."""
    return f"t {thread_id} {seq} {frame}"


def user_message(frame: str) -> str:
    """The channel message of a live-only event for one user."""
    return f"u {frame}"


def parse_user_message(message: str) -> tuple[str | None, int | None, str]:
    """Parse a user-channel message into (thread_id, seq, frame); thread and seq are None for
    a live-only user event.

    Raises:
        ValueError: the message is not in either form.
    """
    kind, _, rest = message.partition(" ")
    if kind == "u":
        return None, None, rest
    if kind == "t":
        thread_id, _, rest = rest.partition(" ")
        seq, _, frame = rest.partition(" ")
        if thread_id and frame:
            return thread_id, int(seq), frame
    raise ValueError(f"not an agentcast channel message: {message[:60]!r}")
