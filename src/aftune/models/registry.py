"""The model families aftune can record, replay and serve: one adapter class per layout.

GPT-2, BERT and the image families have their own adapters; every causal LM of transformers'
layer-stack layout (Llama, Qwen, Mistral, Gemma 1/2/3, Phi-3, OLMo 2, ...) shares one, accepted
by a structural check of the family's modules rather than by name (layerstack.py).

    adapter_class("gemma3_text")  ->  LayerStackAdapter
"""

from __future__ import annotations

from ..errors import InputError
from .base import Adapter
from .decoder import GPT2Adapter
from .encoder import BertAdapter
from .layerstack import LayerStackAdapter, layer_stack_problem
from .vision import Dinov2Adapter, ResNetAdapter, ViTAdapter

ADAPTERS: tuple[type[Adapter], ...] = (GPT2Adapter, BertAdapter, ViTAdapter, Dinov2Adapter, ResNetAdapter,
                                       LayerStackAdapter)
IMAGE_FAMILIES = ("vit", "dinov2", "resnet")


def adapter_class(model_type: str) -> type[Adapter]:
    for cls in ADAPTERS:
        if model_type in cls.families:
            return cls
    if not isinstance(model_type, str) or not model_type.isidentifier():
        problem = "it is not a transformers model type"
    else:
        problem = layer_stack_problem(model_type)
        if problem is None:
            return LayerStackAdapter
    known = sorted(f for cls in ADAPTERS for f in cls.families)
    raise InputError(f"model type {str(model_type)[:40]!r} is not supported: {problem}; supported: "
                     f"{', '.join(known)} and causal LMs of transformers' layer-stack layout "
                     f"(llama, qwen2, mistral, gemma3_text, phi3, ...)")


def auto_class_name(model_type: str) -> str:
    """The transformers Auto class that builds this family with the head aftune trains."""
    cls = adapter_class(model_type)
    if cls.task == "causal_lm":
        return "AutoModelForCausalLM"
    if model_type in IMAGE_FAMILIES:
        return "AutoModelForImageClassification"
    return "AutoModelForSequenceClassification"
