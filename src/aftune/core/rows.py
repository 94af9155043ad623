"""Tensor rows: what a record commits for one tensor, and the one codec for lists of them.

A row is `[key, name, dtype, shape, digest]` (SPEC.md 3.3.3 and 8.4): the key locates the tensor
in the record, the name, dtype and shape are hashed into its digest (2.2). Manifests, inference
records and bundles all store rows this way and all read them through `rows_from_json`, which
treats them as hostile input with one set of bounds.

    rows = rows_from_json(doc["tensors"], "record")     # {key: TensorRef}, or RecordError
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AftuneError, InputError, RecordError
from .encoding import DTYPES_BY_NAME, dtype_name, parse_hex_digest, tensor_digest

MAX_ROWS = 5_000_000  # rows in one list
MAX_KEY = 1024  # characters of a key or a name
MAX_NDIM = 8
MAX_DIM = 1 << 40


@dataclass(frozen=True)
class TensorRef:
    """What a record commits for one tensor: logical name, dtype, shape and digest."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: bytes

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=DTYPES_BY_NAME[self.dtype]).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, algorithm: str) -> "TensorRef":
        return cls(name, dtype_name(tensor.dtype), tuple(tensor.shape), tensor_digest(name, tensor, algorithm))

    def to_row(self, key: str) -> list[Any]:
        return [key, self.name, self.dtype, list(self.shape), self.digest.hex()]


def rows_to_json(rows: dict[str, TensorRef]) -> list[list[Any]]:
    """Rows sorted by key, as stored."""
    return [ref.to_row(key) for key, ref in sorted(rows.items())]


def rows_from_json(rows: Any, where: str, error: type[AftuneError] = RecordError) -> dict[str, TensorRef]:
    """Parse a list of rows from hostile JSON; `error` names `where` and the bad row."""
    if not isinstance(rows, list) or len(rows) > MAX_ROWS:
        raise error(f"{where}: tensor rows must be a list of at most {MAX_ROWS} [key, name, dtype, shape, digest]")
    out: dict[str, TensorRef] = {}
    for row in rows:
        key, ref = row_from_json(row, where, error)
        if key in out:
            raise error(f"{where}: duplicate key {key!r}")
        out[key] = ref
    return out


def row_from_json(row: Any, where: str, error: type[AftuneError] = RecordError) -> tuple[str, TensorRef]:
    if not isinstance(row, list) or len(row) != 5:
        raise error(f"{where}: each row is [key, name, dtype, shape, digest]")
    key, name, dtype, shape, digest = row
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY or not isinstance(name, str) or len(name) > MAX_KEY:
        raise error(f"{where}: bad key or name {str(key)[:80]!r}")
    try:
        key.encode("utf-8"), name.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{where}: key or name is not valid Unicode text") from None
    if not isinstance(dtype, str) or dtype not in DTYPES_BY_NAME:
        raise error(f"{where}: {key}: unknown dtype {str(dtype)[:20]!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape)):
        raise error(f"{where}: {key}: bad shape")
    try:
        return key, TensorRef(name, dtype, tuple(shape), parse_hex_digest(digest, f"{where}: {key}"))
    except InputError as exc:
        raise error(str(exc)) from None
