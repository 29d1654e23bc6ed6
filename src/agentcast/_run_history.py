"""Runs in a thread's history: which are active, which must stay whole, and text compaction.

Rules of this module: pure, no I/O, no trio; time is passed in. Both brokers use it: the
in-memory history (``_history``) tracks runs with :class:`RunTracker` and stores deltas in
:class:`TextSpan`; the Redis broker, which keeps one stream entry per event, compacts at replay
with :func:`compact_frames`. Invariants:

- A run is *active* from its ``agent_started`` until its terminal event, or until it has sent
  nothing for ``history_ttl`` (abandoned: its producer died without ending it).
- A run is *kept* while active and for ``history_ttl`` after its terminal event: its events
  are never dropped for ``history_size`` or ``history_bytes`` (only the manager-wide
  ``max_retained_bytes`` may cut it, and then its resume is ``recovered: false``).
- A run's cost (what it retains) never passes ``max_run_bytes``; the publish that would pass
  it is refused with :class:`RunTooLarge`, and so are the run's later non-terminal events. A
  terminal event is never refused.
- A compacted span replays as one ``agent_text`` whose ``seq`` is its last delta's and whose
  ``data`` is ``{"text": <the deltas joined>, "from_seq": <first delta's seq it covers>}``;
  a replay covering one delta of a span gives that delta's own frame, unchanged. A replay
  asked with ``compact: false`` expands a span into one frame per delta (its lengths are kept).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs
import orjson

from ._errors import RunTooLarge
from ._events import TERMINAL_TYPES, AgentEvent, EventType

__all__ = [
    "DELTA_COST",
    "MAX_DELTA_BYTES",
    "SPAN_OVERHEAD",
    "ActiveRun",
    "RunTracker",
    "apply_replay",
    "compacted_frame",
    "TextSpan",
    "compact_frames",
    "compactable_text",
    "run_too_large",
]

#: Bytes charged per compacted delta beyond its text: its length in a 16-bit array.
DELTA_COST: Final = 2
#: Largest delta (UTF-8 bytes) a span stores; a larger one is kept as its own frame.
MAX_DELTA_BYTES: Final = 65535
#: Bytes charged per span for its bookkeeping (object, arrays' headers, last timestamp).
SPAN_OVERHEAD: Final = 160
#: Most runs tracked per thread; past it the oldest ended (or else oldest active) run is
#: forgotten, so a thread that starts runs forever holds bounded bookkeeping.
MAX_TRACKED_RUNS: Final = 256


@attrs.frozen
class ActiveRun:
    """A run of the thread that has not ended, as the ``subscribed`` ack lists it."""

    run_id: str
    #: The seq of its ``agent_started``: resume from ``first_seq - 1`` to get the whole run.
    first_seq: int

    def as_json(self) -> dict[str, Any]:
        """The ack's form: ``{"run_id": R, "first_seq": N}``."""
        return {"run_id": self.run_id, "first_seq": self.first_seq}


def compactable_text(event: AgentEvent) -> str | None:
    """The delta of an ``agent_text`` event of a run whose data is exactly ``{"text": str}``,
    else None (anything else is stored and replayed as its own frame)."""
    if event.type != EventType.AGENT_TEXT or event.run_id is None:
        return None
    data = event.data
    if len(data) != 1:
        return None
    text = data.get("text")
    return text if type(text) is str else None


def run_too_large(run_id: str, cap: int) -> RunTooLarge:
    """The error of a publish refused by the per-run byte cap (both brokers)."""
    return RunTooLarge(
        f"run {run_id} would retain more than {cap} bytes for resume (Config.max_run_bytes); "
        "it ends with agent_error RunTooLarge. Stream fewer or smaller events per run, or "
        "raise the cap"
    )


@attrs.define(eq=False, slots=True)
class _RunRecord:
    first_seq: int
    last_event: float
    cost: int = 0
    ended_at: float | None = None
    too_large: bool = False


@attrs.define(eq=False)
class RunTracker:
    """The runs of one thread seen in its stored events (pure bookkeeping)."""

    max_run_bytes: int
    ttl: float
    _runs: dict[str, _RunRecord] = attrs.field(factory=dict)
    #: ``floor()`` is asked on every publish: its answer is cached until a run starts or
    #: ends, or the earliest time a run could expire (a lower bound: a later event only
    #: postpones it) passes.
    _floor: int | None = None
    _valid_until: float = -math.inf

    def admit(self, event: AgentEvent, cost: int) -> None:
        """Check that ``event`` (costing ``cost`` bytes) may be published for its run.

        Raises:
            RunTooLarge: the run would pass ``max_run_bytes`` (or already tried to).
        """
        run_id = event.run_id
        if run_id is None or event.type in TERMINAL_TYPES:
            return
        record = self._runs.get(run_id)
        if record is None:
            return
        if record.too_large or record.cost + cost > self.max_run_bytes:
            record.too_large = True
            raise run_too_large(run_id, self.max_run_bytes)

    def record(self, event: AgentEvent, seq: int, cost: int, now: float) -> None:
        """Account for ``event``, stored with ``seq``."""
        run_id = event.run_id
        if run_id is None:
            return
        record = self._runs.get(run_id)
        if event.type == EventType.AGENT_STARTED:
            if record is None and len(self._runs) >= MAX_TRACKED_RUNS:
                self._forget_one()
            record = self._runs[run_id] = _RunRecord(seq, now)
            self._valid_until = -math.inf
        elif record is None:
            return  # a run whose agent_started this stream never saw is not tracked
        record.cost += cost
        record.last_event = now
        if event.type in TERMINAL_TYPES and record.ended_at is None:
            record.ended_at = now
            self._valid_until = -math.inf

    def _forget_one(self) -> None:
        ended = [key for key, r in self._runs.items() if r.ended_at is not None]
        del self._runs[(ended or list(self._runs))[0]]
        self._valid_until = -math.inf

    def expire(self, now: float) -> None:
        """Forget runs ended (or silent) for longer than ``ttl``."""
        horizon = now - self.ttl
        for run_id, record in list(self._runs.items()):
            if (record.ended_at if record.ended_at is not None else record.last_event) < horizon:
                del self._runs[run_id]
                self._valid_until = -math.inf

    def floor(self, now: float) -> int | None:
        """The smallest first seq of a kept run (events from it on must stay), or None."""
        if now < self._valid_until:
            return self._floor
        self.expire(now)
        runs = self._runs.values()
        self._floor = min((r.first_seq for r in runs), default=None)
        self._valid_until = min(
            ((r.ended_at if r.ended_at is not None else r.last_event) + self.ttl for r in runs),
            default=math.inf,
        )
        return self._floor

    def active(self, now: float) -> list[ActiveRun]:
        """The runs that have not ended, oldest first."""
        self.expire(now)
        runs = [
            ActiveRun(run_id, r.first_seq)
            for run_id, r in self._runs.items()
            if r.ended_at is None
        ]
        return sorted(runs, key=lambda run: run.first_seq)

    def clear(self) -> None:
        """Forget every run (the stream restarted)."""
        self._runs.clear()
        self._valid_until = -math.inf

    def __len__(self) -> int:
        return len(self._runs)


@attrs.define(eq=False, slots=True)
class TextSpan:
    """Consecutive ``agent_text`` deltas of one run, seqs ``first_seq`` .. ``last_seq``.

    Memory is the UTF-8 text plus two bytes per delta and a fixed overhead, whatever the
    number of deltas; a replay from any seq inside it starts exactly there.
    """

    run_id: str
    first_seq: int
    #: The first delta's frame, replayed unchanged while the span holds only it.
    first_frame: str
    #: The frame up to and including ``"seq":`` (type, thread and run), for compacted frames.
    prefix: str
    last_ts: float
    text: bytearray = attrs.Factory(bytearray)
    lengths: array[int] = attrs.Factory(lambda: array("H"))

    @classmethod
    def start(cls, run_id: str, seq: int, frame: str, ts: float, delta: bytes) -> TextSpan:
        """A span holding one delta, stored as ``frame``."""
        head, marker, _ = frame.partition('"seq":')
        span = cls(run_id, seq, frame, head + marker, ts)
        span.text += delta
        span.lengths.append(len(delta))
        return span

    def extend(self, ts: float, delta: bytes) -> None:
        """Append the next delta (seq ``last_seq + 1``)."""
        self.text += delta
        self.lengths.append(len(delta))
        self.last_ts = ts

    @property
    def last_seq(self) -> int:
        """The seq of the span's last delta."""
        return self.first_seq + len(self.lengths) - 1

    @property
    def cost(self) -> int:
        """Bytes this span is charged for."""
        return (
            SPAN_OVERHEAD + len(self.first_frame) + len(self.prefix) + len(self.text)
            + DELTA_COST * len(self.lengths)
        )

    def frame_from(self, seq: int) -> str:
        """The replay of this span's deltas from ``seq`` on (``first_seq <= seq <= last_seq``)."""
        if seq == self.first_seq and len(self.lengths) == 1:
            return self.first_frame
        skip = seq - self.first_seq
        offset = sum(self.lengths[:skip])
        text = self.text[offset:].decode()
        if seq == self.last_seq:
            # One delta: its own frame, exactly as it was sent live.
            data = orjson.dumps({"text": text}).decode()
            return f'{self.prefix}{seq},"ts":{self.last_ts!r},"data":{data}}}'
        return compacted_frame(self.prefix, self.last_seq, self.last_ts, text, seq)

    def frames_from(self, seq: int) -> list[str]:
        """The span's deltas from ``seq`` on expanded back into one frame each, as a replay
        with ``compact: false`` sends them (``first_seq <= seq <= last_seq``).

        The first delta's frame is the one stored, unchanged. The span keeps only its last
        delta's send time, so every later delta's frame carries that ``ts``: never earlier
        than when the delta was sent, possibly later (a delta's own ``ts`` is not retained).
        """
        frames: list[str] = []
        offset = 0
        for index, length in enumerate(self.lengths):
            delta_seq = self.first_seq + index
            if delta_seq >= seq:
                if index == 0:
                    frames.append(self.first_frame)
                else:
                    chunk = self.text[offset : offset + length].decode()
                    data = orjson.dumps({"text": chunk}).decode()
                    frames.append(f'{self.prefix}{delta_seq},"ts":{self.last_ts!r},"data":{data}}}')
            offset += length
        return frames


def compacted_frame(prefix: str, seq: int, ts: float, text: str, from_seq: int) -> str:
    """The wire form of a compacted span: ``prefix`` (up to ``"seq":``) then the rest."""
    data = orjson.dumps({"text": text, "from_seq": from_seq}).decode()
    return f'{prefix}{seq},"ts":{ts!r},"data":{data}}}'


_TEXT_HEAD: Final = '{"type":"agent_text",'
_DATA_HEAD: Final = ',"data":{"text":"'


def _delta_of(frame: str) -> tuple[str, int, str, str] | None:
    """(head, seq, ts, JSON-escaped text) of a compactable delta frame, else None.

    Pure string work on the envelope ``encode_envelope`` writes (no JSON parse: a Redis replay
    of thousands of deltas must stay cheap): ``head`` is everything before ``,"seq":`` (type,
    thread and run id, equal for deltas of one run). The data must be exactly one string
    ``text``: no unescaped quote may hide a second key inside it.
    """
    if not frame.startswith(_TEXT_HEAD) or not frame.endswith('"}}'):
        return None
    seq_at = frame.find(',"seq":')
    ts_at = frame.find(',"ts":', seq_at)
    data_at = frame.find(_DATA_HEAD, ts_at)
    if seq_at < 0 or ts_at < 0 or data_at < 0 or '"run_id":"' not in frame[:seq_at]:
        return None
    escaped = frame[data_at + len(_DATA_HEAD) : -3]
    if '"' in escaped.replace("\\\\", "").replace('\\"', ""):
        return None
    seq = frame[seq_at + 7 : ts_at]
    if not seq.isdigit():
        return None
    return frame[:seq_at], int(seq), frame[ts_at + 6 : data_at], escaped


def compact_frames(frames: Iterable[str]) -> list[str]:
    """Replace each run of two or more consecutive compactable deltas of one run (in ``frames``,
    consecutive seqs in order) by its compacted frame; every other frame is kept as it is.

    Joining JSON-escaped strings escapes the joined string, so texts are never decoded.
    """
    out: list[str] = []
    group: list[tuple[str, tuple[str, int, str, str]]] = []

    def flush() -> None:
        if len(group) == 1:
            out.append(group[0][0])
        elif group:
            head, first = group[0][1][0], group[0][1][1]
            _, last, ts, _ = group[-1][1]
            text = "".join(item[1][3] for item in group)
            out.append(
                f'{head},"seq":{last},"ts":{ts},"data":{{"text":"{text}","from_seq":{first}}}}}'
            )
        group.clear()

    for frame in frames:
        delta = _delta_of(frame)
        if delta is None:
            flush()
            out.append(frame)
            continue
        if group and (group[-1][1][0] != delta[0] or group[-1][1][1] + 1 != delta[1]):
            flush()
        group.append((frame, delta))
    flush()
    return out


def apply_replay(
    frames: Sequence[dict[str, Any]], last_seq: int = 0
) -> tuple[dict[str, str], int]:
    """The client rule, as a model for tests and the demo: apply a thread's frames after
    ``last_seq``. A frame with ``data.from_seq`` continues the last seq applied
    (``from_seq == last_seq + 1``) and covers seqs up to its own; any other frame's seq is
    the next one. Returns (each run's ``agent_text`` joined, the last seq applied).

    Raises:
        ValueError: a frame leaves a gap (the client must resync).
    """
    texts: dict[str, str] = {}
    for frame in frames:
        seq = int(frame["seq"])
        data = frame["data"]
        first = int(data["from_seq"]) if "from_seq" in data else seq
        if first != last_seq + 1 or seq < first:
            raise ValueError(f"frame {first}..{seq} does not continue seq {last_seq}")
        if frame["type"] == EventType.AGENT_TEXT and frame.get("run_id"):
            run = str(frame["run_id"])
            texts[run] = texts.get(run, "") + data["text"]
        last_seq = seq
    return texts, last_seq
