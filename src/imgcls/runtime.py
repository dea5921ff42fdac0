"""Devices, precision, seeding and threads: the one place that knows about hardware."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.errors import ImgclsError

__all__ = [
    "Distributed", "Runtime", "CoreShare", "choose_device", "choose_precision", "seed_everything", "rng_state",
    "set_rng_state", "usable_cores",
]

log = logging.getLogger("imgcls")


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
class Distributed:
    """This process's place in a `torchrun` job (rank 0 of 1 when started without torchrun).

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; the process group uses NCCL
    between GPUs and gloo on CPUs. Rank 0 writes the run folder; every rank trains.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    owns_group: bool = False  # we started the process group, so we end it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch.distributed as dist

        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank=dist.get_rank(), world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))), owns_group=owns_group)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place, returned for convenience."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self) -> None:
        if self.enabled and self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                # every rank leaves together: a rank that tears gloo down while another still holds
                # connections can abort ("terminate called without an active exception")
                dist.barrier()
                dist.destroy_process_group()


@dataclass
class Runtime:
    """Where and how tensors are computed, resolved once from the config."""

    device: torch.device
    precision: str  # fp32, bf16 or fp16
    channels_last: bool
    distributed: Distributed = field(default_factory=Distributed)
    cores: CoreShare | None = None  # training re-sizes its CPU threads to the free cores

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto", distributed: Distributed | None = None,
               cores: CoreShare | None = None) -> "Runtime":
        distributed = distributed or Distributed()
        if distributed.enabled and device == "auto" and torch.cuda.is_available():
            device = f"cuda:{distributed.local_rank}"  # one GPU per process
        resolved = choose_device(device)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        # channels_last: the layout oneDNN and cuDNN convolutions run fastest in (measured ~1.2-1.9x on CPU)
        return cls(resolved, choose_precision(precision, resolved), channels_last=resolved.type in ("cpu", "cuda"),
                   distributed=distributed, cores=cores)

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


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (affinity-aware: containers and taskset are respected)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


class CoreShare:
    """Intra-op threads sized to the cores that are free, re-checked while training.

    An OpenMP thread whose core is taken by another busy program still waits for it at every
    parallel region's barrier, spinning: with 2 threads on 2 cores beside one busy program, small
    models ran at well under their fair share. Every `every_seconds` this measures, from /proc/stat, how
    many of our cores other programs kept busy (our own process and its loader workers excluded) and
    uses the rest, at least 1 thread: alone it is every core, as before; beside a busy program it is
    one thread fewer, with no barrier left to spin at. An explicit OMP_NUM_THREADS is obeyed as is.
    The cores are shared between the processes of a torchrun job on one machine.
    """

    def __init__(self, processes_per_machine: int = 1, every_seconds: float = 5.0):
        self.cores = usable_cores()
        self.most = max(1, len(self.cores) // max(1, processes_per_machine))
        self.every_seconds = every_seconds
        requested = os.environ.get("OMP_NUM_THREADS", "")
        self.fixed = int(requested) if requested.isdigit() and int(requested) > 0 else None
        self.policy = (f"OMP_NUM_THREADS={self.fixed}" if self.fixed else
                       f"the free cores of {len(self.cores)}, re-checked every {every_seconds:g} s"
                       + (" (not measurable here: all of them)" if _busy_ticks(self.cores) is None else ""))
        self.others = 0.0  # cores that other programs kept busy over the last interval
        self._sample = self.sample()
        torch.set_num_threads(self.fixed or self.most)

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def keep_fixed(self, reason: str) -> None:
        """Stop re-sizing: keep the threads as they are now."""
        self.fixed = self.threads
        self.policy = f"{self.fixed} thread(s), fixed: {reason}"

    def sample(self) -> tuple[float, int, int] | None:
        """A reading for `others_since`: None where /proc/stat is not there to read."""
        busy = _busy_ticks(self.cores)
        return None if busy is None else (time.monotonic(), busy, _own_ticks())

    def others_since(self, sample: tuple[float, int, int] | None,
                     now: tuple[float, int, int] | None = None) -> float:
        """Cores of ours that other programs kept busy, on average, from `sample` to `now` (a new reading
        when not given); 0 when not measurable."""
        now = now or self.sample()
        if sample is None or now is None:
            return 0.0
        (then, busy_then, own_then), (moment, busy, own) = sample, now
        ticks = max(1.0, (moment - then) * os.sysconf("SC_CLK_TCK"))
        return max(0.0, (busy - busy_then - (own - own_then)) / ticks)

    def adjust(self) -> int:
        """Re-size the threads when `every_seconds` have passed since the last measurement; returns
        the number of threads."""
        if self.fixed or self._sample is None or time.monotonic() - self._sample[0] < self.every_seconds:
            return self.threads
        now = self.sample()
        others, self._sample = self.others_since(self._sample, now), now
        return self.use_free_cores(others)

    def use_free_cores(self, others: float) -> int:
        """Threads for the cores that other programs, keeping `others` cores busy, leave free (at least 1;
        an explicit OMP_NUM_THREADS stays); returns the number of threads."""
        self.others = others
        if self.fixed:
            return self.threads
        threads = max(1, min(self.most, round(len(self.cores) - others)))
        if threads != self.threads:
            log.info(f"other programs keep {others:.1f} of {len(self.cores)} CPU cores busy: "
                     f"{threads} thread(s) from now on")
            torch.set_num_threads(threads)
        return threads

    def wait_for_free_cores(self, busy: float, seconds: float, interval: float = 1.0) -> float:
        """Wait, up to `seconds`, until other programs keep fewer than `busy` of our cores busy over an
        `interval`; returns the cores they kept busy over the last one (0 when not measurable). The next
        `adjust` measures from the end of the wait."""
        deadline = time.monotonic() + seconds
        while True:
            before = self.sample()
            if before is None:
                return 0.0
            time.sleep(interval)
            now = self.sample()
            others = self.others_since(before, now)
            if others < busy or time.monotonic() >= deadline:
                self._sample = now
                return others


def _busy_ticks(cores: list[int]) -> int | None:
    """Clock ticks the given cores spent busy since boot (all processes), from /proc/stat; None off Linux."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{core}" for core in cores}
    total = 0
    for line in lines:
        name, *values = line.split()
        if name in wanted:  # user nice system idle iowait irq softirq steal ...: all but idle and iowait
            numbers = [int(value) for value in values[:8]]
            total += sum(numbers) - numbers[3] - numbers[4]
    return total


def _own_ticks() -> int:
    """Clock ticks used by this process (all its threads) and its live children (DataLoader workers)."""
    total = 0
    for pid in [os.getpid(), *_children()]:
        try:  # utime and stime: fields 14 and 15, counted after the command name (which may hold spaces)
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total


def _children() -> list[int]:
    children = []
    for task in Path("/proc/self/task").iterdir():
        try:
            children += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


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
