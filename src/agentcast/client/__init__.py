"""The Python client of an agentcast server, for services and for tests against a real server.

Under trio (trio-websocket)::

    from agentcast.client import Resync, connect

    async with connect("ws://127.0.0.1:8765/ws", token=token) as client:
        async for item in client.subscribe("thread-1"):
            if isinstance(item, Resync):
                ...  # events were missed: reload the thread from your own store
            else:
                print(item.seq, item.type, item.data)

It keeps each thread's seq and epoch, resumes with ``since_seq`` after every reconnect, drops
duplicate seqs, surfaces ``recovered: false`` as a :class:`Resync` item, splits batched
messages, and reconnects or stops by close code, with the same tables as the browser client
(:mod:`agentcast.client._policy`).
"""

from ._client import Client as Client
from ._client import ClientClosed as ClientClosed
from ._client import Event as Event
from ._client import Resync as Resync
from ._client import Subscription as Subscription
from ._client import connect as connect
from ._policy import BACKOFF as BACKOFF
from ._policy import CLOSE_POLICY as CLOSE_POLICY
from ._policy import Action as Action
from ._policy import Backoff as Backoff

__all__ = [
    "BACKOFF",
    "CLOSE_POLICY",
    "Action",
    "Backoff",
    "Client",
    "ClientClosed",
    "Event",
    "Resync",
    "Subscription",
    "connect",
]
