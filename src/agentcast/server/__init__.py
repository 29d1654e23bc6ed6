"""The standalone agentcast server: HTTP and WebSocket on one port, tokens, limits, demo.

Work in progress: token signing/verification and the HTTP front are in place; the serving loop
and the command line follow.
"""

from ._auth import AuthError as AuthError
from ._auth import Claims as Claims
from ._auth import issue_token as issue_token
from ._auth import verify_token as verify_token
