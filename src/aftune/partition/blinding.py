"""Slalom blinding: one-time masks hide the offloaded operand from the worker.

    pool = MaskPool(field, w_q, site="model.layers.0.mlp.up_proj")
    pool.precompute(rows=40)            # offline: R uniform on Z_p^{rows x d_in}, U = R W^T mod p
    b, u = pool.blind(x_q)              # online: b = x_q + R mod p is what crosses
    y = pool.unblind(z, u)              # z = b W^T from the worker; y = z - U, centred

For inference only. `b = x_q + r` with `r` uniform on Z_p and used once is uniform on Z_p and
independent of `x_q` (a one-time pad over Z_p), whatever `x_q` is; the product is linear, so
`z - r W^T = x_q W^T`. It does not apply:

- to training, where the backward pass multiplies by the (secret, changing) activations and
  weights: the masks would have to hide both operands of a product (Slalom is inference-only);
- to products of two activations (attention scores and values): both operands are secret;
  these stay on the trusted side;
- to reused masks: `b1 - b2 = x1 - x2 mod p` reveals every difference of inputs.
  `unsafe_reuse_masks=True` does exactly that, for tests that show the leak, and logs a warning.

The precomputation costs one product per mask row, inside the trusted side: Slalom's offline
phase (counted separately by the benchmark). A pool that runs out draws fresh masks online
(counted as `masks_online`) and never reuses one.
"""

from __future__ import annotations

import logging

import torch

from .field import Field

log = logging.getLogger("aftune.partition")


class MaskPool:
    """The one-time masks of one layer for one session, and their products with W_q^T."""

    def __init__(self, field: Field, weight_q: torch.Tensor, *, site: str, unsafe_reuse_masks: bool = False,
                 unsafe_no_blinding: bool = False):
        self.field, self.site = field, site
        self._weight_t = weight_q.T.contiguous().to(torch.float64)  # exact: |w_q| < 2^15
        self.d_in = weight_q.shape[1]
        self.unsafe_reuse_masks, self.unsafe_no_blinding = unsafe_reuse_masks, unsafe_no_blinding
        if unsafe_reuse_masks:
            log.warning("layer %s: UNSAFE: blinding masks are reused; differences of inputs leak", site)
        if unsafe_no_blinding:
            log.warning("layer %s: UNSAFE: no blinding; the worker sees the quantized activations", site)
        self._masks = torch.empty(0, self.d_in, dtype=torch.int64)
        self._products = torch.empty(0, weight_q.shape[0], dtype=torch.int64)
        self._next = 0
        self.rows_online = 0  # rows drawn during the run because the pool ran out

    def precompute(self, rows: int) -> None:
        """Draw `rows` more masks and their products (the offline phase)."""
        if rows <= 0 or self.unsafe_no_blinding:
            return
        r = self.field.uniform((rows, self.d_in))
        u = self.field.matmul_small(r, self._weight_t)
        self._masks = torch.cat([self._masks, r])
        self._products = torch.cat([self._products, u])

    def available(self) -> int:
        return self._masks.shape[0] - self._next

    def _take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.unsafe_reuse_masks:
            if self._masks.shape[0] < n:
                self.precompute(n - self._masks.shape[0])
            return self._masks[:n], self._products[:n]
        if self.available() < n:
            missing = n - self.available()
            self.rows_online += missing
            self.precompute(missing)
        r, u = self._masks[self._next:self._next + n], self._products[self._next:self._next + n]
        self._next += n
        return r, u

    def blind(self, x_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, u): the operand to send, b = x_q + r mod p, and u = r W^T mod p to unblind with."""
        if self.unsafe_no_blinding:
            return self.field.reduce(x_q), None
        r, u = self._take(x_q.shape[0])
        return torch.remainder(x_q + r, self.field.modulus), u

    def unblind(self, z: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """The centred integer product x_q W^T from the worker's z = b W^T mod p."""
        y = z if u is None else torch.remainder(z - u, self.field.modulus)
        return self.field.lift(y)
