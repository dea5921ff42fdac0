"""Accuracy per minute: Fashion-MNIST test accuracy that a wall-clock budget buys, imgcls vs a plain loop.

(a) imgcls: `imgcls train fashion-mnist train.max_minutes=B` and nothing else, for each budget B and
    seed; the clock runs from the call to the end of the final test evaluation (reading and caching the
    data, validation and calibration included). Its test accuracy is the run's own final figure.
(b) plain: the PyTorch loop of `train_throughput.py` (the same small_resnet, ImageFolder + PIL padded
    crop and flip, 2 loader workers, batch 64, AdamW 2e-3, one-cycle over 15 epochs, fp32), scored on the
    10,000 test images after every epoch; its accuracy at budget B is that of the last epoch it finished
    within B minutes of training and scoring (a user who stops the loop at B keeps that model).

Every finished measurement is appended to a JSON-lines file (default benchmarks/time_to_accuracy.jsonl),
so a long sweep can be stopped and continued, and `--report` prints the table (mean ± std over seeds) and
draws the plot (benchmarks/time_to_accuracy.png) from what is there.

    .venv/bin/python benchmarks/time_to_accuracy.py                               # 2, 5, 10, 30 min x 3 seeds (~5 h)
    .venv/bin/python benchmarks/time_to_accuracy.py --budgets 2 5 --seeds 42      # a first look (~20 min)
    .venv/bin/python benchmarks/time_to_accuracy.py --budgets 10 -- model.width=16  # a default to try (keys after --)
    .venv/bin/python benchmarks/time_to_accuracy.py --profile                     # where a step's time goes
    .venv/bin/python benchmarks/time_to_accuracy.py --report

On a CPU with AVX-512, the figures of one without it (AVX2 only: fp32, as `precision=auto` then trains) come
from limiting PyTorch's kernels and oneDNN to AVX2 (a proxy: clocks and caches stay this machine's):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/time_to_accuracy.py --budgets 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("time_to_accuracy.jsonl")


def imgcls_run(budget: float, seed: int, runs: Path, overrides: list[str]) -> dict:
    """One `imgcls train fashion-mnist train.max_minutes=budget seed=seed [overrides]`, timed end to end."""
    import imgcls

    started = time.perf_counter()
    run = imgcls.train(imgcls.load_config(overrides=[
        "data.path=fashion-mnist", f"train.max_minutes={budget}", f"seed={seed}", f"run.dir={runs}",
        f"run.name=budget-{budget:g}-seed-{seed}{''.join('-' + key.replace('=', '') for key in overrides)}", *overrides,
    ]), force=True)
    minutes = (time.perf_counter() - started) / 60
    summary = json.loads((run / "summary.json").read_text())
    rows = (run / "metrics.csv").read_text().strip().splitlines()[1:]
    model = imgcls.load_config(run / "config.yaml").model  # the shape the budget chose (model.width=auto)
    return {"loop": "imgcls", "budget": budget, "seed": seed, "minutes": minutes, "epochs": len(rows),
            "test_acc1": summary["test_metrics"]["acc1"], "network": network_name(model),
            "val_acc1": max(float(row.split(",")[4]) for row in rows), "overrides": " ".join(overrides),
            "native_bf16": native_bf16()}


def network_name(model) -> str:
    """`small_resnet 32x2` (width x blocks), `small_convnet 64` (width), or a timm model's name."""
    if model.blocks is not None:
        return f"{model.name} {model.width}x{model.blocks}"
    return f"{model.name} {model.width}" if model.width is not None else model.name


def native_bf16() -> bool:
    """Whether `precision=auto` trains in bf16 here: a CPU with native bf16 (AVX-512 BF16, 2-4x faster)
    that oneDNN may use (ONEDNN_MAX_CPU_ISA=AVX2 emulates a CPU without AVX-512, see the module's doc)."""
    from imgcls.runtime import cpu_supports_bf16

    return cpu_supports_bf16()


def plain_loop(budgets: list[float], seed: int) -> list[dict]:
    """The plain loop, run once until the first epoch end past the largest budget; for each budget, the
    accuracy of the last epoch that ended within it."""
    from imgcls.data import materialise
    from train_throughput import plain_fashion_mnist

    torch.manual_seed(seed)
    root = materialise("fashion-mnist")
    started = time.perf_counter()
    epochs = 15
    train_loader, test_loader, model, optimizer, schedule = plain_fashion_mnist(root, epochs)
    test_set = test_loader.dataset
    curve = [(0.0, 0, 0.0)]  # (minutes, epoch, test accuracy): before an epoch ends there is no model
    for epoch in range(1, epochs + 1):
        model.train()
        for images, labels in train_loader:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test_loader)
        minutes = (time.perf_counter() - started) / 60
        curve.append((minutes, epoch, correct / len(test_set)))
        print(f"  plain seed {seed} epoch {epoch}: test acc {curve[-1][2]:.4f} at {minutes:.1f} min", flush=True)
        if minutes > max(budgets):
            break
    rows = []
    for budget in budgets:
        minutes, epoch, accuracy = [point for point in curve if point[0] <= budget][-1]
        rows.append({"loop": "plain", "budget": budget, "seed": seed, "minutes": minutes, "epochs": epoch,
                     "test_acc1": accuracy})
    return rows


def where_the_time_goes(steps: int = 60) -> None:
    """imgcls's Fashion-MNIST step at the 10-minute budget (the network it chooses on this machine), phase
    by phase (data, augmentation, forward, backward, optimiser), on cached batches, and the evaluation pass
    per image; what the 10-minute budget is spent on."""
    import imgcls
    from imgcls.data import make_loader
    from imgcls.runtime import Runtime
    from imgcls.training import choose_small_network, prepare, resolve_data

    config, source = resolve_data(imgcls.load_config(overrides=["data.path=fashion-mnist", "train.max_minutes=10"]))
    runtime = Runtime.create(config.device, config.train.precision)
    config = choose_small_network(config, source, runtime, choose_network=True)
    setup = prepare(config, source, runtime)
    model, optimizer, loss_function = setup.model, setup.optimizer, setup.loss_function
    phases = dict.fromkeys(("data", "augment", "forward", "backward", "optimiser"), 0.0)
    batches = iter(setup.train_loader)
    model.train()
    for step in range(steps + 5):
        marks = [time.perf_counter()]
        images, labels = next(batches)
        marks.append(time.perf_counter())
        images = runtime.layout(setup.augment(runtime.to_device(images)))
        marks.append(time.perf_counter())
        with runtime.autocast():
            loss = loss_function(model(images), labels)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if step >= 5:  # after the first steps' allocations
            for name, begin, end in zip(phases, marks, marks[1:]):
                phases[name] += end - begin
    total = sum(phases.values())
    batch = config.train.batch_size
    print(f"{network_name(config.model)} at {config.data.image_size} px, batch {batch}, {runtime.precision}, "
          f"{torch.get_num_threads()} threads: {steps * batch / total:.0f} img/s in the loop")
    print("  " + ", ".join(f"{name} {seconds / total:.0%}" for name, seconds in phases.items()))
    loader = make_loader(setup.prepared.datasets["val"], batch * 2, 0, False)
    model.eval()
    started, seen = time.perf_counter(), 0
    with torch.no_grad(), runtime.autocast():
        for images, _ in loader:
            model(runtime.to_device(images))
            seen += len(images)
    evaluation = (time.perf_counter() - started) / seen
    print(f"  evaluation: {1 / evaluation:.0f} img/s ({evaluation * batch / (total / steps):.0%} of a training "
          "step's time per image)")


def report(results: Path, overrides: str = "") -> None:
    """The table (mean ± std over seeds) and the plot (next to `results`, as .png), from the measurements in
    `results` made with `overrides` (none: the defaults)."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("overrides", "") == overrides]
    table: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        table.setdefault((row["loop"], row["budget"]), []).append(row)

    def cell(loop: str, budget: float) -> str:
        found = table.get((loop, budget), [])
        if not found:
            return "-"
        if all(row["epochs"] == 0 for row in found):
            return "no epoch ended in time: no model"
        accuracies = [row["test_acc1"] for row in found]
        spread = f" ± {statistics.stdev(accuracies):.3f}" if len(found) > 1 else ""
        epochs = statistics.mean(row["epochs"] for row in found)
        minutes = statistics.mean(row["minutes"] for row in found)
        networks = sorted({row["network"] for row in found if "network" in row})
        network = f", {' / '.join(networks)}" if networks else ""
        return (f"{statistics.mean(accuracies):.4f}{spread} (n={len(found)}, {epochs:.1f} epochs, {minutes:.1f} min"
                f"{network})")

    budgets = sorted({budget for _, budget in table})
    print("| budget | imgcls test accuracy | plain loop test accuracy |")
    print("|---|---|---|")
    for budget in budgets:
        print(f"| {budget:g} min | {cell('imgcls', budget)} | {cell('plain', budget)} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for loop in ("imgcls", "plain"):
        points = [(budget, [row["test_acc1"] for row in table[(loop, budget)] if row["epochs"] > 0])
                  for budget in budgets if (loop, budget) in table]
        points = [(budget, accuracies) for budget, accuracies in points if accuracies]
        if points:
            axes.errorbar([b for b, _ in points], [statistics.mean(a) for _, a in points],
                          yerr=[statistics.stdev(a) if len(a) > 1 else 0 for _, a in points], marker="o",
                          capsize=3, label=loop)
    axes.set_xscale("log")
    axes.set_xticks(budgets, [f"{budget:g}" for budget in budgets])
    axes.minorticks_off()
    axes.set_xlabel("wall-clock budget, minutes")
    axes.set_ylabel("Fashion-MNIST test accuracy")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    plot = results.with_suffix(".png")
    figure.savefig(plot, dpi=120)
    print(f"plot: {plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2, 5, 10, 30])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 123, 777])
    parser.add_argument("--loops", nargs="+", default=["imgcls", "plain"], choices=["imgcls", "plain"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--runs", type=Path, help="keep imgcls's run folders here (default: a temporary folder)")
    parser.add_argument("--profile", action="store_true", help="only: where a training step's time goes")
    parser.add_argument("--report", action="store_true", help="only: the table and plot from --results")
    parser.add_argument("overrides", nargs="*", help="imgcls keys beyond the budget (e.g. model.width=16), for "
                        "trying a default; recorded with each row, and reported apart from the defaults")
    args = parser.parse_args()
    if args.profile:
        return where_the_time_goes()
    if not args.report:
        import logging

        logging.getLogger("imgcls").setLevel(logging.WARNING)
        done = set()
        if args.results.exists():
            done = {(row["loop"], row["budget"], row["seed"], row.get("overrides", ""))
                    for row in map(json.loads, args.results.read_text().splitlines()) if row}
        overrides = " ".join(args.overrides)

        def record(row: dict) -> None:
            if (row["loop"], row["budget"], row["seed"], row.get("overrides", "")) not in done:
                print(json.dumps(row), flush=True)
                with open(args.results, "a") as handle:
                    handle.write(json.dumps(row) + "\n")

        with tempfile.TemporaryDirectory() as temporary:
            runs = args.runs or Path(temporary)
            for seed in args.seeds:
                if "plain" in args.loops and any(("plain", budget, seed, "") not in done for budget in args.budgets):
                    for row in plain_loop(args.budgets, seed):
                        record(row)
                for budget in args.budgets:
                    if "imgcls" in args.loops and ("imgcls", budget, seed, overrides) not in done:
                        record(imgcls_run(budget, seed, runs, args.overrides))
    report(args.results, " ".join(args.overrides))


if __name__ == "__main__":
    main()
