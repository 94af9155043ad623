"""Gramine packaging: the manifest template parses as TOML and pins what it must; the SIGSTRUCT
reader verifies a signed enclave's signature and reports MRENCLAVE and MRSIGNER (SIGSTRUCTs made
here with a throwaway RSA-3072 key, exponent 3, as gramine-sgx-sign makes them).

    python3 -m pytest -q tests/test_attestation_gramine.py
"""

from __future__ import annotations

import hashlib
import json
import struct
import tomllib
from pathlib import Path

import pytest

from aftune.attestation.claims import AttestationFailure
from aftune.attestation.gramine import ManifestSettings, manifest_template, read_sigstruct
from aftune.errors import InputError

MRENCLAVE = bytes.fromhex("c0ffee" * 10 + "c0ff")
HEADER1 = bytes.fromhex("06000000e10000000000010000000000")
HEADER2 = bytes.fromhex("01010000600000006000000001000000")


@pytest.fixture(scope="module")
def enclave_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=3, key_size=3072)  # throwaway test signing key


def make_sigstruct(key, mrenclave=MRENCLAVE, attributes=0x04, isv_prod_id=7, isv_svn=3) -> bytes:
    """A SIGSTRUCT laid out from the Intel SDM (independently of aftune's reader)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    header = HEADER1 + struct.pack("<II", 0x8086, 0x20250620) + HEADER2 + struct.pack("<I", 0) + bytes(84)
    body = (struct.pack("<II", 0, 0) + bytes(20) + struct.pack("<QQ", attributes, 0x03) + bytes(16) + mrenclave
            + bytes(32) + struct.pack("<HH", isv_prod_id, isv_svn))
    assert len(header) == 128 and len(body) == 128
    n = key.public_key().public_numbers().n
    s = int.from_bytes(key.sign(header + body, padding.PKCS1v15(), hashes.SHA256()), "big")
    q1 = s * s // n
    q2 = (s * s * s - q1 * s * n) // n
    data = (header + n.to_bytes(384, "little") + struct.pack("<I", 3) + s.to_bytes(384, "little") + body + bytes(12)
            + q1.to_bytes(384, "little") + q2.to_bytes(384, "little"))
    assert len(data) == 1808
    return data


def test_sigstruct_reports_mrenclave_and_mrsigner(enclave_key):
    s = read_sigstruct(make_sigstruct(enclave_key))
    n = enclave_key.public_key().public_numbers().n
    assert s.mrenclave == MRENCLAVE and s.mrsigner == hashlib.sha256(n.to_bytes(384, "little")).digest()
    assert (s.isv_prod_id, s.isv_svn, s.debug, s.date, s.vendor) == (7, 3, False, "2025-06-20", 0x8086)


@pytest.mark.parametrize("offset,check", [(960, "signature"), (1024, "signature"), (928, "signature"),
                                          (1500, "format"), (0, "format")])
def test_one_flipped_byte_of_a_sigstruct_is_rejected(enclave_key, offset, check):
    data = bytearray(make_sigstruct(enclave_key))
    data[offset] ^= 0x01
    with pytest.raises(AttestationFailure) as exc:
        read_sigstruct(bytes(data))
    assert exc.value.check == check


def test_truncated_sigstruct_and_debug_enclaves(enclave_key):
    with pytest.raises(AttestationFailure, match="1808 bytes"):
        read_sigstruct(make_sigstruct(enclave_key)[:-1])
    assert read_sigstruct(make_sigstruct(enclave_key, attributes=0x06)).debug


def test_cli_sigstruct(enclave_key, tmp_path):
    from conftest import invoke

    good = tmp_path / "aftune-verify.sig"
    good.write_bytes(make_sigstruct(enclave_key))
    r = invoke("attestation", "sigstruct", good, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["mrenclave"] == MRENCLAVE.hex()
    bad = tmp_path / "edited.sig"
    data = bytearray(good.read_bytes())
    data[970] ^= 0xFF
    bad.write_bytes(bytes(data))
    r = invoke("attestation", "sigstruct", bad)
    assert r.exit_code == 1 and "signature" in r.output


def test_manifest_template_is_toml_and_pins_the_verifier(tmp_path):
    import aftune

    text = manifest_template(ManifestSettings(enclave_size="8G", max_threads=16))
    doc = tomllib.loads(text)
    sgx = doc["sgx"]
    assert sgx["remote_attestation"] == "dcap" and sgx["debug"] is False and sgx["enclave_size"] == "8G"
    assert sgx["max_threads"] == 16 and sgx["allowed_files"] == ["file:job/"]
    argv = doc["loader"]["argv"]
    assert argv[2:5] == ["aftune", "attestation", "verify-run"] and "--provider" in argv and "gramine" in argv
    assert argv[argv.index("--agreement") + 1] == "/aftune/job/agreement.json"  # never a self-consistency verdict
    assert "insecure__use_cmdline_argv" not in doc["loader"]
    assert {"path": "/aftune/job", "uri": "file:job"} in doc["fs"]["mounts"]
    pinned = {e["uri"][len("file:"):]: e["sha256"] for e in sgx["trusted_files"] if isinstance(e, dict)}
    package = Path(aftune.__file__).resolve().parent
    if pinned:  # a source checkout: every file of the package pinned with its SHA-256
        for name in ("attestation/verdict.py", "training/verify.py", "cli/attestation.py"):
            path = package / name
            assert pinned[str(path)] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert all(not p.endswith(".pyc") for p in pinned)
    else:  # an installed package: inside a trusted Python directory that gramine-sgx-sign hashes
        dirs = [e[len("file:"):] for e in sgx["trusted_files"] if isinstance(e, str) and e.endswith("/")]
        assert any(str(package).startswith(d) for d in dirs)


def test_manifest_bad_settings_and_cli(tmp_path):
    from conftest import invoke

    with pytest.raises(InputError):
        manifest_template(ManifestSettings(enclave_size="lots"))
    out = tmp_path / "aftune-verify.manifest.template"
    r = invoke("attestation", "gramine-manifest", "--out", out, "--enclave-size", "4G")
    assert r.exit_code == 0 and tomllib.loads(out.read_text())["sgx"]["enclave_size"] == "4G"
