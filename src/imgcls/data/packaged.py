"""Packaged datasets, written once as PNG image folders in the cache so they take the same code path
as a user's own folder.

The cache folder is `$IMGCLS_CACHE_DIR`, else `$XDG_CACHE_HOME/imgcls`, else `~/.cache/imgcls`.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from imgcls.errors import ImgclsError

__all__ = ["PACKAGED", "atomic_folder", "cache_dir", "materialise"]

log = logging.getLogger("imgcls")

FASHION_MNIST_CLASSES = [
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")

# name -> one-line description, shown by `imgcls datasets`
PACKAGED = {
    "fashion-mnist": "Fashion-MNIST: 60,000 train + 10,000 test 28x28 greyscale clothing images, 10 classes",
    "digits": "scikit-learn digits: 1,797 8x8 greyscale handwritten digits, 10 classes (80/20 train/test)",
}


def cache_dir() -> Path:
    if os.environ.get("IMGCLS_CACHE_DIR"):
        return Path(os.environ["IMGCLS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgcls"


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion_mnist_arrays() -> Iterator[tuple[str, np.ndarray, np.ndarray, list[str]]]:
    files = {"train": "train", "test": "t10k"}
    if (FASHION_MNIST_DEBIAN / "train-images-idx3-ubyte.gz").exists():
        folder = FASHION_MNIST_DEBIAN
        for split, stem in files.items():
            images = _read_idx(folder / f"{stem}-images-idx3-ubyte.gz")
            labels = _read_idx(folder / f"{stem}-labels-idx1-ubyte.gz")
            yield split, images, labels, FASHION_MNIST_CLASSES
        return
    try:  # online machines: torchvision's download
        from torchvision.datasets import FashionMNIST

        for split in files:
            dataset = FashionMNIST(str(cache_dir() / "downloads"), train=split == "train", download=True)
            yield split, dataset.data.numpy(), dataset.targets.numpy(), FASHION_MNIST_CLASSES
    except Exception as error:
        from imgcls.checkpoint import is_disk_full

        if is_disk_full(error):  # not a missing dataset: atomic_folder says how full the disk is
            raise
        raise ImgclsError(
            "Fashion-MNIST is not on this machine and could not be downloaded; "
            "install it with: sudo apt-get install dataset-fashion-mnist"
        ) from error


def _digits_arrays() -> Iterator[tuple[str, np.ndarray, np.ndarray, list[str]]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    labels = digits.target
    # a fixed stratified 80/20 split (seed 0) so that every run reports test accuracy on the same images
    rng = np.random.default_rng(0)
    is_test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        is_test[members[: round(len(members) * 0.2)]] = True
    names = [str(i) for i in range(10)]
    yield "train", images[~is_test], labels[~is_test], names
    yield "test", images[is_test], labels[is_test], names


BUILDERS: dict[str, Callable[[], Iterator]] = {"fashion-mnist": _fashion_mnist_arrays, "digits": _digits_arrays}


@contextmanager
def atomic_folder(target: Path, needed: int | None = None,
                  advice: str = "free some space there or set IMGCLS_CACHE_DIR to a folder on a bigger disk"
                  ) -> Iterator[Path]:
    """A staging folder beside `target` to fill in the `with` block, renamed to `target` at its end.

    Other processes see either no `target` or a complete one. Whatever stops the block (an error,
    Ctrl-C, a full disk) removes the staging folder; a process killed outright leaves only a hidden
    `.<name>.*.staging` folder, which nothing reads. When another process (a torchrun rank, a parallel
    run) renamed its own copy first, that copy is kept and this one dropped.

    Args:
        target: the folder to create; its parent is created when missing.
        needed: bytes the contents take, when known, for the disk-full message.
        advice: what to do when the disk is full.

    Raises:
        DiskFullError: the disk filled up (ENOSPC or EDQUOT): one line saying what, where, how much
            is free there once the staging folder is gone, and `advice`.
    """
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
        yield staging
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(staging)  # another process finished first
    except BaseException as error:
        from imgcls.checkpoint import DiskFullError, is_disk_full

        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)  # before measuring the free space
        if is_disk_full(error):
            raise DiskFullError(target, needed, advice) from error
        raise


def materialise(name: str) -> Path:
    """Write the packaged dataset `name` as `<cache>/datasets/<name>/{train,test}/<class>/<n>.png`, once.

    Returns:
        The folder. It is written in a staging folder and renamed (`atomic_folder`), so an interrupted
        or failed write never leaves half a dataset behind.

    Raises:
        ImgclsError: an unknown name, or the disk is full (the message says how much is free).
    """
    from PIL import Image

    if name not in BUILDERS:
        raise ImgclsError(f"unknown packaged dataset '{name}'; available: {', '.join(sorted(PACKAGED))}")
    target = cache_dir() / "datasets" / name
    if (target / ".complete").exists():
        return target
    log.info(f"writing {name} as PNG files to {target} (once)")
    with atomic_folder(target) as staging:
        for split, images, labels, class_names in BUILDERS[name]():
            for class_name in class_names:
                (staging / split / class_name).mkdir(parents=True, exist_ok=True)
            for index, (image, label) in enumerate(zip(images, labels)):
                Image.fromarray(image).save(staging / split / class_names[label] / f"{index:05d}.png", compress_level=1)
        (staging / ".complete").write_text("ok\n")
        if target.exists() and not (target / ".complete").exists():  # half written by an older imgcls: replace it
            shutil.rmtree(target, ignore_errors=True)
    return target
