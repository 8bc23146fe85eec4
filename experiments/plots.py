"""Matplotlib figures of search results (PNG, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid_plots(summary: Sequence[dict[str, Any]], metric: str, outdir: str) -> list[str]:
    """grid.png (alpha vs beta coloured by the metric, gamma written beside each point)
    and accuracy_vs_macs.png (the metric against MACs, references labelled)."""
    plt = _pyplot()
    done = [s for s in summary if s["mean"] is not None]
    paths = []
    if not done:
        return paths

    fig, ax = plt.subplots(figsize=(6, 4.5))
    grid = [s for s in done if s["label"] != "baseline"]
    if grid:
        sc = ax.scatter([s["alpha"] for s in grid], [s["beta"] for s in grid], c=[s["mean"] for s in grid],
                        cmap="viridis", s=90, edgecolors=["red" if s["label"] == "paper" else "k" for s in grid])
        for s in grid:
            ax.annotate(f"γ={s['gamma']:.2f}", (s["alpha"], s["beta"]), textcoords="offset points", xytext=(5, 5),
                        fontsize=7)
        fig.colorbar(sc, ax=ax, label=metric)
    ax.set_xlabel("alpha (depth)")
    ax.set_ylabel("beta (width)")
    ax.set_title("candidates on alpha·beta²·gamma² ≈ target (red edge: paper)")
    fig.tight_layout()
    paths.append(os.path.join(outdir, "grid.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for s in done:
        color = {"paper": "red", "baseline": "gray"}.get(s["label"], "C0")
        ax.errorbar(s["macs"] / 1e6, s["mean"], yerr=s.get("half") or 0.0, fmt="o", color=color, capsize=3)
        if s["label"]:
            ax.annotate(s["label"], (s["macs"] / 1e6, s["mean"]), textcoords="offset points", xytext=(5, -10),
                        fontsize=8, color=color)
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel(metric)
    ax.set_title("accuracy vs cost")
    fig.tight_layout()
    paths.append(os.path.join(outdir, "accuracy_vs_macs.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
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
    ax.set_xlabel("MMACs per image (achieved)")
    ax.set_ylabel(f"{metric} (mean ± 95% interval over seeds)")
    ax.set_title("one dimension vs compound scaling at matched MACs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(outdir, "accuracy_vs_macs.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
