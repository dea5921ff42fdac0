"""Checkpoints and model artifacts: atomic writes, exact round trips, clear errors for wrong files."""

import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from imgcls.checkpoint import (
    ARTIFACT_FORMAT, atomic_write, load_artifact, load_checkpoint, save_artifact, save_checkpoint,
)
from imgcls.errors import ImgclsError
from imgcls.runtime import rng_state, set_rng_state


def leftovers(folder):
    """Files other than the expected ones: temporary files of a write that did not finish."""
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp") or path.name.startswith("."))


# --- atomic_write --------------------------------------------------------------------------------

def test_atomic_write_creates_and_replaces(tmp_path):
    path = tmp_path / "nested" / "file.bin"  # missing parent folders are created
    atomic_write(path, b"first")
    assert path.read_bytes() == b"first"
    atomic_write(path, b"second, longer content")
    assert path.read_bytes() == b"second, longer content"
    atomic_write(path, b"")
    assert path.read_bytes() == b""
    assert leftovers(path.parent) == []


def test_failed_rename_keeps_old_file_and_removes_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_write(path, b"old state")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"new state")
    assert path.read_bytes() == b"old state"
    assert leftovers(tmp_path) == []


def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path, monkeypatch):
    # interrupted while the bytes are being flushed to disk (e.g. Ctrl-C)
    path = tmp_path / "model.safetensors"
    atomic_write(path, b"old weights")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b"new weights")
    monkeypatch.undo()
    assert path.read_bytes() == b"old weights"
    assert leftovers(tmp_path) == []


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.bin", b"data")
    assert list(tmp_path.iterdir()) == []


# --- checkpoints ---------------------------------------------------------------------------------

def training_state():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "best_metric": 0.75,
        "stale_epochs": 1,
        "rng": rng_state(),
        "config": {"train": {"epochs": 10}, "run": {"name": None}},
    }


def test_checkpoint_round_trip(tmp_path):
    state = training_state()
    path = tmp_path / "checkpoints" / "last.ckpt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded.keys() == state.keys()
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert loaded["optimizer"]["state"][0]["step"] == state["optimizer"]["state"][0]["step"]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert (loaded["epoch"], loaded["best_metric"], loaded["stale_epochs"]) == (3, 0.75, 1)
    assert loaded["config"] == state["config"]
    assert leftovers(path.parent) == []


def test_checkpoint_restores_every_random_generator(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "last.ckpt", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    # move every generator on, as more training would
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    set_rng_state(load_checkpoint(tmp_path / "last.ckpt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(ImgclsError, match="checkpoint not found") as error:
        load_checkpoint(tmp_path / "missing.ckpt")
    assert "missing.ckpt" in str(error.value)


def test_load_checkpoint_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(ImgclsError, match="cannot read checkpoint"):
        load_checkpoint(path)


# --- artifacts -----------------------------------------------------------------------------------

def test_artifact_round_trip(tmp_path):
    state_dict = {
        "backbone.weight": torch.randn(3, 4),
        "backbone.bias": torch.zeros(3),
        "backbone.counter": torch.tensor(7, dtype=torch.long),
        "backbone.transposed": torch.randn(4, 3).t(),  # not contiguous: must still be saved
    }
    metadata = {
        "architecture": "small_resnet",
        "class_names": ["cat", "dog", "fox"],
        "preprocessing": {"image_size": 32, "resize": "crop", "mean": [0.5, 0.5, 0.5]},
        "metrics": {"val_acc1": 0.9},
    }
    path = tmp_path / "model.safetensors"
    save_artifact(path, state_dict, metadata)
    tensors, loaded = load_artifact(path)
    assert tensors.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(tensors[key], value)
        assert tensors[key].dtype == value.dtype
    assert loaded == {"format": ARTIFACT_FORMAT, **metadata}
    assert leftovers(tmp_path) == []


def test_artifact_metadata_with_non_json_values_is_saved_as_text(tmp_path):
    path = tmp_path / "model.safetensors"
    save_artifact(path, {"weight": torch.ones(1)}, {"run_folder": tmp_path})
    assert load_artifact(path)[1]["run_folder"] == str(tmp_path)


def test_plain_safetensors_file_is_not_an_artifact(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.ones(2)}, str(path))
    with pytest.raises(ImgclsError, match="without imgcls metadata"):
        load_artifact(path)
    save_file({"weight": torch.ones(2)}, str(path), metadata={"other": "tool"})
    with pytest.raises(ImgclsError, match="without imgcls metadata"):
        load_artifact(path)


def test_missing_artifact(tmp_path):
    with pytest.raises(ImgclsError, match="model artifact not found"):
        load_artifact(tmp_path / "model.safetensors")


def test_artifact_that_is_not_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"weight": torch.ones(2)}, path)
    with pytest.raises(ImgclsError, match="cannot read model artifact"):
        load_artifact(path)
