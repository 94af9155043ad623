"""The signed transcript: the run header, one signed root per step block, and the run root.

The provider appends a line as soon as each step block ends, so a client that receives the lines
while training runs holds commitments made before any challenge exists. `Transcript.load`
checks every signature against a pinned public key and every chain link (SPEC.md 3.4).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..core.encoding import TAG_RUN, hash_message, parse_hex_digest
from ..errors import CommitmentMismatch, InputError, RecordError
from .manifest import chained_root
from ..core.signing import PublicKey, SigningKey

TRANSCRIPT_FORMAT = "aftune.transcript.v1"
MAX_TRANSCRIPT_BYTES = 64 << 20


def run_root(algorithm: str, config_digest: bytes, last_root: bytes, final_model_digest: bytes) -> bytes:
    return hash_message(algorithm, TAG_RUN, config_digest, last_root, final_model_digest)


@dataclass(frozen=True)
class StepBlockEntry:
    step_block: int
    first_step: int
    num_steps: int
    merkle_root: bytes
    prev: bytes
    root: bytes
    signature: bytes


@dataclass(frozen=True)
class RunEntry:
    config_digest: bytes
    last_root: bytes
    final_model_digest: bytes
    root: bytes
    signature: bytes


class TranscriptWriter:
    """Appends signed lines; thread-safe, each line flushed and fsynced as it is written."""

    def __init__(self, path: Path, key: SigningKey, algorithm: str, config_digest: bytes):
        self.path, self.key, self.algorithm = path, key, algorithm
        self.config_digest = config_digest
        self.prev = config_digest
        self._lock = threading.Lock()
        self._signed: dict[int, bytes] = {}
        self._diverged = False
        header = {"type": "header", "format": TRANSCRIPT_FORMAT, "hash": algorithm,
                  "config_digest": config_digest.hex(), "public_key": key.public_key.text,
                  "signature": key.sign("run-header", config_digest).hex()}
        path.write_text(json.dumps(header, separators=(",", ":")) + "\n", encoding="utf-8")

    @classmethod
    def resume(cls, path: Path, key: SigningKey, algorithm: str, config_digest: bytes, prev: bytes,
               signed: dict[int, bytes]) -> "TranscriptWriter":
        """Continue an interrupted transcript (training/resume.py): nothing is rewritten; step
        blocks in `signed` are recomputed and must reach their signed root (nothing appended),
        the next ones are appended after them. `prev`: the root the first recomputed one chains to."""
        self = cls.__new__(cls)
        self.path, self.key, self.algorithm, self.config_digest = path, key, algorithm, config_digest
        self.prev, self._lock, self._signed, self._diverged = prev, threading.Lock(), dict(signed), False
        return self

    def _append(self, obj: dict[str, Any]) -> None:
        import os

        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(obj, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def step_block(self, step_block: int, first_step: int, num_steps: int, merkle: bytes) -> bytes:
        with self._lock:
            root = chained_root(self.algorithm, step_block, self.prev, merkle)
            if self._diverged:
                raise CommitmentMismatch(f"resuming: not signing step block {step_block} after a divergence")
            if step_block in self._signed:  # resuming: recomputed, already signed
                if root != self._signed[step_block]:
                    self._diverged = True
                    raise CommitmentMismatch(
                        f"resuming: step block {step_block} recomputed to another root than the signed one; this "
                        "machine does not reproduce the run (thread count, library versions or hardware differ), "
                        "so nothing was appended")
                self.prev = root
                return root
            self._append({"type": "step_block", "step_block": step_block, "first_step": first_step,
                          "num_steps": num_steps, "merkle_root": merkle.hex(), "prev": self.prev.hex(),
                          "root": root.hex(), "signature": self.key.sign("step-block", root).hex()})
            self.prev = root
            return root

    def finish(self, final_model_digest: bytes) -> bytes:
        with self._lock:
            if self._diverged:
                raise CommitmentMismatch("resuming: not signing the run root after a divergence")
            root = run_root(self.algorithm, self.config_digest, self.prev, final_model_digest)
            self._append({"type": "run", "config_digest": self.config_digest.hex(), "last_root": self.prev.hex(),
                          "final_model_digest": final_model_digest.hex(), "root": root.hex(),
                          "signature": self.key.sign("run", root).hex()})
            return root


@dataclass(frozen=True)
class Transcript:
    algorithm: str
    config_digest: bytes
    public_key: PublicKey
    step_blocks: tuple[StepBlockEntry, ...]
    run: RunEntry | None

    @staticmethod
    def header_key(path: Path) -> PublicKey:
        """The key a transcript claims to be signed with (for the provider's own use only: a
        client pins the key it obtained out of band)."""
        try:
            with Path(path).open("rb") as f:
                head = jsonio.loads(f.readline(1 << 16))
            return PublicKey.from_text(str(head["public_key"]))
        except (OSError, ValueError, KeyError, TypeError, InputError):
            raise RecordError(f"{path} has no readable transcript header") from None

    @classmethod
    def load(cls, path: Path, pinned_key: PublicKey) -> "Transcript":
        """Parse and check a transcript: the key must be the pinned one, every signature valid,
        every chain link consistent. Raises RecordError naming the first bad line."""
        data = jsonio.read_bytes(path, MAX_TRANSCRIPT_BYTES, "transcript")
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        if not lines:
            raise RecordError(f"transcript {path} is empty")
        objs = []
        for n, line in enumerate(lines, start=1):
            try:
                obj = jsonio.loads(line)
            except ValueError:
                raise RecordError(f"transcript line {n} is not JSON: truncated or corrupt") from None
            if not isinstance(obj, dict):
                raise RecordError(f"transcript line {n} is not a JSON object")
            objs.append(obj)

        def field(obj, name, n):
            if name not in obj:
                raise RecordError(f"transcript line {n}: missing '{name}'")
            return obj[name]

        def digest(obj, name, n):
            try:
                return parse_hex_digest(field(obj, name, n), f"transcript line {n}: {name}")
            except InputError as exc:
                raise RecordError(str(exc)) from None

        def signature(obj, n):
            sig = field(obj, "signature", n)
            try:
                raw = bytes.fromhex(sig) if isinstance(sig, str) else b""
            except ValueError:
                raw = b""
            if len(raw) != 64:
                raise RecordError(f"transcript line {n}: signature is not 64 hex-encoded bytes")
            return raw

        head = objs[0]
        if head.get("type") != "header" or head.get("format") != TRANSCRIPT_FORMAT:
            raise RecordError(f"transcript line 1 is not an {TRANSCRIPT_FORMAT} header")
        algorithm = head.get("hash")
        if algorithm not in ("blake3", "sha256"):
            raise RecordError(f"transcript header: unknown hash {str(algorithm)[:20]!r}")
        try:
            key = PublicKey.from_text(str(field(head, "public_key", 1)))
        except InputError as exc:
            raise RecordError(f"transcript header: {exc}") from None
        if key != pinned_key:
            raise CommitmentMismatch(f"transcript is signed by {key.text[:24]}…, not by the pinned provider key "
                              f"{pinned_key.text[:24]}…: it was re-signed or belongs to another provider")
        config_digest = digest(head, "config_digest", 1)
        if not key.verify("run-header", config_digest, signature(head, 1)):
            raise CommitmentMismatch("transcript header: bad signature")

        prev = config_digest
        entries: list[StepBlockEntry] = []
        run = None
        for n, obj in enumerate(objs[1:], start=2):
            if run is not None:
                raise RecordError(f"transcript line {n}: nothing may follow the run entry")
            kind = obj.get("type")
            if kind == "step_block":
                vals = {}
                for name in ("step_block", "first_step", "num_steps"):
                    v = field(obj, name, n)
                    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                        raise RecordError(f"transcript line {n}: '{name}' must be a non-negative integer")
                    vals[name] = v
                if vals["step_block"] != len(entries):
                    raise CommitmentMismatch(f"transcript line {n}: step block {vals['step_block']} where {len(entries)} was expected")
                e = StepBlockEntry(vals["step_block"], vals["first_step"], vals["num_steps"],
                                   digest(obj, "merkle_root", n), digest(obj, "prev", n), digest(obj, "root", n),
                                   signature(obj, n))
                if e.prev != prev:
                    raise CommitmentMismatch(f"transcript line {n}: step block {e.step_block} does not chain to the previous root")
                if e.root != chained_root(algorithm, e.step_block, e.prev, e.merkle_root):
                    raise CommitmentMismatch(f"transcript line {n}: step block {e.step_block} root does not match its merkle root")
                if not key.verify("step-block", e.root, e.signature):
                    raise CommitmentMismatch(f"transcript line {n}: step block {e.step_block}: bad signature")
                entries.append(e)
                prev = e.root
            elif kind == "run":
                run = RunEntry(digest(obj, "config_digest", n), digest(obj, "last_root", n),
                               digest(obj, "final_model_digest", n), digest(obj, "root", n), signature(obj, n))
                if run.config_digest != config_digest or run.last_root != prev:
                    raise CommitmentMismatch(f"transcript line {n}: the run entry does not close this chain")
                if run.root != run_root(algorithm, run.config_digest, run.last_root, run.final_model_digest):
                    raise CommitmentMismatch(f"transcript line {n}: run root does not match its parts")
                if not key.verify("run", run.root, run.signature):
                    raise CommitmentMismatch(f"transcript line {n}: run entry: bad signature")
            else:
                raise RecordError(f"transcript line {n}: unknown entry type {str(kind)[:20]!r}")
        return cls(algorithm, config_digest, key, tuple(entries), run)
