"""Checkpoints and model artifacts, always written atomically, and kept consistent as a set.

- `last.ckpt` / `best.ckpt`: the full training state (model, optimizer, scheduler, scaler, epoch,
  best metric, early-stopping counter, every RNG state) for exact resume.
- `model.safetensors`: the model artifact, the best weights plus a JSON header with everything that
  `predict`, `eval` and `export` need: architecture, class names, preprocessing, config, metrics, versions.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgcls.errors import ImgclsError

if TYPE_CHECKING:  # torch is imported where used: tracking (and so the CLI) imports atomic_write
    import torch

__all__ = [
    "atomic_write", "save_checkpoint", "load_checkpoint", "save_artifact", "load_artifact", "ARTIFACT_FORMAT",
    "CheckpointSet", "DiskFullError", "is_disk_full", "load_tensors_safely",
]

ARTIFACT_FORMAT = 1


class DiskFullError(ImgclsError):
    """The disk filled up while imgcls wrote a file; the message says what, where and how much is free."""

    def __init__(self, path: str | Path, needed: int | None = None, advice: str = "free some space there and run again"):
        self.path, self.needed = Path(path), needed
        folder = self.path if self.path.is_dir() else self.path.parent
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB free"
        except OSError:
            free = "free space unknown"
        size = f" ({needed / 2**20:,.1f} MiB)" if needed else ""
        super().__init__(f"no space left on the device while writing {self.path.name}{size} to {folder} ({free}); "
                         f"{advice}")


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def default_file_mode() -> int:
    """The permissions `open()` would give a new file (0o644 under the usual umask 022). mkstemp makes
    its files 0o600, which would leave a run's files unreadable to the other users of a shared machine."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash or kill at
    any moment leaves either the old file or the new one, never a torn one.

    Raises:
        DiskFullError: the disk filled up; the old file is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        if is_disk_full(error):
            raise DiskFullError(path, len(data)) from error
        raise
    try:
        os.fchmod(handle, default_file_mode())
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if is_disk_full(error):
            raise DiskFullError(path, len(data)) from error
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        directory = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Raises ImgclsError when the file is missing or is not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ImgclsError(f"checkpoint not found: {path}")
    return load_tensors_safely(path, "checkpoint")  # RNG states are stored as tensors, so this suffices


def load_tensors_safely(path: str | Path, what: str) -> Any:
    """`torch.load(path)` on the CPU that can build only tensors and plain containers (weights_only):
    a pickle of other objects could run any code while it loads, so it is refused, never retried unsafely.

    Args:
        what: the file's role in messages, e.g. "model.pretrained file" or "checkpoint".

    Raises:
        ImgclsError: the file is such a pickle, or is not readable by torch.load at all.
    """
    import torch

    try:
        with warnings.catch_warnings():  # torch's note on hand-made pickles' protocol means nothing to a user
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch's weights-only unpickler wraps whatever it would not build (a class, a function such as
        # os.system, an opcode it lacks) in a paragraph that ends by suggesting weights_only=False
        wrapped = isinstance(error, pickle.UnpicklingError) and str(error).startswith("Weights only load failed")
        if wrapped and ("GLOBAL" in str(error) or _is_pickle(path)):
            raise ImgclsError(f"refusing to load {what} {path}: it is not a plain-tensor checkpoint "
                              "(loading it could run code)") from None
        first_line = str(error).splitlines()[0] if str(error) else ""
        detail = "" if wrapped else f" ({type(error).__name__}: {first_line})"
        raise ImgclsError(f"cannot read {what} {path}: not a complete file written by torch.save{detail}") \
            from error


def _is_pickle(path: str | Path) -> bool:
    """A torch.save zip archive, or a raw pickle stream (protocol 2 and above start with 0x80), as
    opposed to a text file or other junk that the unpickler also stops at."""
    with open(path, "rb") as file:
        head = file.read(4)
    return head.startswith(b"\x80") or head == b"PK\x03\x04"


def save_artifact(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Weights as safetensors with `metadata` (JSON) in the header under the key "imgcls"."""
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    header = {"imgcls": json.dumps({"format": ARTIFACT_FORMAT, **metadata}, default=str)}
    atomic_write(path, save(tensors, metadata=header))


def load_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) of a model artifact.

    Raises:
        ImgclsError: missing file, not a safetensors file, or no imgcls metadata in it.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ImgclsError(f"model artifact not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        state_dict = load_file(str(path))
    except Exception as error:
        raise ImgclsError(f"cannot read model artifact {path}: {str(error).splitlines()[0]}") from error
    if "imgcls" not in header:
        raise ImgclsError(f"{path} is a safetensors file without imgcls metadata; was it written by imgcls?")
    return state_dict, json.loads(header["imgcls"])


class CheckpointSet:
    """The files of `checkpoints/` and the order they are written in, so that a kill at any instant
    leaves a set that agrees with itself.

    `last.ckpt` is written first: it is the record of the epoch. When the epoch is the best so far, it
    also carries the model artifact's metadata and which weights (raw or EMA) the artifact holds, and
    `best.ckpt` and `model.safetensors` are written after it. A kill between those writes leaves them
    one best epoch behind `last.ckpt`; `repair()` (run before a resume) rewrites them from `last.ckpt`,
    which holds the very same state. A kill before `last.ckpt` is replaced leaves the previous epoch's
    complete set.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.last = self.folder / "last.ckpt"
        self.best = self.folder / "best.ckpt"
        self.artifact = self.folder / "model.safetensors"

    def save(self, state: dict[str, Any], best: tuple[str, dict[str, Any]] | None = None) -> None:
        """Save an epoch's training `state`; `best=(weights, artifact metadata)` when it is the best so
        far, `weights` being "raw" (state["model"]) or "ema" (the averaged weights in state["ema"])."""
        artifact = None if best is None else {"weights": best[0], "metadata": json.dumps(best[1], default=str)}
        record = {**state, "artifact": artifact}
        serialised = _serialise(record)
        atomic_write(self.last, serialised)
        if best is not None:
            self._write_best(record, serialised)

    def _write_best(self, record: dict[str, Any], serialised: bytes) -> None:
        atomic_write(self.best, serialised)
        save_artifact(self.artifact, artifact_weights(record), json.loads(record["artifact"]["metadata"]))

    def repair(self, record: dict[str, Any]) -> list[str]:
        """Rewrite `best.ckpt` and `model.safetensors` when they lag behind `record` (the loaded
        `last.ckpt`) because a kill came between the writes. Returns the names of the files rewritten."""
        if record.get("artifact") is None:  # not a best epoch: the best files were complete before it
            return []
        lagging = [path.name for path in (self.best, self.artifact) if _saved_epoch(path) != record["epoch"]]
        if lagging:
            self._write_best(record, _serialise(record))
        return lagging


def _serialise(record: dict[str, Any]) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(record, buffer)
    return buffer.getvalue()


def _saved_epoch(path: Path) -> int | None:
    """The epoch a checkpoint or model artifact was saved at; None when it is missing or unreadable."""
    import torch

    try:
        if path.suffix == ".safetensors":
            return load_artifact(path)[1].get("epoch")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:  # missing, from an older version, or damaged: rewrite it
        return None


def artifact_weights(record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights the model artifact of a best epoch holds: the raw model's, or the EMA's (timm's
    ModelEmaV3 keeps them under `module.`)."""
    if record["artifact"]["weights"] == "ema":
        return {key.removeprefix("module."): value for key, value in record["ema"].items()}
    return record["model"]
