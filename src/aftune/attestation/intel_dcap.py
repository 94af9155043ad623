"""Intel DCAP quotes (SGX quote v3, TDX quote v4/v5): signature chain, QE report, attestation key,
collateral and TCB status, parsed into claims with dcap-qvl (Rust, MIT; extra `tee`).

    aftune attestation verify sgx_quote --kind sgx --collateral sgx_quote_collateral.json \\
        --at 2025-06-20T00:00:00Z --accept-tcb ConfigurationAndSWHardeningNeeded \\
        --accept-advisory INTEL-SA-00289 --accept-advisory INTEL-SA-00615

What dcap-qvl checks (and aftune relies on): the quote's ISV report is signed by the attestation
key; the attestation key is bound by the QE report's report_data; the QE report is signed by the
PCK certificate; the PCK chain, the TCB info and the QE identity chain to the root aftune pins
(not the library's default) and their CRLs are current at `now`; the TCB level and advisories
follow from the collateral. aftune first checks itself that every chain in the collateral and in
the quote ends in the pinned Intel SGX Root CA, so an unknown root gets a plain reason. Status and
advisories are then appraised by aftune's policy (`appraisal.py`), not dcap-qvl's.
"""

from __future__ import annotations

import json
import struct
from datetime import datetime
from typing import Any

from ..errors import InputError, MissingExtra
from .claims import AttestationFailure, Claims, Endorsements, Evidence, format_time
from .trust_anchors import describe_root, intel_root_der

TEE_TYPES = {0x00000000: "sgx", 0x00000081: "tdx"}
SGX_ATTRIBUTE_DEBUG = 0x02  # SECS.ATTRIBUTES.DEBUG (bit 1 of the flags, little-endian u64)
TD_ATTRIBUTE_DEBUG = 0x01  # TDX TD_ATTRIBUTES.TUD.DEBUG (bit 0 of byte 0)
_CHAINS = ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain")


def _dcap():
    try:
        import dcap_qvl
    except ImportError:
        raise MissingExtra("dcap-qvl", "tee") from None
    return dcap_qvl


def quote_kind(quote: bytes) -> str:
    """`sgx` or `tdx`, from the quote header (u16 version, u16 key type, u32 TEE type, LE)."""
    if len(quote) < 48:
        raise AttestationFailure("format", f"a DCAP quote has a 48-byte header, got {len(quote)} bytes")
    version, _, tee_type = struct.unpack_from("<HHI", quote, 0)
    if version not in (3, 4, 5) or tee_type not in TEE_TYPES:
        raise AttestationFailure("format", f"not a DCAP quote (version {version}, TEE type {tee_type:#x})")
    return TEE_TYPES[tee_type]


def _root_of(chain_pem: str | bytes, what: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        certs = x509.load_pem_x509_certificates(chain_pem.encode("ascii") if isinstance(chain_pem, str) else chain_pem)
    except ValueError as exc:
        raise AttestationFailure("format", f"{what} is not a PEM certificate chain: {exc}") from None
    return certs[-1].public_bytes(Encoding.DER)


def _check_roots(collateral: dict[str, Any], quote_chain: bytes | None, root_der: bytes) -> None:
    """Every chain in the collateral and in the quote must end in the pinned root."""
    chains = [(name, collateral.get(name)) for name in _CHAINS] + [("the quote's PCK chain", quote_chain)]
    for name, chain in chains:
        if chain is None:
            if name.startswith("the quote"):
                continue  # certification data types 1-4 carry no chain: dcap-qvl then uses the collateral's
            raise AttestationFailure("format", f"collateral has no {name}")
        if not isinstance(chain, (str, bytes)):
            raise AttestationFailure("format", f"collateral: {name} must be PEM text")
        found = _root_of(chain, name)
        if found != root_der:
            raise AttestationFailure("root", f"{name} ends in {describe_root(found)}, not in the pinned root "
                                             f"{describe_root(root_der)}")


def _classify(message: str) -> str:
    """dcap-qvl reports every failure as one ValueError; name the check it belongs to."""
    m = message.lower()
    if "expired" in m or "future" in m or "not yet valid" in m:
        return "time"
    if "signature" in m:
        return "signature"
    if "revoked" in m or "crl" in m or "cert" in m or "root" in m or "chain" in m:
        return "chain"
    if "parse" in m or "decode" in m or "invalid quote" in m or "unsupported" in m:
        return "format"
    return "quote"


def _hex(report: dict[str, Any], key: str) -> bytes:
    value = report.get(key)
    if not isinstance(value, str):
        raise AttestationFailure("format", f"dcap-qvl gave no {key}")
    return bytes.fromhex(value)


def _sgx_claims(report: dict[str, Any]) -> tuple[tuple[tuple[str, bytes], ...], bool, str, tuple]:
    attributes = _hex(report, "attributes")
    debug = bool(attributes[0] & SGX_ATTRIBUTE_DEBUG)
    measurements = (("mrenclave", _hex(report, "mr_enclave")), ("mrsigner", _hex(report, "mr_signer")))
    details = (("isv_prod_id", str(report.get("isv_prod_id"))), ("isv_svn", str(report.get("isv_svn"))),
               ("attributes", attributes.hex()), ("cpu_svn", str(report.get("cpu_svn"))))
    return measurements, debug, "SGX ATTRIBUTES.DEBUG is set: a debug enclave's memory is readable by the host", details


def _tdx_claims(report: dict[str, Any]) -> tuple[tuple[tuple[str, bytes], ...], bool, str, tuple]:
    td_attributes = _hex(report, "td_attributes")
    debug = bool(td_attributes[0] & TD_ATTRIBUTE_DEBUG)
    names = (("mrtd", "mr_td"), ("rtmr0", "rt_mr0"), ("rtmr1", "rt_mr1"), ("rtmr2", "rt_mr2"), ("rtmr3", "rt_mr3"),
             ("mrconfigid", "mr_config_id"), ("mrowner", "mr_owner"), ("mrownerconfig", "mr_owner_config"),
             ("mrseam", "mr_seam"))
    measurements = tuple((ours, _hex(report, theirs)) for ours, theirs in names)
    details = (("td_attributes", td_attributes.hex()), ("xfam", str(report.get("xfam"))),
               ("tee_tcb_svn", str(report.get("tee_tcb_svn"))))
    return measurements, debug, "TDX TD_ATTRIBUTES.DEBUG is set: a debug TD's state is readable by the host", details


def parse_dcap(evidence: Evidence, endorsements: Endorsements, now: datetime) -> Claims:
    """Verify a DCAP quote against its collateral at `now` and return its claims; raises
    AttestationFailure naming the failed check (format, root, chain, signature, time, quote)."""
    quote = evidence.data
    found = quote_kind(quote)
    if found != evidence.kind:
        raise AttestationFailure("format", f"the quote is an Intel {found.upper()} quote, not {evidence.kind.upper()}")
    text = endorsements.intel_collateral or evidence.collateral
    if text is None:
        raise InputError(f"an {evidence.kind.upper()} quote is verified with its collateral: pass --collateral FILE "
                         "(dcap-qvl's collateral JSON, from a PCCS or Intel PCS)")
    try:
        collateral = json.loads(text)
    except ValueError as exc:
        raise InputError(f"collateral is not JSON: {exc}") from None
    if not isinstance(collateral, dict):
        raise InputError("collateral must be a JSON object (dcap-qvl's QuoteCollateralV3)")
    dcap = _dcap()
    root_der = endorsements.unsafe_intel_root_der or intel_root_der()
    try:
        parsed = dcap.parse_quote(quote)
        quote_chain = parsed.cert_chain_pem_bytes()
    except ValueError as exc:
        raise AttestationFailure("format", f"dcap-qvl cannot parse the quote: {exc}") from None
    _check_roots(collateral, quote_chain, root_der)
    seconds = int(now.timestamp())
    try:
        col = dcap.QuoteCollateralV3.from_json(json.dumps(collateral))
        verified = dcap.QuoteVerifier(root_der).verify_with_policy(quote, col, seconds,
                                                                   dcap.QuotePolicy.claims_only(seconds))
    except ValueError as exc:
        check = _classify(str(exc))
        where = f"the collateral is not valid at {format_time(now)}: " if check == "time" else ""
        raise AttestationFailure(check, f"{where}{exc} (dcap-qvl)") from None
    doc = json.loads(verified.to_json())
    reports = doc.get("report") or {}
    if evidence.kind == "sgx" and "SgxEnclave" in reports:
        report = reports["SgxEnclave"]
        measurements, debug, why, details = _sgx_claims(report)
    elif evidence.kind == "tdx" and any(k.startswith("TD") for k in reports):
        report = reports[next(k for k in reports if k.startswith("TD"))]
        measurements, debug, why, details = _tdx_claims(report)
    else:
        raise AttestationFailure("format", f"dcap-qvl returned a {sorted(reports)} report for an {evidence.kind} quote")
    tcb = doc.get("tcb") or {}
    pck = (doc.get("platform") or {}).get("pck") or {}
    fmspc = bytes(pck.get("fmspc") or []).hex()
    details = details + (("quote_version", str(doc.get("header", {}).get("version"))), ("fmspc", fmspc),
                         ("qe_status", str((doc.get("qe") or {}).get("tcb_level", {}).get("tcbStatus"))),
                         ("tcb_date", str((doc.get("platform") or {}).get("tcb_level", {}).get("tcbDate"))))
    return Claims(kind=evidence.kind, user_data=_hex(report, "report_data"), measurements=measurements,
                  anchor=f"quote chains to the pinned {describe_root(root_der)}, collateral valid at {format_time(now)}"
                  if endorsements.unsafe_intel_root_der is None else
                  f"quote chains to the UNSAFE replacement root {describe_root(root_der)}",
                  tcb_status=str(tcb.get("status")), advisories=tuple(str(a) for a in tcb.get("advisory_ids") or ()),
                  debug=debug, debug_reason=why if debug else "", details=details)
