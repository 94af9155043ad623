"""Test PKI for attestation tests, and the Arm CCA cases real vectors do not cover.

    python3 -m pytest -q tests/test_attestation_pki.py

`CcaTestPlatform` stands in for CCA hardware: a throwaway platform key (CPAK) made per test, and a
realm attestation key (RAK); it builds tokens in the current profile (CBOR tag 907, realm profile
2.0) with pycose and cbor2, an implementation independent of aftune's verifier. Other attestation
tests import these helpers (`from test_attestation_pki import ...`). Nothing here is real
evidence: real tokens are tested in test_attestation_cca.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from aftune.attestation.claims import Endorsements, Evidence, AppraisalPolicy
from aftune.attestation.appraisal import verify_evidence


def tee_vectors() -> Path | None:
    """$AFTUNE_TEE_VECTORS, else the copy of the shared real evidence kept in tests/vectors
    (intel-dcap, arm-cca: tests/vectors/README-shared.md, each with its upstream licence), so that a
    clean checkout tests real evidence; None where neither is there."""
    env = os.environ.get("AFTUNE_TEE_VECTORS")
    path = Path(env) if env else Path(__file__).resolve().parent / "vectors"
    return path if path.is_dir() else None


def need_vectors(sub: str) -> Path:
    base = tee_vectors()
    if base is None or not (base / sub).is_dir():
        pytest.skip(f"shared TEE vectors ({sub}) are not here: set AFTUNE_TEE_VECTORS")
    return base / sub


class CcaTestPlatform:
    """Throwaway keys that sign CCA tokens the way a CCA platform and its RMM would."""

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric import ec

        self.cpak = ec.generate_private_key(ec.SECP384R1())
        self.rak = ec.generate_private_key(ec.SECP384R1())

    def platform_key_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.cpak.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)

    @staticmethod
    def _cose_key(private) -> "object":
        from pycose.keys import EC2Key
        from pycose.keys.curves import P384

        n = private.private_numbers()
        return EC2Key(crv=P384, x=n.public_numbers.x.to_bytes(48, "big"), y=n.public_numbers.y.to_bytes(48, "big"),
                      d=n.private_value.to_bytes(48, "big"))

    @staticmethod
    def _sign(private, payload: bytes) -> bytes:
        from pycose.algorithms import Es384
        from pycose.headers import Algorithm
        from pycose.messages import Sign1Message

        msg = Sign1Message(phdr={Algorithm: Es384}, payload=payload)
        msg.key = CcaTestPlatform._cose_key(private)
        return msg.encode(tag=True)

    def rak_claim(self, rak=None) -> bytes:
        import cbor2

        n = (rak or self.rak).public_key().public_numbers()
        return cbor2.dumps({1: 2, -1: 2, -2: n.x.to_bytes(48, "big"), -3: n.y.to_bytes(48, "big")})

    def token(self, challenge: bytes, *, rim: bytes = b"\x11" * 32, lifecycle: int = 0x3003, rak=None,
              platform_challenge: bytes | None = None, cpak=None) -> bytes:
        import cbor2

        rak_bytes = self.rak_claim(rak)
        realm = {265: "tag:arm.com,2024:realm#2.0.0", 10: challenge, 44235: b"\x00" * 64, 44236: "sha-256",
                 44237: rak_bytes, 44238: rim, 44239: [b"\x00" * 32] * 4, 44240: "sha-256", 44243: 1}
        platform = {265: "tag:arm.com,2023:cca_platform#1.0.0",
                    10: platform_challenge or hashlib.sha256(rak_bytes).digest(),
                    256: b"\x01" + b"\x07" * 32, 2396: b"\x7f" * 32, 2395: lifecycle, 2401: b"\xcf" * 4,
                    2402: "sha-256", 2399: [{1: "RMM", 2: b"\x22" * 32, 5: b"\x33" * 32, 6: "sha-256"}]}
        realm_token = self._sign(rak or self.rak, cbor2.dumps(realm))
        platform_token = self._sign(cpak or self.cpak, cbor2.dumps(platform))
        return cbor2.dumps(cbor2.CBORTag(907, {44234: [263, platform_token], 44241: [263, realm_token]}))


class CcaTestProvider:
    """An evidence provider backed by CcaTestPlatform: the 'hardware' of end-to-end tests."""

    name = "test-cca"
    kind = "cca"

    def __init__(self, platform: CcaTestPlatform, rim: bytes = b"\x11" * 32):
        self.platform, self.rim = platform, rim

    def evidence(self, user_data: bytes) -> Evidence:
        assert len(user_data) == 64
        return Evidence("cca", self.platform.token(user_data, rim=self.rim))


@pytest.fixture
def cca():
    pytest.importorskip("cbor2")
    pytest.importorskip("pycose")
    return CcaTestPlatform()


def _check(cca, token: bytes, *, keys=None, **policy):
    return verify_evidence(Evidence("cca", token),
                           endorsements=Endorsements(cca_platform_keys=keys or (cca.platform_key_pem(),)),
                           policy=AppraisalPolicy(**policy))


def test_generated_token_verifies_and_reports_its_claims(cca):
    challenge = bytes(range(64))
    a = _check(cca, cca.token(challenge), reference_values=(("rim", b"\x11" * 32),))
    assert a.ok, a.summary()
    assert a.claims.user_data == challenge and a.claims.measurement("rim") == b"\x11" * 32
    assert a.claims.measurement("sw.0.RMM") == b"\x22" * 32
    assert [c.status for c in a.checks if c.name == "measurement rim"] == ["PASS"]


def test_generated_token_signed_by_another_platform_key_is_rejected(cca):
    other = CcaTestPlatform()
    a = _check(cca, cca.token(b"\x00" * 64, cpak=other.cpak))
    assert not a.ok and a.checks[0].name == "platform-signature"
    assert "not signed by any trusted platform key" in a.checks[0].detail


def test_realm_token_from_another_realm_is_not_bound_by_the_platform(cca):
    # the platform token vouches for one RAK; a realm token signed by another RAK is refused
    a = _check(cca, cca.token(b"\x00" * 64, platform_challenge=hashlib.sha256(cca.rak_claim(CcaTestPlatform().rak)).digest()))
    assert not a.ok and a.checks[0].name == "platform-binding"


def test_tampered_realm_claims_break_the_realm_signature(cca):
    token = bytearray(cca.token(b"\x5a" * 64))
    i = token.find(b"\x5a" * 64)
    token[i] ^= 1
    a = _check(cca, bytes(token))
    assert not a.ok and a.checks[0].name == "realm-signature"


def test_unsecured_platform_lifecycle_is_a_debug_platform(cca):
    token = cca.token(b"\x00" * 64, lifecycle=0x4000)
    a = _check(cca, token)
    assert not a.ok and [c.name for c in a.checks if c.status == "FAIL"] == ["debug"]
    assert "not SECURED" in next(c.detail for c in a.checks if c.name == "debug")
    assert _check(cca, token, unsafe_allow_debug=True).ok


def test_wrong_reference_rim_fails_the_measurement(cca):
    a = _check(cca, cca.token(b"\x00" * 64), reference_values=(("rim", b"\x12" * 32),))
    failed = [c for c in a.checks if c.status == "FAIL"]
    assert [c.name for c in failed] == ["measurement rim"] and "other code runs" in failed[0].detail
