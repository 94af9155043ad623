"""The audit's block grid as a PNG (matplotlib), for terminals and papers.

    aftune report REPORT.json --challenge CHALLENGE --png grid.png

Same grid and colours as the HTML report (aftune.report_html.block_grid): pass green, fail red,
challenged without a result dark red, not sampled grey. Needs the `plot` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MissingExtra
from .html import COLOURS, FAIL, MISSING, NOT_SAMPLED, PASS, STATE_LABELS, block_grid

_ORDER = (NOT_SAMPLED, PASS, FAIL, MISSING)


def plot_grid(report_json: dict[str, Any], path_png: str | Path, challenge: dict[str, Any] | None = None,
              config: dict[str, Any] | None = None, *, dpi: int = 150) -> Path:
    """Draw the layer-block x step-block grid of a report to `path_png`; returns the path."""
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise MissingExtra("matplotlib", "plot") from None

    grid = block_grid(report_json, challenge, config)
    L, S = grid.num_layer_blocks, grid.num_step_blocks
    codes = np.zeros((L, S), dtype=np.int8)
    for (l, s), state in grid.states.items():
        codes[l, s] = _ORDER.index(state)

    # A figure object without pyplot: no global backend is touched.
    width = min(16.0, max(6.0, 3.0 + 0.28 * S))
    height = min(12.0, max(2.6, 1.6 + 0.3 * L))
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(codes, cmap=ListedColormap([COLOURS[s] for s in _ORDER]), vmin=-0.5, vmax=len(_ORDER) - 0.5,
              aspect="auto", interpolation="nearest")
    if S <= 64 and L <= 64:  # white lines between cells
        ax.set_xticks(np.arange(-0.5, S, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, L, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
    ax.set_xlabel("step block")
    ax.set_ylabel("layer block")
    step = max(1, S // 16)
    ax.set_xticks(range(0, S, step))
    ax.set_yticks(range(0, L, max(1, L // 16)))
    counts = grid.counts()
    verdict = "PASS" if report_json.get("verdict") == "PASS" and not counts[FAIL] and not counts[MISSING] else "FAIL"
    ax.set_title(f"{verdict}: {counts[PASS]} pass, {counts[FAIL] + counts[MISSING]} fail, "
                 f"{counts[NOT_SAMPLED]} not sampled\n({L} layer blocks x {S} step blocks)", fontsize="medium")
    ax.legend(handles=[Patch(color=COLOURS[s], label=STATE_LABELS[s]) for s in (PASS, FAIL, MISSING, NOT_SAMPLED)],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    path = Path(path_png)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path
