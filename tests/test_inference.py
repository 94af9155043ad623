"""Auditable inference, honest side: every family verifies PASS at every layer block in strict
mode (greedy and sampled generation, classifiers), records are named by their full digest and
never overwritten, digest-only activations are regenerated, a run-bound record is tied to the
run's signed final model, and the CLI answers with the right exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aftune.errors import InputError
from aftune.attacks import quant_serving
from aftune.inference.engine import InferenceEngine
from aftune.inference.record import InferenceRecord, boundary_key
from aftune.inference.sampling import sample_token, sample_uniform
from aftune.inference.served import ServedModel
from aftune.inference.settings import GenerationSettings, RecordingSettings
from aftune.inference.receipt import Receipt, verify_receipt
from aftune.core.signing import SigningKey
from aftune.inference.regenerate import prepare_inference
from aftune.inference.verify import InferenceVerifier

PROMPT = "Q: what colour is the sky?"
TEXT = "good fine okay great"


# --- helpers shared by the inference tests ----------------------------------------------------

# Qu-ANTI-zation threat B, as the attack suite builds it: every Linear / Conv1D / Conv2d weight
# fake-quantized (symmetric, per tensor) while the record claims the float model's digest.
QuantizedServing = quant_serving.QuantizedServing


def image_file(directory: Path) -> Path:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "query.png"
    if not path.exists():
        im = Image.new("RGB", (20, 20), (30, 200, 30))
        for i in range(20):
            im.putpixel((i, (7 * i) % 20), (255, 0, i * 10))
        im.save(path)
    return path


def infer(model, record_dir, family=None, *, prompt=PROMPT, gen=GenerationSettings(max_new_tokens=6), dtype=None,
          layers_per_block=1, activation_interval=1, deviation=None, key=None, image_dir=None, attn=None):
    """One recorded request; returns (result, engine)."""
    served = ServedModel.load(model, dtype=dtype, attn_implementation=attn)
    engine = InferenceEngine(served, record_dir, key or SigningKey.generate(),
                             RecordingSettings(layers_per_block, activation_interval), deviation=deviation)
    if served.task == "causal_lm":
        result = engine.generate(prompt, gen)
    elif served.family == "bert":
        result = engine.classify(text=TEXT)
    else:
        result = engine.classify(image=image_file(image_dir or Path(record_dir).parent))
    return result, engine


def verify(record_dir, result, model=None, **kw):
    v = InferenceVerifier(record_dir, result.record_id.hex(), model=model, **kw)
    return v, v.verify_all()


def failing(report):
    return [r.layer_block for r in report.results if r.verdict == "FAIL"]


# --- honest inference: PASS at every layer block ----------------------------------------------

@pytest.mark.parametrize("family, gen", [
    ("llama", GenerationSettings(max_new_tokens=6)),
    ("llama", GenerationSettings(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=7)),
    ("qwen2", GenerationSettings(max_new_tokens=5, temperature=1.3, seed=1)),
    ("gpt2", GenerationSettings(max_new_tokens=6)),
    ("bert", None), ("vit", None), ("dinov2", None), ("resnet", None),
])
@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_honest_inference_passes_every_block_strict(model_dir, tmp_path, family, gen, layers_per_block):
    key = SigningKey.generate()
    result, engine = infer(model_dir(family), tmp_path / "rec", gen=gen, layers_per_block=layers_per_block, key=key)
    v, report = verify(tmp_path / "rec", result, public_key=key.public_key)
    assert report.verdict == "PASS", report.summary() + "".join(f"\n{e.describe()}" for e in report.errors)
    assert len(report.results) == len(engine.blocks) and all(r.compared > 0 for r in report.results)
    if gen is not None:
        assert len(result.tokens) == gen.max_new_tokens or result.tokens[-1] in engine.served.eos_token_ids
        assert report.results[-1].compared == len(result.tokens)  # every generated token was checked
    else:
        assert result.label in range(3)


def test_blocked_greedy_generation_matches_hugging_face_generate(model_dir, tmp_path):
    result, engine = infer(model_dir("llama"), tmp_path / "rec", gen=GenerationSettings(max_new_tokens=12))
    ids = engine.served.prompt_inputs(PROMPT)["input_ids"]
    hf = engine.served.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert list(result.tokens) == hf[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eager_attention_records_verify_and_match_generate(model_dir, tmp_path, family):
    """Eager attention takes the explicit causal mask of the prefill; SDPA its causal mode."""
    result, engine = infer(model_dir(family), tmp_path / "rec", gen=GenerationSettings(max_new_tokens=8), attn="eager")
    assert InferenceRecord.open(tmp_path / "rec").model["attn_implementation"] == "eager"
    _, report = verify(tmp_path / "rec", result)
    assert report.verdict == "PASS", report.summary()
    ids = engine.served.prompt_inputs(PROMPT)["input_ids"]
    hf = engine.served.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert list(result.tokens) == hf[0, ids.shape[1]:].tolist()


def test_seeded_sampling_is_reproducible_and_documented(model_dir, tmp_path):
    gen = GenerationSettings(max_new_tokens=8, temperature=0.9, top_p=0.8, seed=42)
    a, _ = infer(model_dir("llama"), tmp_path / "a", gen=gen)
    b, _ = infer(model_dir("llama"), tmp_path / "b", gen=gen)
    c, _ = infer(model_dir("llama"), tmp_path / "c", gen=GenerationSettings(8, 0.9, 0.8, seed=43))
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert a.record_id != b.record_id  # each request is its own record (nonce and time)
    # the inverse-CDF draw in vocabulary order, by hand
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    q = torch.softmax(logits.double(), 0)
    cdf = torch.cumsum(q, 0)
    for u in (0.0, 0.2, 0.5, 0.99):
        assert sample_token(logits, 1.0, 1.0, u) == int((cdf > u).nonzero()[0])
    assert sample_token(logits, 1.0, 0.5, 0.0) == 2  # the nucleus keeps only the top token
    assert 0 <= sample_uniform("blake3", 1, 0) < 1 and sample_uniform("blake3", 1, 0) != sample_uniform("blake3", 1, 1)


def test_records_are_named_by_full_digest_and_never_overwritten(model_dir, tmp_path):
    from aftune.inference.record import RecordDir, record_id

    rec = tmp_path / "rec"
    results = [infer(model_dir("llama"), rec)[0] for _ in range(3)]
    names = sorted(p.name for p in (rec / "records").iterdir())
    assert names == sorted(f"{r.record_id.hex()}.json" for r in results) and len(set(names)) == 3
    for r in results:
        data = r.record_path.read_bytes()
        assert record_id("blake3", data) == r.record_id and len(r.record_id.hex()) == 64
        assert (rec / "receipts" / f"{r.record_id.hex()}.json").is_file()
    with pytest.raises(Exception, match="never overwritten"):
        RecordDir(rec, "blake3").write_new(results[0].record_path, b"{}")
    assert record_id("blake3", results[0].record_path.read_bytes()) == results[0].record_id
    with pytest.raises(InputError, match="3 records"):
        InferenceRecord.open(rec)


def test_record_commits_input_tokens_sampling_and_model(model_dir, tmp_path):
    gen = GenerationSettings(max_new_tokens=5, temperature=0.7, top_p=0.95, seed=3)
    result, engine = infer(model_dir("llama"), tmp_path / "rec", gen=gen)
    rec = InferenceRecord.open(tmp_path / "rec", result.record_id.hex()[:12])
    assert rec.doc["input"]["prompt"] == PROMPT
    assert rec.tensor("input/input_ids").tolist() == engine.served.prompt_inputs(PROMPT)["input_ids"].tolist()
    assert rec.tensor("output/tokens").tolist() == list(result.tokens) == rec.doc["output"]["tokens"]
    assert rec.doc["generation"] == {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.95, "seed": 3,
                                     "eos_token_ids": [2]}
    assert rec.model_digest == engine.served.digest
    nb = len(engine.blocks)
    for k in range(len(result.tokens)):
        assert all(f"step/{k:06d}/boundary/{b:04d}" in rec.rows for b in range(1, nb))
    receipt = Receipt.load(result.receipt_path)
    verify_receipt(receipt, engine.key.public_key, tmp_path / "rec")
    assert receipt.record_root == result.record_id and receipt.output_digest == rec.rows_root("output/")


def test_digest_only_activations_are_regenerated(model_dir, tmp_path):
    rec = tmp_path / "rec"
    result, engine = infer(model_dir("llama"), rec, activation_interval=2)
    r = InferenceRecord.open(rec)
    assert [r.has_tensor(boundary_key(b)) for b in (1, 2, 3)] == [False, True, False]
    with pytest.raises(Exception, match="prepare-inference"):
        InferenceVerifier(rec, model=model_dir("llama")).verify([1])
    assert prepare_inference(rec, layer_block=1) == [1]
    assert InferenceVerifier(rec).verify([1]).verdict == "PASS"
    assert prepare_inference(rec) == [3]
    assert InferenceVerifier(rec, mode="tolerance", replay_dtype="float64").verify_all().verdict == "PASS"
    # strict --all chains replays through digest-only boundaries without regenerating them
    result, _ = infer(model_dir("gpt2"), tmp_path / "g", activation_interval=3)
    _, report = verify(tmp_path / "g", result)
    assert report.verdict == "PASS", report.summary()


def test_eos_stops_generation_and_is_checked(model_dir, tmp_path):
    """A model whose end-of-sequence logit doubles the top token's at step 2 stops there; the
    record still verifies, and the stop is checked."""
    import shutil

    from safetensors.torch import load_file, save_file

    result, _ = infer(model_dir("llama"), tmp_path / "a", gen=GenerationSettings(max_new_tokens=8))
    stopping = tmp_path / "stopping"
    shutil.copytree(model_dir("llama"), stopping)
    weights = load_file(stopping / "model.safetensors")
    weights["lm_head.weight"][2] = 2 * weights["lm_head.weight"][result.tokens[2]]
    save_file(weights, stopping / "model.safetensors", metadata={"format": "pt"})
    result, _ = infer(stopping, tmp_path / "rec", gen=GenerationSettings(max_new_tokens=8))
    assert len(result.tokens) < 8 and result.tokens[-1] == 2, result.tokens
    _, report = verify(tmp_path / "rec", result)
    assert report.verdict == "PASS", report.summary()


# --- run binding ------------------------------------------------------------------------------

def test_run_directory_binds_the_record_to_the_fine_tuned_model(record, model_dir, tmp_path):
    run, pub = record("llama", steps=2)
    final = json.loads((run / "transcript.jsonl").read_text().splitlines()[-1])
    result, engine = infer(run, tmp_path / "rec", key=SigningKey.load(run / "provider.key"))
    assert engine.served.digest.hex() == final["final_model_digest"] and engine.served.run.root.hex() == final["root"]
    rec = InferenceRecord.open(tmp_path / "rec")
    assert rec.run.final_model_digest == rec.model_digest
    assert ServedModel.load(run / "model").run == engine.served.run  # RUN/model binds the same way
    v, report = verify(tmp_path / "rec", result, model=run, public_key=pub, run_dir=run)
    assert report.verdict == "PASS", report.summary()
    # the same record checked against another run: the served model is not that run's model
    other, other_pub = record("llama", steps=2, lr=5e-2)
    v, report = verify(tmp_path / "rec", result, model=run, public_key=other_pub, run_dir=other)
    assert report.verdict == "FAIL" and any(e.check == "run" for e in report.errors), report.summary()
    # a record from the base model claims no run, and is not that run's model either
    plain, _ = infer(model_dir("llama"), tmp_path / "plain")
    v, report = verify(tmp_path / "plain", plain, model=run, public_key=pub, run_dir=run)
    assert {e.check for e in report.errors} >= {"model", "run"}


def test_serving_a_changed_run_model_is_refused(record, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    run, _ = record("llama", steps=2)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = load_file(copy / "model" / "model.safetensors")
    name = next(k for k in weights if k.endswith("down_proj.weight"))
    weights[name][0, 0] += 0.5
    save_file(weights, copy / "model" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="not the run's final model"):
        ServedModel.load(copy)
    with pytest.raises(InputError, match="could not be bound"):
        ServedModel.load(run, dtype="bfloat16")


# --- the command line -------------------------------------------------------------------------

def cli(*args):
    from typer.testing import CliRunner

    from aftune.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_cli_infer_verify_prepare_and_receipt(model_dir, tmp_path):
    rec = tmp_path / "rec"
    r = cli("infer", "--model", model_dir("llama"), "--prompt", PROMPT, "--record-dir", rec, "--max-new-tokens", 5,
            "--temperature", 0.8, "--seed", 3, "--layers-per-block", 1, "--activation-interval", 2, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    rid = out["record_id"]
    assert len(out["tokens"]) == 5 and out["receipt"]["record_root"] == rid
    pub = rec / "provider.key.pub"
    r = cli("verify-inference", rec, "--all", "--public-key", pub, "--prompt", PROMPT)
    assert r.exit_code == 0 and "PASS: 4/4 blocks pass (strict mode)" in r.output, r.output
    r = cli("verify-inference", rec, "--record", rid[:10], "-l", 3, "--mode", "tolerance", "--dtype", "float64")
    assert r.exit_code == 2 and "prepare-inference" in r.output, r.output
    r = cli("prepare-inference", rec, "-l", 2)
    assert r.exit_code == 0 and "regenerated boundaries [3]" in r.output, r.output
    r = cli("verify-inference", rec, "-l", 2, "--mode", "tolerance", "--dtype", "float64", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["verdict"] == "PASS", r.output
    r = cli("verify-receipt", rec / "receipts" / f"{rid}.json", "--public-key", pub, "--record-dir", rec)
    assert r.exit_code == 0 and "VALID" in r.output
    r = cli("verify-inference", rec, "--all", "--prompt", "another prompt")
    assert r.exit_code == 1 and "answers another prompt" in r.output


@pytest.mark.parametrize("family, flag", [("bert", "--text"), ("vit", "--image"), ("resnet", "--image")])
def test_cli_classifiers(model_dir, tmp_path, family, flag):
    rec = tmp_path / "rec"
    value = TEXT if flag == "--text" else image_file(tmp_path)
    r = cli("infer", "--model", model_dir(family), flag, value, "--record-dir", rec)
    assert r.exit_code == 0 and "label:" in r.output, r.output
    extra = ("--image", value) if flag == "--image" else ("--text", value)
    r = cli("verify-inference", rec, "--all", "--public-key", rec / "provider.key.pub", *extra)
    assert r.exit_code == 0 and "PASS" in r.output, r.output


@pytest.mark.parametrize("args, message", [
    (("infer", "--model", "LLAMA", "--record-dir", "REC"), "exactly one input"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--prompt", "a", "--text", "b"), "exactly one input"),
    (("infer", "--model", "BERT", "--record-dir", "REC", "--prompt", "a"), "classifier"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--image", "x.png"), "image classifiers"),
    (("infer", "--model", "/nonexistent", "--record-dir", "REC", "--prompt", "a"), "does not exist"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--prompt", "a", "--top-p", "0"), "top_p"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--prompt", "a", "--max-new-tokens", "500"), "positions"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--prompt", "a", "--dtype", "int8"), "--dtype"),
    (("verify-inference", "REC", "-l", "0", "--all"), "either --all or --layer-block"),
    (("verify-inference", "REC", "-l", "9"), "layer block 9 does not exist"),
    (("verify-inference", "REC", "--all", "--dtype", "float64"), "--mode tolerance"),
    (("verify-inference", "REC", "--all", "--mode", "fuzzy"), "mode must be one of"),
    (("verify-inference", "REC", "--all", "--record", "zz"), "hexadecimal"),
    (("verify-inference", "/nonexistent", "--all"), "does not exist"),
    (("verify-inference", "REC", "--all", "--run", "REC"), "--run needs --public-key"),
    (("verify-receipt", "/nonexistent.json", "--public-key", "ed25519:" + "00" * 32), "does not exist"),
])
def test_cli_bad_input_exits_2(model_dir, tmp_path, args, message):
    rec = tmp_path / "rec"
    infer(model_dir("llama"), rec)
    subst = {"LLAMA": model_dir("llama"), "BERT": model_dir("bert"), "REC": rec}
    r = cli(*[subst.get(a, a) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output


def test_cli_infer_on_run_directory_uses_the_run_key(record, tmp_path):
    run, pub = record("llama", steps=2)
    rec = tmp_path / "rec"
    r = cli("infer", "--model", run, "--prompt", PROMPT, "--record-dir", rec, "--max-new-tokens", 3)
    assert r.exit_code == 0 and "the run's final model" in r.output, r.output
    r = cli("verify-inference", rec, "--all", "--public-key", run / "provider.key.pub", "--run", run)
    assert r.exit_code == 0, r.output


# --- SPEC.md 8.12: recomputed independently -------------------------------

def test_spec_vectors():
    import hashlib
    import struct

    import blake3
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from aftune.inference.record import record_id
    from aftune.inference.receipt import issue_receipt

    def h(alg, data):
        return blake3.blake3(data).digest() if alg == "blake3" else hashlib.sha256(data).digest()

    def lp(b):
        return struct.pack(">I", len(b)) + b

    want = {"blake3": ("21fd6de5a2792604be647dabde5957330d7b6f39e4402d705cd80f4049e1e435", 0.13277327400507888,
                       "9977fff18637b1f1a2d80d1224cb4805b25ca8154576ebce20172c45b1604921",
                       "4c838ec5993b6e224e6e23dacec0649454e3266c8306fd4fa6e5410025b4eedd",
                       "2d1623ea690480737a25966b3e7c4e231d98b7c2a91b29f24a8b2296438c5dfe"
                       "b7db160f76217f7da2a9b47af984cc2c5c40c53e098d1af7a5e46eba0c137b0b"),
            "sha256": ("f76ad7c8f89cc7800d75053b51b3f9abdd19a3758714aa6d3b2ced6589383958", 0.966474043431492,
                       "7603233b89431ed2d1c1f0f33b752a3de86175c8ea83713a30bf6d453eb753f4",
                       "647e37b0383914323e26448061018fc0dd203cc69cbe1b8175261b1176aad99b",
                       "69fba039ae79e208a15ab8a71edc4ccfc776a26268f49c694eeff4a31605f197"
                       "68a8c2543d26c301f1251c21ad56b293ffadcb8e122099a8077e2bd767a8c204")}
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    key = SigningKey(private)
    time = "2025-01-31T12:00:00.000000Z"
    for alg, (d_hex, u, rid, message, signature) in want.items():
        d = h(alg, b"aftune.v1.sample\x00" + struct.pack(">QQ", 7, 3))
        assert d.hex() == d_hex and (int.from_bytes(d[:8], "big") >> 11) / 2**53 == u == sample_uniform(alg, 7, 3)
        doc = b'{"format":"aftune.inference.v1"}'
        assert h(alg, b"aftune.v1.inference-record\x00" + doc).hex() == rid == record_id(alg, doc).hex()
        m = h(alg, b"aftune.v1.receipt\x00" + lp(b"aftune.receipt.v1") + lp(alg.encode()) + bytes([0x11]) * 32
              + bytes([0x22]) * 32 + bytes([0x33]) * 32 + bytes([0x44]) * 32 + lp(time.encode()) + key.public_key.raw)
        assert m.hex() == message
        sig = private.sign(b"aftune.v1.signature\x00" + lp(b"inference-receipt") + m)
        assert sig.hex() == signature
        r = issue_receipt(key, alg, bytes([0x11]) * 32, bytes([0x22]) * 32, bytes([0x33]) * 32, bytes([0x44]) * 32, time)
        assert r.message() == m and r.signature == sig
        verify_receipt(Receipt.from_json(r.to_json()), key.public_key)


def test_strict_replay_uses_the_recorded_thread_count(model_dir, tmp_path):
    """CPU matmul results depend on the intra-op thread count: a verifier running with another
    count (a worker pool, a smaller machine) must still reproduce the record bitwise."""
    key = SigningKey.generate()
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result, _ = infer(model_dir("llama"), tmp_path / "rec", key=key)
        torch.set_num_threads(1)
        _, report = verify(tmp_path / "rec", result, public_key=key.public_key)
    finally:
        torch.set_num_threads(previous)
    assert report.verdict == "PASS", report.summary()
