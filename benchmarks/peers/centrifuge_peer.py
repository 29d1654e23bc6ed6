"""centrifuge peer: a Go server on the ``github.com/centrifugal/centrifuge`` library.

The server is ``centrifuge/main.go`` (its doc comment says how the benchmark protocol maps onto
Centrifuge's); this module builds it offline from Debian's packages (the 2021 snapshot
0.15.0+git20210306, Centrifuge client protocol v1 JSON) into ``benchmarks/out/peers/`` and then
becomes it (``exec``), so the runner measures the Go process itself. Its clients speak
Centrifuge's JSON protocol (connect, subscribe, RPC ``bench_burst``; see ``loadgen.Client``).

Fast path: the library's own. Each publication is encoded once per channel, and each client's
writer joins up to 4 queued messages into one WebSocket frame (fixed in that snapshot).
Tuning left on the table: a newer Centrifuge (protocol v2, configurable frame batching),
GOGC, protobuf instead of JSON.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

SOURCE: Final = Path(__file__).resolve().parent / "centrifuge"
BINARY: Final = Path(__file__).resolve().parent.parent / "out" / "peers" / "centrifuge-peer"
#: Debian's Go sources (golang-github-centrifugal-centrifuge-dev and its dependencies).
GOPATH: Final = "/usr/share/gocode"
#: Seconds a build may take (about 25 s from a cold cache on 2 busy cores).
BUILD_TIMEOUT: Final = 300


def build() -> Path:
    """Build the server unless the binary is newer than its source; return the binary.

    Raises:
        RuntimeError: when Go or the Debian sources are missing, or the build fails.
    """
    if BINARY.exists() and BINARY.stat().st_mtime >= (SOURCE / "main.go").stat().st_mtime:
        return BINARY
    go = shutil.which("go")
    if go is None or not Path(GOPATH, "src/github.com/centrifugal/centrifuge").is_dir():
        raise RuntimeError(
            "the centrifuge peer needs Go and Debian's Centrifuge sources: apt-get install "
            "golang-go golang-github-centrifugal-centrifuge-dev (see .ci/run)"
        )
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOPROXY": "off"}
    done = subprocess.run(
        [go, "build", "-o", str(BINARY), "."], cwd=SOURCE, env=env, capture_output=True,
        text=True, timeout=BUILD_TIMEOUT, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the centrifuge peer failed:\n{done.stderr}")
    return BINARY


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lifetime", type=int, default=1800)
    lifetime = parser.parse_known_args()[0].lifetime
    binary = build()
    os.execv(binary, [str(binary), "--lifetime", str(lifetime)])
