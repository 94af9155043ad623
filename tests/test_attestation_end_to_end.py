"""End to end: an attested verdict for a recorded run, and an attested serving session with a real
receipt and record, each checked by the client; then every link broken in turn, and the report
must name it. The TEE is a test-PKI CCA platform (real token format, throwaway keys) or the
simulated provider (accepted only with the unsafe option).

    python3 -m pytest -q tests/test_attestation_end_to_end.py
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from aftune.attestation.binding import verifier_code_digest
from aftune.attestation.claims import Endorsements, AppraisalPolicy
from aftune.attestation.providers import UnsafeSimulatedEvidenceProvider
from aftune.attestation.serving import ServingEvidence, check_serving, serving_evidence
from aftune.attestation.verdict import AttestedVerdict, attest_report, attest_run, check_attested_verdict
from aftune.core.signing import SigningKey
from aftune.errors import InputError
from test_attestation_pki import CcaTestPlatform, CcaTestProvider

RIM = b"\x5a" * 32
NONCE = b"\x01" * 32
OTHER_NONCE = b"\x02" * 32


@pytest.fixture(scope="module")
def agreement(model_dir, datasets):
    """The client's agreement for the run below."""
    from aftune.training.agreement import make_agreement
    from aftune.training.settings import TrainSettings

    settings = TrainSettings(steps=2, batch_size=4, seq_len=32, layers_per_block=2, steps_per_block=1, lr=1e-2,
                             boundaries="stored")
    return make_agreement(model_dir("llama"), datasets["text"], settings)


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_dir, datasets, agreement):
    """A tiny recorded Llama run under `agreement`, its public key, its transcript's run line, and a
    CCA test platform (made lazily: only the tests that use it need cbor2 and pycose)."""
    from aftune.training.run import RunRecord
    from aftune.training.train import train

    run_dir = tmp_path_factory.mktemp("attested") / "run"
    result = train(model_dir("llama"), datasets["text"], run_dir, agreement=agreement)
    from aftune.core.signing import PublicKey

    pub = PublicKey.load(result.public_key_path)
    return run_dir, pub, RunRecord.open(run_dir, pub).transcript.run, CcaTestPlatform(), agreement


@pytest.fixture(scope="module")
def verdict(run, agreement):
    pytest.importorskip("cbor2")
    pytest.importorskip("pycose")
    run_dir, pub, _, platform, _ = run
    return attest_run(run_dir, pub, CcaTestProvider(platform, RIM), NONCE, agreement=agreement)


@pytest.fixture(scope="module")
def simulated(run, agreement):
    """The same verification attested with the simulated provider: needs no extra at all."""
    run_dir, pub, _, _, _ = run
    return attest_run(run_dir, pub, UnsafeSimulatedEvidenceProvider(), NONCE, agreement=agreement)


def _client(doc, run, *, nonce=NONCE, rim=RIM, platform=None, **kw):
    _, pub, line, cca, agreed = run
    args = dict(nonce=nonce, expected_run_root=line.root, expected_config_digest=line.config_digest,
                expected_provider_key=pub, expected_code_digest=verifier_code_digest(doc.algorithm),
                expected_agreement=agreed.digest(),
                policy=AppraisalPolicy(reference_values=(("rim", rim),)),
                endorsements=Endorsements(cca_platform_keys=((platform or cca).platform_key_pem(),)))
    args.update(kw)
    return check_attested_verdict(doc, **args)


def _broken(report) -> list[str]:
    return [c.name for c in report.links if c.status == "FAIL"]


def test_attested_verdict_of_a_run_is_accepted_by_the_client(verdict, run):
    report = _client(verdict, run)
    assert report.ok and report.attested_verdict == "PASS", report.summary()
    assert [c.status for c in report.links] == ["PASS"] * 8
    assert json.loads(verdict.report)["verdict"] == "PASS" and not verdict.simulated
    again = AttestedVerdict.from_json(json.loads(json.dumps(verdict.to_json())))
    assert again == verdict and _client(again, run).ok


@pytest.mark.parametrize("case,link", [
    ("wrong nonce", "nonce"), ("stale evidence", "binding"), ("other key", "binding"), ("edited report", "signature"),
    ("other run", "run"), ("other provider key", "run"), ("other measurement", "evidence"),
    ("untrusted platform", "evidence"), ("other code", "code"), ("other agreement", "agreement"),
    ("self-consistency only", "agreement"),
])
def test_each_broken_link_of_an_attested_verdict_is_named(verdict, run, case, link):
    _, _, line, _, _ = run
    doc, kw = verdict, {}
    if case == "wrong nonce":
        kw["nonce"] = OTHER_NONCE
    elif case == "stale evidence":  # evidence made for an earlier request, spliced into a fresh document
        old = attest_report(json.loads(verdict.report), CcaTestProvider(run[3], RIM), OTHER_NONCE, algorithm=doc.algorithm,
                            run_root=doc.run_root, config_digest=doc.config_digest, provider_key=doc.provider_key)
        doc = replace(doc, evidence=old.evidence)
    elif case == "other key":  # someone signs a report with their own key, reusing genuine evidence
        thief = SigningKey.generate()
        doc = replace(doc, verifier_key=thief.public_key)
        doc = replace(doc, signature=thief.sign("attested-verdict", doc.message()))
    elif case == "edited report":
        doc = replace(doc, report=doc.report.replace('"verdict":"PASS"', '"verdict":"PASS","note":"edited"'))
    elif case == "other run":
        kw["expected_run_root"] = b"\x77" * 32
    elif case == "other provider key":
        kw["expected_provider_key"] = SigningKey.generate().public_key
    elif case == "other measurement":
        kw["rim"] = b"\x5b" * 32
    elif case == "untrusted platform":
        kw["platform"] = CcaTestPlatform()
    elif case == "other code":
        kw["expected_code_digest"] = b"\x00" * 32
    elif case == "other agreement":  # a genuine verdict, but about an agreement this client never made
        kw["expected_agreement"] = b"\x33" * 32
    elif case == "self-consistency only":  # the provider's verifier ran without the client's agreement
        unsafe = attest_run(run[0], run[1], CcaTestProvider(run[3], RIM), NONCE, unsafe_no_agreement=True)
        assert unsafe.verdict == "PASS"
        doc = unsafe
    report = _client(doc, run, **kw)
    assert not report.ok and _broken(report)[0] == link, [c.line() for c in report.links]
    assert f"link '{link}' is broken" in report.summary()


def test_a_verdict_without_reference_measurement_is_bad_input(verdict, run):
    with pytest.raises(InputError, match="expected measurement"):
        _client(verdict, run, policy=AppraisalPolicy())


def test_a_verdict_checked_without_the_agreement_needs_the_unsafe_option(verdict, run):
    with pytest.raises(InputError, match="--agreement"):
        _client(verdict, run, expected_agreement=None)
    report = _client(verdict, run, expected_agreement=None, unsafe_no_agreement=True)
    skipped = [c for c in report.links if c.name == "agreement"]
    assert report.ok and skipped[0].status == "SKIPPED" and "NOT CHECKED" in skipped[0].detail


def test_simulated_attested_verdict_says_so_and_needs_the_unsafe_option(simulated, run):
    doc = simulated
    assert doc.simulated and json.loads(doc.report)["verdict"] == "PASS"
    assert doc.simulated and "SIMULATED" in doc.to_json()["warning"]
    refused = _client(doc, run, policy=AppraisalPolicy())
    assert _broken(refused) == ["evidence"] and "simulated" in refused.links[1].detail
    accepted = _client(doc, run, policy=AppraisalPolicy(unsafe_accept_simulated=True))
    assert accepted.ok and accepted.simulated and "SIMULATED" in accepted.summary()
    stripped = doc.to_json()
    del stripped["warning"]
    with pytest.raises(InputError, match="missing fields"):
        AttestedVerdict.from_json(stripped)


def test_cli_verify_run_and_check_verdict(run, tmp_path):
    from conftest import invoke

    run_dir, pub, line, platform, agreed = run
    agreement = agreed.save(tmp_path / "agreement.json")
    out = tmp_path / "verdict.json"
    r = invoke("attestation", "verify-run", run_dir, "--public-key", pub.text, "--attestation-nonce", NONCE.hex(),
               "--attest", "unsafe-simulated", "--out", out)
    assert r.exit_code == 2 and "--agreement" in r.output  # no agreement: refused before anything is attested
    r = invoke("attestation", "verify-run", run_dir, "--public-key", pub.text, "--attestation-nonce", NONCE.hex(),
               "--attest", "unsafe-simulated", "--out", out, "--agreement", agreement)
    assert r.exit_code == 0 and out.is_file() and "proves nothing" in r.output
    check = ["attestation", "check-verdict", out, "--attestation-nonce", NONCE.hex(), "--run-root", line.root.hex(),
             "--agreement", agreement]
    r = invoke(*check)
    assert r.exit_code == 1 and "simulated" in r.output
    r = invoke(*check, "--unsafe-accept-simulated", "--public-key", pub.text)
    assert r.exit_code == 0 and "SIMULATED" in r.output and "verdict is PASS" in r.output
    r = invoke(*check[:7], "--unsafe-accept-simulated")
    assert r.exit_code == 2 and "--agreement" in r.output
    r = invoke(*check[:4], OTHER_NONCE.hex(), *check[5:], "--unsafe-accept-simulated", "--json")
    first = json.loads(r.output)["links"][0]
    assert r.exit_code == 1 and (first["name"], first["status"]) == ("nonce", "FAIL")
    # an attested FAIL is a valid chain about a failed run: the command still exits 1
    fail = attest_report({"verdict": "FAIL", "errors": []}, UnsafeSimulatedEvidenceProvider(), NONCE,
                         algorithm="blake3", run_root=line.root, config_digest=line.config_digest, provider_key=pub)
    (tmp_path / "fail.json").write_text(json.dumps(fail.to_json()))
    r = invoke("attestation", "check-verdict", tmp_path / "fail.json", "--attestation-nonce", NONCE.hex(), "--run-root",
               line.root.hex(), "--unsafe-accept-simulated", "--unsafe-no-agreement")
    assert r.exit_code == 1 and "verdict is FAIL" in r.output


def test_cli_verify_attest_writes_a_verdict_the_client_accepts(run, tmp_path):
    from conftest import invoke

    run_dir, pub, line, _, agreed = run
    agreement = agreed.save(tmp_path / "agreement.json")
    out = tmp_path / "attested.json"
    base = ["verify", run_dir, "--public-key", pub.text, "--agreement", agreement]
    r = invoke(*base, "-l", "0", "-s", "0", "--attest", "unsafe-simulated", "--attestation-nonce", NONCE.hex(), "--attest-out", out)
    assert r.exit_code == 2 and "--all" in r.output and not out.exists()
    r = invoke(*base, "--all", "--attest", "unsafe-simulated", "--attest-out", out)
    assert r.exit_code == 2 and "go together" in r.output
    r = invoke(*base, "--all", "--attest", "unsafe-simulated", "--attestation-nonce", NONCE.hex(), "--attest-out", out)
    assert r.exit_code == 0 and "proves nothing" in r.output and out.is_file()
    r = invoke("attestation", "check-verdict", out, "--attestation-nonce", NONCE.hex(), "--run-root", line.root.hex(),
               "--agreement", agreement, "--public-key", pub.text, "--unsafe-accept-simulated")
    assert r.exit_code == 0 and "verdict is PASS" in r.output, r.output


@pytest.fixture(scope="module")
def session(run, tmp_path_factory):
    """A model served from inside the (test) TEE: receipt key made there, one recorded request."""
    pytest.importorskip("cbor2")
    pytest.importorskip("pycose")
    from aftune.inference.engine import InferenceEngine
    from aftune.inference.served import ServedModel
    from aftune.inference.policy import GenerationPolicy
    from aftune.inference.settings import RecordingSettings

    run_dir, _, line, platform, _ = run
    records = tmp_path_factory.mktemp("served") / "records"
    engine = InferenceEngine(ServedModel.load(run_dir), records, SigningKey.generate(), RecordingSettings(layers_per_block=1))
    result = engine.generate("Q: what is 2+2?", GenerationPolicy.for_model(engine.served.hf_config, max_new_tokens=3))
    response = serving_evidence(CcaTestProvider(platform, RIM), NONCE, algorithm=engine.served.algorithm,
                                model_digest=engine.served.digest, receipt_key=engine.key.public_key)
    return engine, result, response, records


def _serve_check(response, run, session, **kw):
    engine, result, _, records = session
    args = dict(nonce=NONCE, expected_model_digest=run[2].final_model_digest, receipt=result.receipt,
                record_dir=records, policy=AppraisalPolicy(reference_values=(("rim", RIM),)),
                endorsements=Endorsements(cca_platform_keys=(run[3].platform_key_pem(),)))
    args.update(kw)
    return check_serving(response, **args)


def test_attested_serving_session_is_accepted_by_the_client(run, session):
    response = session[2]
    report = _serve_check(response, run, session, pinned_receipt_key=session[0].key.public_key)
    assert report.ok, report.summary()
    assert [(c.name, c.status) for c in report.links] == [
        ("nonce", "PASS"), ("evidence", "PASS"), ("binding", "PASS"), ("model", "PASS"), ("key", "PASS"),
        ("receipt", "PASS"), ("record", "PASS")]
    assert ServingEvidence.from_json(json.loads(json.dumps(response.to_json()))) == response


@pytest.mark.parametrize("case,link", [("wrong nonce", "nonce"), ("stale evidence", "binding"), ("other model", "model"),
                                       ("other key", "receipt"), ("pinned key", "key"), ("edited record", "record"),
                                       ("swapped key", "binding")])
def test_each_broken_link_of_attested_serving_is_named(run, session, tmp_path, case, link):
    import shutil

    engine, result, response, records = session
    kw = {}
    if case == "wrong nonce":
        kw["nonce"] = OTHER_NONCE
    elif case == "stale evidence":
        old = serving_evidence(CcaTestProvider(run[3], RIM), OTHER_NONCE, algorithm=response.algorithm,
                               model_digest=response.model_digest, receipt_key=response.receipt_key)
        response = replace(response, evidence=old.evidence)
    elif case == "other model":
        kw["expected_model_digest"] = b"\x66" * 32
    elif case == "other key":  # a receipt signed outside the TEE, by a key the evidence does not bind
        from aftune.inference.receipt import issue_receipt

        r = result.receipt
        kw["receipt"] = issue_receipt(SigningKey.generate(), r.algorithm, r.model_digest, r.record_root, r.time)
    elif case == "pinned key":
        kw["pinned_receipt_key"] = SigningKey.generate().public_key
    elif case == "edited record":
        copy = tmp_path / "records"
        shutil.copytree(records, copy)
        path = copy / "records" / f"{result.record_id}.json"
        path.write_bytes(path.read_bytes().replace(b'"format"', b'"format" '))
        kw["record_dir"] = copy
    elif case == "swapped key":  # the host claims another receipt key for the same evidence
        response = replace(response, receipt_key=SigningKey.generate().public_key)
    report = _serve_check(response, run, session, **kw)
    assert not report.ok and _broken(report)[0] == link, [c.line() for c in report.links]


def test_cli_check_serving(run, session, tmp_path):
    from conftest import invoke

    engine, result, response, records = session
    (tmp_path / "attestation.json").write_text(json.dumps(response.to_json()))
    base = ["attestation", "check-serving", tmp_path / "attestation.json", "--attestation-nonce", NONCE.hex(),
            "--receipt", result.receipt_path, "--record-dir", records, "--measurement", f"rim={RIM.hex()}"]
    key = tmp_path / "cpak.pem"
    key.write_bytes(run[3].platform_key_pem())
    r = invoke(*base, "--model-digest", run[2].final_model_digest.hex(), "--platform-key", key)
    assert r.exit_code == 0, r.output
    r = invoke(*base, "--model-digest", "66" * 32, "--platform-key", key)
    assert r.exit_code == 1 and "link 'model' is broken" in r.output


def test_attestation_endpoint_as_the_server_would_wire_it(run, session):
    """GET /v1/attestation?nonce=HEX on a FastAPI app wired as aftune serve should (the lead wires
    the real one in inference/serve.py); the client checks the answer; a bad nonce is a 400."""
    fastapi = pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    from aftune.attestation.serving import attestation_response
    from aftune.errors import AftuneError

    engine, result, _, records = session
    provider = CcaTestProvider(run[3], RIM)
    app = fastapi.FastAPI()

    @app.exception_handler(AftuneError)
    async def bad(request, exc):
        return JSONResponse(status_code=400, content={"error": str(exc)})

    @app.get("/v1/attestation")
    def attestation(nonce: str):
        return attestation_response(provider, nonce, algorithm=engine.served.algorithm,
                                    model_digest=engine.served.digest, receipt_key=engine.key.public_key)

    client = TestClient(app)
    answer = client.get("/v1/attestation", params={"nonce": OTHER_NONCE.hex()})
    assert answer.status_code == 200
    report = _serve_check(ServingEvidence.from_json(answer.json()), run, session, nonce=OTHER_NONCE)
    assert report.ok, report.summary()
    bad_nonce = client.get("/v1/attestation", params={"nonce": "xyz"})
    assert bad_nonce.status_code == 400 and "lowercase hex" in bad_nonce.json()["error"]
