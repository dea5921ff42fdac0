"""imgcls doctor: a generated dataset with every kind of problem planted, checked through the command line and
the Python API: what doctor.json lists, the cleaned manifest, --fail-on, --json, --labels (real EfficientNet-Lite0
features and cleanlab), --from a cv folder's predictions, doctor.html in headless Chromium, and the warning
`imgcls train` prints for copies across splits."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from imgcls.cli import main
from imgcls.config import load_config
from imgcls.doctor import diagnose, run_doctor
from imgcls.data.duplicates import cross_split_copies, scan_files
from imgcls.data.sources import resolve_source

COLOURS = {"red": (200, 50, 50), "green": (50, 190, 60), "blue": (50, 70, 210)}
FLIPPED = ("flip_0.png", "flip_1.png", "flip_2.png")  # red images filed under green


def smooth_image(colour: tuple[int, int, int], rng: np.random.Generator, side: int = 64) -> Image.Image:
    """Smooth random blobs in one dominant colour: every image distinct, a class recognisable by colour."""
    blobs = gaussian_filter(rng.normal(size=(side, side)), sigma=side / 10)
    blobs = (blobs - blobs.min()) / (np.ptp(blobs) + 1e-9)
    pixels = np.stack([np.clip(c * (0.4 + 0.8 * blobs), 0, 255) for c in colour], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def troubled(tmp_path_factory) -> Path:
    """train/val/test folders of three colour classes, with planted problems (see the names)."""
    root = tmp_path_factory.mktemp("doctor") / "troubled"
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 8), ("test", 8)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                smooth_image(colour, rng).save(root / split / name / f"{name}_{index:02d}.png")
    train = root / "train"
    shutil.copyfile(root / "test/red/red_00.png", train / "red/leak_byte.png")  # exact copy of a test image
    Image.open(root / "test/green/green_00.png").save(train / "green/leak_pixel.bmp")  # same pixels, other bytes
    near = Image.open(root / "val/blue/blue_00.png").resize((80, 80), Image.Resampling.BICUBIC)
    shifted = Image.new("RGB", near.size, near.getpixel((0, 0)))
    shifted.paste(near, (2, 1))
    shifted.save(train / "blue/leak_near.jpg", quality=90)  # resized, shifted, re-encoded copy of a val image
    shutil.copyfile(train / "red/red_05.png", train / "green/conflict.png")  # the same file under two labels
    shutil.copyfile(train / "blue/blue_05.png", train / "blue/duplicate.png")  # a copy within train
    (train / "red/broken.png").write_bytes((train / "red/red_06.png").read_bytes()[:200])  # truncated
    smooth_image(COLOURS["green"], rng, side=16).save(train / "green/tiny.png")
    smooth_image(COLOURS["blue"], rng).convert("L").save(train / "blue/grey.png")
    rotated = smooth_image(COLOURS["blue"], rng)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(train / "blue/rotated.jpg", exif=exif)
    smooth_image(COLOURS["red"], rng, side=64).resize((300, 40)).save(train / "red/wide.png")
    for name in FLIPPED:
        smooth_image(COLOURS["red"], rng).save(train / "green" / name)
    return root


@pytest.fixture(scope="module")
def checked(troubled, tmp_path_factory) -> tuple[dict, Path]:
    runs = tmp_path_factory.mktemp("doctor-runs")
    config = load_config(overrides=[f"data.path={troubled}", f"run.dir={runs}"])
    return run_doctor(config, labels=True, name="troubled")


def _groups(report: dict, kind: str) -> list[dict]:
    return [group for group in report["duplicates"] if group["kind"] == kind]


def test_copies_across_and_within_splits(checked, troubled):
    report, _ = checked
    names = lambda group: sorted(Path(path).name for path in group["paths"])  # noqa: E731
    exact = [names(group) for group in _groups(report, "exact")]
    assert ["leak_byte.png", "red_00.png"] in exact
    assert ["conflict.png", "red_05.png"] in exact and ["blue_05.png", "duplicate.png"] in exact
    assert [names(group) for group in _groups(report, "pixel")] == [["green_00.png", "leak_pixel.bmp"]]
    near = [group for group in _groups(report, "near") if "leak_near.jpg" in names(group)]
    assert len(near) == 1 and names(near[0]) == ["blue_00.png", "leak_near.jpg"]
    assert 0 < near[0]["distance"] < 0.01 and sorted(near[0]["splits"]) == ["train", "val"]
    # precision: no other near-duplicates among the distinct generated images (the flipped ones included)
    assert len(_groups(report, "near")) == 1
    leaked = [group for group in report["duplicates"] if len(set(group["splits"])) > 1]
    assert len(leaked) == 3
    (conflict,) = report["conflicts"]
    assert sorted(conflict["labels"]) == ["green", "red"] and conflict["splits"] == ["train", "train"]
    for group in report["duplicates"]:
        assert set(group) == {"kind", "paths", "splits", "labels", "distance"}
        assert len(group["paths"]) == len(group["splits"]) == len(group["labels"]) >= 2


def test_odd_files_and_balance(checked):
    report, _ = checked
    files = report["files"]
    assert [Path(item["path"]).name for item in files["unreadable"]] == ["broken.png"]
    assert [Path(path).name for path in files["tiny"]] == ["tiny.png"]
    assert [Path(path).name for path in files["extreme_aspect"]] == ["wide.png"]
    assert [Path(path).name for path in files["exif_rotated"]] == ["rotated.jpg"]
    assert files["grey"] == 1 and files["formats"] == {"PNG": files["formats"]["PNG"], "BMP": 1, "JPEG": 2}
    kinds = [finding["kind"] for finding in report["findings"]]
    for kind in ("leakage", "conflicts", "unreadable", "duplicates", "tiny", "aspect", "grey_and_colour",
                 "exif_rotated"):
        assert kind in kinds, kind
    severities = [finding["severity"] for finding in report["findings"]]
    assert severities == sorted(severities, key=["error", "warning", "info"].index)  # worst first
    assert report["balance"]["counts"]["val"] == {"blue": 8, "green": 8, "red": 8}
    assert report["balance"]["few_validation_images"] == []  # 8 each is enough
    assert report["splits"] == {"train": 24 * 3 + 10 + len(FLIPPED), "val": 24, "test": 24}


def test_imbalance_and_classes_too_small_to_validate_on():
    from imgcls.data.sources import DataSource
    from imgcls.doctor import _balance_section

    samples = lambda name, count: [(f"{name}{i}.png", name) for i in range(count)]  # noqa: E731
    source = DataSource("long-tail", {"train": samples("cat", 300) + samples("dog", 20), "val": samples("cat", 30) +
                                      samples("dog", 2)})
    section, findings = _balance_section(source)
    assert section["imbalance_ratio"] == 15.0 and section["few_validation_images"] == ["dog"]
    imbalance, few = findings
    assert "15.0x more training images of 'cat' than of 'dog' (20)" in imbalance["message"]
    assert "loss.class_weights=auto or data.sampler=balanced" in imbalance["message"]
    assert "'dog': 2" in few["message"] and few["kind"] == "few_validation"


def test_label_issues_rank_the_flipped_labels_first(checked):
    report, _ = checked
    issues = report["label_issues"]
    assert issues and set(issues[0]) >= {"path", "given", "suggested", "score"}
    top = [Path(issue["path"]).name for issue in issues[:2 * len(FLIPPED)]]
    assert sum(name in top for name in FLIPPED) >= 2, top
    flipped = next(issue for issue in issues if Path(issue["path"]).name in FLIPPED)
    assert flipped["given"] == "green" and flipped["suggested"] == "red"
    scores = [issue["score"] for issue in issues]
    assert scores == sorted(scores)  # most suspicious (lowest label quality) first
    assert report["labels"]["method"].startswith("EfficientNet-Lite0")


def test_cleaned_manifest_drops_leaked_copies_and_trains(checked, troubled):
    report, folder = checked
    cleaned = folder / "cleaned.csv"
    source = resolve_source(str(cleaned))
    train = {Path(path).name for path, _ in source.splits["train"]}
    assert {"leak_byte.png", "leak_pixel.bmp", "leak_near.jpg", "broken.png"}.isdisjoint(train)
    assert "conflict.png" in train  # conflicts are listed, not dropped
    assert len(source.splits["test"]) == 24 and len(source.splits["val"]) == 24
    assert sorted(Path(p).name for p in report["cleaned_manifest"]["removed_from_train"]) == \
        ["leak_byte.png", "leak_near.jpg", "leak_pixel.bmp"]
    assert (troubled / "train/red/leak_byte.png").is_file()  # the user's files are untouched
    assert cross_split_copies(source.splits) == []


def test_doctor_html_in_headless_chromium(checked):
    from imgcls.report import render_in_browser

    report, folder = checked
    check = render_in_browser(folder / "doctor.html")
    assert check["ready_state"] == "complete" and check["title"] == "imgcls doctor: troubled"
    assert check["broken_images"] == [] and check["external_images"] == [] and check["console_errors"] == []
    assert check["sections"] == ["findings", "leakage", "conflicts", "duplicates", "labels", "balance", "files"]
    shown = sum(len(group["paths"]) for group in report["duplicates"]) + len(report["label_issues"]) + \
        len(report["outliers"]) + 1  # every copy, issue and outlier, and the size histogram
    assert check["images"] == shown


def test_command_line_json_and_fail_on(troubled, tmp_path, capsys):
    code = main(["doctor", str(troubled), f"run.dir={tmp_path}", "--json", "--fail-on", "leakage,unreadable"])
    captured = capsys.readouterr()
    assert code == 1
    report = json.loads(captured.out)
    assert report["folder"] == str(tmp_path / "doctor" / "troubled")
    assert "ERROR" in captured.err and "failing on leakage, unreadable (--fail-on)" in captured.err
    assert report["label_issues"] == []  # no --labels
    assert json.loads((tmp_path / "doctor/troubled/doctor.json").read_text()) == report
    # a second check of the same data gets its own folder, never overwriting the first
    assert main(["doctor", str(troubled), f"run.dir={tmp_path}", "--fail-on", "imbalance"]) == 0
    assert "wrote " + str(tmp_path / "doctor/troubled-2/doctor.html") in capsys.readouterr().out


def test_bad_fail_on_kind_is_a_one_line_error(troubled, tmp_path, capsys):
    assert main(["doctor", str(troubled), f"run.dir={tmp_path}", "--fail-on", "leaks"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--fail-on leaks: unknown kind; use a comma-separated list of leakage" in err
    assert not (tmp_path / "doctor").exists()


def test_labels_from_a_cv_folder(troubled, tmp_path):
    """--from takes the probabilities of `imgcls cv`'s oof_predictions.csv (here written in its format)."""
    cv = tmp_path / "cv"
    cv.mkdir()
    names = sorted(COLOURS)
    with open(cv / "oof_predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "fold", "predicted", "confidence", "correct", *(f"prob_{n}" for n in names)])
        for path in sorted((troubled / "train").rglob("*.*")):
            truth = "red" if path.name in FLIPPED else path.parent.name
            probabilities = [0.9 if name == truth else 0.05 for name in names]
            writer.writerow([path, path.parent.name, 0, truth, 0.9, int(truth == path.parent.name), *probabilities])
    config = load_config(overrides=[f"data.path={troubled}", f"run.dir={tmp_path}"])
    report = diagnose(config, from_cv=str(cv))
    assert report["labels"]["method"] == f"out-of-fold predictions of {cv}"
    assert sorted(Path(issue["path"]).name for issue in report["label_issues"]) == sorted(FLIPPED)
    # the training images in the CSV, less the broken one
    assert report["labels"]["checked"] == 24 * 3 + 9 + len(FLIPPED)
    with pytest.raises(Exception, match="no oof_predictions.csv there"):
        diagnose(config, from_cv=str(tmp_path))


def test_packaged_dataset_by_name_reads_the_splits_training_reads(tmp_path):
    from imgcls.training import resolve_data

    config = load_config(overrides=["data.path=digits", f"run.dir={tmp_path}"])
    report = diagnose(config)
    _, source = resolve_data(config)
    assert report["splits"] == {split: len(samples) for split, samples in source.splits.items()}
    assert report["images"] == 1797 and report["files"]["tiny"]  # 8 x 8 px digits


def test_train_warns_about_copies_across_splits(troubled, tmp_path, caplog):
    from imgcls.training import warn_cross_split_copies

    config = load_config(overrides=[f"data.path={troubled}"])
    from imgcls.training import split_data

    with caplog.at_level(logging.WARNING, logger="imgcls"):
        warn_cross_split_copies(split_data(config), str(troubled))
    (record,) = caplog.records
    assert "1 file(s) are byte-identical copies of files in another split" in record.message
    assert f"run `imgcls doctor {troubled}`" in record.message


def test_train_command_prints_the_warning(troubled, tmp_path):
    result = subprocess.run([sys.executable, "-m", "imgcls", "train", str(troubled), f"run.dir={tmp_path}",
                             "model.name=small_resnet", "data.image_size=32", "train.epochs=1",
                             "data.on_bad_image=skip"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "byte-identical copies of files in another split" in result.stderr + result.stdout


def test_scan_reports_why_a_file_is_unreadable(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    (facts,), thumbnails = scan_files([str(broken)], 1)
    assert facts.error.startswith("UnidentifiedImageError") and not thumbnails.any()


def test_photos_in_one_folder_of_class_folders_with_labels(tmp_path):
    """Images over 64 px (photos) take the 160 px feature path; one folder of class folders is split as training
    splits it."""
    rng = np.random.default_rng(2)
    for name, colour in COLOURS.items():
        (tmp_path / "photos" / name).mkdir(parents=True)
        for index in range(12):
            smooth_image(colour, rng, side=100).save(tmp_path / "photos" / name / f"{index}.jpg", quality=90)
    report, folder = run_doctor(str(tmp_path / "photos"), labels=True, overrides=[f"run.dir={tmp_path / 'runs'}"])
    assert report["labels"]["method"] == "EfficientNet-Lite0 ImageNet features at 160 px"
    assert report["labels"]["checked"] == 36 and set(report["splits"]) == {"train", "val", "test"}
    assert report["duplicates"] == [] and report["files"]["formats"] == {"JPEG": 36}
    assert folder == tmp_path / "runs" / "doctor" / "photos" and (folder / "doctor.html").is_file()
