"""HTTP serving: a real uvicorn server on loopback, two clients with their own API keys, 50
concurrent sampled requests, 50 distinct receipts, each answering its client's nonce and policy
and each record (fetched over HTTP into an auditor's directory) verifying PASS at every layer
block; neither client can read the other's records (404, exactly as for a missing record);
no key is 401; requests outside the policy get a 422 naming the field; HTTPS with a self-signed
certificate; attested serving (simulated evidence) accepted by the client, a wrong nonce or
another model refused naming the link.

    python3 -m pytest -q tests/test_serve.py
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time

import pytest

from aftune.core.signing import SigningKey
from aftune.inference.access import ApiKeys, add_client
from aftune.inference.engine import InferenceEngine
from aftune.inference.policy import GenerationPolicy
from aftune.inference.receipt import Receipt, verify_receipt
from aftune.inference.record import InferenceRecord
from aftune.inference.served import ServedModel
from aftune.inference.settings import RecordingSettings
from aftune.inference.verify import InferenceVerifier

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

POLICY = GenerationPolicy(max_new_tokens=64, eos_token_ids=(2,), temperature=0.7, top_p=0.9, dtype="float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on 127.0.0.1; stops by itself when the test ends."""

    def __init__(self, app, **ssl):
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", **ssl)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.scheme = "https" if ssl else "http"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def served_run(tmp_path_factory, model_dir, datasets):
    """A tiny fine-tuned Llama run served to two clients (alice, bob) under a sampling policy,
    with simulated attestation evidence wired as `aftune serve --attest unsafe-simulated` does."""
    from aftune.attestation.providers import UnsafeSimulatedEvidenceProvider
    from aftune.attestation.serving import attestation_response
    from aftune.inference.serve import create_app
    from aftune.training.settings import TrainSettings
    from aftune.training.train import train

    root = tmp_path_factory.mktemp("serve")
    run = root / "run"
    train(model_dir("llama"), datasets["text"], run, TrainSettings(steps=2, batch_size=4, seq_len=32,
                                                                   layers_per_block=2, steps_per_block=2))
    key = SigningKey.load(run / "provider.key")
    keys_file = root / "api-keys.txt"
    keys = {name: add_client(keys_file, name) for name in ("alice", "bob")}
    assert all(k not in keys_file.read_text() for k in keys.values())  # only their hashes are kept
    (root / "policy.json").write_text(json.dumps(POLICY.to_json()))
    engine = InferenceEngine(ServedModel.load(run), root / "records", key, RecordingSettings(layers_per_block=1))
    provider = UnsafeSimulatedEvidenceProvider()

    def attestation(nonce: str) -> dict:
        return attestation_response(provider, nonce, algorithm=engine.served.algorithm,
                                    model_digest=engine.served.digest, receipt_key=engine.key.public_key)

    app = create_app(engine, policy=POLICY, api_keys=ApiKeys.load(keys_file), attestation=attestation)
    with Server(app) as url:
        yield dict(run=run, pub=key.public_key, url=url, engine=engine, keys=keys, root=root, app=app)


def test_fifty_concurrent_requests_from_two_clients_get_distinct_verifiable_receipts(served_run, tmp_path):
    from aftune.inference.serve import download_record

    s = served_run
    requests = []
    for i in range(50):
        client = ("alice", "bob")[i % 2]
        body = {"prompt": f"Q: request number {i} about {'sky grass sea'.split()[i % 3]}?",
                "max_new_tokens": 3 + i % 4, "nonce": secrets.token_hex(16 + i % 17)}
        if i % 5 == 0:  # restating a field of the policy is allowed
            body["temperature"] = 0.7
        requests.append((client, body))

    async def fire():
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=s["url"], timeout=httpx.Timeout(120.0), limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/generate", json=b, headers=bearer(s["keys"][c]))
                                          for c, b in requests))

    responses = asyncio.run(asyncio.wait_for(fire(), timeout=300))
    assert [r.status_code for r in responses] == [200] * 50, [r.text for r in responses if r.status_code != 200][:2]
    bodies = [r.json() for r in responses]
    receipts = [Receipt.from_json(b["receipt"]) for b in bodies]
    assert len({r.record_root for r in receipts}) == 50 and len({r.signature for r in receipts}) == 50
    for (client, request), receipt in zip(requests, receipts):  # each answers its nonce, under its policy
        rec = InferenceRecord.open(s["engine"].records.root, receipt.record_root.hex())  # none lost
        assert rec.request_nonce == bytes.fromhex(request["nonce"])
        assert rec.policy_digest == POLICY.with_max_new_tokens(request["max_new_tokens"]).digest("blake3")
        verify_receipt(receipt, s["pub"], s["engine"].records.root, request_nonce=bytes.fromhex(request["nonce"]))
        assert Receipt.load(s["engine"].records.receipt_path(receipt.record_root)) == receipt
    audit = tmp_path / "audit"
    with httpx.Client(base_url=s["url"], timeout=60, headers=bearer(s["keys"]["alice"])) as alice, \
            httpx.Client(base_url=s["url"], timeout=60, headers=bearer(s["keys"]["bob"])) as bob:
        model = alice.get("/v1/model").json()
        assert model["public_key"] == s["pub"].text and model["run"]["final_model_digest"] == model["model_digest"]
        assert model["policy"] == POLICY.to_json() and model["policy_digest"] == POLICY.digest("blake3").hex()
        for (client, _), body in zip(requests, bodies):  # each client downloads its own records
            download_record(alice if client == "alice" else bob, body["record_id"], audit)
        # neither reads the other's: the same 404 as for a record that does not exist
        for (client, _), body in zip(requests, bodies):
            other = bob if client == "alice" else alice
            rid = body["record_id"]
            theirs = other.get(f"/v1/records/{rid}")
            assert theirs.status_code == 404 and theirs.json() == {"error": f"no record {rid}"}
            missing = other.get(f"/v1/records/{'0' * 63}1")
            assert missing.status_code == 404 and missing.json() == {"error": f"no record {'0' * 63}1"}
        alice_objects = alice.get(f"/v1/records/{bodies[0]['record_id']}").json()["objects"]
        bob_objects = bob.get(f"/v1/records/{bodies[1]['record_id']}").json()["objects"]
        only_bob = {o["digest"] for o in bob_objects} - {o["digest"] for o in alice_objects}
        stolen = next(d for d in sorted(only_bob) if bob.get(f"/v1/objects/{d}").status_code == 200)
        r = alice.get(f"/v1/objects/{stolen}")
        assert r.status_code == 404 and r.json() == {"error": f"no object {stolen}"}
    served = ServedModel.load(s["run"] / "model", plain=True, with_tokenizer=False)  # the auditor's copy, loaded once
    for (client, request), body, receipt in zip(requests, bodies, receipts):
        asked = POLICY.with_max_new_tokens(request["max_new_tokens"])
        nonce = bytes.fromhex(request["nonce"])
        verify_receipt(receipt, s["pub"], audit, request_nonce=nonce, policy_digest=asked.digest("blake3"))
        v = InferenceVerifier(audit, body["record_id"], model=served, public_key=s["pub"], run_dir=s["run"],
                              expected_prompt=request["prompt"], policy=asked, request_nonce=nonce)
        report = v.verify_all()
        assert report.verdict == "PASS" and not report.notes, report.summary()
        assert v.tokens == body["tokens"] and v.record.doc["output"]["text"] == body["text"]
        assert v.record.policy == asked and v.record.request_nonce == nonce


def test_without_a_valid_key_every_endpoint_is_401(served_run):
    url = served_run["url"]
    for headers in ({}, bearer("aftune_not-a-key"), {"authorization": served_run["keys"]["alice"]},
                    {"authorization": f"Basic {served_run['keys']['alice']}"}):
        for method, path in (("get", "/v1/model"), ("post", "/v1/generate"), ("get", "/v1/records/" + "ab" * 32),
                             ("get", "/v1/objects/" + "cd" * 32), ("get", "/v1/attestation?nonce=" + "01" * 32),
                             ("get", "/v1/nothing")):
            r = httpx.request(method, url + path, headers=headers, json={"prompt": "hi"}, timeout=30)
            assert r.status_code == 401 and "API key" in r.json()["error"], (headers, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"


NONCE = "5a" * 32


@pytest.mark.parametrize("body, status, message", [
    ({}, 422, "prompt: Field required"),
    ({"prompt": "", "nonce": NONCE}, 422, "prompt"),
    ({"prompt": "hi", "nonce": NONCE, "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt": "hi", "nonce": NONCE, "max_new_tokens": 65}, 422, "max_new_tokens: the policy allows 1 to 64"),
    ({"prompt": "hi", "nonce": NONCE, "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ({"prompt": "hi", "nonce": NONCE, "temperature": -1}, 422, "temperature"),
    ({"prompt": "hi", "nonce": NONCE, "temperature": 3.0}, 422, "temperature: the policy fixes 0.7, the request asks 3.0"),
    ({"prompt": "hi", "nonce": NONCE, "top_p": 0}, 422, "top_p"),
    ({"prompt": "hi", "nonce": NONCE, "eos_token_ids": [5]}, 422, "eos_token_ids: the policy fixes [2]"),
    ({"prompt": "hi", "nonce": NONCE, "stop_rule": "length"}, 422, "stop_rule"),
    ({"prompt": "hi", "nonce": NONCE, "chat_template": "{{ messages }}"}, 422, "chat_template"),
    ({"prompt": "hi", "nonce": NONCE, "seed": 3}, 422, "seed: Extra inputs are not permitted"),
    ({"prompt": "hi"}, 422, "nonce: required: the policy samples"),
    ({"prompt": "hi", "nonce": "zz" * 16}, 422, "nonce: expected lowercase hex"),
    ({"prompt": "hi", "nonce": "ab"}, 422, "nonce"),
    ({"prompt": "hi", "nonce": NONCE, "stream": True}, 422, "stream: Extra inputs are not permitted"),
    ({"prompt": 7, "nonce": NONCE}, 422, "prompt"),
    ({"prompt": "word " * 200, "nonce": NONCE, "max_new_tokens": 60}, 400, "positions"),
])
def test_bad_requests_get_a_clear_4xx(served_run, body, status, message):
    r = httpx.post(f"{served_run['url']}/v1/generate", json=body, timeout=60,
                   headers=bearer(served_run["keys"]["alice"]))
    assert r.status_code == status, r.text
    assert message in r.json()["error"], r.json()


def test_bad_lookups(served_run):
    with httpx.Client(base_url=served_run["url"], timeout=30, headers=bearer(served_run["keys"]["bob"])) as client:
        assert client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
                           ).status_code == 422
        r = client.post("/v1/generate", content=b'{"prompt": "\\ud800"}', headers={"content-type": "application/json"})
        assert r.status_code == 422 and "prompt" in r.json()["error"] and "unicode" in r.json()["error"]
        r = client.get("/v1/records/abc")
        assert r.status_code == 400 and "64 lowercase hex" in r.json()["error"]
        r = client.get("/v1/records/" + "ab" * 32)
        assert r.status_code == 404 and "no record" in r.json()["error"]
        assert client.get("/v1/objects/" + "cd" * 32).status_code == 404
        assert client.get("/v1/objects/../../etc").status_code in (400, 404)
        assert client.get("/v1/tokenizers/" + "ab" * 32 + "/..").status_code in (400, 404)
        assert client.get("/v1/tokenizers/" + "ab" * 32 + "/tokenizer.json").status_code == 404


def test_served_answer_matches_cli_verification(served_run, tmp_path):
    """One request end to end with the CLI an auditor would run: its nonce, its policy file."""
    from aftune.inference.serve import download_record
    from test_inference import cli

    s = served_run
    run, nonce = s["run"], secrets.token_hex(32)
    with httpx.Client(base_url=s["url"], timeout=60, headers=bearer(s["keys"]["alice"])) as client:
        body = client.post("/v1/generate", json={"prompt": "Q: hello?", "max_new_tokens": 4, "nonce": nonce}).json()
        download_record(client, body["record_id"], tmp_path / "audit")
    receipt = tmp_path / "audit" / "receipts" / f"{body['record_id']}.json"
    asked = ("--policy", s["root"] / "policy.json", "--max-new-tokens", 4)
    r = cli("verify-receipt", receipt, "--public-key", run / "provider.key.pub", "--record-dir", tmp_path / "audit",
            "--request-nonce", nonce, *asked)
    assert r.exit_code == 0 and "VALID" in r.output and "not compared" not in r.output, r.output
    r = cli("verify-receipt", receipt, "--public-key", run / "provider.key.pub", "--record-dir", tmp_path / "audit",
            "--request-nonce", nonce, "--policy", s["root"] / "policy.json")  # you asked 64, not 4
    assert r.exit_code == 1 and "another generation policy" in r.output, r.output
    r = cli("verify-inference", tmp_path / "audit", "--all", "--model", run, "--public-key", run / "provider.key.pub",
            "--run-dir", run, "--prompt", "Q: hello?", "--request-nonce", nonce, *asked)
    assert r.exit_code == 0 and "PASS" in r.output and "NOT CHECKED" not in r.output, r.output


def _self_signed(directory):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_with_a_self_signed_certificate(served_run, tmp_path):
    import ssl

    cert, key = _self_signed(tmp_path)
    with Server(served_run["app"], ssl_certfile=str(cert), ssl_keyfile=str(key)) as url:
        assert url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=url, verify=trust, timeout=60, headers=bearer(served_run["keys"]["alice"])) as c:
            assert c.get("/v1/model").json()["public_key"] == served_run["pub"].text
            body = c.post("/v1/generate", json={"prompt": "Q: tls?", "max_new_tokens": 2, "nonce": NONCE}).json()
            assert Receipt.from_json(body["receipt"]).record_root.hex() == body["record_id"]
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
            httpx.get(url + "/v1/model", timeout=30, headers=bearer(served_run["keys"]["alice"]))
        with pytest.raises(httpx.TransportError):  # plain HTTP to the HTTPS port
            httpx.get(url.replace("https", "http") + "/v1/model", timeout=30)


def test_attested_serving_is_accepted_and_a_wrong_nonce_or_model_is_refused(served_run, tmp_path):
    """GET /v1/attestation on the app as `aftune serve --attest` wires it; the client's
    `verify-receipt --attestation` accepts the chain (simulated evidence, with the unsafe option)
    and names the broken link for a wrong nonce or another model."""
    from aftune.attestation.claims import AppraisalPolicy
    from aftune.attestation.serving import ServingEvidence, check_serving
    from aftune.training.transcript import Transcript
    from test_inference import cli

    s = served_run
    final = Transcript.load(s["run"] / "transcript.jsonl", s["pub"]).run.final_model_digest
    attest_nonce, nonce = secrets.token_hex(32), secrets.token_hex(32)
    with httpx.Client(base_url=s["url"], timeout=60, headers=bearer(s["keys"]["bob"])) as client:
        answer = client.get("/v1/attestation", params={"nonce": attest_nonce})
        assert answer.status_code == 200 and answer.json()["warning"].startswith("SIMULATED")
        assert client.get("/v1/attestation", params={"nonce": "xyz"}).status_code == 400
        body = client.post("/v1/generate", json={"prompt": "Q: attested?", "max_new_tokens": 3, "nonce": nonce}).json()
        from aftune.inference.serve import download_record

        download_record(client, body["record_id"], tmp_path / "audit")
    response = ServingEvidence.from_json(answer.json())
    receipt = Receipt.from_json(body["receipt"])
    simulated = AppraisalPolicy(unsafe_accept_simulated=True)
    report = check_serving(response, nonce=bytes.fromhex(attest_nonce), expected_model_digest=final, receipt=receipt,
                           pinned_receipt_key=s["pub"], record_dir=tmp_path / "audit", policy=simulated)
    assert report.ok and [c.name for c in report.links] == ["nonce", "evidence", "binding", "model", "key", "receipt",
                                                           "record"], report.summary()
    (tmp_path / "attestation.json").write_text(json.dumps(answer.json()))
    receipt_file = tmp_path / "audit" / "receipts" / f"{body['record_id']}.json"
    base = ("verify-receipt", receipt_file, "--record-dir", tmp_path / "audit", "--attestation",
            tmp_path / "attestation.json", "--request-nonce", nonce, "--unsafe-accept-simulated")
    r = cli(*base, "--attestation-nonce", attest_nonce, "--model-digest", final.hex())
    assert r.exit_code == 0 and "VALID attested serving" in r.output and "SIMULATED" in r.output, r.output
    r = cli(*base, "--attestation-nonce", secrets.token_hex(32), "--model-digest", final.hex())
    assert r.exit_code == 1 and "link 'nonce' is broken" in r.output, r.output
    r = cli(*base, "--attestation-nonce", attest_nonce, "--model-digest", "66" * 32)
    assert r.exit_code == 1 and "link 'model' is broken" in r.output, r.output
    r = cli(*base[:-1], "--attestation-nonce", attest_nonce, "--model-digest", final.hex())  # simulated, without the unsafe option
    assert r.exit_code == 1 and "link 'evidence' is broken" in r.output, r.output


def test_aftune_serve_command_with_keys_policy_and_attestation(served_run, tmp_path):
    """`aftune serve RUN --policy --api-keys --attest unsafe-simulated` in its own process: it
    answers on loopback to a key holder only, its receipt key is made in the process (not the
    run's) and attested, and it is stopped by its pid."""
    import subprocess
    import sys

    from aftune.attestation.serving import ServingEvidence
    from aftune.core.signing import PublicKey

    s = served_run
    keys = tmp_path / "keys.txt"
    key = add_client(keys, "carol")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aftune", "serve", str(s["run"]), "--host", "127.0.0.1", "--port",
                             str(port), "--record-dir", str(tmp_path / "records"), "--policy",
                             str(s["root"] / "policy.json"), "--api-keys", str(keys), "--attest", "unsafe-simulated"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                model = httpx.get(f"{base}/v1/model", timeout=5, headers=bearer(key))
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stderr.read().decode()[-2000:])
                time.sleep(0.3)
        assert httpx.get(f"{base}/v1/model", timeout=5).status_code == 401
        receipt_key = PublicKey.from_text(model.json()["public_key"])
        assert receipt_key != s["pub"]  # made inside the serving process, never loaded from disk
        attest_nonce = secrets.token_bytes(32)
        evidence = ServingEvidence.from_json(httpx.get(f"{base}/v1/attestation", params={"nonce": attest_nonce.hex()},
                                                       headers=bearer(key), timeout=30).json())
        assert evidence.receipt_key == receipt_key and evidence.nonce == attest_nonce
        nonce = secrets.token_bytes(32)
        body = httpx.post(f"{base}/v1/generate", json={"prompt": "Q: hi", "max_new_tokens": 2, "nonce": nonce.hex()},
                          headers=bearer(key), timeout=60).json()
        verify_receipt(Receipt.from_json(body["receipt"]), evidence.receipt_key, tmp_path / "records",
                       request_nonce=nonce, policy_digest=POLICY.with_max_new_tokens(2).digest("blake3"))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
