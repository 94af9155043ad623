"""Causal decoder LMs: GPT-2, and what every decoder adapter shares (the layer-stack families,
Llama, Qwen, Mistral, Gemma and the rest, are in layerstack.py).

Stages: token embedding (GPT-2: plus position embedding and dropout), one per decoder layer, and
the head. In training the head is the final norm, the LM head and the shifted cross-entropy;
full-vocabulary logits live only inside it and are recomputed from the last hidden state, never
recorded. In serving (SPEC.md 8.5) the layers run with their layer block's KV cache and the head
returns the logits of the next token at the step's last position.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Batch, Context, Stage, causal_lm_loss, model_dtype, padding_causal_mask


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _cache_kwargs(context) -> dict:
    """Serving passes its layer block's KV cache; training passes none (and no cache kwarg)."""
    cache = context.get("cache")
    return {"use_cache": False} if cache is None else {"past_key_values": cache, "use_cache": True}


class _LMHead(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def logits(self, hidden):
        return self.lm_head(self.norm(hidden))

    def forward(self, hidden, context):
        return causal_lm_loss(self.logits(hidden), context["batch"]["labels"])


class _NextTokenLogits(nn.Module):
    """Serving: final norm and LM head on the step's last position, the logits of the next token."""

    def __init__(self, head: _LMHead):
        super().__init__()
        self.head = head

    def forward(self, hidden, context):
        return self.head.logits(hidden[:, -1:, :])[0, -1]

    def every_position(self, hidden):
        """The logits [q, V] of every position of the one sequence (a verifier's teacher forcing)."""
        return self.head.logits(hidden)[0]

    def every_row(self, hidden):
        """Batched serving: the logits [B, V] of every row's last position (SPEC.md 8.5.1)."""
        return self.head.logits(hidden[:, -1:, :])[:, -1]


class _DecoderAdapter(Adapter):
    task = "causal_lm"
    batch_fields = ("input_ids", "attention_mask", "labels")

    def inference_stages(self) -> list[Stage]:
        return self.stages[:-1] + [Stage("head", _NextTokenLogits(self.stages[-1].module))]

    def inference_context(self, first: int, inputs: Batch) -> Context:
        """Step context at position `first`: a prefill (q > 1 positions) attends causally, a
        decode step (q = 1) to every cached position. SDPA's own causal mode serves a prefill
        from position 0; otherwise an explicit additive mask [1, 1, q, first + q] is built."""
        dtype = model_dtype(self.model)
        ids = inputs["input_ids"]
        q = ids.shape[1]
        positions = torch.arange(first, first + q, dtype=torch.int64, device=ids.device)[None, :]
        mask = None
        sdpa = getattr(self.model.config, "_attn_implementation", None) == "sdpa"
        if q > 1 and not (first == 0 and sdpa):
            allowed = torch.arange(first + q, device=ids.device)[None, :] <= positions[0][:, None]  # [q, first+q]
            mask = torch.zeros(1, 1, q, first + q, dtype=dtype, device=ids.device)
            mask = mask.masked_fill(~allowed[None, None], torch.finfo(dtype).min)
        return {"batch": {"input_ids": ids}, "position_ids": positions, "attention_mask": mask, "cache": None,
                "position_embeddings": self.rotary_embeddings(positions, dtype)}

    def rotary_embeddings(self, positions: torch.Tensor, dtype: torch.dtype):
        return None

    def sliding_window(self) -> int | None:
        """The attention window, when the config enables one (aftune does not replay beyond it)."""
        return None


class _GPT2Embedding(nn.Module):
    def __init__(self, wte: nn.Module, wpe: nn.Module, drop: nn.Module):
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop

    def forward(self, hidden, context):
        ids = context["batch"]["input_ids"]
        return self.drop(self.wte(ids) + self.wpe(context["position_ids"]))


class _GPT2Layer(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden, context):
        return _first(self.block(hidden, attention_mask=context["attention_mask"], **_cache_kwargs(context)))


class GPT2Adapter(_DecoderAdapter):
    families = ("gpt2",)

    def build_stages(self):
        tr = self.model.transformer
        stages = [Stage("embedding", _GPT2Embedding(tr.wte, tr.wpe, tr.drop))]
        stages += [Stage(f"layer.{i}", _GPT2Layer(block)) for i, block in enumerate(tr.h)]
        stages.append(Stage("head", _LMHead(tr.ln_f, self.model.lm_head)))
        return stages

    def context(self, batch: Batch) -> Context:
        ids = batch["input_ids"]
        position_ids = torch.arange(ids.shape[1], device=ids.device)[None, :].expand(ids.shape[0], -1)
        return {
            "batch": batch,
            "attention_mask": padding_causal_mask(batch["attention_mask"], model_dtype(self.model)),
            "position_ids": position_ids,
        }
