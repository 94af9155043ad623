"""Bitwise verdicts on the client's own hardware (issue 26, inference): the serving dtype pinned by
the generation policy (`aftune.generation-policy.v2`), and portable records (SPEC.md 8.13) whose
strict replay is bitwise under other CPU kernels (`ATEN_CPU_CAPABILITY`) and thread counts, while
tampered ones still FAIL naming the boundary, the step and the element count.

    python -m pytest -q -n 0 tests/test_inference_portable.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aftune.core.encoding import canonical_json
from aftune.core.signing import SigningKey
from aftune.errors import InputError
from aftune.inference.engine import InferenceEngine, ServingDeviation
from aftune.inference.policy import POLICY_FORMAT_V1, GenerationPolicy
from aftune.inference.portable import TAU, adjust, bits_of, boundary_cap, midpoints, round_and_log, values_of
from aftune.inference.record import InferenceRecord, record_id
from aftune.inference.served import ServedModel
from aftune.inference.settings import RecordingSettings
from aftune.inference.verify import InferenceVerifier

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "aftune" / "builtin" / "model"
PROMPT = "Q: What is 3 plus 4? A:"
ROOT = Path(__file__).resolve().parents[1]


def pinned(n=10, **kw) -> GenerationPolicy:
    return GenerationPolicy.for_model(BUILTIN, max_new_tokens=n, eos_token_ids=(), stop_rule="length", **kw)


def make(record_dir, policy, *, dtype=None, deviation=None, layers_per_block=2, interval=1, model=BUILTIN,
         nonce=None, plain=False):
    served = ServedModel.load(model, dtype=dtype, plain=plain)
    engine = InferenceEngine(served, record_dir, SigningKey.generate(), RecordingSettings(layers_per_block, interval),
                             deviation=deviation)
    return engine.generate(PROMPT, policy, request_nonce=nonce)


def check(record_dir, result, policy, model=BUILTIN, **kw):
    v = InferenceVerifier(record_dir, result.record_id, model=model, policy=policy, expected_prompt=PROMPT, **kw)
    return v.verify_all()


def failures(report):
    return [e.describe() for e in report.errors] + [f.describe() for r in report.results for f in r.findings]


# --- A. the serving dtype ----------------------------------------------------------------------------

def test_policy_v2_pins_the_dtype_and_v1_still_reads():
    p = pinned()
    assert p.dtype == "float32" and p.numerics == "native" and p.to_json()["format"] == "aftune.generation-policy.v2"
    v1 = {k: v for k, v in p.to_json().items() if k not in ("dtype", "numerics")} | {"format": POLICY_FORMAT_V1}
    old = GenerationPolicy.from_json(v1)
    assert old.dtype is None and old.numerics == "native" and old.to_json() == v1  # v1 digest unchanged
    for bad, why in (({**p.to_json(), "dtype": None}, "dtype"), ({**p.to_json(), "dtype": "int8"}, "dtype"),
                     ({**p.to_json(), "numerics": "fast"}, "numerics"), ({**v1, "dtype": "float32"}, "unknown"),
                     ({**p.to_json(), "dtype": "bfloat16", "numerics": "portable"}, "numerics")):
        with pytest.raises(InputError, match=why):
            GenerationPolicy.from_json(bad)


def test_float32_policy_passes_and_bfloat16_serving_fails_naming_the_dtype(tmp_path):
    honest = make(tmp_path / "h", pinned())
    report = check(tmp_path / "h", honest, pinned())
    assert report.verdict == "PASS", failures(report)
    assert not [n for n in report.notes if "dtype" in n]
    # the provider serves bfloat16 weights of the client's float32 model, under its own bfloat16 policy
    cheap = make(tmp_path / "b", pinned(dtype="bfloat16"), dtype="bfloat16")
    report = check(tmp_path / "b", cheap, pinned())
    assert report.verdict == "FAIL"
    assert any("dtype" in f and "bfloat16" in f for f in failures(report)), failures(report)
    # ... or under a v1 policy, which pins nothing (the hole of SPEC.md 8.11 before v2): FAIL too
    v1 = GenerationPolicy(max_new_tokens=10, eos_token_ids=(), stop_rule="length")
    old = make(tmp_path / "o", v1, dtype="bfloat16")
    report = check(tmp_path / "o", old, pinned())
    assert report.verdict == "FAIL" and any("model.dtype" in f for f in failures(report)), failures(report)
    # a client holding a v1 policy is told that the dtype was not compared
    report = check(tmp_path / "o", old, v1)
    assert report.verdict == "PASS" and any("serving dtype was not compared" in n for n in report.notes)
    with pytest.raises(InputError, match="pins the serving dtype float32"):
        make(tmp_path / "x", pinned(), dtype="bfloat16")


def test_bfloat16_serving_of_a_run_fails_naming_the_dtype_with_run_as_with_model(record, tmp_path):
    run, key = record("llama", steps=2)
    policy = GenerationPolicy.for_model(run, max_new_tokens=4)
    assert policy.dtype == "float32"
    cheap = make(tmp_path / "r", GenerationPolicy.for_model(run, max_new_tokens=4, dtype="bfloat16"),
                 dtype="bfloat16", model=run / "model", plain=True)  # the run's weights, loaded in bfloat16
    for how in (dict(model=run, public_key=key), dict(model=run / "model")):
        v = InferenceVerifier(tmp_path / "r", cheap.record_id, policy=policy, expected_prompt=PROMPT, **how)
        found = failures(v.verify_all())
        assert any("dtype" in f and "bfloat16" in f for f in found), (how, found)


# --- B. the grid, the log and the rule -----------------------------------------------------------------

def test_rounding_log_and_rule_by_hand():
    torch.manual_seed(0)
    x = torch.randn(1, 7, 64)
    g, entries = round_and_log(x, TAU)
    assert g.dtype == torch.bfloat16 and torch.equal(g, x.to(torch.bfloat16))
    assert 0 < len(entries) < boundary_cap(x.numel())
    lo, hi = midpoints(bits_of(g))
    assert bool((lo <= x.double()).all() and (x.double() <= hi).all())
    # the verifier's own value just across a logged element's midpoint: the committed value is taken
    i, b = entries[0]
    xi, lo_i, hi_i = x.reshape(-1)[i], lo.reshape(-1)[i].float(), hi.reshape(-1)[i].float()
    up = bool(hi_i - xi < xi - lo_i)
    y = x.clone().reshape(-1)
    inf = torch.tensor(float("inf"))
    y[i] = torch.nextafter(hi_i, inf) if up else torch.nextafter(lo_i, -inf)
    y = y.reshape(x.shape)
    assert not torch.equal(y.to(torch.bfloat16), g)  # its own rounding differs ...
    got = adjust(y, entries, TAU)
    assert not got.refused and got.taken == 1 and torch.equal(got.grid, g)  # ... and the log takes the committed one
    assert not torch.equal(adjust(y, [], TAU).grid, g)  # without the log entry it could not
    # two grid steps away: refused
    far = [[i, int(bits_of(values_of(torch.tensor([b])).float().to(torch.bfloat16) * 1.02)[0])]]
    assert adjust(x, far, TAU).refused == [i]


# --- B. honest portable records under other kernels and thread counts -----------------------------

SCRIPT = """
import json, sys, torch
spec = json.loads(sys.argv[1])
if spec.get("threads"):
    torch.set_num_threads(spec["threads"])
from aftune.inference.policy import GenerationPolicy
from aftune.inference.verify import InferenceVerifier
if spec["make"]:
    from aftune.core.signing import SigningKey
    from aftune.inference.engine import InferenceEngine
    from aftune.inference.served import ServedModel
    from aftune.inference.settings import RecordingSettings
    served = ServedModel.load(spec["model"])
    for name, policy in spec["policies"].items():
        interval = 0 if name == "portable" else 1  # portable: digest only, regenerated by the chain on any CPU
        e = InferenceEngine(served, spec["dir"] + "/" + name, SigningKey.generate(), RecordingSettings(1, interval))
        e.generate(spec["prompt"], GenerationPolicy.from_json(policy))
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}))
else:
    out = {}
    for name, policy in spec["policies"].items():
        v = InferenceVerifier(spec["dir"] + "/" + name, None, model=spec["model"], expected_prompt=spec["prompt"],
                              policy=GenerationPolicy.from_json(policy))
        r = v.verify_all()
        out[name] = [r.verdict, [res.verdict for res in r.results], torch.get_num_threads(),
                     torch.backends.cpu.get_cpu_capability()]
    print(json.dumps(out))
"""


def _python(spec: dict, **env) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")}
    e.update(env, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec)], env=e, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_portable_records_pass_bitwise_under_other_kernels_and_thread_counts(tmp_path):
    """Recorded with the default kernels and 2 threads (activations not stored: I_A = 0); verified
    in subprocesses under ATEN_CPU_CAPABILITY=avx2, =default and with 1 thread. Native records are
    verified the same way, to show what happens without portable numerics."""
    policies = {"portable": pinned(12, numerics="portable").to_json(), "native": pinned(12).to_json()}
    spec = dict(model=str(BUILTIN), dir=str(tmp_path), prompt=PROMPT, policies=policies)
    made = _python({**spec, "make": True, "threads": 2})
    results = {}
    for label, env, threads in (("avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, 2),
                                ("default", {"ATEN_CPU_CAPABILITY": "default"}, 2),
                                ("1 thread", {}, 1)):
        results[label] = _python({**spec, "make": False, "threads": threads}, **env)
    print("\nrecorded with", made, "\n" + "\n".join(f"{k}: {v}" for k, v in results.items()))
    for label, out in results.items():
        assert out["portable"][0] == "PASS", (label, out)
    # native strict replay under the portable-kernel fallback differs bitwise from the vectorised kernels
    assert results["default"]["native"][0] == "FAIL", results
    # under avx2 it passes exactly when avx2 is what the recording machine used
    assert (results["avx2"]["native"][0] == "PASS") == (made["capability"] == "AVX2"), (made, results)
    # the native verifier pins the recorded thread count (SPEC.md 8.4 environment), so 1 thread passes
    assert results["1 thread"]["native"][0] == "PASS", results


def test_portable_sampling_and_stored_records_pass_and_refuse_tolerance_mode(tmp_path):
    nonce = bytes(range(32))
    policy = pinned(8, numerics="portable", temperature=0.9, top_p=0.9)
    result = make(tmp_path / "s", policy, nonce=nonce, layers_per_block=1)
    report = check(tmp_path / "s", result, policy, request_nonce=nonce)
    assert report.verdict == "PASS", failures(report)
    rec = InferenceRecord.open(tmp_path / "s")
    assert rec.doc["format"] == "aftune.inference.v6" and rec.portable is not None
    assert all(r.dtype == "BF16" for k, r in rec.rows.items() if k.startswith("boundary/"))
    with pytest.raises(InputError, match="portable numerics"):
        InferenceVerifier(tmp_path / "s", model=BUILTIN, mode="tolerance")
    # digest-only boundaries are regenerated bitwise (prepare-inference), here or on any other CPU
    from aftune.inference.regenerate import prepare_inference

    bare = make(tmp_path / "d", pinned(6, numerics="portable"), interval=0, layers_per_block=1)
    assert prepare_inference(tmp_path / "d", bare.record_id, layer_block=3, model=BUILTIN) == [3, 4]
    v = InferenceVerifier(tmp_path / "d", bare.record_id, model=BUILTIN, policy=pinned(6, numerics="portable"),
                          expected_prompt=PROMPT)
    assert v.verify([3]).verdict == "PASS"


def test_v3_records_still_read(tmp_path):
    from test_inference_served import as_v5

    result = make(tmp_path / "n", pinned())
    doc = as_v5(tmp_path / "n", result.record_id)
    served = json.loads((tmp_path / "n" / "served" / f"{doc.pop('served')}.json").read_text())
    doc.update(format="aftune.inference.v3", model=served["model"], layout=served["layout"])  # v3 holds them
    del doc["numerics"]
    data = canonical_json(doc)
    (tmp_path / "n" / "records" / f"{record_id('blake3', data).hex()}.json").write_bytes(data)
    result.record_path.unlink()
    report = InferenceVerifier(tmp_path / "n", model=BUILTIN, policy=pinned(), expected_prompt=PROMPT).verify_all()
    assert report.verdict == "PASS", failures(report)


# --- B. tampered portable records ----------------------------------------------------------------------

def _step_key(bits: int, steps: int) -> int:
    """The bfloat16 `steps` grid steps above `bits` (positive values)."""
    assert bits < 0x8000
    return bits + steps


class MoveElement(ServingDeviation):
    """Commit one element of boundary 1 at step 0 `steps` grid steps away (and feed it on); `logged`:
    list it in the near-boundary log; `among_logged`: pick an element the honest log lists."""

    def __init__(self, steps=1, logged=True, among_logged=False):
        self.steps, self.logged, self.among_logged = steps, logged, among_logged
        self.index = None

    def grid(self, step, boundary, grid, entries):
        if (step, boundary) != (0, 1):
            return grid, entries
        flat = bits_of(grid).reshape(-1)
        listed = {i for i, _ in entries}
        positive = [i for i in range(flat.numel()) if int(flat[i]) < 0x8000 and int(flat[i]) != 0]
        candidates = [i for i in positive if (i in listed) == self.among_logged]
        # an ordinary element (a logged one: the largest, whose band is well inside one grid step)
        middle = candidates[len(candidates) // 2]
        self.index = max(candidates, key=lambda i: int(flat[i])) if self.among_logged else middle
        moved = _step_key(int(flat[self.index]), self.steps)
        flat = flat.clone()
        flat[self.index] = moved
        grid = values_of(flat).to(torch.bfloat16).reshape(grid.shape)
        entries = [e for e in entries if e[0] != self.index]
        if self.logged:
            entries = sorted(entries + [[self.index, moved]])
        return grid, entries


class LogEverything(ServingDeviation):
    """A near-boundary log listing every element of boundary 1: a free grid step everywhere."""

    offset = 0

    def grid(self, step, boundary, grid, entries):
        if boundary != 1:
            return grid, entries
        flat = bits_of(grid).reshape(-1).tolist()
        entries = [[self.offset + i, b] for i, b in enumerate(flat)]
        self.offset += len(flat)
        return grid, entries


class ScaleWeight(ServingDeviation):
    def weights(self, model):
        w = model.model.layers[2].mlp.down_proj.weight
        w.data.view(-1)[int(w.abs().argmax())] *= 1.5


class ChangeToken(ServingDeviation):
    def __init__(self, claim_tie=False):
        self.claim_tie = claim_tie

    def token(self, step, logits, token):
        return (token + 1) % logits.numel() if step == 3 else token

    def ties(self, steps):
        return sorted(set(steps) | {3}) if self.claim_tie else steps


@pytest.mark.parametrize("deviation, block, words", [
    (MoveElement(1, logged=False), 0, "1 element(s) of boundary 1 are neither the grid rounding"),
    (MoveElement(1, logged=True), 0, "boundary 1: 1 logged element(s) commit a value that is not the grid rounding"),
    (MoveElement(2, logged=True, among_logged=True), 0, "boundary 1: 1 logged element(s)"),
    (LogEverything(), 0, "more than the cap"),
    (ScaleWeight(), 1, "boundary 2"),  # its logged elements break the rule, or its digest differs
    (ChangeToken(), 3, "token 3"),
    (ChangeToken(claim_tie=True), 3, "not near a tie"),
], ids=["element-one-step", "element-one-step-logged", "logged-two-steps", "log-everything", "weight-x1.5", "token",
        "token-claimed-tie"])
def test_tampered_portable_records_fail_naming_boundary_step_and_count(tmp_path, deviation, block, words):
    policy = pinned(8, numerics="portable")
    result = make(tmp_path / "t", policy, deviation=deviation)
    report = check(tmp_path / "t", result, policy)
    assert report.verdict == "FAIL"
    failed = [r for r in report.results if r.verdict == "FAIL"]
    assert failed and failed[0].layer_block == block, [(r.layer_block, r.verdict) for r in report.results]
    text = " | ".join(f.describe() for f in failed[0].findings)
    assert words in text, text
    if isinstance(deviation, MoveElement):
        assert failed[0].findings[0].step == 0


def test_spec_vectors_of_portable_numerics():
    """SPEC.md 8.12 (the v2 policy digest) and 8.13 (midpoints, rounding, log encoding)."""
    from aftune.inference.portable import decode_log, encode_log, to_grid

    p = GenerationPolicy(max_new_tokens=8, eos_token_ids=[2], dtype="float32", numerics="portable")
    assert len(canonical_json(p.to_json())) == 198
    assert p.digest("blake3").hex() == "e6da6ce49ff151399a14f3027c1e83e968e3a0ef95b1721a90ab90e2a12dc2e8"
    assert p.digest("sha256").hex() == "a2277ca62df6a8ba11f5dcabdf5a00e069b927a0a9f467b2f40511608d8c48df"
    one = bits_of(torch.tensor([1.0], dtype=torch.bfloat16))
    lo, hi = midpoints(one)
    assert (float(lo), float(hi)) == (0.998046875, 1.00390625)
    assert float(to_grid(torch.tensor([1.00390625]))) == 1.0  # a tie: to even
    assert bits_of(to_grid(torch.tensor([-1e-45]))).tolist() == [0]  # -0 becomes +0
    entries = [[0, 0x3F80], [1, 0x3F81], [200, 0x0001]]
    assert encode_log(entries) == "AD+AAD+BxgEAAQ==" and decode_log("AD+AAD+BxgEAAQ==", 201, "x") == entries
    from aftune.errors import RecordError

    for bad in ("AD+AAD+BxgEAAQ", "AD+AAD+BxgEAAQ==x", "gAA/gA==", "AP+A"):  # unpadded, junk, non-minimal, -0... or NaN
        with pytest.raises(RecordError):
            decode_log(bad, 201, "x")
    with pytest.raises(RecordError, match="outside"):
        decode_log("AD+AAD+BxgEAAQ==", 200, "x")


def test_the_records_block_depth_widens_tau_only_as_far_as_the_client_accepts(tmp_path):
    """tau widens for deeper layer blocks, and the record's depth is the provider's choice: it
    counts only up to the client's max_layers_per_block (as tolerance thresholds do)."""
    policy = pinned(4, numerics="portable")
    deep = make(tmp_path / "deep", policy, layers_per_block=4)
    v = InferenceVerifier(tmp_path / "deep", deep.record_id, model=BUILTIN, policy=policy, expected_prompt=PROMPT)
    assert v.portable_depth == 2 and any("--max-layers-per-block 4" in n for n in v.notes), v.notes
    accepting = InferenceVerifier(tmp_path / "deep", deep.record_id, model=BUILTIN, policy=policy,
                                  expected_prompt=PROMPT, max_layers_per_block=4)
    assert accepting.portable_depth == 4 and not any("max-layers-per-block" in n for n in accepting.notes)
    report = accepting.verify_all()
    assert report.verdict == "PASS", failures(report)
