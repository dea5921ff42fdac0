"""The decoded-image cache: every image decoded once, resized to the training size, stored as one
memory-mapped uint8 array on disk in the cache folder (never inside the user's dataset folder).

The key covers the file list with each file's size and modification time, the image size and the
resize policy: a changed, added or removed file gives a new key, so a stale cache is never served.
Later runs on the same data start at once; the operating system's page cache keeps the array in
memory, shared by every process (loader workers, torchrun ranks).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from imgcls.data.packaged import cache_dir
from imgcls.errors import ImgclsError

__all__ = ["cache_key", "open_cache", "build_cache", "cache_bytes"]

log = logging.getLogger("imgcls")

FORMAT = 1  # bump when the decoding changes, so old caches are not reused


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


def _folder(key: str) -> Path:
    return cache_dir() / "decoded" / key


def _map(folder: Path, count: int, size: int) -> np.ndarray:
    # copy-on-write: writable for torch without ever changing the file
    return np.memmap(folder / "images.u8", dtype=np.uint8, mode="c", shape=(count, size, size, 3))


def open_cache(paths: list[str], size: int, policy: str) -> tuple[np.ndarray, dict[str, str]] | None:
    """(images N x size x size x 3, {bad path: reason}) if a complete cache for exactly these files exists."""
    folder = _folder(cache_key(paths, size, policy))
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("count") != len(paths) or meta.get("size") != size:
        return None
    return _map(folder, len(paths), size), meta["bad"]


def build_cache(paths: list[str], size: int, policy: str, processes: int) -> tuple[np.ndarray, dict[str, str]]:
    """Decode every file in parallel processes straight into a new memory-mapped file.

    Written in a staging folder and renamed when complete: an interrupted build leaves nothing
    that a later run could mistake for a cache.

    Raises:
        ImgclsError: not enough free disk space in the cache folder.
    """
    from imgcls.data.loaders import decode_into

    key = cache_key(paths, size, policy)
    folder = _folder(key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    needed = cache_bytes(len(paths), size)
    free = shutil.disk_usage(folder.parent).free
    if needed > 0.9 * free:
        raise ImgclsError(f"the decoded-image cache needs {needed / 2**30:.1f} GiB but {folder.parent} has "
                          f"{free / 2**30:.1f} GiB free; set IMGCLS_CACHE_DIR elsewhere or use data.cache=off")
    staging = folder.with_name(f".{key}.{os.getpid()}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        filename = staging / "images.u8"
        np.memmap(filename, dtype=np.uint8, mode="w+", shape=(len(paths), size, size, 3)).flush()
        bad = decode_into(filename, paths, size, policy, processes)
        meta = {"format": FORMAT, "count": len(paths), "size": size, "policy": policy, "bad": bad}
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            staging.rename(folder)
        except OSError:  # another process (a torchrun rank, a parallel run) finished the same cache first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(f"decoded-image cache: {folder} ({needed / 2**30:.2f} GiB)")
    return _map(folder, len(paths), size), bad
