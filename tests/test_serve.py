"""HTTP serving: a real uvicorn server on loopback, 50 concurrent requests, 50 distinct receipts,
each receipt valid and each record (fetched over HTTP into an auditor's directory) verifying
PASS at every layer block; bad requests get a 4xx with a clear message."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from aftune.inference.engine import InferenceEngine
from aftune.inference.served import ServedModel
from aftune.inference.settings import RecordingSettings
from aftune.inference.receipt import Receipt, verify_receipt
from aftune.core.signing import SigningKey
from aftune.inference.verify import InferenceVerifier

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on 127.0.0.1; stops by itself when the test ends."""

    def __init__(self, app):
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served_run(tmp_path_factory, model_dir, datasets):
    """A tiny fine-tuned Llama run and a server for it."""
    from aftune.training.settings import TrainSettings
    from aftune.inference.serve import create_app
    from aftune.training.train import train

    root = tmp_path_factory.mktemp("serve")
    run = root / "run"
    train(model_dir("llama"), datasets["text"], run, TrainSettings(steps=2, batch_size=4, seq_len=32,
                                                                   layers_per_block=2, steps_per_block=2))
    key = SigningKey.load(run / "provider.key")
    engine = InferenceEngine(ServedModel.load(run), root / "records", key, RecordingSettings(layers_per_block=1))
    with Server(create_app(engine, max_new_tokens_limit=64)) as url:
        yield run, key.public_key, url, engine


def test_fifty_concurrent_requests_get_distinct_verifiable_receipts_and_records(served_run, tmp_path):
    from aftune.inference.serve import download_record

    run, pub, url, engine = served_run
    requests = []
    for i in range(50):
        body = {"prompt": f"Q: request number {i} about {'sky grass sea'.split()[i % 3]}?", "max_new_tokens": 3 + i % 4}
        if i % 2:
            body.update(temperature=0.7 + 0.01 * i, top_p=0.9, seed=i)
        requests.append(body)

    async def fire():
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0), limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/generate", json=b) for b in requests))

    responses = asyncio.run(asyncio.wait_for(fire(), timeout=300))
    assert [r.status_code for r in responses] == [200] * 50, [r.text for r in responses if r.status_code != 200][:2]
    bodies = [r.json() for r in responses]
    receipts = [Receipt.from_json(b["receipt"]) for b in bodies]
    assert len({r.record_root for r in receipts}) == 50 and len({r.signature for r in receipts}) == 50
    for receipt in receipts:  # none lost: each record and receipt is on the server's disk
        assert engine.records.record_path(receipt.record_root).is_file()
        assert Receipt.load(engine.records.receipt_path(receipt.record_root)) == receipt
    with httpx.Client(base_url=url, timeout=60) as client:
        model = client.get("/v1/model").json()
        assert model["public_key"] == pub.text and model["run"]["final_model_digest"] == model["model_digest"]
        audit = tmp_path / "audit"
        for body in bodies:
            download_record(client, body["record_id"], audit)
    served = ServedModel.load(run / "model", plain=True, with_tokenizer=False)  # the auditor's copy, loaded once
    for request, body, receipt in zip(requests, bodies, receipts):
        verify_receipt(receipt, pub, audit)  # signed by the pinned key, and the record agrees
        v = InferenceVerifier(audit, body["record_id"], model=served, public_key=pub, run_dir=run,
                              expected_prompt=request["prompt"])
        report = v.verify_all()
        assert report.verdict == "PASS", report.summary()
        assert v.tokens == body["tokens"] and v.record.doc["output"]["text"] == body["text"]
        assert v.record.generation.max_new_tokens == request["max_new_tokens"]
        assert v.record.generation.temperature == request.get("temperature", 0.0)


@pytest.mark.parametrize("body, status, message", [
    ({}, 422, "prompt: Field required"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 10_000}, 422, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ({"prompt": "hi", "temperature": -1}, 422, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 422, "top_p"),
    ({"prompt": "hi", "seed": -3}, 422, "seed"),
    ({"prompt": "hi", "stream": True}, 422, "stream: Extra inputs are not permitted"),
    ({"prompt": 7}, 422, "prompt"),
    ({"prompt": "word " * 200, "max_new_tokens": 60}, 400, "positions"),
])
def test_bad_requests_get_a_clear_4xx(served_run, body, status, message):
    _, _, url, _ = served_run
    r = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"], r.json()


def test_bad_lookups(served_run):
    _, _, url, _ = served_run
    with httpx.Client(base_url=url, timeout=30) as client:
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


def test_served_answer_matches_cli_verification(served_run, tmp_path):
    """One request end to end with the CLI an auditor would run."""
    from aftune.inference.serve import download_record
    from test_inference import cli

    run, pub, url, _ = served_run
    with httpx.Client(base_url=url, timeout=60) as client:
        body = client.post("/v1/generate", json={"prompt": "Q: hello?", "max_new_tokens": 4}).json()
        download_record(client, body["record_id"], tmp_path / "audit")
    receipt = tmp_path / "audit" / "receipts" / f"{body['record_id']}.json"
    r = cli("verify-receipt", receipt, "--public-key", run / "provider.key.pub", "--record-dir", tmp_path / "audit")
    assert r.exit_code == 0, r.output
    r = cli("verify-inference", tmp_path / "audit", "--all", "--model", run, "--public-key", run / "provider.key.pub",
            "--run", run, "--prompt", "Q: hello?")
    assert r.exit_code == 0 and "PASS" in r.output, r.output


def test_aftune_serve_command_answers_and_stops(served_run, tmp_path):
    """`aftune serve RUN` in its own process: it answers on loopback and is stopped by its pid."""
    import subprocess
    import sys

    run, pub, _, _ = served_run
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aftune", "serve", str(run), "--host", "127.0.0.1", "--port",
                             str(port), "--record-dir", str(tmp_path / "records")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                model = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=5).json()
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stderr.read().decode()[-2000:])
                time.sleep(0.3)
        assert model["public_key"] == pub.text
        body = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "Q: hi", "max_new_tokens": 2},
                          timeout=60).json()
        verify_receipt(Receipt.from_json(body["receipt"]), pub, tmp_path / "records")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
