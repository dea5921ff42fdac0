"""Training beside another busy program: imgcls' thread sizing vs a fixed thread count, side by side.

On a shared machine, OpenMP threads whose cores are taken by another program wait for them at every
parallel region, spinning. imgcls sizes its threads to the free cores (runtime.CoreShare, re-checked
every 5 s); before, it always used every core (what `OMP_NUM_THREADS=<cores>` still does).

Each setting trains the small CNN at 28 px, fp32, on a Fashion-MNIST subset (`digits` when the Debian
package is missing), alone and beside N single-threaded busy loops (`python -c "while True: pass"`),
runs alternating so that drift hits every setting. Reports the steady-state images/s (the last epoch),
the threads used, and the ratio to the fair share: the alone speed x 1/(N + 1), the machine split evenly
between the N + 1 programs.

    .venv/bin/python benchmarks/shared_cpu.py                  # beside 1 busy program, 2 repeats
    .venv/bin/python benchmarks/shared_cpu.py --busy 3 --repeats 1
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORES = len(os.sched_getaffinity(0))
SETTINGS = {
    "imgcls (free cores)": {},
    f"fixed {CORES} threads (before)": {"OMP_NUM_THREADS": str(CORES)},
    f"fixed {CORES} threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_NUM_THREADS": str(CORES), "OMP_WAIT_POLICY": "PASSIVE"},
}


def train_once(folder: Path, name: str, environment: dict[str, str], data: str, epochs: int) -> tuple[float, int]:
    """(images/s of the last epoch, threads at its end) of one `imgcls train` run."""
    subprocess.run(
        [sys.executable, "-m", "imgcls", "train", data, "data.fraction=0.1", f"train.epochs={epochs}",
         "model.name=small_resnet", "data.image_size=28", "train.precision=fp32", "data.augment=none",
         "train.calibrate=false", f"run.dir={folder}", f"run.name={name}"],
        env={**os.environ, **environment}, check=True, capture_output=True,
    )
    with open(folder / name / "metrics.csv", newline="") as handle:
        last = list(csv.DictReader(handle))[-1]
    return float(last["train_images_per_s"]), int(float(last["cpu_threads"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=1, help="busy programs beside training (default 1)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="the last one is measured (default 2)")
    args = parser.parse_args()
    data = "fashion-mnist" if Path("/usr/share/datasets/fashion-mnist").is_dir() else "digits"
    folder = Path(tempfile.mkdtemp(prefix="imgcls-shared-cpu-"))
    avx512_bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    print(f"{CORES} cores, avx512_bf16: {'yes' if avx512_bf16 else 'no'}; {data}, small_resnet 28 px fp32; "
          f"beside {args.busy} busy program(s)", flush=True)
    train_once(folder, "warm-up", {}, data, 1)  # the decoded-image cache, built once
    results: dict[tuple[str, str], list[tuple[float, int]]] = {}
    run = 0
    for _ in range(args.repeats):
        for situation in ("alone", "beside"):
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)] \
                if situation == "beside" else []
            time.sleep(0.5)
            try:
                for setting, environment in SETTINGS.items():
                    run += 1
                    measured = train_once(folder, f"run-{run}", environment, data, args.epochs)
                    results.setdefault((setting, situation), []).append(measured)
                    print(f"  {setting:45s} {situation:6s} {measured[0]:7.0f} images/s, {measured[1]} thread(s)",
                          flush=True)
            finally:
                for process in busy:
                    process.kill()
                    process.wait()

    def speed(setting: str, situation: str) -> float:
        return statistics.median(value for value, _ in results[(setting, situation)])

    baseline = speed(f"fixed {CORES} threads (before)", "alone")
    fair = baseline / (args.busy + 1)
    print(f"\nfair share beside {args.busy} busy program(s): {fair:.0f} images/s (alone, before: {baseline:.0f})")
    for setting in SETTINGS:
        alone, beside = speed(setting, "alone"), speed(setting, "beside")
        threads = results[(setting, "beside")][-1][1]
        print(f"{setting:45s} alone {alone:6.0f} ({alone / baseline:.2f}x before)   beside {beside:6.0f} "
              f"= {beside / fair:.2f}x the fair share ({threads} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
