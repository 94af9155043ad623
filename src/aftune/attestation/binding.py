"""The binding: which bytes of TEE evidence say what is attested, and for which client nonce.

    python -c "from aftune.attestation.binding import verifier_code_digest; print(verifier_code_digest('sha256').hex())"
    aftune attestation code-digest --hash sha256

SPEC.md 10.2. The attester puts a 32-byte domain-separated digest into the evidence's user data:

    binding = H(TAG_ATTESTATION_BINDING || lp(ascii(format)) || lp(nonce) || subject_a || subject_b)

with `format` `aftune.attested-verdict.v1` (subjects: the verifier's ephemeral Ed25519 public key
and its code digest) or `aftune.attested-serving.v1` (subjects: the served model digest and the
receipt public key). Evidence with a 64-byte user data field (SGX/TDX report_data, CCA realm
challenge, configfs-tsm inblob) carries `binding || 0x00 * 32`; NVIDIA's 32-byte SPDM nonce
carries `binding` itself. The code digest is a Merkle root (SPEC.md 2.4) over every `.py` file of
the installed aftune package, keyed by its path relative to the package, leaf digest
`H(TAG_FILE || file bytes)`: a self-reported identity that means something only where the TEE's
own measurement covers the files it is computed from (Gramine trusted files, a measured image).
"""

from __future__ import annotations

from pathlib import Path

from ..core.encoding import TAG_ATTESTATION_BINDING, TAG_FILE, hash_message, length_prefixed
from ..core.signing import PublicKey
from ..errors import InputError
from .claims import MAX_NONCE_BYTES, MIN_NONCE_BYTES

VERDICT_FORMAT = "aftune.attested-verdict.v1"
SERVING_FORMAT = "aftune.attested-serving.v1"
USER_DATA_64 = ("sgx", "tdx", "cca", "simulated")  # kinds whose user data field is 64 bytes
USER_DATA_32 = ("nvidia",)


def _binding(algorithm: str, fmt: str, nonce: bytes, a: bytes, b: bytes) -> bytes:
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise InputError(f"a nonce has {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes, got {len(nonce)}")
    if len(a) != 32 or len(b) != 32:
        raise InputError("binding subjects are 32 bytes each")
    return hash_message(algorithm, TAG_ATTESTATION_BINDING, length_prefixed(fmt.encode("ascii")),
                        length_prefixed(nonce), a, b)


def verdict_binding(algorithm: str, nonce: bytes, verifier_key: PublicKey, code_digest: bytes) -> bytes:
    """What an attested verdict's evidence carries: the nonce, the signing key, the code."""
    return _binding(algorithm, VERDICT_FORMAT, nonce, verifier_key.raw, code_digest)


def serving_binding(algorithm: str, nonce: bytes, model_digest: bytes, receipt_key: PublicKey) -> bytes:
    """What attested-serving evidence carries: the nonce, the served model, the receipt key."""
    return _binding(algorithm, SERVING_FORMAT, nonce, model_digest, receipt_key.raw)


def user_data(kind: str, binding: bytes) -> bytes:
    """The exact user data field of `kind` evidence that carries `binding`."""
    if len(binding) != 32:
        raise InputError("a binding digest is 32 bytes")
    if kind in USER_DATA_64:
        return binding + bytes(32)
    if kind in USER_DATA_32:
        return binding
    raise InputError(f"unknown evidence kind {kind!r}")


def provider_user_data(binding: bytes) -> bytes:
    """The 64 bytes every evidence provider is given: `binding || 0x00 * 32`."""
    return user_data("sgx", binding)


def user_data_field(kind: str) -> str:
    """How the platform calls the field, for messages."""
    return {"sgx": "report_data", "tdx": "report_data", "cca": "realm challenge", "nvidia": "SPDM requester nonce",
            "simulated": "user_data"}.get(kind, "user data")


def package_dir() -> Path:
    return Path(__file__).resolve().parents[1]  # src/aftune


def verifier_code_digest(algorithm: str, root: str | Path | None = None) -> bytes:
    """Merkle root over {relative path: H(TAG_FILE || bytes)} of every .py file of the package."""
    from ..core.merkle import merkle_root

    base = Path(root) if root is not None else package_dir()
    files = sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)
    if not files:
        raise InputError(f"{base} holds no .py files: not an aftune package")
    return merkle_root(algorithm, {p.relative_to(base).as_posix(): hash_message(algorithm, TAG_FILE, p.read_bytes())
                                   for p in files})
