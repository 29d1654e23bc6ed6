"""May a live event skip the queue and be written in the producer's step?

Rules of this module: pure, no I/O, no trio. A connection (the trio shell in ``_connection.py``)
asks :func:`may_write_through` for every live event its subscriptions let through, before it
queues the event; on yes it calls its transport's ``send_nowait`` (``_transport.WritesThrough``)
and queues the event only if that wrote nothing. The rule keeps every guarantee of the queued
path:

- Order: only when the writer is parked on its channel and nothing is queued (the connection
  clears ``writer_idle`` whenever it queues anything, so an event handed to a writer that has
  not run yet counts as queued) and no write is in progress or part-written. Events the
  subscribe/replay merge holds never reach this question.
- Closing: never once a close has begun (queued events are then dropped or drained by the
  writer, and a write-through would race the close frame).
- Batching: a connection that batches writes through only after ``BATCH_GAP`` without a send,
  so an event arriving alone is written at once but a burst (a producer in a loop, or a
  producer catching up) goes through the queue and leaves in the writer's batches.
"""

from __future__ import annotations

from typing import Final

__all__ = ["BATCH_GAP", "may_write_through"]

#: Seconds without a send after which a batching connection writes an event through. Events
#: of one agent's token stream come 20-50 ms apart; a producer in a loop emits them
#: microseconds apart, and those are what batches are made of.
BATCH_GAP: Final = 0.001


def may_write_through(
    *, closing: bool, writer_idle: bool, writing: bool, batch: bool, now: float,
    last_sent: float, gap: float = BATCH_GAP,
) -> bool:
    """Whether a live event may be written now, ahead of the writer task.

    Args:
        closing: a close of the connection has begun.
        writer_idle: the writer is waiting for its channel and nothing has been queued since.
        writing: a write is in progress or a write-through left part of a frame to finish.
        batch: the connection joins queued events into batches.
        now: the current time (trio's clock).
        last_sent: when the last send began (trio's clock).
        gap: a batching connection's quiet time before it writes through.
    """
    if closing or writing or not writer_idle:
        return False
    return not batch or now - last_sent >= gap
