"""The client's agreement (SPEC.md 4.5): what a fine-tune must be, written from what the client
holds, and the one source of every value a verifier uses.

    aftune agree --base-model DIR --data data.jsonl --steps 32 --lr 1e-3 --out agreement.json
    agreement = Agreement.load("agreement.json")

An agreement pins the base model (its canonical architecture config, generation config, every
base tensor's digest, its tokenizer files root), the dataset (kind, root, size, labels) and the
full training settings; an optional `inference` member holds the generation policy of serving.
Everything else a verifier needs is derived from it (batch spec, layer-block layout, step
blocks), never read from a file the provider wrote. It is a deterministic function of those
inputs: a client and a provider that build it from the same model, data and settings get the
same digest, and the run config commits that digest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..core.encoding import (DTYPE_BY_NAME, HASH_ALGORITHMS, TAG_AGREEMENT, canonical_json, hash_message,
                             parse_hex_digest)
from ..core.merkle import files_root, merkle_root, tensors_root
from ..core.signing import PublicKey, SigningKey
from ..data import BatchSpec, Dataset, load_dataset
from ..errors import CommitmentMismatch, InputError
from ..models import HeadInit, adapter_class, load_pretrained, model_weights, tokenizer_files
from .settings import TrainSettings

AGREEMENT_FORMAT = "aftune.agreement.v1"
SIGNATURE_CONTEXT = "agreement"
MAX_AGREEMENT_BYTES = 256 << 20
# Keys of config.json that describe how a file was saved, not the architecture (SPEC.md 4.5).
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_from_model_config")
DATA_KINDS = ("text", "labeled_text", "image_folder")
_FIELDS = {"format", "hash", "base_model", "data", "settings", "inference", "client"}


def canonical_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """A config.json without the keys that only say how it was saved (SPEC.md 4.5)."""
    return {k: v for k, v in hf_config.items() if k not in VOLATILE_CONFIG_KEYS}


def batch_spec(hf_config: dict, settings: TrainSettings) -> BatchSpec:
    """How the agreed examples become tensors (SPEC.md 4.4), from the agreement alone."""
    cls = adapter_class(hf_config.get("model_type"))
    image_size = settings.image_size or int(hf_config.get("image_size", 0) or 0)
    if hf_config.get("model_type") == "resnet" and not image_size:
        image_size = 64
    if settings.sft is not None and cls.task != "causal_lm":
        raise InputError(f"settings.sft is supervised fine-tuning of a causal LM, not of a {cls.task} model")
    return BatchSpec(task=cls.task, seq_len=settings.seq_len, image_size=image_size, fields=cls.batch_fields,
                     sft=settings.sft)


@dataclass(frozen=True)
class Agreement:
    """What the client agreed to; `digest()` is what the run config commits."""

    algorithm: str
    base_config: dict[str, Any]  # canonical architecture config
    generation_config: dict[str, Any] | None  # canonical generation_config.json, or None
    base_tensors: dict[str, bytes]  # every base tensor name -> digest, in the training dtype
    tokenizer: bytes | None  # files root of the tokenizer files (None for image models)
    data_kind: str
    data_root: bytes
    num_examples: int
    labels: tuple[str, ...]
    settings: TrainSettings
    inference: dict[str, Any] | None = None  # the generation policy of serving (SPEC.md 8)
    client_key: PublicKey | None = None  # who signed it, when signed
    signature: bytes | None = None

    @property
    def base_weights(self) -> bytes:
        return merkle_root(self.algorithm, self.base_tensors)

    @property
    def task(self) -> str:
        return adapter_class(self.base_config["model_type"]).task

    def batch_spec(self) -> BatchSpec:
        return batch_spec(self.base_config, self.settings)

    def grid(self) -> tuple[int, int]:
        """(layer blocks, step blocks) of a run made under this agreement: the architecture's
        layers (counted on the meta device, no weights) in blocks of B_L, the steps in blocks of B_S."""
        from ..models import build_model
        from .settings import LayerBlocks

        model = build_model(self.base_config, self.settings.attn_implementation, DTYPE_BY_NAME[self.settings.dtype],
                            device="meta")
        stages = adapter_class(self.base_config["model_type"])(model).stages
        return len(LayerBlocks(len(stages) - 2, self.settings.layers_per_block)), self.settings.num_step_blocks

    # --- bytes ------------------------------------------------------------------------------
    def body_json(self) -> dict[str, Any]:
        """Everything the digest covers: all but the client's signature."""
        return {
            "format": AGREEMENT_FORMAT,
            "hash": self.algorithm,
            "base_model": {"config": self.base_config, "generation_config": self.generation_config,
                           "weights": self.base_weights.hex(),
                           "tensors": {k: v.hex() for k, v in sorted(self.base_tensors.items())},
                           "tokenizer": self.tokenizer.hex() if self.tokenizer is not None else None},
            "data": {"kind": self.data_kind, "root": self.data_root.hex(), "num_examples": self.num_examples,
                     "labels": list(self.labels)},
            "settings": self.settings.to_json(),
            "inference": self.inference,
        }

    def digest(self) -> bytes:
        return hash_message(self.algorithm, TAG_AGREEMENT, canonical_json(self.body_json()))

    def to_json(self) -> dict[str, Any]:
        doc = self.body_json()
        if self.signature is not None:
            doc["client"] = {"key": self.client_key.text, "signature": self.signature.hex()}
        return doc

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        if p.exists():
            raise InputError(f"{p} exists: agreements are never overwritten")
        p.write_bytes(canonical_json(self.to_json()) + b"\n")
        return p

    def signed(self, key: SigningKey) -> "Agreement":
        return replace(self, client_key=key.public_key, signature=key.sign(SIGNATURE_CONTEXT, self.digest()))

    def check_signature(self, client_key: PublicKey) -> None:
        """The agreement must be signed by the client's pinned key (CommitmentMismatch if not)."""
        if self.signature is None or self.client_key != client_key:
            raise CommitmentMismatch("the agreement is not signed by the pinned client key")
        if not client_key.verify(SIGNATURE_CONTEXT, self.digest(), self.signature):
            raise CommitmentMismatch("the agreement's signature does not verify: it was edited after signing")

    # --- reading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Agreement":
        return cls.from_json(jsonio.read_json(path, MAX_AGREEMENT_BYTES, "agreement", InputError), str(path))

    @classmethod
    def from_json(cls, obj: Any, where: str = "agreement") -> "Agreement":
        """Parse an agreement, reporting every problem at once (InputError, exit 2)."""
        problems: list[str] = []

        def need(parent: Any, key: str, kind, label: str):
            v = parent.get(key) if isinstance(parent, dict) else None
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                problems.append(f"{label} is missing or not a {getattr(kind, '__name__', kind)}")
                return None
            return v

        def digest(value: Any, label: str) -> bytes | None:
            try:
                return parse_hex_digest(value, label)
            except InputError as exc:
                problems.append(str(exc))
                return None

        if not isinstance(obj, dict):
            raise InputError(f"{where}: an agreement is a JSON object")
        unknown = sorted(str(k)[:40] for k in set(obj) - _FIELDS)
        if unknown:
            problems.append(f"unknown fields {unknown}")
        if obj.get("format") != AGREEMENT_FORMAT:
            problems.append(f"format must be {AGREEMENT_FORMAT!r}")
        algorithm = obj.get("hash")
        if algorithm not in HASH_ALGORITHMS:
            problems.append(f"hash must be one of {', '.join(HASH_ALGORITHMS)}")
            algorithm = "blake3"
        model = need(obj, "base_model", dict, "base_model") or {}
        config = need(model, "config", dict, "base_model.config") or {}
        if config and not isinstance(config.get("model_type"), str):
            problems.append("base_model.config has no model_type")
        gen = model.get("generation_config")
        if gen is not None and not isinstance(gen, dict):
            problems.append("base_model.generation_config must be an object or null")
        tensors = {}
        for name, value in (need(model, "tensors", dict, "base_model.tensors") or {}).items():
            d = digest(value, f"base_model.tensors[{name[:60]!r}]")
            if d is not None:
                tensors[name] = d
        if not tensors:
            problems.append("base_model.tensors must name every base tensor")
        weights = digest(model.get("weights"), "base_model.weights")
        tok = model.get("tokenizer")
        tokenizer = None if tok is None else digest(tok, "base_model.tokenizer")
        data = need(obj, "data", dict, "data") or {}
        kind = data.get("kind")
        if kind not in DATA_KINDS:
            problems.append(f"data.kind must be one of {', '.join(DATA_KINDS)}")
        root = digest(data.get("root"), "data.root")
        n = need(data, "num_examples", int, "data.num_examples")
        if n is not None and n < 1:
            problems.append("data.num_examples must be positive")
        labels = need(data, "labels", list, "data.labels") or []
        if not all(isinstance(x, str) for x in labels):
            problems.append("data.labels must be strings")
        inference = obj.get("inference")
        if inference is not None and not isinstance(inference, dict):
            problems.append("inference must be an object or null")
        settings = None
        try:
            settings = TrainSettings.from_json(obj.get("settings"))
        except InputError as exc:
            problems.append(str(exc).replace("run config: ", "settings: "))
        if settings is not None and settings.hash_algorithm != algorithm:
            problems.append(f"settings.hash_algorithm {settings.hash_algorithm} differs from hash {algorithm}")
        client = obj.get("client")
        client_key = signature = None
        if client is not None:
            try:
                client_key = PublicKey.from_text(str(client["key"]))
                signature = bytes.fromhex(client["signature"])
                if len(signature) != 64:
                    raise ValueError("length")
            except (KeyError, TypeError, ValueError, InputError):
                problems.append("client must be {key: 'ed25519:<hex>', signature: <128 hex digits>}")
        if problems:
            raise InputError(f"{where} is not a valid {AGREEMENT_FORMAT} document:\n  - " + "\n  - ".join(problems))
        agreement = cls(algorithm, config, gen, tensors, tokenizer, kind, root, n, tuple(labels), settings, inference,
                        client_key, signature)
        if agreement.base_weights != weights:
            raise InputError(f"{where}: base_model.weights is not the root of base_model.tensors")
        return agreement


def make_agreement(base_model: str | Path, data: str | Path, settings: TrainSettings,
                   inference: dict[str, Any] | None = None) -> Agreement:
    """The agreement from the client's own copies of the base model and the dataset."""
    settings.validate()
    hf_config, model = load_pretrained(base_model, settings.attn_implementation, DTYPE_BY_NAME[settings.dtype],
                                       head_init=HeadInit(settings.hash_algorithm, settings.seed))
    return agreement_from(hf_config, model, base_model, load_dataset(data), settings, inference)


def agreement_from(hf_config: dict[str, Any], model, model_dir: str | Path, dataset: Dataset,
                   settings: TrainSettings, inference: dict[str, Any] | None = None) -> Agreement:
    """The agreement of a loaded base model (from `model_dir`, in the training dtype) and dataset."""
    algorithm = settings.hash_algorithm
    check_dataset_fits(dataset, hf_config)
    if settings.sft is None and any(e.prompt is not None for e in dataset.examples):
        raise InputError("prompt/completion data is supervised fine-tuning: set the sft settings (aftune agree "
                         "--trainer-config, or TrainSettings(sft=SftSettings(...)))")
    _, tensors = tensors_root(algorithm, model_weights(model))
    generation = None
    if (Path(model_dir) / "generation_config.json").is_file():
        generation = canonical_config(read_config_file(Path(model_dir) / "generation_config.json"))
    tokenizer = None
    if dataset.kind != "image_folder":
        tokenizer = files_root(algorithm, tokenizer_files(model_dir))
    return Agreement(algorithm, canonical_config(hf_config), generation, tensors, tokenizer, dataset.kind,
                     dataset.root(algorithm), len(dataset.examples), tuple(dataset.labels), settings, inference)


def differences(agreed: Any, actual: Any, path: str = "") -> list[str]:
    """Field-by-field differences of two JSON values, as 'path: agreed X, got Y'."""
    if isinstance(agreed, dict) and isinstance(actual, dict):
        out = []
        for key in sorted(set(agreed) | set(actual), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in actual:
                out.append(f"{sub}: agreed {_short(agreed[key])}, missing")
            elif key not in agreed:
                out.append(f"{sub}: not agreed, got {_short(actual[key])}")
            else:
                out += differences(agreed[key], actual[key], sub)
        return out
    if agreed != actual or type(agreed) is not type(actual):
        return [f"{path or 'value'}: agreed {_short(agreed)}, got {_short(actual)}"]
    return []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_config_file(path: Path) -> dict[str, Any]:
    obj = jsonio.read_json(path, 1 << 20, "model config file", InputError)
    if not isinstance(obj, dict):
        raise InputError(f"{path} must hold a JSON object")
    return obj


def check_dataset_fits(dataset: Dataset, hf_config: dict) -> None:
    """A causal LM trains on text, BERT on labeled text, vision models on image folders; a
    classifier must have as many classes as the dataset has labels."""
    model_type = hf_config.get("model_type")
    task = adapter_class(model_type).task
    vision = model_type in ("vit", "dinov2", "resnet")
    wanted = "text" if task == "causal_lm" else ("image_folder" if vision else "labeled_text")
    if dataset.kind != wanted:
        raise InputError(f"a {model_type} model trains on a {wanted} dataset, got {dataset.kind}")
    if task == "classification":
        num_labels = len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 2))
        if len(dataset.labels) > num_labels:
            raise InputError(f"the dataset has {len(dataset.labels)} labels {list(dataset.labels)[:5]} but the model "
                             f"classifies {num_labels}; set num_labels in the model config")


__all__ = ["AGREEMENT_FORMAT", "Agreement", "agreement_from", "batch_spec", "canonical_config", "check_dataset_fits",
           "differences", "make_agreement"]
