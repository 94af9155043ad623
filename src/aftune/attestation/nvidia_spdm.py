"""NVIDIA GPU confidential computing (Hopper): an SPDM 1.1 GET_MEASUREMENTS request and signed
MEASUREMENTS response, verified with `cryptography` alone against the GPU's certificate chain.

    aftune attestation verify hopperAttestationReport.txt --kind nvidia --encoding hex \\
        --cert-chain hopperCertChain.txt

Layout (DMTF DSP0274 1.1, integers little-endian). Request, 37 bytes: version (0x11), code 0xE0,
param1 (bit 0: signature requested), param2 (0xFF: all blocks), requester nonce (32), slot id.
Response: version, code 0x60, param1, param2, number of blocks (1), record length (3), the
measurement record (blocks of index (1), specification (1, 0x01 = DMTF), size (2), then DMTF
value type (1), value size (2), value), responder nonce (32), opaque length (2), opaque data
(NVIDIA fields: type (2), size (2), value), signature (96: ECDSA P-384 r || s, big-endian).
The signature covers request || response without the signature, under SHA-384, by the leaf
certificate's key; the chain must end in the pinned NVIDIA Device Identity CA. The requester
nonce is the user data aftune binds. Not done here: OCSP revocation of the chain, and reference
measurements from NVIDIA's signed RIM files (pass them as reference values instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..errors import InputError
from .certchain import verify_chain
from .claims import AttestationFailure, Claims, Endorsements, Evidence
from .trust_anchors import describe_root, nvidia_root_der

SPDM_VERSION_11 = 0x11
GET_MEASUREMENTS, MEASUREMENTS = 0xE0, 0x60
REQUEST_LENGTH, NONCE_LENGTH, SIGNATURE_LENGTH = 37, 32, 96
DMTF_SPECIFICATION = 0x01
OPAQUE_NAMES = {3: "driver_version", 4: "gpu_info", 5: "sku", 6: "vbios_version", 7: "manufacturer_id",
                14: "board_id", 15: "chip_sku", 17: "project", 18: "project_sku", 20: "fwid"}


@dataclass(frozen=True)
class SpdmReport:
    """A parsed (not yet verified) GET_MEASUREMENTS exchange."""

    version: int
    requester_nonce: bytes
    responder_nonce: bytes
    blocks: tuple[tuple[int, int, bytes], ...]  # (index, DMTF value type, value)
    opaque: tuple[tuple[int, bytes], ...]
    signed: bytes  # request || response without the signature
    signature: bytes


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.data):
            raise AttestationFailure("format", f"the {self.what} ends inside {field} (offset {self.pos}, "
                                               f"{n} bytes wanted, {len(self.data) - self.pos} left)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, field: str) -> int:
        return int.from_bytes(self.take(n, field), "little")


def parse_spdm(report: bytes) -> SpdmReport:
    """Parse a request || response exchange; raises AttestationFailure("format", ...)."""
    req = _Reader(report, "SPDM request")
    version, code, param1, _ = req.take(4, "the request header")
    if version != SPDM_VERSION_11 or code != GET_MEASUREMENTS:
        raise AttestationFailure("format", f"not an SPDM 1.1 GET_MEASUREMENTS request (version {version:#x}, code {code:#x})")
    if not param1 & 0x01:
        raise AttestationFailure("format", "the request did not ask for a signature (param1 bit 0 is clear)")
    requester_nonce = req.take(NONCE_LENGTH, "the requester nonce")
    req.take(1, "the slot id")
    resp = _Reader(report[REQUEST_LENGTH:], "SPDM response")
    r_version, r_code, _, _ = resp.take(4, "the response header")
    if r_version != version or r_code != MEASUREMENTS:
        raise AttestationFailure("format", f"not an SPDM 1.1 MEASUREMENTS response (version {r_version:#x}, code {r_code:#x})")
    count = resp.uint(1, "the number of blocks")
    record = _Reader(resp.take(resp.uint(3, "the record length"), "the measurement record"), "measurement record")
    blocks, seen = [], set()
    for _ in range(count):
        index, spec = record.take(2, "a block header")
        block = _Reader(record.take(record.uint(2, "a block size"), f"block {index}"), f"measurement block {index}")
        if spec != DMTF_SPECIFICATION or index in seen:
            raise AttestationFailure("format", f"measurement block {index} is not a unique DMTF block (spec {spec:#x})")
        value_type = block.uint(1, "the value type")
        value = block.take(block.uint(2, "the value size"), "the value")
        if block.pos != len(block.data):
            raise AttestationFailure("format", f"measurement block {index} has {len(block.data) - block.pos} trailing bytes")
        seen.add(index)
        blocks.append((index, value_type, value))
    if record.pos != len(record.data):
        raise AttestationFailure("format", f"the measurement record has bytes after its {count} blocks")
    responder_nonce = resp.take(NONCE_LENGTH, "the responder nonce")
    opaque_reader = _Reader(resp.take(resp.uint(2, "the opaque length"), "the opaque data"), "opaque data")
    opaque = []
    while opaque_reader.pos < len(opaque_reader.data):
        kind = opaque_reader.uint(2, "an opaque field type")
        opaque.append((kind, opaque_reader.take(opaque_reader.uint(2, "an opaque field size"), f"opaque field {kind}")))
    signature = resp.take(SIGNATURE_LENGTH, "the signature")
    if resp.pos != len(resp.data):
        raise AttestationFailure("format", f"{len(resp.data) - resp.pos} bytes follow the response signature")
    return SpdmReport(version, requester_nonce, responder_nonce, tuple(blocks), tuple(opaque),
                      report[:-SIGNATURE_LENGTH], signature)


def _text(value: bytes) -> str:
    head = value.split(b"\x00", 1)[0]
    return head.decode("ascii", "replace") if head and head.isascii() and head.decode().isprintable() else value.hex()


def parse_nvidia(evidence: Evidence, endorsements: Endorsements, now: datetime) -> Claims:
    """Verify an NVIDIA GPU attestation report and its chain at `now`; raises AttestationFailure
    naming the failed check (format, root, chain, time, signature)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    if evidence.cert_chain is None:
        raise InputError("an NVIDIA report is verified with the GPU's certificate chain: pass --cert-chain FILE")
    report = parse_spdm(evidence.data)
    root_der = endorsements.unsafe_nvidia_root_der or nvidia_root_der()
    leaf = verify_chain(evidence.cert_chain, root_der, now, "GPU attestation chain")[0]
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationFailure("format", "the GPU attestation key is not an ECDSA P-384 key")
    sig = report.signature
    der = encode_dss_signature(int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big"))
    try:
        key.verify(der, report.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationFailure("signature", "the measurement report is not signed by the GPU attestation key of the "
                                              "chain (edited after signing, or another GPU's chain)") from None
    details = tuple((OPAQUE_NAMES[k], _text(v)) for k, v in report.opaque if k in OPAQUE_NAMES)
    details += (("spdm_version", f"{report.version:#x}"), ("blocks", str(len(report.blocks))),
                ("leaf", leaf.subject.rfc4514_string()[:100]), ("revocation", "not checked (no OCSP)"))
    anchor = (f"report signed by the GPU key of a chain to the pinned {describe_root(root_der)}"
              if endorsements.unsafe_nvidia_root_der is None else
              f"report signed by a chain to the UNSAFE replacement root {describe_root(root_der)}")
    return Claims(kind="nvidia", user_data=report.requester_nonce,
                  measurements=tuple((f"gpu.{i}", value) for i, _, value in report.blocks),
                  anchor=anchor, details=details)
