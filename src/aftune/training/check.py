"""The static check of a record (`aftune check`): every file against its commitments, without
replay, at hashing speed (SPEC.md 6.9). What `git fsck` is to git.

    aftune check runs/demo --public-key runs/demo/provider.key.pub [--json]

    report = check_run("runs/demo", public_key)   # a CheckReport: every problem, never the first only
    report.exit_code                              # 0 intact, 1 damaged

Every stored object is decompressed and hashed and must have the digest its file name says (and
the name, dtype and shape of every row that references it); every object a writer must store
must be there; every manifest must have its signed root, the transcript its chain and
signatures, the config its signed digest, and RUN/model the digest the run root signs. Each
damaged, missing or unreferenced file is reported with its path and why. Damage is reported, not
raised: only bad usage (no such directory, a bad key) raises `InputError`.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core import jsonio
from ..core.encoding import DTYPE_BY_NAME, HASH_ALGORITHMS
from ..core.rows import TensorRef
from ..core.signing import PublicKey
from ..core.packs import PACK_DIR, PACK_SUFFIX, PackEntry, pack_file_status
from ..core.store import OBJECT_SUFFIX, ObjectStore, object_ref
from ..errors import AftuneError, CommitmentMismatch, InputError, RecordError
from .manifest import StepBlockManifest, is_boundary, is_step_gradient, manifest_path
from .run import RunRecord, committed_settings, signed_run_config
from .transcript import MAX_TRANSCRIPT_BYTES, Transcript

DAMAGED, MISSING, UNREFERENCED, UNFINISHED = "damaged", "missing", "unreferenced", "unfinished"
INTACT, UNREADABLE = "intact", "unreadable"
OBJECT_NAME = re.compile(r"^([0-9a-f]{64})" + re.escape(OBJECT_SUFFIX) + "$")
MANIFEST_NAME = re.compile(r"^([0-9]{6,})\.json(\.zst)?$")
_INTEGER_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")  # batch fields a writer MAY commit by digest only
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
    kind, what = pack_file_status(path)
    if kind == "entries":
        return [(d, e, None) for d, e in sorted(what.items(), key=lambda de: de[1].offset)]
    found = _Findings()
    if kind != "pack":  # a pack is checked with its index
        found.add(path, DAMAGED if kind == "damaged" else UNREFERENCED, what)
    return [(None, None, found)]


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

def load_transcript(report: CheckReport, path: Path, public_key: PublicKey) -> Transcript | None:
    """The transcript, or None (reported). A last line cut short by a killed writer is an
    unfinished write, not damage: the complete lines before it are checked instead."""
    if not path.is_file():
        report.add(path, MISSING, "the signed transcript is missing: nothing of the record can be trusted")
        return None
    try:
        return Transcript.load(path, public_key)
    except RecordError as exc:
        first = exc
    try:
        data = jsonio.read_bytes(path, MAX_TRANSCRIPT_BYTES, "transcript")
    except RecordError:
        data = b""
    cut = data.rfind(b"\n") + 1
    if data and not data.endswith(b"\n") and cut > 0 and not isinstance(first, CommitmentMismatch):
        with tempfile.TemporaryDirectory(prefix="aftune-check-") as d:
            (Path(d) / "transcript.jsonl").write_bytes(data[:cut])
            try:
                transcript = Transcript.load(Path(d) / "transcript.jsonl", public_key)
            except RecordError:
                transcript = None
        if transcript is not None:
            report.add(path, UNFINISHED, f"its last line is incomplete ({len(data) - cut} bytes): a write was "
                       "interrupted; the complete lines before it were checked")
            return transcript
    report.add(path, DAMAGED, str(first))
    return None


def _header_algorithm(path: Path) -> str:
    """The hash a transcript header names, for hashing objects when the transcript is unusable."""
    try:
        with path.open("rb") as f:
            head = jsonio.loads(f.readline(1 << 16))
        return head["hash"] if isinstance(head, dict) and head.get("hash") in HASH_ALGORITHMS else "blake3"
    except (OSError, ValueError):
        return "blake3"


# --- a run directory ----------------------------------------------------------------------------

def check_run(run_dir: str | Path, public_key: PublicKey, *, transcript: str | Path | Transcript | None = None,
              progress: Progress | None = None, check_model: bool = True) -> CheckReport:
    """Check every file of a run directory (SPEC.md 6.9). `transcript` is the client's own copy
    (a path, or a `Transcript` already loaded under `public_key`); `check_model=False` leaves
    RUN/model to the caller (`verify --all` checks it itself)."""
    t0 = time.perf_counter()
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"run directory {root} does not exist")
    report = CheckReport(str(root), "run")
    if isinstance(transcript, Transcript):
        tr, tpath = transcript, root / "transcript.jsonl"
    else:
        tpath = Path(transcript) if transcript is not None else root / "transcript.jsonl"
        tr = load_transcript(report, tpath, public_key)
    algorithm = tr.algorithm if tr is not None else _header_algorithm(tpath)
    store = ObjectStore(root / "objects", algorithm)
    rows = CommittedRows()
    rec = _open_run(report, root, tr, store) if tr is not None else None
    if rec is not None:
        manifests = _check_manifests(report, rec, rows)
        _check_run_files(report, rec, manifests, check_model)
    else:
        report.notes.append("no manifest, config or model could be checked against a signed transcript; "
                            "objects were checked against their own names only")
    check_objects(report, store, rows, progress)
    report.seconds = time.perf_counter() - t0
    return report


def _open_run(report: CheckReport, root: Path, tr: Transcript, store: ObjectStore) -> RunRecord | None:
    path = root / "config.json"
    try:
        config = signed_run_config(path, tr)
        settings, problem = committed_settings(config, tr)
    except RecordError as exc:
        report.add(path, MISSING if not path.exists() else DAMAGED, str(exc))
        return None
    if settings is None:
        report.add(path, DAMAGED, f"its signed settings are invalid: {problem}")
        return None
    layout = config.get("layout")
    blocks = layout.get("layer_blocks") if isinstance(layout, dict) else None
    if not isinstance(blocks, list) or not blocks:
        report.add(path, DAMAGED, "layout.layer_blocks is missing or empty")
        return None
    return RunRecord(root, config, settings, tr, store, problem)


def _check_manifests(report: CheckReport, rec: RunRecord, rows: CommittedRows) -> dict[int, StepBlockManifest]:
    """Each signed step block's manifest against its signed root and the settings' step range;
    collects its rows, and which of them a writer must store (SPEC.md 3.2)."""
    settings, entries = rec.settings, rec.transcript.step_blocks
    total = settings.num_step_blocks
    out = {}
    for s in range(len(entries)):
        path = manifest_path(rec.root / "manifests", s)
        try:
            m = rec.manifest(s)
        except RecordError as exc:
            report.add(path, MISSING if not path.exists() else DAMAGED, str(exc))
            continue
        first = min(s * settings.steps_per_block, settings.steps)
        if (m.first_step, m.num_steps) != (first, min(settings.steps_per_block, settings.steps - first)):
            report.add(path, DAMAGED, f"it covers steps {m.first_step}+{m.num_steps}; the signed settings give "
                       f"step block {s} steps {first}+{min(settings.steps_per_block, settings.steps - first)}")
        out[s] = m
        where = f"manifests/{path.name}"
        stored_state = settings.stores_state(s)
        for key, ref in m.common.items():
            required = not ("/batch/" in key and ref.dtype in _INTEGER_DTYPES) and not (
                settings.digest_boundaries and is_boundary(key)) and not is_step_gradient(key)
            rows.add(ref, where, key, required=required)
        for b, block_rows in enumerate(m.blocks):
            for key, ref in block_rows.items():
                rows.add(ref, where, f"block {b} {key}", required=stored_state)
    d = rec.root / "manifests"
    for path in sorted(d.iterdir()) if d.is_dir() else []:
        m = MANIFEST_NAME.match(path.name)
        if m is None or int(m.group(1)) >= len(entries) or path != manifest_path(d, int(m.group(1))):
            report.add(path, UNREFERENCED, "no signed transcript line commits it (written, never signed: the run "
                       "stopped before signing it, or the file does not belong here)")
    n = len(entries)
    if rec.transcript.run is None:
        report.described.append(f"{n} step blocks signed, run not finished (a finished run signs {total} step "
                                f"blocks, the final state and the run root)")
    else:
        report.described.append(f"{n} step blocks signed (the last is the final state) and the run root: "
                                "the run is finished")
    return out


def _check_run_files(report: CheckReport, rec: RunRecord, manifests: dict[int, StepBlockManifest],
                     check_model: bool = True) -> None:
    """base_model.json, tokenizer/, the dataset copy, agreement.json and RUN/model."""
    from .conformance import agreement_of_run

    root = rec.root
    try:
        rec.base_digests()
        agreed = agreement_of_run(rec)
    except (RecordError, InputError) as exc:
        p = root / "base_model.json"
        report.add(p, MISSING if not p.exists() else DAMAGED, str(exc))
        agreed = None
    if agreed is not None:
        try:
            rec.tokenizer_files(agreed.tokenizer)
        except RecordError as exc:
            report.add(root / "tokenizer", DAMAGED, str(exc))
        try:
            rec.dataset(agreed.data_kind, agreed.data_root, agreed.labels, agreed.num_examples)
        except AftuneError as exc:
            report.add(root / str(rec.section("data").get("path", "data")), DAMAGED, str(exc))
    _check_agreement_copy(report, rec)
    if rec.transcript.run is None:
        report.notes.append("RUN/model was not checked: no run root is signed yet")
        return
    if check_model:
        _check_model(report, rec, manifests.get(rec.settings.num_step_blocks))


def _check_agreement_copy(report: CheckReport, rec: RunRecord) -> None:
    from .agreement import Agreement

    path = rec.root / "agreement.json"
    if not path.is_file():
        return
    try:
        if Agreement.load(path).digest().hex() != rec.config.get("agreement"):
            report.add(path, DAMAGED, "its digest is not the agreement digest the signed run config commits")
    except AftuneError as exc:
        report.add(path, DAMAGED, str(exc))


def _check_model(report: CheckReport, rec: RunRecord, final: StepBlockManifest | None) -> None:
    """RUN/model must have the model digest the run root signs; after full fine-tuning its
    weights must be the final committed state."""
    from ..models import load_pretrained, model_commitment

    d = rec.root / "model"
    if not d.is_dir():
        report.add(d, MISSING, "the fine-tuned model the run root signs is missing")
        return
    settings = rec.settings
    try:
        _, saved = load_pretrained(d, settings.attn_implementation, DTYPE_BY_NAME[settings.dtype])
        digest, digests = model_commitment(saved, d, rec.algorithm)
    except AftuneError as exc:
        report.add(d, DAMAGED, str(exc))
        return
    signed = rec.transcript.run.final_model_digest
    if digest != signed:
        report.add(d, DAMAGED, f"its model digest {digest.hex()[:16]}… is not the one the run root signs "
                   f"({signed.hex()[:16]}…): its weights, config, generation config or tokenizer files changed")
        return
    if settings.lora is not None:
        report.notes.append("LoRA: RUN/model's merge of the final adapters is recomputed by `aftune verify --all`, "
                            "not here")
        return
    if final is None:
        return
    state = {k[len("state/"):]: r.digest for rows in final.blocks for k, r in rows.items() if k.startswith("state/")}
    wrong = sorted(n for n, dg in digests.items() if state.get(n) != dg)
    if wrong:
        report.add(d, DAMAGED, f"{len(wrong)} of its tensors differ from the final committed state "
                   f"({', '.join(wrong[:3])})")


def run_check_findings(record) -> list:
    """The static check of an opened run (a `RunRecord`) as verification findings: `verify --all`
    runs it first (SPEC.md 6.9), so a damaged or missing stored file is a FAIL naming its path
    even where no replay reads it. RUN/model is left to the verifier's own final-model check."""
    from ..verdict.findings import Finding

    report = check_run(record.root, record.transcript.public_key, transcript=record.transcript, check_model=False)
    return [Finding(-1, -1, "stored_file", f"{p.kind}: {p.reason}", tensor=p.path)
            for p in report.problems if p.kind in (DAMAGED, MISSING)]
