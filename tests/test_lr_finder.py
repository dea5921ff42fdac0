"""The learning-rate range test: the curve it records, its suggestion, and the command."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from imgcls.cli import main
from imgcls.config import load_config
from imgcls.errors import ImgclsError
from imgcls.lr_finder import find_learning_rate, smooth, suggest_steepest, suggest_valley

FAST = ["model.name=small_resnet", "data.image_size=32", "train.batch_size=16", "seed=0", "data.augment=none"]


def test_smoothing_is_debiased():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull toward 0 at the start


def test_valley_and_steepest_on_a_known_curve():
    learning_rates = np.logspace(-6, 1, 71).tolist()  # 10 points per decade
    log_lr = np.log10(learning_rates)
    # flat at 2.3 up to 1e-4, falling until 1e-1, then exploding
    losses = [2.3 if x < -4 else 2.3 - 0.6 * (x + 4) if x < -1 else 0.5 + 5 * (x + 1) for x in log_lr]
    valley = learning_rates[suggest_valley(losses)]
    assert 1e-4 < valley < 1e-1  # inside the falling stretch, before the minimum
    assert valley < learning_rates[int(np.argmin(losses))]
    losses_with_a_cliff = [2.3 if x < -3 else 0.3 if x < -2.9 else 0.25 for x in log_lr]
    assert learning_rates[suggest_steepest(learning_rates, losses_with_a_cliff)] == pytest.approx(1e-3, rel=0.3)


def test_range_test_on_images_writes_curve_plot_and_suggestion(shapes_folder, tmp_path):
    config = load_config(overrides=[f"data.path={shapes_folder}", f"run.dir={tmp_path}", *FAST])
    result = find_learning_rate(config, start_lr=1e-5, end_lr=1.0, steps=30)
    folder = tmp_path / "lr-find-shapes-small_resnet"
    assert result["folder"] == str(folder)
    with open(folder / "lr_find.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert 10 < len(rows) <= 30
    rates = [float(row["lr"]) for row in rows]
    assert rates[0] == pytest.approx(1e-5) and all(b / a == pytest.approx(10 ** (5 / 29)) for a, b in zip(rates, rates[1:]))
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    assert 1e-5 <= result["suggested_lr"] <= 1.0
    assert json.loads((folder / "lr_find.json").read_text())["suggested_lr"] == result["suggested_lr"]
    assert Image.open(folder / "lr_find.png").size[0] > 300
    assert (folder / "config.yaml").exists()


def test_a_diverging_loss_stops_the_test_early(shapes_folder, tmp_path):
    config = load_config(overrides=[f"data.path={shapes_folder}", f"run.dir={tmp_path}", *FAST, "optim.name=sgd"])
    result = find_learning_rate(config, start_lr=1e-2, end_lr=1e6, steps=60)
    assert result["steps"] < 60


def test_bad_range_is_refused(tmp_path):
    config = load_config(overrides=[f"run.dir={tmp_path}", "data.path=digits"])
    with pytest.raises(ImgclsError, match="start learning rate"):
        find_learning_rate(config, start_lr=1.0, end_lr=1e-3)


def test_command_prints_the_suggestion_as_an_override(shapes_folder, tmp_path, capsys):
    code = main(["lr-find", str(shapes_folder), f"run.dir={tmp_path}", *FAST, "--steps", "20", "--start", "1e-4",
                 "--end", "1"])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("optim.lr=")
    load_config(overrides=[line])  # the printed line is a valid override
