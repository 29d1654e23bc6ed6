"""Load generator process: opens connections to one peer, drives it, and reports what arrived.

Run as ``python -m benchmarks.loadgen``; it talks to the orchestrator in JSON lines:

1. reads the spec (one JSON line on stdin; see :func:`main`), opens ``tabs`` connections per
   user (``concurrency`` handshakes at a time), subscribes each to ``thread``, and prints
   ``{"ready": ...}`` with handshake figures;
2. waits for ``go`` on stdin; then the first tab of each user sends ``bench_burst`` (``drive``),
   and every event is checked (:mod:`benchmarks.stats`) until all expected events arrived, the
   stream went quiet, or the deadline passed; without ``drive`` it waits for ``close``;
3. with ``drive``: prints ``{"result": ...}`` (counts, latency histogram, its own CPU time)
   while the connections are still open, waits for ``close``, closes them; without: closes
   them, then prints the result;
4. prints ``{"closed": true}`` and exits (the runner times the server's teardown CPU apart).

The ``centrifuge`` peer speaks Centrifuge's client protocol v1 JSON (commands with ids,
newline-delimited replies and publication pushes): :class:`Client` connects, subscribes to the
user's channel ``U/T`` and sends ``bench_burst`` as an RPC; every other peer gets the benchmark
frames as they are.

asyncio with the ``websockets`` client (no compression, like every peer) and orjson: the
lightest client stack available here. It dies by SIGALRM after ``lifetime`` seconds at most.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import socket
import sys
import threading
import time
from contextlib import suppress
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from benchmarks.protocol import token_schedule, token_seed
from benchmarks.stats import Histogram, StreamCheck, Tally

#: Receive buffer of the client that stops reading, so the server's buffers fill quickly.
SLOW_RCVBUF = 4096
#: Centrifuge protocol v1 command ids and methods used here (protocol.MethodType).
CF_CONNECT_ID, CF_SUBSCRIBE_ID, CF_RPC_ID = 1, 2, 3
CF_SUBSCRIBE, CF_RPC = 1, 9


class Client:
    """One WebSocket connection of one user, speaking the peer's framing."""

    def __init__(self, spec: dict[str, Any], user: str, slow: bool = False) -> None:
        self.spec, self.user, self.slow = spec, user, slow
        self.peer: str = spec["peer"]
        self.ws: ClientConnection | None = None
        self.check = StreamCheck()
        self.subscribed = asyncio.Event()
        self.close_code: int | None = None

    def _uri(self) -> str:
        port = self.spec["port"]
        if self.peer.startswith("agentcast"):  # agentcast, agentcast-asgi
            return f"ws://127.0.0.1:{port}/ws"
        if self.peer == "socketio":
            return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
        if self.peer == "centrifuge":
            return f"ws://127.0.0.1:{port}/connection/websocket?user={self.user}"
        return f"ws://127.0.0.1:{port}/?user={self.user}"

    async def open(self) -> None:
        kwargs: dict[str, Any] = {"compression": None, "ping_interval": None, "open_timeout": 60}
        if self.peer.startswith("agentcast"):  # agentcast, agentcast-asgi
            token = self.spec["tokens"][self.user]
            kwargs["subprotocols"] = ["agentcast.ndjson", f"bearer.{token}"]
        if self.slow:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.spec["port"]))
            kwargs.update(sock=sock, max_queue=1)
        self.ws = await connect(self._uri(), **kwargs)
        if self.peer == "socketio":
            await self.ws.recv()  # Engine.IO open packet "0{...}"
            await self.ws.send("40" + json.dumps({"user": self.user}))
            while not str(await self.ws.recv()).startswith("40"):  # Socket.IO connect ack
                pass
        if self.peer == "centrifuge":
            await self.ws.send(json.dumps({"id": CF_CONNECT_ID, "params": {}}))
            reply = orjson.loads(str(await self.ws.recv()).split("\n", 1)[0])
            if reply.get("id") != CF_CONNECT_ID or "error" in reply:
                raise ValueError(f"centrifuge connect refused: {reply}")

    async def send(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        if self.peer == "socketio":
            await self.ws.send("42" + json.dumps([frame["type"], frame]))
        elif self.peer == "centrifuge":
            if frame["type"] == "subscribe":
                command = {"id": CF_SUBSCRIBE_ID, "method": CF_SUBSCRIBE,
                           "params": {"channel": f"{self.user}/{frame['thread_id']}"}}
            else:
                command = {"id": CF_RPC_ID, "method": CF_RPC,
                           "params": {"method": frame["type"], "data": frame}}
            await self.ws.send(json.dumps(command))
        else:
            await self.ws.send(json.dumps(frame))

    def frames(self, message: str | bytes) -> list[Any]:
        """The JSON frames in one WebSocket message (NDJSON batch, Socket.IO packet or plain)."""
        text = message.decode() if isinstance(message, bytes) else message
        if self.peer.startswith("agentcast"):  # agentcast, agentcast-asgi
            return [orjson.loads(line) for line in text.split("\n")]
        if self.peer == "socketio":
            if text.startswith("42"):
                return [orjson.loads(text[2:])[1]]
            if text == "2" and self.ws is not None:  # Engine.IO ping
                asyncio.ensure_future(self.ws.send("3"))  # noqa: RUF006 - fire and forget
            return []
        if self.peer == "centrifuge":
            return [frame for line in text.split("\n") if line
                    for frame in _centrifuge_frame(orjson.loads(line))]
        return [orjson.loads(text)]


def _centrifuge_frame(reply: dict[str, Any]) -> list[Any]:
    """The benchmark frame in one Centrifuge v1 reply: the subscribe reply becomes
    ``subscribed``, a publication push its payload (the event); the rest carries none."""
    if "id" in reply:
        if reply["id"] == CF_SUBSCRIBE_ID and "error" not in reply:
            return [{"type": "subscribed"}]
        return []
    push = reply.get("result") or {}
    if push.get("type", 0) != 0:  # 0, omitted: a publication
        return []
    return [(push.get("data") or {}).get("data")]


class Run:
    """All clients of this process and the running totals."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.clients = [Client(spec, user) for user in spec["users"] for _ in range(spec["tabs"])]
        if spec.get("slow_user"):
            self.clients.append(Client(spec, spec["slow_user"], slow=True))
        self.histogram = Histogram()
        self.cross_user = 0
        self.observed = 0
        self.last_arrival = 0.0
        self.all_in = asyncio.Event()
        drive = spec.get("drive") or {}
        self.expected = int(drive.get("count", 0))
        #: tokens: each user's own stream (``token_seconds``), the same in every peer's run.
        self.schedules = {
            user: token_schedule(token_seed(user, drive["seed"]), drive["token_seconds"])
            for user in spec["users"]
        } if "token_seconds" in drive else {}
        self.expected_total = sum(self.expected_for(c.user) for c in self.clients if not c.slow)

    def expected_for(self, user: str) -> int:
        """Events each connection of ``user`` should receive."""
        schedule = self.schedules.get(user)
        return self.expected if schedule is None else len(schedule)

    async def open_all(self) -> dict[str, Any]:
        limit = asyncio.Semaphore(self.spec.get("concurrency", 200))
        times: list[float] = []
        failures: list[str] = []

        async def one(client: Client) -> None:
            async with limit:
                began = time.perf_counter()
                try:
                    await client.open()
                    times.append(time.perf_counter() - began)
                except (OSError, ConnectionClosed, TimeoutError, ValueError) as exc:
                    failures.append(type(exc).__name__)
                    return
            asyncio.get_running_loop().create_task(self.read(client))
            if self.spec.get("thread"):
                await client.send({"type": "subscribe", "thread_id": self.spec["thread"]})
                await asyncio.wait_for(client.subscribed.wait(), 60)

        began = time.perf_counter()
        await asyncio.gather(*(one(c) for c in self.clients))
        wall = time.perf_counter() - began
        self.clients = [c for c in self.clients if c.ws is not None]
        times.sort()
        slow_ports = [c.ws.local_address[1] for c in self.clients if c.slow and c.ws is not None]
        return {
            "slow_port": slow_ports[0] if slow_ports else None,
            "opened": len(times), "failures": len(failures), "failure_kinds": sorted(set(failures)),
            "wall": wall, "handshake_p50": times[len(times) // 2] if times else None,
            "handshake_p99": times[int(len(times) * 0.99)] if times else None,
        }

    async def read(self, client: Client) -> None:
        assert client.ws is not None
        if client.slow:
            # Read until subscribed, then stop reading: the server's buffers fill up.
            while not client.subscribed.is_set():
                for frame in client.frames(await client.ws.recv()):
                    if frame.get("type") == "subscribed":
                        client.subscribed.set()
            return
        try:
            async for message in client.ws:
                arrival = time.time()
                for frame in client.frames(message):
                    self.on_frame(client, frame, arrival)
        except ConnectionClosed:
            pass
        client.close_code = client.ws.close_code

    def on_frame(self, client: Client, frame: dict[str, Any], arrival: float) -> None:
        kind = frame.get("type")
        if kind == "subscribed":
            client.subscribed.set()
            return
        data = frame.get("data")
        if not isinstance(data, dict) or "n" not in data:
            return
        self.last_arrival = arrival
        if data["u"] != client.user:
            self.cross_user += 1
            return
        self.histogram.record(arrival - data["t"])
        client.check.observe(data["n"])
        self.observed += 1
        if self.observed >= self.expected_total:
            self.all_in.set()

    async def drive(self) -> dict[str, Any]:
        drive = self.spec["drive"]
        cpu0, wall0 = time.process_time(), time.time()
        drivers: dict[str, Client] = {}
        for client in self.clients:
            if not client.slow:
                drivers.setdefault(client.user, client)
        frame = {"type": "bench_burst", "thread_id": self.spec["thread"], **drive}
        phases: dict[str, float] = drive.get("phases") or {}
        frame.pop("phases", None)

        async def start(client: Client) -> None:
            # Staggered steady: each user's emission starts at its own phase of the period.
            if phases.get(client.user):
                await asyncio.sleep(phases[client.user])
            schedule = self.schedules.get(client.user)
            if schedule is None:
                await client.send(frame)
            else:
                await client.send({**frame, "schedule": schedule, "count": len(schedule)})

        await asyncio.gather(*(start(c) for c in drivers.values()))
        deadline = wall0 + self.spec.get("deadline", 60)
        quiet = self.spec.get("quiet", 3.0)
        while not self.all_in.is_set():
            now = time.time()
            if now > deadline or (self.last_arrival and now - self.last_arrival > quiet):
                break
            with suppress(TimeoutError):
                await asyncio.wait_for(self.all_in.wait(), 0.1)
        cpu, end = time.process_time() - cpu0, max(self.last_arrival, wall0)
        return {"cpu": cpu, "wall": end - wall0, **await self.totals()}

    async def totals(self) -> dict[str, Any]:
        tally = Tally(cross_user=self.cross_user)
        slow: dict[str, Any] | None = None
        for client in self.clients:
            if client.slow:
                slow = await self.slow_outcome(client)
            else:
                tally.add_stream(client.check, self.expected_for(client.user))
        return {
            "tally": {f: getattr(tally, f) for f in ("delivered", "losses", "duplicates",
                                                     "order_violations", "cross_user")},
            "histogram": self.histogram.to_json(), "slow": slow,
            "closed_by_server": sum(1 for c in self.clients if c.close_code is not None),
        }

    async def slow_outcome(self, client: Client) -> dict[str, Any]:
        """Read what the stalled client had queued: did the server close it, after how many?"""
        assert client.ws is not None
        highest, code = 0, None
        try:
            async with asyncio.timeout(3):
                async for message in client.ws:
                    for frame in client.frames(message):
                        data = frame.get("data")
                        if isinstance(data, dict) and "n" in data:
                            highest = max(highest, data["n"])
        except (ConnectionClosed, TimeoutError):
            pass
        code = client.ws.close_code
        return {"closed": code is not None, "close_code": code, "events_before_close": highest}

    async def close_all(self) -> None:
        async def one(client: Client) -> None:
            if client.ws is not None:
                try:
                    async with asyncio.timeout(2):
                        await client.ws.close()
                except (TimeoutError, ConnectionClosed, OSError):
                    client.ws.transport.abort()

        await asyncio.gather(*(one(c) for c in self.clients))


def raise_fd_limit() -> None:
    """Lift the soft open-file limit to the hard one (idle scenario: thousands of sockets)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def main() -> None:
    """Spec keys: peer, port, tokens (agentcast: user -> token), users, tabs, thread,
    drive ({count, size, rate} or null), slow_user, concurrency, deadline, quiet, lifetime."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        loop.call_soon_threadsafe(lines.put_nowait, "close")

    threading.Thread(target=pump, daemon=True).start()
    spec = json.loads(await lines.get())
    signal.alarm(int(spec.get("lifetime", 600)))
    raise_fd_limit()
    run = Run(spec)
    emit({"ready": await run.open_all()})
    command = await lines.get()
    if command == "go" and spec.get("drive"):
        # The result goes out before the connections close, so the runner can read the
        # server's CPU for the delivery alone; the teardown is measured after "close".
        emit({"result": await run.drive()})
        await lines.get()
        await run.close_all()
    else:
        if command == "go":
            command = await lines.get()
        await run.close_all()
        emit({"result": {"cpu": time.process_time(), "wall": 0.0}})
    emit({"closed": True})


if __name__ == "__main__":
    asyncio.run(main())
