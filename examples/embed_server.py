"""Embed agentcast in a trio-websocket server; run it, then connect to ws://127.0.0.1:8765/?user=alice"""

import sys

import trio
from trio_websocket import WebSocketRequest, serve_websocket

import agentcast
from agentcast.demo import simulated_agent


async def on_message(session, connection, frame):  # client frame types agentcast leaves to you
    if frame["type"] != "user_message" or not isinstance(frame.get("text"), str):
        raise agentcast.ClientError("bad_message", "send {type: user_message, thread_id, text}")
    session.start_run(frame.get("thread_id"), simulated_agent, frame["text"])


async def handler(request: WebSocketRequest) -> None:
    user = request.path.partition("user=")[2]  # demo only: authenticate for real (see the server)
    try:
        ctx = agentcast.UserContext.from_request(user_id=user)  # rejects "", "None", "null", ...
    except agentcast.InvalidUserContext as exc:  # an escaping error would stop the whole server
        await request.reject(400, body=str(exc).encode())
        return
    ws = await request.accept()
    await agentcast.get_websocket_manager(ctx).serve_connection(ws)  # no await on the factory


async def main(port=8765, *, task_status=trio.TASK_STATUS_IGNORED):
    async with agentcast.open_manager(message_handler=on_message), trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", port, None)
        print(f"listening on ws://127.0.0.1:{server.port}/?user=alice (Ctrl-C stops)", flush=True)
        task_status.started(server)


if __name__ == "__main__":
    try:
        trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8765)  # a port; 0: any free
    except* KeyboardInterrupt:  # Ctrl-C: trio has cancelled everything; no traceback
        print("stopped")
