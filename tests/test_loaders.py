"""From file lists to batches: bad images are found up front (cached or not), items are uint8 CHW
tensors, and seeded loader order (augmentation: test_augment.py)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data import ImageDataset, build_datasets, make_loader
from imgcls.data.cache import build_cache, cache_key, open_cache
from imgcls.data.loaders import decode_into, find_bad_images
from imgcls.errors import ImgclsError

SIZE = 16
CLASSES = ["blue", "red"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def save_image(path: Path, colour, seed: int) -> str:
    """A 24 x 20 image of one colour with a little noise, so no two files are identical."""
    noise = np.random.default_rng(seed).integers(-20, 21, (20, 24, 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def image_folder(tmp_path):
    """{split: [(path, class)]} over red and blue PNGs and JPEGs, with one zero-byte .png and one
    truncated .jpg hidden among the training images. Returns (splits, bad paths)."""
    splits = {"train": [], "val": []}
    seed = 0
    for class_name in CLASSES:
        folder = tmp_path / class_name
        folder.mkdir()
        for index in range(6):
            seed += 1
            suffix = ".jpg" if index % 2 else ".png"
            split = "val" if index >= 4 else "train"
            splits[split].append((save_image(folder / f"{index}{suffix}", COLOURS[class_name], seed), class_name))
    zero_byte = tmp_path / "red" / "empty.png"
    zero_byte.write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(99).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated = tmp_path / "blue" / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    splits["train"].insert(2, (str(zero_byte), "red"))
    splits["train"].append((str(truncated), "blue"))
    return splits, {str(zero_byte), str(truncated)}


# --- bad images ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["on", "off"])
def test_skip_leaves_bad_images_out_and_reports_them(image_folder, cache):
    splits, bad_paths = image_folder
    prepared = build_datasets(splits, CLASSES, SIZE, "crop", cache=cache, on_bad_image="skip")
    assert prepared.cached == (cache == "on")
    assert set(prepared.bad_images) == bad_paths
    assert all(reason for reason in prepared.bad_images.values())  # each comes with why
    train = prepared.datasets["train"]
    assert len(train) == 8
    assert not bad_paths & set(train.paths)
    assert len(prepared.datasets["val"]) == 4
    # labels stay aligned with their paths after the bad ones are removed
    for path, label in zip(train.paths, train.labels.tolist()):
        assert CLASSES[label] == Path(path).parent.name


@pytest.mark.parametrize("cache", ["on", "off"])
def test_fail_names_a_bad_path(image_folder, cache):
    splits, bad_paths = image_folder
    with pytest.raises(ImgclsError, match="data.on_bad_image=skip") as error:
        build_datasets(splits, CLASSES, SIZE, "crop", cache=cache, on_bad_image="fail")
    message = str(error.value)
    assert "2 unreadable" in message
    assert all(path in message for path in bad_paths)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".bmp", ".tiff", ".gif", ".webp"])
def test_uncached_check_finds_truncated_files(tmp_path, suffix):
    # Image.verify() alone passes truncated JPEG, BMP, TIFF and GIF files
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buffer, Image.registered_extensions()[suffix])
    truncated, whole = tmp_path / f"truncated{suffix}", tmp_path / f"whole{suffix}"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    whole.write_bytes(buffer.getvalue())
    assert set(find_bad_images([str(whole), str(truncated)], processes=1)) == {str(truncated)}


def test_a_split_with_no_readable_image(tmp_path):
    good = [(save_image(tmp_path / f"{i}.png", COLOURS["red"], i), "red") for i in range(2)]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImgclsError, match="val split has no readable images"):
        build_datasets({"train": good, "val": [(str(empty), "red")]}, CLASSES, SIZE, "crop", cache="on")



def test_an_image_size_too_large_to_decode_is_one_error_before_any_decoding(image_folder):
    paths = [path for path, _ in image_folder[0]["val"]]
    with pytest.raises(ImgclsError) as error:  # not a MemoryError (or the OOM killer) per image
        ImageDataset(paths, [0] * len(paths), size=100_000, policy="crop")
    message = str(error.value)
    assert message.startswith("data.image_size=100000: decoding one image at that size takes 27.9 GiB of memory")
    assert "use at most 1024" in message and "\n" not in message
    assert ImageDataset(paths, [0] * len(paths), size=1024, policy="crop")[0][0].shape == (3, 1024, 1024)

def test_parallel_decoding_matches_serial(tmp_path):
    # more than one chunk of 64 files, so two worker processes really run
    paths = [save_image(tmp_path / f"{i}.png", COLOURS["red"], i) for i in range(130)]
    paths[70] = str(tmp_path / "missing.png")
    results = []
    for processes in (1, 2):
        target = tmp_path / f"decoded-{processes}.u8"
        np.memmap(target, dtype=np.uint8, mode="w+", shape=(130, 8, 8, 3)).flush()
        bad = decode_into(target, paths, 8, "crop", processes)
        results.append((np.array(np.memmap(target, dtype=np.uint8, mode="r", shape=(130, 8, 8, 3))), bad))
    (serial, serial_bad), (parallel, parallel_bad) = results
    assert np.array_equal(serial, parallel)
    assert serial_bad.keys() == parallel_bad.keys() == {paths[70]}
    assert (parallel[70] == 0).all()  # a bad image is left as zeros
    assert serial[0].any()


# --- the decoded-image cache on disk -------------------------------------------------------------

def test_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    paths = [save_image(tmp_path / f"{i}.png", COLOURS["blue"], i) for i in range(5)]
    assert open_cache(paths, 8, "crop") is None
    images, bad = build_cache(paths, 8, "crop", processes=1)
    assert images.shape == (5, 8, 8, 3) and not bad
    again, _ = open_cache(paths, 8, "crop")
    assert np.array_equal(again, images)
    folder = tmp_path / "cache" / "decoded" / cache_key(paths, 8, "crop")
    assert (folder / "images.u8").stat().st_size == 5 * 8 * 8 * 3
    assert not any(p.name.endswith(".staging") for p in folder.parent.iterdir())  # no leftovers


def test_a_changed_file_or_size_never_gets_a_stale_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    paths = [save_image(tmp_path / f"{i}.png", COLOURS["blue"], i) for i in range(3)]
    build_cache(paths, 8, "crop", processes=1)
    assert open_cache(paths, 16, "crop") is None  # another training size
    assert open_cache(paths, 8, "pad") is None  # another resize policy
    assert open_cache(paths[:2], 8, "crop") is None  # another file list
    import os

    stat = os.stat(paths[1])
    save_image(Path(paths[1]), COLOURS["red"], 1)  # rewritten in place: new contents
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert open_cache(paths, 8, "crop") is None


def test_cache_lives_outside_the_dataset_folder(image_folder, tmp_path, tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(cache))
    splits, _ = image_folder
    before = sorted(tmp_path.rglob("*"))  # the images are under tmp_path
    assert build_datasets(splits, CLASSES, SIZE, "crop", cache="on").cached
    assert sorted(tmp_path.rglob("*")) == before
    assert list((cache / "decoded").iterdir())


# --- items ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["on", "off"])
def test_items_are_uint8_chw_of_the_requested_size(image_folder, cache):
    splits, _ = image_folder
    prepared = build_datasets(splits, CLASSES, SIZE, "pad", cache=cache)
    for dataset in prepared.datasets.values():
        image, label = dataset[0]
        assert image.dtype == torch.uint8
        assert image.shape == (3, SIZE, SIZE)
        assert image.is_contiguous()
        assert label.dtype == torch.long and label.ndim == 0


def test_cached_and_uncached_items_are_identical(image_folder):
    splits, _ = image_folder
    cached = build_datasets(splits, CLASSES, SIZE, "crop", cache="on").datasets["val"]
    uncached = build_datasets(splits, CLASSES, SIZE, "crop", cache="off").datasets["val"]
    assert cached.images is not None and uncached.images is None
    for index in range(len(cached)):
        assert torch.equal(cached[index][0], uncached[index][0])
        assert cached[index][1] == uncached[index][1]


def test_items_show_the_image(image_folder):
    splits, _ = image_folder
    dataset = build_datasets(splits, CLASSES, SIZE, "crop", cache="on").datasets["val"]
    for index in range(len(dataset)):
        image, label = dataset[index]
        red, blue = image[0].float().mean(), image[2].float().mean()
        assert (red > blue) == (CLASSES[label] == "red")


def test_cache_auto_respects_the_memory_budget(image_folder):
    splits, _ = image_folder
    assert build_datasets(splits, CLASSES, SIZE, "crop", cache="auto", cache_max_gib=1.0).cached
    assert not build_datasets(splits, CLASSES, SIZE, "crop", cache="auto", cache_max_gib=1e-9).cached


# --- loader order --------------------------------------------------------------------------------

def numbered_dataset(count: int) -> ImageDataset:
    """Item i is an image filled with i and has label i, so the order of a loader can be read off."""
    images = np.arange(count, dtype=np.uint8).reshape(count, 1, 1, 1) * np.ones((1, 8, 8, 3), dtype=np.uint8)
    return ImageDataset(paths=[f"{i}.png" for i in range(count)], labels=list(range(count)), size=8,
                        policy="crop", images=images)


def order(loader) -> list[int]:
    return [label for _, labels in loader for label in labels.tolist()]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_order_other_seed_other_order():
    dataset = numbered_dataset(40)
    first = order(make_loader(dataset, 8, workers=0, shuffle=True, generator=seeded(1)))
    again = order(make_loader(dataset, 8, workers=0, shuffle=True, generator=seeded(1)))
    other = order(make_loader(dataset, 8, workers=0, shuffle=True, generator=seeded(2)))
    assert first == again
    assert first != other
    assert sorted(first) == sorted(other) == list(range(40))  # a permutation, nothing lost


def test_training_loader_drops_the_last_partial_batch():
    # a 1-image last batch breaks BatchNorm in training
    batches = list(make_loader(numbered_dataset(10), 4, workers=0, shuffle=True, generator=seeded(0)))
    assert [len(labels) for _, labels in batches] == [4, 4]


def test_evaluation_loader_keeps_order_and_every_item():
    loader = make_loader(numbered_dataset(10), 4, workers=0, shuffle=False)
    assert order(loader) == list(range(10))
    images, _ = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert images[3].unique().tolist() == [3]  # item 3's pixels, not another item's


def test_cached_batches_equal_item_by_item_batches():
    # the cache serves a batch with one gather (__getitems__); it must match the per-item path
    dataset = numbered_dataset(12)
    dataset.images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    images, labels = next(iter(make_loader(dataset, 5, workers=0, shuffle=True, generator=seeded(4))))
    for image, label in zip(images, labels.tolist()):
        assert torch.equal(image, dataset[label][0])
