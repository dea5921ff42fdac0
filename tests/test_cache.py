"""The decoded-image cache heals itself and is never served corrupt; `imgcls cache --verify / --clear`;
a full disk is one sentence, for the cache and for packaged datasets, never a half-written folder."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.cli import main
from imgcls.data import build_datasets, cache_dir, materialise
from imgcls.data.cache import build_cache, cache_entries, cache_folder, cached_paths, check_entry
from imgcls.errors import ImgclsError

CLASSES = ["a", "b"]
SIZE = 16
SETTINGS = ["model.name=small_resnet"]  # with data.image_size given: nothing left to choose from the data


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Each test its own cache folder, so that it sees only its own entries."""
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def photos(tmp_path) -> dict[str, list[tuple[str, str]]]:
    """{split: [(path, class)]}: 12 PNGs of random pixels, 24 x 20."""
    rng = np.random.default_rng(0)
    splits = {"train": [], "val": []}
    for class_name in CLASSES:
        (tmp_path / class_name).mkdir()
        for index in range(6):
            path = tmp_path / class_name / f"{index}.png"
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
            splits["val" if index >= 4 else "train"].append((str(path), class_name))
    return splits


@pytest.fixture
def warnings(caplog, monkeypatch):
    """Warnings of the imgcls logger, each once (it does not propagate once setup_logging has run)."""
    logger = logging.getLogger("imgcls")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="imgcls")
    yield lambda: [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    logger.removeHandler(caplog.handler)


def pixels(splits, size: int = SIZE, cache: str = "on") -> dict[str, torch.Tensor]:
    prepared = build_datasets(splits, CLASSES, size, "crop", cache=cache)
    assert prepared.cached == (cache == "on")
    return {split: torch.stack([dataset[i][0] for i in range(len(dataset))])
            for split, dataset in prepared.datasets.items()}


def overwrite(filename: Path, offset: int, count: int) -> None:
    with open(filename, "r+b") as handle:
        handle.seek(offset)
        handle.write(np.random.default_rng(1).integers(0, 256, count, dtype=np.uint8).tobytes())


# --- damage found on open: one warning, built again, the right pixels --------------------------------

def truncate(folder: Path) -> None:
    with open(folder / "images.u8", "r+b") as handle:
        handle.truncate(1000)


def random_bytes_over_a_region(folder: Path) -> None:
    overwrite(folder / "images.u8", 2000, 3000)


def delete_images(folder: Path) -> None:
    (folder / "images.u8").unlink()


def corrupt_meta(folder: Path) -> None:
    (folder / "meta.json").write_text('{"format": 2, "count": 1')


def delete_meta(folder: Path) -> None:
    (folder / "meta.json").unlink()


def format_1_meta(folder: Path) -> None:
    """What an older imgcls wrote: no hashes."""
    meta = json.loads((folder / "meta.json").read_text())
    for key in ("sample_sha256", "sha256"):
        del meta[key]
    (folder / "meta.json").write_text(json.dumps({**meta, "format": 1}))


@pytest.mark.parametrize("damage", [truncate, random_bytes_over_a_region, delete_images, corrupt_meta, delete_meta,
                                    format_1_meta])
def test_a_damaged_cache_is_built_again_with_one_warning(photos, damage, warnings):
    expected = pixels(photos, cache="off")
    pixels(photos)
    (folder,) = cache_entries()
    damage(folder)
    again = pixels(photos)
    assert len(warnings()) == 1 and str(folder) in warnings()[0] and "building it again" in warnings()[0]
    assert all(torch.equal(again[split], expected[split]) for split in expected)
    assert cache_entries() == [folder] and check_entry(folder, thorough=True) is None
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]  # nothing left aside


def test_the_warning_says_what_was_wrong(photos, warnings):
    pixels(photos)
    (folder,) = cache_entries()
    truncate(folder)
    pixels(photos)
    assert "images.u8 is 1,000 bytes instead of 9,216" in warnings()[0]


def test_builds_racing_for_one_entry_leave_it_whole(photos):
    # two torchrun ranks or parallel runs: each decodes into its own staging folder, the first rename wins
    paths = cached_paths(photos)
    with ThreadPoolExecutor(2) as pool:
        (first, _), (second, _) = pool.map(lambda _: build_cache(paths, SIZE, "crop", processes=1), range(2))
    assert np.array_equal(first, second)
    folder = cache_folder(paths, SIZE, "crop")
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]
    assert check_entry(folder, thorough=True) is None


# --- imgcls cache --verify / --clear -----------------------------------------------------------------

def test_verify_finds_what_the_check_on_open_does_not(shapes_folder, capsys):
    settings = [str(shapes_folder), *SETTINGS, "data.image_size=64"]  # 120 x 64 x 64 x 3: 1.4 MiB
    assert main(["cache", *settings]) == 0
    (folder,) = cache_entries()
    built = (folder / "images.u8").read_bytes()
    # the check on open hashes 256 blocks of 4 KiB, one every 5,760 bytes here: 4,096..5,759 is unsampled
    overwrite(folder / "images.u8", 5000, 16)
    assert check_entry(folder) is None  # a small change between the sampled blocks goes unseen on open
    assert "whole-file hash" in check_entry(folder, thorough=True)
    capsys.readouterr()
    assert main(["cache", *settings, "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"corrupt  {folder}: images.u8 has changed" in out and "0 ok, 1 corrupt (removed)" in out
    assert (folder / "images.u8").read_bytes() == built  # built again
    assert main(["cache", *settings, "--verify"]) == 0
    assert f"ok       {folder}" in capsys.readouterr().out


def test_verify_without_data_checks_every_entry_and_removes_the_corrupt(photos, capsys):
    paths = cached_paths(photos)
    for size in (8, 12, 16):
        build_cache(paths, size, "crop", processes=1)
    good, damaged, stale = (cache_folder(paths, size, "crop") for size in (8, 12, 16))
    overwrite(damaged / "images.u8", 100, 100)
    format_1_meta(stale)
    assert main(["cache", "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"ok       {good}" in out
    assert f"corrupt  {damaged}: images.u8 has changed since it was built" in out
    assert f"corrupt  {stale}: stale: written by an older imgcls (cache format 1, now 2)" in out
    assert "1 ok, 2 corrupt (removed)" in out
    assert cache_entries() == [good]


def test_clear_removes_the_entry_for_data_or_all_of_them(shapes_folder, own_cache, capsys):
    for size in (16, 24):
        assert main(["cache", str(shapes_folder), *SETTINGS, f"data.image_size={size}"]) == 0
    small, large = sorted(cache_entries(), key=lambda folder: (folder / "images.u8").stat().st_size)
    sizes = {folder: sum(path.stat().st_size for path in folder.iterdir()) for folder in (small, large)}
    capsys.readouterr()
    assert main(["cache", str(shapes_folder), *SETTINGS, "data.image_size=16", "--clear"]) == 0
    out = capsys.readouterr().out
    assert f"removed  {small} ({sizes[small]:,} bytes)" in out and f"{sizes[small]:,} bytes freed" in out
    assert cache_entries() == [large]
    assert main(["cache", "--clear"]) == 0
    out = capsys.readouterr().out
    assert f"removed  {large}" in out and f"cache entries in {own_cache / 'decoded'}: 1 removed;" in out
    assert cache_entries() == []


def test_cache_without_data_is_a_one_line_error(capsys):
    assert main(["cache"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "imgcls: error: give DATA to cache, or --verify / --clear for every entry of the cache folder"]


# --- a full disk (a real one: a small tmpfs) ---------------------------------------------------------

def test_a_cache_that_does_not_fit_is_one_line_or_decoding_from_files(photos, small_disk, monkeypatch, warnings):
    disk = small_disk(1024)
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(disk))
    # 12 x 256 x 256 x 3 = 2.25 MiB on a 1 MiB disk; the space is reserved before decoding, so this is
    # an OSError up front and not a SIGBUS midway through the memory map
    with pytest.raises(ImgclsError) as raised:
        build_datasets(photos, CLASSES, 256, "crop", cache="on")
    message = str(raised.value)
    assert "\n" not in message and f"to {disk / 'decoded'} (" in message and "MiB free" in message
    assert "IMGCLS_CACHE_DIR" in message and "data.cache=off" in message
    assert list((disk / "decoded").iterdir()) == []  # no staging folder left
    assert not build_datasets(photos, CLASSES, 256, "crop", cache="auto").cached
    assert len(warnings()) == 1 and warnings()[0].endswith("decoding from files instead")
    assert build_datasets(photos, CLASSES, 64, "crop", cache="on").cached  # 144 KiB fits


def test_the_cache_command_on_a_full_disk(shapes_folder, small_disk, monkeypatch, capsys):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(small_disk(1024)))
    assert main(["cache", str(shapes_folder), *SETTINGS, "data.image_size=64"]) == 2  # 1.4 MiB
    assert capsys.readouterr().err.splitlines()[-1].startswith("imgcls: error: no space left on the device")


def test_materialise_on_a_full_disk_leaves_nothing_and_works_once_space_is_freed(small_disk, monkeypatch, capsys):
    disk = small_disk(10 * 1024)
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(disk))
    # digits takes about 7 MiB here (each of its 1,797 PNGs a 4 KiB page): 4 MiB free runs out midway
    ballast = disk / "ballast"
    ballast.write_bytes(bytes(6 * 2**20))
    with pytest.raises(ImgclsError) as raised:
        materialise("digits")
    message = str(raised.value)
    assert "\n" not in message and f"writing digits to {disk / 'datasets'} (" in message
    assert "MiB free" in message and "IMGCLS_CACHE_DIR" in message
    assert list((disk / "datasets").iterdir()) == []  # neither staging folder nor half a dataset
    assert main(["datasets", "digits"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"imgcls: error: {message}"
    ballast.unlink()
    folder = materialise("digits")
    assert folder == cache_dir() / "datasets" / "digits"
    assert len(list(folder.rglob("*.png"))) == 1797
