"""Multi-label classification: manifests with a labels column, iterative-stratification splits, the losses,
mixing of multi-hot targets, the metrics and thresholds, and one real run taken through train, eval,
predict, export, serve, report, cv, sweep and compare."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.config import DataConfig, LossConfig
from imgcls.data import assign_splits, resolve_source
from imgcls.data.augment import build_mixing
from imgcls.data.sources import as_task, labels_of
from imgcls.errors import ImgclsError
from imgcls.losses import AsymmetricLoss, BinaryCrossEntropy, build_loss
from imgcls.multilabel import choose_thresholds, compute_metrics, confused_labels
from tests.conftest import train_tiny_run

COLOURS = {"red": (230, 40, 40), "green": (40, 220, 40), "blue": (40, 60, 240), "white": (235, 235, 235)}


def write_quadrants(root: Path, count: int, seed: int, split: str | None = None) -> list[tuple[str, str, str]]:
    """`count` 32 px images of 1-3 coloured squares in the quadrants of a dark, noisy ground; the labels are
    the colours present. Returns manifest rows (relative path, labels joined by |, split)."""
    rng = np.random.default_rng(seed)
    rows = []
    folder = root / (split or "images")
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(COLOURS)
    for index in range(count):
        image = rng.integers(0, 60, size=(32, 32, 3))
        chosen = rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False)
        for quadrant, colour in zip(rng.permutation(4), chosen):
            top, left = 16 * (quadrant // 2) + 2, 16 * (quadrant % 2) + 2
            image[top:top + 12, left:left + 12] = COLOURS[names[colour]]
        path = folder / f"{index:03d}.png"
        Image.fromarray(image.astype(np.uint8)).save(path)
        rows.append((f"{folder.name}/{path.name}", "|".join(sorted(names[c] for c in chosen)), split or ""))
    return rows


def write_manifest(path: Path, rows, header=("path", "labels", "split")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(row[: len(header)] for row in rows)
    return path


@pytest.fixture(scope="module")
def quadrants(tmp_path_factory) -> Path:
    """A multi-label manifest: 240 training and 60 test images, no val split (imgcls carves one)."""
    root = tmp_path_factory.mktemp("quadrants")
    rows = write_quadrants(root, 240, seed=0, split="train") + write_quadrants(root, 60, seed=1, split="test")
    return write_manifest(root / "manifest.csv", rows)


@pytest.fixture(scope="module")
def run(quadrants, tmp_path_factory) -> Path:
    """A real multi-label run, trained with no flag that says multi-label (6 epochs at 32 px)."""
    return train_tiny_run(quadrants, tmp_path_factory.mktemp("runs"), tmp_path_factory, "train.epochs=6")


# --- the manifest --------------------------------------------------------------------------------

def test_a_labels_column_makes_multi_label_data_with_the_union_of_the_labels(tmp_path):
    rows = write_quadrants(tmp_path, 12, seed=0)
    rows.append(("images/000.png", "", ""))  # an empty cell: none of the classes
    source = resolve_source(str(write_manifest(tmp_path / "m.csv", rows, ("path", "labels"))))
    assert source.multi_label and source.unsplit[-1][1] == ()
    assert source.class_names == sorted({name for _, labels, _ in rows for name in labels.split("|") if name})
    assert all(isinstance(label, tuple) for _, label in source.unsplit)


def test_another_label_separator(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "m.csv", [("a.png", "dog; grass")], ("path", "labels"))
    assert resolve_source(str(manifest), separator=";").unsplit == [(str(tmp_path / "a.png"), ("dog", "grass"))]


@pytest.mark.parametrize("header, rows, message", [
    (("path", "labels", "weight"), [("a.png", "x", "1")], "unknown column 'weight' in the header"),
    (("path", "label"), [("a.png", "cat|dog")], "line 2: label 'cat|dog' contains the label separator '|'"),
    (("path", "labels"), [("a.png", "cat"), ("gone.png", "dog")], "line 3: image not found: .*gone.png"),
    (("path", "label", "labels"), [("a.png", "x", "y")], "must have a header row"),
])
def test_a_bad_manifest_is_one_line_naming_the_row(tmp_path, header, rows, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ImgclsError, match=message) as error:
        resolve_source(str(write_manifest(tmp_path / "m.csv", rows, header)))
    assert "\n" not in str(error.value)


def test_a_label_seen_only_in_val_is_an_error(tmp_path):
    rows = write_quadrants(tmp_path, 6, seed=0, split="train")
    rows.append(("train/000.png", "purple", "val"))
    source = resolve_source(str(write_manifest(tmp_path / "m.csv", rows)))
    with pytest.raises(ImgclsError, match="class 'purple' appears in the val split"):
        assign_splits(source, 0.1, 0.1, 0)


def test_task_single_refuses_images_with_several_labels_and_multi_wraps_single_labels(tmp_path):
    source = resolve_source(str(write_manifest(tmp_path / "m.csv", write_quadrants(tmp_path, 20, seed=0),
                                               ("path", "labels"))))
    with pytest.raises(ImgclsError, match="task=single, but .* has [23] labels"):
        as_task(source, "single")
    single = source.replace(unsplit=[(path, (label[0],)) for path, label in source.unsplit])
    assert as_task(single, "single").unsplit[0][1] == single.unsplit[0][1][0]
    assert as_task(as_task(single, "single"), "multi").unsplit == single.unsplit


def test_iterative_stratification_keeps_every_label_share_in_train_and_val(tmp_path):
    rows = write_quadrants(tmp_path, 300, seed=0)
    source = resolve_source(str(write_manifest(tmp_path / "m.csv", rows, ("path", "labels"))))
    split = assign_splits(source, val_fraction=0.2, test_fraction=0.2, seed=0)
    sizes = {name: len(samples) for name, samples in split.splits.items()}
    assert sizes == pytest.approx({"train": 180, "val": 60, "test": 60}, abs=8)  # iterative: about the share
    for name in source.class_names:
        share = sum(name in label for _, label in source.unsplit) / 300
        for samples in split.splits.values():
            assert sum(name in label for _, label in samples) / len(samples) == pytest.approx(share, abs=0.04)


# --- losses and mixing ---------------------------------------------------------------------------

def test_asl_without_focusing_or_clipping_is_binary_cross_entropy():
    logits, targets = torch.randn(8, 5), (torch.rand(8, 5) > 0.6).float()
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert AsymmetricLoss(0.0, 0.0, 0.0)(logits, targets).item() == pytest.approx(plain.item(), rel=1e-5)
    assert BinaryCrossEntropy()(logits, targets).item() == pytest.approx(plain.item(), rel=1e-6)
    # focusing and the clip make easy negatives cheaper: the loss drops
    assert AsymmetricLoss(4.0, 0.0, 0.05)(logits, targets) < plain


def test_build_loss_for_multi_label_data():
    counts, images = [10, 90], 100
    weighted = build_loss(LossConfig(name="auto", class_weights="auto"), counts, images, "multi")
    assert isinstance(weighted, BinaryCrossEntropy)
    assert weighted.pos_weight.tolist() == pytest.approx([9.0, 1.0])  # negatives / positives, at least 1
    assert isinstance(build_loss(LossConfig(name="asl"), counts, images, "multi"), AsymmetricLoss)
    with pytest.raises(ValueError, match="not for multi-label"):
        build_loss(LossConfig(name="ce"), counts, images, "multi")


@pytest.mark.parametrize("alphas", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_mixing_multi_hot_targets_blends_each_image_with_its_partner(alphas):
    torch.manual_seed(0)
    images = torch.rand(6, 3, 16, 16)
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]], dtype=torch.float32)
    mixed_images, mixed = build_mixing(DataConfig(**alphas), 3)(images, targets)
    assert mixed.shape == targets.shape and mixed_images.shape == images.shape
    def blend_of(row: int) -> bool:
        """mixed[row] = share x its own labels + (1 - share) x another image's, for some image and share."""
        for partner in range(6):
            difference = targets[row] - targets[partner]
            if not difference.any():
                if torch.allclose(mixed[row], targets[row], atol=1e-5):
                    return True
                continue
            share = torch.dot(mixed[row] - targets[partner], difference) / torch.dot(difference, difference)
            if 0 <= share <= 1 and torch.allclose(mixed[row], share * targets[row] + (1 - share) * targets[partner],
                                                  atol=1e-5):
                return True
        return False

    assert all(blend_of(row) for row in range(6))
    assert not torch.allclose(mixed, targets)  # mixed, not passed through


# --- metrics and thresholds ----------------------------------------------------------------------

def test_metrics_by_hand():
    truth = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.float32)
    probabilities = torch.tensor([[0.9, 0.2], [0.4, 0.8], [0.7, 0.3], [0.1, 0.6]])
    logits = torch.logit(probabilities)
    metrics = compute_metrics(logits, truth)
    # decisions at 0.5: [1,0] [0,1] [1,0] [0,1]: 2 of 4 images fully right, 2 of 8 decisions wrong
    assert metrics["subset_acc"] == pytest.approx(0.5) and metrics["hamming_loss"] == pytest.approx(0.25)
    # label 0: AP 1 (both positives ranked first); label 1: positives at ranks 1 and 3 -> (1 + 2/3) / 2
    assert metrics["map"] == pytest.approx((1 + (1 + 2 / 3) / 2) / 2)
    assert metrics["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert metrics["n"] == 4
    assert compute_metrics(logits, truth, thresholds=[0.5, 0.25])["subset_acc"] == pytest.approx(0.75)  # image 3 fixed


def test_thresholds_maximise_each_label_f1_and_fall_back_to_half():
    truth = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.float32)
    probabilities = torch.tensor([[0.3, 0.1], [0.25, 0.2], [0.2, 0.9], [0.1, 0.3]])
    thresholds = choose_thresholds(torch.logit(probabilities), truth)
    assert thresholds[0] == pytest.approx(0.25)  # both positives in, every negative out: F1 = 1
    assert thresholds[1] == 0.5  # no positive of label 1 to choose from


def test_confused_labels_count_a_missed_label_with_a_wrong_one_in_its_place():
    truth = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    predicted = np.array([[0, 1, 0], [0, 1, 1], [0, 1, 0]])
    assert confused_labels(truth, predicted, ["a", "b", "c"]) == [
        {"missed": "a", "predicted_instead": "b", "images": 2}, {"missed": "a", "predicted_instead": "c", "images": 1}]


# --- one real run through every command ----------------------------------------------------------

def test_training_on_a_labels_manifest_needs_no_flag_and_learns(run):
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["task"], config["loss"]["name"], config["train"]["monitor"]) == ("multi", "bce", "val_map")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_metrics"]["map"] > 0.8, summary["test_metrics"]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_subset_acc", "val_map", "val_f1_micro", "val_subset_acc"} <= set(header)
    from imgcls.checkpoint import load_artifact

    _, metadata = load_artifact(run / "checkpoints" / "model.safetensors")
    assert metadata["task"] == "multi" and len(metadata["calibration"]["thresholds"]) == 4


def test_eval_json_and_its_files(run, capsys):
    from imgcls.cli import main

    assert main(["eval", str(run), "--json", "--no-explain"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"map", "f1_micro", "f1_macro", "subset_acc", "hamming_loss", "n"} <= set(metrics) and metrics["n"] == 60
    for name in ("predictions_test.csv", "classification_report_test.csv", "pr_curves_test.png", "cooccurrence_test.png",
                 "false_positives_test.png", "false_negatives_test.png", "analysis_test.json"):
        assert (run / name).is_file(), name
    with open(run / "predictions_test.csv") as handle:
        first = next(csv.DictReader(handle))
    assert set(first) == {"path", "true", "predicted", "correct", "prob_blue", "prob_green", "prob_red", "prob_white"}


def test_predict_writes_label_sets_and_one_probability_per_class(run, quadrants, tmp_path):
    from imgcls.cli import main
    from imgcls.data.sources import read_manifest

    samples = read_manifest(quadrants).splits["test"][:20]
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run), *(path for path, _ in samples), "--out", str(out)]) == 0
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "labels", "prob_blue", "prob_green", "prob_red", "prob_white", "error"]
    right = sum(set(filter(None, row["labels"].split("|"))) == set(labels) for row, (_, labels) in zip(rows, samples))
    assert right >= 14, [(row["labels"], labels) for row, (_, labels) in zip(rows, samples)]
    # one threshold for all: at 0.999 hardly a label is left, at 0.001 nearly all
    assert main(["predict", str(run), samples[0][0], "--out", str(out), "--threshold", "0.001"]) == 0
    with open(out) as handle:
        assert len(next(csv.DictReader(handle))["labels"].split("|")) >= 3
    assert main(["predict", str(run), samples[0][0], "--reject", "auto"]) == 2  # single-label only


def test_export_and_serve_answer_the_same_label_sets(run, quadrants):
    from fastapi.testclient import TestClient

    from imgcls.data.sources import read_manifest
    from imgcls.exporting import export
    from imgcls.prediction import OnnxClassifier, load
    from imgcls.serving import create_app

    result = export(run, formats=["onnx"])
    assert result["formats"]["onnx"]["parity"]["label_set_agreement"] >= 0.999
    paths = [path for path, _ in read_manifest(quadrants).splits["test"][:8]]
    onnx, torch_model = OnnxClassifier(run / "export" / "model.onnx"), load(run, "cpu")
    assert onnx.task.name == "multi"
    assert [row["labels"] for row in onnx.predict(paths)] == [row["labels"] for row in torch_model.predict(paths)]
    with TestClient(create_app(onnx)) as client:
        files = [("file", (Path(path).name, Path(path).read_bytes(), "image/png")) for path in paths[:3]]
        answer = client.post("/predict", files=files).json()["predictions"]
        assert [sorted(item["labels"]) for item in answer] == [
            sorted(filter(None, row["labels"].split("|"))) for row in torch_model.predict(paths[:3])]
        assert set(answer[0]["probabilities"]) == {"blue", "green", "red", "white"}
        assert client.get("/metadata").json()["task"] == "multi"


def test_report_shows_the_per_label_sections(run):
    from imgcls.report import write_report

    html = write_report(run).read_text()
    for text in ("Per-label results", "Precision-recall of the worst labels", "Co-occurrence and confusion",
                 "Most confident false positives", "Grad-CAM per predicted label", "mAP"):
        assert text in html, text
    assert "Confusion matrix" not in html and "top-1 accuracy" not in html


@pytest.mark.slow
def test_cv_sweep_and_compare_on_multi_label_data(quadrants, tmp_path, monkeypatch):
    """cv splits by iterative stratification; a sweep of two settings over two seeds is compared by a
    paired bootstrap of mAP."""
    from imgcls.comparison import compare
    from imgcls.sweeps import cross_validate, sweep
    from tests.conftest import TINY_RUN

    monkeypatch.chdir(tmp_path)
    folder = cross_validate(str(quadrants), None, [*TINY_RUN, "run.dir=runs"], folds=2, name="cv")
    summary = json.loads((folder / "cv_summary.json").read_text())
    assert {"val_map", "test_map"} <= set(summary["mean_std"]) and summary["oof_images"] == 240
    with open(folder / "oof_predictions.csv") as handle:
        assert "|" in "".join(row["label"] for row in csv.DictReader(handle))
    swept = sweep(None, [f"data.path={quadrants}", *TINY_RUN, "run.dir=runs", "loss.name=bce,asl"], [0, 1],
                  name="losses")
    result = compare([swept])
    assert result["paired"]["metric"] == "map" and result["paired"]["resamples"] == 2000
    assert result["paired"]["ci_low"] <= result["paired"]["difference"] <= result["paired"]["ci_high"]
    assert "map_mean" in result["groups"][0] and "mAP" in (swept / "comparison.md").read_text()


def test_resampled_map_with_unit_weights_is_sklearns_map():
    from sklearn.metrics import average_precision_score

    from imgcls.comparison import _resampled_map

    rng = np.random.default_rng(0)
    truth = (rng.random((50, 4)) > 0.6).astype(int)
    probabilities = rng.random((50, 4))
    expected = np.mean([average_precision_score(truth[:, j], probabilities[:, j]) for j in range(4)])
    assert _resampled_map(truth, probabilities, np.ones((1, 50)))[0] == pytest.approx(expected)
    assert labels_of(("a", "b")) == ("a", "b") and labels_of("a") == ("a",)


def test_resume_and_lr_find_on_multi_label_data(quadrants, tmp_path, monkeypatch):
    """A multi-label run continues from its checkpoint with more epochs; the learning-rate range test
    runs on the same set-up."""
    import imgcls
    from imgcls.lr_finder import find_learning_rate
    from tests.conftest import TINY_RUN

    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    config = imgcls.load_config(overrides=[f"data.path={quadrants}", f"run.dir={tmp_path}", *TINY_RUN,
                                           "train.epochs=1", "train.calibrate=false"])
    run = imgcls.train(config)
    imgcls.train(resume=run, overrides=["train.epochs=2"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["last_epoch"]["epoch"] == 2
    assert "map" in summary["test_metrics"]
    result = find_learning_rate(config, start_lr=1e-4, end_lr=1.0, steps=10)
    assert result["steps"] == 10 and result["suggested_lr"] > 0


def test_a_quick_subset_of_multi_label_data_keeps_every_label(tmp_path):
    from imgcls.data import subsample_train

    rows = write_quadrants(tmp_path, 200, seed=0, split="train") + write_quadrants(tmp_path, 20, seed=1, split="val")
    source = resolve_source(str(write_manifest(tmp_path / "m.csv", rows)))
    subset = subsample_train(source, fraction=0.25, seed=0)
    assert 40 <= len(subset.splits["train"]) <= 60 and subset.class_names == source.class_names
    limited = subsample_train(source, per_class_limit=10, seed=0)
    counts = limited.counts("train")
    # an image is kept while one of its labels is under the limit: every label reaches it, some pass it
    assert min(counts.values()) >= 10 and len(limited.splits["train"]) < 40


def test_int8_export_measures_subset_accuracy(run):
    from imgcls.exporting import export

    result = export(run, formats=["onnx"], int8=True, out=run / "export-int8")
    entry = result["formats"]["onnx_int8"]
    assert entry["parity"]["label_set_agreement"] > 0.8  # int8 moves some probabilities across a threshold
    assert entry["accuracy"]["images"] == 60 and 0 <= entry["accuracy"]["int8"] <= 1


def test_upload_page_shows_the_label_set_in_headless_chromium(run, quadrants, tmp_path):
    """`imgcls serve RUN` in its own process; the page shows the predicted label set and a bar per label."""
    import subprocess
    import sys

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from imgcls.data.sources import read_manifest
    from imgcls.prediction import load
    from imgcls.report import _chromium
    from tests.test_serve import free_port, wait_until_healthy

    path = read_manifest(quadrants).splits["test"][0][0]
    (expected,) = load(run, "cpu").predict([path])
    port, log = free_port(), tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "imgcls", "serve", str(run), "--port", str(port)],
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process, log)
        with _chromium() as driver:
            driver.get(f"http://127.0.0.1:{port}/")
            driver.find_element(By.CSS_SELECTOR, "input#file").send_keys(path)
            WebDriverWait(driver, 20).until(lambda browser: browser.find_elements(
                By.CSS_SELECTOR, "[data-testid=label], #status .error"))
            errors = driver.find_elements(By.CSS_SELECTOR, "#status .error")
            assert not errors, errors[0].text
            label = driver.find_element(By.CSS_SELECTOR, "[data-testid=label]").text
            assert label == (", ".join(expected["label_set"]) or "(none of the labels)")
            names = [bar.find_element(By.CSS_SELECTOR, ".name").text for bar in driver.find_elements(By.CSS_SELECTOR, ".bar")]
            probabilities = {key.removeprefix("prob_"): value for key, value in expected.items() if key.startswith("prob_")}
            assert names == sorted(probabilities, key=probabilities.get, reverse=True)  # every label, most likely first
    finally:
        process.terminate()
        process.wait(timeout=30)
