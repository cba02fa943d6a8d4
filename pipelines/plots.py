"""Plots a person would rather look at than read: training curves, the gate, drift."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, out: Path) -> None:
    """Lay out, write (its folder made) and free a figure."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_history(history: list[dict], out: Path, title: str) -> Path | None:
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, out)
    return out


def plot_gate(models: dict[str, dict[str, tuple[float, float, float] | None]], out: Path, title: str) -> Path:
    """One panel per metric: a bar per model (base, champion, candidate) with its interval.
    `models[name][metric]` = (value, low, high); a missing value leaves the bar out."""
    metrics = sorted({m for per in models.values() for m, v in per.items() if v is not None})
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    colours = {"base": "#9e9e9e", "champion": "#1f77b4", "candidate": "#ff7f0e"}
    for ax, metric in zip(axes[0], metrics):
        names = [n for n in models if models[n].get(metric) is not None]
        vals = [models[n][metric][0] for n in names]
        lows = [max(v - models[n][metric][1], 0) for n, v in zip(names, vals)]
        highs = [max(models[n][metric][2] - v, 0) for n, v in zip(names, vals)]
        ax.bar(names, vals, yerr=[lows, highs], capsize=4, color=[colours.get(n, "#2ca02c") for n in names])
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    save(fig, out)
    return out


def plot_lengths(reference: list[str], window: list[str], previous: list[str], path: Path) -> Path:
    """Drift: the prompt lengths of the training sample, the window before and this window."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    top = max(len(t) for t in [*reference, *window, *previous, "x"])
    bins = list(range(0, top + 10, max(1, top // 40)))
    for texts, label in ((reference, "training"), (previous, "previous window"), (window, "this window")):
        if texts:
            ax.hist([len(t) for t in texts], bins=bins, density=True, histtype="step", linewidth=1.5, label=f"{label} ({len(texts)})")
    ax.set_xlabel("prompt length (characters)")
    ax.set_ylabel("share")
    ax.legend()
    save(fig, path)
    return path
