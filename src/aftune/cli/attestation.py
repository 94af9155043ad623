"""`aftune attestation ...`: verify TEE evidence, attested verdicts and attested serving; package the
verifier for Gramine.

    aftune attestation verify sgx_quote --kind sgx --collateral sgx_quote_collateral.json --at 2025-06-20T00:00:00Z
    aftune attestation verify-run RUN --public-key provider.pub --attestation-nonce $NONCE --attest auto --out verdict.json
    aftune attestation check-verdict verdict.json --attestation-nonce $NONCE --run-root $ROOT --measurement mrenclave=$MR
    aftune attestation check-serving attestation.json --attestation-nonce $NONCE --model-digest $D --receipt R.json \\
        --measurement rim=$RIM
    aftune attestation gramine-manifest --out aftune-verify.manifest.template
    aftune attestation sigstruct aftune-verify.sig

Exit codes: 0 valid, 1 invalid evidence or a broken link (and, for check-verdict, an attested
FAIL), 2 bad input. Every command takes --json. Options that weaken a check say `unsafe`.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from ..errors import InputError
from .app import _PUBKEY_HELP, AftuneTyper, app, err, load_agreement, out
from .options import deprecated_flags

attestation_app = AftuneTyper(no_args_is_help=True, help="TEE evidence: verify it, check attested verdicts and serving.")
app.add_typer(attestation_app, name="attestation")

_MEASUREMENT = typer.Option([], "--measurement", help="Reference value NAME=HEX (mrenclave, mrsigner, mrtd, rtmr0-3, "
                                                      "rim, rem0-3, gpu.N); repeat for several.")
_ACCEPT_TCB = typer.Option([], "--accept-tcb", help="Intel TCB status to accept besides UpToDate (repeatable).")
_ACCEPT_ADVISORY = typer.Option([], "--accept-advisory", help="Intel security advisory to accept (repeatable).")
_COLLATERAL = typer.Option(None, "--collateral", help="Intel collateral JSON (dcap-qvl's format, from a PCCS).")
_PLATFORM_KEY = typer.Option([], "--platform-key", help="Trusted Arm CCA platform key, PEM (repeatable).")
_AT = typer.Option(None, "--at", help="Verification time, RFC 3339 UTC.", show_default="now")
_UNSAFE_ROOT = typer.Option(None, "--unsafe-root-ca", help="UNSAFE: replace the pinned Intel/NVIDIA root (test PKIs).")
_UNSAFE_DEBUG = typer.Option(False, "--unsafe-allow-debug", help="UNSAFE: accept debug enclaves/TDs, non-SECURED CCA.")
_UNSAFE_SIM = typer.Option(False, "--unsafe-accept-simulated", help="UNSAFE: accept simulated evidence (no TEE).")
_JSON = typer.Option(False, "--json", help="Print a machine-readable report.")


def _read(path: Path, what: str, limit: int = 1 << 22) -> bytes:
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    from ..core.jsonio import read_capped

    data = read_capped(path, limit)
    if len(data) > limit:
        raise InputError(f"{what} {path} is larger than {limit} bytes")
    return data


def policy_from_options(measurement, accept_tcb, accept_advisory, unsafe_allow_debug, unsafe_accept_simulated):
    """The appraisal policy from the shared options (also for `verify-receipt --attestation`)."""
    from ..attestation.claims import AppraisalPolicy, parse_hex

    refs = []
    for item in measurement:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError(f"--measurement takes NAME=HEX, got {item[:60]!r}")
        refs.append((name, parse_hex(value.lower(), f"--measurement {name}")))
    return AppraisalPolicy(reference_values=tuple(refs), accepted_tcb_statuses=("UpToDate", *accept_tcb),
                  accepted_advisories=tuple(accept_advisory), unsafe_allow_debug=unsafe_allow_debug,
                  unsafe_accept_simulated=unsafe_accept_simulated)


def endorsements_from_options(collateral, platform_key, unsafe_root_ca):
    """Collateral, trusted CCA platform keys and an optional (unsafe) replacement root, from files."""
    from ..attestation.claims import Endorsements

    root = None
    if unsafe_root_ca is not None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        data = _read(unsafe_root_ca, "root certificate")
        try:
            cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise InputError(f"{unsafe_root_ca} is not a certificate: {exc}") from None
        root = cert.public_bytes(Encoding.DER)
        err.print("[yellow]warning:[/] --unsafe-root-ca replaces the pinned root: nothing vouches for this root",
                  highlight=False)
    return Endorsements(intel_collateral=_read(collateral, "collateral").decode("utf-8", "replace") if collateral else None,
                        cca_platform_keys=tuple(_read(p, "platform key") for p in platform_key),
                        unsafe_intel_root_der=root, unsafe_nvidia_root_der=root)


def _at(at):
    from ..attestation.claims import parse_time

    return parse_time(at) if at else None


def _print_checks(checks, title: str) -> None:
    out.print(escape(title), highlight=False)
    for c in checks:
        colour = {"PASS": "green", "FAIL": "red"}.get(c.status, "yellow")
        out.print(f"  [{colour}]{escape(c.line())}[/]", highlight=False, soft_wrap=True)


def _finish(ok: bool, line: str, doc: dict, as_json: bool, simulated: bool = False) -> None:
    if as_json:
        out.print_json(json.dumps(doc))
    else:
        if simulated:
            out.print("[bold yellow]SIMULATED evidence: made without a TEE; it proves nothing about the code that "
                      "ran[/]", highlight=False)
        out.print(f"[bold {'green' if ok else 'red'}]{escape(line)}[/]", highlight=False, soft_wrap=True)
    raise typer.Exit(0 if ok else 1)


@attestation_app.command("verify")
def verify(
    evidence: Path = typer.Argument(..., help="The evidence file: a quote, a CCA token, an SPDM report."),
    kind: str = typer.Option(..., "--kind", help="sgx, tdx, cca, nvidia or simulated."),
    encoding: str = typer.Option("raw", "--encoding", help="raw, hex or base64 (how the file holds the bytes)."),
    cert_chain: Optional[Path] = typer.Option(None, "--cert-chain", help="NVIDIA: the GPU's PEM chain, leaf first."),
    user_data: Optional[str] = typer.Option(None, "--user-data", help="Expected user data (hex): report_data, realm "
                                                                      "challenge or SPDM nonce."),
    collateral: Optional[Path] = _COLLATERAL, platform_key: List[Path] = _PLATFORM_KEY, at: Optional[str] = _AT,
    measurement: List[str] = _MEASUREMENT, accept_tcb: List[str] = _ACCEPT_TCB,
    accept_advisory: List[str] = _ACCEPT_ADVISORY, unsafe_root_ca: Optional[Path] = _UNSAFE_ROOT,
    unsafe_allow_debug: bool = _UNSAFE_DEBUG, unsafe_accept_simulated: bool = _UNSAFE_SIM, as_json: bool = _JSON,
):
    """Verify one piece of TEE evidence: signatures and chain, then the policy. Exit 0 valid, 1 invalid."""
    from ..attestation.appraisal import verify_evidence
    from ..attestation.claims import Evidence, parse_hex

    raw = _read(evidence, "evidence")
    if encoding == "hex":
        raw = parse_hex("".join(raw.decode("ascii", "replace").split()).lower(), "evidence (hex)")
    elif encoding == "base64":
        import base64
        import binascii

        try:
            raw = base64.b64decode(b"".join(raw.split()), validate=True)
        except binascii.Error as exc:
            raise InputError(f"evidence is not base64: {exc}") from None
    elif encoding != "raw":
        raise InputError("--encoding is raw, hex or base64")
    ev = Evidence(kind, raw, cert_chain=_read(cert_chain, "certificate chain") if cert_chain else None)
    appraisal = verify_evidence(ev, policy=policy_from_options(measurement, accept_tcb, accept_advisory, unsafe_allow_debug,
                                                   unsafe_accept_simulated),
                                endorsements=endorsements_from_options(collateral, platform_key, unsafe_root_ca), now=_at(at),
                                expected_user_data=parse_hex(user_data.lower(), "--user-data") if user_data else None)
    if not as_json:
        _print_checks(appraisal.checks, f"{kind} evidence {evidence}:")
        if appraisal.claims is not None:
            for name, value in appraisal.claims.measurements[:16]:
                out.print(f"  claim {escape(name)} = {value.hex()}", highlight=False, soft_wrap=True)
            out.print(f"  claim user_data = {appraisal.claims.user_data.hex()}", highlight=False, soft_wrap=True)
    _finish(appraisal.ok, appraisal.summary(), appraisal.to_json(), as_json, kind == "simulated")


def _chain_finish(report, as_json: bool, require_pass: bool) -> None:
    if not as_json:
        _print_checks(report.links, f"{report.subject}:")
    ok = report.ok and (not require_pass or report.attested_verdict == "PASS")
    _finish(ok, report.summary(), report.to_json(), as_json, report.simulated)


@attestation_app.command("check-verdict")
@deprecated_flags({"--nonce": "--attestation-nonce", "--provider-key": "--public-key"})
def check_verdict(
    document: Path = typer.Argument(..., help="An attested verdict (aftune.attested-verdict.v1)."),
    nonce: str = typer.Option(..., "--attestation-nonce", help="The attestation nonce you sent (hex)."),
    run_root: str = typer.Option(..., "--run-root", help="The agreed run's signed run root (hex)."),
    config_digest: Optional[str] = typer.Option(None, "--config-digest", help="The agreed config digest (hex)."),
    provider_key: Optional[str] = typer.Option(None, "--public-key", help=_PUBKEY_HELP + " The verdict must name it."),
    code_digest: Optional[str] = typer.Option(None, "--code-digest", help="Expected verifier code digest (hex)."),
    agreement: Optional[Path] = typer.Option(None, "--agreement", help="Your agreement.json: the verdict must be about it."),
    unsafe_no_agreement: bool = typer.Option(False, "--unsafe-no-agreement", help="UNSAFE: accept a verdict about any agreement, or none."),
    collateral: Optional[Path] = _COLLATERAL, platform_key: List[Path] = _PLATFORM_KEY, at: Optional[str] = _AT,
    measurement: List[str] = _MEASUREMENT, accept_tcb: List[str] = _ACCEPT_TCB,
    accept_advisory: List[str] = _ACCEPT_ADVISORY, unsafe_root_ca: Optional[Path] = _UNSAFE_ROOT,
    unsafe_allow_debug: bool = _UNSAFE_DEBUG, unsafe_accept_simulated: bool = _UNSAFE_SIM, as_json: bool = _JSON,
):
    """Accept a verdict computed in a TEE you did not run. Exit 0 valid and PASS, 1 otherwise."""
    from ..attestation.claims import parse_nonce
    from ..attestation.verdict import AttestedVerdict, check_attested_verdict
    from ..core.encoding import parse_hex_digest
    from ..training.agreement import Agreement
    from ..core.signing import PublicKey

    if agreement is not None and unsafe_no_agreement:
        raise InputError("give --agreement or --unsafe-no-agreement, not both")
    report = check_attested_verdict(
        AttestedVerdict.load(document), nonce=parse_nonce(nonce.lower()),
        expected_run_root=parse_hex_digest(run_root.lower(), "--run-root"),
        expected_config_digest=parse_hex_digest(config_digest.lower(), "--config-digest") if config_digest else None,
        expected_provider_key=PublicKey.load(provider_key) if provider_key else None,
        expected_code_digest=parse_hex_digest(code_digest.lower(), "--code-digest") if code_digest else None,
        expected_agreement=Agreement.load(agreement).digest() if agreement else None,
        unsafe_no_agreement=unsafe_no_agreement,
        policy=policy_from_options(measurement, accept_tcb, accept_advisory, unsafe_allow_debug, unsafe_accept_simulated),
        endorsements=endorsements_from_options(collateral, platform_key, unsafe_root_ca), now=_at(at))
    _chain_finish(report, as_json, require_pass=True)


@attestation_app.command("check-serving")
@deprecated_flags({"--nonce": "--attestation-nonce", "--receipt-key": "--public-key"})
def check_serving(
    response: Path = typer.Argument(..., help="The answer of GET /v1/attestation?nonce=... (JSON)."),
    nonce: str = typer.Option(..., "--attestation-nonce", help="The attestation nonce you sent (hex)."),
    model_digest: str = typer.Option(..., "--model-digest", help="The agreed model digest (the run's final model)."),
    receipt: Optional[Path] = typer.Option(None, "--receipt", help="A receipt the server returned."),
    record_dir: Optional[Path] = typer.Option(None, "--record-dir", help="The record directory of that receipt."),
    receipt_key: Optional[str] = typer.Option(None, "--public-key", help=_PUBKEY_HELP + " Compared with the attested receipt key."),
    collateral: Optional[Path] = _COLLATERAL, platform_key: List[Path] = _PLATFORM_KEY, at: Optional[str] = _AT,
    measurement: List[str] = _MEASUREMENT, accept_tcb: List[str] = _ACCEPT_TCB,
    accept_advisory: List[str] = _ACCEPT_ADVISORY, unsafe_root_ca: Optional[Path] = _UNSAFE_ROOT,
    unsafe_allow_debug: bool = _UNSAFE_DEBUG, unsafe_accept_simulated: bool = _UNSAFE_SIM, as_json: bool = _JSON,
):
    """Check attested serving: evidence -> model and receipt key -> receipt -> record. Exit 0 valid, 1 broken."""
    from ..attestation.claims import parse_nonce
    from ..attestation.serving import ServingEvidence
    from ..attestation.serving import check_serving as check
    from ..core.encoding import parse_hex_digest
    from ..core.signing import PublicKey
    from ..inference.receipt import Receipt

    report = check(ServingEvidence.load(response), nonce=parse_nonce(nonce.lower()),
                   expected_model_digest=parse_hex_digest(model_digest.lower(), "--model-digest"),
                   receipt=Receipt.load(receipt) if receipt else None, record_dir=record_dir,
                   pinned_receipt_key=PublicKey.load(receipt_key) if receipt_key else None,
                   policy=policy_from_options(measurement, accept_tcb, accept_advisory, unsafe_allow_debug,
                                  unsafe_accept_simulated),
                   endorsements=endorsements_from_options(collateral, platform_key, unsafe_root_ca), now=_at(at))
    _chain_finish(report, as_json, require_pass=False)


@attestation_app.command("verify-run")
@deprecated_flags({"--nonce": "--attestation-nonce", "--nonce-file": "--attestation-nonce-file", "--provider": "--attest"})
def verify_run(
    run_dir: Path = typer.Argument(..., help="The run directory to verify (inside the TEE)."),
    public_key: str = typer.Option(..., "--public-key", help=_PUBKEY_HELP),
    nonce: Optional[str] = typer.Option(None, "--attestation-nonce", help="The client's attestation nonce (hex)."),
    nonce_file: Optional[Path] = typer.Option(None, "--attestation-nonce-file", help="A file holding the client's attestation nonce (hex)."),
    provider: str = typer.Option("auto", "--attest", help="The TEE evidence provider: gramine, configfs-tsm, auto, or unsafe-simulated."),
    out_file: Path = typer.Option(..., "--out", help="Where to write the attested verdict (JSON)."),
    transcript: Optional[Path] = typer.Option(None, "--transcript", help="The client's copy of the transcript."),
    agreement: Optional[Path] = typer.Option(None, "--agreement", help="The client's agreement.json."),
    unsafe_no_agreement: bool = typer.Option(False, "--unsafe-no-agreement", help="Verify self-consistency only (the attested report says so)."),
    mode: str = typer.Option("strict", "--mode", help="strict or tolerance."),
):
    """Inside a TEE: verify every block of a run and sign the report with a key bound to TEE evidence."""
    from ..attestation.claims import parse_nonce
    from ..attestation.providers import provider_by_name
    from ..attestation.verdict import attest_run
    from ..core.signing import PublicKey

    if (nonce is None) == (nonce_file is None):
        raise InputError("give exactly one of --attestation-nonce and --attestation-nonce-file")
    text = nonce if nonce is not None else _read(nonce_file, "nonce file", 1024).decode("ascii", "replace").strip()
    doc = attest_run(run_dir, PublicKey.load(public_key), provider_by_name(provider), parse_nonce(text.lower()),
                     agreement=load_agreement(agreement, unsafe_no_agreement),
                     unsafe_no_agreement=unsafe_no_agreement, transcript=transcript, mode=mode)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(doc.to_json(), indent=1) + "\n", encoding="utf-8")
    if doc.simulated:
        err.print("[bold yellow]SIMULATED evidence (no TEE): this attested verdict proves nothing[/]", highlight=False)
    out.print(f"attested verdict ({doc.evidence.kind} evidence) written to {escape(str(out_file))}: the verifier's "
              f"verdict is {doc.verdict}; verifier key {doc.verifier_key.text}; code digest {doc.code_digest.hex()}",
              highlight=False, soft_wrap=True)


@attestation_app.command("gramine-manifest")
def gramine_manifest(
    out_file: Path = typer.Option(..., "--out", help="Where to write the manifest template."),
    enclave_size: str = typer.Option("16G", "--enclave-size", help="Enclave size, e.g. 16G or 512M."),
    max_threads: int = typer.Option(32, "--max-threads", help="Threads the enclave may create."),
):
    """Write a Gramine manifest template for the verifier (trusted files pinned by SHA-256)."""
    from ..attestation.gramine import ManifestSettings, manifest_template

    text = manifest_template(ManifestSettings(enclave_size=enclave_size, max_threads=max_threads))
    out_file.write_text(text, encoding="utf-8")
    out.print(f"manifest template written to {escape(str(out_file))}; build it with gramine-manifest and "
              "gramine-sgx-sign, then run `aftune attestation sigstruct` on the .sig (docs/tee.md)", highlight=False)


@attestation_app.command("sigstruct")
def sigstruct(path: Path = typer.Argument(..., help="A signed enclave's SIGSTRUCT (gramine-sgx-sign's .sig)."),
              as_json: bool = _JSON):
    """Verify a SIGSTRUCT's signature and print MRENCLAVE and MRSIGNER. Exit 0 valid, 1 invalid."""
    from ..attestation.claims import AttestationFailure
    from ..attestation.gramine import read_sigstruct

    try:
        s = read_sigstruct(_read(path, "SIGSTRUCT", 1 << 16))
    except AttestationFailure as exc:
        _finish(False, f"INVALID SIGSTRUCT: {exc}", {"valid": False, "check": exc.check, "reason": exc.reason}, as_json)
    if not as_json:
        for k, v in s.to_json().items():
            out.print(f"{k:<12} {v}", highlight=False)
    _finish(True, "VALID SIGSTRUCT" + (" (DEBUG enclave: not for production)" if s.debug else ""),
            {"valid": True, **s.to_json()}, as_json)


@attestation_app.command("code-digest")
def code_digest(hash_algorithm: str = typer.Option("blake3", "--hash", help="blake3 or sha256.")):
    """Print the code digest of this aftune installation (what attested verdicts bind)."""
    from ..attestation.binding import verifier_code_digest

    out.print(verifier_code_digest(hash_algorithm).hex())


@attestation_app.command("nonce")
def nonce():
    """Print a fresh random 32-byte nonce (hex), for --attestation-nonce or --challenge-nonce."""
    out.print(secrets.token_hex(32))
