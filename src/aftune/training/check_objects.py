"""The stored objects' part of the static check (`aftune check`, SPEC.md 6.9): the report it
fills, and every loose object and pack of `objects/` decompressed, hashed and compared with the
rows that reference it. `training/check.py` checks the rest of a run (transcript, manifests,
config, model) and calls `check_objects`; `protocol/check.py` calls it for bundles.

    report = CheckReport(Path("runs/demo"))
    rows = CommittedRows(); rows.add(ref, "manifests/000000.json.zst", "step/00000000/loss")
    check_objects(report, ObjectStore(Path("runs/demo/objects"), "blake3"), rows)
"""

from __future__ import annotations

import os
import re
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import zstandard

from ..core import jsonio
from ..core.encoding import DTYPES_BY_NAME
from ..core.packs import INDEX_SUFFIX, PACK_DIR, PACK_NAME, PACK_SUFFIX, PackEntry, read_index
from ..core.rows import MAX_DIM, MAX_NDIM, TensorRef
from ..core.store import OBJECT_SUFFIX, ObjectStore
from ..errors import CommitmentMismatch, RecordError

DAMAGED, MISSING, UNREFERENCED, UNFINISHED = "damaged", "missing", "unreferenced", "unfinished"
INTACT, UNREADABLE = "intact", "unreadable"
OBJECT_NAME = re.compile(r"^([0-9a-f]{64})" + re.escape(OBJECT_SUFFIX) + "$")
_MAX_HEADER = 1 << 16  # safetensors header of one tensor (as core.store)
MAX_UNCOMMITTED_BYTES = 1 << 30  # an object no row bounds is decompressed only up to this size

Progress = Callable[[int, int], None]  # (bytes hashed so far, bytes to hash)


@dataclass(frozen=True)
class FileProblem:
    """One file that is not what the record commits: `kind` is damaged, missing, unreferenced
    (present but committed by nothing) or unfinished (an interrupted write, informational)."""

    path: str  # relative to the checked directory
    kind: str
    reason: str

    def describe(self) -> str:
        return f"{self.kind} {self.path}: {self.reason}"


@dataclass
class CheckReport:
    root: str
    kind: str  # "run", "inference records", "bundle"
    problems: list[FileProblem] = field(default_factory=list)
    described: list[str] = field(default_factory=list)  # what the record is, in words
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    objects: int = 0  # object files hashed
    bytes_hashed: int = 0
    seconds: float = 0.0

    def add(self, path: Path | str, kind: str, reason: str) -> None:
        self.problems.append(FileProblem(self.relative(path), kind, reason))

    def relative(self, path: Path | str) -> str:
        p = Path(path)
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    @property
    def status(self) -> str:
        return DAMAGED if any(p.kind in (DAMAGED, MISSING) for p in self.problems) else INTACT

    @property
    def exit_code(self) -> int:
        return 0 if self.status == INTACT else 1

    def summary(self) -> str:
        counts = {k: sum(1 for p in self.problems if p.kind == k) for k in (DAMAGED, MISSING, UNREFERENCED)}
        text = f"{self.status.upper()}: {self.kind} {self.root}: {self.objects} objects"
        text += f" ({self.bytes_hashed / 2**20:.1f} MiB) hashed in {self.seconds:.2f} s"
        found = [f"{n} {k}" for k, n in counts.items() if n]
        return text + ("; " + ", ".join(found) if found else "")

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "kind": self.kind, "root": self.root, "described": list(self.described),
                "notes": list(self.notes), "objects": self.objects, "bytes_hashed": self.bytes_hashed,
                "seconds": round(self.seconds, 4), "problems": [asdict(p) for p in self.problems]}


# --- objects ------------------------------------------------------------------------------------

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
            if not 0 < n <= _MAX_HEADER:
                raise RecordError(f"{label}: no safetensors header of at most {_MAX_HEADER} bytes")
            header = jsonio.loads(reader.read(n))
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


class CommittedRows:
    """What the record's rows say about each digest: digest -> {(name, dtype, shape): (the file
    holding the row, where in it)}, and the digests a writer must store (-> where)."""

    def __init__(self) -> None:
        self.by_digest: dict[bytes, dict[tuple, tuple[str, str]]] = {}
        self.required: dict[bytes, str] = {}

    def add(self, ref: TensorRef, file: str, where: str, required: bool = False) -> None:
        self.by_digest.setdefault(ref.digest, {}).setdefault((ref.name, ref.dtype, ref.shape), (file, where))
        if required:
            self.required.setdefault(ref.digest, f"{file} {where}")


def _problem(store: ObjectStore, found: Path | PackEntry, ref: TensorRef, where: str) -> str | None:
    """Why the object at `found` is not the tensor of `ref` (None when it is)."""
    try:
        store.read_at(found, ref, where)
        return None
    except CommitmentMismatch as exc:
        return f"its bytes do not hash to its name: {exc}"
    except (RecordError, OSError) as exc:
        return str(exc)


def check_objects(report: CheckReport, store: ObjectStore, rows: CommittedRows, progress: Progress | None = None, *,
                  unreferenced_reason: str = "a valid object that no signed row references") -> None:
    """Hash every file under `store.root`: each must be an object whose bytes have the digest its
    name says; every row naming that digest must give the name, dtype and shape it holds (a row
    that does not is reported in its own file). A required digest without an object is missing."""
    root = store.root
    files = _files(root)
    total, done, present = sum(size for _, size, _ in files), 0, set()
    # objects are decompressed and hashed on every core (zstd, blake3 and hashlib release the
    # GIL); the findings are added in file order, so the report does not depend on scheduling
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        pending = []
        for path, size, regular in files:
            m = OBJECT_NAME.match(path.name)
            found = _Findings()
            if not regular:
                found.add(path, DAMAGED, "not a regular file (a link or a device): objects are plain files")
            elif path.parent == root / PACK_DIR:
                for digest, entry, findings in _pack_file(path, files):
                    if findings is not None:
                        pending.append((findings, 0))
                        continue
                    present.add(digest)
                    pending.append((pool.submit(_object_findings, store, entry, f"{root.name}/{PACK_DIR}/{path.name}",
                                                digest, rows.by_digest.get(digest), unreferenced_reason), 0))
                    report.objects += 1
                    report.bytes_hashed += entry.length
            elif m is None or path.parent.name != m.group(1)[:2] or path.parent.parent != root:
                why = "a temporary file of an interrupted write" if path.name.startswith(".tmp-") else \
                    f"not an object (objects are objects/XX/<64 hex digits>{OBJECT_SUFFIX})"
                found.add(path, UNREFERENCED, why)
            else:
                digest = bytes.fromhex(m.group(1))
                present.add(digest)
                found = pool.submit(_object_findings, store, path, f"{root.name}/{path.parent.name}/{path.name}",
                                    digest, rows.by_digest.get(digest), unreferenced_reason)
                report.objects += 1
                report.bytes_hashed += size
            pending.append((found, size))
        for found, size in pending:
            for finding in (found.result() if isinstance(found, Future) else found):
                report.add(*finding)
            done += size
            if progress:
                progress(done, total)
    for digest, where in rows.required.items():
        if digest not in present:
            report.add(store.path(digest), MISSING, f"{where} is committed and must be stored; its object is absent")


class _Findings(list):
    """(path, kind, reason) of one file, collected off the main thread."""

    def add(self, path: Path, kind: str, why: str) -> None:
        self.append((path, kind, why))


class _Prefixed:
    """Findings about one object of a pack: the pack's path, the reason naming the object.
    (Findings about the rows that reference it are added as they are.)"""

    def __init__(self, inner, prefix: str):
        self.inner, self.prefix = inner, prefix

    def add(self, path: Path | str, kind: str, why: str) -> None:
        is_pack = isinstance(path, Path) and path.suffix == PACK_SUFFIX
        self.inner.add(path, kind, self.prefix + why if is_pack else why)


def _pack_file(path: Path, files: list[tuple[Path, int, bool]]):
    """(digest, entry, None) for each object of a pack's index, or (None, None, findings) for a
    pack file that is not read: a pack without its index, a damaged index, a stray file."""
    found = _Findings()
    stem, suffix = path.name[:-len(path.suffix)] if path.suffix else path.name, path.suffix
    if suffix == PACK_SUFFIX and PACK_NAME.match(stem) and path.with_suffix(INDEX_SUFFIX).is_file():
        return []  # checked with its index
    if suffix != INDEX_SUFFIX or not PACK_NAME.match(stem):
        why = "a temporary file of an interrupted write" if path.name.startswith(".tmp-") else \
            "a pack without its index (an interrupted write): its objects are not read" if suffix == PACK_SUFFIX \
            and PACK_NAME.match(stem) else f"not a pack (packs are {PACK_DIR}/<name>{PACK_SUFFIX} and <name>{INDEX_SUFFIX})"
        found.add(path, UNREFERENCED, why)
        return [(None, None, found)]
    try:
        entries = read_index(path)
    except RecordError as exc:
        found.add(path, DAMAGED, f"{exc}; none of its objects can be read")
        return [(None, None, found)]
    return [(d, e, None) for d, e in sorted(entries.items(), key=lambda de: de[1].offset)]


def _object_findings(store: ObjectStore, found: Path | PackEntry, rel: str, digest: bytes,
                     claims: dict[tuple, tuple[str, str]] | None, unreferenced_reason: str) -> _Findings:
    findings = _Findings()
    _check_object(findings, store, found, rel, digest, claims, unreferenced_reason)
    return findings


def _check_object(report: CheckReport | _Findings, store: ObjectStore, found: Path | PackEntry, rel: str,
                  digest: bytes, claims: dict[tuple, tuple[str, str]] | None, unreferenced_reason: str) -> None:
    path = found.pack if isinstance(found, PackEntry) else found
    if isinstance(found, PackEntry):  # a problem names the object inside its pack
        rel = f"{rel}: object {digest.hex()[:16]}… at bytes {found.offset}+{found.length}"
        report = _Prefixed(report, f"object {digest.hex()[:16]}… (bytes {found.offset}+{found.length}): ")
    try:
        own = object_ref(found, digest)  # what the object says it holds (header only)
    except RecordError as exc:
        report.add(path, DAMAGED, str(exc))
        return
    key = (own.name, own.dtype, own.shape)
    if claims is not None and key in claims:  # bounded by a row's size, as a verifier reads it
        why = _problem(store, found, own, "{} ({} {})".format(rel, *claims[key]))
        if why is not None:
            report.add(path, DAMAGED, why)
            return
    elif own.nbytes > MAX_UNCOMMITTED_BYTES:
        report.add(path, DAMAGED if claims else UNREFERENCED, f"it claims {own.nbytes} bytes of tensor, more than "
                   "any row commits: not decompressed")
        return
    elif (why := _problem(store, found, own, rel)) is not None:
        report.add(path, DAMAGED, why)
        return
    if claims is None:
        report.add(path, UNREFERENCED, unreferenced_reason)
        return
    for (name, dtype, shape), (file, where) in claims.items():  # the object is intact: these rows are wrong
        if (name, dtype, shape) != key:
            report.add(file, DAMAGED, f"{where}: the row says {name!r} {dtype}{list(shape)}, but the object of its "
                       f"digest ({rel}) holds {own.name!r} {own.dtype}{list(own.shape)}")


def _files(root: Path) -> list[tuple[Path, int, bool]]:
    """(path, size, is a regular file) of everything below `root` but directories, sorted; one
    `scandir` pass (a run holds tens of thousands of objects: a stat per file is what costs)."""
    out, stack = [], [root] if root.is_dir() and not root.is_symlink() else []
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                else:
                    regular = e.is_file(follow_symlinks=False)
                    out.append((Path(e.path), e.stat(follow_symlinks=False).st_size if regular else 0, regular))
    return sorted(out)


# --- the transcript -----------------------------------------------------------------------------

