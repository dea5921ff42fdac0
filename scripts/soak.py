"""Soak test of kill-and-resume: train once uninterrupted, then N times killed with SIGKILL at a random
moment and resumed, and count how many of the resumed runs end bit-identical to the uninterrupted one
(the same model weights, test metrics and per-epoch metrics).

The kill moments are drawn uniformly over the uninterrupted run's duration, and the first two are
forced into the phases that are easiest to get wrong: before the first checkpoint is written, and
during the final evaluation (after the last epoch's checkpoint). Not part of the test suite: it takes
minutes (about 25 s per kill on a 2-core CPU with the defaults).

    .venv/bin/python scripts/soak.py                      # 13 kills on scikit-learn's digits
    .venv/bin/python scripts/soak.py --kills 30 --epochs 6 --seed 1
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMING_COLUMNS = {"epoch_seconds", "train_images_per_s", "data_wait", "train_gflops_per_s"}


def command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "imgcls", *arguments]


def fingerprint(run: Path) -> dict:
    """What must be identical: every weight of the model artifact, the test metrics, the metrics rows."""
    from safetensors.torch import load_file

    weights = load_file(run / "checkpoints" / "model.safetensors")
    with open(run / "metrics.csv", newline="") as handle:
        rows = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]
    summary = json.loads((run / "summary.json").read_text())
    return {"weights": {key: value.numpy().tobytes() for key, value in weights.items()},
            "test_metrics": summary.get("test_metrics"), "best_epoch": summary.get("best_epoch"), "rows": rows}


def phase(run: Path) -> str:
    """Where a run was when it was killed, read from its folder."""
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if not (run / "config.yaml").exists():
        return "starting"  # no run to resume yet: the same command starts it again
    if summary.get("stage") == "final evaluation":
        return "final evaluation"
    if not (run / "checkpoints" / "last.ckpt").exists():
        return "before the first checkpoint"
    return "training"


def kill_when(process: subprocess.Popen, run: Path, moment: float | str, timeout: float) -> bool:
    """SIGKILL `process` at `moment` seconds after its start, or when its folder shows the phase named
    by `moment`. False when it ended first."""
    started = time.perf_counter()
    while process.poll() is None and time.perf_counter() - started < timeout:
        due = (time.perf_counter() - started >= moment) if isinstance(moment, float) else phase(run) == moment
        if due:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.01)
    process.wait()
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="dataset (default: digits)")
    parser.add_argument("--kills", type=int, default=13)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed at the end)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="imgcls-soak-"))
    settings = [args.data, f"train.epochs={args.epochs}", "train.deterministic=true", f"run.dir={folder}"]

    started = time.perf_counter()
    subprocess.run(command("train", *settings, "run.name=reference"), check=True, capture_output=True)
    duration = time.perf_counter() - started
    reference = fingerprint(folder / "reference")
    print(f"uninterrupted run: {duration:.1f} s; killing {args.kills} runs at random moments", flush=True)

    rng = random.Random(args.seed)
    moments: list[float | str] = ["before the first checkpoint", "final evaluation"][: args.kills]
    moments += [rng.uniform(0.0, duration) for _ in range(args.kills - len(moments))]
    identical, results = 0, []
    for index, moment in enumerate(moments):
        run = folder / f"killed-{index:02d}"
        process = subprocess.Popen(command("train", *settings, f"run.name={run.name}"),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed = kill_when(process, run, moment, timeout=10 * duration)
        where = phase(run) if killed else "not killed (it had finished)"
        # a run killed before its folder held a config cannot be resumed: the same command, --force, starts it again
        again = command("train", *settings, f"run.name={run.name}", "--force") if where == "starting" else \
            command("train", "--resume", str(run))
        resumed = subprocess.run(again, capture_output=True, text=True) if killed else None
        same = (resumed is None or resumed.returncode == 0) and fingerprint(run) == reference
        identical += same
        when = f"{moment:5.1f} s" if isinstance(moment, float) else "phase"
        error = "" if resumed is None or resumed.returncode == 0 else f": {resumed.stderr.strip().splitlines()[-1]}"
        print(f"  kill {index + 1:2d} at {when} ({where}): {'identical' if same else 'DIFFERENT'}{error}", flush=True)
        results.append({"moment": moment, "phase": where, "identical": same})
    killed_count = sum(1 for result in results if not result["phase"].startswith("not killed"))
    print(f"soak: {identical} of {len(results)} resumed runs ended bit-identical to the uninterrupted run "
          f"({killed_count} killed, {time.perf_counter() - started:.0f} s in all)")
    (folder / "soak.json").write_text(json.dumps({"identical": identical, "runs": results}, indent=2))
    if args.keep:
        print(f"run folders: {folder}")
    else:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return 0 if identical == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
