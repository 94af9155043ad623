"""A run directory: the files a provider writes and a verifier reads (SPEC.md 3.1).

    RUN/config.json         the run config (its digest opens the chain)
    RUN/transcript.jsonl    signed step-block roots and the run root
    RUN/manifests/NNNNNN.json   one per step block, plus the final state
    RUN/objects/            content-addressed tensors (zstd safetensors)
    RUN/base_model.json     per-tensor digests of the base weights
    RUN/tokenizer/          tokenizer files (text models)
    RUN/data/               a copy of the dataset
    RUN/model/              the fine-tuned model, Hugging Face format
    RUN/provider.key(.pub)  the provider's signing key, when none was given

`RunRecord.open` loads and checks the config against the transcript; every later read goes
through it, so no file is used before its digest was checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ..core import jsonio
from .settings import RUN_FORMAT, TrainSettings
from ..core.encoding import TAG_RUN_CONFIG, hash_message, parse_hex_digest
from ..errors import CommitmentMismatch, InputError, RecordError
from .manifest import StepBlockManifest, read_manifest
from ..core.merkle import files_root, merkle_root
from ..models import tokenizer_files
from ..core.signing import PublicKey
from ..core.store import ObjectStore
from .transcript import Transcript

MAX_CONFIG_BYTES = 16 << 20
MAX_BASE_MODEL_BYTES = 256 << 20


def config_digest(algorithm: str, data: bytes) -> bytes:
    return hash_message(algorithm, TAG_RUN_CONFIG, data)


def signed_run_config(path: str | Path, transcript: Transcript, what: str = "run config") -> dict[str, Any]:
    """The run config at `path`, checked against the digest the transcript signs, then parsed
    (an edited config is a CommitmentMismatch; a missing, oversized or malformed one a RecordError)."""
    data = jsonio.read_bytes(path, MAX_CONFIG_BYTES, what)
    if config_digest(transcript.algorithm, data) != transcript.config_digest:
        raise CommitmentMismatch(f"{path} does not match the config digest signed in the transcript: it was edited, "
                                 "or belongs to another run")
    config = jsonio.parse(data, f"{what} {path}")
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise RecordError(f"{path} is not an {RUN_FORMAT} document")
    return config


def committed_settings(config: dict[str, Any], transcript: Transcript) -> tuple[TrainSettings | None, str | None]:
    """The settings the run config commits, checked against the transcript's length and hash;
    (None, why) when they are not valid settings (a verifier with an agreement reports that as a
    difference from the agreed settings; one without cannot proceed)."""
    try:
        settings = TrainSettings.from_json(config.get("settings"))
    except InputError as exc:
        return None, str(exc)
    if transcript.run is not None and len(transcript.step_blocks) != settings.num_step_blocks + 1:
        raise CommitmentMismatch(f"the transcript closes the run after {len(transcript.step_blocks)} step blocks; "
                                 f"the config needs {settings.num_step_blocks} plus the final state")
    if settings.hash_algorithm != transcript.algorithm:
        raise RecordError("config and transcript name different hash algorithms")
    return settings, None


@dataclass
class RunRecord:
    root: Path
    config: dict[str, Any]
    committed: TrainSettings | None  # the run config's settings; None when they are invalid
    transcript: Transcript
    store: ObjectStore
    settings_problem: str | None = None  # why `committed` is None

    @property
    def settings(self) -> TrainSettings:
        """The run's own settings (without an agreement, the only ones there are)."""
        if self.committed is None:
            raise InputError(self.settings_problem or "run config: invalid settings")
        return self.committed

    @classmethod
    def open(cls, run_dir: str | Path, public_key: PublicKey, transcript_path: str | Path | None = None) -> "RunRecord":
        """Open a run. `transcript_path` is the client's own copy of the transcript, received
        while training ran; without it the run directory's copy is used."""
        root = Path(run_dir)
        if not root.is_dir():
            raise InputError(f"run directory {root} does not exist")
        transcript = Transcript.load(Path(transcript_path or root / "transcript.jsonl"), public_key)
        config = signed_run_config(root / "config.json", transcript)
        settings, problem = committed_settings(config, transcript)
        return cls(root, config, settings, transcript, ObjectStore(root / "objects", transcript.algorithm), problem)

    @property
    def algorithm(self) -> str:
        return self.transcript.algorithm

    @property
    def num_blocks(self) -> int:
        return len(self.config["layout"]["layer_blocks"])

    @property
    def num_step_blocks(self) -> int:
        return self.settings.num_step_blocks

    def manifest(self, step_block: int) -> StepBlockManifest:
        """The manifest of `step_block` (num_step_blocks is the final state), checked against the
        signed transcript entry."""
        entries = self.transcript.step_blocks
        if step_block >= len(entries):
            raise RecordError(f"step block {step_block} has no signed root in the transcript "
                              f"({len(entries)} signed): the run is incomplete")
        m = read_manifest(self.root / "manifests", step_block, self.num_blocks)
        e = entries[step_block]
        if m.step_block != step_block or (m.first_step, m.num_steps) != (e.first_step, e.num_steps):
            raise CommitmentMismatch(f"the manifest of step block {step_block} describes other steps than its signed entry")
        if m.merkle_root(self.algorithm) != e.merkle_root:
            raise CommitmentMismatch(f"the manifest of step block {step_block} does not match the root signed for step block "
                              f"{step_block}: the manifest was altered after signing")
        return m

    def section(self, name: str) -> dict[str, Any]:
        v = self.config.get(name)
        if not isinstance(v, dict):
            raise RecordError(f"run config: '{name}' is missing or malformed")
        return v

    @property
    def num_examples(self) -> int:
        n = self.section("data").get("num_examples")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RecordError("run config: data.num_examples must be a positive integer")
        return n

    def dataset(self, kind: str, root: bytes, labels: tuple[str, ...], num_examples: int):
        """The agreed dataset (`kind`, `root`, `labels`, `num_examples` come from the agreement),
        read from the run directory's copy (`data.path` only says where it lies)."""
        from ..data import load_dataset

        rel = self.section("data").get("path")
        if not isinstance(rel, str) or ".." in Path(rel).parts or Path(rel).is_absolute():
            raise RecordError("run config: data.path must be a relative path inside the run directory")
        try:
            dataset = load_dataset(self.root / rel, kind)
        except InputError as exc:
            raise RecordError(f"the run's dataset copy is unreadable: {exc}") from None
        if dataset.root(self.algorithm) != root:
            raise CommitmentMismatch(f"the dataset in {self.root / rel} does not match the committed dataset root (the "
                                     "agreed dataset)")
        if tuple(dataset.labels) != tuple(labels) or len(dataset.examples) != num_examples:
            raise CommitmentMismatch("the dataset's labels or size differ from the agreed ones")
        return dataset

    def base_digests(self) -> dict[str, bytes]:
        """Per-tensor digests of the agreed base model (RUN/base_model.json, checked)."""
        return read_base_digests(self.root / "base_model.json", self.section("model").get("base_weights"), self.algorithm)

    def tokenizer_files(self, root: bytes | None) -> dict[str, bytes] | None:
        """The tokenizer files (RUN/tokenizer), checked against the agreed files `root`; None
        for image models (no agreed tokenizer)."""
        if root is None:
            return None
        d = self.root / "tokenizer"
        if not d.is_dir():
            raise RecordError(f"{d} is missing")
        try:
            files = tokenizer_files(d)
        except InputError as exc:
            raise RecordError(str(exc)) from None
        if files_root(self.algorithm, files) != root:
            raise CommitmentMismatch(f"{d} is not the agreed tokenizer (its files root differs)")
        return files


def read_base_digests(path: Path, root_hex: Any, algorithm: str) -> dict[str, bytes]:
    """Parse base_model.json ({name: digest hex}) and check it against the committed root."""
    obj = jsonio.read_json(path, MAX_BASE_MODEL_BYTES, "base model digests")
    if not isinstance(obj, dict):
        raise RecordError("base_model.json must map tensor names to digests")
    try:
        digests = {str(k): parse_hex_digest(v, f"base_model.json: {k}") for k, v in obj.items()}
        expected = parse_hex_digest(root_hex, "run config: model.base_weights")
    except InputError as exc:
        raise RecordError(str(exc)) from None
    if merkle_root(algorithm, digests) != expected:
        raise CommitmentMismatch("base_model.json does not match the base-weights digest committed in the run config")
    return digests
