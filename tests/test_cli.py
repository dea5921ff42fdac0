"""The real command line end to end on a tiny generated image folder: train, eval, predict, re-run,
and the one-line errors a user sees for bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from imgcls.cli import main

FAST = ["model.name=small_resnet", "data.image_size=32", "train.batch_size=16", "seed=0"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def trained_run(shapes_folder, tmp_path_factory) -> Path:
    """One real training run shared by the tests of this module (about 10 s on 2 cores)."""
    runs = tmp_path_factory.mktemp("cli") / "runs"
    code = main(["train", str(shapes_folder), "train.epochs=8", f"run.dir={runs}", *FAST])
    assert code == 0
    (run,) = runs.iterdir()
    return run


def test_train_writes_a_complete_run_folder(trained_run):
    for name in ("config.yaml", "env.json", "log.txt", "metrics.csv", "summary.json", "splits.csv",
                 "checkpoints/last.ckpt", "checkpoints/best.ckpt", "checkpoints/model.safetensors",
                 "predictions_test.csv", "confusion_test.png", "confusion_test_normalized.png",
                 "classification_report_test.csv"):
        assert (trained_run / name).is_file(), name
    rows = read_csv(trained_run / "metrics.csv")
    assert len(rows) == 8
    for column in ("epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "epoch_seconds", "train_images_per_s"):
        assert column in rows[0]
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test_metrics"]["acc1"] >= 0.8  # 3 classes: chance is 0.33
    env = json.loads((trained_run / "env.json").read_text())
    assert env["versions"]["torch"] and env["command"]
    assert "epoch 8/8" in (trained_run / "log.txt").read_text()


def test_single_folder_split_is_stratified_and_saved(trained_run):
    rows = read_csv(trained_run / "splits.csv")
    by_split = {split: {row["label"] for row in rows if row["split"] == split} for split in ("train", "val", "test")}
    assert by_split["train"] == by_split["val"] == by_split["test"] == {"circle", "square", "triangle"}
    assert len(rows) == 120 and len({row["path"] for row in rows}) == 120


def test_eval_json_has_the_documented_keys(trained_run, capsys):
    assert main(["eval", str(trained_run), "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("acc1", "acc5", "loss", "balanced_acc", "macro_f1", "n"):
        assert key in metrics
    assert metrics["n"] == 12 and metrics["acc1"] >= 0.8
    assert metrics["acc5"] == 1.0  # k is clipped to the 3 classes
    predictions = read_csv(trained_run / "predictions_test.csv")
    assert {"path", "true", "predicted", "confidence"} <= set(predictions[0])


def test_eval_on_a_shifted_folder_with_the_same_classes(trained_run, shifted_folder, capsys):
    assert main(["eval", str(trained_run), "--data", str(shifted_folder), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 30
    assert (trained_run / "predictions_shifted_test.csv").is_file()


def test_eval_on_data_with_other_classes_is_a_clear_error(trained_run, tmp_path, capsys):
    from tests.conftest import write_class_folders

    other = write_class_folders(tmp_path / "other", per_class=2, seed=3)
    (other / "square").rename(other / "hexagon")
    assert main(["eval", str(trained_run), "--data", str(other)]) == 2
    error = capsys.readouterr().err
    assert "hexagon" in error and "Traceback" not in error


def test_predict_folder_to_csv_with_a_bad_file(trained_run, shapes_folder, tmp_path):
    images = tmp_path / "to_predict"
    images.mkdir()
    for path in sorted((shapes_folder / "circle").iterdir())[:3]:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(trained_run), str(images), "--out", str(out), "--topk", "2"]) == 0
    rows = read_csv(out)
    assert list(rows[0])[:3] == ["path", "label", "confidence"]
    assert {"label_1", "prob_1", "label_2", "prob_2", "error"} <= set(rows[0])
    broken = [row for row in rows if row["path"].endswith("broken.jpg")]
    assert len(rows) == 4 and broken[0]["error"] and not broken[0]["label"]
    good = [row for row in rows if not row["error"]]
    assert sum(row["label"] == "circle" for row in good) >= 2



def test_predict_exits_2_when_no_input_can_be_read(trained_run, tmp_path, capsys):
    images = tmp_path / "broken"
    images.mkdir()
    for name in ("a.jpg", "b.png"):
        (images / name).write_bytes(b"not an image")
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(trained_run), str(images), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("imgcls: error: none of the 2 files could be read") and error.count("\n") == 1
    assert not out.exists()
    assert main(["predict", str(trained_run), str(tmp_path / "nothing_*.jpg")]) == 2
    assert "no images found at" in capsys.readouterr().err

def test_predict_python_api_and_globs(trained_run, shapes_folder):
    import imgcls

    classifier = imgcls.load(trained_run)
    assert classifier.class_names == ["circle", "square", "triangle"]
    rows = classifier.predict(sorted((shapes_folder / "square").glob("*.png"))[:4], topk=3)
    assert all(0 <= row["confidence"] <= 1 for row in rows)
    assert abs(sum(row[f"prob_{k}"] for k in (1, 2, 3) for row in rows[:1]) - 1) < 1e-4
    from imgcls.prediction import expand_paths

    assert len(expand_paths([str(shapes_folder / "triangle" / "*.jpg")])) == 20


def test_saved_config_reruns_into_a_new_folder(trained_run, tmp_path):
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["model"]["name"] == "small_resnet" and config["data"]["image_size"] == 32
    assert config["run"]["name"] is None  # it was automatic: a re-run gets a new suffix, never this folder
    before = set(trained_run.parent.iterdir())
    assert main(["train", "-c", str(trained_run / "config.yaml"), "train.epochs=1"]) == 0
    (new,) = set(trained_run.parent.iterdir()) - before
    assert new.name == f"{trained_run.name}-2"


def test_existing_run_name_needs_force(shapes_folder, run_root, capsys):
    args = ["train", str(shapes_folder), "train.epochs=1", f"run.dir={run_root}", "run.name=mine", *FAST]
    assert main(args) == 0
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    # the README's way to continue a finished run for longer
    assert main(["train", "--resume", str(run_root / "mine"), "train.epochs=2"]) == 0
    assert len(read_csv(run_root / "mine" / "metrics.csv")) == 2



@pytest.mark.parametrize("command, options", [
    ("train", ["--force"]), ("cache", []), ("lr-find", ["--steps", "5"]),
    ("sweep", ["--seeds", "1,2", "--name", "s"]), ("cv", ["--folds", "3"]), ("tune", ["--trials", "2"]),
])
def test_options_data_and_overrides_in_any_order(command, options):
    from imgcls.cli import build_parser

    expected = vars(build_parser().parse_args([command, *options, "-c", "c.yaml", "DATA", "train.epochs=1", "seed=3"]))
    assert (expected["data"], expected["overrides"]) == ("DATA", ["train.epochs=1", "seed=3"])
    for argv in ([command, "DATA", *options, "train.epochs=1", "-c", "c.yaml", "seed=3"],
                 [command, "-c", "c.yaml", "train.epochs=1", *options, "seed=3", "DATA"],
                 [command, "train.epochs=1", "DATA", "seed=3", "-c", "c.yaml", *options]):
        assert vars(build_parser().parse_args(argv)) == expected, argv
    if command == "lr-find":  # DATA is required: an override does not stand in for it
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "-c", "c.yaml", "train.epochs=1"])
    else:  # DATA may come from the config file (or --resume)
        parsed = build_parser().parse_args([command, "-c", "c.yaml", "train.epochs=1", *options])
        assert (parsed.data, parsed.overrides) == (None, ["train.epochs=1"])


def test_train_with_options_before_and_after_the_overrides(shapes_folder, run_root, tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text("optim:\n  lr: 0.002\n")
    # plain argparse fills DATA and the overrides at DATA: "train.epochs=1" after --force was "unrecognized"
    assert main(["train", str(shapes_folder), "--force", "train.epochs=1", f"run.dir={run_root}", "run.name=mixed",
                 "-c", str(config), *FAST]) == 0
    saved = yaml.safe_load((run_root / "mixed" / "config.yaml").read_text())
    assert (saved["optim"]["lr"], saved["train"]["epochs"], saved["data"]["path"]) == (0.002, 1, str(shapes_folder))
    assert len(read_csv(run_root / "mixed" / "metrics.csv")) == 1


def test_a_bad_image_is_reported_once_per_run(run_root, tmp_path):
    from tests.conftest import write_class_folders

    folder = write_class_folders(tmp_path / "shapes", per_class=6, seed=2)
    (folder / "circle" / "broken.jpg").write_bytes(b"not an image")
    # training, calibration and the final evaluation each read the files: one warning all the same
    for name in ("first", "second"):  # and the next run in the same process warns again, in its own log
        assert main(["train", str(folder), "train.epochs=1", f"run.dir={run_root}", f"run.name={name}", *FAST]) == 0
        assert (run_root / name / "log.txt").read_text().count("unreadable image") == 1

@pytest.mark.parametrize("override, expected", [
    ("train.epoch=3", "did you mean 'train.epochs'"),
    ("optim.name=adam", "expected one of ['adamw', 'sgd']"),
    ("train.batch_size=big", "train.batch_size"),
    ("device=cuda:99", "device='cuda:99'"),
    ("train.precision=fp16 device=cpu", "fp16 is for GPUs"),
])
def test_bad_config_is_one_line_without_traceback(shapes_folder, run_root, capsys, override, expected):
    assert main(["train", str(shapes_folder), f"run.dir={run_root}", *override.split()]) == 2
    error = capsys.readouterr().err
    assert expected in error and "Traceback" not in error and error.count("\n") == 1
    assert not run_root.exists() or not any(run_root.iterdir())  # nothing half-created



def test_an_image_size_too_large_to_decode_is_one_line(shapes_folder, run_root, capsys):
    assert main(["train", str(shapes_folder), f"run.dir={run_root}", "model.name=small_resnet",
                 "data.image_size=100000", "train.epochs=1"]) == 2
    error = capsys.readouterr().err  # (run folder and data lines first, until config.py checks the size)
    assert error.splitlines()[-1] == ("imgcls: error: data.image_size=100000: decoding one image at that size takes "
                                      "27.9 GiB of memory; use at most 1024 (classifiers train at 224-600 px)")
    assert "unreadable" not in error and "Traceback" not in error

def test_missing_data_and_unknown_model(run_root, shapes_folder, capsys):
    assert main(["train", "/no/such/folder", f"run.dir={run_root}"]) == 2
    assert "/no/such/folder" in capsys.readouterr().err
    assert main(["train", str(shapes_folder), f"run.dir={run_root}", "model.name=resnet_999"]) == 2
    assert "unknown model 'resnet_999'" in capsys.readouterr().err


def test_models_lists_timm_and_local(capsys):
    assert main(["models", "resnet1*"]) == 0
    names = capsys.readouterr().out.split()
    assert "resnet18" in names
    assert main(["models", "small*"]) == 0
    assert "small_resnet" in capsys.readouterr().out


def test_console_script_entry_point():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "imgcls", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "predict" in result.stdout


def test_cache_command_prepares_what_training_then_reuses(shapes_folder, run_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["cache", str(shapes_folder), *FAST]) == 0
    (cache,) = (tmp_path / "cache" / "decoded").iterdir()
    written = (cache / "images.u8").stat().st_mtime_ns
    caplog.clear()
    # another seed (another split) and the same image size: the cache is reused, not rebuilt
    assert main(["train", str(shapes_folder), "train.epochs=1", f"run.dir={run_root}", *FAST, "seed=5"]) == 0
    assert [p.name for p in (tmp_path / "cache" / "decoded").iterdir()] == [cache.name]
    assert (cache / "images.u8").stat().st_mtime_ns == written
    assert "decoding 120 images" not in caplog.text


def test_the_python_api_exposes_every_command():
    import imgcls

    for name in ("train", "evaluate", "predict", "load", "write_report", "calibrate", "find_learning_rate",
                 "sweep", "cross_validate", "tune", "compare", "list_models", "load_config"):
        assert callable(getattr(imgcls, name)), name
    assert set(imgcls.__all__) >= {"write_report", "sweep", "compare", "tune", "cross_validate"}
