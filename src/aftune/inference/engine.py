"""Auditable inference: generation recorded layer block by layer block (`aftune infer`).

    aftune infer --model runs/demo --prompt "Q: what is 2+2?" --record-dir records
    aftune infer --model runs/bert --text "great fine okay" --record-dir records
    aftune infer --model runs/vit --image cat.png --record-dir records

The provider runs the model as layer blocks (`config.LayerBlocks`: block 0 holds the embedding,
the last block the head). A causal LM generates with a KV cache: step 0 (prefill) runs the
prompt, step k >= 1 runs the token chosen at step k-1. Each layer block keeps its own cache, so
block l's work at step k depends only on the inputs block l received at steps 0..k, all of them
committed. For every step and every block boundary the record commits the digest of the hidden
states of the step's new positions; the concatenation over steps is stored in full every
`activation_interval` (I_A) boundaries. A verifier replays one layer block alone by feeding it
the committed inputs step by step with its own cache: the very same sequence of calls, so strict
mode compares digests bitwise (SPEC.md 8).

The last block recomputes the logits of every step from the hidden state; the record commits
every generated token, the sampling parameters and the seed, and sampling draws its uniform from
a hash of the seed and the step, so every token can be re-derived. Classifiers (BERT, ViT,
DINOv2, ResNet) run one forward pass and commit the label.

A record is one canonical-JSON file named by the digest of its bytes (never truncated, never
overwritten) in `R/records/`, its tensors in the content-addressed store `R/objects/`, the
tokenizer in `R/tokenizers/<files root>/`, and the provider's signed receipt in `R/receipts/`.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core import jsonio
from ..training.settings import LayerBlocks
from ..core.encoding import (DTYPES_BY_NAME, HASH_ALGORITHMS, TAG_FILE, TAG_INFERENCE_RECORD, TAG_SAMPLE, canonical_json, hash_message, parse_hex_digest,
                       u64)
from ..errors import CommitmentMismatch, InputError, MissingExtra, RecordError
from ..core.merkle import files_root, merkle_root, tensors_root
from ..training.run import DTYPE_BY_NAME
from ..core.store import ObjectStore, TensorRef

RECORD_FORMAT = "aftune.inference.v1"

DECODER_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt2")
IMAGE_FAMILIES = ("vit", "dinov2", "resnet")
MAX_RECORD_BYTES = 256 << 20
MAX_NEW_TOKENS = 4096
MAX_PROMPT_CHARS = 1 << 20
IMAGE_MEAN = (0.5, 0.5, 0.5)  # as training batches (SPEC.md 4.4)
IMAGE_STD = (0.5, 0.5, 0.5)


# --- settings --------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationSettings:
    """How a causal LM picks its tokens; all of it is committed in the record."""

    max_new_tokens: int = 32  # tokens to generate at most (fewer when an end-of-sequence token comes)
    temperature: float = 0.0  # 0: greedy (argmax); > 0: seeded sampling at this temperature
    top_p: float = 1.0  # nucleus: sample among the most likely tokens holding this much mass
    seed: int = 0  # sampling seed (the uniform of step k is derived from it and k)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def problems(self) -> list[str]:
        out = []
        v = self.max_new_tokens
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_NEW_TOKENS:
            out.append(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], got {v!r}")
        v = self.temperature
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 100:
            out.append(f"temperature must be a number in [0, 100] (0 for greedy), got {v!r}")
        v = self.top_p
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 1:
            out.append(f"top_p must be a number in (0, 1], got {v!r}")
        v = self.seed
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            out.append(f"seed must be an integer in [0, 2^63), got {v!r}")
        return out

    def validate(self) -> "GenerationSettings":
        problems = self.problems()
        if problems:
            raise InputError("invalid generation settings:\n  - " + "\n  - ".join(problems))
        return self

    def to_json(self, eos_token_ids: list[int]) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": float(self.temperature),
                "top_p": float(self.top_p), "seed": self.seed, "eos_token_ids": eos_token_ids}


@dataclass(frozen=True)
class RecordSettings:
    """How a request is recorded."""

    layers_per_block: int = 2  # B_L: layers per layer block
    activation_interval: int = 1  # I_A: boundary activations stored in full every I_A boundaries
    hash_algorithm: str = "blake3"

    def validate(self) -> "RecordSettings":
        problems = []
        for name in ("layers_per_block", "activation_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        if self.hash_algorithm not in HASH_ALGORITHMS:
            problems.append(f"hash algorithm must be one of {', '.join(HASH_ALGORITHMS)}")
        if problems:
            raise InputError("invalid record settings:\n  - " + "\n  - ".join(problems))
        return self

    def stored(self, boundary: int) -> bool:
        """Whether boundary `boundary` (input of layer block `boundary`) is stored in full."""
        return boundary % self.activation_interval == 0


# --- the model as inference stages -------------------------------------------------------------

class KVCache:
    """Keys and values of the positions seen so far, one entry per decoder layer index.

    Implements the one method Hugging Face attention layers call (`update`); each layer block
    owns one, so a verifier replaying block l alone rebuilds exactly the provider's cache."""

    def __init__(self):
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self._keys:
            key = torch.cat([self._keys[layer_idx], key], dim=-2)
            value = torch.cat([self._values[layer_idx], value], dim=-2)
        self._keys[layer_idx], self._values[layer_idx] = key, value
        return key, value


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class _TokenEmbedding(nn.Module):
    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, hidden, ctx):
        return self.embed_tokens(ctx["input_ids"])


class _GPT2Embedding(nn.Module):
    def __init__(self, wte: nn.Module, wpe: nn.Module, drop: nn.Module):
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop

    def forward(self, hidden, ctx):
        return self.drop(self.wte(ctx["input_ids"]) + self.wpe(ctx["position_ids"]))


class _CachedDecoderLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, ctx):
        return _first(self.layer(hidden, attention_mask=ctx["attention_mask"], position_ids=ctx["position_ids"],
                                 past_key_values=ctx["cache"], use_cache=True,
                                 position_embeddings=ctx["position_embeddings"]))


class _CachedGPT2Block(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden, ctx):
        return _first(self.block(hidden, past_key_values=ctx["cache"], attention_mask=ctx["attention_mask"],
                                 use_cache=True))


class _NextTokenLogits(nn.Module):
    """Final norm and LM head on the step's last position: the logits of the next token."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden, ctx):
        return self.lm_head(self.norm(hidden[:, -1:, :]))[0, -1]


class _ClassifierLogits(nn.Module):
    """The classification head without the loss: logits of the one example."""

    def __init__(self, family: str, model: nn.Module):
        super().__init__()
        self.family = family
        if family == "bert":
            self.pooler, self.dropout, self.classifier = model.bert.pooler, model.dropout, model.classifier
        elif family == "vit":
            self.layernorm, self.classifier = model.vit.layernorm, model.classifier
        elif family == "dinov2":
            self.layernorm, self.classifier = model.dinov2.layernorm, model.classifier
        else:  # resnet
            self.pooler, self.classifier = model.resnet.pooler, model.classifier

    def forward(self, hidden, ctx):
        if self.family == "bert":
            logits = self.classifier(self.dropout(self.pooler(hidden)))
        elif self.family == "vit":
            logits = self.classifier(self.layernorm(hidden)[:, 0, :])
        elif self.family == "dinov2":
            seq = self.layernorm(hidden)
            logits = self.classifier(torch.cat([seq[:, 0], seq[:, 1:].mean(dim=1)], dim=1))
        else:
            logits = self.classifier(self.pooler(hidden))
        return logits[0]


def _decoder_stages(family: str, model: nn.Module) -> list[tuple[str, nn.Module]]:
    if family == "gpt2":
        tr = model.transformer
        stages = [("embedding", _GPT2Embedding(tr.wte, tr.wpe, tr.drop))]
        stages += [(f"layer.{i}", _CachedGPT2Block(b)) for i, b in enumerate(tr.h)]
        stages.append(("head", _NextTokenLogits(tr.ln_f, model.lm_head)))
        return stages
    inner = model.model
    stages = [("embedding", _TokenEmbedding(inner.embed_tokens))]
    stages += [(f"layer.{i}", _CachedDecoderLayer(layer)) for i, layer in enumerate(inner.layers)]
    stages.append(("head", _NextTokenLogits(inner.norm, model.lm_head)))
    return stages


def _classifier_stages(family: str, model: nn.Module):
    from ..models import adapter_class

    adapter = adapter_class(family)(model)  # checks single-label classification and attention
    stages = [(s.name, s.module) for s in adapter.stages[:-1]]
    stages.append(("head", _ClassifierLogits(family, model)))
    return stages, adapter


# --- model sources and run binding --------------------------------------------------------------

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
        try:
            config = jsonio.loads((run / "config.json").read_bytes())
            settings = config["settings"]
            run_dtype, run_attn, run_hash = settings["dtype"], settings["attn_implementation"], settings["hash_algorithm"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{run / 'config.json'} is not a readable run config") from None
        for name, given, agreed in (("--dtype", dtype, run_dtype), ("--hash", hash_algorithm, run_hash)):
            if given is not None and given != agreed:
                raise InputError(f"{name} {given} differs from the run's {agreed}: the run's final-model digest is "
                                 f"over its {agreed} weights, so the record could not be bound to it")
        if run_dtype not in DTYPE_BY_NAME:
            raise InputError(f"the run's dtype {run_dtype!r} is not supported")
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


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingExtra("transformers", "hf") from None
    return transformers


def load_tokenizer(directory: Path):
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                          trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a tokenizer from {directory}: {exc}") from None


def tokenizer_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


class ServedModel:
    """One model loaded for inference: its committed digest, its stages and their contexts."""

    def __init__(self, hf_config: dict[str, Any], model: nn.Module, dtype: str, attn_implementation: str,
                 algorithm: str, digest: bytes, source: ModelSource | None = None,
                 run: RunBinding | None = None):
        self.hf_config, self.model = hf_config, model
        self.family = str(hf_config.get("model_type"))
        if self.family not in DECODER_FAMILIES + ("bert",) + IMAGE_FAMILIES:
            raise InputError(f"model type {self.family!r} cannot be served; supported: "
                             f"{', '.join(DECODER_FAMILIES + ('bert',) + IMAGE_FAMILIES)}")
        self.task = "causal_lm" if self.family in DECODER_FAMILIES else "classification"
        self.dtype, self.attn_implementation, self.algorithm = dtype, attn_implementation, algorithm
        self.digest, self.source, self.run = digest, source, run
        self.tokenizer = None
        self.tokenizer_digest: bytes | None = None
        self.tokenizer_dir: Path | None = None
        model.eval()
        self.adapter = None
        if self.task == "causal_lm":
            self.stages = _decoder_stages(self.family, model)
        else:
            self.stages, self.adapter = _classifier_stages(self.family, model)
        self.stage_names = [n for n, _ in self.stages]

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, dtype: str | None = None, attn_implementation: str | None = None,
             hash_algorithm: str | None = None, plain: bool = False, with_tokenizer: bool = True) -> "ServedModel":
        """Load a model directory or a run directory (its `model/`, in the run's dtype), compute
        its weights digest; for a run, check it is the run's signed final model. `plain` skips
        the run (see `ModelSource.resolve`); `with_tokenizer=False` leaves the tokenizer to the
        caller (a verifier uses the record's)."""
        from ..models import load_pretrained, model_weights

        src = ModelSource.resolve(path, dtype, attn_implementation, hash_algorithm, plain)
        hf_config, model = load_pretrained(src.model_dir, src.attn_implementation, DTYPE_BY_NAME[src.dtype])
        digest, _ = tensors_root(src.hash_algorithm, model_weights(model))
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
            served.tokenizer_dir = src.tokenizer_dir
            served.tokenizer_digest = files_root(src.hash_algorithm, tokenizer_files(src.tokenizer_dir))
            served.tokenizer = load_tokenizer(src.tokenizer_dir)
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
        return eos_token_ids(self.hf_config)

    # --- inputs ----------------------------------------------------------------------------
    def prompt_inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        if self.task != "causal_lm":
            raise InputError(f"a {self.family} model is a classifier: pass --text (BERT) or --image (vision), not --prompt")
        return {"input_ids": prompt_ids(self.tokenizer, prompt)}

    def text_inputs(self, text: str) -> dict[str, torch.Tensor]:
        if self.family != "bert":
            what = "--prompt" if self.task == "causal_lm" else "--image"
            raise InputError(f"--text is for text classifiers (BERT); a {self.family} model takes {what}")
        return classification_inputs(self.tokenizer, text, self.max_positions)

    def image_inputs(self, path: str | Path, image_size: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        if self.family not in IMAGE_FAMILIES:
            what = "--prompt" if self.task == "causal_lm" else "--text"
            raise InputError(f"--image is for image classifiers (ViT, DINOv2, ResNet); a {self.family} model takes {what}")
        size = image_size or self.image_size
        pixels, info = image_pixels(path, size, self.algorithm)
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
        c = self.hf_config
        if self.family == "mistral" and c.get("sliding_window"):
            return int(c["sliding_window"])
        if self.family in ("qwen2", "qwen3") and c.get("use_sliding_window") and c.get("sliding_window"):
            return int(c["sliding_window"])
        return None

    def step_context(self, first: int, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Side inputs of one step, derived from the step's inputs and position alone."""
        dtype = self.compute_dtype
        if self.task == "causal_lm":
            ids = inputs["input_ids"]
            q = ids.shape[1]
            positions = torch.arange(first, first + q, dtype=torch.int64)[None, :]
            mask = None  # a decode step attends to every cached position; SDPA's causal mode for a prefill
            if q > 1 and not (first == 0 and self.attn_implementation == "sdpa"):
                allowed = torch.arange(first + q)[None, :] <= positions[0][:, None]  # [q, first+q]
                mask = torch.zeros(1, 1, q, first + q, dtype=dtype)
                mask = mask.masked_fill(~allowed[None, None], torch.finfo(dtype).min)
            ctx = {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "cache": None,
                   "position_embeddings": None}
            if self.family != "gpt2":
                probe = torch.empty(0, dtype=dtype)
                ctx["position_embeddings"] = self.model.model.rotary_emb(probe, positions)
            return ctx
        batch = dict(inputs)
        if "pixel_values" in batch and batch["pixel_values"].dtype != dtype:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.no_grad():
            ctx = self.adapter.context(batch)
        ctx["cache"] = None
        return ctx

    def run_block(self, blocks: LayerBlocks, block: int, hidden: torch.Tensor | None, ctx: dict[str, Any],
                  cache: KVCache | None) -> torch.Tensor:
        ctx["cache"] = cache
        h = hidden
        for s in blocks.stages(block):
            h = self.stages[s][1](h, ctx)
        return h


def eos_token_ids(hf_config: dict[str, Any]) -> list[int]:
    eos = hf_config.get("eos_token_id")
    if isinstance(eos, bool):
        return []
    if isinstance(eos, int):
        return [eos]
    if isinstance(eos, list):
        return sorted({e for e in eos if isinstance(e, int) and not isinstance(e, bool)})
    return []


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of a prompt: the tokenizer without special tokens, BOS prepended when the
    tokenizer has one (as training examples start). I64 [1, P]."""
    if not isinstance(prompt, str) or not prompt:
        raise InputError("the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    _check_text(prompt, "prompt")
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if not ids:
        raise InputError("the prompt has no tokens")
    return torch.tensor([ids], dtype=torch.int64)


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the {what} is not valid Unicode text (lone surrogate)") from None


def classification_inputs(tokenizer, text: str, max_length: int) -> dict[str, torch.Tensor]:
    if not isinstance(text, str) or not text:
        raise InputError("the text is empty")
    _check_text(text, "text")
    enc = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
    ids = enc["input_ids"].to(torch.int64)
    tt = enc.get("token_type_ids")
    return {"input_ids": ids, "attention_mask": enc["attention_mask"].to(torch.int64),
            "token_type_ids": tt.to(torch.int64) if tt is not None else torch.zeros_like(ids)}


def image_pixels(path: str | Path, size: int, algorithm: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """F32 [1, 3, size, size] exactly as training batches are built (SPEC.md 4.4), and the
    image file's name and digest (H(TAG_FILE || bytes))."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise MissingExtra("pillow", "hf") from None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p} does not exist")
    data = p.read_bytes()
    try:
        import io

        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            raw = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {p}: {exc}") from None
    x = raw.reshape(size, size, 3).permute(2, 0, 1).to(torch.float32) / 255.0
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGE_STD, dtype=torch.float32)[:, None, None]
    pixels = ((x - mean) / std)[None].contiguous()
    return pixels, {"name": p.name, "digest": hash_message(algorithm, TAG_FILE, data).hex(), "size": size}


# --- token choice ----------------------------------------------------------------------------

def sample_uniform(algorithm: str, seed: int, step: int) -> float:
    """The uniform of generation step `step`: the first 8 bytes of H(TAG_SAMPLE || u64(seed) ||
    u64(step)), big-endian, top 53 bits, divided by 2^53: in [0, 1), exact in binary64."""
    d = hash_message(algorithm, TAG_SAMPLE, u64(seed), u64(step))
    return (int.from_bytes(d[:8], "big") >> 11) / float(1 << 53)


def greedy_token(logits: torch.Tensor) -> int:
    """The index of the largest logit; the smallest such index on ties."""
    z = logits.detach().double()
    return int(torch.nonzero(z == z.max())[0, 0])


def nucleus_probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Binary64 probabilities after temperature and nucleus filtering (unnormalised inside the
    nucleus, zero outside). The nucleus: tokens sorted by probability (ties by index) are kept
    while the mass before them is below top_p (the first is always kept)."""
    z = logits.detach().double() / float(temperature)
    p = torch.softmax(z, dim=-1)
    if top_p >= 1.0:
        return p
    order = torch.sort(p, descending=True, stable=True).indices
    sorted_p = p[order]
    before = torch.cumsum(sorted_p, dim=0) - sorted_p
    keep_sorted = before < float(top_p)
    keep_sorted[0] = True
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return torch.where(keep, p, torch.zeros_like(p))


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, u: float) -> int:
    """Inverse-CDF draw in vocabulary order: the first index j with u * total < C[j], where C is
    the running sum of the nucleus probabilities and total its last value."""
    q = nucleus_probabilities(logits, temperature, top_p)
    c = torch.cumsum(q, dim=0)
    x = torch.tensor([u * float(c[-1])], dtype=torch.float64)
    j = int(torch.searchsorted(c, x, right=True)[0])
    if j >= q.numel():  # rounding at the very top: the last token of the nucleus
        j = int(torch.nonzero(q > 0)[-1, 0])
    return j


def choose_token(logits: torch.Tensor, gen: GenerationSettings, algorithm: str, step: int) -> int:
    if not bool(torch.isfinite(logits).all()):
        raise InputError(f"generation step {step}: the model produced non-finite logits")
    if not gen.sampling:
        return greedy_token(logits)
    return sample_token(logits, gen.temperature, gen.top_p, sample_uniform(algorithm, gen.seed, step))


# --- deviations (attack simulations for tests; honest serving uses none) ------------------------

class ServingDeviation:
    """A provider that departs from the agreed inference, for the attack suite and the tests.
    The honest engine uses none; each hook returns its input unchanged by default."""

    def weights(self, model: nn.Module) -> None:
        """Change the served weights after the committed digest was taken (the claim stays)."""

    def inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return inputs

    def boundary(self, step: int, boundary: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def token(self, step: int, logits: torch.Tensor, token: int) -> int:
        """The token (or a classifier's label, at step 0) reported instead of the chosen one."""
        return token


# --- record keys -----------------------------------------------------------------------------

def step_key(step: int, boundary: int) -> str:
    return f"step/{step:06d}/boundary/{boundary:04d}"


def boundary_key(boundary: int) -> str:
    return f"boundary/{boundary:04d}"


def input_key(field_name: str) -> str:
    return f"input/{field_name}"


def digests_root(algorithm: str, rows: dict[str, TensorRef], prefix: str) -> bytes:
    return merkle_root(algorithm, {k: r.digest for k, r in rows.items() if k.startswith(prefix)})


def record_id(algorithm: str, data: bytes) -> bytes:
    return hash_message(algorithm, TAG_INFERENCE_RECORD, data)


def utc_now() -> str:
    """RFC 3339 UTC time with microseconds, e.g. 2025-01-31T12:00:00.123456Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- the record directory --------------------------------------------------------------------

class RecordDir:
    """R/records/<id>.json, R/objects/, R/tokenizers/<root>/, R/receipts/<id>.json."""

    def __init__(self, root: str | Path, algorithm: str):
        self.root = Path(root)
        self.algorithm = algorithm
        self.store = ObjectStore(self.root / "objects", algorithm)

    def record_path(self, rid: bytes) -> Path:
        return self.root / "records" / f"{rid.hex()}.json"

    def receipt_path(self, rid: bytes) -> Path:
        return self.root / "receipts" / f"{rid.hex()}.json"

    def tokenizer_dir(self, digest: bytes) -> Path:
        return self.root / "tokenizers" / digest.hex()

    def keep_tokenizer(self, source: Path, digest: bytes) -> Path:
        """Copy the tokenizer files once, named by their files root."""
        target = self.tokenizer_dir(digest)
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        for name, data in tokenizer_files(source).items():
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, target)
        except OSError:  # another writer was first: same content by construction
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def write_new(self, path: Path, data: bytes) -> None:
        """Create `path` with `data`; an existing file is never overwritten."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                if path.read_bytes() != data:
                    raise RecordError(f"{path} exists with other content: records are never overwritten") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def record_ids(self) -> list[str]:
        d = self.root / "records"
        if not d.is_dir():
            return []
        return sorted(p.stem for p in d.glob("*.json") if len(p.stem) == 64 and not p.stem.strip("0123456789abcdef"))


# --- recording one request -------------------------------------------------------------------

@dataclass
class _Trace:
    """What one request computed: the step layout, tokens and boundary outputs of each step."""

    steps: list[tuple[int, int]] = field(default_factory=list)  # (first position, number of positions)
    tokens: list[int] = field(default_factory=list)
    boundaries: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # boundary -> per-step outputs
    label: int | None = None


@dataclass(frozen=True)
class InferenceResult:
    record_id: bytes
    record_path: Path
    tokens: tuple[int, ...]
    text: str | None
    label: int | None
    label_name: str | None
    receipt: Any  # receipt.Receipt
    receipt_path: Path
    seconds: float


class InferenceEngine:
    """The provider's side: one loaded model, one record directory, one signing key.

    `generate` and `classify` are thread-safe: the forward computation is serialised by a lock,
    hashing, storing and signing of each request's own record run outside it."""

    def __init__(self, served: ServedModel, record_dir: str | Path, key, settings: RecordSettings = RecordSettings(),
                 deviation: ServingDeviation | None = None):
        self.served, self.key = served, key
        self.settings = RecordSettings(settings.layers_per_block, settings.activation_interval,
                                       served.algorithm).validate()
        self.blocks = served.blocks(self.settings.layers_per_block)
        self.records = RecordDir(record_dir, served.algorithm)
        self.deviation = deviation
        self._lock = threading.Lock()
        if served.tokenizer_dir is not None:
            kept = self.records.keep_tokenizer(served.tokenizer_dir, served.tokenizer_digest)
            served.use_tokenizer(kept, served.tokenizer_digest)
        if deviation is not None:
            with torch.no_grad():
                deviation.weights(served.model)

    # --- requests --------------------------------------------------------------------------
    def generate(self, prompt: str, gen: GenerationSettings = GenerationSettings(),
                 on_token: Callable[[int, int], None] | None = None) -> InferenceResult:
        gen.validate()
        t0 = time.perf_counter()
        inputs = self.served.prompt_inputs(prompt)
        p = inputs["input_ids"].shape[1]
        if p + gen.max_new_tokens > self.served.max_positions:
            raise InputError(f"the prompt has {p} tokens; with max_new_tokens {gen.max_new_tokens} it exceeds the "
                             f"model's {self.served.max_positions} positions: shorten it or ask for fewer tokens")
        window = self.served.sliding_window()
        if window is not None and p + gen.max_new_tokens > window:
            raise InputError(f"prompt plus new tokens exceed the sliding window ({window}), which aftune does not replay")
        if self.deviation is not None:
            inputs = self.deviation.inputs(inputs)
        with self._lock:
            trace = self._generate(inputs, gen, on_token)
        text = self.served.tokenizer.decode(trace.tokens, skip_special_tokens=True)
        doc_input = {"kind": "prompt", "prompt": prompt}
        doc_output = {"tokens": trace.tokens, "text": text}
        outputs = {"output/tokens": ("tokens", torch.tensor(trace.tokens, dtype=torch.int64))}
        generation = gen.to_json(self.served.eos_token_ids)
        return self._finish(inputs, trace, doc_input, doc_output, outputs, generation, t0, text=text)

    def classify(self, *, text: str | None = None, image: str | Path | None = None) -> InferenceResult:
        t0 = time.perf_counter()
        if (text is None) == (image is None):
            raise InputError("give exactly one input: --text for BERT, --image for vision models")
        if text is not None:
            inputs = self.served.text_inputs(text)
            doc_input: dict[str, Any] = {"kind": "text", "text": text}
        else:
            inputs, info = self.served.image_inputs(image)
            doc_input = {"kind": "image", "image": info}
        if self.deviation is not None:
            inputs = self.deviation.inputs(inputs)
        with self._lock:
            trace = self._forward(inputs)
        names = self.served.label_names
        label_name = names[trace.label] if names and trace.label < len(names) else None
        doc_output = {"label": trace.label, "label_name": label_name}
        outputs = {"output/label": ("label", torch.tensor([trace.label], dtype=torch.int64))}
        return self._finish(inputs, trace, doc_input, doc_output, outputs, None, t0, label_name=label_name)

    # --- computation -----------------------------------------------------------------------
    @torch.inference_mode()
    def _generate(self, inputs, gen: GenerationSettings, on_token) -> _Trace:
        served, blocks, algorithm = self.served, self.blocks, self.served.algorithm
        nb = len(blocks)
        caches = [KVCache() for _ in range(nb)]
        trace = _Trace(boundaries={b: [] for b in range(1, nb)})
        eos = set(served.eos_token_ids)
        step_inputs = {"input_ids": inputs["input_ids"]}
        first = 0
        for step in range(gen.max_new_tokens):
            q = step_inputs["input_ids"].shape[1]
            ctx = served.step_context(first, step_inputs)
            h = None
            for b in range(nb):
                if b > 0:
                    if self.deviation is not None:
                        h = self.deviation.boundary(step, b, h)
                    trace.boundaries[b].append(h)
                h = served.run_block(blocks, b, h, ctx, caches[b])
            token = choose_token(h, gen, algorithm, step)
            if self.deviation is not None:
                token = self.deviation.token(step, h, token)
            trace.steps.append((first, q))
            trace.tokens.append(token)
            if on_token:
                on_token(step + 1, gen.max_new_tokens)
            if token in eos:
                break
            first += q
            step_inputs = {"input_ids": torch.tensor([[token]], dtype=torch.int64)}
        return trace

    @torch.inference_mode()
    def _forward(self, inputs) -> _Trace:
        served, blocks = self.served, self.blocks
        nb = len(blocks)
        trace = _Trace(boundaries={b: [] for b in range(1, nb)}, steps=[(0, 1)])
        ctx = served.step_context(0, inputs)
        h = None
        for b in range(nb):
            if b > 0:
                if self.deviation is not None:
                    h = self.deviation.boundary(0, b, h)
                trace.boundaries[b].append(h)
            h = served.run_block(blocks, b, h, ctx, None)
        if not bool(torch.isfinite(h).all()):
            raise InputError("the model produced non-finite logits")
        trace.label = greedy_token(h)
        if self.deviation is not None:
            trace.label = self.deviation.token(0, h, trace.label)
        return trace

    # --- the record ------------------------------------------------------------------------
    def _finish(self, inputs, trace: _Trace, doc_input, doc_output, outputs, generation, t0,
                text: str | None = None, label_name: str | None = None) -> InferenceResult:
        from .receipt import issue_receipt

        served, algorithm, store = self.served, self.served.algorithm, self.records.store
        rows: dict[str, TensorRef] = {}
        to_store: list[tuple[TensorRef, torch.Tensor]] = []
        for name, t in inputs.items():
            ref = TensorRef.of(name, t, algorithm)
            rows[input_key(name)] = ref
            to_store.append((ref, t))
        for key, (name, t) in outputs.items():
            ref = TensorRef.of(name, t, algorithm)
            rows[key] = ref
            to_store.append((ref, t))
        single = len(trace.steps) == 1
        for b, per_step in trace.boundaries.items():
            for k, h in enumerate(per_step):
                rows[step_key(k, b)] = TensorRef.of("activation", h, algorithm)
            full = per_step[0] if single else torch.cat(per_step, dim=1)
            ref = rows[step_key(0, b)] if single else TensorRef.of("activation", full, algorithm)
            rows[boundary_key(b)] = ref
            if self.settings.stored(b):
                to_store.append((ref, full))
        for ref, t in to_store:
            store.put(ref, t)
        input_digest = digests_root(algorithm, rows, "input/")
        output_digest = digests_root(algorithm, rows, "output/")
        doc = {
            "format": RECORD_FORMAT,
            "hash": algorithm,
            "created": utc_now(),
            "nonce": os.urandom(16).hex(),
            "task": served.task,
            "model": {"config": served.hf_config, "digest": served.digest.hex(), "dtype": served.dtype,
                      "attn_implementation": served.attn_implementation,
                      "tokenizer": served.tokenizer_digest.hex() if served.tokenizer_digest else None,
                      "run": served.run.to_json() if served.run else None,
                      "source": str(Path(served.source.run_dir or served.source.model_dir).resolve())
                      if served.source else None},
            "layout": {"stages": served.stage_names, "layer_blocks": [list(r) for r in self.blocks.ranges],
                       "layers_per_block": self.settings.layers_per_block,
                       "activation_interval": self.settings.activation_interval},
            "generation": generation,
            "input": {**doc_input, "digest": input_digest.hex()},
            "output": {**doc_output, "digest": output_digest.hex()},
            "steps": [list(s) for s in trace.steps],
            "tensors": [[k, r.name, r.dtype, list(r.shape), r.digest.hex()] for k, r in sorted(rows.items())],
            # CPU results depend on the intra-op thread count: strict replay uses the same one
            "environment": {"torch_threads": torch.get_num_threads()},
        }
        data = canonical_json(doc)
        rid = record_id(algorithm, data)
        path = self.records.record_path(rid)
        self.records.write_new(path, data)
        receipt = issue_receipt(self.key, algorithm, served.digest, input_digest, output_digest, rid,
                                time=doc["created"])
        receipt_path = self.records.receipt_path(rid)
        self.records.write_new(receipt_path, canonical_json(receipt.to_json()) + b"\n")
        return InferenceResult(rid, path, tuple(trace.tokens), text, trace.label, label_name, receipt, receipt_path,
                               time.perf_counter() - t0)


# --- reading a record ------------------------------------------------------------------------

def _need(obj: Any, name: str, kind, where: str = "record"):
    v = obj.get(name) if isinstance(obj, dict) else None
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise RecordError(f"{where}: '{name}' is missing or malformed")
    return v


def parse_rows(rows: Any) -> dict[str, TensorRef]:
    if not isinstance(rows, list) or len(rows) > 5_000_000:
        raise RecordError("record: 'tensors' must be a list of [key, name, dtype, shape, digest] rows")
    out: dict[str, TensorRef] = {}
    for row in rows:
        if not isinstance(row, list) or len(row) != 5:
            raise RecordError("record: each tensor row is [key, name, dtype, shape, digest]")
        key, name, dtype, shape, digest = row
        if not isinstance(key, str) or not 0 < len(key) <= 1024 or not isinstance(name, str) or len(name) > 1024:
            raise RecordError(f"record: bad tensor key or name {str(key)[:80]!r}")
        if key in out:
            raise RecordError(f"record: duplicate tensor key {key!r}")
        if dtype not in DTYPES_BY_NAME:
            raise RecordError(f"record: {key}: unknown dtype {str(dtype)[:20]!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise RecordError(f"record: {key}: bad shape")
        try:
            out[key] = TensorRef(name, dtype, tuple(shape), parse_hex_digest(digest, f"record: {key}"))
        except InputError as exc:
            raise RecordError(str(exc)) from None
    return out


@dataclass
class InferenceRecord:
    """One record, read from hostile files: its bytes hash to its name before anything is used."""

    records: RecordDir
    record_id: bytes
    doc: dict[str, Any]
    rows: dict[str, TensorRef]

    @classmethod
    def open(cls, record_dir: str | Path, record: str | None = None) -> "InferenceRecord":
        root = Path(record_dir)
        if not root.is_dir():
            raise InputError(f"record directory {root} does not exist")
        ids = RecordDir(root, "blake3").record_ids()
        if record is None:
            if len(ids) != 1:
                raise InputError(f"{root} holds {len(ids)} records: choose one with --record ID "
                                 f"({', '.join(i[:16] + '…' for i in ids[:5])})" if ids else f"{root} holds no records")
            name = ids[0]
        else:
            rec = record.strip().lower()
            if rec.endswith(".json"):
                rec = Path(rec).stem
            if not rec or rec.strip("0123456789abcdef"):
                raise InputError(f"a record id is hexadecimal, got {record[:80]!r}")
            matches = [i for i in ids if i.startswith(rec)]
            if len(matches) != 1:
                raise InputError(f"{'no' if not matches else 'more than one'} record in {root} starts with {rec[:64]}")
            name = matches[0]
        path = root / "records" / f"{name}.json"
        data = jsonio.read_capped(path, MAX_RECORD_BYTES)
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError(f"{path} is larger than {MAX_RECORD_BYTES} bytes")
        try:
            doc = jsonio.loads(data)
        except ValueError as exc:
            raise RecordError(f"{path} is not valid JSON ({exc}): truncated or corrupt") from None
        if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
            raise RecordError(f"{path} is not an {RECORD_FORMAT} record")
        algorithm = doc.get("hash")
        if algorithm not in HASH_ALGORITHMS:
            raise RecordError(f"{path}: unknown hash {str(algorithm)[:20]!r}")
        rid = record_id(algorithm, data)
        if rid.hex() != name:
            raise CommitmentMismatch(f"record {name[:16]}…: the file's bytes hash to {rid.hex()[:16]}…, not to its "
                                     "name: the record was edited after it was written")
        rec = cls(RecordDir(root, algorithm), rid, doc, parse_rows(doc.get("tensors")))
        rec._check_structure()
        return rec

    # --- structure -------------------------------------------------------------------------
    def _check_structure(self) -> None:
        d = self.doc
        if d.get("task") not in ("causal_lm", "classification"):
            raise RecordError("record: 'task' must be causal_lm or classification")
        model = _need(d, "model", dict)
        _need(model, "config", dict, "record: model")
        for k in ("dtype", "attn_implementation"):
            _need(model, k, str, "record: model")
        if model["dtype"] not in DTYPE_BY_NAME:
            raise RecordError(f"record: model.dtype {model['dtype']!r} is not supported")
        layout = _need(d, "layout", dict)
        for k in ("layers_per_block", "activation_interval"):
            v = _need(layout, k, int, "record: layout")
            if v < 1:
                raise RecordError(f"record: layout.{k} must be positive")
        _need(layout, "stages", list, "record: layout")
        _need(layout, "layer_blocks", list, "record: layout")
        steps = _need(d, "steps", list)
        if not steps or len(steps) > MAX_NEW_TOKENS or not all(
                isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                            for x in s) for s in steps):
            raise RecordError("record: 'steps' must be a non-empty list of [first position, positions] pairs")
        _need(d, "input", dict)
        _need(d, "output", dict)
        if self.task == "causal_lm":
            gen = _need(d, "generation", dict)
            try:
                self.generation.validate()
            except InputError as exc:
                raise RecordError(f"record: {exc}") from None
            ids = gen.get("eos_token_ids")
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise RecordError("record: generation.eos_token_ids must be a list of integers")

    @property
    def algorithm(self) -> str:
        return self.records.algorithm

    @property
    def store(self) -> ObjectStore:
        return self.records.store

    @property
    def task(self) -> str:
        return self.doc["task"]

    @property
    def model(self) -> dict[str, Any]:
        return self.doc["model"]

    @property
    def model_digest(self) -> bytes:
        try:
            return parse_hex_digest(self.model.get("digest"), "record: model.digest")
        except InputError as exc:
            raise RecordError(str(exc)) from None

    @property
    def run(self) -> RunBinding | None:
        r = self.model.get("run")
        return None if r is None else RunBinding.from_json(r)

    @property
    def settings(self) -> RecordSettings:
        layout = self.doc["layout"]
        return RecordSettings(layout["layers_per_block"], layout["activation_interval"], self.algorithm)

    @property
    def generation(self) -> GenerationSettings:
        g = self.doc.get("generation") or {}
        return GenerationSettings(g.get("max_new_tokens"), g.get("temperature"), g.get("top_p"), g.get("seed"))

    @property
    def steps(self) -> list[tuple[int, int]]:
        return [(a, b) for a, b in self.doc["steps"]]

    def declared_digest(self, section: str) -> bytes:
        try:
            return parse_hex_digest(self.doc[section].get("digest"), f"record: {section}.digest")
        except InputError as exc:
            raise RecordError(str(exc)) from None

    def rows_root(self, prefix: str) -> bytes:
        return digests_root(self.algorithm, self.rows, prefix)

    def tensor(self, key: str) -> torch.Tensor:
        ref = self.rows.get(key)
        if ref is None:
            raise RecordError(f"record {self.record_id.hex()[:16]}…: no tensor {key!r}")
        return self.store.get(ref, f"record {self.record_id.hex()[:16]}…, {key}")

    def has_tensor(self, key: str) -> bool:
        ref = self.rows.get(key)
        return ref is not None and self.store.has(ref.digest)

    def receipt_path(self) -> Path:
        return self.records.receipt_path(self.record_id)

    def tokenizer_dir(self) -> Path | None:
        tok = self.model.get("tokenizer")
        if tok is None:
            return None
        try:
            digest = parse_hex_digest(tok, "record: model.tokenizer")
        except InputError as exc:
            raise RecordError(str(exc)) from None
        d = self.records.tokenizer_dir(digest)
        if not d.is_dir():
            raise RecordError(f"the record's tokenizer is missing: {d}")
        if files_root(self.algorithm, tokenizer_files(d)) != digest:
            raise CommitmentMismatch(f"{d} does not match the tokenizer digest committed in the record")
        return d
