"""Recorded fine-tuning: the provider's side of aftune (`aftune train`).

    aftune train --model DIR --data FILE --run-dir RUN --steps 32

Trains block by block through `engine.BlockedModel`, hands every boundary tensor and every
step-block state to the background `Recorder`, and signs each step block's root as it ends.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import builtin
from ..version import __version__
from .settings import RUN_FORMAT, TrainSettings
from ..data import BatchSpec, Dataset, OrderCache, build_batch, copy_into, load_dataset
from ..core.encoding import canonical_json
from .engine import BlockedModel
from ..errors import InputError
from .instantiate import instantiate
from ..core.merkle import files_root, tensors_root
from ..models import (adapter_class, load_pretrained, load_tokenizer, model_commitment, model_weights,
                      tokenizer_files, tokenizer_from_files)
from .recorder import Recorder
from ..core.encoding import DTYPE_BY_NAME
from .run import config_digest
from ..core.signing import SigningKey
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


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    config_digest: bytes
    run_root: bytes
    final_model_digest: bytes
    public_key_path: Path | None
    final_loss: float


def batch_spec(hf_config: dict, settings: TrainSettings, fields: tuple[str, ...], task: str) -> BatchSpec:
    image_size = settings.image_size or int(hf_config.get("image_size", 0) or 0)
    if hf_config.get("model_type") == "resnet" and not image_size:
        image_size = 64
    return BatchSpec(task=task, seq_len=settings.seq_len, image_size=image_size, fields=fields)


def _check_data(dataset: Dataset, task: str, model_type: str, hf_config: dict) -> None:
    vision = model_type in ("vit", "dinov2", "resnet")
    wanted = "text" if task == "causal_lm" else ("image_folder" if vision else "labeled_text")
    if dataset.kind != wanted:
        raise InputError(f"a {model_type} model trains on a {wanted} dataset, got {dataset.kind}")
    if task == "classification":
        num_labels = len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 2))
        if len(dataset.labels) > num_labels:
            raise InputError(f"the dataset has {len(dataset.labels)} labels {list(dataset.labels)[:5]} but the model "
                             f"classifies {num_labels}; set num_labels in the model config")


def train(model_dir: str | Path | None, data_path: str | Path | None, run_dir: str | Path, settings: TrainSettings,
          key_path: str | Path | None = None, progress: Progress | None = None,
          deviation: Deviation | None = None) -> TrainResult:
    settings.validate()
    model_dir = Path(model_dir) if model_dir else builtin.MODEL_DIR
    data_path = Path(data_path) if data_path else builtin.DATA_FILE
    run = Path(run_dir)
    if run.exists() and any(run.iterdir()):
        raise InputError(f"run directory {run} already exists and is not empty: records are never overwritten")
    algorithm = settings.hash_algorithm

    dtype = DTYPE_BY_NAME[settings.dtype]
    hf_config, base_model = load_pretrained(model_dir, settings.attn_implementation, dtype)
    base_tensors = model_weights(base_model)
    model_type = hf_config.get("model_type")
    task = adapter_class(model_type).task
    dataset = load_dataset(data_path)
    _check_data(dataset, task, model_type, hf_config)
    key = SigningKey.load(key_path) if key_path else SigningKey.generate()

    root_module, model, adapter = instantiate(hf_config, settings, base_model)
    blocked = BlockedModel(model, adapter, settings)

    run.mkdir(parents=True, exist_ok=True)
    public_key_path = None
    if not key_path:
        public_key_path = key.save(run / "provider.key")
    base_root, base_digests = tensors_root(algorithm, base_tensors)
    (run / "base_model.json").write_text(json.dumps({k: v.hex() for k, v in sorted(base_digests.items())}, indent=0))
    tokenizer, tokenizer_digest = None, None
    if dataset.kind != "image_folder":
        load_tokenizer(model_dir).save_pretrained(str(run / "tokenizer"))
        files = tokenizer_files(run / "tokenizer")
        tokenizer = tokenizer_from_files(files)  # train with exactly what the verifier will load
        tokenizer_digest = files_root(algorithm, files).hex()
    data_copy = copy_into(dataset, run / "data")
    spec = batch_spec(hf_config, settings, adapter.batch_fields, task)

    config = {
        "format": RUN_FORMAT,
        "settings": settings.to_json(),
        "model": {"config": hf_config, "base_weights": base_root.hex(), "tokenizer": tokenizer_digest},
        "data": {"kind": dataset.kind, "root": dataset.root(algorithm).hex(), "num_examples": len(dataset.examples),
                 "labels": list(dataset.labels), "path": str(data_copy.relative_to(run))},
        "batch": {**asdict(spec), "image_mean": list(spec.image_mean), "image_std": list(spec.image_std),
                  "fields": list(spec.fields)},
        "layout": {"stages": blocked.stage_names, "layer_blocks": [list(r) for r in blocked.blocks.ranges]},
        "versions": _versions(),
        # CPU matmul results depend on the intra-op thread count: strict replay uses the same one
        "environment": {"device": str(next(model.parameters()).device.type), "torch_threads": torch.get_num_threads()},
    }
    config_bytes = canonical_json(config)
    (run / "config.json").write_bytes(config_bytes)
    digest = config_digest(algorithm, config_bytes)

    writer = TranscriptWriter(run / "transcript.jsonl", key, algorithm, digest)
    recorder = Recorder(run, algorithm, len(blocked.blocks), writer)
    order = OrderCache(algorithm, settings.seed, len(dataset.examples))
    loss_value = float("nan")
    try:
        for s in range(settings.num_step_blocks + 1):
            steps = settings.steps_of(s) if s < settings.num_step_blocks else range(settings.steps, settings.steps)
            recorder.begin(s, steps.start, len(steps))
            hashing = _commit_state(blocked, recorder, s, settings.is_checkpoint(s))
            for t in steps:
                loss_value = _train_step(blocked, recorder, s, t, dataset, order, spec, tokenizer,
                                         deviation or Deviation(), wait_before_update=hashing)
                hashing = []
                if progress:
                    progress(t + 1, settings.steps, loss_value)
            recorder.end(s)
        recorder.close()
    except BaseException:
        recorder.close()
        raise

    final_digest = _save_model(root_module, model, tokenizer, run, settings, algorithm)
    run_root = writer.finish(final_digest)
    return TrainResult(run, digest, run_root, final_digest, public_key_path, loss_value)


def _commit_state(blocked: BlockedModel, recorder: Recorder, s: int, stored: bool) -> list:
    """Hand every layer block's state at the start of step block `s` to the recorder.

    Checkpoints are stored, so they are copied. Otherwise weights and optimizer state are hashed
    in place while the step block's first forward and backward run (they only read them); the
    returned futures must complete before the first optimizer update. Buffers are copied: a
    forward pass may update them (BatchNorm statistics)."""
    live = []
    for b in range(len(blocked.blocks)):
        buffers = {name for name, _ in blocked.layout[b].buffers}
        for k, (name, t) in blocked.state_tensors(b).items():
            if stored or name in buffers:
                recorder.state(s, b, k, name, t.detach().clone(), stored)
            else:
                live.append(recorder.state(s, b, k, name, t.detach(), False))
    return live


def _train_step(blocked: BlockedModel, recorder: Recorder, s: int, step: int, dataset, order: OrderCache,
                spec: BatchSpec, tokenizer, deviation: Deviation, wait_before_update=()) -> float:
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
                              before_update=before_update, after_update=deviation.after_update)


def _save_model(root_module, model, tokenizer, run: Path, settings: TrainSettings, algorithm: str) -> bytes:
    """Write RUN/model (Hugging Face format; LoRA merged, the adapter in RUN/adapter) and return
    the digest of its weights."""
    out = run / "model"
    if settings.lora is not None:
        root_module.save_pretrained(str(run / "adapter"))
        merged = root_module.merge_and_unload()
        merged.save_pretrained(str(out))
    else:
        model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    _, saved = load_pretrained(out, settings.attn_implementation, DTYPE_BY_NAME[settings.dtype])
    return model_commitment(saved, out, algorithm)[0]


def _versions() -> dict[str, str]:
    out = {"aftune": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    for mod in ("transformers", "peft"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out
