"""Batches (SPEC.md 4.4): how the agreed examples become the tensors of one micro-batch.

The provider builds them to train and the verifier rebuilds them to check the committed batch;
both call `build_batch` with the run's `BatchSpec`.

    build_batch(dataset, indices=[3, 17, 5, 40], spec=BatchSpec("causal_lm", seq_len=64), tokenizer=tok)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import InputError
from ..models.base import IGNORE_INDEX
from .datasets import Dataset, split_image_raw
from .images import IMAGE_MEAN, IMAGE_STD, image_tensor
from .sft import SftSettings, sft_example


@dataclass(frozen=True)
class BatchSpec:
    """How examples become tensors: committed in the run config."""

    task: str  # causal_lm | classification
    seq_len: int = 128
    image_size: int = 0
    image_mean: tuple[float, ...] = IMAGE_MEAN
    image_std: tuple[float, ...] = IMAGE_STD
    fields: tuple[str, ...] = ()
    sft: SftSettings | None = None  # supervised fine-tuning rows (SPEC.md 4.4.1); None: plain causal LM

    def to_json(self) -> dict[str, Any]:
        """The run config's `batch` member (SPEC.md 4.3); `sft` only when set (older runs keep their bytes)."""
        d = {**asdict(self), "image_mean": list(self.image_mean), "image_std": list(self.image_std),
             "fields": list(self.fields)}
        if self.sft is None:
            del d["sft"]
        else:
            d["sft"] = self.sft.to_json()
        return d


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
    if spec.sft is not None:
        rows = [sft_example(e, tokenizer, spec.sft, spec.seq_len) for e in examples]
        return _padded(rows, pad)
    rows = []
    for e in examples:
        if e.text is None and e.messages is None:
            raise InputError("prompt/completion data is supervised fine-tuning: the agreement needs settings.sft")
        text = e.text if e.text is not None else chat_text(e.messages)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[: spec.seq_len]
        rows.append((ids, ids))
    return _padded(rows, pad)


def _padded(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """(ids, labels) rows right-padded to the longest: pad ids, attention 0 and labels -100 there."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    attention = torch.zeros((len(rows), width), dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention[i, : len(ids)] = 1
        labels[i, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.int64)
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
    pixels = [image_tensor(e.image_bytes, spec.image_size, str(e.image_path or split_image_raw(e.raw)[1]),
                           spec.image_mean, spec.image_std) for e in examples]
    return {
        "pixel_values": torch.stack(pixels),
        "labels": torch.tensor([dataset.label_index(e) for e in examples], dtype=torch.int64),
    }
