"""Start-up helpers shared by the peer processes: lifetime bound and port announcement."""

from __future__ import annotations

import argparse
import resource
import signal
import sys


def parse_lifetime() -> float:
    """Read ``--lifetime`` and arm SIGALRM so the process dies by itself after it (other
    arguments are left to the peer)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--lifetime", type=int, default=1800)
    args, _ = parser.parse_known_args()
    signal.alarm(args.lifetime)  # default SIGALRM action terminates the process
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # idle scenario: many sockets
    return args.lifetime


def announce(port: int) -> None:
    """Print the bound port as the first line of stdout."""
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
