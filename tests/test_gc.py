"""``tune_gc``: what ``agentcast serve`` does to its own process's garbage collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from agentcast.server import tune_gc
from agentcast.server._cli import main


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    _, older, oldest = gc.get_threshold()
    tune_gc(5000)
    assert gc.get_threshold() == (5000, older, oldest)
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restored_gc")
def test_zero_leaves_the_collector_alone() -> None:
    before = gc.get_threshold()
    tune_gc(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_a_negative_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="0 \\(unchanged\\) or positive"):
        tune_gc(-1)


def test_serve_refuses_a_negative_gc_threshold(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--demo", "--gc-threshold", "-5"]) == 2
    assert (
        "--gc-threshold (or AGENTCAST_GC_THRESHOLD) must be an integer of at least 0, got '-5'"
        in capsys.readouterr().err
    )
