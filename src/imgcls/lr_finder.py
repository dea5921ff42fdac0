"""The learning-rate range test (`imgcls lr-find DATA`): train for a few hundred steps while the
learning rate grows exponentially, record the loss, and suggest a rate from the curve.

As in fastai's `lr_find` (Smith, "Cyclical Learning Rates", 2017): the loss is smoothed with a
debiased exponential moving average, the test stops once the loss has diverged, and the suggestion
is fastai's "valley" (two thirds into the longest stretch of falling loss), which is more robust than
the point of steepest descent (also reported).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.config import Config, save_config
from imgcls.errors import ImgclsError
from imgcls.models import set_backbone_trainable
from imgcls.runtime import Runtime, seed_everything
from imgcls.tracking import RunFolder, create_run_dir, setup_logging
from imgcls.tasks import get_task
from imgcls.training import prepare, resolve_data, train_one_epoch

__all__ = ["find_learning_rate", "smooth", "suggest_valley", "suggest_steepest"]

log = logging.getLogger("imgcls")


class _Diverged(Exception):
    """Raised from the step callback to end the test once the loss has blown up."""


class _Batches:
    """Exactly `count` batches from `loader`, going through it again as often as needed."""

    def __init__(self, loader, count: int):
        self.loader, self.count = loader, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        produced = 0
        while produced < self.count:
            for batch in self.loader:
                if produced == self.count:
                    return
                produced += 1
                yield batch


def smooth(losses: list[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average with bias correction (the early values are not pulled toward 0)."""
    average, smoothed = 0.0, []
    for step, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**step))
    return smoothed


def suggest_valley(losses: list[float]) -> int:
    """Index two thirds into the longest run of (not necessarily adjacent) decreasing losses: fastai's
    `valley`, the start of the steep part of the curve but safely before its minimum."""
    count = len(losses)
    lengths = [1] * count  # longest decreasing subsequence ending at each point
    best_start, best_end = 0, 0
    for i in range(1, count):
        for j in range(i):
            if losses[i] < losses[j] and lengths[i] < lengths[j] + 1:
                lengths[i] = lengths[j] + 1
            if lengths[best_end] < lengths[i]:
                best_end = i
                best_start = best_end - lengths[best_end]
    sections = (best_end - best_start) / 3
    return min(count - 1, best_start + int(sections) + int(sections / 2))


def suggest_steepest(learning_rates: list[float], losses: list[float]) -> int:
    """Index where the loss falls fastest against log(learning rate)."""
    if len(losses) < 3:
        return 0
    gradients = np.gradient(np.asarray(losses), np.log(np.asarray(learning_rates)))
    return int(np.argmin(gradients))


def find_learning_rate(config: Config, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
                       diverge_factor: float = 4.0) -> dict[str, Any]:
    """Run the range test with `config`'s data, model, augmentation, loss and optimiser, and write
    lr_find.csv, lr_find.png, lr_find.json and config.yaml to a new folder `<run.dir>/lr-find-...`.
    The optimiser's head/backbone learning-rate ratio is kept; a model with `model.freeze_epochs`
    is tested with its backbone frozen, as it starts training.

    Returns:
        suggested_lr (valley), steepest_lr, minimum_lr (the lowest smoothed loss), steps (taken),
        folder, plot.
    Raises:
        ImgclsError: bad range or data (as `imgcls train`).
    """
    if not 0 < start_lr < end_lr:
        raise ImgclsError(f"lr-find: the start learning rate ({start_lr}) must be positive and below the end ({end_lr})")
    if steps < 10:
        raise ImgclsError(f"lr-find: --steps {steps} is too few for a curve; use 50 or more")
    config, source = resolve_data(config)
    runtime = Runtime.create(config.device, config.train.precision)
    folder = create_run_dir(config.run.dir, config.run.name, f"lr-find-{source.name}-{config.model.name}")
    setup_logging(folder)
    save_config(config, RunFolder(folder).config)
    seed_everything(config.seed)
    setup = prepare(config, source, runtime)  # as `imgcls train` sets up, so the curve is training's
    setup.generator.manual_seed(config.seed)
    model, optimizer = setup.model, setup.optimizer
    if config.model.freeze_epochs:
        set_backbone_trainable(model, False)
        log.info("backbone frozen, as in the first model.freeze_epochs epochs: the suggestion is for the head")
    # multiply every group's rate, so the backbone keeps its optim.backbone_lr_ratio share
    growth = (end_lr / start_lr) ** (1 / (steps - 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: start_lr * growth ** min(step, steps - 1) / config.optim.lr
    )
    learning_rates: list[float] = []
    losses: list[float] = []

    def record(loss: torch.Tensor) -> None:
        learning_rates.append(start_lr * growth ** len(losses))  # the rate this step was taken with
        losses.append(float(loss))  # a sync per step: acceptable for a 100-step test
        smoothed = smooth(losses)[-1]
        if not math.isfinite(smoothed) or (len(losses) > 10 and smoothed > diverge_factor * min(smooth(losses))):
            raise _Diverged

    try:
        train_one_epoch(model, _Batches(setup.train_loader, steps * config.train.accumulate), optimizer,
                        setup.loss_function, runtime, runtime.grad_scaler(), augment=setup.augment,
                        mixing=setup.mixing, step_scheduler=scheduler,
                        grad_clip=config.train.grad_clip, accumulate=config.train.accumulate, after_step=record,
                        description="lr-find", log_every=config.train.log_every,
                        stop_on_nonfinite=False,  # a diverging loss is the end of the test, found by `record`
                        task=get_task(config.task))
    except _Diverged:
        log.info(f"loss diverged at lr {learning_rates[-1]:.2e} after {len(losses)} steps: stopped")
    return _write_results(folder, learning_rates, losses)


def _write_results(folder: Path, learning_rates: list[float], losses: list[float]) -> dict[str, Any]:
    smoothed = smooth(losses)
    # the last few points are the divergence itself: they would only stretch the valley
    usable = max(3, len(smoothed) - 5) if len(smoothed) > 15 else len(smoothed)
    valley = suggest_valley(smoothed[:usable])
    steepest = suggest_steepest(learning_rates[:usable], smoothed[:usable])
    minimum = int(np.argmin(smoothed[:usable]))
    with open(folder / "lr_find.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        for step, (lr, loss, average) in enumerate(zip(learning_rates, losses, smoothed), start=1):
            writer.writerow([step, f"{lr:.6e}", f"{loss:.6f}", f"{average:.6f}"])
    result = {
        "suggested_lr": learning_rates[valley], "steepest_lr": learning_rates[steepest],
        "minimum_lr": learning_rates[minimum], "steps": len(losses), "folder": str(folder),
        "plot": str(folder / "lr_find.png"),
    }
    (folder / "lr_find.json").write_text(json.dumps(result, indent=2))
    _plot(folder / "lr_find.png", learning_rates, losses, smoothed, {"valley (suggested)": valley, "steepest": steepest})
    return result


def _plot(path: Path, learning_rates: list[float], losses: list[float], smoothed: list[float],
          marks: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot(learning_rates, losses, color="0.75", linewidth=0.8, label="loss")
    axis.plot(learning_rates, smoothed, color="tab:blue", linewidth=1.8, label="smoothed loss")
    for (label, index), colour in zip(marks.items(), ("tab:red", "tab:orange")):
        axis.scatter([learning_rates[index]], [smoothed[index]], color=colour, zorder=3, s=40,
                     label=f"{label}: {learning_rates[index]:.1e}")
    axis.set_xscale("log")
    # the divergence tail would squash the interesting part: cap the axis a little above the start
    low, high = min(smoothed), max(smoothed[: max(1, len(smoothed) // 10)])
    axis.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))
    axis.set_xlabel("learning rate (optim.lr)")
    axis.set_ylabel("training loss")
    axis.set_title("learning-rate range test")
    axis.legend(loc="upper left", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
