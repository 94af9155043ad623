"""Build the model to train or replay from a committed config: architecture, dtype, LoRA.

The provider and the verifier call the same function, so both run the same module structure.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .settings import TrainSettings
from ..errors import InputError, MissingExtra
from ..models import Adapter, adapter_class, build_model
from ..core.encoding import DTYPE_BY_NAME

CLASSIFIER_PREFIXES = ("classifier.", "score.")


def instantiate(hf_config: dict[str, Any], settings: TrainSettings,
                model: nn.Module | None = None) -> tuple[nn.Module, nn.Module, Adapter]:
    """(root module, underlying HF model, adapter). The root is the PEFT wrapper under LoRA.
    Without `model`, the architecture is built from `hf_config` with untrained weights."""
    if model is None:
        model = build_model(hf_config, settings.attn_implementation, DTYPE_BY_NAME[settings.dtype])
    root = model
    if settings.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise MissingExtra("peft", "hf") from None
        lora = settings.lora
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                         target_modules=list(lora.target_modules) or None)
        torch.manual_seed(settings.seed)
        try:
            root = get_peft_model(model, cfg)
        except ValueError as exc:
            raise InputError(f"LoRA cannot wrap this model: {exc} (pass --lora-targets)") from None
        model = root.get_base_model()
        if adapter_class(hf_config["model_type"]).task == "classification":
            for name, p in model.named_parameters():  # a new task head must train too
                if name.startswith(CLASSIFIER_PREFIXES):
                    p.requires_grad_(True)
    if settings.numerics == "portable":  # float64 compute over float32 values (training/portable.py)
        if settings.lora is not None:
            from .portable import lora_init

            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".lora_A." in name:
                        p.copy_(lora_init(settings.hash_algorithm, settings.seed, name, tuple(p.shape)))
        root.to(torch.float64)
    adapter = adapter_class(hf_config["model_type"])(model)
    model.train()
    return root, model, adapter


def base_name(name: str) -> str:
    """The base model's name for a parameter of a LoRA-wrapped model."""
    return name.replace(".base_layer.", ".")


def is_lora_tensor(name: str) -> bool:
    return ".lora_" in name
