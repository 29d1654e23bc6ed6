"""Credentials out of everything shown: URLs with a password become ``scheme://user:***@host``.

Rules of this module: pure, no I/O. Every string that may embed a backplane URL (``/config``,
``/health`` reasons, log lines, reprs) passes through :func:`redact_url` or
:func:`redact_text`, so a password in ``--redis-url`` never reaches an HTTP answer or a log.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MASK", "redact_text", "redact_url"]

#: What a password is replaced with.
MASK: Final = "***"
#: A password given as a query parameter (``redis://host/0?password=pw``).
_QUERY_PASSWORD: Final = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)


def _split(url: str) -> tuple[str, str, str, str] | None:
    """``(prefix, user, password, rest)`` of a URL whose userinfo has a password, else None.

    Parsed by hand, not with ``urllib``: it must never raise, whatever the operator typed.
    """
    scheme, sep, after = url.partition("://")
    if not sep:
        return None
    # The userinfo ends at the last "@" before the path: a password may itself contain "@".
    end = len(after)
    for stop in "/?#":
        index = after.find(stop)
        if index != -1:
            end = min(end, index)
    userinfo, at, hostport = after[:end].rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return None
    return f"{scheme}://", user, password, hostport + after[end:]


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``; the user name and the rest stay.

    ``redis://:pw@host:6379/0`` becomes ``redis://:***@host:6379/0`` and
    ``rediss://user:pw@host`` becomes ``rediss://user:***@host``; a URL without a password is
    returned unchanged.
    """
    masked = _QUERY_PASSWORD.sub(lambda m: m.group(1) + MASK if m.group(2) else m.group(0), url)
    parts = _split(masked)
    if parts is None:
        return masked
    prefix, user, _, rest = parts
    return f"{prefix}{user}:{MASK}@{rest}"


def redact_text(text: str, url: str | None) -> str:
    """``text`` (an error message, a reason) with ``url`` and its password masked wherever they
    appear, e.g. in a client library's exception text."""
    if url is None:
        return text
    text = text.replace(url, redact_url(url))
    parts = _split(url)
    passwords = [m.group(2) for m in _QUERY_PASSWORD.finditer(url) if m.group(2)]
    for password in [*([parts[2]] if parts else []), *passwords]:
        text = text.replace(password, MASK)
    return text
