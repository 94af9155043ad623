"""Freivalds' check of an offloaded product, over Z_p with secret random vectors.

    check = FreivaldsCheck(field, w_q, repetitions=2, site="model.layers.0.self_attn.q_proj")
    check.verify(operand, claimed, step=3)   # raises IntegrityFailure, returns None on success

The worker claims `Z = B W_q^T mod p` for the operand `B` it was sent. The trusted side draws,
once per session and layer, a secret `S` uniform on Z_p^{d_out x k} and precomputes
`V = W_q^T S mod p` (offline). Online it checks `Z S == B V (mod p)`, column by column: O(n (d_in
+ d_out) k) instead of the O(n d_in d_out) product.

Bound. If `Z != B W_q^T`, some row e of the error is non-zero; for one column s of S,
`e . s = 0` holds for exactly p^(d_out - 1) of the p^d_out vectors (fix the s_j of a non-zero
e_j: one value of it works), so each column passes with probability exactly 1/p, and all k
independent columns with probability p^-k. A single wrong element e_j misses exactly when
s_j = 0. `S` is reused for the session's later products of that layer: it never leaves the
trusted side, the blinded operands the worker sees are independent of it, and the first detected
error ends the session, so the probability that a session finishes with any wrong product is at
most p^-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .errors import IntegrityFailure
from .field import Field

MAX_REPETITIONS = 1 << 16


@dataclass(frozen=True)
class FreivaldsSpec:
    repetitions: int = 2  # k: independent secret vectors per layer; a wrong product passes w.p. <= p^-k

    def __post_init__(self) -> None:  # the cap only bounds memory: beyond a few, k buys nothing
        if not isinstance(self.repetitions, int) or isinstance(self.repetitions, bool) or \
                not 1 <= self.repetitions <= MAX_REPETITIONS:
            raise InputError(f"Freivalds repetitions must be an integer in [1, {MAX_REPETITIONS}], got {self.repetitions!r}")

    def miss_probability(self, field: Field) -> float:
        """Upper bound on the probability that a wrong product passes: p^-k."""
        return float(field.modulus) ** -self.repetitions


class FreivaldsCheck:
    """The secret vectors of one layer for one session, and the check of each claimed product."""

    def __init__(self, field: Field, weight_q: torch.Tensor, spec: FreivaldsSpec, *, site: str):
        self.field, self.site = field, site
        self.d_out, self.d_in = weight_q.shape
        secret = field.uniform((self.d_out, spec.repetitions))  # S: never leaves the trusted side
        projected = field.matmul_small(secret.T.contiguous(), weight_q).T.contiguous()  # V = W^T S
        self._secret, self._projected = field.limbs(secret), field.limbs(projected)  # kept as binary64 limbs

    def _mismatches(self, operand: torch.Tensor, claimed: torch.Tensor) -> torch.Tensor:
        """[n, k] booleans: row i of `claimed S` differs from row i of `operand V` in column j."""
        return self.field.matmul(claimed, self._secret) != self.field.matmul(operand, self._projected)

    def repetitions_passed(self, operand: torch.Tensor, claimed: torch.Tensor) -> torch.Tensor:
        """[k] booleans: which repetitions (secret vectors) accept `claimed`; `verify` requires all."""
        return ~self._mismatches(operand, claimed).any(dim=0)

    def verify(self, operand: torch.Tensor, claimed: torch.Tensor, *, step: int) -> None:
        """Raise IntegrityFailure unless `claimed` is an int64 [n, d_out] tensor of field
        elements with `claimed S == operand V (mod p)`."""
        n = operand.shape[0]
        if claimed.dtype != torch.int64 or tuple(claimed.shape) != (n, self.d_out):
            raise IntegrityFailure(self.site, step, "shape", f"expected an I64 result of shape [{n}, {self.d_out}], "
                                   f"got {claimed.dtype} {list(claimed.shape)}")
        if not self.field.in_range(claimed):
            raise IntegrityFailure(self.site, step, "range", f"the result holds values outside [0, p), "
                                   f"p = {self.field.modulus}: not field elements")
        bad = torch.nonzero(self._mismatches(operand, claimed))
        if bad.numel():
            row, rep = (int(v) for v in bad[0])
            raise IntegrityFailure(self.site, step, "freivalds",
                                   f"Z s != B (W^T s) mod p for row {row} of {n}, repetition {rep + 1} "
                                   f"({bad.shape[0]} failing row/repetition pairs): the worker's product is wrong")
