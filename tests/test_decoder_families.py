"""Every decoder family of transformers' layer-stack layout, on tiny random configs (hidden 32,
two layers, a sliding window of 6 where the family has one, non-default multipliers, scales and
soft-caps): each trains under an agreement and verifies PASS at every block, a flipped weight
FAILs its block, and a recorded answer verifies at every layer block. Dishonest counterparts:
serving that ignores a sliding window FAILs, and a family of another layout is refused by name.

    python -m pytest -p no:cacheprovider -q -n 0 tests/test_decoder_families.py
"""

from __future__ import annotations

import shutil

import pytest
import torch

from aftune.core.signing import PublicKey, SigningKey
from aftune.errors import InputError
from aftune.inference.engine import InferenceEngine
from aftune.inference.policy import GenerationPolicy
from aftune.inference.served import ServedModel
from aftune.inference.settings import RecordingSettings
from aftune.inference.verify import InferenceVerifier
from aftune.models import adapter_class
from aftune.models.layerstack import LayerStackAdapter
from aftune.training.agreement import make_agreement
from aftune.training.settings import LoraSettings, TrainSettings
from aftune.training.train import Deviation, train
from aftune.training.verify import Verifier
from conftest import BUILTIN, TOKENIZER_FILES, failing

TINY = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
SLIDING = ["sliding_attention", "full_attention"]
FAMILIES = {  # model_type: what the tiny config sets beyond TINY
    "llama": {},
    "mistral": {"sliding_window": 6},
    "qwen2": {"sliding_window": 6, "use_sliding_window": True, "layer_types": SLIDING},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"sliding_window": 6, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 10.0},
    "gemma3_text": {"sliding_window": 6, "layer_types": SLIDING, "final_logit_softcapping": 5.0},
    "phi3": {"sliding_window": 6},
    "olmo2": {},
    "granite": {"embedding_multiplier": 2.0, "logits_scaling": 3.0, "residual_multiplier": 0.5},
    "starcoder2": {"sliding_window": 6, "embedding_dropout": 0.1},
    "cohere": {"logit_scale": 0.5},
    "cohere2": {"sliding_window": 6, "layer_types": SLIDING},
    "smollm3": {},
    "glm": {},
    "helium": {},
    "exaone4": {"sliding_window": 6, "layer_types": SLIDING},
    "olmo3": {"sliding_window": 6, "layer_types": SLIDING},
}
EAGER = {"gemma2"}  # attention soft-capping: eager attention only
TARGET = "model.layers.1.mlp."  # the first MLP weight of layer 1: layer block 1 (layer 1 + head)
PROMPT = "Q: what colour is the sky?"  # with 6 new tokens, well past a window of 6


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    import transformers as tf

    root = tmp_path_factory.mktemp("families")

    def make(family: str):
        d = root / family
        if not d.exists():
            torch.manual_seed(0)
            config = tf.AutoConfig.for_model(family, **TINY, **FAMILIES[family])
            attn = "eager" if family in EAGER else "sdpa"
            tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn).save_pretrained(str(d))
            for f in TOKENIZER_FILES:
                shutil.copy(BUILTIN / "model" / f, d / f)
        return d

    return make


class FlipBit(Deviation):
    """One exponent bit of layer 1's first MLP weight flipped after the update of step 1."""

    name = None

    def after_update(self, step, blocked):
        if step == 1:
            params = dict(p for lay in blocked.layout for p in lay.params)
            self.name = next(n for n in params if n.startswith(TARGET) and n.endswith("weight"))
            params[self.name].data.view(-1)[:1].view(torch.int32).bitwise_xor_(1 << 24)


def _train(family_dir, datasets, tmp_path, family, name, deviation=None, **kw):
    settings = TrainSettings(steps=2, batch_size=2, seq_len=16, layers_per_block=1, steps_per_block=1, lr=1e-2,
                             attn_implementation="eager" if family in EAGER else "sdpa", boundaries="stored", **kw)
    agreement = make_agreement(family_dir(family), datasets["text"], settings)
    result = train(family_dir(family), datasets["text"], tmp_path / name, agreement=agreement, deviation=deviation)
    return Verifier(tmp_path / name, PublicKey.load(result.public_key_path), agreement).verify_all()


def _answer(model_dir, family, record_dir, stretch_windows=False):
    """A recorded greedy answer; `stretch_windows`: the server ignores every sliding window."""
    served = ServedModel.load(model_dir, attn_implementation="eager" if family in EAGER else None)
    if stretch_windows:
        served.adapter.windows = [None] * len(served.adapter.windows)
        for stage in served.stages:
            if hasattr(stage.module, "window"):
                stage.module.window = None
    key = SigningKey.generate()
    policy = GenerationPolicy(max_new_tokens=6, eos_token_ids=(), temperature=0.0, dtype="float32")
    engine = InferenceEngine(served, record_dir, key, RecordingSettings(1, 1))
    result = engine.generate(PROMPT, policy)
    report = InferenceVerifier(record_dir, result.record_id, model=model_dir, public_key=key.public_key,
                               expected_prompt=PROMPT, policy=policy).verify_all()
    return engine, report


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_verifies_and_answers(family_dir, datasets, tmp_path, family):
    assert adapter_class(family) is LayerStackAdapter
    report = _train(family_dir, datasets, tmp_path, family, "honest")
    assert report.verdict == "PASS", report.summary()
    assert len(report.results) == 4 and all(r.compared > 0 for r in report.results)  # 2 layer blocks x 2 steps
    flip = FlipBit()
    tampered = _train(family_dir, datasets, tmp_path, family, "tampered", flip)
    bad = failing(tampered)  # (1, 1); with tied embeddings also layer block 0, which replays with it
    assert (1, 1) in bad and {step_block for _, step_block in bad} == {1}, tampered.summary()
    assert all(r.findings[0].tensor == f"state/{flip.name}" for r in tampered.results if r.verdict == "FAIL")
    engine, answer = _answer(family_dir(family), family, tmp_path / "rec")
    assert answer.verdict == "PASS", answer.summary()
    assert not answer.notes and len(answer.results) == len(engine.blocks) == 2
    assert all(r.compared > 0 for r in answer.results)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stages_compute_what_transformers_computes(family_dir, family):
    """Not only self-consistent: the stages give transformers' own loss (with padding, past the
    sliding window) and its greedy generation, so a PASS is about the family's real computation."""
    import transformers as tf

    from aftune.models.cache import KVCache

    attn = "eager" if family in EAGER else "sdpa"
    model = tf.AutoModelForCausalLM.from_pretrained(family_dir(family), attn_implementation=attn).eval()
    adapter = adapter_class(family)(model)
    torch.manual_seed(1)
    ids = torch.randint(3, 512, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    with torch.no_grad():
        expected = model(**batch).loss
        ctx, h = adapter.context(batch), None
        for i in range(len(adapter.stages)):
            h = adapter.run_stage(i, h, ctx)
        assert torch.allclose(h, expected, rtol=1e-5, atol=0), (h, expected)
        prompt = ids[:1, :4]
        hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                            eos_token_id=None)[0, 4:].tolist()
        stages, cache, tokens, step, first = adapter.inference_stages(), KVCache(), [], prompt, 0
        for _ in range(8):  # past the window of 6: the sliding layers' explicit masks are used
            ctx = adapter.inference_context(first, {"input_ids": step})
            ctx["cache"], x = cache, None
            for stage in stages:
                x = stage.module(x, ctx)
            tokens.append(int(x.argmax()))
            first, step = first + step.shape[1], torch.tensor([[tokens[-1]]])
    assert tokens == hf


@pytest.mark.parametrize("family, targets", [("gemma3_text", ("q_proj", "v_proj")), ("phi3", ("qkv_proj",))])
def test_lora_passes(family_dir, datasets, tmp_path, family, targets):
    lora = LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=targets)  # Phi-3 fuses q, k and v
    report = _train(family_dir, datasets, tmp_path, family, "lora", lora=lora)
    assert report.verdict == "PASS", report.summary()
    assert len(report.results) == 4 and all(r.compared > 0 for r in report.results)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_serving_past_the_sliding_window_fails(family_dir, tmp_path, family):
    engine, report = _answer(family_dir(family), family, tmp_path / "rec", stretch_windows=True)
    assert report.verdict == "FAIL", report.summary()
    bad = [r.layer_block for r in report.results if r.verdict == "FAIL"]
    assert bad and bad[0] == 0, report.summary()  # layer 0 slides: its block is the first to differ


@pytest.mark.parametrize("family, names", [
    ("mixtral", "num_experts"),  # a mixture of experts with a router loss
    ("olmo_hybrid", "linear_attention"),  # a layer type without a causal mask
    ("llama4_text", "chunked_attention"),  # nor one masked by chunks
    ("gemma3n_text", "altup"),  # per-layer inputs beside the stack
    ("bert", None),  # not a causal LM: its own adapter, never this one
])
def test_other_layouts_are_refused_naming_what_differs(family, names):
    if names is None:
        assert adapter_class(family) is not LayerStackAdapter
        return
    with pytest.raises(InputError, match=names):
        adapter_class(family)
