"""Learning-curve plots (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Test top-1 and training loss per epoch, one line per run (or per label of averaged runs)."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for label, history in runs.items():
        evaluated = [row for row in history if "test_top1" in row]
        ax_acc.plot([r["epoch"] for r in evaluated], [r["test_top1"] for r in evaluated], label=label)
        ax_loss.plot([r["epoch"] for r in history], [r["train_loss"] for r in history], label=label)
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss (all terms)", title="loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
