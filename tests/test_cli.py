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
    assert made[0]["schedule"] == "default" and made[1]["schedule"] is None  # RankSchedule.default, by fit
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
