"""Merkle trees over (key, digest) leaves, with inclusion proofs (SPEC.md 2.4).

Leaves are sorted by key (UTF-8 bytes); keys are unique. The tree splits n leaves at the largest
power of two below n (as RFC 6962), so proofs are at most ceil(log2 n) hashes long.
"""

from __future__ import annotations

from dataclasses import dataclass

from .encoding import TAG_EMPTY, TAG_LEAF, TAG_NODE, hash_message, length_prefixed
from ..errors import InputError


def leaf_hash(algorithm: str, key: str, digest: bytes) -> bytes:
    return hash_message(algorithm, TAG_LEAF, length_prefixed(key.encode("utf-8")), digest)


def node_hash(algorithm: str, left: bytes, right: bytes) -> bytes:
    return hash_message(algorithm, TAG_NODE, left, right)


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _sorted_leaves(algorithm: str, entries: dict[str, bytes]) -> list[bytes]:
    return [leaf_hash(algorithm, key, entries[key]) for key in sorted(entries, key=lambda k: k.encode("utf-8"))]


def _root(algorithm: str, hashes: list[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return node_hash(algorithm, _root(algorithm, hashes[:k]), _root(algorithm, hashes[k:]))


def merkle_root(algorithm: str, entries: dict[str, bytes]) -> bytes:
    """Root over the leaves {key: digest}; the empty tree has root H(TAG_EMPTY)."""
    if not entries:
        return hash_message(algorithm, TAG_EMPTY)
    return _root(algorithm, _sorted_leaves(algorithm, entries))


@dataclass(frozen=True)
class InclusionProof:
    """Sibling hashes from a leaf up to the root; `index` and `size` fix left/right at each level."""

    key: str
    index: int
    size: int
    siblings: tuple[bytes, ...]


def prove(algorithm: str, entries: dict[str, bytes], key: str) -> InclusionProof:
    keys = sorted(entries, key=lambda k: k.encode("utf-8"))
    if key not in entries:
        raise InputError(f"cannot prove {key!r}: it is not a leaf of this tree")
    index = keys.index(key)
    hashes = _sorted_leaves(algorithm, entries)
    siblings: list[bytes] = []

    def walk(lo: int, hi: int) -> None:  # records siblings from the root down, reversed below
        if hi - lo == 1:
            return
        k = _split(hi - lo)
        if index < lo + k:
            siblings.append(_root(algorithm, hashes[lo + k : hi]))
            walk(lo, lo + k)
        else:
            siblings.append(_root(algorithm, hashes[lo : lo + k]))
            walk(lo + k, hi)

    walk(0, len(hashes))
    return InclusionProof(key=key, index=index, size=len(hashes), siblings=tuple(reversed(siblings)))


def root_from_proof(algorithm: str, proof: InclusionProof, digest: bytes) -> bytes:
    """The root that `proof` implies for leaf (proof.key, digest); compare it with a signed root."""
    if not 0 <= proof.index < proof.size:
        raise InputError(f"inclusion proof for {proof.key!r} has index {proof.index} outside size {proof.size}")
    path: list[bool] = []  # True where the leaf's subtree is the left child, from the root down

    lo, hi = 0, proof.size
    while hi - lo > 1:
        k = _split(hi - lo)
        if proof.index < lo + k:
            path.append(True)
            hi = lo + k
        else:
            path.append(False)
            lo = lo + k
    if len(path) != len(proof.siblings):
        raise InputError(f"inclusion proof for {proof.key!r} has {len(proof.siblings)} siblings, expected {len(path)}")
    node = leaf_hash(algorithm, proof.key, digest)
    for is_left, sibling in zip(reversed(path), proof.siblings):
        node = node_hash(algorithm, node, sibling) if is_left else node_hash(algorithm, sibling, node)
    return node


def tensors_root(algorithm: str, tensors) -> tuple[bytes, dict[str, bytes]]:
    """Digest of a set of named tensors (a model's weights): the Merkle root over
    {name: tensor digest}, and the per-tensor digests."""
    from .encoding import tensor_digest

    digests = {name: tensor_digest(name, t, algorithm) for name, t in tensors.items()}
    return merkle_root(algorithm, digests), digests


def files_root(algorithm: str, files: dict[str, bytes]) -> bytes:
    """Digest of a set of named files (tokenizer files): root over {name: H(TAG_FILE || bytes)}."""
    from .encoding import TAG_FILE, hash_message

    return merkle_root(algorithm, {name: hash_message(algorithm, TAG_FILE, data) for name, data in files.items()})


def model_digest(algorithm: str, weights_root: bytes, files: dict[str, bytes]) -> bytes:
    """Digest of a model (SPEC.md 3.6): H(TAG_MODEL || weights root || files_root(files)), where
    `files` are its config, generation config and tokenizer files: what says how to run the
    weights is bound with them."""
    from .encoding import TAG_MODEL, hash_message

    return hash_message(algorithm, TAG_MODEL, weights_root, files_root(algorithm, files))
