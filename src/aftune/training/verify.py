"""Block verification by replay: the client's side of aftune (`aftune verify`).

    aftune verify RUN --public-key provider.pub --layer-block 1 --step-block 2
    aftune verify RUN --public-key provider.pub --all

For layer block l and step block s, the verifier (numbers follow SPEC.md 6):
 1. checks the transcript's signatures against the pinned key and its chain;
 2. checks the run config against the signed config digest, and the manifests of s and s+1
    against their signed roots;
 3. loads the block's committed start state (s = 0: checks it is the agreed base model);
 4. rebuilds every batch from the agreed dataset and seeded order and compares it with the
    committed batch;
 5. replays each step: forward from the committed input boundary, compares the output (or loss);
    backward from the committed output gradient, compares the input gradient and any
    tied-weight gradient part; compares per-tensor gradient norms; clips with the committed
    norms of all blocks and applies the optimizer;
 6. compares the end state (weights, buffers, optimizer state) with the commitment of s+1.

Strict mode compares digests (bitwise, for replay on the same kind of hardware); tolerance mode
compares per-tensor relative errors against thresholds (another device or precision).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.datasets import BatchSpec, OrderCache, build_batch
from .engine import BlockedModel
from ..errors import CommitmentMismatch, InputError, RecordError
from .instantiate import base_name, instantiate, is_lora_tensor
from .manifest import StepBlockManifest, common_key
from ..core.merkle import tensors_root
from ..verdict.findings import Finding, BlockResult, Report
from .run import DTYPE_BY_NAME, RunRecord
from ..core.encoding import tensor_digest
from ..core.signing import PublicKey
from ..core.store import TensorRef
from .train import load_tokenizer

MODES = ("strict", "tolerance")
MAX_FINDINGS_PER_CHECK = 8  # per block and kind of check: the first ones locate the cause


TENSOR_KINDS = ("activation", "gradient", "weights", "optimizer")


def tensor_kind(check: str, tensor: str) -> str:
    """The category a compared tensor's threshold comes from."""
    if check in ("output", "loss"):
        return "activation"
    if check in ("input_gradient", "shared_gradient", "grad_norms"):
        return "gradient"
    return "optimizer" if tensor.startswith("optim/") else "weights"


@dataclass(frozen=True)
class Tolerance:
    """Per-tensor thresholds for tolerance mode; `per_kind` overrides them for a tensor kind
    (activation, gradient, weights, optimizer). Calibrate on honest replays (`aftune calibrate`)."""

    rel_l2: float = 1e-3  # ||recomputed - committed|| / ||committed||
    max_elem: float = 1e-2  # max |recomputed - committed| / rms(committed)
    per_kind: tuple[tuple[str, float, float], ...] = ()  # (kind, rel_l2, max_elem)

    def __post_init__(self):
        values = [("rel_l2", self.rel_l2), ("max_elem", self.max_elem)]
        values += [(f"{k}.{n}", v) for k, rel, elem in self.per_kind for n, v in (("rel_l2", rel), ("max_elem", elem))]
        for k, rel, elem in self.per_kind:
            if k not in TENSOR_KINDS:
                raise InputError(f"tolerance: unknown tensor kind {k!r} (kinds: {', '.join(TENSOR_KINDS)})")
        for name, v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0) or v == float("inf"):
                raise InputError(f"tolerance: {name} must be a finite non-negative number, got {v!r}")

    def to_json(self) -> dict:
        return {"format": "aftune.tolerance.v1", "rel_l2": self.rel_l2, "max_elem": self.max_elem,
                "per_kind": {k: {"rel_l2": rel, "max_elem": elem} for k, rel, elem in self.per_kind}}

    @classmethod
    def from_json(cls, obj) -> "Tolerance":
        try:
            if obj.get("format") != "aftune.tolerance.v1":
                raise ValueError("format")
            per_kind = tuple((k, float(v["rel_l2"]), float(v["max_elem"])) for k, v in obj.get("per_kind", {}).items())
            return cls(float(obj["rel_l2"]), float(obj["max_elem"]), per_kind)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise InputError("not an aftune.tolerance.v1 document (write one with `aftune calibrate --out`)") from None

    def limits(self, kind: str) -> tuple[float, float]:
        for k, rel, elem in self.per_kind:
            if k == kind:
                return rel, elem
        return self.rel_l2, self.max_elem


def relative_errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    a, e = actual.detach().double().reshape(-1), expected.detach().double().reshape(-1)
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return float("inf"), float("inf")  # NaN or infinity on either side never matches
    if a.numel() == 0:
        return 0.0, 0.0
    diff = a - e
    norm = float(torch.linalg.vector_norm(e))
    rms = norm / (e.numel() ** 0.5)
    tiny = 1e-30
    rel = float(torch.linalg.vector_norm(diff)) / max(norm, tiny)
    elem = float(diff.abs().max()) / max(rms, tiny)
    if not (math.isfinite(rel) and math.isfinite(elem)):  # overflow in the norms: never a match
        return float("inf"), float("inf")
    return rel, elem


class _StopReplay(Exception):
    """Ends one block's replay after a finding that makes the rest meaningless."""


class _Block:
    """Bookkeeping for one (layer block, step block) replay."""

    def __init__(self, result: BlockResult):
        self.result = result

    def fail(self, **kw) -> None:
        same = sum(1 for f in self.result.findings if f.check == kw.get("check"))
        if same < MAX_FINDINGS_PER_CHECK or kw.get("check") == "end_state":  # ranked and cut after the replay
            self.result.findings.append(Finding(layer_block=self.result.layer_block,
                                                step_block=self.result.step_block, **kw))


class Verifier:
    def __init__(self, run_dir: str | Path | None, public_key: PublicKey | None, mode: str = "strict",
                 tolerance: Tolerance = Tolerance(), replay_dtype: str | None = None,
                 transcript: str | Path | None = None, record=None):
        """Verify a run directory, or any other record source passed as `record` (an audit
        bundle) that offers RunRecord's interface."""
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if replay_dtype is not None and mode == "strict":
            raise InputError("replaying in another dtype cannot be bitwise: use --mode tolerance with --dtype")
        self.record = record if record is not None else RunRecord.open(run_dir, public_key, transcript)
        self.mode, self.tolerance = mode, tolerance
        cfg = self.record.config
        settings = self.record.settings
        if replay_dtype is not None:
            if replay_dtype not in DTYPE_BY_NAME:
                raise InputError(f"--dtype must be one of {', '.join(DTYPE_BY_NAME)}")
            from dataclasses import replace

            settings = replace(settings, dtype=replay_dtype)
        self.settings = settings
        self.replay_dtype = DTYPE_BY_NAME[settings.dtype]
        hf_config = self.record.section("model").get("config")
        if not isinstance(hf_config, dict):
            raise RecordError("run config: model.config must be an object")
        _, self.model, adapter = instantiate(hf_config, settings)
        self._hf_config = hf_config
        # LoRA: the adapters as `settings.seed` initialises them (instantiate seeds PEFT's init),
        # kept before any committed state is loaded over them (6.2 step 3)
        self._lora_init: dict[str, torch.Tensor] | None = None
        if settings.lora is not None and settings.dtype == self.record.settings.dtype:
            self._lora_init = {n: p.detach().clone() for n, p in self.model.named_parameters() if is_lora_tensor(n)}
        self.blocked = BlockedModel(self.model, adapter, settings)
        layout = self.record.section("layout")
        if layout.get("layer_blocks") != [list(r) for r in self.blocked.blocks.ranges] or \
                layout.get("stages") != self.blocked.stage_names:
            raise RecordError("run config: the committed layer-block layout differs from the architecture's")
        self.algorithm = self.record.algorithm
        self._load_data(cfg)
        self._all_norms_cache: dict[tuple[int, int], list[torch.Tensor]] = {}

    # --- inputs the verifier rebuilds itself --------------------------------------------------
    def _load_data(self, cfg) -> None:
        self.dataset = self.record.dataset()
        b = self.record.section("batch")
        try:
            self.spec = BatchSpec(task=b["task"], seq_len=int(b["seq_len"]), image_size=int(b["image_size"]),
                                  image_mean=tuple(b["image_mean"]), image_std=tuple(b["image_std"]),
                                  fields=tuple(b["fields"]))
        except (KeyError, TypeError, ValueError):
            raise RecordError("run config: 'batch' is malformed") from None
        if self.spec.fields != self.blocked.adapter.batch_fields:
            raise RecordError("run config: batch fields differ from the architecture's")
        tokenizer_dir = self.record.tokenizer_dir()
        self.tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
        self.order = OrderCache(self.algorithm, self.settings.seed, self.record.num_examples)
        self.base_digests = self.record.base_digests()

    def check_agreed(self, base_model: str | Path | None = None, data: str | Path | None = None) -> None:
        """Check the run against what the client agreed to, from the client's own copies: the
        base model (its weights digest) and the dataset (its root). Raises CommitmentMismatch."""
        model = self.record.section("model")
        if base_model is not None:
            from ..models import load_pretrained, model_weights

            _, base = load_pretrained(base_model, self.record.settings.attn_implementation,
                                      DTYPE_BY_NAME[self.record.settings.dtype])
            root, _ = tensors_root(self.algorithm, model_weights(base))
            if root.hex() != model.get("base_weights"):
                raise CommitmentMismatch(f"the run did not start from the agreed base model {base_model}: its "
                                         f"weights digest is {root.hex()[:16]}…, the run commits "
                                         f"{str(model.get('base_weights'))[:16]}…")
        if data is not None:
            from ..data.datasets import load_dataset

            dataset = load_dataset(data)
            root = dataset.root(self.algorithm).hex()
            if root != self.record.section("data").get("root"):
                raise CommitmentMismatch(f"the run was not trained on the agreed dataset {data}: its root is "
                                         f"{root[:16]}…, the run commits {str(self.record.section('data').get('root'))[:16]}…")

    def fields_entering(self, block: int) -> list[str]:
        """Batch fields that enter layer block `block`: labels at the head, the attention mask
        everywhere, the inputs at the embedding. Each field is checked where it is used."""
        last = len(self.blocked.blocks) - 1
        out = []
        for f in self.spec.fields:
            if f == "labels":
                used = block == last
            elif f == "attention_mask":
                used = True
            else:
                used = block == 0
            if used:
                out.append(f)
        return out

    def agreed_batch(self, step: int, micro: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        indices = self.order.indices(step * self.settings.grad_accum + micro, self.settings.batch_size)
        return indices, build_batch(self.dataset, indices, self.spec, self.tokenizer)

    # --- comparisons --------------------------------------------------------------------------
    def _compare(self, blk: _Block, ref: TensorRef | None, actual: torch.Tensor, *, check: str, tensor: str,
                 step=None, micro=None, where: str = "") -> None:
        res = blk.result
        if ref is None:
            blk.fail(check=check, tensor=tensor, step=step, micro=micro, reason="no commitment for this tensor in the manifest")
            return
        res.compared += 1
        committed_dtype = next(d for d, n in _DTYPE_NAMES.items() if n == ref.dtype)
        if tuple(actual.shape) != ref.shape:
            blk.fail(check=check, tensor=tensor, step=step, micro=micro,
                     reason=f"shape {list(actual.shape)} recomputed, {list(ref.shape)} committed")
            return
        if self.mode == "strict" or not actual.is_floating_point():
            got = tensor_digest(ref.name, actual.to(committed_dtype), self.algorithm)
            if got != ref.digest:
                error = None
                if check == "end_state" and actual.is_floating_point() and self.record.store.has(ref.digest):
                    error = relative_errors(actual, self.record.store.get(ref, where or tensor))[0]
                blk.fail(check=check, tensor=tensor, step=step, micro=micro, reason=_REASONS.get(check, "mismatch"),
                         expected=ref.digest.hex()[:16] + "…", actual=got.hex()[:16] + "…", error=error)
            return
        committed = self.record.store.get(ref, where or tensor)
        rel, elem = relative_errors(actual, committed)
        res.max_error = max(res.max_error, rel)
        res.max_elem_error = max(res.max_elem_error, elem)
        kind = tensor_kind(check, tensor)
        seen = res.errors_by_kind.setdefault(kind, [0.0, 0.0])
        seen[0], seen[1] = max(seen[0], rel), max(seen[1], elem)
        max_rel, max_elem = self.tolerance.limits(kind)
        if rel > max_rel or elem > max_elem:
            blk.fail(check=check, tensor=tensor, step=step, micro=micro,
                     reason=_REASONS.get(check, "mismatch") + f"; largest element error {elem:.3g} x rms", error=rel)

    def _load(self, ref: TensorRef | None, where: str) -> torch.Tensor:
        if ref is None:
            raise CommitmentMismatch(f"{where}: the replay needs this tensor but it is not committed")
        t = self.record.store.get(ref, where)
        return t.to(self.replay_dtype) if t.is_floating_point() else t

    # --- one block ----------------------------------------------------------------------------
    def verify_block(self, layer_block: int, step_block: int,
                     start_state: dict[str, torch.Tensor] | None = None) -> tuple[BlockResult, dict[str, torch.Tensor]]:
        """Replay (layer_block, step_block). Returns the result and the replayed end state
        (keys as in the manifest), which can start the next step block's replay."""
        nb, ns = len(self.blocked.blocks), self.record.num_step_blocks
        if not 0 <= layer_block < nb:
            raise InputError(f"layer block {layer_block} does not exist: this run has layer blocks 0..{nb - 1}")
        if not 0 <= step_block < ns:
            raise InputError(f"step block {step_block} does not exist: this run has step blocks 0..{ns - 1}")
        t0 = time.perf_counter()
        label = self.blocked.describe(layer_block)
        blk = _Block(BlockResult(layer_block, step_block, label))
        try:
            end_state = self._replay(blk, layer_block, step_block, start_state)
        except CommitmentMismatch as exc:
            blk.fail(check="record", reason=str(exc))
            end_state = {}
        except _StopReplay:
            end_state = {}
        except RuntimeError as exc:  # committed tensors that do not fit the agreed computation
            blk.fail(check="record", reason=f"the committed tensors cannot be replayed with the agreed batch and "
                                            f"model: {str(exc).splitlines()[0][:300]}")
            end_state = {}
        blk.result.seconds = time.perf_counter() - t0
        return blk.result, end_state

    def _state_refs(self, manifest: StepBlockManifest, block: int) -> dict[str, tuple[TensorRef | None, int]]:
        """{key: (committed ref, owner block)} for every state tensor the block's replay uses."""
        refs = {k: (manifest.blocks[block].get(k), block) for k in self.blocked.state_tensors(block)}
        for key, owner in self.blocked.foreign_state_keys(block):
            refs[key] = (manifest.blocks[owner].get(key), owner)
        return refs

    def _replay(self, blk: _Block, l: int, s: int, start_state) -> dict[str, torch.Tensor]:
        threads = self.recorded_threads()
        previous = torch.get_num_threads()
        if threads and self.mode == "strict":
            torch.set_num_threads(threads)
        try:
            return self._replay_block(blk, l, s, start_state)
        finally:
            torch.set_num_threads(previous)

    def recorded_threads(self) -> int | None:
        """The intra-op thread count the provider recorded with (bitwise CPU results depend on it)."""
        env = self.record.config.get("environment")
        n = env.get("torch_threads") if isinstance(env, dict) else None
        return n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 4096 else None

    def _replay_block(self, blk: _Block, l: int, s: int, start_state) -> dict[str, torch.Tensor]:
        bm = self.blocked
        nb = len(bm.blocks)
        last = l == nb - 1
        m_start, m_end = self.record.manifest(s), self.record.manifest(s + 1)
        expected_steps = self.settings.steps_of(s)
        if (m_start.first_step, m_start.num_steps) != (expected_steps.start, len(expected_steps)):
            raise RecordError(f"step block {s} covers steps {m_start.first_step}..+{m_start.num_steps}, "
                              f"the config says {expected_steps.start}..+{len(expected_steps)}")
        extra = sorted(set(m_start.blocks[l]) - set(bm.state_tensors(l)))
        if extra:
            blk.fail(check="record", tensor=extra[0], reason=f"{len(extra)} committed state tensors the architecture does not have")

        # 3. start state
        for key, (ref, owner) in self._state_refs(m_start, l).items():
            if ref is None:
                blk.fail(check="record", tensor=key, reason="state tensor missing from the manifest")
                continue
            t = start_state.get(key) if start_state else None
            if t is None or tensor_digest(ref.name, t, self.algorithm) != ref.digest:
                t = self.record.store.get(ref, f"step block {s}, layer block {owner}")
            if s == 0 and key.startswith("state/"):
                self._check_base(blk, key[len("state/"):], t)
            elif s == 0 and key.startswith("optim/"):
                self._check_empty_optimizer(blk, key, t)
            bm.assign(key, t.to(self.replay_dtype) if t.is_floating_point() else t)

        # 4-5. steps
        for step in expected_steps:
            for m in range(self.settings.grad_accum):
                self._replay_micro(blk, l, s, m_start, step, m, last)
            norms = bm.grad_norms(l)
            key = common_key(step, None, "grad_norms", f"{l:04d}")
            self._compare(blk, m_start.common.get(key), norms, check="grad_norms", tensor=key, step=step)
            all_norms = []
            for b in range(nb):
                k = common_key(step, None, "grad_norms", f"{b:04d}")
                all_norms.append(self.record.store.get(m_start.common[k], k) if k in m_start.common else None)
            if any(n is None for n in all_norms):
                raise CommitmentMismatch(f"step {step}: gradient norms of some layer block are not committed")
            bm.update(l, step, bm.clip(all_norms), include_foreign=True)

        # 6. end state
        end_state = {}
        live = {**bm.state_tensors(l)}
        for name, p, owner in bm.layout[l].foreign:
            live[f"state/{name}"] = (name, p.data)
            for k, (n, t) in bm.state_tensors(owner).items():
                if k.startswith(f"optim/{name}/"):
                    live[k] = (n, t)
        for key, (ref, owner) in self._state_refs(m_end, l).items():
            _, t = live[key]
            self._compare(blk, ref, t, check="end_state", tensor=key, where=f"step block {s + 1}, layer block {owner}")
            end_state[key] = t.detach().clone()
        self._rank_end_state(blk)
        return end_state

    @staticmethod
    def _rank_end_state(blk: _Block) -> None:
        """Largest deviations first: the tensor an attack touched usually stands out."""
        findings = blk.result.findings
        ends = [f for f in findings if f.check == "end_state"]
        ends.sort(key=lambda f: -(f.error if f.error is not None else -1.0))
        findings[:] = [f for f in findings if f.check != "end_state"] + ends[:MAX_FINDINGS_PER_CHECK]

    def _replay_micro(self, blk: _Block, l: int, s: int, manifest: StepBlockManifest, step: int, m: int, last: bool):
        bm = self.blocked
        common = manifest.common
        indices, batch = self.agreed_batch(step, m)
        for field in self.fields_entering(l):
            key = common_key(step, m, "batch", field)
            ref = common.get(key)
            before = len(blk.result.findings)
            self._compare(blk, ref, batch[field], check="batch", tensor=key, step=step, micro=m)
            if len(blk.result.findings) > before:
                f = blk.result.findings[-1]
                blk.result.findings[-1] = Finding(**{**f.__dict__, "reason": f.reason + f"; the agreed examples are {indices}"})
                raise _StopReplay  # later tensors were computed from another batch
        if self.replay_dtype != torch.float32 and "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.replay_dtype)
        ctx = bm.context(batch)
        x_in = None
        if l > 0:
            key = common_key(step, m, "boundary", f"{l:04d}", "activation")
            x_in = self._load(common.get(key), key).requires_grad_(True)
        out, aliases = bm.forward(l, x_in, ctx, step, m)
        if last:
            key = common_key(step, m, "loss")
            self._compare(blk, common.get(key), out.detach().float(), check="loss", tensor=key, step=step, micro=m)
            grad_out = bm.loss_gradient(out)
        else:
            key = common_key(step, m, "boundary", f"{l + 1:04d}", "activation")
            self._compare(blk, common.get(key), out.detach(), check="output", tensor=key, step=step, micro=m)
            gkey = common_key(step, m, "boundary", f"{l + 1:04d}", "gradient")
            grad_out = self._load(common.get(gkey), gkey)
        r = bm.backward(l, out, grad_out, x_in, aliases)
        if l > 0:
            key = common_key(step, m, "boundary", f"{l:04d}", "gradient")
            self._compare(blk, common.get(key), r.input_grad, check="input_gradient", tensor=key, step=step, micro=m)
        for name, part in {**r.owner_parts, **r.alias_parts}.items():
            key = common_key(step, m, "shared", name, f"{l:04d}")
            self._compare(blk, common.get(key), part, check="shared_gradient", tensor=key, step=step, micro=m)
        # tied parameters: accumulate the other blocks' committed parts in the fixed order
        for name, p in bm.layout[l].params:
            if name in r.owner_parts:
                for b in range(len(bm.blocks)):
                    if b != l and any(n == name for n, _, _ in bm.layout[b].foreign):
                        key = common_key(step, m, "shared", name, f"{b:04d}")
                        bm.add_gradient(p, self._load(common.get(key), key))
        for name, p, owner in bm.layout[l].foreign:
            if not p.requires_grad:
                continue
            key = common_key(step, m, "shared", name, f"{owner:04d}")
            bm.add_gradient(p, self._load(common.get(key), key))
            for b in range(len(bm.blocks)):
                if b != owner and any(n == name for n, _, _ in bm.layout[b].foreign):
                    part = r.alias_parts[name] if b == l else self._load(
                        common.get(common_key(step, m, "shared", name, f"{b:04d}")), f"shared {name} {b}")
                    bm.add_gradient(p, part)

    def _check_base(self, blk: _Block, name: str, tensor: torch.Tensor) -> None:
        """Step block 0 must start from the agreed base model, and LoRA adapters from the
        initialisation the agreed seed gives."""
        if is_lora_tensor(name):
            self._check_lora_init(blk, name, tensor)
            return
        bname = base_name(name)
        committed = self.base_digests.get(bname)
        if committed is None:
            blk.fail(check="base_weights", tensor=name, reason="this tensor is not part of the agreed base model")
            return
        blk.result.compared += 1
        if tensor_digest(bname, tensor, self.algorithm) != committed:
            blk.fail(check="base_weights", tensor=name, reason="the starting weights are not the agreed base model's",
                     expected=committed.hex()[:16] + "…", actual=tensor_digest(bname, tensor, self.algorithm).hex()[:16] + "…")

    def _lora_initial(self) -> dict[str, torch.Tensor]:
        """The seed's adapter tensors in the run's dtype (re-instantiated once when the replay
        runs in another dtype, whose random draws differ)."""
        if self._lora_init is None:
            _, fresh, _ = instantiate(self._hf_config, self.record.settings)
            self._lora_init = {n: p.detach().clone() for n, p in fresh.named_parameters() if is_lora_tensor(n)}
        return self._lora_init

    def _check_lora_init(self, blk: _Block, name: str, tensor: torch.Tensor) -> None:
        expected = self._lora_initial().get(name)
        if expected is None:
            blk.fail(check="initial_state", tensor=name, reason="an adapter tensor this LoRA configuration does not create")
            return
        blk.result.compared += 1
        want = tensor_digest(name, expected, self.algorithm)
        got = tensor_digest(name, tensor, self.algorithm)
        if got != want:
            blk.fail(check="initial_state", tensor=name,
                     reason="the starting adapter weights are not the initialisation the agreed seed gives "
                            "(PEFT's default init after torch.manual_seed(settings.seed))",
                     expected=want.hex()[:16] + "…", actual=got.hex()[:16] + "…")

    def _check_empty_optimizer(self, blk: _Block, key: str, tensor: torch.Tensor) -> None:
        """Training starts with an empty optimizer: every slot is zeros at step block 0."""
        blk.result.compared += 1
        nonzero = int(torch.count_nonzero(tensor))
        if nonzero:
            blk.fail(check="initial_state", tensor=key,
                     reason=f"the optimizer state at the start of training must be zeros; {nonzero} of "
                            f"{tensor.numel()} entries are not")

    # --- the final model ----------------------------------------------------------------------
    def check_final_model(self) -> list[Finding]:
        """RUN/model must be the model the run root commits to (and, for full fine-tuning, the
        final state of the last step block)."""
        from ..models import load_pretrained, model_weights

        run = self.record.transcript.run
        ns = self.record.num_step_blocks
        if run is None:
            return [Finding(-1, ns, "record", "the transcript has no signed run root: training did not finish")]
        try:
            _, saved = load_pretrained(self.record.root / "model", self.settings.attn_implementation,
                                       DTYPE_BY_NAME[self.record.settings.dtype])
        except InputError as exc:
            return [Finding(-1, ns, "final_model", str(exc))]
        root, digests = tensors_root(self.algorithm, model_weights(saved))
        if root != run.final_model_digest:
            return [Finding(-1, ns, "final_model", "RUN/model is not the model whose digest the run root signs",
                            expected=run.final_model_digest.hex()[:16] + "…", actual=root.hex()[:16] + "…")]
        if self.settings.lora is not None:
            return []
        final = self.record.manifest(ns)
        committed = {k[len("state/"):]: r for b in final.blocks for k, r in b.items() if k.startswith("state/")}
        out = []
        for name, d in digests.items():
            ref = committed.get(name)
            if ref is None or ref.digest != d:
                out.append(Finding(-1, ns, "final_model", "RUN/model differs from the final committed state", tensor=name))
        return out

    def verify_all(self, on_block: Callable[[BlockResult], None] | None = None) -> Report:
        report = Report(str(self.record.root), self.mode)
        for l in range(len(self.blocked.blocks)):
            state = None
            for s in range(self.record.num_step_blocks):
                result, state = self.verify_block(l, s, state)
                report.results.append(result)
                if on_block:
                    on_block(result)
        report.errors.extend(self.check_final_model())
        return report


from ..core.encoding import DTYPE_NAMES as _DTYPE_NAMES  # noqa: E402

_REASONS = {
    "batch": "the committed batch is not the one the agreed data and order give (swapped batch or edited labels)",
    "output": "the block's recomputed output differs from the committed one",
    "loss": "the recomputed loss differs from the committed one",
    "input_gradient": "the recomputed input gradient differs from the committed one",
    "shared_gradient": "the recomputed tied-weight gradient part differs from the committed one",
    "grad_norms": "the recomputed gradient norms differ from the committed ones",
    "end_state": "replaying the committed steps does not reach the committed end-of-block state",
}
