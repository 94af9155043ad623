"""Regenerate what a run committed by digest only (`aftune prepare`, and `aftune open`).

    aftune prepare RUN --public-key provider.pub --layer-block 1 --step-block 2
    aftune prepare RUN --public-key provider.pub --all --base-model BASE

With checkpoint interval I_C > 1 the full state of a layer block is stored only every I_C step
blocks: `prepare` rebuilds a start state by replaying that layer block from the nearest stored
checkpoint. With digest-only boundaries (SPEC.md 3.8) the boundary activations and gradients,
the base state and the final state are not stored either: `regenerate` re-runs the whole model's
training, as the provider ran it, from the nearest step block whose full state is stored (step
block 0: the agreed base model, `--base-model`), and stores what was asked for. Every tensor the
re-run commits, and every state tensor it stores, must match its committed digest
(`CommitmentMismatch` naming it otherwise): the re-run is the provider's computation on its own
hardware (the recorded thread count), never a substitute for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import builtin
from ..core.encoding import DTYPE_BY_NAME
from ..core.rows import TensorRef
from ..errors import CommitmentMismatch, InputError, RecordError
from ..core.signing import PublicKey
from ..verdict.threads import pinned_threads
from .agreement import Agreement
from .engine import BlockedModel
from .instantiate import instantiate
from .manifest import is_boundary
from .resume import load_checkpoint
from .verify import Verifier


@dataclass
class Regenerated:
    """What `regenerate` stored: boundary tensors and state tensors (counts), and the step
    blocks it re-ran (from `start`)."""

    start: int | None = None
    step_blocks: list[int] = field(default_factory=list)
    boundaries: int = 0
    states: int = 0

    @property
    def tensors(self) -> int:
        return self.boundaries + self.states


def _state_blocks(bm: BlockedModel, layer_blocks) -> set[int]:
    """The layer blocks whose state a replay of `layer_blocks` reads: their tied groups and the
    owners of the shared tensors they use."""
    out = set()
    for l in layer_blocks:
        for b in bm.tied_group(l):
            out.add(b)
            out.update(owner for _, owner in bm.foreign_state_keys(b))
    return out


def _fully_stored(v: Verifier, s: int) -> bool:
    m = v.record.manifest(s)
    return all(v.record.store.has(r.digest) for b in m.blocks for r in b.values())


def regenerate(v: Verifier, boundaries=(), states: dict[int, set[int]] | None = None,
               base_model: str | Path | None = None) -> Regenerated:
    """Store the boundary tensors of the step blocks in `boundaries` and the state of the layer
    blocks `states[s]` at the start of step block s (s up to the final state), where they are
    not stored yet, by re-running the whole model's training: each wanted step block from its
    nearest fully stored step block (none: step block 0, from `base_model`, by default the
    built-in one). Returns what was stored and which step blocks were re-run."""
    rec, ns = v.record, v.num_step_blocks
    settings, alg = v.run_settings, v.algorithm
    if v.conformance:
        raise CommitmentMismatch(f"cannot regenerate: the run does not conform ({v.conformance[0].reason})")
    out = Regenerated()
    want_b = sorted({s for s in boundaries if 0 <= s < ns and any(
        not rec.store.has(r.digest) for k, r in rec.manifest(s).common.items() if is_boundary(k))})
    want_s: dict[int, list[tuple[int, str, TensorRef]]] = {}
    layout_bm = v.blocked
    for s, blocks in (states or {}).items():
        if not 0 <= s <= ns:
            continue
        m = rec.manifest(s)
        missing = [(b, k, r) for b in sorted(_state_blocks(layout_bm, blocks)) for k, r in m.blocks[b].items()
                   if not rec.store.has(r.digest)]
        if missing:
            want_s[s] = missing
    if not want_b and not want_s:
        return out
    end = max([t + 1 for t in want_b] + list(want_s))
    stored = {c for c in range(end + 1) if _fully_stored(v, c)}
    nearest = lambda t: max([c for c in stored if c <= t], default=0)  # noqa: E731
    run = set()  # each wanted step block is re-run from its own nearest checkpoint
    for t in want_b:
        run.update(range(nearest(t), t + 1))
    for t in want_s:
        run.update(range(nearest(t), t))
    from_base = 0 not in stored and (0 in run or 0 in want_s)
    out.start = min(run | set(want_s))
    base = None
    if from_base:
        _, base = _load_base(Path(base_model) if base_model else builtin.MODEL_DIR, settings)
    _, model, adapter = instantiate(v._hf_config, settings, base)
    bm = BlockedModel(model, adapter, settings)
    with pinned_threads(v.recorded_threads(), enabled=not bm.portable):
        if from_base:
            try:
                _check_state(bm, rec.manifest(0), alg, f"--base-model {base_model or builtin.MODEL_DIR}")
            except CommitmentMismatch as exc:
                if base_model is not None:
                    raise
                raise InputError(f"regenerating from step block 0 needs the agreed base model: pass --base-model "
                                 f"(the built-in model is not it: {exc})") from None
        for s in range(out.start, end + 1):
            if s in run and s in stored:
                load_checkpoint(bm, rec.store, rec.manifest(s))
            if s in want_s:
                out.states += _store_state(bm, v, s, want_s[s])
            if s in run:
                out.boundaries += _rerun(bm, v, s, store=s in want_b)
                out.step_blocks.append(s)
    return out


def _load_base(model_dir: Path, settings):
    from ..models import load_pretrained

    if not model_dir.is_dir():
        raise InputError(f"regenerating from step block 0 needs the agreed base model: {model_dir} is not a model "
                         "directory (pass --base-model)")
    return load_pretrained(model_dir, settings.attn_implementation, DTYPE_BY_NAME[settings.dtype])


def _check_state(bm: BlockedModel, manifest, alg: str, what: str) -> None:
    """The re-run starts from the agreed base state: every state tensor must have step block 0's
    committed digest."""
    for b in range(len(bm.blocks)):
        committed = manifest.blocks[b]
        for key, (name, t) in bm.state_tensors(b).items():
            ref = committed.get(key)
            if ref is None or TensorRef.of(name, bm.committed(t.detach()), bm.algorithm).digest != ref.digest:
                raise CommitmentMismatch(f"{key} of layer block {b}: the state built from {what} does not match the "
                                         "digest committed for step block 0: that is not the base model this run "
                                         "started from (or the record was altered)")


def _store_state(bm: BlockedModel, v: Verifier, s: int, wanted: list[tuple[int, str, TensorRef]]) -> int:
    """Store the wanted state tensors at the start of step block `s`, each digest-checked."""
    n = 0
    for b, key, ref in wanted:
        live = bm.state_tensors(b).get(key)
        if live is None:
            raise CommitmentMismatch(f"step block {s}, layer block {b}: {key} is committed but the model has no such "
                                     "state tensor")
        t = bm.committed(live[1].detach()).clone()
        if TensorRef.of(ref.name, t, v.algorithm).digest != ref.digest:
            raise CommitmentMismatch(f"step block {s}, layer block {b}: the regenerated {key} does not match its "
                                     "committed digest: the record is not this computation, or this is not the "
                                     "hardware it was made on")
        if not v.record.store.has(ref.digest):
            v.record.store.put(ref, t)
            n += 1
    return n


def _rerun(bm: BlockedModel, v: Verifier, s: int, store: bool) -> int:
    """Train step block `s` as the provider did; every committed tensor is checked against the
    manifest's digest and, with `store`, boundary tensors are stored. Returns how many."""
    m = v.record.manifest(s)
    common, seen, stored = m.common, set(), 0

    def commit(key: str, name: str, tensor) -> None:
        nonlocal stored
        t = tensor.detach()
        t = t.cpu() if t.device.type != "cpu" else t
        ref = common.get(key)
        if ref is None:
            raise CommitmentMismatch(f"step block {s}: the re-run computes {key}, which the manifest does not commit")
        if TensorRef.of(name, t, v.algorithm).digest != ref.digest:
            raise CommitmentMismatch(f"step block {s}: the regenerated {key} does not match its committed digest: the "
                                     "record is not this computation (or its start state was altered), or this is not "
                                     "the hardware it was made on")
        seen.add(key)
        if store and is_boundary(key) and not v.record.store.has(ref.digest):
            v.record.store.put(ref, t)
            stored += 1

    for step in v.run_settings.steps_of(s):
        batches = [v.agreed_batch(step, m_)[1] for m_ in range(v.run_settings.grad_accum)]
        bm.train_step(step, batches, v.spec.fields, commit=commit)
    unseen = sorted(set(common) - seen)
    if unseen:
        raise CommitmentMismatch(f"step block {s}: {len(unseen)} committed tensors the re-run does not compute, "
                                 f"such as {unseen[0]}")
    return stored


def prepare_digest(v: Verifier, layer_block: int | None = None, step_block: int | None = None,
                   base_model: str | Path | None = None) -> Regenerated:
    """A run with digest-only boundaries: what replaying (layer_block, step_block) reads (its
    step block's boundaries, the start and end state of its tied group), or, with neither given,
    everything (`verify --all` and tolerance mode then find every tensor stored)."""
    ns, nb = v.num_step_blocks, len(v.blocked.blocks)
    if layer_block is None and step_block is None:
        return regenerate(v, range(ns), {s: set(range(nb)) for s in range(ns + 1)}, base_model)
    if layer_block is None or step_block is None:
        raise InputError("give both --layer-block and --step-block, or --all")
    if not 0 <= step_block < ns:
        raise InputError(f"step block {step_block} does not exist: this run has step blocks 0..{ns - 1}")
    if not 0 <= layer_block < nb:
        raise InputError(f"layer block {layer_block} does not exist: this run has layer blocks 0..{nb - 1}")
    return regenerate(v, [step_block], {step_block: {layer_block}, step_block + 1: {layer_block}}, base_model)


def prepare(run_dir: str | Path, public_key: PublicKey, layer_block: int, step_block: int,
            verifier: Verifier | None = None, agreement: Agreement | None = None,
            unsafe_no_agreement: bool = False) -> list[int]:
    """Make the start state of (layer_block, step_block) available; returns the step blocks
    whose state was regenerated (empty when it was already stored). The replay follows the
    `agreement` (or `verifier`'s)."""
    v = verifier or Verifier(run_dir, public_key, agreement, unsafe_no_agreement=unsafe_no_agreement, mode="strict")
    ns = v.num_step_blocks
    if not 0 <= step_block <= ns:
        raise InputError(f"step block {step_block} does not exist: this run has step blocks 0..{ns}")
    if not 0 <= layer_block < len(v.blocked.blocks):
        raise InputError(f"layer block {layer_block} does not exist")
    start = step_block - step_block % v.settings.checkpoint_interval
    regenerated = []
    state = None
    for s in range(start, step_block):
        result, state = v.verify_block(layer_block, s, state)
        if result.findings or not state:
            raise RecordError(f"cannot regenerate step block {s + 1}: replaying step block {s} failed: {result.headline()}")
        manifest = v.record.manifest(s + 1)
        for b in v.blocked.tied_group(layer_block):  # a tied group is replayed together (SPEC.md 5.2.4)
            for key, (ref, _) in v.state_refs(manifest, b).items():
                if ref is not None and not v.record.store.has(ref.digest):
                    v.record.store.put(ref, state[key])
        regenerated.append(s + 1)
    return regenerated
