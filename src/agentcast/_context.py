"""UserContext: who a session belongs to, validated so that no two users can be merged."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs
import orjson

from ._errors import InvalidUserContext
from ._ids import check_id, new_id

__all__ = ["UserContext"]

#: Largest JSON encoding of ``UserContext.metadata``, in bytes.
MAX_METADATA_BYTES: Final = 8 * 1024
_ID_FIELDS: Final = frozenset({"user_id", "thread_id", "run_id", "request_id"})


def _required_id(instance: UserContext, attribute: attrs.Attribute[str], value: str) -> None:
    check_id(attribute.name, value, error=InvalidUserContext)


def _optional_id(
    instance: UserContext, attribute: attrs.Attribute[str | None], value: object
) -> None:
    if value is not None:
        check_id(attribute.name, value, error=InvalidUserContext)


def _freeze_metadata(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise InvalidUserContext(f"metadata must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise InvalidUserContext(f"metadata keys must be strings, got {key!r}")
        if key in _ID_FIELDS:
            raise InvalidUserContext(
                f"metadata key {key!r} would shadow the id field of the same name; "
                "pass it as an argument instead"
            )
    try:
        encoded = orjson.dumps(dict(value))
    except TypeError as exc:
        raise InvalidUserContext(f"metadata must be JSON-serialisable: {exc}") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise InvalidUserContext(
            f"metadata must encode to at most {MAX_METADATA_BYTES} bytes of JSON, "
            f"got {len(encoded)}"
        )
    _reject_non_finite(value)
    return MappingProxyType(dict(value))


def _reject_non_finite(value: object) -> None:
    # orjson writes NaN/Infinity as null, which would silently change the data.
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidUserContext(f"metadata must be JSON-serialisable: {value!r} is not finite")
    if isinstance(value, Mapping):
        for item in value.values():
            _reject_non_finite(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _reject_non_finite(item)


@attrs.frozen(kw_only=True)
class UserContext:
    """Who is asking: the user (session key), and optionally the thread, run and request.

    Construction validates every id, so an invalid context can never reach a session.

    Raises:
        InvalidUserContext: an id is empty, too long, a placeholder such as ``"None"``, or uses
            characters outside ``A-Z a-z 0-9 _ . : @ + -``; or metadata is not JSON-serialisable
            or shadows an id field.
    """

    #: The user; sessions are keyed by it.
    user_id: str = attrs.field(validator=_required_id)
    #: The conversation thread the request is about, if any.
    thread_id: str | None = attrs.field(default=None, validator=_optional_id)
    #: The agent run the request is about, if any.
    run_id: str | None = attrs.field(default=None, validator=_optional_id)
    #: A request id for tracing; generated when absent.
    request_id: str = attrs.field(
        factory=lambda: new_id("req"), validator=_required_id
    )
    #: Extra JSON-serialisable information (tenant, client version, ...), read-only.
    metadata: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_freeze_metadata, eq=False, hash=False
    )

    @classmethod
    def from_request(
        cls,
        user_id: str,
        thread_id: str | None = None,
        run_id: str | None = None,
        request_id: str | None = None,
        **metadata: Any,
    ) -> UserContext:
        """Build a validated context from request values; extra keywords become metadata.

        Raises:
            InvalidUserContext: see the class docstring.
        """
        if request_id is None:
            request_id = new_id("req")
        return cls(
            user_id=user_id,
            thread_id=thread_id,
            run_id=run_id,
            request_id=request_id,
            metadata=metadata,
        )
