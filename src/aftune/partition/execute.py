"""The inference loops the trusted process runs (partitioned or not: the same calls).

    tokens, logits = generate(model, input_ids, max_new_tokens=8, eos_token_ids=[2])
    label, logits = classify(model, pixel_values)

Greedy decoding with the Hugging Face model's own forward and KV cache: step 0 runs the prompt,
step k >= 1 the token chosen at step k-1; only the last position's logits are computed
(`logits_to_keep=1`); the token is aftune's `greedy_token` (smallest index of the largest
logit). `on_step(k)` is called before each step so the offloader knows the step it is in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..inference.sampling import greedy_token


def generate(model: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int, eos_token_ids: list[int],
             on_step: Callable[[int], None] | None = None) -> tuple[list[int], list[torch.Tensor]]:
    past = None
    seen = 0  # positions so far: the all-ones attention mask of a single unpadded sequence

    def step(k: int, ids: torch.Tensor) -> torch.Tensor:
        nonlocal past, seen
        if on_step is not None:
            on_step(k)
        seen += ids.shape[1]
        out = model(input_ids=ids, attention_mask=torch.ones(1, seen, dtype=torch.int64), use_cache=True,
                    logits_to_keep=1, **cache_argument(model, past))
        past = returned_cache(out)
        return out.logits[0, -1].detach().clone()

    with torch.no_grad():
        return decode_steps(step, input_ids, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids)


def cache_argument(model: nn.Module, cache) -> dict:
    """The KV cache keyword: `cache` (transformers >= 5.2x) or `past_key_values` (older)."""
    names = inspect.signature(type(model).forward).parameters
    return {"cache": cache} if "cache" in names else {"past_key_values": cache}


def returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def classify(model: nn.Module, pixel_values: torch.Tensor, *,
             on_step: Callable[[int], None] | None = None) -> tuple[int, list[torch.Tensor]]:
    if on_step is not None:
        on_step(0)
    with torch.no_grad():
        z = model(pixel_values=pixel_values).logits[0].detach().clone()
    return greedy_token(z), [z]


def decode_steps(step_logits: Callable[[int, torch.Tensor], torch.Tensor], input_ids: torch.Tensor, *,
                 max_new_tokens: int, eos_token_ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding around `step_logits(k, ids)`, the logits of step k (the trusted model's
    forward, or in the none-shielded baseline the worker's): the token is chosen here."""
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    ids = input_ids
    for k in range(max_new_tokens):
        z = step_logits(k, ids)
        token = greedy_token(z)
        tokens.append(token)
        logits.append(z)
        if token in eos_token_ids:
            break
        ids = torch.tensor([[token]], dtype=torch.int64)
    return tokens, logits
