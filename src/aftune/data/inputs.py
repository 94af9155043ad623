"""The inputs of an inference request: a prompt (causal LMs), a text (BERT), an image (vision),
turned into tensors the same way for the provider that records and the verifier that checks.

    prompt_ids(tokenizer, "Q: What is 3 plus 4? A:")     # I64 [1, P], BOS first as in training
    prompt_ids(tokenizer, "What is 3 plus 4?", chat_template=TEMPLATE)   # rendered, then tokenised

A prompt is rendered with a chat template (the generation policy's exact text, SPEC.md 8.6.1) by
`render_chat` alone, for the engine that records and the verifier that checks alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.encoding import TAG_FILE, hash_message
from ..errors import InputError, MissingExtra
from .images import image_tensor

MAX_PROMPT_CHARS = 1 << 20
MAX_IMAGE_BYTES = 64 << 20
MAX_RENDERED_CHARS = 4 << 20
MAX_TEMPLATE_STEPS = 1 << 20  # range() iterations of one rendering, all loops together


def check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the {what} is not valid Unicode text (lone surrogate)") from None


def render_chat(template: str, prompt: str, *, bos_token: str | None, eos_token: str | None) -> str:
    """The text of `prompt` as the one user message of a chat, rendered with `template` (Jinja,
    sandboxed, `trim_blocks` and `lstrip_blocks`, the loop-controls extension; the variables
    `messages = [{"role": "user", "content": prompt}]`, `add_generation_prompt = true`,
    `bos_token` and `eos_token` (the tokenizer's, "" when it has none) and the function
    `raise_exception(message)`). At most MAX_RENDERED_CHARS characters."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MissingExtra("jinja2", "hf") from None

    def raise_exception(message):
        raise jinja2.TemplateError(str(message))

    budget = [MAX_TEMPLATE_STEPS]

    def bounded_range(*args):  # every iteration of every range() counts against one budget
        for i in range(*args):
            budget[0] -= 1
            if budget[0] < 0:
                raise jinja2.TemplateError(f"the chat template loops more than {MAX_TEMPLATE_STEPS} times")
            yield i

    class ChatSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if _too_large(operator, left, right):
                raise jinja2.TemplateError(f"the chat template computes a value that is too large ({operator})")
            return super().call_binop(context, operator, left, right)

    env = ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals.update(raise_exception=raise_exception, range=bounded_range)
    parts, size = [], 0
    try:
        compiled = env.from_string(template)
        for chunk in compiled.generate(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       bos_token=bos_token or "", eos_token=eos_token or ""):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise InputError(f"the chat template renders more than {MAX_RENDERED_CHARS} characters")
            parts.append(chunk)
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError,
            RecursionError) as exc:
        raise InputError(f"the chat template cannot render the prompt: {type(exc).__name__}: {str(exc)[:200]}") from None
    return "".join(parts)


def _too_large(operator: str, left, right) -> bool:
    """Whether `left * right` or `left ** right` would exceed the sandbox's bounds (a repeated
    string or list of more than MAX_RENDERED_CHARS items, an integer of more than 2^16 bits)."""
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right))
    if operator == "**":
        return ints and right > 0 and abs(left) > 1 and abs(left).bit_length() * right > 1 << 16
    if ints:
        return left.bit_length() + right.bit_length() > 1 << 16
    sizes = [len(x) if isinstance(x, (str, list, tuple)) else x for x in (left, right)]
    return all(isinstance(x, int) for x in sizes) and sizes[0] * sizes[1] > MAX_RENDERED_CHARS


def prompt_ids(tokenizer, prompt: str, chat_template: str | None = None) -> torch.Tensor:
    """Token ids of a prompt. Without a chat template: the tokenizer without special tokens, BOS
    prepended when the tokenizer has one (as training examples start). With one: the tokenizer
    without special tokens on `render_chat(chat_template, prompt, ...)` (the template places any
    BOS itself). I64 [1, P]."""
    if not isinstance(prompt, str) or not prompt:
        raise InputError("the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    check_text(prompt, "prompt")
    if chat_template is None:
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
    else:
        text = render_chat(chat_template, prompt, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
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
