"""``agentcast serve --workers N``: N server processes sharing one port, on the Redis backplane.

Rules of this module: the parent does no serving. It picks the port (a free one for
``--port 0``), starts N copies of the same command with ``--workers 1`` and SO_REUSEPORT (the
kernel spreads new connections over them), prints one ``agentcast listening on`` line once
every worker is listening, forwards SIGTERM/SIGINT to them, and exits 0 once they have all
drained and exited 0. A worker that cannot start as configured (exit status 2, e.g. a port in
use) makes the parent exit 2 with the worker's one-line reason; a worker that dies on its own
stops the others and the parent exits 1: restarting is the job of the process supervisor
(systemd, Kubernetes), which sees it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import IO, Final

__all__ = ["run_workers"]

#: Seconds between checks of the workers' state.
POLL_INTERVAL: Final = 0.05
#: Seconds workers may take to drain after a forwarded signal before they are killed.
DRAIN_TIMEOUT: Final = 30.0
#: Exit status of a worker (and so of the parent) that could not start as configured, e.g. a
#: port in use: the same as ``agentcast serve`` without workers.
USAGE_ERROR: Final = 2


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _copy_lines(index: int, stream: IO[str]) -> None:
    """Pass a worker's output on, prefixed with its number."""
    for line in stream:
        print(f"[worker {index}] {line}", end="", flush=True)


def run_workers(argv: Sequence[str], workers: int, host: str, port: int) -> int:
    """Run ``workers`` copies of ``agentcast`` + ``argv`` (``--workers 1 --port P`` appended).

    Returns:
        The exit status: 0 when every worker drained and exited 0 after a signal.
    """
    port = port or _free_port(host)
    command = [sys.executable, "-m", "agentcast", *argv, "--workers", "1", "--port", str(port)]
    env = {**os.environ, "AGENTCAST_REUSE_PORT": "1"}
    processes: list[subprocess.Popen[str]] = []
    stopping = threading.Event()

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        processes.extend(
            subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(workers)
        )
        for index, process in enumerate(processes):
            assert process.stdout is not None
            first = process.stdout.readline()
            if not first.startswith("agentcast listening on"):
                forward(signal.SIGTERM, None)
                status = _wait_all(processes) or 1
                if process.returncode == USAGE_ERROR:
                    return USAGE_ERROR  # the worker has said why, in one line, on stderr
                print(f"agentcast serve: worker {index} failed to start", file=sys.stderr)
                return status
        print(f"agentcast listening on http://{host}:{port}", flush=True)
        print(f"agentcast: {workers} workers, pids "
              f"{' '.join(str(p.pid) for p in processes)}", flush=True)
        for index, process in enumerate(processes):
            assert process.stdout is not None
            threading.Thread(
                target=_copy_lines, args=(index, process.stdout), daemon=True,
                name=f"agentcast-worker-{index}-output",
            ).start()
        while not stopping.is_set():
            if any(process.poll() is not None for process in processes):
                print("agentcast serve: a worker exited; stopping the others", file=sys.stderr)
                forward(signal.SIGTERM, None)
                _wait_all(processes)
                return 1
            time.sleep(POLL_INTERVAL)
        return _wait_all(processes)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_all(processes: list[subprocess.Popen[str]]) -> int:
    """Wait for every worker (killing any past the drain deadline); 0 if all exited 0."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    status = 0
    for process in processes:
        try:
            code = process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        status = status or (0 if code == 0 else 1)
    return status
