"""From file lists to batches: bad images are found up front (cached or not), items are uint8 CHW
tensors, augmentation presets, and seeded loader order."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data import ImageDataset, build_datasets, make_loader
from imgcls.data.loaders import decode_all, find_bad_images, train_transform
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


def test_parallel_decoding_matches_serial(tmp_path):
    # more than one chunk of 64 files, so two worker processes really run
    paths = [save_image(tmp_path / f"{i}.png", COLOURS["red"], i) for i in range(130)]
    paths[70] = str(tmp_path / "missing.png")
    serial, serial_bad = decode_all(paths, 8, "crop", processes=1)
    parallel, parallel_bad = decode_all(paths, 8, "crop", processes=2)
    assert np.array_equal(serial, parallel)
    assert serial_bad.keys() == parallel_bad.keys() == {paths[70]}
    assert (parallel[70] == 0).all()  # a bad image is left as zeros


# --- items ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["on", "off"])
def test_items_are_uint8_chw_of_the_requested_size(image_folder, cache):
    splits, _ = image_folder
    prepared = build_datasets(splits, CLASSES, SIZE, "pad", augment="standard", cache=cache)
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


def test_only_train_is_augmented(image_folder):
    splits, _ = image_folder
    prepared = build_datasets(splits, CLASSES, SIZE, "crop", augment="light", cache="on")
    assert prepared.datasets["train"].transform is not None
    assert prepared.datasets["val"].transform is None


def test_cache_auto_respects_the_memory_budget(image_folder):
    splits, _ = image_folder
    assert build_datasets(splits, CLASSES, SIZE, "crop", cache="auto", cache_max_gib=1.0).cached
    assert not build_datasets(splits, CLASSES, SIZE, "crop", cache="auto", cache_max_gib=1e-9).cached


# --- augmentation --------------------------------------------------------------------------------

@pytest.fixture
def gradient_image():
    """A 3 x 32 x 32 uint8 image with no symmetry: flips and crops change it."""
    rows = torch.arange(32).view(32, 1).expand(32, 32)
    columns = torch.arange(32).view(1, 32).expand(32, 32)
    return torch.stack([rows * 8, columns * 8, (rows + columns) * 4]).to(torch.uint8)


def test_no_augmentation():
    assert train_transform("none", 32) is None


@pytest.mark.parametrize("preset", ["light", "standard"])
def test_augmentation_keeps_shape_and_dtype_and_changes_the_image(gradient_image, preset):
    transform = train_transform(preset, 32)
    torch.manual_seed(0)
    outputs = [transform(gradient_image) for _ in range(8)]
    for output in outputs:
        assert output.shape == (3, 32, 32)
        assert output.dtype == torch.uint8
    assert sum(not torch.equal(output, gradient_image) for output in outputs) >= 6
    assert len({output.numpy().tobytes() for output in outputs}) >= 4  # random, not one fixed change


def test_light_augmentation_only_moves_pixels(gradient_image):
    # flip + reflect-padded crop: no colour change, so every output value is one of the input's values
    transform = train_transform("light", 32)
    torch.manual_seed(0)
    for _ in range(8):
        output = transform(gradient_image)
        assert set(output[0].unique().tolist()) <= set(gradient_image[0].unique().tolist())


def test_standard_augmentation_changes_colours(gradient_image):
    transform = train_transform("standard", 32)
    torch.manual_seed(0)
    original = set(gradient_image[0].unique().tolist())
    assert any(not set(transform(gradient_image)[0].unique().tolist()) <= original for _ in range(8))


def test_augmentation_is_reproducible_under_a_seed(gradient_image):
    transform = train_transform("standard", 32)
    torch.manual_seed(3)
    first = transform(gradient_image)
    torch.manual_seed(3)
    assert torch.equal(transform(gradient_image), first)


def test_unknown_augmentation_preset():
    with pytest.raises(ValueError, match="heavy"):
        train_transform("heavy", 32)


# --- loader order --------------------------------------------------------------------------------

def numbered_dataset(count: int, transform=None) -> ImageDataset:
    """Item i is an image filled with i and has label i, so the order of a loader can be read off."""
    images = np.arange(count, dtype=np.uint8).reshape(count, 1, 1, 1) * np.ones((1, 8, 8, 3), dtype=np.uint8)
    return ImageDataset(paths=[f"{i}.png" for i in range(count)], labels=list(range(count)), size=8,
                        policy="crop", transform=transform, images=images)


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


def test_worker_augmentation_depends_only_on_the_generator_seed():
    # the loop reseeds the generator each epoch; resume is exact only if a worker's random crops and
    # flips come from that seed, not from the global RNG state of the main process
    dataset = numbered_dataset(8, transform=train_transform("standard", 8))
    dataset.images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))

    def batches(seed, global_seed, shuffle=True):
        torch.manual_seed(global_seed)
        loader = make_loader(dataset, 4, workers=1, shuffle=shuffle, generator=seeded(seed))
        return torch.cat([images for images, _ in loader])

    assert torch.equal(batches(5, global_seed=0), batches(5, global_seed=123))
    # in the same order, another seed gives other augmentations
    assert not torch.equal(batches(5, global_seed=0, shuffle=False), batches(6, global_seed=0, shuffle=False))
