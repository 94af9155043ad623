"""Partitioned execution across real processes: one trusted process and one untrusted worker
(spawned once for this module and shared), tiny models from configs.

Families: Llama, GPT-2 (Conv1D), ViT (patch convolution), ResNet (strided, padded convolutions).
Exactness: `all-shielded` is bit-identical to the unpartitioned model; every strategy gives the
same tokens / label as the unpartitioned model computed independently in this process (Hugging
Face `generate`); offloaded strategies keep every logit within 1e-3 * max|z| of it (observed
~5e-5: 16-bit weights and activations of 20+ bits, SPEC.md 11.3). A worker that changes one
element, scales a row, or returns a stale result is caught with a FAIL naming the layer and step.
"""

from __future__ import annotations

import pytest
import torch

from aftune.errors import CommitmentMismatch, InputError
from aftune.partition import (TRUSTED_SIDE_LABEL, Attack, IntegrityFailure, PartitionRecord, PartitionRuntime,
                              StrategyConfig, TamperingWorker, check_record)
from aftune.partition.link import crossing_name

PROMPT = torch.tensor([[1, 5, 9, 33, 100, 7]])
NEW_TOKENS = 4
QUANTIZED = ("shield-deep", "shield-shallow", "shield-large-magnitude", "shield-intermediate", "shield-nonlinear")
IMAGE = ("vit", "resnet")  # ResNet: every convolution offloaded as im2col products (padding, stride 2)
LOGIT_BOUND = 1e-3  # relative to max|z|: the stated bound for offloaded strategies


@pytest.fixture(scope="module")
def rt():
    with PartitionRuntime(worker_class=TamperingWorker) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def unpartitioned(model_dir, pixels):
    """family -> (tokens or label, logits of the last step), computed here, independently."""
    import transformers as tf

    cache = {}

    def answer(family: str):
        if family not in cache:
            if family in IMAGE:
                m = tf.AutoModelForImageClassification.from_pretrained(model_dir(family)).eval()
                with torch.no_grad():
                    z = m(pixel_values=pixels).logits[0]
                cache[family] = (int(z.argmax()), z)
            else:
                m = tf.AutoModelForCausalLM.from_pretrained(model_dir(family)).eval()
                with torch.no_grad():
                    out = m.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                     output_logits=True, return_dict_in_generate=True)
                cache[family] = (tuple(out.sequences[0, PROMPT.shape[1]:].tolist()), out.logits[-1][0])
        return cache[family]

    return answer


def _run(rt, model_dir, pixels, family, strategy, **kw):
    rt.instruct_worker(Attack(None))
    x = {"pixel_values": pixels} if family in IMAGE else {"input_ids": PROMPT}
    return rt.run(model_dir(family), strategy=strategy, max_new_tokens=NEW_TOKENS, reference=True, **x, **kw)


def _strategy_cases():
    """Every strategy on Llama and one of each kind (quantized, shielded, unshielded) on the other
    families by default; the whole cross product with --long."""
    default = ("shield-deep", "all-shielded", "none-shielded")
    return [pytest.param(family, strategy, marks=() if family == "llama" or strategy in default else pytest.mark.long)
            for family in ("llama", "gpt2", "vit", "resnet") for strategy in QUANTIZED + ("all-shielded", "none-shielded")]


@pytest.mark.parametrize("family, strategy", _strategy_cases())
def test_strategy_gives_the_unpartitioned_answer(rt, model_dir, pixels, unpartitioned, family, strategy):
    r = _run(rt, model_dir, pixels, family, strategy, unsafe_unchecked=strategy == "none-shielded")
    expected, z_ref = unpartitioned(family)
    assert (r.label if family in IMAGE else r.tokens) == expected
    assert r.reference is not None and (r.reference.label if family in IMAGE else r.reference.tokens) == expected
    fr = r.exposure.fractions()
    scale = float(z_ref.abs().max())
    if strategy == "all-shielded":  # nothing offloaded: bit for bit, nothing but session/end crosses
        assert all(torch.equal(a, b) for a, b in zip(r.logits, r.reference.logits, strict=True))
        assert r.traffic["messages"] == 2 and fr["parameters_plaintext"] == 0 and fr["macs_trusted"] == 1
    elif strategy == "none-shielded":  # the whole model in plaintext on the worker
        assert float((r.logits[-1] - z_ref).abs().max()) <= 1e-5 * scale
        assert fr["parameters_plaintext"] == 1 and fr["activations_plaintext"] == 1 and not r.error_bounds
    else:
        assert float((r.logits[-1] - z_ref).abs().max()) <= LOGIT_BOUND * scale
        assert fr["activations_plaintext"] == 0 and 0 < fr["activations_blinded"] <= 1
        assert 0 < fr["parameters_plaintext"] < 1
        # each offloaded product's stated error bound is small next to the product itself
        assert r.error_bounds and all(0 < b <= 1e-3 * r.stats["output_max"][k] for k, b in r.error_bounds.items())
        assert r.timing["freivalds"] > 0 and r.traffic["bytes_from_worker"] > 0
        if strategy == "shield-nonlinear":
            assert fr["activations_blinded"] == 1 and fr["macs_trusted"] == 0
        else:
            assert 0 < fr["macs_trusted"] < 1
    doc = r.record.document
    assert doc["trusted_side"] == TRUSTED_SIDE_LABEL and doc["strategy"]["name"] == strategy
    check = check_record(r.record, public_key=rt.public_key)
    assert check.outcome == "PASS" and check.crossings == r.traffic["messages"]


def test_record_replays_every_crossing_and_catches_edits(rt, model_dir, pixels, tmp_path):
    r = _run(rt, model_dir, pixels, "llama", "shield-nonlinear", store_crossings=True)
    products = sum(1 for row in r.record.document["crossings"]["rows"] if row[3] == "product")
    report = check_record(r.record, public_key=rt.public_key, crossings=r.crossings)
    assert report.products_replayed == products > 0 and report.digests_checked == len(r.crossings)
    # what crossed to the worker looks uniform on Z_p: the top 4 bits of every blinded operand
    from scipy.stats import chisquare

    operands = torch.cat([r.crossings[crossing_name(*row[:3])].flatten() for row in rows_of(r, "product")])
    assert chisquare(torch.bincount(operands >> 38, minlength=16).numpy()).pvalue > 1e-6
    path = r.record.write(tmp_path)
    assert check_record(PartitionRecord.read(path), public_key=rt.public_key).record_id == path.stem
    # a stored result edited after the fact: its digest no longer matches the signed row
    rows = r.record.document["crossings"]["rows"]
    last = next(row for row in reversed(rows) if row[3] == "result")
    name = crossing_name(last[0], last[1], last[2])
    edited = dict(r.crossings)
    edited[name] = edited[name].clone()
    edited[name][0, 0] ^= 1
    with pytest.raises(CommitmentMismatch, match=f"crossing {last[0]} \\(layer {last[1]}, step {last[4]}"):
        check_record(r.record, public_key=rt.public_key, crossings=edited)
    # the record's bytes edited: the signature over its id fails
    forged = PartitionRecord(r.record.body.replace(b'"verdict":"PASS"', b'"verdict":"PASS" '), r.record.signature,
                             r.record.key)
    with pytest.raises(CommitmentMismatch, match="signature"):
        check_record(forged, public_key=rt.public_key)
    from aftune.core.signing import SigningKey

    with pytest.raises(CommitmentMismatch, match="pinned key"):
        check_record(r.record, public_key=SigningKey.generate().public_key)


@pytest.mark.parametrize("family,attack,site,step", [
    ("llama", "flip-one", "model.layers.1.mlp.up_proj", 2),
    ("llama", "scale-row", "lm_head", 0),
    ("llama", "stale", "model.layers.0.self_attn.q_proj", 3),
    ("gpt2", "flip-one", "transformer.h.2.attn.c_attn", 1),
    ("vit", "flip-one", "vit.embeddings.patch_embeddings.projection", 0),
    ("llama", "out-of-range", "model.layers.2.mlp.down_proj", 1),
    ("llama", "wrong-shape", "model.layers.3.self_attn.o_proj", 0),
])
def test_dishonest_worker_is_caught_naming_layer_and_step(rt, model_dir, pixels, family, attack, site, step):
    x = {"pixel_values": pixels} if family in IMAGE else {"input_ids": PROMPT}
    rt.instruct_worker(Attack(attack, site=site, step=step, row=0, col=3))
    with pytest.raises(IntegrityFailure) as caught:
        rt.run(model_dir(family), strategy="shield-nonlinear", max_new_tokens=NEW_TOKENS, store_crossings=True, **x)
    rt.instruct_worker(Attack(None))
    failure = caught.value
    expected_check = {"out-of-range": "range", "wrong-shape": "shape"}.get(attack, "freivalds")
    assert (failure.site, failure.step, failure.check) == (site, step, expected_check)
    assert f"layer {site}, step {step}" in str(failure)
    # the failed session is signed; its last crossing is the rejected answer, and an auditor's
    # replay of what crossed reaches the same verdict without any secret
    report = check_record(failure.record, public_key=rt.public_key)
    assert report.outcome == "FAIL" and failure.record.document["outcome"]["site"] == site
    with pytest.raises(CommitmentMismatch, match=f"layer {site}, step {step}"):
        check_record(failure.record, public_key=rt.public_key, crossings=failure.crossings)
    # the runtime and the (now honest) worker carry on
    assert _run(rt, model_dir, pixels, family, "shield-deep").record.document["outcome"]["verdict"] == "PASS"


def rows_of(result, kind: str) -> list[list]:
    return [row for row in result.record.document["crossings"]["rows"] if row[3] == kind]


def _fine_tuned(model_dir, tmp_path, rank: int = 2):
    """A 'fine-tuned' llama: its backbone plus a rank-2 update of q_proj and v_proj (a merged LoRA)."""
    import transformers as tf

    torch.manual_seed(3)
    m = tf.AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    with torch.no_grad():
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                proj.weight += 0.05 * torch.randn(proj.weight.shape[0], rank) @ torch.randn(rank, proj.weight.shape[1])
    out = tmp_path / "fine-tuned"
    m.save_pretrained(out)
    return out, m


def test_teeslice_offloads_the_backbone_and_shields_the_slices(rt, model_dir, tmp_path):
    tuned, m = _fine_tuned(model_dir, tmp_path)
    with torch.no_grad():
        out = m.eval().generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    rt.instruct_worker(Attack(None))
    r = rt.run(tuned, strategy="teeslice", backbone=model_dir("llama"), input_ids=PROMPT, max_new_tokens=NEW_TOKENS,
               store_crossings=True)
    assert r.tokens == tuple(out[0, PROMPT.shape[1]:].tolist())
    ranks = r.stats["slice_ranks"]
    assert sorted(ranks) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj"))
    assert set(ranks.values()) == {2}
    # the weights that crossed for a sliced layer are the backbone's, never the fine-tuned ones
    backbone = tf_weight(model_dir("llama"), "model.layers.0.self_attn.q_proj.weight")
    row = next(x for x in r.record.document["crossings"]["rows"] if x[3] == "weight" and x[1] == "model.layers.0.self_attn.q_proj")
    sent = r.crossings[crossing_name(row[0], row[1], row[2])].double()
    assert torch.allclose(sent / sent.abs().max(), backbone / backbone.abs().max(), atol=1e-4)
    assert r.record.document["backbone"] is not None
    nonlinear = rt.run(tuned, strategy="shield-nonlinear", input_ids=PROMPT, max_new_tokens=NEW_TOKENS)
    assert r.exposure.parameters_plaintext < nonlinear.exposure.parameters_plaintext
    check_record(r.record, public_key=rt.public_key, crossings=r.crossings)


def tf_weight(directory, name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))[name].double()


def test_requests_that_cannot_run_are_refused_and_the_runtime_survives(rt, model_dir, pixels, tmp_path):
    with pytest.raises(InputError, match="public backbone"):
        rt.run(model_dir("llama"), strategy="teeslice", input_ids=PROMPT)
    with pytest.raises(InputError, match="unsafe_unchecked"):
        rt.run(model_dir("llama"), strategy="none-shielded", input_ids=PROMPT)
    with pytest.raises(InputError, match="not a model directory"):
        rt.run(tmp_path, strategy="shield-deep", input_ids=PROMPT)
    with pytest.raises(InputError, match="input ids"):
        rt.run(model_dir("llama"), strategy="shield-deep", input_ids=torch.tensor([[100000]]))
    with pytest.raises(InputError, match="unknown strategy"):
        StrategyConfig("shield-everything")
    assert _run(rt, model_dir, pixels, "vit", "shield-shallow").label is not None
