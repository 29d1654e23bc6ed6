"""Small static files the standalone server answers with: the favicon.

Pure: no trio, no sockets. ``favicon.svg`` sits next to ``demo.html`` in the package (the wheel
carries every file of ``src/agentcast``), so browsers find ``/favicon.ico`` (asked for by every
page) and ``/favicon.svg`` (linked by the demo page) instead of logging a 404.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from typing import Final

__all__ = ["FAVICON_CACHE_CONTROL", "FAVICON_PATHS", "FAVICON_TYPE", "favicon"]

#: The paths the favicon is served at.
FAVICON_PATHS: Final = frozenset({"/favicon.ico", "/favicon.svg"})
#: An SVG image (Chromium and Firefox accept it at /favicon.ico too: they sniff images).
FAVICON_TYPE: Final = "image/svg+xml"
#: It never changes within a release; a day of caching spares a request per page load.
FAVICON_CACHE_CONTROL: Final = "public, max-age=86400"


@functools.cache
def favicon() -> tuple[bytes, str]:
    """The favicon's bytes and strong ETag, read once per process."""
    body = resources.files("agentcast.server").joinpath("favicon.svg").read_bytes()
    return body, f'"{hashlib.sha256(body).hexdigest()[:32]}"'
