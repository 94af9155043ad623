"""Inside the trusted process: the proxies that replace the forward of every linear site.

    offloader = Offloader(model, plan, link, arithmetic, slices=..., public_weights=...)
    offloader.offline(site_rows)          # quantize and send exposed weights, secrets, masks
    with offloader.installed():            # module.forward -> proxy, restored on exit
        logits = model(input_ids=...)      # the Hugging Face model's own code runs unchanged

A shielded site's proxy only counts rows and calls the module's own forward, so a model whose
sites are all shielded computes bit for bit what it computes without proxies. An offloaded site:

1. flattens its input to rows [n, d_in] (im2col for a Conv2d);
2. quantizes them (quantize.py), blinds them with one-time masks (blinding.py);
3. sends the operand, receives the worker's claimed product (link.py: both committed);
4. checks it with Freivalds (freivalds.py): any failure raises IntegrityFailure and ends the
   session;
5. unblinds, dequantizes (binary64), adds the shielded parts (the split site's sparse large
   weights, the teeslice slice) and the bias, casts to the model dtype and restores the shape.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .blinding import MaskPool
from .field import Field
from .freivalds import FreivaldsCheck, FreivaldsSpec
from .link import WorkerLink
from .quantize import (QuantizedWeight, QuantSpec, activation_levels, dequantize, product_error_bound,
                       quantize_activation, quantize_weight)
from .strategies import Plan, Site, weight_matrix
from .teeslice import Slice


@dataclass(frozen=True)
class Arithmetic:
    """How offloaded products are computed and checked (committed in the record)."""

    field: Field = dataclasses.field(default_factory=Field)  # Z_p, p = 2^42 - 11
    quant: QuantSpec = dataclasses.field(default_factory=QuantSpec)  # 16-bit weights, activations up to 24 bits
    freivalds: FreivaldsSpec = dataclasses.field(default_factory=FreivaldsSpec)  # k = 2 vectors per layer
    unsafe_reuse_masks: bool = False  # tests only: shows the leak of reused masks
    unsafe_no_blinding: bool = False  # the worker sees quantized activations in clear

    @property
    def blinding(self) -> str:
        return "none (unsafe)" if self.unsafe_no_blinding else ("reused (unsafe)" if self.unsafe_reuse_masks else "one-time")

    def to_json(self) -> dict:
        return {"modulus": self.field.modulus, **self.quant.to_json(), "freivalds_repetitions": self.freivalds.repetitions,
                "blinding": self.blinding}


class Timers(dict):
    """Seconds per phase of the trusted side."""

    @contextmanager
    def time(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


class _SiteState:
    """One site in one session (mutable, never sent)."""

    def __init__(self, site: Site, mode: str, module: nn.Module):
        self.site, self.mode, self.module = site, mode, module
        self.weight: QuantizedWeight | None = None
        self.levels = 0
        self.check: FreivaldsCheck | None = None
        self.masks: MaskPool | None = None
        self.shielded_part: torch.Tensor | None = None  # split: sparse float64 [d_out, d_in]
        self.shielded_elements = 0
        self.slice: Slice | None = None
        self.rows = 0
        self.error_bound = 0.0  # largest per-output dequantization error bound seen
        self.output_max = 0.0  # largest |x W_exposed^T| seen, the scale the bound compares with


def to_rows(site: Site, module: nn.Module, x: torch.Tensor):
    """(rows [n, d_in], restore(y [n, d_out]) -> output shape) for one call of the site."""
    if site.kind in ("linear", "conv1d"):
        lead = x.shape[:-1]
        return x.reshape(-1, x.shape[-1]), lambda y: y.reshape(*lead, y.shape[-1])
    b, _, h, w = x.shape
    kh, kw = module.kernel_size
    cols = nn.functional.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                stride=module.stride)  # [b, c*kh*kw, L], the order of weight.reshape(out, -1)
    ho = (h + 2 * module.padding[0] - module.dilation[0] * (kh - 1) - 1) // module.stride[0] + 1
    wo = (w + 2 * module.padding[1] - module.dilation[1] * (kw - 1) - 1) // module.stride[1] + 1
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return rows, lambda y: y.reshape(b, ho * wo, -1).transpose(1, 2).reshape(b, -1, ho, wo)


class Offloader:
    """The trusted side's execution of every site for one session."""

    def __init__(self, model: nn.Module, plan: Plan, link: WorkerLink | None, arithmetic: Arithmetic, *,
                 slices: dict[str, Slice] | None = None, public_weights: dict[str, torch.Tensor] | None = None,
                 magnitude_fraction: float = 0.01):
        self.model, self.plan, self.link, self.arithmetic = model, plan, link, arithmetic
        modules = dict(model.named_modules())
        self.states = [_SiteState(s, p.mode, modules[s.name]) for s, p in zip(plan.sites, plan.placements, strict=True)]
        self.slices, self.public_weights = slices or {}, public_weights or {}
        self.magnitude_fraction = magnitude_fraction
        self.timers = Timers()
        self.step = 0
        self.tracing = False  # proxies only count rows (offline trace, reference run)

    # --- offline phase ---------------------------------------------------------------------
    def offline(self, site_rows: dict[str, int]) -> None:
        """Quantize and send each exposed weight, draw the Freivalds secrets, precompute masks
        for the rows each site will process."""
        a = self.arithmetic
        for st in self.states:
            if st.mode not in ("offloaded", "split", "slice"):
                continue
            name = st.site.name
            w = weight_matrix(st.module, st.site.kind).detach()
            if st.mode == "slice":
                w, st.slice = self.public_weights[name], self.slices[name]
            elif st.mode == "split":
                w, st.shielded_part, st.shielded_elements = _split_large(w, self.magnitude_fraction)
            st.weight = quantize_weight(w, a.quant, site=name)
            st.levels = activation_levels(st.weight, a.field, a.quant, site=name)
            self.link.send("weight", name, -1, st.weight.q.to(torch.int16))  # |w_q| <= 2^15 - 1: I16 on the wire
            st.check = FreivaldsCheck(a.field, st.weight.q, a.freivalds, site=name)
            st.masks = MaskPool(a.field, st.weight.q, site=name, unsafe_reuse_masks=a.unsafe_reuse_masks,
                                unsafe_no_blinding=a.unsafe_no_blinding)
            st.masks.precompute(site_rows.get(name, 0))

    # --- proxies ---------------------------------------------------------------------------
    @contextmanager
    def installed(self):
        try:
            for st in self.states:
                st.module.forward = self._proxy(st)
            yield self
        finally:
            for st in self.states:
                st.module.__dict__.pop("forward", None)

    def _proxy(self, st: _SiteState):
        original = type(st.module).forward

        def forward(x: torch.Tensor, *args, **kwargs):
            if args or kwargs:
                raise TypeError(f"layer {st.site.name}: unexpected extra arguments to a linear layer")
            st.rows += _row_count(st.site, st.module, x)
            if self.tracing or st.mode in ("shielded", "whole-model"):
                return original(st.module, x)
            return self.run_site(st, x)

        return forward

    def run_site(self, st: _SiteState, x: torch.Tensor) -> torch.Tensor:
        name, step = st.site.name, self.step
        with self.timers.time("quantize"):
            rows, restore = to_rows(st.site, st.module, x)
            x_q, x_scale = quantize_activation(rows, st.levels, site=name, step=step)
        with self.timers.time("blinding"):
            operand, mask_product = st.masks.blind(x_q)
        self.link.send("product", name, step, operand)
        claimed = self.link.receive("result", name, step).tensor("tensor")
        with self.timers.time("freivalds"):
            st.check.verify(operand, claimed, step=step)
        with self.timers.time("blinding"):
            y_int = st.masks.unblind(claimed, mask_product)
        with self.timers.time("quantize"):
            y = dequantize(y_int, x_scale, st.weight.scale)
            st.error_bound = max(st.error_bound, product_error_bound(st.weight, rows, x_scale))
            st.output_max = max(st.output_max, float(y.abs().max()) if y.numel() else 0.0)
        with self.timers.time("shielded"):
            if st.shielded_part is not None:
                y = y + torch.sparse.mm(st.shielded_part, rows.to(torch.float64).T).T
            if st.slice is not None:
                y = y + st.slice.apply(rows)
        bias = getattr(st.module, "bias", None)
        if bias is not None:
            y = y + bias.detach().to(torch.float64)
        return restore(y.to(x.dtype))

    # --- accounting ------------------------------------------------------------------------
    def site_rows(self) -> dict[str, int]:
        return {st.site.name: st.rows for st in self.states}

    def reset_rows(self) -> None:
        for st in self.states:
            st.rows = 0

    def shielded_elements(self) -> dict[str, int]:
        return {st.site.name: st.shielded_elements for st in self.states if st.mode == "split"}

    def slice_ranks(self) -> dict[str, int]:
        return {st.site.name: st.slice.rank for st in self.states if st.slice is not None}

    def error_bounds(self) -> dict[str, float]:
        return {st.site.name: st.error_bound for st in self.states if st.weight is not None}

    def output_max(self) -> dict[str, float]:
        return {st.site.name: st.output_max for st in self.states if st.weight is not None}

    def masks_online(self) -> int:
        return sum(st.masks.rows_online for st in self.states if st.masks is not None)


def _row_count(site: Site, module: nn.Module, x: torch.Tensor) -> int:
    if site.kind == "conv2d":
        h, w = x.shape[-2:]
        kh, kw = module.kernel_size
        ho = (h + 2 * module.padding[0] - module.dilation[0] * (kh - 1) - 1) // module.stride[0] + 1
        wo = (w + 2 * module.padding[1] - module.dilation[1] * (kw - 1) - 1) // module.stride[1] + 1
        return int(x.shape[0]) * ho * wo
    return int(x.numel() // x.shape[-1]) if x.dim() else 0


def _split_large(w: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(exposed weight with its largest-|w| elements zeroed, those elements as a sparse binary64
    matrix, their number): ceil(fraction * numel) elements, ties broken by torch.topk."""
    flat = w.reshape(-1)
    k = max(1, math.ceil(fraction * flat.numel()))
    idx = torch.topk(flat.abs(), k).indices
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[idx] = True
    keep = keep.reshape(w.shape)
    exposed = torch.where(keep, torch.zeros_like(w), w)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is stable
        warnings.simplefilter("ignore", UserWarning)
        shielded = torch.where(keep, w, torch.zeros_like(w)).to(torch.float64).to_sparse_csr()
    return exposed, shielded, k
