"""The exception family: every error agentcast raises on purpose derives from AgentcastError."""

from __future__ import annotations

__all__ = [
    "AgentcastError",
    "ClientError",
    "InvalidEvent",
    "InvalidIdentifier",
    "InvalidUserContext",
    "ManagerNotReady",
    "ManagerNotRunning",
    "RunEnded",
    "RunTooLarge",
    "SessionClosed",
    "TooManyConnections",
    "TooManyRuns",
    "TooManyThreads",
]


class AgentcastError(Exception):
    """Base class of every error agentcast raises on purpose, so callers can catch the family."""


class InvalidIdentifier(AgentcastError, ValueError):
    """An id (user, thread, run, request) broke a rule; the message names the field and the rule."""


class InvalidUserContext(InvalidIdentifier):
    """A :class:`UserContext` could not be built; the message names the field and the rule."""


class InvalidEvent(AgentcastError, ValueError):
    """An event's type or data does not satisfy the wire schema in ``docs/protocol.md``."""


class ManagerNotRunning(AgentcastError, RuntimeError):
    """No running :class:`ConnectionManager` could be found, or it is shutting down."""


class ManagerNotReady(AgentcastError, TimeoutError):
    """The manager (or its broker) did not become ready within ``Config.ready_timeout``."""


class SessionClosed(AgentcastError, RuntimeError):
    """The session was closed (linger expired, crash or shutdown); get a fresh one."""


class RunEnded(AgentcastError, RuntimeError):
    """An event was emitted through a run that has already sent its terminal event."""


class ClientError(AgentcastError):
    """Raise from a message handler to answer the client with an ``error`` frame.

    The connection stays open; nothing else is affected.

    Args:
        code: a short machine-readable code, e.g. ``"unknown_thread"``.
        message: what was wrong, for the client's developer.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BrokerUnavailable(AgentcastError, RuntimeError):
    """The broker's backend (Redis) is not reachable; the call can be retried once it is."""


class TooManyRuns(AgentcastError, RuntimeError):
    """The user already has ``Config.max_active_runs_per_user`` runs active; wait for one to
    end (or cancel one) before starting another. A client whose frame started it gets an
    ``error`` frame ``too_many_runs``."""


class TooManyThreads(AgentcastError, RuntimeError):
    """The user already has ``Config.max_threads_per_user`` streams in use (subscribed or
    written to by a run); unsubscribe from one first. A subscribe answers ``too_many_threads``."""


class TooManyConnections(AgentcastError, RuntimeError):
    """The user already holds ``Config.max_connections_per_user`` connections (open or being
    opened); close one first. The server refuses such a handshake with HTTP 429."""


class RunTooLarge(AgentcastError, RuntimeError):
    """A run's retained events would pass ``Config.max_run_bytes``: the publish that crosses
    it is refused (no seq is assigned), and so is every later non-terminal event of the run.
    Raised inside a run's body, it ends the run with ``agent_error`` ``RunTooLarge`` (the
    terminal event itself is never refused). Stream less per run, or raise the cap."""
