"""Causal decoder LMs: the Llama family (Llama, Qwen2, Qwen3, Mistral) and GPT-2.

Stages: token embedding (GPT-2: plus position embedding and dropout), one per decoder layer, and
the head (final norm, LM head, shifted cross-entropy). Full-vocabulary logits live only inside
the head stage: they are recomputed from the last hidden state, never recorded.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Batch, Context, Stage, causal_lm_loss, model_dtype, padding_causal_mask


class _TokenEmbedding(nn.Module):
    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, hidden, context):
        return self.embed_tokens(context["batch"]["input_ids"])


class _LlamaLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, context):
        out = self.layer(
            hidden,
            attention_mask=context["attention_mask"],
            position_ids=context["position_ids"],
            position_embeddings=context["position_embeddings"],
            use_cache=False,
        )
        return out[0] if isinstance(out, tuple) else out


class _LMHead(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden, context):
        return causal_lm_loss(self.lm_head(self.norm(hidden)), context["batch"]["labels"])


class LlamaAdapter(Adapter):
    families = ("llama", "qwen2", "qwen3", "mistral")
    task = "causal_lm"
    batch_fields = ("input_ids", "attention_mask", "labels")

    def build_stages(self):
        inner = self.model.model
        stages = [Stage("embedding", _TokenEmbedding(inner.embed_tokens))]
        stages += [Stage(f"layer.{i}", _LlamaLayer(layer)) for i, layer in enumerate(inner.layers)]
        stages.append(Stage("head", _LMHead(inner.norm, self.model.lm_head)))
        return stages

    def context(self, batch: Batch) -> Context:
        inner = self.model.model
        dtype = model_dtype(self.model)
        ids = batch["input_ids"]
        position_ids = torch.arange(ids.shape[1], device=ids.device)[None, :].expand(ids.shape[0], -1)
        probe = torch.empty(0, dtype=dtype, device=ids.device)
        return {
            "batch": batch,
            "attention_mask": padding_causal_mask(batch["attention_mask"], dtype),
            "position_ids": position_ids,
            "position_embeddings": inner.rotary_emb(probe, position_ids),
        }


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
        out = self.block(hidden, attention_mask=context["attention_mask"], use_cache=False)
        return out[0] if isinstance(out, tuple) else out


class GPT2Adapter(Adapter):
    families = ("gpt2",)
    task = "causal_lm"
    batch_fields = ("input_ids", "attention_mask", "labels")

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
