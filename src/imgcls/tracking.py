"""The run folder and what is written into it: log.txt, metrics.csv, summary.json, env.json, and
progress on the console (a bar on a terminal, one line every N steps in log files and CI)."""

from __future__ import annotations

import csv
import json
import logging
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from imgcls.checkpoint import atomic_write
from imgcls.errors import ImgclsError

__all__ = [
    "create_run_dir", "setup_logging", "progress", "StepProgress", "append_metrics", "read_metrics",
    "truncate_metrics", "update_summary", "read_summary", "environment", "on_terminal",
]

log = logging.getLogger("imgcls")


def on_terminal() -> bool:
    return sys.stderr.isatty()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def create_run_dir(root: str | Path, name: str | None, default_name: str, force: bool = False) -> Path:
    """Create a new run folder and return it. Never reuses an existing one silently.

    An automatic name (`name=None`) gets a free suffix (`-2`, `-3`, ...); an explicit name that
    exists is an error unless `force`, which deletes the old folder first.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if name is not None:
        path = root / name
        if path.exists():
            if not force:
                raise ImgclsError(f"run folder {path} already exists; choose another run.name (e.g. run.name={name}-2), "
                                  f"resume it with --resume {path}, or pass --force to replace it")
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path
    base = _slug(default_name)
    for attempt in range(1, 10_000):
        path = root / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            path.mkdir()  # atomic: two runs started together never get the same folder
            return path
        except FileExistsError:
            continue
    raise ImgclsError(f"too many runs named {base} in {root}")


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return prefix + record.getMessage()


def setup_logging(run_dir: Path | None = None, verbose: bool = False, quiet: bool = False) -> None:
    """Messages go to stderr (stdout stays clean for --json and CSV) and, with a run folder, to log.txt.
    quiet: warnings and errors only (the ranks other than 0 of a torchrun job)."""
    logger = logging.getLogger("imgcls")
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler) or run_dir is None:
            logger.removeHandler(handler)
            handler.close()
    if not any(type(h) is logging.StreamHandler for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(_PlainFormatter())
        logger.addHandler(console)
    if run_dir is not None:
        file_handler = logging.FileHandler(Path(run_dir) / "log.txt", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file_handler)


class StepProgress:
    """Progress over `total` steps: a live bar on a terminal, otherwise a log line every `every` steps."""

    def __init__(self, total: int, description: str, every: int = 50, min_seconds: float = 0.0):
        self.total, self.description, self.every = total, description, max(1, every)
        self.min_seconds = min_seconds  # lines closer together than this are skipped (log files stay short)
        self.count, self.started = 0, time.perf_counter()
        self._last_line = self.started
        self._bar = None
        self.silent = not log.isEnabledFor(logging.INFO)  # e.g. ranks other than 0 under torchrun
        if on_terminal() and not self.silent:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, status="")

    def update(self, steps: int = 1, status: str = "") -> None:
        self.count += steps
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, status=status)
        elif not self.silent and self.count % self.every < steps and self.count < self.total:
            now = time.perf_counter()
            if now - self._last_line >= self.min_seconds:
                self._last_line = now
                log.info(f"{self.description} {self.count}/{self.total} {status} ({now - self.started:.0f}s)".replace("  ", " "))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def progress(items: Iterable, total: int, description: str) -> Iterator:
    """Wrap an iterable of `total` items with `StepProgress` (when not on a terminal, a line every ~10%,
    at most one every 10 s)."""
    with StepProgress(total, description, every=max(1, total // 10), min_seconds=10.0) as bar:
        for item in items:
            yield item
            bar.update()


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """One row per epoch; the header is written with the first row."""
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop rows after `last_epoch` (written after the last checkpoint by a run that was then killed)."""
    rows = [row for row in read_metrics(path) if int(row["epoch"]) <= last_epoch]
    path.unlink(missing_ok=True)
    for row in rows:
        append_metrics(path, row)


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def update_summary(run_dir: Path, **fields: Any) -> dict[str, Any]:
    summary = {**read_summary(run_dir), **fields}
    atomic_write(Path(run_dir) / "summary.json", json.dumps(summary, indent=2, default=str).encode())
    return summary


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return result.stdout.strip() or None if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(**extra: Any) -> dict[str, Any]:
    """Versions, machine and command line, for env.json and the model artifact."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("imgcls", "torch", "torchvision", "timm", "numpy", "pillow", "omegaconf", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    import torch

    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "versions": versions,
        "git_commit": _git_commit(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **extra,
    }
