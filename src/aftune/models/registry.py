"""The model families aftune can record, replay and serve: one adapter class per family.

    adapter_class("llama")  ->  LlamaAdapter
"""

from __future__ import annotations

from ..errors import InputError
from .base import Adapter
from .decoder import GPT2Adapter, LlamaAdapter
from .encoder import BertAdapter
from .vision import Dinov2Adapter, ResNetAdapter, ViTAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, GPT2Adapter, BertAdapter, ViTAdapter, Dinov2Adapter, ResNetAdapter)
IMAGE_FAMILIES = ("vit", "dinov2", "resnet")


def adapter_class(model_type: str) -> type[Adapter]:
    for cls in ADAPTERS:
        if model_type in cls.families:
            return cls
    known = sorted(f for cls in ADAPTERS for f in cls.families)
    raise InputError(f"model type {str(model_type)[:40]!r} is not supported; supported: {', '.join(known)}")


def auto_class_name(model_type: str) -> str:
    """The transformers Auto class that builds this family with the head aftune trains."""
    cls = adapter_class(model_type)
    if cls.task == "causal_lm":
        return "AutoModelForCausalLM"
    if model_type in IMAGE_FAMILIES:
        return "AutoModelForImageClassification"
    return "AutoModelForSequenceClassification"
