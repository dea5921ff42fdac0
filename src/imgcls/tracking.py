"""The run folder and what is written into it: log.txt, metrics.csv, summary.json, env.json, and
progress on the console (a bar on a terminal, one line every N steps in log files and CI); and the
optional mirrors of the metrics in TensorBoard and MLflow (`ExperimentLoggers`)."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from imgcls.checkpoint import atomic_write
from imgcls.errors import ImgclsError

if TYPE_CHECKING:
    from collections.abc import Callable

    from imgcls.config import TrackingConfig

__all__ = [
    "RunFolder", "create_run_dir", "setup_logging", "progress", "StepProgress", "append_metrics", "read_metrics",
    "truncate_metrics", "update_summary", "read_summary", "process_identity", "process_is_alive", "environment",
    "on_terminal", "console_level",
    "ExperimentLoggers", "scalar_tag", "flatten_params", "MLFLOW_STATUSES",
]

log = logging.getLogger("imgcls")


def on_terminal() -> bool:
    return sys.stderr.isatty()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def create_run_dir(root: str | Path, name: str | None, default_name: str, force: bool = False) -> Path:
    """Create a new run folder inside `root` and return it. Never reuses an existing one silently.

    An automatic name (`name=None`) gets a free suffix (`-2`, `-3`, ...). An explicit name must be one
    folder name (see `config.run_name_problem`); if that folder exists it is an error unless `force`,
    which replaces it only when it is an imgcls run folder (it has a summary.json) or empty: a typo
    in a name never deletes a user's other files.

    Raises:
        ImgclsError: a name that is not one folder name, or a folder that exists and may not be replaced.
    """
    from imgcls.config import run_name_problem

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if name is not None:
        problem = run_name_problem(name)
        if problem:
            raise ImgclsError(f"run.name '{name}' {problem}")
        path = root / name
        if path.exists() or path.is_symlink():
            if not force:
                raise ImgclsError(f"run folder {path} already exists; choose another run.name (e.g. run.name={name}-2), "
                                  f"resume it with --resume {path}, or pass --force to replace it")
            _check_replaceable(path)
            shutil.rmtree(path)
        path.mkdir()
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


class RunFolder:
    """The files of a run folder, each name spelt here once, and its one rule (which split is final).

        runs/NAME/config.yaml      the resolved config         summary.json   status, best epoch, final metrics
                  splits.csv       every image and its split   metrics.csv    one row per epoch
                  env.json         versions, device, threads   log.txt        the console, in full
                  bad_images.txt   unreadable files            tracking.json  the MLflow run to continue
                  checkpoints/     last.ckpt, best.ckpt, model.safetensors (see checkpoint.CheckpointSet)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def splits(self) -> Path:
        return self.path / "splits.csv"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def environment(self) -> Path:
        return self.path / "env.json"

    @property
    def log(self) -> Path:
        return self.path / "log.txt"

    @property
    def bad_images(self) -> Path:
        return self.path / "bad_images.txt"

    @property
    def tracking(self) -> Path:
        return self.path / "tracking.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def artifact(self) -> Path:
        """The model artifact, checkpoints/model.safetensors: what predict, export and serve read."""
        from imgcls.checkpoint import CheckpointSet

        return CheckpointSet(self.checkpoints).artifact

    def is_run(self) -> bool:
        """A folder that imgcls train made (its config and summary are written first)."""
        return self.config.is_file() and self.summary.is_file()

    @staticmethod
    def final_split(split_names: Iterable[str]) -> str:
        """The split a run is finally evaluated on: test, or val for data without a test split."""
        names = set(split_names)
        return "test" if "test" in names or not names else "val"


def _check_replaceable(path: Path) -> None:
    """--force deletes only what imgcls made: a real folder (not a link) holding a summary.json, or nothing."""
    if path.is_symlink() or not path.is_dir():
        raise ImgclsError(f"refusing to replace {path} with --force: it is not a folder; choose another run.name")
    if not RunFolder(path).summary.is_file() and any(path.iterdir()):
        raise ImgclsError(f"refusing to replace {path} with --force: it is not an imgcls run folder (no summary.json); "
                          "choose another run.name, or move the folder away yourself")


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return prefix + record.getMessage()


class _RunLogHandler(logging.FileHandler):
    """log.txt. When it cannot be written (a full disk), it stops writing, quietly: the console still
    shows every message, and the error that matters is reported once by whatever write failed next."""

    def handleError(self, record: logging.LogRecord) -> None:
        self.setLevel(logging.CRITICAL + 1)


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
    consoles = [handler for handler in logger.handlers if type(handler) is logging.StreamHandler]
    for console in consoles:
        # the stderr of now: a caller may have replaced it since (setStream would flush the old one,
        # which may be closed)
        console.stream = sys.stderr
    if not consoles:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(_PlainFormatter())
        logger.addHandler(console)
    if run_dir is not None:
        file_handler = _RunLogHandler(RunFolder(run_dir).log, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file_handler)


@contextlib.contextmanager
def console_level(level: int) -> Iterator[None]:
    """For a while, show only messages of `level` and above on the console; log.txt files still get
    everything. The runs of a sweep then print one line each instead of their whole logs."""
    consoles = [handler for handler in logging.getLogger("imgcls").handlers if type(handler) is logging.StreamHandler]
    previous = [handler.level for handler in consoles]
    for handler in consoles:
        handler.setLevel(level)
    try:
        yield
    finally:
        for handler, old in zip(consoles, previous):
            handler.setLevel(old)


class StepProgress:
    """Progress over `total` steps: a live bar on a terminal, otherwise a log line every `every` steps.
    `description` may be a function, read at every line: a time budget's "epoch 1/6" follows its plan."""

    def __init__(self, total: int, description: str | Callable[[], str], every: int = 50, min_seconds: float = 0.0):
        self.total, self.every = total, max(1, every)
        self._description = description if callable(description) else lambda: description
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
            self._task = self._bar.add_task(self.description, total=total, status="")

    @property
    def description(self) -> str:
        return self._description()

    def update(self, steps: int = 1, status: str = "") -> None:
        self.count += steps
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, status=status, description=self.description)
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


def _read_summary_file(run_dir: Path) -> dict[str, Any]:
    path = RunFolder(run_dir).summary
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:  # cut short by a full disk before atomic writes, or edited by hand
        return {}


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """Who is writing a run: pid, host and (on Linux) the process's start time, so that a recycled pid
    is not mistaken for the same process."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "host": platform.node(), "process_started": _start_time(pid)}


def _start_time(pid: int) -> str | None:
    try:  # field 22 of /proc/PID/stat, counted after the command name (which may hold spaces)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_is_alive(summary: dict[str, Any]) -> bool | None:
    """Whether the process recorded in a summary still runs: None when it cannot be told (another
    host, or a summary written before imgcls recorded processes)."""
    pid = summary.get("pid")
    if not isinstance(pid, int) or summary.get("host") != platform.node():
        return None
    started = _start_time(pid)
    if started is not None or Path("/proc").is_dir():
        return started is not None and started == summary.get("process_started", started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json, with `created` or `running` read as `interrupted` when the recorded process is gone
    (killed with SIGKILL, out of memory, a machine that rebooted): then nothing will ever finish the run."""
    summary = _read_summary_file(run_dir)
    if summary.get("status") in ("created", "running") and process_is_alive(summary) is False:
        summary["status"] = "interrupted"
        summary["error"] = (f"the process that ran it (pid {summary['pid']} on {summary['host']}) ended without "
                            f"finishing; continue with: imgcls train --resume {run_dir}")
    return summary


def update_summary(run_dir: Path, **fields: Any) -> dict[str, Any]:
    summary = {**_read_summary_file(run_dir), **fields}
    atomic_write(RunFolder(run_dir).summary, json.dumps(summary, indent=2, default=str).encode())
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


# ----------------------------------------------------------------------------------------------------
# TensorBoard and MLflow: optional mirrors of metrics.csv, opened by rank 0 after the run folder exists


MLFLOW_STATUSES = ("FINISHED", "FAILED", "KILLED")
# never uploaded to MLflow: checkpoints/*.ckpt hold the optimizer state (several times the model's size)
# and tensorboard/ repeats the metrics that MLflow already has
_NOT_UPLOADED = ("checkpoints", "tensorboard")
_MAX_UPLOAD_BYTES = 100 * 2**20  # larger files (a huge predictions CSV) stay in the run folder only
_MAX_PARAM_CHARACTERS = 6000  # MLflow rejects longer parameter values
# metrics.csv columns that are not "<split>_<quantity>"; the others become "<quantity>/<split>"
_SCALAR_TAGS = {
    "lr": "lr", "epoch_seconds": "time/epoch_seconds", "data_wait": "time/data_wait",
    "train_images_per_s": "throughput/images_per_s", "train_gflops_per_s": "throughput/gflops_per_s",
    "cpu_threads": "throughput/cpu_threads",
}


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.csv column: `val_acc1` -> `acc1/val`, `val_ema_loss` -> `loss/val_ema`.

    TensorBoard groups tags by the part before the slash, so the train, val, EMA and test curves of one
    quantity sit in one section.

    Args:
        key: a metrics.csv column or a final metric such as `test_acc1`.
    Returns:
        The tag; a key of no known split is returned unchanged.
    """
    if key in _SCALAR_TAGS:
        return _SCALAR_TAGS[key]
    for split in ("val_ema", "train", "val", "test"):  # val_ema before val: the longest prefix wins
        if key.startswith(split + "_"):
            return f"{key[len(split) + 1:]}/{split}"
    return key


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The nested config as MLflow parameters: `{"train": {"epochs": 5}}` -> `{"train.epochs": "5"}`.

    Args:
        params: a nested dict (e.g. `config_to_dict(config)`).
        prefix: prepended to every key (used by the recursion).
    Returns:
        Dotted keys to string values, cut at MLflow's 6,000-character limit.
    """
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:_MAX_PARAM_CHARACTERS]
    return flat


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row, without the step itself."""
    return {key: float(value) for key, value in row.items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _one_line(error: BaseException) -> str:
    """An exception as one short line (MLflow's messages span several lines)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def _check_reachable(uri: str) -> None:
    """Fail within seconds when an http(s) tracking server does not answer: MLflow itself retries for
    minutes before it gives up on a connection."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        socket.create_connection((parsed.hostname, port), timeout=10).close()
    except (OSError, ValueError) as error:  # ValueError: a port that is not a number
        raise ImgclsError(f"cannot reach the MLflow server at tracking.mlflow_uri={uri} ({_one_line(error)}); "
                          "start it (mlflow server), fix the URI, or set tracking.mlflow=false") from error


def _open_tensorboard(run_dir: Path, resume_epoch: int) -> Any:
    """A SummaryWriter on <run>/tensorboard, or None (with one info line) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("TensorBoard logging is off: `pip install tensorboard` enables it (tracking.tensorboard=false "
                 "silences this line)")
        return None
    # after a resume, TensorBoard drops the events that the stopped run wrote after its last checkpoint
    # (steps > resume_epoch), so no epoch is drawn twice
    purge_step = resume_epoch + 1 if resume_epoch > 0 else None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)


def _start_mlflow(tracking: TrackingConfig, run_dir: Path, params: dict[str, str], run_name: str) -> tuple[Any, str]:
    """Connect to the tracking store, then continue the run recorded in <run>/tracking.json (a resumed
    run) or start a new one and record it there. Returns (client, run id)."""
    try:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag
    except ImportError as error:
        raise ImgclsError("tracking.mlflow=true needs MLflow: pip install mlflow (or set tracking.mlflow=false)") from error
    saved_path = RunFolder(run_dir).tracking
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    # a resumed run keeps the store it started in, even when resumed from another working directory
    uri = tracking.mlflow_uri or saved.get("mlflow_uri") or mlflow.get_tracking_uri()
    _check_reachable(uri)
    try:
        client = MlflowClient(uri)
        run_id = saved.get("mlflow_run_id") if saved.get("mlflow_uri") == uri else None
        existing: dict[str, str] = {}
        if run_id is not None:
            try:
                existing = client.get_run(run_id).data.params
                client.update_run(run_id, status="RUNNING")
            except Exception as error:  # e.g. the run was deleted from the store since
                log.warning(f"cannot continue MLflow run {run_id} ({_one_line(error)}); starting a new one")
                run_id, existing = None, {}
        if run_id is None:
            experiment = client.get_experiment_by_name(tracking.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment(tracking.mlflow_experiment))
            run_id = client.create_run(experiment_id, run_name=run_name,
                                       tags={"imgcls.run_dir": str(run_dir.resolve())}).info.run_id
        # MLflow parameters cannot change: a value changed on resume (train.epochs=20) becomes a tag
        new = [Param(key, value) for key, value in params.items() if key not in existing]
        changed = [RunTag(f"resumed.{key}", value) for key, value in params.items()
                   if key in existing and existing[key] != value]
        for start in range(0, max(len(new), len(changed)), 100):  # MLflow takes at most 100 of each per call
            client.log_batch(run_id, params=new[start:start + 100], tags=changed[start:start + 100])
        atomic_write(saved_path, json.dumps({"mlflow_uri": uri, "mlflow_run_id": run_id}, indent=2).encode())
    except ImgclsError:
        raise
    except Exception as error:
        raise ImgclsError(f"MLflow tracking store {uri} (tracking.mlflow_uri="
                          f"{tracking.mlflow_uri or 'unset, MLflow default'}) failed: {_one_line(error)}") from error
    log.info(f"MLflow: run {run_id} in experiment '{tracking.mlflow_experiment}' at {uri}")
    return client, run_id


def _run_files(run_dir: Path) -> Iterator[tuple[Path, str | None]]:
    """The run folder's small files and the artifact folder each goes to (None: the top level)."""
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        if not path.is_file() or relative.parts[0] in _NOT_UPLOADED or path.suffix == ".ckpt":
            continue
        if path.stat().st_size > _MAX_UPLOAD_BYTES:
            log.info(f"not uploaded to MLflow (over {_MAX_UPLOAD_BYTES // 2**20} MiB): {path}")
            continue
        yield path, None if len(relative.parts) == 1 else relative.parent.as_posix()


class ExperimentLoggers:
    """TensorBoard event files in <run>/tensorboard/ and an MLflow run, fed with what goes into metrics.csv.

    Create it on rank 0 only, once the run folder exists; use it as a context manager (or call `finish`)
    so that the MLflow run ends with the right status. TensorBoard is on whenever `tracking.tensorboard`
    is true and the tensorboard package is installed. MLflow (`tracking.mlflow=true`) logs to
    `tracking.mlflow_uri`, or when that is None to MLflow's own default: $MLFLOW_TRACKING_URI if set,
    otherwise `sqlite:///mlflow.db` in the working directory (artifacts in ./mlruns/), or the older
    ./mlruns file store if one with data is already there. That is the store `mlflow ui`, started in the
    same directory, shows. MLflow's anonymous usage telemetry follows MLflow's own settings
    (MLFLOW_DISABLE_TELEMETRY=true or DO_NOT_TRACK=true turn it off); it never blocks training.

    A resumed run (<run>/tracking.json exists) continues the same MLflow run. A logging failure during
    training is one warning; that backend then stops logging per epoch (a dead server would otherwise
    cost MLflow's minutes of retries every epoch) and training goes on: metrics.csv has every epoch.
    """

    def __init__(self, tracking: TrackingConfig, run_dir: Path, params: dict[str, Any], run_name: str, resume_epoch: int = 0):
        """Open the TensorBoard writer and start (or continue) the MLflow run.

        Args:
            tracking: the `tracking` section of the config (`imgcls.config.TrackingConfig`).
            run_dir: the run folder.
            params: the nested config dict (`config_to_dict(config)`), logged as dotted MLflow parameters.
            run_name: the MLflow run name (the run folder's name).
            resume_epoch: the last epoch of the checkpoint a resumed run starts from; 0 for a new run.
        Raises:
            ImgclsError: tracking.mlflow is on and MLflow is missing, or the tracking store is unreachable
                or refuses the run.
        """
        self.run_dir = Path(run_dir)
        self._failed: dict[str, str] = {}  # backend -> first error; that backend logs nothing more per epoch
        self._finished = False
        self._layout_written = False
        self._client, self.mlflow_run_id = None, None
        if tracking.mlflow:
            self._client, self.mlflow_run_id = _start_mlflow(tracking, self.run_dir, flatten_params(params), run_name)
        self._writer = _open_tensorboard(self.run_dir, resume_epoch) if tracking.tensorboard else None

    def __enter__(self) -> "ExperimentLoggers":
        return self

    def __exit__(self, error_type: type | None, *_: Any) -> None:
        """Without a `finish` in the block, end the MLflow run by how the block ended: FINISHED, KILLED
        for Ctrl-C (or an exception class whose `mlflow_status` says so, as training's RunStopped does),
        else FAILED."""
        if not self._finished:
            interrupted = error_type is not None and issubclass(error_type, KeyboardInterrupt)
            status = getattr(error_type, "mlflow_status", None) or ("KILLED" if interrupted else "FAILED")
            self.finish("FINISHED" if error_type is None else status)

    def _guarded(self, backend: str, action: Callable[[], None]) -> None:
        """Run one logging call; a failure is one warning, and the backend is then off for this run."""
        if backend in self._failed:
            return
        try:
            action()
        except Exception as error:  # never let a logging problem end the training
            self._failed[backend] = _one_line(error)
            log.warning(f"{backend} logging failed, continuing without it (metrics.csv has every epoch): "
                        f"{self._failed[backend]}")

    def log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Log one metrics.csv row: TensorBoard scalars tagged by `scalar_tag`, MLflow metrics under the
        column names, both at step `epoch`. Non-numeric entries are skipped.

        Args:
            epoch: the step (1-based epoch).
            row: the row written to metrics.csv.
        """
        values = _numbers(row)
        if self._writer is not None:
            self._guarded("TensorBoard", lambda: self._write_scalars(values, epoch))
        if self._client is not None:
            self._guarded("MLflow", lambda: self._log_metrics(values, epoch))

    def log_final(self, metrics: dict[str, Any], step: int) -> None:
        """Log the final metrics (e.g. `test_acc1`) at the last epoch's step.

        Args:
            metrics: names with their split prefix (`test_acc1`, `test_macro_f1`) to values.
            step: usually the last epoch trained.
        """
        self.log_epoch(step, metrics)

    def log_image(self, tag: str, png_path: Path, step: int) -> None:
        """Add a PNG (e.g. confusion_test.png) to TensorBoard's images. MLflow gets the file with the run
        folder's other files in `finish`.

        Args:
            tag: the TensorBoard tag, e.g. `confusion/test`.
            png_path: the image file.
            step: the step it belongs to (usually the last epoch).
        """
        if self._writer is None:
            return

        def write() -> None:
            import numpy as np
            from PIL import Image

            with Image.open(png_path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self._writer.add_image(tag, pixels, step, dataformats="HWC")
            self._writer.flush()

        self._guarded("TensorBoard", write)

    def finish(self, status: str = "FINISHED", artifact: Path | None = None) -> None:
        """Close TensorBoard; upload the run folder's small files (not checkpoints/*.ckpt) and the model
        artifact (under model/) to MLflow and end the MLflow run with `status`. Calling it again does nothing.

        MLflow's pytorch flavour (`mlflow.pytorch.log_model`) is deliberately not used: it exports the
        model with torch.export (a traced graph fixed to the example's batch size) and takes seconds even
        for a tiny model; `model.safetensors` already carries everything `imgcls predict` needs.

        Args:
            status: FINISHED, FAILED, or KILLED (interrupted).
            artifact: the model file (checkpoints/model.safetensors), or None.
        Raises:
            ValueError: an unknown status.
        """
        if status not in MLFLOW_STATUSES:
            raise ValueError(f"status must be one of {MLFLOW_STATUSES}, not {status!r}")
        if self._finished:
            return
        self._finished = True
        if self._writer is not None:
            self._guarded("TensorBoard", self._writer.close)
        if self._client is not None:
            # tried even after a failure during training: a run left RUNNING forever is worse than one
            # more attempt; the error (if any) is kept as a tag so the UI says why metrics stop early
            failure = self._failed.get("MLflow")
            try:
                self._end_mlflow(status, artifact, failure)
            except Exception as error:  # the run folder is complete; only its MLflow copy is not
                message = f"MLflow could not end run {self.mlflow_run_id}: {_one_line(error)}"
                if failure is None:
                    log.warning(message)
                else:  # the user was warned about MLflow once already
                    log.debug(message)

    def _write_scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self._writer.add_scalar(scalar_tag(key), value, step)
        if not self._layout_written:  # one chart per quantity with all its splits (Custom Scalars tab)
            self._layout_written = True
            groups: dict[str, list[str]] = {}
            for tag in map(scalar_tag, values):
                groups.setdefault(tag.split("/")[0], []).append(tag)
            self._writer.add_custom_scalars(
                {"imgcls": {name: ["Multiline", tags] for name, tags in groups.items() if len(tags) > 1}})
        self._writer.flush()  # visible in a running `tensorboard` right away, not after its 2-minute flush

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)  # MLflow wants milliseconds
        self._client.log_batch(self.mlflow_run_id, metrics=[Metric(key, value, timestamp, step)
                                                            for key, value in values.items()])

    def _end_mlflow(self, status: str, artifact: Path | None, failure: str | None) -> None:
        if failure is not None:
            self._client.set_tag(self.mlflow_run_id, "imgcls.logging_error", failure)
        for path, folder in _run_files(self.run_dir):
            self._client.log_artifact(self.mlflow_run_id, str(path), folder)
        if artifact is not None and Path(artifact).exists():
            self._client.log_artifact(self.mlflow_run_id, str(artifact), "model")
        self._client.set_terminated(self.mlflow_run_id, status)
