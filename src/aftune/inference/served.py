"""The served model: a model directory or a training run's fine-tuned model, loaded for inference
with its digest, its adapter's inference stages and its tokenizer.

    served = ServedModel.load("runs/demo")          # the run's model/, checked against its run root
    served.run_block(blocks, 1, hidden, served.step_context(0, inputs), cache)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import jsonio
from ..core.encoding import DTYPE_BY_NAME, parse_hex_digest
from ..core.merkle import files_root
from ..data.inputs import classification_inputs, image_pixels, prompt_ids
from ..errors import InputError, RecordError
from ..models import IMAGE_FAMILIES, Stage, adapter_class, load_pretrained, load_tokenizer, model_commitment
from ..models import tokenizer_files
from ..training.settings import LayerBlocks
from .policy import config_eos_token_ids

MAX_RUN_CONFIG_BYTES = 16 << 20
eos_token_ids = config_eos_token_ids  # the end-of-sequence tokens of a config.json (partition/ uses it)


@dataclass(frozen=True)
class RunBinding:
    """The signed run line of a training run (SPEC.md 3.4.4): binds its final model digest."""

    config_digest: bytes
    last_root: bytes
    final_model_digest: bytes
    root: bytes

    def to_json(self) -> dict[str, str]:
        return {"config_digest": self.config_digest.hex(), "last_root": self.last_root.hex(),
                "final_model_digest": self.final_model_digest.hex(), "root": self.root.hex()}

    @classmethod
    def from_json(cls, obj: Any) -> "RunBinding":
        if not isinstance(obj, dict):
            raise RecordError("record: model.run must be an object or null")
        try:
            return cls(*(parse_hex_digest(obj.get(k), f"record: model.run.{k}")
                         for k in ("config_digest", "last_root", "final_model_digest", "root")))
        except InputError as exc:
            raise RecordError(str(exc)) from None


def is_run_dir(path: Path) -> bool:
    return (path / "transcript.jsonl").is_file() and (path / "config.json").is_file() and (path / "model").is_dir()


@dataclass(frozen=True)
class ModelSource:
    """Where a served model comes from: a Hugging Face directory, or a training run."""

    model_dir: Path
    tokenizer_dir: Path | None  # None for image models
    dtype: str
    attn_implementation: str
    hash_algorithm: str
    run_dir: Path | None = None
    run_config: dict[str, Any] | None = None

    @classmethod
    def resolve(cls, path: str | Path, dtype: str | None = None, attn_implementation: str | None = None,
                hash_algorithm: str | None = None, plain: bool = False) -> "ModelSource":
        """`plain`: read `path` as a Hugging Face directory even inside a run (the verifier's
        way: it takes the record's dtype and checks the run binding itself)."""
        p = Path(path)
        if not p.exists():
            raise InputError(f"model {p} does not exist: pass a Hugging Face model directory or a run directory")
        run = p if is_run_dir(p) else (p.parent if p.name == "model" and is_run_dir(p.parent) else None)
        if run is None or plain:
            dt = dtype or "float32"
            if dt not in DTYPE_BY_NAME:
                raise InputError(f"--dtype must be one of {', '.join(DTYPE_BY_NAME)}, got {dt!r}")
            return cls(p, p, dt, attn_implementation or "sdpa", hash_algorithm or "blake3")
        config = jsonio.read_json(run / "config.json", MAX_RUN_CONFIG_BYTES, "run config", InputError)
        try:
            settings = config["settings"]
            run_dtype, run_attn, run_hash = settings["dtype"], settings["attn_implementation"], settings["hash_algorithm"]
        except (KeyError, TypeError):
            raise InputError(f"{run / 'config.json'} is not a readable run config") from None
        for name, given, agreed in (("--dtype", dtype, run_dtype), ("--hash", hash_algorithm, run_hash)):
            if given is not None and given != agreed:
                raise InputError(f"{name} {given} differs from the run's {agreed}: the run's final-model digest is "
                                 f"over its {agreed} weights, so the record could not be bound to it")
        if run_dtype not in DTYPE_BY_NAME:
            raise InputError(f"the run's dtype {str(run_dtype)[:20]!r} is not supported")
        tok = run / "tokenizer" if (run / "tokenizer").is_dir() else None
        return cls(run / "model", tok, run_dtype, attn_implementation or run_attn, run_hash, run, config)


def _run_binding(run_dir: Path, algorithm: str) -> RunBinding:
    """The provider's own run line (checked against the key its transcript names: the provider
    reads its own files here; a client pins the key instead)."""
    from ..training.transcript import Transcript

    path = run_dir / "transcript.jsonl"
    t = Transcript.load(path, Transcript.header_key(path))
    if t.run is None:
        raise InputError(f"{run_dir} has no signed run root: training did not finish, there is no final model to serve")
    if t.algorithm != algorithm:
        raise InputError(f"{run_dir} was recorded with {t.algorithm}, not {algorithm}")
    r = t.run  # Transcript.load checked its signature and that root follows from its parts
    return RunBinding(r.config_digest, r.last_root, r.final_model_digest, r.root)




class ServedModel:
    """One model loaded for inference: its committed digest, its stages and their contexts."""

    def __init__(self, hf_config: dict[str, Any], model: nn.Module, dtype: str, attn_implementation: str,
                 algorithm: str, digest: bytes, source: ModelSource | None = None,
                 run: RunBinding | None = None):
        self.hf_config, self.model = hf_config, model
        self.family = str(hf_config.get("model_type"))
        model.eval()
        self.adapter = adapter_class(self.family)(model)
        self.task = self.adapter.task
        self.dtype, self.attn_implementation, self.algorithm = dtype, attn_implementation, algorithm
        self.digest, self.source, self.run = digest, source, run
        self.tokenizer = None
        self.tokenizer_digest: bytes | None = None
        self.tokenizer_dir: Path | None = None
        self.stages: list[Stage] = self.adapter.inference_stages()
        self.stage_names = [s.name for s in self.stages]

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, dtype: str | None = None, attn_implementation: str | None = None,
             hash_algorithm: str | None = None, plain: bool = False, with_tokenizer: bool = True) -> "ServedModel":
        """Load a model directory or a run directory (its `model/`, in the run's dtype), compute
        its weights digest; for a run, check it is the run's signed final model. `plain` skips
        the run (see `ModelSource.resolve`); `with_tokenizer=False` leaves the tokenizer to the
        caller (a verifier uses the record's)."""
        src = ModelSource.resolve(path, dtype, attn_implementation, hash_algorithm, plain)
        hf_config, model = load_pretrained(src.model_dir, src.attn_implementation, DTYPE_BY_NAME[src.dtype])
        digest, _ = model_commitment(model, src.model_dir, src.hash_algorithm)
        run = None
        if src.run_dir is not None:
            run = _run_binding(src.run_dir, src.hash_algorithm)
            if run.final_model_digest != digest:
                raise InputError(f"{src.model_dir} is not the run's final model: its digest {digest.hex()[:16]}… "
                                 f"differs from the signed final_model_digest {run.final_model_digest.hex()[:16]}…")
        served = cls(hf_config, model, src.dtype, src.attn_implementation, src.hash_algorithm, digest, src, run)
        if served.family not in IMAGE_FAMILIES and with_tokenizer:
            if src.tokenizer_dir is None:
                raise InputError(f"{path} has no tokenizer")
            served.use_tokenizer(src.tokenizer_dir, files_root(src.hash_algorithm, tokenizer_files(src.tokenizer_dir)))
        return served

    def use_tokenizer(self, directory: Path, digest: bytes) -> None:
        self.tokenizer_dir, self.tokenizer_digest = directory, digest
        self.tokenizer = load_tokenizer(directory)

    @property
    def compute_dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def blocks(self, layers_per_block: int) -> LayerBlocks:
        return LayerBlocks(len(self.stages) - 2, layers_per_block)

    def describe(self, blocks: LayerBlocks, block: int) -> str:
        return blocks.describe(block, self.stage_names)

    @property
    def label_names(self) -> list[str] | None:
        if self.task != "classification":
            return None
        if self.source is not None and self.source.run_config is not None:
            labels = (self.source.run_config.get("data") or {}).get("labels")
            if isinstance(labels, list) and labels:
                return [str(x) for x in labels]
        id2label = self.hf_config.get("id2label")
        if isinstance(id2label, dict):
            return [str(id2label.get(str(i), i)) for i in range(len(id2label))]
        return None

    @property
    def max_positions(self) -> int:
        for k in ("max_position_embeddings", "n_positions"):
            v = self.hf_config.get(k)
            if isinstance(v, int) and v > 0:
                return v
        return 1 << 30

    @property
    def eos_token_ids(self) -> list[int]:
        """The end-of-sequence tokens of the model's config.json (a policy's default)."""
        return config_eos_token_ids(self.hf_config)

    # --- inputs ----------------------------------------------------------------------------
    def prompt_inputs(self, prompt: str, chat_template: str | None = None) -> dict[str, torch.Tensor]:
        """The input ids of `prompt`, rendered with the policy's chat template when it has one."""
        if self.task != "causal_lm":
            raise InputError(f"a {self.family} model is a classifier: pass --text (BERT) or --image (vision), not --prompt")
        return {"input_ids": prompt_ids(self.tokenizer, prompt, chat_template)}

    def text_inputs(self, text: str) -> dict[str, torch.Tensor]:
        if self.family != "bert":
            what = "--prompt" if self.task == "causal_lm" else "--image"
            raise InputError(f"--text is for text classifiers (BERT); a {self.family} model takes {what}")
        return classification_inputs(self.tokenizer, text, self.max_positions)

    def image_inputs(self, path: str | Path, image_size: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        if self.family not in IMAGE_FAMILIES:
            what = "--prompt" if self.task == "causal_lm" else "--text"
            raise InputError(f"--image is for image classifiers (ViT, DINOv2, ResNet); a {self.family} model takes {what}")
        pixels, info = image_pixels(path, image_size or self.image_size, self.algorithm)
        return {"pixel_values": pixels}, info

    @property
    def image_size(self) -> int:
        if self.source is not None and self.source.run_config is not None:
            size = (self.source.run_config.get("batch") or {}).get("image_size")
            if isinstance(size, int) and size > 0:
                return size
        size = self.hf_config.get("image_size")
        return size if isinstance(size, int) and size > 0 else 64

    # --- execution -------------------------------------------------------------------------
    def sliding_window(self) -> int | None:
        return self.adapter.sliding_window() if self.task == "causal_lm" else None

    def step_context(self, first: int, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Side inputs of one step, derived from the step's inputs and position alone."""
        return self.adapter.inference_context(first, inputs)

    def run_block(self, blocks: LayerBlocks, block: int, hidden: torch.Tensor | None, ctx: dict[str, Any],
                  cache, every_position: bool = False) -> torch.Tensor:
        """Run layer block `block`; `every_position` (a causal LM's last block, teacher forcing):
        the head gives the logits [q, V] of every position instead of the last one's."""
        ctx["cache"] = cache
        h = hidden
        for s in blocks.stages(block):
            module = self.stages[s].module
            h = module.every_position(h) if every_position and self.stage_names[s] == "head" else module(h, ctx)
        return h
