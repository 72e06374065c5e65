"""Markdown tables of the learning-fidelity study (docs/fidelity.md) from `python -m ssa compare` runs.

    python scripts/fidelity_report.py runs/fidelity_mnist_lenet [runs/...] > table.md

Per variant: test top-1 mean ± std over seeds, and the paired differences (same seed, so same
data split, shuffle and initial weights) to the `dfa` row and to the `ssa` row, mean ± std;
final ranks, trained parameters, mean wall time of a run (one thread, several runs sharing the
machine: compare within a table only). Dense rows evaluated after an SVD cut (``truncate``) get one
line per fraction.
"""

from __future__ import annotations

import json
import os
import statistics
import sys


def _pm(values, scale=100.0, digits=2) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _diff(runs, ref) -> str:
    if ref is None:
        return "—"
    by_seed = {r["seed"]: r["test_acc"] for r in ref["runs"]}
    d = [r["test_acc"] - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]
    if not d:
        return "—"
    return ("+" if statistics.fmean(d) >= 0 else "") + _pm(d)


def table(folder: str) -> str:
    with open(os.path.join(folder, "results.json")) as f:
        res = json.load(f)
    c = res["config"]
    rows = {v["variant"]: v for v in res["variants"] if v["runs"]}
    dfa, ssa = rows.get("dfa"), rows.get("ssa")
    seeds = sorted({r["seed"] for v in rows.values() for r in v["runs"]})
    out = [f"**{c['model']} on {c['dataset']}** ({c['epochs']} epochs, batch {c['batch_size']}, "
           f"{c['optimizer']} lr {c['lr']:g}, seeds {', '.join(map(str, seeds))}; "
           f"`configs/{c['name']}.yaml`)", "",
           "| variant | top-1 (%) | Δ vs dfa (paired) | Δ vs ssa (paired) | params | final ranks "
           "| wall (s) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in rows.items():
        runs = v["runs"]
        ranks = runs[0]["ranks"]
        rank_text = "/".join(str(round(statistics.fmean(r["ranks"][k] for r in runs))) for k in ranks)
        rank_text = rank_text or "dense"
        params = statistics.fmean(r["params"] for r in runs)
        diverged = sum(1 for r in runs if r.get("diverged"))
        label = name + (f" ({diverged} of {len(runs)} diverged)" if diverged else "")
        wall = statistics.fmean(r["wall_s"] for r in runs)
        to_dfa = _diff(runs, dfa) if v is not dfa else "—"
        to_ssa = _diff(runs, ssa) if v is not ssa else "—"
        out.append(f"| {label} | {_pm([r['test_acc'] for r in runs])} | {to_dfa} | {to_ssa} | {params:,.0f} "
                   f"| {rank_text} | {wall:.0f} |")
    cut = [(name, v) for name, v in rows.items() if any(r.get("truncated") for r in v["runs"])
           and name in ("bp", "dfa")]
    if cut:
        out += ["", "Dense rows cut by SVD after training (hidden layers to a fraction of their full rank; "
                "the output layer kept):", "",
                "| variant | fraction | params | top-1 (%) |", "| --- | --- | --- | --- |"]
        for name, v in cut:
            fractions = sorted({t["fraction"] for r in v["runs"] for t in r["truncated"]}, reverse=True)
            for fr in fractions:
                pts = [t for r in v["runs"] for t in r["truncated"] if t["fraction"] == fr]
                out.append(f"| {name} | {fr:g} | {statistics.fmean(t['params'] for t in pts):,.0f} | "
                           f"{_pm([t['acc'] for t in pts])} |")
    return "\n".join(out)


if __name__ == "__main__":
    print("\n\n".join(table(f) for f in sys.argv[1:]))
