"""``python -m agentcast`` is the ``agentcast`` command."""

import sys

from .server._cli import main

sys.exit(main())
