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


if __name__ == "__main__":
    main()
