"""Turn a ``pytest benchmarks/ --benchmark-only --benchmark-json=F`` file into a Markdown table.

    python benchmarks/report.py F [--command "..."] > docs/benchmarks/<device>.md

Ratios are taken within the one run: each provider's median time against the eager
reference of the same op, shape and dtype.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json_file")
    parser.add_argument("--command", default="pytest benchmarks/ --benchmark-only")
    args = parser.parse_args()
    with open(args.json_file) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b["extra_info"]
        rows.append(dict(op=info["op"], provider=info["provider"], dtype=info["dtype"],
                         shape=" ".join(f"{k}={v}" for k, v in info["shape"].items()),
                         mean=b["stats"]["mean"], median=b["stats"]["median"],
                         gflops=info["gflops_per_s"], gbs=info["gbytes_per_s"],
                         peak=info["peak_bytes"], info=info))
    if not rows:
        raise SystemExit("no benchmarks in the file")
    base = {(r["op"], r["shape"], r["dtype"]): r["median"] for r in rows
            if r["provider"] == "reference"}
    first = rows[0]["info"]
    print(f"# Benchmarks: {first['device']}\n")
    print(f"- date: {data.get('datetime', '?')}")
    print(f"- command: `{args.command}`")
    print(f"- device: {first['device']}; torch {first['torch']} (CUDA {first['cuda']}), "
          f"triton {first['triton']}, Python {first['python']}, {first['threads']} threads")
    print("- time: median over the timed rounds (synchronised); ratio = eager reference time / "
          "this provider's time (> 1 is faster), same op, shape and dtype, same run")
    print("- FLOPs count a multiply-add as 2; bytes are the minimum traffic; peak = extra "
          "memory allocated during one call\n")
    groups = defaultdict(list)
    for r in rows:
        groups[r["op"]].append(r)
    for op, items in groups.items():
        print(f"## {op}\n")
        print("| shape | dtype | provider | median (ms) | vs reference | GFLOP/s | GB/s | "
              "peak (MB) |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for r in sorted(items, key=lambda r: (r["shape"], r["dtype"], r["provider"])):
            ref = base.get((r["op"], r["shape"], r["dtype"]))
            ratio = f"{ref / r['median']:.2f}×" if ref else "—"
            print(f"| {r['shape']} | {r['dtype'].replace('torch.', '')} | {r['provider']} | "
                  f"{r['median'] * 1e3:.3f} | {ratio} | {r['gflops']:.1f} | {r['gbs']:.1f} | "
                  f"{r['peak'] / 2**20:.1f} |")
        print()
    layer_summary(rows)
    memory_summary(rows)
    conv_summary(rows)


def memory_summary(rows: list[dict]) -> None:
    """Whole-model training memory (benchmarks/test_memory.py), if run: absolute peak of one
    steady-state step per model and case, the SSA / BP ratio, and for the MLP the growth from
    the shallowest to the deepest model: raw, and beyond the parameters' own share (what is held
    between steps — parameters, gradients, buffers, optimizer state, batch — and on the CPU
    the step's fresh gradients; ``param_share_bytes`` of the benchmark)."""
    mem = [r for r in rows if r["op"] == "training_memory"]
    if not mem:
        return

    def key(r):
        sh = r["info"]["shape"]
        return sh["model"], sh.get("depth", 0), sh.get("width", ""), sh["batch"]

    by = defaultdict(dict)
    for r in mem:
        by[key(r)][r["provider"]] = r
    cases = sorted({r["provider"] for r in mem}, key=lambda c: (c != "bp", c))
    print("## Training memory: SSA vs dense BP\n")
    print("Absolute peak of one steady-state `Trainer.step` (CUDA: `max_memory_allocated` after "
          "`reset_peak_memory_stats`; CPU: what is held between steps + the profiler's "
          "peak of the step), SSA layers at rank ≤ " + str(mem[0]["info"]["shape"].get("r", "?")) + ".\n")
    head = ["model", "depth", "width", "batch"] + [f"peak {c} (MB)" for c in cases]
    head += [f"{c} / bp" for c in cases if c != "bp"] + [f"step {c} (ms)" for c in cases]
    print("| " + " | ".join(head) + " |")
    print("| --- |" + " ---: |" * (len(head) - 1))
    for k in sorted(by):
        d = by[k]
        cells = [str(v) for v in k]
        cells += [f"{d[c]['info']['peak_abs_bytes'] / 2**20:.1f}" if c in d else "—" for c in cases]
        bp = d.get("bp")
        cells += [f"{d[c]['info']['peak_abs_bytes'] / bp['info']['peak_abs_bytes']:.3f}"
                  if c in d and bp else "—" for c in cases if c != "bp"]
        cells += [f"{d[c]['median'] * 1e3:.1f}" if c in d else "—" for c in cases]
        print("| " + " | ".join(cells) + " |")
    depths = sorted({k[1] for k in by if k[0] == "mlp"})
    if len(depths) > 1:
        lo, hi = depths[0], depths[-1]
        print(f"\nMLP peak growth from {lo} to {hi} layers: raw, and beyond the parameters' own share "
              "(peak − parameters, gradients, buffers, optimizer state and batch):\n")
        for c in cases:
            a = next((d[c] for k, d in by.items() if k[0] == "mlp" and k[1] == lo and c in d), None)
            b = next((d[c] for k, d in by.items() if k[0] == "mlp" and k[1] == hi and c in d), None)
            if a and b:
                pa, pb = a["info"]["peak_abs_bytes"], b["info"]["peak_abs_bytes"]
                ra = pa - a["info"]["param_share_bytes"]
                rb = pb - b["info"]["param_share_bytes"]
                print(f"- {c}: {pb / pa:.2f}× raw, {rb / ra:.2f}× beyond the parameters' share")
    print()


def layer_summary(rows: list[dict]) -> None:
    """The SSA linear layer step against its eager reference and the dense BP step
    (benchmarks/test_layer_step.py), if run: time ratios t(other) / t(provider), > 1 = faster."""
    steps = [r for r in rows if r["op"] == "linear_layer_step"]
    if not steps:
        return

    def layer(r):
        return tuple(r["info"]["shape"][k] for k in ("p", "n", "m"))

    copy = next((r for r in rows if r["op"] == "copy"), None)
    dense = {layer(r): r for r in steps if r["provider"] == "dense-bp"}
    by = defaultdict(dict)
    for r in steps:
        if r["provider"] != "dense-bp":
            by[(layer(r), r["info"]["shape"]["r"])][r["provider"]] = r
    providers = sorted({p for d in by.values() for p in d}, key=lambda p: (not p.startswith("reference"), p))
    native = [p for p in providers if not p.startswith("reference")]
    print("## Linear layer step: SSA vs its reference vs dense BP\n")
    print("Step = `lowrank_linear` + `dfa_project` + `svd_factor_grads` (align, ortho, Stiefel) + Adam, "
          "against `relu(F.linear)` + autograd backward (W, b and the input) + Adam at the same p, n, m. "
          "Speed-ups t(other) / t(provider), same run: > 1 means the SSA provider is faster. "
          "`r*` = mn / (4(m + n)). GB/s: minimum bytes / time; % of copy: that against the copy "
          "bandwidth measured in the same run" + (f" ({copy['gbs']:.1f} GB/s)" if copy else " (not run)")
          + ".\n")
    head = ["p", "n", "m", "r", "r ≤ r*"] + [f"{p} (ms)" for p in providers] + ["dense-bp (ms)"]
    for p in native:
        head += [f"{p} vs reference", f"{p} vs dense-bp", f"{p} GB/s", f"{p} % of copy", f"peak {p} (MB)"]
    head += ["peak dense-bp (MB)"]
    print("| " + " | ".join(head) + " |")
    print("|" + " ---: |" * len(head))
    for (lay, r), d in sorted(by.items()):
        p_, n, m = lay
        dn = dense.get(lay)
        cells = [str(p_), str(n), str(m), str(r), "yes" if r <= m * n / (4 * (m + n)) else "no"]
        cells += [f"{d[p]['median'] * 1e3:.2f}" if p in d else "—" for p in providers]
        cells += [f"{dn['median'] * 1e3:.2f}" if dn else "—"]
        for p in native:
            mine = d.get(p)
            base = d.get("reference")
            cells += [f"{base['median'] / mine['median']:.2f}×" if mine and base else "—",
                      f"{dn['median'] / mine['median']:.2f}×" if mine and dn else "—",
                      f"{mine['gbs']:.1f}" if mine else "—",
                      f"{100 * mine['gbs'] / copy['gbs']:.0f} %" if mine and copy else "—",
                      f"{mine['peak'] / 2**20:.1f}" if mine else "—"]
        cells += [f"{dn['peak'] / 2**20:.1f}" if dn else "—"]
        print("| " + " | ".join(cells) + " |")
    print()


CONV_OPS = {"ssa_conv_step", "ssa_conv_forward", "dense_conv_step", "dense_conv_forward"}


def conv_summary(rows: list[dict]) -> None:
    """SSA convolution layers against the dense ``nn.Conv2d`` (benchmarks/test_conv.py), if run.

    One row per layer shape and rank: the step time of every provider, then time ratios of
    each compiled backend (< 1: that backend is faster) to the eager reference and to the
    dense step / forward of the same layer shape, batch and dtype.
    """
    conv = [r for r in rows if r["op"] in CONV_OPS]
    if not any(r["op"] == "ssa_conv_step" for r in conv):
        return

    def layer(r):  # the layer shape without the rank: what the dense rows carry
        return (tuple((k, v) for k, v in r["info"]["shape"].items() if k not in ("r", "r_full")), r["dtype"])

    dense = {(r["op"], layer(r)): r for r in conv if r["op"].startswith("dense_")}
    ssa = defaultdict(dict)  # (op, layer, r) -> provider -> row
    for r in conv:
        if r["op"].startswith("ssa_"):
            ssa[(r["op"], layer(r), r["info"]["shape"]["r"])][r["provider"]] = r
    providers = sorted({r["provider"] for r in conv if r["op"].startswith("ssa_")},
                       key=lambda p: (not p.startswith("reference"), p))
    native = [p for p in providers if not p.startswith("reference")]
    print("## Convolution layers: SSA step vs dense nn.Conv2d\n")
    print("Time ratios t(provider) / t(other), same layer, batch and dtype, same run: < 1 means the "
          "SSA provider is faster. Step = `lowrank_conv2d` + `svd_conv_factor_grads` vs dense "
          "forward + autograd backward (weight and bias gradients); forward = `lowrank_conv2d` vs "
          "`relu(F.conv2d)`. GFLOP/s and peak memory of the step.\n")
    head = ["layer", "C→N", "H×W", "p", "r (full)"]
    head += [f"step {p} (ms)" for p in providers] + ["dense step (ms)"]
    for p in native:
        head += [f"{p} / reference", f"{p} / dense step", f"fwd {p} / dense fwd", f"{p} GFLOP/s"]
    head += ["dense GFLOP/s"] + [f"peak {p} (MB)" for p in native] + ["peak dense (MB)"]
    print("| " + " | ".join(head) + " |")
    print("| --- | --- | --- | ---: | ---: |" + " ---: |" * (len(head) - 5))

    def ms(r):
        return f"{r['median'] * 1e3:.2f}" if r else "—"

    def ratio(a, b):
        return f"{a['median'] / b['median']:.2f}" if a and b else "—"

    steps = sorted(((k, v) for k, v in ssa.items() if k[0] == "ssa_conv_step"),
                   key=lambda kv: (kv[0][1], -kv[0][2]))
    for (_, lay, r), by in steps:
        sh = dict(lay[0])
        d_step, d_fwd = dense.get(("dense_conv_step", lay)), dense.get(("dense_conv_forward", lay))
        fwd = ssa.get(("ssa_conv_forward", lay, r), {})
        full = next(iter(by.values()))["info"]["shape"].get("r_full", "?")
        cells = [sh["layer"], f"{sh['C']}→{sh['N']}", f"{sh['H']}×{sh['W']}", str(sh["p"]), f"{r} ({full})"]
        cells += [ms(by.get(p)) for p in providers] + [ms(d_step)]
        for p in native:
            cells += [ratio(by.get(p), by.get("reference")), ratio(by.get(p), d_step),
                      ratio(fwd.get(p), d_fwd), f"{by[p]['gflops']:.1f}" if p in by else "—"]
        cells += [f"{d_step['gflops']:.1f}" if d_step else "—"]
        cells += [f"{by[p]['peak'] / 2**20:.1f}" if p in by else "—" for p in native]
        cells += [f"{d_step['peak'] / 2**20:.1f}" if d_step else "—"]
        print("| " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
    main()
