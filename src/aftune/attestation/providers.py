"""Evidence providers: how code running inside a TEE asks the platform for evidence over 64 bytes
of user data. Gramine's `/dev/attestation` (SGX, Gramine-TDX), the Linux configfs-tsm interface
(TDX and Arm CCA guests), and a simulated provider for machines with no TEE.

    from aftune.attestation.providers import detect_provider
    evidence = detect_provider().evidence(user_data)     # 64 bytes: binding || 0x00 * 32

Gramine (https://gramine.readthedocs.io, "Attestation"): write the 64 bytes to
`/dev/attestation/user_report_data`, read the DCAP quote from `/dev/attestation/quote`;
`/dev/attestation/attestation_type` must say `dcap` (`sgx.remote_attestation = "dcap"`).
configfs-tsm (Linux Documentation/ABI/testing/configfs-tsm): an entry under
`/sys/kernel/config/tsm/report/`, write `inblob`, read `outblob` (a TDX quote or a CCA token),
`provider` names the platform (`tdx_guest`, `arm_cca_guest`), and `generation` must be the same
before and after reading `outblob` (else another process wrote `inblob` in between).
`UnsafeSimulatedEvidenceProvider` makes evidence of kind `simulated`: canonical JSON that says in
its format name, a field and a warning that it was made without a TEE. Anyone can make it, so it
proves nothing; a client accepts it only with an option whose name contains `unsafe`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from ..core import jsonio
from ..core.encoding import canonical_json
from ..errors import InputError
from .claims import MAX_EVIDENCE_BYTES, AttestationFailure, Claims, Evidence, parse_hex

GRAMINE_ROOT = Path("/dev/attestation")
CONFIGFS_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
TSM_PROVIDERS = {"tdx_guest": "tdx", "arm_cca_guest": "cca"}
SIMULATED_FORMAT = "aftune.simulated-evidence.v1"
SIMULATED_WARNING = ("SIMULATED EVIDENCE: made by aftune's UnsafeSimulatedEvidenceProvider without any TEE; "
                     "anyone can make it and it proves nothing")
log = logging.getLogger("aftune.attestation")


class EvidenceProvider(Protocol):
    """Anything that turns 64 bytes of user data into evidence (inside the TEE)."""

    name: str
    kind: str  # the evidence kind it produces (sgx, tdx, cca, simulated)

    def evidence(self, user_data: bytes) -> Evidence: ...


def _need_64(user_data: bytes) -> None:
    if len(user_data) != 64:
        raise InputError(f"TEE user data is 64 bytes, got {len(user_data)}")


def _read(path: Path, what: str) -> bytes:
    data = jsonio.read_capped(path, MAX_EVIDENCE_BYTES)
    if len(data) > MAX_EVIDENCE_BYTES:
        raise InputError(f"{what} ({path}) is larger than {MAX_EVIDENCE_BYTES} bytes")
    return data


class GramineProvider:
    """Gramine's pseudo-files, inside an enclave (or a Gramine-TDX TD) with DCAP attestation."""

    name = "gramine"

    def __init__(self, root: str | Path = GRAMINE_ROOT):
        self.root = Path(root)
        if not (self.root / "quote").exists():
            raise InputError(f"{self.root}/quote does not exist: not inside a Gramine enclave with "
                             "sgx.remote_attestation = \"dcap\"")
        kind_file = self.root / "attestation_type"
        attestation = _read(kind_file, "attestation_type").decode("ascii", "replace").strip() if kind_file.exists() else ""
        if attestation != "dcap":
            raise InputError(f"Gramine attestation type is {attestation or 'missing'!r}, not 'dcap': set "
                             "sgx.remote_attestation = \"dcap\" in the manifest")

    @property
    def kind(self) -> str:
        return "sgx or tdx"  # the quote's header says which (Gramine-TDX gives TDX quotes)

    def evidence(self, user_data: bytes) -> Evidence:
        from .intel_dcap import quote_kind

        _need_64(user_data)
        (self.root / "user_report_data").write_bytes(user_data)
        quote = _read(self.root / "quote", "the Gramine quote")
        try:
            kind = quote_kind(quote)
        except AttestationFailure as exc:
            raise InputError(f"{self.root}/quote did not return a DCAP quote: {exc.reason}") from None
        return Evidence(kind, quote)


class ConfigfsTsmProvider:
    """The kernel's configfs-tsm report interface (TDX and Arm CCA guests)."""

    name = "configfs-tsm"

    def __init__(self, root: str | Path = CONFIGFS_TSM_ROOT, entry: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root} does not exist: no configfs-tsm (mount configfs, Linux 6.7+, a TDX or "
                             "CCA guest)")
        self.entry = entry

    @property
    def kind(self) -> str:
        return "tdx or cca"

    def evidence(self, user_data: bytes) -> Evidence:
        _need_64(user_data)
        entry = self.root / (self.entry or f"aftune-{os.getpid()}-{secrets.token_hex(4)}")
        created = not entry.exists()
        if created:
            entry.mkdir()
        try:
            (entry / "inblob").write_bytes(user_data)
            before = _read(entry / "generation", "generation").strip()
            blob = _read(entry / "outblob", "the configfs-tsm outblob")
            after = _read(entry / "generation", "generation").strip()
            provider = _read(entry / "provider", "provider").decode("ascii", "replace").strip()
        finally:
            if created:  # configfs removes an entry with its attribute files; a plain directory would not
                with contextlib.suppress(OSError):
                    entry.rmdir()
        if before != after:
            raise InputError(f"{entry}: generation changed from {before!r} to {after!r} while reading outblob: another "
                             "process wrote inblob; retry")
        if provider not in TSM_PROVIDERS:
            raise InputError(f"configfs-tsm provider {provider!r} is not supported (supported: {', '.join(TSM_PROVIDERS)})")
        if not blob:
            raise InputError(f"{entry}/outblob is empty")
        return Evidence(TSM_PROVIDERS[provider], blob)


class UnsafeSimulatedEvidenceProvider:
    """For machines with no TEE: evidence of kind `simulated`, which proves nothing and says so."""

    name = "unsafe-simulated"
    kind = "simulated"

    def __init__(self):
        log.warning("UnsafeSimulatedEvidenceProvider: the evidence it makes is SIMULATED (no TEE) and proves nothing")

    def evidence(self, user_data: bytes) -> Evidence:
        _need_64(user_data)
        doc = {"format": SIMULATED_FORMAT, "simulated": True, "user_data": user_data.hex(), "warning": SIMULATED_WARNING}
        return Evidence("simulated", canonical_json(doc))


def parse_simulated(evidence: Evidence) -> Claims:
    """Claims of simulated evidence. Its 'signature' check passes trivially: there is none."""
    try:
        doc: Any = jsonio.loads(evidence.data)
    except ValueError as exc:
        raise AttestationFailure("format", f"simulated evidence is not JSON: {exc}") from None
    fields = {"format", "simulated", "user_data", "warning"}
    if not isinstance(doc, dict) or set(doc) != fields or doc["format"] != SIMULATED_FORMAT or doc["simulated"] is not True:
        raise AttestationFailure("format", f"not {SIMULATED_FORMAT} evidence (fields {sorted(fields)})")
    try:
        data = parse_hex(doc["user_data"], "simulated evidence: user_data", 64)
    except InputError as exc:
        raise AttestationFailure("format", str(exc)) from None
    return Claims(kind="simulated", user_data=data, measurements=(),
                  anchor="NONE: simulated evidence carries no signature and no TEE vouches for it",
                  details=(("warning", SIMULATED_WARNING),))


def provider_by_name(name: str, root: str | Path | None = None) -> EvidenceProvider:
    """`gramine`, `configfs-tsm`, `unsafe-simulated`, or `auto` (the one this machine has)."""
    if name == "gramine":
        return GramineProvider(root or GRAMINE_ROOT)
    if name == "configfs-tsm":
        return ConfigfsTsmProvider(root or CONFIGFS_TSM_ROOT)
    if name == "unsafe-simulated":
        return UnsafeSimulatedEvidenceProvider()
    if name == "auto":
        return detect_provider()
    raise InputError(f"unknown evidence provider {name!r}: choose gramine, configfs-tsm, unsafe-simulated or auto")


def detect_provider() -> EvidenceProvider:
    """The hardware provider this machine offers; never the simulated one (ask for it by name)."""
    if (GRAMINE_ROOT / "quote").exists():
        return GramineProvider()
    if CONFIGFS_TSM_ROOT.is_dir():
        return ConfigfsTsmProvider()
    raise InputError("no TEE evidence provider here (no /dev/attestation/quote, no configfs-tsm): on a machine "
                     "without a TEE only the provider 'unsafe-simulated' exists, and what it signs proves nothing")
