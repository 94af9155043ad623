"""Evidence providers against fake directory trees: Gramine's /dev/attestation and the kernel's
configfs-tsm (these machines have no TEE), and the simulated provider, which says what it is.

    python3 -m pytest -q tests/test_attestation_providers.py
"""

from __future__ import annotations

import json
import struct

import pytest

from aftune.attestation import providers
from aftune.attestation.appraisal import verify_evidence
from aftune.attestation.claims import Endorsements, Evidence, AppraisalPolicy
from aftune.attestation.providers import (ConfigfsTsmProvider, GramineProvider, UnsafeSimulatedEvidenceProvider,
                                          detect_provider, provider_by_name)
from aftune.errors import InputError
from test_attestation_pki import CcaTestPlatform, tee_vectors

USER_DATA = bytes(range(64))


def _fake_quote(tee_type: int) -> bytes:
    """A DCAP quote header (version 3/4, ECDSA-256 key, TEE type) with a zero body: enough for the
    provider to tell SGX from TDX; never valid evidence."""
    return struct.pack("<HHI", 4 if tee_type else 3, 2, tee_type) + bytes(1000)


def _gramine_tree(tmp_path, quote: bytes, attestation_type: str = "dcap"):
    root = tmp_path / "attestation"
    root.mkdir()
    (root / "attestation_type").write_text(attestation_type + "\n")
    (root / "user_report_data").write_bytes(b"")
    (root / "quote").write_bytes(quote)
    return root


@pytest.mark.parametrize("tee_type,kind", [(0, "sgx"), (0x81, "tdx")])
def test_gramine_provider_writes_user_report_data_and_reads_the_quote(tmp_path, tee_type, kind):
    root = _gramine_tree(tmp_path, _fake_quote(tee_type))
    ev = GramineProvider(root).evidence(USER_DATA)
    assert (root / "user_report_data").read_bytes() == USER_DATA
    assert ev.kind == kind and ev.data == _fake_quote(tee_type)


def test_gramine_provider_refuses_a_non_dcap_enclave_and_bad_input(tmp_path):
    with pytest.raises(InputError, match="not 'dcap'"):
        GramineProvider(_gramine_tree(tmp_path, _fake_quote(0), attestation_type="none"))
    with pytest.raises(InputError, match="does not exist"):
        GramineProvider(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    provider = GramineProvider(_gramine_tree(tmp_path / "other", b"not a quote" * 10))
    with pytest.raises(InputError, match="did not return a DCAP quote"):
        provider.evidence(USER_DATA)
    with pytest.raises(InputError, match="64 bytes"):
        provider.evidence(USER_DATA[:32])


def test_gramine_fake_tree_with_a_real_quote_does_not_bind_what_was_written(tmp_path):
    """A real quote from a fake tree is authentic, but carries someone else's report_data: the
    binding check is what catches evidence that was not made for this request."""
    vectors = tee_vectors()
    if vectors is None or not (vectors / "intel-dcap").is_dir():
        pytest.skip("shared TEE vectors are not here")
    pytest.importorskip("dcap_qvl")
    import datetime as dt

    d = vectors / "intel-dcap"
    ev = GramineProvider(_gramine_tree(tmp_path, (d / "sgx_quote").read_bytes())).evidence(USER_DATA)
    a = verify_evidence(ev, endorsements=Endorsements(intel_collateral=(d / "sgx_quote_collateral.json").read_text()),
                        policy=AppraisalPolicy(accepted_tcb_statuses=("ConfigurationAndSWHardeningNeeded",),
                                      accepted_advisories=("INTEL-SA-00289", "INTEL-SA-00615")),
                        now=dt.datetime(2025, 6, 20, tzinfo=dt.timezone.utc), expected_user_data=USER_DATA)
    assert [c.name for c in a.checks if c.status == "FAIL"] == ["binding"]


def _tsm_tree(tmp_path, provider: str, outblob: bytes, generation: str = "3"):
    root = tmp_path / "report"
    entry = root / "aftune"
    entry.mkdir(parents=True)
    for name, data in (("inblob", b""), ("outblob", outblob), ("provider", provider.encode() + b"\n"),
                       ("generation", generation.encode() + b"\n")):
        (entry / name).write_bytes(data)
    return root


def test_configfs_tsm_cca_guest_gives_a_token_that_verifies_and_binds(tmp_path):
    pytest.importorskip("cbor2")
    pytest.importorskip("pycose")
    platform = CcaTestPlatform()
    root = _tsm_tree(tmp_path, "arm_cca_guest", platform.token(USER_DATA))
    ev = ConfigfsTsmProvider(root, entry="aftune").evidence(USER_DATA)
    assert (root / "aftune" / "inblob").read_bytes() == USER_DATA
    assert ev.kind == "cca"
    a = verify_evidence(ev, endorsements=Endorsements(cca_platform_keys=(platform.platform_key_pem(),)),
                        expected_user_data=USER_DATA)
    assert a.ok, a.summary()
    other = verify_evidence(ev, endorsements=Endorsements(cca_platform_keys=(platform.platform_key_pem(),)),
                            expected_user_data=bytes(64))
    assert [c.name for c in other.checks if c.status == "FAIL"] == ["binding"]


def test_configfs_tsm_tdx_guest_and_unsupported_providers(tmp_path):
    ev = ConfigfsTsmProvider(_tsm_tree(tmp_path / "a", "tdx_guest", _fake_quote(0x81)), entry="aftune").evidence(USER_DATA)
    assert ev.kind == "tdx"
    with pytest.raises(InputError, match="sev_guest"):
        ConfigfsTsmProvider(_tsm_tree(tmp_path / "b", "sev_guest", b"x"), entry="aftune").evidence(USER_DATA)
    with pytest.raises(InputError, match="outblob is empty"):
        ConfigfsTsmProvider(_tsm_tree(tmp_path / "c", "tdx_guest", b""), entry="aftune").evidence(USER_DATA)
    with pytest.raises(InputError, match="no configfs-tsm"):
        ConfigfsTsmProvider(tmp_path / "none")


def test_configfs_tsm_refuses_an_outblob_raced_by_another_writer(tmp_path, monkeypatch):
    root = _tsm_tree(tmp_path, "tdx_guest", _fake_quote(0x81))
    reads = iter([b"3\n", b"4\n"])  # another process wrote inblob between our two reads of generation
    real = providers._read
    monkeypatch.setattr(providers, "_read", lambda p, what: next(reads) if p.name == "generation" else real(p, what))
    with pytest.raises(InputError, match="generation changed"):
        ConfigfsTsmProvider(root, entry="aftune").evidence(USER_DATA)


def test_simulated_provider_says_so_everywhere_and_is_refused_by_default():
    provider = UnsafeSimulatedEvidenceProvider()
    ev = provider.evidence(USER_DATA)
    doc = json.loads(ev.data)
    assert ev.kind == "simulated" and doc["simulated"] is True and doc["format"] == "aftune.simulated-evidence.v1"
    assert "SIMULATED" in doc["warning"] and "Unsafe" in type(provider).__name__
    refused = verify_evidence(ev, expected_user_data=USER_DATA)
    assert [c.name for c in refused.checks if c.status == "FAIL"] == ["simulated"]
    accepted = verify_evidence(ev, policy=AppraisalPolicy(unsafe_accept_simulated=True), expected_user_data=USER_DATA)
    assert accepted.ok and "UNSAFE" in next(c.detail for c in accepted.checks if c.name == "simulated")
    assert "NONE" in accepted.claims.anchor
    forged = Evidence("simulated", ev.data.replace(b'"simulated":true', b'"simulated":false'))
    assert verify_evidence(forged, policy=AppraisalPolicy(unsafe_accept_simulated=True)).checks[0].name == "format"


def test_no_tee_here_means_only_the_simulated_provider_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(providers, "GRAMINE_ROOT", tmp_path / "dev-attestation")
    monkeypatch.setattr(providers, "CONFIGFS_TSM_ROOT", tmp_path / "tsm")
    with pytest.raises(InputError, match="unsafe-simulated"):
        detect_provider()
    with pytest.raises(InputError, match="unsafe-simulated"):
        provider_by_name("auto")
    assert isinstance(provider_by_name("unsafe-simulated"), UnsafeSimulatedEvidenceProvider)
    with pytest.raises(InputError, match="unknown evidence provider"):
        provider_by_name("sgx")


@pytest.mark.parametrize("module,kind,data", [("dcap_qvl", "sgx", _fake_quote(0)), ("cbor2", "cca", b"\xd9\x03\x8b")])
def test_a_missing_extra_names_the_extra_to_install(monkeypatch, module, kind, data):
    import sys

    from aftune.errors import MissingExtra

    monkeypatch.setitem(sys.modules, module, None)  # as if `pip install 'aftune[tee]'` had not been run
    endorse = Endorsements(intel_collateral="{}", cca_platform_keys=(CcaTestPlatform().platform_key_pem(),))
    with pytest.raises(MissingExtra, match=r"aftune\[tee\]"):
        verify_evidence(Evidence(kind, data), endorsements=endorse)
