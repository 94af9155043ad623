"""Datasets, the dataset root, the seeded example order and batch building (SPEC.md 4).

Three kinds of dataset:
- `text`: JSONL, one `{"text": ...}` or `{"messages": [{"role", "content"}, ...]}` per line, for causal LMs;
- `labeled_text`: JSONL, `{"text": ..., "label": ...}` per line, for sequence classifiers;
- `image_folder`: a directory with one subdirectory per class, for image classifiers.

The dataset root is a Merkle root over per-example digests, so the client can check that every
batch was built from exactly the agreed examples. The order is derived from the seed with
BLAKE3/SHA-256 (not a framework RNG), so an independent verifier can recompute it.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.encoding import TAG_EXAMPLE, TAG_ORDER, hash_message, length_prefixed, u64
from ..errors import InputError
from ..core.merkle import merkle_root
from ..models.base import IGNORE_INDEX

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_LINE_BYTES = 1 << 20


@dataclass(frozen=True)
class Example:
    raw: bytes  # the bytes committed for this example (SPEC.md 4.1)
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    label: str | None = None
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
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
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
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append(f"line {lineno}: not JSON ({exc})")
            continue
        try:
            examples.append(_parse_example(obj, raw, kind))
        except ValueError as exc:
            problems.append(f"line {lineno}: {exc}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"{path}: {shown}")
    if not examples:
        raise InputError(f"{path} holds no examples")
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
    messages = obj.get("messages")
    if isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        return Example(raw, messages=tuple((m["role"], m["content"]) for m in messages))
    raise ValueError("a text line needs a string 'text' or a non-empty 'messages' list of {role, content}")


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


# --- order -----------------------------------------------------------------------------------

def epoch_order(algorithm: str, seed: int, epoch: int, num_examples: int) -> list[int]:
    """Example indices of one epoch: sorted by H(TAG_ORDER || seed || epoch || index)."""
    keys = [(hash_message(algorithm, TAG_ORDER, u64(seed), u64(epoch), u64(i)), i) for i in range(num_examples)]
    return [i for _, i in sorted(keys)]


class OrderCache:
    """Memoises epoch orders across many micro-batches of one run."""

    def __init__(self, algorithm: str, seed: int, num_examples: int):
        self.algorithm, self.seed, self.n = algorithm, seed, num_examples
        self._epochs: dict[int, list[int]] = {}

    def indices(self, micro_index: int, batch_size: int) -> list[int]:
        out = []
        for k in range(micro_index * batch_size, (micro_index + 1) * batch_size):
            epoch, offset = divmod(k, self.n)
            if epoch not in self._epochs:
                self._epochs[epoch] = epoch_order(self.algorithm, self.seed, epoch, self.n)
            out.append(self._epochs[epoch][offset])
        return out


# --- batches ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchSpec:
    """How examples become tensors: committed in the run config."""

    task: str  # causal_lm | classification
    seq_len: int = 128
    image_size: int = 0
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    fields: tuple[str, ...] = ()


def chat_text(messages: tuple[tuple[str, str], ...]) -> str:
    return "".join(f"<|{role}|>\n{content}\n" for role, content in messages)


def build_batch(dataset: Dataset, indices: list[int], spec: BatchSpec, tokenizer) -> dict[str, torch.Tensor]:
    examples = [dataset.examples[i] for i in indices]
    if dataset.kind == "image_folder":
        return _image_batch(dataset, examples, spec)
    if spec.task == "causal_lm":
        return _causal_batch(examples, spec, tokenizer)
    return _classification_batch(dataset, examples, spec, tokenizer)


def _causal_batch(examples, spec: BatchSpec, tokenizer) -> dict[str, torch.Tensor]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise InputError("the tokenizer has neither a pad nor an eos token")
    rows = []
    for e in examples:
        text = e.text if e.text is not None else chat_text(e.messages)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        rows.append(ids[: spec.seq_len])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    attention = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        attention[i, : len(r)] = 1
    labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _classification_batch(dataset, examples, spec: BatchSpec, tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        [e.text for e in examples], truncation=True, max_length=spec.seq_len, padding="longest", return_tensors="pt"
    )
    batch = {"input_ids": enc["input_ids"].to(torch.int64), "attention_mask": enc["attention_mask"].to(torch.int64)}
    if "token_type_ids" in spec.fields:
        tt = enc.get("token_type_ids")
        batch["token_type_ids"] = tt.to(torch.int64) if tt is not None else torch.zeros_like(batch["input_ids"])
    batch["labels"] = torch.tensor([dataset.label_index(e) for e in examples], dtype=torch.int64)
    return batch


def _image_batch(dataset, examples, spec: BatchSpec) -> dict[str, torch.Tensor]:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        from ..errors import MissingExtra

        raise MissingExtra("pillow", "hf") from None
    if spec.image_size <= 0:
        raise InputError("image datasets need a positive image size")
    mean = torch.tensor(spec.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(spec.image_std, dtype=torch.float32)[:, None, None]
    pixels = []
    for e in examples:
        try:
            with Image.open(io.BytesIO(e.image_bytes)) as im:
                im = im.convert("RGB").resize((spec.image_size, spec.image_size), Image.Resampling.BILINEAR)
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"cannot read image {e.image_path or split_image_raw(e.raw)[1]}: {exc}") from None
        x = data.reshape(spec.image_size, spec.image_size, 3).permute(2, 0, 1).to(torch.float32) / 255.0
        pixels.append((x - mean) / std)
    return {
        "pixel_values": torch.stack(pixels),
        "labels": torch.tensor([dataset.label_index(e) for e in examples], dtype=torch.int64),
    }
