"""Reading hostile files: bounded reads and strict JSON (no duplicate keys, no NaN or infinity).

Every file a provider (or anyone else) wrote is read through here: at most its cap is read, never
the whole of an oversized file, and malformed content raises the caller's error class with the
file named. No caller re-checks sizes.

    doc = read_json(run / "config.json", MAX_CONFIG_BYTES, "run config")   # RecordError on any fault
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import AftuneError, RecordError


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


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to infinity
        raise StrictJSONError(f"number {text[:40]} is out of range")
    return value


def loads(data: bytes | str) -> Any:
    """Parse JSON, raising ValueError on malformed input, duplicate keys or non-finite numbers
    (NaN and Infinity, and numbers too large for binary64)."""
    try:
        return json.loads(data, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise StrictJSONError(str(exc)[:200] or type(exc).__name__) from None


def read_capped(path: str | Path, limit: int) -> bytes:
    """At most `limit` + 1 bytes of a file: enough for the caller to tell that it is over its
    size limit without reading a hostile file whole."""
    with open(path, "rb") as f:
        return f.read(limit + 1)


def read_bytes(path: str | Path, limit: int, what: str, error: type[AftuneError] = RecordError) -> bytes:
    """A whole file of at most `limit` bytes; `error` naming `what` if it is missing, unreadable
    or larger."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} is missing")
    try:
        data = read_capped(p, limit)
    except OSError as exc:
        raise error(f"{what} {p} cannot be read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{what} {p} is larger than {limit} bytes")
    return data


def parse(data: bytes, what: str, error: type[AftuneError] = RecordError) -> Any:
    """Strict JSON of `data`; `error` naming `what` when malformed."""
    try:
        return loads(data)
    except ValueError as exc:
        raise error(f"{what} is not valid JSON ({exc}): truncated or corrupt") from None


def read_json(path: str | Path, limit: int, what: str, error: type[AftuneError] = RecordError) -> Any:
    """Strict JSON of a file of at most `limit` bytes (see `read_bytes` and `parse`)."""
    return parse(read_bytes(path, limit, what, error), f"{what} {Path(path)}", error)
