"""node-ws peer: Node's ``ws`` package (8.x), the server in ``node_ws/server.js``.

The package is pinned by ``node_ws/package-lock.json`` and installed with ``npm ci`` in that
directory (``.ci/run`` does it); this module checks it is there and then becomes ``node
server.js`` (``exec``), so the runner measures the Node process itself. Plain JSON frames and
``?user=U``, like the websockets and trio-websocket peers.

Fast path: ``ws.send()`` frames and writes at once, no queue or task of its own; the event JSON
is encoded once per event. ``ws`` has no message batching. Tuning left on the table: the
optional native ``bufferutil``/``utf-8-validate`` add-ons, ``uWebSockets.js``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Final

DIRECTORY: Final = Path(__file__).resolve().parent / "node_ws"


def command(lifetime: int) -> list[str]:
    """The command line of the server.

    Raises:
        RuntimeError: when Node or the installed ``ws`` package is missing.
    """
    node = shutil.which("node")
    if node is None or not (DIRECTORY / "node_modules" / "ws" / "package.json").exists():
        raise RuntimeError(
            f"the node-ws peer needs Node and its packages: cd {DIRECTORY} && npm ci "
            "(see .ci/run)"
        )
    return [node, str(DIRECTORY / "server.js"), "--lifetime", str(lifetime)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lifetime", type=int, default=1800)
    argv = command(parser.parse_known_args()[0].lifetime)
    os.execv(argv[0], argv)
