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
patches = lazy_import("matplotlib.patches")


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


def run_figure(history: list[dict], teacher_score: Optional[float] = None, title: str = "",
               score: tuple[str, str] = ("top1", "top-1")) -> plt.Figure:
    """One run's curves: left, the training loss and each of its terms (the ``loss_*`` columns of
    metrics.csv: cross-entropy and every method's weighted term) with the test cross-entropy; right, the task's
    score (`score`: its column suffix and its name, e.g. ``("miou", "mIoU")``) in training (``train_<key>``, when
    recorded) and on the test split, with the teacher's test score as a dashed reference line when it is known."""
    key, name = score
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
    for label, column, style in series:
        points = [(row["epoch"], row[column]) for row in history if _finite(row.get(column))]
        if points:
            ax_loss.plot(*zip(*points), marker="o" if len(points) < 15 else None, markersize=3, label=label, **style)
            plotted += [v for _, v in points]
    positive = bool(plotted) and min(plotted) > 0
    ax_loss.set(xlabel="epoch", ylabel="loss (weighted terms)", title="loss terms", yscale="log" if positive else "linear")

    for label, column, style in ((f"train {name}", f"train_{key}", dict(color="tab:blue", linestyle=":")),
                                 (f"test {name}", f"test_{key}", dict(color="tab:blue", linewidth=2))):
        points = [(row["epoch"], row[column]) for row in history if _finite(row.get(column))]
        if points:
            ax_acc.plot(*zip(*points), marker="o" if len(points) < 15 else None, markersize=3, label=label, **style)
    if teacher_score is not None and _finite(teacher_score):
        ax_acc.axhline(teacher_score, color="tab:red", linestyle="--", label=f"teacher test {name} {teacher_score:.2f}%")
    ax_acc.set(xlabel="epoch", ylabel=f"{name} (%)", title=name, ylim=(0, 102))
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


def plot_run(history: list[dict], path: str | Path, teacher_score: Optional[float] = None, title: str = "",
             score: tuple[str, str] = ("top1", "top-1")) -> None:
    """`run_figure` saved as a PNG (a run directory's curves.png)."""
    fig = run_figure(history, teacher_score, title, score)
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


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) RGB colours in [0, 1], distinct for up to 20 classes (tab20, strong shades first), then
    repeating; class 0 of a segmentation is its background and is never painted."""
    cmap = plt.get_cmap("tab20")
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return np.array([cmap(order[c % 20])[:3] for c in range(num_classes)], dtype=np.float32)


def display_images(images) -> np.ndarray:
    """Normalised images (N, C, H, W) stretched to [0, 1] per image, RGB, (N, H, W, 3), for showing."""
    images = np.asarray(images, dtype=np.float32)
    low = images.min(axis=(1, 2, 3), keepdims=True)
    high = images.max(axis=(1, 2, 3), keepdims=True)
    images = (images - low) / np.maximum(high - low, 1e-6)
    images = images.transpose(0, 2, 3, 1)
    return np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images[..., :3]


def _panel_grid(rows: int, columns: Sequence[str], cell: float = 1.6, title: str = ""):
    fig, axes = plt.subplots(rows, len(columns), figsize=(cell * len(columns), cell * rows + 0.9), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes[0], columns):
        ax.set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def _class_legend(fig, palette: np.ndarray, names: Sequence[str], first: int) -> None:
    handles = [patches.Patch(color=palette[c], label=names[c]) for c in range(first, len(names))]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)


def plot_masks(images, columns: dict[str, np.ndarray], path: str | Path, class_names: Sequence[str],
               title: str = "", opacity: float = 0.85) -> None:
    """Segmentations side by side: one row per image, the image first, then each of `columns` (name -> masks
    (N, H, W) of class indices, e.g. ground truth, teacher, student) painted in its classes' colours over the
    image dimmed to grey, so the colours read as the legend's; class 0 (background) and -1 (unlabelled) are left
    unpainted.  `images`: (N, C, H, W), any normalisation."""
    shown = display_images(images)
    palette = class_palette(len(class_names))
    fig, axes = _panel_grid(len(shown), ["image", *columns], title=title)
    for row, image in enumerate(shown):
        axes[row, 0].imshow(image, interpolation="nearest")
        grey = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2) * 0.6
        for col, masks in enumerate(columns.values(), start=1):
            mask = np.asarray(masks[row])
            colours = palette[np.clip(mask, 0, len(palette) - 1)]
            overlay = np.where((mask > 0)[..., None], (1 - opacity) * grey + opacity * colours, grey)
            axes[row, col].imshow(np.clip(overlay, 0, 1), interpolation="nearest")
    _class_legend(fig, palette, list(class_names), first=1)
    _save(fig, path)


def plot_boxes(images, columns: dict[str, list[dict]], path: str | Path, class_names: Sequence[str],
               title: str = "", min_score: float = 0.3) -> None:
    """Detections side by side: one row per image, one column per entry of `columns` (name -> per image a dict of
    ``boxes`` (n, 4) xyxy pixels, ``labels`` (n,) indices into `class_names` and, for predictions, ``scores``;
    boxes scoring under `min_score` are not drawn), each box in its class's colour with its name and score."""
    shown = display_images(images)
    palette = class_palette(len(class_names))
    fig, axes = _panel_grid(len(shown), list(columns), title=title)
    for row, image in enumerate(shown):
        for col, targets in enumerate(columns.values()):
            ax = axes[row, col]
            ax.imshow(image, interpolation="nearest")
            target = targets[row]
            scores = target.get("scores")
            for k, (box, label) in enumerate(zip(np.asarray(target["boxes"]), np.asarray(target["labels"]))):
                score = None if scores is None else float(scores[k])
                if score is not None and score < min_score:
                    continue
                colour = palette[int(label) % len(palette)]
                x0, y0, x1, y1 = box
                ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                                          edgecolor=colour, linewidth=1.2))
                text = class_names[int(label)] + ("" if score is None else f" {score:.2f}")
                ax.text(x0, y0 - 1, text, fontsize=5, color="white", va="bottom",
                        bbox=dict(facecolor=colour, edgecolor="none", pad=0.5, alpha=0.85))
    _class_legend(fig, palette, list(class_names), first=1)
    _save(fig, path)


__all__ = ["plot_curves", "plot_run", "run_figure", "grid_figure", "plot_grid", "plot_bench", "plot_cka", "plot_masks",
           "plot_boxes", "class_palette", "display_images"]


def plot_sample_rows(rows: dict[str, object], path: str | Path, title: str = "", cell: float = 0.9) -> None:
    """Generated images in labelled rows (name -> (N, C, H, W) in [-1, 1]), e.g. one row per number of sampling
    steps, teacher and students: the same column is the same starting noise and class in every row."""
    names = list(rows)
    count = max(len(np.asarray(v)) for v in rows.values())
    fig, axes = plt.subplots(len(names), count, figsize=(cell * count + 1.6, cell * len(names) + 0.6), squeeze=False,
                             layout="constrained")
    for r, name in enumerate(names):
        images = (np.clip(np.asarray(rows[name], dtype=np.float32), -1, 1) + 1) / 2
        images = images.transpose(0, 2, 3, 1)
        images = np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images[..., :3]
        for c in range(count):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(images[c], interpolation="nearest")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_metric_vs_steps(rows: list[dict], path: str | Path, metric: str = "fid", title: str = "") -> None:
    """One line per run of `metric` against the number of sampling steps (log-scaled axis), e.g. FID vs steps for
    a teacher and its few-step students."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    for run in dict.fromkeys(r["run"] for r in rows):
        points = sorted((r["steps"], r[metric]) for r in rows if r["run"] == run)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=Path(str(run)).name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(metric.upper() if metric in ("fid", "kid_mean") else metric)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, path)
