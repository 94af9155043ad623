"""OpenAI-compatible serving, with the real `openai` package as the client: a uvicorn server on
loopback serves a tiny Llama under a sampling policy; completions and chat completions, whole and
streamed, come back with receipts that verify (library and CLI, the record fetched over HTTP), and
the record replays PASS; a tampered answer text, a wrong nonce, another model FAIL naming what
differs; fields outside the policy are refused with 400 in OpenAI's error format.

    python3 -m pytest -q -p no:cacheprovider -n 0 tests/test_openai_serving.py
"""

from __future__ import annotations

import json
import secrets

import pytest

from aftune.core.signing import SigningKey
from aftune.inference.access import ApiKeys, add_client
from aftune.inference.engine import InferenceEngine
from aftune.inference.openai_wire import check_claims, response_claims
from aftune.inference.policy import GenerationPolicy
from aftune.inference.record import InferenceRecord
from aftune.inference.receipt import Receipt, verify_receipt
from aftune.inference.served import ServedModel
from aftune.inference.settings import RecordingSettings
from aftune.errors import CommitmentMismatch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_serve import Server, bearer  # noqa: E402  (uvicorn in a thread on a free port)

POLICY = GenerationPolicy(max_new_tokens=12, eos_token_ids=(2,), temperature=0.7, top_p=0.9, dtype="float32")
PROMPT = "Q: what colour is the sky?"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    from aftune.inference.serve import create_app

    root = tmp_path_factory.mktemp("openai")
    key = SigningKey.generate()
    keys_file = root / "api-keys.txt"
    api_key = add_client(keys_file, "alice")
    (root / "policy.json").write_text(json.dumps(POLICY.to_json()))
    model = model_dir("llama")
    engine = InferenceEngine(ServedModel.load(model), root / "records", key, RecordingSettings(layers_per_block=1))
    app = create_app(engine, policy=POLICY, api_keys=ApiKeys.load(keys_file))
    with Server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)
        yield dict(url=url, key=api_key, client=client, engine=engine, root=root, model=model, pub=key.public_key,
                   digest=engine.served.digest.hex())


def _fetch(s, record_id, target):
    from aftune.inference.serve import download_record

    with httpx.Client(base_url=s["url"], timeout=60, headers=bearer(s["key"])) as c:
        return download_record(c, record_id, target)


def _pub_file(s, tmp_path):
    p = tmp_path / "provider.pub"
    p.write_text(s["pub"].text + "\n")
    return p


def test_models_lists_the_served_model_with_its_digest(server):
    models = server["client"].models.list()
    assert [m.id for m in models.data] == [server["digest"]]
    extra = models.data[0].model_extra["aftune"]
    assert extra["public_key"] == server["pub"].text and extra["policy_digest"] == POLICY.digest("blake3").hex()


def test_completion_receipt_and_record_verify_and_tampering_fails(server, tmp_path):
    from test_inference import cli

    s, nonce = server, secrets.token_hex(32)
    raw = s["client"].completions.with_raw_response.create(model=s["digest"], prompt=PROMPT, max_tokens=6,
                                                           extra_body={"aftune_nonce": nonce})
    answer = raw.parse()
    doc = json.loads(raw.http_response.text)
    att = doc["aftune"]
    assert raw.headers["x-aftune-record-id"] == att["record_id"] and answer.id.endswith(att["record_id"][:32])
    assert answer.usage.completion_tokens == len(att["tokens"]) <= 6 and answer.usage.prompt_tokens > 0
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.model == s["digest"]
    audit = _fetch(s, att["record_id"], tmp_path / "audit")
    receipt = Receipt.from_json(att["receipt"])
    asked = POLICY.with_max_new_tokens(6)
    verify_receipt(receipt, s["pub"], audit, request_nonce=bytes.fromhex(nonce), policy_digest=asked.digest("blake3"))
    check_claims(response_claims(raw.http_response.content), receipt, audit)
    saved = tmp_path / "answer.json"
    saved.write_text(raw.http_response.text)
    pub = _pub_file(s, tmp_path)
    mine = ("--request-nonce", nonce, "--policy", s["root"] / "policy.json", "--max-new-tokens", 6)
    r = cli("verify-receipt", saved, "--public-key", pub, "--record-dir", audit, *mine)
    assert r.exit_code == 0 and "VALID" in r.output and "text is the record's" in r.output, r.output
    r = cli("verify-inference", audit, "--response", saved, "--all", "--model", s["model"], "--public-key", pub,
            "--prompt", PROMPT, *mine)
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    # the answer's text altered after signing: FAIL naming the text
    bad = json.loads(saved.read_text())
    bad["choices"][0]["text"] = answer.choices[0].text + " (edited)"
    (tmp_path / "edited.json").write_text(json.dumps(bad))
    r = cli("verify-receipt", tmp_path / "edited.json", "--public-key", pub, "--record-dir", audit, *mine)
    assert r.exit_code == 1 and "response text" in r.output and "altered" in r.output, r.output
    r = cli("verify-inference", audit, "--response", tmp_path / "edited.json", "--all", "--model", s["model"],
            "--public-key", pub, "--prompt", PROMPT, *mine)
    assert r.exit_code == 1 and "altered" in r.output, r.output
    # the answer presented for another request (another nonce): FAIL naming the nonce
    other = ("--request-nonce", secrets.token_hex(32)) + mine[2:]
    r = cli("verify-receipt", saved, "--public-key", pub, "--record-dir", audit, *other)
    assert r.exit_code == 1 and "request nonce" in r.output, r.output
    # the answer relabelled as another model's: FAIL naming the model
    bad = json.loads(saved.read_text())
    bad["model"] = "ab" * 32
    (tmp_path / "relabelled.json").write_text(json.dumps(bad))
    r = cli("verify-receipt", tmp_path / "relabelled.json", "--public-key", pub, "--record-dir", audit, *mine)
    assert r.exit_code == 1 and "signed for model" in r.output, r.output
    # the Python entry point reads a saved answer as the CLI does
    import aftune

    policy = asked.to_json()
    ok = aftune.verify_receipt(saved, pub, record_dir=audit, request_nonce=nonce, policy=policy)
    assert ok.verdict == "PASS" and ok.results[0].compared == 6 and not ok.notes, ok.summary()
    for name, words in (("edited.json", "altered"), ("relabelled.json", "signed for model")):
        report = aftune.verify_receipt(tmp_path / name, pub, record_dir=audit, request_nonce=nonce, policy=policy)
        assert report.verdict == "FAIL" and words in report.summary(), (name, report.summary())


def test_another_model_is_refused_in_openai_format(server):
    with pytest.raises(openai.NotFoundError) as e:
        server["client"].completions.create(model="ab" * 32, prompt=PROMPT, extra_body={"aftune_nonce": "11" * 32})
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_streamed_chat_verifies_and_a_tampered_chunk_fails(server, tmp_path):
    s, nonce = server, secrets.token_hex(16)
    stream = s["client"].chat.completions.create(model=s["digest"], messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=8, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"aftune_nonce": nonce})
    chunks = [c.model_dump() for c in stream]  # the SDK keeps unknown members (the receipt) in each chunk
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    last = [c for c in chunks if c.get("aftune")]
    assert len(last) == 1 and chunks[-1]["usage"]["completion_tokens"] == len(last[0]["aftune"]["tokens"])
    assert last[0]["choices"][0]["finish_reason"] in ("stop", "length")
    att = last[0]["aftune"]
    audit = _fetch(s, att["record_id"], tmp_path / "audit")
    receipt = Receipt.from_json(att["receipt"])
    verify_receipt(receipt, s["pub"], audit, request_nonce=bytes.fromhex(nonce),
                   policy_digest=POLICY.with_max_new_tokens(8).digest("blake3"))
    claims = response_claims(json.dumps(chunks).encode())
    assert claims.text == text
    check_claims(claims, receipt, audit)
    tampered = [dict(c) for c in chunks]
    i = next(i for i, c in enumerate(tampered) if c["choices"] and c["choices"][0]["delta"].get("content"))
    tampered[i] = json.loads(json.dumps(tampered[i]))
    tampered[i]["choices"][0]["delta"]["content"] += "!"
    with pytest.raises(CommitmentMismatch, match="altered"):
        check_claims(response_claims(json.dumps(tampered).encode()), receipt, audit)
    with pytest.raises(CommitmentMismatch, match="request nonce"):
        verify_receipt(receipt, s["pub"], audit, request_nonce=bytes.fromhex("22" * 16))


def test_streamed_completion_as_received_verifies(server, tmp_path):
    """The raw server-sent events, saved as received, verify with the CLI."""
    from test_inference import cli

    s, nonce = server, secrets.token_hex(32)
    body = {"model": s["digest"], "prompt": PROMPT, "max_tokens": 5, "stream": True, "aftune_nonce": nonce}
    with httpx.stream("POST", s["url"] + "/v1/completions", json=body, headers=bearer(s["key"]), timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = r.read()
    assert events.rstrip().endswith(b"data: [DONE]")
    claims = response_claims(events)
    _fetch(s, claims.record_id, tmp_path / "audit")
    (tmp_path / "events.txt").write_bytes(events)
    r = cli("verify-receipt", tmp_path / "events.txt", "--public-key", _pub_file(s, tmp_path), "--record-dir",
            tmp_path / "audit", "--request-nonce", nonce, "--policy", s["root"] / "policy.json", "--max-new-tokens", 5)
    assert r.exit_code == 0 and "text is the record's" in r.output, r.output


NONCE = "5a" * 32


@pytest.mark.parametrize("extra, param, words", [
    ({"temperature": 1.5}, "temperature", "the policy fixes 0.7"),
    ({"top_p": 0.5}, "top_p", "the policy fixes 0.9"),
    ({"max_tokens": 13}, "max_tokens", "the policy allows 1 to 12"),
    ({"stop": ["\n"]}, "stop", "the policy fixes []"),
    ({"seed": 3}, "seed", "derived from your nonce"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"logprobs": 2}, "logprobs", "not supported"),
    ({"n": 2}, "n", "not supported"),
    ({"aftune_nonce": None}, "aftune_nonce", "required"),
    ({"aftune_nonce": "xyz"}, "aftune_nonce", "hex"),
    ({"prompt": ["a", "b"]}, "prompt", "one non-empty string"),
])
def test_fields_outside_the_policy_are_refused_in_openai_format(server, extra, param, words):
    body = {"model": server["digest"], "prompt": PROMPT, "aftune_nonce": NONCE, **extra}
    if body.get("aftune_nonce") is None:
        body.pop("aftune_nonce")
    r = httpx.post(server["url"] + "/v1/completions", json=body, headers=bearer(server["key"]), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


def test_chat_outside_the_template_and_bad_keys_are_refused(server):
    s = server
    with pytest.raises(openai.BadRequestError) as e:
        s["client"].chat.completions.create(model=s["digest"], messages=[{"role": "system", "content": "be terse"},
                                                                          {"role": "user", "content": PROMPT}],
                                            extra_body={"aftune_nonce": NONCE})
    assert e.value.body["param"] == "messages"
    stranger = openai.OpenAI(base_url=s["url"] + "/v1", api_key="aftune_not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        stranger.models.list()
    assert e.value.body["code"] == "invalid_api_key"


# --- limits: the request size (413, before parsing) and the requests in flight (429) -----------

@pytest.fixture(scope="module")
def limited(tmp_path_factory, model_dir):
    """A server answering one request at a time with bodies of at most 4096 bytes, whose engine
    holds each generation until the test lets it go (so that 'in flight' is not a matter of time)."""
    import threading

    from aftune.inference.limits import ServingLimits
    from aftune.inference.serve import create_app

    root = tmp_path_factory.mktemp("limits")
    keys_file = root / "api-keys.txt"
    api_key = add_client(keys_file, "alice")
    engine = InferenceEngine(ServedModel.load(model_dir("llama")), root / "records", SigningKey.generate(),
                             RecordingSettings(layers_per_block=1))
    entered, release = threading.Event(), threading.Event()
    generate = engine.generate

    def held(*args, **kw):
        entered.set()
        assert release.wait(120)
        return generate(*args, **kw)

    engine.generate = held
    app = create_app(engine, policy=POLICY, api_keys=ApiKeys.load(keys_file),
                     limits=ServingLimits(max_request_bytes=4096, max_concurrent=1))
    with Server(app) as url:
        yield dict(url=url, key=api_key, digest=engine.served.digest.hex(), entered=entered, release=release)


def test_a_body_over_the_limit_is_413_before_it_is_parsed(limited):
    s = limited
    url, auth = s["url"], bearer(s["key"])
    s["release"].set()
    junk = b"{" + b"x" * 5000  # not even JSON: refused for its size, so never parsed
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(url + path, content=junk, headers={**auth, "content-type": "application/json"}, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert "4096 bytes" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/generate", content=junk, headers=auth, timeout=30)
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"], r.text

    def chunked():  # no Content-Length: the cap holds on the bytes as they come
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(url + "/v1/completions", content=chunked(), headers=auth, timeout=30)
    assert r.request.headers.get("transfer-encoding") == "chunked" and r.status_code == 413, r.text
    # within the limit (chunked too): answered
    body = json.dumps({"model": s["digest"], "prompt": PROMPT, "max_tokens": 2, "aftune_nonce": NONCE}).encode()
    r = httpx.post(url + "/v1/completions", content=iter([body[:10], body[10:]]), headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["aftune"]["record_id"], r.text
    # without a key: 401 first, whatever the size
    r = httpx.post(url + "/v1/completions", content=junk, headers={"authorization": "Bearer nope"}, timeout=30)
    assert r.status_code == 401


def test_a_request_beyond_the_ones_in_flight_is_429(limited):
    import threading

    s = limited
    s["release"].clear()
    s["entered"].clear()
    auth = bearer(s["key"])
    body = {"model": s["digest"], "prompt": PROMPT, "max_tokens": 2, "aftune_nonce": NONCE}
    first = {}
    t = threading.Thread(target=lambda: first.update(r=httpx.post(s["url"] + "/v1/completions", json=body,
                                                                   headers=auth, timeout=120)))
    t.start()
    try:
        assert s["entered"].wait(60)  # the first request is in the engine
        r = httpx.post(s["url"] + "/v1/completions", json=body, headers=auth, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and "1 at once" in r.json()["error"]["message"]
        r = httpx.get(s["url"] + "/v1/model", headers=auth, timeout=30)
        assert r.status_code == 429 and "at once" in r.json()["error"]
    finally:
        s["release"].set()
        t.join(120)
    assert first["r"].status_code == 200
    assert httpx.post(s["url"] + "/v1/completions", json=body, headers=auth, timeout=60).status_code == 200


# --- the translation alone (no server) ----------------------------------------------------------

def test_the_wire_maps_the_policy_and_accepts_only_neutral_extras():
    from aftune.errors import InputError
    from aftune.inference.openai_wire import WireError, parse_request

    greedy = GenerationPolicy(max_new_tokens=12, eos_token_ids=(2,), dtype="float32")
    base = {"model": "m", "prompt": PROMPT}
    req = parse_request({**base, "seed": 7, "max_tokens": 3, "n": 1, "presence_penalty": 0, "user": "u",
                         "logprobs": None, "stop": [], "temperature": 0}, "completion", greedy, "m")
    assert req.policy == greedy.with_max_new_tokens(3) and req.nonce is None  # greedy: a seed changes nothing
    chat = parse_request({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                    {"type": "text", "text": "b"}]}],
                          "max_completion_tokens": 4, "aftune_nonce": NONCE}, "chat", POLICY, "m")
    assert chat.prompt == "ab" and chat.policy.max_new_tokens == 4 and chat.nonce == bytes.fromhex(NONCE)
    for body, param in (({**base, "seed": 7, "aftune_nonce": NONCE}, "seed"),  # sampling: the seed is the nonce's
                        ({**base, "aftune_nonce": NONCE, "max_tokens": True}, "max_tokens"),
                        ({**base, "aftune_nonce": NONCE, "temperature": "0.7"}, "temperature"),
                        ({**base, "aftune_nonce": NONCE, "n": True}, "n"),
                        ({**base, "aftune_nonce": NONCE, "stream_options": {"include_usage": True}}, "stream_options"),
                        ({"model": "m", "messages": [], "aftune_nonce": NONCE}, "messages")):
        with pytest.raises(WireError) as e:
            parse_request(body, "chat" if "messages" in body else "completion", POLICY, "m")
        assert e.value.param == param and isinstance(e.value, InputError), (body, e.value.to_json())


def test_streamed_text_never_sends_what_a_later_token_changes():
    from aftune.inference.openai_wire import TextDeltas

    pieces = {1: "Hello", 2: " ", 3: ".", 4: "\xe2", 5: "\x82\xac", 6: " world"}

    def decode(ids):  # bytes of a partial character show as U+FFFD; " ." is cleaned up to "."
        raw = "".join(pieces[i] for i in ids).encode("latin-1")
        return raw.decode("utf-8", errors="replace").replace(" .", ".")

    deltas = TextDeltas(decode)
    sent = [deltas.add(t) for t in (1, 2, 3, 4, 5, 6)]
    assert sent == ["Hello", "", ".", "", "\u20ac", " world"]
    assert "".join(sent) + deltas.rest(decode([1, 2, 3, 4, 5, 6])) == "Hello.\u20ac world"
    assert deltas.rest("Goodbye") is None  # a text that does not begin with what was sent: the stream fails


def test_a_saved_answer_needs_exactly_one_receipt():
    from aftune.errors import InputError

    chunk = {"id": "c", "object": "text_completion", "model": "m", "choices": [{"index": 0, "text": "hi"}]}
    last = {**chunk, "aftune": {"record_id": "ab" * 32, "receipt": {"x": 1}, "tokens": [1]}}
    assert response_claims(json.dumps([chunk, last]).encode()).text == "hihi"
    for bad in ([chunk, chunk], [chunk, last, last], {**chunk}):
        with pytest.raises(InputError, match="exactly one 'aftune'"):
            response_claims(json.dumps(bad).encode())
    with pytest.raises(CommitmentMismatch, match="different models"):
        response_claims(json.dumps([{**chunk, "model": "other"}, last]).encode())


def test_a_chat_and_a_completion_of_one_text_are_one_computation_under_the_policys_template(model_dir, tmp_path):
    """Greedy policy with a chat template: no nonce needed, a seed accepted (it changes nothing);
    the chat's message and the completion's prompt are rendered by the policy's template alike, so
    both answers commit the same input and the same tokens, and the record replays PASS."""
    from aftune.inference.serve import create_app, download_record
    from aftune.inference.verify import InferenceVerifier

    template = "{{ bos_token }}{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    policy = GenerationPolicy(max_new_tokens=5, eos_token_ids=(2,), chat_template=template, dtype="float32")
    key = SigningKey.generate()
    keys_file = tmp_path / "keys.txt"
    api_key = add_client(keys_file, "carol")
    engine = InferenceEngine(ServedModel.load(model_dir("llama")), tmp_path / "records", key,
                             RecordingSettings(layers_per_block=2))
    with Server(create_app(engine, policy=policy, api_keys=ApiKeys.load(keys_file))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)
        digest = engine.served.digest.hex()
        chat = client.chat.completions.create(model=digest, messages=[{"role": "user", "content": PROMPT}], seed=5)
        completion = client.completions.create(model=digest, prompt=PROMPT)
        a, b = chat.model_extra["aftune"], completion.model_extra["aftune"]
        with httpx.Client(base_url=url, headers=bearer(api_key), timeout=60) as http:
            download_record(http, a["record_id"], tmp_path / "audit")
            download_record(http, b["record_id"], tmp_path / "audit")
    ra, rb = Receipt.from_json(a["receipt"]), Receipt.from_json(b["receipt"])
    assert a["tokens"] == b["tokens"] and ra.record_root != rb.record_root
    inputs = [InferenceRecord.open(tmp_path / "audit", x["record_id"]).declared_digest("input") for x in (a, b)]
    assert inputs[0] == inputs[1]  # one computation: the same templated input ids
    assert chat.choices[0].message.content == completion.choices[0].text
    rec = InferenceRecord.open(tmp_path / "audit", a["record_id"])  # a v3 receipt binds these through its record
    assert rec.request_nonce is None and rec.policy_digest == policy.digest("blake3")
    verify_receipt(ra, key.public_key, tmp_path / "audit", policy_digest=policy.digest("blake3"))
    v = InferenceVerifier(tmp_path / "audit", a["record_id"], model=ServedModel.load(model_dir("llama")),
                          public_key=key.public_key, expected_prompt=PROMPT, policy=policy)
    report = v.verify_all()
    assert report.verdict == "PASS", report.summary()
    ids = engine.served.prompt_inputs(PROMPT, template)["input_ids"][0].tolist()
    assert v.record.rows["input/input_ids"].shape == (1, len(ids))  # the template's rendering, not the raw text
    assert len(ids) != len(engine.served.prompt_inputs(PROMPT)["input_ids"][0])


def test_the_record_download_carries_the_served_file_and_an_edited_one_fails(server, tmp_path):
    """v5 records (SPEC.md 8.4): GET /v1/records/{id} carries the served file (model and layout)
    the record names; the receipt verifies against the fetched record, and an edited served file
    FAILs naming it."""
    s, nonce = server, secrets.token_hex(32)
    answer = s["client"].completions.create(model=s["digest"], prompt=PROMPT, max_tokens=2,
                                            extra_body={"aftune_nonce": nonce})
    att = answer.model_extra["aftune"]
    audit = _fetch(s, att["record_id"], tmp_path / "audit")
    (served,) = (audit / "served").iterdir()
    assert served.read_bytes() == (s["root"] / "records" / "served" / served.name).read_bytes()
    receipt = Receipt.from_json(att["receipt"])
    verify_receipt(receipt, s["pub"], audit, request_nonce=bytes.fromhex(nonce))
    served.write_bytes(served.read_bytes().replace(b'"float32"', b'"float64"'))
    with pytest.raises(CommitmentMismatch, match=f"served/{served.stem[:16]}.*was edited"):
        verify_receipt(receipt, s["pub"], audit, request_nonce=bytes.fromhex(nonce))
