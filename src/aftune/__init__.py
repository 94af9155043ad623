"""aftune: auditable fine-tuning and inference.

A provider records every (layer block x step block) of a fine-tuning run, commits to it with
digests and Merkle roots, and signs each step block's root as it ends. A client later challenges
blocks and a verifier replays them. See SPEC.md for every byte that is hashed, signed or stored.

The Python API, for pipelines that call aftune directly (README "Python API"):

    import aftune

    agreement = aftune.agree(BASE_MODEL_DIR, "data.jsonl", steps=8, out="agreement.json")   # the client
    result = aftune.train("runs/demo", BASE_MODEL_DIR, "data.jsonl", agreement=agreement)  # the provider
    key = aftune.PublicKey.load(result.public_key_path)
    report = aftune.verify_run("runs/demo", key, agreement, all_blocks=True)  # .verdict is PASS or FAIL
    policy = aftune.GenerationPolicy.for_model("runs/demo", max_new_tokens=8)   # what the client asks
    answer = aftune.infer("runs/demo", "Q: What is 3 plus 4? A:", record_dir="records", policy=policy)
    report = aftune.verify_inference("records", model="runs/demo", public_key=key,
                                     prompt="Q: What is 3 plus 4? A:", policy=policy)

Everything is imported on first use, so `import aftune` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

# name -> module that defines it
_API = {
    "agree": "aftune.api",
    "train": "aftune.api",
    "verify_run": "aftune.api",
    "infer": "aftune.api",
    "verify_inference": "aftune.api",
    "challenge_run": "aftune.api",
    "open_challenge": "aftune.api",
    "audit": "aftune.api",
    "Agreement": "aftune.training.agreement",
    "TrainSettings": "aftune.training.settings",
    "LoraSettings": "aftune.training.settings",
    "GenerationPolicy": "aftune.inference.policy",
    "RecordingSettings": "aftune.inference.settings",
    "Tolerance": "aftune.verdict.comparison",
    "Report": "aftune.verdict.findings",
    "Finding": "aftune.verdict.findings",
    "PublicKey": "aftune.core.signing",
    "SigningKey": "aftune.core.signing",
    "Challenge": "aftune.protocol.challenge",
    "AftuneError": "aftune.errors",
    "InputError": "aftune.errors",
    "RecordError": "aftune.errors",
    "CommitmentMismatch": "aftune.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'aftune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
