"""NVIDIA Hopper GPU attestation: the real sample report of NVIDIA's nvtrust (tests/vectors/nvidia,
Apache-2.0), verified against the pinned NVIDIA Device Identity CA; and reports made with a test
PKI here (expired certificates, unknown roots, other nonces), which the real sample cannot cover.

    python3 -m pytest -q tests/test_attestation_nvidia.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path


from aftune.attestation.appraisal import verify_evidence
from aftune.attestation.claims import Endorsements, Evidence, AppraisalPolicy

VECTORS = Path(__file__).parent / "vectors" / "nvidia"
SAMPLE_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
NOW = dt.datetime(2025, 6, 20, tzinfo=dt.timezone.utc)


def _sample() -> tuple[bytes, bytes]:
    return (bytes.fromhex((VECTORS / "hopperAttestationReport.txt").read_text().strip()),
            (VECTORS / "hopperCertChain.txt").read_bytes())


def _verify(report: bytes, chain: bytes, now=NOW, **kw):
    policy = kw.pop("policy", AppraisalPolicy())
    expected = kw.pop("expected_user_data", None)
    return verify_evidence(Evidence("nvidia", report, cert_chain=chain), endorsements=Endorsements(**kw),
                           policy=policy, now=now, expected_user_data=expected)


def _failed(a):
    return [(c.name, c.detail) for c in a.checks if c.status == "FAIL"]


class GpuTestPki:
    """A throwaway root CA and GPU attestation key, signing SPDM exchanges like a Hopper GPU."""

    def __init__(self, leaf_not_after=dt.datetime(2040, 1, 1)):
        from cryptography.hazmat.primitives.asymmetric import ec

        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.leaf_key = ec.generate_private_key(ec.SECP384R1())
        self.root = self._cert("Test GPU Root CA", self.root_key.public_key(), self.root_key, "Test GPU Root CA", True,
                               dt.datetime(2040, 1, 1))
        self.leaf = self._cert("Test GPU Attestation Key", self.leaf_key.public_key(), self.root_key,
                               "Test GPU Root CA", False, leaf_not_after)

    @staticmethod
    def _cert(subject, public_key, signer, issuer, ca, not_after):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        name = lambda cn: x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])  # noqa: E731
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer)).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(dt.datetime(2020, 1, 1))
                .not_valid_after(not_after).add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(signer, hashes.SHA384()))

    def root_der(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding

        return self.root.public_bytes(Encoding.DER)

    def chain(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding

        return self.leaf.public_bytes(Encoding.PEM) + self.root.public_bytes(Encoding.PEM)

    def report(self, nonce: bytes, blocks=((1, b"\x10" * 48), (2, b"\x20" * 48)), param1: int = 0x01) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        le = lambda n, k: n.to_bytes(k, "little")  # noqa: E731
        request = bytes([0x11, 0xE0, param1, 0xFF]) + nonce + b"\x00"
        record = b"".join(bytes([i, 1]) + le(3 + len(v), 2) + b"\x01" + le(len(v), 2) + v for i, v in blocks)
        opaque = le(3, 2) + le(10, 2) + b"550.90.07\x00"
        response = bytes([0x11, 0x60, 0, 0, len(blocks)]) + le(len(record), 3) + record + os.urandom(32)
        response += le(len(opaque), 2) + opaque
        r, s = decode_dss_signature(self.leaf_key.sign(request + response, ec.ECDSA(hashes.SHA384())))
        return request + response + r.to_bytes(48, "big") + s.to_bytes(48, "big")


def test_real_hopper_report_verifies_against_the_pinned_nvidia_root():
    report, chain = _sample()
    a = _verify(report, chain, expected_user_data=SAMPLE_NONCE)
    assert a.ok, a.summary()
    assert a.claims.user_data == SAMPLE_NONCE and len(a.claims.measurements) == 64
    assert dict(a.claims.details)["driver_version"] == "550.90.07"
    assert "NVIDIA Device Identity CA" in a.claims.anchor
    assert a.claims.measurement("gpu.2").hex().startswith("8048dfd18fe229bf")


def test_real_report_with_one_flipped_measurement_byte_fails_its_signature():
    report, chain = _sample()
    tampered = bytearray(report)
    tampered[report.find(bytes.fromhex("8048dfd18fe229bf"))] ^= 0x01
    assert _failed(_verify(bytes(tampered), chain))[0][0] == "signature"


def test_real_report_for_another_nonce_fails_the_binding():
    report, chain = _sample()
    failed = _failed(_verify(report, chain, expected_user_data=b"\x00" * 32))
    assert [f[0] for f in failed] == ["binding"] and "SPDM requester nonce does not carry" in failed[0][1]


def test_real_chain_without_its_root_still_ends_in_the_pinned_root():
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    report, chain = _sample()
    certs = x509.load_pem_x509_certificates(chain)[:-1]
    assert _verify(report, b"".join(c.public_bytes(Encoding.PEM) for c in certs)).ok


def test_real_report_under_an_unknown_root_is_rejected():
    report, chain = _sample()
    failed = _failed(_verify(report, chain, unsafe_nvidia_root_der=GpuTestPki().root_der()))
    assert failed[0][0] == "root" and "Test GPU Root CA" in failed[0][1]


def test_test_pki_report_verifies_only_under_the_unsafe_root_it_chains_to():
    pki = GpuTestPki()
    nonce = os.urandom(32)
    report = pki.report(nonce)
    good = _verify(report, pki.chain(), unsafe_nvidia_root_der=pki.root_der(), expected_user_data=nonce,
                   policy=AppraisalPolicy(reference_values=(("gpu.1", b"\x10" * 48),)))
    assert good.ok and "UNSAFE replacement root" in good.claims.anchor
    assert _failed(_verify(report, pki.chain()))[0][0] == "root"  # the pinned NVIDIA root refuses it
    bad_ref = _verify(report, pki.chain(), unsafe_nvidia_root_der=pki.root_der(),
                      policy=AppraisalPolicy(reference_values=(("gpu.1", b"\x11" * 48),)))
    assert [f[0] for f in _failed(bad_ref)] == ["measurement gpu.1"]


def test_expired_gpu_certificate_is_rejected_at_the_verification_time():
    pki = GpuTestPki(leaf_not_after=dt.datetime(2024, 1, 1))
    report = pki.report(b"\x01" * 32)
    failed = _failed(_verify(report, pki.chain(), unsafe_nvidia_root_der=pki.root_der()))
    assert failed[0][0] == "time" and "Test GPU Attestation Key" in failed[0][1] and "2025-06-20" in failed[0][1]
    assert _verify(report, pki.chain(), now=dt.datetime(2023, 6, 1, tzinfo=dt.timezone.utc),
                   unsafe_nvidia_root_der=pki.root_der()).ok


def test_chain_signed_by_another_ca_is_rejected():
    pki, other = GpuTestPki(), GpuTestPki()
    from cryptography.hazmat.primitives.serialization import Encoding

    mixed = pki.leaf.public_bytes(Encoding.PEM) + other.root.public_bytes(Encoding.PEM)
    failed = _failed(_verify(pki.report(b"\x01" * 32), mixed, unsafe_nvidia_root_der=other.root_der()))
    assert failed[0][0] == "chain" and "is not signed by" in failed[0][1]


def test_unsigned_or_truncated_exchanges_are_format_failures():
    pki = GpuTestPki()
    kw = dict(unsafe_nvidia_root_der=pki.root_der())
    assert _failed(_verify(pki.report(b"\x01" * 32, param1=0x00), pki.chain(), **kw))[0][0] == "format"
    assert _failed(_verify(pki.report(b"\x01" * 32)[:-10], pki.chain(), **kw))[0][0] == "format"
    assert _failed(_verify(pki.report(b"\x01" * 32) + b"\x00", pki.chain(), **kw))[0][0] == "format"


def test_cli_reads_the_hex_sample():
    from conftest import invoke

    r = invoke("attestation", "verify", VECTORS / "hopperAttestationReport.txt", "--kind", "nvidia", "--encoding", "hex",
               "--cert-chain", VECTORS / "hopperCertChain.txt", "--user-data", SAMPLE_NONCE.hex(), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["claims"]["details"]["revocation"] == "not checked (no OCSP)"
    r = invoke("attestation", "verify", VECTORS / "hopperAttestationReport.txt", "--kind", "nvidia", "--encoding", "hex",
               "--cert-chain", VECTORS / "hopperCertChain.txt", "--user-data", "00" * 32)
    assert r.exit_code == 1 and "binding" in r.output
