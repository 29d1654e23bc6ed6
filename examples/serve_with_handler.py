"""Way 1 of getting events into a standalone server: a ``message_handler`` passed to ``serve``.

Clients send their own frames (here ``{"type": "ask", "thread_id": T, "question": Q}``); the
handler gets the user's session and starts a run on it, whose events stream to every tab of
that user subscribed to the thread.

Run it with:  python examples/serve_with_handler.py      (prints a token to connect with)
"""

import os
import secrets
import sys

import trio

import agentcast
from agentcast.server import ServerSettings, issue_token, serve


async def answer(run: agentcast.Run, question: str) -> str:
    await run.thinking(f"Thinking about {question!r}", progress=0.5)
    for word in ("Nurseries ", "own ", "their ", "tasks."):
        await run.text(word)
        await trio.sleep(0.05)
    return "answered"


async def on_message(session, connection, frame):  # every frame type agentcast leaves to you
    if frame["type"] != "ask" or not isinstance(frame.get("question"), str):
        raise agentcast.ClientError("bad_request", "send {type: ask, thread_id, question}")
    session.start_run(frame.get("thread_id"), answer, frame["question"], agent_name="answerer")


async def main(port=8765, *, task_status=trio.TASK_STATUS_IGNORED):
    secret = os.environ.get("AGENTCAST_SECRET") or secrets.token_urlsafe(32)
    settings = ServerSettings(port=port, secret=secret)
    async with trio.open_nursery() as nursery:
        running = await nursery.start(lambda task_status: serve(
            settings, message_handler=on_message, task_status=task_status))
        print(f"listening on ws://{running.host}:{running.port}/ws", flush=True)
        print(f"token for alice: {issue_token(secret, 'alice')}", flush=True)
        task_status.started(running)


if __name__ == "__main__":
    try:
        trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8765)  # a port; 0: any free
    except* KeyboardInterrupt:  # Ctrl-C: trio has cancelled everything; no traceback
        print("stopped")
