"""Nothing lost, nothing silent: run folders stay inside run.dir, a kill at any instant leaves a
consistent checkpoint set that resumes to the uninterrupted result, a diverging loss stops the run
and keeps the last good model, a full disk is one sentence, a run whose process died reads as
interrupted, and training beside a busy program uses only the free cores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import imgcls
from imgcls.checkpoint import CheckpointSet, load_artifact, load_checkpoint
from imgcls.cli import main
from imgcls.config import load_config
from imgcls.tracking import create_run_dir, process_identity, read_summary, update_summary
from imgcls.training import is_improvement

TINY = ["model.name=small_resnet", "data.image_size=16", "train.batch_size=16", "seed=0", "data.augment=none"]
KILL_AT = str(Path(__file__).with_name("kill_at.py"))


def read_metrics(run: Path) -> list[dict[str, str]]:
    import csv

    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# --- run.name stays inside run.dir; --force replaces only run folders ---------------------------

@pytest.mark.parametrize("name", ["../victim", ".", "..", "/tmp/elsewhere", "a/b", "..\\victim"])
def test_a_run_name_must_be_one_folder_name(name):
    with pytest.raises(imgcls.ImgclsError, match="run.name"):
        load_config(overrides=[f"run.name={name}"])


def test_force_never_deletes_what_a_run_name_points_outside_of(shapes_folder, tmp_path, capsys):
    runs, victim = tmp_path / "X" / "runs", tmp_path / "X" / "victim"
    victim.mkdir(parents=True)
    (victim / "thesis.tex").write_text("years of work")
    (runs / "other-run").mkdir(parents=True)
    (runs / "other-run" / "summary.json").write_text("{}")
    for name in ("../victim", ".", ".."):
        code = main(["train", str(shapes_folder), f"run.dir={runs}", f"run.name={name}", *TINY, "--force"])
        assert code == 2
        assert "run.name" in capsys.readouterr().err
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert (runs / "other-run" / "summary.json").exists()
    with pytest.raises(imgcls.ImgclsError, match="one folder name"):  # the Python API checks too
        create_run_dir(runs, "../../escape", "x", force=True)
    assert not (tmp_path / "escape").exists()


def test_force_replaces_run_folders_and_empty_ones_only(tmp_path):
    runs = tmp_path / "runs"
    user_folder = runs / "notes"
    user_folder.mkdir(parents=True)
    (user_folder / "todo.txt").write_text("keep me")
    with pytest.raises(imgcls.ImgclsError, match="not an imgcls run folder"):
        create_run_dir(runs, "notes", "x", force=True)
    assert (user_folder / "todo.txt").read_text() == "keep me"

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.csv").write_text("1,2")
    (runs / "link").symlink_to(outside)
    with pytest.raises(imgcls.ImgclsError, match="not a folder"):
        create_run_dir(runs, "link", "x", force=True)
    assert (outside / "data.csv").exists()

    old_run = create_run_dir(runs, "baseline", "x")
    update_summary(old_run, status="completed")
    (old_run / "metrics.csv").write_text("epoch\n1\n")
    assert create_run_dir(runs, "baseline", "x", force=True) == old_run
    assert list(old_run.iterdir()) == []  # replaced by a fresh folder
    (runs / "empty").mkdir()
    assert create_run_dir(runs, "empty", "x", force=True).is_dir()


# --- a kill at any instant ------------------------------------------------------------------------

def run_cli(*arguments: str, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    prefix = [sys.executable, KILL_AT, kill[0], str(kill[1])] if kill else [sys.executable, "-m", "imgcls"]
    return subprocess.run([*prefix, *arguments], capture_output=True, text=True, timeout=300)


def improvements(run: Path, monitor: str = "val_acc1") -> int:
    """How many epochs were the best so far (each wrote best.ckpt and model.safetensors)."""
    best, count = None, 0
    for row in read_metrics(run):
        if is_improvement(float(row[monitor]), best, monitor):
            best, count = float(row[monitor]), count + 1
    return count


def assert_consistent(run: Path) -> None:
    """The artifact holds the weights of the best epoch that summary.json and last.ckpt name."""
    summary = read_summary(run)
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    _, metadata = load_artifact(run / "checkpoints" / "model.safetensors")
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert summary["best_epoch"] == last["best_epoch"] == metadata["epoch"] == best["epoch"]


@pytest.mark.slow
def test_a_kill_at_every_write_boundary_resumes_to_the_uninterrupted_result(shapes_folder, tmp_path):
    runs = tmp_path / "runs"
    common = ["train", str(shapes_folder), "train.epochs=3", "train.deterministic=true", f"run.dir={runs}", *TINY]
    straight = run_cli(*common, "run.name=straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    reference = read_summary(runs / "straight")
    # resumed runs are compared bit for bit: a deterministic run never re-sizes its threads
    assert "deterministic" in json.loads((runs / "straight" / "env.json").read_text())["cpu_thread_policy"]
    best_writes = improvements(runs / "straight")  # the last of these is the final best epoch
    reference_weights = load_file(runs / "straight" / "checkpoints" / "model.safetensors")

    kill_points = {
        "before-the-splits-are-saved": ("imgcls.training:write_splits_csv", 1),
        "before-first-checkpoint": ("last.ckpt", 1),
        "after-last-before-best": ("best.ckpt", best_writes),  # the reported bug: the artifact lagged
        "after-best-before-artifact": ("model.safetensors", best_writes),
        "after-the-final-epoch": ("imgcls.training:calibrate", 1),
        "during-the-final-evaluation": ("imgcls.training:evaluate", 1),
    }
    for name, kill in kill_points.items():
        killed = run_cli(*common, f"run.name={name}", kill=kill)
        assert killed.returncode == -9, (name, killed.stderr[-2000:])
        # its process is gone: interrupted, not running forever
        assert read_summary(runs / name)["status"] == "interrupted", name
        resumed = run_cli("train", "--resume", str(runs / name))
        assert resumed.returncode == 0, (name, resumed.stderr[-2000:])
        summary = read_summary(runs / name)
        assert summary["status"] == "completed", name
        assert summary["test_metrics"] == reference["test_metrics"], name
        assert summary["best_epoch"] == reference["best_epoch"], name
        assert_consistent(runs / name)
        weights = load_file(runs / name / "checkpoints" / "model.safetensors")
        assert all(torch.equal(weights[key], reference_weights[key]) for key in weights), name
        _, metadata = load_artifact(runs / name / "checkpoints" / "model.safetensors")
        assert "temperature" in metadata["calibration"], name
        assert len(read_metrics(runs / name)) == 3, name


def test_repair_rewrites_the_files_that_lag_behind_last_ckpt(shapes_folder, tmp_path):
    """The set as a kill after last.ckpt leaves it: best.ckpt and the artifact one best epoch behind."""
    run = imgcls.train(load_config(overrides=[f"data.path={shapes_folder}", "train.epochs=1", f"run.dir={tmp_path}", *TINY]))
    checkpoints = CheckpointSet(run / "checkpoints")
    record = load_checkpoint(checkpoints.last)
    assert checkpoints.repair(record) == []  # consistent: nothing to do
    lagging = {**record, "epoch": 0}
    torch.save(lagging, checkpoints.best)
    state_dict, metadata = load_artifact(checkpoints.artifact)
    imgcls.checkpoint.save_artifact(checkpoints.artifact, {k: v * 0 for k, v in state_dict.items()}, {**metadata, "epoch": 0})
    assert checkpoints.repair(record) == ["best.ckpt", "model.safetensors"]
    weights, metadata = load_artifact(checkpoints.artifact)
    assert metadata["epoch"] == 1
    assert all(torch.equal(weights[key], record["model"][key]) for key in weights)


# --- a diverging loss ---------------------------------------------------------------------------

def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_model(shapes_folder, tmp_path, capsys):
    # a sane rate in epoch 1, then x1e12 from epoch 2 on: the loss becomes NaN in epoch 2
    overrides = [str(shapes_folder), "train.epochs=3", "optim.scheduler=step", "optim.step_epochs=1",
                 "optim.gamma=1e12", "optim.lr=1e-3", f"run.dir={tmp_path}", "run.name=diverged", *TINY]
    assert main(["train", *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    print("\n".join(lines))
    error = [line for line in lines if "error:" in line or "Traceback" in line]
    assert len(error) == 1 and "training diverged in epoch 2/3" in error[0] and "optim.lr" in error[0], error
    run = tmp_path / "diverged"
    summary = read_summary(run)
    assert summary["status"] == "failed" and "diverged" in summary["error"]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1
    weights, metadata = load_artifact(run / "checkpoints" / "model.safetensors")
    assert metadata["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in weights.values())
    assert len(read_metrics(run)) == 1
    # the threads and how they were chosen are on record
    assert int(read_metrics(run)[0]["cpu_threads"]) >= 1
    assert "free cores" in json.loads((run / "env.json").read_text())["cpu_thread_policy"]


def test_an_infinite_learning_rate_is_a_config_error():
    for value in ("inf", "nan", "-1"):
        with pytest.raises(imgcls.ImgclsError, match="optim.lr"):
            load_config(overrides=[f"optim.lr={value}"])


def test_fp16_loss_scaling_that_gave_up_stops_training():
    from imgcls.training import TrainingDiverged, check_finite

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-20)
    with pytest.raises(TrainingDiverged, match="loss scaling gave up"):
        check_finite(10, 10, scaler, optimizer, None, "epoch 1/1")
    check_finite(10, 10, torch.amp.GradScaler("cpu"), optimizer, None, "epoch 1/1")  # healthy: no error
    with pytest.raises(TrainingDiverged, match="step 4 of 10"):
        check_finite(3, 10, torch.amp.GradScaler("cpu"), optimizer, None, "epoch 1/1")
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="weights became NaN"):
        check_finite(10, 10, torch.amp.GradScaler("cpu"), optimizer, 1.0, "epoch 1/1", model)


# --- a run whose process is gone ------------------------------------------------------------------

def test_running_with_a_dead_process_reads_as_interrupted_and_a_live_one_refuses_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        update_summary(run, status="running", **process_identity(sleeper.pid))
        assert read_summary(run)["status"] == "running"
        with pytest.raises(imgcls.ImgclsError, match="still being trained"):
            imgcls.train(resume=run)
    finally:
        sleeper.kill()
        sleeper.wait()
    summary = read_summary(run)
    assert summary["status"] == "interrupted" and "--resume" in summary["error"]
    # a summary from another machine cannot be checked from here: still running, resume needs --force
    update_summary(run, status="running", pid=1, host="elsewhere", process_started="1")
    assert read_summary(run)["status"] == "running"
    with pytest.raises(imgcls.ImgclsError, match="--force"):
        imgcls.train(resume=run)


# --- a full disk --------------------------------------------------------------------------------

def test_a_full_disk_is_one_sentence_keeps_the_last_checkpoint_and_resumes(shapes_folder, tmp_path, small_disk, capsys):
    common = [str(shapes_folder), "train.epochs=3", "train.deterministic=true", *TINY]
    # how much one epoch leaves on disk, measured on a big disk: the small one holds that and half of
    # the next last.ckpt, so the second epoch's checkpoint cannot be written
    probe = imgcls.train(load_config(overrides=[f"data.path={shapes_folder}", "train.epochs=1", "train.calibrate=false",
                                                f"run.dir={tmp_path}", "run.name=probe", *TINY]))
    epoch_files = sum(path.stat().st_size for path in (probe / "checkpoints").iterdir())
    last_size = (probe / "checkpoints" / "last.ckpt").stat().st_size
    disk = small_disk((epoch_files + last_size // 2) // 1024 + 64)
    runs = disk / "runs"
    assert main(["train", *common, f"run.dir={runs}", "run.name=full"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # "error:" (the one-line error), not the analysis line that counts the model's errors on val
    errors = [line for line in lines if "error:" in line or "Traceback" in line]
    assert len(errors) == 1, lines
    message = errors[0]
    assert "no space left on the device while writing last.ckpt" in message, message
    assert f"to {runs / 'full' / 'checkpoints'} (" in message and "MiB free" in message, message
    assert f"imgcls train --resume {runs / 'full'}" in message, message
    # the previous checkpoint stays valid, and no temporary file is left behind
    assert load_checkpoint(runs / "full" / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert sorted(path.name for path in (runs / "full" / "checkpoints").iterdir()) == \
        ["best.ckpt", "last.ckpt", "model.safetensors"]
    summary = read_summary(runs / "full")
    assert summary["status"] == "failed" and "no space left" in summary["error"]
    # space freed (the disk made bigger): the run resumes and completes
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    assert main(["train", "--resume", str(runs / "full")]) == 0
    assert read_summary(runs / "full")["status"] == "completed"
    assert len(read_metrics(runs / "full")) == 3


# --- a shared machine ---------------------------------------------------------------------------

@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_follow_the_free_cores_beside_busy_programs(restore_threads, monkeypatch):
    from imgcls.runtime import CoreShare, usable_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(usable_cores())
    share = CoreShare(every_seconds=0.5)
    assert share.threads == cores and "free cores" in share.policy
    # other programs, not children of this process (whose CPU time CoreShare counts as its own)
    started = [subprocess.run(["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                              capture_output=True, text=True, check=True) for _ in range(max(1, cores - 1))]
    busy = [int(result.stdout) for result in started]
    try:
        time.sleep(0.7)
        assert share.adjust() == 1, share.others  # every core but one taken, or the only one shared
        assert share.others > 0.5
    finally:
        for pid in busy:
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.7)
    assert share.adjust() == cores, share.others  # alone again: every core


def test_an_explicit_omp_num_threads_is_obeyed(restore_threads, monkeypatch):
    from imgcls.runtime import CoreShare

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    share = CoreShare(every_seconds=0.0)
    assert share.threads == 1 and share.adjust() == 1 and share.policy == "OMP_NUM_THREADS=1"


def test_deterministic_training_keeps_its_thread_count(restore_threads, monkeypatch):
    from imgcls.runtime import CoreShare

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = CoreShare(every_seconds=0.0)
    share.keep_fixed("train.deterministic=true (results depend on the thread count)")
    threads = share.threads
    assert share.adjust() == threads and "deterministic" in share.policy
