"""agentcast: stream AI-agent events to each user's live WebSocket connections, with trio.

The public surface is this module (plus ``agentcast.testing``); everything else is private.
"""

from ._config import Config as Config
from ._connection import Connection as Connection
from ._context import UserContext as UserContext
from ._credentials import Credentials as Credentials
from ._errors import AgentcastError as AgentcastError
from ._errors import BrokerUnavailable as BrokerUnavailable
from ._errors import ClientError as ClientError
from ._errors import InvalidEvent as InvalidEvent
from ._errors import InvalidIdentifier as InvalidIdentifier
from ._errors import InvalidUserContext as InvalidUserContext
from ._errors import ManagerNotReady as ManagerNotReady
from ._errors import ManagerNotRunning as ManagerNotRunning
from ._errors import RunEnded as RunEnded
from ._errors import RunTooLarge as RunTooLarge
from ._errors import SessionClosed as SessionClosed
from ._errors import TooManyConnections as TooManyConnections
from ._errors import TooManyRuns as TooManyRuns
from ._errors import TooManyThreads as TooManyThreads
from ._events import AgentEvent as AgentEvent
from ._events import EventType as EventType
from ._history import Recovery as Recovery
from ._manager import ConnectionManager as ConnectionManager
from ._manager import get_websocket_manager as get_websocket_manager
from ._manager import get_websocket_manager_async as get_websocket_manager_async
from ._manager import open_manager as open_manager
from ._presence import Presence as Presence
from ._protocol import BATCH_SUBPROTOCOL as BATCH_SUBPROTOCOL
from ._protocol import PLAIN_SUBPROTOCOL as PLAIN_SUBPROTOCOL
from ._protocol import CloseCode as CloseCode
from ._run import Run as Run
from ._run_history import ActiveRun as ActiveRun
from ._session import AgentFunction as AgentFunction
from ._session import ConnectionSlot as ConnectionSlot
from ._session import MessageHandler as MessageHandler
from ._session import UserSession as UserSession
from ._stats import ManagerStats as ManagerStats
from ._stats import SessionStats as SessionStats
from ._transport import Transport as Transport
from .backplane.memory import InMemoryBroker as InMemoryBroker
from .backplane.protocol import Broker as Broker
from .backplane.protocol import BrokerStats as BrokerStats
from .backplane.protocol import EventSink as EventSink
from .backplane.redis.broker import BackplaneStats as BackplaneStats
from .backplane.redis.broker import RedisBroker as RedisBroker
from .backplane.redis.publisher import PublisherRun as PublisherRun
from .backplane.redis.publisher import RedisPublisher as RedisPublisher

__version__ = "0.1.0"
