"""Challenges: which blocks an audit opens, derived from the signed run root and the client's nonce.

    aftune challenge MY_COPY/transcript.jsonl --public-key PUB --sample-rate 0.1 --strategy weighted --out challenge.json

The provider signs the run root before the client draws its nonce, so while the provider could
still change a block it cannot know whether that block will be checked; and the client cannot
pick blocks after seeing anything but the root, because the derivation is a public function of
(root, nonce, parameters) that anyone can recompute. SPEC.md 9 states every hashed
byte and the sampling algorithms; `aftune.planner` gives their exact detection probabilities.

Strategies (K blocks out of an L x S grid of layer blocks x step blocks):
- uniform: a uniformly random K-subset;
- weighted: the first and last layer blocks (where the data and the loss enter) are `edge_weight`
  times as likely to be drawn (Efraimidis-Spirakis weighted sampling without replacement);
- stratified: K spread over the step blocks as evenly as possible, uniform within each;
- columns: whole step blocks, ceil(K / L) of them drawn uniformly, every layer block of each
  (a deviation concentrated in one layer block per step block cannot hide in the column);
- all: every block.
"""

from __future__ import annotations

import heapq
import json
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core import jsonio
from ..core.encoding import (HASH_ALGORITHMS, TAG_CHALLENGE, TAG_CHALLENGE_BLOCK, TAG_CHALLENGE_DIGEST, TAG_CHALLENGE_STRATUM,
                       canonical_json, hash_message, length_prefixed, u8, u64)
from ..errors import CommitmentMismatch, InputError, RecordError

CHALLENGE_FORMAT = "aftune.challenge.v1"

# Domain tags of the challenge derivation (SPEC.md 9.2). They belong with the others
# in encoding.py / SPEC.md 2.1 once the audit lands; the bytes are fixed here.

KINDS = ("training", "inference")
STRATEGIES = ("uniform", "weighted", "stratified", "columns", "all")
DEFAULT_EDGE_WEIGHT = 4  # weighted: first/last layer blocks are this many times as likely
MAX_EDGE_WEIGHT = 64
NONCE_SIZE = 32  # bytes drawn from `secrets` when the client gives none
MIN_NONCE_SIZE, MAX_NONCE_SIZE = 16, 64
MAX_GRID_BLOCKS = 1 << 20  # bounds the derivation's work (one hash per block) on hostile input
MAX_CHALLENGE_BYTES = 64 << 20
PPM = 1_000_000  # sample rates are fixed-point, in parts per million, so every party hashes the same integer

# Sampling modes, hashed as one byte (SPEC.md 9.2.1).
MODE_COUNT, MODE_RATE, MODE_ALL = 1, 2, 3

_JSON_KEYS = {"format", "kind", "hash", "run_root", "nonce", "strategy", "parameters", "grid", "blocks", "digest"}


@dataclass(frozen=True)
class Challenge:
    """A derived challenge. Build one with `derive_challenge` or `Challenge.from_json` (which
    re-derives it): a Challenge never holds blocks that do not follow from its inputs."""

    kind: str  # "training" (a run) or "inference" (an inference record: step block always 0)
    algorithm: str  # the run's hash function, "blake3" or "sha256"
    run_root: str  # hex: the signed run root (for inference: the record root)
    nonce: str  # hex: the client's random nonce, drawn after the root was signed
    strategy: str  # uniform | weighted | stratified | all
    count: int | None  # blocks asked for (None when a sample rate or "all" was given)
    sample_rate_ppm: int | None  # sample rate in parts per million (None unless a rate was given)
    edge_weight: int | None  # weighted only: the weight of the first and last layer blocks
    num_layer_blocks: int  # grid shape L
    num_step_blocks: int  # grid shape S (1 for inference)
    blocks: tuple[tuple[int, int], ...]  # the challenged (layer_block, step_block), sorted
    digest: str  # hex: H(TAG_CHALLENGE_DIGEST || canonical JSON of everything above)
    format: str = CHALLENGE_FORMAT

    @property
    def num_blocks(self) -> int:
        """N = L x S, the number of blocks in the grid."""
        return self.num_layer_blocks * self.num_step_blocks

    @property
    def num_challenged(self) -> int:
        """K, the number of challenged blocks."""
        return len(self.blocks)

    @property
    def sample_rate(self) -> float | None:
        return None if self.sample_rate_ppm is None else self.sample_rate_ppm / PPM

    @property
    def digest_bytes(self) -> bytes:
        return bytes.fromhex(self.digest)

    def __contains__(self, block: object) -> bool:
        return block in set(self.blocks)

    def describe(self) -> str:
        how = "" if self.sample_rate is None else f" (sample rate {self.sample_rate:g})"
        weight = f", edge weight {self.edge_weight}" if self.edge_weight is not None else ""
        return (f"{self.kind} challenge: {self.num_challenged} of {self.num_blocks} blocks "
                f"({self.num_layer_blocks} layer blocks x {self.num_step_blocks} step blocks), "
                f"strategy {self.strategy}{weight}{how}; digest {self.digest[:16]}…")

    def parameters_json(self) -> dict[str, int]:
        params: dict[str, int] = {}
        if self.count is not None:
            params["count"] = self.count
        if self.sample_rate_ppm is not None:
            params["sample_rate_ppm"] = self.sample_rate_ppm
        if self.edge_weight is not None:
            params["edge_weight"] = self.edge_weight
        return params

    def body_json(self) -> dict[str, Any]:
        """Everything but the digest: the document the digest is computed over."""
        return {
            "format": self.format, "kind": self.kind, "hash": self.algorithm, "run_root": self.run_root,
            "nonce": self.nonce, "strategy": self.strategy, "parameters": self.parameters_json(),
            "grid": {"num_layer_blocks": self.num_layer_blocks, "num_step_blocks": self.num_step_blocks},
            "blocks": [[l, s] for l, s in self.blocks],
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.body_json(), "digest": self.digest}

    @classmethod
    def from_json(cls, obj: Any) -> Challenge:
        """Read a challenge from hostile JSON: every field is checked, the block list is derived
        again from run_root and nonce, and the digest recomputed; any difference raises
        InputError naming the field."""
        if not isinstance(obj, dict):
            raise InputError("challenge: expected a JSON object")
        missing, unknown = _JSON_KEYS - obj.keys(), obj.keys() - _JSON_KEYS
        if missing or unknown:
            raise InputError(f"challenge: missing fields {sorted(missing)}, unknown fields "
                             f"{sorted(str(k)[:40] for k in unknown)} (expected exactly {sorted(_JSON_KEYS)})")
        if obj["format"] != CHALLENGE_FORMAT:
            raise InputError(f"challenge: format must be {CHALLENGE_FORMAT!r}, got {str(obj['format'])[:40]!r}")
        kind, algorithm, strategy = obj["kind"], obj["hash"], obj["strategy"]
        for name, value, allowed in (("kind", kind, KINDS), ("hash", algorithm, HASH_ALGORITHMS),
                                     ("strategy", strategy, STRATEGIES)):
            if value not in allowed:
                raise InputError(f"challenge: {name} must be one of {', '.join(allowed)}, got {str(value)[:40]!r}")
        run_root = _parse_hex(obj["run_root"], "run_root", 32, 32)
        nonce = _parse_hex(obj["nonce"], "nonce", MIN_NONCE_SIZE, MAX_NONCE_SIZE)
        params = obj["parameters"]
        if not isinstance(params, dict) or not params.keys() <= {"count", "sample_rate_ppm", "edge_weight"}:
            raise InputError("challenge: parameters must be an object with at most count, sample_rate_ppm, edge_weight")
        for name, value in params.items():
            _check_int(value, f"challenge: parameters.{name}", 1, MAX_GRID_BLOCKS if name != "sample_rate_ppm" else PPM)
        grid = obj["grid"]
        if not isinstance(grid, dict) or grid.keys() != {"num_layer_blocks", "num_step_blocks"}:
            raise InputError("challenge: grid must be an object with exactly num_layer_blocks and num_step_blocks")
        num_layer_blocks = _check_int(grid["num_layer_blocks"], "challenge: grid.num_layer_blocks", 1, MAX_GRID_BLOCKS)
        num_step_blocks = _check_int(grid["num_step_blocks"], "challenge: grid.num_step_blocks", 1, MAX_GRID_BLOCKS)
        blocks = obj["blocks"]
        if not isinstance(blocks, list) or len(blocks) > MAX_GRID_BLOCKS:
            raise InputError("challenge: blocks must be a list of [layer_block, step_block] pairs")
        listed = []
        for i, pair in enumerate(blocks):
            if not isinstance(pair, list) or len(pair) != 2:
                raise InputError(f"challenge: blocks[{i}] must be a [layer_block, step_block] pair")
            listed.append((_check_int(pair[0], f"challenge: blocks[{i}][0]", 0, MAX_GRID_BLOCKS),
                           _check_int(pair[1], f"challenge: blocks[{i}][1]", 0, MAX_GRID_BLOCKS)))
        digest = _parse_hex(obj["digest"], "digest", 32, 32)

        # Re-derive: the only blocks a challenge may name are those its inputs produce.
        derived = derive_challenge(run_root, nonce, num_layer_blocks, num_step_blocks, strategy,
                                   count=params.get("count"), sample_rate_ppm=params.get("sample_rate_ppm"),
                                   edge_weight=params.get("edge_weight"), algorithm=algorithm, kind=kind)
        if tuple(listed) != derived.blocks:
            raise InputError(f"challenge: the listed blocks ({len(listed)}) are not the ones derived from run_root "
                             f"{run_root.hex()[:16]}… and the nonce ({len(derived.blocks)}): the challenge was edited; "
                             "derive it again with `aftune challenge`")
        if digest != derived.digest_bytes:
            raise InputError(f"challenge: digest {digest.hex()[:16]}… does not match its content "
                             f"({derived.digest[:16]}…): the challenge was edited")
        return derived

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Challenge:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"challenge file {path} does not exist")
        return cls.from_json(jsonio.read_json(path, MAX_CHALLENGE_BYTES, "challenge file", InputError))


def new_nonce() -> bytes:
    """32 bytes from the operating system's CSPRNG."""
    return secrets.token_bytes(NONCE_SIZE)


def sample_rate_to_ppm(rate: Any) -> int:
    """A sample rate in (0, 1] as an integer number of parts per million (at most 6 decimals)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise InputError(f"the sample rate must be a number in (0, 1], got {rate!r}")
    ppm = round(rate * PPM)
    if ppm < 1 or abs(rate * PPM - ppm) > 1e-6:
        raise InputError(f"the sample rate {rate!r} must be a multiple of 1e-6 (at most 6 decimals, at least 0.000001)")
    return ppm


def derive_challenge(run_root: bytes, nonce: bytes, num_layer_blocks: int, num_step_blocks: int, strategy: str, *,
                     count: int | None = None, sample_rate: float | None = None, sample_rate_ppm: int | None = None,
                     edge_weight: int | None = None, algorithm: str = "blake3", kind: str = "training") -> Challenge:
    """Derive the challenged blocks from (run_root, nonce, parameters): deterministic, pure.

    Give exactly one of `count` (K blocks), `sample_rate` (a fraction in (0, 1], K = ceil(rate*N))
    or `sample_rate_ppm`, except for strategy "all" which takes none. `edge_weight` (weighted
    only, default 4) is how many times likelier the first and last layer blocks are drawn."""
    # 1. Check the inputs (SPEC.md 9.2.1).
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if algorithm not in HASH_ALGORITHMS:
        raise InputError(f"unknown hash algorithm {algorithm!r}: choose one of {', '.join(HASH_ALGORITHMS)}")
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not isinstance(run_root, bytes) or len(run_root) != 32:
        raise InputError("the run root must be 32 bytes")
    if not isinstance(nonce, bytes) or not MIN_NONCE_SIZE <= len(nonce) <= MAX_NONCE_SIZE:
        raise InputError(f"the nonce must be {MIN_NONCE_SIZE} to {MAX_NONCE_SIZE} bytes "
                         f"(default: {NONCE_SIZE} random bytes), got {len(nonce) if isinstance(nonce, bytes) else nonce!r}")
    num_layer_blocks = _check_int(num_layer_blocks, "num_layer_blocks", 1, MAX_GRID_BLOCKS)
    num_step_blocks = _check_int(num_step_blocks, "num_step_blocks", 1, MAX_GRID_BLOCKS)
    if kind == "inference" and num_step_blocks != 1:
        raise InputError(f"an inference record has one step block (0), got num_step_blocks={num_step_blocks}")
    n = num_layer_blocks * num_step_blocks
    if n > MAX_GRID_BLOCKS:
        raise InputError(f"the grid has {n} blocks, more than the {MAX_GRID_BLOCKS} a challenge may cover")
    if sample_rate is not None:
        if sample_rate_ppm is not None:
            raise InputError("give sample_rate or sample_rate_ppm, not both")
        sample_rate_ppm = sample_rate_to_ppm(sample_rate)
    given = [name for name, v in (("count", count), ("sample rate", sample_rate_ppm)) if v is not None]
    if strategy == "all":
        if given:
            raise InputError(f"strategy 'all' challenges every block: do not give a {given[0]}")
        mode, value, k = MODE_ALL, 0, n
    elif len(given) != 1:
        raise InputError(f"strategy {strategy!r} needs exactly one of a block count or a sample rate, got "
                         f"{' and '.join(given) or 'neither'}")
    elif count is not None:
        k = _check_int(count, "count", 1, MAX_GRID_BLOCKS)
        if k > n:
            raise InputError(f"asked for {k} blocks but the grid has only {n} "
                             f"({num_layer_blocks} layer blocks x {num_step_blocks} step blocks)")
        mode, value = MODE_COUNT, k
    else:
        value = _check_int(sample_rate_ppm, "sample_rate_ppm", 1, PPM)
        mode, k = MODE_RATE, -(-value * n // PPM)  # ceil(rate * N) in integers
    if strategy == "weighted":
        edge_weight = DEFAULT_EDGE_WEIGHT if edge_weight is None else edge_weight
        _check_int(edge_weight, "edge_weight", 1, MAX_EDGE_WEIGHT)
    elif edge_weight is not None:
        raise InputError(f"edge_weight applies to the weighted strategy only, not to {strategy!r}")

    # 2. The seed binds every input (SPEC.md 9.2.2).
    seed = hash_message(algorithm, TAG_CHALLENGE, length_prefixed(kind.encode("ascii")), length_prefixed(run_root),
                        length_prefixed(nonce), length_prefixed(strategy.encode("ascii")), u8(mode), u64(value),
                        u64(edge_weight or 0), u64(num_layer_blocks), u64(num_step_blocks))

    # 3. Sample K blocks without replacement (SPEC.md 9.3).
    if strategy == "all":
        chosen = [(l, s) for l in range(num_layer_blocks) for s in range(num_step_blocks)]
    elif strategy == "uniform":
        chosen = _top(seed, algorithm, k, [(l, s) for l in range(num_layer_blocks) for s in range(num_step_blocks)])
    elif strategy == "weighted":
        chosen = _top_weighted(seed, algorithm, k, num_layer_blocks, num_step_blocks, edge_weight)
    elif strategy == "columns":
        chosen = _columns(seed, algorithm, columns_for(k, num_layer_blocks), num_layer_blocks, num_step_blocks)
    else:
        chosen = _stratified(seed, algorithm, k, num_layer_blocks, num_step_blocks)

    blocks = tuple(sorted(chosen))
    c = Challenge(kind, algorithm, run_root.hex(), nonce.hex(), strategy, count if mode == MODE_COUNT else None,
                  value if mode == MODE_RATE else None, edge_weight, num_layer_blocks, num_step_blocks, blocks, "")
    digest = hash_message(algorithm, TAG_CHALLENGE_DIGEST, canonical_json(c.body_json()))
    return replace(c, digest=digest.hex())


def block_key(seed: bytes, algorithm: str, layer_block: int, step_block: int) -> bytes:
    """The block's 32-byte sort key: H(TAG_CHALLENGE_BLOCK || seed || u64(l) || u64(s))."""
    return hash_message(algorithm, TAG_CHALLENGE_BLOCK, seed, u64(layer_block), u64(step_block))


def _top(seed: bytes, algorithm: str, k: int, candidates: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The k candidates with the largest keys (a uniformly random k-subset)."""
    keyed = heapq.nlargest(k, ((block_key(seed, algorithm, l, s), (l, s)) for l, s in candidates))
    return [block for _, block in keyed]


def _top_weighted(seed: bytes, algorithm: str, k: int, num_layer_blocks: int, num_step_blocks: int,
                  edge_weight: int) -> list[tuple[int, int]]:
    """Efraimidis-Spirakis: block b gets u_b^(1/w_b) with u_b = (2*U_b + 1) / 2^65 (U_b the first
    8 bytes of its key, big-endian) and the k largest win. Compared exactly in integers: raising
    every key to the power W = edge_weight (a multiple of every weight) and multiplying by
    2^(65 W) gives score_b = (2 U_b + 1)^(W / w_b) * 2^(65 (W - W / w_b)), same order."""
    big = edge_weight
    scored = []
    for l in range(num_layer_blocks):
        w = edge_weight if l in (0, num_layer_blocks - 1) else 1
        e = big // w
        for s in range(num_step_blocks):
            key = block_key(seed, algorithm, l, s)
            u = 2 * int.from_bytes(key[:8], "big") + 1
            scored.append((u ** e << (65 * (big - e)), key, (l, s)))
    return [block for _, _, block in heapq.nlargest(k, scored)]


def columns_for(k: int, num_layer_blocks: int) -> int:
    """The step blocks the columns strategy checks whole for a budget of K blocks: ceil(K / L)."""
    return -(-k // num_layer_blocks)


def _ranked_step_blocks(seed: bytes, algorithm: str, num_step_blocks: int) -> list[int]:
    """Step blocks by their stratum key H(TAG_CHALLENGE_STRATUM || seed || u64(s)), largest first."""
    ranked = sorted(((hash_message(algorithm, TAG_CHALLENGE_STRATUM, seed, u64(s)), s)
                     for s in range(num_step_blocks)), reverse=True)
    return [s for _, s in ranked]


def _columns(seed: bytes, algorithm: str, columns: int, num_layer_blocks: int,
             num_step_blocks: int) -> list[tuple[int, int]]:
    """Every layer block of the `columns` step blocks with the largest stratum keys."""
    return [(l, s) for s in _ranked_step_blocks(seed, algorithm, num_step_blocks)[:columns]
            for l in range(num_layer_blocks)]


def _stratified(seed: bytes, algorithm: str, k: int, num_layer_blocks: int,
                num_step_blocks: int) -> list[tuple[int, int]]:
    """k // S blocks in every step block and one more in the k % S step blocks with the largest
    stratum keys; within a step block, the layer blocks with the largest block keys."""
    per_step, extra = divmod(k, num_step_blocks)
    lucky = set(_ranked_step_blocks(seed, algorithm, num_step_blocks)[:extra])
    chosen: list[tuple[int, int]] = []
    for s in range(num_step_blocks):
        take = per_step + (s in lucky)
        if take:
            chosen += _top(seed, algorithm, take, [(l, s) for l in range(num_layer_blocks)])
    return chosen


def challenge_from_transcript(transcript_path: str | Path, public_key, strategy: str, *, count: int | None = None,
                              sample_rate: float | None = None, nonce: bytes | None = None,
                              edge_weight: int | None = None, num_layer_blocks: int | None = None,
                              config_path: str | Path | None = None, agreement=None) -> Challenge:
    """A training challenge for the run a transcript commits to.

    The transcript is checked against the pinned `public_key` (aftune.signing.PublicKey) and must
    be closed by its signed run entry: a challenge is drawn only after the whole run is committed.
    With the client's `agreement`, the grid is the agreement's (and a transcript with another
    number of step blocks is a FAIL); without one, it has len(step_blocks) - 1 step blocks (the
    last entry is the final state) and `num_layer_blocks` layer blocks, else those of the run
    config (default: the config.json beside the transcript), whose digest the transcript signs."""
    from ..training.run import signed_run_config
    from ..training.transcript import Transcript

    transcript_path = Path(transcript_path)
    transcript = Transcript.load(transcript_path, public_key)
    if transcript.run is None:
        raise InputError(f"transcript {transcript_path} has no signed run entry: the run is not finished, so its "
                         "root is not committed yet; challenge it once the provider has signed the run root")
    num_step_blocks = len(transcript.step_blocks) - 1
    if num_step_blocks < 1:
        raise RecordError(f"transcript {transcript_path} commits no step block with training steps")
    if agreement is not None:
        num_layer_blocks, agreed_steps = agreement.grid()
        if agreed_steps != num_step_blocks:
            raise CommitmentMismatch(f"the transcript commits {num_step_blocks} step blocks, the agreement's "
                                     f"{agreement.settings.steps} steps make {agreed_steps}: the run is not the "
                                     "agreed one")
    if num_layer_blocks is None:
        path = Path(config_path) if config_path is not None else transcript_path.parent / "config.json"
        if not path.is_file():
            raise InputError(f"{path} is missing: pass the run config or give the number of layer blocks")
        layer_blocks = (signed_run_config(path, transcript).get("layout") or {}).get("layer_blocks")
        if not isinstance(layer_blocks, list) or not layer_blocks:
            raise RecordError(f"{path}: layout.layer_blocks must be a non-empty list")
        num_layer_blocks = len(layer_blocks)
    return derive_challenge(transcript.run.root, new_nonce() if nonce is None else nonce, num_layer_blocks,
                            num_step_blocks, strategy, count=count, sample_rate=sample_rate, edge_weight=edge_weight,
                            algorithm=transcript.algorithm, kind="training")


def challenge_mismatch(challenge: Challenge, transcript, config_path: str | Path | None = None) -> str | None:
    """Why `challenge` was not drawn for the run that `transcript` (a loaded, signature-checked
    Transcript) signs, or None: it must be a training challenge whose run root is the signed one
    and whose grid is the transcript's step blocks and the run config's layer blocks (SPEC.md
    9.7). The provider's `aftune open` and the client's audit apply the same rule, in these words."""
    from ..training.run import signed_run_config

    if challenge.kind != "training":
        return f"this is an {challenge.kind} challenge; a run is opened and audited with a training challenge"
    if transcript.run is None or transcript.run.root.hex() != challenge.run_root:
        return ("the challenge was drawn from another run root than this transcript signs: the transcript was "
                "re-signed after the challenge, or belongs to another run")
    if challenge.num_step_blocks != len(transcript.step_blocks) - 1:
        return "the challenge's grid does not match the transcript's step blocks"
    if config_path is not None and Path(config_path).is_file():
        layer_blocks = (signed_run_config(Path(config_path), transcript).get("layout") or {}).get("layer_blocks")
        if not isinstance(layer_blocks, list) or len(layer_blocks) != challenge.num_layer_blocks:
            return "the challenge's grid does not match the run's layer blocks"
    return None


def challenge_for_inference(record_root: bytes, num_layer_blocks: int, strategy: str, *, count: int | None = None,
                            sample_rate: float | None = None, nonce: bytes | None = None,
                            edge_weight: int | None = None, algorithm: str = "blake3") -> Challenge:
    """An inference challenge: blocks (layer_block, 0) of a record whose root the provider signed."""
    return derive_challenge(record_root, new_nonce() if nonce is None else nonce, num_layer_blocks, 1, strategy,
                            count=count, sample_rate=sample_rate, edge_weight=edge_weight, algorithm=algorithm,
                            kind="inference")


def _check_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{name} must be an integer in [{low}, {high}], got {str(value)[:40]!r}")
    return value


def _parse_hex(text: Any, name: str, low: int, high: int) -> bytes:
    if not isinstance(text, str) or len(text) % 2 or not 2 * low <= len(text) <= 2 * high \
            or text.strip("0123456789abcdef"):
        raise InputError(f"challenge: {name} must be {low}{'' if low == high else f' to {high}'} bytes as lowercase "
                         f"hex, got {str(text)[:80]!r}")
    return bytes.fromhex(text)
