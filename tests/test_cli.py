"""``python -m ssa train``: files written, table printed, bad arguments refused."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

import ssa.cli


def test_train_writes_every_artifact(tmp_path, capsys):
    out = tmp_path / "run"
    assert ssa.cli.main(["train", "--method", "ssa,bp", "--epochs", "2", "--interval", "1", "--quiet",
                         "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test acc" in printed and "ssa" in printed and "bp" in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == ["ssa", "bp"] and config["epochs"] == 2
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == ["ssa", "bp"]
    for r in results:
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["test_top5"] <= 1 and r["params"] > 0 and r["epochs"] == 2
    assert results[0]["ranks"] and results[1]["ranks"] == {}
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert header[:8] == ["method", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5",
                          "time_s"]
    assert header[8:] == ["rank/1", "rank/3", "rank/5", "ortho/1", "ortho/3", "ortho/5"]  # model order
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [(r["method"], r["epoch"]) for r in rows] == [("ssa", "1"), ("ssa", "2"), ("bp", "1"), ("bp", "2")]
    assert rows[0]["rank/1"] and rows[2]["rank/1"] == ""
    assert int(rows[1]["rank/3"]) < 256  # the schedule cut after epoch 2 (interval 1)
    for name in ("curves.png", "ranks.png", "ortho.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    for method in ("ssa", "bp"):
        assert (out / method / "latest.pt").exists() and (out / method / "best.pt").exists()


def test_resume_runs_only_the_missing_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "ssa", "--quiet", "--no-plots", "--out", str(out)]
    ssa.cli.main(args + ["--epochs", "1"])
    ssa.cli.main(args + ["--epochs", "2", "--resume"])
    results = json.loads((out / "results.json").read_text())
    assert results[0]["epochs"] == 2


@pytest.mark.parametrize("argv", [["train", "--method", "sgd"], ["train", "--model", "resnet999"],
                                  ["train", "--dataset", "imagenet42"], ["train", "--epochs", "0"],
                                  ["train", "--method", "ssa,ssa"], ["fly"],
                                  ["train", "--lr-milestones", "0"], ["train", "--lr-milestones", "ten"],
                                  ["train", "--lr-gamma", "-1"], ["compare"],
                                  ["compare", "--config", "configs/digits_mlp.yaml", "--epochs", "0"],
                                  ["compare", "--config", "configs/digits_mlp.yaml", "--seeds", "x"]])
def test_bad_arguments_exit_with_code_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        ssa.cli.main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["lenet", "resnet20"])
def test_convnets_are_selectable(tmp_path, capsys, model):
    out = tmp_path / model
    assert ssa.cli.main(["train", "--model", model, "--method", "ssa", "--epochs", "1", "--batch-size", "128",
                         "--lr-milestones", "1", "--quiet", "--no-plots", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())[0]
    assert result["method"] == "ssa" and 0 <= result["test_acc"] <= 1
    assert len(result["ranks"]) == {"lenet": 5, "resnet20": 22}[model]  # every conv and linear layer is SSA
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == model and config["lr_milestones"] == [1]


def test_train_uses_the_library_defaults_and_the_new_options(tmp_path, monkeypatch):
    made = []
    real = ssa.cli.Trainer

    def spy(*args, **kwargs):
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssa.cli, "Trainer", spy)
    out = tmp_path / "run"
    ssa.cli.main(["train", "--method", "ssa,dfa", "--epochs", "1", "--quiet", "--no-plots",
                  "--out", str(out)])
    # RankSchedule.default, made by fit; dfa takes no schedule
    assert made[0]["schedule"] == "default" and made[1].get("schedule") is None
    assert made[0]["loss"] == ssa.LossConfig() and made[0]["lr"] == 1e-3
    made.clear()
    ssa.cli.main(["train", "--method", "ssa", "--epochs", "1", "--quiet", "--no-plots", "--targets",
                  "frame", "--output-layer", "dense", "--interval", "1", "--stop-epoch", "1",
                  "--out", str(tmp_path / "b")])
    kw = made[0]
    assert kw["loss"].targets == "frame" and kw["output_layer"] == "dense"
    assert kw["schedule"] == ssa.RankSchedule(1, interval=1, stop_epoch=1)
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert "5" not in results[0]["ranks"]  # the output layer stayed dense


# ---------------------------------------------------------------------------- resume, overwrite, bad numbers
def _main_exit(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        ssa.cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    return err


def test_resume_refuses_settings_that_differ_from_the_recorded_run(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--method", "ssa", "--epochs", "1", "--quiet", "--no-plots", "--out", str(out)]
    ssa.cli.main(base)
    record = (out / "config.yaml").read_text()
    checkpoint = (out / "ssa" / "latest.pt").read_bytes()
    err = _main_exit(base + ["--resume", "--lr", "0.5", "--no-schedule", "--seed", "3"], capsys)
    assert str(out / "config.yaml") in err
    assert "--lr: recorded 0.001, now 0.5" in err and "--schedule: recorded True, now False" in err
    assert "--seed: recorded 0, now 3" in err and "--overwrite" in err
    err = _main_exit(["train", "--method", "ssa,bp", "--epochs", "1", "--out", str(out), "--resume"], capsys)
    assert "--method: recorded ['ssa'], now ['ssa', 'bp']" in err
    err = _main_exit(["train", "--epochs", "0", "--out", str(out), "--resume"], capsys)  # parser: >= 1
    (out / "config.yaml").write_text(record.replace("epochs: 1", "epochs: 3"))
    err = _main_exit(["train", "--epochs", "2", "--out", str(out), "--resume"], capsys)
    assert "--epochs: recorded 3, now 2 (a resume can only add epochs)" in err
    (out / "config.yaml").write_text(record)
    assert (out / "ssa" / "latest.pt").read_bytes() == checkpoint  # nothing was touched


def test_resume_takes_the_settings_not_given_from_the_record(tmp_path, monkeypatch, capsys):
    made = []
    real = ssa.cli.Trainer
    monkeypatch.setattr(ssa.cli, "Trainer", lambda *a, **kw: made.append(kw) or real(*a, **kw))
    out = tmp_path / "run"
    ssa.cli.main(["train", "--method", "ssa", "--epochs", "1", "--lr", "0.002", "--seed", "3", "--batch-size",
                  "128", "--no-schedule", "--quiet", "--no-plots", "--out", str(out)])
    ssa.cli.main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet", "--no-plots",
                  "--lr", "2e-3"])  # given and equal: fine
    assert made[1]["lr"] == 0.002 and made[1]["seed"] == 3 and made[1]["schedule"] is None
    config = yaml.safe_load((out / "config.yaml").read_text())  # what ran
    assert (config["lr"], config["seed"], config["batch_size"], config["epochs"]) == (0.002, 3, 128, 2)
    assert config["method"] == ["ssa"] and config["schedule"] is False
    assert json.loads((out / "results.json").read_text())[0]["epochs"] == 2
    # --device, --memory, --backend may change; a resume with nothing to resume starts from scratch
    ssa.cli.main(["train", "--out", str(out), "--resume", "--memory", "recompute", "--quiet", "--no-plots"])
    fresh = tmp_path / "fresh"
    ssa.cli.main(["train", "--method", "bp", "--epochs", "1", "--out", str(fresh), "--resume", "--quiet",
                  "--no-plots"])
    assert "nothing recorded" in capsys.readouterr().err
    assert json.loads((fresh / "results.json").read_text())[0]["epochs"] == 1


def test_an_existing_output_folder_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--quiet", "--no-plots", "--out", str(out)]
    ssa.cli.main(args + ["--method", "dfa"])
    before = (out / "results.json").read_text()
    err = _main_exit(args + ["--method", "bp"], capsys)
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert (out / "results.json").read_text() == before
    _main_exit(args + ["--method", "bp", "--resume", "--overwrite"], capsys)  # not both
    (out / "mine.txt").write_text("kept")
    (out / ".results.json.x1y2.tmp").write_text("")  # temporaries a killed write left behind
    (out / "dfa" / ".latest.pt.z3.tmp").write_bytes(b"")
    ssa.cli.main(args + ["--method", "bp", "--overwrite"])
    assert not (out / "dfa").exists()  # the earlier run's checkpoints are gone, not resumed later
    assert not (out / ".results.json.x1y2.tmp").exists()
    assert (out / "bp" / "latest.pt").exists() and (out / "mine.txt").read_text() == "kept"
    assert [r["method"] for r in json.loads((out / "results.json").read_text())] == ["bp"]
    (tmp_path / "file").write_text("")
    assert "is a file" in _main_exit(["train", "--out", str(tmp_path / "file")], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    ssa.cli.main(args[:-1] + [str(empty), "--method", "bp"])  # an empty folder is fine


@pytest.mark.parametrize("argv", [
    ["train", "--lr", "nan"], ["train", "--lr", "inf"], ["train", "--lr", "-1"], ["train", "--lr", "0"],
    ["train", "--lr", "1e400"], ["train", "--lr-gamma", "nan"], ["train", "--lr-gamma", "-inf"],
    ["train", "--seed", "-1"], ["train", "--seed", str(2**32)], ["train", "--seed", "1.5"],
    ["train", "--batch-size", "0"], ["train", "--batch-size", "-4"], ["train", "--epochs", "-3"],
    ["train", "--epochs", "2.5"], ["train", "--rank", "0"], ["train", "--interval", "0"],
    ["train", "--stop-epoch", "-1"], ["train", "--lr-milestones", "3,2"], ["train", "--lr-milestones", "2,2"],
    ["train", "--device", "gpu7"],
    ["compare", "--config", "configs/digits_mlp.yaml", "--seeds", "-1"],
    ["compare", "--config", "configs/digits_mlp.yaml", "--seeds", "0,0"],
    ["compare", "--config", "configs/digits_mlp.yaml", "--seeds", str(2**40)],
    ["compare", "--config", "configs/digits_mlp.yaml", "--device", "gpu7"],
    ["compare", "--config", "configs/digits_mlp.yaml", "--resume", "--overwrite"],
])
def test_bad_numbers_exit_with_code_2_before_writing(argv, tmp_path, capsys):
    out = tmp_path / "out"
    _main_exit(argv + ["--out", str(out)], capsys)
    assert not out.exists()


def test_train_routes_each_option_to_the_methods_it_applies_to(tmp_path):
    """--rank and --memory apply to ssa only: bp and fa run without them instead of refusing."""
    out = tmp_path / "r"
    ssa.cli.main(["train", "--method", "ssa,bp,fa", "--epochs", "1", "--quiet", "--no-plots", "--rank", "4",
                  "--memory", "recompute", "--out", str(out)])
    results = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(results) == {"ssa", "bp", "fa"} and max(results["ssa"]["ranks"].values()) <= 4
