"""SPEC.md section 10 test vectors, recomputed by an independent minimal implementation (hashlib,
blake3, struct, cryptography's Ed25519) written from the SPEC text, and compared three ways:
reference == aftune == the constant printed in SPEC.md. Then the reader rules of section 10 for
hostile documents.

    python3 -m pytest -q tests/test_attestation_spec.py
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

blake3 = pytest.importorskip("blake3")

SPEC = Path(__file__).resolve().parents[1] / "SPEC.md"
TAG_BINDING = b"aftune.v1.attestation-binding\x00"
TAG_VERDICT = b"aftune.v1.attested-verdict\x00"
TAG_SIGNATURE = b"aftune.v1.signature\x00"
TAG_FILE, TAG_LEAF, TAG_NODE = b"aftune.v1.file\x00", b"aftune.v1.leaf\x00", b"aftune.v1.node\x00"
NONCE, CODE, MODEL, RUN_ROOT, CONFIG, PROVIDER = (bytes([b]) * 32 for b in (0x42, 0x11, 0x22, 0x33, 0x44, 0x55))
SEED = bytes(range(32))
REPORT = '{"verdict":"PASS"}'

EXPECTED = {  # the constants printed in SPEC.md 10.7
    ("blake3", "verdict binding"): "9e449a1ea5b6b441d9e2f107f129a4e4847161686eb4de4acb314ed7e9f3544c",
    ("sha256", "verdict binding"): "4a023b59dc54995ddf4b394c2a22cf225d7567e49f2ac9ecb26800d6cffbf13f",
    ("blake3", "serving binding"): "378cc95580f1403805db90de8f19e62be756d56f8f7793632bda23f25eaeca35",
    ("sha256", "serving binding"): "388a7d0e1cb82a1c610a7a02bcfe31101e7479d8210018937c9ba4ab80ff5ebb",
    ("blake3", "verdict message"): "0d777833e84a6bebd3b521e1459d74ef648994ec62176b26b450bab1f3d57a42",
    ("sha256", "verdict message"): "e051512e6c36431830e6251a5950586b6d89523a050f61f405ade00ebd07c372",
    ("blake3", "verdict signature"): "8d06af8107ffe90dd9d00dc945f5b5fca0880096959f576ab9ff7b4c039f491f"
                                     "3bb7df4dcf115414b58f8d12b798ab182eb157d60b4f8d621c5bbb4bbdd6930b",
    ("sha256", "verdict signature"): "898dabdd71da4bb360f2af338c0b3a06177f6ea17a67b236b97b7f94d79dde74"
                                     "ed81a5ff84a2828b88bda415768a43b89d5b5e4f4e09dd61d8b32b4ba05abc00",
    ("blake3", "code digest"): "4434700894a498827c7cd1b2127545046d838ffcc1ec5f7acd3781489e08f2bf",
    ("sha256", "code digest"): "af949c61eb5398c7c0c59d49fecf87e66ace2cbce9c46f0253779165f03f658c",
}


# ---- reference implementation, from SPEC.md 2 and 10 only -----------------------------------

def H(alg: str, data: bytes) -> bytes:
    return blake3.blake3(data).digest() if alg == "blake3" else hashlib.sha256(data).digest()


def lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def ref_private_key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(SEED)


def ref_public_key() -> bytes:
    from cryptography.hazmat.primitives import serialization

    return ref_private_key().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ref_binding(alg: str, fmt: str, nonce: bytes, a: bytes, b: bytes) -> bytes:
    return H(alg, TAG_BINDING + lp(fmt.encode()) + lp(nonce) + a + b)


def ref_message(alg: str) -> bytes:
    return H(alg, TAG_VERDICT + lp(b"aftune.attested-verdict.v1") + lp(alg.encode()) + lp(NONCE) + ref_public_key()
             + CODE + lp(b"sgx") + RUN_ROOT + CONFIG + PROVIDER + lp(b"PASS") + lp(REPORT.encode()))


def ref_code_digest(alg: str, files: dict[str, bytes]) -> bytes:
    leaves = [H(alg, TAG_LEAF + lp(k.encode()) + H(alg, TAG_FILE + files[k])) for k in sorted(files)]
    assert len(leaves) == 2  # node(L0, L1) for two leaves (SPEC.md 2.4.2)
    return H(alg, TAG_NODE + leaves[0] + leaves[1])


# ---- the vectors -----------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["blake3", "sha256"])
def test_binding_vectors(alg):
    from aftune.attestation.binding import serving_binding, user_data, verdict_binding
    from aftune.core.signing import PublicKey

    pub = ref_public_key()
    assert pub.hex() == "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    vb = ref_binding(alg, "aftune.attested-verdict.v1", NONCE, pub, CODE)
    sb = ref_binding(alg, "aftune.attested-serving.v1", NONCE, MODEL, pub)
    assert verdict_binding(alg, NONCE, PublicKey(pub), CODE) == vb
    assert serving_binding(alg, NONCE, MODEL, PublicKey(pub)) == sb
    assert vb.hex() == EXPECTED[(alg, "verdict binding")] and sb.hex() == EXPECTED[(alg, "serving binding")]
    assert user_data("tdx", vb) == vb + bytes(32) and user_data("cca", vb) == vb + bytes(32)
    assert user_data("nvidia", vb) == vb


@pytest.mark.parametrize("alg", ["blake3", "sha256"])
def test_attested_verdict_message_and_signature_vectors(alg):
    from aftune.attestation.claims import Evidence
    from aftune.attestation.verdict import AttestedVerdict
    from aftune.core.signing import PublicKey, SigningKey

    message = ref_message(alg)
    signature = ref_private_key().sign(TAG_SIGNATURE + lp(b"attested-verdict") + message)
    doc = AttestedVerdict(alg, NONCE, PublicKey(ref_public_key()), CODE, RUN_ROOT, CONFIG, PublicKey(PROVIDER), "PASS",
                          REPORT, Evidence("sgx", bytes(48)))
    assert doc.message() == message and message.hex() == EXPECTED[(alg, "verdict message")]
    assert SigningKey(ref_private_key()).sign("attested-verdict", message) == signature
    assert signature.hex() == EXPECTED[(alg, "verdict signature")]


@pytest.mark.parametrize("alg", ["blake3", "sha256"])
def test_code_digest_vector(alg, tmp_path):
    from aftune.attestation.binding import verifier_code_digest

    files = {"a.py": b"x = 1\n", "sub/b.py": b""}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.txt").write_bytes(b"not python: not part of the code digest")
    expected = ref_code_digest(alg, files)
    assert verifier_code_digest(alg, tmp_path) == expected and expected.hex() == EXPECTED[(alg, "code digest")]


def test_every_vector_is_printed_in_spec_md():
    text = SPEC.read_text(encoding="utf-8")
    section = text[text.index("## 10. Attestation"):text.index("## Appendix A. Test vectors")]
    for (alg, name), value in EXPECTED.items():
        chunks = [value[i:i + 64] for i in range(0, len(value), 64)]
        assert all(c in section for c in chunks), f"{alg} {name} is not printed in SPEC.md section 10"
    for tag in (TAG_BINDING, TAG_VERDICT):
        assert tag[:-1].decode() in section


# ---- reader rules of SPEC.md 10 for hostile documents ----------------------------------------

def _doc():
    from aftune.attestation.providers import UnsafeSimulatedEvidenceProvider
    from aftune.attestation.verdict import attest_report
    from aftune.core.signing import PublicKey

    return attest_report({"verdict": "PASS", "blocks": []}, UnsafeSimulatedEvidenceProvider(), NONCE,
                         algorithm="sha256", run_root=RUN_ROOT, config_digest=CONFIG,
                         provider_key=PublicKey(PROVIDER), code_digest=CODE).to_json()


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(extra=1), "unknown fields"),
    (lambda d: d.pop("signature"), "missing fields"),
    (lambda d: d.update(format="aftune.attested-verdict.v2"), "format must be"),
    (lambda d: d.update(hash="md5"), "unknown hash"),
    (lambda d: d.update(nonce="ab" * 8 + "A"), "lowercase hex"),
    (lambda d: d.update(nonce="ab" * 8), None),  # 8 bytes: too short
    (lambda d: d.update(verdict="MAYBE"), "PASS or FAIL"),
    (lambda d: d["run"].update(extra="x"), "run must hold"),
    (lambda d: d["evidence"].update(cert_chain="x"), "unknown fields"),
    (lambda d: d.update(code_digest="AA" * 32), "lowercase hex"),
    (lambda d: d.update(signature="00" * 63), "64 bytes"),
])
def test_hostile_attested_verdicts_are_bad_input(edit, message):
    from aftune.attestation.verdict import AttestedVerdict
    from aftune.errors import InputError

    doc = json.loads(json.dumps(_doc()))
    edit(doc)
    with pytest.raises(InputError, match=message or "16 to 64 bytes"):
        AttestedVerdict.from_json(doc)


def test_duplicate_keys_and_oversized_documents_are_refused(tmp_path):
    from aftune.attestation.verdict import AttestedVerdict
    from aftune.errors import InputError

    text = json.dumps(_doc())
    dup = tmp_path / "dup.json"
    dup.write_text(text[:-1] + ', "verdict": "FAIL"}')
    with pytest.raises(InputError, match="duplicate key"):
        AttestedVerdict.load(dup)
    ok = tmp_path / "ok.json"
    ok.write_text(text)
    assert AttestedVerdict.load(ok).verdict == "PASS"
