"""Model families aftune can record and replay, and how to build them from a committed config.

The verifier rebuilds every architecture with its own code from `config.json` (a JSON dict);
nothing a provider wrote is unpickled and no remote code is trusted. Weights are loaded from
safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, MissingExtra
from .base import Adapter, Stage
from .decoder import GPT2Adapter, LlamaAdapter

ADAPTERS: list[type[Adapter]] = [LlamaAdapter, GPT2Adapter]

try:  # encoder and vision families live in their own modules
    from .encoder import BertAdapter

    ADAPTERS.append(BertAdapter)
except ImportError:  # pragma: no cover - module absent in a partial checkout
    pass
try:
    from .vision import Dinov2Adapter, ResNetAdapter, ViTAdapter

    ADAPTERS += [ViTAdapter, Dinov2Adapter, ResNetAdapter]
except ImportError:  # pragma: no cover
    pass

_AUTO_CLASS = {"causal_lm": "AutoModelForCausalLM", "classification": None}
_IMAGE_FAMILIES = ("vit", "dinov2", "resnet")
_NO_ATTENTION = ("resnet",)  # convolutional: transformers rejects an attention implementation


def _attention_kwargs(model_type: str, attn_implementation: str) -> dict[str, str]:
    return {} if model_type in _NO_ATTENTION else {"attn_implementation": attn_implementation}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingExtra("transformers", "hf") from None
    return transformers


def adapter_class(model_type: str) -> type[Adapter]:
    for cls in ADAPTERS:
        if model_type in cls.families:
            return cls
    known = sorted(f for cls in ADAPTERS for f in cls.families)
    raise InputError(f"model type {model_type!r} is not supported; supported: {', '.join(known)}")


def auto_class_name(model_type: str) -> str:
    cls = adapter_class(model_type)
    if cls.task == "causal_lm":
        return "AutoModelForCausalLM"
    if model_type in _IMAGE_FAMILIES:
        return "AutoModelForImageClassification"
    return "AutoModelForSequenceClassification"


def build_model(hf_config: dict[str, Any], attn_implementation: str, dtype: torch.dtype) -> nn.Module:
    """An untrained model of the committed architecture (weights are loaded separately)."""
    transformers = _transformers()
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str):
        raise InputError("model config has no 'model_type'")
    adapter_class(model_type)
    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "transformers_version", "auto_map")}
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"model config is not a valid {model_type} config: {exc}") from None
    auto = getattr(transformers, auto_class_name(model_type))
    with torch.device("cpu"):
        model = auto.from_config(config, dtype=dtype, **_attention_kwargs(model_type, attn_implementation))
    return model


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a Hugging Face model directory, as a dict (checked, never executed)."""
    import json

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise InputError(f"{d} is not a model directory: it has no config.json")
    try:
        hf_config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{d / 'config.json'} is not valid JSON: {exc}") from None
    if not isinstance(hf_config, dict):
        raise InputError(f"{d / 'config.json'} must hold a JSON object")
    return hf_config


def load_pretrained(model_dir: str | Path, attn_implementation: str, dtype: torch.dtype) -> tuple[dict[str, Any], nn.Module]:
    """(config dict, model) from a local directory: safetensors weights only, no remote code.

    Loading goes through `from_pretrained` because checkpoints may store tensors under older
    names that transformers maps to the current module layout."""
    transformers = _transformers()
    d = Path(model_dir)
    hf_config = read_config(d)
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str):
        raise InputError(f"{d / 'config.json'} has no 'model_type'")
    adapter_class(model_type)
    if not any(d.glob("*.safetensors")):
        raise InputError(f"{d} has no *.safetensors weights (aftune never loads pickled .bin weights)")
    auto = getattr(transformers, auto_class_name(model_type))
    try:
        model = auto.from_pretrained(str(d), use_safetensors=True, local_files_only=True, trust_remote_code=False,
                                     dtype=dtype, **_attention_kwargs(model_type, attn_implementation))
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot load the model in {d}: {exc}") from None
    return hf_config, model


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state (parameters and persistent buffers) without tied aliases."""
    aliases = _tied_aliases(model)
    return {k: v for k, v in model.state_dict().items() if k not in aliases}


def _tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names that alias an earlier name (tied weights)."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        else:
            seen[id(p)] = name
    return aliases


__all__ = ["ADAPTERS", "Adapter", "Stage", "adapter_class", "build_model", "load_pretrained", "model_weights",
           "read_config"]
