"""Intel DCAP quotes produced by real SGX and TDX platforms (tests/vectors/intel-dcap, a copy of ../shared/tee-vectors/intel-dcap),
verified for real with their collateral at a fixed time; each honest case paired with a tampered
one. Skipped where dcap-qvl is absent.

    python3 -m pytest -q tests/test_attestation_intel.py
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

from aftune.attestation.appraisal import verify_evidence
from aftune.attestation.binding import user_data, verdict_binding
from aftune.attestation.claims import Endorsements, Evidence, AppraisalPolicy
from aftune.core.signing import PublicKey
from test_attestation_pki import need_vectors

pytest.importorskip("dcap_qvl")

AT = dt.datetime(2025, 6, 20, tzinfo=dt.timezone.utc)
YEAR_LATER = dt.datetime(2026, 6, 20, tzinfo=dt.timezone.utc)
SGX_ACCEPTED = AppraisalPolicy(accepted_tcb_statuses=("UpToDate", "ConfigurationAndSWHardeningNeeded"),
                      accepted_advisories=("INTEL-SA-00289", "INTEL-SA-00615"))
SGX_MRENCLAVE = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
TDX_MRTD = bytes.fromhex("91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
                         "de03ae6dc5f87f27428b2538873118b7")


def _load(name: str) -> tuple[bytes, str]:
    d = need_vectors("intel-dcap")
    return (d / name).read_bytes(), (d / f"{name}_collateral.json").read_text()


def _verify(name: str, kind: str, *, data: bytes | None = None, now=AT, policy=AppraisalPolicy(), **endorse):
    quote, collateral = _load(name)
    return verify_evidence(Evidence(kind, data if data is not None else quote),
                           endorsements=Endorsements(intel_collateral=collateral, **endorse), policy=policy, now=now)


def _failed(appraisal):
    return [(c.name, c.detail) for c in appraisal.checks if c.status == "FAIL"]


def test_sgx_quote_verifies_with_its_known_tcb_result():
    a = _verify("sgx_quote", "sgx", policy=SGX_ACCEPTED)
    assert a.ok, a.summary()
    assert a.claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert a.claims.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert a.claims.measurement("mrenclave") == SGX_MRENCLAVE and not a.claims.debug
    assert a.claims.user_data.startswith(b"Hello, world!")


def test_sgx_quote_status_is_refused_by_the_default_policy_with_the_reason():
    failed = _failed(_verify("sgx_quote", "sgx"))
    assert failed[0] == ("tcb", "status ConfigurationAndSWHardeningNeeded is not accepted by policy (accepted: UpToDate)")
    assert failed[1][0] == "advisories" and "INTEL-SA-00289" in failed[1][1]


def test_tdx_quote_is_up_to_date():
    a = _verify("tdx_quote", "tdx", policy=AppraisalPolicy(reference_values=(("mrtd", TDX_MRTD),)))
    assert a.ok, a.summary()
    assert a.claims.tcb_status == "UpToDate" and a.claims.advisories == ()
    assert len(a.claims.user_data) == 64


@pytest.mark.parametrize("name,kind", [("sgx_quote", "sgx"), ("tdx_quote", "tdx")])
def test_a_year_later_the_collateral_has_expired(name, kind):
    a = _verify(name, kind, now=YEAR_LATER, policy=SGX_ACCEPTED)
    assert a.claims is None and _failed(a)[0][0] == "time"
    assert "not valid at 2026-06-20T00:00:00Z" in _failed(a)[0][1]


@pytest.mark.parametrize("name,kind,offset", [("sgx_quote", "sgx", 48 + 320), ("tdx_quote", "tdx", 48 + 520)])
def test_one_flipped_byte_of_report_data_breaks_the_signature(name, kind, offset):
    quote, _ = _load(name)
    assert _verify(name, kind, policy=SGX_ACCEPTED).ok
    tampered = bytearray(quote)
    tampered[offset] ^= 0x01
    a = _verify(name, kind, data=bytes(tampered), policy=SGX_ACCEPTED)
    assert a.claims is None and _failed(a)[0][0] == "signature", _failed(a)


def test_an_unknown_root_is_rejected_with_the_root_it_found():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Not Intel Root CA")])
    root = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(dt.datetime(2018, 1, 1)).not_valid_after(dt.datetime(2049, 1, 1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    a = _verify("sgx_quote", "sgx", policy=SGX_ACCEPTED, unsafe_intel_root_der=root.public_bytes(serialization.Encoding.DER))
    failed = _failed(a)
    assert failed[0][0] == "root" and "Intel SGX Root CA" in failed[0][1] and "Not Intel Root CA" in failed[0][1]


def test_tampered_tcb_info_in_the_collateral_is_rejected():
    quote, collateral = _load("sgx_quote")
    doc = json.loads(collateral)
    doc["tcb_info"] = doc["tcb_info"].replace("ConfigurationAndSWHardeningNeeded", "UpToDate")
    a = verify_evidence(Evidence("sgx", quote), endorsements=Endorsements(intel_collateral=json.dumps(doc)), now=AT)
    assert a.claims is None and _failed(a)[0][0] == "signature" and "tcb_info" in _failed(a)[0][1]


def test_a_quote_of_the_other_kind_is_a_format_error():
    quote, _ = _load("tdx_quote")
    a = _verify("sgx_quote", "sgx", data=quote)
    assert _failed(a) == [("format", "the quote is an Intel TDX quote, not SGX")]


def test_report_data_binding_and_reference_values_are_appraised():
    nonce = b"\x42" * 32
    expected = user_data("sgx", verdict_binding("sha256", nonce, PublicKey(b"\x01" * 32), b"\x02" * 32))
    quote, collateral = _load("sgx_quote")
    a = verify_evidence(Evidence("sgx", quote), endorsements=Endorsements(intel_collateral=collateral), now=AT,
                        policy=AppraisalPolicy(accepted_tcb_statuses=SGX_ACCEPTED.accepted_tcb_statuses,
                                      accepted_advisories=SGX_ACCEPTED.accepted_advisories,
                                      reference_values=(("mrenclave", b"\x00" * 32),)),
                        expected_user_data=expected)
    failed = dict(_failed(a))
    assert failed["binding"].startswith("report_data does not carry this binding")
    assert "other code runs in the TEE" in failed["measurement mrenclave"]
    # the honest pair: the quote's own report data and mrenclave
    b = verify_evidence(Evidence("sgx", quote), endorsements=Endorsements(intel_collateral=collateral), now=AT,
                        policy=AppraisalPolicy(accepted_tcb_statuses=SGX_ACCEPTED.accepted_tcb_statuses,
                                      accepted_advisories=SGX_ACCEPTED.accepted_advisories,
                                      reference_values=(("mrenclave", SGX_MRENCLAVE),)),
                        expected_user_data=a.claims.user_data)
    assert b.ok and [c.status for c in b.checks if c.name == "binding"] == ["PASS"]


def test_cli_prints_the_reason_and_exits_by_verdict(tmp_path):
    from conftest import invoke

    d = need_vectors("intel-dcap")
    base = ["attestation", "verify", d / "sgx_quote", "--kind", "sgx", "--collateral", d / "sgx_quote_collateral.json",
            "--at", "2025-06-20T00:00:00Z"]
    r = invoke(*base)
    assert r.exit_code == 1 and "tcb: status ConfigurationAndSWHardeningNeeded is not accepted" in r.output
    r = invoke(*base, "--accept-tcb", "ConfigurationAndSWHardeningNeeded", "--accept-advisory", "INTEL-SA-00289",
               "--accept-advisory", "INTEL-SA-00615", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["claims"]["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    r = invoke("attestation", "verify", d / "tdx_quote", "--kind", "tdx", "--collateral",
               d / "tdx_quote_collateral.json", "--at", "2026-06-20T00:00:00Z")
    assert r.exit_code == 1 and "time: the collateral is not valid at 2026-06-20T00:00:00Z" in r.output
    r = invoke("attestation", "verify", d / "tdx_quote", "--kind", "tdx", "--at", "2025-06-20T00:00:00Z")
    assert r.exit_code == 2 and "--collateral" in r.output
