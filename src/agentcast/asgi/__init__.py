"""agentcast inside an ASGI app: Starlette, FastAPI, Quart-Trio (``pip install 'agentcast[asgi]'``).

Under a trio ASGI server (``hypercorn --worker-class trio``)::

    app = FastAPI(lifespan=agentcast.asgi.lifespan())
    app.mount("/ws", agentcast.asgi.endpoint(authenticate=my_auth))

Under an asyncio server (uvicorn) use ``lifespan=agentcast.asgi.threaded()`` instead: the manager
then runs in its own trio thread. The core of agentcast never imports this package.
"""

from ._endpoint import AsyncioNotSupported as AsyncioNotSupported
from ._endpoint import Authenticate as Authenticate
from ._endpoint import Endpoint as Endpoint
from ._endpoint import Lifespan as Lifespan
from ._endpoint import Refuse as Refuse
from ._endpoint import Scope as Scope
from ._endpoint import endpoint as endpoint
from ._endpoint import lifespan as lifespan
from ._endpoint import serve_websocket as serve_websocket
from ._policy import STATE_KEY as STATE_KEY
from ._threaded import ThreadedManager as ThreadedManager
from ._threaded import threaded as threaded
from ._transport import ASGITransport as ASGITransport
