"""PNG plots of a run: accuracy/loss curves, rank per layer, ‖UᵀU − I‖ per layer (matplotlib, Agg)."""

from __future__ import annotations

import os

__all__ = ["save_all"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_all(histories: dict[str, list[dict]], out: str) -> list[str]:
    """Write ``curves.png``, ``ranks.png`` and ``ortho.png`` into ``out``; returns their paths."""
    plt = _pyplot()
    paths = []
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (method, hist) in enumerate(histories.items()):
        ep, color = [h["epoch"] for h in hist], f"C{i}"
        if any(h["val_acc"] is not None for h in hist):
            ax_acc.plot(ep, [h["val_acc"] for h in hist], color=color, label=f"{method} test")
            ax_loss.plot(ep, [h["val_loss"] for h in hist], color=color, label=f"{method} test")
        ax_acc.plot(ep, [h["train_acc"] for h in hist], "--", color=color, label=f"{method} train")
        ax_loss.plot(ep, [h["train_loss"] for h in hist], "--", color=color, label=f"{method} train")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(_save(fig, plt, out, "curves.png"))
    for key, name, ylabel in (("ranks", "ranks.png", "rank"), ("ortho", "ortho.png", "‖UᵀU − I‖_F")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, hist in histories.items():
            layers = list(dict.fromkeys(n for h in hist for n in h[key]))  # model order
            for n in layers:
                ax.plot([h["epoch"] for h in hist], [h[key].get(n) for h in hist],
                        label=f"{method} layer {n}")
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{ylabel} per SSA layer")
        if key == "ortho":
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        paths.append(_save(fig, plt, out, name))
    return paths


def _save(fig, plt, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
