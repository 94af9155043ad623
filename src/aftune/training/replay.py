"""The replay of one (layer block, step block) of a run: SPEC.md 6.2 steps 3 to 6.

A layer block that shares a trainable parameter with others (tied input and output embeddings)
is replayed together with its whole tied group (5.2.4): each block of the group runs from its own
committed boundary tensors, and the gradient parts of the shared parameter are recomputed, never
read from the record. Every committed tensor the replay feeds into its own computation (start
state, input boundary, output gradient, gradient norms) is first checked against the shape and
dtype the agreed computation gives it (`models.shapes`): a committed tensor that does not fit is
the provider's fault and a finding; an error the computation still raises afterwards is aftune's
own and propagates (exit 3), never a verdict.

    BlockReplay(verifier, result, layer_block=1, step_block=2).run(start_state=None)
"""

from __future__ import annotations

import torch

from ..core.encoding import DTYPE_BY_NAME, DTYPE_NAMES, tensor_digest
from ..core.rows import TensorRef
from ..core.store import ObjectMissing
from ..errors import CommitmentMismatch, RecordError
from ..models.shapes import TensorSpec
from ..verdict.findings import MAX_FINDINGS_PER_CHECK, BlockResult, Finding
from ..verdict.comparison import STATE_KINDS, relative_errors, state_errors, tensor_kind
from .sharding import rank_gradient_key, reduced_gradient_key
from .manifest import StepBlockManifest, common_key
from .portable import ReplayGrid, log_key

REASONS = {
    "batch": "the committed batch is not the one the agreed data and order give (swapped batch or edited labels)",
    "output": "the block's recomputed output differs from the committed one",
    "loss": "the recomputed loss differs from the committed one",
    "input_gradient": "the recomputed input gradient differs from the committed one",
    "grad_norms": "the recomputed gradient norms differ from the committed ones",
    "end_state": "replaying the committed steps does not reach the committed end-of-block state",
    "rank_gradient": "the rank's recomputed local gradient (the sum over its micro-batches) differs from the one it "
                     "committed",
    "reduced_gradient": "the applied gradient is not the agreed reduction (the rank-order sum) of the ranks' "
                        "gradients",
    "numerics": "logged values that are not the rounding of any value within the cross-hardware bound of the "
                "replay's own (portable numerics: the log may only settle elements near a rounding midpoint)",
}
DRIFT = "the end state drifts from the chain replayed from step block {first}"


class StopReplay(Exception):
    """Ends one block's replay after a finding that makes the rest meaningless."""


class StateNotStored(RecordError):
    """A start-state tensor is committed by digest only (checkpoint interval > 1) and was not
    handed over regenerated: `aftune prepare` makes it, or a chained replay provides it."""


def check_fits(ref: TensorRef | None, want: TensorSpec, key: str) -> TensorRef:
    """The committed tensor `key` must exist and have the shape (and, unless `want.dtype` is
    empty, the dtype) the replay expects."""
    if ref is None:
        raise CommitmentMismatch(f"{key}: the replay needs this tensor but it is not committed")
    if ref.shape != want.shape or (want.dtype and ref.dtype != want.dtype):
        raise CommitmentMismatch(f"{key}: committed {ref.dtype}{list(ref.shape)}, but the agreed computation gives "
                                 f"{want.describe()} here")
    return ref


class BlockReplay:
    """One block's replay, reading the verifier's model, data and record."""

    def __init__(self, verifier, result: BlockResult, layer_block: int, step_block: int, chain=None):
        self.v, self.res, self.l, self.s = verifier, result, layer_block, step_block
        self.bm = verifier.blocked
        self.members = self.bm.tied_group(layer_block)  # replayed together (5.2.4); usually [layer_block]
        self.last_block = len(self.bm.blocks) - 1
        self.run_dtype = DTYPE_NAMES[DTYPE_BY_NAME[verifier.record.settings.dtype]]  # committed floats are in it
        # tolerance mode: the state rule (SPEC.md 6.3) needs each state element's start value and
        # the sum of its per-step changes (U), and the chain (drift.DriftChain, `verify --all`)
        self.track = not verifier.comparison.strict
        self.chain = chain
        self.start_values: dict[str, torch.Tensor] = {}
        self.updates: dict[str, torch.Tensor] = {}
        self._fetched: dict[bytes, torch.Tensor] = {}
        self.grid = None  # portable numerics: the ReplayGrid of the step block being replayed

    # --- comparisons --------------------------------------------------------------------------
    def compare(self, ref: TensorRef | None, actual: torch.Tensor, *, check: str, tensor: str, step=None, micro=None,
                where: str = "") -> None:
        v, res = self.v, self.res
        if ref is None:
            res.fail(check, "no commitment for this tensor in the manifest", tensor=tensor, step=step, micro=micro)
            return
        res.compared += 1
        loadable = not v.comparison.strict or (check == "end_state" and v.record.store.has(ref.digest))
        committed = (lambda: self.fetch(ref, where or tensor, keep=check == "end_state")) if loadable else None
        kind = tensor_kind(check, tensor)
        outcome = v.comparison.compare(ref, actual, committed, v.algorithm, kind, measure_mismatch=check == "end_state")
        if outcome.elem is not None:
            res.observe(kind, outcome.rel, outcome.elem)
        if outcome.matched:
            return
        reason = outcome.reason if outcome.reason.startswith("shape") else REASONS.get(check, "mismatch")
        if outcome.elem is not None:
            reason += f"; {outcome.reason}"
        res.fail(check, reason, capped=check != "end_state", tensor=tensor, step=step, micro=micro,
                 expected=outcome.expected, actual=outcome.actual, error=outcome.rel)

    def fetch(self, ref: TensorRef, where: str, keep: bool = False) -> torch.Tensor:
        """The committed tensor of `ref` (end states: loaded once for both comparisons)."""
        t = self._fetched.get(ref.digest)
        if t is None:
            t = self.v.record.store.get(ref, where)
            if keep:
                self._fetched[ref.digest] = t
        return t

    def state_rule(self, ref: TensorRef | None, key: str, actual: torch.Tensor, where: str) -> None:
        """Tolerance mode: the end-state tensor `key` under the state rule (SPEC.md 6.3), for this
        step block's replay and, in a chained replay, for the chain; each failure is a finding."""
        v, res = self.v, self.res
        kind = tensor_kind("end_state", key)
        if ref is None or kind not in STATE_KINDS or not actual.is_floating_point() or tuple(actual.shape) != ref.shape:
            return  # the comparison itself reported it (missing row, shape), or an integer buffer (bitwise)
        dtype = v.storage_dtype or actual.dtype  # the replay holds the state at the run's dtype
        committed = self.fetch(ref, where, keep=True)
        update = self.updates.get(key)
        scopes = [("block", actual.detach(), update, None)]
        if self.chain is not None and key in self.start_values:
            chained, total = self.chain.advance(self.s, key, self.start_values[key], actual.detach(), update)
            scopes.append(("chain", chained, total, self.chain.first))
        for scope, a, U, first in scopes:
            errors = state_errors(a, committed, U, dtype)
            v.observe_state(scope, kind, errors)
            limits = v.state_limits(scope, kind)
            if limits is None or errors.within(limits):
                continue
            rel = relative_errors(a, committed)[0]
            if first is None:
                why = f"beyond rounding and the replayed updates: {errors.describe(limits)}"
                same = [i for i, f in enumerate(res.findings) if f.check == "end_state" and f.tensor == key]
                if same:  # the relative thresholds failed too: one finding with both reasons
                    f = res.findings[same[-1]]
                    res.findings[same[-1]] = Finding(**{**f.__dict__, "reason": f"{f.reason}; {why}"})
                    continue
                res.fail("end_state", f"{REASONS['end_state']} {why}", capped=False, tensor=key, error=rel)
            else:
                res.fail("end_state", f"{DRIFT.format(first=first)} beyond rounding and the replayed updates: "
                         f"{errors.describe(limits)}", capped=False, tensor=key, error=rel)

    def refuse(self, key: str, indices: list[int]) -> None:
        """Portable numerics: a log entry the replay's own values do not allow."""
        self.res.fail("numerics", f"{REASONS['numerics']}: {len(indices)} element{'s' if len(indices) > 1 else ''}, "
                      f"first at flat index {indices[0]}", tensor=key)

    def load(self, ref: TensorRef, key: str) -> torch.Tensor:
        t = self.v.record.store.get(ref, key)
        return t.to(self.v.replay_dtype) if t.is_floating_point() else t


    # --- the block (and its tied group) ------------------------------------------------------
    def run(self, start_state) -> dict[str, torch.Tensor]:
        v, bm, s = self.v, self.bm, self.s
        m_start, m_end = v.record.manifest(s), v.record.manifest(s + 1)
        expected_steps = v.settings.steps_of(s)
        if (m_start.first_step, m_start.num_steps) != (expected_steps.start, len(expected_steps)):
            raise RecordError(f"step block {s} covers steps {m_start.first_step}..+{m_start.num_steps}, "
                              f"the config says {expected_steps.start}..+{len(expected_steps)}")
        for b in self.members:
            extra = sorted(set(m_start.blocks[b]) - set(bm.state_tensors(b)))
            if extra:
                self.res.fail("record", f"{len(extra)} committed state tensors of layer block {b} the architecture "
                              "does not have", tensor=extra[0])
        for p in bm.model.parameters():  # a replay stopped by a finding may have left gradients behind
            p.grad = None
        self.load_start_state(m_start, start_state)
        if bm.portable:
            self.grid = ReplayGrid(m_start.common, lambda ref, key: v.record.store.get(ref, key), self.refuse)
        for step in expected_steps:
            if bm.world_size == 1:
                for m in range(v.settings.grad_accum):
                    self.replay_micro(m_start, step, m)
            else:
                self.replay_ranks(m_start, step)
            self.update(m_start, step)
        return self.end_state(m_end)

    def state_refs(self, manifest: StepBlockManifest) -> dict:
        """{key: (committed ref, owner block)} of every state tensor the group's replay uses."""
        refs = {}
        for b in self.members:
            refs.update(self.v.state_refs(manifest, b))
        return refs

    def live_state(self) -> dict[str, tuple[str, torch.Tensor]]:
        bm, live = self.bm, {}
        for b in self.members:
            live.update(bm.state_tensors(b))
            for name, p, owner in bm.layout[b].foreign:
                live[f"state/{name}"] = (name, p.data)
                live.update({k: x for k, x in bm.state_tensors(owner).items() if k.startswith(f"optim/{name}/")})
        return live

    def load_start_state(self, m_start: StepBlockManifest, start_state) -> None:
        """3. The committed start state (s = 0: the agreed base model, seeded adapters, empty
        optimizer), or the previous replay's end state where it has the committed digest."""
        v, bm, s = self.v, self.bm, self.s
        live = self.live_state()
        for key, (ref, owner) in self.state_refs(m_start).items():
            if ref is None:
                self.res.fail("record", "state tensor missing from the manifest", tensor=key)
                continue
            # the shape only: adapters may keep another float dtype than the run's, and digests bind it
            check_fits(ref, TensorSpec(tuple(live[key][1].shape), ""), f"step block {s}, layer block {owner}: {key}")
            t = start_state.get(key) if start_state else None
            if t is None or tensor_digest(ref.name, t, v.algorithm) != ref.digest:
                try:
                    t = v.record.store.get(ref, f"step block {s}, layer block {owner}")
                except ObjectMissing:
                    raise StateNotStored(f"{key} ({ref.digest.hex()[:16]}…) of step block {s} is committed by digest "
                                         f"only: run `aftune prepare` for layer block {self.l}, step block {s} "
                                         "first") from None
            if s == 0 and key.startswith("state/"):
                v.initial.check_state(self.res, key[len("state/"):], t)
            elif s == 0 and key.startswith("optim/"):
                v.initial.check_optimizer(self.res, key, t)
            if self.track and t.is_floating_point():
                self.start_values[key] = t.detach().double().clone()
            bm.assign(key, t.to(v.replay_dtype) if t.is_floating_point() else t)

    def replay_micro(self, manifest: StepBlockManifest, step: int, m: int) -> None:
        """4-5. One micro-batch through the block (or its tied group, from the last block down, as
        the writer runs the backward): batch, forward, backward, then the tied parameters' parts
        added in the fixed order."""
        v, bm, common = self.v, self.bm, manifest.common
        indices, batch = v.agreed_batch(step, m)
        entering = {f for b in self.members for f in v.fields_entering(b)}
        for field in [f for f in v.spec.fields if f in entering]:
            key = common_key(step, m, "batch", field)
            before = len(self.res.findings)
            self.compare(common.get(key), batch[field], check="batch", tensor=key, step=step, micro=m)
            if len(self.res.findings) > before:
                f = self.res.findings[-1]
                where = f"; the agreed examples are {indices}"
                if bm.world_size > 1:
                    where += f"; micro-batch {m} runs on rank {m % bm.world_size} of {bm.world_size}"
                self.res.findings[-1] = Finding(**{**f.__dict__, "reason": f.reason + where})
                raise StopReplay  # later tensors were computed from another batch
        outputs = v.shapes.training_outputs(bm.blocks, batch)
        if v.replay_dtype != torch.float32 and "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(v.replay_dtype)
        ctx = bm.context(batch)
        alias_parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for b in reversed(self.members):
            r = self.replay_block(common, b, step, m, ctx, outputs)
            for name, part in r.alias_parts.items():
                alias_parts.setdefault(name, []).append((b, part))
        bm.add_tied_parts(alias_parts)  # v1 records' committed parts (shared/...) are not read

    def replay_ranks(self, manifest: StepBlockManifest, step: int) -> None:
        """Several processes (SPEC.md 5.5): each rank's micro-batches in turn, its local gradient
        compared with its commitment, then the pinned reduction (rank-order sum), compared with
        the committed reduced gradient and applied."""
        bm, common, world = self.bm, manifest.common, self.bm.world_size
        gathered = []
        for r in range(world):
            for m in self.v.settings.micro_batches_of(r):
                self.replay_micro(manifest, step, m)
            grads = bm.take_gradients(self.members)
            for name, g in grads.items():
                self.compare_step_gradient(common, rank_gradient_key(step, r, name), g, "rank_gradient", step, r)
            gathered.append(grads)
        bm.reduce_gradients(gathered, step)
        for b in self.members:
            for name, p in bm.layout[b].trainable:
                self.compare_step_gradient(common, reduced_gradient_key(step, name), p.grad, "reduced_gradient",
                                           step, None)

    def compare_step_gradient(self, common, key: str, g: torch.Tensor, check: str, step: int, rank: int | None) -> None:
        """A rank's or the reduced gradient, against its digest (strict mode only: they are
        committed by digest only; tolerance mode checks them through the norms and the end state)."""
        if not self.v.comparison.strict:
            return
        before = len(self.res.findings)
        self.compare(common.get(key), g, check=check, tensor=key, step=step)
        if rank is not None and len(self.res.findings) > before:
            f = self.res.findings[-1]
            micros = list(self.v.settings.micro_batches_of(rank))
            self.res.findings[-1] = Finding(**{**f.__dict__, "reason": f"rank {rank} of {self.bm.world_size} "
                                               f"(micro-batches {micros}): {f.reason}"})

    def replay_block(self, common, b: int, step: int, m: int, ctx, outputs):
        """Forward from the committed input boundary, compare the output (or loss), backward from
        the committed output gradient, compare the input gradient."""
        bm = self.bm
        x_in = None
        if b > 0:
            key = common_key(step, m, "boundary", f"{b:04d}", "activation")
            x_in = self.load(check_fits(common.get(key), outputs[b - 1], key), key).requires_grad_(True)
        out, aliases = bm.forward(b, x_in, ctx, step, m)
        if b == self.last_block:
            key = common_key(step, m, "loss")
            loss = bm.settle(self.grid, log_key(step, m, "loss"), out.detach())
            self.compare(common.get(key), loss.float(), check="loss", tensor=key, step=step, micro=m)
            grad_out = bm.loss_gradient(out, self.v.loss_weight(step, m))
        else:
            key = common_key(step, m, "boundary", f"{b + 1:04d}", "activation")
            y = bm.settle(self.grid, log_key(step, m, "boundary", f"{b + 1:04d}", "activation"), out.detach())
            self.compare(common.get(key), y, check="output", tensor=key, step=step, micro=m)
            gkey = common_key(step, m, "boundary", f"{b + 1:04d}", "gradient")
            grad_out = self.load(check_fits(common.get(gkey), outputs[b], gkey), gkey)
        r = bm.backward(b, out, grad_out, x_in, aliases)
        if b > 0:
            key = common_key(step, m, "boundary", f"{b:04d}", "gradient")
            grad_in = bm.settle(self.grid, log_key(step, m, "boundary", f"{b:04d}", "gradient"), r.input_grad)
            self.compare(common.get(key), grad_in, check="input_gradient", tensor=key, step=step, micro=m)
        return r

    def update(self, manifest: StepBlockManifest, step: int) -> None:
        """5. Gradient norms (compared), global clipping with every block's committed norms, update."""
        bm = self.bm
        for b in self.members:
            bm.settle_gradients(b, step, self.grid)
        for b in self.members:
            key = common_key(step, None, "grad_norms", f"{b:04d}")
            self.compare(manifest.common.get(key), bm.grad_norms(b, step, self.grid), check="grad_norms", tensor=key,
                         step=step)
        all_norms = []
        for b in range(len(bm.blocks)):
            k = common_key(step, None, "grad_norms", f"{b:04d}")
            want = TensorSpec((len(bm.layout[b].trainable),), "F32")
            all_norms.append(self.v.record.store.get(check_fits(manifest.common.get(k), want, k), k))
        coef = bm.clip(all_norms)
        before = {k: t.detach().clone() for k, (_, t) in self.live_state().items()
                  if t.is_floating_point()} if self.track else {}
        for b in self.members:  # a shared trainable parameter is updated once, by its owner
            bm.update(b, step, coef, self.grid)
        stored = self.v.storage_dtype
        if stored is not None:  # another replay dtype: the state is kept at the run's dtype, as the run stores it
            for b in self.members:
                for _, t in bm.state_tensors(b).values():
                    if t.is_floating_point():
                        t.copy_(t.to(stored))
        if before:  # U of the state rule: the sum of each element's |change| over the replayed steps
            live = self.live_state()
            for key, old in before.items():
                move = (live[key][1].detach().double() - old.double()).abs_()
                self.updates[key] = self.updates[key].add_(move) if key in self.updates else move

    def end_state(self, m_end: StepBlockManifest) -> dict[str, torch.Tensor]:
        """6. The end state, compared with the commitment of the next step block."""
        live = self.live_state()
        end_state = {}
        for key, (ref, owner) in self.state_refs(m_end).items():
            _, t = live[key]
            where = f"step block {self.s + 1}, layer block {owner}"
            self.compare(ref, t, check="end_state", tensor=key, where=where)
            if self.track:
                self.state_rule(ref, key, t, where)
            end_state[key] = self.bm.committed(t.detach()).clone()  # as committed (portable: float32)
        self._fetched.clear()
        self.rank_end_state()
        return end_state

    def rank_end_state(self) -> None:
        """Largest deviations first: the tensor an attack touched usually stands out."""
        findings = self.res.findings
        ends = [f for f in findings if f.check == "end_state"]
        ends.sort(key=lambda f: -(f.error if f.error is not None else -1.0))
        findings[:] = [f for f in findings if f.check != "end_state"] + ends[:MAX_FINDINGS_PER_CHECK]


__all__ = ["BlockReplay", "StopReplay", "check_fits"]
