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
    config._attn_implementation = attn_implementation
    auto = getattr(transformers, auto_class_name(model_type))
    with torch.device("cpu"):
        model = auto.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model


def read_model_dir(model_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the tensors of every *.safetensors file of a Hugging Face model directory."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise InputError(f"{d} is not a model directory: it has no config.json")
    try:
        hf_config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{d / 'config.json'} is not valid JSON: {exc}") from None
    if not isinstance(hf_config, dict):
        raise InputError(f"{d / 'config.json'} must hold a JSON object")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise InputError(f"{d} has no *.safetensors weights (aftune never loads pickled .bin weights)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(f)
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{f} is not a readable safetensors file: {exc}") from None
        for name, t in part.items():
            if name in tensors:
                raise InputError(f"tensor {name!r} appears in more than one safetensors file of {d}")
            tensors[name] = t
    return hf_config, tensors


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load `tensors` into `model`; every parameter and persistent buffer must be covered, except
    tied aliases, and no unknown tensor may be present."""
    state = model.state_dict()
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise InputError(f"{where}: tensors not in the model: {unknown[:5]}")
    aliases = _tied_aliases(model)
    missing = sorted(k for k in state if k not in tensors and k not in aliases)
    if missing:
        raise InputError(f"{where}: weights missing for {missing[:5]}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(state[name].shape):
            raise InputError(f"{where}: {name} has shape {list(t.shape)}, the model needs {list(state[name].shape)}")
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=False)


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


__all__ = ["ADAPTERS", "Adapter", "Stage", "adapter_class", "build_model", "load_weights", "read_model_dir"]
