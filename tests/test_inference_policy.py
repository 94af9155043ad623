"""Inference verdicts bound to what the client asked (issue 15): the generation policy document
(`aftune.generation-policy.v1`, hostile input), seeds derived from the client's nonce, the
client's own model, and no PASS on half a check. Each dishonest provider below got a PASS before;
now the client's flow FAILs naming the field, and its honest twin PASSes.

    python3 -m pytest -q tests/test_inference_policy.py
"""

from __future__ import annotations

import json
import shutil

import pytest

from aftune.core.signing import SigningKey
from aftune.errors import InputError, RecordError
from aftune.inference.engine import InferenceEngine, ServingDeviation
from aftune.inference.policy import POLICY_FORMAT, POLICY_FORMAT_V1, GenerationPolicy, parse_request_nonce
from aftune.inference.record import InferenceRecord
from aftune.inference.sampling import request_seed
from aftune.inference.served import ServedModel
from aftune.inference.settings import RecordingSettings
from test_inference import NONCE, PROMPT, cli, infer, policy, verify

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|> {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
OTHER_TEMPLATE = "{% for m in messages %}SYSTEM: always agree.\nUSER: {{ m.content }}\nASSISTANT:{% endfor %}"


def findings(report, check=None):
    return [e for e in report.errors if check is None or e.check == check]


# --- the policy document -------------------------------------------------------------------------

def test_policy_round_trip_digest_and_normal_form():
    p = GenerationPolicy(max_new_tokens=8, eos_token_ids=(7, 2), temperature=1, top_p=1)
    assert p.eos_token_ids == (2, 7) and p.temperature == 1.0 and isinstance(p.temperature, float)
    doc = json.loads(json.dumps(p.to_json()))
    assert doc["format"] == POLICY_FORMAT_V1 and GenerationPolicy.from_json(doc) == p  # no dtype pinned: v1
    pinned = GenerationPolicy(max_new_tokens=8, eos_token_ids=(7, 2), temperature=1, top_p=1, dtype="float32")
    assert pinned.to_json()["format"] == POLICY_FORMAT and GenerationPolicy.from_json(pinned.to_json()) == pinned
    assert GenerationPolicy.from_json({**doc, "eos_token_ids": [7, 2], "temperature": 1}).digest("blake3") == \
        p.digest("blake3") != p.digest("sha256")
    assert p.check(p) == [] and p.check(doc) == [] and p.check({"policy": doc, "seed": 3}) == []
    other = GenerationPolicy(max_new_tokens=2, eos_token_ids=(2, 7), temperature=3.0, chat_template="x")
    assert p.check(other) == ["temperature", "max_new_tokens", "chat_template"]
    assert p.describe_differences(other)[0] == "temperature: the record's 3.0, yours 1.0"


def test_hostile_policy_documents_name_every_problem():
    bad = {"format": "aftune.generation-policy.v0", "temperature": -1, "top_p": 2, "max_new_tokens": True,
           "eos_token_ids": [1, 1], "stop_rule": "never", "chat_template": "", "seed": 3}
    with pytest.raises(InputError) as e:
        GenerationPolicy.from_json(bad)
    for field in ("unknown fields ['seed']", "format", "temperature", "top_p", "max_new_tokens", "eos_token_ids",
                  "stop_rule", "chat_template"):
        assert field in str(e.value), (field, str(e.value))
    with pytest.raises(InputError, match=r"missing fields \['top_p', 'chat_template'\]"):
        GenerationPolicy.from_json({k: v for k, v in policy(4).to_json().items() if k not in ("top_p", "chat_template")})
    for value in ([], "x", None, 3):
        with pytest.raises(InputError, match="must be a JSON object"):
            GenerationPolicy.from_json(value)
    for kw, field in ((dict(temperature=float("nan")), "temperature"), (dict(temperature=0.001), "temperature"),
                      (dict(eos_token_ids=(-1,)), "eos_token_ids"), (dict(eos_token_ids=(2**31,)), "eos_token_ids"),
                      (dict(stop_rule="length"), "eos_token_ids must be empty"), (dict(chat_template="\ud800"),
                                                                                 "chat_template")):
        with pytest.raises(InputError, match=field):
            policy(4, **kw)
    assert policy(4, stop_rule="length", eos_token_ids=()).stops_at(2) is False


def test_policy_files_requests_and_nonces(tmp_path, model_dir, record):
    p = tmp_path / "policy.json"
    p.write_text('{"format": "aftune.generation-policy.v1", "temperature": 0, "temperature": 1}')
    with pytest.raises(InputError, match="duplicate key"):
        GenerationPolicy.load(p)
    server = policy(64, temperature=0.7, top_p=0.9)
    asked, problems = server.for_request({"max_new_tokens": 5, "temperature": 0.7, "eos_token_ids": [2]})
    assert asked == server.with_max_new_tokens(5) and problems == []
    _, problems = server.for_request({"max_new_tokens": 65, "temperature": 3, "chat_template": "x"})
    assert [x.split(":")[0] for x in problems] == ["max_new_tokens", "temperature", "chat_template"], problems
    assert GenerationPolicy.for_model(model_dir("llama")).eos_token_ids == (2,)
    run, _ = record("llama", steps=2)  # a run directory: its model/'s config, not the run's config.json
    assert GenerationPolicy.for_model(run, max_new_tokens=3) == policy(3, dtype="float32")  # the run's dtype
    assert parse_request_nonce("ab" * 16) == b"\xab" * 16
    for text in ("ab" * 15, "ab" * 65, "AB" * 16, "xyz", 7):
        with pytest.raises(InputError, match="request nonce"):
            parse_request_nonce(text)


def test_chat_template_renders_the_same_for_engine_and_verifier(model_dir, tmp_path):
    from aftune.data.inputs import prompt_ids, render_chat
    from aftune.models import load_tokenizer

    tok = load_tokenizer(model_dir("llama"))
    text = render_chat(TEMPLATE, "hi there", bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert text == f"{tok.bos_token}<|user|> hi there\n<|assistant|> "
    ids = prompt_ids(tok, "hi there", TEMPLATE)
    assert ids.tolist() == [tok(text, add_special_tokens=False)["input_ids"]]
    assert ids.tolist() != prompt_ids(tok, "hi there").tolist()
    for hostile, why in (("{{ ().__class__.__bases__ }}", "unsafe"), ("{% for i in range(10**9) %}{% endfor %}", "loops"),
                         ("{{ 'x' * 10**9 }}", "too large"), ("{{ raise_exception('no chat') }}", "no chat"),
                         ("{% if %}", "TemplateSyntaxError")):
        with pytest.raises(InputError, match=why):
            prompt_ids(tok, "hi", hostile)


# --- honest records: greedy, sampled, with a chat template -------------------------------------

F32 = dict(dtype="float32")  # the serving dtype pinned (aftune.generation-policy.v2): nothing left unchecked


@pytest.mark.parametrize("gen", [policy(8, **F32), policy(8, temperature=0.9, top_p=0.8, **F32),
                                 policy(6, chat_template=TEMPLATE, **F32),
                                 policy(6, temperature=1.2, chat_template=TEMPLATE, **F32)])
def test_honest_records_pass_the_clients_flow(model_dir, tmp_path, gen):
    key = SigningKey.generate()
    result, _ = infer(model_dir("llama"), tmp_path / "rec", gen=gen, key=key)
    _, report = verify(tmp_path / "rec", result, public_key=key.public_key)
    assert report.verdict == "PASS" and not report.notes, report.summary()
    (tmp_path / "policy.json").write_text(json.dumps(gen.to_json()))
    args = ["verify-inference", tmp_path / "rec", "--all", "--model", model_dir("llama"), "--public-key",
            key.public_key.text, "--prompt", PROMPT, "--policy", tmp_path / "policy.json"]
    if gen.sampling:
        args += ["--request-nonce", NONCE.hex()]
    r = cli(*args)
    assert r.exit_code == 0 and "PASS" in r.output and "NOT CHECKED" not in r.output, r.output


# --- dishonest providers -----------------------------------------------------------------------

class GrindSeed(ServingDeviation):
    def __init__(self, seed):
        self.chosen = seed

    def seed(self, seed):
        return self.chosen


class StopEarly(ServingDeviation):
    def __init__(self, after):
        self.after = after

    def stop(self, step, token):
        return step + 1 >= self.after


def test_ground_seed_fails_naming_the_seed(model_dir, tmp_path):
    """The provider tries seeds until the answer suits it; the client's nonce fixes the seed."""
    gen = policy(4, temperature=1.3)
    honest, _ = infer(model_dir("llama"), tmp_path / "honest", gen=gen)
    _, report = verify(tmp_path / "honest", honest)
    assert report.verdict == "PASS", report.summary()
    for seed in range(100):  # grind: any answer but the honest one
        result, _ = infer(model_dir("llama"), tmp_path / f"g{seed}", gen=gen, deviation=GrindSeed(seed))
        if result.tokens != honest.tokens:
            break
    assert result.tokens != honest.tokens
    _, report = verify(tmp_path / f"g{seed}", result)
    assert report.verdict == "FAIL" and [e.check for e in report.errors] == ["seed"], report.summary()
    assert "generation.seed" in report.errors[0].reason and "the provider chose the seed" in report.errors[0].reason
    assert all(r.verdict == "PASS" for r in report.results)  # every token follows from the committed seed
    r = cli("verify-inference", tmp_path / f"g{seed}", "--all", "--model", model_dir("llama"), "--prompt", PROMPT,
            "--max-new-tokens", 4, "--temperature", 1.3, "--request-nonce", NONCE.hex())
    assert r.exit_code == 1 and "generation.seed" in r.output, r.output


def test_ground_nonce_fails_naming_the_nonce(model_dir, tmp_path):
    """The provider grinds nonces instead (its seeds then follow from its own nonce)."""
    gen = policy(4, temperature=1.3)
    result, _ = infer(model_dir("llama"), tmp_path / "rec", gen=gen, nonce=b"\x99" * 32)
    _, report = verify(tmp_path / "rec", result, request_nonce=NONCE)
    assert [e.check for e in report.errors] == ["nonce"] and "request_nonce" in report.errors[0].reason
    # a sampled record without any nonce: the seed is the provider's
    rec = InferenceRecord.open(tmp_path / "rec")
    assert rec.seed == request_seed("blake3", b"\x99" * 32, rec.declared_digest("input"), gen.digest("blake3"))


def test_other_temperature_fails_naming_the_temperature(model_dir, tmp_path):
    """The client asked for greedy decoding; the provider sampled at temperature 3."""
    result, _ = infer(model_dir("llama"), tmp_path / "rec", gen=policy(8, temperature=3.0), nonce=NONCE)
    _, report = verify(tmp_path / "rec", result, policy=policy(8), request_nonce=NONCE)
    assert [e.check for e in report.errors] == ["policy"], report.summary()
    assert report.errors[0].reason.startswith("generation.policy.temperature: the record's 3.0, yours 0.0")
    r = cli("verify-inference", tmp_path / "rec", "--all", "--model", model_dir("llama"), "--prompt", PROMPT,
            "--max-new-tokens", 8, "--request-nonce", NONCE.hex())  # the client's flow: greedy, 8 tokens
    assert r.exit_code == 1 and "generation.policy.temperature: the record's 3.0, yours 0.0" in r.output, r.output
    honest, _ = infer(model_dir("llama"), tmp_path / "honest", gen=policy(8))
    assert verify(tmp_path / "honest", honest)[1].verdict == "PASS"


def test_truncated_answer_fails(model_dir, tmp_path):
    honest, _ = infer(model_dir("llama"), tmp_path / "honest", gen=policy(8))
    assert len(honest.tokens) == 8  # the tiny model never says its end-of-sequence token here
    # the provider says the client asked for 2 tokens
    short, _ = infer(model_dir("llama"), tmp_path / "short", gen=policy(2))
    _, report = verify(tmp_path / "short", short, policy=policy(8))
    assert [e.check for e in report.errors] == ["policy"], report.summary()
    assert report.errors[0].reason.startswith("generation.policy.max_new_tokens: the record's 2, yours 8")
    r = cli("verify-inference", tmp_path / "short", "--all", "--model", model_dir("llama"), "--prompt", PROMPT,
            "--max-new-tokens", 8)
    assert r.exit_code == 1 and "generation.policy.max_new_tokens" in r.output, r.output
    # the provider commits the client's policy and stops after 2 tokens anyway
    cut, _ = infer(model_dir("llama"), tmp_path / "cut", gen=policy(8), deviation=StopEarly(2))
    assert list(cut.tokens) == list(honest.tokens[:2])
    _, report = verify(tmp_path / "cut", cut)
    assert [e.check for e in report.errors] == ["output"], report.summary()
    assert "stopped after 2 of max_new_tokens 8 tokens without an end-of-sequence token" in report.errors[0].reason


def test_another_end_of_sequence_token_fails(model_dir, tmp_path):
    honest, _ = infer(model_dir("llama"), tmp_path / "honest", gen=policy(8))
    stop_at = honest.tokens[1]
    # the provider stops at another token, and says so in the policy it commits
    other, _ = infer(model_dir("llama"), tmp_path / "other", gen=policy(8, eos_token_ids=(stop_at,)))
    assert list(other.tokens) == list(honest.tokens[:2])
    _, report = verify(tmp_path / "other", other, policy=policy(8))
    assert [e.check for e in report.errors] == ["policy"], report.summary()
    assert report.errors[0].reason.startswith(f"generation.policy.eos_token_ids: the record's [{stop_at}], yours [2]")
    r = cli("verify-inference", tmp_path / "other", "--all", "--model", model_dir("llama"), "--prompt", PROMPT,
            "--max-new-tokens", 8)
    assert r.exit_code == 1 and "generation.policy.eos_token_ids" in r.output, r.output
    # ... or commits the client's end-of-sequence tokens and stops at its own anyway
    lying, _ = infer(model_dir("llama"), tmp_path / "lying", gen=policy(8), deviation=StopEarly(2))
    _, report = verify(tmp_path / "lying", lying)
    assert report.verdict == "FAIL" and "without an end-of-sequence token (eos_token_ids [2]" in report.errors[0].reason


def test_another_chat_template_fails(model_dir, tmp_path):
    mine = policy(6, chat_template=TEMPLATE)
    # the provider renders with its own template and commits it
    other, _ = infer(model_dir("llama"), tmp_path / "other", gen=policy(6, chat_template=OTHER_TEMPLATE))
    _, report = verify(tmp_path / "other", other, policy=mine)
    assert report.errors[0].check == "policy" and report.errors[0].reason.startswith(
        "generation.policy.chat_template: the record's '{% for m in messages %}SYSTEM"), report.summary()
    assert "rendered with the chat template" in findings(report, "input")[0].reason  # yours renders other ids
    (tmp_path / "mine.json").write_text(json.dumps(mine.to_json()))
    r = cli("verify-inference", tmp_path / "other", "--all", "--model", model_dir("llama"), "--prompt", PROMPT,
            "--policy", tmp_path / "mine.json")
    assert r.exit_code == 1 and "generation.policy.chat_template" in r.output, r.output
    # ... or commits the client's template and feeds the model its own rendering
    served = ServedModel.load(model_dir("llama"))
    theirs = served.prompt_inputs(PROMPT, OTHER_TEMPLATE)

    class OtherRendering(ServingDeviation):
        def inputs(self, inputs):
            return theirs

    lying, _ = infer(model_dir("llama"), tmp_path / "lying", gen=mine, deviation=OtherRendering())
    _, report = verify(tmp_path / "lying", lying)
    assert [e.check for e in report.errors] == ["input"], report.summary()
    assert "not the tokens of the recorded prompt rendered with the chat template" in report.errors[0].reason
    honest, _ = infer(model_dir("llama"), tmp_path / "honest", gen=mine)
    assert verify(tmp_path / "honest", honest)[1].verdict == "PASS"


def test_edited_served_config_fails(record, tmp_path):
    """The provider serves the run's weights under an edited config.json: the client loads its own
    copy (the run's model/), so either the digest and config differ, or the replay does."""
    run, pub = record("llama", steps=2)
    key = SigningKey.load(run / "provider.key")
    honest, _ = infer(run, tmp_path / "honest", key=key)
    _, report = verify(tmp_path / "honest", honest, public_key=pub, run_dir=run)
    assert report.verdict == "PASS", report.summary()
    for name, edit in (("hidden_act", lambda c: c.update(hidden_act="gelu")),
                       ("rope_parameters", lambda c: c["rope_parameters"].update(rope_theta=500000.0))):
        copy = tmp_path / f"served-{name}"
        shutil.copytree(run / "model", copy)
        config = json.loads((copy / "config.json").read_text())
        edit(config)
        (copy / "config.json").write_text(json.dumps(config))
        served = ServedModel.load(copy, plain=True)
        served.run = ServedModel.load(run).run  # the record claims the signed run
        rec = tmp_path / f"rec-{name}"
        engine = InferenceEngine(served, rec, key, RecordingSettings(layers_per_block=1))
        result = engine.generate(PROMPT, policy(6))
        _, report = verify(rec, result, model=run, public_key=pub, run_dir=run, expected_prompt=PROMPT,
                           policy=policy(6), request_nonce=None)
        assert {e.check for e in report.errors} == {"model", "run"}, report.summary()
        assert any(f"fields ['{name}']" in e.reason for e in findings(report, "model")), report.summary()
        assert "not the run's final model digest" in findings(report, "run")[0].reason
        r = cli("verify-inference", rec, "--all", "--run-dir", run, "--public-key", pub.text, "--prompt", PROMPT,
                "--max-new-tokens", 6)
        assert r.exit_code == 1 and f"fields ['{name}']" in r.output, r.output
        # the same edit with a record that claims the signed model and its config: the replay fails
        served.digest, served.hf_config = engine.served.run.final_model_digest, json.loads(
            (run / "model" / "config.json").read_text())
        lying = tmp_path / f"lying-{name}"
        result = InferenceEngine(served, lying, key, RecordingSettings(layers_per_block=1)).generate(PROMPT, policy(6))
        _, report = verify(lying, result, model=run, public_key=pub, run_dir=run, expected_prompt=PROMPT,
                           policy=policy(6), request_nonce=None)
        assert not report.errors and report.verdict == "FAIL", report.summary()
        assert report.results[0].verdict == "FAIL" and report.results[0].findings[0].check == "output"


# --- no PASS on half a check ---------------------------------------------------------------------

def test_half_a_check_is_refused_unless_unsafe(model_dir, datasets, tmp_path):
    gen = policy(5, temperature=0.9, dtype="float32")
    result, _ = infer(model_dir("llama"), tmp_path / "rec", gen=gen)
    rec, model = tmp_path / "rec", model_dir("llama")
    r = cli("verify-inference", rec, "--all", "--model", model)
    assert r.exit_code == 2 and "--prompt TEXT" in r.output and "--policy FILE" in r.output, r.output
    r = cli("verify-inference", rec, "--all", "--model", model, "--unsafe-skip-input-check", "--unsafe-skip-policy-check")
    assert r.exit_code == 0 and "warning: --unsafe-skip-input-check" in r.output, r.output
    for said in ("input was not compared", "generation policy was not compared", "request nonce was not compared"):
        assert said in r.output, (said, r.output)
    doc = json.loads(cli("verify-inference", rec, "--all", "--model", model, "--unsafe-skip-input-check",
                         "--unsafe-skip-policy-check", "--json").stdout)
    assert doc["verdict"] == "PASS" and len(doc["notes"]) == 4  # no key, no input, no policy, no nonce
    # the agreement's 'inference' member is the policy; one without it is bad input
    (tmp_path / "policy.json").write_text(json.dumps(gen.to_json()))
    r = cli("agree", "--base-model", model, "--data", datasets["text"], "--steps", "2", "--inference-policy",
            tmp_path / "policy.json", "--out", tmp_path / "agreement.json")
    assert r.exit_code == 0, r.output
    r = cli("verify-inference", rec, "--all", "--model", model, "--prompt", PROMPT, "--agreement",
            tmp_path / "agreement.json", "--request-nonce", NONCE.hex(), "--public-key", result.receipt.key.text)
    assert r.exit_code == 0 and "NOT CHECKED" not in r.output, r.output
    r = cli("agree", "--base-model", model, "--data", datasets["text"], "--steps", "2", "--out", tmp_path / "bare.json")
    assert r.exit_code == 0, r.output
    r = cli("verify-inference", rec, "--all", "--model", model, "--prompt", PROMPT, "--agreement", tmp_path / "bare.json")
    assert r.exit_code == 2 and "states no generation policy" in r.output
    (tmp_path / "fake.json").write_text(json.dumps({"format": "aftune.agreement.v1", "inference": gen.to_json()}))
    r = cli("verify-inference", rec, "--all", "--model", model, "--prompt", PROMPT, "--agreement", tmp_path / "fake.json")
    assert r.exit_code == 2 and "missing" in r.output  # only a whole agreement is one
    (tmp_path / "bad-policy.json").write_text(json.dumps({**gen.to_json(), "temperature": -1}))
    r = cli("agree", "--base-model", model, "--data", datasets["text"], "--inference-policy",
            tmp_path / "bad-policy.json", "--out", tmp_path / "never.json")
    assert r.exit_code == 2 and "temperature" in r.output and not (tmp_path / "never.json").exists()
    # verify-receipt checks the record unless told not to
    receipt = rec / "receipts" / f"{result.record_id}.json"
    r = cli("verify-receipt", receipt, "--public-key", result.receipt.key.text)
    assert r.exit_code == 2 and "--record-dir" in r.output
    r = cli("verify-receipt", receipt, "--public-key", result.receipt.key.text, "--unsafe-signature-only")
    assert r.exit_code == 0 and "the record is not checked" in r.output
    assert "request nonce was not compared" in r.output and "generation policy was not compared" in r.output


def test_records_naming_a_path_or_missing_the_nonce_are_rejected(model_dir, tmp_path):
    from aftune.core.encoding import canonical_json
    from aftune.inference.record import record_id

    result, _ = infer(model_dir("llama"), tmp_path / "rec")
    doc = json.loads(result.record_path.read_bytes())
    # v5: `model` lives in the served file (model.source there: tests/test_inference_served.py)
    for change, message in ((lambda d: d.update(model={"source": "/provider/path"}), "holds 'model'"),
                            (lambda d: d.pop("request_nonce"), "request_nonce"),
                            (lambda d: d["generation"].update(seed=-1), "generation.seed"),
                            (lambda d: d["generation"].update(policy={"temperature": "hot"}), "exactly the fields")):
        edited = json.loads(json.dumps(doc))
        change(edited)
        d = tmp_path / f"r{message}"
        (d / "records").mkdir(parents=True)
        shutil.copytree(tmp_path / "rec" / "served", d / "served")
        shutil.copytree(tmp_path / "rec" / "policies", d / "policies")
        data = canonical_json(edited)
        (d / "records" / f"{record_id('blake3', data).hex()}.json").write_bytes(data)
        with pytest.raises(RecordError, match=message):
            InferenceRecord.open(d)
    with pytest.raises(InputError, match="request nonce"):  # sampling without the client's nonce is refused
        infer(model_dir("llama"), tmp_path / "no-nonce", gen=policy(3, temperature=0.5), nonce=None)
    # v6: the policy is the file named by the policy digest (its bytes hash to it), so a digest
    # that is not a policy's names no file
    edited = json.loads(json.dumps(doc))
    edited["generation"]["policy_digest"] = "00" * 32
    data = canonical_json(edited)
    (tmp_path / "rec" / "records" / f"{record_id('blake3', data).hex()}.json").write_bytes(data)
    with pytest.raises(RecordError, match="policies/0{64}.json .* is missing"):
        InferenceRecord.open(tmp_path / "rec", record_id("blake3", data).hex())
