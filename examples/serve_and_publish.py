"""Way 2: the embedded server's manager, ``RunningServer.manager``, in the same trio program.

``serve`` runs the standalone server inside your program; what ``nursery.start`` hands back
names its manager, so your own code (a job queue consumer, a timer, an HTTP callback) publishes
to a user exactly as with ``open_manager``: ``running.manager.get_websocket_manager(ctx)``.

Run it with:  python examples/serve_and_publish.py
Then connect as alice (token printed) and subscribe to "news": a run arrives every 5 seconds.
"""

import os
import secrets
import sys

import trio

import agentcast
from agentcast.server import ServerSettings, issue_token, serve


async def publish_forever(manager: agentcast.ConnectionManager, every: float = 5.0) -> None:
    session = manager.get_websocket_manager(agentcast.UserContext(user_id="alice"))
    while True:
        async with session.run("news", agent_name="ticker") as run:
            await run.text("Something happened. ")
            run.result = {"headline": "something happened"}
        await trio.sleep(every)


async def main(port=8765, every=5.0, *, task_status=trio.TASK_STATUS_IGNORED):
    secret = os.environ.get("AGENTCAST_SECRET") or secrets.token_urlsafe(32)
    async with trio.open_nursery() as nursery:
        running = await nursery.start(serve, ServerSettings(port=port, secret=secret))
        print(f"listening on ws://{running.host}:{running.port}/ws", flush=True)
        print(f"token for alice: {issue_token(secret, 'alice')}", flush=True)
        nursery.start_soon(publish_forever, running.manager, every)
        task_status.started(running)


if __name__ == "__main__":
    try:
        trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8765)  # a port; 0: any free
    except* KeyboardInterrupt:  # Ctrl-C: trio has cancelled everything; no traceback
        print("stopped")
