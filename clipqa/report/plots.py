"""Matplotlib figures for a run (learning curves) and for a comparison (the report). Headless (Agg backend)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clipqa.metrics import TYPE_NAMES  # noqa: E402


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(h["step"], h[key]) for h in history if key in h and h[key] is not None]
    return [r[0] for r in rows], [r[1] for r in rows]


def save_curves(history: list[dict], out_dir: Path) -> list[Path]:
    """``loss.png`` (train and val loss vs optimizer step) and ``accuracy.png`` (val accuracy, overall + per type)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train/loss", "train"), ("val/loss", "validation")):
        x, y = _series(history, key)
        if x:
            ax.plot(x, y, marker="." if key.startswith("val") else None, label=label)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss", title="Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    paths.append(out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    x, y = _series(history, "val/acc")
    ax.plot(x, y, marker="o", linewidth=2, label="all")
    for name in TYPE_NAMES.values():
        x, y = _series(history, f"val/acc/{name}")
        if x:
            ax.plot(x, y, linestyle="--", label=name)
    ax.set(xlabel="optimizer step", ylabel="validation accuracy", ylim=(0, 1), title="Validation accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=100)
    plt.close(fig)
    paths.append(out_dir / "accuracy.png")
    return paths


def wrap_label(label: str, width: int = 28) -> str:
    """A long variant name on several lines, broken after its commas and spaces (never inside an override)."""
    pieces = re.findall(r"[^, ]+[, ]*|[, ]+", label)
    lines, line = [], ""
    for piece in pieces:
        if line and len(line) + len(piece.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    return "\n".join([*lines, line.rstrip()]) if pieces else label


def comparison_chart(rows: list[dict], path: Path) -> None:
    """Grouped bars per variant: test accuracy (with its 95% interval) and per-type accuracy; when the rows were
    compared with a baseline (clipqa.report.paired.compare), a second panel with each row's accuracy difference
    from it and the difference's 95% interval (filled markers: significant after Holm's correction).

    Laid out so that nothing is clipped (constrained layout; long names wrapped, the legend below the panels)."""
    import numpy as np

    keys = ["test/acc"] + [f"test/acc/{t}" for t in TYPE_NAMES.values()]
    labels = ["all"] + list(TYPE_NAMES.values())
    n, k = len(rows), len(keys)
    width = 0.8 / k
    compared = [r for r in rows if r.get("diff") is not None]
    left = max(6.0, 1.7 * n + 1.5)  # room for a name wrapped at 20 characters under each group of bars
    if compared:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(left + 6, 5.5), width_ratios=[left, 6], layout="constrained")
    else:
        fig, ax = plt.subplots(figsize=(left, 5.5), layout="constrained")
    x = np.arange(n)
    for j, (key, label) in enumerate(zip(keys, labels, strict=True)):
        vals = [r.get(key) or 0.0 for r in rows]
        err = None
        if key == "test/acc":
            err = [[r["test/acc"] - r["ci_low"] for r in rows], [r["ci_high"] - r["test/acc"] for r in rows]]
        ax.bar(x + (j - (k - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=label)
    prior = [r.get("test/prior_acc") for r in rows]
    if any(p is not None for p in prior):
        ax.scatter(x, [p or 0 for p in prior], marker="_", s=400, color="black", zorder=3, label="answer prior")
    ax.set_xticks(x, [wrap_label(r["variant"], 20) for r in rows], fontsize=8)
    ax.set(ylabel="test accuracy", ylim=(0, 1), title="Test accuracy per variant\n(error bars: 95% interval)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=k + 1, fontsize=8)
    if compared:
        y = np.arange(len(compared))
        d = np.array([100 * r["diff"] for r in compared])
        err = [d - [100 * r["diff_low"] for r in compared], [100 * r["diff_high"] for r in compared] - d]
        ax2.errorbar(d, y, xerr=err, fmt="none", ecolor="gray", capsize=3)
        for yi, di, r in zip(y, d, compared, strict=True):
            ax2.plot(di, yi, "o", color="C3", fillstyle="full" if r.get("significant") else "none", markersize=8)
        ax2.axvline(0, color="black", linewidth=0.8)
        ax2.set_yticks(y, [wrap_label(r["variant"]) for r in compared], fontsize=8)
        ax2.set_ylim(len(compared) - 0.4, -0.6)  # top to bottom, with room for a name of several lines
        baseline = wrap_label(f"accuracy difference vs {compared[0]['baseline']} (points)", 48)
        ax2.set(xlabel=baseline, title="Paired difference vs the baseline\n(95% interval; filled: significant)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learning_curves_chart(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    """Validation accuracy and training loss vs step, one line per run (``curves[run][metric] = [(step, v)]``);
    the legend below the panels."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    for name, c in curves.items():
        if c.get("val/acc"):
            a1.plot(*zip(*c["val/acc"], strict=True), marker=".", label=wrap_label(name, 40))
        if c.get("train/loss"):
            a2.plot(*zip(*c["train/loss"], strict=True), label=wrap_label(name, 40))
    a1.set(xlabel="optimizer step", ylabel="validation accuracy", ylim=(0, 1), title="Validation accuracy")
    a2.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    handles, names = a1.get_legend_handles_labels()
    if not handles:
        handles, names = a2.get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=min(4, len(handles)), fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
