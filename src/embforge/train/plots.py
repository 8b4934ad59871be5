"""Training curves as a PNG: loss on the left, evaluation scores on the right."""

from __future__ import annotations

from pathlib import Path

from embforge.optional import require


def plot_history(histories: dict[str, list[dict]], path: Path) -> Path:
    """Plot loss and ``eval/*`` curves of one or more stages (x: global step) into ``path``."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for stage, rows in histories.items():
        if not rows:
            continue
        steps = [offset + r["step"] for r in rows]
        ax_loss.plot(steps, [r["loss"] for r in rows], label=stage)
        for key in sorted({k for r in rows for k in r if k.startswith("eval/")}):
            pts = [(offset + r["step"], r[key]) for r in rows if key in r]
            ax_eval.plot(*zip(*pts), marker="o", label=f"{stage}: {key[5:]}")
        offset = steps[-1]
    ax_loss.set(xlabel="step", ylabel="InfoNCE loss", title="training loss")
    ax_eval.set(xlabel="step", ylabel="score ×100", title="evaluation")
    for ax in (ax_loss, ax_eval):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
