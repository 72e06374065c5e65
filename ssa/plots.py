"""PNG plots (matplotlib, Agg) of a run and of a comparison (DESIGN §10).

:func:`save_all` draws one run per method (``python -m ssa train``). The comparison plots of
:mod:`ssa.compare` take ``curves = {variant: [history of seed 0, history of seed 1, …]}`` and
draw the mean over seeds with a shaded ± std band: :func:`accuracy_curves`, :func:`rank_curves`
(rank per layer over epochs), :func:`angle_curves` (gradient or matrix alignment angle per
layer over epochs, the paper's Fig. 2/3), :func:`cost_bars` (training FLOPs per iteration and
peak memory per variant and model, Fig. 2/5) and :func:`sweep_curve`. Each returns the path it
wrote, or ``None`` (and writes nothing) when the histories hold no data for it.
"""

from __future__ import annotations

import math
import os
import statistics

__all__ = ["save_all", "accuracy_curves", "rank_curves", "angle_curves", "cost_bars", "sweep_curve"]


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


# ---------------------------------------------------------------------------- comparison plots
def _number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _series(histories: list[list[dict]], get) -> tuple[list, list, list]:
    """Epochs, mean and std over seeds of ``get(row)`` (rows where it is a finite number)."""
    by_epoch: dict = {}
    for hist in histories:
        for row in hist:
            value = get(row)
            if _number(value):
                by_epoch.setdefault(row.get("epoch"), []).append(float(value))
    epochs = [e for e in by_epoch if e is not None]
    epochs.sort()
    mean = [statistics.fmean(by_epoch[e]) for e in epochs]
    std = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, mean, std


def _band(ax, histories, get, color, label, style="-", steps: bool = False) -> bool:
    epochs, mean, std = _series(histories, get)
    if not epochs:
        return False
    ax.plot(epochs, mean, style, color=color, label=label, drawstyle="steps-post" if steps else "default")
    if any(std):
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=color, alpha=0.2, linewidth=0, step="post" if steps else None)
    return True


def _layers(histories: list[list[dict]], key: str) -> list[str]:
    """Layer names of ``row[key]`` with a number somewhere, in model order (first appearance)."""
    names: dict = {}
    for hist in histories:
        for row in hist:
            value = row.get(key)
            if isinstance(value, dict):
                for name, x in value.items():
                    if _number(x):
                        names[name] = None
    return list(names)


def _grid(plt, n: int, width: float = 4.5, height: float = 3.5):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def accuracy_curves(curves: dict[str, list[list[dict]]], path: str) -> str | None:
    """Test accuracy (left) and training loss (right) per epoch of every variant, mean ± std over seeds."""
    if not any(row for hists in curves.values() for hist in hists for row in hist):
        return None
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for i, (variant, hists) in enumerate(curves.items()):
        color = f"C{i % 10}"
        drawn |= _band(ax_acc, hists, lambda r: r.get("val_acc"), color, f"{variant} test")
        drawn |= _band(ax_acc, hists, lambda r: r.get("train_acc"), color, f"{variant} train", "--")
        drawn |= _band(ax_loss, hists, lambda r: r.get("val_loss"), color, f"{variant} test")
        drawn |= _band(ax_loss, hists, lambda r: r.get("train_loss"), color, f"{variant} train", "--")
    if not drawn:
        plt.close(fig)
        return None
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy (mean ± std over seeds)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    losses = [v for line in ax_loss.get_lines() for v in line.get_ydata()]
    if losses and min(losses) > 0 and max(losses) > 10 * min(losses):
        ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        _integer_epochs(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    return _save_path(fig, plt, path)


def _layer_panels(plt, panels: dict, key: str, **band_kw):
    """One axis per variant with a mean ± std band per layer of ``row[key]``; ``(fig, [(ax, variant)])``."""
    fig, axes = _grid(plt, len(panels))
    drawn = []
    for ax, (variant, (hists, layers)) in zip(axes, panels.items()):
        for j, name in enumerate(layers):
            _band(ax, hists, lambda r, n=name: (r.get(key) or {}).get(n), f"C{j % 10}", f"layer {name}",
                  **band_kw)
        drawn.append((ax, variant))
    return fig, drawn


def rank_curves(curves: dict[str, list[list[dict]]], path: str) -> str | None:
    """Rank per layer over epochs, one panel per variant that has SSA layers (mean ± std over seeds)."""
    panels = {v: (hists, _layers(hists, "ranks")) for v, hists in curves.items()}
    panels = {v: p for v, p in panels.items() if p[1]}
    if not panels:
        return None
    plt = _pyplot()
    # a cut at the end of an epoch holds from that epoch's point on: steps
    fig, drawn = _layer_panels(plt, panels, "ranks", steps=True)
    for ax, variant in drawn:
        ax.set(xlabel="epoch", ylabel="rank", title=f"{variant}: rank per layer")
        _integer_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save_path(fig, plt, path)


def angle_curves(curves: dict[str, list[list[dict]]], path: str, key: str = "grad_angle",
                 ylabel: str = "angle (°)") -> str | None:
    """``row[key]`` (degrees per layer) over epochs, one panel per variant that has it, mean ± std.

    A variant whose angles are all 0 (``bp``, the reference itself) gets no panel.
    """
    panels = {v: (hists, _layers(hists, key)) for v, hists in curves.items()}
    panels = {v: p for v, p in panels.items()
              if any(_number(x) and x != 0 for h in p[0] for r in h for x in (r.get(key) or {}).values())}
    if not panels:
        return None
    plt = _pyplot()
    fig, drawn = _layer_panels(plt, panels, key)
    for ax, variant in drawn:
        ax.axhline(90, color="grey", linewidth=0.8, linestyle=":")
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{variant}: {key.replace('_', ' ')}", ylim=(0, 180))
        _integer_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save_path(fig, plt, path)


def _stat(x) -> tuple[float, float] | None:
    """``(mean, std)`` of a number or of a ``{"mean", "std"}`` summary; ``None`` if absent."""
    if isinstance(x, dict) and _number(x.get("mean")):
        return float(x["mean"]), float(x.get("std") or 0.0)
    if _number(x):
        return float(x), 0.0
    return None


def cost_bars(costs: dict[str, dict[str, dict]], path: str) -> str | None:
    """Bars of training FLOPs per iteration and peak memory per variant, grouped by model.

    ``costs = {model: {variant: {"flops": …, "peak_mem": …}}}``, each value a number, a
    ``{"mean", "std"}`` summary or ``None``. One model: one bar per variant; several: groups
    per model with a legend. A panel without any value is left out; no file when both are.
    """
    metrics = [("flops", "training {} / iteration", [("FLOP", 1.0), ("kFLOP", 1e3), ("MFLOP", 1e6),
                                                      ("GFLOP", 1e9), ("TFLOP", 1e12)]),
               ("peak_mem", "peak memory ({})", [("B", 1.0), ("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30)])]
    values = {key: [st[0] for per in costs.values() for c in per.values() if (st := _stat(c.get(key)))]
              for key, *_ in metrics}
    metrics = [m for m in metrics if values[m[0]]]
    if not metrics:
        return None
    plt = _pyplot()
    groups = list(costs)
    variants = list(dict.fromkeys(v for per in costs.values() for v in per))
    single = len(groups) == 1
    width = 0.8 if single else 0.8 / max(len(variants), 1)
    size = min(9.0, max(4.5, 1.0 + 0.45 * len(variants) * len(groups)))
    fig, axes = plt.subplots(1, len(metrics), figsize=(size * len(metrics), 4), squeeze=False)
    for ax, (key, label, units) in zip(axes[0], metrics):
        unit, scale = units[0]
        for name, factor in units:
            if max(values[key]) >= factor:
                unit, scale = name, factor
        for i, variant in enumerate(variants):
            xs, hs, es = [], [], []
            for g, model in enumerate(groups):
                st = _stat(costs[model].get(variant, {}).get(key))
                if st is not None:
                    xs.append(i if single else g + (i - (len(variants) - 1) / 2) * width)
                    hs.append(st[0] / scale)
                    es.append(st[1] / scale)
            if xs:
                ax.bar(xs, hs, width, yerr=es if any(es) else None, color=f"C{i % 10}", label=variant)
        if single:
            ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
            title = f"{label.format(unit)}, {groups[0]}"
        else:
            ax.set_xticks(range(len(groups)), groups)
            ax.legend(fontsize=7, bbox_to_anchor=(1.0, 1.0), loc="upper left")
            title = label.format(unit)
        ax.set(ylabel=label.format(unit), title=title)
        ax.grid(alpha=0.3, axis="y")
    return _save_path(fig, plt, path)


def sweep_curve(field: str, points: list[tuple[float, dict | None]], path: str) -> str | None:
    """Test accuracy (mean ± std over seeds) against the swept loss coefficient ``field``.

    ``points``: ``(value, {"mean", "std"} of the test accuracy)``. Log x axis when every value is
    positive, symlog (linear around 0) when some are 0.
    """
    pts = sorted((float(v), _stat(s)) for v, s in points if _stat(s) is not None)
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p[0] for p in pts]
    ax.errorbar(xs, [100 * p[1][0] for p in pts], yerr=[100 * p[1][1] for p in pts], marker="o", capsize=3)
    positive = [x for x in xs if x > 0]
    if positive and len(positive) == len(xs):
        ax.set_xscale("log")
    elif positive:
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set(xlabel=f"loss coefficient {field}", ylabel="test accuracy (%)", title=f"sensitivity to {field}")
    ax.grid(alpha=0.3)
    return _save_path(fig, plt, path)


def accuracy_vs_params(points: dict[str, list[tuple[float, dict | None]]], path: str,
                       title: str | None = None) -> str | None:
    """Test accuracy (mean ± std over seeds) against trained parameters, one series per label.

    ``points[label]``: ``(params, {"mean", "std"} of the test accuracy)``; a series with several
    points (a dense method cut by SVD after training to smaller ranks) is drawn as a line, a
    single point (a method at its final ranks) as a marker. Log x axis.
    """
    series = {k: sorted((float(p), _stat(a)) for p, a in v if _stat(a) is not None)
              for k, v in points.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        style = dict(marker="o", capsize=3) if len(pts) > 1 else dict(marker="*", markersize=12, capsize=3,
                                                                       linestyle="none")
        ax.errorbar([p[0] for p in pts], [100 * p[1][0] for p in pts], yerr=[100 * p[1][1] for p in pts],
                    label=label, **style)
    ax.set_xscale("log")
    ax.set(xlabel="trained parameters (factors count (m + n + 1)·r)", ylabel="test accuracy (%)",
           title=title or "accuracy against parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save_path(fig, plt, path)


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save_path(fig, plt, path: str) -> str:
    folder = os.path.dirname(path)
    return _save(fig, plt, folder or ".", os.path.basename(path))
