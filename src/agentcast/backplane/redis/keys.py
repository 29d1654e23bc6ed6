"""Redis key layout, the two Lua scripts, and the pub/sub message format of the backplane.

Rules of this module: pure, no I/O, no trio. Every key of one user carries the hash tag
``{user_id}``, so all of a user's keys (and the channel name) hash to one cluster slot and a
script may touch them together. Ids are restricted to ``[A-Za-z0-9_.:@+|-]`` (see ``_ids``),
so they never contain braces or spaces and can be joined into keys and messages unescaped.

Layout, for user ``u`` and thread ``t``:

- ``agentcast:{u}:t:<t>:meta``   hash ``epoch`` (text), ``seq`` (last seq assigned), ``bytes``
  (of the retained frames)
- ``agentcast:{u}:t:<t>:events`` stream; entry id ``<seq>-0``, field ``f`` = encoded frame
- ``agentcast:{u}:t:<t>:runs``   sorted set: active runs (agent_started seen, no terminal),
  scored by first seq; ``...:kept`` the same for ended runs kept whole for ``history_ttl``;
  ``...:runinfo`` hash of per-run bytes, last event and end times (see ``runinfo_key``)
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

Channel messages on ``agentcast:{u}:live``:

- ``b <thread_id>`` then, for each event of one publish call in seq order, a newline and
  ``<seq> <frame>``: the thread events one ``PUBLISH_SCRIPT`` call stored (one or many; frames
  are single-line JSON, so a newline never occurs inside one). A node hands all of them to its
  connections at once, so a writer wakes with the whole batch queued.
- ``t <thread_id> <seq> <frame>``: one thread event (the form before batches; still read).
- ``u <frame>``: a live-only user event.
- ``x <code> <reason>``: close every connection of the user (revocation: only nodes holding
  the user subscribe to its channel, and only they have connections to close).

On ``agentcast:all`` the message is the frame itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ..._events import AgentEvent, encode_envelope

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
    "PUBLISH_COMMON_ARGS",
    "PUBLISH_EVENT_ARGS",
    "PUBLISH_SCRIPT",
    "RECOVER_SCRIPT",
    "kept_key",
    "meta_key",
    "parse_thread_message",
    "parse_user_message",
    "presence_key",
    "runinfo_key",
    "runs_key",
    "split_envelope",
    "stream_key",
    "thread_batch_message",
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

#: ARGV entries before the first event of a :data:`PUBLISH_SCRIPT` call.
PUBLISH_COMMON_ARGS: Final = 8
#: ARGV entries per event of a :data:`PUBLISH_SCRIPT` call.
PUBLISH_EVENT_ARGS: Final = 4

#: One call publishes a batch of events of one thread (one event is a batch of one).
#: KEYS: meta, events, threads, runs, kept, runinfo. ARGV: maxlen, ttl seconds, candidate
#: epoch, channel, thread id, meta ttl seconds, max run bytes, max thread bytes, then per event
#: (in publish order): prefix, suffix, run id ('' for none), kind (0 other, 1 agent_started,
#: 2 terminal). For each event in turn, exactly the rules one call per event would apply:
#: refuses (seq -2, none assigned) a non-terminal event of a tracked run that would pass max
#: run bytes, and every later one of that run; otherwise creates the epoch if missing, assigns
#: the next seq, builds the frame (prefix .. seq .. suffix), appends it, tracks its run, drops
#: the oldest entries while over maxlen entries or max thread bytes but never from the first
#: seq of a kept run (active and heard from within ttl, or ended within ttl) on. Then, once:
#: records the thread's use, refreshes the TTLs and publishes every stored event as ONE
#: message on the user's channel (``thread_batch_message``), atomically. Returns the seqs, one
#: per event, -2 for a refused one. A terminal event is never refused (a run must be able to
#: end).
PUBLISH_SCRIPT: Final = """
local maxlen, ttl, metattl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[6]
local cap, maxbytes = tonumber(ARGV[7]), tonumber(ARGV[8])
local now = tonumber(redis.call('TIME')[1])
local horizon = now - ttl
local seqs, parts = {}, {'b ' .. ARGV[5]}
for base = 9, #ARGV, 4 do
  local prefix, suffix = ARGV[base], ARGV[base + 1]
  local run, kind = ARGV[base + 2], tonumber(ARGV[base + 3])
  local refused = false
  if run ~= '' and kind == 0 then
    if redis.call('HEXISTS', KEYS[6], 'x:' .. run) == 1 then
      refused = true
    else
      local used = redis.call('HGET', KEYS[6], 'b:' .. run)
      if used then
        local nxt = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') + 1
        if tonumber(used) + #prefix + #tostring(nxt) + #suffix > cap then
          redis.call('HSET', KEYS[6], 'x:' .. run, 1)
          refused = true
        end
      end
    end
  end
  if refused then
    seqs[#seqs + 1] = -2
  else
    if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[3]) == 1 then
      redis.call('HSET', KEYS[1], 'seq', 0)
    end
    local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
    local frame = prefix .. seq .. suffix
    if redis.call('EXISTS', KEYS[2]) == 0 then
      redis.call('HSET', KEYS[1], 'bytes', 0)
    end
    redis.call('XADD', KEYS[2], seq .. '-0', 'f', frame)
    local bytes = redis.call('HINCRBY', KEYS[1], 'bytes', #frame)
    if run ~= '' and (kind == 1 or redis.call('HEXISTS', KEYS[6], 'b:' .. run) == 1) then
      if kind == 1 then
        redis.call('ZADD', KEYS[4], seq, run)
      end
      redis.call('HINCRBY', KEYS[6], 'b:' .. run, #frame)
      redis.call('HSET', KEYS[6], 'l:' .. run, now)
      if kind == 2 then
        local first = redis.call('ZSCORE', KEYS[4], run)
        if first then
          redis.call('ZREM', KEYS[4], run)
          redis.call('ZADD', KEYS[5], first, run)
          redis.call('HSET', KEYS[6], 'e:' .. run, now)
        end
      end
    end
    local floor = seq + 1
    while true do
      local m = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
      if #m == 0 then break end
      if tonumber(redis.call('HGET', KEYS[6], 'l:' .. m[1]) or '0') >= horizon then
        floor = math.min(floor, tonumber(m[2]))
        break
      end
      redis.call('ZREM', KEYS[4], m[1])
      redis.call('HDEL', KEYS[6], 'b:' .. m[1], 'l:' .. m[1], 'x:' .. m[1])
    end
    while true do
      local m = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
      if #m == 0 then break end
      if tonumber(redis.call('HGET', KEYS[6], 'e:' .. m[1]) or '0') >= horizon then
        floor = math.min(floor, tonumber(m[2]))
        break
      end
      redis.call('ZREM', KEYS[5], m[1])
      redis.call('HDEL', KEYS[6], 'b:' .. m[1], 'l:' .. m[1], 'x:' .. m[1], 'e:' .. m[1])
    end
    while bytes > maxbytes or redis.call('XLEN', KEYS[2]) > maxlen do
      local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
      if #oldest == 0 then break end
      local id = oldest[1][1]
      if tonumber(string.match(id, '^%d+')) >= floor then break end
      redis.call('XDEL', KEYS[2], id)
      bytes = redis.call('HINCRBY', KEYS[1], 'bytes', -#oldest[1][2][2])
    end
    seqs[#seqs + 1] = seq
    parts[#parts + 1] = seq .. ' ' .. frame
  end
end
if #parts > 1 then
  redis.call('ZADD', KEYS[3], now, ARGV[5])
  redis.call('EXPIRE', KEYS[3], metattl)
  for i = 4, 6 do
    redis.call('EXPIRE', KEYS[i], ttl)
  end
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[1], metattl)
  redis.call('PUBLISH', ARGV[4], table.concat(parts, '\\n'))
end
return seqs
"""

#: KEYS: meta, events, threads, runs, runinfo. ARGV: candidate epoch, since seq (or -1 for
#: live only), max count, meta ttl seconds, thread id, max threads per user, ttl seconds.
#: Returns {epoch, latest seq, frames after since (oldest first) or nothing when since is -1
#: / out of range, active runs as a flat list run id, first seq, ...}, or -1 when the stream
#: is new and the user already has max threads (nothing is created). Creating the epoch here
#: too means the epoch a subscriber is told stays the epoch of the events that follow.
#: Members older than the meta ttl are dropped first: their meta hash has expired. Active
#: runs not heard from within ttl are left out (abandoned; the next publish drops them).
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
local active = {}
local horizon = now - tonumber(ARGV[7])
local runs = redis.call('ZRANGE', KEYS[4], 0, 255, 'WITHSCORES')
for i = 1, #runs, 2 do
  if tonumber(redis.call('HGET', KEYS[5], 'l:' .. runs[i]) or '0') >= horizon then
    active[#active + 1] = runs[i]
    active[#active + 1] = runs[i + 1]
  end
end
return {epoch, latest, frames, active}
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


def runs_key(user_id: str, thread_id: str) -> str:
    """The sorted set of the thread's active runs (member run id, score its first seq)."""
    return f"agentcast:{{{user_id}}}:t:{thread_id}:runs"


def kept_key(user_id: str, thread_id: str) -> str:
    """The sorted set of the thread's ended runs still kept whole (score: first seq)."""
    return f"agentcast:{{{user_id}}}:t:{thread_id}:kept"


def runinfo_key(user_id: str, thread_id: str) -> str:
    """The hash of per-run fields: ``b:<run>`` bytes, ``l:<run>`` last event, ``e:<run>`` end
    (Redis ``TIME`` seconds), ``x:<run>`` refused as too large."""
    return f"agentcast:{{{user_id}}}:t:{thread_id}:runinfo"


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


def thread_batch_message(thread_id: str, events: Sequence[tuple[int, str]]) -> str:
    """The channel message of thread events stored by one call, ``(seq, frame)`` in seq order
    (the script builds the same form)."""
    return "\n".join([f"b {thread_id}", *(f"{seq} {frame}" for seq, frame in events)])


def thread_message(thread_id: str, seq: int, frame: str) -> str:
    """The channel message of one thread event (a batch of one)."""
    return thread_batch_message(thread_id, ((seq, frame),))


def user_message(frame: str) -> str:
    """The channel message of a live-only event for one user."""
    return f"u {frame}"


def parse_thread_message(message: str) -> tuple[str, list[tuple[int, str]]] | None:
    """(thread_id, [(seq, frame), ...]) of a thread message, a batch (``b``) or the one-event
    form (``t``); None if ``message`` is not a thread message.

    Raises:
        ValueError: it starts like one but a line is not ``<seq> <frame>``.
    """
    if message.startswith("b "):
        lines = message.split("\n")
        thread_id = lines[0][2:]
        events = []
        for line in lines[1:]:
            seq, _, frame = line.partition(" ")
            if not frame or not seq.isdigit():
                raise ValueError(f"not an agentcast batch line: {line[:60]!r}")
            events.append((int(seq), frame))
        if not thread_id or not events:
            raise ValueError(f"not an agentcast batch message: {message[:60]!r}")
        return thread_id, events
    if message.startswith("t "):
        thread_id, _, rest = message[2:].partition(" ")
        seq, _, frame = rest.partition(" ")
        if not thread_id or not frame or not seq.isdigit():
            raise ValueError(f"not an agentcast thread message: {message[:60]!r}")
        return thread_id, [(int(seq), frame)]
    return None


def parse_user_message(message: str) -> str:
    """The frame of a live-only user message (``u``).

    Raises:
        ValueError: the message is not one (nor a thread or disconnect message).
    """
    if message.startswith("u "):
        return message[2:]
    raise ValueError(f"not an agentcast channel message: {message[:60]!r}")
