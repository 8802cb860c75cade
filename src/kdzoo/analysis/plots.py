"""Charts of the tools: benchmark bars beside the published figures, CKA heatmaps (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..runtime import atomic_write  # noqa: E402


def _save(fig, path: str | Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_bench(rows: list[dict], path: str | Path, title: str = "") -> None:
    """One panel per pair (or IPC): our last-epoch top-1 per method (bar, ± std over seeds), the published
    figure as a black mark, the teacher as a dashed line."""
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    fig, axes = plt.subplots(1, len(pairs), figsize=(max(4.5, 0.55 * _max_methods(rows, pairs) + 1.5) * len(pairs),
                                                     4.6), squeeze=False, layout="constrained")
    for ax, pair in zip(axes[0], pairs):
        pair_rows = [r for r in rows if r["pair"] == pair]
        methods = [r for r in pair_rows if r["method"] != "teacher"]
        x = np.arange(len(methods))
        means = [r["last_mean"] for r in methods]
        errors = [r["last_std"] or 0.0 for r in methods]
        ax.bar(x, means, yerr=errors, capsize=3, color="tab:blue", alpha=0.8, label="ours (last epoch)")
        marked = [(i, r["published"]) for i, r in enumerate(methods) if r["published"] is not None]
        if marked:
            ax.scatter([i for i, _ in marked], [v for _, v in marked], marker="_", s=400, color="black",
                       linewidths=2.5, zorder=3, label="published")
        teacher = next((r for r in pair_rows if r["method"] == "teacher"), None)
        if teacher is not None:
            ax.axhline(teacher["last_mean"], color="tab:red", linestyle="--", linewidth=1, label="teacher")
        values = means + [v for _, v in marked] + ([teacher["last_mean"]] if teacher else [])
        low, high = min(values), max(values)
        margin = max(1.0, 0.15 * (high - low))
        ax.set_ylim(max(0.0, low - margin - max(errors, default=0)), min(100.0, high + margin + max(errors, default=0)))
        ax.set_xticks(x, [r["method"] for r in methods], rotation=45, ha="right")
        ax.set(title=pair, ylabel="test top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
    legend = {}  # one legend under every panel, where it never hides a bar
    for ax in axes[0]:
        legend.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels())})
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=len(legend), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def _max_methods(rows: list[dict], pairs: list[str]) -> int:
    return max(sum(1 for r in rows if r["pair"] == p) for p in pairs)


def plot_cka(maps: dict[str, np.ndarray], teacher_taps: Sequence[str], student_taps: Sequence[str],
             path: str | Path, title: str = "") -> None:
    """One heatmap per kernel: rows are teacher taps, columns student taps, colour the CKA in [0, 1]."""
    fig, axes = plt.subplots(1, len(maps), figsize=(1.2 + 0.9 * len(student_taps) * len(maps) + 1.5 * len(maps),
                                                    1.5 + 0.6 * len(teacher_taps)), squeeze=False)
    for ax, (kernel, values) in zip(axes[0], maps.items()):
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="magma", origin="upper", aspect="auto")
        ax.set_xticks(range(len(student_taps)), student_taps, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(teacher_taps)), teacher_taps, fontsize=7)
        ax.set(xlabel="student tap", ylabel="teacher tap", title=f"{kernel} CKA")
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if values[i, j] < 0.6 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


__all__ = ["plot_bench", "plot_cka"]
