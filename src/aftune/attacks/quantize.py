"""Fake quantization shared by the Qu-ANTI-zation attacks (seed 004): symmetric signed per-layer
weights, scale (2^(b-1) - 1) / max|w|, round to nearest, straight-through gradient.
Used by aftune.attacks.{bench,serving,quant_serving}; tests: tests/test_attacks*.py.

Only the weights of linear layers are quantized: `nn.Linear`, `nn.Conv2d` and GPT-2's `Conv1D`
(a linear layer with transposed weights), the classifier included; biases, norms and embeddings
stay in float, as in the paper's weight quantizer. Activations are not
quantized here (the paper also quantizes them, asymmetric unsigned; weight-only is enough to
show both attacks and their detection).
"""

from __future__ import annotations

import torch
from torch import nn


def linear_layer_types() -> tuple[type[nn.Module], ...]:
    """The module types whose weights are quantized: Linear, Conv2d, and transformers' Conv1D."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return nn.Linear, nn.Conv2d
    return nn.Linear, nn.Conv2d, Conv1D


def quantizable_names(model: nn.Module) -> list[str]:
    """Parameter names of the weights a per-layer weight quantizer rounds. A head tied to the
    input embedding (GPT-2's `lm_head`) is the embedding under another name and stays in float,
    as embeddings do."""
    types = linear_layer_types()
    own = dict(model.named_parameters())  # tied parameters appear once, under their first name
    names = (f"{name}.weight" if name else "weight" for name, mod in model.named_modules() if isinstance(mod, types))
    return [n for n in names if n in own]


def round_to_grid(w: torch.Tensor, bits: int) -> torch.Tensor:
    """`w` rounded to its `bits`-bit symmetric grid: round(w * scale) / scale, scale =
    (2^(bits-1) - 1) / max|w| (what a quantized deployment computes with)."""
    levels = 2 ** (bits - 1) - 1
    scale = levels / w.abs().max().clamp_min(1e-12)
    return torch.clamp(torch.round(w * scale), -levels, levels) / scale


def fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize `w` to `bits` signed bits. Rounding passes the gradient straight
    through; the scale stays in the graph, so an objective can also move max|w| (the layer's
    quantization step)."""
    levels = 2 ** (bits - 1) - 1
    scale = levels / w.abs().max().clamp_min(1e-12)
    z = w * scale
    zq = z + (torch.clamp(torch.round(z), -levels, levels) - z).detach()
    return zq / scale


@torch.no_grad()
def quantize_model_(model: nn.Module, bits: int) -> nn.Module:
    """Round the model's quantizable weights in place (what a quantized deployment computes with),
    in float32 whatever the model's dtype, then back to it."""
    params = dict(model.named_parameters())
    for name in quantizable_names(model):
        w = params[name]
        w.copy_(round_to_grid(w.float(), bits).to(w.dtype))
    return model


def quantized_params(model: nn.Module, bits: int, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """{name: fake-quantized parameter} for torch.func.functional_call (gradients flow straight through)."""
    params = dict(model.named_parameters())
    return {n: fake_quant(params[n], bits) for n in (names if names is not None else quantizable_names(model))}
