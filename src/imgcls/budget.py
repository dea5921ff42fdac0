"""Time budgets: the optimiser steps that `train.max_minutes` can buy, laid out before they are taken.

A schedule laid over the steps a budget allows beats a longer schedule cut off in the middle (budgeted
training, Li et al. 2020): the learning rate should reach its end when the time does. The plan is made
from the measured speed of the first steps of the run, and corrected every 100 steps and after every epoch
from the measured time of training and validation, keeping back what the final calibration and test
evaluation will take.
The budget counts from the start of `train()`: reading and caching the data, validation and the final
evaluation all spend it.

The plan lives in `CosineSchedule`, the learning-rate lambda itself, so that LambdaLR's state_dict (which
saves the attributes of a callable object) carries it through a checkpoint: a resumed run continues the
same plan with the time its earlier part used.
"""

from __future__ import annotations

import math
import time

import torch

__all__ = ["cosine_with_warmup", "CosineSchedule", "TimeBudget", "DEFAULT_EPOCHS", "measure_images_per_second"]

DEFAULT_EPOCHS = 10  # train.epochs when neither it nor train.max_minutes is set

# the first steps of a run are slower (memory allocation, thread start-up): the speed is measured after them
PROBE_SKIP_STEPS = 3
PROBE_STEPS = 20
# within an epoch (which may be longer than the whole budget), the plan is corrected every REPLAN_STEPS steps
# from the speed of the epoch's last REPLAN_WINDOW steps: the speed drifts, but 100 steps alone vary by ~15%
# on a shared 2-core machine, which moved a 60-minute plan between 30 and 33 epochs and back
REPLAN_STEPS = 100
REPLAN_WINDOW = 500
# ... except a slowdown: when the last REPLAN_STEPS ran this much slower than the window's steps before them,
# the speed has changed (a program started beside the run), and the window restarts from them. Followed only
# through the 500-step average, halving the speed late in a run would overrun the budget by up to 400 slow
# steps (~60 s on Fashion-MNIST), more than the safety share keeps back in a short budget
SLOWDOWN_RATIO = 1.3
# kept back from every plan for what the estimates miss: progress lines, checkpoint writes, drift in speed
SAFETY_SHARE = 0.03
# at most this share of the planned steps warms up, so a short budget is not mostly warm-up
WARMUP_MAX_SHARE = 0.1
# a planned last epoch shorter than this share of an epoch is left out (unless it is all there is)
SHORTEST_LAST_EPOCH = 0.25
# the final evaluation: calibration predicts val again, the test split once, then metrics, plots and files
FINAL_OVERHEAD_SECONDS = 5.0


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up from ~0 to 1, then half a cosine down to 0."""
    return CosineSchedule(warmup_steps, total_steps)(step)


class CosineSchedule:
    """LambdaLR's multiplier for step `step`: warm-up over `warmup_steps`, cosine to 0 at `total_steps`.
    A TimeBudget may move `total_steps` (and the warm-up, while it lasts) as its estimates improve.

    After the warm-up, a move continues the cosine from where it is (`replan`): the rest of its descent is
    spread over the steps now left. Evaluating the new plan's cosine at the current step instead would
    raise the learning rate whenever a plan grows (at 40% of a 26-epoch plan that becomes 27: +3%).
    """

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        # the cosine's progress (0 at the top, 1 at zero) was `anchor_progress` at step `anchor_step`, and
        # goes linearly to 1 at `total_steps`; None: from 0 at the end of the warm-up. LambdaLR's state_dict
        # saves these with the rest (a checkpoint from before them loads with None: the plain cosine)
        self.anchor_step: int | None = None
        self.anchor_progress = 0.0

    def progress(self, step: int) -> float:
        start, start_progress = ((self.warmup_steps, 0.0) if self.anchor_step is None
                                 else (self.anchor_step, self.anchor_progress))
        share = (step - start) / max(1, self.total_steps - start)
        return min(1.0, start_progress + (1.0 - start_progress) * max(0.0, share))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))

    def replan(self, step: int, total_steps: int, continuous: bool = True) -> None:
        """End the cosine at `total_steps` instead, from step `step` on: continuous, the next step's
        multiplier stays what it was and the descent after it is steeper or gentler; otherwise the plain
        cosine of the new plan, as if it had been the plan from the start (a run resumed to train longer
        than it was asked, whose descent may have ended: what timm does)."""
        if continuous and step > self.warmup_steps:
            self.anchor_step, self.anchor_progress = step, self.progress(step)
        elif not continuous:
            self.anchor_step, self.anchor_progress = None, 0.0
        self.total_steps = total_steps


class TimeBudget:
    """Plans the number of optimiser steps that fit in `minutes`, and revises it as the run goes.

    Args:
        minutes: the budget, from `started`.
        started: `time.perf_counter()` when this process began the run (before its data was read); a
            resumed run adds the time spent before (`load_state_dict`).
        steps_per_epoch: optimiser steps of one full epoch.
        schedule: the learning-rate plan it revises (its warm-up as asked by `optim.warmup_epochs`).
        max_steps: at most this many steps in all (`train.epochs` x steps per epoch), or None.
        validation_share: images validated per epoch / images trained per epoch, for the first estimate of
            a validation pass before one has been timed.
        final_share: images the final evaluation predicts (val again for calibration, and test) / images
            validated per epoch.
        broadcast: hands rank 0's plan to every rank of a torchrun job (identity otherwise).
    """

    def __init__(self, minutes: float, started: float, steps_per_epoch: int,
                 schedule: CosineSchedule | None, max_steps: int | None, validation_share: float,
                 final_share: float, broadcast=lambda value: value):
        self.seconds = minutes * 60
        self.started = started
        self.steps_per_epoch = steps_per_epoch
        self.schedule = schedule
        self.requested_warmup = schedule.warmup_steps if schedule is not None else 0
        self.max_steps = max_steps
        self.validation_share = validation_share
        self.final_share = final_share
        self.broadcast = broadcast
        # until the first plan: the schedule's first guess, or no limit
        self.total_steps = max_steps if max_steps is not None else (schedule.total_steps if schedule else 2**62)
        # the next plan lays the plain cosine of its steps instead of continuing the schedule's descent: a run
        # resumed to train longer than it was asked, whose cosine may have ended (CosineSchedule.replan)
        self.fresh_plan = False
        self.step_seconds: float | None = None  # measured seconds per optimiser step
        self.validation_seconds: float | None = None  # measured seconds per validation pass
        self.checkpoint_seconds = 0.0  # the last end-of-epoch writes: metrics, loggers, checkpoint (rank 0)
        # the final evaluation's time per image over validation's: on a CPU it predicts in fp32 (see
        # imgcls.prediction.load) where training validates in bf16, 2-4x faster with AVX-512 BF16
        self.final_slowdown = 1.0
        self._marks: list[tuple[int, float]] = []  # (step, time) of this epoch's speed measurements

    def elapsed(self) -> float:
        """Seconds of the budget spent, by this process and, when resumed, before it."""
        return time.perf_counter() - self.started

    def state_dict(self) -> dict:
        return {"seconds_used": self.elapsed(), "total_steps": self.total_steps, "step_seconds": self.step_seconds,
                "validation_seconds": self.validation_seconds, "checkpoint_seconds": self.checkpoint_seconds}

    def load_state_dict(self, state: dict) -> None:
        """Continue a checkpoint's budget: its time is spent, its measured speeds are the estimates
        until this process has measured REPLAN_STEPS steps of its own."""
        self.started -= state["seconds_used"]
        self.total_steps = state["total_steps"]
        self.step_seconds, self.validation_seconds = state["step_seconds"], state["validation_seconds"]
        self.checkpoint_seconds = state.get("checkpoint_seconds", 0.0)  # absent from older checkpoints

    def after_step(self, step: int) -> None:
        """Called after optimiser step `step` (1-based count): measures the first steps' speed and plans,
        then corrects the plan every REPLAN_STEPS steps from the speed of the last REPLAN_WINDOW (restarted
        from the last REPLAN_STEPS when they were SLOWDOWN_RATIO slower than the window's steps before them)."""
        if step < PROBE_SKIP_STEPS:
            return
        now = time.perf_counter()
        if not self._marks:
            self._marks = [(step, now)]
            return
        last_step, last_time = self._marks[-1]
        if step - last_step >= (PROBE_STEPS if self.step_seconds is None else REPLAN_STEPS):
            window = [mark for mark in self._marks if step - mark[0] <= REPLAN_WINDOW]
            first_step, first_time = window[0]
            recent, before = (now - last_time) / (step - last_step), None
            if first_step < last_step:
                before = (last_time - first_time) / (last_step - first_step)
            slowed = before is not None and recent > SLOWDOWN_RATIO * before
            self._marks = (window[-1:] if slowed else window) + [(step, now)]  # window[-1] is the last mark
            first_step, first_time = self._marks[0]
            self.step_seconds = (now - first_time) / (step - first_step)
            self.plan(step)

    def after_epoch(self, step: int, train_seconds: float, steps: int, validation_seconds: float) -> None:
        """Called at the end of each epoch, with what it measured: `steps` optimiser steps took
        `train_seconds`, and its validation `validation_seconds` (the writes after it, which save the plan
        this corrects, are timed apart: `checkpoint_seconds`)."""
        if steps > 0:
            self.step_seconds = train_seconds / steps
        self.validation_seconds = validation_seconds
        self._marks = []  # the next epoch's speed is measured from its own steps
        self.plan(step)

    def plan(self, step: int) -> None:
        """Set the total number of steps from the time left after `step`. Rank 0 plans; the others of a
        torchrun job receive its plan (their clocks differ a little)."""
        if self.step_seconds is None:  # nothing measured yet
            return
        total = self.broadcast(self._planned_total(step))
        self.total_steps = total
        if self.schedule is not None:
            self.schedule.replan(step, total, continuous=not self.fresh_plan)
            self.fresh_plan = False
            if step < self.schedule.warmup_steps:  # only while it lasts: a finished warm-up stays as it was
                self.schedule.warmup_steps = max(1, min(self.requested_warmup, round(WARMUP_MAX_SHARE * total)))

    def _planned_total(self, step: int) -> int:
        step_seconds = self.step_seconds or 0.0
        validation = self.validation_seconds
        if validation is None:  # not timed yet: prediction costs about a third of a training step per image
            validation = self.validation_share * self.steps_per_epoch * step_seconds / 3
        final = validation * self.final_share * self.final_slowdown + FINAL_OVERHEAD_SECONDS
        left = self.seconds * (1 - SAFETY_SHARE) - self.elapsed() - final
        # the most steps S whose time, with the validations V at the end of every epoch they finish (the
        # current one included) and of the last, partial one, fits: S * step + V * validation <= left
        epoch_steps_done = step % self.steps_per_epoch

        def seconds(steps: int) -> float:  # an epoch ends with a validation, then a checkpoint
            epochs_ended = math.ceil((epoch_steps_done + steps) / self.steps_per_epoch)
            return steps * step_seconds + epochs_ended * (validation + self.checkpoint_seconds)

        low, high = 0, int(max(0.0, left) / max(step_seconds, 1e-9))
        while low < high:  # binary search: the time grows with the steps
            middle = (low + high + 1) // 2
            low, high = (middle, high) if seconds(middle) <= left else (low, middle - 1)
        steps = low
        tail = (epoch_steps_done + steps) % self.steps_per_epoch
        if step + steps > tail and tail < self.steps_per_epoch * SHORTEST_LAST_EPOCH:
            steps = max(0, steps - tail)  # a short last epoch would cost a whole validation for a few steps
        total = step + steps
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        return max(total, step)

    def done(self, step: int) -> bool:
        return step >= self.total_steps

    def planned_epochs(self) -> int:
        return max(1, math.ceil(self.total_steps / self.steps_per_epoch))


def measure_images_per_second(model: torch.nn.Module, runtime, batch_size: int, image_size: int, num_classes: int,
                              seconds: float = 1.5) -> float:
    """Training images per second of `model` on this machine, before a run has any data: optimiser
    steps (forward, cross-entropy, backward, AdamW) on random images, on the runtime's device, in its
    layout and autocast, timed for about `seconds` after two warm-up steps. The model is changed."""
    images = runtime.layout(torch.randn(batch_size, 3, image_size, image_size, device=runtime.device))
    labels = torch.randint(0, num_classes, (batch_size,), device=runtime.device)
    optimizer = torch.optim.AdamW(model.parameters())
    model.train()

    def step() -> None:
        with runtime.autocast():
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    steps, begun = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - begun < seconds:
        step()
        steps += 1
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
    return steps * batch_size / (time.perf_counter() - begun)
