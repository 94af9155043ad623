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
 5. replays each step (`replay.py`): forward from the committed input boundary, compares the
    output (or loss); backward from the committed output gradient, compares the input gradient
    and any tied-weight gradient part; compares per-tensor gradient norms; clips with the
    committed norms of all blocks and applies the optimizer;
 6. compares the end state (weights, buffers, optimizer state) with the commitment of s+1
    (tolerance mode: also under the state rule, in ulps of the run dtype and units of the
    replay's own updates; with --all also the chain of step blocks, `drift.py`).

Comparisons follow the one policy of `verdict.comparison`: strict (bitwise) or tolerance.
A single block's verification (no --all) does not see drift spread over step blocks: each block
is replayed from its own committed start state, which a provider may have moved, by less than
one end-state check allows, at the end of every step block before it (SPEC.md 6.3 "Chain").
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..core.encoding import DTYPE_BY_NAME
from ..core.signing import PublicKey
from ..data import OrderCache, build_batch
from ..data.sft import accumulation_weights
from ..errors import CommitmentMismatch, InputError
from ..models import tokenizer_from_files
from ..models.shapes import shape_oracle
from ..verdict.findings import BlockResult, Finding, Report
from ..verdict.comparison import (MODES, TENSOR_KINDS, UNIT_ROUNDOFF, Comparison, StateErrors, Tolerance,  # noqa: F401
                                  Verifying, default_state_limits, relative_errors, tensor_kind)
from ..verdict.threads import pinned_threads, recorded_threads
from .engine import BlockedModel
from .initial_state import InitialState
from .agreement import Agreement
from .conformance import NO_AGREEMENT_NOTE, agreement_of_run, run_conformance
from .instantiate import base_name, instantiate, is_lora_tensor
from .drift import DriftChain
from .portable import COMPUTE_DTYPE
from .final_model import check_final_model
from .replay import BlockReplay, StateNotStored, StopReplay
from .check import run_check_findings
from .run import RunRecord

__all__ = ["MODES", "TENSOR_KINDS", "Tolerance", "Verifier", "relative_errors", "tensor_kind"]

NEEDS_AGREEMENT = ("no agreement: pass --agreement with the agreement.json you wrote with `aftune agree` (the base "
                   "model, data and settings you agreed to), or --unsafe-no-agreement to check only that the record "
                   "is consistent with itself")


class Verifier(Verifying):
    def __init__(self, run_dir: str | Path | None, public_key: PublicKey | None, agreement: Agreement | None = None, *,
                 unsafe_no_agreement: bool = False, mode: str = "strict", tolerance: Tolerance | None = None,
                 replay_dtype: str | None = None, transcript: str | Path | None = None, record=None):
        """Verify a run directory (or any other record source passed as `record`, such as an audit
        bundle, that offers RunRecord's interface) against the client's `agreement`. Without one,
        only `unsafe_no_agreement=True` proceeds, and then only self-consistency is checked
        (`notes` says so). Tolerance mode without `tolerance` uses the defaults of the agreed
        run dtype and the replay dtype (`Tolerance.for_training`)."""
        self.comparison = Comparison(mode, tolerance if tolerance is not None else Tolerance())
        if replay_dtype is not None and self.comparison.strict:
            raise InputError("replaying in another dtype cannot be bitwise: use --mode tolerance with --dtype")
        if replay_dtype is not None and replay_dtype not in DTYPE_BY_NAME:
            raise InputError(f"--dtype must be one of {', '.join(DTYPE_BY_NAME)}")
        if agreement is None and not unsafe_no_agreement:
            raise InputError(NEEDS_AGREEMENT)
        self.record = record if record is not None else RunRecord.open(run_dir, public_key, transcript)
        self.algorithm = self.record.algorithm
        self.notes: list[str] = []
        if agreement is None:
            agreement = agreement_of_run(self.record)
            self.notes.append(NO_AGREEMENT_NOTE)
        elif agreement.algorithm != self.algorithm:
            raise CommitmentMismatch(f"the run is hashed with {self.algorithm}, the agreement says {agreement.algorithm}")
        self.agreement = agreement
        # from here on every value comes from the agreement (SPEC.md 6.2 step 0)
        self.run_settings = agreement.settings
        self.portable = agreement.settings.numerics == "portable"
        if self.portable and (not self.comparison.strict or replay_dtype is not None):
            raise InputError("a run in portable numerics is verified bitwise on any hardware: use strict mode "
                             "(no --mode tolerance, no --dtype)")
        self.settings = replace(agreement.settings, dtype=replay_dtype) if replay_dtype else agreement.settings
        # portable numerics computes in float64 (training/portable.py) and settles on the run's grid
        self.replay_dtype = COMPUTE_DTYPE if self.portable else DTYPE_BY_NAME[self.settings.dtype]
        # replaying in another dtype computes in it, but holds weights and optimizer state at the
        # run's dtype after every update, as the agreed run stores them (SPEC.md 6.3)
        run_dtype = DTYPE_BY_NAME[self.run_settings.dtype]
        self.storage_dtype = run_dtype if run_dtype != self.replay_dtype and not self.portable else None
        if tolerance is None and not self.comparison.strict:
            self.comparison = Comparison(mode, Tolerance.for_training(self.run_settings.dtype, self.settings.dtype))
        # the state rule's limits (SPEC.md 6.3): the tolerance's, else the defaults of the less
        # precise of the run and replay dtypes; the largest measures seen, per (scope, kind)
        self._state_defaults = Tolerance(state=default_state_limits(
            max((self.run_settings.dtype, self.settings.dtype), key=lambda d: UNIT_ROUNDOFF.get(d, 0.0))))
        self.state_observed: dict[tuple[str, str], list[float]] = {}
        if not self.comparison.strict and not self.comparison.tolerance.state and not self._state_defaults.state:
            self.notes.append(f"no state-rule limits for {self.run_settings.dtype} runs: weights and optimizer state "
                              "are compared with the relative thresholds only (give calibrated ones, aftune calibrate)")
        self._hf_config = agreement.base_config
        _, self.model, adapter = instantiate(self._hf_config, self.settings)
        self.blocked = BlockedModel(self.model, adapter, self.settings)
        self.conformance = run_conformance(self.record.config, agreement, self.layout(),
                                           check_digest=NO_AGREEMENT_NOTE not in self.notes)
        self.shapes = shape_oracle(self._hf_config, self.run_settings.attn_implementation,
                                  DTYPE_BY_NAME[self.run_settings.dtype])
        # LoRA: the adapters as `settings.seed` initialises them (instantiate seeds PEFT's init),
        # kept before any committed state is loaded over them (6.2 step 3)
        self._lora_init: dict[str, torch.Tensor] | None = None
        if self.run_settings.lora is not None and not replay_dtype:
            self._lora_init = {n: p.detach().to(run_dtype).clone() for n, p in self.model.named_parameters()
                               if is_lora_tensor(n)}
        self._check_base_tensors()
        if not self.conformance:
            self._load_data()
        self.initial = InitialState(agreement.base_tensors, self._lora_initial, self.algorithm)

    def state_limits(self, scope: str, kind: str) -> tuple[float, float, float] | None:
        """(element, norm, count) limits of the state rule (SPEC.md 6.3), or None (no rule)."""
        given = self.comparison.tolerance.state_limits(scope, kind)
        return given if given is not None else self._state_defaults.state_limits(scope, kind)

    def observe_state(self, scope: str, kind: str, errors: StateErrors) -> None:
        """Note the state rule's measures of one tensor (for calibration and the margins)."""
        seen = self.state_observed.setdefault((scope, kind), [0.0, 0.0, 0.0])
        for i, x in enumerate((errors.element, errors.norm, errors.count)):
            seen[i] = max(seen[i], x)

    def layout(self) -> tuple[list[str], list[list[int]]]:
        return self.blocked.stage_names, [list(r) for r in self.blocked.blocks.ranges]

    @property
    def num_step_blocks(self) -> int:
        return self.run_settings.num_step_blocks

    def _check_base_tensors(self) -> None:
        """The agreed architecture must have exactly the agreed base tensors: every base tensor is
        trained or frozen by the run, none is dropped (an inconsistent agreement is bad input)."""
        model_names = {base_name(n) for b in range(len(self.blocked.blocks))
                       for n, _ in self.blocked.state_tensors(b).values() if not is_lora_tensor(n) and "/" not in n}
        agreed = set(self.agreement.base_tensors)
        if model_names != agreed:
            missing, extra = sorted(agreed - model_names), sorted(model_names - agreed)
            raise InputError(f"the agreement's base tensors are not those of its architecture: {len(missing)} agreed "
                             f"tensors the architecture does not use {missing[:3]}, {len(extra)} tensors it has that "
                             f"are not agreed {extra[:3]}")

    # --- inputs the verifier rebuilds itself --------------------------------------------------
    def _load_data(self) -> None:
        a = self.agreement
        self.dataset = self.record.dataset(a.data_kind, a.data_root, a.labels, a.num_examples)
        self.spec = a.batch_spec()
        files = self.record.tokenizer_files(a.tokenizer)
        self.tokenizer = tokenizer_from_files(files, "the run's tokenizer") if files is not None else None
        self.order = OrderCache(self.algorithm, self.settings.seed, a.num_examples)

    def _lora_initial(self) -> dict[str, torch.Tensor]:
        """The seed's adapter tensors in the run's dtype (re-instantiated once when the replay
        runs in another dtype, whose random draws differ)."""
        if self._lora_init is None:
            _, fresh, _ = instantiate(self._hf_config, self.run_settings)
            self._lora_init = {n: p.detach().clone() for n, p in fresh.named_parameters() if is_lora_tensor(n)}
        return self._lora_init

    def fields_entering(self, block: int) -> list[str]:
        """Batch fields that enter layer block `block`: labels at the head, the attention mask
        everywhere, the inputs at the embedding. Each field is checked where it is used."""
        last = len(self.blocked.blocks) - 1
        out = []
        for f in self.spec.fields:
            used = block == last if f == "labels" else True if f == "attention_mask" else block == 0
            if used:
                out.append(f)
        return out

    def agreed_batch(self, step: int, micro: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        indices = self.order.indices(step * self.settings.grad_accum + micro, self.settings.batch_size)
        return indices, build_batch(self.dataset, indices, self.spec, self.tokenizer)

    def loss_weight(self, step: int, micro: int) -> float | None:
        """The agreed weight of micro-batch `micro`'s loss in step `step` (SFT: from every agreed
        micro-batch of the step, SPEC.md 5.2.1), or None for the plain 1/A."""
        if self.spec.sft is None:
            return None
        cached = getattr(self, "_loss_weights", None)
        if cached is None or cached[0] != step:
            labels = [self.agreed_batch(step, m)[1]["labels"] for m in range(self.settings.grad_accum)]
            cached = self._loss_weights = (step, accumulation_weights(labels))
        return cached[1][micro]

    def recorded_threads(self) -> int | None:
        """The intra-op thread count the provider recorded with (bitwise CPU results depend on it)."""
        return recorded_threads(self.record.config.get("environment"))

    def state_refs(self, manifest, block: int) -> dict:
        """{key: (committed ref, owner block)} for every state tensor the block's replay uses."""
        refs = {k: (manifest.blocks[block].get(k), block) for k in self.blocked.state_tensors(block)}
        for key, owner in self.blocked.foreign_state_keys(block):
            refs[key] = (manifest.blocks[owner].get(key), owner)
        return refs

    # --- one block ----------------------------------------------------------------------------
    def verify_block(self, layer_block: int, step_block: int, start_state: dict[str, torch.Tensor] | None = None,
                     after_failure: bool = False, chain: DriftChain | None = None
                     ) -> tuple[BlockResult, dict[str, torch.Tensor]]:
        """Replay (layer_block, step_block). Returns the result and the replayed end state
        (keys as in the manifest), which can start the next step block's replay. With
        `after_failure` (the previous step block of this layer block failed), a start state that
        is committed by digest only cannot be regenerated: that is this block's FAIL, not missing
        data. With a `chain` (tolerance mode), the block's recomputed move is added to it and
        the chained state compared with the committed end state (SPEC.md 6.3)."""
        nb, ns = len(self.blocked.blocks), self.num_step_blocks
        if not 0 <= layer_block < nb:
            raise InputError(f"layer block {layer_block} does not exist: this run has layer blocks 0..{nb - 1}")
        if not 0 <= step_block < ns:
            raise InputError(f"step block {step_block} does not exist: this run has step blocks 0..{ns - 1}")
        t0 = time.perf_counter()
        res = BlockResult(layer_block, step_block, self.blocked.describe(layer_block))
        end_state: dict[str, torch.Tensor] = {}
        if self.conformance:
            first = self.conformance[0]
            res.fail("agreement", f"not replayed: {first.reason}", tensor=first.tensor)
            return res, end_state
        try:
            # strict native replay runs the provider's thread count; portable numerics needs none
            with pinned_threads(self.recorded_threads(), enabled=self.comparison.strict and not self.portable):
                end_state = BlockReplay(self, res, layer_block, step_block, chain).run(start_state)
        except CommitmentMismatch as exc:  # a committed tensor contradicts the agreed computation
            res.fail("record", str(exc))
        except StopReplay:
            pass
        except StateNotStored as exc:
            if not after_failure:
                raise
            res.fail("start_state", f"the start state cannot be regenerated because the replay of step block "
                     f"{step_block - 1} failed (see its finding): {exc}")
        if self.blocked.world_size > 1:  # several processes: a micro-batch's finding names its rank (SPEC.md 6.11)
            w = self.blocked.world_size
            res.findings[:] = [f if f.micro is None or " rank " in f.reason else
                               replace(f, reason=f"{f.reason} (micro-batch {f.micro} of rank {f.micro % w} of {w})")
                               for f in res.findings]
        res.seconds = time.perf_counter() - t0
        return res, end_state

    def new_report(self) -> Report:
        """An empty report about this run: its mode, what was not checked, the agreement's digest."""
        agreed = None if NO_AGREEMENT_NOTE in self.notes else self.agreement.digest().hex()
        return Report(str(self.record.root), self.mode, notes=list(self.notes), agreement=agreed)

    def check_final_model(self) -> list[Finding]:
        return check_final_model(self)

    def verify_all(self, on_block: Callable[[BlockResult], None] | None = None) -> Report:
        """Every block, chaining each layer block's replays through the step blocks, then the
        final model. A run that does not conform to the agreement is not replayed. In tolerance
        mode each end state is also compared with the chain of the layer block's step blocks
        (drift.DriftChain), from step block 0 or from the step block after one whose replay
        stopped before its end state."""
        report = self.new_report()
        stored = run_check_findings(self.record) if type(self.record) is RunRecord else []  # static check (6.9)
        if self.conformance:
            report.errors.extend(self.conformance + stored)
            return report
        # an interrupted run (no run root): the step blocks whose end state is signed (by the next
        # step block's manifest) are replayed, and the final model check reports that training did
        # not finish (a FAIL: not the agreed computation)
        signed = self.num_step_blocks if self.record.transcript.run is not None else \
            max(0, min(self.num_step_blocks, len(self.record.transcript.step_blocks) - 1))
        for l in range(len(self.blocked.blocks)):
            state, failed = None, False
            chain = None if self.comparison.strict else DriftChain(0)
            for s in range(signed):
                if chain is not None and chain.through != s - 1:  # the step block before stopped: restart here
                    chain = DriftChain(s)
                result, state = self.verify_block(l, s, state, after_failure=failed, chain=chain)
                failed = result.verdict == "FAIL"
                report.results.append(result)
                if on_block:
                    on_block(result)
        report.errors.extend(self.check_final_model() + stored)
        return report
