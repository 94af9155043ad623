"""`aftune eval-detection`: every attack against the audit, in one table and one plot.

    aftune eval-detection --out eval/          # eval/eval-detection.{json,md,png}

For each attack of the bench (`bench.Bench`), run it through aftune's trainer next to the honest
run, measure what the attacker gained, then measure detection (`detection.measure_detection`):
the full grid verified once, `trials` challenges per sample rate derived from the signed run root
with distinct nonces, the planner's prediction for the observed number of failing blocks, and
one real challenge opened and audited. The honest run is the first row: it must never fail.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .bench import AttackRun, Bench
from .detection import SAMPLE_RATES, Detection, measure_detection

FORMAT = "aftune.eval-detection.v1"


def evaluate_run(run: AttackRun, *, sample_rates=SAMPLE_RATES, trials: int = 1000) -> dict:
    det = measure_detection(run.run_dir, run.key(), run.agreement(), sample_rates=sample_rates, trials=trials, label=run.name)
    affected = set(map(tuple, run.affected))
    return {**run.to_json(), "detection": det.to_json(),
            "failing_equals_affected": set(det.failing) == affected,
            "real_audits_agree": all(r.agrees for r in det.real)}


def eval_detection(out_dir: str | Path, *, work_dir: str | Path | None = None, attacks: tuple[str, ...] | None = None,
                   sample_rates=SAMPLE_RATES, trials: int = 1000, extra_rows=(), progress=None,
                   quick: bool = False, numerics: str = "native") -> dict:
    """Run the attacks, write OUT/eval-detection.{json,md,png}; returns the JSON document.
    `extra_rows`: callables (bench, sample_rates=, trials=, say=) -> rows, for the serving side.
    `quick`: the small bench (tests; weaker attack effects). `numerics`: the agreed fine-tune's
    (portable: every run recorded and verified in portable numerics, SPEC.md 5.4)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir or out / "work")
    bench = Bench.small(work, numerics=numerics) if quick else Bench(work, numerics=numerics)
    names = attacks or Bench.TRAINING_ATTACKS
    t0 = time.perf_counter()
    rows = []
    say = progress or (lambda text: None)
    say("honest run")
    rows.append(evaluate_run(bench.honest(), sample_rates=sample_rates, trials=trials))
    for name in names:
        say(name)
        rows.append(evaluate_run(bench.run_attack(name), sample_rates=sample_rates, trials=trials))
    for extra in extra_rows:
        rows.extend(extra(bench, sample_rates=sample_rates, trials=trials, say=say))
    doc = {"format": FORMAT, "quick": quick, "task": bench.task.__dict__, "settings": bench.settings.to_json(),
           "grid": [bench.num_layer_blocks, bench.num_step_blocks], "sample_rates": list(sample_rates),
           "trials": trials, "strategy": "uniform", "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "eval-detection.json").write_text(json.dumps(doc, indent=1))
    (out / "eval-detection.md").write_text(markdown_table(doc))
    plot_detection(doc, out / "eval-detection.png")
    return doc


def _cell(rate: dict) -> str:
    return f"{rate['empirical']:.2f} ({rate['predicted']:.2f})"


def markdown_table(doc: dict) -> str:
    rates = doc["sample_rates"]
    head = ["attack", "what the attacker gained", "failing blocks (m / N)"]
    head += [f"detected at {r:g} (planner)" for r in rates] + ["real audit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in doc["rows"]:
        det = row["detection"]
        n = det["grid"][0] * det["grid"][1]
        cells = [f"`{row['name']}`", row["summary"].replace("|", "/"), f"{det['tampered_blocks']} / {n}"]
        by_rate = {r["sample_rate"]: r for r in det["rates"]}
        cells += [_cell(by_rate[r]) for r in rates]
        real = det["real_audits"]
        cells.append("; ".join(f"{a['verdict']} ({len(a['failing'])} of {len(a['blocks'])} challenged fail"
                               f"{'' if a['agrees'] else ', DISAGREES with the simulation'})" for a in real) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Detection: fraction of {doc['trials']} challenges (uniform sampling, distinct nonces, derived from "
                 "each run's signed root, or each inference record's id) that draw a failing block; in parentheses the "
                 "planner's exact probability 1 - C(N-m, K) / C(N, K). A row's failing blocks come from verifying its "
                 "whole grid once (strict mode). Real audits: one challenge at sample rate 0.25 drawn with a fresh "
                 "nonce, then one drawn to include a failing block; each opened by the provider and audited by the "
                 "client (training: open_bundle + audit_bundle; inference: the challenged layer blocks verified).")
    lines.append("")
    margins = [(r["name"], r.get("margins") or r.get("details", {}).get("margins")) for r in doc["rows"]]
    margins = [(n, m) for n, m in margins if m]
    if margins:
        lines.append("Tolerance mode (float64 replay): honest replay error, the threshold, and the error the verifier "
                     "measures for the smallest successful attack.")
        lines.append("")
        lines.append("| attack | honest error | threshold | smallest successful attack | margin over threshold | verdict |")
        lines.append("|---|---|---|---|---|---|")
        for n, m in margins:
            lines.append(f"| `{n}` | {m['honest_error']:.2g} | {m['threshold']:.2g} | {m['attack_error']:.3g} | "
                         f"{m['margin']:.3g}x | {m['tolerance_verdict']} |")
        lines.append("")
    for row in doc["rows"]:
        heads = row["detection"]["headlines"]
        if heads:
            lines.append(f"- `{row['name']}` (first of {len(heads)}): {heads[0][:300]}")
    return "\n".join(lines) + "\n"


def plot_detection(doc: dict, path: Path) -> Path:
    """Detection rate against the fraction of blocks challenged: measured (markers) and the
    planner's exact curve (lines), training runs on the left, inference records on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..protocol.probability import detection_probability

    rows = [r for r in doc["rows"] if r["detection"]["tampered_blocks"] > 0]
    panels = [("training runs", [r for r in rows if not r["detection"].get("inference")]),
              ("inference records", [r for r in rows if r["detection"].get("inference")])]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>phX*"
    for ax, (title, group) in zip(axes[0], panels):
        for i, row in enumerate(group):
            det = row["detection"]
            n = det["grid"][0] * det["grid"][1]
            m = det["tampered_blocks"]
            c = cmap(i % 20)
            ks = range(1, n + 1)
            ax.plot([k / n for k in ks], [detection_probability(n, m, k) for k in ks], color=c, lw=1.2, alpha=0.8)
            ax.plot([r["count"] / n for r in det["rates"]], [r["empirical"] for r in det["rates"]],
                    markers[i % len(markers)], color=c, ms=7, label=f"{row['name']} (m={m} of {n})")
        n0 = group[0]["detection"]["grid"]
        ax.set_title(f"{title}: {n0[0]} x {n0[1]} blocks")
        ax.set_xlabel("fraction of blocks challenged (K / N)")
        ax.set_ylabel("detection rate")
        ax.set_ylim(-0.02, 1.04)
        ax.set_xlim(0, 0.55)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Measured detection over {doc['trials']} challenges (markers) vs the planner's "
                 "1 - C(N-m, K) / C(N, K) (lines)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def detection_of(run: AttackRun, **kw) -> Detection:
    """For callers that want the Detection object rather than the JSON row."""
    return measure_detection(run.run_dir, run.key(), run.agreement(), label=run.name, **kw)
