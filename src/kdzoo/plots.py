"""Every picture kdzoo draws (matplotlib, headless): learning curves, image grids, benchmark bars beside the
published figures, CKA heatmaps."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import numpy as np

from .engine.runtime import atomic_write, lazy_import

matplotlib.use("Agg")  # headless, chosen before pyplot loads
plt = lazy_import("matplotlib.pyplot")
ticker = lazy_import("matplotlib.ticker")


def plot_curves(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Test top-1 and training loss per epoch, one line per run (or per label of averaged runs); one legend
    for both panels, under them."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
    for label, history in runs.items():
        evaluated = [row for row in history if "test_top1" in row]
        ax_acc.plot([r["epoch"] for r in evaluated], [r["test_top1"] for r in evaluated], label=label)
        ax_loss.plot([r["epoch"] for r in history], [r["train_loss"] for r in history], label=label)
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="accuracy", ylim=(0, 102))
    ax_loss.set(xlabel="epoch", ylabel="training loss (all terms)", title="loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    if runs:
        fig.legend(*ax_acc.get_legend_handles_labels(), loc="outside lower center", ncol=min(len(runs), 4),
                   frameon=False)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_figure(history: list[dict], teacher_top1: Optional[float] = None, title: str = "") -> plt.Figure:
    """One run's curves: left, the training loss and each of its terms (the ``loss_*`` columns of
    metrics.csv: cross-entropy and every method's weighted term) with the test cross-entropy; right, train
    and test top-1 with the teacher's test top-1 as a dashed reference line when it is known."""
    # legends go under the axes, where they never hide a curve; constrained layout makes room for them
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    epochs = [row["epoch"] for row in history]
    terms = [key for key in dict.fromkeys(k for row in history for k in row) if key.startswith("loss_")]
    names = [key[len("loss_"):] for key in terms]
    if len(terms) == 1:  # the one term is the total: one line, not two on top of each other
        series = [(f"{names[0]} = total (train)", "train_loss", dict(color="black", linewidth=2))]
    else:
        series = [("total (train)", "train_loss", dict(color="black", linewidth=2))]
        series += [(f"{name} (train)", key, {}) for name, key in zip(names, terms)]
    series += [("test cross-entropy (unweighted)", "test_loss", dict(color="gray", linestyle="--"))]
    plotted = []
    for label, key, style in series:
        points = [(row["epoch"], row[key]) for row in history if _finite(row.get(key))]
        if points:
            ax_loss.plot(*zip(*points), marker="o" if len(points) < 15 else None, markersize=3, label=label, **style)
            plotted += [v for _, v in points]
    positive = bool(plotted) and min(plotted) > 0
    ax_loss.set(xlabel="epoch", ylabel="loss (weighted terms)", title="loss terms", yscale="log" if positive else "linear")

    for label, key, style in (("train top-1", "train_top1", dict(color="tab:blue", linestyle=":")),
                              ("test top-1", "test_top1", dict(color="tab:blue", linewidth=2))):
        points = [(row["epoch"], row[key]) for row in history if _finite(row.get(key))]
        if points:
            ax_acc.plot(*zip(*points), marker="o" if len(points) < 15 else None, markersize=3, label=label, **style)
    if teacher_top1 is not None and _finite(teacher_top1):
        ax_acc.axhline(teacher_top1, color="tab:red", linestyle="--", label=f"teacher test top-1 {teacher_top1:.2f}%")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy", ylim=(0, 102))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        if epochs:
            ax.set_xlim(min(epochs) - 0.2, max(epochs) + 0.2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def plot_run(history: list[dict], path: str | Path, teacher_top1: Optional[float] = None, title: str = "") -> None:
    """`run_figure` saved as a PNG (a run directory's curves.png)."""
    fig = run_figure(history, teacher_top1, title)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def grid_figure(images, labels, class_names: Optional[Sequence[str]] = None, max_rows: int = 20,
                classes_per_band: int = 20, cell: int = 64, title: str = "") -> plt.Figure:
    """Images (N, C, H, W) in [0, 1] as a grid: one column per class, headed by its name, and one row per
    image of that class (at most `max_rows`); more than `classes_per_band` classes wrap into further bands
    below.  Each image is upscaled by an integer factor (nearest neighbour, so no pixel is invented) to at
    least `cell` pixels on its shorter side, and the figure is sized so one image pixel is one screen pixel.
    `labels`: (N,) class indices."""
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels).astype(int)
    count, channels, height, width = images.shape
    num_classes = int(labels.max()) + 1 if labels.size else 0
    if class_names is not None:
        num_classes = max(num_classes, len(class_names))
    names = [str(class_names[c]) if class_names is not None and c < len(class_names) else str(c)
             for c in range(num_classes)]
    per_class = [np.flatnonzero(labels == c)[:max_rows] for c in range(num_classes)]
    rows = max((len(i) for i in per_class), default=1) or 1
    scale = max(1, -(-cell // min(height, width)))
    tile_h, tile_w, gap = height * scale, width * scale, 2
    bands = [list(range(b, min(b + classes_per_band, num_classes))) for b in range(0, num_classes, classes_per_band)]
    band_cols = max(len(b) for b in bands)
    label_room = 24  # pixels above each band for the class names (one line of up to 10 pt)
    canvas = np.ones(((rows * (tile_h + gap) + label_room) * len(bands), band_cols * (tile_w + gap), 3), np.float32)
    centers = []
    for b, band in enumerate(bands):
        top = b * (rows * (tile_h + gap) + label_room) + label_room
        for col, c in enumerate(band):
            left = col * (tile_w + gap)
            centers.append((left + tile_w / 2, top - 4, names[c]))
            for row, k in enumerate(per_class[c]):
                tile = images[k].transpose(1, 2, 0)
                tile = np.repeat(tile, 3, axis=2) if channels == 1 else tile[..., :3]
                tile = tile.repeat(scale, axis=0).repeat(scale, axis=1)
                y = top + row * (tile_h + gap)
                canvas[y:y + tile_h, left:left + tile_w] = tile
    dpi = 100
    title_room = 30 if title else 0
    fig = plt.figure(figsize=(canvas.shape[1] / dpi, (canvas.shape[0] + title_room) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] / (canvas.shape[0] + title_room)))
    ax.imshow(np.clip(canvas, 0, 1), interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    # a character is about 0.85 x the font size in pixels at 100 dpi: the largest size (6 to 10 pt) that fits
    # the longest name over its column; names still too long are shortened with an ellipsis
    font = max(6, min(10, int(tile_w / (max(map(len, names)) * 0.85)))) if names else 8
    fits = max(int((tile_w + gap) / (font * 0.85)), 2)
    for x, y, name in centers:
        shown = name if len(name) <= fits else name[:fits - 1] + "\u2026"
        ax.text(x, y, shown, ha="center", va="bottom", fontsize=font, clip_on=False)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.5 * title_room / (canvas.shape[0] + title_room), va="center")
    return fig


def plot_grid(images, labels, path: str | Path, class_names: Optional[Sequence[str]] = None,
              format: Optional[str] = None, **options) -> None:
    """`grid_figure` saved (PNG unless `format` says otherwise) at one screen pixel per canvas pixel (a
    condensed set's synthetic.png)."""
    fig = grid_figure(images, labels, class_names, **options)
    try:
        fig.savefig(path, dpi=fig.dpi, format=format)
    finally:
        plt.close(fig)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


__all__ = ["plot_curves", "plot_run", "run_figure", "grid_figure", "plot_grid", "plot_bench", "plot_cka"]
