"""The decoded-image cache: every image decoded once, resized to the training size, stored as one
memory-mapped uint8 array on disk in the cache folder (never inside the user's dataset folder).

The key covers the file list with each file's size and modification time, the image size and the
resize policy: a changed, added or removed file gives a new key, so a stale cache is never served.
Later runs on the same data start at once; the operating system's page cache keeps the array in
memory, shared by every process (loader workers, torchrun ranks).

An entry is the folder `decoded/<key>/` holding `images.u8` (N x size x size x 3) and `meta.json`.
It is checked on every open against hashes recorded when it was built (`check_entry`); a damaged
entry is reported in one warning and built again, never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from imgcls.data.packaged import atomic_folder, cache_dir

__all__ = [
    "cache_key", "cache_folder", "cached_paths", "open_cache", "build_cache", "cache_bytes", "cache_entries",
    "check_entry", "remove_entry",
]

log = logging.getLogger("imgcls")

FORMAT = 2  # bump when the decoding or meta.json changes, so old caches are not reused (2: content hashes)

# The check on every open hashes SAMPLE_BLOCKS blocks spread evenly over images.u8: 1 MiB read whatever
# the cache size (measured on a 1 GiB cache: 2 ms from the page cache, 25-45 ms from disk).
SAMPLE_BLOCKS = 256
BLOCK_BYTES = 4096


def cache_bytes(count: int, size: int) -> int:
    return count * size * size * 3


def cache_key(paths: list[str], size: int, policy: str) -> str:
    digest = hashlib.sha256(f"imgcls-cache {FORMAT} {size} {policy}\n".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\tmissing\n".encode())
    return digest.hexdigest()[:24]


def cached_paths(splits: dict[str, list[tuple[str, str]]]) -> list[str]:
    """The files a cache holds for these splits: sorted, whatever the split, so that another seed or
    split of the same files reuses it."""
    return sorted({path for samples in splits.values() for path, _ in samples})


def cache_folder(paths: list[str], size: int, policy: str) -> Path:
    """The entry for exactly these files at this size and resize policy, whether it exists or not."""
    return cache_dir() / "decoded" / cache_key(paths, size, policy)


def cache_entries() -> list[Path]:
    """Every entry in the cache folder, whole or damaged (hidden staging folders of builds in progress
    are not entries)."""
    decoded = cache_dir() / "decoded"
    if not decoded.is_dir():
        return []
    return sorted(path for path in decoded.iterdir() if path.is_dir() and not path.name.startswith("."))


def _digest(filename: Path, nbytes: int, sampled: bool) -> str:
    """sha256 of the whole file, or (sampled) of SAMPLE_BLOCKS blocks of BLOCK_BYTES spread evenly over it."""
    block = BLOCK_BYTES if sampled else 16 * 2**20
    step = max(BLOCK_BYTES, nbytes // SAMPLE_BLOCKS) if sampled else block
    digest = hashlib.sha256()
    with open(filename, "rb") as handle:
        for offset in range(0, nbytes, step):
            handle.seek(offset)
            digest.update(handle.read(block))
    return digest.hexdigest()


def check_entry(folder: Path, thorough: bool = False) -> str | None:
    """What is wrong with the cache entry `folder`, or None when it is whole.

    The quick check (every open) compares the size of images.u8 and the hash of its sampled blocks
    with those recorded at build time. It catches a missing, truncated or replaced file and any
    damaged stretch longer than the gap between two sampled blocks (1/256 of the file: 40 MiB of a
    10 GiB cache); it misses a few bytes changed between sampled blocks. `thorough` (`imgcls cache
    --verify`) also hashes the whole file, which catches any change, at the cost of reading every byte.
    """
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta["format"] != FORMAT:
            return f"stale: written by an older imgcls (cache format {meta['format']}, now {FORMAT})"
        expected = cache_bytes(meta["count"], meta["size"])
        sample_hash, whole_hash = meta["sample_sha256"], meta["sha256"]
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"meta.json is unreadable ({type(error).__name__}: {error})"
    filename = folder / "images.u8"
    try:
        actual = filename.stat().st_size
        if actual != expected:
            return f"images.u8 is {actual:,} bytes instead of {expected:,}"
        if _digest(filename, expected, sampled=True) != sample_hash:
            return "images.u8 has changed since it was built (sampled blocks differ)"
        if thorough and _digest(filename, expected, sampled=False) != whole_hash:
            return "images.u8 has changed since it was built (whole-file hash differs)"
    except FileNotFoundError:
        return "images.u8 is missing"
    except OSError as error:  # e.g. EIO from a failing disk
        return f"images.u8 is unreadable ({error})"
    return None


def remove_entry(folder: Path) -> int:
    """Delete a cache entry. Returns the bytes freed (0 when another process removed it first).

    It is renamed aside first, so that no process ever opens half of it; a process that has it
    mapped keeps reading the old file until it closes it.
    """
    trash = folder.with_name(f".{folder.name}.{os.getpid()}.removed")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        folder.rename(trash)
    except FileNotFoundError:
        return 0
    freed = sum(path.stat().st_size for path in trash.iterdir())
    shutil.rmtree(trash, ignore_errors=True)
    return freed


def _map(folder: Path, count: int, size: int) -> np.ndarray:
    # copy-on-write: writable for torch without ever changing the file
    return np.memmap(folder / "images.u8", dtype=np.uint8, mode="c", shape=(count, size, size, 3))


def open_cache(paths: list[str], size: int, policy: str) -> tuple[np.ndarray, dict[str, str]] | None:
    """The cache entry for exactly these files, after the quick check of `check_entry`.

    Returns:
        (images N x size x size x 3, {bad path: reason}), or None when there is no entry or it was
        damaged: then it is reported in one warning and removed, for the caller to build it again.
    """
    folder = cache_folder(paths, size, policy)
    if not folder.exists():
        return None
    problem = check_entry(folder)
    if problem is not None:
        log.warning(f"decoded-image cache {folder}: {problem}; building it again")
        remove_entry(folder)
        return None
    meta = json.loads((folder / "meta.json").read_text())
    return _map(folder, len(paths), size), meta["bad"]


def _allocate(filename: Path, nbytes: int) -> None:
    """Create `filename` with `nbytes` of disk space reserved for it.

    np.memmap(mode="w+") makes a sparse file whose blocks are allocated only when the map is
    written: on a full disk that write kills the process with SIGBUS, midway and without a message.
    Reserving the blocks first turns a full disk into an OSError (ENOSPC) here, before any decoding.
    """
    with open(filename, "wb") as handle:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(handle.fileno(), 0, nbytes)
        else:  # macOS, Windows: nothing to reserve with; a sparse file
            handle.truncate(nbytes)


def build_cache(paths: list[str], size: int, policy: str, processes: int) -> tuple[np.ndarray, dict[str, str]]:
    """Decode every file in parallel processes straight into a new memory-mapped file.

    Written in a staging folder and renamed when complete (`atomic_folder`): an interrupted build
    leaves nothing that a later run could mistake for a cache. Hashing the result for `check_entry`
    reads it once more, from the page cache (about 1.5 s per GiB, small beside the decoding).

    Returns:
        (images N x size x size x 3, {bad path: reason}); bad images are left as zeros.

    Raises:
        ImgclsError: not enough free disk space in the cache folder (DiskFullError).
    """
    from imgcls.data.loaders import decode_into

    folder = cache_folder(paths, size, policy)
    needed = cache_bytes(len(paths), size)
    advice = ("it is the decoded-image cache: free some space there, set IMGCLS_CACHE_DIR to a folder on a "
              "bigger disk, or set data.cache=off")
    with atomic_folder(folder, needed, advice) as staging:
        filename = staging / "images.u8"
        _allocate(filename, needed)
        bad = decode_into(filename, paths, size, policy, processes)
        meta = {"format": FORMAT, "count": len(paths), "size": size, "policy": policy, "bad": bad,
                "sample_sha256": _digest(filename, needed, sampled=True),
                "sha256": _digest(filename, needed, sampled=False)}
        (staging / "meta.json").write_text(json.dumps(meta))
    log.info(f"decoded-image cache: {folder} ({needed / 2**30:.2f} GiB)")
    return _map(folder, len(paths), size), bad
