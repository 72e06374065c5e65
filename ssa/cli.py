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

Both refuse (exit code 2) an ``--out`` that already holds files unless ``--resume`` (continue
that run) or ``--overwrite`` (delete the files the command writes there, then start anew) is
given. ``--resume`` takes every setting not given on the command line from the run recorded in
``--out`` (``config.yaml``; for compare also ``results.json``) and refuses given settings that
differ from it, naming each with the recorded and the new value: for ``train`` everything that
changes what is trained (model, data, methods, seed, batch size, lr and its milestones, loss,
rank, schedule…), except ``--epochs``, which may grow; ``--device``, ``--backend``,
``--memory`` and ``--data-root`` may change. ``config.yaml`` records what ran.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import pickle
import sys
import time

import torch

from . import checkpoint, data, methods, models
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
    if any(v < 1 for v in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise argparse.ArgumentTypeError(f"expected increasing epochs >= 1, got {text!r}")
    return out


SEED_LIMIT = 2**32  # seeds are ints in [0, 2**32): what numpy takes, and far from torch's 64-bit limit


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed must be an int in 0..{SEED_LIMIT - 1}, got {text}")
    return value


def _seeds(text: str) -> list[int]:
    try:
        out = [_seed(v.strip()) for v in text.split(",") if v.strip()]
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds: {err}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {text!r}")
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"a seed is repeated in {text!r}")
    return out


def _positive(kind):
    """An int, or a finite float, > 0 (``nan``, ``inf``, 0 and negative values are refused)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value
    return parse


def _device(text: str) -> str:
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, "
                                         f"got {text!r}") from None
    return text


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
    t.add_argument("--seed", type=_seed, default=0, help=f"an int in 0..{SEED_LIMIT - 1}")
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
    t.add_argument("--device", type=_device, default="cpu")
    t.add_argument("--out", default="runs/latest",
                   help="output folder; one holding files is refused unless --resume or --overwrite")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out: each method from <out>/<method>/latest.pt, with the "
                            "settings recorded in <out>/config.yaml (options given must agree with them; "
                            "--epochs may grow; --device, --backend, --memory, --data-root may change)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the earlier run in --out (its results, plots, checkpoints are deleted)")
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
    c.add_argument("--device", type=_device, default=None, help="overrides device")
    c.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True)
    again = c.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep the finished runs of an interrupted run in --out and train the rest; the "
                            "config must agree with the one recorded there (options not given are taken "
                            "from the record)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the earlier results in --out (its results, table and plots are deleted)")
    c.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    c.add_argument("--tensorboard", metavar="DIR", default=None,
                   help="also write per-epoch scalars for TensorBoard into DIR (needs tensorboard)")
    return parser


# ---------------------------------------------------------------------------- resume / overwrite
# What ``train`` writes into --out (what --overwrite deletes, nothing else), besides <method>/*.pt.
TRAIN_FILES = ("config.yaml", "results.json", "history.csv", "curves.png", "ranks.png", "ortho.png")
CHECKPOINT_FILES = ("latest.pt", "best.pt")
# Options of ``train`` that --resume takes from <out>/config.yaml when not given; given, they must
# agree with it (what is trained) — except --epochs, which may grow, and RESUME_FREE (how and where
# it runs: same numbers), which may change.
RESUME_FIXED = ("model", "dataset", "augment", "method", "batch_size", "lr", "lr_milestones", "lr_gamma",
                "seed", "rank", "loss", "schedule", "interval", "stop_epoch", "targets", "output_layer")
RESUME_FREE = ("data_root", "memory", "backend", "device")


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _given(argv: list[str], command: str) -> set[str]:
    """The option destinations given on the command line ``argv`` (abbreviations included)."""
    parser = build_parser()
    for action in _subparser(parser, command)._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def _occupied(out: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2) an --out that is a file, or a folder holding files without --resume / --overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {out!r} is a file, not a folder")
    if args.resume or args.overwrite or not os.path.isdir(out):
        return
    held = sorted(os.listdir(out))
    if held:
        parser.error(f"output folder {out!r} already holds an earlier run ({', '.join(held[:6])}"
                     f"{', …' if len(held) > 6 else ''}); pass --resume to continue it, or --overwrite to "
                     "replace it (or choose another --out)")


def _remove(out: str, files, subfolders=()) -> None:
    """Delete the files a command wrote into ``out`` (and ``<sub>/<checkpoint>``), with the temporaries a
    killed write left of them (:func:`ssa.checkpoint.leftovers`), nothing else."""
    for name in files:
        path = os.path.join(out, name)
        for found in [path] + checkpoint.leftovers(path):
            if os.path.isfile(found):
                os.remove(found)
    for sub in subfolders:
        folder = os.path.join(out, sub)
        if os.path.isdir(folder):
            _remove(folder, CHECKPOINT_FILES)
            if not os.listdir(folder):
                os.rmdir(folder)


def _recorded_value(action: argparse.Action, value, where: str, parser: argparse.ArgumentParser):
    """A value of <out>/config.yaml, checked as the option's parser would check it."""
    try:
        if value is None or isinstance(action, argparse.BooleanOptionalAction):
            if value is not None and not isinstance(value, bool):
                raise argparse.ArgumentTypeError("expected true or false")
            return value
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        if isinstance(value, list) and not value:
            return []
        parsed = action.type(text) if action.type is not None else text
        if action.choices is not None and parsed not in action.choices:
            raise argparse.ArgumentTypeError(f"not one of {', '.join(map(str, action.choices))}")
        return parsed
    except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
        parser.error(f"{where}: recorded {action.dest} {value!r} is not valid ({err}); fix the file, or "
                     "start anew with --overwrite or another --out")


def _resume_train(args: argparse.Namespace, given: set[str], parser: argparse.ArgumentParser) -> None:
    """``train --resume``: take the settings not given from <out>/config.yaml; refuse given ones that
    differ from it (exit 2, naming each with both values)."""
    import yaml

    where = os.path.join(args.out, "config.yaml")
    if not os.path.isfile(where):
        if os.path.isdir(args.out) and any(os.path.isfile(os.path.join(args.out, m, "latest.pt"))
                                           for m in METHODS):
            parser.error(f"--resume: {args.out!r} has checkpoints but no config.yaml recording their "
                         "settings; start anew with --overwrite or another --out")
        print(f"--resume: nothing recorded in {args.out}; starting from scratch", file=sys.stderr)
        return
    try:
        with open(where) as f:
            record = yaml.safe_load(f)
        if not isinstance(record, dict):
            raise ValueError(f"expected a mapping, got {type(record).__name__}")
    except (OSError, ValueError, yaml.YAMLError) as err:
        parser.error(f"--resume: cannot read {where} ({err}); start anew with --overwrite or another --out")
    actions = {a.dest: a for a in _subparser(parser, "train")._actions}
    conflicts = []
    for key in ("epochs",) + RESUME_FIXED + RESUME_FREE:
        if key not in record:  # written by an older version: the option's value stands
            continue
        old = _recorded_value(actions[key], record[key], where, parser)
        new = getattr(args, key)
        if key not in given:
            setattr(args, key, old)
        elif key == "epochs" and new < old:
            conflicts.append(f"--epochs: recorded {old}, now {new} (a resume can only add epochs)")
        elif key in RESUME_FIXED and new != old:
            flag = "--" + key.replace("_", "-")
            conflicts.append(f"{flag}: recorded {old!r}, now {new!r}")
    if conflicts:
        parser.error(f"--resume: these options differ from the run recorded in {where}: "
                     + "; ".join(conflicts) + ". Leave them out to resume with the recorded settings "
                     "(--epochs may grow), or start anew with --overwrite or another --out")


def _table(rows: list[dict]) -> str:
    head = ["method", "test acc", "top-5", "params", "ranks", "wall time"]
    body = [[r["method"], f"{100 * r['test_acc']:.2f} %", f"{100 * r['test_top5']:.2f} %", f"{r['params']:,}",
             "/".join(str(v) for v in r["ranks"].values()) or "dense", f"{r['wall_s']:.1f} s"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _write_history(path: str, histories: dict[str, list[dict]]) -> None:
    import io

    # Model order (first appearance), not string order: "11" must not come before "3".
    layers = list(dict.fromkeys(k for h in histories.values() for row in h for k in row["ranks"]))
    cols = ["method", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "time_s"]
    cols += [f"rank/{n}" for n in layers] + [f"ortho/{n}" for n in layers]
    with io.StringIO(newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for method, hist in histories.items():
            for row in hist:
                cells = [method] + [row.get(c) for c in cols[1:8]]
                cells += [row["ranks"].get(n, "") for n in layers] + [row["ortho"].get(n, "") for n in layers]
                w.writerow(["" if c is None else c for c in cells])
        checkpoint.write_text(path, f.getvalue())


def train(args: argparse.Namespace) -> list[dict]:
    """Run ``python -m ssa train``: fit each method, write the artefacts into ``args.out``, print the table.

    The data is read before anything is written (a bad file exits with code 2); with
    ``args.overwrite`` the files of an earlier run in ``args.out`` are deleted first. ``config.yaml``
    records the settings that run (on ``--resume``, those merged with the recorded ones).
    Returns the per-method result dicts also written to ``results.json``.
    """
    import yaml

    try:  # a bad data file (e.g. a CIFAR pickle refused by ssa.data): a usage error, nothing written
        train_loader, test_loader, classes, in_shape = data.get(args.dataset, args.batch_size, args.seed,
                                                                  root=args.data_root, augment=args.augment)
    except (FileNotFoundError, ValueError, ImportError, pickle.UnpicklingError) as err:
        build_parser().error(str(err))
    if getattr(args, "overwrite", False):
        _remove(args.out, TRAIN_FILES, METHODS)
    os.makedirs(args.out, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "overwrite")}
    checkpoint.write_text(os.path.join(args.out, "config.yaml"), yaml.safe_dump(config, sort_keys=False))
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
        # one set of options for every method: each gets those that apply to it
        options = methods.applicable(method, dict(
            loss=loss, lr=args.lr, output_layer=args.output_layer, schedule=schedule, memory=args.memory,
            seed=args.seed, rank=args.rank, backend=args.backend, device=args.device,
            lr_milestones=args.lr_milestones, lr_gamma=args.lr_gamma))
        trainer = Trainer(model, classes, method=method, **options)
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
    checkpoint.write_text(os.path.join(args.out, "results.json"), json.dumps(results, indent=2))
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
    overridable = ("seeds", "epochs", "methods", "data_root", "device")
    overrides = {key: getattr(args, key) for key in overridable if getattr(args, key) is not None}
    try:  # everything that can be checked is, before anything is written
        config = cmp.load_config(args.config, overrides)
        out = args.out or os.path.join("runs", config["name"] + ("" if mode == "compare" else f"-{mode}"))
        found = cmp.recorded(out) if args.resume and os.path.isdir(out) else None
        if found is not None:  # --resume: the options not given are the recorded ones
            earlier = found[0]
            taken = {k: earlier[k] for k in overridable if k not in overrides and earlier[k] != config[k]
                     and not (k == "methods" and config.get("variants"))}
            if taken:
                config = cmp.load_config(args.config, {**overrides, **taken})
        cmp.variants(config, mode)  # a mode the config does not allow raises here
        cmp.check_runtime(config)
        conflicts = cmp.resume_conflicts(config, out, mode) if found is not None else []
    except (FileNotFoundError, ValueError, ImportError) as err:
        parser.error(f"{args.config}: {err}")
    if conflicts:
        parser.error(f"--resume: {args.config} (with the options given) differs from the run recorded in "
                     f"{found[2]}: {'; '.join(conflicts)}. Resume with the recorded config, or start anew "
                     "with --overwrite or another --out")
    _occupied(out, parser, args)
    if args.tensorboard:
        try:
            cmp.tensorboard_writer()
        except ImportError:
            parser.error("--tensorboard needs the tensorboard package: pip install tensorboard")
    if args.overwrite:
        _remove(out, cmp.OUTPUT_FILES)
    return cmp.run(config, out, mode=mode, quiet=args.quiet, tensorboard=args.tensorboard, plots=args.plots,
                   resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ssa`` and the ``ssa`` script; returns 0 (argument errors exit 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.resume:  # settings not given come from <out>/config.yaml; given ones must agree
            _resume_train(args, _given(argv, "train"), parser)
        _occupied(args.out, parser, args)
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is available")
        try:  # a missing --data-root or data folder: a usage error, before anything is written
            data.check(args.dataset, args.data_root, args.augment)
        except (FileNotFoundError, ValueError, ImportError) as err:
            parser.error(str(err))
        train(args)
    elif args.command == "compare":
        compare(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
