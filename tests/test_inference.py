"""Auditable inference, honest side: every family verifies PASS at every layer block in strict
mode (greedy and sampled generation, classifiers), records are named by their full digest and
never overwritten, digest-only activations are regenerated, a run-bound record is tied to the
run's signed final model, and the CLI answers with the right exit codes. The helpers verify as
the honest client does: with its own model, input, generation policy and request nonce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aftune.errors import CommitmentMismatch, InputError
from aftune.attacks import quant_serving
from aftune.inference.engine import InferenceEngine
from aftune.inference.record import InferenceRecord, boundary_key
from aftune.inference.policy import GenerationPolicy
from aftune.inference.sampling import request_seed, sample_token, sample_uniform
from aftune.inference.served import ServedModel
from aftune.inference.settings import RecordingSettings
from aftune.inference.receipt import Receipt, verify_receipt
from aftune.core.encoding import canonical_json
from aftune.core.signing import SigningKey
from aftune.inference.regenerate import prepare_inference
from aftune.inference.verify import InferenceVerifier

PROMPT = "Q: what colour is the sky?"
TEXT = "good fine okay great"
NONCE = bytes(range(32))  # the client's request nonce of the sampled tests


def policy(max_new_tokens=6, temperature=0.0, top_p=1.0, **kw) -> GenerationPolicy:
    """A client's policy for the tiny models (their config's end-of-sequence token is 2)."""
    return GenerationPolicy(max_new_tokens=max_new_tokens, eos_token_ids=kw.pop("eos_token_ids", (2,)),
                            temperature=temperature, top_p=top_p, **kw)


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


# what the client asked, per record id and per record directory: its model, input, policy, nonce
ASKED: dict = {}
_DEFAULT = object()


def infer(model, record_dir, family=None, *, prompt=PROMPT, gen=None, dtype=None, layers_per_block=1,
          activation_interval=1, deviation=None, key=None, image_dir=None, attn=None, nonce=_DEFAULT):
    """One recorded request under the client's policy `gen` (default: greedy, 6 tokens) and
    nonce (default: NONCE when sampling, none when greedy); returns (result, engine)."""
    gen = gen or policy()
    if nonce is _DEFAULT:
        nonce = NONCE if gen.sampling else None
    served = ServedModel.load(model, dtype=dtype, attn_implementation=attn)
    engine = InferenceEngine(served, record_dir, key or SigningKey.generate(),
                             RecordingSettings(layers_per_block, activation_interval), deviation=deviation)
    asked = dict(model=model, policy=None, request_nonce=nonce)
    if served.task == "causal_lm":
        result = engine.generate(prompt, gen, request_nonce=nonce)
        asked.update(expected_prompt=prompt, policy=gen)
    elif served.family == "bert":
        result = engine.classify(text=TEXT, request_nonce=nonce)
        asked.update(expected_text=TEXT)
    else:
        image = image_file(image_dir or Path(record_dir).parent)
        result = engine.classify(image=image, request_nonce=nonce)
        asked.update(expected_image=image)
    ASKED[result.record_id] = ASKED[Path(record_dir).resolve()] = asked
    return result, engine


def verify(record_dir, result, model=None, **kw):
    """Verify as the client that made the request: its own model, input, policy and nonce
    unless `kw` says otherwise."""
    asked = ASKED.get(result.record_id) or ASKED.get(Path(record_dir).resolve(), {})
    kw = {**asked, **({"model": model} if model is not None else {}), **kw}
    v = InferenceVerifier(record_dir, result.record_id, **kw)
    return v, v.verify_all()


def failing(report):
    return [r.layer_block for r in report.results if r.verdict == "FAIL"]


# --- honest inference: PASS at every layer block ----------------------------------------------

@pytest.mark.parametrize("family, gen", [  # policies pinning the serving dtype: nothing left unchecked
    ("llama", policy(6, dtype="float32")),
    ("llama", policy(6, temperature=0.8, top_p=0.9, dtype="float32")),
    ("qwen2", policy(5, temperature=1.3, dtype="float32")),
    ("gpt2", policy(6, dtype="float32")),
    ("bert", None), ("vit", None), ("dinov2", None), ("resnet", None),
])
@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_honest_inference_passes_every_block_strict(model_dir, tmp_path, family, gen, layers_per_block):
    key = SigningKey.generate()
    result, engine = infer(model_dir(family), tmp_path / "rec", gen=gen, layers_per_block=layers_per_block, key=key)
    v, report = verify(tmp_path / "rec", result, public_key=key.public_key)
    assert report.verdict == "PASS", report.summary() + "".join(f"\n{e.describe()}" for e in report.errors)
    assert not report.notes, report.notes  # the client gave everything: nothing went unchecked
    assert len(report.results) == len(engine.blocks) and all(r.compared > 0 for r in report.results)
    if gen is not None:
        assert len(result.tokens) == gen.max_new_tokens or result.tokens[-1] in engine.served.eos_token_ids
        assert report.results[-1].compared == len(result.tokens)  # every generated token was checked
    else:
        assert result.label in range(3)


def test_blocked_greedy_generation_matches_hugging_face_generate(model_dir, tmp_path):
    result, engine = infer(model_dir("llama"), tmp_path / "rec", gen=policy(12))
    ids = engine.served.prompt_inputs(PROMPT)["input_ids"]
    hf = engine.served.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert list(result.tokens) == hf[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eager_attention_records_verify_and_match_generate(model_dir, tmp_path, family):
    """Eager attention takes the explicit causal mask of the prefill; SDPA its causal mode."""
    result, engine = infer(model_dir(family), tmp_path / "rec", gen=policy(8), attn="eager")
    assert InferenceRecord.open(tmp_path / "rec").model["attn_implementation"] == "eager"
    _, report = verify(tmp_path / "rec", result)
    assert report.verdict == "PASS", report.summary()
    ids = engine.served.prompt_inputs(PROMPT)["input_ids"]
    hf = engine.served.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert list(result.tokens) == hf[0, ids.shape[1]:].tolist()


def test_seeded_sampling_is_reproducible_and_documented(model_dir, tmp_path):
    gen = policy(8, temperature=0.9, top_p=0.8)
    a, _ = infer(model_dir("llama"), tmp_path / "a", gen=gen, nonce=b"\x2a" * 32)
    b, _ = infer(model_dir("llama"), tmp_path / "b", gen=gen, nonce=b"\x2a" * 32)
    c, _ = infer(model_dir("llama"), tmp_path / "c", gen=gen, nonce=b"\x2b" * 32)  # another nonce, another seed
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
    assert names == sorted(f"{r.record_id}.json" for r in results) and len(set(names)) == 3
    for r in results:
        data = r.record_path.read_bytes()
        assert record_id("blake3", data).hex() == r.record_id and len(r.record_id) == 64
        assert (rec / "receipts" / f"{r.record_id}.json").is_file()
    with pytest.raises(Exception, match="never overwritten"):
        RecordDir(rec, "blake3").write_new(results[0].record_path, b"{}")
    assert record_id("blake3", results[0].record_path.read_bytes()).hex() == results[0].record_id
    with pytest.raises(InputError, match="3 records"):
        InferenceRecord.open(rec)


def test_record_commits_input_tokens_sampling_and_model(model_dir, tmp_path):
    gen = policy(5, temperature=0.7, top_p=0.95)
    result, engine = infer(model_dir("llama"), tmp_path / "rec", gen=gen)
    rec = InferenceRecord.open(tmp_path / "rec", result.record_id[:12])
    assert rec.doc["input"]["prompt"] == PROMPT
    assert rec.tensor("input/input_ids").tolist() == engine.served.prompt_inputs(PROMPT)["input_ids"].tolist()
    assert rec.tensor("output/tokens").tolist() == list(result.tokens) == rec.doc["output"]["tokens"]
    digest = gen.digest("blake3")
    assert rec.doc["generation"] == {"policy": {"format": "aftune.generation-policy.v1", "temperature": 0.7,
                                                "top_p": 0.95, "max_new_tokens": 5, "eos_token_ids": [2],
                                                "stop_rule": "eos_or_length", "chat_template": None},
                                     "policy_digest": digest.hex(),
                                     "seed": request_seed("blake3", NONCE, rec.declared_digest("input"), digest)}
    assert rec.doc["request_nonce"] == NONCE.hex() and rec.doc["format"] == "aftune.inference.v6"
    # v6: the policy in its policy file (the record file names its digest), the ids inline, no object
    raw = json.loads(result.record_path.read_bytes())
    assert raw["generation"] == {"policy_digest": digest.hex(), "seed": rec.seed} and "tensors" not in raw
    assert raw["input"]["ids"] == rec.tensor("input/input_ids")[0].tolist() and "digest" not in raw["input"]
    assert (tmp_path / "rec" / "policies" / f"{digest.hex()}.json").read_bytes() == canonical_json(gen.to_json())
    assert "source" not in rec.model  # no path a verifier could be sent to
    assert rec.model_digest == engine.served.digest
    nb = len(engine.blocks)
    # nothing per token but the tokens: per boundary one digest and one root of its per-step digests
    assert not [k for k in rec.rows if k.startswith("step/")] and "steps" not in rec.doc
    assert sorted(rec.doc["boundary_roots"]) == [f"{b:04d}" for b in range(1, nb)]
    assert rec.steps == [(0, rec.rows["input/input_ids"].shape[1])] + [
        (rec.rows["input/input_ids"].shape[1] + k - 1, 1) for k in range(1, len(result.tokens))]
    receipt = Receipt.load(result.receipt_path)
    verify_receipt(receipt, engine.key.public_key, tmp_path / "rec", request_nonce=NONCE, policy_digest=digest)
    assert receipt.record_root.hex() == result.record_id and receipt.format == "aftune.receipt.v3"
    with pytest.raises(CommitmentMismatch, match="request nonce"):  # bound through the record: another nonce fails
        verify_receipt(receipt, engine.key.public_key, tmp_path / "rec", request_nonce=bytes(32))


def test_digest_only_activations_are_regenerated(model_dir, tmp_path):
    rec = tmp_path / "rec"
    result, engine = infer(model_dir("llama"), rec, activation_interval=2)
    r = InferenceRecord.open(rec)
    assert [r.has_tensor(boundary_key(b)) for b in (1, 2, 3)] == [False, True, False]
    with pytest.raises(Exception, match="prepare-inference"):
        InferenceVerifier(rec, model=model_dir("llama")).verify([1])
    with pytest.raises(InputError, match="--model DIR"):  # never the provider's model: the client's copy
        prepare_inference(rec, layer_block=1)
    assert prepare_inference(rec, layer_block=1, model=model_dir("llama")) == [1]
    assert InferenceVerifier(rec, model=model_dir("llama")).verify([1]).verdict == "PASS"
    assert prepare_inference(rec, model=model_dir("llama")) == [3]
    assert InferenceVerifier(rec, model=model_dir("llama"), mode="tolerance",
                             replay_dtype="float64").verify_all().verdict == "PASS"
    # strict --all chains replays through digest-only boundaries without regenerating them
    result, _ = infer(model_dir("gpt2"), tmp_path / "g", activation_interval=3)
    _, report = verify(tmp_path / "g", result)
    assert report.verdict == "PASS", report.summary()


def test_eos_stops_generation_and_is_checked(model_dir, tmp_path):
    """A model whose end-of-sequence logit doubles the top token's at step 2 stops there; the
    record still verifies, and the stop is checked."""
    import shutil

    from safetensors.torch import load_file, save_file

    result, _ = infer(model_dir("llama"), tmp_path / "a", gen=policy(8))
    stopping = tmp_path / "stopping"
    shutil.copytree(model_dir("llama"), stopping)
    weights = load_file(stopping / "model.safetensors")
    weights["lm_head.weight"][2] = 2 * weights["lm_head.weight"][result.tokens[2]]
    save_file(weights, stopping / "model.safetensors", metadata={"format": "pt"})
    result, _ = infer(stopping, tmp_path / "rec", gen=policy(8))
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
    rec, nonce = tmp_path / "rec", NONCE.hex()
    r = cli("infer", "--model", model_dir("llama"), "--prompt", PROMPT, "--record-dir", rec, "--max-new-tokens", 5,
            "--temperature", 0.8, "--request-nonce", nonce, "--layers-per-block", 1, "--activation-interval", 2, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    rid = out["record_id"]
    assert len(out["tokens"]) == 5 and out["receipt"]["record_root"] == rid and out["receipt"]["format"] == "aftune.receipt.v3"
    assert json.loads((rec / "records" / f"{rid}.json").read_bytes())["request_nonce"] == nonce  # bound through the record
    pub = rec / "provider.key.pub"
    # what the client asked: its model, prompt, policy (from flags: greedy unless --temperature) and nonce
    asked = ("--model", model_dir("llama"), "--prompt", PROMPT, "--max-new-tokens", 5, "--temperature", 0.8,
             "--request-nonce", nonce)
    r = cli("verify-inference", rec, "--all", "--public-key", pub, *asked)
    assert r.exit_code == 0 and "PASS: 4/4 blocks pass (strict mode)" in r.output, r.output
    assert "NOT CHECKED" not in r.output
    r = cli("verify-inference", rec, "--record", rid[:10], "-l", 3, "--mode", "tolerance", "--dtype", "float64", *asked)
    assert r.exit_code == 2 and "prepare-inference" in r.output, r.output
    r = cli("prepare-inference", rec, "-l", 2, "--model", model_dir("llama"))
    assert r.exit_code == 0 and "regenerated boundaries [3]" in r.output, r.output
    r = cli("verify-inference", rec, "-l", 2, "--mode", "tolerance", "--dtype", "float64", "--json", *asked)
    assert r.exit_code == 0 and json.loads(r.stdout)["verdict"] == "PASS", r.output
    r = cli("verify-receipt", rec / "receipts" / f"{rid}.json", "--public-key", pub, "--record-dir", rec,
            "--request-nonce", nonce)
    assert r.exit_code == 0 and "VALID" in r.output
    r = cli("verify-receipt", rec / "receipts" / f"{rid}.json", "--public-key", pub, "--record-dir", rec,
            "--request-nonce", "ab" * 32)
    assert r.exit_code == 1 and "not yours" in r.output, r.output
    r = cli("verify-inference", rec, "--all", *asked[:2], "--prompt", "another prompt", *asked[4:])
    assert r.exit_code == 1 and "answers another prompt" in r.output


@pytest.mark.parametrize("family, flag", [("bert", "--text"), ("vit", "--image"), ("resnet", "--image")])
def test_cli_classifiers(model_dir, tmp_path, family, flag):
    rec = tmp_path / "rec"
    value = TEXT if flag == "--text" else image_file(tmp_path)
    r = cli("infer", "--model", model_dir(family), flag, value, "--record-dir", rec)
    assert r.exit_code == 0 and "label:" in r.output, r.output
    extra = ("--image", value) if flag == "--image" else ("--text", value)
    r = cli("verify-inference", rec, "--all", "--public-key", rec / "provider.key.pub", "--model", model_dir(family),
            *extra)
    assert r.exit_code == 0 and "PASS" in r.output and "NOT CHECKED" not in r.output, r.output


ASK = ("--model", "LLAMA", "--prompt", PROMPT, "--max-new-tokens", "6")


@pytest.mark.parametrize("args, message", [
    (("infer", "--model", "LLAMA", "--record-dir", "REC"), "exactly one input"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--prompt", "a", "--text", "b"), "exactly one input"),
    (("infer", "--model", "BERT", "--record-dir", "REC", "--prompt", "a"), "classifier"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--image", "x.png"), "image classifiers"),
    (("infer", "--model", "/nonexistent", "--record-dir", "REC", "--prompt", "a"), "does not exist"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--prompt", "a", "--top-p", "0"), "top_p"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--prompt", "a", "--max-new-tokens", "500"), "positions"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--prompt", "a", "--dtype", "int8"), "--dtype"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--prompt", "a", "--temperature", "0.7"), "request nonce"),
    (("infer", "--model", "LLAMA", "--record-dir", "REC", "--prompt", "a", "--request-nonce", "abcd"), "16 to 64 bytes"),
    (("verify-inference", "REC", "-l", "0", "--all"), "either --all or --layer-block"),
    (("verify-inference", "REC", "-l", "9", *ASK), "layer block 9 does not exist"),
    (("verify-inference", "REC", "--all", "--dtype", "float64", *ASK), "--mode tolerance"),
    (("verify-inference", "REC", "--all", "--mode", "fuzzy", *ASK), "mode must be one of"),
    (("verify-inference", "REC", "--all", "--record", "zz"), "hexadecimal"),
    (("verify-inference", "/nonexistent", "--all"), "does not exist"),
    (("verify-inference", "REC", "--all", "--run-dir", "REC"), "--run-dir needs --public-key"),
    # no PASS on half a check: what the client asked for is required, and the message says how to give it
    (("verify-inference", "REC", "--all", "--prompt", PROMPT, "--max-new-tokens", "6"), "--model DIR or --run-dir RUN"),
    (("verify-inference", "REC", "--all", "--model", "LLAMA", "--max-new-tokens", "6"), "--unsafe-skip-input-check"),
    (("verify-inference", "REC", "--all", "--model", "LLAMA", "--prompt", PROMPT), "--unsafe-skip-policy-check"),
    (("verify-inference", "REC", "--all", *ASK, "--temperature", "0.5"), "--request-nonce HEX"),
    (("verify-inference", "REC", "--all", *ASK, "--policy", "REC/none.json"), "is missing"),
    (("verify-inference", "REC", "--all", *ASK, "--agreement", "REC/none.json"), "is missing"),
    (("verify-receipt", "/nonexistent.json", "--public-key", "ed25519:" + "00" * 32, "--record-dir", "REC"),
     "does not exist"),
    (("verify-receipt", "/nonexistent.json", "--public-key", "ed25519:" + "00" * 32), "--unsafe-signature-only"),
    (("verify-receipt", "/nonexistent.json", "--record-dir", "REC"), "--attestation"),
])
def test_cli_bad_input_exits_2(model_dir, tmp_path, args, message):
    rec = tmp_path / "rec"
    infer(model_dir("llama"), rec)
    subst = {"LLAMA": model_dir("llama"), "BERT": model_dir("bert"), "REC": rec}
    r = cli(*[str(subst.get(a, a)).replace("REC/", f"{rec}/") for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output


def test_cli_infer_on_run_directory_uses_the_run_key(record, tmp_path):
    run, pub = record("llama", steps=2)
    rec = tmp_path / "rec"
    r = cli("infer", "--model", run, "--prompt", PROMPT, "--record-dir", rec, "--max-new-tokens", 3)
    assert r.exit_code == 0 and "the run's final model" in r.output, r.output
    r = cli("verify-inference", rec, "--all", "--public-key", run / "provider.key.pub", "--run-dir", run, "--prompt", PROMPT,
            "--max-new-tokens", 3)
    assert r.exit_code == 0 and "NOT CHECKED" not in r.output, r.output


# --- SPEC.md 8.12: recomputed independently -------------------------------

def test_spec_vectors():
    import hashlib
    import struct

    import blake3
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from aftune.core.rows import TensorRef
    from aftune.inference.compact import boundaries_root
    from aftune.inference.record import record_id
    from aftune.inference.receipt import RECEIPT_FORMAT_V2, issue_receipt, sign_receipt

    def h(alg, data):
        return blake3.blake3(data).digest() if alg == "blake3" else hashlib.sha256(data).digest()

    def lp(b):
        return struct.pack(">I", len(b)) + b

    want = {"blake3": dict(d="21fd6de5a2792604be647dabde5957330d7b6f39e4402d705cd80f4049e1e435", u=0.13277327400507888,
                           rid="a4c478a3bd9b0516687187c275219404518181ade086b7f7c4258826edb290f8",
                           policy="419116a87e7f3234a217843753e1073f5b1194c8fb7217f741124358095795b5",
                           seed_d="d75d27bb8e25d5980362c8b956d5406fea4e377eda18431108fa40df128f47f3",
                           seed=7759301788742904524,
                           message="ec8084bcd06577c15d091dbeb427acddc6e4bab0b3c3473a043b1f07f0072a24",
                           signature="f9108f1e7f41d134a23ea216a646f504960738cc8d4a473613a574a11e9e9b85"
                                     "ca9fe219e8e0461caeefbd0add78391857a62d80286fa0f50b8805f33841190e",
                           message3="5823388293bde22e2f9ef581ef9088ea7fc476bb08d37b2be94b60e79523fc40",
                           signature3="5f39e6c408031d38c5411770bd3b79bf8904f768d31bf1e882c108d32533f370"
                                      "5355e435f38ec33b6770aae0f9a741e56c15788df35b95dd35ad7c9f7d268d0d",
                           boundaries="f74552e118a8ce3fbe59ac1f2e256804f94ea66cb76a719c5bda8b1fc500e151"),
            "sha256": dict(d="f76ad7c8f89cc7800d75053b51b3f9abdd19a3758714aa6d3b2ced6589383958", u=0.966474043431492,
                           rid="b69662c3158140082ce9740f235f3268a8136f0baf1725a97b8a36c1e1403f79",
                           policy="dafd41670240ed53b0bca4a08b17c6abda4851c84e8139d3181397dc3c9c1d95",
                           seed_d="dc7055f3359e1405760aa37eed799ef8e3364d7d4f3e4e7fc3f5c1d322bf2412",
                           seed=7942145194400352770,
                           message="48c101ef1ec2fcad07a366c27cc00d71705d0e92850511e86f5f6c4e7b82a583",
                           signature="d9911346492600337cd167942f7d13b97cece2492ee4270b132dfad65f3c978e"
                                     "31e07524ec941fd0b2688367b921e465398342a6a282e3d6d1b29304659f360c",
                           message3="bb167780466ceb3dc64f23f66e91f0a18a10fcfd31b94abda0c635a4f2e3fee8",
                           signature3="a60e98fe85b2f721e35b59a6ca53015ce5ee6db2f45e31dd94ffa1ad9771b9b0"
                                      "43a4e5534115f021c7c0cb591c50b9d65fc1aae27fe89e85f50979a2d927f505",
                           boundaries="03f375e6983d114fe744b04c1b6b73b19bb8e1cc86680ff565d50faaa511d059")}
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    key = SigningKey(private)
    time = "2025-01-31T12:00:00.000000Z"
    policy_json = (b'{"chat_template":null,"eos_token_ids":[2],"format":"aftune.generation-policy.v1",'
                   b'"max_new_tokens":8,"stop_rule":"eos_or_length","temperature":0.0,"top_p":1.0}')
    gen = GenerationPolicy(max_new_tokens=8, eos_token_ids=(2,))
    nonce, input_digest, policy_digest, request = bytes(range(32)), b"\x22" * 32, b"\x55" * 32, b"\x66" * 16
    for alg, v in want.items():
        d = h(alg, b"aftune.v1.sample\x00" + struct.pack(">QQ", 7, 3))
        assert d.hex() == v["d"] and (int.from_bytes(d[:8], "big") >> 11) / 2**53 == v["u"] == sample_uniform(alg, 7, 3)
        doc = b'{"format":"aftune.inference.v2"}'
        assert h(alg, b"aftune.v1.inference-record\x00" + doc).hex() == v["rid"] == record_id(alg, doc).hex()
        # SPEC.md 8.6.1: the policy digest over the canonical JSON of the policy
        assert h(alg, b"aftune.v1.generation-policy\x00" + policy_json).hex() == v["policy"] == gen.digest(alg).hex()
        # SPEC.md 8.6.5: the seed of a sampled request
        sd = h(alg, b"aftune.v1.request-seed\x00" + lp(nonce) + input_digest + policy_digest)
        assert sd.hex() == v["seed_d"] and int.from_bytes(sd[:8], "big") >> 1 == v["seed"]
        assert request_seed(alg, nonce, input_digest, policy_digest) == v["seed"]
        m = h(alg, b"aftune.v1.receipt\x00" + lp(b"aftune.receipt.v2") + lp(alg.encode()) + bytes([0x11]) * 32
              + bytes([0x22]) * 32 + bytes([0x33]) * 32 + bytes([0x44]) * 32 + lp(time.encode()) + key.public_key.raw
              + lp(request) + lp(policy_digest))
        assert m.hex() == v["message"]
        sig = private.sign(b"aftune.v1.signature\x00" + lp(b"inference-receipt") + m)
        assert sig.hex() == v["signature"]
        def v2(nonce_, policy_):  # a v2 receipt (still read): it repeats input, output, nonce and policy
            return sign_receipt(key, Receipt(alg, bytes([0x11]) * 32, bytes([0x44]) * 32, time, key.public_key,
                                             format=RECEIPT_FORMAT_V2, input_digest=bytes([0x22]) * 32,
                                             output_digest=bytes([0x33]) * 32, request_nonce=nonce_,
                                             policy_digest=policy_))

        r = v2(request, policy_digest)
        assert r.message() == m and r.signature == sig
        verify_receipt(Receipt.from_json(r.to_json()), key.public_key, request_nonce=request,
                       policy_digest=policy_digest)
        # no nonce and no policy (a classifier's request without a nonce): two empty length prefixes
        r0 = v2(None, None)
        assert r0.message() == h(alg, b"aftune.v1.receipt\x00" + lp(b"aftune.receipt.v2") + lp(alg.encode())
                                 + bytes([0x11]) * 32 + bytes([0x22]) * 32 + bytes([0x33]) * 32 + bytes([0x44]) * 32
                                 + lp(time.encode()) + key.public_key.raw + lp(b"") + lp(b""))
        # SPEC.md 8.7: a v3 receipt signs the model digest and the record id (the record binds the rest)
        m3 = h(alg, b"aftune.v1.receipt\x00" + lp(b"aftune.receipt.v3") + lp(alg.encode()) + bytes([0x11]) * 32
               + bytes([0x44]) * 32 + lp(time.encode()) + key.public_key.raw)
        sig3 = private.sign(b"aftune.v1.signature\x00" + lp(b"inference-receipt") + m3)
        assert m3.hex() == v["message3"] and sig3.hex() == v["signature3"]
        r3 = issue_receipt(key, alg, bytes([0x11]) * 32, bytes([0x44]) * 32, time)
        assert r3.message() == m3 and r3.signature == sig3 and Receipt.from_json(r3.to_json()) == r3
        verify_receipt(r3, key.public_key)
        with pytest.raises(InputError, match="through the record"):  # its nonce is in the record, not given here
            verify_receipt(r3, key.public_key, request_nonce=request)
        # SPEC.md 8.4.1: a v6 record's boundaries root over two boundaries
        leaf1 = h(alg, b"aftune.v1.inference-boundary\x00" + b"\x01" * 32 + b"\x02" * 32)
        leaf2 = h(alg, b"aftune.v1.inference-boundary\x00" + b"\x03" * 32 + b"\x04" * 32)
        root = h(alg, b"aftune.v1.node\x00" + h(alg, b"aftune.v1.leaf\x00" + lp(b"0001") + leaf1)
                 + h(alg, b"aftune.v1.leaf\x00" + lp(b"0002") + leaf2))
        rows = {"boundary/0001": TensorRef("activation", "F32", (1,), b"\x02" * 32),
                "boundary/0002": TensorRef("activation", "F32", (1,), b"\x04" * 32)}
        assert root.hex() == v["boundaries"] == boundaries_root(alg, {"0001": b"\x01" * 32, "0002": b"\x03" * 32},
                                                                 rows).hex()


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
