"""Shared fixtures: tiny generated image folders that a small CNN separates in a few epochs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")


def draw_shape(shape: str, rng: np.random.Generator, size: tuple[int, int], shift: bool = False) -> Image.Image:
    """A noisy background with one large shape; each class has its own shape and dominant colour.

    shift=True draws the same classes in other colours on a brighter background: a
    distribution-shifted version of the same task."""
    width, height = size
    background = rng.integers(20, 90, size=(height, width, 3)) + (90 if shift else 0)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colours = {"circle": (230, 60, 60), "square": (60, 220, 60), "triangle": (70, 90, 240)}
    colour = tuple(int(c) for c in np.clip(np.array(colours[shape]) + rng.integers(-25, 25, 3), 0, 255))
    if shift:
        colour = colour[1:] + colour[:1]
    side = min(width, height)
    extent = int(side * rng.uniform(0.45, 0.8))
    left = int(rng.integers(0, width - extent + 1))
    top = int(rng.integers(0, height - extent + 1))
    box = (left, top, left + extent, top + extent)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left + extent // 2, top), (left, top + extent), (left + extent, top + extent)], fill=colour)
    return image


def write_class_folders(root: Path, per_class: int, seed: int, shift: bool = False) -> Path:
    """root/<class>/<n>.{png,jpg} with mixed sizes (40-90 px) and formats."""
    rng = np.random.default_rng(seed)
    for shape in CLASSES:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            image = draw_shape(shape, rng, size, shift)
            suffix = ".jpg" if index % 2 else ".png"
            image.save(root / shape / f"{shape}_{index:03d}{suffix}")
    return root


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    """One folder of class folders (no splits): 3 classes x 40 images."""
    return write_class_folders(tmp_path_factory.mktemp("shapes") / "shapes", per_class=40, seed=0)


@pytest.fixture(scope="session")
def shifted_folder(tmp_path_factory) -> Path:
    """The same classes in other colours: a distribution-shifted test set."""
    return write_class_folders(tmp_path_factory.mktemp("shifted") / "shifted", per_class=10, seed=1, shift=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Packaged datasets go to a per-session cache, never the user's ~/.cache (except when
    IMGCLS_TEST_CACHE_DIR points at a shared one, to reuse materialised datasets)."""
    shared = os.environ.get("IMGCLS_TEST_CACHE_DIR")
    monkeypatch.setenv("IMGCLS_CACHE_DIR", shared or str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
