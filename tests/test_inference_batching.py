"""Batched serving and stop strings (issue 27): concurrent OpenAI requests to one server are
computed as one batch, each record states its batch shape and row, and every record replays PASS
(the verifier replays the row among filler rows); a record claiming another batch shape, or one
whose row's answer the provider changed, FAILs. Stop strings: the answer stops at the first
decoded text containing one and is cut before it; a provider stopping early or late FAILs.

    python3 -m pytest -q -p no:cacheprovider tests/test_inference_batching.py
"""

from __future__ import annotations

import json
import secrets
import threading

import pytest
import torch

from aftune.core.encoding import canonical_json
from aftune.core.signing import SigningKey
from aftune.errors import InputError, RecordError
from aftune.inference.batching import BatchingSettings, BatchShape
from aftune.inference.engine import InferenceEngine, ServingDeviation
from aftune.inference.policy import GenerationPolicy
from aftune.inference.receipt import issue_receipt
from aftune.inference.record import record_id
from aftune.inference.served import ServedModel
from aftune.inference.settings import RecordingSettings
from aftune.inference.verify import InferenceVerifier

POLICY = GenerationPolicy(max_new_tokens=6, eos_token_ids=(2,), temperature=0.7, top_p=0.9, dtype="float32")
GREEDY = GenerationPolicy(max_new_tokens=8, eos_token_ids=(2,), dtype="float32")
PROMPTS = ["Q: what colour is the sky?", "hi", "Q: name three animals that live in the sea, please. A:", "x y z"]


def _verify(root, rid, model, prompt, policy, nonce=None, **kw):
    v = InferenceVerifier(root, rid, model=model, expected_prompt=prompt, policy=policy, request_nonce=nonce, **kw)
    return v.verify_all()


def _concurrently(engine, prompts, policy, nonces):
    results = [None] * len(prompts)

    def go(i):
        results[i] = engine.generate(prompts[i], policy, request_nonce=nonces[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _resign(root, rid: str, key, edit) -> str:
    """A dishonest provider's record: `edit(doc)` applied, re-hashed under a new id and re-signed."""
    doc = json.loads((root / "records" / f"{rid}.json").read_bytes())
    edit(doc)
    data = canonical_json(doc)
    new = record_id(doc["hash"], data)
    (root / "records" / f"{new.hex()}.json").write_bytes(data)
    kept = root / "boundaries" / f"{rid}.json"  # v6: the provider keeps its boundaries file for the new id
    if kept.is_file():
        (root / "boundaries" / f"{new.hex()}.json").write_bytes(kept.read_bytes().replace(rid.encode(), new.hex().encode()))
    old = json.loads((root / "receipts" / f"{rid}.json").read_bytes())
    receipt = issue_receipt(key, doc["hash"], bytes.fromhex(old["model_digest"]), new, old["time"])
    (root / "receipts" / f"{new.hex()}.json").write_bytes(canonical_json(receipt.to_json()) + b"\n")
    return new.hex()


# --- batching through the OpenAI SDK ---------------------------------------------------------------

@pytest.fixture(scope="module")
def batched(tmp_path_factory, model_dir):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from test_serve import Server

    from aftune.inference.access import ApiKeys, add_client
    from aftune.inference.serve import create_app

    root = tmp_path_factory.mktemp("batched")
    key = SigningKey.generate()
    api_key = add_client(root / "api-keys.txt", "alice")
    model = model_dir("llama")
    # a batch closes when 4 requests are in or 5 s after the first: the 4 threads below make one
    engine = InferenceEngine(ServedModel.load(model), root, key, RecordingSettings(layers_per_block=2),
                             batching=BatchingSettings(max_batch_size=4, window_ms=5000))
    app = create_app(engine, policy=POLICY, api_keys=ApiKeys.load(root / "api-keys.txt"))
    with Server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)
        yield dict(client=client, engine=engine, root=root, model=model, key=key,
                   digest=engine.served.digest.hex())


def test_concurrent_openai_requests_make_one_batch_and_every_record_verifies(batched):
    from aftune.inference.openai_wire import check_claims, response_claims
    from aftune.inference.receipt import Receipt, verify_receipt

    s = batched
    nonces = [secrets.token_hex(32) for _ in PROMPTS]
    answers = [None] * len(PROMPTS)

    def ask(i):  # two whole answers and two streamed chats, at once
        if i < 2:
            raw = s["client"].completions.with_raw_response.create(
                model=s["digest"], prompt=PROMPTS[i], extra_body={"aftune_nonce": nonces[i]})
            answers[i] = raw.http_response.content
        else:
            stream = s["client"].chat.completions.create(
                model=s["digest"], messages=[{"role": "user", "content": PROMPTS[i]}], stream=True,
                extra_body={"aftune_nonce": nonces[i]})
            answers[i] = json.dumps([c.model_dump() for c in stream]).encode()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    rows = set()
    for i, data in enumerate(answers):
        claims = response_claims(data)
        rid = claims.record_id
        doc = json.loads((s["root"] / "records" / f"{rid}.json").read_bytes())
        batch = doc["batch"]
        assert batch["size"] == len(PROMPTS) and batch["length"] >= 2, batch  # one batch of all four
        rows.add(batch["row"])
        receipt = Receipt.from_json(claims.receipt)
        verify_receipt(receipt, s["key"].public_key, s["root"], request_nonce=bytes.fromhex(nonces[i]),
                       policy_digest=POLICY.digest("blake3"))
        check_claims(claims, receipt, s["root"])  # the answer's text (streamed: the deltas) is the record's
        report = _verify(s["root"], rid, s["model"], PROMPTS[i], POLICY, bytes.fromhex(nonces[i]),
                         public_key=s["key"].public_key)
        assert report.verdict == "PASS", report.summary()
    assert rows == set(range(len(PROMPTS)))


def test_a_record_claiming_another_batch_shape_fails(batched):
    s = batched
    nonces = [bytes.fromhex(secrets.token_hex(32)) for _ in PROMPTS]
    results = _concurrently(s["engine"], PROMPTS, POLICY, nonces)
    r = results[1]
    doc = json.loads(r.record_path.read_bytes())
    assert doc["batch"]["size"] == 4
    # shapes whose kernels give other bits on this CPU (benchmarks/batch_invariance.py): computed alone
    # (no padding, SDPA's causal mode) and a batch of 2. A claim of a shape that gives the same bits
    # (another row of this batch, often) is the same computation, and passes.
    claims = {"alone": lambda d: d.pop("batch"), "two rows": lambda d: d["batch"].update(size=2, row=1)}
    for name, edit in claims.items():
        rid = _resign(s["root"], r.record_id, s["key"], edit)
        report = _verify(s["root"], rid, s["model"], PROMPTS[1], POLICY, nonces[1], public_key=s["key"].public_key)
        assert report.verdict == "FAIL" and not report.errors, (name, report.summary())
        failed = [res for res in report.results if res.verdict == "FAIL"]
        assert failed and all(f.layer_block >= 0 for res in failed for f in res.findings), name
    # malformed claims are record errors (exit 2), never a replay
    for bad in ({"size": 1, "row": 0, "length": 9}, {"size": 4, "row": 4, "length": 30}, {"size": 4, "row": 0},
                {"size": 4, "row": 0, "length": 1}):
        rid = _resign(s["root"], r.record_id, s["key"], lambda d, bad=bad: d.update(batch=bad))
        with pytest.raises(RecordError, match="batch"):
            _verify(s["root"], rid, s["model"], PROMPTS[1], POLICY, nonces[1])


class _OneRow(ServingDeviation):
    """A provider that changes the answer of one row of the batch: token 2 of row 1."""

    def for_row(self, row):
        return self if row == 1 else None

    def token(self, step, logits, token):
        return (token + 1) % logits.shape[-1] if step == 2 else token


def test_an_answer_changed_in_one_row_fails_naming_the_record(model_dir, tmp_path):
    model = model_dir("llama")
    engine = InferenceEngine(ServedModel.load(model), tmp_path / "r", SigningKey.generate(),
                             RecordingSettings(layers_per_block=2), deviation=_OneRow(),
                             batching=BatchingSettings(max_batch_size=3, window_ms=5000))
    results = _concurrently(engine, PROMPTS[:3], GREEDY, [None] * 3)
    verdicts = {}
    for i, r in enumerate(results):
        doc = json.loads(r.record_path.read_bytes())
        report = _verify(tmp_path / "r", r.record_id, model, PROMPTS[i], GREEDY)
        verdicts[doc["batch"]["row"]] = (r.record_id, report)
    assert sorted(verdicts) == [0, 1, 2]
    for row, (rid, report) in verdicts.items():
        if row != 1:
            assert report.verdict == "PASS", report.summary()
            continue
        assert report.verdict == "FAIL"
        findings = [f for res in report.results for f in res.findings]
        assert findings and findings[0].check == "token" and findings[0].step == 2, report.summary()


def test_batched_and_serialised_engines_agree_and_one_request_is_computed_alone(model_dir, tmp_path):
    """Same tokens batched or alone (greedy, this tiny model), and a lone request keeps the
    serialised path: its record has no `batch` member, so its bytes are those of before."""
    model = model_dir("llama")
    served = ServedModel.load(model)
    alone = InferenceEngine(served, tmp_path / "a", SigningKey.generate(), batching=BatchingSettings(max_batch_size=1))
    together = InferenceEngine(served, tmp_path / "b", SigningKey.generate(),
                               batching=BatchingSettings(max_batch_size=4, window_ms=5000))
    batched = _concurrently(together, PROMPTS, GREEDY, [None] * 4)
    for i, r in enumerate(batched):
        assert alone.generate(PROMPTS[i], GREEDY).tokens == r.tokens
    quick = InferenceEngine(served, tmp_path / "c", SigningKey.generate(),
                            batching=BatchingSettings(max_batch_size=4, window_ms=1))
    one = quick.generate(PROMPTS[0], GREEDY)  # nobody else comes: computed alone after the window
    assert "batch" not in json.loads(one.record_path.read_bytes())
    with pytest.raises(InputError, match="max-batch-size"):
        BatchingSettings(max_batch_size=0).validate()
    assert BatchShape.from_json(None) is None


# --- stop strings ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopping(tmp_path_factory, model_dir):
    """A tiny Llama, a greedy answer to PROMPTS[0], and a stop string taken from its middle."""
    model = model_dir("llama")
    served = ServedModel.load(model)
    root = tmp_path_factory.mktemp("stops")
    key = SigningKey.generate()
    plain = GenerationPolicy(max_new_tokens=12, eos_token_ids=(), stop_rule="length", dtype="float32")
    text = InferenceEngine(served, root, key).generate(PROMPTS[0], plain).text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip() and text.find(stop) > 0, text
    policy = GenerationPolicy(max_new_tokens=12, eos_token_ids=(2,), stop=(stop,), dtype="float32")
    return dict(served=served, model=model, root=root, key=key, text=text, stop=stop, policy=policy)


class _Late(ServingDeviation):
    def stop_string(self, step, hit):
        return False


class _Early(ServingDeviation):
    def stop(self, step, token):
        return step == 0


def test_stop_strings_honest_early_and_late(stopping):
    s = stopping
    honest = InferenceEngine(s["served"], s["root"], s["key"]).generate(PROMPTS[0], s["policy"])
    assert honest.stop_offset == s["text"].find(s["stop"]) and honest.text.startswith(s["text"][:honest.stop_offset])
    doc = json.loads(honest.record_path.read_bytes())
    policy = json.loads((s["root"] / "policies" / f"{doc['generation']['policy_digest']}.json").read_bytes())
    assert doc["output"]["stop_offset"] == honest.stop_offset and policy["stop"] == [s["stop"]]
    assert _verify(s["root"], honest.record_id, s["model"], PROMPTS[0], s["policy"]).verdict == "PASS"
    # the client's policy has other stop strings: FAIL naming the field
    other = GenerationPolicy(**{**s["policy"].__dict__, "stop": ("zzz",)})
    report = _verify(s["root"], honest.record_id, s["model"], PROMPTS[0], other)
    assert report.verdict == "FAIL" and any("stop" in e.reason for e in report.errors), report.summary()
    for deviation, words in ((_Late(), "past the stop"), (_Early(), "truncated")):
        r = InferenceEngine(s["served"], s["root"], s["key"], deviation=deviation).generate(PROMPTS[0], s["policy"])
        report = _verify(s["root"], r.record_id, s["model"], PROMPTS[0], s["policy"])
        assert report.verdict == "FAIL" and any(words in e.reason for e in report.errors), report.summary()
    # a record whose committed stop offset is moved: FAIL naming it
    rid = _resign(s["root"], honest.record_id, s["key"], lambda d: d["output"].update(stop_offset=0))
    report = _verify(s["root"], rid, s["model"], PROMPTS[0], s["policy"])
    assert report.verdict == "FAIL" and any("stop_offset" in e.reason for e in report.errors), report.summary()


def test_openai_stop_cuts_the_answer_and_the_saved_answer_verifies(stopping, tmp_path):
    from aftune.inference.openai_wire import (TextDeltas, WireError, check_claims, parse_request, response_claims,
                                              whole_response)

    s = stopping
    model_id = s["served"].digest.hex()
    req = parse_request({"model": model_id, "prompt": PROMPTS[0], "stop": s["stop"]}, "completion", s["policy"],
                        model_id)
    assert req.policy == s["policy"]
    for stop, code in (([s["stop"], "x"], "outside_policy"), ([], "outside_policy"), (["a"] * 5, "invalid_value"),
                       ([""], "invalid_value"), (7, "invalid_value")):
        with pytest.raises(WireError) as e:
            parse_request({"model": model_id, "prompt": PROMPTS[0], "stop": stop}, "completion", s["policy"], model_id)
        assert e.value.param == "stop" and e.value.code == code, (stop, e.value.to_json())
    result = InferenceEngine(s["served"], tmp_path, s["key"]).generate(PROMPTS[0], req.policy)
    answer = whole_response(req, result, model_id, 0)
    text = answer["choices"][0]["text"]
    assert text == s["text"][:s["text"].find(s["stop"])] and answer["choices"][0]["finish_reason"] == "stop"
    check_claims(response_claims(json.dumps(answer).encode()), result.receipt, tmp_path)
    # streamed: the deltas never run past the stop string, nor send a tail that may begin one
    tok = s["served"].tokenizer
    deltas = TextDeltas(lambda ids: tok.decode(ids, skip_special_tokens=True), req.policy.stop)
    sent = "".join(deltas.add(t) for t in result.tokens)
    assert text.startswith(sent) and s["stop"] not in sent and sent + deltas.rest(text) == text


def test_stop_strings_in_the_policy_document():
    p = GenerationPolicy(max_new_tokens=4, eos_token_ids=(2,), dtype="float32", stop=("\n\n", "Q:"))
    doc = p.to_json()
    assert doc["format"] == "aftune.generation-policy.v3" and doc["stop"] == ["\n\n", "Q:"]
    assert GenerationPolicy.from_json(doc) == p and GenerationPolicy.from_json(doc).digest("blake3") == p.digest("blake3")
    plain = GenerationPolicy(max_new_tokens=4, eos_token_ids=(2,), dtype="float32")
    assert plain.to_json()["format"] == "aftune.generation-policy.v2" and "stop" not in plain.to_json()
    assert plain.check(p) == ["stop"]
    for bad, words in (({**doc, "format": "aftune.generation-policy.v2"}, "v3"),
                       ({**doc, "stop": []}, "has stop strings"),
                       ({**doc, "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
                       ({**doc, "stop": ["a", "a"]}, "twice"),
                       ({**doc, "stop_rule": "length", "eos_token_ids": []}, "never stops early")):
        with pytest.raises(InputError, match=words):
            GenerationPolicy.from_json(bad)
    with pytest.raises(InputError, match="pins the serving dtype"):
        GenerationPolicy(max_new_tokens=4, eos_token_ids=(2,), stop=("a",))


def test_the_built_in_batch_is_bitwise_a_filler_batch():
    """The kernel property batching rests on, on this CPU: a row of a real batch equals the same
    row among filler rows, for the built-in model (benchmarks/batch_invariance.py measures more)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "batch_invariance.py"
    spec = importlib.util.spec_from_file_location("batch_invariance", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    served = ServedModel.load(bench.BUILTIN)
    blocks = served.blocks(4)
    prompts = [[1, 5, 9, 11], [1, 7], [1, 3, 4, 5, 6, 7, 8], [1, 300, 301]]
    seen, toks, lengths = bench.provider(served, blocks, prompts, 3, GREEDY, None)
    for r in range(len(prompts)):
        for l in range(len(blocks)):
            got = bench.replay_row(served, blocks, l, r, len(prompts), max(lengths), prompts[r], toks[r],
                                   seen[r][l] if l > 0 else None)
            assert bench.same(got, seen[r][l + 1]), (r, l)
    torch.manual_seed(0)


def test_batched_records_in_portable_numerics_and_tolerance_mode(model_dir, tmp_path):
    """A portable record computed in a batch replays bitwise among filler rows; a native one
    passes tolerance mode too (teacher forcing ignores the batch: rounding differences only)."""
    model = model_dir("llama")
    for numerics in ("portable", "native"):
        policy = GenerationPolicy(max_new_tokens=4, eos_token_ids=(2,), dtype="float32", numerics=numerics)
        root = tmp_path / numerics
        engine = InferenceEngine(ServedModel.load(model), root, SigningKey.generate(), RecordingSettings(1),
                                 batching=BatchingSettings(max_batch_size=2, window_ms=5000))
        for i, r in enumerate(_concurrently(engine, PROMPTS[:2], policy, [None] * 2)):
            assert json.loads(r.record_path.read_bytes())["batch"]["size"] == 2
            modes = ("strict",) if numerics == "portable" else ("strict", "tolerance")
            for mode in modes:
                report = _verify(root, r.record_id, model, PROMPTS[i], policy, mode=mode)
                assert report.verdict == "PASS", (numerics, mode, report.summary())


def test_cli_batching_flags_and_policy_stop_strings(model_dir, tmp_path):
    from test_inference import cli

    r = cli("serve", tmp_path, "--api-keys", tmp_path / "keys.txt", "--max-batch-size", "0")
    assert r.exit_code == 2 and "--max-batch-size" in r.output, r.output
    r = cli("serve", tmp_path, "--api-keys", tmp_path / "keys.txt", "--batch-window-ms", "-1")
    assert r.exit_code == 2 and "--batch-window-ms" in r.output, r.output
    out = tmp_path / "policy.json"
    r = cli("policy", model_dir("llama"), "--out", out, "--stop", "\n\n", "--stop", "Q:")
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["format"] == "aftune.generation-policy.v3" and doc["stop"] == ["\n\n", "Q:"]
    r = cli("policy", model_dir("llama"), "--out", out, *[a for s in "abcde" for a in ("--stop", s)])
    assert r.exit_code == 2 and "at most 4" in r.output, r.output
