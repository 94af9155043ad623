"""What the parties prepare before the work: keys, model digests, generation policies, and the
challenge plan (how many blocks to check to catch a threat).

    key_path = aftune.keygen("provider.key")               # writes provider.key and provider.key.pub
    weights, model = aftune.digest("runs/demo/model")
    policy = aftune.policy("runs/demo", max_new_tokens=8, out="policy.json")
    plan = aftune.plan([aftune.Threat("tampered_blocks", 1)], num_layer_blocks=4, num_step_blocks=8)

None of them prints; bad input raises an AftuneError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from .quiet import quiet


def keygen(path: str | Path) -> Path:
    """A new Ed25519 signing key at `path` (mode 0600) and its public key at `path`.pub;
    returns the public key's path. An existing file is never overwritten."""
    from ..core.signing import SigningKey

    if Path(path).exists():
        raise InputError(f"{path} exists: keys are never overwritten")
    return SigningKey.generate().save(path)


def digest(model_dir: str | Path, *, dtype: str = "float32", hash_algorithm: str = "blake3") -> tuple[str, str]:
    """A model directory's weights digest (compare with a run's base weights) and model digest
    (weights, config, generation config and tokenizer: a run's final model), as hex."""
    from ..core.encoding import DTYPE_BY_NAME
    from ..core.merkle import model_digest, tensors_root
    from ..models import load_pretrained, model_files, model_weights

    if dtype not in DTYPE_BY_NAME:
        raise InputError(f"dtype must be one of {', '.join(DTYPE_BY_NAME)}")
    with quiet():
        _, model = load_pretrained(model_dir, "eager", DTYPE_BY_NAME[dtype])
        root, _ = tensors_root(hash_algorithm, model_weights(model))
        whole = model_digest(hash_algorithm, root, model_files(model_dir))
    return root.hex(), whole.hex()


def policy(model: Any, *, out: str | Path | None = None, **fields: Any):
    """The generation policy a client asks for (`aftune policy`): greedy with the model's
    end-of-sequence tokens unless `fields` (max_new_tokens, temperature, top_p, eos_token_ids,
    stop_rule, chat_template) say otherwise; written to `out` when given."""
    import json

    from ..inference.policy import GenerationPolicy

    with quiet():
        p = GenerationPolicy.for_model(model, **fields)
    if out is not None:
        Path(out).write_text(json.dumps(p.to_json(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return p


def plan(threats, *, target: float = 0.99, num_blocks: int | None = None, num_layer_blocks: int | None = None,
         num_step_blocks: int | None = None, edge_weight: int = 4, strategies=None):
    """How many blocks to challenge, and how, to catch each threat with probability >= target
    (exact probabilities; `aftune plan`). `threats` are planner Threats. Returns a Plan."""
    from ..protocol.planner import plan as make_plan

    return make_plan(threats, target=target, num_blocks=num_blocks, num_layer_blocks=num_layer_blocks,
                     num_step_blocks=num_step_blocks, edge_weight=edge_weight, strategies=strategies)


def assess(challenge, threats=None):
    """The detection probability a drawn challenge has against each threat."""
    from ..protocol.challenge import Challenge
    from ..protocol.planner import assess_challenge

    return assess_challenge(challenge if isinstance(challenge, Challenge) else Challenge.load(challenge), threats)
