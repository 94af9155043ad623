"""Attestation: TEE evidence verified for real (Intel SGX/TDX DCAP quotes, Arm CCA tokens, NVIDIA
Hopper SPDM reports), and aftune's documents bound to it: attested verdicts and attested serving.

    aftune attestation --help
    python3 -m pytest -q tests/test_attestation_*.py

Modules, one idea each: `claims` (types, policy, reports), `appraisal` (parse, then appraise),
`intel_dcap`, `arm_cca`, `nvidia_spdm` (+ `certchain`, `trust_anchors`) per platform, `binding`
(the user-data digest, SPEC.md 10.2), `providers` (Gramine, configfs-tsm, and the simulated one),
`verdict` (aftune.attested-verdict.v1), `serving` (aftune.attested-serving.v1), `gramine`
(manifest template, SIGSTRUCT). dcap-qvl and cbor2 are the extra `tee`, imported only when a
quote or a token is verified. docs/tee.md says what is verified for real and what only on TEE
hardware.
"""

from .appraisal import verify_evidence
from .claims import (AttestationFailure, Appraisal, ChainReport, Check, Claims, Endorsements, Evidence, AppraisalPolicy,
                     parse_nonce)
from .providers import (ConfigfsTsmProvider, EvidenceProvider, GramineProvider, UnsafeSimulatedEvidenceProvider,
                        detect_provider, provider_by_name)
from .serving import ServingEvidence, check_serving, serving_evidence
from .verdict import AttestedVerdict, attest_report, attest_run, check_attested_verdict

__all__ = ["AttestationFailure", "Appraisal", "AttestedVerdict", "ChainReport", "Check", "Claims",
           "ConfigfsTsmProvider", "Endorsements", "Evidence", "EvidenceProvider", "GramineProvider", "AppraisalPolicy",
           "ServingEvidence", "UnsafeSimulatedEvidenceProvider", "attest_report", "attest_run", "check_attested_verdict",
           "check_serving", "detect_provider", "parse_nonce", "provider_by_name", "serving_evidence", "verify_evidence"]
