"""One adapter for every decoder family of transformers' common layer-stack layout (SPEC.md 5.1.1).

The layout: `model.model.embed_tokens`, `model.model.layers[i](hidden, attention_mask=...,
position_ids=..., position_embeddings=...)`, `model.model.norm`, `model.lm_head`, rotary tables
from `model.model.rotary_emb`. Llama, Mistral, Qwen 2/3, Gemma 1/2/3, Phi-3, OLMo 2, Granite,
StarCoder2, Cohere, SmolLM3, GLM, Helium, EXAONE and many more share it. What differs per family
is read from the model and its config, never from a list of names:

- per layer, full or sliding-window causal attention (`config.layer_types`, else every layer
  slides when the model's forward reads `config.sliding_window` and it is set);
- rotary tables per layer type when the rotary module takes one (Gemma 3);
- an embedding multiplier (Granite) or embedding dropout (StarCoder2); Gemma's sqrt(hidden)
  scaling lives inside its embedding module, and so does nothing here;
- the logits' last transforms: a scale (Cohere), a divisor (Granite), tanh soft-capping (Gemma 2/3).

`layer_stack_problem(model_type)` checks a family's structure on a meta-device instance (no
weights): the modules above exist, its forwards touch nothing else, and every layer type is one
this adapter masks. A family that fails is refused with a message naming what differs.

    adapter_class("gemma3_text")  ->  LayerStackAdapter
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
from torch import nn

from ..errors import InputError
from .base import Batch, Context, Stage, model_dtype, padding_causal_mask
from .decoder import _DecoderAdapter, _first, _LMHead

LAYER_TYPES = ("full_attention", "sliding_attention")
# what the forwards of the inner model and of the causal-LM class may touch, each handled here
_INNER_ATTRIBUTES = {"config", "embed_tokens", "layers", "norm", "rotary_emb", "embedding_multiplier",
                     "has_sliding_layers", "embedding_dropout", "training", "gradient_checkpointing"}
_OUTER_ATTRIBUTES = {"config", "lm_head", "loss_function", "model", "vocab_size", "logit_scale"}
_CONFIG_FIELDS = {"num_hidden_layers", "vocab_size", "layer_types", "sliding_window", "use_bidirectional_attention",
                  "final_logit_softcapping", "logits_scaling", "use_cache", "pad_token_id"}
# the one form in which each logit transform may appear in the causal-LM forward
_LOGIT_FORMS = {"logits_scaling": r"logits = logits / self\.config\.logits_scaling",
                "logit_scale": r"logits = logits \* self\.logit_scale",
                "final_logit_softcapping": r"logits = logits / self\.config\.final_logit_softcapping\s+"
                                           r"logits = torch\.tanh\(logits\)\s+"
                                           r"logits = logits \* self\.config\.final_logit_softcapping"}


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _meta_model(model_type: str):
    """The family's causal-LM model built on the meta device from its default config (no weights)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    config = transformers.AutoConfig.for_model(model_type)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


@functools.lru_cache(maxsize=None)
def layer_stack_problem(model_type: str) -> str | None:
    """None when `model_type` is a transformers causal LM of the layer-stack layout; otherwise
    what differs from it, in words."""
    try:
        model = _meta_model(model_type)
    except Exception as exc:  # noqa: BLE001 - any failure to build means "not this layout"
        return f"transformers cannot build it ({type(exc).__name__})"
    if model is None:
        return "transformers has no causal-LM class for it"
    return structure_problem(model)


def structure_problem(model: nn.Module) -> str | None:
    """What keeps this (possibly meta-device) causal LM from the layer-stack layout, or None."""
    inner = getattr(model, "model", None)
    missing = [f"model.{a}" for a in ("embed_tokens", "layers", "norm", "rotary_emb")
               if not isinstance(getattr(inner, a, None), nn.Module)]
    if not isinstance(getattr(model, "lm_head", None), nn.Module):  # a Linear, or LoRA's wrapper of one
        missing.append("lm_head")
    if missing:
        return f"it has no {', '.join(missing)}"
    if not isinstance(inner.embed_tokens, nn.Embedding) or not isinstance(inner.layers, nn.ModuleList):
        return "its embed_tokens is not an Embedding or its layers not a ModuleList"
    for i, layer in enumerate(inner.layers):
        params = inspect.signature(layer.forward).parameters
        absent = [p for p in ("attention_mask", "position_embeddings") if p not in params]
        if absent:
            return f"its layer {i} takes no {', '.join(absent)}"
    inner_src, outer_src = _source(type(inner).forward), _source(type(model).forward)
    extra = sorted(set(re.findall(r"self\.(\w+)", inner_src)) - _INNER_ATTRIBUTES)
    extra += sorted(set(re.findall(r"self\.(\w+)", outer_src)) - _OUTER_ATTRIBUTES)
    fields = set(re.findall(r"self\.config\.(\w+)", inner_src + outer_src))
    extra += sorted(f"config.{f}" for f in fields - _CONFIG_FIELDS)
    if extra:
        return f"its forward also uses {', '.join(extra[:6])}"
    for name, form in _LOGIT_FORMS.items():
        if re.search(rf"\b{name}\b", outer_src) and not re.search(form, outer_src):
            return f"its head applies {name} in another form"
    config = model.config
    if getattr(config, "use_bidirectional_attention", False):
        return "its attention is bidirectional (use_bidirectional_attention)"
    types = getattr(config, "layer_types", None)
    if types is not None:
        odd = sorted({str(t) for t in types} - set(LAYER_TYPES))
        if odd:
            return f"its layer types include {', '.join(odd)} (handled: {', '.join(LAYER_TYPES)})"
        if len(types) < len(inner.layers):
            return "config.layer_types is shorter than its layer stack"
    return None


def layer_windows(model: nn.Module) -> list[int | None]:
    """Per decoder layer, its sliding attention window (None: full causal attention)."""
    config, n = model.config, len(model.model.layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [int(window) if types[i] == "sliding_attention" and window else None for i in range(n)]
    slides = "config.sliding_window" in _source(type(model.model).forward) and window
    return [int(window) if slides else None] * n


def window_mask(attention_mask: torch.Tensor, dtype: torch.dtype, window: int | None) -> torch.Tensor:
    """Additive [B, 1, T, T] mask: query i attends key j iff j <= i, i - j < window (when one is
    set) and key j is not padding (SPEC.md 5.1.1)."""
    mask = padding_causal_mask(attention_mask, dtype)
    if window is None:
        return mask
    t = attention_mask.shape[1]
    pos = torch.arange(t, device=attention_mask.device)
    too_far = (pos[:, None] - pos[None, :]) >= window
    return mask.masked_fill(too_far[None, None], torch.finfo(dtype).min)


def step_mask(first: int, q: int, window: int | None, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive [1, 1, q, first + q] mask of a serving step at positions first..first+q-1."""
    positions = torch.arange(first, first + q, device=device)[:, None]
    keys = torch.arange(first + q, device=device)[None, :]
    allowed = keys <= positions
    if window is not None:
        allowed = allowed & (positions - keys < window)
    mask = torch.zeros(1, 1, q, first + q, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[None, None], torch.finfo(dtype).min)


class _StackEmbedding(nn.Module):
    """Token embedding (Gemma's scaling is inside its embedding module), then the family's
    multiplier (Granite) or dropout (StarCoder2)."""

    def __init__(self, embed_tokens: nn.Module, multiplier: float | None, dropout: float):
        super().__init__()
        self.embed_tokens, self.multiplier, self.dropout = embed_tokens, multiplier, dropout

    def forward(self, hidden, context):
        h = self.embed_tokens(context["batch"]["input_ids"])
        if self.multiplier is not None:
            h = h * self.multiplier
        if self.dropout:
            # in the model's mode (this wrapper is outside its module tree): off when serving
            h = nn.functional.dropout(h, p=self.dropout, training=self.embed_tokens.training)
        return h


class _StackLayer(nn.Module):
    """One decoder layer with the mask and rotary tables of its attention type."""

    def __init__(self, layer: nn.Module, window: int | None, rope_key: str):
        super().__init__()
        self.layer, self.window, self.rope_key = layer, window, rope_key
        params = inspect.signature(layer.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def forward(self, hidden, context):
        cache = context.get("cache")
        kwargs = {"use_cache": False} if cache is None else {self.cache_kwarg: cache, "use_cache": True}
        return _first(self.layer(hidden, attention_mask=context["attention_masks"][self.window],
                                 position_ids=context["position_ids"],
                                 position_embeddings=context["position_embeddings"][self.rope_key], **kwargs))


class _StackHead(_LMHead):
    """Final norm, LM head, then the family's logit transforms in the order its forward applies them."""

    def __init__(self, norm, lm_head, scale: float | None, divisor: float | None, softcap: float | None):
        super().__init__(norm, lm_head)
        self.scale, self.divisor, self.softcap = scale, divisor, softcap

    def logits(self, hidden):
        logits = self.lm_head(self.norm(hidden))
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class LayerStackAdapter(_DecoderAdapter):
    """Any causal LM whose structure passes `structure_problem` (see the module docstring)."""

    families = ()  # not a list: `accepts` checks the structure

    @classmethod
    def accepts(cls, model_type: str) -> bool:
        return layer_stack_problem(model_type) is None

    def __init__(self, model: nn.Module):
        problem = structure_problem(model)
        if problem is not None:
            raise InputError(f"model type {model.config.model_type!r} is not of the layer-stack layout: {problem}")
        config = model.config
        softcap = getattr(config, "attn_logit_softcapping", None)
        if softcap is not None and getattr(config, "_attn_implementation", "eager") != "eager":
            raise InputError(f"{config.model_type} soft-caps its attention logits, which only eager attention "
                             f"computes: agree and train with attn_implementation 'eager'")
        super().__init__(model)
        self.windows = layer_windows(model)
        rotary = model.model.rotary_emb
        types = getattr(config, "layer_types", None)
        self.rope_by_type = types is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        self.rope_keys = [types[i] if self.rope_by_type else "all" for i in range(len(self.windows))]

    def build_stages(self):
        inner, config = self.model.model, self.model.config
        multiplier = getattr(inner, "embedding_multiplier", None)
        dropout = float(getattr(inner, "embedding_dropout", 0.0) or 0.0)
        stages = [Stage("embedding", _StackEmbedding(inner.embed_tokens, multiplier, dropout))]
        stages += [Stage(f"layer.{i}", _StackLayer(layer, self.windows[i], self.rope_keys[i]))
                   for i, layer in enumerate(inner.layers)]
        outer = _source(type(self.model).forward)
        scale = float(self.model.logit_scale) if "self.logit_scale" in outer else None
        divisor = float(config.logits_scaling) if "config.logits_scaling" in outer else None
        softcap = getattr(config, "final_logit_softcapping", None) if "final_logit_softcapping" in outer else None
        stages.append(Stage("head", _StackHead(inner.norm, self.model.lm_head, scale, divisor,
                                               None if softcap is None else float(softcap))))
        return stages

    def rotary_embeddings(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        probe = torch.empty(0, dtype=dtype, device=positions.device)
        rotary = self.model.model.rotary_emb
        if self.rope_by_type:
            return {t: rotary(probe, positions, t) for t in sorted(set(self.rope_keys))}
        return {"all": rotary(probe, positions)}

    def context(self, batch: Batch) -> Context:
        dtype = model_dtype(self.model)
        ids = batch["input_ids"]
        position_ids = torch.arange(ids.shape[1], device=ids.device)[None, :].expand(ids.shape[0], -1)
        return {
            "batch": batch,
            "attention_masks": {w: window_mask(batch["attention_mask"], dtype, w) for w in set(self.windows)},
            "position_ids": position_ids,
            "position_embeddings": self.rotary_embeddings(position_ids, dtype),
        }

    def inference_context(self, first: int, inputs: Batch) -> Context:
        """As the base class, with one mask per attention window: a layer whose window covers
        every position so far (first + q <= window) masks as a full layer."""
        dtype = model_dtype(self.model)
        ids = inputs["input_ids"]
        q = ids.shape[1]
        positions = torch.arange(first, first + q, dtype=torch.int64, device=ids.device)[None, :]
        sdpa = getattr(self.model.config, "_attn_implementation", None) == "sdpa"
        masks = {}
        for w in set(self.windows):
            effective = w if w is not None and first + q > w else None
            if effective is None and q > 1 and first == 0 and sdpa:
                masks[w] = None  # SDPA's own causal mode
            elif effective is None and q == 1:
                masks[w] = None  # one query attends every cached position
            else:
                masks[w] = step_mask(first, q, effective, dtype, ids.device)
        return {"batch": {"input_ids": ids}, "position_ids": positions, "attention_masks": masks, "cache": None,
                "position_embeddings": self.rotary_embeddings(positions, dtype)}

    # --- batched serving (SPEC.md 8.5.1) ---------------------------------------------------------
    def batch_context(self, step: int, ids: torch.Tensor, prompt_lengths: list[int], length: int) -> Context:
        """Side inputs of step `step` of a batch of rows left-padded to `length` prompt slots: row
        i's prompt (`prompt_lengths[i]` tokens) fills slots `length - P_i .. length - 1` at
        positions 0..P_i-1; step k >= 1 runs slot `length + k - 1` at position `P_i + k - 1`. A
        query attends the row's own prompt and generated slots up to itself, and a padding slot
        only itself. Derived from the shape and the row's own prompt length alone."""
        if any(w is not None for w in self.windows):
            raise InputError("batched serving of a model with sliding-window attention is not supported")
        dtype = model_dtype(self.model)
        device = ids.device
        b, q = ids.shape
        lengths = torch.tensor(prompt_lengths, dtype=torch.int64, device=device)[:, None]  # [B, 1]
        starts = length - lengths  # first real slot of each row
        first = 0 if step == 0 else length + step - 1
        slots = torch.arange(first, first + q, dtype=torch.int64, device=device)[None, :]  # query slots [1, q]
        positions = (slots - starts).clamp(min=0) if step == 0 else lengths + (step - 1)
        keys = torch.arange(first + q, dtype=torch.int64, device=device)
        allowed = (keys[None, None, :] >= starts[:, :, None]) & (keys[None, None, :] <= slots[:, :, None])
        allowed = allowed | (keys[None, None, :] == slots[:, :, None])  # [B, q, keys]
        mask = torch.zeros(b, 1, q, first + q, dtype=dtype, device=device)
        mask = mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
        return {"batch": {"input_ids": ids}, "position_ids": positions, "attention_masks": {None: mask},
                "cache": None, "position_embeddings": self.rotary_embeddings(positions, dtype)}
