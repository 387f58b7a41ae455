"""JSON for workerctl's stdout: every value a reply can hold, and never anything but JSON.

bytes print as {"base64": "..."}, numpy arrays and scalars as lists and numbers, other values
msgpack may decode into (an ExtType) as their repr. NaN, Infinity and -Infinity, which JSON has
no numbers for (json.dumps would write the bare words, which no JSON parser accepts), print as
null, as JavaScript's JSON.stringify writes them.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any


def to_json(value: Any) -> Any:
    """json.dumps' `default`: bytes as {"base64": ...}, numpy values as lists, the rest as repr."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return finite(value.tolist())
    return repr(value)


def finite(value: Any) -> Any:
    """`value` with every NaN and infinite float, however deep, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def dumps(value: Any, indent: int | None = None) -> str:
    try:  # the common case, all numbers finite, in one pass
        return json.dumps(value, default=to_json, ensure_ascii=False, allow_nan=False, indent=indent)
    except ValueError:
        return json.dumps(finite(value), default=to_json, ensure_ascii=False, allow_nan=False, indent=indent)
