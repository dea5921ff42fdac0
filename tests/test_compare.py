"""imgcls.comparison on run folders built by hand with known answers (means, discordant counts, verdicts),
and once on what two real tiny training runs per configuration write."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import binomtest, chi2

import imgcls
from imgcls.comparison import compare, find_runs, group_runs, mcnemar_test, paired_test
from imgcls.config import load_config, save_config
from imgcls.errors import ImgclsError

IMAGES = 400


def image_paths(data: str = "/data/shapes") -> list[str]:
    return [f"{data}/test/{index:03d}.png" for index in range(IMAGES)]


def write_run(folder: Path, correct: np.ndarray, seed: int, overrides: tuple[str, ...] = (),
              status: str = "completed", paths: list[str] | None = None) -> Path:
    """A run folder as `imgcls train` leaves it, with predictions whose correctness is `correct`."""
    folder.mkdir(parents=True)
    config = load_config(overrides=[f"seed={seed}", f"run.name={folder.name}", f"run.dir={folder.parent}", *overrides])
    save_config(config, folder / "config.yaml")
    (folder / "summary.json").write_text(json.dumps({"status": status, "best_epoch": 1}))
    accuracy = float(np.mean(correct))
    # the other metrics are tied to the accuracy so that their means are known too
    metrics = {"loss": 1 - accuracy, "acc1": accuracy, "acc5": 1.0, "balanced_acc": accuracy,
               "macro_f1": accuracy - 0.01, "n": len(correct), "auroc_macro": 0.99, "ece": 0.05}
    (folder / "metrics_test.json").write_text(json.dumps(metrics))
    with open(folder / "predictions_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", "confidence", "correct", "label_1", "prob_1"])
        for path, right in zip(paths or image_paths(), correct):
            predicted = "circle" if right else "square"
            writer.writerow([path, "circle", predicted, "0.900000", int(right), predicted, "0.900000"])
    return folder


def mask(*ranges: tuple[int, int]) -> np.ndarray:
    """Correct (1) on the images in the half-open index ranges, wrong elsewhere."""
    correct = np.zeros(IMAGES, dtype=int)
    for start, stop in ranges:
        correct[start:stop] = 1
    return correct


def flipped(correct: np.ndarray, start: int, stop: int) -> np.ndarray:
    result = correct.copy()
    result[start:stop] = 1 - result[start:stop]
    return result


def write_a_beats_b(root: Path) -> Path:
    """Two configurations x 3 seeds on the same 400 images.

    Seed 0: both right on 0-299, only A on 300-359 (b = 60), only B on 360-379 (c = 20), both wrong
    on 380-399. Seed 1 makes A wrong on 0-3 and B right on 380-381 (b = 60, c = 26), seed 2 A wrong on
    4-11 and B right on 382-385 (b = 60, c = 32): summed over the seed pairs b = 180, c = 78. The seeds
    differ: A 0.900, 0.890, 0.880 (mean 0.89, std 0.01); B 0.800, 0.805, 0.810 (mean 0.805, std 0.005).
    """
    a, b = mask((0, 360)), mask((0, 300), (360, 380))
    for seed, a_seed, b_seed in [(0, a, b), (1, flipped(a, 0, 4), flipped(b, 380, 382)),
                                 (2, flipped(a, 4, 12), flipped(b, 382, 386))]:
        write_run(root / f"lr-0.001-seed{seed}", a_seed, seed, ("optim.lr=0.001",))
        write_run(root / f"lr-0.01-seed{seed}", b_seed, seed, ("optim.lr=0.01",))
    return root


@pytest.fixture
def warnings(caplog):
    """Warnings of the imgcls logger (which does not propagate once setup_logging has run)."""
    logger = logging.getLogger("imgcls")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="imgcls")
    yield caplog
    logger.removeHandler(caplog.handler)


# ----------------------------------------------------------------------------------------------------
# grouping


def test_groups_have_hand_computed_mean_and_sample_std_best_first(tmp_path):
    groups = group_runs(find_runs([write_a_beats_b(tmp_path / "runs")]))
    assert [group.label for group in groups] == ["optim.lr=0.001", "optim.lr=0.01"]
    best, second = groups
    assert best.n == 3 and best.seeds == [0, 1, 2]
    assert best.mean["acc1"] == pytest.approx(0.89) and best.std["acc1"] == pytest.approx(0.01)
    assert second.mean["acc1"] == pytest.approx(0.805) and second.std["acc1"] == pytest.approx(0.005)
    assert best.mean["loss"] == pytest.approx(0.11) and best.mean["macro_f1"] == pytest.approx(0.88)
    assert best.mean["acc5"] == 1.0 and best.std["acc5"] == 0.0 and best.std["ece"] == 0.0  # equal values: exactly 0
    row = best.row()
    assert row["best_acc1"] == pytest.approx(0.9) and row["best_seed"] == 0 and row["best_run"].endswith("lr-0.001-seed0")
    assert row["acc1_std"] == pytest.approx(0.01)


def test_grouping_ignores_seed_run_name_run_dir_device_and_tracking_but_separates_lr(tmp_path):
    right = mask((0, 300))
    write_run(tmp_path / "x" / "first", right, 0, ("optim.lr=0.001", "device=cpu"))
    write_run(tmp_path / "y" / "deeper" / "second", right, 1, ("optim.lr=0.001", "tracking.tensorboard=false",
                                                                "data.workers=0", "train.log_every=5"))
    write_run(tmp_path / "z" / "third", right, 0, ("optim.lr=0.002",))
    groups = group_runs(find_runs([tmp_path]))
    assert sorted((group.label, group.n) for group in groups) == [("optim.lr=0.001", 2), ("optim.lr=0.002", 1)]
    lone = next(group for group in groups if group.n == 1)
    assert lone.std["acc1"] is None and lone.mean["acc1"] == pytest.approx(0.75)  # one run: no spread
    assert all("seed" not in group.config and "run.name" not in group.config for group in groups)
    # asked to, the learning rate is ignored too (as data.path for the folds of a cross-validation)
    assert [group.n for group in group_runs(find_runs([tmp_path]), ignore=["optim.*"])] == [3]


def test_runs_on_other_data_are_grouped_apart_labelled_by_data_path_and_not_paired(tmp_path, warnings):
    right = mask((0, 360))
    write_run(tmp_path / "clean", right, 0, ("data.path=/data/shapes",))
    write_run(tmp_path / "shifted", mask((0, 200)), 0, ("data.path=/data/shifted",),
              paths=image_paths("/data/shifted"))
    groups = group_runs(find_runs([tmp_path]))
    assert [group.label for group in groups] == ["data.path=/data/shapes", "data.path=/data/shifted"]
    with pytest.raises(ImgclsError, match=r"not tested on the same images \(400 only in the first, 400 only in "
                                          r"the second, 0 shared; e\.g\. /data/shapes/test/000\.png\)"):
        paired_test(*groups)
    # compare still gives the table, and says why there is no paired test
    result = compare([tmp_path], quiet=True)
    assert result["paired"] is None and len(result["groups"]) == 2
    assert "No paired test of the best two" in warnings.text


# ----------------------------------------------------------------------------------------------------
# the paired test


def test_a_clearly_better_configuration_is_significant_with_the_constructed_discordant_counts(tmp_path):
    best, second = group_runs(find_runs([write_a_beats_b(tmp_path)]))
    result = paired_test(best, second)
    assert result["images"] == IMAGES
    assert result["mcnemar"]["b"] == 180 and result["mcnemar"]["c"] == 78
    assert result["mcnemar"]["pairs"] == [[0, 0], [1, 1], [2, 2]]
    assert result["mcnemar"]["method"] == "chi-square"
    assert result["mcnemar"]["statistic"] == pytest.approx(101 ** 2 / 258)
    assert result["mcnemar"]["p_value"] == pytest.approx(chi2.sf(101 ** 2 / 258, 1)) and result["mcnemar"]["p_value"] < 1e-4
    # per image averaged over seeds: A (1080 - 12) / 1200, B (960 + 6) / 1200
    assert result["accuracy_a"] == pytest.approx(0.89) and result["accuracy_b"] == pytest.approx(0.805)
    assert result["difference"] == pytest.approx(0.085)
    assert 0 < result["ci_low"] < 0.085 < result["ci_high"] < 0.2
    assert result["verdict"] == "significant"
    assert result["statement"] == (
        "optim.lr=0.001 (0.890 ± 0.010, n=3) beats optim.lr=0.01 (0.805 ± 0.005, n=3) by 8.5 points, "
        f"95% CI [{100 * result['ci_low']:.1f}, {100 * result['ci_high']:.1f}]; McNemar p < 0.0001 over 3 seed pairs: "
        "the difference is significant at the 5% level.")
    # seeded: the same interval again, another seed another one
    assert paired_test(best, second)["ci_low"] == result["ci_low"]
    assert paired_test(best, second, seed=1)["ci_low"] != result["ci_low"]


def test_configurations_of_equal_quality_are_not_significant(tmp_path):
    # in each seed both right on 360 images; A alone on 5 of 350-359 and B alone on 5 of 360-369: summed
    # over the two seed pairs b = c = 10
    for seed in (0, 1):
        write_run(tmp_path / f"a{seed}", mask((0, 355 - 5 * seed), (360 - 5 * seed, 360)), seed, ("optim.lr=0.001",))
        write_run(tmp_path / f"b{seed}", mask((0, 350), (360 + 5 * seed, 365 + 5 * seed)), seed, ("optim.lr=0.01",))
    result = paired_test(*group_runs(find_runs([tmp_path])))
    assert (result["mcnemar"]["b"], result["mcnemar"]["c"]) == (10, 10)
    assert result["mcnemar"]["method"] == "exact binomial" and result["mcnemar"]["p_value"] == pytest.approx(1.0)
    assert result["difference"] == 0 and result["ci_low"] < 0 < result["ci_high"]
    assert result["verdict"] == "not significant"
    assert ("the difference is not significant (the CI includes 0, McNemar p = 1 over 2 seed pairs): treat them as "
            "equal.") in result["statement"]
    assert result["statement"].endswith("With fewer than 3 seeds per configuration, the std is not a reliable spread.")


def test_tests_that_disagree_are_called_borderline(tmp_path):
    # one run each, A alone right on 5 images: McNemar's exact p = 0.0625, while the bootstrap, which
    # draws an image set without any of the 5 in only ~0.7% of resamples, excludes 0
    write_run(tmp_path / "a", mask((0, 305)), 0, ("optim.lr=0.001",))
    write_run(tmp_path / "b", mask((0, 300)), 0, ("optim.lr=0.01",))
    result = paired_test(*group_runs(find_runs([tmp_path])))
    assert (result["mcnemar"]["b"], result["mcnemar"]["c"]) == (5, 0)
    assert result["mcnemar"]["p_value"] == pytest.approx(0.0625) and result["ci_low"] > 0
    assert result["verdict"] == "borderline"
    assert "borderline: the bootstrap CI excludes 0 but McNemar p = 0.062 is not below 0.05" in result["statement"]


def test_mcnemar_adds_up_the_seed_pairs_where_a_majority_vote_would_see_nothing(tmp_path):
    # A is right on 60 more images than B in each of two seeds, other images in each: a per-image majority
    # vote (a tie, 1 of 2 seeds, counted wrong) would see no discordant image; the seed pairs see 120
    for seed in range(2):
        write_run(tmp_path / f"a{seed}", mask((0, 280), (280 + 60 * seed, 340 + 60 * seed)), seed, ("optim.lr=0.001",))
        write_run(tmp_path / f"b{seed}", mask((0, 280)), seed, ("optim.lr=0.01",))
    result = paired_test(*group_runs(find_runs([tmp_path])))
    assert result["difference"] == pytest.approx(0.15) and result["ci_low"] > 0
    assert (result["mcnemar"]["b"], result["mcnemar"]["c"]) == (120, 0) and result["mcnemar"]["p_value"] < 1e-4
    assert result["verdict"] == "significant"


def test_runs_are_paired_by_their_seed_and_the_rest_in_seed_order(tmp_path):
    # A ran seeds 1, 2, 3; B ran 3, 7: seed 3 pairs with seed 3, then A's seed 1 with B's seed 7; A's
    # seed 2 has no partner and stays out of McNemar's counts (not out of the bootstrap)
    for seed in (1, 2, 3):
        write_run(tmp_path / f"a{seed}", mask((0, 300 + seed)), seed, ("optim.lr=0.001",))
    for seed in (3, 7):
        write_run(tmp_path / f"b{seed}", mask((0, 290)), seed, ("optim.lr=0.01",))
    result = paired_test(*group_runs(find_runs([tmp_path])))
    assert result["mcnemar"]["pairs"] == [[3, 3], [1, 7]]
    assert (result["mcnemar"]["b"], result["mcnemar"]["c"]) == (13 + 11, 0)


def test_mcnemar_is_exact_below_25_discordant_images_and_chi_square_from_25():
    exact = mcnemar_test(3, 21)
    assert exact["method"] == "exact binomial" and exact["p_value"] == pytest.approx(binomtest(3, 24, 0.5).pvalue)
    approximate = mcnemar_test(3, 22)
    assert approximate["method"] == "chi-square"
    assert approximate["statistic"] == pytest.approx(18 ** 2 / 25)
    assert approximate["p_value"] == pytest.approx(chi2.sf(18 ** 2 / 25, 1))
    assert mcnemar_test(0, 0)["p_value"] == 1.0


def test_a_run_without_predictions_is_a_clear_error(tmp_path):
    write_run(tmp_path / "a", mask((0, 360)), 0, ("optim.lr=0.001",))
    write_run(tmp_path / "b", mask((0, 300)), 0, ("optim.lr=0.01",))
    (tmp_path / "b" / "predictions_test.csv").unlink()
    with pytest.raises(ImgclsError, match=r"no predictions_test\.csv in .*b: evaluate it \(imgcls eval .* --split test\)"):
        paired_test(*group_runs(find_runs([tmp_path])))


# ----------------------------------------------------------------------------------------------------
# finding runs


def test_a_nested_sweep_is_found_and_incomplete_runs_are_left_out_with_a_warning(tmp_path, warnings):
    sweep = tmp_path / "runs" / "sweeps" / "lr"
    write_a_beats_b(sweep / "grid")
    write_run(sweep / "grid" / "crashed", mask((0, 10)), 3, ("optim.lr=0.001",), status="failed")
    unevaluated = write_run(sweep / "deep" / "er" / "unevaluated", mask((0, 10)), 4, ("optim.lr=0.001",))
    (unevaluated / "metrics_test.json").unlink()
    runs = find_runs([tmp_path / "runs", sweep / "grid"])  # overlapping arguments: each run once
    assert len(runs) == 6 and len(set(runs)) == 6
    assert "left out 2 run(s)" in warnings.text
    assert "crashed (failed)" in warnings.text and "unevaluated (completed, no metrics_test.json)" in warnings.text


def test_no_runs_is_an_error_naming_the_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgclsError, match=r"no completed run with metrics_test\.json in .*empty"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(ImgclsError, match=r"missing is not a folder"):
        find_runs([tmp_path / "missing"])
    write_run(tmp_path / "only-val", mask((0, 10)), 0)
    with pytest.raises(ImgclsError, match=r"--split val"):
        find_runs([tmp_path / "only-val"], split="val")


# ----------------------------------------------------------------------------------------------------
# the report


def test_a_sweep_folder_gets_a_parseable_csv_and_markdown(tmp_path, capsys):
    sweep = write_a_beats_b(tmp_path / "sweep")
    (sweep / "plan.json").write_text(json.dumps({"grid": {"optim.lr": ["0.001", "0.01"]}, "seeds": [0, 1, 2]}))
    result = compare([sweep])
    assert result["files"] == [str(sweep / "comparison.csv"), str(sweep / "comparison.md")]
    with open(sweep / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == ["optim.lr=0.001", "optim.lr=0.01"]
    assert list(rows[0])[:5] == ["label", "n", "seeds", "acc1_mean", "acc1_std"]
    assert {"acc5_mean", "loss_mean", "macro_f1_std", "ece_mean", "best_acc1", "best_seed", "best_run"} <= set(rows[0])
    assert rows[0]["n"] == "3" and rows[0]["seeds"] == "0 1 2"
    assert float(rows[0]["acc1_mean"]) == pytest.approx(0.89) and float(rows[1]["acc1_std"]) == pytest.approx(0.005)
    markdown = (sweep / "comparison.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 4 and all(line.count("|") == table[0].count("|") for line in table)
    assert "| optim.lr=0.001 | 3 | 0 1 2 | 0.890 ± 0.010 |" in table[2]
    assert result["paired"]["statement"] in markdown
    printed = capsys.readouterr().out
    assert "0.890 ± 0.010" in printed and "significant at the 5% level" in printed


def test_one_configuration_gives_the_table_without_a_paired_test(tmp_path):
    write_run(tmp_path / "only", mask((0, 300)), 0)
    result = compare([tmp_path / "only"], csv_path=tmp_path / "out.csv", markdown_path=tmp_path / "out.md", quiet=True)
    assert result["paired"] is None
    assert result["groups"][0]["label"] == "all runs" and result["groups"][0]["acc1_std"] is None
    with open(tmp_path / "out.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["acc1_std"] == "" and float(row["acc1_mean"]) == pytest.approx(0.75)
    assert "One configuration only" in (tmp_path / "out.md").read_text()
    assert not (tmp_path / "only" / "comparison.csv").exists()  # not a sweep: files only where asked


# ----------------------------------------------------------------------------------------------------
# end to end: what real training writes


def test_compare_reads_what_real_training_runs_write(shapes_folder, tmp_path):
    runs = tmp_path / "runs"
    for lr in ("0.003", "0.0003"):
        for seed in (1, 2):
            imgcls.train(load_config(overrides=[
                f"data.path={shapes_folder}", f"run.dir={runs}", "model.name=small_resnet", "data.image_size=32",
                "train.batch_size=16", "train.epochs=1", f"seed={seed}", "data.augment=none", f"optim.lr={lr}"]))
    result = compare([runs], quiet=True)
    assert sorted(row["label"] for row in result["groups"]) == ["optim.lr=0.0003", "optim.lr=0.003"]
    for row in result["groups"]:
        assert row["n"] == 2 and row["seeds"] == [1, 2]
        accuracies = [json.loads((run / "summary.json").read_text())["test_metrics"]["acc1"] for run in runs.iterdir()
                      if yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == float(row["label"][9:])]
        assert len(accuracies) == 2 and row["acc1_mean"] == pytest.approx(np.mean(accuracies))
        assert row["acc1_std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert result["groups"][0]["acc1_mean"] >= result["groups"][1]["acc1_mean"]
    paired = result["paired"]
    # this data has no test folder: each seed draws its own test split, and both configurations used
    # seeds 1 and 2, so they share the union of those two splits
    tested = {row["path"] for run in runs.iterdir() for row in csv.DictReader(open(run / "predictions_test.csv"))}
    assert paired["images"] == len(tested) > 0
    assert paired["mcnemar"]["pairs"] == [[1, 1], [2, 2]]
    assert paired["mcnemar"]["b"] + paired["mcnemar"]["c"] <= 2 * paired["images"]
    assert paired["ci_low"] <= paired["difference"] <= paired["ci_high"]
    assert not math.isnan(paired["mcnemar"]["p_value"]) and paired["verdict"] in ("significant", "not significant", "borderline")
    assert "fewer than 3 seeds" in paired["statement"]
