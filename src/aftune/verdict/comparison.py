"""How a verifier compares what it recomputed with what was committed (SPEC.md 6.3 and 8.8).

One policy for every verifier (training blocks, inference blocks, audits of either):

- `strict`: the recomputed tensor, in the committed dtype, must hash to the committed digest
  (bitwise: replay on the same kind of hardware as the provider);
- `tolerance`: per-tensor relative errors must stay under finite, positive thresholds, set per
  kind of tensor (replay on another device or in another precision). Integer tensors (batches,
  token ids, labels) are compared bitwise in both modes.

    comparison = Comparison("tolerance", Tolerance(rel_l2=1e-3, max_elem=1e-2))
    outcome = comparison.compare(ref, recomputed, load_committed, algorithm="blake3", kind="activation")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ..core.encoding import DTYPES_BY_NAME, tensor_digest
from ..core.rows import TensorRef
from ..errors import InputError

MODES = ("strict", "tolerance")
TENSOR_KINDS = ("activation", "gradient", "weights", "optimizer")
TOLERANCE_FORMAT = "aftune.tolerance.v2"  # v2 adds `state` (the state rule's limits); v1 is still read
TOLERANCE_FORMATS = ("aftune.tolerance.v1", TOLERANCE_FORMAT)
STATE_KINDS = ("weights", "optimizer")  # the kinds the state rule compares (end states of a training replay)
STATE_SCOPES = ("block", "chain")  # one step block's replay; the chain of step blocks (SPEC.md 6.3)

# Unit roundoff u = 2^-p of each dtype (p: significand bits, the implicit one included).
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24, "float64": 2.0 ** -53}
# Inference defaults in units of u, per dtype (rel_l2, max_elem, logit), for layer blocks of up to
# two layers. Measured on a real trained LLM (SmolLM2-135M-Instruct, outlier activations up to 70x
# rms; tests/test_real_model.py, benchmarks/toploc_compare.py): honest records replayed one
# precision up reach about bfloat16 4u / 5u, float16 6u / 10u, float32 17u / 50u (float32 sums
# of 576 to 1536 products err by about sqrt(n) u; half-precision kernels accumulate in float32
# and err mostly by rounding their outputs). The defaults leave 2x to 3x above those (SPEC.md 8.8).
INFERENCE_UNITS = {
    "bfloat16": (10.0, 32.0, 8.0),  # elem: tiny random models reach 13u (tests/test_inference_tolerance.py)
    "float16": (16.0, 32.0, 8.0),
    "float32": (64.0, 256.0, 128.0),  # elem: tiny random models reach 94u
    "float64": (64.0, 256.0, 128.0),
}
# The same thresholds in absolute terms, for two-layer blocks replayed in the record's precision
# or above (what `Tolerance.for_dtype(dtype)` gives).
INFERENCE_DEFAULTS = {d: tuple(k * UNIT_ROUNDOFF[d] for k in units) for d, units in INFERENCE_UNITS.items()}


# Training defaults in units of u, per run dtype and tensor kind (rel_l2, max_elem), for a replay
# in a more precise dtype (SPEC.md 6.3). The replay holds weights and optimizer state at the
# run's dtype after every update, as the run stores them. Weights and optimizer state err more
# than activations: AdamW divides by sqrt(v), so a gradient element near zero whose sign rounds
# differently moves its weight by up to 2 lr, and that carries through the step block. Measured
# (largest honest errors, B_S = 4 to 8, lr 1e-4 to 1e-2) on the built-in model, tiny Llama and
# Mistral models and SmolLM2-135M (tests/test_training_precision.py, docs/precision.md); the
# defaults leave at least 2x (mostly 4x) above the largest. Not covered: float16 runs (pure
# float16 AdamW underflows, eps = 1e-8 being 0 in float16, and diverges at its first step) and
# architectures with an attention key bias (GPT-2, BERT, Qwen2): its exact gradient is zero, so
# AdamW moves it by normalised rounding noise that no other precision reproduces; such runs need
# thresholds calibrated for them (`aftune calibrate`), and the defaults FAIL them on that tensor.
TRAINING_UNITS = {
    "bfloat16": {"activation": (16.0, 128.0), "gradient": (64.0, 512.0), "optimizer": (192.0, 8192.0),
                 "weights": (8.0, 160.0)},  # optimizer: SmolLM2's second moments differ by 2087 u per element
    "float32": {"activation": (64.0, 1024.0), "gradient": (256.0, 16384.0), "optimizer": (1024.0, 65536.0),
                "weights": (512.0, 16384.0)},  # SmolLM2: gradients 3577 u, second moments 17182 u per element
}
TRAINING_UNITS["float64"] = TRAINING_UNITS["float32"]

# The state rule (SPEC.md 6.3, "State rule"): a replayed weight or optimizer-state element a_i,
# held at the run's dtype, against the committed e_i, measured in units of
#   s_i = ulp(a_i) + U_i
# (ulp: the spacing of the run dtype at |a_i|; U_i: the sum of |per-step change| of the element
# over the replayed steps, the verifier's own, after rounding to the run dtype). An honest replay
# differs from the record only where a rounding went the other way and where an update computed
# from slightly different values differed (at most the update itself: a near-zero Adam gradient
# whose sign rounds differently turns +lr into -lr, 2 U). Per tensor:
#   element = max_i |e_i - a_i| / s_i                         (<= element limit)
#   norm    = ||e - a||_2 / ||s||_2                            (<= norm limit)
#   count   = max(0, #{i: |e_i - a_i| > ROUNDING_LEVEL (ulp(a_i) + u U_i)} - COUNT_SLACK)
#             / max(1, #{i: U_i > 0})                          (<= count limit)
# The chain scope compares the same way the state the verifier carries forward from the first
# replayed step block (each block's own recomputed move added to it), with U summed since then.
ROUNDING_LEVEL = 16.0  # K: an element further off than K (ulp + u U) is counted as beyond rounding
COUNT_SLACK = 8  # elements beyond rounding a tensor may have regardless of its size
# Defaults per run dtype: {scope: {kind: (element, norm in units of u, count)}}. Measured on honest
# runs (the built-in model, tiny Llama and Mistral, lr 1e-3 and 1e-2, B_S 2 to 8, up to 32 steps,
# replayed one precision up; docs/precision.md): weights reach element 7, norm 33 u (bfloat16)
# and 627 u (float32), count 0.075; optimizer state reaches norm 65 u (bfloat16) and 682 u (float32). The
# optimizer's element and count measures are not limited by default (2^30, 1.0): an element
# at or near zero in one replay and a few ulps of the subnormal range in the other is honest
# there (measured up to 1.4e7 x its scale), and Adam ignores it (it divides by sqrt(v) + eps).
STATE_UNITS = {
    "bfloat16": {scope: {"weights": (16.0, 96.0, 0.2), "optimizer": (2.0 ** 30, 192.0, 1.0)}
                 for scope in ("block", "chain")},
    "float32": {scope: {"weights": (16.0, 2048.0, 0.2), "optimizer": (2.0 ** 30, 2048.0, 1.0)}
                for scope in ("block", "chain")},
}
STATE_UNITS["float64"] = STATE_UNITS["float32"]
# significand bits p (the implicit one included) and smallest normal exponent of each float dtype
FLOAT_FORMATS = {torch.bfloat16: (8, -126), torch.float16: (11, -14), torch.float32: (24, -126),
                 torch.float64: (53, -1022)}


def threshold_problem(name: str, value: Any) -> str | None:
    """Why `value` cannot be a threshold (None when it can): thresholds are finite and positive."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0:
        return f"{name} must be a finite positive number, got {value!r}"
    return None


@dataclass(frozen=True)
class Tolerance:
    """Thresholds of tolerance mode. `per_kind` overrides (rel_l2, max_elem) for one kind of
    tensor (activation, gradient, weights, optimizer); `logit` bounds the logit error of a token
    choice, as a fraction of the step's largest |logit| (inference). Calibrate them on honest
    replays (`aftune calibrate`); construction rejects infinite, NaN, zero and negative values."""

    rel_l2: float = 1e-3  # ||recomputed - committed|| / ||committed||
    max_elem: float = 1e-2  # max_i |recomputed_i - committed_i| / magnitude_i (relative_errors)
    per_kind: tuple[tuple[str, float, float], ...] = ()  # (kind, rel_l2, max_elem)
    logit: float = 1e-2  # token choice: allowed logit error / largest |logit| of the step
    # the state rule's limits, (scope, kind, element, norm, count) (state_errors); none given: a
    # training verifier uses the run dtype's defaults (STATE_UNITS)
    state: tuple[tuple[str, str, float, float, float], ...] = ()

    def __post_init__(self):
        problems = [threshold_problem(n, v) for n, v in
                    (("rel_l2", self.rel_l2), ("max_elem", self.max_elem), ("logit", self.logit))]
        for entry in self.per_kind:
            if not isinstance(entry, tuple) or len(entry) != 3:
                problems.append(f"per-kind thresholds are (kind, rel_l2, max_elem), got {entry!r}")
                continue
            kind, rel, elem = entry
            if kind not in TENSOR_KINDS:
                problems.append(f"unknown tensor kind {kind!r} (kinds: {', '.join(TENSOR_KINDS)})")
            problems += [threshold_problem(f"{kind}.rel_l2", rel), threshold_problem(f"{kind}.max_elem", elem)]
        for entry in self.state:
            if not isinstance(entry, tuple) or len(entry) != 5:
                problems.append(f"state limits are (scope, kind, element, norm, count), got {entry!r}")
                continue
            scope, kind, *limits = entry
            if scope not in STATE_SCOPES or kind not in STATE_KINDS:
                problems.append(f"unknown state scope or kind {scope!r}, {kind!r} (scopes: {', '.join(STATE_SCOPES)}; "
                                f"kinds: {', '.join(STATE_KINDS)})")
            problems += [threshold_problem(f"state.{scope}.{kind}.{n}", x)
                         for n, x in zip(("element", "norm", "count"), limits)]
        problems = [p for p in problems if p]
        if problems:
            raise InputError("invalid tolerance: " + "; ".join(problems))

    @classmethod
    def for_dtype(cls, dtype: str, replay_dtype: str | None = None, layers_per_block: int = 2) -> "Tolerance":
        """The inference defaults for a record computed in `dtype` and replayed in `replay_dtype`:
        honest error follows the unit roundoff of the less precise of the two (the record's dtype
        is bound by the model digest, so a provider cannot pick a looser one) and grows with the
        layers of a block (thresholds scale by layers_per_block / 2 beyond two layers)."""
        for name in (dtype, replay_dtype):
            if name is not None and name not in INFERENCE_UNITS:
                raise InputError(f"no default tolerance for dtype {name!r}")
        base = max((dtype, replay_dtype or dtype), key=lambda d: UNIT_ROUNDOFF[d])
        depth = max(1.0, layers_per_block / 2) if isinstance(layers_per_block, int) and layers_per_block > 0 else 1.0
        u = UNIT_ROUNDOFF[base]
        rel, elem, logit = (k * u for k in INFERENCE_UNITS[base])
        return cls(rel * depth, elem * depth, logit=logit)

    @classmethod
    def for_training(cls, dtype: str, replay_dtype: str | None = None) -> "Tolerance":
        """The training defaults for a run in `dtype` (the agreement's, so not the provider's
        choice) replayed in `replay_dtype`: per tensor kind, in units of the unit roundoff of
        the less precise of the two (TRAINING_UNITS)."""
        for name in (dtype, replay_dtype):
            if name is not None and name not in UNIT_ROUNDOFF:
                raise InputError(f"no default tolerance for dtype {name!r}")
        base = max((dtype, replay_dtype or dtype), key=lambda d: UNIT_ROUNDOFF[d])
        if base not in TRAINING_UNITS:
            raise InputError(f"no default training tolerance for {base} runs (pure {base} AdamW diverges, so nothing "
                             "honest was calibrated): give thresholds (--tolerance from aftune calibrate, or --rel-l2 "
                             "and --max-elem)")
        u = UNIT_ROUNDOFF[base]
        per_kind = tuple((k, rel * u, elem * u) for k, (rel, elem) in TRAINING_UNITS[base].items())
        return cls(max(t[1] for t in per_kind), max(t[2] for t in per_kind), per_kind,
                   state=default_state_limits(base))

    def limits(self, kind: str) -> tuple[float, float]:
        for k, rel, elem in self.per_kind:
            if k == kind:
                return rel, elem
        return self.rel_l2, self.max_elem

    def state_limits(self, scope: str, kind: str) -> tuple[float, float, float] | None:
        """(element, norm, count) limits of the state rule for `scope` and `kind`, or None when
        this tolerance gives none for them."""
        for sc, k, element, norm, count in self.state:
            if (sc, k) == (scope, kind):
                return element, norm, count
        return None

    def to_json(self) -> dict[str, Any]:
        state: dict[str, dict[str, dict[str, float]]] = {}
        for scope, kind, element, norm, count in self.state:
            state.setdefault(scope, {})[kind] = {"element": element, "norm": norm, "count": count}
        return {"format": TOLERANCE_FORMAT, "rel_l2": self.rel_l2, "max_elem": self.max_elem, "logit": self.logit,
                "per_kind": {k: {"rel_l2": rel, "max_elem": elem} for k, rel, elem in self.per_kind},
                "state": state}

    @classmethod
    def from_json(cls, obj: Any) -> "Tolerance":
        """An aftune.tolerance.v2 document, or a v1 one (which has no state limits: a training
        verifier then applies the run dtype's defaults to weights and optimizer state)."""
        try:
            if obj.get("format") not in TOLERANCE_FORMATS:
                raise ValueError("format")
            per_kind = tuple((k, float(v["rel_l2"]), float(v["max_elem"])) for k, v in obj.get("per_kind", {}).items())
            state = ()
            if obj["format"] != TOLERANCE_FORMATS[0]:
                state = tuple((scope, kind, float(v["element"]), float(v["norm"]), float(v["count"]))
                              for scope, kinds in obj.get("state", {}).items() for kind, v in kinds.items())
            return cls(float(obj["rel_l2"]), float(obj["max_elem"]), per_kind, float(obj.get("logit", cls.logit)),
                       state)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise InputError(f"not an {TOLERANCE_FORMAT} (or v1) document (write one with `aftune calibrate --out`)"
                             ) from None


def default_state_limits(dtype: str) -> tuple[tuple[str, str, float, float, float], ...]:
    """The state rule's default limits for runs in `dtype` (STATE_UNITS; norms in units of its u),
    or () where there are none (float16)."""
    if dtype not in STATE_UNITS:
        return ()
    u = UNIT_ROUNDOFF[dtype]
    return tuple((scope, kind, element, norm * u, count) for scope, kinds in STATE_UNITS[dtype].items()
                 for kind, (element, norm, count) in kinds.items())


def tensor_kind(check: str, tensor: str) -> str:
    """The kind of tensor a training comparison is about, which picks its thresholds."""
    if check in ("output", "loss"):
        return "activation"
    if check in ("input_gradient", "shared_gradient", "grad_norms"):
        return "gradient"
    return "optimizer" if tensor.startswith("optim/") else "weights"


def rms_rows(t: torch.Tensor) -> torch.Tensor:
    """The root mean square of each row (the last dimension: one position's hidden vector, one
    output channel's weights), broadcast back to every element; a 0- or 1-dimensional tensor is
    one row."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() >= 1 and t.numel() else t.reshape(1, -1)
    rms = rows.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return rms.expand_as(rows).reshape(t.shape)


def relative_errors(actual: torch.Tensor, expected: torch.Tensor,
                    scale: torch.Tensor | None = None) -> tuple[float, float]:
    """(||a - e|| / ||e||, max_i |a_i - e_i| / m_i) in binary64, `actual` being the verifier's
    own recomputation and `expected` the committed tensor. m_i, the magnitude the rounding errors
    of element i follow, is |a_i| plus the rms of its row of a (the recomputation: a committed
    value cannot widen its own bound, and a committed element blown up by a flipped exponent bit
    stands out by orders of magnitude), and, when the block's input `scale` (same shape) is
    given, plus |s_i| and its row's rms: a residual block may cancel a massive input activation,
    whose rounding error stays in the output (SPEC.md 6.3). Infinite when either side holds a NaN
    or an infinity, or when the norms overflow: such tensors never match."""
    a, e = actual.detach().double(), expected.detach().double().reshape(actual.shape)
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return math.inf, math.inf
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a - e).abs()
    magnitude = a.abs() + rms_rows(a)
    if scale is not None and tuple(scale.shape) == tuple(a.shape) and scale.is_floating_point():
        s = scale.detach().double()
        if bool(torch.isfinite(s).all()):
            magnitude = magnitude + s.abs() + rms_rows(s)
    tiny = 1e-30
    rel = float(torch.linalg.vector_norm(diff)) / max(float(torch.linalg.vector_norm(e)), tiny)
    elem = float((diff / magnitude.clamp_min(tiny)).max())
    if not (math.isfinite(rel) and math.isfinite(elem)):
        return math.inf, math.inf
    return rel, elem


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |values| (binary64): 2^(max(floor(log2 |x|), e_min) - p + 1),
    the subnormal spacing at zero and below the normal range."""
    p, emin = FLOAT_FORMATS[dtype]
    magnitude = values.detach().double().abs()
    _, e = torch.frexp(magnitude)
    e = torch.where(magnitude == 0, torch.full_like(e, emin + 1), e)  # frexp(0) has exponent 0
    return torch.ldexp(torch.ones_like(values, dtype=torch.float64), torch.clamp(e - 1, min=emin) - (p - 1))


@dataclass(frozen=True)
class StateErrors:
    """How far a committed state tensor lies from its replay, in the units of the state rule."""

    element: float  # max_i |e_i - a_i| / (ulp(a_i) + U_i)
    norm: float  # ||e - a|| / ||ulp(a) + U||
    count: float  # max(0, beyond - COUNT_SLACK) / max(1, touched)
    beyond: int  # elements off by more than ROUNDING_LEVEL (ulp + u U)
    touched: int  # elements the replay's updates moved (U > 0)
    worst: int  # flat index of the element with the largest `element`
    worst_ulps: float  # |e - a| of that element, in ulps of a
    numel: int = 0

    def within(self, limits: tuple[float, float, float]) -> bool:
        element, norm, count = limits
        return self.element <= element and self.norm <= norm and self.count <= count

    def describe(self, limits: tuple[float, float, float]) -> str:
        """What exceeds `limits` first, then the other measures."""
        element, norm, count = limits
        parts = [(self.count > count, f"{self.beyond} of {self.numel} elements off by more than "
                  f"{ROUNDING_LEVEL:g} x (ulp + u x their update) ({self.touched} moved by the replay; "
                  f"allowed {COUNT_SLACK} + {count:.3g} x that)"),
                 (self.element > element, f"element {self.worst} off by {self.worst_ulps:.4g} ulps = "
                  f"{self.element:.3g} x (its ulp + its update) (limit {element:.3g})"),
                 (self.norm > norm, f"norm of the difference {self.norm:.3g} x that of (ulp + update) "
                  f"(limit {norm:.3g})")]
        return "; ".join(text for _, text in sorted(parts, key=lambda p: not p[0]))


INFINITE_STATE = StateErrors(math.inf, math.inf, math.inf, 0, 0, 0, math.inf)


def state_errors(actual: torch.Tensor, committed: torch.Tensor, update: torch.Tensor | None,
                 dtype: torch.dtype) -> StateErrors:
    """The state rule's measures (SPEC.md 6.3) of the committed state tensor against the
    verifier's `actual` one, held at the run's `dtype`; `update` is U (None: nothing moved).
    Infinite when either side holds a NaN or an infinity."""
    a, e = actual.detach().double(), committed.detach().double().reshape(actual.shape)
    n = a.numel()
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return replace(INFINITE_STATE, numel=n)
    if n == 0:
        return StateErrors(0.0, 0.0, 0.0, 0, 0, 0, 0.0, 0)
    u_run = 2.0 ** -FLOAT_FORMATS[dtype][0]
    spacing = ulp(a, dtype)
    U = update.detach().double().reshape(a.shape) if update is not None else torch.zeros_like(a)
    diff = (e - a).abs()
    scale = spacing + U
    ratio = diff / scale
    worst = int(ratio.reshape(-1).argmax())
    beyond = int((diff > ROUNDING_LEVEL * (spacing + u_run * U)).sum())
    touched = int((U > 0).sum())
    norm = float(torch.linalg.vector_norm(diff)) / max(float(torch.linalg.vector_norm(scale)), 1e-300)
    return StateErrors(float(ratio.reshape(-1)[worst]), norm if math.isfinite(norm) else math.inf,
                       max(0, beyond - COUNT_SLACK) / max(1, touched), beyond, touched, worst,
                       float(diff.reshape(-1)[worst] / spacing.reshape(-1)[worst]), n)


@dataclass(frozen=True)
class Outcome:
    """The result of one comparison: `matched`, or why not."""

    matched: bool
    reason: str = ""  # what differs, when it is not (or not only) the value: a shape, a digest
    expected: str | None = None  # committed digest prefix (strict mode)
    actual: str | None = None  # recomputed digest prefix (strict mode)
    rel: float | None = None  # relative L2 error (tolerance mode, or measured on a strict mismatch)
    elem: float | None = None  # largest element error / rms (tolerance mode)


def _short(digest: bytes) -> str:
    return digest.hex()[:16] + "…"


class Comparison:
    """strict or tolerance, with the thresholds: the one way every verifier compares tensors."""

    def __init__(self, mode: str = "strict", tolerance: Tolerance | None = None):
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.tolerance = tolerance if tolerance is not None else Tolerance()

    @property
    def strict(self) -> bool:
        return self.mode == "strict"

    def compare(self, ref: TensorRef, actual: torch.Tensor, committed: Callable[[], torch.Tensor] | None,
                algorithm: str, kind: str, measure_mismatch: bool = False,
                scale: torch.Tensor | None = None) -> Outcome:
        """Compare `actual` with the commitment `ref`. `committed()` loads the committed tensor
        (tolerance mode, or `measure_mismatch` in strict mode: the relative error of a strict
        mismatch, to rank findings). Shapes must match exactly in both modes."""
        if tuple(actual.shape) != ref.shape:
            return Outcome(False, f"shape {list(actual.shape)} recomputed, {list(ref.shape)} committed")
        if self.strict or not actual.is_floating_point():
            got = tensor_digest(ref.name, actual.to(DTYPES_BY_NAME[ref.dtype]), algorithm)
            if got == ref.digest:
                return Outcome(True)
            rel = None
            if measure_mismatch and actual.is_floating_point() and committed is not None:
                rel = relative_errors(actual, committed())[0]
            return Outcome(False, expected=_short(ref.digest), actual=_short(got), rel=rel)
        if committed is None:
            raise InputError("tolerance mode needs the committed tensor, which is committed by digest only")
        rel, elem = relative_errors(actual, committed(), scale)
        max_rel, max_elem = self.tolerance.limits(kind)
        matched = rel <= max_rel and elem <= max_elem
        why = (f"relative L2 error {rel:.3g} (limit {max_rel:.3g}), largest element error {elem:.3g} x its "
               f"magnitude (limit {max_elem:.3g})")
        return Outcome(matched, "" if matched else why, rel=rel, elem=elem)


class Verifying:
    """A verifier's `mode` and `tolerance`, read from its `comparison` (training and inference alike)."""

    comparison: Comparison

    @property
    def mode(self) -> str:
        return self.comparison.mode

    @property
    def tolerance(self) -> Tolerance:
        return self.comparison.tolerance
