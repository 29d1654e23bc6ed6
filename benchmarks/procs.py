"""Peer and load-generator processes: start, talk to, measure (psutil), and always stop.

Every child is started with a lifetime bound of its own (SIGALRM) and is terminated, then killed,
when the block that started it exits, so nothing outlives the run.

Where the machine allows, the peer and the load generators run on different cores
(:func:`plan_affinity`, applied with ``os.sched_setaffinity`` in the child before it execs), so
a busy server does not starve the clients that stamp arrivals; :func:`set_affinity` chooses it
for the whole run (``--no-pin`` turns it off) and :func:`affinity_as` for one scenario.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any, Final

import attrs
import psutil

from benchmarks.peers import PEERS

#: Seconds a peer has to print its port.
START_TIMEOUT: Final = 30.0
#: Seconds between SIGTERM and SIGKILL when stopping a child.
STOP_GRACE: Final = 3.0
ROOT: Final = Path(__file__).resolve().parent.parent


@attrs.frozen
class Affinity:
    """Cores the peer and the load generators may run on (None: wherever the kernel likes)."""

    server: tuple[int, ...] | None = None
    loadgens: tuple[int, ...] | None = None

    def describe(self) -> dict[str, list[int] | None]:
        return {
            "server": None if self.server is None else list(self.server),
            "loadgens": None if self.loadgens is None else list(self.loadgens),
        }


def plan_affinity(cores: Sequence[int], pin: bool) -> Affinity:
    """Split the usable ``cores``: the first half for the server, the rest for the load
    generators. No pinning when asked not to or with a single core."""
    ordered = sorted(cores)
    if not pin or len(ordered) < 2:
        return Affinity()
    half = len(ordered) // 2
    return Affinity(tuple(ordered[:half]), tuple(ordered[half:]))


_affinity = Affinity()


def set_affinity(affinity: Affinity) -> None:
    """Use ``affinity`` for every peer and load generator started from now on."""
    global _affinity  # noqa: PLW0603 - one setting for the whole run, chosen by the runner
    _affinity = affinity


@contextmanager
def affinity_as(affinity: Affinity) -> Iterator[None]:
    """Use ``affinity`` inside the block, then the run's setting again."""
    previous = _affinity
    set_affinity(affinity)
    try:
        yield
    finally:
        set_affinity(previous)


def _pinned(cores: tuple[int, ...] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child (and so every thread it starts) to ``cores``."""
    if cores is None:
        return None
    return lambda: os.sched_setaffinity(0, cores)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), STOP_GRACE)
    except TimeoutError:
        with suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@attrs.define
class Peer:
    """A running peer server process."""

    name: str
    proc: asyncio.subprocess.Process
    port: int
    ps: psutil.Process

    def cpu(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def peak_rss(self) -> int:
        """Peak RSS (VmHWM) since start or the last :meth:`reset_peak`, in bytes."""
        for line in Path(f"/proc/{self.ps.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return self.rss()  # pragma: no cover - Linux always has VmHWM

    def holds_client_port(self, port: int) -> bool:
        """Whether the server still has an established TCP connection from client ``port``."""
        return any(
            c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
            for c in self.ps.net_connections(kind="tcp4")
        )

    def reset_peak(self) -> None:
        """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5), so a scenario sees its own."""
        with suppress(OSError):
            Path(f"/proc/{self.ps.pid}/clear_refs").write_text("5")


@asynccontextmanager
async def running_peer(
    name: str, lifetime: int, extra_args: Sequence[str] = ()
) -> AsyncIterator[Peer]:
    """Start peer ``name`` (with ``extra_args``) and yield it once it printed its port; stop
    it on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", PEERS[name], "--lifetime", str(lifetime), *extra_args,
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, cwd=ROOT,
        preexec_fn=_pinned(_affinity.server),
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        if not line.strip():
            raise RuntimeError(f"peer {name} exited before printing its port")
        yield Peer(name, proc, int(line), psutil.Process(proc.pid))
    finally:
        await _stop(proc)


@attrs.define
class LoadGen:
    """One load-generator process."""

    proc: asyncio.subprocess.Process

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        await self.proc.stdin.drain()

    async def receive(self, key: str, seconds: float) -> Any:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), seconds)
            if not line:
                raise RuntimeError(f"load generator exited before sending {key!r}")
            message = json.loads(line)
            if key in message:
                return message[key]


@asynccontextmanager
async def running_loadgens(specs: list[dict[str, Any]]) -> AsyncIterator[list[LoadGen]]:
    """Start one load generator per spec (spec already sent); stop them all on exit."""
    gens: list[LoadGen] = []
    try:
        for spec in specs:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.loadgen",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
                preexec_fn=_pinned(_affinity.loadgens),
            )
            gen = LoadGen(proc)
            gens.append(gen)
            await gen.send(json.dumps(spec))
        yield gens
    finally:
        await asyncio.gather(*(_stop(g.proc) for g in gens))
