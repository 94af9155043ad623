"""The one encoding: how tensors, records and messages become the bytes that are hashed.

Every digest aftune computes goes through this module, and SPEC.md section 2 states each byte it
hashes. Changing anything here changes digests: bump `ENCODING_VERSION` and SPEC.md together.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from typing import Any

import blake3
import torch

from ..errors import InputError

ENCODING_VERSION = 1
DIGEST_SIZE = 32
HASH_ALGORITHMS = ("blake3", "sha256")

# Domain-separation tags: each hashed message starts with exactly one of these (ASCII, NUL-ended).
TAG_TENSOR = b"aftune.v1.tensor\x00"
TAG_LEAF = b"aftune.v1.leaf\x00"
TAG_NODE = b"aftune.v1.node\x00"
TAG_EMPTY = b"aftune.v1.empty\x00"
TAG_STEP_BLOCK = b"aftune.v1.step-block\x00"
TAG_RUN = b"aftune.v1.run\x00"
TAG_RUN_CONFIG = b"aftune.v1.run-config\x00"
TAG_EXAMPLE = b"aftune.v1.example\x00"
TAG_ORDER = b"aftune.v1.order\x00"
TAG_FILE = b"aftune.v1.file\x00"
TAG_SIGNATURE = b"aftune.v1.signature\x00"
TAG_RNG = b"aftune.v1.rng\x00"
TAG_LORA_INIT = b"aftune.v1.lora-init\x00"  # portable numerics: LoRA A initialisation (SPEC.md 5.4)
TAG_HEAD_INIT = b"aftune.v1.head-init\x00"  # tensors absent from a base checkpoint (SPEC.md 4.7)
TAG_INFERENCE_RECORD = b"aftune.v1.inference-record\x00"  # record id = H(tag || record file bytes)
TAG_INFERENCE_SERVED = b"aftune.v1.inference-served\x00"  # served file digest (SPEC.md 8.4, v5 records)
TAG_INFERENCE_BOUNDARY = b"aftune.v1.inference-boundary\x00"  # leaf of a v6 record's boundaries root (SPEC.md 8.4.1)
TAG_SAMPLE = b"aftune.v1.sample\x00"  # per-step uniform of seeded sampling
TAG_RECEIPT = b"aftune.v1.receipt\x00"
TAG_CHALLENGE = b"aftune.v1.challenge\x00"
TAG_CHALLENGE_BLOCK = b"aftune.v1.challenge-block\x00"
TAG_CHALLENGE_STRATUM = b"aftune.v1.challenge-stratum\x00"
TAG_CHALLENGE_DIGEST = b"aftune.v1.challenge-digest\x00"
TAG_ATTESTATION_BINDING = b"aftune.v1.attestation-binding\x00"  # TEE user data (SPEC.md 10.2)
TAG_ATTESTED_VERDICT = b"aftune.v1.attested-verdict\x00"  # attested verdict message (SPEC.md 10.4)
TAG_MODEL = b"aftune.v1.model\x00"  # a model: its weights and the files that say how to run it (SPEC.md 3.6)
TAG_AGREEMENT = b"aftune.v1.agreement\x00"  # the client's agreement (SPEC.md 4.5)
TAG_GENERATION_POLICY = b"aftune.v1.generation-policy\x00"  # generation policy digest (SPEC.md 8.6.1)
TAG_REQUEST_SEED = b"aftune.v1.request-seed\x00"  # sampling seed from the client's request nonce (SPEC.md 8.6.5)

# dtype names as in the safetensors format.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
# Compute dtypes as settings, records and the command line name them.
DTYPE_BY_NAME: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                         "float16": torch.float16, "float64": torch.float64}

# Large tensors are hashed with several threads (BLAKE3 only; the digest is the same).
_PARALLEL_HASH_BYTES = 1 << 22


def new_hasher(algorithm: str, size_hint: int = 0):
    """A fresh hasher with `update` and `digest`; BLAKE3 (default) or SHA-256."""
    if algorithm == "blake3":
        if size_hint >= _PARALLEL_HASH_BYTES:
            return blake3.blake3(max_threads=blake3.blake3.AUTO)
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise InputError(f"unknown hash algorithm {algorithm!r}: choose one of {', '.join(HASH_ALGORITHMS)}")


def hash_message(algorithm: str, tag: bytes, *parts: bytes) -> bytes:
    """H(tag || part_0 || part_1 || ...): the digest of a domain-separated message."""
    h = new_hasher(algorithm)
    h.update(tag)
    for part in parts:
        h.update(part)
    return h.digest()


def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def length_prefixed(data: bytes) -> bytes:
    return u32(len(data)) + data


def hashed_uniforms(algorithm: str, tag: bytes, seed: int, name: str, n: int) -> torch.Tensor:
    """n float64 uniforms in [0, 1), the same on every machine: u_i = (w_i >> 11) * 2^-53 for the
    i-th big-endian u64 word of H(tag || u64(seed) || u32(len(name)) || name || u64(j)), j = 0, 1,
    ... (each digest gives its words in order)."""
    words: list[int] = []
    prefix = (u64(seed), length_prefixed(name.encode("utf-8")))
    j = 0
    while len(words) < n:
        d = hash_message(algorithm, tag, *prefix, u64(j))
        words += [int.from_bytes(d[k:k + 8], "big") for k in range(0, len(d) - 7, 8)]
        j += 1
    return torch.tensor([w >> 11 for w in words[:n]], dtype=torch.float64) * 2.0 ** -53


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InputError(f"tensors of dtype {dtype} cannot be committed (supported: {sorted(DTYPE_NAMES.values())})") from None


def tensor_data(tensor: torch.Tensor):
    """The tensor's elements as contiguous little-endian bytes (a zero-copy buffer where possible)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover - no big-endian CI
        return t.view(torch.uint8).numpy().reshape(-1, t.element_size())[:, ::-1].tobytes()
    return t.reshape(-1).view(torch.uint8).numpy()


def tensor_header(name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """The canonical header hashed before a tensor's bytes (SPEC.md 2.2)."""
    parts = [length_prefixed(name.encode("utf-8")), u8(len(dtype)), dtype.encode("ascii"), u32(len(shape))]
    parts += [u64(d) for d in shape]
    parts.append(u64(nbytes))
    return b"".join(parts)


def tensor_digest(name: str, tensor: torch.Tensor, algorithm: str = "blake3") -> bytes:
    """Digest of a named tensor: H(TAG_TENSOR || header(name, dtype, shape, nbytes) || data)."""
    data = tensor_data(tensor)
    nbytes = len(data) if isinstance(data, bytes) else data.nbytes
    h = new_hasher(algorithm, nbytes)
    h.update(TAG_TENSOR)
    h.update(tensor_header(name, dtype_name(tensor.dtype), tuple(tensor.shape), nbytes))
    h.update(data)
    return h.digest()


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8, no NaN or infinity."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:  # NaN or infinity
        raise InputError(f"cannot be committed: {exc}") from None
    return text.encode("utf-8")


def hex_digest(digest: bytes) -> str:
    return digest.hex()


def parse_hex_digest(text: Any, what: str) -> bytes:
    """Parse a 64-hex-character digest from hostile input, naming `what` on error."""
    if not isinstance(text, str) or len(text) != 2 * DIGEST_SIZE or text.strip(_LOWER_HEX):
        raise InputError(f"{what}: expected {2 * DIGEST_SIZE} lowercase hex digits, got {str(text)[:80]!r}")
    return bytes.fromhex(text)


_LOWER_HEX = "0123456789abcdef"
