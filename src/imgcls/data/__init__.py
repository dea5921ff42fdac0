"""Data: sources (folders, CSV, packaged datasets), splits, decoding and loaders.

The torch-based parts (loaders, augmentation) load on first use (PEP 562): `imgcls.data.images`, the
decoding that an ONNX model's predictions share with training, must not import torch.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING

from imgcls.data.images import image_size_of, load_image, load_square
from imgcls.data.cache import build_cache, cache_bytes, cached_paths, open_cache
from imgcls.data.packaged import PACKAGED, cache_dir, materialise
from imgcls.data.sources import (
    DataSource, assign_splits, read_splits_csv, resolve_source, subsample_train, write_splits_csv,
)
from imgcls.errors import ImgclsError

if TYPE_CHECKING:
    from imgcls.data.loaders import ImageDataset

__all__ = [
    "DataSource", "ImageDataset", "build_augment", "PACKAGED", "PreparedSplits", "assign_splits", "build_datasets", "cache_dir",
    "load_image", "load_square", "make_loader", "materialise", "median_side", "read_splits_csv", "resolve_source",
    "write_splits_csv", "default_workers", "subsample_train", "balanced_sampler", "channel_statistics",
]

log = logging.getLogger("imgcls")

# name -> the torch-based module that defines it, imported when first asked for
_LAZY = {"build_augment": "imgcls.data.augment", "ImageDataset": "imgcls.data.loaders",
         "balanced_sampler": "imgcls.data.loaders", "default_workers": "imgcls.data.loaders",
         "find_bad_images": "imgcls.data.loaders", "make_loader": "imgcls.data.loaders"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'imgcls.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


@dataclass
class PreparedSplits:
    datasets: dict[str, ImageDataset]
    bad_images: dict[str, str] = field(default_factory=dict)
    cached: bool = False


def channel_statistics(dataset: ImageDataset, sample: int = 5000, seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (0..1 scale) of up to `sample` training images, for
    normalising a model trained from scratch on its own data (pretrained models keep the statistics
    their weights were trained with). A constant channel gets std 1 instead of 0."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:sample].tolist()
    sums, squares, pixels = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for start in range(0, len(indices), 256):
        batch = dataset.__getitems__(indices[start: start + 256])
        images = batch[0] if isinstance(batch, tuple) else torch.stack([image for image, _ in batch])
        values = images.double().div_(255.0)
        sums += values.sum(dim=(0, 2, 3))
        squares += values.pow(2).sum(dim=(0, 2, 3))
        pixels += values.shape[0] * values.shape[2] * values.shape[3]
    mean = sums / pixels
    std = (squares / pixels - mean.pow(2)).clamp_min(0).sqrt()
    std = torch.where(std < 1e-3, torch.ones_like(std), std)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def median_side(paths: list[str], sample: int = 200) -> int:
    """Median shorter side of (up to `sample` evenly spread) images, read from file headers."""
    step = max(1, len(paths) // sample)
    sizes = [size for size in (image_size_of(p) for p in paths[::step]) if size]
    if not sizes:
        raise ImgclsError(f"none of the {len(paths[::step])} images sampled from the training data could be read")
    return int(median(min(size) for size in sizes))


def _processes() -> int:
    from imgcls.runtime import usable_cores

    return len(usable_cores())


def _free_gib(folder: Path) -> float:
    """Free space on the disk that holds `folder` (or would: its first existing parent), GiB."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free / 2**30


# the bad files already reported to each log destination (a run's log.txt; () for the console alone):
# training, calibration and the final evaluation of a run each build datasets of the same files
_reported: dict[tuple[str, ...], set[str]] = {}


def _report_bad(bad: dict[str, str], on_bad_image: str) -> None:
    """Raise (data.on_bad_image=fail) or warn about unreadable files, once per run for the same files."""
    if not bad:
        return
    listing = "; ".join(f"{path} ({reason})" for path, reason in list(bad.items())[:10])
    more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
    if on_bad_image == "fail":
        raise ImgclsError(f"{len(bad)} unreadable image(s): {listing}{more}; fix or remove them, or set data.on_bad_image=skip")
    destination = tuple(handler.baseFilename for handler in log.handlers if isinstance(handler, logging.FileHandler))
    reported = _reported.setdefault(destination, set())
    if not bad.keys() <= reported:
        reported.update(bad)
        log.warning(f"left out {len(bad)} unreadable image(s): {listing}{more}")


def build_datasets(splits: dict[str, list[tuple[str, str]]], class_names: list[str], size: int, policy: str,
                   cache: str = "auto", cache_max_gib: float = 20.0, on_bad_image: str = "skip",
                   task: str = "single") -> PreparedSplits:
    """Datasets for each split, labels indexed by `class_names` (class indices, or multi-hot rows for
    task="multi": see imgcls.tasks).

    With the decoded-image cache (cache=on, or auto when it fits `cache_max_gib` of disk), every file is
    decoded once (once ever, while the files do not change) and batches are read from a memory map;
    otherwise every file is checked up front and decoded each time it is used. A damaged cache is built
    again (one warning); a cache that does not fit on the disk is an error with cache=on, a warning and
    decoding from files with auto.
    Unreadable files are reported together and left out (or raise, with on_bad_image=fail).
    """
    from imgcls.data.loaders import ImageDataset, find_bad_images
    from imgcls.tasks import get_task

    paths = cached_paths(splits)
    gib = cache_bytes(len(paths), size) / 2**30
    use_cache = cache == "on" or (cache == "auto" and gib <= cache_max_gib)
    if cache == "auto" and not use_cache:
        log.info(f"decoding from files each epoch: the decoded images would take {gib:.1f} GiB > data.cache_max_gib")
    images = None
    if use_cache:
        found = open_cache(paths, size, policy)
        if found is None and cache == "auto" and gib > 0.9 * _free_gib(cache_dir()):  # leave room for checkpoints
            log.warning(f"the decoded-image cache would take {gib:.1f} GiB and {cache_dir()} has "
                        f"{_free_gib(cache_dir()):.1f} GiB free; decoding from files instead")
        elif found is None:
            try:
                found = build_cache(paths, size, policy, _processes())
            except ImgclsError as error:
                if cache == "on":
                    raise
                log.warning(f"{error}; decoding from files instead")
        if found is not None:
            images, bad = found
    if images is None:
        bad = find_bad_images(paths, _processes())
    _report_bad(bad, on_bad_image)
    row_of = {path: row for row, path in enumerate(paths)}
    datasets = {}
    for split, samples in splits.items():
        keep = [(path, label) for path, label in samples if path not in bad]
        if not keep:
            raise ImgclsError(f"the {split} split has no readable images")
        datasets[split] = ImageDataset(
            paths=[path for path, _ in keep],
            labels=get_task(task).targets([label for _, label in keep], class_names),
            size=size,
            policy=policy,
            images=images,
            rows=[row_of[path] for path, _ in keep],
        )
    return PreparedSplits(datasets=datasets, bad_images=bad, cached=images is not None)
