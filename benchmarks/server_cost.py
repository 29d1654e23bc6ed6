"""Where the standalone server's memory and CPU go (issue 12): tracemalloc and cProfile.

``idle``:

Runs the real server in this process on 127.0.0.1 port 0, opens N idle WebSocket connections
(10 tabs per user, like the runner's ``idle`` scenario) from a child process of plain blocking
sockets, and prints the Python heap the server grew by per connection, by file and by line.
tracemalloc sees Python allocations only (not the kernel's socket buffers, which RSS does not
count either). Stops by itself: the child holds the connections until told to close them.

``profile``: the same server under cProfile while the child reads N subscribed connections
and one event at a time goes to one user after another (a staggered, never-batching stream);
prints server CPU per delivery and the functions it went to.

    python -m benchmarks.server_cost idle --connections 3000
    python -m benchmarks.server_cost profile --connections 100 --rate 2000 --seconds 5
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import subprocess
import sys
import time
import tracemalloc
from typing import Final

import trio

from agentcast import AgentEvent, Config, EventType, UserContext
from agentcast.server import issue_token
from agentcast.server._serve import serve
from agentcast.server._settings import ServerSettings

SECRET: Final = "server-cost-secret-that-is-long-enough-for-hs256"
TABS: Final = 10
#: The child: connect every socket, complete each handshake, report, hold until stdin closes.
CLIENT: Final = r"""
import base64, os, socket, sys
port, tokens = int(sys.argv[1]), sys.argv[2:]
socks = []
for n, token in enumerate(t for t in tokens for _ in range({tabs})):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws?token={{token}} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {{key}}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    socks.append(s)
print(len(socks), flush=True)
if {read}:
    import selectors, threading
    for s in socks:
        body = b'{{"type":"subscribe","thread_id":"t1"}}'
        s.sendall(bytes((0x81, 0x80 | len(body), 0, 0, 0, 0)) + body)
        s.setblocking(False)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    def drain():
        while True:
            for key, _ in sel.select(1):
                try:
                    if not key.fileobj.recv(65536):
                        sel.unregister(key.fileobj)
                except OSError:
                    sel.unregister(key.fileobj)
    threading.Thread(target=drain, daemon=True).start()
sys.stdin.read()
"""


#: Which library a file's allocations belong to, by a piece of its path (first match wins).
OWNERS: Final = (
    ("trio_websocket", "trio-websocket"), ("wsproto", "wsproto + h11"), ("/h11/", "wsproto + h11"),
    ("agentcast", "agentcast"), ("trio", "trio (tasks, scopes, channels, sockets)"),
)


def owner_of(filename: str) -> str:
    """The library ``filename`` belongs to (attrs-generated methods by their class)."""
    return next((owner for piece, owner in OWNERS if piece in filename), "other")


async def measure(connections: int, top: int) -> None:
    """Print the heap the server grew by per idle connection, by file and by line."""
    settings = ServerSettings(port=0, secret=SECRET, core=Config())
    users = [f"idle-{n}" for n in range(connections // TABS)]
    tokens = [issue_token(SECRET, user, ttl=3600) for user in users]
    async with trio.open_nursery() as nursery:
        running = await nursery.start(functools.partial(serve, settings))
        await trio.sleep(0.2)  # let the server's own start-up allocations settle
        before = tracemalloc.take_snapshot()
        with trio.fail_after(300):
            child = await trio.lowlevel.open_process(
                [
                    sys.executable, "-c", CLIENT.format(tabs=TABS, read=False),
                    str(running.port), *tokens,
                ],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            assert child.stdout is not None
            assert child.stdin is not None
            opened = int((await child.stdout.receive_some(64)).strip())
            while running.server.manager.get_stats().connections < opened:  # noqa: ASYNC110 - no event for it
                await trio.sleep(0.05)
            await trio.sleep(0.5)
            after = tracemalloc.take_snapshot()
            await child.stdin.aclose()
            await child.wait()
        nursery.cancel_scope.cancel()
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(filters), after.filter_traces(filters)
    total = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"{opened} idle connections: {total / opened / 1024:.1f} KB of Python heap each")
    print("\nby owner (KB per connection):")
    owners: dict[str, int] = {}
    for stat in after.compare_to(before, "filename"):
        owner = owner_of(stat.traceback[0].filename)
        owners[owner] = owners.get(owner, 0) + stat.size_diff
    for owner, size in sorted(owners.items(), key=lambda item: -item[1]):
        print(f"  {size / opened / 1024:6.2f}  {owner}")
    print("\nby file (KB per connection):")
    for stat in after.compare_to(before, "filename")[:top]:
        print(f"  {stat.size_diff / opened / 1024:6.2f}  {stat.traceback[0].filename}")
    print("\nby line (KB per connection):")
    for stat in after.compare_to(before, "lineno")[:top]:
        frame = stat.traceback[0]
        print(f"  {stat.size_diff / opened / 1024:6.2f}  {frame.filename}:{frame.lineno}")


async def profile(
    connections: int, rate: float, seconds: float, top: int, enabled: bool
) -> None:
    """Profile the server while one event at a time goes to one user after another."""
    settings = ServerSettings(port=0, secret=SECRET, core=Config())
    users = [f"user-{n}" for n in range(connections)]
    tokens = [issue_token(SECRET, user, ttl=3600) for user in users]
    event = AgentEvent(EventType.AGENT_TEXT, {"text": "a few words of a streamed answer"})
    async with trio.open_nursery() as nursery:
        running = await nursery.start(functools.partial(serve, settings))
        manager = running.server.manager
        with trio.fail_after(seconds + 120):
            child = await trio.lowlevel.open_process(
                [
                    sys.executable, "-c", CLIENT.format(tabs=1, read=True),
                    str(running.port), *tokens,
                ],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            assert child.stdout is not None
            assert child.stdin is not None
            opened = int((await child.stdout.receive_some(64)).strip())
            sessions = [manager.get_websocket_manager(UserContext(user_id=u)) for u in users]
            while any(not s.connections() or not s.connections()[0].threads for s in sessions):  # noqa: ASYNC110
                await trio.sleep(0.05)
            sent = manager.get_stats().events_sent
            profiler = cProfile.Profile()
            cpu = time.process_time()
            if enabled:
                profiler.enable()
            deadline = trio.current_time() + seconds
            step, n = 1 / rate, 0
            start = trio.current_time()
            while trio.current_time() < deadline:
                await sessions[n % opened].send_to_thread("t1", event)
                n += 1
                await trio.sleep_until(start + n * step)
            await trio.sleep(0.2)
            profiler.disable()
            cpu = time.process_time() - cpu
            delivered = manager.get_stats().events_sent - sent
            await child.stdin.aclose()
            await child.wait()
        nursery.cancel_scope.cancel()
    print(f"{delivered} deliveries to {opened} connections at {rate:.0f}/s: "
          f"{cpu / max(delivered, 1) * 1e6:.1f} µs of process CPU each"
          f"{' (profiler included)' if enabled else ''}")
    if enabled:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["idle", "profile"])
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-cprofile", action="store_true", help="CPU per delivery only")
    options = parser.parse_args()
    if options.what == "idle":
        tracemalloc.start()
        trio.run(measure, options.connections or 3000, options.top)
    else:
        trio.run(
            profile, options.connections or 100, options.rate, options.seconds, options.top,
            not options.no_cprofile,
        )


if __name__ == "__main__":
    main()
