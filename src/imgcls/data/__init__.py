"""Data: sources (folders, CSV, packaged datasets), splits, decoding and loaders."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from statistics import median

from imgcls.data.images import image_size_of, load_image, load_square
from imgcls.data.augment import build_augment
from imgcls.data.loaders import ImageDataset, decode_all, default_workers, find_bad_images, make_loader
from imgcls.data.packaged import PACKAGED, cache_dir, materialise
from imgcls.data.sources import DataSource, assign_splits, read_splits_csv, resolve_source, write_splits_csv
from imgcls.errors import ImgclsError

__all__ = [
    "DataSource", "ImageDataset", "build_augment", "PACKAGED", "PreparedSplits", "assign_splits", "build_datasets", "cache_dir",
    "load_image", "load_square", "make_loader", "materialise", "median_side", "read_splits_csv", "resolve_source",
    "write_splits_csv", "default_workers",
]

log = logging.getLogger("imgcls")


@dataclass
class PreparedSplits:
    datasets: dict[str, ImageDataset]
    bad_images: dict[str, str] = field(default_factory=dict)
    cached: bool = False


def median_side(paths: list[str], sample: int = 200) -> int:
    """Median shorter side of (up to `sample` evenly spread) images, read from file headers."""
    step = max(1, len(paths) // sample)
    sizes = [size for size in (image_size_of(p) for p in paths[::step]) if size]
    if not sizes:
        raise ImgclsError(f"none of the {len(paths[::step])} images sampled from the training data could be read")
    return int(median(min(size) for size in sizes))


def _processes() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _report_bad(bad: dict[str, str], on_bad_image: str) -> None:
    if not bad:
        return
    listing = "; ".join(f"{path} ({reason})" for path, reason in list(bad.items())[:10])
    more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
    if on_bad_image == "fail":
        raise ImgclsError(f"{len(bad)} unreadable image(s): {listing}{more}; fix or remove them, or set data.on_bad_image=skip")
    log.warning(f"left out {len(bad)} unreadable image(s): {listing}{more}")


def build_datasets(splits: dict[str, list[tuple[str, str]]], class_names: list[str], size: int, policy: str,
                   cache: str = "auto", cache_max_gib: float = 4.0, on_bad_image: str = "skip") -> PreparedSplits:
    """Datasets for each split, labels indexed by `class_names`.

    Every file is decoded once up front when the decoded images fit `cache_max_gib` (cache=auto) or
    when cache=on; otherwise every file is checked up front and decoded on each use.
    Unreadable files are reported together and left out (or raise, with on_bad_image=fail).
    """
    index = {name: i for i, name in enumerate(class_names)}
    paths = [path for samples in splits.values() for path, _ in samples]
    decoded_gib = len(paths) * size * size * 3 / 2**30
    use_cache = cache == "on" or (cache == "auto" and decoded_gib <= cache_max_gib)
    if cache == "auto" and not use_cache:
        log.info(f"not caching decoded images: {decoded_gib:.1f} GiB > data.cache_max_gib={cache_max_gib}")
    if use_cache:
        images, bad = decode_all(paths, size, policy, _processes())
    else:
        images, bad = None, find_bad_images(paths, _processes())
    _report_bad(bad, on_bad_image)
    datasets, start = {}, 0
    for split, samples in splits.items():
        keep = [i for i, (path, _) in enumerate(samples) if path not in bad]
        split_images = None
        if images is not None:  # a view when nothing was left out, a copy otherwise
            whole = len(keep) == len(samples)
            split_images = images[start: start + len(samples)] if whole else images[[start + i for i in keep]]
        start += len(samples)
        if not keep:
            raise ImgclsError(f"the {split} split has no readable images")
        datasets[split] = ImageDataset(
            paths=[samples[i][0] for i in keep],
            labels=[index[samples[i][1]] for i in keep],
            size=size,
            policy=policy,
            images=split_images,
        )
    return PreparedSplits(datasets=datasets, bad_images=bad, cached=use_cache)
