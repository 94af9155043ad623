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
from .verdict.policy import Tolerance


def train(run_dir: str | Path, model_dir: str | Path | None = None, data: str | Path | None = None,
          settings=None, *, key_path: str | Path | None = None, progress=None, **setting_values):
    """Fine-tune with recording (`aftune train`). Without `model_dir` and `data`, the built-in
    tiny Llama and dataset. `settings` is a `TrainSettings`, or give its fields as keywords
    (`steps=8, lr=1e-3`). Returns a `TrainResult` (run root, final model digest, key path)."""
    from .training.settings import TrainSettings
    from .training.train import train as run_training

    if settings is not None and setting_values:
        raise InputError("give either settings= or setting keywords, not both")
    settings = settings or TrainSettings(**setting_values)
    return run_training(model_dir, data, run_dir, settings, key_path=key_path, progress=progress)


def verify_run(run_dir: str | Path, public_key: PublicKey, *, layer_block: int | None = None,
               step_block: int | None = None, all_blocks: bool = False, mode: str = "strict",
               tolerance: Tolerance | None = None, replay_dtype: str | None = None,
               transcript: str | Path | None = None, on_block=None) -> Report:
    """Replay blocks of a run (`aftune verify`): one (layer_block, step_block), or all of them
    and the final model. `transcript` is the client's own copy, received while training ran."""
    from .training.verify import Verifier

    if all_blocks == (layer_block is not None or step_block is not None):
        raise InputError("give either all_blocks=True or both layer_block and step_block")
    if not all_blocks and (layer_block is None or step_block is None):
        raise InputError("give both layer_block and step_block")
    v = Verifier(run_dir, public_key, mode=mode, tolerance=tolerance or Tolerance(), replay_dtype=replay_dtype,
                 transcript=transcript)
    if all_blocks:
        return v.verify_all(on_block)
    report = Report(str(run_dir), v.mode)
    report.results.append(v.verify_block(layer_block, step_block)[0])
    return report


def infer(model: str | Path, prompt: str | None = None, *, record_dir: str | Path, text: str | None = None,
          image: str | Path | None = None, generation=None, recording=None, key_path: str | Path | None = None):
    """One recorded inference (`aftune infer`): a prompt for a causal LM, a text for BERT, an
    image for a vision classifier. Returns an `InferenceResult` (tokens or label, record id,
    receipt)."""
    from .inference.engine import InferenceEngine
    from .inference.keys import provider_key
    from .inference.served import ServedModel
    from .inference.settings import GenerationSettings, RecordingSettings

    if sum(x is not None for x in (prompt, text, image)) != 1:
        raise InputError("give exactly one input: a prompt (causal LM), text= (BERT) or image= (vision)")
    key, _ = provider_key(Path(key_path) if key_path else None, Path(model), Path(record_dir))
    engine = InferenceEngine(ServedModel.load(model), record_dir, key, recording or RecordingSettings())
    if prompt is not None:
        return engine.generate(prompt, generation or GenerationSettings())
    return engine.classify(text=text, image=image)


def verify_inference(record_dir: str | Path, record: str | None = None, *, model: str | Path,
                     public_key: PublicKey | None = None, layer_blocks: list[int] | None = None,
                     mode: str = "strict", tolerance: Tolerance | None = None, replay_dtype: str | None = None,
                     run: str | Path | None = None, transcript: str | Path | None = None,
                     prompt: str | None = None, text: str | None = None, image: str | Path | None = None) -> Report:
    """Replay layer blocks of an inference record and check every token (`aftune
    verify-inference`); `model` is the client's own copy of the model or run directory."""
    from .inference.verify import InferenceVerifier

    v = InferenceVerifier(record_dir, record, model=model, mode=mode, tolerance=tolerance, replay_dtype=replay_dtype,
                          public_key=public_key, run_dir=run, transcript=transcript, expected_prompt=prompt,
                          expected_text=text, expected_image=image)
    return v.verify(layer_blocks)


def challenge_run(transcript: str | Path, public_key: PublicKey, *, strategy: str = "uniform",
                  sample_rate: float | None = None, count: int | None = None, nonce: bytes | None = None,
                  config: str | Path | None = None):
    """Draw a challenge from a run's signed root and a fresh nonce (`aftune challenge`)."""
    from .protocol.challenge import challenge_from_transcript

    return challenge_from_transcript(transcript, public_key, strategy=strategy, sample_rate=sample_rate, count=count,
                                     nonce=nonce, config_path=config)


def open_challenge(run_dir: str | Path, challenge, out: str | Path) -> dict[str, Any]:
    """The provider's opening of a challenge (`aftune open`): a bundle in `out`."""
    from .protocol.opening import open_bundle

    return open_bundle(run_dir, list(challenge.blocks), challenge.digest_bytes, out)


def audit(bundle: str | Path, transcript: str | Path, challenge, public_key: PublicKey, *, mode: str = "strict",
          tolerance: Tolerance | None = None, replay_dtype: str | None = None, workers: int | None = None) -> Report:
    """The client's audit of a bundle against its own transcript and challenge (`aftune audit`)."""
    from .protocol.audit import audit_bundle

    return audit_bundle(bundle, transcript, public_key, list(challenge.blocks), challenge.digest_bytes, mode=mode,
                        tolerance=tolerance or Tolerance(), replay_dtype=replay_dtype, workers=workers)
