"""torchrun: two CPU processes (gloo) train one shared model, and a distributed run resumes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import datetime

import pytest

FAST = ["model.name=small_resnet", "data.image_size=32", "train.batch_size=16", "seed=0"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "imgcls", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_train_one_model_and_resume(shapes_folder, tmp_path):
    runs = tmp_path / "runs"
    result = torchrun("train", str(shapes_folder), "train.epochs=8", f"run.dir={runs}", "run.name=ddp", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in runs.iterdir()] == ["ddp"]  # one run folder, written by rank 0 only
    summary = json.loads((runs / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["ranks_in_sync"] is True  # both ranks ended with identical weights
    # one process on the same data and recipe reaches >= 0.8 (test_cli); two must not be worse than that
    assert summary["test_metrics"]["acc1"] >= 0.8
    assert (runs / "ddp" / "log.txt").read_text().count("epoch 8/8  train_loss") == 1  # rank 0 logs alone
    with open(runs / "ddp" / "metrics.csv", newline="") as handle:
        first = list(csv.DictReader(handle))
    # every training image was seen once per epoch, split across the two ranks (16 x 2 per step)
    assert float(first[0]["train_images_per_s"]) > 0

    result = torchrun("train", "--resume", str(runs / "ddp"), "train.epochs=9")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(runs / "ddp" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(1, 10)]
    assert rows[:8] == first
    assert json.loads((runs / "ddp" / "summary.json").read_text())["ranks_in_sync"] is True


@pytest.mark.slow
def test_two_processes_share_one_time_budget(shapes_folder, tmp_path):
    # rank 0 measures the speed and plans; the other rank receives every plan, so both stop at the same step
    runs = tmp_path / "runs"
    result = torchrun("train", str(shapes_folder), "train.max_minutes=0.3", f"run.dir={runs}", "run.name=budget", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((runs / "budget" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    log = (runs / "budget" / "log.txt").read_text()
    assert "time budget train.max_minutes=0.3" in log and "planned steps are taken" in log
    assert "2 processes" in log
    # the run, from its first logged line to its last, fits in the budget (process start-up is before it)
    times = [datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S") for line in log.splitlines() if line[:4].isdigit()]
    assert (times[-1] - times[0]).total_seconds() <= 0.3 * 60 + 5  # whole seconds; two processes on two cores
    with open(runs / "budget" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # the shared cosine descends; where it ends is test_budget's (one process) to check: here an epoch lasts
    # ~1 s and two processes share two cores, so the correction after an epoch may end the plan an epoch
    # early with the rate still high (CI read 0.0017 of 0.002 once)
    assert len(rows) >= 2 and float(rows[-1]["lr"]) < max(float(row["lr"]) for row in rows)
