"""Arm CCA attestation tokens from Arm's TF-M tools test data (tests/vectors/arm-cca, a copy of ../shared/tee-vectors/arm-cca),
verified with the test keys that signed them, and refused with any other key or one byte changed.
Skipped where cbor2 is absent.

    python3 -m pytest -q tests/test_attestation_cca.py
"""

from __future__ import annotations

import base64
import json

import pytest

from aftune.attestation.appraisal import verify_evidence
from aftune.attestation.claims import Endorsements, Evidence, AppraisalPolicy
from test_attestation_pki import need_vectors

pytest.importorskip("cbor2")

TOKENS = ("cca_example_token.cbor", "cca_token.cbor", "cca_example_token_legacy.cbor")


def _verify(name: str, key: str = "cca_platform.pem", data: bytes | None = None, **policy):
    d = need_vectors("arm-cca")
    token = data if data is not None else (d / name).read_bytes()
    return verify_evidence(Evidence("cca", token), policy=AppraisalPolicy(**policy),
                           endorsements=Endorsements(cca_platform_keys=((d / key).read_bytes(),)))


@pytest.mark.parametrize("name", TOKENS)
def test_token_verifies_with_its_platform_test_key(name):
    a = _verify(name)
    assert a.ok, a.summary()
    assert len(a.claims.user_data) == 64
    assert [k for k, _ in a.claims.measurements[:6]] == ["rim", "rem0", "rem1", "rem2", "rem3", "rpv"]


@pytest.mark.parametrize("name", TOKENS)
def test_token_fails_with_another_platform_key(name):
    a = _verify(name, key="cca_realm.pem")
    assert a.claims is None
    assert a.checks[0].name == "platform-signature" and "not signed by any trusted platform key" in a.checks[0].detail


def test_example_token_claims_match_arms_decoded_yaml():
    a = _verify("cca_example_token.cbor")
    text = (need_vectors("arm-cca") / "cca_example_token.yaml").read_text()

    def b64(after: str) -> bytes:  # the base64 block that follows a yaml key
        block = text.split(after, 1)[1].split("|", 1)[1].strip().split("\n")[0]
        return base64.b64decode(block.strip())

    assert a.claims.user_data == b64("cca_realm_challenge:")
    assert a.claims.measurement("rim") == b64("cca_realm_initial_measurement:")
    assert a.claims.measurement("rpv") == b64("cca_realm_personalization_value:")
    assert dict(a.claims.details)["realm_profile"] == "tag:arm.com,2024:realm#2.0.0"


@pytest.mark.parametrize("part", ["signature", "challenge"])
def test_one_flipped_byte_of_the_platform_token_is_rejected(part):
    d = need_vectors("arm-cca")
    token = bytearray((d / "cca_token.cbor").read_bytes())
    if part == "signature":  # the platform token comes first; its last byte ends its signature
        i = token.find(bytes.fromhex("19acd1")) - 1  # map key 44241 starts the realm token entry
    else:  # cca_token.cbor's platform challenge, the hash of the realm token's RAK
        i = token.find(bytes.fromhex("b5973cb68baa9fc5"))
    assert i > 0
    token[i] ^= 0x01
    a = _verify("cca_token.cbor", data=bytes(token))
    assert a.claims is None and a.checks[0].name == "platform-signature", a.checks


def test_one_flipped_byte_of_the_realm_challenge_breaks_the_realm_signature():
    d = need_vectors("arm-cca")
    token = bytearray((d / "cca_token.cbor").read_bytes())
    i = token.find(b"\xab" * 64)  # cca_token.cbor's realm challenge is 0xab * 64
    token[i + 5] ^= 0x01
    a = _verify("cca_token.cbor", data=bytes(token))
    assert a.claims is None and a.checks[0].name == "realm-signature"


def test_realm_challenge_binding_is_appraised():
    a = _verify("cca_token.cbor")
    good = verify_evidence(Evidence("cca", (need_vectors("arm-cca") / "cca_token.cbor").read_bytes()),
                           endorsements=Endorsements(cca_platform_keys=((need_vectors("arm-cca") / "cca_platform.pem")
                                                                        .read_bytes(),)),
                           expected_user_data=b"\xab" * 64)
    wrong = verify_evidence(Evidence("cca", (need_vectors("arm-cca") / "cca_token.cbor").read_bytes()),
                            endorsements=Endorsements(cca_platform_keys=((need_vectors("arm-cca") / "cca_platform.pem")
                                                                         .read_bytes(),)),
                            expected_user_data=b"\xac" * 64)
    assert a.ok and good.ok
    assert not wrong.ok and [c.name for c in wrong.checks if c.status == "FAIL"] == ["binding"]
    assert "realm challenge does not carry this binding" in next(c.detail for c in wrong.checks if c.name == "binding")


def test_garbage_is_a_format_failure_not_a_crash():
    a = _verify("cca_token.cbor", data=b"\xd9\x03\x8b\xa1\x01\x02")
    assert a.claims is None and a.checks[0].name == "format"
    a = _verify("cca_token.cbor", data=b"\xff\xff")
    assert a.claims is None and a.checks[0].name == "format"


def test_cli_verifies_and_names_the_failed_check():
    from conftest import invoke

    d = need_vectors("arm-cca")
    r = invoke("attestation", "verify", d / "cca_example_token.cbor", "--kind", "cca", "--platform-key",
               d / "cca_platform.pem", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["valid"] is True
    r = invoke("attestation", "verify", d / "cca_example_token.cbor", "--kind", "cca", "--platform-key",
               d / "cca_realm.pem")
    assert r.exit_code == 1 and "platform-signature" in r.output
    r = invoke("attestation", "verify", d / "cca_example_token.cbor", "--kind", "cca")
    assert r.exit_code == 2 and "--platform-key" in r.output
