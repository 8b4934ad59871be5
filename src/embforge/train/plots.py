"""Training curves as a PNG: loss on the left, evaluation scores on the right."""

from __future__ import annotations

from pathlib import Path

from embforge.atomic import atomic_write
from embforge.optional import require


def plot_history(
    histories: dict[str, list[dict]], path: Path, loss_label: str = "InfoNCE loss (mean per logging window)"
) -> Path:
    """Plot loss and ``eval/*`` curves of one or more stages (x: global step) into ``path``.

    Rows without a ``loss`` (e.g. an evaluation before the first step) only add eval points.
    """
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    has_eval = any(k.startswith("eval/") for rows in histories.values() for r in rows for k in r)
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(11 if has_eval else 6, 4), squeeze=False)
    ax_loss, ax_eval = axes[0, 0], (axes[0, 1] if has_eval else None)
    offset = 0
    for stage, rows in histories.items():
        if not rows:
            continue
        steps = [offset + r["step"] for r in rows]
        ax_loss.plot(*zip(*[(offset + r["step"], r["loss"]) for r in rows if "loss" in r]), label=stage)
        for key in sorted({k for r in rows for k in r if k.startswith("eval/")}) if has_eval else []:
            pts = [(offset + r["step"], r[key]) for r in rows if key in r]
            ax_eval.plot(*zip(*pts), marker="o", label=f"{stage}: {key[5:]}")
        offset = steps[-1]
    ax_loss.set(xlabel="step", ylabel=loss_label, title="training loss")
    if has_eval:
        ax_eval.set(xlabel="step", ylabel="score ×100", title="evaluation")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def plot_matryoshka(curve: dict[str, dict[str, float]], path: Path, title: str = "nDCG@10") -> Path:
    """Score vs embedding dimensions, float and binary (``eval_retrieval_dims`` output) into ``path``."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    dims = sorted(curve, key=int)
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("float", "o-"), ("binary", "s--")):
        ax.plot([int(d) for d in dims], [100 * curve[d][kind] for d in dims], style, label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(d) for d in dims], labels=dims)
    ax.set(xlabel="embedding dimensions (Matryoshka truncation)", ylabel="score ×100", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def plot_adapt_report(
    held: dict[str, dict[str, float]], curve: dict[str, dict[str, float]], weight: float, path: Path
) -> Path:
    """``embforge adapt``'s report: held-back nDCG@10 before/after, and the merge-weight curve."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["base", "trained", "final"]
    a.bar(names, [held[n]["ndcg_at_10"] for n in names], color=["grey", "tab:blue", "tab:green"])
    a.set(ylabel="held-back nDCG@10", title="before / after")
    ws = sorted(float(w) for w in curve)
    b.plot(ws, [curve[str(w)]["ndcg_at_10"] for w in ws], marker="o")
    b.axvline(weight, color="tab:green", linestyle="--", label="chosen")
    b.set(xlabel="merge weight w: (1 - w)·base + w·trained", ylabel="held-back nDCG@10")
    b.legend()
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return path


def _save_png(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
