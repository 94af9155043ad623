"""Content-addressed tensor store: one zstd-compressed safetensors object per distinct tensor,
as a loose file or inside a pack file (SPEC.md 3.2).

An object's name is its tensor digest, so identical tensors (frozen base weights across step
blocks) are stored once and nothing is ever overwritten. A training run writes the objects of a
step block into one pack (`core.packs`: an append-only file and an index), so a run of many
steps holds a few files, not one per tensor; `aftune prepare` and bundles write loose objects.
A read looks for the loose object first, then in the packs. Every object read back is treated
as hostile: sizes are bounded before decompression, the safetensors header must hold exactly
the expected tensor, and the digest is recomputed before the tensor is used.

    store = ObjectStore(run / "objects", "blake3")
    tensor = store.get(ref, "step block 3, layer block 1")     # RecordError / CommitmentMismatch
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
from .encoding import DTYPES_BY_NAME, tensor_data
from .jsonio import loads, read_capped
from .packs import INDEX_SUFFIX, PACK_DIR, PackEntry, PackWriter, read_index, read_packs
from .rows import MAX_DIM, MAX_NDIM, TensorRef

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


def read_frame(data: bytes, limit: int, where: str) -> bytes:
    """The content of the first Zstandard frame of `data`, which must declare its size and
    decompress to exactly that many bytes, at most `limit` (SPEC.md 3.2 steps 2-3); RecordError
    naming `where` otherwise."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
        payload = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise RecordError(f"{where} is not valid zstd ({exc}): the file is corrupt or truncated") from None
    if len(payload) > limit:
        raise RecordError(f"{where} decompresses past {limit} bytes")
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        declared = -2
    if declared != len(payload):
        raise RecordError(f"{where} is truncated or corrupt (zstd frame declares {declared} bytes, "
                          f"{len(payload)} decompressed)")
    return payload


def file_limit(ref: TensorRef) -> int:
    """The most bytes an object of `ref` may take (SPEC.md 3.2 step 1)."""
    limit = ref.nbytes + _HEADER_ALLOWANCE
    return limit + 1024 + limit // 64


def object_ref(found: Path | PackEntry, digest: bytes) -> TensorRef:
    """The row an object claims for itself: the name, dtype and shape from its safetensors header
    (at most 64 KiB decompressed), the digest from its file name or pack index. `ObjectStore`
    then checks it like any committed tensor, and the rows naming that digest are compared with it."""
    label = found.describe() if isinstance(found, PackEntry) else found.name
    try:
        with open(found.pack if isinstance(found, PackEntry) else found, "rb") as f:
            if isinstance(found, PackEntry):
                f.seek(found.offset)
            reader = zstandard.ZstdDecompressor().stream_reader(f)
            head = reader.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= _HEADER_ALLOWANCE:
                raise RecordError(f"{label}: no safetensors header of at most {_HEADER_ALLOWANCE} bytes")
            header = loads(reader.read(n))
    except (zstandard.ZstdError, ValueError) as exc:
        raise RecordError(f"{label} is not a zstd-compressed safetensors file ({str(exc)[:120]})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
    if len(tensors) != 1:
        raise RecordError(f"{label} does not hold exactly one tensor")
    (name, meta), = tensors.items()
    dtype, shape = (meta.get("dtype"), meta.get("shape")) if isinstance(meta, dict) else (None, None)
    if (dtype not in DTYPES_BY_NAME or not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape)):
        raise RecordError(f"{label}: bad dtype or shape in its safetensors header")
    return TensorRef(name, dtype, tuple(shape), digest)


class ObjectMissing(RecordError):
    """A committed tensor is not stored (committed by digest only, or removed)."""


class ObjectStore:
    def __init__(self, root: str | Path, algorithm: str, level: int = 3):
        self.root = Path(root)
        self.algorithm = algorithm
        self.level = level
        self._local = threading.local()  # one zstd compressor per writing thread
        self._made: set[Path] = set()  # object directories known to exist
        self._packs: dict[bytes, PackEntry] | None = None  # digest -> where in a finished pack
        self._packs_seen: tuple = ()  # the pack directory's state when `_packs` was read

    def path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.root / h[:2] / (h + OBJECT_SUFFIX)

    def packed(self) -> dict[bytes, PackEntry]:
        """digest -> its entry in the finished packs, read again whenever the pack directory
        changed (a hostile index is a RecordError naming its pack)."""
        d = self.root / PACK_DIR
        try:
            st = d.stat()
            seen = (st.st_mtime_ns, st.st_ino, st.st_size)
        except FileNotFoundError:
            seen = ()
        if self._packs is None or seen != self._packs_seen:
            self._packs, self._packs_seen = (read_packs(d) if seen else {}), seen
        return self._packs

    def locate(self, digest: bytes) -> Path | PackEntry | None:
        """Where the object of `digest` is: its loose file, else its pack entry, else None."""
        path = self.path(digest)
        if path.is_file():
            return path
        return self.packed().get(digest)

    def has(self, digest: bytes) -> bool:
        return self.locate(digest) is not None

    def raw(self, digest: bytes, limit: int | None = None) -> bytes:
        """The stored bytes of an object (a zstd frame), unchecked: for copying it into a bundle,
        which the client checks. ObjectMissing when it is not stored."""
        where = self.locate(digest)
        if where is None:
            raise ObjectMissing(f"object {digest.hex()[:16]}… is not stored")
        if isinstance(where, PackEntry):
            return where.read(limit)
        if limit is None:
            return where.read_bytes()
        data = read_capped(where, limit)
        if len(data) > limit:
            raise RecordError(f"{where.name} is over {limit} bytes")
        return data

    def stored_size(self, digest: bytes) -> int:
        """Bytes the object of `digest` takes in its file or pack (0 when not stored)."""
        where = self.locate(digest)
        if where is None:
            return 0
        return where.length if isinstance(where, PackEntry) else where.stat().st_size

    def unpack(self) -> int:
        """Write every packed object as a loose object and remove the packs (for a tool, or a
        test, that edits or removes single objects); returns the number of objects written. The
        bytes are copied as they are: every read still checks them."""
        entries = self.packed()
        n = 0
        for digest, entry in entries.items():
            target = self.path(digest)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".tmp-{target.name}")
                tmp.write_bytes(entry.read())
                tmp.replace(target)
                n += 1
        for pack in {e.pack for e in entries.values()}:
            pack.with_suffix(INDEX_SUFFIX).unlink()
            pack.unlink()
        self._packs = None
        return n

    def begin_pack(self, label: str) -> PackWriter:
        """An open pack for the objects `put` is given it; `finish()` writes its index (SPEC.md 3.2)
        and makes its objects known to this store at once (a directory's timestamp may not tick
        between two renames)."""
        return PackWriter(self.root / PACK_DIR, label, on_finish=self._finished)

    def _finished(self, index: Path) -> None:
        entries = self.packed()
        for digest, entry in read_index(index).items():
            entries.setdefault(digest, entry)

    def put(self, ref: TensorRef, tensor: torch.Tensor, pack: PackWriter | None = None) -> Path:
        """Store `tensor` under `ref.digest` (computed by the caller); a no-op when already stored.
        With `pack`, the object is appended to that open pack rather than written loose.

        Called from the recorder's worker threads while training runs: every line of Python here
        competes for the GIL with the training thread, which holds it for most of a small model's
        step. So the path is kept short: the safetensors bytes are written by `safetensors_header`
        (no intermediate copy of a large tensor), a compressor per thread, directories created
        once, one create, write and rename (benchmarks/README.md measured it). The file appears
        under its final name only when complete."""
        target = self.path(ref.digest)
        if os.path.exists(target) or (pack is not None and (ref.digest in pack or ref.digest in self.packed())):
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
        if pack is not None:
            pack.append(ref.digest, chunks)
            return target
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
        found = self.locate(ref.digest)
        if found is None:
            raise ObjectMissing(f"{where}: tensor {ref.name!r} ({ref.digest.hex()[:16]}…) is not stored at "
                                f"{self.path(ref.digest)} nor in a pack; it is committed by digest only (checkpoint "
                                "interval > 1, or digest-only boundaries, SPEC.md 3.8): run `aftune prepare` for this "
                                "block, or `aftune prepare RUN --all`, first")
        return self.read_at(found, ref, where)

    def read_at(self, found: Path | PackEntry, ref: TensorRef, where: str) -> torch.Tensor:
        """The tensor of `ref` from one loose file or pack entry, checked (SPEC.md 3.2 steps 1-7)."""
        limit = file_limit(ref)
        if isinstance(found, PackEntry):
            label = found.describe()
            if found.length > limit:
                raise RecordError(f"{where}: {label} is {found.length} bytes, larger than any encoding of {ref.name!r}")
            compressed = found.read()
        else:
            label = found.name
            compressed = read_capped(found, limit)
            if len(compressed) > limit:
                raise RecordError(f"{where}: {label} is over {limit} bytes, larger than any encoding of {ref.name!r}")
        return self.decode(compressed, ref, f"{where}: {label}")

    def decode(self, compressed: bytes, ref: TensorRef, where: str) -> torch.Tensor:
        """Steps 2-7 of SPEC.md 3.2 on the bytes of one object."""
        payload = read_frame(compressed, ref.nbytes + _HEADER_ALLOWANCE, where)
        try:
            tensors = st_load(payload)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise RecordError(f"{where} is not a valid safetensors file ({exc})") from None
        if list(tensors) != [ref.name]:
            raise CommitmentMismatch(f"{where} holds {sorted(tensors)[:4]}, expected exactly [{ref.name!r}]")
        tensor = tensors[ref.name]
        got = TensorRef.of(ref.name, tensor, self.algorithm)
        if (got.dtype, got.shape) != (ref.dtype, ref.shape):
            raise CommitmentMismatch(f"{where}: {ref.name!r} is {got.dtype}{list(got.shape)}, committed {ref.dtype}{list(ref.shape)}")
        if got.digest != ref.digest:
            raise CommitmentMismatch(f"{where}: {ref.name!r} digest is {got.digest.hex()[:16]}…, committed "
                                     f"{ref.digest.hex()[:16]}…: the stored object was altered")
        return tensor.clone()
