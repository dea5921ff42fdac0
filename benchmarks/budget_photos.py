"""Time budgets on photos: does `train.max_minutes` end a timm model's run in time at 128-224 px?

On the generated photo-like folder of `train_throughput.py` (JPEGs of 300-500 px), imgcls trains its
automatic model for photos (timm's resnet18, from scratch) with `train.max_minutes=B` at each
`data.image_size`, and reports the wall-clock minutes from the call to the end of the final evaluation
against the budget, the epochs the plan fitted, where the learning rate ended (a share of its peak: the
cosine laid over the budget ends near 0) and the test accuracy. The folder has 4 classes, two of them
rectangles and two ellipses in random colours, so about 0.5 is what a model can reach: the figure to
read here is the time, not the accuracy.

    .venv/bin/python benchmarks/budget_photos.py                              # 128 and 224 px, 2 and 4 min (~12 min)
    .venv/bin/python benchmarks/budget_photos.py --sizes 224 --budgets 3
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from train_throughput import make_photo_folder


def budget_run(data: Path, runs: Path, size: int, budget: float) -> str:
    import imgcls

    started = time.perf_counter()
    run = imgcls.train(imgcls.load_config(overrides=[
        f"data.path={data}", f"data.image_size={size}", f"train.max_minutes={budget}", f"run.dir={runs}",
        f"run.name=photos-{size}-{budget:g}"]))
    minutes = (time.perf_counter() - started) / 60
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    rates = [float(row["lr"]) for row in rows]
    summary = json.loads((run / "summary.json").read_text())
    model = imgcls.load_config(run / "config.yaml").model.name
    return (f"{size:4d} px, train.max_minutes={budget:g}: ended after {minutes:.2f} min ({minutes / budget:.0%} of the "
            f"budget), {model}, {len(rows)} epochs, last lr {rates[-1] / max(rates):.1%} of its peak, "
            f"test acc1 {summary['test_metrics']['acc1']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--budgets", type=float, nargs="+", default=[2, 4])
    parser.add_argument("--per-class", type=int, default=100, help="images per class (4 classes)")
    args = parser.parse_args()
    import logging

    logging.getLogger("imgcls").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as temporary:
        data = make_photo_folder(Path(temporary) / "photos", 4, args.per_class)
        for size in args.sizes:
            for budget in args.budgets:
                print(budget_run(data / "train", Path(temporary) / "runs", size, budget), flush=True)


if __name__ == "__main__":
    main()
