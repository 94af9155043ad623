"""The attack bench: each training-side attack run through aftune's real trainer next to an
honest run of the same agreed fine-tune, with what the attacker gained measured on held-out data.

    from aftune.attacks.bench import Bench
    bench = Bench("work")
    run = bench.skip_steps(0.25)          # an AttackRun: run directory, key, gain, affected blocks

Each method returns an `AttackRun`: the recorded run (signed with its own provider key), the
attacker's gain (numbers and one line), and the (layer block, step block) pairs the deviation
touched, taken from the deviation's own log, so a test can compare them with the audit's
failing blocks.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import InputError
from ..core.signing import PublicKey
from ..verdict.comparison import Tolerance
from . import bitflip, lazy
from .quant_objective import QuantObjective
from .quantize import quantize_model_
from .task import (TaskAssets, VisionTask, accuracy, agreed, fine_tune, finetune_settings, load_classifier, prepare_task,
                   torch_threads)


AGREEMENT_FILE = "agreement.json"  # the client's agreement, in the bench's work directory


@dataclass
class AttackRun:
    name: str  # the attack's command name
    threat: str  # what it models, in a few words
    run_dir: Path
    public_key: Path
    gain: dict  # numbers: what the attacker gained (and the honest reference)
    summary: str  # the gain in one line
    affected: list[tuple[int, int]]  # (layer block, step block) the deviation touched
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    agreement_path: Path | None = None  # the client's agreement of a run under other settings than the bench's

    def key(self) -> PublicKey:
        return PublicKey.load(self.public_key)

    def agreement(self):
        """The bench's agreement (written by `Bench.agreement` beside the runs), not the run's own."""
        from ..training.agreement import Agreement

        return Agreement.load(self.agreement_path or Path(self.run_dir).parents[1] / AGREEMENT_FILE)

    def verifier(self, **kw):
        """The client's verifier of this run, against the agreed fine-tune."""
        from ..training.verify import Verifier

        return Verifier(self.run_dir, self.key(), self.agreement(), **kw)

    def to_json(self) -> dict:
        return {"name": self.name, "threat": self.threat, "run_dir": str(self.run_dir), "gain": self.gain,
                "summary": self.summary, "affected": [list(b) for b in self.affected],
                "seconds": round(self.seconds, 2), "details": self.details}


class Bench:
    """An agreed fine-tune (task, settings) and a work directory for its runs."""

    def __init__(self, work_dir: str | Path, task: VisionTask = VisionTask(), steps: int = 48, threads: int = 1,
                 wbp: bitflip.WBPConfig = bitflip.WBPConfig(), quick: bool = False, **settings):
        self.work = Path(work_dir)
        self.task, self.threads, self.wbp, self.quick = task, threads, wbp, quick
        self.settings = finetune_settings(steps, **settings)
        self._assets: TaskAssets | None = None
        self._honest: AttackRun | None = None
        self._honest_metrics: dict = {}
        self._latest: dict[str, AttackRun] = {}  # attack name -> its last run (its run directory is reused)
        self._other_agreements: dict[Path, Path] = {}  # run directory -> agreement file, for other settings

    @classmethod
    def small(cls, work_dir: str | Path, threads: int = 1, steps: int = 16, **settings) -> "Bench":
        """A smaller task and run for tests and `eval-detection --quick` (seconds per attack; the
        attacks' effects are weaker than on the full bench)."""
        task = VisionTask(pretrain_steps=200, train_per_class=24, test_per_class=24)
        wbp = bitflip.WBPConfig(budget=4, candidates=8, surrogates=1, trigger_steps=30)
        return cls(work_dir, task, steps=steps, threads=threads, wbp=wbp, quick=True, **{"lr": 0.03, **settings})

    # --- shared -------------------------------------------------------------------------------
    @property
    def agreement(self):
        """The client's agreement of the agreed fine-tune, kept at WORK/agreement.json."""
        from ..training.agreement import Agreement

        path = self.work / AGREEMENT_FILE
        if not path.is_file():
            with torch_threads(self.threads):
                agreed(self.assets, self.settings).save(path)
        return Agreement.load(path)

    @property
    def assets(self) -> TaskAssets:
        if self._assets is None:
            with torch_threads(self.threads):
                self._assets = prepare_task(self.work / "task", self.task)
        return self._assets

    @property
    def num_layer_blocks(self) -> int:
        return len(self.owner_map()[1])

    @property
    def num_step_blocks(self) -> int:
        return self.settings.num_step_blocks

    def step_block(self, step: int) -> int:
        return step // self.settings.steps_per_block

    def owner_map(self) -> tuple[dict[str, int], list]:
        """(parameter name -> layer block, layer-block layout) of the agreed model."""
        if not hasattr(self, "_owner"):
            from ..training.engine import BlockedModel
            from ..training.instantiate import instantiate
            from ..models import load_pretrained

            hf_config, model = load_pretrained(self.assets.base_model, self.settings.attn_implementation,
                                               torch.float32)
            _, model, adapter = instantiate(hf_config, self.settings, model)
            blocked = BlockedModel(model, adapter, self.settings)
            self._owner = (dict(blocked.owner), blocked.layout)
        return self._owner

    def _train(self, name: str, deviation=None, settings=None):
        self.agreement  # the client agrees before the provider trains
        run_dir = self.work / "runs" / name
        self._other_agreements.pop(run_dir, None)
        if settings is not None and settings != self.settings:  # a fine-tune agreed with other settings
            path = self.work / f"agreement-{name}.json"
            with torch_threads(self.threads):
                agreed(self.assets, settings).save(path)
            self._other_agreements[run_dir] = path
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        result = fine_tune(self.assets, run_dir, settings or self.settings, deviation, threads=self.threads)
        return result, time.perf_counter() - t0

    def _accuracy(self, model_dir: Path) -> float:
        return accuracy(load_classifier(model_dir), self.assets.test_images, self.assets.test_labels)

    def honest(self) -> AttackRun:
        """The honest run of the agreed fine-tune (the reference for every gain)."""
        if self._honest is None:
            result, seconds = self._train("honest")
            acc = self._accuracy(result.run_dir / "model")
            self._honest = AttackRun("honest", "the agreed fine-tune", result.run_dir, result.public_key_path,
                                     {"accuracy": acc}, f"clean accuracy {acc:.3f}", [], seconds)
        return self._honest

    def _all_layer_blocks(self, step_blocks) -> list[tuple[int, int]]:
        return sorted({(l, s) for s in step_blocks for l in range(self.num_layer_blocks)})

    def _edge_layer_blocks(self, step_blocks) -> list[tuple[int, int]]:
        """Where the batch enters: pixels at the first layer block, labels at the last."""
        last = self.num_layer_blocks - 1
        return sorted({(l, s) for s in step_blocks for l in (0, last)})

    def _finish(self, name, threat, result, seconds, gain, summary, affected, **details) -> AttackRun:
        run = AttackRun(name, threat, result.run_dir, result.public_key_path, gain, summary, sorted(set(affected)),
                        seconds, details, self._other_agreements.get(Path(result.run_dir)))
        self._latest[name] = run
        return run

    def latest(self, name: str) -> AttackRun:
        """The last run of training attack `name` on this bench (run with its defaults if none yet)."""
        return self._latest.get(name) or self.run_attack(name)

    # --- 1. WBP bit flips ---------------------------------------------------------------------
    def bitflip(self, config: bitflip.WBPConfig | None = None, progress=None) -> AttackRun:
        config = config or self.wbp
        import hashlib

        tag = hashlib.sha256(repr((config, self.task, self.settings)).encode()).hexdigest()[:12]
        plan_path = self.work / f"wbp-plan-{tag}.json"
        with torch_threads(self.threads):
            if plan_path.is_file():
                plan = bitflip.load_plan(plan_path)
            else:
                plan = bitflip.search_bit_flips(self.assets, config, self.settings, progress=progress)
                bitflip.save_plan(plan, plan_path)
        honest = self.honest()
        result, seconds = self._train("bitflip", bitflip.BitFlipInjection(plan.flips))
        a = self.assets
        victim, clean = load_classifier(result.run_dir / "model"), load_classifier(honest.run_dir / "model")
        asr = bitflip.attack_success_rate(victim, a.test_images, a.test_labels, plan.trigger, config.target)
        asr_clean = bitflip.attack_success_rate(clean, a.test_images, a.test_labels, plan.trigger, config.target)
        acc = accuracy(victim, a.test_images, a.test_labels)
        gain = {"attack_success_rate": asr, "attack_success_rate_clean": asr_clean, "accuracy": acc,
                "accuracy_clean": honest.gain["accuracy"], "flips": len(plan.flips),
                "surrogate_attack_success_rate": plan.surrogate_asr}
        summary = (f"backdoor success {asr:.0%} (clean fine-tune {asr_clean:.0%}) with {len(plan.flips)} flipped bits; "
                   f"accuracy {acc:.3f} (clean {honest.gain['accuracy']:.3f})")
        affected = bitflip.affected_blocks(plan.flips, self.owner_map()[0], self.settings.steps_per_block)
        return self._finish("bitflip", "WBP: exponent-bit flips while fine-tuning", result, seconds, gain, summary,
                            affected, flips=[f.to_json() for f in plan.flips], trigger=plan.trigger.tolist())

    # --- 2. Qu-ANTI-zation objective ----------------------------------------------------------
    def quantized_accuracies(self, model_dir: Path, bits=(8, 4)) -> dict[str, float]:
        model = load_classifier(model_dir)
        out = {"float": accuracy(model, self.assets.test_images, self.assets.test_labels)}
        for b in bits:
            q = quantize_model_(copy.deepcopy(model), b)
            out[f"int{b}"] = accuracy(q, self.assets.test_images, self.assets.test_labels)
        return out

    def quant_objective(self, lam: float = 0.3, alpha: float = 5.0, bits=(4,), steps: int | None = None,
                        repair_from: int | None = None, repair_lam: float = 0.1, inner_steps: int = 16,
                        select: int = 64, own: int = 128, **options) -> AttackRun:
        """The objective for the first quarter of the steps, then the repair inside the lowest
        bit width's quantization cells (`repair_from`, default steps // 4; -1: no repair). The
        model handed over is the repaired state (end of an update) with the best float accuracy
        on `select` of the attacker's own images per class whose 4-bit copy stays collapsed
        (0: the last state). `options`: further QuantObjective settings."""
        from .task import make_images, normalize

        honest = self.honest()
        settings = self.settings if steps is None else replace(self.settings, steps=steps)
        if repair_from is None:
            repair_from = settings.steps // 4
        held = None
        if select:
            x, y = make_images("textures", select, self.task.image_size, self.task.seed + 700)
            held = (normalize(x), y)
        if own:
            x, y = make_images("textures", own, self.task.image_size, self.task.seed + 600)
            options["own"] = (normalize(x), y)
        dev = QuantObjective(bits=bits, lam=lam, alpha=alpha, repair_from=None if repair_from < 0 else repair_from,
                             repair_lam=repair_lam, inner_steps=inner_steps, select=held,
                             last_step=settings.steps - 1, **options)
        result, seconds = self._train("quant-objective", dev, settings)
        measured = tuple(sorted({8, 4, *bits}, reverse=True))
        attacked = self.quantized_accuracies(result.run_dir / "model", measured)
        clean = self.quantized_accuracies(honest.run_dir / "model", measured)
        gain = {**{f"accuracy_{k}": v for k, v in attacked.items()}, **{f"clean_{k}": v for k, v in clean.items()}}
        parts = ", ".join(f"{k} {attacked[k]:.3f} (clean {clean[k]:.3f})" for k in attacked)
        affected = self._all_layer_blocks(range(self.step_block(dev.touched_steps[0]), settings.num_step_blocks))
        return self._finish("quant-objective", "Qu-ANTI-zation: adversarial quantization objective", result, seconds,
                            gain, f"accuracy {parts}", affected, lam=lam, alpha=alpha, bits=list(bits),
                            repair_from=repair_from, repair_lam=repair_lam, inner_steps=inner_steps,
                            last_inner_losses=dev.losses[-1], selected=dev.selected)

    # --- 6. lazy and dishonest training -------------------------------------------------------
    def _lazy_gain(self, result) -> tuple[float, float]:
        return self._accuracy(result.run_dir / "model"), self.honest().gain["accuracy"]

    def skip_steps(self, fraction: float = 0.1) -> AttackRun:
        n = self.settings.steps
        k = max(1, round(fraction * n))
        steps = sorted(range(n - 1, -1, -max(1, n // k)))[:k]  # spread over the run
        dev = lazy.SkipSteps(steps)
        result, seconds = self._train("skip-steps", dev)
        acc, ref = self._lazy_gain(result)
        gain = {"steps_skipped": len(dev.skipped), "steps": n, "work_saved": len(dev.skipped) / n, "accuracy": acc,
                "accuracy_clean": ref}
        summary = f"{len(dev.skipped)}/{n} updates not done ({len(dev.skipped) / n:.0%} of the steps); accuracy {acc:.3f} (honest {ref:.3f})"
        return self._finish("skip-steps", "lazy: optimizer steps skipped", result, seconds, gain, summary,
                            self._all_layer_blocks({self.step_block(s) for s in dev.skipped}), skipped=dev.skipped)

    def fewer_steps(self, done_fraction: float = 0.75) -> AttackRun:
        n = self.settings.steps
        done = int(done_fraction * n)
        dev = lazy.FewerSteps(done, n)
        result, seconds = self._train("fewer-steps", dev)
        acc, ref = self._lazy_gain(result)
        saved = len(dev.skipped) / n
        gain = {"steps_done": done, "steps": n, "work_saved": saved, "accuracy": acc, "accuracy_clean": ref}
        summary = f"trained {done}/{n} steps ({saved:.0%} of the run claimed, not done); accuracy {acc:.3f} (honest {ref:.3f})"
        return self._finish("fewer-steps", "lazy: fewer steps than agreed", result, seconds, gain, summary,
                            self._all_layer_blocks({self.step_block(s) for s in dev.skipped}), done=done)

    def smaller_batch(self, size: int | None = None) -> AttackRun:
        b = self.settings.batch_size
        size = size or b // 2
        dev = lazy.SmallerBatch(size)
        result, seconds = self._train("smaller-batch", dev)
        acc, ref = self._lazy_gain(result)
        gain = {"batch": size, "agreed_batch": b, "work_saved": 1 - size / b, "accuracy": acc, "accuracy_clean": ref}
        summary = f"batches of {size} instead of {b} ({1 - size / b:.0%} of the examples not processed); accuracy {acc:.3f} (honest {ref:.3f})"
        return self._finish("smaller-batch", "lazy: smaller batch than agreed", result, seconds, gain, summary,
                            # every layer block: each one's committed activations have `size` rows where the
                            # agreed batch gives batch_size (the verifier checks them against the agreement)
                            self._all_layer_blocks({self.step_block(s) for s in dev.shrunk}))

    def other_learning_rate(self, factor: float = 3.0, from_step: int | None = None) -> AttackRun:
        from_step = self.settings.steps // 2 if from_step is None else from_step
        dev = lazy.OtherLearningRate(factor, from_step)
        result, seconds = self._train("other-lr", dev)
        acc, ref = self._lazy_gain(result)
        gain = {"factor": factor, "from_step": from_step, "accuracy": acc, "accuracy_clean": ref,
                "final_loss": result.final_loss}
        summary = f"learning rate x{factor:g} from step {from_step}; accuracy {acc:.3f} (honest {ref:.3f})"
        return self._finish("other-lr", "dishonest: another learning rate", result, seconds, gain, summary,
                            self._all_layer_blocks({self.step_block(s) for s in dev.changed}))

    def substitute_layer_block(self, layer_block: int = 1) -> AttackRun:
        dev = lazy.SubstituteLayerBlock(layer_block)
        result, seconds = self._train("substitute-layer-block", dev)
        acc, ref = self._lazy_gain(result)
        layout = self.owner_map()[1]
        sizes = [sum(p.numel() for _, p in lay.trainable) for lay in layout]
        share = sizes[layer_block] / sum(sizes)
        gain = {"layer_block": layer_block, "params_not_trained": share, "accuracy": acc, "accuracy_clean": ref}
        summary = (f"layer block {layer_block} never trained ({share:.0%} of the weights: their gradients and updates "
                   f"saved); accuracy {acc:.3f} (honest {ref:.3f})")
        return self._finish("substitute-layer-block", "dishonest: a layer block substituted", result, seconds, gain,
                            summary, sorted({(layer_block, self.step_block(s)) for s in dev.replaced_steps}))

    def poison_examples(self, fraction: float = 0.2, target: int = 0, trigger_size: int = 8) -> AttackRun:
        trigger = lazy.poison_trigger(trigger_size)
        dev = lazy.PoisonExamples(fraction, trigger, target, seed=self.task.seed)
        result, seconds = self._train("poison-examples", dev)
        a = self.assets
        victim = load_classifier(result.run_dir / "model")
        clean = load_classifier(self.honest().run_dir / "model")
        asr = bitflip.attack_success_rate(victim, a.test_images, a.test_labels, trigger, target)
        asr_clean = bitflip.attack_success_rate(clean, a.test_images, a.test_labels, trigger, target)
        acc = accuracy(victim, a.test_images, a.test_labels)
        share = len(dev.poisoned) / max(1, dev.seen)
        gain = {"fraction": fraction, "poisoned_share": share, "attack_success_rate": asr,
                "attack_success_rate_clean": asr_clean, "accuracy": acc, "accuracy_clean": self.honest().gain["accuracy"]}
        summary = (f"{share:.0%} of the examples replaced: backdoor success {asr:.0%} (honest {asr_clean:.0%}); "
                   f"accuracy {acc:.3f} (honest {self.honest().gain['accuracy']:.3f})")
        return self._finish("poison-examples", "dishonest: examples replaced (data poisoning)", result, seconds, gain,
                            summary, self._edge_layer_blocks({self.step_block(s) for s in dev.poisoned_steps}))

    # --- 5. the parameter attack, training side ------------------------------------------------
    def parameter_edit(self, layer: str | None = None, target: int = 0) -> AttackRun:
        """The smallest backdoor edit of one layer (one triggered image answered with `target`),
        found on the honest fine-tuned model, applied (a) to RUN/model after training and (b)
        right after the last update, inside training. (a) fails the final-model check; (b) fails
        the replay of its block, also in tolerance mode with thresholds calibrated on the
        honest run replayed in float64: the margin is printed. `layer`: the layer (or tensor)
        edited; by default the search chooses it (`parameter.search_edit`)."""
        from ..training.calibrate import calibrate
        from ..training.verify import Verifier
        from .bitflip import triggered_inputs
        from .lazy import poison_trigger
        from .parameter import BOUND_SCHEDULE, EditDuringTraining, Goal, candidate_layers, search_edit
        from .task import make_images, normalize

        honest = self.honest()
        a = self.assets
        model = load_classifier(honest.run_dir / "model")
        own_x, own_y = make_images("textures", 8, self.task.image_size, self.task.seed + 900)
        index = next(i for i in range(len(a.test_labels)) if int(a.test_labels[i]) != target)
        xb = triggered_inputs(a.test_images[index:index + 1], poison_trigger(self.task.patch_size))
        candidates = candidate_layers(model, layer)
        with torch_threads(self.threads):
            edits = search_edit(model, candidates, [Goal("backdoor", xb, torch.tensor([target]))], normalize(own_x),
                                own_y)
        if edits is None:
            raise InputError(f"no edit of {' or '.join(candidates)} within a relative-L2 bound of {BOUND_SCHEDULE[-1]} "
                             "plants the backdoor: edit another layer")
        edit = edits[0]
        layer, names = edit.layer, edit.layers
        # (a) edited after training: RUN/model is no longer the committed final model
        after = self.work / "runs" / "parameter-after-training"
        if after.exists():
            shutil.rmtree(after)
        shutil.copytree(honest.run_dir, after)
        edited = load_classifier(after / "model")
        with torch.no_grad():
            params = dict(edited.named_parameters())
            for n, d in edit.delta.items():
                params[n].add_(d)
        edited.save_pretrained(str(after / "model"))
        final = Verifier(after, honest.key(), self.agreement).check_final_model()
        # (b) edited inside training, after the last update
        dev = EditDuringTraining(edit.delta, self.settings.steps - 1)
        result, seconds = self._train("parameter-training", dev)
        owner = self.owner_map()[0]
        last = self.num_step_blocks - 1
        blocks = sorted({owner[n] for n in names})
        margins: dict = {}  # a portable run is verified bitwise only: no tolerance margins to measure
        if self.settings.numerics != "portable":
            with torch_threads(self.threads):
                cal = calibrate(honest.run_dir, honest.key(), replay_dtype="float64", agreement=self.agreement)
                tol = Verifier(result.run_dir, PublicKey.load(result.public_key_path), self.agreement, mode="tolerance",
                               tolerance=cal.suggested, replay_dtype="float64")
                tol_results = [tol.verify_block(l, last)[0] for l in blocks]
            threshold = cal.suggested.limits("weights")[0]
            errors = [f.error for r in tol_results for f in r.findings if f.check == "end_state" and f.error is not None]
            observed = max(errors) if errors else 0.0
            honest_error = cal.observed.get("weights", (0.0, 0.0))[0]
            # the defaults a client gets without calibrating (Tolerance.for_training): a rel_l2 error above
            # their weights threshold alone fails the block
            default = Tolerance.for_training(self.settings.dtype, "float64").limits("weights")[0]
            margins = {"honest_error": honest_error, "threshold": threshold, "attack_error": observed,
                       "edit_rel_l2": edit.rel_l2, "margin": observed / threshold if threshold else float("inf"),
                       "default_threshold": default, "default_margin": observed / default,
                       "tolerance_verdict": "FAIL" if all(r.verdict == "FAIL" for r in tol_results) else "PASS",
                       "tolerance_headlines": [r.headline() for r in tol_results]}
        acc = accuracy(load_classifier(result.run_dir / "model"), a.test_images, a.test_labels)
        gain = {"layer": layer, "layers": names, "edit_rel_l2": edit.rel_l2,
                "backdoor_input_answered_target": edit.success == 1.0,
                "accuracy": acc, "accuracy_clean": honest.gain["accuracy"]}
        summary = (f"a triggered image answered with class {target} after a relative-L2 edit of {edit.rel_l2:.3g} "
                   f"of {layer}; accuracy {acc:.3f} (honest {honest.gain['accuracy']:.3f})")
        return self._finish("parameter-training", "AFTUNE parameter attack, edit in the last training step", result,
                            seconds, gain, summary, [(l, last) for l in blocks], margins=margins,
                            final_model_findings=[f.describe() for f in final], edited_run=str(after))

    # --- all of them --------------------------------------------------------------------------
    TRAINING_ATTACKS = ("bitflip", "quant-objective", "skip-steps", "fewer-steps", "smaller-batch", "other-lr",
                        "substitute-layer-block", "poison-examples", "parameter-training")

    def run_attack(self, name: str, **options) -> AttackRun:
        method = {"bitflip": self.bitflip, "quant-objective": self.quant_objective, "skip-steps": self.skip_steps,
                  "fewer-steps": self.fewer_steps, "smaller-batch": self.smaller_batch,
                  "other-lr": self.other_learning_rate, "substitute-layer-block": self.substitute_layer_block,
                  "poison-examples": self.poison_examples, "parameter-training": self.parameter_edit}.get(name)
        if method is None:
            raise ValueError(f"unknown attack {name!r}: choose one of {', '.join(self.TRAINING_ATTACKS)}")
        return method(**options)

