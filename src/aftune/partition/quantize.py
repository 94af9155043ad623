"""Fixed-point quantization of offloaded products, chosen so that the field product is exact.

    qw = quantize_weight(layer.weight, QuantSpec())          # once per layer (offline)
    levels = activation_levels(qw, field, spec, site="model.layers.0.mlp.up_proj")
    x_q, s_x = quantize_activation(x, levels, site=..., step=3)
    y = dequantize(field.lift(y_mod_p), s_x, qw.scale)        # float64, error <= product_error_bound

Weights: per tensor, `s_w = (2^(b_w - 1) - 1) / max|W|`, `w_q = round_half_even(W * s_w)` in
binary64, so |w_q| <= 2^(b_w - 1) - 1 (b_w <= 16 keeps `Field.matmul_small` exact).
Activations: per tensor (all rows of one product), `s_x = A / max|x|` with the layer's level
budget `A = min(2^(b_x - 1) - 1, floor(((p - 1) / 2) / L))`, `L = max_i sum_j |w_q[i, j]|` (the
largest row L1 norm). Then every true product satisfies |sum_j x_q[j] w_q[i, j]| <= A * L <=
(p - 1) / 2, so its centred representative mod p *is* the integer product: no wrap-around, for
any input, at any width the field allows. A layer whose budget is below 1 is refused.

The scales never leave the trusted side (`s_x` would reveal max|x|).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .field import SMALL_OPERAND_MAX, Field


@dataclass(frozen=True)
class QuantSpec:
    """Bit widths of the fixed-point representation (sign included)."""

    weight_bits: int = 16  # |w_q| <= 2^15 - 1; at most 16 (the exact-GEMM bound of field.matmul_small)
    activation_bits: int = 24  # cap on |x_q|; the field may impose a smaller budget per layer

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.weight_bits, int) or not 2 <= self.weight_bits <= 16:
            problems.append(f"weight_bits must be an integer in [2, 16], got {self.weight_bits!r}")
        if not isinstance(self.activation_bits, int) or not 2 <= self.activation_bits <= 40:
            problems.append(f"activation_bits must be an integer in [2, 40], got {self.activation_bits!r}")
        if problems:
            raise InputError("; ".join(problems))

    @property
    def weight_levels(self) -> int:
        return (1 << (self.weight_bits - 1)) - 1

    @property
    def activation_cap(self) -> int:
        return (1 << (self.activation_bits - 1)) - 1

    def to_json(self) -> dict[str, int]:
        return {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits}


@dataclass(frozen=True)
class QuantizedWeight:
    """An exposed weight matrix [d_out, d_in] in fixed point: W ~= q / scale."""

    q: torch.Tensor  # int64 [d_out, d_in]
    scale: float  # s_w (binary64)
    row_l1_max: int  # L = max_i sum_j |q[i, j]|
    abs_row_l1_max: float  # max_i sum_j |q[i, j]| / s_w, for the error bound


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, *, site: str) -> QuantizedWeight:
    w = weight.detach().to(torch.float64)
    if w.dim() != 2:
        raise InputError(f"layer {site}: expected a 2-D weight, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise InputError(f"layer {site}: the weight holds NaN or infinity and cannot be quantized")
    top = float(w.abs().max()) if w.numel() else 0.0
    scale = spec.weight_levels / top if top > 0 else 1.0
    q = torch.round(w * scale).to(torch.int64)
    if q.numel() and int(q.abs().max()) > SMALL_OPERAND_MAX:  # cannot happen with weight_bits <= 16
        raise InputError(f"layer {site}: quantized weight exceeds {SMALL_OPERAND_MAX}")
    l1 = int(q.abs().sum(dim=1).max()) if q.numel() else 0
    return QuantizedWeight(q=q, scale=scale, row_l1_max=l1, abs_row_l1_max=l1 / scale)


def activation_levels(qw: QuantizedWeight, field: Field, spec: QuantSpec, *, site: str) -> int:
    """The layer's budget A for |x_q| that rules out wrap-around mod p (module docstring)."""
    budget = field.half // max(qw.row_l1_max, 1)
    levels = min(spec.activation_cap, budget)
    if levels < 1:
        raise InputError(f"layer {site}: the field is too small for exact products: the largest row L1 norm "
                         f"of the quantized weight is {qw.row_l1_max} > (p-1)/2 = {field.half}; use a larger "
                         f"modulus or fewer weight bits")
    return levels


def quantize_activation(x: torch.Tensor, levels: int, *, site: str, step: int) -> tuple[torch.Tensor, float]:
    """(x_q int64, s_x) with |x_q| <= levels; x is [rows, d_in]."""
    x64 = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x64).all()):
        raise InputError(f"layer {site}, step {step}: the input holds NaN or infinity; nothing was offloaded")
    top = float(x64.abs().max()) if x64.numel() else 0.0
    scale = levels / top if top > 0 else 1.0
    return torch.round(x64 * scale).to(torch.int64), scale


def dequantize(y: torch.Tensor, x_scale: float, w_scale: float) -> torch.Tensor:
    """Centred integer products back to binary64: y / (s_x * s_w)."""
    return y.to(torch.float64) / (x_scale * w_scale)


def product_error_bound(qw: QuantizedWeight, x: torch.Tensor, x_scale: float) -> float:
    """Largest possible |dequantized - exact| of any output of x @ W_exposed^T, where W_exposed is
    the float weight that was quantized. Per output i of input row x:
    |sum_j (x^_j w^_ij - x_j w_ij)| <= sum_j |w^_ij| / (2 s_x) + sum_j |x_j| / (2 s_w),
    (x^ = x_q / s_x within 1/(2 s_x) of x, w^ = w_q / s_w within 1/(2 s_w) of w); binary64
    dequantization adds a relative 2^-52."""
    x1 = float(x.detach().to(torch.float64).abs().sum(dim=-1).max()) if x.numel() else 0.0
    return qw.abs_row_l1_max / (2 * x_scale) + x1 / (2 * qw.scale)
