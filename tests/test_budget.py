"""Time budgets (`train.max_minutes`): the plan of steps that fits, the schedule laid over it, a real run
that ends inside its budget with the learning rate at its end, and resume continuing the plan; and the
automatic choices a short run depends on (batch size, horizontal flips)."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import imgcls
from imgcls.budget import SAFETY_SHARE, CosineSchedule, TimeBudget
from imgcls.config import load_config
from imgcls.data import assign_splits, resolve_source
from imgcls.data.checks import mirror_check
from imgcls.models import (
    LONG_BUDGET_SMALL_RESNET_SHAPE, SHORT_BUDGET_SMALL_CONVNET_WIDTH, SHORT_BUDGET_SMALL_RESNET_SHAPE, SMALL_CONVNET_WIDTH,
    SMALL_RESNET_SHAPE,
)
from imgcls.runtime import Runtime
from imgcls.tracking import StepProgress
from imgcls.training import (
    _planned_so_far, automatic_batch_size, choose_small_network, final_prediction_slowdown, resolve_data,
    small_network_for,
)
from tests.conftest import stop_after_epochs

FAST = ["model.name=small_resnet", "data.image_size=32", "train.batch_size=16", "seed=0"]


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def planned(minutes: float, step_seconds: float, validation_seconds: float, steps_per_epoch: int = 100,
            max_steps: int | None = None, final_share: float = 2.0) -> tuple[TimeBudget, CosineSchedule]:
    schedule = CosineSchedule(warmup_steps=steps_per_epoch, total_steps=10 * steps_per_epoch)
    budget = TimeBudget(minutes, time.perf_counter(), steps_per_epoch, schedule, max_steps,
                        validation_share=0.1, final_share=final_share)
    budget.after_epoch(0, step_seconds * 10, 10, validation_seconds)  # measured: 10 steps, one validation
    return budget, schedule


def test_the_plan_fills_the_budget_with_whole_epochs_and_the_schedule_ends_with_it():
    # 10 minutes; an epoch is 100 steps of 0.1 s plus a 2 s validation; the final evaluation ~2 validations + 5 s
    budget, schedule = planned(10, step_seconds=0.1, validation_seconds=2.0)
    available = 600 * (1 - SAFETY_SHARE) - (2.0 * 2.0 + 5.0)

    def seconds(steps: int) -> float:  # the steps and a validation at the end of each epoch they start
        return steps * 0.1 + math.ceil(steps / 100) * 2.0

    # 47 epochs and 69-70 steps (the milliseconds since `started` count too)
    assert seconds(budget.total_steps) <= available < seconds(budget.total_steps + 2)
    assert schedule.total_steps == budget.total_steps  # the cosine reaches 0 at the last planned step
    assert schedule(budget.total_steps) == pytest.approx(0.0)
    assert schedule.warmup_steps == 100  # one epoch, as asked: under a tenth of the plan
    assert budget.planned_epochs() == 48 and not budget.done(budget.total_steps - 1) and budget.done(budget.total_steps)


def test_within_an_epoch_the_plan_follows_the_last_500_steps_not_the_jitter_of_100_but_a_slowdown_at_once(
        monkeypatch):
    from types import SimpleNamespace

    from imgcls import budget as budget_module

    clock = [0.0]
    monkeypatch.setattr(budget_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    budget = TimeBudget(60, 0.0, 100_000, CosineSchedule(100, 1_000_000), None, validation_share=0.1,
                        final_share=2.0)

    def run(steps: range, seconds_per_step) -> list[float]:
        """Take the steps; the step-time estimate after each one that corrected the plan."""
        estimates = []
        for step in steps:
            clock[0] += seconds_per_step(step)
            budget.after_step(step)
            if step >= first_plan and (step - first_plan) % budget_module.REPLAN_STEPS == 0:
                estimates.append(budget.step_seconds)
        return estimates

    first_plan = budget_module.PROBE_SKIP_STEPS + budget_module.PROBE_STEPS  # then every REPLAN_STEPS

    # alternate blocks of 100 steps at 0.085 and 0.115 s (the jitter of a shared machine)
    jittery = run(range(1, 3001), lambda step: 0.085 if (step // 100) % 2 else 0.115)
    steady = jittery[6:]  # once the window is 500 steps long
    assert steady and all(0.095 <= estimate <= 0.105 for estimate in steady), steady
    # a lasting change of speed, under the slowdown ratio, is followed within the window
    slower = run(range(3001, 4401), lambda step: 0.12)
    assert slower[1] < 0.11 and slower[-1] == pytest.approx(0.12)
    # a sudden slowdown at once: the plan must not overrun the budget while a 500-step average catches up
    halved = run(range(4401, 4701), lambda step: 0.24)  # corrections at steps 4423 (23 of its 100 slow), 4523, ...
    assert halved[0] < 0.132 and halved[1:] == [pytest.approx(0.24)] * 2  # the 500-step average: 0.149 at 4523


def test_a_plan_that_grows_after_the_warm_up_continues_the_cosine_instead_of_raising_the_rate():
    import torch

    from imgcls.training import cosine_with_warmup

    schedule = CosineSchedule(warmup_steps=100, total_steps=1000)
    before = schedule(400)
    assert cosine_with_warmup(400, 100, 1200) > before  # the new plan's cosine at this step: a higher rate
    schedule.replan(400, 1200)
    assert schedule(400) == pytest.approx(before)
    descent = [schedule(step) for step in range(400, 1201)]
    assert all(later <= earlier for earlier, later in zip(descent, descent[1:])) and descent[-1] == pytest.approx(0)
    schedule.replan(800, 900)  # a plan that shrinks: a steeper descent, to 0 at its new end
    assert schedule(800) == pytest.approx(descent[400]) and schedule(900) == pytest.approx(0.0)

    # the anchor of the descent is saved with the scheduler (a resumed run continues it)
    parameter = torch.nn.Parameter(torch.zeros(1))
    saved = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([parameter], lr=1.0), schedule).state_dict()
    restored = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([parameter], lr=1.0), CosineSchedule(100, 1000))
    restored.load_state_dict(saved)
    assert restored.lr_lambdas[0](850) == pytest.approx(schedule(850))

    # a run resumed to train longer than it was asked: the plain cosine of the longer plan
    schedule.replan(900, 2000, continuous=False)
    assert schedule(900) == pytest.approx(cosine_with_warmup(900, 100, 2000)) and schedule(900) > 0.5


def test_progress_lines_show_the_planned_epochs_once_the_first_steps_are_timed():
    schedule = CosineSchedule(warmup_steps=100, total_steps=1000)
    budget = TimeBudget(10, time.perf_counter(), 100, schedule, None, validation_share=0.1, final_share=2.0)
    assert _planned_so_far(budget) == "?"  # "epoch 1/?": the schedule's 10-epoch first guess is not a plan
    budget.after_epoch(0, 0.1 * 10, 10, 2.0)
    assert _planned_so_far(budget) == str(budget.planned_epochs()) == "48"


def test_a_progress_line_reads_the_plan_when_it_is_written(caplog):
    plan = ["?"]  # the first steps of epoch 1 are not timed yet, then the budget plans 6 epochs
    with caplog.at_level(logging.INFO, logger="imgcls"), StepProgress(100, lambda: f"epoch 1/{plan[0]}", every=10) as bar:
        bar.update(10)
        plan[0] = "6"
        bar.update(10)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("epoch 1/")]
    assert [line.split(" (")[0] for line in lines] == ["epoch 1/? 10/100", "epoch 1/6 20/100"]


def test_the_plan_keeps_back_the_end_of_epoch_writes_as_measured():
    budget, _ = planned(10, step_seconds=0.1, validation_seconds=2.0)
    budget.checkpoint_seconds = 1.0  # a large model's checkpoint, or a slow tracking server
    budget.plan(0)
    available = 600 * (1 - SAFETY_SHARE) - (2.0 * 2.0 + 5.0)
    assert budget.total_steps * 0.1 + math.ceil(budget.total_steps / 100) * 3.0 <= available
    assert budget.planned_epochs() == 44  # 48 without the writes
    resumed, _ = planned(10, step_seconds=0.1, validation_seconds=2.0)
    resumed.load_state_dict(budget.state_dict())  # a resumed run plans with the writes' time before it has timed its own
    resumed.plan(0)
    assert resumed.checkpoint_seconds == 1.0 and resumed.planned_epochs() == 44


def test_the_final_evaluation_in_fp32_is_kept_back_at_its_measured_slowdown():
    # a CPU with AVX-512 BF16 validates in bf16 during training and evaluates in fp32 at the end, ~3x slower
    same, _ = planned(10, step_seconds=0.1, validation_seconds=2.0)
    slower, _ = planned(10, step_seconds=0.1, validation_seconds=2.0)
    slower.final_slowdown = 3.0
    slower.plan(0)
    available = 600 * (1 - SAFETY_SHARE) - (2.0 * 2.0 * 3.0 + 5.0)  # final_share 2 of a validation, 3x slower
    assert slower.total_steps * 0.1 + math.ceil(slower.total_steps / 100) * 2.0 <= available
    assert slower.total_steps < same.total_steps


def test_the_final_evaluations_slowdown_is_timed_without_touching_the_model():
    from imgcls.models import create_model

    model = create_model("small_resnet", 3, (0.5,) * 3, (0.5,) * 3)
    model.train()
    batches = [(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert final_prediction_slowdown(model, batches, Runtime.create("cpu", "fp32")) == 1.0  # the same precision
    assert final_prediction_slowdown(model, [], Runtime.create("cpu", "bf16")) == 1.0  # no val images to time
    assert final_prediction_slowdown(model, batches, Runtime.create("cpu", "bf16")) >= 1.0
    assert model.training  # back in training mode, its batch-norm statistics as they were
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_a_last_epoch_of_a_few_steps_is_left_out():
    # 1.99 epochs of 12 s fit after the final evaluation's 9 s: the second epoch is cut at 99 steps; 1.2 would not
    budget, _ = planned(10, step_seconds=0.1, validation_seconds=2.0)
    short, _ = planned((12 * 1.2 + 2 + 9) / (60 * (1 - SAFETY_SHARE)), step_seconds=0.1, validation_seconds=2.0)
    assert short.total_steps == 100  # 1 epoch and 20 steps fit; the 20 would cost a whole validation


def test_a_short_budget_warms_up_over_a_tenth_of_it_and_may_end_inside_an_epoch():
    budget, schedule = planned(1, step_seconds=0.1, validation_seconds=1.0, steps_per_epoch=1000)
    assert 0 < budget.total_steps < 1000  # less than one epoch fits: a partial epoch, the schedule over it
    assert schedule.warmup_steps == round(0.1 * budget.total_steps)


def test_train_epochs_caps_the_plan_and_a_spent_budget_plans_nothing_more():
    budget, _ = planned(10, step_seconds=0.1, validation_seconds=2.0, max_steps=300)
    assert budget.total_steps == 300
    spent, _ = planned(0.01, step_seconds=0.1, validation_seconds=2.0)  # 0.6 s: nothing fits
    assert spent.total_steps == 0 and spent.done(0)


def test_a_budgeted_run_ends_inside_its_budget_with_the_learning_rate_at_its_end(shapes_folder, tmp_path):
    started = time.perf_counter()
    run = imgcls.train(load_config(overrides=[f"data.path={shapes_folder}", f"run.dir={tmp_path}",
                                              "train.max_minutes=0.3", *FAST]))
    seconds = time.perf_counter() - started
    rows = metrics_rows(run)
    assert len(rows) > 3  # as many epochs as 18 s allow
    assert seconds <= 0.3 * 60 + 3  # the budget, plus what no plan controls (importing, process start)
    # the last epoch's logged rate is the one of its last step, near the cosine's end
    assert float(rows[-1]["lr"]) < 0.1 * max(float(row["lr"]) for row in rows)
    log = (run / "log.txt").read_text()
    assert "time budget train.max_minutes=0.3" in log and "planned steps are taken" in log
    assert "data.augment=auto: none from epoch 1" in log  # unaugmented: a short run learns faster so
    # the plan grows past 10 epochs on these few images: light augmentation, and with it flip TTA, from then on
    augmented_from = re.search(r"data.augment=auto: light from epoch (\d+)", log)
    assert augmented_from is not None
    assert f"model.tta=auto: from epoch {augmented_from[1]} the saved model answers with the mean of each image" in log
    assert "model.tta=auto: from epoch 1" not in log
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    # the network's shape, chosen from the measured speed, is written out for `train -c` and the artifact
    saved = load_config(run / "config.yaml").model
    assert (saved.width, saved.blocks) in (SMALL_RESNET_SHAPE, SHORT_BUDGET_SMALL_RESNET_SHAPE, LONG_BUDGET_SMALL_RESNET_SHAPE)
    assert f"model.width={saved.width} model.blocks={saved.blocks}: train.max_minutes=0.3 buys about" in log
    assert (imgcls.load(run).metadata["width"], imgcls.load(run).metadata["blocks"]) == (saved.width, saved.blocks)


def test_the_budget_chooses_the_network_from_the_epochs_it_buys_of_the_default(shapes_folder):
    config, source = resolve_data(load_config(overrides=[f"data.path={shapes_folder}", "train.max_minutes=0.01",
                                                         *FAST]))
    assert (config.model.width, config.model.blocks) == (None, None)  # left to the measured speed
    runtime = Runtime.create("cpu", "fp32")
    short = choose_small_network(config, source, runtime, choose_network=True)
    assert (short.model.name, short.model.width, short.model.blocks) == ("small_resnet", *SHORT_BUDGET_SMALL_RESNET_SHAPE)
    assert "under 4, a narrower, deeper network" in source.notes[-1]
    epochs = float(re.search(r"buys about ([0-9.]+) epochs", source.notes[-1]).group(1))

    def network(minutes: float, epochs: int | None = None, choose: bool = True) -> tuple[str, int, int | None]:
        chosen = choose_small_network(replace(config, train=replace(config.train, max_minutes=minutes, epochs=epochs)),
                                      source, runtime, choose_network=choose).model
        return chosen.name, chosen.width, chosen.blocks

    resnet = ("small_resnet", *SMALL_RESNET_SHAPE)
    # the measured speed varies by some percent between calls: far from the thresholds here, at them below
    assert network(0.01 * 2 / epochs) == ("small_resnet", *SHORT_BUDGET_SMALL_RESNET_SHAPE)
    assert network(0.01 * 2 / epochs, epochs=1) == resnet  # train.epochs ends the run first: not short of time
    assert network(0.01 * 6 / epochs) == ("small_convnet", SHORT_BUDGET_SMALL_CONVNET_WIDTH, None)  # a faster network
    assert "model.name=small_convnet model.width=32: " in source.notes[-1]
    assert "from 4 to 8, small_convnet 32 learns more" in source.notes[-1]
    assert network(0.01 * 15 / epochs) == ("small_convnet", SMALL_CONVNET_WIDTH, None)  # time for a wider one
    assert "model.name=small_convnet model.width=64: " in source.notes[-1]
    assert "from 8 to 40, the wider small_convnet" in source.notes[-1]
    assert network(0.01 * 150 / epochs) == ("small_resnet", *LONG_BUDGET_SMALL_RESNET_SHAPE)  # where it is not ahead
    assert "from 40, small_convnet is no longer ahead" in source.notes[-1]
    # model.name=small_resnet asked for: its deeper shape
    assert network(0.01 * 15 / epochs, choose=False) == ("small_resnet", *LONG_BUDGET_SMALL_RESNET_SHAPE)
    assert "from 10, a deeper network" in source.notes[-1]
    assert network(0.01 * 15 / epochs, epochs=8) == resnet  # train.epochs ends the run first: the default
    convnet = ("small_convnet", SMALL_CONVNET_WIDTH, None)

    def shape_of(network):
        return network.name, network.width, network.blocks

    short, long = ("small_resnet", *SHORT_BUDGET_SMALL_RESNET_SHAPE), ("small_resnet", *LONG_BUDGET_SMALL_RESNET_SHAPE)
    narrow = ("small_convnet", SHORT_BUDGET_SMALL_CONVNET_WIDTH, None)
    assert ([shape_of(small_network_for(bought, None, True)) for bought in (3.9, 4, 7.9, 8, 9.9, 10, 39.9, 40)]
            == [short, narrow, narrow, *[convnet] * 4, long])
    assert [shape_of(small_network_for(bought, None, False)) for bought in (7.9, 8, 9.9, 10)] == [short, resnet, resnet, long]
    assert shape_of(small_network_for(7.9, 7, True)) == resnet  # 7 epochs fit: the one that learns most per epoch
    assert shape_of(small_network_for(3.9, 4, True)) == short
    assert shape_of(small_network_for(7.9, 8, True)) == narrow
    assert shape_of(small_network_for(9, 8, True)) == resnet  # 8 epochs fit in the time: not short of it
    assert shape_of(small_network_for(12, 20, False)) == long  # the budget ends 20 epochs first
    # a shape asked for is kept, the other key at its default; without a budget, the default
    asked, _ = resolve_data(load_config(overrides=[f"data.path={shapes_folder}", "train.max_minutes=0.01",
                                                   "model.width=24", *FAST]))
    assert (asked.model.width, asked.model.blocks) == (24, 1)
    assert choose_small_network(asked, source, runtime, choose_network=True) is asked
    plain, _ = resolve_data(load_config(overrides=[f"data.path={shapes_folder}", *FAST]))
    assert (plain.model.width, plain.model.blocks) == SMALL_RESNET_SHAPE
    # small_convnet asked for: its width, with or without a budget, and no blocks
    for budget in ([], ["train.max_minutes=0.01"]):
        convnet, _ = resolve_data(load_config(overrides=[f"data.path={shapes_folder}", *FAST, *budget,
                                                         "model.name=small_convnet"]))
        assert (convnet.model.width, convnet.model.blocks) == (SMALL_CONVNET_WIDTH, None)
        assert choose_small_network(convnet, source, runtime, choose_network=False) is convnet
    # model.blocks has no meaning for it: refused as the data is resolved, before a run folder is made
    with pytest.raises(imgcls.ImgclsError, match="model.blocks shapes small_resnet only: small_convnet has three groups"):
        resolve_data(load_config(overrides=[f"data.path={shapes_folder}", "model.name=small_convnet", "model.blocks=2"]))


def test_model_name_auto_lets_a_long_budget_take_small_convnet(shapes_folder, tmp_path, monkeypatch):
    from imgcls import training

    # any measured speed buys epochs in small_convnet's band here: the choice, not the speed, is under test
    monkeypatch.setattr(training, "SMALL_CONVNET_EPOCHS", (0.0, float("inf")))
    fast = [key for key in FAST if not key.startswith("model.name=")]
    run = imgcls.train(load_config(overrides=[f"data.path={shapes_folder}", f"run.dir={tmp_path}",
                                              "train.max_minutes=0.15", *fast]))
    saved = load_config(run / "config.yaml").model
    assert (saved.name, saved.width, saved.blocks) == ("small_convnet", SMALL_CONVNET_WIDTH, None)
    assert "model.name=small_convnet model.width=64: train.max_minutes=0.15 buys about" in (run / "log.txt").read_text()
    loaded = imgcls.load(run)  # the artifact rebuilds the network it was trained as
    assert loaded.metadata["model_name"] == "small_convnet" and loaded.metadata["width"] == SMALL_CONVNET_WIDTH
    assert len(loaded.predict([next(shapes_folder.rglob("*.png"))])) == 1
    from imgcls.cli import main

    assert main(["export", str(run), "--format", "onnx"]) == 0  # which checks the ONNX file's answers against torch's
    assert json.loads((run / "export" / "export.json").read_text())["formats"]["onnx"]["parity"]["passed"]


def start_busy_program(seconds: int) -> int:
    """A busy loop for `seconds` in another program, not a child of this process (whose CPU time counts as
    ours); returns its process id."""
    import subprocess

    started = subprocess.run(["sh", "-c", f"timeout {seconds} {sys.executable} -c 'while True: pass' >/dev/null 2>&1 "
                                          "& echo $!"], capture_output=True, text=True, check=True)
    time.sleep(0.5)
    return int(started.stdout)


@pytest.fixture
def probe(shapes_folder, monkeypatch):
    """(config, source, runtime) for choose_small_network with a budget, the threads restored after."""
    import torch

    from imgcls import training
    from imgcls.runtime import CoreShare

    monkeypatch.setattr(training, "PROBE_WAIT_SECONDS", 1.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # which would fix the threads
    config, source = resolve_data(load_config(overrides=[f"data.path={shapes_folder}", "train.max_minutes=0.01",
                                                         *FAST]))
    threads = torch.get_num_threads()
    yield config, source, Runtime.create("cpu", "fp32", cores=CoreShare())
    torch.set_num_threads(threads)


def test_a_busy_program_beside_the_speed_measurement_is_waited_for_then_named_in_the_log(probe):
    import os
    import signal

    config, source, runtime = probe
    choose_small_network(config, source, runtime, choose_network=True)
    assert not any("busy" in note for note in source.notes)  # alone (the suite runs nothing beside it)
    alone = len(source.notes)
    busy = start_busy_program(60)  # throughout: still busy after the wait (1 s here)
    try:
        choose_small_network(config, source, runtime, choose_network=True)
    finally:
        os.kill(busy, signal.SIGTERM)  # timeout passes it on to the loop
    waited, choice, warning = source.notes[alone:]
    # measured again on the cores it left free (1 of 2), as training would run beside it
    free = min(runtime.cores.most, max(1, len(runtime.cores.cores) - 1))
    assert re.fullmatch(r"other programs kept CPU cores busy while the speed was measured \([0-9]+ images/s\); "
                        rf"waited [0-9]+ s and measured again on {free} thread\(s\)", waited), waited
    assert choice.startswith("model.width=")
    assert re.match(r"warning: other programs kept [0-9.]+ CPU core\(s\) busy while the speed was measured",
                    warning), warning
    assert "set model.width and model.blocks" in warning


def test_a_busy_program_that_ends_during_the_wait_leaves_a_clean_measurement(probe, monkeypatch):
    from imgcls import training

    monkeypatch.setattr(training, "PROBE_WAIT_SECONDS", 10.0)
    config, source, runtime = probe
    start_busy_program(3)  # busy through the first measurement (~2 s), gone a second or two later
    choose_small_network(config, source, runtime, choose_network=True)
    waited, choice = source.notes[-2:]
    assert re.fullmatch(r"other programs kept CPU cores busy while the speed was measured \([0-9]+ images/s\); "
                        rf"waited [0-9]+ s and measured again on {runtime.cores.most} thread\(s\)", waited), waited
    assert choice.startswith("model.width=")  # and no warning after it


def test_an_interrupted_budgeted_run_resumes_the_same_plan(shapes_folder, tmp_path):
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "imgcls", "train", str(shapes_folder), "train.max_minutes=0.4",
               f"run.dir={runs}", "run.name=budget", "model.tta=flip", *FAST]
    stop_after_epochs(command, runs / "budget" / "metrics.csv", 3)
    from imgcls.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(runs / "budget" / "checkpoints" / "last.ckpt")
    spent, plan = checkpoint["budget"]["seconds_used"], checkpoint["budget"]["total_steps"]
    assert 0 < spent < 24 and plan > checkpoint["steps"]

    imgcls.train(resume=runs / "budget")
    log = (runs / "budget" / "log.txt").read_text()
    assert f"{spent / 60:.1f} spent before this resume" in log
    # the mirroring model's final evaluation (twice validation's work) is kept back from the budget
    assert "model.tta=flip: from epoch 1 the saved model answers with the mean of each image and its mirror image " \
           "(the final evaluation, 2x as long, is kept back from the budget)" in log
    assert imgcls.load(runs / "budget").metadata["tta"] == "flip"
    rows = metrics_rows(runs / "budget")
    assert [int(row["epoch"]) for row in rows] == list(range(1, len(rows) + 1))
    # the same cosine, continued: no second warm-up after the resume (where it ends is checked without a resume,
    # above: here a slow first epoch of the resumed process, 2 s against 0.5, can end the plan early)
    rates = [float(row["lr"]) for row in rows]
    assert rates[-1] < max(rates) and all(later <= earlier for earlier, later in zip(rates[1:], rates[2:]))
    # the checkpoint holds the plan that ended the run, even when its last epoch re-planned it shorter
    assert load_checkpoint(runs / "budget" / "checkpoints" / "last.ckpt")["budget"]["total_steps"] == \
        load_checkpoint(runs / "budget" / "checkpoints" / "last.ckpt")["steps"]
    with pytest.raises(imgcls.ImgclsError, match="already spent its train.max_minutes=0.4"):
        imgcls.train(resume=runs / "budget")

    # killed with its budget spent but its plan not taken (a slow last epoch): the resume plans no step
    # more and finishes the run with its final evaluation
    from imgcls.checkpoint import save_checkpoint
    from imgcls.tracking import update_summary

    last = load_checkpoint(runs / "budget" / "checkpoints" / "last.ckpt")
    last["budget"].update(seconds_used=0.4 * 60, total_steps=last["steps"] + 100)
    save_checkpoint(runs / "budget" / "checkpoints" / "last.ckpt", last)
    update_summary(runs / "budget", status="interrupted", stage="training")
    imgcls.train(resume=runs / "budget")
    assert len(metrics_rows(runs / "budget")) == len(rows)
    assert json.loads((runs / "budget" / "summary.json").read_text())["status"] == "completed"

    # a larger budget continues it, on the cosine of the longer plan (the saved one had ended at a rate of 0);
    # 0.4 more minutes: a process's first epoch, with its kernels cold, can take 2 s here, and the final
    # evaluation's reserve is timed from it, so 0.2 more could buy no epoch when this test runs alone
    ended = load_checkpoint(runs / "budget" / "checkpoints" / "last.ckpt")["model"]["backbone.fc.weight"]
    imgcls.train(resume=runs / "budget", overrides=["train.max_minutes=0.8"])
    assert len(metrics_rows(runs / "budget")) > len(rows)
    continued = load_checkpoint(runs / "budget" / "checkpoints" / "last.ckpt")["model"]["backbone.fc.weight"]
    assert not torch.equal(ended, continued)


def test_automatic_choices_are_written_auto_and_follow_the_data(shapes_folder):
    config = load_config(overrides=["train.epochs=auto", "train.batch_size=auto", "data.horizontal_flip=auto",
                                    "model.width=auto", "model.blocks=auto"])
    assert (config.train.epochs, config.train.batch_size, config.data.horizontal_flip) == (None, None, None)
    assert (config.model.width, config.model.blocks) == (None, None)
    # 64, halved while an epoch has fewer than 100 batches, down to 16
    assert [automatic_batch_size(n) for n in (500, 1295, 3000, 5400, 6400, 54000)] == [16, 16, 16, 32, 64, 64]
    digits = mirror_check(assign_splits(resolve_source("digits"), 0.1, 0.1, 0))
    assert digits.flips_hurt and digits.mirrors_recognised < 0.5 * digits.recognised  # 34% vs 99%
    assert "mirror images" in digits.describe()
    shapes = mirror_check(assign_splits(resolve_source(str(shapes_folder)), 0.1, 0.1, 0))
    assert not shapes.flips_hurt  # circles, squares and triangles: their mirror images are the same shapes
