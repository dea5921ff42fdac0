"""Training: `train(config)` sets up a run and runs the loop; `train_one_epoch` is one pass over the data.

Read top to bottom: run folder -> data -> model -> optimiser -> (resume) -> epochs -> final test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from imgcls.budget import DEFAULT_EPOCHS, CosineSchedule, TimeBudget, cosine_with_warmup, measure_images_per_second
from imgcls.checkpoint import CheckpointSet, DiskFullError, atomic_write, load_artifact, load_checkpoint, save_artifact
from imgcls.config import Config, config_to_dict, load_config, save_config
from imgcls.data import (
    DataSource, PreparedSplits, assign_splits, balanced_sampler, build_augment, build_datasets, channel_statistics, default_workers,
    make_loader, median_side, read_splits_csv, resolve_source, subsample_train, write_splits_csv,
)
from imgcls.data.augment import AUGMENT_MIN_EPOCHS, build_mixing
from imgcls.data.checks import mirror_check
from imgcls.data.sources import as_task
from imgcls.errors import ImgclsError
from imgcls.evaluation import calibrate, evaluate, predict_loader
from imgcls.models import (
    LOCAL_MODELS, LONG_BUDGET_SMALL_RESNET_SHAPE, SHORT_BUDGET_SMALL_CONVNET_WIDTH, SHORT_BUDGET_SMALL_RESNET_SHAPE,
    SMALL_CONVNET_WIDTH, SMALL_RESNET_SHAPE, check_network_shape, create_model, default_preprocessing, head_parameters,
    set_backbone_trainable, test_time_view_count, training_flops_per_image, zero_init_residuals,
)
from imgcls.runtime import CoreShare, Distributed, Runtime, rng_state, seed_everything, set_rng_state
from imgcls.tasks import SingleLabel, Task, get_task
from imgcls.tracking import (
    ExperimentLoggers, RunFolder, StepProgress, append_metrics, create_run_dir, environment, process_identity, process_is_alive,
    read_metrics, read_summary, setup_logging, truncate_metrics, update_summary,
)

__all__ = ["train", "train_one_epoch", "prepare", "TrainingSetup", "TrainingState", "validate", "cosine_with_warmup",
           "cache_dataset", "build_model", "RunStopped"]

log = logging.getLogger("imgcls")

# with model.name=small_resnet, a time budget buying fewer epochs than SHORT of its default shape takes the
# narrower, deeper one; at least LONG, the deeper one of the same width
SHORT_BUDGET_EPOCHS = 8
LONG_BUDGET_EPOCHS = 10
# with model.name=auto, a budget buying from SMALL_CONVNET_EPOCHS[0] up to (not including) SMALL_CONVNET_EPOCHS[1]
# epochs of it takes small_convnet: where it was measured ahead (see choose_small_network), 32 wide under
# SHORT_BUDGET_EPOCHS and 64 from there. Each edge sits below the epochs that a 10-minute budget reads on a
# 2-core CPU, 7-11 with AVX-512 BF16 and 4.3-6.4 without AVX-512 (a speed that moves ~30% over minutes), so that
# the choice there does not depend on the minute it starts
SMALL_CONVNET_EPOCHS = (4, 40)
# loss.label_smoothing=auto on small_resnet (single-label cross-entropy): Fashion-MNIST, 10-minute budget, 5 seeds
AUTO_LABEL_SMOOTHING = 0.1
# cores kept busy by other programs while that speed is measured, from which it waits up to PROBE_WAIT_SECONDS
# for them to finish and measures again (and the log warns when they have not)
BUSY_DURING_PROBE = 0.5
PROBE_WAIT_SECONDS = 10.0
# keys that may change when resuming; anything else would make the resumed run a different experiment
RESUMABLE_OVERRIDES = ("train.epochs", "train.max_minutes", "train.patience", "device", "data.workers", "train.log_every")


# ----------------------------------------------------------------------------------------------------
# schedules and small pieces of arithmetic


def is_improvement(value: float, best: float | None, metric: str) -> bool:
    """Lower is better for losses, higher for everything else."""
    if best is None:
        return True
    return value < best if metric.endswith("loss") else value > best


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW or SGD over four parameter groups: head and backbone (backbone lr = optim.lr x
    optim.backbone_lr_ratio), each split into decayed weights and undecayed 1-D tensors (biases and
    normalisation weights, as in timm and torchvision). Group 0 is the head's: its lr is the one logged."""
    head = head_parameters(model)
    groups = []
    for in_head, lr in ((True, config.optim.lr), (False, config.optim.lr * config.optim.backbone_lr_ratio)):
        members = [p for p in model.parameters() if (id(p) in head) == in_head]
        groups += [
            {"params": [p for p in members if p.ndim > 1], "weight_decay": config.optim.weight_decay, "lr": lr},
            {"params": [p for p in members if p.ndim <= 1], "weight_decay": 0.0, "lr": lr},
        ]
    groups = [group for group in groups if group["params"]]
    if config.optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.optim.lr)
    if config.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=config.optim.lr, momentum=config.optim.momentum, nesterov=True)
    raise ImgclsError(f"unknown optim.name '{config.optim.name}'; use adamw or sgd")


def planned_epochs(config: Config) -> int | None:
    """`train.epochs`, or when it is not set, None with a time budget (the budget decides) and
    DEFAULT_EPOCHS without one."""
    if config.train.epochs is not None:
        return config.train.epochs
    return None if config.train.max_minutes is not None else DEFAULT_EPOCHS


def _planned_so_far(budget) -> str:
    """The epochs a time budget's plan holds, for progress lines: "?" until the first steps are timed
    (before that the plan is only the DEFAULT_EPOCHS guess the schedule starts from)."""
    return "?" if budget.step_seconds is None else str(budget.planned_epochs())


def set_scheduled_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Give the optimiser the rate its schedule now says for the next step. A resumed optimiser holds the
    rate the checkpoint's plan gave; a plan changed on resume would otherwise start one step late."""
    for group, base, function in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * function(scheduler.last_epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, steps_per_epoch: int):
    """Returns (scheduler, when): `when` is "step" (after every optimiser step) or "epoch". The cosine
    schedule's plan (a CosineSchedule) is `scheduler.lr_lambdas[0]`; a time budget revises it."""
    name = config.optim.scheduler
    if name == "cosine":
        warmup = round(config.optim.warmup_epochs * steps_per_epoch)
        total = (planned_epochs(config) or DEFAULT_EPOCHS) * steps_per_epoch  # a budget's first guess
        return torch.optim.lr_scheduler.LambdaLR(optimizer, CosineSchedule(warmup, total)), "step"
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.optim.step_epochs, config.optim.gamma), "epoch"
    if name == "plateau":
        mode = "min" if config.train.monitor.endswith("loss") else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=config.optim.gamma, patience=config.optim.plateau_patience
        ), "epoch"
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), "step"
    raise ImgclsError(f"unknown optim.scheduler '{name}'; use cosine, step, plateau or none")


# ----------------------------------------------------------------------------------------------------
# the loop


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, loss_function: Callable,
                    runtime: Runtime, scaler: torch.amp.GradScaler, augment: nn.Module | None = None,
                    mixing: Callable | None = None, step_scheduler=None, grad_clip: float | None = None,
                    accumulate: int = 1, after_step: Callable[[torch.Tensor], None] | None = None,
                    description: str | Callable[[], str] = "train", log_every: int = 50,
                    stop_on_nonfinite: bool = True,
                    task: Task = SingleLabel(), stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """One pass over `loader` (uint8 batches). On each batch, on the device: `augment`, then `mixing`
    (mixup/cutmix: soft targets). One optimiser step every `accumulate` batches, then the per-step
    schedule and `after_step(loss of the batch)` (the weight EMA, the time budget; the learning-rate
    finder); the epoch ends early when `stop()` is then true (a time budget's last, partial epoch). Returns
    train_loss, train_accuracy (the `task`'s: top-1, or the whole label set right; against the unmixed
    labels), images, seconds and data_wait (the share of the time spent waiting for the next batch:
    high means the loader, not the model, is the limit).

    Raises:
        TrainingDiverged: a loss was NaN or infinite, or fp16 loss scaling gave up (`stop_on_nonfinite`).
    """
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)  # summed on the device: no CPU-GPU sync per step
    correct = torch.zeros((), device=runtime.device)
    # the first step whose loss was not finite (len(loader): none yet), kept on the device and read at
    # the sync points below: every step on a CPU (free there), at progress lines and the end on a GPU
    first_nonfinite = torch.full((), len(loader), device=runtime.device)
    check_every_step = runtime.device.type == "cpu"
    images_seen, waited = 0, 0.0
    started = time.perf_counter()
    with StepProgress(len(loader), description, every=log_every) as bar:
        ready = time.perf_counter()
        for index, (images, labels) in enumerate(loader):
            waited += time.perf_counter() - ready
            if runtime.cores is not None:
                runtime.cores.adjust()  # every few seconds: as many threads as there are free cores
            images, labels = runtime.to_device(images), labels.to(runtime.device, non_blocking=True)
            if augment is not None:
                images = runtime.layout(augment(images))
            targets = labels
            if mixing is not None:
                images, targets = mixing(images, labels)
                images = runtime.layout(images)
            with runtime.autocast():
                logits = model(images)
                loss = loss_function(logits, targets)
            scaler.scale(loss / accumulate).backward()  # gradients of `accumulate` batches add up
            stepped = (index + 1) % accumulate == 0 or index + 1 == len(loader)
            if stepped:
                if grad_clip is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if step_scheduler is not None:
                    step_scheduler.step()
                if after_step is not None:
                    after_step(loss.detach())
            loss_sum += loss.detach() * len(labels)
            correct += task.correct(logits.detach(), labels)
            images_seen += len(labels)
            first_nonfinite = torch.where(torch.isfinite(loss.detach()), first_nonfinite,
                                          first_nonfinite.clamp(max=index))
            line_due = bar.count % max(1, log_every) == 0 or bar.total - bar.count < 2
            if stop_on_nonfinite and (check_every_step or line_due):
                check_finite(int(first_nonfinite), len(loader), scaler, optimizer, grad_clip, description)
            if line_due:
                # .item() is a CPU-GPU sync point: only when a progress line is due
                bar.update(1, f"loss {loss_sum.item() / images_seen:.4f}")
            else:
                bar.update(1)
            if stepped and stop is not None and stop():
                break
            ready = time.perf_counter()
    seconds = time.perf_counter() - started
    if stop_on_nonfinite:
        check_finite(int(first_nonfinite), len(loader), scaler, optimizer, grad_clip, description, model)
    # totals over every process of a torchrun job (a no-op otherwise)
    loss_sum, correct, images_seen = runtime.distributed.sum(
        torch.stack([loss_sum.double(), correct.double(), torch.tensor(images_seen, dtype=torch.float64, device=runtime.device)])
    ).tolist()
    if images_seen == 0:
        raise ImgclsError("the training split produced no batches; lower train.batch_size or add images")
    return {
        "train_loss": loss_sum / images_seen,
        "train_accuracy": correct / images_seen,
        "images": images_seen,
        "seconds": seconds,
        "data_wait": waited / max(seconds, 1e-9),
    }


class TrainingDiverged(ImgclsError):
    """The loss or the weights stopped being finite numbers: training cannot recover from that."""


# fp16 loss scaling halves its scale after every step with overflowing gradients, from 2**16; this far
# down, no step has succeeded for dozens of steps in a row and the scaler has given up
_GIVEN_UP_SCALE = 2.0**-16


def check_finite(first_nonfinite: int, steps: int, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                 grad_clip: float | None, description: str | Callable[[], str], model: nn.Module | None = None) -> None:
    """Raise TrainingDiverged, with what to try, when step `first_nonfinite` (< `steps`) had a
    non-finite loss, fp16 loss scaling has given up, or (given `model`) a weight is NaN or infinite.

    Raises:
        TrainingDiverged: one line naming the epoch and step and what to try.
    """
    if first_nonfinite < steps:
        what = f"the loss became NaN or infinite at step {first_nonfinite + 1} of {steps}"
    elif scaler.is_enabled() and scaler.get_scale() < _GIVEN_UP_SCALE:
        what = f"fp16 loss scaling gave up (scale {scaler.get_scale():.1e}: every step overflowed)"
    elif model is not None and not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
        what = "the weights became NaN or infinite"
    else:
        return
    advice = f"lower optim.lr (the learning rate was {optimizer.param_groups[0]['lr']:.2g} then)"
    advice += ", or a smaller train.grad_clip" if grad_clip is not None else ", or set train.grad_clip=1.0"
    where = description() if callable(description) else description  # read only here: it runs every CPU step
    raise TrainingDiverged(f"training diverged in {where}: {what}; {advice}. The checkpoints and the "
                           "model of the last good epoch are kept")


# ----------------------------------------------------------------------------------------------------
# set-up helpers


def resolve_task(config: Config, source: DataSource) -> Config:
    """Fill in `task`, `loss.name` and `train.monitor` when automatic (from the data: a multi-label source
    makes a multi-label task), and check that the loss, monitor and sampler fit the task."""
    name = config.task if config.task != "auto" else ("multi" if source.multi_label else "single")
    task = get_task(name)
    loss = task.default_loss if config.loss.name == "auto" else config.loss.name
    monitor = task.default_monitor if config.train.monitor == "auto" else config.train.monitor
    task.check_config(loss, monitor, config.data.sampler)
    return replace(config, task=name, loss=replace(config.loss, name=loss), train=replace(config.train, monitor=monitor))


def automatic_batch_size(train_images: int) -> int:
    """`train.batch_size=auto`: 64, halved down to 16 while an epoch would have fewer than 100 batches."""
    batch_size = 64
    while batch_size > 16 and train_images / batch_size < 100:
        batch_size //= 2
    return batch_size


def _resolve_auto(config: Config, source: DataSource) -> Config:
    """Fill in `model.name=auto`, `data.image_size=None`, `data.horizontal_flip=None`, `train.batch_size=None`,
    `loss.label_smoothing=None` and the task from the data, so the saved config is explicit."""
    config = resolve_task(config, source)
    model_name, image_size = config.model.name, config.data.image_size
    if model_name == "auto" or (image_size is None and model_name in LOCAL_MODELS):
        side = median_side([path for path, _ in source.splits["train"]])
        if model_name == "auto":
            model_name = "small_resnet" if side <= 64 else "resnet18"
        if image_size is None and model_name in LOCAL_MODELS:
            image_size = int(min(64, max(16, math.ceil(side / 4) * 4)))  # a multiple of 4 for two 2x downsamplings
    if image_size is None:
        image_size = default_preprocessing(model_name)["image_size"]
    flip = config.data.horizontal_flip
    if flip is None:
        check = mirror_check(source)
        flip = check is None or not check.flips_hurt
        if check is not None:  # logged by the run, whose log file does not exist yet
            source.notes.append(f"data.horizontal_flip={str(flip).lower()}: {check.describe()}")
    batch_size = config.train.batch_size or automatic_batch_size(len(source.splits["train"]))
    augment = config.data.augment
    # short runs on small images learn faster unaugmented (measured on Fashion-MNIST and digits; photos and
    # pretrained models keep light augmentation); with a budget, decided as the plan is known
    short_runs_matter = image_size <= 64
    if augment == "auto" and (not short_runs_matter or config.train.max_minutes is None):
        augment = "none" if short_runs_matter and planned_epochs(config) < AUGMENT_MIN_EPOCHS else "light"
    smoothing = config.loss.label_smoothing
    if smoothing is None:  # measured on small_resnet only; timm's models and multi-label data keep plain targets
        smoothing = AUTO_LABEL_SMOOTHING if model_name in LOCAL_MODELS and config.loss.name == "ce" else 0.0
    width, blocks = config.model.width, config.model.blocks
    # with a time budget, a small_resnet's shape (and with model.name=auto, the network) waits for the
    # machine's measured speed (_start_run)
    if model_name == "small_resnet" and (config.train.max_minutes is None or width is not None or blocks is not None):
        width, blocks = width or SMALL_RESNET_SHAPE[0], blocks or SMALL_RESNET_SHAPE[1]
    if model_name == "small_convnet":
        width = width or SMALL_CONVNET_WIDTH
    check_network_shape(model_name, width, blocks)  # here, before a run folder is made for a shape it cannot build
    if config.model.tta == "flip" and not flip:
        raise ImgclsError("model.tta=flip averages each image with its mirror image, but data.horizontal_flip is "
                          "false (a mirror image may be another class here): set data.horizontal_flip=true, or "
                          "model.tta=none")
    return replace(config, model=replace(config.model, name=model_name, width=width, blocks=blocks),
                   data=replace(config.data, image_size=image_size, horizontal_flip=flip, augment=augment),
                   train=replace(config.train, batch_size=batch_size), loss=replace(config.loss, label_smoothing=smoothing))


@dataclass(frozen=True)
class SmallNetwork:
    """A small-image network chosen for a time budget, and why, for the log."""

    name: str
    width: int
    blocks: int | None
    why: str = ""

    def describe(self) -> str:
        if self.name == "small_resnet":
            return f"model.width={self.width} model.blocks={self.blocks}"
        return f"model.name={self.name} model.width={self.width}"


def small_network_for(affordable_epochs: float, fixed_epochs: int | None, choose_network: bool) -> SmallNetwork:
    """The small-image network for a budget that buys `affordable_epochs` of the default small_resnet, in a
    run of `fixed_epochs` (`train.epochs`; None: as many as the budget allows). `choose_network`: model.name
    was auto, so a budget in SMALL_CONVNET_EPOCHS takes small_convnet; otherwise the shapes of small_resnet only."""
    if fixed_epochs is not None and affordable_epochs >= fixed_epochs:  # not short of time
        return SmallNetwork("small_resnet", *SMALL_RESNET_SHAPE)
    lowest, highest = SMALL_CONVNET_EPOCHS
    if choose_network and lowest <= affordable_epochs < highest:
        if affordable_epochs < SHORT_BUDGET_EPOCHS:
            return SmallNetwork("small_convnet", SHORT_BUDGET_SMALL_CONVNET_WIDTH, None,
                                f"; from {lowest:g} to {SHORT_BUDGET_EPOCHS:g}, small_convnet 32 learns more in the time")
        return SmallNetwork("small_convnet", SMALL_CONVNET_WIDTH, None,
                            f"; from {SHORT_BUDGET_EPOCHS:g} to {highest:g}, the wider small_convnet learns more in the time")
    if affordable_epochs < SHORT_BUDGET_EPOCHS:
        return SmallNetwork("small_resnet", *SHORT_BUDGET_SMALL_RESNET_SHAPE,
                            f"; under {lowest if choose_network else SHORT_BUDGET_EPOCHS:g}, "
                            "a narrower, deeper network learns more in the time")
    if affordable_epochs >= LONG_BUDGET_EPOCHS:
        return SmallNetwork("small_resnet", *LONG_BUDGET_SMALL_RESNET_SHAPE,
                            f"; from {highest:g}, small_convnet is no longer ahead of the deeper small_resnet"
                            if choose_network else f"; from {LONG_BUDGET_EPOCHS}, a deeper network learns more in the time")
    return SmallNetwork("small_resnet", *SMALL_RESNET_SHAPE)


def choose_small_network(config: Config, source: DataSource, runtime: Runtime, choose_network: bool) -> Config:
    """A small_resnet with `model.width` and `model.blocks` left automatic and `train.max_minutes`: the
    network for the epochs the budget buys of the default small_resnet (32 wide, 1 block per stage) at the
    speed measured on this machine (about 2 s of training steps on random images, spent from the budget;
    with other programs busy meanwhile, up to PROBE_WAIT_SECONDS more, see below):
    - under SHORT_BUDGET_EPOCHS (with `choose_network`, under SMALL_CONVNET_EPOCHS[0]), the narrower, deeper
      small_resnet 16/2, which trains ~1.7x more images per second. Fashion-MNIST at 5 minutes (2.5 epochs of
      the default on a CPU without AVX-512): val 0.922 ± 0.002 against 0.914 ± 0.001 (3 seeds, McNemar p =
      0.01 on the seeds' majority votes, compare's test then);
    - from SMALL_CONVNET_EPOCHS[0] to SHORT_BUDGET_EPOCHS, with `choose_network` (model.name was auto),
      small_convnet 32, at ~3x the images per second of the 64-wide one and ~1.75x those of small_resnet 32/1.
      Fashion-MNIST at 10 minutes on the AVX-512 BF16 CPU limited to AVX2 (fp32, a proxy for a CPU without
      AVX-512; 5.9-6.4 epochs of the default), 3 seeds: val 0.943 ± 0.001 against 0.938 ± 0.002 for
      small_convnet 64, auto's choice there before (9 epochs against 3; McNemar p < 0.0001 over the seed
      pairs, CI [0.3, 0.8] points); test 0.942 ± 0.001 against 0.936 ± 0.002. With AVX-512 BF16 at 5 minutes
      (~4-5 epochs of the default), 3 seeds: val 0.937 ± 0.002 against 0.938 ± 0.002 for the 64-wide one
      (8 epochs against 3; p = 0.64: equal); test 0.937 ± 0.003 against 0.934 ± 0.003;
    - from SHORT_BUDGET_EPOCHS to SMALL_CONVNET_EPOCHS[1], with `choose_network`,
      small_convnet 64 at about the speed of small_resnet 32/2 with 2.8x its parameters. Fashion-MNIST on a
      CPU with AVX-512 BF16, all unaugmented with label smoothing: at 5 minutes (~4-5 epochs of the default,
      the band of small_convnet 32 now), val 0.935 ± 0.002 against 16/2's 0.931 ± 0.003 (3 seeds, 3 epochs
      against 5-7; McNemar p = 0.018, CI [0.0, 0.7]; test 0.933 against 0.931); at 9 minutes (~8.5 epochs of the
      default), 0.942 ± 0.002 against 32/1's 0.934 ± 0.002 (p < 0.0001, CI [0.4, 1.1]); at 10 minutes
      (~11.5), 0.940 ± 0.001 against 32/2's 0.937 ± 0.002 (5 seeds; McNemar p = 0.005 over the seed pairs,
      bootstrap CI [0.0, 0.6] points; test 0.941 against 0.936). At 30 minutes (~28), one seed: test 0.944
      (32/2 without label smoothing 0.940); at 60 minutes (~55, light augmentation), one seed: val 0.949
      against 0.950 for 32/2 with the same seed (p = 0.69: equal), test 0.945 against 32/2's 0.948 ± 0.002 over 3 seeds:
      no longer ahead, so from SMALL_CONVNET_EPOCHS[1] the budget takes small_resnet 32/2;
    - without `choose_network` (model.name=small_resnet), from LONG_BUDGET_EPOCHS the deeper small_resnet 32/2
      at half the speed, which learns more in the epochs it gets (val 0.934 ± 0.002 against 0.928 ± 0.002 for
      32/1, McNemar p = 0.0002 over the seed pairs, 32/1 with light augmentation then; unaugmented, 0.937 ±
      0.001 against 0.935 ± 0.001), and in between the default, which learns most per epoch of the three
      (digits, 4 epochs: val 0.995 against 0.984 for 16/2).
    A run capped by `train.epochs` before the budget ends is not short of time: it keeps the default."""
    if config.model.name != "small_resnet" or config.model.width is not None or config.model.blocks is not None:
        return config
    classes = len(source.class_names)
    model = runtime.prepare_model(create_model("small_resnet", classes, (0.5,) * 3, (0.5,) * 3))
    cores = runtime.cores if runtime.device.type == "cpu" else None

    def measure() -> tuple[float, float]:  # images/s, and the cores other programs kept busy meanwhile
        before = cores.sample() if cores is not None else None
        speed = runtime.distributed.world_size * measure_images_per_second(
            model, runtime, config.train.batch_size, config.data.image_size, classes)
        return speed, cores.others_since(before) if cores is not None else 0.0

    # a busy program beside the 2-second measurement slows it far more than its share (2 threads on 2 cores
    # beside one plot: 250 images/s against 900 alone), and the choice holds for the whole run: wait a little
    # for it to finish, then measure again, on the cores it leaves free if it has not (as training runs)
    speed, others = measure()
    if others >= BUSY_DURING_PROBE:
        waited = time.monotonic()
        cores.use_free_cores(cores.wait_for_free_cores(BUSY_DURING_PROBE, PROBE_WAIT_SECONDS))
        first, (speed, others) = speed, measure()
        source.notes.append(f"other programs kept CPU cores busy while the speed was measured ({first:.0f} images/s); "
                            f"waited {time.monotonic() - waited:.0f} s and measured again on {cores.threads} thread(s)")
    epochs = config.train.max_minutes * 60 * speed / max(1, len(source.splits["train"]))
    network = small_network_for(epochs, config.train.epochs, choose_network)
    chosen = network.describe()
    source.notes.append(
        f"{chosen}: train.max_minutes={config.train.max_minutes:g} buys about "
        f"{epochs:.1f} epochs of small_resnet's default (width {SMALL_RESNET_SHAPE[0]}, {SMALL_RESNET_SHAPE[1]} "
        f"block per stage) at the {speed:.0f} images/s measured here{network.why}")
    if others >= BUSY_DURING_PROBE:
        source.notes.append(
            f"warning: other programs kept {others:.1f} CPU core(s) busy while the speed was measured, so "
            f"{chosen} may be smaller than this machine affords alone; start a budgeted run on an idle machine, "
            f"or set model.width and model.blocks")
    return replace(config, model=replace(config.model, name=network.name, width=network.width, blocks=network.blocks))


def _log_data_summary(source: DataSource, class_names: list[str]) -> None:
    for split, samples in source.splits.items():
        counts = source.counts(split)
        smallest = min(counts.values()) if counts else 0
        largest = max(counts.values()) if counts else 0
        log.info(f"  {split:5s} {len(samples):7d} images, {len(counts)} classes, "
                 f"{smallest}-{largest} per class")
    train_counts = source.counts("train")
    ratio = max(train_counts.values()) / max(1, min(train_counts.values()))
    if ratio >= 10:
        rare = min(train_counts, key=train_counts.get)
        watch = ("mAP and macro-F1, not only micro-F1" if source.multi_label
                 else "balanced accuracy and macro-F1, not only accuracy")
        log.warning(f"training classes are imbalanced {ratio:.0f}:1 (fewest: '{rare}', {train_counts[rare]} images); "
                    f"watch {watch}")


def _log_calibration(calibration: dict[str, Any]) -> None:
    if "thresholds" in calibration:  # multi-label
        f1 = calibration["val_f1_micro"]
        log.info(f"per-label thresholds chosen on val ({min(calibration['thresholds']):.2f}-"
                 f"{max(calibration['thresholds']):.2f}): val micro-F1 {f1['at_0.5']:.4f} at 0.5 -> {f1['at_thresholds']:.4f}")
        return
    nll, reject = calibration["val_nll"], calibration["reject"]
    log.info(f"calibration: temperature {calibration['temperature']:.3f} (val NLL {nll['before']:.4f} -> "
             f"{nll['after']:.4f})" + (f"; predict --reject auto answers 'unknown' below confidence "
                                       f"{reject['threshold']:.3f} ({reject['coverage']:.0%} of val answered at "
                                       f"{reject['precision']:.1%} precision)" if reject.get("threshold") is not None
                                       else "; no confidence threshold reaches train.reject_precision on val"))


def test_time_augmentation(config: Config, augmented: bool) -> str:
    """The test-time augmentation built into the model saved from an epoch (`model.tta`): none, flip (each
    image and its mirror image) or crops (each image, its mirror image where data.horizontal_flip allows,
    and its shifts by 1/16 of the side up, down, left and right: 6 views, or 5).

    auto: crops for images of 64 px or less when the epoch trained on mirror images and shifted crops
    (`augmented`: its augmentation was not none, and `data.horizontal_flip` let it flip), none otherwise.
    Measured on Fashion-MNIST (bf16 CPU, val, McNemar): flip against the plain network, small_resnet 32/2
    after 60 minutes with light augmentation, 3 seeds, 0.950 -> 0.953 (152 images gained, 99 lost, p =
    0.001); small_convnet after 30 minutes 0.945 -> 0.949 (p = 0.011); an unaugmented small_convnet after
    10 minutes 0.940 -> 0.938, not significant, so runs without augmentation keep the plain network.
    crops against flip, on the same trained models (32/2 after 60 minutes, seed 777; small_convnet after 30
    minutes, seeds 42 and 123; all with light augmentation): val 0.949 -> 0.951 (McNemar p = 0.031 over the
    3 seed pairs; test 0.9465 -> 0.9470, equal), for 6 forward passes instead of 2 at inference (the 10
    views that also mirror each shift read the same val). Bigger images are not measured, and their
    inference costs more: they keep it off unless asked.
    """
    if config.model.tta != "auto":
        return config.model.tta
    return "crops" if config.data.horizontal_flip and augmented and config.data.image_size <= 64 else "none"


def test_time_views(tta: str, flip: bool) -> int:
    """Forward passes per image of a model with `tta` built in (see `ImageClassifier.test_time_views`)."""
    return test_time_view_count(tta == "flip" or (tta == "crops" and flip), tta == "crops")


def artifact_metadata(config: Config, class_names: list[str], metrics: dict[str, Any], epoch: int,
                      env: dict[str, Any], normalisation: tuple[tuple[float, ...], tuple[float, ...]],
                      tta: str = "none") -> dict[str, Any]:
    """What the model artifact carries so that predict/eval/export need nothing else. `tta`: the
    test-time augmentation the model runs itself (see `test_time_augmentation`)."""
    mean, std = normalisation
    return {
        "model_name": config.model.name,
        "task": config.task,
        "class_names": class_names,
        "drop_rate": config.model.drop_rate,
        "head_hidden": config.model.head_hidden,
        "width": config.model.width,
        "blocks": config.model.blocks,
        "tta": tta,
        "preprocessing": {
            "image_size": config.data.image_size,
            "resize": config.data.resize,
            "mean": list(mean),
            "std": list(std),
            "input": "RGB uint8 NCHW, 0..255; the model normalises",
        },
        "epoch": epoch,
        "metrics": metrics,
        "config": config_to_dict(config),
        "versions": env.get("versions", {}),
    }


def build_model(config: Config, num_classes: int, train_dataset) -> tuple[nn.Module, tuple]:
    """The model a config asks for, normalising its input with the statistics its pretrained weights
    were trained with, or, from scratch, with the training images' own (a seeded sample: the same on
    every rank and on resume).

    Returns:
        (model, (mean, std)).
    """
    if config.model.pretrained:
        preprocessing = default_preprocessing(config.model.name)
        normalisation = (tuple(preprocessing["mean"]), tuple(preprocessing["std"]))
    else:
        normalisation = channel_statistics(train_dataset)
    log.info(f"normalisation: mean {normalisation[0]}, std {normalisation[1]}"
             + (" (pretrained weights')" if config.model.pretrained else " (training images)"))
    model = create_model(config.model.name, num_classes, *normalisation, config.model.drop_rate,
                         config.model.pretrained, config.model.head_hidden, config.model.width, config.model.blocks)
    if config.model.zero_init_residual and config.model.name == "small_resnet":
        zero_init_residuals(model)
    return model, normalisation


def cache_dataset(config: Config) -> tuple[Config, int]:
    """Build the decoded-image cache for `config.data.path` ahead of training (`imgcls cache DATA`), at
    the size and resize policy that training with the same config will use.

    Returns:
        (the config with model and image size resolved, number of readable images).
    """
    config, source = resolve_data(config)
    prepared = build_datasets(source.splits, source.class_names, config.data.image_size, config.data.resize,
                              cache="on", on_bad_image=config.data.on_bad_image, task=config.task)
    return config, sum(len(dataset) for dataset in prepared.datasets.values())


def resolve_data(config: Config) -> tuple[Config, DataSource]:
    """The data a config names, split and subsampled, and the config with its automatic choices made.
    Shared by training and `imgcls cache`, so the cache holds exactly the files training will read."""
    source = split_data(config)
    return _resolve_auto(config, source), source


def split_data(config: Config) -> DataSource:
    """The images a config names, split and subsampled as every command that reads data sees them (training,
    `imgcls cache`, `imgcls doctor`)."""
    source = as_task(resolve_source(config.data.path, config.data.label_separator), config.task)
    # split_seed, not seed: every seed of a sweep trains and tests on the same images
    source = assign_splits(source, config.data.val_fraction, config.data.test_fraction, config.data.split_seed)
    return subsample_train(source, config.data.fraction, config.data.per_class_limit, config.data.split_seed)


def warn_cross_split_copies(source: DataSource, data: str) -> None:
    """One warning line when files in different splits are byte-identical (the cheap part of `imgcls doctor`)."""
    from imgcls.data.duplicates import cross_split_copies

    groups = cross_split_copies(source.splits)
    if groups:
        copies = sum(len(group) - 1 for group in groups)
        (first, first_split), (second, second_split) = groups[0][:2]
        log.warning(f"{copies} file(s) are byte-identical copies of files in another split (e.g. {first} in "
                    f"{first_split} = {second} in {second_split}): their scores are not on unseen images; "
                    f"run `imgcls doctor {data}` for every copy and a cleaned manifest")


def _start_run(config: Config, force: bool, runtime: Runtime) -> tuple[Config, Path, DataSource]:
    choose_network = config.model.name == "auto"
    config, source = resolve_data(config)
    config = choose_small_network(config, source, runtime, choose_network)
    warn_cross_split_copies(source, config.data.path)
    run_dir = create_run_dir(config.run.dir, config.run.name, f"{source.name}-{config.model.name}", force)
    # from now on --force may replace the folder; the process is recorded from the start (see read_summary)
    update_summary(run_dir, status="created", run=str(run_dir), **process_identity())
    # config.yaml keeps run.name as asked (null when automatic), so `imgcls train -c` on it starts a new run
    save_config(config, RunFolder(run_dir).config)
    config = replace(config, run=replace(config.run, name=run_dir.name))
    write_splits_csv(source, RunFolder(run_dir).splits, config.data.label_separator)
    RunFolder(run_dir).checkpoints.mkdir()
    return config, run_dir, source


@dataclass
class Resumption:
    """What `--resume` continues from: the last checkpoint (None: the run was killed before its first
    epoch ended, so it starts again from the beginning in the same folder), and whether training had
    already ended, so that only the final evaluation and calibration are left to do."""

    checkpoint: dict | None
    training_ended: bool
    extends: bool = False  # resumed to train longer than it was asked (more train.epochs or train.max_minutes)


def _resume_run(run: str | Path, overrides: list[str], force: bool,
                is_main: bool = True) -> tuple[Config, Path, DataSource, Resumption]:
    """Every rank reads the run folder; rank 0 alone (`is_main`) repairs or completes it."""
    run_dir = Path(run)
    if not RunFolder(run_dir).config.exists():
        if RunFolder(run_dir).summary.exists():  # killed in the instant between creating the folder and its config
            raise ImgclsError(f"cannot resume {run_dir}: it was stopped before its settings were saved; start it "
                              "again with the same command and --force (which replaces that folder)")
        raise ImgclsError(f"cannot resume {run_dir}: no config.yaml there (is it a run folder?)")
    saved = load_config(RunFolder(run_dir).config)
    config = load_config(RunFolder(run_dir).config, overrides)
    changed = [key for key in (o.split("=", 1)[0] for o in overrides) if key not in RESUMABLE_OVERRIDES]
    if changed:
        raise ImgclsError(f"cannot change '{changed[0]}' when resuming (only {', '.join(RESUMABLE_OVERRIDES)}); "
                          f"start a new run with -c {run_dir}/config.yaml instead")
    summary = read_summary(run_dir)
    if summary.get("status") in ("created", "running") and not force:
        alive = process_is_alive(summary)
        if alive:
            raise ImgclsError(f"{run_dir} is still being trained (pid {summary['pid']}); wait for it or stop it first")
        if alive is None and "pid" in summary:
            raise ImgclsError(f"{run_dir} is being trained on {summary.get('host')} (pid {summary['pid']}); if that "
                              "process is gone, resume with --force")
    checkpoints = CheckpointSet(RunFolder(run_dir).checkpoints)
    raised_epochs = _extends(config, saved)
    if not checkpoints.last.is_file():
        log.warning(f"{run_dir} has no checkpoint (it stopped before the end of its first epoch): "
                    "training it again from the beginning in the same folder")
        resumption = Resumption(None, training_ended=False)
    else:
        checkpoint = load_checkpoint(checkpoints.last)
        repaired = checkpoints.repair(checkpoint) if is_main else []
        if repaired:
            log.warning(f"{' and '.join(repaired)} lagged behind last.ckpt (stopped between the writes of epoch "
                        f"{checkpoint['epoch']}): rewritten from it")
        patience, epochs, planned = config.train.patience, planned_epochs(config), checkpoint.get("budget", {})
        budget_spent = (config.train.max_minutes is not None and not raised_epochs and "total_steps" in planned
                        and checkpoint.get("steps", 0) >= planned["total_steps"])
        ended = ((epochs is not None and checkpoint["epoch"] >= epochs) or budget_spent
                 or (not raised_epochs and (summary.get("stage") == "final evaluation"
                                            or (patience is not None and checkpoint["stale_epochs"] >= patience))))
        if ended and summary.get("status") == "completed":
            if epochs is None:
                raise ImgclsError(f"{run_dir} has already spent its train.max_minutes={config.train.max_minutes:g}; "
                                  f"add train.max_minutes=M (more than {config.train.max_minutes:g}) to continue it")
            raise ImgclsError(f"{run_dir} has already trained all {epochs} epochs; "
                              f"add train.epochs=N (more than {epochs}) to continue it")
        resumption = Resumption(checkpoint, training_ended=ended, extends=raised_epochs)
    if raised_epochs:
        log.info(f"resuming with train.epochs={config.train.epochs}, train.max_minutes={config.train.max_minutes} "
                 f"(was {saved.train.epochs}, {saved.train.max_minutes})")
    if RunFolder(run_dir).splits.exists():
        source = read_splits_csv(RunFolder(run_dir).splits, config.data.path, config.data.label_separator)
        config = resolve_task(config, source)  # a run from before tasks has task=auto in its config
    else:  # killed before it was written: the splits are a function of the saved config (data.split_seed)
        config, source = resolve_data(config)
        if is_main:
            write_splits_csv(source, RunFolder(run_dir).splits, config.data.label_separator)
    config = replace(config, run=replace(config.run, name=run_dir.name))
    return config, run_dir, source, resumption


def _extends(config: Config, saved: Config) -> bool:
    """Whether resuming with `config` trains longer than `saved` asked: more epochs or more minutes."""
    now, before = planned_epochs(config), planned_epochs(saved)
    more_epochs = before is not None and (now is None or now > before)
    more_minutes = config.train.max_minutes is not None and (saved.train.max_minutes is None
                                                             or config.train.max_minutes > saved.train.max_minutes)
    return more_epochs or more_minutes


def _on_main(distributed: Distributed, function: Callable, *args: Any) -> Any:
    """Run `function` on rank 0 only and hand its result (or its ImgclsError) to every rank, so that a
    bad input stops all processes of a torchrun job with the same message instead of a hang."""
    result, error = None, None
    if distributed.is_main:
        try:
            result = function(*args)
        except ImgclsError as raised:
            error = raised
    result, message = distributed.broadcast((result, str(error) if error else None))
    if error is not None:
        raise error
    if message is not None:
        raise ImgclsError(message)
    return result


def parameters_checksum(model: nn.Module) -> float:
    """A number that differs when any weight differs: proves that every rank holds the same model."""
    with torch.no_grad():
        return float(sum(p.double().abs().sum().item() + p.double().sum().item() for p in model.parameters()))


# ----------------------------------------------------------------------------------------------------
# train()


class RunStopped(Exception):
    """Raised by an `on_epoch` callback to end a run early (a hyper-parameter search pruning a trial);
    the run folder is marked `stopped` with the message as the reason."""

    mlflow_status = "KILLED"  # how ExperimentLoggers ends the MLflow run when this ends the training


def train(config: Config | None = None, *, resume: str | Path | None = None, overrides: list[str] = (),
          force: bool = False, on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train a classifier and return its run folder. Under `torchrun`, every process calls this and
    they train one model together (DistributedDataParallel); rank 0 writes the run folder.

    Args:
        config: the full configuration (see `imgcls.config.Config`); ignored with `resume`.
        resume: a run folder to continue from its `checkpoints/last.ckpt`.
        overrides: with `resume`, `key=value` changes allowed on resume (e.g. `train.epochs=20`).
        force: replace an existing run folder of the same explicit `run.name`.
        on_epoch: called on rank 0 after every epoch with (epoch, the metrics.csv row); it may raise
            `RunStopped` to end the run (no final evaluation).
    Raises:
        ImgclsError: bad data, config or run folder.
        RunStopped: `on_epoch` stopped the run.
    """
    distributed = Distributed.from_environment()
    cores = CoreShare(distributed.local_world_size)
    try:
        return _train(config, resume, list(overrides), force, distributed, cores, on_epoch)
    finally:
        distributed.shutdown()


def _train(config: Config | None, resume: str | Path | None, overrides: list[str], force: bool,
           distributed: Distributed, cores: CoreShare,
           on_epoch: Callable[[int, dict[str, float]], None] | None) -> Path:
    started = time.perf_counter()  # a time budget counts from here: reading and caching the data spend it too
    resumption = Resumption(None, training_ended=False)
    if resume is not None:
        config, run_dir, source, resumption = _resume_run(resume, overrides, force, distributed.is_main)
    elif config is None:
        raise ImgclsError("train() needs a config or resume=RUN")
    runtime = Runtime.create(config.device, config.train.precision, distributed, cores)  # fails before any folder exists
    if config.train.deterministic:
        # a CPU kernel's sums run in an order that depends on the thread count: a change mid-run would make
        # a resumed run differ from an uninterrupted one in the last bits
        cores.keep_fixed("train.deterministic=true (results depend on the thread count)")
    if resume is None:
        config, run_dir, source = _on_main(distributed, _start_run, config, force, runtime)
    setup_logging(run_dir if distributed.is_main else None, quiet=not distributed.is_main)
    # each rank its own seed: different augmentations; DDP copies rank 0's initial weights to all
    seed_everything(config.seed + distributed.rank, config.train.deterministic)
    env = environment(device=str(runtime.device), precision=runtime.precision, seed=config.seed,
                      world_size=distributed.world_size, cpu_thread_policy=cores.policy,
                      omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "libgomp's default (spin a while, then sleep)"))
    checkpoint = resumption.checkpoint
    if distributed.is_main:
        atomic_write(RunFolder(run_dir).environment, json.dumps(env, indent=2).encode())
        # the process is recorded, so that a run whose process died reads as interrupted, not running
        update_summary(run_dir, status="running", run=str(run_dir), started=env["created"], error=None,
                       stage="final evaluation" if resumption.training_ended else "training", **process_identity())
    loggers = None  # TensorBoard / MLflow, on rank 0 only

    def open_loggers() -> None:
        nonlocal loggers
        loggers = ExperimentLoggers(config.tracking, run_dir, config_to_dict(config), run_dir.name,
                                    checkpoint["epoch"] if checkpoint is not None else 0)

    def mark(**fields: Any) -> None:
        """Record how the run ended, on rank 0, without hiding the error that ended it (a full disk)."""
        if distributed.is_main:
            try:
                update_summary(run_dir, ended=environment()["created"], **fields)
            except (OSError, ImgclsError) as error:
                log.warning(f"could not update {run_dir / 'summary.json'}: {error}")

    # the loggers end their MLflow run as the block ends: KILLED, FAILED, or FINISHED (below, with the model)
    with contextlib.ExitStack() as finishing:
        try:
            _on_main(distributed, open_loggers)  # a bad tracking URI stops every rank with the same message
            if loggers is not None:
                finishing.enter_context(loggers)
            if resumption.training_ended:
                log.info(f"training of {run_dir} had ended; finishing its final evaluation")
                result = _ended_training(run_dir, checkpoint, config.train.monitor)
            else:
                result = _fit(config, run_dir, source, runtime, env, checkpoint, loggers, on_epoch, started,
                              resumption.extends)
            if distributed.is_main:
                update_summary(run_dir, stage="final evaluation")  # a resume after a kill from here on only finishes
            result.update(_final_evaluation(config, run_dir, source, runtime, loggers, result))
        except RunStopped as stopped:
            mark(status="stopped", error=str(stopped))
            log.info(f"stopped: {stopped}")
            raise
        except KeyboardInterrupt:
            mark(status="interrupted")
            log.warning(f"interrupted; continue with: imgcls train --resume {run_dir}")
            raise
        except DiskFullError as error:
            mark(status="failed", error=str(error))
            raise DiskFullError(error.path, error.needed, advice="free some space there, then continue with: "
                                f"imgcls train --resume {run_dir}") from error
        except BaseException as error:
            mark(status="failed", error=str(error) if isinstance(error, ImgclsError) else f"{type(error).__name__}: {error}")
            raise
        mark(status="completed", stage="done", **result)
        if loggers is not None:  # after the summary, so MLflow gets the final summary.json
            loggers.finish("FINISHED", RunFolder(run_dir).artifact)
    return run_dir


def _ended_training(run_dir: Path, checkpoint: dict, monitor: str) -> dict[str, Any]:
    """What `_fit` returns, for a run whose training had ended before it was stopped."""
    rows = read_metrics(RunFolder(run_dir).metrics)
    return {"best_epoch": checkpoint["best_epoch"], "best": {monitor: checkpoint["best"]},
            "last_epoch": _last_metrics_row(rows),
            "train_minutes": sum(float(row["epoch_seconds"]) for row in rows) / 60}


def _last_metrics_row(rows: list[dict[str, str]]) -> dict[str, float]:
    return {key: float(value) for key, value in rows[-1].items()} if rows else {}


@dataclass
class TrainingSetup:
    """What training and the learning-rate range test both start from (see `prepare`)."""

    prepared: PreparedSplits
    train_loader: DataLoader
    generator: torch.Generator  # the train loader's shuffling: reseed it to fix an epoch's order
    sampler: Sampler | None
    workers: int
    model: nn.Module  # on the runtime's device, in its memory layout
    normalisation: tuple[tuple[float, ...], tuple[float, ...]]
    optimizer: torch.optim.Optimizer
    loss_function: nn.Module
    augment: nn.Module | None
    mixing: Callable | None
    unaugmented: nn.Module | None = None  # data.augment=auto in a short budget: the other keys' augmentation alone


def prepare(config: Config, source: DataSource, runtime: Runtime) -> TrainingSetup:
    """Data (decoded once, checked), the train loader and its sampler, augmentation and mixing, the
    model, the optimiser and the loss, as `config` asks: one set-up for `train` and `lr-find`."""
    distributed = runtime.distributed
    if not distributed.is_main:
        distributed.barrier()  # rank 0 decodes into the cache first; the others then open it
    prepared = build_datasets(source.splits, source.class_names, config.data.image_size, config.data.resize,
                              config.data.cache, config.data.cache_max_gib, config.data.on_bad_image, config.task)
    if distributed.is_main:
        distributed.barrier()
    train_set = prepared.datasets["train"]
    mixing = build_mixing(config.data, len(source.class_names))  # mixup / cutmix: soft targets, or None
    augment = build_augment(config.data, config.data.image_size)
    unaugmented = build_augment(replace(config.data, augment="none"), config.data.image_size)
    workers = config.data.workers if config.data.workers is not None else default_workers(prepared.cached)
    generator = torch.Generator()
    sampler = None
    if config.data.sampler == "balanced":  # every class about equally often, from the loader's generator
        if distributed.enabled:
            raise ImgclsError("data.sampler=balanced does not work with torchrun yet; use loss.class_weights=auto")
        sampler = balanced_sampler(train_set.labels, generator)
    elif distributed.enabled:  # each rank a disjoint shard of the same seeded permutation
        sampler = DistributedSampler(train_set, distributed.world_size, distributed.rank, shuffle=True,
                                     seed=config.seed, drop_last=True)
    train_loader = make_loader(train_set, config.train.batch_size, workers, True, generator,
                               runtime.device.type == "cuda", sampler)
    model, normalisation = build_model(config, len(source.class_names), train_set)
    model = runtime.prepare_model(model)
    optimizer = build_optimizer(model, config)
    loss_function = get_task(config.task).build_loss(config.loss, train_set.labels, len(source.class_names))
    loss_function = loss_function.to(runtime.device)
    return TrainingSetup(prepared, train_loader, generator, sampler, workers, model, normalisation, optimizer,
                         loss_function, augment, mixing, unaugmented)


@dataclass
class TrainingState:
    """Everything a run needs to continue as if never stopped: the weights, the optimiser, schedule and
    loss scaler, the EMA of the weights, and the early-stopping bookkeeping. `state_dict` and
    `load_state_dict` are the one pair that saves and restores it (the checkpoint adds the RNG states,
    config and class names)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: Any = None  # timm's ModelEmaV3 with train.ema, else None
    budget: TimeBudget | None = None  # with train.max_minutes
    steps: int = 0  # optimiser steps taken
    budget_state: dict = None  # a checkpoint's TimeBudget.state_dict(), until the budget is made
    epoch: int = 0  # the last finished epoch
    best: float | None = None
    best_epoch: int = 0
    stale_epochs: int = 0  # epochs since the best one

    def after_step(self, _: torch.Tensor) -> None:
        """After each optimiser step (train_one_epoch's `after_step`)."""
        self.steps += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.steps)
        if self.budget is not None:
            self.budget.after_step(self.steps)

    def out_of_time(self) -> bool:
        """The time budget's planned steps are all taken (train_one_epoch's `stop`)."""
        return self.budget is not None and self.budget.done(self.steps)

    def record(self, epoch: int, value: float, monitor: str) -> bool:
        """Note epoch `epoch`'s monitored value; True when it is the best so far."""
        self.epoch = epoch
        if is_improvement(value, self.best, monitor):
            self.best, self.best_epoch, self.stale_epochs = value, epoch, 0
            return True
        self.stale_epochs += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
            "best": self.best, "best_epoch": self.best_epoch, "stale_epochs": self.stale_epochs,
            "ema": self.ema.state_dict() if self.ema is not None else None, "steps": self.steps,
            "budget": self.budget.state_dict() if self.budget is not None else self.budget_state,
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        self.steps = checkpoint.get("steps", checkpoint.get("ema_steps", 0))  # ema_steps: checkpoints before budgets
        self.budget_state = checkpoint.get("budget")
        self.epoch = checkpoint["epoch"]
        self.best, self.best_epoch = checkpoint["best"], checkpoint["best_epoch"]
        self.stale_epochs = checkpoint["stale_epochs"]


def validate(state: TrainingState, loader: DataLoader, runtime: Runtime, monitor: str,
             task: Task = SingleLabel()) -> tuple[dict, float, nn.Module]:
    """val_* metrics of the raw weights and, with an EMA, val_ema_* of the averaged ones.

    Returns:
        (metrics, the better of the two values of `monitor`, the weights that gave it).
    """
    val = task.metrics(*predict_loader(state.model, loader, runtime))
    val = {f"val_{key}": value for key, value in val.items() if key != "n"}
    candidate, weights = val[monitor], state.model
    if state.ema is not None:
        val_ema = task.metrics(*predict_loader(state.ema.module, loader, runtime))
        val.update({f"val_ema_{key}": value for key, value in val_ema.items() if key != "n"})
        if is_improvement(val_ema[monitor.removeprefix("val_")], candidate, monitor):
            candidate, weights = val_ema[monitor.removeprefix("val_")], state.ema.module
    return val, candidate, weights


def final_prediction_slowdown(model: nn.Module, loader, runtime: Runtime) -> float:
    """How many times longer the final evaluation takes per image than validation in training: on a CPU
    it predicts in fp32 (imgcls.prediction.load: bf16 would change low-order digits) where training
    validates in its bf16 autocast. Timed on one batch of `loader` each way, after one untimed pass each
    (kernel set-up); 1.0 where both run the same precision."""
    if runtime.device.type != "cpu" or runtime.precision == "fp32" or len(loader) == 0:
        return 1.0
    images = runtime.to_device(next(iter(loader))[0])
    training = model.training
    model.eval()

    def seconds(precision: contextlib.AbstractContextManager) -> float:
        with torch.no_grad(), precision:
            model(images)
            started = time.perf_counter()
            model(images)
            return time.perf_counter() - started

    slowdown = seconds(contextlib.nullcontext()) / seconds(runtime.autocast())
    model.train(training)
    return max(1.0, slowdown)


def _time_budget(config: Config, state: TrainingState, prepared: PreparedSplits, steps_per_epoch: int,
                 started: float, distributed: Distributed, extends: bool, final_slowdown: float) -> TimeBudget:
    """The plan of `train.max_minutes`, continued from a checkpoint's when resuming. `extends`: resumed to
    train longer than the checkpoint's run was asked, whose cosine may have ended: the first plan lays the
    plain cosine of the longer run (see CosineSchedule.replan)."""
    sizes = {split: len(dataset) for split, dataset in prepared.datasets.items()}
    final_split = RunFolder.final_split(sizes)
    validated = max(1, sizes["val"]) * (2 if state.ema is not None else 1)  # the raw and the averaged weights
    epochs = planned_epochs(config)
    schedule = state.scheduler.lr_lambdas[0] if isinstance(state.scheduler, torch.optim.lr_scheduler.LambdaLR) else None
    budget = TimeBudget(config.train.max_minutes, started, steps_per_epoch,
                        schedule if isinstance(schedule, CosineSchedule) else None,
                        epochs * steps_per_epoch if epochs is not None else None,
                        validation_share=validated / max(1, sizes["train"]),
                        final_share=(sizes["val"] + sizes.get(final_split, 0)) / validated, broadcast=distributed.broadcast)
    budget.fresh_plan = extends
    budget.final_slowdown = final_slowdown
    if state.budget_state:  # resumed: the time spent and the speeds measured so far, and a plan from them
        budget.load_state_dict(state.budget_state)
        budget.plan(state.steps)
        if isinstance(schedule, CosineSchedule):
            set_scheduled_lr(state.scheduler)
        log.info(f"time budget train.max_minutes={config.train.max_minutes:g}: {state.budget_state['seconds_used'] / 60:.1f} spent "
                 f"before this resume; planned {budget.total_steps} steps in all ({state.steps} taken)")
    else:
        log.info(f"time budget train.max_minutes={config.train.max_minutes:g}: the schedule is planned over the steps it allows, "
                 "from the speed of the first steps" + (f"; the final evaluation predicts in fp32, {final_slowdown:.1f}x "
                                                        "validation's time per image" if final_slowdown > 1 else ""))
    return budget


def _fit(config: Config, run_dir: Path, source: DataSource, runtime: Runtime, env: dict, checkpoint: dict | None,
         loggers: ExperimentLoggers | None, on_epoch: Callable[[int, dict[str, float]], None] | None,
         started: float, extends: bool = False) -> dict:
    """Train epochs until `train.epochs` or the time budget's plan (counted from `started`) ends.
    `extends`: the checkpoint's run is resumed to train longer than it was asked."""
    distributed = runtime.distributed
    is_main = distributed.is_main
    # ---- data, model, optimiser, loss: the set-up lr-find shares
    class_names = source.class_names
    task = get_task(config.task)
    log.info(f"run folder: {run_dir}")
    log.info(f"data: {source.name}, {len(class_names)} classes, {task.title}")
    _log_data_summary(source, class_names)
    for note in source.notes:
        log.info(note)
    setup = prepare(config, source, runtime)
    prepared, model = setup.prepared, setup.model
    if prepared.bad_images and is_main:
        RunFolder(run_dir).bad_images.write_text("".join(f"{p}\t{r}\n" for p, r in prepared.bad_images.items()))
    # every rank validates on all of val: identical metrics, so early stopping agrees without messages
    val_loader = make_loader(prepared.datasets["val"], config.train.batch_size * 2,
                             0 if prepared.cached else setup.workers, False, pin_memory=runtime.device.type == "cuda")
    parameters = sum(p.numel() for p in model.parameters())
    flops_per_image = training_flops_per_image(config.model.name, len(class_names), config.data.image_size,
                                               config.model.width, config.model.blocks)
    log.info(f"model: {config.model.name}, {parameters / 1e6:.2f}M parameters, "
             f"{(flops_per_image or 0) / 1e9:.2f} GFLOP per training image, {config.data.image_size} px input, "
             f"{runtime.precision} on {runtime.device}, {setup.workers} loader worker(s), "
             f"{'decoded-image cache' if prepared.cached else 'decoding from files'}"
             + (f", {distributed.world_size} processes" if distributed.enabled else ""))
    steps_per_epoch = math.ceil(len(setup.train_loader) / config.train.accumulate)
    scheduler, schedule_every = build_scheduler(setup.optimizer, config, steps_per_epoch)
    ema = None
    if config.train.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.train.ema_decay, use_warmup=True)
    state = TrainingState(model, setup.optimizer, scheduler, runtime.grad_scaler(), ema)
    monitor = config.train.monitor
    epochs = planned_epochs(config)

    # ---- resume: every piece of state, so the run continues as if never stopped
    checkpoints = CheckpointSet(RunFolder(run_dir).checkpoints)
    if is_main and checkpoint is None:
        truncate_metrics(RunFolder(run_dir).metrics, 0)  # a run restarted from the beginning after an early kill
    schedule = scheduler.lr_lambdas[0] if schedule_every == "step" else None
    planned_steps = schedule.total_steps if isinstance(schedule, CosineSchedule) else None
    if checkpoint is not None:
        state.load_state_dict(checkpoint)
        if planned_steps is not None and (config.train.max_minutes is None or extends):
            # an epoch plan is the config's, and the checkpoint's may be shorter (resumed with more
            # train.epochs: its cosine has ended, and would train the new epochs at a learning rate of 0);
            # a budget's is replaced by its first plan (see _time_budget)
            schedule.replan(state.steps, planned_steps, continuous=False)
            set_scheduled_lr(scheduler)
        rng = checkpoint["rng"]  # one state per rank
        set_rng_state(rng[distributed.rank] if distributed.rank < len(rng) else rng[0])
        if is_main:
            truncate_metrics(RunFolder(run_dir).metrics, checkpoint["epoch"])
        log.info(f"resumed after epoch {state.epoch} (best {monitor} {state.best:.4f} at epoch {state.best_epoch})")
    final_slowdown = 1.0  # the final evaluation's time per image, in validation's
    if config.train.max_minutes is not None:
        final_slowdown = final_prediction_slowdown(model, val_loader, runtime)
        state.budget = _time_budget(config, state, prepared, steps_per_epoch, started, distributed,
                                    extends=checkpoint is not None and extends, final_slowdown=final_slowdown)
    if distributed.enabled and config.model.freeze_epochs:
        raise ImgclsError("model.freeze_epochs does not work with torchrun yet (DDP needs a fixed set of trained "
                          "parameters); use optim.backbone_lr_ratio instead")
    trained = model  # what trains: the model itself, or its DDP wrapper that averages gradients across ranks
    if distributed.enabled:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda"
                                          else None)
    if config.train.compile:
        trained = torch.compile(trained)  # evaluation and checkpoints keep using the plain `model`

    # ---- epochs: until train.epochs, or the time budget's plan, ends
    fit_started = time.perf_counter()
    epoch = state.epoch
    start_epoch, was_augmented, was_tta, row = epoch + 1, False, "none", None

    def numbered() -> str:  # "epoch 2/6", read at every progress line: a time budget's plan changes as it goes
        return f"epoch {epoch}/{epochs or _planned_so_far(state.budget)}"

    while (epochs is None or epoch < epochs) and not state.out_of_time():
        epoch += 1
        if config.model.freeze_epochs:
            set_backbone_trainable(model, trainable=epoch > config.model.freeze_epochs)
        setup.generator.manual_seed(config.seed + epoch)  # the order depends only on (seed, epoch)
        if isinstance(setup.sampler, DistributedSampler):
            setup.sampler.set_epoch(epoch)
        steps_before = state.steps
        augment, augmented = setup.augment, config.data.augment != "none"
        if config.data.augment == "auto":  # small images in a time budget: augment runs planned for enough epochs
            planned = (epochs if state.budget is None  # a budget removed on resume
                       else state.budget.planned_epochs() if state.budget.step_seconds is not None else None)
            augmented = planned is not None and planned >= AUGMENT_MIN_EPOCHS
            augment = setup.augment if augmented else setup.unaugmented
            if epoch == start_epoch or augmented != was_augmented:
                log.info(f"data.augment=auto: {'light' if augmented else 'none'} from epoch {epoch} "
                         f"({planned or 'not yet known'} epochs planned)")
            was_augmented = augmented
        tta = test_time_augmentation(config, augmented)
        views = test_time_views(tta, config.data.horizontal_flip)
        if tta != was_tta:
            answer = {"none": "the plain network", "flip": "the mean of each image and its mirror image",
                      "crops": "the mean of each image, " + ("its mirror image " if views == 6 else "")
                               + "and its shifts by 1/16 of the side"}[tta]
            kept_back = f" (the final evaluation, {views}x as long, is kept back from the budget)" if views > 1 and state.budget else ""
            log.info(f"model.tta={config.model.tta}: from epoch {epoch} the saved model answers with {answer}{kept_back}")
            was_tta = tta
        if state.budget is not None:  # the final evaluation predicts each image once per built-in view
            state.budget.final_slowdown = final_slowdown * views
        stats = train_one_epoch(
            trained, setup.train_loader, setup.optimizer, setup.loss_function, runtime, state.scaler,
            augment=augment, mixing=setup.mixing, step_scheduler=scheduler if schedule_every == "step" else None,
            grad_clip=config.train.grad_clip, accumulate=config.train.accumulate, after_step=state.after_step,
            description=numbered, log_every=config.train.log_every, task=task, stop=state.out_of_time,
        )
        lr = setup.optimizer.param_groups[0]["lr"]
        validation_started = time.perf_counter()
        val, candidate, weights = validate(state, val_loader, runtime, monitor, task)
        if schedule_every == "epoch":
            scheduler.step(val[monitor]) if config.optim.scheduler == "plateau" else scheduler.step()
        improved = state.record(epoch, candidate, monitor)
        row = {
            "epoch": epoch, "train_loss": stats["train_loss"], task.train_metric: stats["train_accuracy"], **val, "lr": lr,
            "epoch_seconds": stats["seconds"] + time.perf_counter() - validation_started,
            "train_images_per_s": stats["images"] / stats["seconds"], "data_wait": stats["data_wait"],
            # achieved model arithmetic (all processes together): compare with the device's peak
            "train_gflops_per_s": (flops_per_image or 0.0) * stats["images"] / stats["seconds"] / 1e9,
            "cpu_threads": torch.get_num_threads(),  # at the end of the epoch (see runtime.CoreShare)
        }
        if state.budget is not None:  # the plan, corrected with this epoch's times: training, and the rest.
            # Before the checkpoint, which must hold the plan that ends (or continues) the run: a resume
            # compares its steps with it to tell a finished run from one to continue
            state.budget.after_epoch(state.steps, stats["seconds"], state.steps - steps_before,
                                     time.perf_counter() - validation_started)
        rng = distributed.gather(rng_state())
        writing_started = time.perf_counter()
        if is_main:
            append_metrics(RunFolder(run_dir).metrics, row)
            if loggers is not None:
                loggers.log_epoch(epoch, row)
            saved = {**state.state_dict(), "rng": rng, "config": config_to_dict(config), "class_names": class_names}
            best_files = None  # (which weights, artifact metadata) when this epoch is the best so far
            if improved:
                metrics = {key: value for key, value in row.items() if key.startswith("val_")}
                metrics["weights"] = "ema" if weights is not model else "raw"
                best_files = (metrics["weights"],
                              artifact_metadata(config, class_names, metrics, epoch, env, setup.normalisation, tta))
            checkpoints.save(saved, best=best_files)
        if state.budget is not None:  # planned from the next correction on (this epoch's plan is saved above)
            state.budget.checkpoint_seconds = time.perf_counter() - writing_started
        headline = "  ".join(f"val_{key} {row[f'val_{key}']:.4f}" for key in task.headline[:2])
        log.info(
            f"{numbered()}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"{headline}  lr {lr:.2e}  "
            f"{row['epoch_seconds']:.0f}s  {row['train_images_per_s']:.0f} img/s  {row['train_gflops_per_s']:.0f} GFLOP/s"
            + (f"  val_ema_{task.headline[0]} {row[f'val_ema_{task.headline[0]}']:.4f}" if ema is not None else "")
            + ("  * best" + (" (ema)" if weights is not model else "") if improved else "")
        )
        if stats["data_wait"] > 0.2:
            log.warning(f"{stats['data_wait']:.0%} of the step time was spent waiting for data; "
                        "use data.cache=on, a smaller image size, or more data.workers")
        if on_epoch is not None and is_main:
            on_epoch(epoch, row)  # may raise RunStopped
        if config.train.patience is not None and state.stale_epochs >= config.train.patience:
            log.info(f"early stop: {monitor} has not improved for {state.stale_epochs} epochs "
                     f"(best at epoch {state.best_epoch})")
            break

    if state.out_of_time():
        log.info(f"time budget: the {state.steps} planned steps are taken, {state.budget.elapsed() / 60:.2f} of "
                 f"train.max_minutes={config.train.max_minutes:g} spent; the rest is kept for the final evaluation")
    checksums = distributed.gather(parameters_checksum(model))
    if row is None:  # resumed with no step left in the budget's plan: the last epoch is the checkpoint's
        row = _last_metrics_row(read_metrics(RunFolder(run_dir).metrics))
    result = {"best_epoch": state.best_epoch, "best": {monitor: state.best}, "last_epoch": row,
              "train_minutes": (time.perf_counter() - fit_started) / 60}
    if distributed.enabled:
        result.update(world_size=distributed.world_size, ranks_in_sync=len(set(checksums)) == 1)
    return result


def _final_evaluation(config: Config, run_dir: Path, source: DataSource, runtime: Runtime,
                      loggers: ExperimentLoggers | None, result: dict[str, Any]) -> dict[str, Any]:
    """Calibrate the best weights on val and evaluate them on the test split (val when there is none),
    on rank 0. Safe to run again after a kill: both start from the model artifact as training left it."""
    output = {}
    if runtime.distributed.is_main:
        split = RunFolder.final_split(source.splits)
        if config.train.calibrate:
            calibration = calibrate(run_dir, device=str(runtime.device), target_precision=config.train.reject_precision)
            _log_calibration(calibration)
        # the quick figures only: Grad-CAM and t-SNE come with `imgcls eval` and `imgcls report`
        final = evaluate(run_dir, split, device=str(runtime.device), explain=False)
        artifact = RunFolder(run_dir).artifact
        state_dict, metadata = load_artifact(artifact)
        metadata["metrics"].update({f"{split}_{key}": value for key, value in final.items()})
        save_artifact(artifact, state_dict, metadata)
        last_epoch = int(result["last_epoch"].get("epoch", result["best_epoch"]))
        if loggers is not None:
            loggers.log_final({f"{split}_{key}": value for key, value in final.items() if key != "n"}, step=last_epoch)
            if (run_dir / f"confusion_{split}.png").exists():  # single-label
                loggers.log_image(f"confusion/{split}", run_dir / f"confusion_{split}.png", last_epoch)
        monitor, headline = config.train.monitor, get_task(config.task).headline[0]
        log.info(f"best {monitor} {result['best'][monitor]:.4f} at epoch {result['best_epoch']}; "
                 f"{split} {headline} {final[headline]:.4f}" + (f" with {metadata['tta']} TTA built into the model "
                                                                "(model.tta)" if metadata.get("tta", "none") != "none" else ""))
        log.info(f"results: {run_dir}  (metrics.csv, predictions_{split}.csv, confusion_{split}.png, checkpoints/)")
        output[f"{split}_metrics"] = final
    runtime.distributed.barrier()
    return output
