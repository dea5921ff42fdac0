"""From lists of files to batches: decoding (in worker processes, into the decoded-image cache on disk
of data/cache.py when it fits, else from the files each epoch), bad-image checks, the datasets, the
class-balanced sampler and the DataLoaders. Augmentation runs on whole batches on the device
(data/augment.py), not here.

Batches are uint8 NCHW tensors: normalisation happens inside the model (see models.ImageClassifier),
so a quarter of the bytes cross from worker processes and to the GPU.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from imgcls.data.images import check_image_size, load_square
from imgcls.errors import ImgclsError
from imgcls.runtime import usable_cores

__all__ = ["ImageDataset", "balanced_sampler", "decode_into", "find_bad_images", "make_loader", "default_workers"]

log = logging.getLogger("imgcls")


def _decode_chunk(args: tuple[list[str], int, str, str | None, int, int]) -> list[tuple[int, str]]:
    """Decode a chunk of files into rows `start...` of the memory-mapped file `target` (or, without a
    target, only check that they decode); runs in a worker process. Returns [(index, reason)] of bad ones."""
    paths, size, policy, target, total, start = args
    images = np.memmap(target, dtype=np.uint8, mode="r+", shape=(total, size, size, 3)) if target else None
    bad = []
    for index, path in enumerate(paths):
        try:
            if images is not None:
                images[start + index] = load_square(path, size, policy)
            else:
                with Image.open(path) as image:
                    # verify() misses truncated JPEG, BMP, TIFF and GIF files: decode instead. draft()
                    # lets JPEGs decode at 1/8 scale (every byte is still read); other formats ignore it
                    image.draft("RGB", (1, 1))
                    image.load()
        except Exception as error:  # PIL raises many types for broken files
            bad.append((index, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"))
    if images is not None:
        images.flush()
    return bad


def _run_chunks(paths: list[str], size: int, policy: str, target: str | None, processes: int,
                what: str) -> dict[str, str]:
    """Run `_decode_chunk` over all paths in parallel processes, with progress; {bad path: reason}."""
    from imgcls.tracking import progress

    chunk = max(64, min(2048, len(paths) // (processes * 8) + 1))
    starts = list(range(0, len(paths), chunk))
    jobs = [(paths[start: start + chunk], size, policy, target, len(paths), start) for start in starts]
    bad = {}
    if processes <= 1 or len(jobs) == 1:
        results = progress(map(_decode_chunk, jobs), total=len(jobs), description=what)
        for start, chunk_bad in zip(starts, results):
            bad.update({paths[start + i]: reason for i, reason in chunk_bad})
        return bad
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        results = progress(pool.map(_decode_chunk, jobs), total=len(jobs), description=what)
        for start, chunk_bad in zip(starts, results):
            bad.update({paths[start + i]: reason for i, reason in chunk_bad})
    return bad


def decode_into(target: str | os.PathLike, paths: list[str], size: int, policy: str, processes: int) -> dict[str, str]:
    """Decode every file to a `size` x `size` uint8 image in row i of the memory-mapped file `target`
    (N x size x size x 3, already created), in parallel processes. Bad images stay zeros.

    Returns {bad path: reason}.
    """
    return _run_chunks(paths, size, policy, str(target), processes, f"decoding {len(paths)} images")


def find_bad_images(paths: list[str], processes: int) -> dict[str, str]:
    """Decode every file once, keeping none, to find the unreadable ones when the images are not cached."""
    return _run_chunks(paths, 0, "crop", None, processes, f"checking {len(paths)} images")


class ImageDataset(Dataset):
    """(uint8 CHW image, class index or multi-hot row) pairs, from the decoded-image cache or from the files
    themselves.

    Augmentation is not done here but on whole batches on the training device (data/augment.py).
    """

    def __init__(self, paths: list[str], labels: list[int], size: int, policy: str,
                 images: np.ndarray | None = None, rows: list[int] | None = None):
        """images: N x size x size x 3 uint8 (a memory map of the cache); rows: the row of `images` that
        holds each path (default: row i for path i)."""
        check_image_size(size)
        labels = torch.as_tensor(labels, dtype=torch.long)
        # class indices, or multi-hot rows (multi-label), which the losses take as float
        self.paths, self.labels = paths, labels.float() if labels.ndim == 2 else labels
        self.size, self.policy = size, policy
        self.images = torch.from_numpy(images) if images is not None else None  # shares the memory map
        self.rows = torch.as_tensor(rows if rows is not None else range(len(paths)), dtype=torch.long)

    @property
    def cached(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> torch.Tensor:
        for attempt in range(len(self.paths)):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                return torch.from_numpy(load_square(path, self.size, self.policy)).permute(2, 0, 1).contiguous()
            except MemoryError:
                raise  # not this file's fault: every other file would fail alike
            except Exception as error:
                # the file changed since it was checked; never stop an epoch for one image
                log.warning(f"skipping unreadable image {path}: {error}")
        raise ImgclsError("no readable image left in the dataset")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is not None:
            return self.images[self.rows[index]].permute(2, 0, 1).contiguous(), self.labels[index]
        return self._read(index), self.labels[index]

    def __getitems__(self, indices: list[int]):
        """A whole batch at once (the DataLoader calls this when it exists): one gather from the
        cache instead of a Python call and a copy per image."""
        if self.images is None:
            return [self[index] for index in indices]
        index = torch.as_tensor(indices)
        return self.images[self.rows[index]].permute(0, 3, 1, 2).contiguous(), self.labels[index]


def _collate(batch):
    if isinstance(batch, tuple):  # already a batch, from the cache
        return batch
    return torch.utils.data.default_collate(batch)


def balanced_sampler(labels: torch.Tensor, generator: torch.Generator) -> torch.utils.data.WeightedRandomSampler:
    """Draw each image with probability proportional to 1 / (its class's count), with replacement: every
    class comes up about equally often, an epoch keeps its usual length."""
    per_image = 1.0 / torch.bincount(labels).double()[labels]
    return torch.utils.data.WeightedRandomSampler(per_image, num_samples=len(labels), replacement=True,
                                                  generator=generator)


def default_workers(cached: bool) -> int:
    """Loader processes. Cached images need none: a batch is one gather from memory, and a loader
    process would take a core from the model (measured on 2 cores: 290 vs 190 img/s, resnet18 at
    64 px). Decoding files needs every core we can spare."""
    cores = len(usable_cores())
    if cached:
        return 0
    return max(1, min(8, cores - 1 if cores > 2 else cores))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one thread per loader process: no oversubscription with the model


def make_loader(dataset: ImageDataset, batch_size: int, workers: int, shuffle: bool,
                generator: torch.Generator | None = None, pin_memory: bool = False,
                sampler: torch.utils.data.Sampler | None = None) -> DataLoader:
    """A DataLoader. For training pass `shuffle=True` and a `generator` that the loop reseeds every epoch
    (seed + epoch): the order then depends only on the epoch, so resume is exact. Under torchrun pass a
    DistributedSampler instead (it shuffles by seed and epoch itself)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        pin_memory=pin_memory,
        drop_last=shuffle and len(dataset) > batch_size,  # no 1-image batch at the end (BatchNorm)
        persistent_workers=False,  # fresh workers each epoch take their seeds from the reseeded generator
        multiprocessing_context="fork" if workers and sys.platform.startswith("linux") else None,
    )
