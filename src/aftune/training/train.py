"""Recorded fine-tuning: the provider's side of aftune (`aftune train`).

    aftune train --model DIR --data FILE --run-dir RUN --steps 32

Trains block by block through `engine.BlockedModel`, hands every boundary tensor and every
step-block state to the background `Recorder`, and signs each step block's root as it ends.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from .. import builtin
from ..core import jsonio
from ..core.encoding import DTYPE_BY_NAME, canonical_json
from ..core.merkle import files_root
from ..core.signing import SigningKey
from ..data import BatchSpec, OrderCache, build_batch, copy_into, load_dataset
from ..errors import AftuneError, InputError
from ..models import (
    HeadInit,
    load_pretrained,
    model_commitment,
    model_files,
    tokenizer_files,
    tokenizer_from_files,
)
from ..version import __version__
from .agreement import Agreement, agreement_from, differences
from .engine import BlockedModel
from .instantiate import instantiate
from .distributed import commits_state
from .recorder import RankRecorder, Recorder
from .resume import load_checkpoint, resume_point
from .run import MAX_CONFIG_BYTES, config_digest
from .settings import RUN_FORMAT, TrainSettings
from .transcript import TranscriptWriter

Progress = Callable[[int, int, float], None]


class Deviation:
    """A departure from the agreed computation, for the attack suite and the tests: a provider
    that cheats is simulated by overriding these hooks. The honest run uses none."""

    def batch(self, step: int, micro: int, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

    def before_update(self, step: int, blocked: BlockedModel) -> None:
        pass

    def after_update(self, step: int, blocked: BlockedModel) -> None:
        pass

    def local_gradients(self, step: int, rank: int, grads: dict[str, torch.Tensor]) -> None:
        """Several processes: rank `rank`'s local gradients of `step`, before they are committed
        and exchanged (SPEC.md 5.5); change them in place to cheat."""


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    config_digest: bytes
    run_root: bytes
    final_model_digest: bytes
    public_key_path: Path | None
    final_loss: float
    losses: tuple[float, ...] = ()  # each step's mean loss, in order, for the steps this call ran

def train(model_dir: str | Path | None, data_path: str | Path | None, run_dir: str | Path,
          settings: TrainSettings | None = None, key_path: str | Path | None = None, progress: Progress | None = None,
          deviation: Deviation | None = None, agreement: Agreement | None = None, resume: bool = False,
          exchange=None) -> TrainResult | None:
    """Fine-tune `model_dir` on `data_path` into the new directory `run_dir`, recording. The
    settings come from the client's `agreement` (whose base model and data must be the ones given)
    or, without one, from `settings`; the run config commits the agreement's digest either way.
    `resume`: continue the interrupted run in `run_dir` (training/resume.py) under the agreement
    it was made with, from the same base model; the data default to the run's own copy.
    `exchange`: this process is one rank of several (training/distributed.py, SPEC.md 5.5); rank 0
    returns the result, the other ranks None."""
    call = dict(model_dir=model_dir, data_path=data_path, run_dir=run_dir, settings=settings, key_path=key_path,
                deviation=deviation, agreement=agreement, resume=resume, exchange=exchange)
    if exchange is None:
        st = _setup(**call)
    else:  # several ranks (SPEC.md 5.5): every rank stops when one cannot start
        st, error = None, None
        try:
            st = _setup(**call)
        except AftuneError as exc:
            error = exc
        exchange.check_all(error)
        threads = exchange.all_objects(torch.get_num_threads())
        if len(set(threads)) > 1:
            raise InputError(f"the ranks run with different intra-op thread counts {threads}: bitwise replay needs one "
                             "(set OMP_NUM_THREADS, or torch.set_num_threads, alike on every rank)")
        if not exchange.lead:  # after rank 0 made the run directory
            st.recorder = RankRecorder(Path(run_dir), st.settings.hash_algorithm, len(st.blocked.blocks), exchange.rank,
                                       digest_boundaries=st.settings.digest_boundaries)
    settings, blocked, recorder, dataset = st.settings, st.blocked, st.recorder, st.dataset
    deviation = deviation or Deviation()
    lead = exchange is None or exchange.lead
    order = OrderCache(settings.hash_algorithm, settings.seed, len(dataset.examples))
    loss_value = float("nan")
    losses: list[float] = []
    try:
        for s in range(st.first_block, settings.num_step_blocks + 1):
            steps = settings.steps_of(s) if s < settings.num_step_blocks else range(settings.steps, settings.steps)
            recorder.begin(s, steps.start, len(steps))
            hashing = _commit_state(blocked, recorder, s, settings.stores_state(s), exchange)
            for t in steps:
                loss_value = _train_step(blocked, recorder, s, t, dataset, order, st.spec, st.tokenizer,
                                         deviation, wait_before_update=hashing, exchange=exchange)
                losses.append(loss_value)
                hashing = []
                if progress:
                    progress(t + 1, settings.steps, loss_value)
            if exchange is None:
                recorder.end(s)
            elif lead:
                for common, blocks in exchange.rows(s, None):
                    recorder.merge(s, common, blocks)
                recorder.end(s)
            else:
                exchange.rows(s, recorder.end(s))
        recorder.close()
    except BaseException:
        recorder.close()
        raise
    if not lead:
        return None
    run, algorithm, writer = st.run, settings.hash_algorithm, st.writer
    root_module, model = st.root_module, st.model
    base_files, digest, public_key_path = st.base_files, st.digest, st.public_key_path

    final_digest = _save_model(root_module, model, base_files, run, settings, algorithm)
    run_root = writer.finish(final_digest)
    return TrainResult(run, digest, run_root, final_digest, public_key_path, loss_value, tuple(losses))


def _setup(model_dir, data_path, run_dir, settings, key_path, deviation, agreement, resume, exchange) -> SimpleNamespace:
    """Everything before the first step: inputs checked against the agreement, the model built,
    and (rank 0, or the one process) the run directory, its config and the recorder."""
    lead = exchange is None or exchange.lead
    run = Path(run_dir)
    if resume:
        existing = _existing_run(run)
        agreement = agreement or Agreement.load(run / "agreement.json")
        data_path = data_path or run / existing["data"]["path"]
    if agreement is not None:
        if settings is not None and settings != agreement.settings:
            raise InputError("the training settings come from the agreement: give one or the other")
        settings = agreement.settings
    if settings is None:
        raise InputError("give the training settings or an agreement")
    settings.validate()
    model_dir = Path(model_dir) if model_dir else builtin.MODEL_DIR
    data_path = Path(data_path) if data_path else builtin.DATA_FILE
    procs = 1 if exchange is None else exchange.world_size
    if settings.world_size != procs:
        raise InputError(f"the settings say world size {settings.world_size} (distributed), this run has {procs} "
                         f"process{'es' if procs > 1 else ''}: start it with --nproc-per-node {settings.world_size}"
                         if settings.world_size > 1 else "these settings are for one process (no distributed "
                         "settings): start it without --nproc-per-node or torchrun")
    if resume and procs > 1:
        raise InputError("--resume is not available with several processes yet")
    if lead and not resume and run.exists() and any(run.iterdir()):
        raise InputError(f"run directory {run} already exists and is not empty: records are never overwritten")
    algorithm = settings.hash_algorithm

    dtype = DTYPE_BY_NAME[settings.dtype]
    hf_config, base_model = load_pretrained(model_dir, settings.attn_implementation, dtype,
                                            head_init=HeadInit(algorithm, settings.seed))
    dataset = load_dataset(data_path)
    own = agreement_from(hf_config, base_model, model_dir, dataset, settings,
                         agreement.inference if agreement is not None else None)
    if agreement is not None:
        wrong = differences(agreement.body_json(), own.body_json())
        if wrong:
            raise InputError("the model and data given are not the agreed ones:\n  - " + "\n  - ".join(wrong[:12]))
    agreement = agreement or own
    if not lead:
        key = None
    elif key_path:
        key = SigningKey.load(key_path)
    else:
        key = SigningKey.load(run / "provider.key") if resume else SigningKey.generate()

    root_module, model, adapter = instantiate(hf_config, settings, base_model)
    blocked = BlockedModel(model, adapter, settings)
    if exchange is not None and blocked.fsdp:
        blocked.keep_only_shard(exchange.rank)  # this rank's optimizer state only (SPEC.md 5.5)

    # the agreed base files, byte for byte: the tokenizer to train with (RUN/tokenizer) and the
    # config, generation config and tokenizer of the fine-tuned model (RUN/model)
    base_files = model_files(model_dir)
    files = tokenizer_files(model_dir) if dataset.kind != "image_folder" else None
    tokenizer = tokenizer_from_files(files) if files is not None else None  # exactly what the verifier loads
    public_key_path = None
    spec = agreement.batch_spec()
    if not lead:  # rank 0 writes the run directory; this rank's recorder starts once it exists
        return SimpleNamespace(settings=settings, blocked=blocked, recorder=None, dataset=dataset, first_block=0,
                               spec=spec, tokenizer=tokenizer)
    if resume:
        data_rel = existing["data"]["path"]
        public_key_path = run / "provider.key.pub" if not key_path and (run / "provider.key.pub").is_file() else None
    else:
        run.mkdir(parents=True, exist_ok=True)
        if not key_path:
            public_key_path = key.save(run / "provider.key")
        (run / "base_model.json").write_text(json.dumps({k: v.hex() for k, v in sorted(agreement.base_tensors.items())},
                                                        indent=0))
        (run / "agreement.json").write_bytes(canonical_json(agreement.to_json()) + b"\n")  # what the run was made under
        if files is not None:
            (run / "tokenizer").mkdir()
            for name, data in files.items():
                (run / "tokenizer" / name).write_bytes(data)
        data_rel = str(copy_into(dataset, run / "data").relative_to(run))
    config_bytes = canonical_json(_run_config(settings, agreement, hf_config, files, dataset, data_rel, spec, blocked,
                                              model))
    digest = config_digest(algorithm, config_bytes)
    if resume:
        if (run / "config.json").read_bytes() != config_bytes:
            raise InputError(f"cannot resume {run}: its config.json differs from what these settings, model, data, "
                             "library versions and thread count give (resume on the machine and with the inputs the "
                             "run started with)")
        point = resume_point(run, key, settings, digest, len(blocked.blocks))
        writer = TranscriptWriter.resume(run / "transcript.jsonl", key, algorithm, digest, point.prev_root,
                                         dict(enumerate(point.signed_roots)))
        recorder = Recorder(run, algorithm, len(blocked.blocks), writer, signed=point.signed,
                            digest_boundaries=settings.digest_boundaries)
        if point.manifest is not None:
            load_checkpoint(blocked, recorder.store, point.manifest)
        first_block = point.start
        for stale in ("model", "adapter"):  # written after the last step block: never signed
            shutil.rmtree(run / stale, ignore_errors=True)
    else:
        (run / "config.json").write_bytes(config_bytes)
        writer = TranscriptWriter(run / "transcript.jsonl", key, algorithm, digest)
        recorder = Recorder(run, algorithm, len(blocked.blocks), writer, digest_boundaries=settings.digest_boundaries)
        first_block = 0
    return SimpleNamespace(**{k: v for k, v in locals().items() if k in _SETUP})


_SETUP = ("settings", "blocked", "recorder", "dataset", "first_block", "spec", "tokenizer", "run", "writer",
          "root_module", "model", "base_files", "digest", "public_key_path")


def _run_config(settings: TrainSettings, agreement: Agreement, hf_config: dict, tokenizer: dict[str, bytes] | None,
                dataset, data_rel: str, spec: BatchSpec, blocked: BlockedModel, model) -> dict:
    """The run config (SPEC.md 3.3): what the run commits before its first step."""
    algorithm = settings.hash_algorithm
    return {
        "format": RUN_FORMAT,
        "settings": settings.to_json(),
        "agreement": agreement.digest().hex(),
        "model": {"config": hf_config, "base_weights": agreement.base_weights.hex(),
                  "tokenizer": files_root(algorithm, tokenizer).hex() if tokenizer is not None else None},
        "data": {"kind": dataset.kind, "root": dataset.root(algorithm).hex(), "num_examples": len(dataset.examples),
                 "labels": list(dataset.labels), "path": data_rel},
        "batch": spec.to_json(),
        "layout": {"stages": blocked.stage_names, "layer_blocks": [list(r) for r in blocked.blocks.ranges]},
        "versions": _versions(),
        # CPU matmul results depend on the intra-op thread count: strict replay uses the same one
        "environment": {"device": str(next(model.parameters()).device.type), "torch_threads": torch.get_num_threads()},
    }


def _existing_run(run: Path) -> dict:
    """The config of the interrupted run in `run` (to resume it)."""
    path = run / "config.json"
    if not path.is_file():
        raise InputError(f"{run} holds no run to resume (no config.json): start it with `aftune train` first")
    config = jsonio.read_json(path, MAX_CONFIG_BYTES, "run config", InputError)
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("path"), str) or ".." in Path(data["path"]).parts \
            or Path(data["path"]).is_absolute():
        raise InputError(f"{path}: no data path inside the run")
    return config


def _commit_state(blocked: BlockedModel, recorder: Recorder, s: int, stored: bool, exchange=None) -> list:
    """Hand every layer block's state at the start of step block `s` to the recorder.

    Weights and optimizer state are hashed, and at checkpoints stored, in place while the step
    block's first forward and backward run (they only read them); the returned futures must
    complete before the first optimizer update. (A copy of a 135M model's state costs the
    training thread seconds of page faults at every checkpoint: benchmarks/README.md.) Buffers
    are copied: a forward pass may update them (BatchNorm statistics). Several ranks: each
    commits its part (`distributed.commits_state`)."""
    live = []
    for b in range(len(blocked.blocks)):
        buffers = {name for name, _ in blocked.layout[b].buffers}
        for k, (name, t) in blocked.state_tensors(b).items():
            if not commits_state(exchange, k):
                continue
            if blocked.portable and t.is_floating_point():
                recorder.state(s, b, k, name, blocked.committed(t.detach()), stored)  # a float32 copy
            elif name in buffers:
                recorder.state(s, b, k, name, t.detach().clone(), stored)
            else:
                live.append(recorder.state(s, b, k, name, t.detach(), stored))
    return live


def _train_step(blocked: BlockedModel, recorder: Recorder, s: int, step: int, dataset, order: OrderCache,
                spec: BatchSpec, tokenizer, deviation: Deviation, wait_before_update=(), exchange=None) -> float:
    settings = blocked.settings
    device = next(blocked.model.parameters()).device
    batches = []
    for m in range(settings.grad_accum):
        indices = order.indices(step * settings.grad_accum + m, settings.batch_size)
        batch = build_batch(dataset, indices, spec, tokenizer)
        batches.append({k: v.to(device) for k, v in deviation.batch(step, m, batch).items()})
    def before_update(step: int, model: BlockedModel) -> None:
        for future in wait_before_update:  # the start-of-block state is hashed in place
            future.result()
        deviation.before_update(step, model)

    return blocked.train_step(step, batches, spec.fields, commit=lambda key, name, t: recorder.common(s, key, name, t),
                              before_update=before_update, after_update=deviation.after_update, exchange=exchange,
                              on_local_gradients=deviation.local_gradients)


def _save_model(root_module, model, base_files: dict[str, bytes], run: Path, settings: TrainSettings,
                algorithm: str) -> bytes:
    """Write RUN/model (Hugging Face format; LoRA merged, the adapter in RUN/adapter) with the
    agreed base model's config, generation config and tokenizer files byte for byte (fine-tuning
    changes weights only), and return its model digest (SPEC.md 3.6)."""
    out = run / "model"
    dtype = DTYPE_BY_NAME[settings.dtype]
    if settings.lora is not None:
        # portable numerics holds float32 values in float64: the adapter converts exactly, and the
        # merge is computed in float64 and rounded to float32 once (SPEC.md 5.4)
        if settings.numerics == "portable":
            _save_adapter_as(root_module, run / "adapter", dtype)
        else:
            root_module.save_pretrained(str(run / "adapter"))
        merged = root_module.merge_and_unload()
        merged.to(dtype).save_pretrained(str(out))
    else:
        model.to(dtype).save_pretrained(str(out))  # portable: float32 values held in float64, exactly
    (out / "generation_config.json").unlink(missing_ok=True)
    for name, data in base_files.items():
        (out / name).write_bytes(data)
    _, saved = load_pretrained(out, settings.attn_implementation, DTYPE_BY_NAME[settings.dtype])
    return model_commitment(saved, out, algorithm)[0]


def _save_adapter_as(root_module, path: Path, dtype: torch.dtype) -> None:
    """Save the PEFT adapter with its tensors in `dtype` (the model itself stays as it is)."""
    saved = {n: p.detach().clone() for n, p in root_module.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for n, p in root_module.named_parameters():
            if n in saved:
                p.data = p.data.to(dtype)
        root_module.save_pretrained(str(path))
        for n, p in root_module.named_parameters():
            if n in saved:
                p.data = saved[n]


def _versions() -> dict[str, str]:
    out = {"aftune": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    for mod in ("transformers", "peft"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out
