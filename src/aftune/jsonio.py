"""Strict JSON reading for hostile record files: no duplicate keys, no NaN or infinity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class StrictJSONError(ValueError):
    pass


def _pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise StrictJSONError(f"duplicate key {k[:80]!r}")
        out[k] = v
    return out


def _constant(name):
    raise StrictJSONError(f"{name} is not allowed")


def loads(data: bytes | str) -> Any:
    """Parse JSON, raising ValueError on malformed input, duplicate keys or non-finite numbers."""
    try:
        return json.loads(data, object_pairs_hook=_pairs, parse_constant=_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StrictJSONError(str(exc)) from None


def read_capped(path: str | Path, limit: int) -> bytes:
    """At most `limit` + 1 bytes of a file: enough for the caller to tell that it is over its
    size limit without reading a hostile file whole."""
    with open(path, "rb") as f:
        return f.read(limit + 1)
