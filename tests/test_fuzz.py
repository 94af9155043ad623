"""Hostile input, systematically: a seeded mutator applied to every kind of file aftune reads,
each driven through the command that reads it (in-process CLI).

    python -m pytest -q -s tests/test_fuzz.py            # the short budget (about 30 s)
    python -m pytest -q -s tests/test_fuzz.py --long     # 10,000 cases (long)

Mutations: bit flips, truncations, duplicated keys, reordered keys and re-spaced JSON, dropped
keys, wrong types, huge numbers, long strings, deep nesting, and for objects valid zstd frames of
garbage, bytes after the frame and headers claiming huge tensors; compressed manifests get the
JSON mutations inside their frame or the zstd ones on it, packs and pack indexes bit flips,
truncations, appended bytes and entries moved. Every case must end with exit 1
or 2 and a message, or exit 0 only where the mutation is provably neutral (`NEUTRAL` says which,
per file kind); never exit 3, never a traceback. `-s` prints the counts of cases and exit codes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import zstandard

from aftune.core import jsonio
from aftune.training.manifest import MANIFEST_FORMATS

NONCE = "11" * 32
PROMPT = "Q: What is 3 plus 4? A:"


# --- the record under attack: one tiny run, its inference record, a challenge and its bundle -----

@pytest.fixture(scope="module")
def pristine(model_dir, datasets, tmp_path_factory):
    from conftest import invoke

    from aftune.training.agreement import make_agreement
    from aftune.training.settings import TrainSettings
    from aftune.training.train import train

    root = tmp_path_factory.mktemp("fuzz")
    settings = TrainSettings(steps=2, batch_size=2, seq_len=16, layers_per_block=2, steps_per_block=1, lr=1e-2)
    agreement = make_agreement(model_dir("llama"), datasets["text"], settings)
    agreement.save(root / "agreement.json")
    train(model_dir("llama"), datasets["text"], root / "run", agreement=agreement)
    run, pub = root / "run", root / "run" / "provider.key.pub"
    shutil.copy(run / "transcript.jsonl", root / "transcript.jsonl")  # the client's copy
    steps = [("infer", "--model", run, "--prompt", PROMPT, "--record-dir", root / "records", "--max-new-tokens", "2",
              "--provider-signing-key", run / "provider.key"),
             ("challenge", root / "transcript.jsonl", "--public-key", pub, "--agreement", root / "agreement.json",
              "--sample-blocks", "1", "--challenge-nonce", NONCE, "--out", root / "challenge.json"),
             ("open", run, "--challenge", root / "challenge.json", "--out", root / "bundle",
              "--base-model", model_dir("llama"))]  # digest-only boundaries: regenerated from the base model
    for args in steps:
        r = invoke(*args)
        assert r.exit_code == 0, r.output
    return root


@dataclass
class Kind:
    """A file kind: where it lies, how it is parsed, the command that reads it, and which
    mutations are neutral for it."""

    files: Callable[[Path], list[Path]]
    syntax: str  # json | jsonl | zstd | zjson (a v3 manifest) | pack | index
    command: Callable[[Path], list]
    neutral: Callable[[bytes, bytes], bool]


def _check(target: str, *extra: str) -> Callable[[Path], list]:
    return lambda r: ["check", r / target, "--public-key", r / "run" / "provider.key.pub", "--json",
                      *[r / e if e.endswith(".jsonl") else e for e in extra]]


def _strict(data: bytes):
    """The document, with signatures and keys in lower case: aftune decodes them with
    `bytes.fromhex`, which reads either case alike (SPEC.md 2.3)."""
    return _lower_signatures(jsonio.loads(data))


def _lower_signatures(node):
    if isinstance(node, dict):
        return {k: v.lower() if k in ("signature", "public_key", "key") and isinstance(v, str)
                else _lower_signatures(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_lower_signatures(v) for v in node]
    return node


def same_json(a: bytes, b: bytes) -> bool:
    """Neutral for JSON whose bytes are not hashed: the same document (key order, spacing)."""
    try:
        return _strict(a) == _strict(b)
    except ValueError:
        return False


def same_manifest(a: bytes, b: bytes) -> bool:
    """A manifest's `format` is not signed: v1 and v2 read the same rows (SPEC.md 3.3.1)."""
    try:
        x, y = _strict(a), _strict(b)
    except ValueError:
        return False
    if isinstance(x, dict) and isinstance(y, dict) and y.get("format") in MANIFEST_FORMATS:
        y = {**y, "format": x.get("format")}
    return x == y


def same_lines(a: bytes, b: bytes) -> bool:
    """A transcript with the same lines (each parsed), or a prefix of it cut at any byte: the
    record of a run that was killed, described by `check` as not finished (not damage)."""
    if a.startswith(b):
        return True
    try:
        return [_strict(x) for x in a.split(b"\n") if x.strip()] == [_strict(x) for x in b.split(b"\n") if x.strip()]
    except ValueError:
        return False


def same_zmanifest(a: bytes, b: bytes) -> bool:
    """A v3 manifest: the same manifest inside its zstd frame (the frame's bytes are not hashed)."""
    try:
        return same_manifest(zstandard.ZstdDecompressor().decompress(a), zstandard.ZstdDecompressor().decompress(b))
    except zstandard.ZstdError:
        return False


def _frames(data: bytes, cuts: list[int]) -> list[bytes] | None:
    out = []
    for start, end in zip(cuts, cuts[1:]):
        try:
            out.append(zstandard.ZstdDecompressor().decompressobj().decompress(data[start:end]))
        except zstandard.ZstdError:
            return None
    return out


def same_pack(a: bytes, b: bytes) -> bool:
    """A pack whose objects (each read as its first zstd frame, at the offsets the index gives)
    decompress to the same bytes: a change inside a frame's unused bits is neutral."""
    if len(a) != len(b) or a[:8] != b[:8]:
        return False
    cuts, rest = [8], a[8:]
    while rest:
        d = zstandard.ZstdDecompressor().decompressobj()
        d.decompress(rest)
        cuts.append(cuts[-1] + len(rest) - len(d.unused_data))
        rest = d.unused_data
    return _frames(a, cuts) == _frames(b, cuts)


def same_frame(a: bytes, b: bytes) -> bool:
    """Objects: only the first zstd frame is read (SPEC.md 3.2, Q13): bytes after it are neutral."""
    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(b) == \
            zstandard.ZstdDecompressor().decompressobj().decompress(a)
    except zstandard.ZstdError:
        return False


def same_agreement(a: bytes, b: bytes) -> bool:
    """An agreement's digest is over its canonical form, a missing setting filled with its
    default (SPEC.md 4.3, 4.5, Q14): the same digest is the same agreement."""
    from aftune.errors import AftuneError
    from aftune.training.agreement import Agreement

    try:
        return Agreement.from_json(_strict(a)).digest() == Agreement.from_json(_strict(b)).digest()
    except (ValueError, AftuneError):
        return False


def same_bundle(a: bytes, b: bytes) -> bool:
    """A step block's `full` and `partial` default to empty (nothing opened)."""
    def norm(doc):
        for sb in doc.get("step_blocks", []) if isinstance(doc, dict) else []:
            if isinstance(sb, dict):
                sb.setdefault("full", {})
                sb.setdefault("partial", {})
        return doc

    try:
        return norm(_strict(a)) == norm(_strict(b))
    except (ValueError, AttributeError, TypeError):
        return False


def never(a: bytes, b: bytes) -> bool:
    """Files whose exact bytes are hashed (run config, inference record): no change is neutral."""
    return a == b


def _packs(r: Path, suffix: str) -> list[Path]:
    return sorted((r / "run" / "objects" / "pack").glob(f"*{suffix}"))


KINDS = {
    "run config": Kind(lambda r: [r / "run" / "config.json"], "json", _check("run"), never),
    "manifest": Kind(lambda r: sorted((r / "run" / "manifests").glob("*.json.zst")), "zjson", _check("run"),
                     same_zmanifest),
    "transcript": Kind(lambda r: [r / "run" / "transcript.jsonl"], "jsonl", _check("run"), same_lines),
    "pack": Kind(lambda r: _packs(r, ".pack"), "pack", _check("run"), same_pack),
    "pack index": Kind(lambda r: _packs(r, ".idx"), "index", _check("run"), never),
    "base model digests": Kind(lambda r: [r / "run" / "base_model.json"], "json", _check("run"), same_json),
    "agreement": Kind(lambda r: [r / "agreement.json"], "json", lambda r: [
        "verify", r / "run", "--public-key", r / "run" / "provider.key.pub", "--agreement", r / "agreement.json",
        "--transcript", r / "transcript.jsonl", "-l", "0", "-s", "0", "--json"], same_agreement),
    "inference record": Kind(lambda r: sorted((r / "records" / "records").glob("*.json")), "json",
                             _check("records"), never),
    "receipt": Kind(lambda r: sorted((r / "records" / "receipts").glob("*.json")), "json", lambda r: [
        "verify-receipt", next((r / "records" / "receipts").glob("*.json")), "--public-key",
        r / "run" / "provider.key.pub", "--record-dir", r / "records"], same_json),
    "challenge": Kind(lambda r: [r / "challenge.json"], "json", lambda r: [
        "audit", r / "bundle", "--public-key", r / "run" / "provider.key.pub", "--transcript", r / "transcript.jsonl",
        "--challenge", r / "challenge.json", "--agreement", r / "agreement.json", "--workers", "1", "--json"],
        same_json),
    "bundle": Kind(lambda r: [r / "bundle" / "bundle.json"], "json", lambda r: [
        "audit", r / "bundle", "--public-key", r / "run" / "provider.key.pub", "--transcript", r / "transcript.jsonl",
        "--challenge", r / "challenge.json", "--agreement", r / "agreement.json", "--workers", "1", "--json"],
        same_bundle),
    "bundle object": Kind(lambda r: sorted((r / "bundle" / "objects").rglob("*.zst")), "zstd",
                          _check("bundle", "--transcript", "transcript.jsonl"), same_frame),
}
# replaying kinds cost a second each: the short budget gives them fewer cases
WEIGHTS = {"agreement": 1, "challenge": 1, "bundle": 2, "bundle object": 1, "pack index": 2}


# --- the mutator --------------------------------------------------------------------------------

def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:64]):
            yield from _paths(v, path + (i,))


def _dumps(node, rng: random.Random, path=(), edit=None, shuffle=False, dup=None, drop=None) -> str:
    """JSON text of `node`, with `edit` = (path, raw text) replacing one node, keys shuffled, one
    key of the object at `dup` repeated, or the key path `drop` removed."""
    if edit is not None and path == edit[0]:
        return edit[1]
    if isinstance(node, dict):
        items = [(k, v) for k, v in node.items() if drop != path + (k,)]
        if shuffle:
            rng.shuffle(items)
        parts = [json.dumps(k) + ":" + _dumps(v, rng, path + (k,), edit, shuffle, dup, drop) for k, v in items]
        if dup == path and items:
            k, v = rng.choice(items)
            parts.append(json.dumps(k) + ":" + json.dumps(rng.choice([v, None, 0, "x"])))
        return "{" + ",".join(parts) + "}"
    if isinstance(node, list):
        return "[" + ",".join(_dumps(v, rng, path + (i,), edit, shuffle, dup, drop) for i, v in enumerate(node)) + "]"
    return json.dumps(node)


WRONG = ['"x"', "0", "-1", "1.5", "true", "null", "[]", "{}", '[1,2,3]', '{"a":1}', '""', '"00"']
HUGE = ["1" * 5000, "18446744073709551616", "1e400", "-1e400", "9" * 40, '"' + "x" * 2_000_000 + '"',
        "[" * 100_000 + "]" * 100_000, "[" + ",".join(["0"] * 200_000) + "]", "[1099511627775,1099511627775]"]


def mutate_json(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    doc = _strict(data)
    paths = list(_paths(doc))
    op = rng.choice(["flip", "truncate", "dup_key", "reorder", "respace", "drop_key", "wrong_type", "huge", "append"])
    if op == "flip":
        return op, _flip(data, rng)
    if op == "truncate":
        return op, data[:rng.randrange(len(data))]
    if op == "append":
        return op, data + rng.choice([b" " * 3_000_000, b"\n", b"x", b"{}", b"\x00", b"\xff\xfe"])
    if op == "reorder":
        return op, _dumps(doc, rng, shuffle=True).encode()
    if op == "respace":
        return op, json.dumps(doc, indent=rng.choice([None, 1, 4]), ensure_ascii=rng.random() < 0.5).encode()
    if op == "dup_key":
        dicts = [p for p in paths if isinstance(_at(doc, p), dict) and _at(doc, p)]
        return op, _dumps(doc, rng, dup=rng.choice(dicts)).encode() if dicts else data
    if op == "drop_key":
        keys = [p for p in paths if p and isinstance(p[-1], str)]
        return op, _dumps(doc, rng, drop=rng.choice(keys)).encode() if keys else data
    target = rng.choice(paths)
    raw = rng.choice(WRONG if op == "wrong_type" else HUGE)
    return op, _dumps(doc, rng, edit=(target, raw)).encode()


def _at(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def _flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 8])):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def mutate_jsonl(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    lines = data.split(b"\n")[:-1]
    op = rng.choice(["line", "line", "flip", "truncate", "swap", "duplicate", "drop"])
    if op == "flip":
        return op, _flip(data, rng)
    if op == "truncate":
        return op, data[:rng.randrange(len(data))]
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    if op == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "duplicate":
        lines.insert(i, lines[j])
    elif op == "drop":
        del lines[i]
    else:
        op, lines[i] = mutate_json(lines[i], rng)
        op = "line:" + op
    return op, b"\n".join(lines) + b"\n"


def mutate_zstd(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    op = rng.choice(["flip", "truncate", "append", "garbage_frame", "huge_header", "empty", "payload_flip"])
    if op == "flip":
        return op, _flip(data, rng)
    if op == "truncate":
        return op, data[:rng.randrange(len(data))]
    if op == "append":
        return op, data + bytes(rng.randrange(256) for _ in range(rng.choice([1, 64, 4096])))
    if op == "empty":
        return op, b""
    payload = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if op == "payload_flip":
        payload = _flip(payload, rng)
    elif op == "garbage_frame":
        payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 7, 100, 5000])))
    else:
        shape = rng.choice([[1 << 39, 1 << 39], [1 << 40], [2**62], [-1], [3, "x"]])
        header = json.dumps({"t": {"dtype": rng.choice(["F32", "F64", "XX"]), "shape": shape,
                                   "data_offsets": [0, 2**63]}}).encode()
        payload = struct.pack("<Q", len(header)) + header + b"\0" * 64
    return op, zstandard.ZstdCompressor(write_content_size=rng.random() < 0.8).compress(payload)


def mutate_zjson(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A v3 manifest: JSON mutations inside the frame, or zstd ones on it."""
    if rng.random() < 0.3:
        op, out = rng.choice(["flip", "truncate", "append", "no_size"]), data
        text = zstandard.ZstdDecompressor().decompress(data)
        if op == "no_size":
            return op, zstandard.ZstdCompressor(write_content_size=False).compress(text)
        return op, _flip(data, rng) if op == "flip" else data[:rng.randrange(len(data))] if op == "truncate" \
            else data + b"\x00" * rng.choice([1, 4096])
    op, text = mutate_json(zstandard.ZstdDecompressor().decompress(data), rng)
    return "inner:" + op, zstandard.ZstdCompressor().compress(text)


def mutate_pack(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A pack or an index: bit flips, a cut, bytes appended or removed, two 48-byte spans swapped."""
    op = rng.choice(["flip", "flip", "truncate", "append", "swap", "cut_middle"])
    if op == "flip":
        return op, _flip(data, rng)
    if op == "truncate":
        return op, data[:rng.randrange(len(data))]
    if op == "append":
        return op, data + bytes(rng.randrange(256) for _ in range(rng.choice([1, 48, 4096])))
    i = rng.randrange(16, max(17, len(data) - 96))
    if op == "cut_middle":
        return op, data[:i] + data[i + rng.choice([1, 8, 48]):]
    j = rng.randrange(i + 48, max(i + 49, len(data) - 48))
    return op, data[:i] + data[j:j + 48] + data[i + 48:j] + data[i:i + 48] + data[j + 48:]


MUTATORS = {"json": mutate_json, "jsonl": mutate_jsonl, "zstd": mutate_zstd, "zjson": mutate_zjson,
            "pack": mutate_pack, "index": mutate_pack}


# --- the loop -----------------------------------------------------------------------------------

def run_cases(root: Path, n: int, seed: int) -> tuple[Counter, list[str]]:
    from typer.testing import CliRunner

    from aftune.cli import app

    rng = random.Random(seed)
    order = [k for k in KINDS for _ in range(WEIGHTS.get(k, 3))]
    seen: Counter = Counter()
    bad: list[str] = []
    for case in range(n):
        name = order[case % len(order)] if case < len(order) else rng.choice(order)
        kind = KINDS[name]
        path = rng.choice(kind.files(root))
        original = path.read_bytes()
        op, mutated = MUTATORS[kind.syntax](original, rng)
        try:
            path.write_bytes(mutated)
            result = CliRunner().invoke(app, [str(a) for a in kind.command(root)])
        finally:
            path.write_bytes(original)
        code = result.exit_code
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            code = 3
        seen[(name, code)] += 1
        label = f"case {case} (seed {seed}): {name} {path.name} {op}"
        text = result.output
        if code not in (0, 1, 2) or "Traceback" in text:
            bad.append(f"{label}: exit {code}: {result.exception!r} {text[-300:]}")
        elif code != 0 and not text.strip():
            bad.append(f"{label}: exit {code} without a message")
        elif code == 0 and not kind.neutral(original, mutated):
            bad.append(f"{label}: exit 0 after a mutation that is not neutral: {text[-300:]}")
    return seen, bad


def _print(seen: Counter, n: int, seconds: float) -> None:
    codes = Counter()
    for (_, code), count in seen.items():
        codes[code] += count
    print(f"\nfuzz: {n} cases in {seconds:.1f} s, exit codes {dict(sorted(codes.items()))}")
    for name in KINDS:
        print(f"  {name}: " + ", ".join(f"exit {c}: {seen[(name, c)]}" for c in (0, 1, 2, 3) if seen[(name, c)]))


def test_fuzz_short_budget(pristine):
    t0 = time.perf_counter()
    seen, bad = run_cases(pristine, 40, seed=0)
    _print(seen, 40, time.perf_counter() - t0)
    assert not bad, "\n".join(bad)
    assert {name for name, _ in seen} == set(KINDS)


@pytest.mark.long
def test_fuzz_long(pristine):
    """10,000 cases (AFTUNE_FUZZ_CASES and AFTUNE_FUZZ_SEED change the budget and the seed)."""
    n, seed = int(os.environ.get("AFTUNE_FUZZ_CASES", "10000")), int(os.environ.get("AFTUNE_FUZZ_SEED", "1"))
    t0 = time.perf_counter()
    seen, bad = run_cases(pristine, n, seed=seed)
    _print(seen, n, time.perf_counter() - t0)
    assert not bad, f"{len(bad)} bad cases:\n" + "\n".join(bad[:50])


def test_numbers_out_of_binary64_range_are_bad_json():
    """Found by the long fuzz (seed 3, a bundle proof index of 1e999): such a number parsed to
    infinity and crashed a verifier with exit 3. Strict JSON now rejects it like NaN."""
    for text in ("1e999", '{"index": -1e400}', "[Infinity]", "NaN"):
        with pytest.raises(ValueError):
            jsonio.loads(text)
    assert jsonio.loads("[1e308, 5e-324]") == [1e308, 5e-324]


def test_a_bundle_proof_index_that_is_not_an_integer_is_a_record_error(pristine):
    from typer.testing import CliRunner

    from aftune.cli import app

    path = pristine / "bundle" / "bundle.json"
    original = path.read_bytes()
    doc = json.loads(original)
    sb = next(x for x in doc["step_blocks"] if x.get("partial"))
    row = next(iter(sb["partial"].values()))[0]
    try:
        for bad in (1.5, True, "0"):
            row[1] = bad
            path.write_text(json.dumps(doc))
            result = CliRunner().invoke(app, [str(a) for a in KINDS["bundle"].command(pristine)])
            assert result.exit_code in (1, 2) and "index and size must be integers" in result.output, result.output
    finally:
        path.write_bytes(original)
