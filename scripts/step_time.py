"""Time per ``Trainer.step`` of each method on the digits MLP (issue 14, CPU target 7).

    python scripts/step_time.py [--threads 1] [--methods bp,ssa,dfa] [--schedule]

The README's MLP (64-256-256-10, batch 64, Adam), one warm-up pass of 5 steps, then the best of
three passes over the training set; prints µs per step and each method's ratio to ``bp`` (same
process, same batches, same initial weights). Full rank unless ``--schedule`` (the default rank
schedule's cuts are then applied after each pass, as epochs).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import ssa


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="bp,ssa,dfa")
    ap.add_argument("--schedule", action="store_true", help="apply the default rank schedule between passes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, _, classes, _ = ssa.data.get("digits", 64, 0)
    batches = list(train)
    times = {}
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, classes))
        schedule = "default" if args.schedule else None
        options = ssa.methods.applicable(method, {"schedule": schedule})
        tr = ssa.Trainer(model, classes, method=method, **options)
        tr.rule.set_epochs(3)
        for x, y in batches[:5]:
            tr.step(x, y)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for x, y in batches:
                tr.step(x, y)
            best = min(best, (time.perf_counter() - start) / len(batches))
            tr.end_epoch()
        times[method] = best
        ranks = "/".join(map(str, tr.ranks().values())) or "dense"
        print(f"{method:6s} {best * 1e6:8.0f} us/step  ranks {ranks}")
    if "bp" in times:
        print("ratio to bp: " + ", ".join(f"{m} {t / times['bp']:.2f}x" for m, t in times.items()))
    print(f"torch {torch.__version__}, {args.threads} thread(s), {len(batches)} batches of 64")


if __name__ == "__main__":
    main()
