"""Command line: ``python -m ssa train …`` and ``python -m ssa compare --config configs/<name>.yaml``.

``train --model mlp --dataset digits --method ssa,bp --out runs/x`` trains each method on the
same data and seed, prints a comparison table and writes into ``--out``: ``config.yaml``,
``results.json``, ``history.csv``, the plots ``curves.png``, ``ranks.png``, ``ortho.png``, and
per method the checkpoints ``<method>/latest.pt`` and ``<method>/best.pt``.

``compare --config PATH [--out DIR] [--ablation | --sweep] [--seeds 0,1] [--epochs N]
[--methods a,b] [--data-root DIR] [--device D] [--quiet] [--tensorboard DIR]`` runs the
methods × seeds of a YAML config (:mod:`ssa.compare`: schema, outputs), the ablation or the
coefficient sweep, prints the table and writes it with results, history and plots into
``--out`` (default ``runs/<config name>``, ``runs/<name>-ablation``, ``runs/<name>-sweep``).
The options override the config's fields; a bad config exits with code 2 before anything is
written.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

import torch

from . import data, models
from .loss import LossConfig
from .schedule import RankSchedule
from .trainer import METHODS, Trainer

__all__ = ["main", "build_parser", "compare"]


def _methods(text: str) -> list[str]:
    out = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in out if m not in METHODS]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; "
                                         f"choose from {', '.join(METHODS)}")
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"a method is repeated in {text!r}")
    return out


def _milestones(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, got {text!r}") from None
    if any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"epochs must be >= 1, got {text!r}")
    return out


def _seeds(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {text!r}")
    return out


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m ssa`` parser (subcommands ``train``, ``compare``); bad values exit with code 2."""
    parser = argparse.ArgumentParser(prog="python -m ssa", description="SVD-Space Alignment training")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one or more methods and compare them",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--model", default="mlp", choices=models.available())
    t.add_argument("--dataset", default="digits", choices=data.available())
    t.add_argument("--data-root", default=None,
                   help="local folder of cifar10/cifar100/imagefolder (nothing is downloaded)")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="training-set augmentation (random crop + flip) of the file datasets")
    t.add_argument("--method", type=_methods, default=["ssa", "bp"],
                   help=f"comma-separated, among {', '.join(METHODS)}")
    t.add_argument("--epochs", type=_positive(int), default=30)
    t.add_argument("--batch-size", type=_positive(int), default=64)
    t.add_argument("--lr", type=_positive(float), default=1e-3)
    t.add_argument("--lr-milestones", type=_milestones, default=[],
                   help="comma-separated epochs after which the learning rate is multiplied by --lr-gamma")
    t.add_argument("--lr-gamma", type=_positive(float), default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--rank", type=_positive(int), default=None,
                   help="initial rank of SSA layers (default full)")
    t.add_argument("--loss", choices=("default", "v1", "v2"), default="default", help="LossConfig preset")
    t.add_argument("--schedule", action=argparse.BooleanOptionalAction, default=True,
                   help="rank schedule for ssa (DESIGN §8)")
    t.add_argument("--interval", type=_positive(int), default=None,
                   help="epochs between rank cuts (default: ssa.RankSchedule.default, a cut after every "
                        "epoch of the first third)")
    t.add_argument("--stop-epoch", type=_positive(int), default=None,
                   help="no rank cut after this many epochs (with --interval)")
    t.add_argument("--targets", choices=("feedback", "frame", "none"), default=None,
                   help="alignment targets (default: the --loss preset's; DESIGN §6)")
    t.add_argument("--output-layer", choices=("ssa", "dense"), default="ssa",
                   help="keep the output layer dense (ssa)")
    t.add_argument("--memory", choices=("store", "recompute"), default="store")
    t.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu", "cuda", "triton"))
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", default="runs/latest", help="output folder")
    t.add_argument("--resume", action="store_true", help="continue each method from <out>/<method>/latest.pt")
    t.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    c = sub.add_parser("compare", help="methods × seeds table of a YAML config, an ablation or a sweep",
                       description="Train the methods × seeds of a YAML config (see configs/ and "
                                   "ssa.compare) and write the table, results, history and plots.")
    c.add_argument("--config", required=True, help="YAML config, e.g. configs/digits_mlp.yaml")
    c.add_argument("--out", default=None, help="output folder (default runs/<config name>[-ablation|-sweep])")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--ablation", action="store_true", help="drop each SSA loss term in turn (Table 3)")
    mode.add_argument("--sweep", action="store_true", help="vary the config's sweep coefficient")
    c.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds (overrides seeds)")
    c.add_argument("--epochs", type=_positive(int), default=None, help="overrides epochs")
    c.add_argument("--methods", type=_methods, default=None, help="comma-separated (overrides methods)")
    c.add_argument("--data-root", default=None, help="overrides data_root (local CIFAR / image folder)")
    c.add_argument("--device", default=None, help="overrides device")
    c.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True)
    c.add_argument("--resume", action="store_true",
                   help="keep the finished runs of an interrupted run in --out and train the rest")
    c.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    c.add_argument("--tensorboard", metavar="DIR", default=None,
                   help="also write per-epoch scalars for TensorBoard into DIR (needs tensorboard)")
    return parser


def _table(rows: list[dict]) -> str:
    head = ["method", "test acc", "top-5", "params", "ranks", "wall time"]
    body = [[r["method"], f"{100 * r['test_acc']:.2f} %", f"{100 * r['test_top5']:.2f} %", f"{r['params']:,}",
             "/".join(str(v) for v in r["ranks"].values()) or "dense", f"{r['wall_s']:.1f} s"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _write_history(path: str, histories: dict[str, list[dict]]) -> None:
    # Model order (first appearance), not string order: "11" must not come before "3".
    layers = list(dict.fromkeys(k for h in histories.values() for row in h for k in row["ranks"]))
    cols = ["method", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "time_s"]
    cols += [f"rank/{n}" for n in layers] + [f"ortho/{n}" for n in layers]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for method, hist in histories.items():
            for row in hist:
                cells = [method] + [row.get(c) for c in cols[1:8]]
                cells += [row["ranks"].get(n, "") for n in layers] + [row["ortho"].get(n, "") for n in layers]
                w.writerow(["" if c is None else c for c in cells])


def train(args: argparse.Namespace) -> list[dict]:
    """Run ``python -m ssa train``: fit each method, write the artefacts into ``args.out``, print the table.

    Returns the per-method result dicts also written to ``results.json``.
    """
    import yaml

    os.makedirs(args.out, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "command"}
    with open(os.path.join(args.out, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    train_loader, test_loader, classes, in_shape = data.get(args.dataset, args.batch_size, args.seed,
                                                              root=args.data_root, augment=args.augment)
    results, histories = [], {}
    for method in args.method:
        torch.manual_seed(args.seed)
        train_loader.generator.manual_seed(args.seed)
        model = models.get(args.model, classes, in_shape)
        if method != "ssa" or not args.schedule:
            schedule = None
        elif args.interval is None and args.stop_epoch is None:
            schedule = "default"  # RankSchedule.default(epochs), made by fit
        else:
            schedule = RankSchedule(args.epochs, interval=args.interval or 1, stop_epoch=args.stop_epoch)
        loss = LossConfig.preset(args.loss)
        if args.targets is not None:
            loss = dataclasses.replace(loss, targets=args.targets)
        extra = {"output_layer": args.output_layer} if method in ("ssa", "svd_bp") else {}
        trainer = Trainer(model, classes, method=method, loss=loss, lr=args.lr, **extra,
                          schedule=schedule, memory=args.memory, seed=args.seed, rank=args.rank,
                          backend=args.backend, device=args.device, lr_milestones=args.lr_milestones,
                          lr_gamma=args.lr_gamma)
        start = time.perf_counter()
        hist = trainer.fit(train_loader, args.epochs, val_loader=test_loader,
                           checkpoint_dir=os.path.join(args.out, method), progress=not args.quiet,
                           resume=args.resume)
        wall = time.perf_counter() - start
        final = trainer.evaluate(test_loader)
        histories[method] = hist
        results.append({"method": method, "test_acc": final["acc"], "test_top5": final["top5"],
                        "test_loss": final["loss"],
                        "best_test_acc": max((h["val_acc"] for h in hist), default=final["acc"]),
                        "params": trainer.param_count(), "ranks": trainer.ranks(), "wall_s": wall,
                        "epochs": len(hist)})
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _write_history(os.path.join(args.out, "history.csv"), histories)
    if args.plots:
        from . import plots

        plots.save_all(histories, args.out)
    print(_table(results))
    print(f"wrote {args.out}/: config.yaml results.json history.csv"
          + (" curves.png ranks.png ortho.png" if args.plots else "")
          + " " + " ".join(f"{m}/latest.pt" for m in args.method))
    return results


def compare(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict:
    """Run ``python -m ssa compare``: validate (a usage error, code 2), then :func:`ssa.compare.run`."""
    from . import compare as cmp

    parser = parser or build_parser()
    mode = "ablation" if args.ablation else "sweep" if args.sweep else "compare"
    overrides = {key: value for key, value in (("seeds", args.seeds), ("epochs", args.epochs),
                                               ("methods", args.methods), ("data_root", args.data_root),
                                               ("device", args.device)) if value is not None}
    try:  # everything that can be checked is, before anything is written
        config = cmp.load_config(args.config, overrides)
        cmp.variants(config, mode)  # a mode the config does not allow raises here
        cmp.check_runtime(config)
    except (FileNotFoundError, ValueError, ImportError) as err:
        parser.error(f"{args.config}: {err}")
    if args.tensorboard:
        try:
            cmp.tensorboard_writer()
        except ImportError:
            parser.error("--tensorboard needs the tensorboard package: pip install tensorboard")
    out = args.out or os.path.join("runs", config["name"] + ("" if mode == "compare" else f"-{mode}"))
    return cmp.run(config, out, mode=mode, quiet=args.quiet, tensorboard=args.tensorboard, plots=args.plots,
                   resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ssa`` and the ``ssa`` script; returns 0 (argument errors exit 2)."""
    args = build_parser().parse_args(argv)
    if args.command == "train":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            build_parser().error(f"--device {args.device}: no CUDA device is available")
        try:  # a missing --data-root or data folder: a usage error, before anything is written
            data.check(args.dataset, args.data_root, args.augment)
        except (FileNotFoundError, ValueError, ImportError) as err:
            build_parser().error(str(err))
        train(args)
    elif args.command == "compare":
        compare(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
