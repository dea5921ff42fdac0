"""Issue 5 through the real pipeline: what training and `imgcls eval` write for error analysis,
calibration and explanations, and how `predict` uses the stored temperature and threshold."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import imgcls
from imgcls.checkpoint import load_artifact
from imgcls.cli import main

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Real handwritten digits, 3 epochs (~10 s): a model that has learnt, with mistakes left to
    analyse and a validation split large enough (~290 images) to fit a temperature on."""
    runs = tmp_path_factory.mktemp("analysis") / "runs"
    assert main(["train", "digits", "train.epochs=3", "seed=0", f"run.dir={runs}"]) == 0
    (folder,) = runs.iterdir()
    return folder


@pytest.fixture(scope="module")
def digits_folder(run) -> Path:
    """A few test images of the run's own data, to predict."""
    from imgcls.data import materialise

    return materialise("digits") / "test" / "3"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_training_stores_a_fitted_temperature_and_a_reject_threshold(run):
    _, metadata = load_artifact(run / "checkpoints" / "model.safetensors")
    calibration = metadata["calibration"]
    assert calibration["fitted_on"] == "val" and 0.05 <= calibration["temperature"] <= 20
    assert calibration["val_nll"]["after"] <= calibration["val_nll"]["before"] + 1e-9
    assert calibration["reject"]["target_precision"] == 0.95
    assert "calibration: temperature" in (run / "log.txt").read_text()


def test_training_writes_the_quick_analysis_and_curves(run):
    analysis = json.loads((run / "analysis_test.json").read_text())
    for key in ("auroc", "most_confused", "errors", "per_class", "highest_loss", "most_confident", "calibration"):
        assert key in analysis
    assert set(analysis["auroc"]["per_class"]) == {str(digit) for digit in range(10)}
    assert analysis["most_confused"] and analysis["highest_loss"]
    f1 = [row["f1"] for row in analysis["per_class"]]
    assert f1 == sorted(f1)  # worst class first
    metrics = json.loads((run / "metrics_test.json").read_text())
    assert 0.5 <= metrics["auroc_macro"] <= 1 and 0 <= metrics["ece"] <= 1
    for name in ("reliability_test.png", "mistakes_loss_test.png", "mistakes_confident_test.png", "curves.png"):
        assert Image.open(run / name).size[0] > 200, name
    assert not (run / "gradcam_test.png").exists()  # the slow explanations come with `imgcls eval`


def test_eval_adds_gradcam_activations_and_projection(run, capsys):
    assert main(["eval", str(run), "--split", "val"]) == 0
    for name in ("gradcam_val.png", "activations_val.png", "projection_val.png", "analysis_val.json"):
        assert (run / name).is_file(), name
    assert "calibration: ECE" in capsys.readouterr().err


def test_eval_with_an_unknown_layer_names_valid_ones(run, capsys):
    assert main(["eval", str(run), "--split", "val", "--layer", "no.such.layer"]) == 2
    error = capsys.readouterr().err
    assert "no.such.layer" in error and "Traceback" not in error


def test_predict_uses_the_stored_temperature(run, digits_folder):
    classifier = imgcls.load(run)
    images = torch.from_numpy(classifier.read(next(digits_folder.glob("*.png")))).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = classifier.model(images)
    expected = torch.softmax(logits / classifier.temperature, dim=1)
    assert classifier.temperature != 1.0
    assert torch.allclose(classifier.probabilities(images), expected, atol=1e-5)


def test_predict_reject_answers_unknown_below_the_threshold(run, digits_folder, tmp_path):
    out = tmp_path / "rejected.csv"
    assert main(["predict", str(run), str(digits_folder), "--reject", "0.9", "--out", str(out)]) == 0
    rows = read_csv(out)
    assert rows and all((row["label"] == "unknown") == (float(row["confidence"]) < 0.9) for row in rows)
    assert all(row["label_1"] != "unknown" for row in rows)  # what the model thought stays visible
    _, metadata = load_artifact(run / "checkpoints" / "model.safetensors")
    stored = metadata["calibration"]["reject"]["threshold"]
    if stored is not None:
        assert main(["predict", str(run), str(digits_folder), "--reject", "auto", "--out", str(out)]) == 0
        rows = read_csv(out)
        assert all((row["label"] == "unknown") == (float(row["confidence"]) < stored) for row in rows)


@pytest.mark.parametrize("value", ["1.5", "maybe"])
def test_predict_reject_needs_auto_or_a_confidence(run, digits_folder, value, capsys):
    assert main(["predict", str(run), str(digits_folder), "--reject", value]) == 2
    assert "--reject" in capsys.readouterr().err
