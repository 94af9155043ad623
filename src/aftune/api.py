"""The Python API: every command of `aftune` as a function, for pipelines that call aftune directly.

    import aftune
    result = aftune.train("runs/demo")
    report = aftune.verify_run("runs/demo", result.public_key_path, unsafe_no_agreement=True, all_blocks=True)
    assert report.verdict == "PASS"

The client's workflows are objects that hold what the client expects (`aftune.RunVerifier`,
`aftune.RecordVerifier`: `aftune.workflows`); the functions here are the same workflows in one
call, with the CLI's argument names. Each raises an `AftuneError` on bad input (as the CLI exits
2) and returns a `Report` whose `verdict` is PASS or FAIL (as the CLI exits 0 or 1); none prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError
from .verdict.comparison import Tolerance
from .verdict.findings import Report
from .workflows import expect
from .workflows.quiet import quiet


def agree(base_model: str | Path, data: str | Path, settings=None, *, inference=None,
          out: str | Path | None = None, trainer_config=None, max_recompute_steps: int | None = None,
          storage_budget: int | None = None, **setting_values):
    """The client's agreement (`aftune agree`): the base model, data and training settings a
    fine-tune must use, from the client's own copies, and optionally the generation policy of
    serving the result (`inference`: a `GenerationPolicy` or its JSON). `settings` is a
    `TrainSettings`, or give its fields as keywords. `trainer_config`: the TrainingArguments /
    SFTConfig (a dict or a JSON file) the provider's Trainer script will run with `AftuneCallback`
    (SPEC.md 4.6); the settings it decides may not be given too, the rest (blocks, checkpoints)
    are the settings'. `max_recompute_steps` / `storage_budget` set the checkpoint interval from
    what the client accepts (SPEC.md 6.10). Written to `out` when given. Returns the `Agreement`."""
    from .inference.policy import GenerationPolicy
    from .training.agreement import make_agreement
    from .training.settings import TrainSettings

    if inference is not None:
        inference = (inference if isinstance(inference, GenerationPolicy) else GenerationPolicy.from_json(inference)).to_json()

    if settings is not None and setting_values:
        raise InputError("give either settings= or setting keywords, not both")
    chosen = settings or TrainSettings(**setting_values)
    if trainer_config is not None:
        from .integrations.trainer_config import refuse_given_settings, trainer_config_settings

        refuse_given_settings(setting_values)
        chosen = trainer_config_settings(base_model, trainer_config, chosen)
    from .training.estimate import spacing_for_model

    chosen = spacing_for_model(base_model, chosen, max_recompute_steps, storage_budget,
                               interval_given="checkpoint_interval" in setting_values)
    with quiet():
        agreement = make_agreement(base_model, data, chosen, inference)
    if out is not None:
        agreement.save(out)
    return agreement


def train(run_dir: str | Path, model_dir: str | Path | None = None, data: str | Path | None = None,
          settings=None, *, agreement=None, key_path: str | Path | None = None, progress=None,
          nproc_per_node: int | None = None, **setting_values):
    """Fine-tune with recording (`aftune train`). Without `model_dir` and `data`, the built-in
    tiny Llama and dataset. The settings come from the client's `agreement` (an `Agreement` or a
    path), or from `settings` / setting keywords (`steps=8, lr=1e-3`). `nproc_per_node`: train on
    that many spawned processes (`--nproc-per-node`; the settings' `distributed.world_size`,
    SPEC.md 5.5; no `progress` then). Returns a `TrainResult`."""
    from .training.agreement import Agreement
    from .training.settings import TrainSettings
    from .training.train import train as run_training

    if settings is not None and setting_values:
        raise InputError("give either settings= or setting keywords, not both")
    if agreement is not None:
        agreement = agreement if isinstance(agreement, Agreement) else Agreement.load(agreement)
        if settings is not None or setting_values:
            raise InputError("with an agreement the settings come from it")
    else:
        settings = settings or TrainSettings(**setting_values)
    if nproc_per_node is not None and nproc_per_node > 1:
        from .training.launch import spawn_training

        with quiet():
            return spawn_training(nproc_per_node, model_dir=model_dir, data_path=data, run_dir=run_dir,
                                  settings=None if agreement is not None else settings, key_path=key_path,
                                  agreement=agreement)
    with quiet():
        return run_training(model_dir, data, run_dir, settings, key_path=key_path, progress=progress,
                            agreement=agreement)


def verify_run(run_dir: str | Path, public_key, agreement=None, *, unsafe_no_agreement: bool = False,
               layer_block: int | None = None, step_block: int | None = None, all_blocks: bool = False,
               mode: str = "strict", tolerance: Tolerance | None = None, replay_dtype: str | None = None,
               transcript: str | Path | None = None, on_block=None) -> Report:
    """Replay blocks of a run against the client's `agreement` (`aftune verify`): one
    (layer_block, step_block), or all of them and the final model. `public_key` is the provider's
    (a path, 'ed25519:<hex>' or a PublicKey); `transcript` the client's own copy. The same as
    `RunVerifier(agreement, public_key, ...).verify(run_dir, block=...)`."""
    from .workflows import ALL, RunVerifier, UnsafeNoAgreement

    if all_blocks == (layer_block is not None or step_block is not None):
        raise InputError("give either all_blocks=True or both layer_block and step_block")
    if not all_blocks and (layer_block is None or step_block is None):
        raise InputError("give both layer_block and step_block")
    verifier = RunVerifier(agreement, public_key, transcript=transcript, mode=mode, dtype=replay_dtype,
                           tolerance=tolerance, unsafe=[UnsafeNoAgreement()] if unsafe_no_agreement else None)
    return verifier.verify(run_dir, block=ALL if all_blocks else (layer_block, step_block), on_block=on_block)


def infer(model: str | Path, prompt: str | None = None, *, record_dir: str | Path, text: str | None = None,
          image: str | Path | None = None, policy=None, request_nonce=None, recording=None,
          key_path: str | Path | None = None, dtype: str | None = None):
    """One recorded inference (`aftune infer`): a prompt for a causal LM under the client's
    `policy` (a GenerationPolicy, its JSON or a policy file; default: `GenerationPolicy.for_model`
    of the served model: greedy, 32 tokens, its end-of-sequence tokens, its dtype) and
    `request_nonce` (needed to sample), a text for BERT, an image for a vision classifier. The
    model is loaded in `dtype`, else in the serving dtype the policy pins, else the run's (or
    float32); a `dtype` the policy contradicts is an InputError. A portable policy records in
    portable numerics (SPEC.md 8.13). Returns an `InferenceResult` (tokens or label, record id, receipt)."""
    from .inference.engine import InferenceEngine, load_served
    from .inference.keys import provider_key
    from .inference.policy import GenerationPolicy
    from .inference.settings import RecordingSettings

    if sum(x is not None for x in (prompt, text, image)) != 1:
        raise InputError("give exactly one input: a prompt (causal LM), text= (BERT) or image= (vision)")
    nonce = expect.request_nonce(request_nonce)
    policy = expect.generation_policy(policy) if prompt is not None else None
    with quiet():
        key, _ = provider_key(Path(key_path) if key_path else None, Path(model), Path(record_dir))
        served = load_served(model, policy, dtype=dtype)
        engine = InferenceEngine(served, record_dir, key, recording or RecordingSettings())
        if prompt is not None:
            policy = policy or GenerationPolicy.for_model(served)  # the served model's: its dtype is the served one
            return engine.generate(prompt, policy, request_nonce=nonce)
        return engine.classify(text=text, image=image, request_nonce=nonce)


def verify_inference(record_dir: str | Path, record: str | None = None, *, model: str | Path | None = None,
                     public_key=None, layer_blocks: list[int] | None = None,
                     mode: str = "strict", tolerance: Tolerance | None = None, replay_dtype: str | None = None,
                     run: str | Path | None = None, transcript: str | Path | None = None,
                     prompt: str | None = None, text: str | None = None, image: str | Path | None = None,
                     policy=None, request_nonce=None, unsafe_skip_input_check: bool = False,
                     unsafe_skip_policy_check: bool = False, max_layers_per_block: int = 2) -> Report:
    """Replay layer blocks of an inference record and check every token (`aftune
    verify-inference`) against what the client asked: `model` its own copy of the model (or
    `run`, the run it comes from, with `public_key`), `prompt`/`text`/`image` its input, `policy`
    its GenerationPolicy and `request_nonce` its nonce. The same as `RecordVerifier(InferenceRequest(...),
    ...).verify(record_dir, record)`; a missing comparison is InputError unless an
    `unsafe_skip_...` option says so (the report's notes then say what was not checked)."""
    from .workflows import InferenceRequest, RecordVerifier, UnsafeSkipInputCheck, UnsafeSkipPolicyCheck

    unsafe = ([UnsafeSkipInputCheck()] if unsafe_skip_input_check else []) + \
             ([UnsafeSkipPolicyCheck()] if unsafe_skip_policy_check else [])
    request = InferenceRequest(prompt=prompt, text=text, image=image, policy=policy, request_nonce=request_nonce)
    verifier = RecordVerifier(request, model=model, run=run, provider_key=public_key, transcript=transcript, mode=mode,
                              dtype=replay_dtype, tolerance=tolerance, max_layers_per_block=max_layers_per_block,
                              unsafe=unsafe)
    return verifier.verify(record_dir, record, layer_blocks=layer_blocks)


def challenge_run(transcript: str | Path, public_key, agreement, *, strategy: str = "uniform",
                  sample_rate: float | None = None, count: int | None = None, challenge_nonce: bytes | None = None):
    """Draw a challenge from a run's signed root (your transcript copy) and a fresh nonce, on the
    agreement's grid (`aftune challenge`)."""
    from .workflows import RunVerifier

    return RunVerifier(agreement, public_key, transcript=transcript).challenge(
        sample_rate=sample_rate, count=count, strategy=strategy, challenge_nonce=challenge_nonce)


def audit(bundle: str | Path, transcript: str | Path, challenge, public_key, agreement, *,
          mode: str = "strict", tolerance: Tolerance | None = None, replay_dtype: str | None = None,
          workers: int | None = None) -> Report:
    """The client's audit of a bundle against its own transcript, challenge and agreement
    (`aftune audit`): a challenge drawn for another run root or grid FAILs, as in the CLI."""
    from .workflows import RunVerifier

    verifier = RunVerifier(agreement, public_key, transcript=transcript, mode=mode, dtype=replay_dtype,
                           tolerance=tolerance)
    return verifier.audit(bundle, challenge, workers=workers)


def calibrate(run_dir: str | Path, public_key, agreement, *, replay_dtype: str | None = None, margin: float = 4.0):
    """Replay an honest run and suggest tolerance thresholds (`aftune calibrate`)."""
    from .workflows import RunVerifier

    return RunVerifier(agreement, public_key, mode="tolerance", dtype=replay_dtype).calibrate(run_dir, margin=margin)


def prepare(run_dir: str | Path, public_key, agreement, layer_block: int | None = None,
            step_block: int | None = None, *, base_model: str | Path | None = None) -> list[int]:
    """Regenerate what the run committed by digest only (`aftune prepare`): a block's start state
    and, with digest-only boundaries, its boundary tensors; neither block given: everything."""
    from .workflows import RunVerifier

    return RunVerifier(agreement, public_key).prepare(run_dir, layer_block, step_block, base_model=base_model)


def estimate(agreement):
    """The record's size and the cost of opening one block, before the run (`aftune estimate`):
    an `Estimate` (`.line()`, `.to_json()`) of the agreement (an Agreement or its path)."""
    from .training.agreement import Agreement
    from .training.estimate import estimate as run_estimate

    return run_estimate(agreement if isinstance(agreement, Agreement) else Agreement.load(agreement))


def prepare_inference(record_dir: str | Path, record: str | None = None, *, model: str | Path,
                      layer_block: int | None = None) -> list[int]:
    """Regenerate boundary activations committed by digest only (`aftune prepare-inference`)."""
    from .inference.regenerate import prepare_inference as run_prepare
    from .workflows.quiet import quiet

    with quiet():
        return run_prepare(record_dir, record, layer_block, model)
