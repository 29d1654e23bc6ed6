"""The public surface: what ``agentcast`` and ``agentcast.testing`` export."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import agentcast
import agentcast.testing


def reexports() -> list[tuple[str, str]]:
    """(name, defining module) of every ``from .x import Name as Name`` in ``__init__``."""
    tree = ast.parse(Path(agentcast.__file__).read_text())
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            assert node.level == 1, "agentcast/__init__.py imports only its own modules"
            for alias in node.names:
                assert alias.asname == alias.name, f"{alias.name} is re-exported under a new name"
                found.append((alias.name, f"agentcast.{node.module}"))
    return found


REEXPORTS = reexports()
CONTRACT = [
    "UserContext", "InvalidUserContext", "open_manager", "get_websocket_manager",
    "get_websocket_manager_async", "ManagerNotRunning", "AgentEvent", "EventType", "Config",
    "ConnectionManager", "UserSession", "RedisBroker", "RedisPublisher",
    "TooManyRuns", "TooManyConnections", "TooManyThreads",
]


def test_init_reexports_something() -> None:
    assert len(REEXPORTS) >= len(CONTRACT)
    assert len({name for name, _ in REEXPORTS}) == len(REEXPORTS)


@pytest.mark.parametrize(("name", "module"), REEXPORTS)
def test_every_reexport_is_importable_and_is_the_private_object(name: str, module: str) -> None:
    namespace: dict[str, object] = {}
    # The literal statement users write, not just attribute access.
    exec(f"from agentcast import {name}", namespace)
    exported = namespace[name]
    assert exported is getattr(agentcast, name)
    assert exported is getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("name", "module"), REEXPORTS)
def test_reexported_classes_and_functions_belong_to_agentcast(name: str, module: str) -> None:
    exported = getattr(agentcast, name)
    if inspect.isclass(exported) or inspect.isfunction(exported):
        assert exported.__module__.startswith("agentcast"), exported.__module__
        assert exported.__module__ == module
    else:
        # Constants and type aliases (BATCH_SUBPROTOCOL, MessageHandler, AgentFunction).
        assert name.isupper() or name in {"MessageHandler", "AgentFunction"}


def test_public_names_of_the_package_are_exactly_the_reexports() -> None:
    public = {
        name for name in vars(agentcast)
        if not name.startswith("_") and not inspect.ismodule(getattr(agentcast, name))
    }
    assert public == {name for name, _ in REEXPORTS}


@pytest.mark.parametrize("name", CONTRACT)
def test_contract_names_exist(name: str) -> None:
    assert hasattr(agentcast, name)
    assert name in {exported for exported, _ in REEXPORTS}


def test_contract_kinds() -> None:
    assert issubclass(agentcast.InvalidUserContext, ValueError)
    assert issubclass(agentcast.ManagerNotRunning, agentcast.AgentcastError)
    assert issubclass(agentcast.ManagerNotRunning, RuntimeError)
    assert inspect.iscoroutinefunction(agentcast.get_websocket_manager_async)
    assert not inspect.iscoroutinefunction(agentcast.get_websocket_manager)
    assert callable(agentcast.open_manager)
    assert inspect.isclass(agentcast.UserContext)
    assert callable(agentcast.UserContext.from_request)


def test_every_error_derives_from_agentcast_error() -> None:
    errors = [
        getattr(agentcast, name) for name, _ in REEXPORTS
        if inspect.isclass(getattr(agentcast, name))
        and issubclass(getattr(agentcast, name), BaseException)
    ]
    assert len(errors) >= 8
    for error in errors:
        assert issubclass(error, agentcast.AgentcastError)


def test_event_type_values() -> None:
    values = {member.value for member in agentcast.EventType}
    assert {
        "agent_started", "agent_thinking", "tool_executing", "tool_completed",
        "agent_completed", "agent_error", "agent_cancelled",
    } <= values
    assert agentcast.EventType.AGENT_STARTED.value == "agent_started"
    assert isinstance(agentcast.EventType.AGENT_STARTED, str)


def test_testing_exports_memory_transport() -> None:
    transport = agentcast.testing.MemoryTransport
    assert inspect.isclass(transport)
    assert transport.__module__ == "agentcast.testing"
    assert agentcast.testing.__all__ == ["MemoryTransport"]
    server, client = transport.pair()
    assert isinstance(server, agentcast.Transport)
    assert isinstance(client, agentcast.Transport)


def test_version_is_a_string() -> None:
    assert isinstance(agentcast.__version__, str)
    assert agentcast.__version__.count(".") == 2
