"""Pack files: the objects of one step block in one append-only file and its index (SPEC.md 3.2).

    objects/pack/<name>.pack   b"AFTPACK1", then the objects' bytes back to back
    objects/pack/<name>.idx    b"AFTIDX01", u64 n, then n x (digest: 32 bytes, u64 offset, u64 length)

A run of N steps stored one file per object: tens of thousands of small files (a loss, a
gradient-norm vector), each costing a file system block and an inode. A pack holds them all: the
recorder appends each object of a step block as it is compressed and writes the index when the
step block is complete. The pack takes its final name before its index does, so an index never
names a pack that is not complete; a pack without an index (an interrupted write) is not read.

Readers treat both files as hostile. `read_index` rejects an index that is not exactly its
declared size, whose digests are not strictly increasing (a repeated digest), or whose entries
do not tile the pack from its 8-byte header to its last byte (an overlap, a gap, an entry past
the end, a truncated pack); each error names the pack. Every object read from a pack is then
checked as a loose one is (core.store: bounded decompression, header, digest).

    entries = read_packs(run / "objects" / "pack")   # {digest: PackEntry}, or RecordError
    data = entries[digest].read()                     # the object's zstd frame, unchecked
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import RecordError
from .jsonio import read_capped

PACK_DIR = "pack"  # under objects/
PACK_MAGIC = b"AFTPACK1"
INDEX_MAGIC = b"AFTIDX01"
PACK_SUFFIX, INDEX_SUFFIX = ".pack", ".idx"
DIGEST_BYTES = 32
ENTRY = struct.Struct("<32sQQ")  # digest, offset, length
MAX_PACK_ENTRIES = 5_000_000
MAX_PACKS = 1_000_000
PACK_NAME = re.compile(r"^[0-9A-Za-z_-]{1,128}$")


@dataclass(frozen=True)
class PackEntry:
    """Where one object lies: `length` bytes at `offset` of `pack`."""

    pack: Path
    offset: int
    length: int

    def describe(self) -> str:
        return f"pack {self.pack.name} (bytes {self.offset}+{self.length})"

    def read(self, limit: int | None = None) -> bytes:
        """The entry's bytes; RecordError naming the pack when it is over `limit` or cut short."""
        if limit is not None and self.length > limit:
            raise RecordError(f"{self.describe()} is over {limit} bytes")
        try:
            with open(self.pack, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.length)
        except OSError as exc:
            raise RecordError(f"{self.describe()} cannot be read: {exc.strerror or exc}") from None
        if len(data) != self.length:
            raise RecordError(f"{self.describe()} is cut short ({len(data)} bytes): the pack was truncated")
        return data


def encode_index(entries: dict[bytes, tuple[int, int]]) -> bytes:
    """The index of a pack: entries sorted by digest (SPEC.md 3.2)."""
    return INDEX_MAGIC + struct.pack("<Q", len(entries)) + b"".join(
        ENTRY.pack(d, off, n) for d, (off, n) in sorted(entries.items()))


def read_index(index_path: Path) -> dict[bytes, PackEntry]:
    """Parse and check one index against its pack; RecordError naming the pack on any fault."""
    pack = index_path.with_suffix(PACK_SUFFIX)
    what = f"pack {pack.name}"
    limit = 16 + ENTRY.size * MAX_PACK_ENTRIES
    try:
        data = read_capped(index_path, limit)
        pack_size = pack.stat().st_size if pack.is_file() and not pack.is_symlink() else None
    except OSError as exc:
        raise RecordError(f"{what}: its index cannot be read: {exc.strerror or exc}") from None
    if pack_size is None:
        raise RecordError(f"{what}: the index {index_path.name} names a pack that is missing or not a regular file")
    if len(data) < 16 or data[:8] != INDEX_MAGIC:
        raise RecordError(f"{what}: {index_path.name} is not a pack index (it must start with {INDEX_MAGIC!r})")
    n = struct.unpack_from("<Q", data, 8)[0]
    if not 1 <= n <= MAX_PACK_ENTRIES or len(data) != 16 + n * ENTRY.size:
        raise RecordError(f"{what}: {index_path.name} declares {n} entries in {len(data)} bytes; an index of n "
                          f"entries (1 to {MAX_PACK_ENTRIES}) is exactly 16 + {ENTRY.size} n bytes")
    rows = [ENTRY.unpack_from(data, 16 + i * ENTRY.size) for i in range(n)]
    for (a, *_), (b, *_) in zip(rows, rows[1:]):
        if a >= b:
            raise RecordError(f"{what}: digest {b.hex()[:16]}… is {'repeated' if a == b else 'out of order'} in its "
                              "index (entries are sorted by digest, each once)")
    end = len(PACK_MAGIC)
    for digest, offset, length in sorted(rows, key=lambda r: r[1]):
        if offset != end or length < 1:
            why = ("overlaps the entry before it" if offset < end else "leaves a gap after the entry before it") \
                if offset != end else "is empty"
            raise RecordError(f"{what}: the entry of {digest.hex()[:16]}… at bytes {offset}+{length} {why}: "
                              "entries must tile the pack")
        end = offset + length
    if end != pack_size:
        raise RecordError(f"{what}: its entries end at byte {end}, the pack has {pack_size} bytes "
                          f"({'truncated, or an entry points past its end' if end > pack_size else 'trailing bytes'})")
    with open(pack, "rb") as f:
        if f.read(len(PACK_MAGIC)) != PACK_MAGIC:
            raise RecordError(f"{what} does not start with {PACK_MAGIC!r}")
    return {d: PackEntry(pack, off, length) for d, off, length in rows}


def pack_indexes(pack_dir: Path) -> list[Path]:
    """The index files of `pack_dir`, sorted by name (files of any other name are not read)."""
    if not pack_dir.is_dir():
        return []
    out = []
    with os.scandir(pack_dir) as entries:
        for e in entries:
            if e.name.endswith(INDEX_SUFFIX) and PACK_NAME.match(e.name[:-len(INDEX_SUFFIX)]):
                out.append(Path(e.path))
                if len(out) > MAX_PACKS:
                    raise RecordError(f"{pack_dir} holds more than {MAX_PACKS} pack indexes")
    return sorted(out)


def pack_file_status(path: Path) -> tuple[str, object]:
    """What one file of `objects/pack/` is, for `aftune check`: ("entries", {digest: entry}) for
    an index that checks, ("pack", None) for a pack that has its index (checked with it),
    ("damaged", why) for an index that does not check, ("unreferenced", why) for anything else."""
    stem, suffix = path.name[:-len(path.suffix)] if path.suffix else path.name, path.suffix
    if suffix == PACK_SUFFIX and PACK_NAME.match(stem):
        if path.with_suffix(INDEX_SUFFIX).is_file():
            return "pack", None
        return "unreferenced", "a pack without its index (an interrupted write): its objects are not read"
    if suffix != INDEX_SUFFIX or not PACK_NAME.match(stem):
        return "unreferenced", "a temporary file of an interrupted write" if path.name.startswith(".tmp-") else \
            f"not a pack (packs are {PACK_DIR}/<name>{PACK_SUFFIX} and <name>{INDEX_SUFFIX})"
    try:
        return "entries", read_index(path)
    except RecordError as exc:
        return "damaged", f"{exc}; none of its objects can be read"


def read_packs(pack_dir: Path) -> dict[bytes, PackEntry]:
    """digest -> entry over every pack of `pack_dir`; a digest in several packs is read from
    the first by name (each copy is digest-checked when read)."""
    out: dict[bytes, PackEntry] = {}
    for index in pack_indexes(pack_dir):
        for d, entry in read_index(index).items():
            out.setdefault(d, entry)
    return out


class PackWriter:
    """One pack being written: objects are appended as they come (from several threads), and
    `finish` writes the index. An empty pack writes no file."""

    def __init__(self, pack_dir: Path, label: str, on_finish=None):
        if not PACK_NAME.match(label):
            raise ValueError(f"bad pack label {label!r}")
        self.dir, self.label = pack_dir, label
        self._entries: dict[bytes, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._end = len(PACK_MAGIC)
        self._tmp = pack_dir / f".tmp-{label}.{os.getpid()}.{id(self)}{PACK_SUFFIX}"
        self.path: Path | None = None  # the finished pack
        self._on_finish = on_finish  # called with the index path once the pack is complete

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _write(self, data) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def append(self, digest: bytes, chunks: list[bytes]) -> None:
        """Append one object (its compressed bytes, in pieces); a digest already in is skipped."""
        with self._lock:
            if digest in self._entries:
                return
            if self.path is not None:
                raise RuntimeError(f"pack {self.label} is finished")
            if self._fd is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._write(PACK_MAGIC)
            n = 0
            for chunk in chunks:
                self._write(chunk)
                n += len(chunk)
            self._entries[digest] = (self._end, n)
            self._end += n

    def finish(self) -> Path | None:
        """Close the pack and write its index; the pack's path (None when nothing was appended).
        Its name is the label and the start of the SHA-256 of its index, so a pack written again
        (a resumed run) never replaces another."""
        with self._lock:
            if self._fd is None:
                return None
            os.close(self._fd)
            self._fd = None
            index = encode_index(self._entries)
            name = f"{self.label}-{hashlib.sha256(index).hexdigest()[:16]}"
            idx_tmp = self.dir / f".tmp-{name}{INDEX_SUFFIX}"
            idx_tmp.write_bytes(index)
            os.replace(self._tmp, self.dir / (name + PACK_SUFFIX))
            os.replace(idx_tmp, self.dir / (name + INDEX_SUFFIX))
            self.path = self.dir / (name + PACK_SUFFIX)
        if self._on_finish is not None:
            self._on_finish(self.dir / (name + INDEX_SUFFIX))
        return self.path

    def abort(self) -> None:
        """Drop an unfinished pack (its objects were never committed)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                self._tmp.unlink(missing_ok=True)
