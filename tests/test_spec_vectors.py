"""Test vectors for SPEC.md, computed by an independent minimal re-implementation.

Everything under "reference implementation" below is written from SPEC.md alone with hashlib,
blake3, struct and cryptography; it never calls aftune's encoding or Merkle helpers to compute a
value. Each vector is then compared three ways: reference == aftune == the constant printed in
SPEC.md (Appendix A). A change to any hashed byte breaks these tests, which is the point: such a
change needs a new encoding version (SPEC.md section 7).

The last group of tests checks the reader rules that SPEC.md states for hostile input (strict JSON,
digest fields, object containers, transcript length, label order, settings bounds, tolerance
comparisons) against aftune's own readers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("aftune") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

blake3 = pytest.importorskip("blake3")
torch = pytest.importorskip("torch")
ed25519 = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")

ALGORITHMS = ("blake3", "sha256")

# =============================================================================================
# Reference implementation (SPEC.md sections 2 and 3), independent of aftune
# =============================================================================================

TAGS = {
    "tensor": b"aftune.v1.tensor\x00",
    "leaf": b"aftune.v1.leaf\x00",
    "node": b"aftune.v1.node\x00",
    "empty": b"aftune.v1.empty\x00",
    "step-block": b"aftune.v1.step-block\x00",
    "run": b"aftune.v1.run\x00",
    "run-config": b"aftune.v1.run-config\x00",
    "example": b"aftune.v1.example\x00",
    "order": b"aftune.v1.order\x00",
    "file": b"aftune.v1.file\x00",
    "signature": b"aftune.v1.signature\x00",
    "rng": b"aftune.v1.rng\x00",
    "model": b"aftune.v1.model\x00",
    "agreement": b"aftune.v1.agreement\x00",
    "lora-init": b"aftune.v1.lora-init\x00",
}


def H(algorithm: str, data: bytes) -> bytes:
    if algorithm == "blake3":
        return blake3.blake3(data).digest()  # 32-byte default output
    if algorithm == "sha256":
        return hashlib.sha256(data).digest()
    raise ValueError(algorithm)


def be32(n: int) -> bytes:
    return struct.pack(">I", n)


def be64(n: int) -> bytes:
    return struct.pack(">Q", n)


def lp(data: bytes) -> bytes:
    return be32(len(data)) + data


def ref_tensor_digest(algorithm: str, name: str, dtype: str, shape: tuple[int, ...], data: bytes) -> bytes:
    header = lp(name.encode("utf-8")) + bytes([len(dtype)]) + dtype.encode("ascii") + be32(len(shape))
    header += b"".join(be64(d) for d in shape) + be64(len(data))
    return H(algorithm, TAGS["tensor"] + header + data)


def ref_leaf(algorithm: str, key: str, digest: bytes) -> bytes:
    return H(algorithm, TAGS["leaf"] + lp(key.encode("utf-8")) + digest)


def ref_node(algorithm: str, left: bytes, right: bytes) -> bytes:
    return H(algorithm, TAGS["node"] + left + right)


def ref_split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    k = 1 << ((n - 1).bit_length() - 1)
    assert k < n <= 2 * k
    return k


def ref_leaves(algorithm: str, entries: dict[str, bytes]) -> list[bytes]:
    keys = sorted((k.encode("utf-8"), k) for k in entries)
    return [ref_leaf(algorithm, k, entries[k]) for _, k in keys]


def ref_mth(algorithm: str, hashes: list[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    k = ref_split(len(hashes))
    return ref_node(algorithm, ref_mth(algorithm, hashes[:k]), ref_mth(algorithm, hashes[k:]))


def ref_merkle_root(algorithm: str, entries: dict[str, bytes]) -> bytes:
    if not entries:
        return H(algorithm, TAGS["empty"])
    return ref_mth(algorithm, ref_leaves(algorithm, entries))


def ref_root_from_proof(algorithm: str, key: str, digest: bytes, index: int, size: int,
                        siblings: list[bytes]) -> bytes:
    """Recompute a root from a leaf-to-root sibling list (SPEC.md 2.4.4)."""
    sides = []  # True where the leaf's subtree is the left child, root first
    lo, hi = 0, size
    while hi - lo > 1:
        k = ref_split(hi - lo)
        if index < lo + k:
            sides.append(True)
            hi = lo + k
        else:
            sides.append(False)
            lo += k
    assert len(sides) == len(siblings)
    node = ref_leaf(algorithm, key, digest)
    for is_left, sib in zip(reversed(sides), siblings):
        node = ref_node(algorithm, node, sib) if is_left else ref_node(algorithm, sib, node)
    return node


def ref_chained_root(algorithm: str, step_block: int, prev: bytes, merkle: bytes) -> bytes:
    return H(algorithm, TAGS["step-block"] + be64(step_block) + prev + merkle)


def ref_run_root(algorithm: str, config: bytes, last: bytes, final_model: bytes) -> bytes:
    return H(algorithm, TAGS["run"] + config + last + final_model)


def ref_signed_message(context: str, message: bytes) -> bytes:
    return TAGS["signature"] + lp(context.encode("ascii")) + message


def ref_files_root(algorithm: str, files: dict[str, bytes]) -> bytes:
    return ref_merkle_root(algorithm, {k: H(algorithm, TAGS["file"] + v) for k, v in files.items()})


def ref_model_digest(algorithm: str, weights_root: bytes, files: dict[str, bytes]) -> bytes:
    return H(algorithm, TAGS["model"] + weights_root + ref_files_root(algorithm, files))


def ref_canonical_json(obj) -> bytes:
    """2.3: sorted keys (code point order = UTF-8 byte order), no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def ref_agreement_digest(algorithm: str, doc: dict) -> bytes:
    body = {k: v for k, v in doc.items() if k != "client"}
    return H(algorithm, TAGS["agreement"] + ref_canonical_json(body))


# =============================================================================================
# Inputs of the vectors (SPEC.md Appendix A)
# =============================================================================================

F32_NAME, F32_SHAPE, F32_VALUES = "w", (2, 2), (1.0, -2.0, 0.5, 3.25)
I64_NAME, I64_SHAPE, I64_VALUES = "input_ids", (3,), (1, 2, -3)
SCALAR_NAME, SCALAR_VALUE = "loss", 0.75
F32_BYTES = struct.pack("<4f", *F32_VALUES)
I64_BYTES = struct.pack("<3q", *I64_VALUES)
SCALAR_BYTES = struct.pack("<f", SCALAR_VALUE)

CONFIG_DIGEST = bytes([0x11]) * 32
MERKLE_0 = bytes([0x22]) * 32
MERKLE_1 = bytes([0x23]) * 32
LAST_ROOT = bytes([0x33]) * 32
FINAL_MODEL = bytes([0x44]) * 32
SIGNING_SEED = bytes(range(32))
SIGNED_CONTEXT, SIGNED_MESSAGE = "step-block", bytes([0x55]) * 32
MODEL_FILES = {"config.json": b'{"model_type":"llama"}', "tokenizer.json": b'{"v":1}'}
DATA_ROOT = bytes([0x66]) * 32
AGREED_SETTINGS = {  # every field of 4.3, in no particular order (canonical JSON sorts them)
    "steps": 4, "batch_size": 2, "grad_accum": 1, "seq_len": 16, "image_size": 0, "optimizer": "adamw", "lr": 0.001,
    "beta1": 0.9, "beta2": 0.999, "eps": 1e-08, "weight_decay": 0.0, "momentum": 0.9, "schedule": "constant",
    "warmup_steps": 0, "max_grad_norm": 1.0, "seed": 0, "layers_per_block": 2, "steps_per_block": 2,
    "checkpoint_interval": 1, "dtype": "float32", "attn_implementation": "sdpa", "hash_algorithm": None, "lora": None,
}


def agreement_doc(algorithm: str) -> dict:
    """Appendix A's agreement: base tensors F32 and I64, tokenizer = MODEL_FILES' tokenizer.json."""
    tensors = {F32_NAME: ref_tensor_digest(algorithm, F32_NAME, "F32", F32_SHAPE, F32_BYTES),
               I64_NAME: ref_tensor_digest(algorithm, I64_NAME, "I64", I64_SHAPE, I64_BYTES)}
    return {
        "format": "aftune.agreement.v1", "hash": algorithm,
        "base_model": {"config": {"model_type": "llama"}, "generation_config": None,
                       "tensors": {k: v.hex() for k, v in tensors.items()},
                       "weights": ref_merkle_root(algorithm, tensors).hex(),
                       "tokenizer": ref_files_root(algorithm, {"tokenizer.json": MODEL_FILES["tokenizer.json"]}).hex()},
        "data": {"kind": "text", "root": DATA_ROOT.hex(), "num_examples": 3, "labels": []},
        "settings": {**AGREED_SETTINGS, "hash_algorithm": algorithm},
        "inference": None,
    }


def leaf_entries(n: int) -> dict[str, bytes]:
    """Leaves "leaf/0".."leaf/{n-1}" with digest i = 32 bytes of value i+1, inserted in reverse
    order (so the implementation must sort)."""
    return {f"leaf/{i}": bytes([i + 1]) * 32 for i in reversed(range(n))}


# The constants printed in SPEC.md Appendix A.
VECTORS = {
    "blake3": {
        "tensor_f32": "ea8f96f1a884ef0c85e17049ab749563d093e25fba08c3cb08ccff331a25fe11",
        "tensor_i64": "ae3b56590c24013f318e4b4f8d0b330af8e0dfb18a1db92621ff4b466c60283e",
        "tensor_scalar": "be3e4454d45d6cf49eb0744cd302ef52b352536965720cca83a6a3549ff31f5e",
        "empty": "cf9bbd9ee0e7049497b6d86d6858cb420a162967f512236b723aa3b98dc21e1a",
        "merkle_1": "96f04a2f449c1034fde4c498e955250a9b352c21dd4b1a344e208d4c845c599b",
        "merkle_2": "56709ef21cad89f0373c1944bd22e8e478d859633cf0282b76724154babfecf9",
        "merkle_3": "c42fcf0e320856807cbefedb1ec05d60c631da1d0fb5c9244d9c066941380fe3",
        "merkle_5": "dc15bdc005398b937361bd37d326bafe2c89a553f0229301176f98551af4b51e",
        "chained_0": "8e2d309597d9afe45fafcb226e0e95588532d215876e1134db1b9a1e59d434cd",
        "chained_1": "e68116169a5cd9bde74a09eb6fd5509b2f36f3808792c79bb177d3aef2465ab4",
        "run_root": "4ec71be4670ffaf8c0b7c6b080ac330e5e69c5af3e83fd5435290551b9927288",
        "model": "b7d2ed9ece498f620d257b1747d71a58349d97008f1a8a20df504abe188f2fab",
        "agreement": "85cb4396c214107daedefa49c9f44bb2b821823f7301ed6e2e7a2086e7948ed3",
        "steps_root": "91cd297b0b8d6bb92aec56f162882bb790080be45ed8d559494334f0a1ad4e6f",
    },
    "sha256": {
        "tensor_f32": "dbd71c5e88146fb57d590360ba0354659d57fde5d7787236353e6b05a7129624",
        "tensor_i64": "54a46370d8b8a74b763801c80e03591d1485b0c712e5c8d1267da32b9ac659c2",
        "tensor_scalar": "53509f20645963ecf33b0b0147aac48a5c315a940814111c18f9ac8628d484ad",
        "empty": "89147316576adf8f9e89870a06afcbd36ee8129823dfc4dd7e524bae4c1a8a02",
        "merkle_1": "c7e00a06812f1c7a45040b29b56449106811440c4c3e14edd7280f4da85f4af1",
        "merkle_2": "b08e9ecacef0c6065d338b64e0a4fa3c3761abb42d1ff4c8dc9379b38d4f866d",
        "merkle_3": "119fecc4a37128951e1664510d0205411a7e02fa11bbf7e62d76df2f5689aade",
        "merkle_5": "995dd42ba34f2d7a890c4746651be4b1cceb9c0bc815dd8064ae3d4620c116b5",
        "chained_0": "41365a4d1ae8d3f123f1f23617d5ab0a0b557d9e846e392c9aa05582d3c0881f",
        "chained_1": "c758d3fd31fd6f7f714f3081e8719ddd491ae158d6dcb1a7847b397377b00cb2",
        "run_root": "c3dc486aff74d404a765ab5542607ff850e8abd43fb6d4c2ad50f8c732873f0d",
        "model": "76eee094fc3d71c3f4e2952927d8a5e50e35efaeb9f5f4868ed172f33ff1959d",
        "agreement": "fc5d5dd51cc49d751345ddd65ca5803b6a8613df0a1cbb2a06a6d8fcc5311994",
        "steps_root": "1215a4acd398b6fd9c6279e097c7bb28317734a7dbbc566ab035989a3ca16af8",
    },
}
SIGNATURE_HEX = (
    "13c78263ddc74d9867bce0873dcfc4c5f421a8920ebe6fefdf27af1a009d899c"
    "e4adf6d7b91756290923cc459f31386508d8e2cc30e32391938dbc1262066109"
)
PUBLIC_KEY_HEX = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"


def _check_vector(algorithm: str, name: str, value: bytes) -> None:
    expected = VECTORS.get(algorithm, {}).get(name)
    assert expected, f"vector {algorithm}/{name} missing from VECTORS (and SPEC.md Appendix A): {value.hex()}"
    assert value.hex() == expected


# =============================================================================================
# 2.1 tags
# =============================================================================================


def test_tags_match_spec_table():
    from aftune.core import encoding

    ours = {
        "tensor": encoding.TAG_TENSOR, "leaf": encoding.TAG_LEAF, "node": encoding.TAG_NODE,
        "empty": encoding.TAG_EMPTY, "step-block": encoding.TAG_STEP_BLOCK, "run": encoding.TAG_RUN,
        "run-config": encoding.TAG_RUN_CONFIG, "example": encoding.TAG_EXAMPLE, "order": encoding.TAG_ORDER,
        "file": encoding.TAG_FILE, "signature": encoding.TAG_SIGNATURE, "rng": encoding.TAG_RNG,
        "model": encoding.TAG_MODEL, "agreement": encoding.TAG_AGREEMENT, "lora-init": encoding.TAG_LORA_INIT,
    }
    assert ours == TAGS
    assert encoding.ENCODING_VERSION == 1
    for tag in TAGS.values():  # prefix-free: no tag is a prefix of another
        assert tag.endswith(b"\x00") and tag.count(b"\x00") == 1
    assert len(set(TAGS.values())) == len(TAGS)


# =============================================================================================
# 2.2 tensor digest
# =============================================================================================


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tensor_digest_float32(algorithm):
    from aftune.core.encoding import tensor_digest

    t = torch.tensor(F32_VALUES, dtype=torch.float32).reshape(F32_SHAPE)
    ref = ref_tensor_digest(algorithm, F32_NAME, "F32", F32_SHAPE, F32_BYTES)
    assert tensor_digest(F32_NAME, t, algorithm) == ref
    _check_vector(algorithm, "tensor_f32", ref)
    # a non-contiguous view hashes its logical (row-major) elements
    assert tensor_digest(F32_NAME, t.t().contiguous().t(), algorithm) == ref
    # the name is part of the digest
    assert tensor_digest("v", t, algorithm) != ref


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tensor_digest_int64(algorithm):
    from aftune.core.encoding import tensor_digest

    t = torch.tensor(I64_VALUES, dtype=torch.int64)
    ref = ref_tensor_digest(algorithm, I64_NAME, "I64", I64_SHAPE, I64_BYTES)
    assert tensor_digest(I64_NAME, t, algorithm) == ref
    _check_vector(algorithm, "tensor_i64", ref)
    # the dtype is part of the digest even where the bytes would agree
    assert tensor_digest(I64_NAME, t.to(torch.int32), algorithm) != ref


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tensor_digest_scalar(algorithm):
    from aftune.core.encoding import tensor_digest

    t = torch.tensor(SCALAR_VALUE, dtype=torch.float32)
    ref = ref_tensor_digest(algorithm, SCALAR_NAME, "F32", (), SCALAR_BYTES)
    assert tensor_digest(SCALAR_NAME, t, algorithm) == ref
    _check_vector(algorithm, "tensor_scalar", ref)
    assert tensor_digest(SCALAR_NAME, t.reshape(1), algorithm) != ref  # shape [] differs from [1]


def test_tensor_header_bytes():
    from aftune.core.encoding import tensor_header

    expected = (b"\x00\x00\x00\x01" b"w" b"\x03" b"F32" b"\x00\x00\x00\x02"
                b"\x00\x00\x00\x00\x00\x00\x00\x02" b"\x00\x00\x00\x00\x00\x00\x00\x02"
                b"\x00\x00\x00\x00\x00\x00\x00\x10")
    assert tensor_header("w", "F32", (2, 2), 16) == expected


def test_bool_and_bf16_tensors():
    from aftune.core.encoding import tensor_digest

    b = torch.tensor([True, False, True])
    assert tensor_digest("m", b, "blake3") == ref_tensor_digest("blake3", "m", "BOOL", (3,), b"\x01\x00\x01")
    x = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert tensor_digest("x", x, "blake3") == ref_tensor_digest("blake3", "x", "BF16", (2,), b"\x80\x3f\x00\xc0")


# =============================================================================================
# 2.3 canonical JSON
# =============================================================================================


def test_canonical_json():
    from aftune.core.encoding import canonical_json
    from aftune.errors import InputError

    doc = {"b": 1e-08, "a": [1.0, 0.001, True, None], "\u00e9": "\u00fc"}
    assert canonical_json(doc) == b'{"a":[1.0,0.001,true,null],"b":1e-08,"\xc3\xa9":"\xc3\xbc"}'
    with pytest.raises(InputError):
        canonical_json({"x": float("nan")})


# =============================================================================================
# 2.4 Merkle trees and proofs
# =============================================================================================


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_merkle_empty(algorithm):
    from aftune.core.merkle import merkle_root

    ref = H(algorithm, TAGS["empty"])
    assert merkle_root(algorithm, {}) == ref == ref_merkle_root(algorithm, {})
    _check_vector(algorithm, "empty", ref)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_merkle_root_vectors(algorithm, n):
    from aftune.core.merkle import merkle_root

    entries = leaf_entries(n)
    L = [ref_leaf(algorithm, f"leaf/{i}", bytes([i + 1]) * 32) for i in range(n)]
    N = lambda a, b: ref_node(algorithm, a, b)  # noqa: E731
    explicit = {  # the tree shapes of SPEC.md 2.4.2, written out by hand
        1: lambda: L[0],
        2: lambda: N(L[0], L[1]),
        3: lambda: N(N(L[0], L[1]), L[2]),
        5: lambda: N(N(N(L[0], L[1]), N(L[2], L[3])), L[4]),
    }[n]()
    assert ref_merkle_root(algorithm, entries) == explicit
    assert merkle_root(algorithm, entries) == explicit
    _check_vector(algorithm, f"merkle_{n}", explicit)


def test_merkle_sorts_keys_by_utf8_bytes():
    from aftune.core.merkle import merkle_root

    # Code-point (= UTF-8 byte) order puts U+FFFF before U+1F600; UTF-16 order would not.
    entries = {"\U0001F600": b"\x01" * 32, "\uffff": b"\x02" * 32, "Z": b"\x03" * 32, "a": b"\x04" * 32}
    leaves = [ref_leaf("blake3", k, entries[k]) for k in ("Z", "a", "\uffff", "\U0001F600")]
    expected = ref_node("blake3", ref_node("blake3", leaves[0], leaves[1]), ref_node("blake3", leaves[2], leaves[3]))
    assert merkle_root("blake3", entries) == expected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n", range(1, 10))
def test_merkle_proofs(algorithm, n):
    from aftune.core.merkle import merkle_root, prove, root_from_proof

    entries = leaf_entries(n)
    root = merkle_root(algorithm, entries)
    assert root == ref_merkle_root(algorithm, entries)
    for i in range(n):
        key = f"leaf/{i}"
        proof = prove(algorithm, entries, key)
        assert (proof.key, proof.index, proof.size) == (key, i, n)
        depth = 0  # expected proof length: the leaf's depth in the RFC 6962 shape
        lo, hi = 0, n
        while hi - lo > 1:
            k = ref_split(hi - lo)
            lo, hi = (lo, lo + k) if i < lo + k else (lo + k, hi)
            depth += 1
        assert len(proof.siblings) == depth <= max(0, (n - 1).bit_length())
        assert root_from_proof(algorithm, proof, entries[key]) == root
        assert ref_root_from_proof(algorithm, key, entries[key], i, n, list(proof.siblings)) == root
        changed = bytes([entries[key][0] ^ 0x80]) + entries[key][1:]
        assert root_from_proof(algorithm, proof, changed) != root
        assert ref_root_from_proof(algorithm, key, changed, i, n, list(proof.siblings)) != root


def test_proof_rejects_wrong_shape():
    from aftune.errors import InputError
    from aftune.core.merkle import InclusionProof, prove, root_from_proof

    entries = leaf_entries(5)
    proof = prove("blake3", entries, "leaf/2")
    with pytest.raises(InputError):
        root_from_proof("blake3", InclusionProof(proof.key, 5, 5, proof.siblings), entries["leaf/2"])
    with pytest.raises(InputError):
        root_from_proof("blake3", InclusionProof(proof.key, 2, 5, proof.siblings[:-1]), entries["leaf/2"])
    with pytest.raises(InputError):
        prove("blake3", entries, "leaf/9")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tensors_root_and_files_root(algorithm):
    from aftune.core.merkle import files_root, tensors_root

    tensors = {F32_NAME: torch.tensor(F32_VALUES).reshape(F32_SHAPE), I64_NAME: torch.tensor(I64_VALUES)}
    root, digests = tensors_root(algorithm, tensors)
    ref_digests = {F32_NAME: ref_tensor_digest(algorithm, F32_NAME, "F32", F32_SHAPE, F32_BYTES),
                   I64_NAME: ref_tensor_digest(algorithm, I64_NAME, "I64", I64_SHAPE, I64_BYTES)}
    assert digests == ref_digests
    assert root == ref_merkle_root(algorithm, ref_digests)
    files = {"tokenizer.json": b'{"v":1}', "special_tokens_map.json": b"{}"}
    assert files_root(algorithm, files) == ref_merkle_root(
        algorithm, {k: H(algorithm, TAGS["file"] + v) for k, v in files.items()})


# =============================================================================================
# 3.3 manifests and chained roots, 3.4 run root
# =============================================================================================


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_chained_root(algorithm):
    from aftune.training.manifest import chained_root

    r0 = ref_chained_root(algorithm, 0, CONFIG_DIGEST, MERKLE_0)
    assert chained_root(algorithm, 0, CONFIG_DIGEST, MERKLE_0) == r0
    r1 = ref_chained_root(algorithm, 1, r0, MERKLE_1)
    assert chained_root(algorithm, 1, r0, MERKLE_1) == r1
    _check_vector(algorithm, "chained_0", r0)
    _check_vector(algorithm, "chained_1", r1)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_run_root(algorithm):
    from aftune.training.transcript import run_root

    ref = ref_run_root(algorithm, CONFIG_DIGEST, LAST_ROOT, FINAL_MODEL)
    assert run_root(algorithm, CONFIG_DIGEST, LAST_ROOT, FINAL_MODEL) == ref
    _check_vector(algorithm, "run_root", ref)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_model_digest(algorithm):
    """3.6: the weights root bound with config.json, generation_config.json and tokenizer files."""
    from aftune.core.merkle import model_digest

    weights = ref_merkle_root(algorithm, {F32_NAME: ref_tensor_digest(algorithm, F32_NAME, "F32", F32_SHAPE, F32_BYTES),
                                          I64_NAME: ref_tensor_digest(algorithm, I64_NAME, "I64", I64_SHAPE, I64_BYTES)})
    ref = ref_model_digest(algorithm, weights, MODEL_FILES)
    assert model_digest(algorithm, weights, MODEL_FILES) == ref
    _check_vector(algorithm, "model", ref)
    edited = {**MODEL_FILES, "config.json": b'{"model_type":"llama","rope_theta":1}'}
    assert model_digest(algorithm, weights, edited) != ref  # an edited config is another model


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_agreement_digest_and_client_signature(tmp_path, algorithm):
    """4.5: H(TAG_AGREEMENT || canonical_json(agreement without "client")); the client signs it."""
    from aftune.core.signing import PublicKey
    from aftune.errors import CommitmentMismatch, InputError
    from aftune.training.agreement import Agreement

    doc = agreement_doc(algorithm)
    ref = ref_agreement_digest(algorithm, doc)
    ours = Agreement.from_json(json.loads(json.dumps(doc)))
    assert ours.digest() == ref and ours.to_json() == doc
    path = tmp_path / "agreement.json"
    path.write_bytes(ref_canonical_json(doc) + b"\n")
    assert Agreement.load(path).digest() == ref
    _check_vector(algorithm, "agreement", ref)

    sk = _private_key()  # the client's key
    signature = sk.sign(ref_signed_message("agreement", ref))
    signed = {**doc, "client": {"key": "ed25519:" + PUBLIC_KEY_HEX, "signature": signature.hex()}}
    parsed = Agreement.from_json(signed)
    assert parsed.digest() == ref  # the signature is not part of what is signed
    parsed.check_signature(PublicKey.from_text("ed25519:" + PUBLIC_KEY_HEX))
    forged = {**signed, "data": {**doc["data"], "num_examples": 4}}  # edited after signing
    with pytest.raises(CommitmentMismatch, match="edited"):
        Agreement.from_json(forged).check_signature(PublicKey.from_text("ed25519:" + PUBLIC_KEY_HEX))
    wrong_weights = {**doc, "base_model": {**doc["base_model"], "weights": "00" * 32}}
    with pytest.raises(InputError, match="weights"):
        Agreement.from_json(wrong_weights)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_step_block_manifest_root(algorithm):
    from aftune.training.manifest import StepBlockManifest
    from aftune.core.store import TensorRef

    w = torch.tensor(F32_VALUES).reshape(F32_SHAPE)
    ids = torch.tensor(I64_VALUES)
    common = {"step/00000000/micro/0000/batch/input_ids": TensorRef.of("input_ids", ids, algorithm)}
    blocks = [{"state/w": TensorRef.of("w", w, algorithm)}, {}]
    m = StepBlockManifest(0, 0, 1, common, blocks)
    d_ids = ref_tensor_digest(algorithm, I64_NAME, "I64", I64_SHAPE, I64_BYTES)
    d_w = ref_tensor_digest(algorithm, F32_NAME, "F32", F32_SHAPE, F32_BYTES)
    subtrees = {
        "common": ref_merkle_root(algorithm, {"step/00000000/micro/0000/batch/input_ids": d_ids}),
        "block/0000": ref_merkle_root(algorithm, {"state/w": d_w}),
        "block/0001": H(algorithm, TAGS["empty"]),
    }
    assert m.subtree_roots(algorithm) == subtrees
    assert m.merkle_root(algorithm) == ref_merkle_root(algorithm, subtrees)
    # the JSON form round-trips and rows are [key, name, dtype, shape, digest hex]
    doc = json.loads(json.dumps(m.to_json()))
    assert doc["format"] == "aftune.manifest.v3"  # v2's rows (no tied-weight parts, 5.2.4), stored as zstd (3.3.1)
    assert doc["blocks"][0] == [["state/w", "w", "F32", [2, 2], d_w.hex()]]
    assert StepBlockManifest.from_json(doc, 2).merkle_root(algorithm) == m.merkle_root(algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_config_example_order_and_rng(algorithm):
    from aftune.data import epoch_order
    from aftune.training.engine import rng_seed
    from aftune.training.run import config_digest

    cfg = b'{"format":"aftune.run.v1"}'
    assert config_digest(algorithm, cfg) == H(algorithm, TAGS["run-config"] + cfg)
    keys = sorted((H(algorithm, TAGS["order"] + be64(7) + be64(2) + be64(i)), i) for i in range(10))
    assert epoch_order(algorithm, 7, 2, 10) == [i for _, i in keys]
    d = H(algorithm, TAGS["rng"] + be64(3) + be64(4) + be64(1) + be64(2))
    assert rng_seed(algorithm, 3, 4, 1, 2) == int.from_bytes(d[:8], "big") & (2**63 - 1)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dataset_root(tmp_path, algorithm):
    from aftune.data import load_dataset

    lines = [b'{"text": "one"}\r', b"", b"   ", b'{"text": "two"} ', b'{"messages": [{"role": "user", "content": "x"}]}']
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    ds = load_dataset(path)
    raws = [b'{"text": "one"}', b'{"text": "two"} ', b'{"messages": [{"role": "user", "content": "x"}]}']
    expected = ref_merkle_root(algorithm, {f"{i:012d}": H(algorithm, TAGS["example"] + r) for i, r in enumerate(raws)})
    assert ds.kind == "text"
    assert ds.root(algorithm) == expected


def test_object_store_layout(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    from aftune.core.store import ObjectStore, TensorRef

    t = torch.tensor(F32_VALUES).reshape(F32_SHAPE)
    ref = TensorRef.of(F32_NAME, t, "blake3")
    store = ObjectStore(tmp_path, "blake3")
    path = store.put(ref, t)
    h = ref.digest.hex()
    assert path == tmp_path / h[:2] / f"{h}.safetensors.zst"
    blob = path.read_bytes()
    assert zstandard.get_frame_parameters(blob).content_size > 0
    payload = zstandard.ZstdDecompressor().decompress(blob)
    n = struct.unpack("<Q", payload[:8])[0]
    header = json.loads(payload[8:8 + n])
    assert header == {F32_NAME: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    assert payload[8 + n:] == F32_BYTES
    assert torch.equal(store.get(ref, "test"), t)


# =============================================================================================
# 2.6 signatures, 3.4 transcript
# =============================================================================================


def _private_key():
    return ed25519.Ed25519PrivateKey.from_private_bytes(SIGNING_SEED)


def test_signed_message_and_signature():
    from aftune.core.signing import PublicKey, SigningKey, signed_message

    expected_msg = b"aftune.v1.signature\x00" + b"\x00\x00\x00\x0a" + b"step-block" + SIGNED_MESSAGE
    assert ref_signed_message(SIGNED_CONTEXT, SIGNED_MESSAGE) == expected_msg
    assert signed_message(SIGNED_CONTEXT, SIGNED_MESSAGE) == expected_msg

    sk = _private_key()
    raw_pub = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ours = SigningKey(sk)
    sig = ours.sign(SIGNED_CONTEXT, SIGNED_MESSAGE)
    assert sig == sk.sign(expected_msg)  # Ed25519 is deterministic
    sk.public_key().verify(sig, expected_msg)  # raises on failure
    assert ours.public_key.raw == raw_pub
    assert ours.public_key.text == "ed25519:" + raw_pub.hex()
    assert raw_pub.hex() == PUBLIC_KEY_HEX
    assert sig.hex() == SIGNATURE_HEX

    pub = PublicKey.from_text("ed25519:" + raw_pub.hex())
    assert pub.verify(SIGNED_CONTEXT, SIGNED_MESSAGE, sig)
    assert not pub.verify("run", SIGNED_MESSAGE, sig)  # context separation
    assert not pub.verify(SIGNED_CONTEXT, bytes(32), sig)
    # a signature over the bare message (no tag, no context) is not accepted
    assert not pub.verify(SIGNED_CONTEXT, SIGNED_MESSAGE, sk.sign(SIGNED_MESSAGE))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_transcript_lines(tmp_path, algorithm):
    from aftune.core.signing import PublicKey, SigningKey
    from aftune.training.transcript import Transcript, TranscriptWriter

    sk = _private_key()
    pub = sk.public_key()
    path = tmp_path / "transcript.jsonl"
    writer = TranscriptWriter(path, SigningKey(sk), algorithm, CONFIG_DIGEST)
    r0 = writer.step_block(0, 0, 4, MERKLE_0)
    r1 = writer.step_block(1, 4, 0, MERKLE_1)
    run = writer.finish(FINAL_MODEL)

    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 5
    head, s0, s1, last = (json.loads(x) for x in lines[:4])
    raw_pub = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert list(head) == ["type", "format", "hash", "config_digest", "public_key", "signature"]
    assert head["type"] == "header" and head["format"] == "aftune.transcript.v1" and head["hash"] == algorithm
    assert head["config_digest"] == CONFIG_DIGEST.hex() and head["public_key"] == "ed25519:" + raw_pub.hex()
    pub.verify(bytes.fromhex(head["signature"]), ref_signed_message("run-header", CONFIG_DIGEST))

    prev = CONFIG_DIGEST
    for line, idx, first, num, merkle, root in ((s0, 0, 0, 4, MERKLE_0, r0), (s1, 1, 4, 0, MERKLE_1, r1)):
        assert list(line) == ["type", "step_block", "first_step", "num_steps", "merkle_root", "prev", "root", "signature"]
        assert (line["type"], line["step_block"], line["first_step"], line["num_steps"]) == ("step_block", idx, first, num)
        expected_root = ref_chained_root(algorithm, idx, prev, merkle)
        assert line["merkle_root"] == merkle.hex() and line["prev"] == prev.hex()
        assert line["root"] == expected_root.hex() == root.hex()
        pub.verify(bytes.fromhex(line["signature"]), ref_signed_message("step-block", expected_root))
        prev = expected_root

    assert list(last) == ["type", "config_digest", "last_root", "final_model_digest", "root", "signature"]
    expected_run = ref_run_root(algorithm, CONFIG_DIGEST, prev, FINAL_MODEL)
    assert last["type"] == "run" and last["last_root"] == prev.hex() and last["root"] == expected_run.hex() == run.hex()
    pub.verify(bytes.fromhex(last["signature"]), ref_signed_message("run", expected_run))

    t = Transcript.load(path, PublicKey(raw_pub))
    assert [e.root for e in t.step_blocks] == [r0, r1] and t.run.root == run


def test_transcript_rejects_tampering(tmp_path):
    from aftune.errors import RecordError
    from aftune.core.signing import PublicKey, SigningKey
    from aftune.training.transcript import Transcript, TranscriptWriter

    sk = _private_key()
    pub = PublicKey(sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    path = tmp_path / "transcript.jsonl"
    writer = TranscriptWriter(path, SigningKey(sk), "blake3", CONFIG_DIGEST)
    writer.step_block(0, 0, 4, MERKLE_0)
    writer.finish(FINAL_MODEL)
    good = path.read_bytes()
    Transcript.load(path, pub)

    bad = good.replace(MERKLE_0.hex().encode(), MERKLE_1.hex().encode())
    path.write_bytes(bad)
    with pytest.raises(RecordError):
        Transcript.load(path, pub)
    other = SigningKey(ed25519.Ed25519PrivateKey.from_private_bytes(bytes(32)))
    path.write_bytes(good)
    with pytest.raises(RecordError):  # not the pinned key
        Transcript.load(path, other.public_key)
    path.write_bytes(good + b'{"type":"step_block"}\n')
    with pytest.raises(RecordError):  # nothing may follow the run entry
        Transcript.load(path, pub)


# The per-step activations of one boundary of an inference record (SPEC.md 8.4): three steps of a
# [1, q, 2] F32 hidden state (a two-position prompt, then one position per token).
STEP_ACTIVATIONS = [((1, 2, 2), [1.0, -2.0, 0.5, 3.25]), ((1, 1, 2), [0.25, -1.0]), ((1, 1, 2), [4.0, 0.125])]


def ref_steps_root(algorithm: str, steps) -> bytes:
    """SPEC.md 8.4: leaf key %06d of the step, leaf digest the tensor digest named `activation`."""
    return ref_merkle_root(algorithm, {
        f"{k:06d}": ref_tensor_digest(algorithm, "activation", "F32", shape, struct.pack(f"<{len(v)}f", *v))
        for k, (shape, v) in enumerate(steps)})


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_inference_steps_root(algorithm):
    from aftune.inference.record import steps_root

    ref = ref_steps_root(algorithm, STEP_ACTIVATIONS)
    parts = [torch.tensor(v, dtype=torch.float32).reshape(shape) for shape, v in STEP_ACTIVATIONS]
    assert steps_root(algorithm, parts) == ref
    _check_vector(algorithm, "steps_root", ref)
    # the same activations cut into other steps give another root: the layout is committed
    whole = torch.cat(parts, dim=1)
    assert steps_root(algorithm, [whole]) != ref
    assert steps_root(algorithm, list(torch.split(whole, [1, 2, 1], dim=1))) != ref


def test_spec_appendix_lists_every_vector():
    """SPEC.md Appendix A prints the same constants as this file."""
    spec = Path(__file__).resolve().parents[1] / "SPEC.md"
    if not spec.is_file():
        pytest.skip("SPEC.md not present")
    text = spec.read_text(encoding="utf-8")
    appendix = text[text.index("## Appendix A"):]
    for algorithm, vectors in VECTORS.items():
        for name, value in vectors.items():
            assert value in appendix, f"{algorithm}/{name} is not in SPEC.md Appendix A"
    assert PUBLIC_KEY_HEX in appendix
    assert SIGNATURE_HEX[:64] in appendix and SIGNATURE_HEX[64:] in appendix


# =============================================================================================
# Reader rules: 2.3 strict JSON and digest fields, 3.2 objects, 3.4.5 / 4.3 transcript length,
# 4.1 label order, 4.3 settings bounds, 6.3 tolerance comparisons
# =============================================================================================


def test_digest_fields_are_exactly_64_lowercase_hex_digits():
    from aftune.core.encoding import parse_hex_digest
    from aftune.errors import InputError

    good = "0123456789abcdef" * 4
    assert parse_hex_digest(good, "x") == bytes.fromhex(good)
    bad = [good.upper(), good[:62] + "  ", " " + good[1:], good[:-1], good + "0", good[:-2] + "0g", 7, None, b"00" * 32]
    for value in bad:
        with pytest.raises(InputError):
            parse_hex_digest(value, "x")


@pytest.mark.parametrize("doc", [b'{"a":1,"a":1}', b'{"a":{"b":1,"b":2}}', b'{"a":NaN}', b'[Infinity]',
                                 b'{"a":-Infinity}', b'{"a":', b'\xff'])
def test_strict_json_rejects_duplicates_and_non_finite_literals(doc):
    from aftune.core import jsonio

    with pytest.raises(ValueError):
        jsonio.loads(doc)


def test_manifest_reader_is_strict(tmp_path):
    from aftune.errors import InputError, RecordError
    from aftune.training.manifest import StepBlockManifest

    d = "ab" * 32
    doc = {"format": "aftune.manifest.v1", "step_block": 0, "first_step": 0, "num_steps": 1,
           "common": [["k", "n", "F32", [1], d]], "blocks": [[]]}
    StepBlockManifest.from_json(doc, 1)
    path = tmp_path / "000000.json"
    path.write_text(json.dumps(doc)[:-1] + ',"step_block":0}')  # a repeated member name
    with pytest.raises(RecordError):
        StepBlockManifest.read(path, 1)
    for row in (["\ud800", "n", "F32", [1], d], ["k", "n", "F32", [1], d.upper()], ["k", "n", "F32", [True], d]):
        with pytest.raises(InputError):
            StepBlockManifest.from_json({**doc, "common": [row]}, 1)


def test_objects_must_declare_their_content_size(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    from safetensors.torch import save

    from aftune.errors import CommitmentMismatch, RecordError
    from aftune.core.store import ObjectStore, TensorRef

    t = torch.tensor(F32_VALUES).reshape(F32_SHAPE)
    ref = TensorRef.of(F32_NAME, t, "blake3")
    store = ObjectStore(tmp_path, "blake3")
    path = store.put(ref, t)
    good = path.read_bytes()
    for blob in (zstandard.ZstdCompressor(write_content_size=False).compress(save({F32_NAME: t})), good[:-4]):
        path.write_bytes(blob)
        with pytest.raises(RecordError) as info:
            store.get(ref, "test")
        assert not isinstance(info.value, CommitmentMismatch)  # a record error, not a FAIL
    path.write_bytes(zstandard.ZstdCompressor().compress(save({F32_NAME: t * 2})))
    with pytest.raises(CommitmentMismatch):  # readable but not the committed tensor
        store.get(ref, "test")


def test_label_order(tmp_path):
    from aftune.data import load_dataset

    labels = [10, "-2", 2, "01", "b", "+1", "a", "\u00e9", "1 ", 0, "-1", "Z"]
    path = tmp_path / "l.jsonl"
    path.write_text("".join(json.dumps({"text": "x", "label": v}) + "\n" for v in labels), encoding="utf-8")
    ds = load_dataset(path)
    assert ds.kind == "labeled_text"
    assert list(ds.labels) == ["-2", "-1", "0", "2", "10", "+1", "01", "1 ", "Z", "a", "b", "\u00e9"]


def test_settings_integers_hashed_as_u64_are_below_2_63():
    from aftune.training.settings import TrainSettings
    from aftune.errors import InputError

    TrainSettings.from_json({"seed": 2**63 - 1})
    for field in ("seed", "warmup_steps", "image_size"):
        with pytest.raises(InputError):
            TrainSettings.from_json({field: 2**63})
        with pytest.raises(InputError):
            TrainSettings.from_json({field: True})


def test_closed_transcript_needs_one_line_per_step_block_plus_the_final_state(tmp_path):
    from aftune.core.encoding import canonical_json
    from aftune.errors import CommitmentMismatch
    from aftune.training.run import RunRecord, config_digest
    from aftune.core.signing import SigningKey
    from aftune.training.transcript import TranscriptWriter

    config = canonical_json({"format": "aftune.run.v1", "settings": {"steps": 8, "steps_per_block": 4}})  # S = 2
    key = SigningKey(_private_key())
    for lines, ok in ((2, False), (3, True), (4, False)):
        run = tmp_path / f"run{lines}"
        run.mkdir()
        (run / "config.json").write_bytes(config)
        writer = TranscriptWriter(run / "transcript.jsonl", key, "blake3", config_digest("blake3", config))
        for s in range(lines):
            writer.step_block(s, 4 * min(s, 2), 4 if s < 2 else 0, bytes([s]) * 32)
        RunRecord.open(run, key.public_key)  # without a run line any number of lines is read
        writer.finish(FINAL_MODEL)
        if ok:
            assert len(RunRecord.open(run, key.public_key).transcript.step_blocks) == 3
        else:
            with pytest.raises(CommitmentMismatch):
                RunRecord.open(run, key.public_key)


def test_tolerance_comparisons():
    from aftune.training.verify import Tolerance, relative_errors, tensor_kind

    inf = float("inf")
    assert relative_errors(torch.tensor([1.0, 2.0]), torch.tensor([float("nan"), 2.0])) == (inf, inf)
    assert relative_errors(torch.tensor([inf, 2.0]), torch.tensor([1.0, 2.0])) == (inf, inf)
    assert relative_errors(torch.tensor([]), torch.tensor([])) == (0.0, 0.0)
    rel, elem = relative_errors(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0]))
    # elem: each element's error over the recomputed element's magnitude plus its row's rms
    # (SPEC.md 6.3; the first argument is the verifier's recomputation)
    assert rel == pytest.approx(1 / 34 ** 0.5) and elem == pytest.approx(1 / (4 + (25 / 2) ** 0.5))
    # a committed element blown up (a flipped exponent bit) does not widen its own bound
    _, elem = relative_errors(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0 ** 60]))
    assert elem > 1e17
    # rows are the last dimension: a row of large values does not hide an error in a small row
    rel, elem = relative_errors(torch.tensor([[100.0, 100.0], [1.0, 1.1]]), torch.tensor([[100.0, 100.0], [1.0, 1.0]]))
    assert elem == pytest.approx(0.1 / (1.1 + (1.21 / 2 + 0.5) ** 0.5))
    # with the block's input as scale: a massive input the block cancelled widens only its element
    scale = torch.tensor([[0.0, 0.0], [0.0, 30.0]])
    _, elem = relative_errors(torch.tensor([[1.0, 1.0], [1.0, 1.1]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]]), scale)
    assert elem == pytest.approx(0.1 / (1.1 + (1.21 / 2 + 0.5) ** 0.5 + 30 + (450 ** 0.5)))
    assert [tensor_kind(c, t) for c, t in (("output", ""), ("loss", ""), ("input_gradient", ""),
                                            ("shared_gradient", ""), ("grad_norms", ""),
                                            ("end_state", "optim/w/exp_avg"), ("end_state", "state/w"),
                                            ("batch", "step/00000000/micro/0000/batch/pixel_values"))] == \
        ["activation", "activation", "gradient", "gradient", "gradient", "optimizer", "weights", "weights"]
    tol = Tolerance(1e-3, 1e-2, per_kind=(("gradient", 1e-2, 1e-1),))
    assert tol.limits("gradient") == (1e-2, 1e-1) and tol.limits("weights") == (1e-3, 1e-2)


# =============================================================================================
# 5.4 portable numerics: LoRA A initialisation
# =============================================================================================


def test_portable_lora_init_vector():
    from aftune.core import grid
    from aftune.training.portable import lora_init

    t = lora_init("blake3", 7, "model.layers.0.self_attn.q_proj.lora_A.default.weight", (2, 4))
    assert [f"{int(b):08x}" for b in grid.bits_of(t).reshape(-1)] == [
        "3edf6ee2", "3e1d8570", "3e3ceacc", "3db64e0f", "3e6f8d06", "bed3f15d", "3d0a1645", "bd56ec33"]
