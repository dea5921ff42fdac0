"""Running a list of planned runs, resumably: one after another in this process, or as parallel
processes, each pinned to its own share of the CPU cores (and a GPU), so that threads never
oversubscribe the machine. `imgcls sweep`, `cv` and `tune` (imgcls.sweeps) plan the runs; this module
only runs them: finished runs are kept, interrupted ones continue from their last checkpoint.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls.config import load_config
from imgcls.errors import ImgclsError
from imgcls.runtime import usable_cores
from imgcls.tracking import RunFolder, console_level, read_summary, setup_logging

__all__ = ["PlannedRun", "run_all", "worker_slots", "start_process"]

log = logging.getLogger("imgcls")


@dataclass
class PlannedRun:
    """One run of a sweep: its folder name and the overrides applied to the sweep's base config."""

    name: str
    overrides: list[str]


def _state(run_dir: Path) -> str:
    """completed, resumable (`train --resume` continues it, or finishes its final evaluation, or starts
    it again in its folder), or new (no run folder yet, or one without its config: start over)."""
    if not run_dir.exists():
        return "new"
    status = read_summary(run_dir).get("status")
    if status == "completed":
        return "completed"
    return "resumable" if RunFolder(run_dir).config.exists() else "new"


def _train_here(base: Path, folder: Path, run: PlannedRun, state: str) -> None:
    from imgcls.training import train

    if state == "resumable":
        train(resume=folder / run.name)
    else:
        train(load_config(base, [*run.overrides, f"run.dir={folder}", f"run.name={run.name}"]), force=True)


def _command(base: Path, folder: Path, run: PlannedRun, state: str) -> list[str]:
    if state == "resumable":
        return [sys.executable, "-m", "imgcls", "train", "--resume", str(folder / run.name)]
    return [sys.executable, "-m", "imgcls", "train", "-c", str(base), *run.overrides, f"run.dir={folder}",
            f"run.name={run.name}", "--force"]


def worker_slots(jobs: int) -> list[dict[str, Any]]:
    """How `jobs` parallel processes share the machine: disjoint sets of CPU cores (imgcls sizes its
    threads from the process's core affinity) and, when there are GPUs, one GPU each, round robin."""
    cores = usable_cores()
    if jobs > len(cores):
        raise ImgclsError(f"--jobs {jobs} is more than the {len(cores)} CPU cores this process may use")
    import torch

    gpus = torch.cuda.device_count()
    share = len(cores) // jobs
    return [{"cores": set(cores[slot * share:(slot + 1) * share]), "gpu": slot % gpus if gpus else None}
            for slot in range(jobs)]


def start_process(command: list[str], slot: dict[str, Any], log_path: Path) -> subprocess.Popen:
    environment = dict(os.environ)
    if slot["gpu"] is not None:
        environment["CUDA_VISIBLE_DEVICES"] = str(slot["gpu"])
    cores = slot["cores"]
    with open(log_path, "w") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment,
                                preexec_fn=lambda: os.sched_setaffinity(0, cores))


def _run_line(run_dir: Path) -> str:
    """One line about a finished run, from its summary.json."""
    summary = read_summary(run_dir)
    test = summary.get("test_metrics") or summary.get("val_metrics") or {}
    parts = [summary.get("status", "missing")]
    if "acc1" in test:
        parts.append(f"test acc1 {test['acc1']:.4f}")
    if summary.get("best_epoch"):
        parts.append(f"best epoch {summary['best_epoch']}")
    minutes = summary.get("train_minutes")
    if minutes is not None:
        parts.append(f"{minutes:.1f} min" if minutes >= 1 else f"{minutes * 60:.0f} s")
    return ", ".join(parts)


def run_all(base: Path, folder: Path, runs: list[PlannedRun], jobs: int = 1, verbose: bool = False) -> dict[str, str]:
    """Train every planned run that is not finished yet; returns run name -> final status. A run that
    fails is reported and the others go on; Ctrl-C stops the sweep (run it again to resume). Each run
    prints one line (its log.txt has everything) unless `verbose`."""
    states = {run.name: _state(folder / run.name) for run in runs}
    done = [name for name, state in states.items() if state == "completed"]
    if done:
        log.info(f"{len(done)} of {len(runs)} runs already completed: kept")
    pending = [run for run in runs if states[run.name] != "completed"]
    if jobs <= 1:
        for index, run in enumerate(pending, start=1):
            log.info(f"[{len(done) + index}/{len(runs)}] {run.name}"
                     + (" (resuming)" if states[run.name] == "resumable" else ""))
            try:
                with console_level(logging.NOTSET if verbose else logging.WARNING):
                    _train_here(base, folder, run, states[run.name])
            except ImgclsError as error:  # this run's problem; the others may still work
                log.error(f"{run.name} failed: {error}")
            setup_logging(folder)  # training logged into the run's log.txt; the sweep's own log again
            log.info(f"  {run.name}: {_run_line(folder / run.name)}")
    else:
        _run_parallel(base, folder, pending, states, jobs)
    return {run.name: read_summary(folder / run.name).get("status", "missing") for run in runs}


def _run_parallel(base: Path, folder: Path, pending: list[PlannedRun], states: dict[str, str], jobs: int) -> None:
    (folder / "logs").mkdir(exist_ok=True)
    free = worker_slots(jobs)
    queue, running = list(pending), []
    try:
        while queue or running:
            while queue and free:
                run, slot = queue.pop(0), free.pop(0)
                log_path = folder / "logs" / f"{run.name}.txt"
                running.append((run, slot, start_process(_command(base, folder, run, states[run.name]), slot, log_path)))
                log.info(f"started {run.name} on cores {sorted(slot['cores'])}" +
                         (f", GPU {slot['gpu']}" if slot["gpu"] is not None else "") + f" (output: {log_path})")
            time.sleep(0.5)
            for item in [item for item in running if item[2].poll() is not None]:
                running.remove(item)
                free.append(item[1])
                run, code = item[0], item[2].returncode
                log.info(f"{run.name} " + ("completed" if code == 0 else f"failed (exit {code}; see logs/{run.name}.txt)"))
    finally:  # Ctrl-C: stop the children too (their last checkpoints let the sweep resume)
        for _, _, process in running:
            process.terminate()
        for _, _, process in running:
            process.wait()
