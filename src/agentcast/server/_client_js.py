"""The browser client served at ``GET /client.js``: its bytes, ETag and conditional answers.

Pure: no trio, no sockets. The module is ``clients/js/agentcast.js``; a wheel carries it as
``agentcast/server/client.js`` (``pyproject.toml`` force-includes it), a source checkout reads
it from the repository.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path
from typing import Final

import attrs

__all__ = ["CACHE_CONTROL", "CONTENT_TYPE", "ClientScript", "client_script", "not_modified"]

#: What ``/client.js`` is served as (an ES module: browsers check the type of module scripts).
CONTENT_TYPE: Final = "text/javascript; charset=utf-8"
#: Cached, but revalidated on every use (a 304 costs a few hundred bytes): a page never runs an
#: old client against an upgraded server.
CACHE_CONTROL: Final = "no-cache"
#: The file's name inside the installed package.
PACKAGED_NAME: Final = "client.js"
#: Where it lives in a source checkout, relative to this file.
SOURCE_PATH: Final = Path(__file__).resolve().parents[3] / "clients" / "js" / "agentcast.js"


@attrs.frozen
class ClientScript:
    """The client module's bytes and their strong ETag (a quoted SHA-256 prefix)."""

    body: bytes = attrs.field(repr=False)
    etag: str


def _load() -> bytes:
    packaged = resources.files("agentcast.server").joinpath(PACKAGED_NAME)
    if packaged.is_file():
        return packaged.read_bytes()
    if SOURCE_PATH.is_file():
        return SOURCE_PATH.read_bytes()
    raise FileNotFoundError(
        f"the browser client is missing: neither agentcast/server/{PACKAGED_NAME} nor "
        f"{SOURCE_PATH} exists; reinstall agentcast"
    )


@functools.cache
def client_script() -> ClientScript:
    """The client module, read once per process."""
    body = _load()
    return ClientScript(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def not_modified(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header matches ``etag`` (RFC 9110 weak comparison: a
    ``W/`` prefix is ignored; ``*`` matches anything)."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False
