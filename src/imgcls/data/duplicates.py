"""Copies among a dataset's images: byte-identical files, pixel-identical images (the same picture saved
in another format or with other metadata) and near-duplicates (re-encoded, resized, slightly cropped or
shifted copies), within a split and across splits, where a copy leaks test images into training.

Every file is read once (`scan_files`, in parallel processes): its MD5, the SHA-1 of its decoded pixels,
what its header says and a 32 px grey thumbnail. Near-duplicates are found in two steps:
1. candidates: each thumbnail, less its border colour, as a unit vector (PCA to 64 dimensions); an image's
   nearest neighbours by cosine similarity, over every shift of up to 2 px (1/16 of the side) between splits;
2. verification: both images of a candidate pair at their common size (at most 64 px, grey), the best
   normalised cross-correlation over shifts of up to 8% of the side; a pair at or above `NEAR_CORRELATION`
   is a near-duplicate and its distance is 1 - that correlation.
`cross_split_copies` is the cheap check `imgcls train` makes: files of equal size in different splits, then
their MD5s.
"""

from __future__ import annotations

import hashlib
import io
import math
import multiprocessing
import os
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from imgcls.data.images import _to_rgb

__all__ = ["FileFacts", "scan_files", "find_duplicates", "cross_split_copies", "NEAR_CORRELATION"]

THUMB_SIDE = 32
SHIFT_REACH = 2  # thumbnail pixels: a shift of up to 1/16 of the side between a copy and its original
CANDIDATE_SIMILARITY = 0.95  # thumbnails closer than this are compared at full detail
CANDIDATES = 3  # nearest neighbours per image
VERIFY_SIDE = 64
# Measured on Fashion-MNIST (scripts/plant_problems.py): 96% of JPEG re-encodes (quality 70-95) and 98% of copies
# shifted by 1-2 px and enlarged to 56 px reach 0.992 with their originals; 0.3% of a test image's look-alike training
# images do (plain trousers, mostly). At 0.99 the look-alikes passing were 2.5 times as many.
NEAR_CORRELATION = 0.992
PCA_DIMENSIONS = 64


@dataclass
class FileFacts:
    """What one file is, from reading it once."""

    path: str
    size: int = 0  # bytes
    md5: str = ""
    pixel_hash: str = ""  # SHA-1 of the decoded RGB pixels (after the EXIF rotation) and their shape
    format: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    grey: bool = False  # every pixel has R = G = B
    exif_rotated: bool = False  # an EXIF orientation other than "upright"
    error: str = ""  # why the file is unreadable; empty when it reads


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def _scan(path: str) -> tuple[FileFacts, np.ndarray | None]:
    facts = FileFacts(path)
    try:
        data = open(path, "rb").read()
    except OSError as error:
        facts.error = _reason(error)
        return facts, None
    facts.size, facts.md5 = len(data), hashlib.md5(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            facts.format, (facts.width, facts.height), facts.mode = image.format or "", image.size, image.mode
            facts.exif_rotated = image.getexif().get(0x0112, 1) not in (0, 1)  # 0x0112: Orientation
            upright = ImageOps.exif_transpose(image)
            upright.load()  # decode every byte, so a truncated file fails here, as in training
            rgb = _to_rgb(upright)
    except Exception as error:  # PIL raises many types for broken files
        facts.error = _reason(error)
        return facts, None
    pixels = np.asarray(rgb)
    facts.pixel_hash = hashlib.sha1(pixels.tobytes() + repr(pixels.shape).encode()).hexdigest()
    facts.grey = bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())
    thumbnail = rgb.convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return facts, np.asarray(thumbnail, dtype=np.uint8)


def _scan_chunk(paths: list[str]) -> list[tuple[FileFacts, np.ndarray | None]]:
    return [_scan(path) for path in paths]


def _parallel(function, jobs: list, processes: int, what: str) -> list:
    """`function` over `jobs` in `processes` forked processes (in this one for a single process), in order."""
    from imgcls.tracking import progress

    if processes <= 1 or len(jobs) <= 1:
        return list(progress(map(function, jobs), total=len(jobs), description=what))
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        return list(progress(pool.map(function, jobs), total=len(jobs), description=what))


def _chunks(items: list, processes: int) -> list[list]:
    size = max(32, min(1024, len(items) // (processes * 8) + 1))
    return [items[start: start + size] for start in range(0, len(items), size)]


def scan_files(paths: list[str], processes: int) -> tuple[list[FileFacts], np.ndarray]:
    """Read every file once: its facts, and N x 32 x 32 uint8 grey thumbnails (zeros for unreadable files)."""
    results = [item for chunk in _parallel(_scan_chunk, _chunks(paths, processes), processes,
                                           f"reading {len(paths)} images") for item in chunk]
    thumbnails = np.zeros((len(paths), THUMB_SIDE, THUMB_SIDE), dtype=np.uint8)
    for row, (_, thumbnail) in enumerate(results):
        if thumbnail is not None:
            thumbnails[row] = thumbnail
    return [facts for facts, _ in results], thumbnails


@dataclass
class _Images:
    """The images compared: their files, splits and labels (as text), one row each."""

    paths: list[str]
    splits: list[str]
    labels: list[str]
    facts: list[FileFacts]
    thumbnails: np.ndarray
    groups: list[dict] = field(default_factory=list)

    def group(self, kind: str, rows: list[int], distance: float) -> None:
        self.groups.append({"kind": kind, "paths": [self.paths[r] for r in rows],
                            "splits": [self.splits[r] for r in rows], "labels": [self.labels[r] for r in rows],
                            "distance": distance})


def _descriptors(thumbnails: np.ndarray):
    """The thumbnails as float, less their border colour (the median of their outermost pixels), so that a shift
    brings in background near 0 whatever the background is."""
    import torch

    pixels = torch.from_numpy(thumbnails).float()
    border = torch.cat([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], dim=1).median(dim=1).values
    return pixels - border[:, None, None]


def _unit(flat):
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _near_candidates(images: _Images, rows: list[int]) -> set[tuple[int, int]]:
    """Pairs (row, row) of distinct pixel content whose thumbnails are alike, within and across splits."""
    import torch

    if len(rows) < 2:
        return set()
    pictures = _descriptors(images.thumbnails[rows])
    vectors = _unit(pictures.flatten(1))
    dimensions = min(PCA_DIMENSIONS, len(rows) - 1, vectors.shape[1])
    sample = vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(0))[:10_000]]
    centre = sample.mean(dim=0)
    _, _, basis = torch.pca_lowrank(sample - centre, q=dimensions, center=False)

    def project(flat):
        projected = (_unit(flat) - centre) @ basis
        return projected / projected.norm(dim=1, keepdim=True).clamp_min(1e-6)

    index = project(pictures.flatten(1))
    split_of = np.array([images.splits[r] for r in rows])
    pairs: set[tuple[int, int]] = set()

    def search(queries: np.ndarray, targets: np.ndarray, shifts: list[tuple[int, int]]) -> None:
        target_vectors = index[targets]
        for dy, dx in shifts:
            # roll wraps the far edge round; of the background level after _descriptors, so it matters little
            shifted = project(torch.roll(pictures[queries], (dy, dx), dims=(1, 2)).flatten(1))
            for start in range(0, len(queries), 2048):
                similarity = shifted[start: start + 2048] @ target_vectors.T
                if (dy, dx) == (0, 0) and queries is targets:  # an image is not its own copy
                    similarity[torch.arange(similarity.shape[0]), torch.arange(start, start + similarity.shape[0])] = -1
                values, nearest = similarity.topk(min(CANDIDATES, len(targets)), dim=1)
                for query, target in zip(*np.nonzero(values.numpy() >= CANDIDATE_SIMILARITY)):
                    first, second = rows[queries[start + query]], rows[targets[nearest[query, target]]]
                    pairs.add((min(first, second), max(first, second)))

    splits = sorted(set(split_of))
    for split in splits:
        members = np.flatnonzero(split_of == split)
        search(members, members, [(0, 0)])
    shifts = [(dy, dx) for dy in range(-SHIFT_REACH, SHIFT_REACH + 1) for dx in range(-SHIFT_REACH, SHIFT_REACH + 1)]
    for position, first in enumerate(splits):
        for second in splits[position + 1:]:
            one, other = np.flatnonzero(split_of == first), np.flatnonzero(split_of == second)
            queries, targets = (one, other) if len(one) <= len(other) else (other, one)
            search(queries, targets, shifts)
    return pairs


def _grey_at(path: str, side: int) -> np.ndarray:
    with Image.open(path) as image:
        upright = _to_rgb(ImageOps.exif_transpose(image)).convert("L")
        return np.asarray(upright.resize((side, side), Image.Resampling.BOX if min(upright.size) >= side
                                         else Image.Resampling.BICUBIC), dtype=np.float32)


def correlations(first, second, reach: int):
    """The best normalised cross-correlation of each pair of equal-sized grey images (two N x S x S tensors)
    over shifts of up to `reach` pixels, each over the part the two images share."""
    import torch

    side = first.shape[-1]
    best = torch.full((first.shape[0],), -1.0)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            one = first[:, max(0, dy): side + min(0, dy), max(0, dx): side + min(0, dx)].flatten(1)
            other = second[:, max(0, -dy): side + min(0, -dy), max(0, -dx): side + min(0, -dx)].flatten(1)
            one, other = one - one.mean(dim=1, keepdim=True), other - other.mean(dim=1, keepdim=True)
            scale = (one.pow(2).sum(dim=1) * other.pow(2).sum(dim=1)).sqrt()
            score = torch.where(scale > 0, (one * other).sum(dim=1) / scale.clamp_min(1e-12), -1.0)
            best = torch.maximum(best, score)
    return best


def _load_grey_chunk(jobs: list[tuple[str, int]]) -> list[np.ndarray | None]:
    loaded = []
    for path, side in jobs:
        try:
            loaded.append(_grey_at(path, side))
        except Exception:  # noqa: BLE001 - a file that changed since the scan is no duplicate
            loaded.append(None)
    return loaded


def _verify(images: _Images, candidates: list[tuple[int, int]], processes: int) -> list[float]:
    """The correlation of each candidate pair at their common size (-1 where a file cannot be read now)."""
    import torch

    facts = images.facts
    side_of = lambda row: min(VERIFY_SIDE, facts[row].width, facts[row].height)  # noqa: E731
    common = [min(side_of(first), side_of(second)) for first, second in candidates]
    # each image at each side it is compared at, decoded from its file (a resized copy is compared with its
    # original made as small as the copy, not the other way round)
    jobs = sorted({(row, side) for pair, side in zip(candidates, common) for row in pair})
    loaded = [array for chunk in _parallel(_load_grey_chunk, _chunks([(images.paths[row], side) for row, side in jobs],
                                                                        processes), processes,
                                           f"comparing {len(candidates)} look-alike pairs") for array in chunk]
    grey = dict(zip(jobs, loaded))
    scores = [-1.0] * len(candidates)
    by_side: dict[int, list[int]] = defaultdict(list)
    for number, ((first, second), side) in enumerate(zip(candidates, common)):
        if grey[first, side] is not None and grey[second, side] is not None:
            by_side[side].append(number)

    for side, numbers in by_side.items():
        for start in range(0, len(numbers), 4096):
            batch = numbers[start: start + 4096]
            first = torch.stack([torch.from_numpy(grey[candidates[n][0], side]) for n in batch])
            second = torch.stack([torch.from_numpy(grey[candidates[n][1], side]) for n in batch])
            for number, score in zip(batch, correlations(first, second, max(1, math.ceil(0.08 * side))).tolist()):
                scores[number] = score
    return scores


def find_duplicates(paths: list[str], splits: list[str], labels: list[str], facts: list[FileFacts],
                    thumbnails: np.ndarray, processes: int = 1) -> list[dict]:
    """Groups of copies, each {"kind": "exact" | "pixel" | "near", "paths", "splits", "labels", "distance"}:
    exact, files of the same bytes; pixel, files of different bytes that decode to the same pixels; near,
    two images of different pixels whose correlation reaches `NEAR_CORRELATION` (distance = 1 - it).
    Exact and pixel groups hold every copy; a near-duplicate is a pair. Unreadable files can only be exact."""
    images = _Images(paths, splits, labels, facts, thumbnails)
    by_pixels: dict[str, list[int]] = defaultdict(list)
    by_bytes: dict[str, list[int]] = defaultdict(list)
    for row, item in enumerate(facts):
        if item.pixel_hash:
            by_pixels[item.pixel_hash].append(row)
        elif item.md5:
            by_bytes[item.md5].append(row)
    for rows in [*by_pixels.values(), *by_bytes.values()]:
        if len(rows) > 1:
            images.group("exact" if len({facts[r].md5 for r in rows}) == 1 else "pixel", rows, 0.0)
    # one image per distinct picture: its copies are in a group already
    distinct = [rows[0] for rows in by_pixels.values()]
    candidates = sorted(_near_candidates(images, distinct))
    scores = _verify(images, candidates, processes)
    for (first, second), score in zip(candidates, scores):
        if score >= NEAR_CORRELATION:
            images.group("near", [first, second], round(1.0 - score, 5))
    order = {"exact": 0, "pixel": 1, "near": 2}
    images.groups.sort(key=lambda group: (len(set(group["splits"])) == 1, order[group["kind"]], group["distance"]))
    return images.groups


def cross_split_copies(splits: dict[str, list[tuple[str, object]]]) -> list[list[tuple[str, str]]]:
    """Byte-identical files in different splits, as groups of (path, split): files of equal size in two or more
    splits, then their MD5s. Cheap (one stat per file, and reading only the few files that share a size)."""
    by_size: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for split, samples in splits.items():
        for path, _ in samples:
            try:
                by_size[os.stat(path).st_size].append((path, split))
            except OSError:
                continue  # the data loader reports unreadable files
    groups = []
    for members in by_size.values():
        if len({split for _, split in members}) < 2:
            continue
        by_hash: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for path, split in members:
            try:
                by_hash[hashlib.md5(open(path, "rb").read()).hexdigest()].append((path, split))
            except OSError:
                continue
        groups += [copies for copies in by_hash.values() if len({split for _, split in copies}) > 1]
    return groups
