"""X.509 chain checks with `cryptography`: each certificate signed by the next, the issuers CAs,
every certificate valid at `now`, the chain ending in a pinned root (used for NVIDIA GPU chains).

    from aftune.attestation.certchain import verify_chain
    leaf = verify_chain(pem_bytes, pinned_root_der, now, what="GPU attestation chain")[0]

No path building and no X.509 parsing of aftune's own: signatures are checked by
`Certificate.verify_directly_issued_by` (issuer name and signature), validity and basic
constraints are read from `cryptography`'s parsed certificates. Revocation (OCSP, CRLs) is not
checked here: say so wherever the result is shown.
"""

from __future__ import annotations

from datetime import datetime

from .claims import AttestationFailure, format_time
from .trust_anchors import describe_root


def _name(cert) -> str:
    return cert.subject.rfc4514_string()[:100]


def verify_chain(pem: bytes, root_der: bytes, now: datetime, what: str) -> list:
    """The certificates of `pem` (leaf first) up to and including the root; raises
    AttestationFailure(format | root | chain | time) naming the certificate at fault."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise AttestationFailure("format", f"the {what} is not PEM certificates: {exc}") from None
    if len(certs) > 8:
        raise AttestationFailure("format", f"the {what} has {len(certs)} certificates (at most 8)")
    root = x509.load_der_x509_certificate(root_der)
    last = certs[-1]
    # 1. the chain ends in the pinned root (included, or as the issuer of its last certificate)
    if last.public_bytes(Encoding.DER) != root_der:
        if last.issuer == last.subject or last.issuer != root.subject:
            raise AttestationFailure("root", f"the {what} ends in {describe_root(last.public_bytes(Encoding.DER))}, "
                                             f"not in the pinned root {describe_root(root_der)}")
        certs = certs + [root]
    # 2. each certificate is signed by the next, which is a CA
    for child, parent in zip(certs, certs[1:]):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise AttestationFailure("chain", f"'{_name(child)}' is not signed by '{_name(parent)}': {exc or 'bad signature'}") from None
        try:
            ca = parent.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise AttestationFailure("chain", f"'{_name(parent)}' issues '{_name(child)}' but is not a CA")
    # 3. every certificate is valid at `now`
    for cert in certs:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise AttestationFailure("time", f"certificate '{_name(cert)}' is not valid at {format_time(now)} "
                                             f"(valid {format_time(cert.not_valid_before_utc)} to "
                                             f"{format_time(cert.not_valid_after_utc)})")
    return certs
