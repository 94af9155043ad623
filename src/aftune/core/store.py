"""Content-addressed tensor store: one zstd-compressed safetensors file per distinct tensor.

An object's file name is its tensor digest, so identical tensors (frozen base weights across step
blocks) are stored once and nothing is ever overwritten. Every file read back is treated as
hostile: sizes are bounded before decompression, the safetensors header must hold exactly the
expected tensor, and the digest is recomputed before the tensor is used (SPEC.md 3.2).
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
from pathlib import Path

import torch
import zstandard
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from ..errors import CommitmentMismatch, RecordError
from .encoding import tensor_data
from .jsonio import read_capped
from .rows import TensorRef

OBJECT_SUFFIX = ".safetensors.zst"
_HEADER_ALLOWANCE = 1 << 16  # safetensors JSON header and padding for a single tensor
_ONE_SHOT_BYTES = 1 << 20  # larger tensors are compressed as a stream


def safetensors_header(name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """The bytes of a safetensors file that holds one tensor, up to its data: a little-endian u64
    header length, then the JSON header padded with spaces to a multiple of 8 bytes."""
    meta = {name: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}}
    text = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ObjectMissing(RecordError):
    """A committed tensor is not stored (committed by digest only, or removed)."""


class ObjectStore:
    def __init__(self, root: str | Path, algorithm: str, level: int = 3):
        self.root = Path(root)
        self.algorithm = algorithm
        self.level = level
        self._local = threading.local()  # one zstd compressor per writing thread
        self._made: set[Path] = set()  # object directories known to exist

    def path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.root / h[:2] / (h + OBJECT_SUFFIX)

    def has(self, digest: bytes) -> bool:
        return self.path(digest).is_file()

    def put(self, ref: TensorRef, tensor: torch.Tensor) -> Path:
        """Store `tensor` under `ref.digest` (computed by the caller); a no-op when already stored.

        Called from the recorder's worker threads while training runs: every line of Python here
        competes for the GIL with the training thread, which holds it for most of a small model's
        step. So the path is kept short: the safetensors bytes are written by `safetensors_header`
        (no intermediate copy of a large tensor), a compressor per thread, directories created
        once, one create, write and rename (benchmarks/README.md measured it). The file appears
        under its final name only when complete."""
        target = self.path(ref.digest)
        if os.path.exists(target):
            return target
        data = tensor_data(tensor)
        header = safetensors_header(ref.name, ref.dtype, ref.shape, data.nbytes)
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        if data.nbytes <= _ONE_SHOT_BYTES:
            chunks = [compressor.compress(header + bytes(data))]
        else:  # streamed: a checkpoint tensor is not copied once more
            stream = compressor.compressobj(size=len(header) + data.nbytes)
            chunks = [stream.compress(header), stream.compress(data), stream.flush()]
        parent = target.parent
        if parent not in self._made:
            parent.mkdir(parents=True, exist_ok=True)
            self._made.add(parent)
        tmp = parent / f".tmp-{target.name}.{os.getpid()}.{threading.get_ident()}"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except FileNotFoundError:  # the directory was removed since this store made it
                parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    def get(self, ref: TensorRef, where: str) -> torch.Tensor:
        """Load and check one tensor; `where` names its place in the record for error messages."""
        path = self.path(ref.digest)
        if not path.is_file():
            raise ObjectMissing(f"{where}: tensor {ref.name!r} ({ref.digest.hex()[:16]}…) is not stored at {path}; "
                              "it is committed by digest only (checkpoint interval > 1, or digest-only boundaries, "
                                "SPEC.md 3.8): run `aftune prepare` for this block, or `aftune prepare RUN --all`, first")
        limit = ref.nbytes + _HEADER_ALLOWANCE
        file_limit = limit + 1024 + limit // 64
        compressed = read_capped(path, file_limit)
        if len(compressed) > file_limit:
            raise RecordError(f"{where}: {path.name} is over {file_limit} bytes, larger than any encoding of {ref.name!r}")
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed))
            payload = reader.read(limit + 1)
        except zstandard.ZstdError as exc:
            raise RecordError(f"{where}: {path.name} is not valid zstd ({exc}): the file is corrupt or truncated") from None
        if len(payload) > limit:
            raise RecordError(f"{where}: {path.name} decompresses past the {limit} bytes {ref.name!r} needs")
        try:
            declared = zstandard.frame_content_size(compressed)
        except zstandard.ZstdError:
            declared = -2
        if declared != len(payload):
            raise RecordError(f"{where}: {path.name} is truncated or corrupt (zstd frame declares "
                              f"{declared} bytes, {len(payload)} decompressed)")
        try:
            tensors = st_load(payload)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise RecordError(f"{where}: {path.name} is not a valid safetensors file ({exc})") from None
        if list(tensors) != [ref.name]:
            raise CommitmentMismatch(f"{where}: {path.name} holds {sorted(tensors)[:4]}, expected exactly [{ref.name!r}]")
        tensor = tensors[ref.name]
        got = TensorRef.of(ref.name, tensor, self.algorithm)
        if (got.dtype, got.shape) != (ref.dtype, ref.shape):
            raise CommitmentMismatch(f"{where}: {ref.name!r} is {got.dtype}{list(got.shape)}, committed {ref.dtype}{list(ref.shape)}")
        if got.digest != ref.digest:
            raise CommitmentMismatch(f"{where}: {ref.name!r} digest is {got.digest.hex()[:16]}…, committed "
                              f"{ref.digest.hex()[:16]}…: the stored file was altered")
        return tensor.clone()
