"""The servers the benchmark compares, one module each, all speaking ``benchmarks.protocol``.

Each runs as its own process: ``python -m benchmarks.peers.<module> [--lifetime S]`` prints its
bound port on the first line of stdout. ``centrifuge`` (Go) and ``node-ws`` (Node) are
launchers that build or check their server and then ``exec`` it.
"""

from __future__ import annotations

from typing import Final

#: Peer name -> module, in report order.
PEERS: Final = {
    "agentcast": "benchmarks.peers.agentcast_peer",
    "agentcast-asgi": "benchmarks.peers.agentcast_asgi_peer",
    "websockets": "benchmarks.peers.websockets_peer",
    "socketio": "benchmarks.peers.socketio_peer",
    "trio-websocket": "benchmarks.peers.trio_websocket_peer",
    "centrifuge": "benchmarks.peers.centrifuge_peer",
    "node-ws": "benchmarks.peers.node_ws_peer",
}

#: Shared secret for the agentcast peer's tokens (benchmark only; loopback).
BENCH_SECRET: Final = "benchmark-secret-benchmark-secret-0123456789"
