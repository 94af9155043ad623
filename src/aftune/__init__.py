"""aftune: auditable fine-tuning and inference.

A provider records every (layer block x step block) of a fine-tuning run, commits to it with
digests and Merkle roots, and signs each step block's root as it ends. A client later challenges
blocks and a verifier replays them. See SPEC.md for every byte that is hashed, signed or stored.

The Python API (README "Python API"): the client states once what it expects, then verifies.

    import aftune

    agreement = aftune.agree(BASE_MODEL_DIR, "data.jsonl", steps=8, out="agreement.json")   # the client
    result = aftune.train("runs/demo", BASE_MODEL_DIR, "data.jsonl", agreement=agreement)  # the provider
    verifier = aftune.RunVerifier(agreement, result.public_key_path)   # pinned out of band, in practice
    report = verifier.verify("runs/demo")                                # .verdict is PASS or FAIL

    request = aftune.InferenceRequest(prompt="Q: What is 3 plus 4? A:",
                                      policy=aftune.policy("runs/demo", max_new_tokens=8))
    answer = aftune.infer("runs/demo", request.prompt, record_dir="records", policy=request.policy)
    report = aftune.RecordVerifier(request, model="runs/demo", provider_key=result.public_key_path).verify("records")

A FAIL is a `Report` whose verdict is FAIL, never an exception; bad input raises an
`AftuneError`; nothing prints. `aftune.workflows` holds the verifiers, `aftune.api` every
command as one function.

Everything is imported on first use, so `import aftune` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

# name -> module that defines it
_API = {
    # the client's workflows: state what you expect once, then verify (aftune.workflows)
    **{name: "aftune.workflows" for name in (
        "RunVerifier", "RecordVerifier", "InferenceRequest", "ALL", "Unsafe", "UnsafeNoAgreement",
        "UnsafeSkipInputCheck", "UnsafeSkipPolicyCheck", "UnsafeSignatureOnly", "verify_receipt", "check",
        "check_partition", "verify_attestation", "open_challenge", "keygen", "digest", "policy", "plan", "assess")},
    # every command as one function (aftune.api)
    **{name: "aftune.api" for name in (
        "agree", "train", "verify_run", "infer", "verify_inference", "challenge_run", "audit", "calibrate",
        "prepare", "prepare_inference", "estimate")},
    "export_model": "aftune.models.packaged",
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
    "Threat": "aftune.protocol.planner",
    "AppraisalPolicy": "aftune.attestation.claims",
    "Evidence": "aftune.attestation.claims",
    "Endorsements": "aftune.attestation.claims",
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
