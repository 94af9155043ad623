"""Arm CCA attestation tokens: a platform token and a realm token, each COSE_Sign1, parsed into
claims with cbor2 and verified with `cryptography` (extra `tee` for cbor2).

    aftune attestation verify cca_example_token.cbor --kind cca --platform-key cca_platform.pem

A token is a CBOR-tagged collection: tag 907 (CMW collection, current profile) mapping 44234 to
the platform token and 44241 to the realm token, each as `[263, bstr]` (CoAP content format 263,
then the COSE_Sign1 bytes); or tag 399 (older profile) with the COSE_Sign1 bytes directly.
Checks, in order: (1) the realm token's signature under the realm attestation key (RAK), which
is itself a claim of the realm token (44237: a COSE_Key for realm profile 2.0, an uncompressed EC
point before it); (2) the platform token's signature under a platform key (CPAK) the client
trusts; (3) the platform token's challenge (10) equals the hash of the RAK claim's bytes (hash
named by claim 44240), which binds the two tokens; (4) the platform lifecycle is SECURED. Claims
reported: the 64-byte realm challenge (10, aftune's binding), RIM (44238), REMs (44239),
personalization value (44235), platform implementation and instance ids, software components.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from typing import Any

from ..errors import InputError, MissingExtra
from .claims import AttestationFailure, Claims, Endorsements, Evidence

CMW_COLLECTION_TAG, LEGACY_COLLECTION_TAG, COSE_SIGN1_TAG, CONTENT_FORMAT = 907, 399, 18, 263
PLATFORM_TOKEN, REALM_TOKEN = 44234, 44241
CHALLENGE, PROFILE, INSTANCE_ID = 10, 265, 256
REALM_RPV, REALM_HASH_ALG, REALM_RAK, REALM_RIM, REALM_REMS, REALM_RAK_HASH_ALG = 44235, 44236, 44237, 44238, 44239, 44240
PLATFORM_LIFECYCLE, PLATFORM_IMPLEMENTATION_ID, PLATFORM_SW_COMPONENTS = 2395, 2396, 2399
REALM_PROFILE_V2 = "tag:arm.com,2024:realm#2.0.0"
LIFECYCLE_SECURED = range(0x3000, 0x3100)
_HASHES = {"sha-256": hashlib.sha256, "sha-384": hashlib.sha384, "sha-512": hashlib.sha512}


def _cbor():
    try:
        import cbor2
    except ImportError:
        raise MissingExtra("cbor2", "tee") from None
    return cbor2


def cbor_loads(data: bytes, what: str) -> Any:
    """Decode hostile CBOR: bounded depth and no duplicate map keys where cbor2 supports it."""
    cbor2 = _cbor()
    params = inspect.signature(cbor2.loads).parameters
    kwargs = {k: v for k, v in (("max_depth", 16), ("allow_duplicate_keys", False)) if k in params}
    try:
        return cbor2.loads(data, **kwargs)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise AttestationFailure("format", f"{what} is not valid CBOR: {exc}") from None


def _alg(alg: Any):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    table = {-7: ("ES256", hashes.SHA256(), ec.SECP256R1, 32), -35: ("ES384", hashes.SHA384(), ec.SECP384R1, 48),
             -36: ("ES512", hashes.SHA512(), ec.SECP521R1, 66)}
    if alg not in table:
        raise AttestationFailure("format", f"COSE algorithm {alg!r} is not ES256, ES384 or ES512")
    return table[alg]


def _sign1(blob: Any, what: str) -> tuple[bytes, bytes, bytes, int]:
    """(protected header bytes, payload, signature, alg) of a COSE_Sign1 given as bytes."""
    if not isinstance(blob, bytes):
        raise AttestationFailure("format", f"the {what} must be a byte string holding a COSE_Sign1")
    msg = cbor_loads(blob, what)
    if getattr(msg, "tag", None) == COSE_SIGN1_TAG:
        msg = msg.value
    if not isinstance(msg, (list, tuple)) or len(msg) != 4:
        raise AttestationFailure("format", f"the {what} is not a COSE_Sign1 (an array of 4)")
    protected, unprotected, payload, signature = msg
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)) or not isinstance(unprotected, Mapping):
        raise AttestationFailure("format", f"the {what}'s COSE_Sign1 fields have the wrong types")
    header = cbor_loads(protected, f"{what} protected header") if protected else {}
    if not isinstance(header, Mapping) or 1 not in header:
        raise AttestationFailure("format", f"the {what}'s protected header names no algorithm")
    return protected, payload, signature, header[1]


def _verify_sign1(public_key, protected: bytes, payload: bytes, signature: bytes, alg: int, what: str) -> bool:
    """COSE_Sign1 (RFC 9052 4.4): ECDSA over Sig_structure ["Signature1", protected, h'', payload]."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    name, digest, curve, size = _alg(alg)
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, curve):
        return False
    if len(signature) != 2 * size:
        raise AttestationFailure("format", f"the {what}'s {name} signature has {len(signature)} bytes, not {2 * size}")
    tbs = _cbor().dumps(["Signature1", protected, b"", payload])
    der = encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))
    try:
        public_key.verify(der, tbs, ec.ECDSA(digest))
        return True
    except InvalidSignature:
        return False


def _rak(raw: Any, profile: Any):
    """The realm attestation key from its claim: COSE_Key (profile 2.0) or raw EC point (older)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(raw, bytes):
        raise AttestationFailure("format", "realm claim 44237 (RAK) must be a byte string")
    curves = {1: ec.SECP256R1(), 2: ec.SECP384R1(), 3: ec.SECP521R1()}
    try:
        if profile == REALM_PROFILE_V2:
            key = cbor_loads(raw, "the RAK COSE_Key")
            if not isinstance(key, Mapping) or key.get(1) != 2 or key.get(-1) not in curves:
                raise AttestationFailure("format", "the RAK is not an EC2 COSE_Key on P-256, P-384 or P-521")
            x, y = key.get(-2), key.get(-3)
            if not isinstance(x, bytes) or not isinstance(y, bytes):
                raise AttestationFailure("format", "the RAK COSE_Key lacks its x or y coordinate")
            return ec.EllipticCurvePublicKey.from_encoded_point(curves[key[-1]], b"\x04" + x + y)
        if profile is not None:
            raise AttestationFailure("format", f"unknown realm profile {str(profile)[:60]!r} "
                                               f"(supported: {REALM_PROFILE_V2}, or none for the older profile)")
        by_size = {65: curves[1], 97: curves[2], 133: curves[3]}
        if len(raw) not in by_size or raw[0] != 4:
            raise AttestationFailure("format", f"the RAK is not an uncompressed EC point ({len(raw)} bytes)")
        return ec.EllipticCurvePublicKey.from_encoded_point(by_size[len(raw)], raw)
    except ValueError as exc:
        raise AttestationFailure("format", f"the RAK is not a valid EC public key: {exc}") from None


def load_platform_key(pem: bytes):
    """A trusted CPAK from PEM: a public key, or (Arm's test vectors) an EC private key's public part."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        if b"PRIVATE KEY" in pem:
            key = serialization.load_pem_private_key(pem, password=None).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise InputError(f"a CCA platform key must be a PEM EC key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InputError(f"a CCA platform key must be an EC key, got {type(key).__name__}")
    return key


def key_fingerprint(key) -> str:
    from cryptography.hazmat.primitives import serialization

    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()[:16] + "…"


def _bytes_claim(claims: Mapping, key: int, what: str, sizes: tuple[int, ...]) -> bytes:
    value = claims.get(key)
    if not isinstance(value, bytes) or len(value) not in sizes:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise AttestationFailure("format", f"{what} (claim {key}) must be {' or '.join(map(str, sizes))} bytes, got {got}")
    return value


def _tokens(data: bytes) -> tuple[bytes, bytes]:
    top = cbor_loads(data, "the CCA token")
    tag = getattr(top, "tag", None)
    if tag not in (CMW_COLLECTION_TAG, LEGACY_COLLECTION_TAG) or not isinstance(top.value, Mapping):
        raise AttestationFailure("format", f"not a CCA token: expected CBOR tag 907 or 399 over a map, got tag {tag}")
    if set(top.value) != {PLATFORM_TOKEN, REALM_TOKEN}:
        raise AttestationFailure("format", f"a CCA token maps exactly 44234 and 44241, got {sorted(top.value)[:6]}")
    out = []
    for key in (PLATFORM_TOKEN, REALM_TOKEN):
        entry = top.value[key]
        if tag == CMW_COLLECTION_TAG:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] != CONTENT_FORMAT:
                raise AttestationFailure("format", f"token {key} must be [263, COSE_Sign1 bytes]")
            entry = entry[1]
        out.append(entry)
    return out[0], out[1]


def parse_cca(evidence: Evidence, endorsements: Endorsements) -> Claims:
    """Verify a CCA token with the trusted platform keys and return its claims; raises
    AttestationFailure naming the failed check (format, realm-signature, platform-signature,
    platform-binding)."""
    if not endorsements.cca_platform_keys:
        raise InputError("a CCA token is verified with the platform keys you trust: pass --platform-key PEM")
    platform_blob, realm_blob = _tokens(evidence.data)
    # 1. the realm token, under the RAK it carries
    r_protected, r_payload, r_signature, r_alg = _sign1(realm_blob, "realm token")
    realm = cbor_loads(r_payload, "the realm claims")
    if not isinstance(realm, Mapping):
        raise AttestationFailure("format", "the realm claims are not a map")
    rak_bytes = realm.get(REALM_RAK)
    rak = _rak(rak_bytes, realm.get(PROFILE))
    if not _verify_sign1(rak, r_protected, r_payload, r_signature, r_alg, "realm token"):
        raise AttestationFailure("realm-signature", "the realm token is not signed by the RAK it carries")
    # 2. the platform token, under a trusted CPAK
    p_protected, p_payload, p_signature, p_alg = _sign1(platform_blob, "platform token")
    keys = [load_platform_key(pem) for pem in endorsements.cca_platform_keys]
    signer = next((k for k in keys if _verify_sign1(k, p_protected, p_payload, p_signature, p_alg, "platform token")), None)
    if signer is None:
        trusted = ", ".join(key_fingerprint(k) for k in keys)
        raise AttestationFailure("platform-signature", f"the platform token is not signed by any trusted platform key "
                                                       f"(trusted SPKI sha256: {trusted})")
    platform = cbor_loads(p_payload, "the platform claims")
    if not isinstance(platform, Mapping):
        raise AttestationFailure("format", "the platform claims are not a map")
    # 3. the platform challenge binds the realm token's RAK
    hash_name = realm.get(REALM_RAK_HASH_ALG)
    if hash_name not in _HASHES:
        raise AttestationFailure("format", f"unknown RAK hash algorithm {str(hash_name)[:20]!r} (claim 44240)")
    expected = _HASHES[hash_name](rak_bytes).digest()
    challenge = _bytes_claim(platform, CHALLENGE, "platform challenge", (32, 48, 64))
    if challenge != expected:
        raise AttestationFailure("platform-binding", f"the platform challenge {challenge.hex()[:16]}… is not the "
                                                     f"{hash_name} of this realm token's RAK ({expected.hex()[:16]}…): "
                                                     "the realm token was not issued on this platform")
    return _claims(realm, platform, signer)


def _claims(realm: Mapping, platform: Mapping, signer) -> Claims:
    rems = realm.get(REALM_REMS)
    if not isinstance(rems, (list, tuple)) or len(rems) != 4 or not all(isinstance(r, bytes) for r in rems):
        raise AttestationFailure("format", "realm claim 44239 must hold 4 extensible measurements")
    measurements = [("rim", _bytes_claim(realm, REALM_RIM, "RIM", (32, 48, 64)))]
    measurements += [(f"rem{i}", r) for i, r in enumerate(rems)]
    measurements.append(("rpv", _bytes_claim(realm, REALM_RPV, "realm personalization value", (64,))))
    measurements.append(("platform_implementation_id", _bytes_claim(platform, PLATFORM_IMPLEMENTATION_ID,
                                                                    "platform implementation id", (32, 64))))
    instance = platform.get(INSTANCE_ID)
    if isinstance(instance, bytes):
        measurements.append(("platform_instance_id", instance))
    components = platform.get(PLATFORM_SW_COMPONENTS) or ()
    for i, comp in enumerate(components if isinstance(components, (list, tuple)) else ()):
        if isinstance(comp, Mapping) and isinstance(comp.get(2), bytes):
            label = f"{i}.{comp[1]}" if isinstance(comp.get(1), str) else str(i)
            measurements.append((f"sw.{label}", comp[2]))
    lifecycle = platform.get(PLATFORM_LIFECYCLE)
    if not isinstance(lifecycle, int):
        raise AttestationFailure("format", "platform claim 2395 (lifecycle) must be an integer")
    debug = lifecycle not in LIFECYCLE_SECURED
    details = (("realm_profile", str(realm.get(PROFILE, "(none: older profile)"))),
               ("platform_profile", str(platform.get(PROFILE))), ("lifecycle", f"{lifecycle:#06x}"),
               ("realm_hash_algorithm", str(realm.get(REALM_HASH_ALG))))
    return Claims(kind="cca", user_data=_bytes_claim(realm, CHALLENGE, "realm challenge", (64,)),
                  measurements=tuple(measurements),
                  anchor=f"platform token signed by the trusted platform key (SPKI sha256 {key_fingerprint(signer)}), "
                         "realm token signed by its RAK, RAK bound by the platform challenge",
                  debug=debug, debug_reason=f"platform lifecycle {lifecycle:#06x} is not SECURED (0x3000-0x30ff)"
                  if debug else "", details=details)
