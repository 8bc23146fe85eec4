"""Matplotlib figures of search results (PNG, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from experiments.analysis import CandidateSummary


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str) -> str:
    """Lay out, write as a 120-dpi PNG, close; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(ax: Any, xlabel: str, ylabel: str, title: str, legend: int = 0) -> None:
    """Axis labels and title, and a legend in that font size when ``legend`` > 0."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=legend)


def grid_plots(summary: Sequence[CandidateSummary], metric: str, outdir: str) -> list[str]:
    """grid.png (alpha vs beta coloured by the metric, gamma written beside each point)
    and accuracy_vs_macs.png (the metric against MACs, references labelled)."""
    plt = _pyplot()
    done = [s for s in summary if s.mean is not None]
    paths = []
    if not done:
        return paths

    fig, ax = plt.subplots(figsize=(6, 4.5))
    grid = [s for s in done if s.label != "baseline"]
    if grid:
        sc = ax.scatter([s.alpha for s in grid], [s.beta for s in grid], c=[s.mean for s in grid],
                        cmap="viridis", s=90, edgecolors=["red" if s.label == "paper" else "k" for s in grid])
        for s in grid:
            ax.annotate(f"γ={s.gamma:.2f}", (s.alpha, s.beta), textcoords="offset points", xytext=(5, 5),
                        fontsize=7)
        fig.colorbar(sc, ax=ax, label=metric)
    _label(ax, "alpha (depth)", "beta (width)", "candidates on alpha·beta²·gamma² ≈ target (red edge: paper)")
    paths.append(_save(plt, fig, os.path.join(outdir, "grid.png")))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for s in done:
        color = {"paper": "red", "baseline": "gray"}.get(s.label, "C0")
        ax.errorbar(s.macs / 1e6, s.mean, yerr=s.half or 0.0, fmt="o", color=color, capsize=3)
        if s.label:
            ax.annotate(s.label, (s.macs / 1e6, s.mean), textcoords="offset points", xytext=(5, -10),
                        fontsize=8, color=color)
    _label(ax, "MMACs per image", metric, "accuracy vs cost")
    paths.append(_save(plt, fig, os.path.join(outdir, "accuracy_vs_macs.png")))
    return paths


def scaling_study_plot(summary: Sequence[dict[str, Any]], metric: str, outdir: str) -> str | None:
    """accuracy_vs_macs.png for the scaling study: one line per strategy, each starting at the
    shared baseline (the shape of the paper's Figure 8), error bars = 95% intervals over seeds."""
    plt = _pyplot()
    done = [s for s in summary if s["mean"] is not None]
    if not done:
        return None
    base = [s for s in done if s["family"] == "baseline"]
    styles = {"compound": ("red", "o"), "width": ("C0", "s"), "depth": ("C2", "^"), "resolution": ("C1", "D")}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for family, (color, marker) in styles.items():
        pts = sorted(base + [s for s in done if s["family"] == family], key=lambda s: s["macs"])
        if len(pts) == len(base):
            continue
        ax.errorbar([s["macs"] / 1e6 for s in pts], [s["mean"] for s in pts], yerr=[s.get("half") or 0.0 for s in pts],
                    fmt="-" + marker, color=color, capsize=3, label=f"{family} scaling",
                    linewidth=2 if family == "compound" else 1.2)
    for s in base:
        ax.annotate("baseline", (s["macs"] / 1e6, s["mean"]), textcoords="offset points", xytext=(5, -12),
                    fontsize=8)
    _label(ax, "MMACs per image (achieved)", f"{metric} (mean ± 95% interval over seeds)",
           "one dimension vs compound scaling at matched MACs", legend=8)
    return _save(plt, fig, os.path.join(outdir, "accuracy_vs_macs.png"))


def fidelity_plot(analysis: dict[str, Any], metric: str, outdir: str) -> str | None:
    """fidelity.png: each candidate's score against the budget, and the rank agreement of each
    budget with the largest one (Kendall tau, Spearman rho) against the budget."""
    means = analysis["means"]
    if not means:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    budgets = sorted(means)
    for name in sorted({k for m in means.values() for k in m}):
        pts = [(b, means[b][name]) for b in budgets if name in means[b]]
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=name, linewidth=2 if "paper" in name else 1)
    ax1.set_xscale("log")
    _label(ax1, "budget (x the trial budget)", metric, "score of each candidate against the budget", legend=6)
    agree = analysis["agreement"]
    if agree:
        for k, marker, label in (("kendall_tau", "-o", "Kendall tau"), ("spearman_rho", "-s", "Spearman rho")):
            pts = [(a["budget"], a[k]) for a in agree if a[k] is not None]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=label)
        ax2.set_xscale("log")
        ax2.axhline(0, color="gray", linewidth=0.8)
    ax2.set_ylim(-1.05, 1.05)
    _label(ax2, "budget (x the trial budget)", f"rank agreement with budget {max(means)}x", "proxy fidelity", legend=8)
    return _save(plt, fig, os.path.join(outdir, "fidelity.png"))
