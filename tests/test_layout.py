"""The backplane's layout: nothing the asyncio publisher imports imports trio, and the public
names stayed where users import them from.

Why a static walk of the import graph and not a subprocess that imports the publisher and looks
for trio in ``sys.modules``: importing any ``agentcast`` submodule first runs
``agentcast/__init__``, which exports the trio manager, so trio is always loaded and such a check
could never pass. What keeps the publisher usable under asyncio is that the modules its code
runs (the publisher and everything it imports inside agentcast, deferred imports included) never
use trio; that is what the walk checks, from the source, following relative and absolute
imports inside the package and skipping only ``if TYPE_CHECKING:`` blocks (never executed) and
the package ``__init__`` modules (re-export surfaces; the backplane's own are kept empty, which
is checked too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import agentcast
import agentcast.publisher
from agentcast.backplane.memory import InMemoryBroker
from agentcast.backplane.protocol import Broker, BrokerStats, EventSink
from agentcast.backplane.redis.broker import BackplaneStats, RedisBroker
from agentcast.backplane.redis.publisher import PublisherRun, RedisPublisher

SRC = Path(agentcast.__file__).resolve().parent.parent
PUBLISHER = "agentcast.backplane.redis.publisher"


def module_path(name: str) -> Path:
    base = SRC.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str) -> set[str]:
    """Absolute names of every module ``name`` imports (at any depth of its code), except
    under ``if TYPE_CHECKING:``."""
    path = module_path(name)
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            for alias in node.names:  # `from . import x` may name a submodule
                if module_path(f"{module}.{alias.name}").exists():
                    found.add(f"{module}.{alias.name}")
        for inner in ast.iter_child_nodes(node):
            visit(inner)

    visit(tree)
    return found


def agentcast_closure(start: str) -> dict[str, set[str]]:
    """Every agentcast module reachable from ``start`` (package ``__init__``s not followed),
    with its imports."""
    graph: dict[str, set[str]] = {}
    todo = [start]
    while todo:
        name = todo.pop()
        if name in graph:
            continue
        graph[name] = imports_of(name)
        for imported in graph[name]:
            if imported.startswith("agentcast.") and module_path(imported).name != "__init__.py":
                todo.append(imported)
    return graph


def test_nothing_the_asyncio_publisher_imports_imports_trio() -> None:
    graph = agentcast_closure(PUBLISHER)
    users_of_trio = sorted(
        name for name, imported in graph.items()
        if any(i == "trio" or i.startswith("trio.") or i.startswith("trio_") for i in imported)
    )
    assert users_of_trio == []
    # The walk saw the publisher's real dependencies (it is not vacuous).
    assert {
        "agentcast.backplane.redis.streams", "agentcast.backplane.redis.pipeline",
        "agentcast.backplane.redis.queue", "agentcast.backplane.redis.keys",
        "agentcast._run_shell", "agentcast._events",
    } <= graph.keys()
    assert "agentcast.backplane.redis.broker" not in graph


def test_the_walk_finds_trio_where_it_is_used() -> None:
    assert "trio" in imports_of("agentcast.backplane.redis.broker")
    assert "trio" in imports_of("agentcast.backplane.memory")


def test_the_backplane_packages_import_nothing() -> None:
    for package in ("agentcast.backplane", "agentcast.backplane.redis"):
        assert imports_of(package) == set()


def test_public_names_stay_where_users_import_them() -> None:
    assert agentcast.publisher.RedisPublisher is agentcast.RedisPublisher is RedisPublisher
    assert agentcast.publisher.PublisherRun is agentcast.PublisherRun is PublisherRun
    assert agentcast.RedisBroker is RedisBroker
    assert agentcast.BackplaneStats is BackplaneStats
    assert agentcast.InMemoryBroker is InMemoryBroker
    assert (agentcast.Broker, agentcast.BrokerStats, agentcast.EventSink) == (
        Broker, BrokerStats, EventSink,
    )
