"""Identifier rules shared by user contexts, threads and runs.

Ids end up in routing keys, logs and JSON envelopes, so they are restricted to a charset that
needs no escaping anywhere; the envelope encoder relies on that. ``|`` is in it so user ids in
Auth0's ``sub`` format (``auth0|abc123``) work as they are: it is not special in JSON, in Redis
keys or hash tags (only braces are), in the space-separated backplane messages, in Prometheus
label values or in JWT claims (``tests/test_ids.py`` checks each).
"""

from __future__ import annotations

import re
import uuid
from typing import Final

from ._errors import InvalidIdentifier

__all__ = ["MAX_ID_LENGTH", "check_id", "new_id"]

#: Longest id accepted, in characters.
MAX_ID_LENGTH: Final = 128
_ID_CHARS: Final = re.compile(r"[A-Za-z0-9_.:@+|\-]+")
#: Strings that a serialisation bug upstream produces from a missing value.
PLACEHOLDER_IDS: Final = frozenset({"none", "null", "undefined", "nan"})


def check_id(
    field: str, value: object, *, error: type[InvalidIdentifier] = InvalidIdentifier
) -> str:
    """Return ``value`` if it is a valid id, else raise ``error`` naming ``field`` and the rule."""
    if not isinstance(value, str):
        raise error(f"{field} must be a string, got {type(value).__name__}")
    if not value:
        raise error(f"{field} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise error(f"{field} must be at most {MAX_ID_LENGTH} characters, got {len(value)}")
    if value.strip().lower() in PLACEHOLDER_IDS:
        raise error(
            f"{field} is the placeholder {value!r}: a missing value was serialised upstream; "
            "pass the real id"
        )
    if _ID_CHARS.fullmatch(value) is None:
        raise error(
            f"{field} {value[:40]!r} may only contain letters, digits and _ . : @ + | -"
        )
    return value


def new_id(prefix: str) -> str:
    """Return a fresh random id such as ``run-3f2a9c0d1b7e4f60``."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"
