"""The inputs of an inference request: a prompt (causal LMs), a text (BERT), an image (vision),
turned into tensors the same way for the provider that records and the verifier that checks.

    prompt_ids(tokenizer, "Q: What is 3 plus 4? A:")     # I64 [1, P], BOS first as in training
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.encoding import TAG_FILE, hash_message
from ..errors import InputError
from .images import image_tensor

MAX_PROMPT_CHARS = 1 << 20
MAX_IMAGE_BYTES = 64 << 20


def check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the {what} is not valid Unicode text (lone surrogate)") from None


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of a prompt: the tokenizer without special tokens, BOS prepended when the
    tokenizer has one (as training examples start). I64 [1, P]."""
    if not isinstance(prompt, str) or not prompt:
        raise InputError("the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    check_text(prompt, "prompt")
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if not ids:
        raise InputError("the prompt has no tokens")
    return torch.tensor([ids], dtype=torch.int64)


def classification_inputs(tokenizer, text: str, max_length: int) -> dict[str, torch.Tensor]:
    if not isinstance(text, str) or not text:
        raise InputError("the text is empty")
    check_text(text, "text")
    enc = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
    ids = enc["input_ids"].to(torch.int64)
    tt = enc.get("token_type_ids")
    return {"input_ids": ids, "attention_mask": enc["attention_mask"].to(torch.int64),
            "token_type_ids": tt.to(torch.int64) if tt is not None else torch.zeros_like(ids)}


def image_pixels(path: str | Path, size: int, algorithm: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """F32 [1, 3, size, size] exactly as training batches are built (SPEC.md 4.4), and the
    image file's name and digest (H(TAG_FILE || bytes))."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p} does not exist")
    with p.open("rb") as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"image {p} is larger than {MAX_IMAGE_BYTES} bytes")
    pixels = image_tensor(data, size, str(p))[None].contiguous()
    return pixels, {"name": p.name, "digest": hash_message(algorithm, TAG_FILE, data).hex(), "size": size}
