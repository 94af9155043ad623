"""Serving-side attacks on the bench's fine-tuned model (the honest run's, or for `quant-activated`
the Qu-ANTI-zation run's), recorded with aftune's inference engine and verified with its
inference verifier (strict and tolerance mode).

    from aftune.attacks.serving import run_serving_attack
    result = run_serving_attack(bench, "activation")

Each request is one test image classified by the honest run's RUN/model (ServedModel.load checks
it is the run's signed final model), recorded with one layer per layer block. For each attack:
what the attacker gained, which layer blocks of the tampered records fail, the tolerance-mode
margin (the error the verifier sees for the smallest successful perturbation, over the threshold,
next to the honest replay error), and the detection rate of inference challenges over the
record's layer blocks.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..protocol.challenge import derive_challenge
from ..inference.engine import InferenceEngine
from ..inference.served import ServedModel
from ..inference.settings import RecordingSettings
from ..protocol.probability import placement_detection
from ..errors import InputError
from ..core.signing import SigningKey
from ..inference.verify import InferenceVerifier
from ..verdict.comparison import Tolerance
from .detection import SAMPLE_RATES, nonce_for
from .task import accuracy, load_classifier, torch_threads

SERVING_ATTACKS = ("quant-serving", "quant-activated", "activation", "parameter")


@dataclass
class ServingResult:
    name: str
    threat: str
    record_dir: Path
    summary: str
    gain: dict
    records: list[dict] = field(default_factory=list)  # per tampered record: id, failing blocks, headlines
    margins: dict = field(default_factory=dict)  # tolerance mode: honest error, threshold, attack error
    affected: list[int] = field(default_factory=list)  # layer blocks the tampering touched
    extra: dict = field(default_factory=dict)
    model_run: Path | None = None  # the run whose RUN/model the client paid for (verifiers load it)

    def to_json(self) -> dict:
        return {"name": self.name, "threat": self.threat, "record_dir": str(self.record_dir), "summary": self.summary,
                "gain": self.gain, "records": self.records, "margins": self.margins, "affected": self.affected,
                "extra": self.extra, "model_run": str(self.model_run) if self.model_run else None}

    def lines(self) -> list[str]:
        out = []
        for r in self.records[:4]:
            out.append(f"record {r['record'][:16]}…: {r['verdict']} (failing layer blocks {r['failing']})")
            out += [f"  {h[:220]}" for h in r["headlines"][:2]]
        m = self.margins
        if m:
            out.append(f"tolerance mode: honest replay error {m['honest_error']:.3g}, threshold {m['threshold']:.3g}, "
                       f"smallest successful attack {m['attack_error']:.3g} (margin {m['margin']:.3g}x over the "
                       f"threshold, {m['attack_error'] / max(m['honest_error'], 1e-300):.3g}x over honest error); "
                       f"tolerance verdict {m['tolerance_verdict']}")
        for k, v in self.extra.items():
            out.append(f"{k}: {v}")
        return out


class ServingBench:
    """A fine-tuned model (by default the honest run's) served with recording; images of the test
    set as request files."""

    def __init__(self, bench, layers_per_block: int = 1, run_dir: Path | None = None):
        self.bench = bench
        self.run_dir = run_dir or bench.honest().run_dir
        self.key = SigningKey.load(self.run_dir / "provider.key")  # the provider trains and serves
        self.settings = RecordingSettings(layers_per_block=layers_per_block)
        self.root = bench.work / "serving"
        self.images = self.root / "images"
        self.images.mkdir(parents=True, exist_ok=True)

    def image(self, i: int) -> Path:
        from PIL import Image

        path = self.images / f"{i:04d}.png"
        if not path.is_file():
            Image.fromarray(self.bench.assets.test_images[i].permute(1, 2, 0).numpy()).save(path)
        return path

    def served(self) -> ServedModel:
        return ServedModel.load(self.run_dir)

    def serve(self, record_dir: Path, i: int, deviation=None):
        engine = InferenceEngine(self.served(), record_dir, self.key, self.settings, deviation=deviation)
        return engine.classify(image=self.image(i))

    def verify(self, record_dir: Path, result, *, mode: str = "strict", replay_dtype: str | None = None):
        v = InferenceVerifier(record_dir, result.record_id, model=self.run_dir, mode=mode,
                              replay_dtype=replay_dtype, public_key=self.key.public_key)
        return v.verify_all()

    def honest_error(self, i: int = 0) -> float:
        """Largest relative L2 error of an honest record replayed in float64 (tolerance mode)."""
        d = Path(tempfile.mkdtemp(prefix="aftune-honest-", dir=self.root))
        try:
            result = self.serve(d, i)
            report = self.verify(d, result, mode="tolerance", replay_dtype="float64")
            if report.verdict != "PASS":
                raise RuntimeError(f"an honest record failed tolerance replay: {report.summary()}")
            return max(r.max_error for r in report.results)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def _failing(report) -> list[int]:
    return [r.layer_block for r in report.results if r.verdict == "FAIL"]


def _record_summary(result, report) -> dict:
    return {"record": result.record_id, "label": result.label, "verdict": report.verdict,
            "failing": _failing(report), "errors": [e.describe() for e in report.errors],
            "headlines": [r.headline() for r in report.results if r.verdict == "FAIL"]}


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


# --- 3. quantized serving -------------------------------------------------------------------------

def quant_serving(bench, bits: int = 4, requests: int = 8, model: str = "honest") -> ServingResult:
    """Serve a `bits`-bit copy of the honest model (`model="honest"`: the provider saves memory)
    or of the Qu-ANTI-zation run's model (`"quant-objective"`: the behaviour its training planted
    for quantization fires)."""
    from .quant_serving import QuantizedServing
    from .quantize import quantize_model_

    if model not in ("honest", "quant-objective"):
        raise InputError(f"--model must be honest or quant-objective, got {model!r}")
    trained = bench.honest() if model == "honest" else bench.latest("quant-objective")
    sb = ServingBench(bench, run_dir=trained.run_dir)
    name = "quant-serving" if model == "honest" else "quant-activated"
    rec_dir = _fresh(sb.root / name)
    a = bench.assets
    served = load_classifier(sb.run_dir / "model")
    float_acc = accuracy(served, a.test_images, a.test_labels)
    q = quantize_model_(copy.deepcopy(served), bits)
    q_acc = accuracy(q, a.test_images, a.test_labels)
    from .task import normalize, predict

    changed_all = float((predict(served, normalize(a.test_images)) != predict(q, normalize(a.test_images))).float().mean())
    records, changed, expected = [], 0, None
    for i in range(requests):
        honest_label = int(predict(served, normalize(a.test_images[i:i + 1]))[0])
        result = sb.serve(rec_dir, i, QuantizedServing(bits))
        changed += result.label != honest_label
        records.append(_record_summary(result, sb.verify(rec_dir, result)))
        if expected is None:
            expected = _quantized_blocks_expected(sb, rec_dir, result)
    tol = sb.verify(rec_dir, result, mode="tolerance", replay_dtype="float64")
    threshold = Tolerance.for_dtype("float32").rel_l2
    first = next((r for r in tol.results if r.verdict == "FAIL"), None)
    attack_error = first.findings[0].error if first and first.findings and first.findings[0].error else 0.0
    honest = sb.honest_error()
    gain = {"bits": bits, "memory_ratio": bits / 32, "accuracy_float": float_acc, "accuracy_served": q_acc,
            "answers_changed": changed_all, "requests": requests, "requests_changed": changed}
    summary = (f"serves {bits}-bit weights ({bits / 32:.0%} of the float memory) as the float model; accuracy "
               f"{q_acc:.3f} (float {float_acc:.3f}), {changed_all:.1%} of test answers changed")
    threat = "Qu-ANTI-zation B: a quantized copy served as the float model"
    if model != "honest":
        summary = f"the Qu-ANTI-zation model served in {bits} bits: " + summary
        threat = "Qu-ANTI-zation A then B: the planted collapse fires when the model is served quantized"
    margins = {"honest_error": honest, "threshold": threshold, "attack_error": attack_error,
               "margin": attack_error / threshold, "tolerance_verdict": tol.verdict,
               "tolerance_failing": _failing(tol)}
    return ServingResult(name, threat, rec_dir, summary, gain, records, margins, expected, model_run=sb.run_dir)


def _quantized_blocks_expected(sb: ServingBench, rec_dir: Path, result) -> list[int]:
    """Every layer block but the last computes other activations; the last (the head) is caught
    only if the float head, fed the committed input, answers differently from the served label."""
    from ..inference.record import InferenceRecord, boundary_key

    served = sb.served()
    blocks = served.blocks(sb.settings.layers_per_block)
    nb = len(blocks)
    rec = InferenceRecord.open(rec_dir, result.record_id)
    ctx = served.step_context(0, {"pixel_values": rec.tensor("input/pixel_values")})
    with torch.no_grad():
        logits = served.run_block(blocks, nb - 1, rec.tensor(boundary_key(nb - 1)), ctx, None)
    return list(range(nb - 1)) + ([nb - 1] if int(logits.argmax()) != result.label else [])


# --- 4. activation attack ------------------------------------------------------------------------

def activation(bench, boundary: int = 2, requests: int = 4, rounds: int = 10) -> ServingResult:
    from .activation import PerturbedBoundary, smallest_perturbation

    sb = ServingBench(bench)
    rec_dir = _fresh(sb.root / "activation")
    served = sb.served()
    blocks = served.blocks(sb.settings.layers_per_block)
    records, attacks, tol_reports = [], [], []
    for i in range(requests):
        inputs, _ = served.image_inputs(sb.image(i))
        found = smallest_perturbation(served, blocks, boundary, inputs, rounds=rounds)
        if found is None:
            continue
        attacks.append(found)
        result = sb.serve(rec_dir, i, PerturbedBoundary(boundary, found.delta))
        report = sb.verify(rec_dir, result)
        summary = _record_summary(result, report)
        summary.update(found.to_json(), served_label=result.label)
        records.append(summary)
        tol_reports.append(sb.verify(rec_dir, result, mode="tolerance", replay_dtype="float64"))
    if not attacks:
        raise InputError("PGD changed no answer within a perturbation of relative size 2: attack another boundary")
    threshold = Tolerance.for_dtype("float32").rel_l2
    smallest = min(attacks, key=lambda a: a.eps)
    # the error the verifier measured on the record served with the smallest perturbation
    k = attacks.index(smallest)
    observed = max((f.error or 0.0) for r in tol_reports[k].results for f in r.findings) if tol_reports[k].results else 0.0
    honest = sb.honest_error()
    gain = {"boundary": boundary, "answers_changed": sum(r["served_label"] != r["label"] for r in records),
            "requests": len(records), "eps_min": smallest.eps, "eps_mean": sum(a.eps for a in attacks) / len(attacks)}
    summary = (f"answer changed on {gain['answers_changed']}/{len(records)} requests by perturbing the input of layer "
               f"block {boundary}; smallest relative L2 {smallest.eps:.3g}")
    margins = {"honest_error": honest, "threshold": threshold, "attack_error": observed, "eps_min": smallest.eps,
               "margin": observed / threshold,
               "tolerance_verdict": "FAIL" if all(r.verdict == "FAIL" for r in tol_reports) else "PASS",
               "tolerance_failing": sorted({b for r in tol_reports for b in _failing(r)})}
    return ServingResult("activation", "AFTUNE activation attack: PGD on a block input", rec_dir, summary, gain,
                         records, margins, [boundary - 1])


# --- 5. parameter attack -------------------------------------------------------------------------

def parameter(bench, layer: str | None = None, target: int = 0, rounds: int = 6) -> ServingResult:
    """AFTUNE's two goals, each for one request: a backdoor (a triggered image gets the target
    class) and poison (a clean image is misclassified), each by its smallest edit of the weight
    matrices of one layer: `layer` (a layer prefix or one tensor name), or by default the first
    layer the search finds reaching both goals (`parameter.search_edit`)."""
    from PIL import Image

    from .bitflip import apply_trigger, triggered_inputs
    from .lazy import poison_trigger
    from .parameter import BOUND_SCHEDULE, EditedWeights, Goal, candidate_layers, edited_accuracy, search_edit
    from .task import make_images, normalize, predict

    sb = ServingBench(bench)
    rec_dir = _fresh(sb.root / "parameter")
    a = bench.assets
    model = load_classifier(sb.run_dir / "model")
    own_x, own_y = make_images("textures", 8, bench.task.image_size, bench.task.seed + 900)  # keeps the rest intact
    clean_x = normalize(own_x)
    trigger = poison_trigger(bench.task.patch_size)
    held = [i for i in range(len(a.test_labels)) if int(a.test_labels[i]) != target]
    b_index, p_index = held[0], held[1]
    xb = triggered_inputs(a.test_images[b_index:b_index + 1], trigger)
    xp = normalize(a.test_images[p_index:p_index + 1])
    wrong = torch.tensor([(int(predict(model, xp)[0]) + 1) % bench.task.num_classes])
    candidates = candidate_layers(model, layer)
    with torch_threads(bench.threads):
        edits = search_edit(model, candidates, [Goal("backdoor", xb, torch.tensor([target])), Goal("poison", xp, wrong)],
                            clean_x, own_y, rounds=rounds)
    if edits is None:
        raise InputError(f"no edit of {' or '.join(candidates)} within a relative-L2 bound of {BOUND_SCHEDULE[-1]} "
                         "reaches both goals: edit another layer")
    layer, names = edits[0].layer, edits[0].layers
    owners = sorted({bench.owner_map()[0][n] for n in names})
    records, tol_reports = [], []
    for e in edits:
        if e.goal == "backdoor":  # the request is the triggered image
            path = sb.images / "triggered.png"
            img = (apply_trigger(a.test_images[b_index:b_index + 1].float() / 255.0, trigger)[0] * 255).round().byte()
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
            engine = InferenceEngine(sb.served(), rec_dir, sb.key, sb.settings, deviation=EditedWeights(e.delta))
            result = engine.classify(image=path)
            goal_met = result.label == target
        else:
            result = sb.serve(rec_dir, p_index, EditedWeights(e.delta))
            goal_met = result.label == int(wrong[0])
        report = sb.verify(rec_dir, result)
        s = _record_summary(result, report)
        s.update(e.to_json(), goal_met=goal_met)
        records.append(s)
        tol_reports.append(sb.verify(rec_dir, result, mode="tolerance", replay_dtype="float64"))
    threshold = Tolerance.for_dtype("float32").rel_l2
    smallest = min(range(len(edits)), key=lambda k: edits[k].rel_l2)
    observed = max((f.error or 0.0) for r in tol_reports[smallest].results for f in r.findings)
    honest = sb.honest_error()
    clean_acc = accuracy(model, a.test_images, a.test_labels)
    gain = {"layer": layer, "accuracy_clean": clean_acc}
    parts = []
    for e, rec in zip(edits, records):
        acc = edited_accuracy(model, e, normalize(a.test_images), a.test_labels)
        gain[e.goal] = {**e.to_json(), "accuracy": acc, "served_answer_as_wanted": rec["goal_met"]}
        what = "the triggered image answered with the target" if e.goal == "backdoor" else "the chosen image misclassified"
        parts.append(f"{e.goal}: {what} by a relative-L2 edit of {e.rel_l2:.3g} (accuracy {acc:.3f})")
    summary = f"{layer} edited: " + "; ".join(parts) + f"; unedited accuracy {clean_acc:.3f}"
    margins = {"honest_error": honest, "threshold": threshold, "attack_error": observed,
               "edit_rel_l2": edits[smallest].rel_l2, "margin": observed / threshold,
               "tolerance_verdict": "FAIL" if all(r.verdict == "FAIL" for r in tol_reports) else "PASS",
               "tolerance_failing": sorted({b for r in tol_reports for b in _failing(r)})}
    return ServingResult("parameter", "AFTUNE parameter attack: a bounded weight edit", rec_dir, summary, gain,
                         records, margins, owners, extra={"edits": [e.to_json() for e in edits]})


QUICK = {"quant-serving": {"requests": 2}, "quant-activated": {"requests": 2}, "activation": {"requests": 1, "rounds": 6}, "parameter": {"rounds": 4}}


def _quant_activated(bench, **options) -> ServingResult:
    return quant_serving(bench, model="quant-objective", **options)


def run_serving_attack(bench, name: str, **options) -> ServingResult:
    fn = {"quant-serving": quant_serving, "quant-activated": _quant_activated, "activation": activation,
          "parameter": parameter}.get(name)
    if fn is None:
        raise ValueError(f"unknown serving attack {name!r}: choose one of {', '.join(SERVING_ATTACKS)}")
    if getattr(bench, "quick", False):
        options = {**QUICK[name], **options}
    return fn(bench, **options)


# --- detection of inference records ----------------------------------------------------------------

def inference_detection(record_id: bytes, num_layer_blocks: int, failing: list[int], *, sample_rates=SAMPLE_RATES,
                        trials: int = 1000, label: str = "") -> list[dict]:
    """Detection rate of inference challenges (uniform over the record's layer blocks)."""
    bad = {(l, 0) for l in failing}
    rows = []
    for rate in sample_rates:
        hits, k = 0, 0
        for i in range(trials):
            c = derive_challenge(record_id, nonce_for(f"{label}/{rate}", i), num_layer_blocks, 1, "uniform",
                                 sample_rate=rate, kind="inference")
            k = c.num_challenged
            hits += bool(bad & set(c.blocks))
        predicted = placement_detection("uniform", k, num_layer_blocks, 1, bad) if bad else 0.0
        rows.append({"sample_rate": rate, "count": k, "trials": trials, "detected": hits,
                     "empirical": hits / trials, "predicted": predicted})
    return rows


def detection_rows(bench, names, *, sample_rates=SAMPLE_RATES, trials: int = 1000, say=lambda text: None) -> list[dict]:
    """eval-detection rows for the serving attacks (one per attack, from its first tampered record),
    with a real challenged verification of that record."""
    rows = []
    for name in names:
        say(name)
        result = run_serving_attack(bench, name)
        first = result.records[0]
        record_id = bytes.fromhex(first["record"])
        sb_blocks = bench.num_layer_blocks
        failing = first["failing"]
        rates = inference_detection(record_id, sb_blocks, failing, sample_rates=sample_rates, trials=trials,
                                    label=name)
        # real challenges: a fresh nonce, then one whose challenge draws a failing block; only the
        # challenged layer blocks are verified
        reals = []
        nonces = [nonce_for(f"{name}/real", 0)]
        for i in range(10000):
            n = nonce_for(f"{name}/hit", i)
            c = derive_challenge(record_id, n, sb_blocks, 1, "uniform", sample_rate=0.25, kind="inference")
            if {l for l, _ in c.blocks} & set(failing):
                nonces.append(n)
                break
        for n in nonces:
            c = derive_challenge(record_id, n, sb_blocks, 1, "uniform", sample_rate=0.25, kind="inference")
            v = InferenceVerifier(result.record_dir, first["record"], model=result.model_run or bench.honest().run_dir,
                                  mode="strict")
            report = v.verify([l for l, _ in c.blocks])
            expected = "FAIL" if {l for l, _ in c.blocks} & set(failing) or v.errors else "PASS"
            reals.append({"nonce": n.hex(), "sample_rate": 0.25, "blocks": [list(b) for b in c.blocks],
                          "expected": expected, "verdict": report.verdict, "agrees": expected == report.verdict,
                          "failing": [[l, 0] for l in _failing(report)],
                          "headlines": [r.headline() for r in report.results if r.verdict == "FAIL"]})
        det = {"grid": [sb_blocks, 1], "strategy": "uniform", "failing": [[l, 0] for l in failing],
               "tampered_blocks": len(failing), "headlines": first["headlines"], "final_model_findings": [],
               "rates": rates, "real_audits": reals, "inference": True}
        rows.append({"name": name, "threat": result.threat, "run_dir": str(result.record_dir), "gain": result.gain,
                     "summary": result.summary, "affected": [[l, 0] for l in result.affected], "details": result.to_json(),
                     "detection": det, "failing_equals_affected": sorted(failing) == sorted(result.affected),
                     "real_audits_agree": all(r["agrees"] for r in reals), "margins": result.margins})
    return rows
