"""The Python API: the commands of `aftune` as functions, for pipelines that call aftune directly.

    import aftune
    result = aftune.train(run_dir="runs/demo")
    report = aftune.verify_run("runs/demo", aftune.PublicKey.load(result.public_key_path), all_blocks=True)
    assert report.verdict == "PASS"

Each function raises an `AftuneError` on bad input (as the CLI exits 2) and returns a `Report`
whose `verdict` is PASS or FAIL (as the CLI exits 0 or 1); none prints or exits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .core.signing import PublicKey
from .errors import InputError
from .verdict.findings import Report
from .verdict.comparison import Tolerance


def agree(base_model: str | Path, data: str | Path, settings=None, *, inference=None,
          out: str | Path | None = None, **setting_values):
    """The client's agreement (`aftune agree`): the base model, data and training settings a
    fine-tune must use, from the client's own copies, and optionally the generation policy of
    serving the result (`inference`: a `GenerationPolicy` or its JSON). `settings` is a
    `TrainSettings`, or give its fields as keywords. Written to `out` when given. Returns the
    `Agreement`."""
    from .inference.policy import GenerationPolicy
    from .training.agreement import make_agreement
    from .training.settings import TrainSettings

    if inference is not None:
        inference = (inference if isinstance(inference, GenerationPolicy) else GenerationPolicy.from_json(inference)).to_json()

    if settings is not None and setting_values:
        raise InputError("give either settings= or setting keywords, not both")
    agreement = make_agreement(base_model, data, settings or TrainSettings(**setting_values), inference)
    if out is not None:
        agreement.save(out)
    return agreement


def train(run_dir: str | Path, model_dir: str | Path | None = None, data: str | Path | None = None,
          settings=None, *, agreement=None, key_path: str | Path | None = None, progress=None, **setting_values):
    """Fine-tune with recording (`aftune train`). Without `model_dir` and `data`, the built-in
    tiny Llama and dataset. The settings come from the client's `agreement` (an `Agreement` or a
    path), or from `settings` / setting keywords (`steps=8, lr=1e-3`). Returns a `TrainResult`."""
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
    return run_training(model_dir, data, run_dir, settings, key_path=key_path, progress=progress, agreement=agreement)


def _agreement(agreement):
    from .training.agreement import Agreement

    return agreement if agreement is None or isinstance(agreement, Agreement) else Agreement.load(agreement)


def verify_run(run_dir: str | Path, public_key: PublicKey, agreement=None, *, unsafe_no_agreement: bool = False,
               layer_block: int | None = None, step_block: int | None = None, all_blocks: bool = False,
               mode: str = "strict", tolerance: Tolerance | None = None, replay_dtype: str | None = None,
               transcript: str | Path | None = None, on_block=None) -> Report:
    """Replay blocks of a run against the client's `agreement` (an `Agreement` or its path;
    `aftune verify`): one (layer_block, step_block), or all of them and the final model.
    `transcript` is the client's own copy, received while training ran."""
    from .training.verify import Verifier

    if all_blocks == (layer_block is not None or step_block is not None):
        raise InputError("give either all_blocks=True or both layer_block and step_block")
    if not all_blocks and (layer_block is None or step_block is None):
        raise InputError("give both layer_block and step_block")
    v = Verifier(run_dir, public_key, _agreement(agreement), unsafe_no_agreement=unsafe_no_agreement, mode=mode,
                 tolerance=tolerance, replay_dtype=replay_dtype, transcript=transcript)
    if all_blocks:
        return v.verify_all(on_block)
    report = v.new_report()
    report.errors.extend(v.conformance)
    report.results.append(v.verify_block(layer_block, step_block)[0])
    return report


def infer(model: str | Path, prompt: str | None = None, *, record_dir: str | Path, text: str | None = None,
          image: str | Path | None = None, policy=None, request_nonce: bytes | None = None, recording=None,
          key_path: str | Path | None = None):
    """One recorded inference (`aftune infer`): a prompt for a causal LM under the client's
    `policy` (a GenerationPolicy; default: greedy, 32 tokens, the model's end-of-sequence tokens)
    and `request_nonce` (needed to sample), a text for BERT, an image for a vision classifier.
    Returns an `InferenceResult` (tokens or label, record id, receipt)."""
    from .inference.engine import InferenceEngine
    from .inference.keys import provider_key
    from .inference.policy import GenerationPolicy
    from .inference.served import ServedModel
    from .inference.settings import RecordingSettings

    if sum(x is not None for x in (prompt, text, image)) != 1:
        raise InputError("give exactly one input: a prompt (causal LM), text= (BERT) or image= (vision)")
    key, _ = provider_key(Path(key_path) if key_path else None, Path(model), Path(record_dir))
    served = ServedModel.load(model)
    engine = InferenceEngine(served, record_dir, key, recording or RecordingSettings())
    if prompt is not None:
        policy = policy or GenerationPolicy.for_model(served.hf_config)
        return engine.generate(prompt, policy, request_nonce=request_nonce)
    return engine.classify(text=text, image=image, request_nonce=request_nonce)


def verify_inference(record_dir: str | Path, record: str | None = None, *, model: str | Path | None = None,
                     public_key: PublicKey | None = None, layer_blocks: list[int] | None = None,
                     mode: str = "strict", tolerance: Tolerance | None = None, replay_dtype: str | None = None,
                     run: str | Path | None = None, transcript: str | Path | None = None,
                     prompt: str | None = None, text: str | None = None, image: str | Path | None = None,
                     policy=None, request_nonce: bytes | None = None, unsafe_skip_input_check: bool = False,
                     unsafe_skip_policy_check: bool = False, max_layers_per_block: int = 2) -> Report:
    """Replay layer blocks of an inference record and check every token (`aftune
    verify-inference`) against what the client asked: `model` is its own copy of the model or
    run directory (or `run`, the run it comes from), `prompt`/`text`/`image` its input, `policy`
    its GenerationPolicy and `request_nonce` its nonce. Tolerance mode's default thresholds widen
    for the record's layers per block only up to `max_layers_per_block`. Without the input, or without the policy
    (and, for sampling, the nonce) of a causal LM record: InputError, unless the `unsafe_skip_...`
    option says so (the report's notes then say what was not checked)."""
    from .inference.record import InferenceRecord
    from .inference.verify import InferenceVerifier

    missing = []
    if (prompt, text, image) == (None, None, None) and not unsafe_skip_input_check:
        missing.append("the input you sent: prompt=, text= or image= (or unsafe_skip_input_check=True)")
    if InferenceRecord.open(record_dir, record).task == "causal_lm" and not unsafe_skip_policy_check:
        if policy is None:
            missing.append("the generation policy you asked for: policy=GenerationPolicy(...) "
                           "(or unsafe_skip_policy_check=True)")
        elif policy.sampling and request_nonce is None:
            missing.append("your request nonce: request_nonce= (or unsafe_skip_policy_check=True)")
    if missing:
        raise InputError("the record is compared with what you asked for; give:\n  - " + "\n  - ".join(missing))
    v = InferenceVerifier(record_dir, record, model=model, mode=mode, tolerance=tolerance, replay_dtype=replay_dtype,
                          public_key=public_key, run_dir=run, transcript=transcript, expected_prompt=prompt,
                          expected_text=text, expected_image=image, policy=policy, request_nonce=request_nonce,
                          max_layers_per_block=max_layers_per_block)
    return v.verify(layer_blocks)


def challenge_run(transcript: str | Path, public_key: PublicKey, agreement, *, strategy: str = "uniform",
                  sample_rate: float | None = None, count: int | None = None, nonce: bytes | None = None):
    """Draw a challenge from a run's signed root and a fresh nonce, on the agreement's grid
    (`aftune challenge`)."""
    from .protocol.challenge import challenge_from_transcript

    return challenge_from_transcript(transcript, public_key, strategy=strategy, sample_rate=sample_rate, count=count,
                                     nonce=nonce, agreement=_agreement(agreement))


def open_challenge(run_dir: str | Path, challenge, out: str | Path) -> dict[str, Any]:
    """The provider's opening of a challenge (`aftune open`): a bundle in `out`."""
    from .protocol.opening import open_bundle

    return open_bundle(run_dir, list(challenge.blocks), challenge.digest_bytes, out)


def audit(bundle: str | Path, transcript: str | Path, challenge, public_key: PublicKey, agreement, *,
          mode: str = "strict", tolerance: Tolerance | None = None, replay_dtype: str | None = None,
          workers: int | None = None) -> Report:
    """The client's audit of a bundle against its own transcript, challenge and agreement
    (`aftune audit`)."""
    from .protocol.audit import audit_bundle

    return audit_bundle(bundle, transcript, public_key, list(challenge.blocks), challenge.digest_bytes,
                        agreement=_agreement(agreement), mode=mode, tolerance=tolerance,
                        replay_dtype=replay_dtype, workers=workers)
