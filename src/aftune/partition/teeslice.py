"""TEESlice for a fine-tuned model: the public backbone offloaded, the private slices shielded.

    slices, changed = backbone_slices(model, backbone, sites, tolerance=1e-6)

TEESlice (Zhang et al.) partitions *before* training: a public pre-trained backbone is kept
frozen and small private slices are trained next to it; at inference the backbone runs on the
GPU and the slices in the TEE, which adds their outputs. For inference of a given model that
was fine-tuned from a public backbone (aftune's LoRA runs: base model + adapters, merged into
RUN/model), the same split exists after the fact, and this module recovers it:

- a linear site whose weight equals the backbone's bit for bit is public: offloaded as is;
- a site whose weight differs is split into the backbone's weight W_b (public, offloaded,
  blinded and checked like any other) and the private slice D = W - W_b, factored by SVD as
  D ~= U_r (S_r V_r^T) keeping the singular values above `tolerance * sigma_max(W)`; the trusted
  process adds x V_r S_r U_r^T. A merged rank-r LoRA update has rank r plus float rounding, so
  the slice costs r (d_in + d_out) multiply-adds per row instead of d_in d_out. Dropping the
  singular values below the cut changes each output row by at most sigma_{r+1} ||x||_2
  (reported as `residual`).
- every other parameter that differs from the backbone (norms, embeddings, biases, the head)
  is used only inside the trusted process, like every non-linear operation.

Not implemented: the training side of TEESlice (training slices, its pruning of slice sizes);
a model without its backbone cannot be sliced (`make_plan` refuses teeslice without one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from .strategies import Site, weight_matrix


@dataclass(frozen=True)
class Slice:
    """The private part of one site: D ~= up @ down, up [d_out, r], down [r, d_in]."""

    site: str
    up: torch.Tensor
    down: torch.Tensor
    residual: float  # sigma_{r+1} of D: the largest singular value left out (0 if none)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ D^T in binary64 for x [rows, d_in]."""
        return (x.to(torch.float64) @ self.down.T) @ self.up.T


def make_slice(site: str, delta: torch.Tensor, reference_norm: float, tolerance: float) -> Slice:
    d = delta.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    keep = int((s > tolerance * reference_norm).sum())
    residual = float(s[keep]) if keep < s.numel() else 0.0
    return Slice(site, up=u[:, :keep].contiguous(), down=(s[:keep, None] * vh[:keep]).contiguous(), residual=residual)


def backbone_slices(model: nn.Module, backbone: nn.Module, sites: list[Site], *,
                    tolerance: float) -> tuple[dict[str, Slice], dict[str, torch.Tensor]]:
    """(slices by site, backbone weight matrices by site) for the sites whose weight differs
    from the backbone's; raises if the two models do not have the same parameters."""
    mine = dict(model.named_parameters())
    theirs = dict(backbone.named_parameters())
    if set(mine) != set(theirs):
        extra = sorted(set(mine) ^ set(theirs))[:4]
        raise InputError(f"the public backbone has other parameters than the model (e.g. {extra}): "
                         "it is not the model this one was fine-tuned from")
    for name, p in mine.items():
        if p.shape != theirs[name].shape:
            raise InputError(f"parameter {name}: shape {list(p.shape)} in the model, {list(theirs[name].shape)} "
                             "in the backbone")
    modules, backbone_modules = dict(model.named_modules()), dict(backbone.named_modules())
    slices: dict[str, Slice] = {}
    public: dict[str, torch.Tensor] = {}
    for s in sites:
        w = weight_matrix(modules[s.name], s.kind).detach()
        wb = weight_matrix(backbone_modules[s.name], s.kind).detach()
        if torch.equal(w, wb):
            continue
        norm = float(torch.linalg.matrix_norm(w.to(torch.float64), ord=2))
        slices[s.name] = make_slice(s.name, w.to(torch.float64) - wb.to(torch.float64), norm, tolerance)
        public[s.name] = wb
    return slices, public
