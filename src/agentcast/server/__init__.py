"""The standalone agentcast server: HTTP and WebSocket on one port, tokens, limits, demo.

``serve(settings)`` runs it inside your own trio program (``await nursery.start(serve, ...)``
hands back the bound address); the ``agentcast serve`` command runs it as a process.
"""

from ._auth import AuthError as AuthError
from ._auth import Claims as Claims
from ._auth import issue_token as issue_token
from ._auth import verify_token as verify_token
from ._gc import tune_gc as tune_gc
from ._serve import RunningServer as RunningServer
from ._serve import serve as serve
from ._settings import ServerSettings as ServerSettings
