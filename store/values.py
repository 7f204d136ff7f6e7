"""Values on their way into the store (checked, one-line InputError otherwise) and out (JSON-ready)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from tailmon.errors import InputError


def to_jsonable(value: Any) -> Any:
    """A query result with datetimes as ISO 8601 strings, ready for json.dumps."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def as_float(value: Any, what: str, *, keep_inf: bool = False) -> float | None:
    """`value` as a float; nan (and inf unless `keep_inf`) become None: no figure."""
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if math.isnan(x) or (math.isinf(x) and not keep_inf):
        return None
    return x


def as_int(value: Any, what: str) -> int | None:
    """`value` as an int; a float with a fractional part is refused, not truncated."""
    if value is None:
        return None
    try:
        x = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be an integer, got {value!r}") from None
    if x != value:
        raise InputError(f"{what} must be an integer, got {value!r}")
    return x


def as_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def as_aware(value: Any, what: str) -> datetime | None:
    """`value` unchanged if it is a timezone-aware datetime (or None); anything else is refused."""
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InputError(f"{what} must be a timezone-aware datetime, got {value!r}")
    return value
