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
 6. compares the end state (weights, buffers, optimizer state) with the commitment of s+1.

Comparisons follow the one policy of `verdict.policy`: strict (bitwise) or tolerance.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..core.encoding import DTYPE_BY_NAME
from ..core.merkle import tensors_root
from ..core.signing import PublicKey
from ..data import BatchSpec, OrderCache, build_batch
from ..errors import CommitmentMismatch, InputError, RecordError
from ..models import load_pretrained, model_commitment, model_weights, tokenizer_from_files
from ..models.shapes import ShapeOracle
from ..verdict.findings import BlockResult, Finding, Report
from ..verdict.policy import (MODES, TENSOR_KINDS, ComparisonPolicy, Tolerance, Verifying,  # noqa: F401
                              relative_errors, tensor_kind)
from ..verdict.threads import pinned_threads, recorded_threads
from .engine import BlockedModel
from .initial_state import InitialState
from .instantiate import instantiate, is_lora_tensor
from .replay import BlockReplay, StopReplay
from .run import RunRecord

__all__ = ["MODES", "TENSOR_KINDS", "Tolerance", "Verifier", "relative_errors", "tensor_kind"]


class Verifier(Verifying):
    def __init__(self, run_dir: str | Path | None, public_key: PublicKey | None, mode: str = "strict",
                 tolerance: Tolerance = Tolerance(), replay_dtype: str | None = None,
                 transcript: str | Path | None = None, record=None):
        """Verify a run directory, or any other record source passed as `record` (an audit
        bundle) that offers RunRecord's interface."""
        self.policy = ComparisonPolicy(mode, tolerance)
        if replay_dtype is not None and self.policy.strict:
            raise InputError("replaying in another dtype cannot be bitwise: use --mode tolerance with --dtype")
        if replay_dtype is not None and replay_dtype not in DTYPE_BY_NAME:
            raise InputError(f"--dtype must be one of {', '.join(DTYPE_BY_NAME)}")
        self.record = record if record is not None else RunRecord.open(run_dir, public_key, transcript)
        self.algorithm = self.record.algorithm
        run_settings = self.record.settings
        self.settings = replace(run_settings, dtype=replay_dtype) if replay_dtype else run_settings
        self.replay_dtype = DTYPE_BY_NAME[self.settings.dtype]
        hf_config = self.record.section("model").get("config")
        if not isinstance(hf_config, dict):
            raise RecordError("run config: model.config must be an object")
        self._hf_config = hf_config
        _, self.model, adapter = instantiate(hf_config, self.settings)
        self.blocked = BlockedModel(self.model, adapter, self.settings)
        layout = self.record.section("layout")
        if layout.get("layer_blocks") != [list(r) for r in self.blocked.blocks.ranges] or \
                layout.get("stages") != self.blocked.stage_names:
            raise RecordError("run config: the committed layer-block layout differs from the architecture's")
        self.shapes = ShapeOracle(hf_config, run_settings.attn_implementation, DTYPE_BY_NAME[run_settings.dtype])
        # LoRA: the adapters as `settings.seed` initialises them (instantiate seeds PEFT's init),
        # kept before any committed state is loaded over them (6.2 step 3)
        self._lora_init: dict[str, torch.Tensor] | None = None
        if run_settings.lora is not None and not replay_dtype:
            self._lora_init = {n: p.detach().clone() for n, p in self.model.named_parameters() if is_lora_tensor(n)}
        self._load_data()
        self.initial = InitialState(self.base_digests, self._lora_initial, self.algorithm)

    # --- inputs the verifier rebuilds itself --------------------------------------------------
    def _load_data(self) -> None:
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
        files = self.record.tokenizer_files()
        self.tokenizer = tokenizer_from_files(files, "the run's tokenizer") if files is not None else None
        self.order = OrderCache(self.algorithm, self.settings.seed, self.record.num_examples)
        self.base_digests = self.record.base_digests()

    def _lora_initial(self) -> dict[str, torch.Tensor]:
        """The seed's adapter tensors in the run's dtype (re-instantiated once when the replay
        runs in another dtype, whose random draws differ)."""
        if self._lora_init is None:
            _, fresh, _ = instantiate(self._hf_config, self.record.settings)
            self._lora_init = {n: p.detach().clone() for n, p in fresh.named_parameters() if is_lora_tensor(n)}
        return self._lora_init

    def check_agreed(self, base_model: str | Path | None = None, data: str | Path | None = None) -> None:
        """Check the run against what the client agreed to, from the client's own copies: the
        base model (its weights digest) and the dataset (its root). Raises CommitmentMismatch."""
        model = self.record.section("model")
        if base_model is not None:
            _, base = load_pretrained(base_model, self.record.settings.attn_implementation,
                                      DTYPE_BY_NAME[self.record.settings.dtype])
            root, _ = tensors_root(self.algorithm, model_weights(base))
            if root.hex() != model.get("base_weights"):
                raise CommitmentMismatch(f"the run did not start from the agreed base model {base_model}: its "
                                         f"weights digest is {root.hex()[:16]}…, the run commits "
                                         f"{str(model.get('base_weights'))[:16]}…")
        if data is not None:
            from ..data import load_dataset

            root = load_dataset(data).root(self.algorithm).hex()
            if root != self.record.section("data").get("root"):
                raise CommitmentMismatch(f"the run was not trained on the agreed dataset {data}: its root is "
                                         f"{root[:16]}…, the run commits {str(self.record.section('data').get('root'))[:16]}…")

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
        res = BlockResult(layer_block, step_block, self.blocked.describe(layer_block))
        end_state: dict[str, torch.Tensor] = {}
        try:
            with pinned_threads(self.recorded_threads(), enabled=self.policy.strict):
                end_state = BlockReplay(self, res, layer_block, step_block).run(start_state)
        except CommitmentMismatch as exc:  # a committed tensor contradicts the agreed computation
            res.fail("record", str(exc))
        except StopReplay:
            pass
        res.seconds = time.perf_counter() - t0
        return res, end_state

    # --- the final model ----------------------------------------------------------------------
    def check_final_model(self) -> list[Finding]:
        """RUN/model must be the model the run root commits to (and, for full fine-tuning, the
        final state of the last step block)."""
        run = self.record.transcript.run
        ns = self.record.num_step_blocks
        if run is None:
            return [Finding(-1, ns, "record", "the transcript has no signed run root: training did not finish")]
        try:
            _, saved = load_pretrained(self.record.root / "model", self.settings.attn_implementation,
                                       DTYPE_BY_NAME[self.record.settings.dtype])
        except InputError as exc:
            return [Finding(-1, ns, "final_model", str(exc))]
        root, digests = model_commitment(saved, self.record.root / "model", self.algorithm)
        if root != run.final_model_digest:
            return [Finding(-1, ns, "final_model", "RUN/model is not the model whose digest the run root signs (its "
                            "weights, config, generation config or tokenizer files changed)",
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
