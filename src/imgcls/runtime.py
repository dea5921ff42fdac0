"""Devices, precision, seeding and threads: the one place that knows about hardware."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from imgcls.errors import ImgclsError

__all__ = ["Runtime", "choose_device", "choose_precision", "seed_everything", "rng_state", "set_rng_state"]


def choose_device(requested: str = "auto") -> torch.device:
    """`auto`: cuda, then mps, then cpu; otherwise the named device, checked to exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ImgclsError(f"device='{requested}' is not a device; use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ImgclsError(f"device='{requested}' but {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                          "use device=cpu or device=auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ImgclsError(f"device='{requested}' but MPS is not available; use device=cpu or device=auto")
    return device


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX512-BF16, AMX), where bf16 autocast is
    ~2x faster than fp32; elsewhere CPU bf16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def choose_precision(requested: str, device: torch.device) -> str:
    """Resolve `train.precision`: fp32, bf16 or fp16."""
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise ImgclsError("train.precision=fp16 is for GPUs; on CPU use bf16 or fp32")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


@dataclass
class Runtime:
    """Where and how tensors are computed, resolved once from the config."""

    device: torch.device
    precision: str  # fp32, bf16 or fp16
    channels_last: bool

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto") -> "Runtime":
        resolved = choose_device(device)
        # channels_last: the layout oneDNN and cuDNN convolutions run fastest in (measured ~1.2-1.9x on CPU)
        return cls(resolved, choose_precision(precision, resolved), channels_last=resolved.type in ("cpu", "cuda"))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        return self.layout(images.to(self.device, non_blocking=True))

    def layout(self, images: torch.Tensor) -> torch.Tensor:
        """The memory layout the model runs fastest with."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (disabled scaler)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def set_threads() -> None:
    """Intra-op threads = cores we may use (affinity-aware, so containers and taskset are respected)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    # set both ways: the flag is process-wide and must not leak from one run into the next (Python API)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic  # autotuning picks kernels by timing: not repeatable


def rng_state() -> dict:
    """Every RNG state, as tensors and Python scalars only, so checkpoints load with weights_only=True."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
