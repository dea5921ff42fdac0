"""imgcls sweep, cv and tune on a tiny generated image folder: real runs, resumed, in parallel."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import imgcls
from imgcls.cli import main
from imgcls.config import load_config
from imgcls.errors import ImgclsError
from imgcls.runner import worker_slots
from imgcls.sweeps import load_search_space, parse_grid, plan_sweep

FAST = ["model.name=small_resnet", "data.image_size=32", "train.batch_size=16", "data.augment=none",
        "train.calibrate=false", "tracking.tensorboard=false"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_grid_axes_are_comma_values_and_runs_are_named_by_them():
    fixed, grid = parse_grid(["train.epochs=2", "optim.lr=1e-3,3e-4", "data.augment=none,light", "x=[1,2]"])
    assert fixed == ["train.epochs=2", "x=[1,2]"]
    assert grid == {"optim.lr": ["1e-3", "3e-4"], "data.augment": ["none", "light"]}
    runs = plan_sweep(grid, [1, 2])
    assert len(runs) == 8 and len({run.name for run in runs}) == 8
    assert runs[0].name == "optim.lr=1e-3_data.augment=none_seed=1"
    assert runs[0].overrides == ["optim.lr=1e-3", "data.augment=none", "seed=1"]
    assert [run.name for run in plan_sweep({}, [5])] == ["seed=5"]


def test_a_bad_grid_value_fails_before_any_training(shapes_folder, tmp_path, capsys):
    code = main(["sweep", str(shapes_folder), f"run.dir={tmp_path}", "optim.name=adamw,adamx", "--seeds", "1"])
    assert code == 2
    assert "optim.name" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def test_sweep_trains_every_combination_then_resumes_without_redoing_finished_runs(shapes_folder, tmp_path):
    arguments = ["sweep", str(shapes_folder), f"run.dir={tmp_path}", "train.epochs=2", *FAST,
                 "optim.lr=0.003,0.0003", "--seeds", "0", "--name", "lr"]
    assert main(arguments) == 0
    folder = tmp_path / "sweeps" / "lr"
    runs = sorted(path.name for path in folder.iterdir() if (path / "config.yaml").exists())
    assert runs == ["optim.lr=0.0003_seed=0", "optim.lr=0.003_seed=0"]
    assert all(json.loads((folder / run / "summary.json").read_text())["status"] == "completed" for run in runs)
    assert (folder / "comparison.csv").is_file() and (folder / "comparison.md").is_file()
    kept, interrupted = folder / runs[0], folder / runs[1]
    kept_mtime = (kept / "metrics.csv").stat().st_mtime_ns

    # make the second run an interrupted one: stopped after epoch 1, with its checkpoint
    def interrupt(epoch: int, row: dict) -> None:
        raise KeyboardInterrupt

    base = load_config(folder / "base.yaml", ["optim.lr=0.003", "seed=0", f"run.dir={folder}", f"run.name={runs[1]}"])
    with pytest.raises(KeyboardInterrupt):
        imgcls.train(base, force=True, on_epoch=interrupt)
    assert json.loads((interrupted / "summary.json").read_text())["status"] == "interrupted"

    assert main(arguments) == 0  # the same command again (same --name): resumes
    assert (kept / "metrics.csv").stat().st_mtime_ns == kept_mtime  # a finished run is never redone
    assert "resumed after epoch 1" in (interrupted / "log.txt").read_text()
    assert [row["epoch"] for row in read_csv(interrupted / "metrics.csv")] == ["1", "2"]
    assert json.loads((interrupted / "summary.json").read_text())["status"] == "completed"


def test_the_same_name_with_another_plan_is_refused(shapes_folder, tmp_path, capsys):
    common = ["sweep", str(shapes_folder), f"run.dir={tmp_path}", "train.epochs=1", *FAST, "--name", "s"]
    assert main([*common, "--seeds", "0"]) == 0
    console = capsys.readouterr().err
    assert "seed=0: completed, test acc1" in console  # one line per run ...
    assert "precision" not in console and "epoch 1/1" not in console  # ... not its whole log
    assert "epoch 1/1" in (tmp_path / "sweeps" / "s" / "seed=0" / "log.txt").read_text()
    assert main([*common, "--seeds", "0,1"]) == 2
    assert "holds a different sweeps" in capsys.readouterr().err


def test_parallel_jobs_pin_each_run_to_its_own_cores(shapes_folder, tmp_path):
    if len(worker_slots(1)[0]["cores"]) < 2:
        pytest.skip("needs 2 CPU cores")
    assert main(["sweep", str(shapes_folder), f"run.dir={tmp_path}", "train.epochs=1", *FAST,
                 "--seeds", "0,1", "--jobs", "2", "--name", "parallel"]) == 0
    folder = tmp_path / "sweeps" / "parallel"
    for run in ("seed=0", "seed=1"):
        assert json.loads((folder / run / "summary.json").read_text())["status"] == "completed"
        # 2 processes on 2 cores: one intra-op thread each, no oversubscription
        assert json.loads((folder / run / "env.json").read_text())["cpu_threads"] == 1
        assert (folder / "logs" / f"{run}.txt").is_file()


def test_more_jobs_than_cores_is_a_clear_error():
    with pytest.raises(ImgclsError, match="--jobs"):
        worker_slots(10_000)


def test_cross_validation_predicts_every_training_image_once_out_of_fold(shapes_folder, tmp_path):
    assert main(["cv", str(shapes_folder), f"run.dir={tmp_path}", "train.epochs=1", *FAST, "--folds", "3",
                 "--name", "cv3"]) == 0
    folder = tmp_path / "cv" / "cv3"
    oof = read_csv(folder / "oof_predictions.csv")
    splits = read_csv(folder / "fold-1" / "splits.csv")
    pool = {row["path"] for row in splits if row["split"] in ("train", "val")}
    assert sorted(row["path"] for row in oof) == sorted(pool)  # each training image exactly once
    assert {row["fold"] for row in oof} == {"1", "2", "3"}
    for row in oof[:5]:
        probabilities = [float(value) for key, value in row.items() if key.startswith("prob_")]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4) and len(probabilities) == 3
    test_images = {row["path"] for row in splits if row["split"] == "test"}
    assert test_images and not test_images & pool  # the test split stays out of every fold
    summary = json.loads((folder / "cv_summary.json").read_text())
    assert len(summary["folds"]) == 3 and summary["mean_std"]["val_acc1"]["std"] is not None
    # a fold's saved config trains again as it is
    assert main(["train", "-c", str(folder / "fold-2" / "config.yaml"), "run.name=again", f"run.dir={tmp_path}"]) == 0


def test_tune_searches_resumes_and_writes_a_config_train_accepts(shapes_folder, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\ndata.augment: [none, light]\n")
    arguments = ["tune", str(shapes_folder), f"run.dir={tmp_path}", "train.epochs=2", *FAST[:3],
                 "train.calibrate=false", "--trials", "3", "--space", str(space), "--name", "t"]
    assert main(arguments) == 0
    folder = tmp_path / "tune" / "t"
    trials = read_csv(folder / "trials.csv")
    assert len(trials) == 3 and all(0.0001 <= float(row["optim.lr"]) <= 0.01 for row in trials)
    assert (folder / "study.db").is_file()
    assert main(["tune", "--resume", str(folder)]) == 0  # all trials done: nothing new
    assert len(read_csv(folder / "trials.csv")) == 3
    best = load_config(folder / "best_config.yaml")
    assert best.data.path == str(shapes_folder) and best.run.name is None
    assert main(["train", "-c", str(folder / "best_config.yaml"), f"run.dir={tmp_path}", "train.epochs=1"]) == 0


def test_a_pruned_trial_stops_its_run_and_marks_it(shapes_folder, tmp_path):
    import optuna

    from imgcls.config import save_config
    from imgcls.sweeps import _objective

    base = tmp_path / "base.yaml"
    save_config(load_config(overrides=[f"data.path={shapes_folder}", "train.epochs=3", *FAST]), base)
    # a threshold no model reaches after its first epoch: the trial must be pruned there
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    study.optimize(_objective(base, tmp_path, [], {"optim.lr": [0.002]}, "val_acc1"), n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    summary = json.loads((tmp_path / "trial-000" / "summary.json").read_text())
    assert summary["status"] == "stopped" and "pruned" in summary["error"]
    assert len(read_csv(tmp_path / "trial-000" / "metrics.csv")) == 1


def test_search_space_errors_name_the_key(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lrr: {low: 1, high: 2}\n")
    with pytest.raises(ImgclsError, match="optim.lrr.*optim.lr"):
        load_search_space(str(space))
    space.write_text("optim.lr: 0.1\n")
    with pytest.raises(ImgclsError, match="list of choices"):
        load_search_space(str(space))


def test_parallel_tune_workers_share_the_study_without_repeating_trials(shapes_folder, tmp_path):
    if len(worker_slots(1)[0]["cores"]) < 2:
        pytest.skip("needs 2 CPU cores")
    assert main(["tune", str(shapes_folder), f"run.dir={tmp_path}", "train.epochs=1", *FAST[:3],
                 "train.calibrate=false", "--trials", "4", "--jobs", "2", "--name", "pj"]) == 0
    folder = tmp_path / "tune" / "pj"
    trials = read_csv(folder / "trials.csv")
    assert len(trials) == 4  # each worker runs its share: no surplus trial
    assert len({row["optim.lr"] for row in trials}) == 4  # each worker its own sampler seed
    assert {path.name for path in (folder / "logs").iterdir()} == {"worker-1.txt", "worker-2.txt"}
