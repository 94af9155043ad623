"""Challenge derivation: deterministic, bound to the run root and the nonce, and hostile JSON rejected.

    python -m pytest tests/test_challenge.py -q
"""

from __future__ import annotations

import json
from collections import Counter

import blake3
import pytest

from aftune.protocol.challenge import (
    CHALLENGE_FORMAT,
    Challenge,
    challenge_for_inference,
    challenge_from_transcript,
    derive_challenge,
)
from aftune.core.encoding import canonical_json
from aftune.errors import CommitmentMismatch, InputError

ROOT = bytes(range(32))
NONCE = bytes([0x11]) * 32


@pytest.fixture
def signed_run(tmp_path):
    """A run directory with just a config.json and a closed, signed transcript (no training):
    4 layer blocks x 6 step blocks."""
    from aftune.training.settings import RUN_FORMAT
    from aftune.training.run import config_digest
    from aftune.core.signing import SigningKey
    from aftune.training.transcript import TranscriptWriter

    run = tmp_path / "run"
    run.mkdir()
    config = {"format": RUN_FORMAT, "settings": {"steps": 12, "steps_per_block": 2},
              "layout": {"stages": [f"s{i}" for i in range(8)], "layer_blocks": [[0, 2], [2, 4], [4, 6], [6, 8]]}}
    data = canonical_json(config)
    (run / "config.json").write_bytes(data)
    key = SigningKey.generate()
    writer = TranscriptWriter(run / "transcript.jsonl", key, "blake3", config_digest("blake3", data))
    for s in range(7):  # 6 step blocks and the final state
        writer.step_block(s, 2 * s, 2 if s < 6 else 0, bytes([s]) * 32)
    root = writer.finish(bytes([0xAA]) * 32)
    return run, key.public_key, root


def test_derivation_is_deterministic():
    for strategy in ("uniform", "weighted", "stratified", "all"):
        kw = {} if strategy == "all" else {"count": 7}
        a = derive_challenge(ROOT, NONCE, 4, 8, strategy, **kw)
        b = derive_challenge(ROOT, NONCE, 4, 8, strategy, **kw)
        assert a == b and a.digest == b.digest
        assert len(a.blocks) == (32 if strategy == "all" else 7) == len(set(a.blocks))
        assert list(a.blocks) == sorted(a.blocks)
        assert all(0 <= l < 4 and 0 <= s < 8 for l, s in a.blocks)


def test_new_nonce_gives_a_new_challenge():
    a = derive_challenge(ROOT, NONCE, 8, 16, "uniform", count=10)
    b = derive_challenge(ROOT, bytes([0x12]) * 32, 8, 16, "uniform", count=10)
    assert a.blocks != b.blocks and a.digest != b.digest


def test_derivation_is_bound_to_the_run_root():
    a = derive_challenge(ROOT, NONCE, 8, 16, "uniform", count=10)
    other_root = bytes([ROOT[0] ^ 1]) + ROOT[1:]
    b = derive_challenge(other_root, NONCE, 8, 16, "uniform", count=10)
    assert a.blocks != b.blocks
    # Every parameter is bound too: the same blocks cannot be relabelled as another strategy or grid.
    for kw in ({"strategy": "stratified"}, {"strategy": "weighted"}):
        assert derive_challenge(ROOT, NONCE, 8, 16, kw["strategy"], count=10).digest != a.digest
    assert derive_challenge(ROOT, NONCE, 8, 16, "uniform", count=11).digest != a.digest
    assert derive_challenge(ROOT, NONCE, 16, 8, "uniform", count=10).blocks != a.blocks


def test_strategies_draw_the_promised_shapes():
    n, k = 6 * 10, 23
    stratified = derive_challenge(ROOT, NONCE, 6, 10, "stratified", count=k)
    per_step = Counter(s for _, s in stratified.blocks)
    assert sorted(per_step.values()) == [2] * 7 + [3] * 3  # 23 = 10*2 + 3, as even as possible
    rate = derive_challenge(ROOT, NONCE, 6, 10, "uniform", sample_rate=0.1)
    assert rate.num_challenged == 6 and rate.sample_rate == 0.1 and rate.count is None  # ceil(0.1 * 60)
    assert derive_challenge(ROOT, NONCE, 6, 10, "uniform", sample_rate=0.01).num_challenged == 1  # ceil(0.6)
    assert derive_challenge(ROOT, NONCE, 6, 10, "all").num_challenged == n
    assert derive_challenge(ROOT, NONCE, 6, 10, "uniform", count=n).blocks == derive_challenge(ROOT, NONCE, 6, 10, "all").blocks


def test_weighted_prefers_the_edge_layer_blocks():
    """Over many nonces, a first/last layer block is drawn about edge_weight times as often at
    small K (the exact law is tested in test_planner.py)."""
    hits = Counter()
    for i in range(300):
        c = derive_challenge(ROOT, i.to_bytes(32, "big"), 6, 5, "weighted", count=2)
        hits.update("edge" if l in (0, 5) else "interior" for l, _ in c.blocks)
    per_edge_block, per_interior_block = hits["edge"] / 10, hits["interior"] / 20
    assert 2.5 < per_edge_block / per_interior_block < 6


def test_json_round_trip(tmp_path):
    for strategy, kw in (("uniform", {"count": 5}), ("weighted", {"sample_rate": 0.25, "edge_weight": 3}),
                         ("stratified", {"count": 9}), ("all", {})):
        c = derive_challenge(ROOT, NONCE, 4, 8, strategy, **kw)
        assert Challenge.from_json(json.loads(json.dumps(c.to_json()))) == c
        assert Challenge.load(c.save(tmp_path / f"{strategy}.json")) == c
        assert c.to_json()["format"] == CHALLENGE_FORMAT


def _edited(edit):
    doc = derive_challenge(ROOT, NONCE, 4, 8, "uniform", count=5).to_json()
    edit(doc)
    return doc


def _swap_block(doc):
    unused = next([l, s] for l in range(4) for s in range(8) if [l, s] not in doc["blocks"])
    doc["blocks"][0] = unused
    doc["blocks"].sort()


TAMPERED = {
    "a block swapped": _swap_block,
    "a block dropped": lambda d: d["blocks"].pop(),
    "a block repeated": lambda d: d["blocks"].append(d["blocks"][0]),
    "nonce changed": lambda d: d.update(nonce="22" * 32),
    "run root changed": lambda d: d.update(run_root="00" * 32),
    "digest changed": lambda d: d.update(digest="00" * 32),
    "strategy changed": lambda d: d.update(strategy="stratified"),
    "count changed": lambda d: d["parameters"].update(count=4),
    "grid changed": lambda d: d["grid"].update(num_step_blocks=9),
    "unknown field": lambda d: d.update(note="hello"),
    "missing field": lambda d: d.pop("digest"),
    "wrong format": lambda d: d.update(format="aftune.challenge.v0"),
    "bool as integer": lambda d: d["grid"].update(num_layer_blocks=True),
    "huge grid": lambda d: d["grid"].update(num_step_blocks=10**12),
    "negative block": lambda d: d["blocks"].__setitem__(0, [-1, 0]),
    "uppercase hex": lambda d: d.update(run_root=d["run_root"].upper()),
    "short nonce": lambda d: d.update(nonce="11" * 8),
    "both count and rate": lambda d: d["parameters"].update(sample_rate_ppm=100000),
    "edge weight on uniform": lambda d: d["parameters"].update(edge_weight=4),
    "blocks not a list": lambda d: d.update(blocks="all"),
}


@pytest.mark.parametrize("name", TAMPERED)
def test_tampered_challenge_json_is_rejected(name):
    doc = _edited(TAMPERED[name])
    with pytest.raises(InputError):
        Challenge.from_json(doc)


def test_hostile_challenge_files_are_rejected(tmp_path):
    good = derive_challenge(ROOT, NONCE, 4, 8, "uniform", count=5)
    text = json.dumps(good.to_json())
    cases = {"duplicate key": text[:-1] + ', "nonce": "' + "11" * 32 + '"}', "not json": text[:-5],
             "NaN": text.replace('"count": 5', '"count": NaN'), "a list": "[]"}
    for name, content in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(content)
        with pytest.raises(InputError):
            Challenge.load(p)
    with pytest.raises(InputError):
        Challenge.load(tmp_path / "absent.json")


@pytest.mark.parametrize("kw", [
    {"count": 33}, {"count": 0}, {"count": 2, "sample_rate": 0.5}, {}, {"sample_rate": 0.1234567},
    {"sample_rate": 0.0}, {"sample_rate": 1.5}, {"count": 3, "edge_weight": 2}, {"count": True},
])
def test_bad_parameters_are_input_errors(kw):
    with pytest.raises(InputError):
        derive_challenge(ROOT, NONCE, 4, 8, "uniform", **kw)


def test_bad_inputs_are_input_errors():
    for args, kw in [((ROOT, b"short", 4, 8, "uniform"), {"count": 1}), ((ROOT[:31], NONCE, 4, 8, "uniform"), {"count": 1}),
                     ((ROOT, NONCE, 0, 8, "uniform"), {"count": 1}), ((ROOT, NONCE, 4, 8, "random"), {"count": 1}),
                     ((ROOT, NONCE, 4, 8, "all"), {"count": 1}), ((ROOT, NONCE, 4, 8, "weighted"), {"count": 1, "edge_weight": 0}),
                     ((ROOT, NONCE, 4, 8, "uniform"), {"count": 1, "algorithm": "md5"}),
                     ((ROOT, NONCE, 2048, 1024, "uniform"), {"count": 1})]:
        with pytest.raises(InputError):
            derive_challenge(*args, **kw)


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def _h(*parts: bytes) -> bytes:
    return blake3.blake3(b"".join(parts)).digest()


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _spec_seed(strategy: bytes, mode: int, value: int, edge_weight: int, L: int, S: int) -> bytes:
    return _h(b"aftune.v1.challenge\x00", _lp(b"training"), _lp(ROOT), _lp(NONCE), _lp(strategy), bytes([mode]),
              _u64(value), _u64(edge_weight), _u64(L), _u64(S))


def test_spec_text_reimplemented():
    """An independent implementation of SPEC.md 9.2-9.3 reaches the same blocks and digest."""
    L, S, K = 4, 8, 5

    def key(seed, l, s):
        return _h(b"aftune.v1.challenge-block\x00", seed, _u64(l), _u64(s))

    # uniform: the K largest block keys
    seed = _spec_seed(b"uniform", 1, K, 0, L, S)
    keys = {(l, s): key(seed, l, s) for l in range(L) for s in range(S)}
    c = derive_challenge(ROOT, NONCE, L, S, "uniform", count=K)
    assert list(c.blocks) == sorted(sorted(keys, key=keys.get, reverse=True)[:K])
    assert c.digest == _h(b"aftune.v1.challenge-digest\x00", canonical_json(c.body_json())).hex()

    # weighted: Efraimidis-Spirakis u^(1/w), compared here in exact rationals
    from fractions import Fraction

    seed = _spec_seed(b"weighted", 1, K, 4, L, S)

    def es_key(block):  # u^(1/w) ranks as (u^(1/w))^4 = u^(4/w), an exact rational
        l, s = block
        u = Fraction(2 * int.from_bytes(key(seed, l, s)[:8], "big") + 1, 2**65)
        return u ** (4 // (4 if l in (0, L - 1) else 1))
    ranked = sorted(((l, s) for l in range(L) for s in range(S)), key=es_key, reverse=True)
    assert list(derive_challenge(ROOT, NONCE, L, S, "weighted", count=K).blocks) == sorted(ranked[:K])

    # stratified: K // S per step block, one more in the K % S step blocks with the largest stratum keys
    K = 11
    seed = _spec_seed(b"stratified", 1, K, 0, L, S)
    lucky = sorted(range(S), key=lambda s: _h(b"aftune.v1.challenge-stratum\x00", seed, _u64(s)), reverse=True)[:K % S]
    expected = []
    for s in range(S):
        take = K // S + (s in lucky)
        expected += [(l, s) for l in sorted(range(L), key=lambda l: key(seed, l, s), reverse=True)[:take]]
    assert list(derive_challenge(ROOT, NONCE, L, S, "stratified", count=K).blocks) == sorted(expected)

    # a sample rate is hashed as mode 2 with the rate in parts per million
    seed = _spec_seed(b"uniform", 2, 250000, 0, L, S)
    keys = {(l, s): key(seed, l, s) for l in range(L) for s in range(S)}
    c = derive_challenge(ROOT, NONCE, L, S, "uniform", sample_rate=0.25)
    assert list(c.blocks) == sorted(sorted(keys, key=keys.get, reverse=True)[:8])


SPEC_VECTORS = [  # SPEC.md 9.8
    ("uniform", {"count": 5}, ((1, 2), (1, 5), (1, 7), (2, 1), (2, 3)),
     "9db17852f097d9beddd79e69f901dc555dbde002d6d75ad1b3fa45664b79916b"),
    ("weighted", {"count": 5}, ((0, 1), (0, 5), (0, 6), (2, 4), (3, 4)),
     "a2f9ce25c1b915d8dfacd7ec8540ec261cd2e68a35faa800afb5df8a40462b4a"),
    ("stratified", {"count": 11}, ((0, 0), (0, 2), (0, 4), (0, 6), (0, 7), (1, 5), (2, 1), (2, 2), (2, 6), (2, 7), (3, 3)),
     "2de2528d1d75f7b31e7395cfd40708f0dc5a2f02aa066734fe68e5c15d219449"),
    ("uniform", {"sample_rate": 0.25}, ((0, 1), (0, 3), (0, 5), (1, 3), (1, 5), (2, 2), (2, 5), (2, 6)),
     "d4c2facc9c14f1376d24e82af520fae88692dfc9c5496b994e9807e4601e4aee"),
    ("weighted", {"count": 5, "algorithm": "sha256"}, ((0, 2), (0, 5), (2, 4), (3, 3), (3, 6)),
     "97e0b8ff35d45578a85c58308b6a91c37cdba9ab4acb8a9d508f0b7f420bbcd7"),
]


@pytest.mark.parametrize("strategy,kw,blocks,digest", SPEC_VECTORS)
def test_spec_vectors(strategy, kw, blocks, digest):
    c = derive_challenge(ROOT, NONCE, 4, 8, strategy, **kw)
    assert c.blocks == blocks and c.digest == digest


def test_spec_seed_and_tags():
    from aftune.core.encoding import TAG_CHALLENGE, TAG_CHALLENGE_BLOCK, TAG_CHALLENGE_DIGEST, TAG_CHALLENGE_STRATUM

    assert [len(t) for t in (TAG_CHALLENGE, TAG_CHALLENGE_BLOCK, TAG_CHALLENGE_STRATUM, TAG_CHALLENGE_DIGEST)] == \
        [20, 26, 28, 27]
    assert _spec_seed(b"weighted", 1, 5, 4, 4, 8).hex() == \
        "53722f8d6aec3a20d6c9deb1c1f623c01412341e04305adec625253f16383d88"


def test_challenge_from_transcript(signed_run, tmp_path):
    run, key, root = signed_run
    c = challenge_from_transcript(run / "transcript.jsonl", key, "stratified", count=6)
    assert (c.num_layer_blocks, c.num_step_blocks) == (4, 6) and c.run_root == root.hex()
    assert sorted(s for _, s in c.blocks) == list(range(6))  # one per step block
    assert len(bytes.fromhex(c.nonce)) == 32
    again = challenge_from_transcript(run / "transcript.jsonl", key, "stratified", count=6)
    assert again.nonce != c.nonce  # a fresh random nonce every time
    fixed = challenge_from_transcript(run / "transcript.jsonl", key, "uniform", count=3, nonce=NONCE)
    assert fixed == derive_challenge(root, NONCE, 4, 6, "uniform", count=3)
    explicit = challenge_from_transcript(run / "transcript.jsonl", key, "uniform", count=3, nonce=NONCE,
                                         num_layer_blocks=5, config_path=tmp_path / "absent.json")
    assert explicit.num_layer_blocks == 5


def test_challenge_from_transcript_checks_what_it_reads(signed_run):
    from aftune.core.signing import SigningKey

    run, key, _ = signed_run
    with pytest.raises(CommitmentMismatch):  # a transcript checked against another key
        challenge_from_transcript(run / "transcript.jsonl", SigningKey.generate().public_key, "uniform", count=1)
    config = json.loads((run / "config.json").read_text())
    config["layout"]["layer_blocks"].append([8, 9])
    (run / "config.json").write_bytes(canonical_json(config))
    with pytest.raises(CommitmentMismatch):  # a config the transcript does not sign
        challenge_from_transcript(run / "transcript.jsonl", key, "uniform", count=1)
    lines = (run / "transcript.jsonl").read_text().splitlines()
    (run / "transcript.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(InputError, match="not finished"):  # no signed run root yet
        challenge_from_transcript(run / "transcript.jsonl", key, "uniform", count=1, num_layer_blocks=4)


def test_inference_challenge():
    c = challenge_for_inference(ROOT, 6, "weighted", count=3, nonce=NONCE)
    assert c.kind == "inference" and c.num_step_blocks == 1 and all(s == 0 for _, s in c.blocks)
    assert Challenge.from_json(c.to_json()) == c
    assert c.digest != derive_challenge(ROOT, NONCE, 6, 1, "weighted", count=3).digest  # kind is bound
    with pytest.raises(InputError):
        derive_challenge(ROOT, NONCE, 6, 2, "uniform", count=1, kind="inference")


# ---------------------------------------------------------------------------------------------
# The command (registered by aftune.cli.plan).

from conftest import invoke  # noqa: E402


def test_cli_challenge(signed_run, tmp_path):
    run, key, root = signed_run
    out = tmp_path / "c.json"
    r = invoke("challenge", run / "transcript.jsonl", "--public-key", key.text, "--sample-blocks", 5, "--strategy", "weighted",
               "--challenge-nonce", NONCE.hex(), "--out", out)
    assert r.exit_code == 2 and "aftune agree" in r.output  # no agreement, no grid the client holds
    r = invoke("challenge", run / "transcript.jsonl", "--public-key", key.text, "--sample-blocks", 5, "--strategy", "weighted",
               "--challenge-nonce", NONCE.hex(), "--out", out, "--unsafe-no-agreement")
    assert r.exit_code == 0, r.output
    c = Challenge.load(out)
    assert c == derive_challenge(root, NONCE, 4, 6, "weighted", count=5)
    assert "P(detect)" in r.output
    r = invoke("challenge", run / "transcript.jsonl", "--public-key", key.text, "--sample-blocks", 5, "--out", out,
               "--unsafe-no-agreement")
    assert r.exit_code == 2 and "exists" in r.output  # never overwritten
    for bad in (["--sample-blocks", 25], ["--challenge-nonce", "zz", "--sample-blocks", 1], ["--sample-rate", 0.1, "--sample-blocks", 2], []):
        r = invoke("challenge", run / "transcript.jsonl", "--public-key", key.text, *bad, "--out", tmp_path / "x.json",
                   "--unsafe-no-agreement")
        assert r.exit_code == 2, (bad, r.output)
    r = invoke("challenge", "--record-root", ROOT.hex(), "--layer-blocks", 6, "--sample-rate", 0.5,
               "--out", tmp_path / "inf.json")
    assert r.exit_code == 0, r.output
    assert Challenge.load(tmp_path / "inf.json").kind == "inference"
