"""Real photos (scikit-learn's sample images) in every format and mode a user's folder may hold,
through a timm model: train, eval, predict as a new user would."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.cli import main


def save_in_format(image: Image.Image, path_stem: Path, variant: int) -> Path:
    """Cycle through formats and modes: EXIF-rotated JPEG, RGBA PNG, palette GIF, WebP, TIFF,
    BMP, greyscale PNG, CMYK JPEG, 16-bit greyscale PNG."""
    kind = variant % 9
    if kind == 0:
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees on display
        path = path_stem.with_suffix(".jpg")
        image.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes())
    elif kind == 1:
        path = path_stem.with_suffix(".png")
        rgba = image.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(path)
    elif kind == 2:
        path = path_stem.with_suffix(".gif")
        image.convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    elif kind == 3:
        path = path_stem.with_suffix(".webp")
        image.save(path, quality=80)
    elif kind == 4:
        path = path_stem.with_suffix(".tiff")
        image.save(path)
    elif kind == 5:
        path = path_stem.with_suffix(".bmp")
        image.save(path)
    elif kind == 6:
        path = path_stem.with_suffix(".png")
        image.convert("L").save(path)
    elif kind == 7:
        path = path_stem.with_suffix(".jpeg")
        image.convert("CMYK").save(path)
    else:
        path = path_stem.with_suffix(".png")
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(path)  # mode I;16
    return path


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Two classes of real photo crops of mixed sizes (90-400 px) and all supported formats."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos") / "photos"
    rng = np.random.default_rng(0)
    samples = load_sample_images()
    for name, array in zip(("china", "flower"), samples.images):
        photo = Image.fromarray(array)
        (root / name).mkdir(parents=True)
        for index in range(18):
            width, height = int(rng.integers(90, 400)), int(rng.integers(90, 400))
            left = int(rng.integers(0, photo.width - width))
            top = int(rng.integers(0, photo.height - height))
            crop = photo.crop((left, top, left + width, top + height))
            save_in_format(crop, root / name / f"{name}_{index:02d}", index)
    return root


def test_photo_folder_end_to_end_with_a_timm_model(photo_folder, tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["train", str(photo_folder), "model.name=resnet18", "data.image_size=64", "train.epochs=3",
                 "train.batch_size=8", "data.val_fraction=0.2", "data.test_fraction=0.2", f"run.dir={runs}"])
    assert code == 0
    (run,) = runs.iterdir()
    assert run.name == "photos-resnet18"
    assert not (run / "bad_images.txt").exists()  # every format and mode decoded
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 8 and 0 <= metrics["acc1"] <= 1
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run), str(photo_folder / "flower"), "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 18 and not any(row["error"] for row in rows)
    assert {row["label"] for row in rows} <= {"china", "flower"}
