"""``python -m ssa compare``: config validation, the table, ablation and sweep variants, plots."""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from pathlib import Path

import pytest
import yaml

import ssa.cli
from ssa import compare, plots
from ssa.trainer import METHODS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = {"name": "tiny", "dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [16, 16]},
        "methods": ["bp", "dfa", "ssa"], "seeds": [0, 1], "epochs": 2, "batch_size": 256,
        "schedule": {"interval": 1}}


def _write(tmp_path, config: dict, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[2:]}


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("raw, field", [
    ({"epoch": 3}, "'epoch'"),                                         # unknown key
    ({"epochs": "x"}, "'epochs'"),                                     # wrong type
    ({"epochs": 0}, "'epochs'"),
    ({"lr": -1}, "'lr'"),
    ({"lr": "fast"}, "'lr'"),
    ({"methods": ["ssa", "backprop"]}, "'methods[1]'"),                # bad method
    ({"methods": ["bp", "bp"]}, "'methods'"),
    ({"methods": "bp"}, "'methods'"),
    ({"seeds": []}, "'seeds'"),                                        # bad seeds
    ({"seeds": [0, -1]}, "'seeds[1]'"),
    ({"seeds": [1, 1]}, "'seeds'"),
    ({"seeds": 3}, "'seeds'"),
    ({"loss": "v3"}, "'loss.preset'"),
    ({"loss": {"alignment": 0.1}}, "'loss.alignment'"),                # bad loss field
    ({"loss": {"ortho": -1}}, "'loss.ortho'"),
    ({"loss": {"scaling": "log"}}, "'loss.scaling'"),
    ({"loss": 3}, "'loss'"),
    ({"schedule": {"zeta": 2}}, "'schedule.zeta'"),
    ({"schedule": {"interval": 0}}, "'schedule.interval'"),
    ({"schedule": {"total_epochs": 5}}, "'schedule.total_epochs'"),
    ({"schedule": {"start_epoch": 30}}, "'schedule.start_epoch'"),
    ({"schedule": "often"}, "'schedule'"),
    ({"sweep": {"field": "gamma", "values": [0.1]}}, "'sweep.field'"),  # sweep of an unknown coefficient
    ({"sweep": {"field": "align", "values": []}}, "'sweep.values'"),
    ({"sweep": {"field": "align", "values": [0.1, -1]}}, "'sweep.values[1]'"),
    ({"ablation": ["ce"]}, "'ablation[0]'"),
    ({"overrides": {"adam": {"lr": 0.1}}}, "'overrides.adam'"),
    ({"overrides": {"bp": {"batch_size": 0}}}, "'overrides.bp.batch_size'"),  # overridable, must be >= 1
    ({"overrides": {"bp": {"seeds": [3]}}}, "'overrides.bp.seeds'"),     # not overridable
    ({"overrides": {"bp": {"lr": 0}}}, "'overrides.bp.lr'"),
    ({"overrides": {"ssa": {"loss": {"align": "much"}}}}, "'overrides.ssa.loss.align'"),
    ({"dataset": "svhn"}, "'dataset'"),                                # not in ssa.data.available()
    ({"model": "resnet999"}, "'model'"),
    ({"model_kwargs": {"width": 3}}, "'model_kwargs.width'"),
    ({"augment": True}, "'augment'"),                                  # digits has no augmentation
    ({"augment": "yes"}, "'augment'"),
    ({"optimizer": "lbfgs"}, "'optimizer'"),
    ({"lr_milestones": [20, 10]}, "'lr_milestones'"),
    ({"rank": 0}, "'rank'"),
    ({"device": "gpu0"}, "'device'"),
    ({"name": "a/b"}, "'name'"),
    ({"measure_memory": 1}, "'measure_memory'"),
    ({"align_every": 0}, "'align_every'"),
])
def test_bad_fields_are_named(raw, field):
    with pytest.raises(ValueError, match="config field " + field.replace("[", r"\[").replace("]", r"\]")):
        compare.load_config(raw)


def test_defaults_are_filled_and_the_result_validates_to_itself(tmp_path):
    config = compare.load_config({"lr": "2e-3", "loss": {"preset": "v1", "hoyer": 0}, "schedule": True,
                                  "overrides": {"ssa": {"loss": {"ortho": 0.5}, "epochs": 12}}})
    assert config["lr"] == 0.002 and config["methods"] == ["ssa", "bp"] and config["seeds"] == [0]
    loss = config["loss"]
    assert loss["cos"] == 0.01 and loss["hoyer"] == 0 and loss["scaling"] == "inverse"
    assert config["schedule"]["interval"] == 10 and "total_epochs" not in config["schedule"]
    ssa = compare.settings(config, "ssa")
    assert ssa["loss"]["ortho"] == 0.5 and ssa["loss"]["cos"] == 0.01 and ssa["epochs"] == 12
    assert compare.settings(config, "bp")["loss"]["ortho"] == 0.05
    assert compare.load_config(config) == config
    again = compare.load_config(_write(tmp_path, config, "again.yaml"))
    assert again == {**config, "name": config["name"]}


def test_a_bad_yaml_file_or_a_missing_one_is_reported(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        compare.load_config(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError):
        compare.load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    config = compare.load_config(path)
    assert config["name"] == path.stem and set(config["methods"]) <= set(METHODS)
    for mode in compare.MODES:
        assert compare.variants(config, mode)
    if config["dataset"] not in ("digits", "mnist"):  # file datasets: the CIFAR recipe and a data folder
        assert config["augment"] and config["lr_milestones"] == [20, 40, 60] and config["lr_gamma"] == 0.1
        with pytest.raises(ValueError, match="config field 'data_root'"):
            compare.check_runtime({**config, "device": "cpu", "data_root": None})


def test_every_config_is_shipped():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= {
        "digits_mlp", "digits_lenet", "cifar10_smallconv", "cifar10_vgg13", "cifar10_resnet32",
        "cifar100_smallconv"}


def test_ablation_and_sweep_variants():
    config = compare.load_config({**TINY, "loss": "v1"})
    names = [v["name"] for v in compare.variants(config, "ablation")]
    assert names == ["ssa (full)", "− align", "− ortho", "− cos", "− hoyer", "− rank schedule"]
    plan = {v["name"]: v["settings"] for v in compare.variants(config, "ablation")}
    assert plan["− cos"]["loss"]["cos"] == 0 and plan["− cos"]["loss"]["align"] == 0.1
    assert plan["− rank schedule"]["schedule"] is False and plan["ssa (full)"]["schedule"]
    no_schedule = compare.load_config({**TINY, "schedule": False})
    names = [v["name"] for v in compare.variants(no_schedule, "ablation")]
    assert names == ["ssa (full)", "− align", "− ortho"]  # default loss: no cos, no hoyer, no schedule
    with pytest.raises(ValueError, match="config field 'ablation'.*'cos'"):
        compare.variants(compare.load_config({**TINY, "ablation": ["cos"]}), "ablation")
    with pytest.raises(ValueError, match="config field 'sweep'"):
        compare.variants(compare.load_config(TINY), "sweep")
    sweep = compare.variants(compare.load_config({**TINY, "sweep": {"field": "ortho", "values": [0, 0.5]}}),
                             "sweep")
    assert [(v["name"], v["settings"]["loss"]["ortho"]) for v in sweep] == [("ortho=0", 0.0),
                                                                          ("ortho=0.5", 0.5)]


# ---------------------------------------------------------------------------- end to end
def test_compare_writes_table_results_history_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    config = {**TINY, "align_every": 2}
    path = _write(tmp_path, config)
    assert ssa.cli.main(["compare", "--config", str(path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 (%)" in printed and "ssa" in printed
    assert compare.load_config(out / "config.yaml") == compare.load_config({**config, "name": "tiny"})
    results = json.loads((out / "results.json").read_text())
    assert [v["variant"] for v in results["variants"]] == ["bp", "dfa", "ssa"]
    table = _table_rows((out / "table.md").read_text())
    assert list(table) == ["bp", "dfa", "ssa"]
    for v in results["variants"]:
        runs = v["runs"]
        assert [r["seed"] for r in runs] == [0, 1] and all(r["epochs"] == 2 for r in runs)
        acc = [100 * r["test_acc"] for r in runs]
        assert table[v["variant"]][0] == f"{statistics.fmean(acc):.2f} ± {statistics.stdev(acc):.2f}"
        for r in runs:
            assert r["params"] > 0 and 0 <= r["test_top5"] <= 1 and len(r["history"]) == 2
    ssa_runs = results["variants"][2]["runs"]
    assert ssa_runs[0]["ranks"] and results["variants"][0]["runs"][0]["ranks"] == {}
    assert ssa_runs[0]["history"] != ssa_runs[1]["history"]
    # a variant's run depends on its seed only, not on the variants trained before it
    alone = compare.run({**TINY, "methods": ["ssa", "bp"], "seeds": [1]}, str(tmp_path / "alone"),
                        plots=False)
    bp_seed1 = results["variants"][0]["runs"][1]
    assert alone["variants"][1]["runs"][0]["test_acc"] == bp_seed1["test_acc"]
    assert [h["train_loss"] for h in alone["variants"][1]["runs"][0]["history"]] == [
        h["train_loss"] for h in bp_seed1["history"]]
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == 3 * 2 * 2
    assert [(r["variant"], r["seed"], r["epoch"]) for r in rows[:3]] == [("bp", "0", "1"), ("bp", "0", "2"),
                                                                         ("bp", "1", "1")]
    header = list(rows[0])
    assert header[:4] == ["variant", "method", "seed", "epoch"] and "rank/1" in header
    ssa_row = next(r for r in rows if r["variant"] == "ssa")
    assert int(ssa_row["rank/1"]) <= 16 and rows[0]["rank/1"] == ""
    for name in ("curves.png", "ranks.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    for name in results["files"]:
        assert (out / name).exists()
    if any("grad_angle/1" in r and r["grad_angle/1"] for r in rows):  # once the trainer measures it
        assert (out / "grad_angle.png").exists()


def test_ablation_and_sweep_runs(tmp_path, capsys):
    base = {**TINY, "seeds": [0], "epochs": 1, "loss": {"preset": "default", "cos": 0.01},
            "sweep": {"field": "align", "values": [0.0, 0.01, 0.1]}}
    path = _write(tmp_path, base)
    ssa.cli.main(["compare", "--config", str(path), "--ablation", "--out", str(tmp_path / "abl"), "--quiet"])
    results = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert [v["variant"] for v in results["variants"]] == ["ssa (full)", "− align", "− ortho", "− cos",
                                                           "− rank schedule"]
    assert list(_table_rows((tmp_path / "abl" / "table.md").read_text())) == [v["variant"]
                                                                              for v in results["variants"]]
    ssa.cli.main(["compare", "--config", str(path), "--sweep", "--out", str(tmp_path / "sw"), "--quiet",
                  "--seeds", "0,1", "--epochs", "1"])
    results = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert results["mode"] == "sweep" and results["config"]["seeds"] == [0, 1]
    assert [(v["variant"], v["value"]) for v in results["variants"]] == [
        ("align=0", 0.0), ("align=0.01", 0.01), ("align=0.1", 0.1)]
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_scalars(tmp_path, monkeypatch, capsys):
    logged = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            logged.append((Path(self.log_dir).relative_to(tmp_path / "tb").as_posix(), tag, step))

        def close(self):
            pass

    monkeypatch.setattr(compare, "tensorboard_writer", lambda: Writer)
    config = {**TINY, "methods": ["bp"], "seeds": [0], "epochs": 2}
    ssa.cli.main(["compare", "--config", str(_write(tmp_path, config)), "--out", str(tmp_path / "o"),
                  "--quiet", "--tensorboard", str(tmp_path / "tb"), "--no-plots"])
    assert ("bp/seed0", "val_acc", 1) in logged and ("bp/seed0", "train_loss", 2) in logged


# ---------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("raw, extra, message", [
    ({"epochs": "x"}, [], "config field 'epochs'"),
    ({"methods": ["ssa", "nope"]}, [], "config field 'methods[1]'"),
    ({"dataset": "cifar10", "augment": True}, [], "config field 'data_root'"),
    (None, [], "not found"),
    ({}, ["--sweep"], "config field 'sweep'"),
    ({}, ["--methods", "ssa,nope"], "unknown method"),
    ({}, ["--seeds", "a"], "comma-separated"),
    ({}, ["--ablation", "--sweep"], "not allowed"),
])
def test_cli_bad_config_exits_2_before_writing(tmp_path, capsys, raw, extra, message):
    path = _write(tmp_path, raw) if raw is not None else tmp_path / "missing.yaml"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        ssa.cli.main(["compare", "--config", str(path), "--out", str(out)] + extra)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_tensorboard_missing_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # an import of it fails
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit) as info:
        ssa.cli.main(["compare", "--config", str(_write(tmp_path, TINY)), "--out", str(tmp_path / "o"),
                      "--tensorboard", str(tmp_path / "tb")])
    assert info.value.code == 2 and "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- plots
def _hist(epochs=3, **extra):
    return [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.3 * e, "val_loss": 1.1 / e,
             "val_acc": 0.25 * e, "ranks": {}, **{k: (v(e) if callable(v) else v) for k, v in extra.items()}}
            for e in range(1, epochs + 1)]


def test_plots_skip_what_is_missing(tmp_path):
    dense = {"bp": [_hist(), _hist()]}
    assert plots.rank_curves(dense, str(tmp_path / "ranks.png")) is None
    assert plots.angle_curves(dense, str(tmp_path / "angle.png")) is None
    empty = {"mlp": {"bp": {"flops": None, "peak_mem": None}}}
    assert plots.cost_bars(empty, str(tmp_path / "c.png")) is None
    assert plots.sweep_curve("align", [(0.1, None)], str(tmp_path / "s.png")) is None
    assert plots.accuracy_curves({}, str(tmp_path / "curves.png")) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    curves = {"bp": [_hist(grad_angle={"1": 0.0})],
              "dfa": [_hist(grad_angle=lambda e: {"1": 80.0 + e, "3": None}), _hist(grad_angle={"1": 85.0})],
              "ssa": [_hist(ranks=lambda e: {"1": 10 - e, "3": 8})]}
    assert plots.accuracy_curves(curves, str(tmp_path / "curves.png"))
    assert plots.rank_curves(curves, str(tmp_path / "ranks.png"))
    assert plots.angle_curves(curves, str(tmp_path / "angle.png"))
    costs = {"mlp": {"bp": {"flops": {"mean": 2e6, "std": 0.0}, "peak_mem": None}, "ssa": {"flops": 1e6}},
             "lenet": {"bp": {"flops": 5e6}}}
    assert plots.cost_bars(costs, str(tmp_path / "costs.png"))
    assert plots.sweep_curve("align", [(0.0, {"mean": 0.9, "std": 0.01}), (0.1, {"mean": 0.8, "std": 0.0})],
                             str(tmp_path / "sweep.png"))
    for p in tmp_path.iterdir():
        assert p.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- studies: variants, truncate
STUDY = {**{k: v for k, v in TINY.items() if k != "methods"}, "seeds": [0], "truncate": [0.5, 0.25],
         "variants": [{"name": "bp", "method": "bp"}, {"name": "dfa", "method": "dfa"},
                      {"name": "ssa", "method": "ssa"},
                      {"name": "ssa targets none", "method": "ssa", "loss": {"targets": "none"},
                       "rank": {"linear": 8}, "batch_size": 128, "factor_lr": {"s": 3.0}},
                      {"name": "dfa orthogonal", "method": "dfa", "feedback": "orthogonal", "init": "paper"},
                      {"name": "ssa default schedule", "method": "ssa", "schedule": "default",
                       "output_layer": "dense"}]}


def test_variants_validate_and_carry_their_fields():
    config = compare.load_config(STUDY)
    assert config["methods"] == ["bp", "dfa", "ssa"] and compare.load_config(config) == config
    plan = {v["name"]: v for v in compare.variants(config)}
    assert list(plan) == [v["name"] for v in STUDY["variants"]]
    s = plan["ssa targets none"]["settings"]
    assert s["loss"]["targets"] == "none" and s["loss"]["align"] == 0.1 and s["rank"] == {"linear": 8}
    assert s["batch_size"] == 128 and s["factor_lr"] == {"s": 3.0}
    base = plan["ssa"]["settings"]
    assert base["batch_size"] == 256 and base["schedule"]["interval"] == 1
    assert plan["ssa default schedule"]["settings"]["schedule"] == "default"
    assert plan["dfa orthogonal"]["settings"]["feedback"] == "orthogonal"
    assert config["truncate"] == [0.5, 0.25]


@pytest.mark.parametrize("change, field", [
    ({"variants": [{"name": "a", "method": "ssa"}, {"name": "a", "method": "dfa"}]}, "variants[1].name"),
    ({"variants": [{"name": "a", "method": "nope"}]}, "variants[0].method"),
    ({"variants": [{"name": "a", "method": "ssa", "seeds": [1]}]}, "variants[0].seeds"),
    ({"variants": [{"name": "a", "method": "ssa", "rank": {"dense": 3}}]}, "variants[0].rank.dense"),
    ({"variants": [{"name": "a", "method": "ssa", "factor_lr": {"s": -1}}]}, "variants[0].factor_lr.s"),
    ({"variants": [{"method": "ssa"}]}, "variants[0]"),
    ({"variants": [{"name": "a", "method": "ssa"}], "methods": ["bp"]}, "variants"),
    ({"truncate": [1.5]}, "truncate"),
    ({"variants": [{"name": "a", "method": "ssa", "schedule": {"stop_epoch": 9}}]}, "variants[0].schedule"),
])
def test_bad_study_fields_are_named(change, field):
    with pytest.raises(ValueError, match=re.escape(f"config field '{field}")):
        compare.load_config({**{k: v for k, v in TINY.items() if k != "methods"}, **change})


def test_a_study_runs_with_paired_rows_truncation_and_the_params_plot(tmp_path):
    out = tmp_path / "study"
    results = compare.run(STUDY, str(out), quiet=True)
    rows = {v["variant"]: v for v in results["variants"]}
    # Same seed, same initial weights: bp and "dfa orthogonal" differ (init="paper"), bp and dfa start equal.
    cut = rows["dfa"]["runs"][0]["truncated"]
    assert [c["fraction"] for c in cut] == [0.5, 0.25] and cut[0]["params"] > cut[1]["params"]
    assert "truncated" not in rows["ssa"]["runs"][0]
    assert rows["ssa targets none"]["runs"][0]["ranks"]["1"] <= 8
    assert "5" not in rows["ssa default schedule"]["runs"][0]["ranks"]  # output layer dense
    assert (out / "params.png").read_bytes()[:4] == b"\x89PNG"
    assert len(rows["bp"]["summary"]["truncated"]) == 2


def test_a_diverging_variant_is_kept_and_marked(tmp_path):
    config = {**STUDY, "truncate": [], "variants": [
        {"name": "dfa", "method": "dfa"},
        {"name": "blows up", "method": "ssa", "optimizer": "sgd", "lr": 1.0e6}]}
    results = compare.run(config, str(tmp_path / "d"), quiet=True, plots=False)
    rows = {v["variant"]: v for v in results["variants"]}
    assert rows["dfa"]["runs"][0]["diverged"] is None
    bad = rows["blows up"]["runs"][0]
    assert "non-finite loss" in bad["diverged"] and 0 <= bad["test_acc"] <= 1
    assert "blows up (1 diverged)" in (tmp_path / "d" / "table.md").read_text()


def test_resume_trains_only_what_is_missing(tmp_path, monkeypatch):
    out = tmp_path / "r"
    first = {**STUDY, "truncate": [], "variants": STUDY["variants"][:2]}
    compare.run(first, str(out), quiet=True, plots=False)
    fits = []
    real = compare._make_trainer

    def counting(model, classes, method, s, seed, device):
        fits.append(method)
        return real(model, classes, method, s, seed, device)

    monkeypatch.setattr(compare, "_make_trainer", counting)
    more = {**first, "variants": STUDY["variants"][:3]}
    results = compare.run(more, str(out), quiet=True, plots=False, resume=True)
    assert fits == ["ssa"]  # bp and dfa kept from the first run
    assert [len(v["runs"]) for v in results["variants"]] == [1, 1, 1]
    with pytest.raises(ValueError, match="another config"):
        compare.run({**more, "epochs": 1}, str(out), quiet=True, plots=False, resume=True)


# ---------------------------------------------------------------- config holes, output folder, resume
@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_cli_empty_config_file_is_an_error_naming_it(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        ssa.cli.main(["compare", "--config", str(path), "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"config file {str(path)!r} is empty" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("kwargs, field", [
    ({"hidden": [0]}, "model_kwargs.hidden[0]"), ({"hidden": [16, -2]}, "model_kwargs.hidden[1]"),
    ({"hidden": [2.5]}, "model_kwargs.hidden[0]"), ({"hidden": ["8"]}, "model_kwargs.hidden[0]"),
    ({"hidden": [True]}, "model_kwargs.hidden[0]"), ({"hidden": 16}, "model_kwargs.hidden"),
    ({"activation": "swish"}, "model_kwargs"),
])
def test_cli_bad_model_kwargs_exit_2_before_writing(tmp_path, capsys, kwargs, field):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        ssa.cli.main(["compare", "--config", str(_write(tmp_path, {**TINY, "model_kwargs": kwargs})),
                      "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"config field {field!r}" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(ValueError, match=re.escape(f"config field {field!r}")):
        compare.load_config({**TINY, "model_kwargs": kwargs})


def test_cli_seeds_must_be_below_2_to_the_32(tmp_path):
    with pytest.raises(ValueError, match=r"config field 'seeds\[1\]'"):
        compare.load_config({**TINY, "seeds": [0, 2**32]})


def test_cli_existing_output_folder_needs_resume_or_overwrite(tmp_path, capsys):
    config = _write(tmp_path, {**TINY, "methods": ["bp"], "seeds": [0], "epochs": 1})
    out = tmp_path / "o"
    args = ["compare", "--config", str(config), "--out", str(out), "--quiet", "--no-plots"]
    ssa.cli.main(args)
    before = (out / "results.json").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        ssa.cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert (out / "results.json").read_text() == before
    (out / "notes.txt").write_text("mine")
    (out / "curves.png").write_bytes(b"old")  # a plot of the earlier run: deleted by --overwrite
    ssa.cli.main(args + ["--overwrite", "--seeds", "1"])
    results = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in results["variants"][0]["runs"]] == [1]
    assert (out / "notes.txt").read_text() == "mine" and not (out / "curves.png").exists()


def test_cli_resume_refuses_a_changed_config_and_takes_options_from_the_record(tmp_path, capsys, monkeypatch):
    raw = {**TINY, "methods": ["bp"], "seeds": [0], "epochs": 2}
    out = tmp_path / "o"
    args = ["compare", "--out", str(out), "--quiet", "--no-plots"]
    ssa.cli.main(args + ["--config", str(_write(tmp_path, raw)), "--epochs", "1"])
    record = (out / "config.yaml").read_text()
    capsys.readouterr()
    changed = _write(tmp_path, {**raw, "lr": 0.5, "batch_size": 128}, "changed.yaml")
    with pytest.raises(SystemExit) as info:
        ssa.cli.main(args + ["--config", str(changed), "--epochs", "1", "--resume"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "batch_size: recorded 256, now 128" in err and "lr: recorded 0.001, now 0.5" in err
    assert "Traceback" not in err
    assert (out / "config.yaml").read_text() == record  # the record is not replaced by a refused run
    fits = []
    monkeypatch.setattr(compare, "_make_trainer", lambda *a: fits.append(a) or None)  # nothing is trained
    results = ssa.cli.main(args + ["--config", str(_write(tmp_path, raw)), "--resume"])
    assert results == 0 and fits == []  # --epochs 1 taken from the record: the finished run is kept
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 1
    with pytest.raises(ValueError, match="epochs: recorded 1, now 2"):
        compare.run({**raw, "epochs": 2}, str(out), quiet=True, plots=False, resume=True)
