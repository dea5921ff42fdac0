"""Checkpoints and model artifacts, always written atomically.

- `last.ckpt` / `best.ckpt`: the full training state (model, optimizer, scheduler, scaler, epoch,
  best metric, early-stopping counter, every RNG state) for exact resume.
- `model.safetensors`: the model artifact, the best weights plus a JSON header with everything that
  `predict`, `eval` and `export` need: architecture, class names, preprocessing, config, metrics, versions.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from imgcls.errors import ImgclsError

__all__ = ["atomic_write", "save_checkpoint", "load_checkpoint", "save_artifact", "load_artifact", "ARTIFACT_FORMAT"]

ARTIFACT_FORMAT = 1


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash or kill at
    any moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        directory = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Raises ImgclsError when the file is missing or is not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ImgclsError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint cannot run code when loaded (RNG states are stored as tensors)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ImgclsError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from error


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
