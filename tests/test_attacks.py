"""The attack suite, both ways: each attack is built for real on the small attack bench (a tiny
ViT fine-tuned on synthetic textures through aftune's own trainer), its effect is measured on
held-out data, and the audit FAILs exactly the blocks it touched, naming them. Heavier runs
(full-size WBP search, eval-detection) live in test_attacks_slow.py."""

from __future__ import annotations

import pytest
import torch

from aftune.attacks import bitflip
from aftune.attacks.bench import Bench
from aftune.attacks.detection import (failing_blocks, first_hitting_nonce, measure_detection, real_audit, run_root,
                                      simulate)
from aftune.attacks.task import load_classifier
from aftune.protocol.probability import detection_probability
from aftune.core.signing import PublicKey
from aftune.training.verify import Verifier


@pytest.fixture(scope="session")
def bench(tmp_path_factory):
    """The small bench: 4 layer blocks x 4 step blocks (16 steps), one honest run."""
    b = Bench.small(tmp_path_factory.mktemp("attack-bench"))
    b.honest()
    return b


def audited(run):
    report = run.verifier().verify_all()
    return report, failing_blocks(report)


def assert_named(report, blocks):
    """Every failing block's verdict names its layer block and step block."""
    for r in report.results:
        if r.verdict == "FAIL":
            head = r.headline()
            assert f"layer block {r.layer_block} " in head and f"step block {r.step_block}" in head, head
    assert sorted((r.layer_block, r.step_block) for r in report.results if r.verdict == "FAIL") == blocks


def assert_caught_by_real_audit(run, failing):
    """A challenge (client nonce, derived from the signed root) drawing a touched block: the
    provider opens it, the client audits the bundle, and the audit FAILs naming that block."""
    key = run.key()
    root = run_root(run.run_dir, key)
    L, S = 4, 4  # the small bench's grid
    nonce = first_hitting_nonce(root, L, S, failing, 0.25, run.name)
    real = real_audit(run.run_dir, key, run.agreement(), root, L, S, failing, 0.25, nonce)
    assert real.verdict == "FAIL" and real.agrees
    assert set(real.failing) == set(real.blocks) & set(failing)
    assert any(f"layer block {l} " in h and f"step block {s}" in h for l, s in real.failing for h in real.headlines)


def test_honest_run_passes_and_is_never_detected(bench):
    honest = bench.honest()
    report, failing = audited(honest)
    assert report.verdict == "PASS" and failing == []
    assert honest.gain["accuracy"] > 0.5  # the agreed fine-tune learns the task


# --- 6. lazy and dishonest training ------------------------------------------------------------

def test_skipped_steps_fail_every_layer_block_of_their_step_blocks(bench):
    run = bench.skip_steps(0.15)
    assert run.gain["steps_skipped"] >= 2 and run.gain["work_saved"] > 0.1  # measured from the deviation's log
    honest_w = load_classifier(bench.honest().run_dir / "model").state_dict()
    lazy_w = load_classifier(run.run_dir / "model").state_dict()
    assert any(not torch.equal(honest_w[k], lazy_w[k]) for k in honest_w)  # the claimed model is another
    report, failing = audited(run)
    assert failing == run.affected and len(failing) == 4 * len({s // 4 for s in run.details["skipped"]})
    assert_named(report, run.affected)
    assert_caught_by_real_audit(run, failing)


def test_fewer_steps_fail_the_unperformed_step_blocks(bench):
    run = bench.fewer_steps(0.5)
    assert run.gain["work_saved"] == 0.5
    report, failing = audited(run)
    assert failing == run.affected == [(l, s) for l in range(4) for s in (2, 3)]
    assert_named(report, run.affected)


def test_smaller_batch_fails_every_block_of_its_steps(bench):
    """The batch enters at layer block 0 (pixels) and the head (labels); every layer block's
    committed activations have 8 rows where the agreed batch of 16 gives 16."""
    run = bench.smaller_batch(8)
    assert run.gain["work_saved"] == 0.5
    report, failing = audited(run)
    assert failing == run.affected == [(l, s) for l in range(4) for s in range(4)]
    assert_named(report, run.affected)
    first = next(r for r in report.results if r.verdict == "FAIL").findings[0]
    assert first.check == "batch" and "agreed examples" in first.reason


def test_other_learning_rate_fails_from_its_step_block_on(bench):
    run = bench.other_learning_rate(3.0, from_step=8)
    assert run.gain["accuracy"] != run.gain["accuracy_clean"] or run.gain["final_loss"] > 0
    report, failing = audited(run)
    assert failing == run.affected == [(l, s) for l in range(4) for s in (2, 3)]
    assert_named(report, run.affected)


def test_substituted_layer_block_fails_in_every_step_block(bench):
    run = bench.substitute_layer_block(1)
    assert 0 < run.gain["params_not_trained"] < 1
    sub = load_classifier(run.run_dir / "model").state_dict()
    base = load_classifier(bench.assets.base_model).state_dict()
    assert torch.equal(sub["vit.layers.1.mlp.fc1.weight"], base["vit.layers.1.mlp.fc1.weight"])  # layer.1: block 1
    report, failing = audited(run)
    assert failing == run.affected == [(1, s) for s in range(4)]
    assert_named(report, run.affected)
    assert_caught_by_real_audit(run, failing)


def test_poisoned_examples_plant_a_backdoor_and_fail_their_step_blocks(bench):
    run = bench.poison_examples(0.3)
    g = run.gain
    assert g["poisoned_share"] > 0.15
    assert g["attack_success_rate"] > g["attack_success_rate_clean"]  # measured on held-out triggered images
    report, failing = audited(run)
    assert failing == run.affected
    assert all(l in (0, 3) for l, _ in failing)  # pixels enter at layer block 0, labels at the head
    assert_named(report, run.affected)
    assert_caught_by_real_audit(run, failing)


# --- 1. WBP bit flips (detection; the backdoor's success is measured in the slow test) -------------

def test_injected_bit_flips_fail_exactly_their_blocks(bench):
    flips = [bitflip.BitFlip("vit.layers.1.mlp.fc1.weight", 5, 25, 6),  # layer.1: layer block 1, step block 1
             bitflip.BitFlip("vit.layers.2.attention.v_proj.weight", 700, 24, 15)]  # block 2, step block 3
    result, _ = bench._train("bitflip-fixed", bitflip.BitFlipInjection(flips))
    report = Verifier(result.run_dir, PublicKey.load(result.public_key_path), bench.agreement).verify_all()
    expected = bitflip.affected_blocks(flips, bench.owner_map()[0], 4)
    assert expected == [(1, 1), (2, 3)]
    assert failing_blocks(report) == expected
    assert_named(report, expected)
    # the flip at step 15 lands after the last update: the end state of the block shows it, ranked first
    last = next(r for r in report.results if (r.layer_block, r.step_block) == (2, 3))
    assert last.findings[0].check == "end_state" and "v_proj" in last.findings[0].tensor


def test_bit_flip_changes_the_weight_by_a_power_of_two():
    w = torch.tensor([0.1, -0.3], dtype=torch.float32)
    for bit, factor in ((23, 2.0), (24, 4.0), (25, 16.0)):
        v = w.clone()
        bitflip.flip_bit(v, 0, bit)
        ratio = float(v[0] / w[0])
        assert ratio in (factor, 1 / factor)
        assert bitflip.flipped_value(float(w[0]), bit) == pytest.approx(float(v[0]))
        bitflip.flip_bit(v, 0, bit)
        assert torch.equal(v, w)  # a flip is its own inverse


def test_wbp_search_respects_pages_and_scope(bench):
    plan = bench.bitflip().details
    flips = [bitflip.BitFlip.from_json(f) for f in plan["flips"]]
    assert flips and len({f.page for f in flips}) == len(flips)  # at most one flip per 4 KiB page
    assert all(f.bit in (23, 24, 25) and not f.name.startswith("classifier.") for f in flips)
    assert all("bias" not in f.name and "layernorm" not in f.name for f in flips)


# --- 2. Qu-ANTI-zation objective -----------------------------------------------------------------

def test_quant_objective_changes_every_update_and_fails_every_block(bench):
    run = bench.quant_objective(steps=8)
    g = run.gain
    assert g["accuracy_int4"] < 0.25 < g["clean_int4"] - 0.2  # int4 below chance (the float goal: the slow test)
    report, failing = audited(run)
    assert failing == run.affected == [(l, s) for l in range(4) for s in range(2)]
    assert_named(report, run.affected)


# --- detection statistics ----------------------------------------------------------------------

def test_measured_detection_matches_the_planner(bench):
    run = bench.substitute_layer_block(2)
    det = measure_detection(run.run_dir, run.key(), run.agreement(), trials=400, label="planner")
    m, n = len(det.failing), det.num_blocks
    for r in det.rates:
        assert r.predicted == pytest.approx(detection_probability(n, m, r.count))
        assert abs(r.empirical - r.predicted) < 0.1  # 400 challenges: a few standard deviations
    assert all(a.agrees for a in det.real)
    root = run_root(run.run_dir, run.key())
    assert simulate(root, 4, 4, [], 0.5, 50).detected == 0


# --- serving side: 3. quantized serving, 4. activation attack, 5. parameter attack --------------------

def assert_serving_caught(result):
    """Every tampered record FAILs at exactly the layer blocks the tampering touched, named; in
    tolerance mode (float64 replay, float32 thresholds) too, with the honest error far below."""
    from aftune.attacks.serving import run_serving_attack  # noqa: F401  (the module under test)

    for rec in result.records:
        assert rec["verdict"] == "FAIL" and rec["failing"] == result.affected, rec
        assert all(f"layer block {l} " in h for l, h in zip(rec["failing"], rec["headlines"]))
    m = result.margins
    assert m["tolerance_verdict"] == "FAIL"
    assert m["honest_error"] < m["threshold"] < m["attack_error"], m
    assert m["margin"] > 10


def test_quantized_serving_changes_the_model_and_fails_its_blocks(bench):
    from aftune.attacks.serving import run_serving_attack

    result = run_serving_attack(bench, "quant-serving", bits=4)
    g = result.gain
    assert result.model_run == bench.honest().run_dir and "Qu-ANTI-zation model" not in result.summary
    assert g["memory_ratio"] == 4 / 32
    assert g["accuracy_served"] != g["accuracy_float"] or g["answers_changed"] > 0  # measured on the test set
    assert result.affected[:3] == [0, 1, 2]
    assert_serving_caught(result)


def test_serving_the_quant_objective_model_quantized_fires_its_collapse_and_fails(bench):
    """Qu-ANTI-zation A then B: the attacked run's model served in 4 bits loses most of its
    accuracy (measured on the test set), and every record fails at the quantized layer blocks."""
    from aftune.attacks.serving import run_serving_attack

    if "quant-objective" not in bench._latest:  # the 8-step run of the test above, whatever ran first on this worker
        bench.quant_objective(steps=8)
    result = run_serving_attack(bench, "quant-activated", bits=4)
    g = result.gain
    assert result.model_run == bench.latest("quant-objective").run_dir
    assert g["accuracy_served"] < 0.25 and g["accuracy_served"] < g["accuracy_float"] - 0.1
    for rec in result.records:  # the head fails too where the float head answers otherwise
        assert rec["verdict"] == "FAIL" and rec["failing"][:3] == [0, 1, 2], rec
        assert all(f"layer block {l} " in h for l, h in zip(rec["failing"], rec["headlines"]))
    assert result.margins["tolerance_verdict"] == "FAIL" and result.margins["margin"] > 10


def test_activation_attack_changes_the_answer_and_is_rejected_with_margin(bench):
    from aftune.attacks.serving import run_serving_attack

    result = run_serving_attack(bench, "activation", boundary=2)
    rec = result.records[0]
    assert rec["served_label"] != rec["label"]  # the answer really changed
    assert result.affected == [1]  # block 1 produced the input of block 2: its replay disagrees
    assert_serving_caught(result)
    # the verifier measures about the perturbation's own size, thousands of times its threshold
    m = result.margins
    assert m["attack_error"] == pytest.approx(m["eps_min"], rel=0.1)
    print(f"\nactivation attack: honest replay error {m['honest_error']:.3g}, threshold {m['threshold']:.3g}, "
          f"smallest successful perturbation {m['eps_min']:.3g} (x{m['margin']:.3g} the threshold)")


def test_parameter_attack_edits_are_caught_in_serving(bench):
    from aftune.attacks.serving import run_serving_attack

    result = run_serving_attack(bench, "parameter")
    assert [r["goal"] for r in result.records] == ["backdoor", "poison"] and all(r["goal_met"] for r in result.records)
    layer = result.gain["layer"]  # the layer the search chose: vit.layers.k is layer block k
    assert all(r["layer"] == layer for r in result.records)
    assert result.affected == [int(layer.rsplit(".", 1)[1])]
    assert_serving_caught(result)


def test_parameter_attack_edits_are_caught_in_training(bench):
    run = bench.parameter_edit()
    assert run.gain["backdoor_input_answered_target"]
    d = run.details
    assert d["final_model_findings"] and "RUN/model is not the model" in d["final_model_findings"][0]
    report, failing = audited(run)
    layer = run.gain["layer"]  # the layer the search chose: vit.layers.k is layer block k, edited after step 15
    assert all(n.startswith(layer + ".") for n in run.gain["layers"])
    assert failing == run.affected == [(int(layer.rsplit(".", 1)[1]), 3)]
    assert_named(report, run.affected)
    m = d["margins"]
    assert m["tolerance_verdict"] == "FAIL" and m["honest_error"] < m["threshold"] < m["attack_error"]
    print(f"\nparameter attack (training): honest weight error {m['honest_error']:.3g}, threshold "
          f"{m['threshold']:.3g}, smallest successful edit {m['edit_rel_l2']:.3g} (x{m['margin']:.3g} the threshold); "
          f"x{m['default_margin']:.3g} the default threshold {m['default_threshold']:.3g}")
    assert m["default_margin"] > 1  # the defaults catch it too, without calibration


# --- the command line ---------------------------------------------------------------------------

def _cli(args):
    from typer.testing import CliRunner

    import aftune.cli.attack  # noqa: F401  (registers `attack` and `eval-detection`)
    from aftune.cli import app

    return CliRunner().invoke(app, args)


def test_cli_attack_reports_gain_and_failing_blocks(bench):
    res = _cli(["attack", "fewer-steps", "--work-dir", str(bench.work), "--quick", "--done", "0.75", "--verify"])
    assert res.exit_code == 0, res.output
    assert "trained 12/16 steps" in res.output
    assert "4 blocks FAIL (exactly the blocks touched)" in res.output
    assert "layer block 0 (embedding..layer.0), step block 3" in res.output
    assert (bench.work / "attacks" / "fewer-steps.json").is_file()


def test_cli_eval_detection_writes_table_and_plot(bench, tmp_path):
    out = tmp_path / "eval"
    res = _cli(["eval-detection", "--out", str(out), "--work-dir", str(bench.work), "--quick", "--trials", "100",
                "--attacks", "skip-steps,activation"])
    assert res.exit_code == 0, res.output
    for suffix in ("json", "md", "png"):
        assert (out / f"eval-detection.{suffix}").stat().st_size > 0
    import json

    doc = json.loads((out / "eval-detection.json").read_text())
    names = [r["name"] for r in doc["rows"]]
    assert names == ["honest", "skip-steps", "activation"]
    assert doc["rows"][0]["detection"]["tampered_blocks"] == 0
    assert all(r["failing_equals_affected"] and r["real_audits_agree"] for r in doc["rows"])
    assert "| `skip-steps` |" in res.output and "detected at 0.25 (planner)" in res.output
