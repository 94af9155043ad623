"""The one wire format between the processes: a JSON header and raw little-endian tensors.

    frame = encode("product", {"site": "lm_head", "step": 2}, {"operand": b})
    msg = decode(frame, max_bytes=1 << 30)        # hostile input: every size is checked

Nothing that crosses a process boundary is unpickled: a pickle from the untrusted worker would
run its code inside the trusted process (docs/threats.md, mistake 6). A frame is

    "AFTP" || u32 version (1) || u32 H || H bytes: canonical JSON header || tensor bytes

with header `{"kind": str, "fields": object, "tensors": [[name, dtype, shape], ...]}` and the
tensors' element bytes (SPEC.md 2.2: row-major, little-endian) concatenated in header order. A
reader rejects a wrong magic or version, a header that is not strict JSON (duplicate keys, NaN),
an unknown dtype, a negative or non-integer dimension, and any length that does not add up
exactly; it never reads past `max_bytes`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Mapping

import torch

from ..core import jsonio
from ..core.encoding import DTYPES_BY_NAME, canonical_json, dtype_name, tensor_data

MAGIC = b"AFTP"
VERSION = 1
MAX_HEADER_BYTES = 64 << 20
MAX_DIMS = 8


class FrameError(ValueError):
    """A frame that is not well formed; the receiver decides what that means (FAIL or error)."""


@dataclass(frozen=True)
class Message:
    kind: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise FrameError(f"{self.kind} message without its tensor {name!r}")
        return self.tensors[name]


def encode(kind: str, fields: Mapping[str, Any] | None = None,
           tensors: Mapping[str, torch.Tensor] | None = None) -> bytes:
    tensors = dict(tensors or {})
    spec, blobs = [], []
    for name, t in tensors.items():
        data = tensor_data(t)
        spec.append([name, dtype_name(t.dtype), [int(d) for d in t.shape]])
        blobs.append(data if isinstance(data, bytes) else data.tobytes())
    header = canonical_json({"kind": kind, "fields": dict(fields or {}), "tensors": spec})
    return b"".join([MAGIC, struct.pack(">II", VERSION, len(header)), header, *blobs])


def decode(frame: bytes, *, max_bytes: int) -> Message:
    if len(frame) > max_bytes:
        raise FrameError(f"frame of {len(frame)} bytes exceeds the limit of {max_bytes}")
    if len(frame) < 12 or frame[:4] != MAGIC:
        raise FrameError("not an aftune partition frame (bad magic)")
    version, hlen = struct.unpack(">II", frame[4:12])
    if version != VERSION:
        raise FrameError(f"frame version {version}, expected {VERSION}")
    if hlen > MAX_HEADER_BYTES or 12 + hlen > len(frame):
        raise FrameError(f"header length {hlen} does not fit the frame")
    try:
        header = jsonio.loads(frame[12:12 + hlen])
    except ValueError as exc:
        raise FrameError(f"header is not strict JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != {"kind", "fields", "tensors"}:
        raise FrameError("header must hold exactly kind, fields and tensors")
    kind, fields, spec = header["kind"], header["fields"], header["tensors"]
    if not isinstance(kind, str) or not isinstance(fields, dict) or not isinstance(spec, list):
        raise FrameError("header members have the wrong types")
    offset, tensors = 12 + hlen, {}
    for entry in spec:
        name, dtype, shape = _tensor_spec(entry)
        if name in tensors:
            raise FrameError(f"tensor {name!r} appears twice")
        torch_dtype = DTYPES_BY_NAME[dtype]
        count = 1
        for d in shape:
            count *= d
        nbytes = count * torch.empty(0, dtype=torch_dtype).element_size()
        if offset + nbytes > len(frame):
            raise FrameError(f"tensor {name!r} ({dtype} {shape}) runs past the end of the frame")
        raw = bytearray(frame[offset:offset + nbytes])
        t = torch.frombuffer(raw, dtype=torch.uint8 if dtype == "BOOL" else torch_dtype) if nbytes else \
            torch.empty(0, dtype=torch_dtype)
        tensors[name] = (t.to(torch.bool) if dtype == "BOOL" else t).reshape(shape)
        offset += nbytes
    if offset != len(frame):
        raise FrameError(f"{len(frame) - offset} stray bytes after the last tensor")
    return Message(kind, fields, tensors)


def _tensor_spec(entry: Any) -> tuple[str, str, list[int]]:
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], str)
            and isinstance(entry[2], list)):
        raise FrameError(f"malformed tensor entry {str(entry)[:120]}")
    name, dtype, shape = entry
    if dtype not in DTYPES_BY_NAME:
        raise FrameError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if len(shape) > MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < (1 << 40)
                                        for d in shape):
        raise FrameError(f"tensor {name!r}: bad shape {shape}")
    return name, dtype, shape
