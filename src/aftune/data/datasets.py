"""Datasets and the dataset root (SPEC.md 4.1): the agreed examples, as committed bytes.

Three kinds of dataset:
- `text`: JSONL, one `{"text": ...}`, `{"messages": [{"role", "content"}, ...]}` or `{"prompt": ...,
  "completion": ...}` (strings, or both message lists; supervised fine-tuning, `sft.py`) per line, for causal LMs;
- `labeled_text`: JSONL, `{"text": ..., "label": ...}` per line, for sequence classifiers;
- `image_folder`: a directory with one subdirectory per class, for image classifiers.

The dataset root is a Merkle root over per-example digests, so the client can check that every
batch was built from exactly the agreed examples (`order.py` says which, `batches.py` how).

    load_dataset("data.jsonl").root("blake3")
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..core.encoding import TAG_EXAMPLE, hash_message, length_prefixed
from ..errors import InputError
from ..core.merkle import merkle_root

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_LINE_BYTES = 1 << 20


@dataclass(frozen=True)
class Example:
    raw: bytes  # the bytes committed for this example (SPEC.md 4.1)
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    label: str | None = None
    # prompt/completion data (SPEC.md 4.1, 4.4.1): both strings, or both message tuples
    prompt: str | tuple[tuple[str, str], ...] | None = None
    completion: str | tuple[tuple[str, str], ...] | None = None
    image_path: Path | None = None  # where it was read from (informational)

    @property
    def image_bytes(self) -> bytes:
        return split_image_raw(self.raw)[2]


def split_image_raw(raw: bytes) -> tuple[str, str, bytes]:
    """(class, relative path, file bytes) of an image example's committed bytes."""
    def take(buf: bytes, at: int) -> tuple[bytes, int]:
        if at + 4 > len(buf):
            raise InputError("image example: truncated length prefix")
        n = int.from_bytes(buf[at:at + 4], "big")
        if at + 4 + n > len(buf):
            raise InputError("image example: truncated field")
        return buf[at + 4:at + 4 + n], at + 4 + n

    cls, at = take(raw, 0)
    rel, at = take(raw, at)
    try:
        return cls.decode("utf-8"), rel.decode("utf-8"), raw[at:]
    except UnicodeDecodeError:
        raise InputError("image example: class or path is not UTF-8") from None


def example_from_raw(kind: str, raw: bytes) -> Example:
    """Rebuild an example from its committed bytes (as opened in an audit bundle)."""
    if kind == "image_folder":
        cls, _, _ = split_image_raw(raw)
        return Example(raw, label=cls)
    try:
        obj = jsonio.loads(raw)
    except ValueError as exc:
        raise InputError(f"example is not JSON: {exc}") from None
    try:
        return _parse_example(obj, raw, kind)
    except ValueError as exc:
        raise InputError(f"example: {exc}") from None


@dataclass(frozen=True)
class Dataset:
    kind: str
    examples: tuple[Example, ...]
    labels: tuple[str, ...]  # class names in index order; empty for causal LM text
    files: tuple[Path, ...]  # what `copy_into` copies

    def example_digests(self, algorithm: str) -> dict[str, bytes]:
        return {f"{i:012d}": hash_message(algorithm, TAG_EXAMPLE, e.raw) for i, e in enumerate(self.examples)}

    def root(self, algorithm: str) -> bytes:
        return merkle_root(algorithm, self.example_digests(algorithm))

    def label_index(self, example: Example) -> int:
        return self.labels.index(example.label)


def detect_kind(path: Path) -> str:
    if path.is_dir():
        return "image_folder"
    with path.open("rb") as f:
        first = f.readline(MAX_LINE_BYTES)
        while first and not first.strip():  # blank lines are skipped when the file is read, too
            first = f.readline(MAX_LINE_BYTES)
    if not first.strip():
        raise InputError(f"{path} is empty: expected JSONL, one example per line, with 'text', 'messages' or "
                         f"'text'+'label'")
    try:
        obj = jsonio.loads(first)
    except ValueError:
        raise InputError(f"{path}: the first line is not JSON; expected JSONL with 'text', 'messages' or 'text'+'label'") from None
    return "labeled_text" if isinstance(obj, dict) and "label" in obj else "text"


def load_dataset(path: str | Path, kind: str | None = None) -> Dataset:
    p = Path(path)
    if not p.exists():
        raise InputError(f"dataset {p} does not exist")
    kind = kind or detect_kind(p)
    if kind == "image_folder":
        return _load_image_folder(p)
    if kind in ("text", "labeled_text"):
        return _load_jsonl(p, kind)
    raise InputError(f"unknown dataset kind {kind!r}: use text, labeled_text or image_folder")


def _load_jsonl(path: Path, kind: str) -> Dataset:
    if not path.is_file():
        raise InputError(f"{path} is not a file; a {kind} dataset is one JSONL file")
    examples: list[Example] = []
    problems: list[str] = []
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        raw = line.rstrip(b"\r")
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE_BYTES:
            problems.append(f"line {lineno}: longer than {MAX_LINE_BYTES} bytes")
            continue
        try:
            obj = jsonio.loads(raw)
        except ValueError as exc:
            problems.append(f"line {lineno}: not JSON ({exc})")
            continue
        try:
            examples.append(_parse_example(obj, raw, kind))
        except ValueError as exc:
            problems.append(f"line {lineno}: {exc}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"{path}: {shown}")
    if not examples:  # every line blank (problems were raised above)
        raise InputError(f"{path} is empty: expected JSONL, one example per line")
    labels: tuple[str, ...] = ()
    if kind == "labeled_text":
        labels = tuple(sorted({e.label for e in examples}, key=_label_sort_key))
    return Dataset(kind, tuple(examples), labels, (path,))


_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")


def _label_sort_key(label: str):
    """Integer labels (in canonical form) by value, then every other label by its UTF-8 bytes."""
    if _CANONICAL_INT.fullmatch(label):
        return (0, int(label), b"")
    return (1, 0, label.encode("utf-8", "surrogatepass"))


def _parse_example(obj: Any, raw: bytes, kind: str) -> Example:
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    if kind == "labeled_text":
        if not isinstance(obj.get("text"), str) or "label" not in obj:
            raise ValueError("a labeled_text line needs a string 'text' and a 'label'")
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ValueError("'label' must be an integer or a string")
        return Example(raw, text=obj["text"], label=str(label))
    if isinstance(obj.get("text"), str):
        return Example(raw, text=obj["text"])
    messages = _messages(obj.get("messages"))
    if messages:
        return Example(raw, messages=messages)
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Example(raw, prompt=prompt, completion=completion)
    prompt, completion = _messages(prompt), _messages(completion)
    if prompt and completion:
        return Example(raw, prompt=prompt, completion=completion)
    raise ValueError("a text line needs a string 'text', a non-empty 'messages' list of {role, content}, or a "
                     "'prompt' and a 'completion' (both strings, or both non-empty lists of {role, content})")


def _messages(value: Any) -> tuple[tuple[str, str], ...] | None:
    """A non-empty JSON list of {role, content} strings as (role, content) pairs, else None."""
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return tuple((m["role"], m["content"]) for m in value)
    return None


def _load_image_folder(root: Path) -> Dataset:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise InputError(f"{root}: an image_folder dataset needs one subdirectory per class")
    examples = []
    for name in classes:
        for f in sorted((root / name).iterdir(), key=lambda q: q.name.encode("utf-8")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                rel = f"{name}/{f.name}"
                raw = length_prefixed(name.encode("utf-8")) + length_prefixed(rel.encode("utf-8")) + f.read_bytes()
                examples.append(Example(raw, label=name, image_path=f))
    if not examples:
        raise InputError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    return Dataset("image_folder", tuple(examples), tuple(classes), (root,))


def copy_into(dataset: Dataset, target: Path) -> Path:
    """Copy the dataset into the run directory so a verifier can rebuild every batch."""
    src = dataset.files[0]
    target.mkdir(parents=True, exist_ok=True)
    dest = target / src.name
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=False)
    else:
        shutil.copyfile(src, dest)
    return dest
