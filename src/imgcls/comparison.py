"""Compare finished runs: one table of mean ± std over seeds per configuration, and a paired test of
the two best configurations on the same test images (bootstrap CI and McNemar's test), in words.

    result = compare(["runs/sweeps/lr"])   # prints the table; writes comparison.csv/.md into the sweep
    result["paired"]["statement"]          # "optim.lr=0.001 (0.912 ± 0.004, n=3) beats ..."

A configuration is everything in a run's config.yaml except the keys that do not change what is
learned or measured (`NOT_EXPERIMENT_KEYS`): the seeds of one configuration are its repeats.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from imgcls.errors import ImgclsError
from imgcls.tracking import RunFolder

__all__ = ["Group", "find_runs", "group_runs", "paired_test", "mcnemar_test", "compare",
           "NOT_EXPERIMENT_KEYS", "METRICS", "SWEEP_FILES"]

log = logging.getLogger("imgcls")

# Config keys that do not define the experiment, so runs that differ only in these are repeats of one
# configuration: the seed (the repeats themselves), where the run folder is and what it is called,
# which device ran it, and data-loading / logging / caching / tracking knobs that change speed or
# bookkeeping, not the model. A key ending in ".*" covers a whole section. data.path is NOT here:
# the same model tested on other data (distribution shift) is a different measurement.
NOT_EXPERIMENT_KEYS = (
    "seed", "run.name", "run.dir", "device", "data.workers", "train.log_every", "data.cache",
    "data.cache_max_gib", "tracking.*",
)
# the columns of the table, from metrics_<split>.json; acc1 (top-1 accuracy) ranks the configurations,
# and for multi-label runs map (mean average precision over the labels)
METRICS = ("acc1", "acc5", "loss", "macro_f1", "ece")
MULTI_LABEL_METRICS = ("map", "f1_micro", "f1_macro", "subset_acc", "loss")
_MULTI_LABEL_RESAMPLES = 2_000  # each resample computes every label's AP for every run: 2,000 take seconds
# a folder made by `imgcls sweep`, `cv` or `tune` has one of these (imgcls.sweeps writes plan.json);
# given such a folder alone, compare writes comparison.csv and comparison.md into it
SWEEP_FILES = ("plan.json", "sweep.yaml")
_SIGNIFICANCE = 0.05  # two-sided level of both tests
_MCNEMAR_EXACT_BELOW = 25  # fewer discordant images than this: exact binomial test, else chi-square
_BOOTSTRAP_CHUNK = 2_000_000  # resampled image indices held in memory at once (int64: 16 MB)


# ----------------------------------------------------------------------------------------------------
# finding runs


def _run_status(run_dir: Path, split: str) -> str | None:
    """None for a run that counts (completed, with metrics_<split>.json), else why it does not."""
    try:
        status = json.loads(RunFolder(run_dir).summary.read_text()).get("status") or "unknown status"
    except (OSError, ValueError):
        return "unreadable summary.json"
    if status != "completed":
        return status
    if not (run_dir / f"metrics_{split}.json").is_file():
        return f"completed, no metrics_{split}.json"
    return None


def _is_run(folder: Path) -> bool:
    return RunFolder(folder).is_run()


def find_runs(paths: Iterable[str | Path], split: str = "test") -> list[Path]:
    """The completed run folders in `paths`, each a run folder or a folder holding run folders at any
    depth (a sweep, a cross-validation folder, runs/).

    Runs that are not completed (failed, interrupted, stopped, still running) or have no
    metrics_<split>.json are left out and listed in one warning with their status.

    Args:
        paths: run folders and folders of run folders.
        split: the evaluated split the runs must have metrics for.
    Returns:
        The run folders, sorted, each once.
    Raises:
        ImgclsError: a path that does not exist, or no completed run with metrics_<split>.json at all.
    """
    paths = [Path(path) for path in paths]
    found: dict[Path, None] = {}  # an ordered set: overlapping arguments list a run once
    for path in paths:
        if not path.is_dir():
            raise ImgclsError(f"{path} is not a folder; give run folders or folders of runs (e.g. runs/sweeps/NAME)")
        folders = [path] if _is_run(path) else sorted(summary.parent for summary in path.rglob("summary.json")
                                                      if _is_run(summary.parent))
        if not folders:
            log.warning(f"no run folders (config.yaml + summary.json) in {path}")
        found.update((folder.resolve(), None) for folder in folders)
    runs, skipped = [], []
    for run_dir in sorted(found):
        reason = _run_status(run_dir, split)
        if reason is None:
            runs.append(run_dir)
        else:
            skipped.append(f"{run_dir} ({reason})")
    if skipped:
        log.warning(f"left out {len(skipped)} run(s) that are not completed with metrics_{split}.json: "
                    + ", ".join(skipped))
    if not runs:
        names = ", ".join(str(path) for path in paths)
        raise ImgclsError(f"no completed run with metrics_{split}.json in {names}; train some runs first, or "
                          f"evaluate them on this split (imgcls eval RUN --split {split})")
    return runs


# ----------------------------------------------------------------------------------------------------
# grouping runs by configuration


@dataclass
class Group:
    """The runs of one configuration (all seeds) and their mean ± std.

    `std` is the sample standard deviation (ddof=1); it is None for a group of one run, which has no
    spread (and for a metric that no run of the group recorded, whose mean is None too).
    """

    label: str
    """The settings that set this group apart from the others (`optim.lr=0.001`), or `all runs`."""
    config: dict[str, Any]
    """The defining config: dotted keys (without `NOT_EXPERIMENT_KEYS`) to values."""
    runs: list[Path]
    seeds: list[Any]
    metrics: list[dict[str, Any]] = field(repr=False)
    """metrics_<split>.json of each run, in the order of `runs`."""
    mean: dict[str, float | None] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def multi_label(self) -> bool:
        return "map" in self.metrics[0]

    @property
    def ranking(self) -> str:
        """The metric that ranks configurations: acc1, or map for multi-label runs."""
        return "map" if self.multi_label else "acc1"

    @property
    def metric_names(self) -> tuple[str, ...]:
        return MULTI_LABEL_METRICS if self.multi_label else METRICS

    @property
    def best(self) -> int:
        """Index of the run with the highest acc1 (map) (the first one on a tie)."""
        return max(range(self.n), key=lambda index: self.metrics[index].get(self.ranking, -math.inf))

    def row(self) -> dict[str, Any]:
        """One flat row: label, n, seeds, <metric>_mean / <metric>_std, best_acc1 (best_map), best_seed, best_run."""
        row: dict[str, Any] = {"label": self.label, "n": self.n, "seeds": list(self.seeds)}
        for metric in self.metric_names:
            row[f"{metric}_mean"], row[f"{metric}_std"] = self.mean[metric], self.std[metric]
        best = self.best
        row.update({f"best_{self.ranking}": self.metrics[best].get(self.ranking), "best_seed": self.seeds[best],
                    "best_run": str(self.runs[best])})
        return row


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_experiment_key(key: str, ignore: tuple[str, ...]) -> bool:
    return not any(key == ignored or (ignored.endswith(".*") and key.startswith(ignored[:-1]))
                   for ignored in (*NOT_EXPERIMENT_KEYS, *ignore))


def _read_run(run_dir: Path, split: str, defaults: dict[str, Any],
              ignore: tuple[str, ...]) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(defining config, seed, metrics) of one run."""
    import yaml

    try:
        saved = yaml.safe_load(RunFolder(run_dir).config.read_text()) or {}
        metrics = json.loads((run_dir / f"metrics_{split}.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ImgclsError(f"cannot read the run folder {run_dir}: {str(error).splitlines()[0]}; "
                          "leave it out or train it again") from error
    # a key added to the config after this run was made gets its default, which is what the run used
    # (new keys default to the old behaviour), so old and new runs of one setting still group together
    config = {**defaults, **_flatten(saved)}
    defining = {key: value for key, value in config.items() if _is_experiment_key(key, ignore)}
    return defining, config.get("seed"), metrics


def _format_value(value: Any) -> str:
    """A config value as it is written on the command line (`true`, `null`, `0.001`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _labels(configs: list[dict[str, Any]]) -> list[str]:
    """Per configuration, the key=value pairs of the keys whose values are not the same in all of them."""
    if len(configs) == 1:
        return ["all runs"]

    def value(config: dict[str, Any], key: str) -> str:
        # a key that one config has and another lacks (a section removed since) also sets them apart
        return _format_value(config[key]) if key in config else "(unset)"

    keys = list(dict.fromkeys(key for config in configs for key in config))  # first-seen order: the config's
    differing = [key for key in keys if len({value(config, key) for config in configs}) > 1]
    return [", ".join(f"{key}={value(config, key)}" for key in differing) for config in configs]


def _spread(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample std); std None for one value, both None for none."""
    if not values:
        return None, None
    mean = float(np.mean(values))
    if len(values) == 1:
        return mean, None
    # equal values have no spread; np.std would give ~1e-17 from rounding in the mean
    return mean, 0.0 if max(values) == min(values) else float(np.std(values, ddof=1))


def group_runs(runs: Iterable[str | Path], split: str = "test", ignore: Iterable[str] = ()) -> list[Group]:
    """Group runs by configuration (config.yaml without `NOT_EXPERIMENT_KEYS`), best first.

    Runs on different data (`data.path`) are different groups: a model tested on shifted data is a
    different measurement, not another seed.

    Args:
        runs: completed run folders (see `find_runs`).
        split: whose metrics_<split>.json to read.
        ignore: more keys that do not define the experiment (`section.*` for a section), e.g.
            `data.path` to take the folds of a cross-validation (one manifest each) as repeats.
    Returns:
        Groups sorted by mean acc1, highest first; runs within a group sorted by seed. Each group's
        label names the settings in which it differs from the others ("all runs" when there is one group).
    Raises:
        ImgclsError: a run folder whose config.yaml or metrics_<split>.json cannot be read.
    """
    from imgcls.config import Config, config_to_dict

    defaults = _flatten(config_to_dict(Config()))
    by_config: dict[str, list[tuple[Path, dict, Any, dict]]] = {}
    for run_dir in runs:
        config, seed, metrics = _read_run(Path(run_dir), split, defaults, tuple(ignore))
        key = json.dumps(config, sort_keys=True, default=str)
        by_config.setdefault(key, []).append((Path(run_dir), config, seed, metrics))
    members = [sorted(items, key=lambda item: (str(item[2]), str(item[0]))) for items in by_config.values()]
    groups = []
    for label, items in zip(_labels([items[0][1] for items in members]), members):
        group = Group(label=label, config=items[0][1], runs=[item[0] for item in items],
                      seeds=[item[2] for item in items], metrics=[item[3] for item in items])
        for metric in group.metric_names:
            values = [float(m[metric]) for m in group.metrics if isinstance(m.get(metric), (int, float))]
            group.mean[metric], group.std[metric] = _spread(values)
        groups.append(group)
    if len({group.multi_label for group in groups}) > 1:
        raise ImgclsError("the runs mix single-label and multi-label models; compare each kind on its own")
    return sorted(groups, key=lambda group: -(group.mean[group.ranking] if group.mean[group.ranking] is not None
                                              else -math.inf))


# ----------------------------------------------------------------------------------------------------
# the paired test of two configurations on the same images


def _run_correctness(run_dir: Path, split: str) -> dict[str, int]:
    """Per image (by path): 1 if the run predicted it right, else 0, from predictions_<split>.csv."""
    path = run_dir / f"predictions_{split}.csv"
    try:
        with open(path, newline="") as handle:
            return {row["path"]: int(row["correct"]) for row in csv.DictReader(handle)}
    except FileNotFoundError as error:
        raise ImgclsError(f"no {path.name} in {run_dir}: evaluate it "
                          f"(imgcls eval {run_dir} --split {split})") from error
    except (KeyError, ValueError) as error:
        raise ImgclsError(f"{path} has no readable 'path' and 'correct' columns ({error}); "
                          f"write it again with imgcls eval {run_dir} --split {split}") from error


def _image_correctness(runs: list[dict[str, int]]) -> dict[str, list[int]]:
    """Per test image (by path): [times correct, times tested] over the runs of one group.

    Counting rather than assuming every seed saw every image keeps data without a fixed test split
    right: there the split follows the seed, and each image is averaged over the seeds that tested it.
    """
    counts: dict[str, list[int]] = {}
    for correctness in runs:
        for image, correct in correctness.items():
            tally = counts.setdefault(image, [0, 0])
            tally[0] += correct
            tally[1] += 1
    return counts


def _seed_pairs(group_a: Group, group_b: Group) -> list[tuple[int, int]]:
    """Indices (into each group's runs) of the runs to test against each other: the same seed where
    both groups ran it, then the remaining runs in the groups' order (seeds sorted as text). A run without
    a partner is left out."""
    left_a, left_b = list(range(group_a.n)), list(range(group_b.n))
    pairs = []
    for index_a in range(group_a.n):
        index_b = next((index for index in left_b if group_b.seeds[index] == group_a.seeds[index_a]), None)
        if index_b is not None:
            pairs.append((index_a, index_b))
            left_a.remove(index_a)
            left_b.remove(index_b)
    return pairs + list(zip(left_a, left_b))


def _check_same_images(a: Group, b: Group, images_a: set[str], images_b: set[str]) -> None:
    if images_a == images_b and images_a:
        return
    only_a, only_b = sorted(images_a - images_b), sorted(images_b - images_a)
    example = (only_a or only_b or ["(none)"])[0]
    raise ImgclsError(
        f"'{a.label}' and '{b.label}' were not tested on the same images ({len(only_a)} only in the first, "
        f"{len(only_b)} only in the second, {len(images_a & images_b)} shared; e.g. {example}): a paired test "
        "needs runs on the same data and test split (data without a test split is split by the seed: use the "
        "same seeds for both)")


def mcnemar_test(b: int, c: int) -> dict[str, Any]:
    """McNemar's test of two classifiers on the same images, from the discordant counts.

    Exact two-sided binomial test of b out of b + c at 1/2 when b + c < 25 (the chi-square
    approximation is poor there); otherwise chi-square with continuity correction, (|b - c| - 1)² / (b + c),
    1 degree of freedom. The exact test's `statistic` is min(b, c) (statsmodels' convention).

    Args:
        b: images the first classifier gets right and the second wrong.
        c: images the first gets wrong and the second right.
    Returns:
        b, c, statistic, p_value and method ("exact binomial" or "chi-square").
    """
    from scipy.stats import binomtest, chi2

    if b + c == 0:  # no image separates them
        return {"b": b, "c": c, "statistic": 0.0, "p_value": 1.0, "method": "exact binomial"}
    if b + c < _MCNEMAR_EXACT_BELOW:
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": float(binomtest(b, b + c, 0.5).pvalue),
                "method": "exact binomial"}
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    return {"b": b, "c": c, "statistic": float(statistic), "p_value": float(chi2.sf(statistic, 1)),
            "method": "chi-square"}


def _bootstrap_mean(differences: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of `resamples` resamples of `differences` with replacement (in chunks: bounded memory)."""
    rng = np.random.default_rng(seed)
    count = len(differences)
    chunk = max(1, _BOOTSTRAP_CHUNK // count)
    means = [differences[rng.integers(0, count, size=(min(chunk, resamples - start), count))].mean(axis=1)
             for start in range(0, resamples, chunk)]
    return np.concatenate(means)


def paired_test(group_a: Group, group_b: Group, split: str = "test", resamples: int = 10_000,
                seed: int = 0) -> dict[str, Any]:
    """Is A's accuracy different from B's on the same test images? Two tests, and a verdict in words.

    Rows of predictions_<split>.csv are matched by image path. Per image, each configuration's
    correctness is averaged over its seeds (the seeds that tested it). The paired bootstrap resamples
    images with replacement and gives the 95% percentile interval of accuracy(A) - accuracy(B); it
    measures how much the difference depends on which test images were drawn, while the ± std measures
    how much it depends on the seed. McNemar's test (`mcnemar_test`) pairs the runs by seed (the same
    seed where both configurations ran it, the rest in the groups' order) and adds up the discordant
    images of every pair that shares images: the seeds are independent repeats, so their evidence about
    these images adds up (about other images, only the bootstrap speaks; the verdict needs both). A
    per-image majority vote over seeds would compare two ensembles, which differ less than single runs do:
    a change that won every seed by a few tenths of a point got p = 0.71 from it, 0.0006 from the pairs.

    Args:
        group_a, group_b: two groups from `group_runs`, usually the best two.
        split: the split of the predictions to compare.
        resamples: bootstrap resamples.
        seed: seed of the bootstrap's random generator (the same seed, the same interval).
    Returns:
        config_a, config_b (labels), images, accuracy_a, accuracy_b, difference (A - B, fraction), ci_low, ci_high,
        resamples, mcnemar (see `mcnemar_test`; b and c summed over the seed pairs, listed as `pairs`:
        [seed of A, seed of B] each), verdict ("significant", "not significant" or
        "borderline": the two tests disagree) and statement (one paragraph in words).
    Multi-label groups get `paired_map_test` instead.

    Raises:
        ImgclsError: a run without predictions_<split>.csv, or groups tested on different images.
    """
    if group_a.multi_label:
        return paired_map_test(group_a, group_b, split, min(resamples, _MULTI_LABEL_RESAMPLES), seed)
    runs_a = [_run_correctness(run_dir, split) for run_dir in group_a.runs]
    runs_b = [_run_correctness(run_dir, split) for run_dir in group_b.runs]
    counts_a, counts_b = _image_correctness(runs_a), _image_correctness(runs_b)
    _check_same_images(group_a, group_b, set(counts_a), set(counts_b))
    images = sorted(counts_a)
    tallies_a = np.array([counts_a[image] for image in images], dtype=float)  # columns: correct, tested
    tallies_b = np.array([counts_b[image] for image in images], dtype=float)
    accuracy_a, accuracy_b = tallies_a[:, 0] / tallies_a[:, 1], tallies_b[:, 0] / tallies_b[:, 1]
    differences = accuracy_a - accuracy_b
    ci_low, ci_high = np.percentile(_bootstrap_mean(differences, resamples, seed), [2.5, 97.5])
    only_a = only_b = 0
    pairs = []
    for index_a, index_b in _seed_pairs(group_a, group_b):
        run_a, run_b = runs_a[index_a], runs_b[index_b]
        shared = run_a.keys() & run_b.keys()  # without a fixed test split, the seeds' splits may differ
        if shared:
            only_a += sum(1 for image in shared if run_a[image] > run_b[image])
            only_b += sum(1 for image in shared if run_a[image] < run_b[image])
            pairs.append([group_a.seeds[index_a], group_b.seeds[index_b]])
    mcnemar = mcnemar_test(only_a, only_b)
    mcnemar["pairs"] = pairs
    result = {
        "config_a": group_a.label, "config_b": group_b.label, "images": len(images),
        "accuracy_a": float(accuracy_a.mean()), "accuracy_b": float(accuracy_b.mean()),
        "difference": float(differences.mean()), "ci_low": float(ci_low), "ci_high": float(ci_high),
        "resamples": resamples, "mcnemar": mcnemar,
    }
    result["verdict"], result["statement"] = _statement(group_a, group_b, result)
    return result


def _run_probabilities(group: Group, split: str) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """(image paths, truth, each run's probabilities), rows in path order, from the multi-label
    predictions_<split>.csv of every run of the group (all tested on the same images)."""
    from imgcls.multilabel import read_predictions

    images, truth, runs = None, None, []
    for run_dir in group.runs:
        path = run_dir / f"predictions_{split}.csv"
        if not path.is_file():
            raise ImgclsError(f"no {path.name} in {run_dir}: evaluate it (imgcls eval {run_dir} --split {split})")
        paths, probabilities, labels, _ = read_predictions(path)
        order = np.argsort(paths, kind="stable")
        paths = [paths[index] for index in order]
        if images is not None and paths != images:
            raise ImgclsError(f"the runs of '{group.label}' were not tested on the same images ({run_dir} differs); "
                              "the multi-label paired test needs a fixed test split")
        images, truth = paths, labels[order]
        runs.append(probabilities[order])
    return images, truth, runs


def _resampled_map(truth: np.ndarray, probabilities: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """mAP under each row of `weights` (how often each image was drawn by one bootstrap resample):
    every label's average precision with images counted by their weights, averaged over the labels
    with a drawn positive."""
    precisions = []
    for label in range(truth.shape[1]):
        order = np.argsort(-probabilities[:, label], kind="stable")
        positive = truth[order, label].astype(float)
        drawn = weights[:, order]
        hits = drawn * positive
        precision = np.cumsum(hits, axis=1) / np.maximum(np.cumsum(drawn, axis=1), 1e-12)
        positives = hits.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            precisions.append(np.where(positives > 0, (hits * precision).sum(axis=1) / positives, np.nan))
    return np.nanmean(np.stack(precisions), axis=0)


def paired_map_test(group_a: Group, group_b: Group, split: str = "test", resamples: int = 2_000,
                    seed: int = 0) -> dict[str, Any]:
    """Is A's mAP different from B's on the same test images? A paired bootstrap over images.

    Each resample draws the test images with replacement and computes, for every run, the mAP on the
    drawn images (each label's average precision weighted by the draw); a configuration's figure is the
    mean over its seeds. The 95% percentile interval of mAP(A) - mAP(B) excluding 0 is the verdict.

    Returns:
        config_a, config_b, images, metric ("map"), map_a, map_b, difference (A - B), ci_low, ci_high,
        resamples, verdict ("significant" or "not significant") and statement.
    Raises:
        ImgclsError: a run without predictions_<split>.csv, or runs tested on different images.
    """
    images_a, truth, runs_a = _run_probabilities(group_a, split)
    images_b, _, runs_b = _run_probabilities(group_b, split)
    _check_same_images(group_a, group_b, set(images_a), set(images_b))
    rng = np.random.default_rng(seed)
    count, differences = len(images_a), []
    chunk = max(1, _BOOTSTRAP_CHUNK // (4 * count))
    for start in range(0, resamples, chunk):
        weights = rng.multinomial(count, np.full(count, 1 / count), size=min(chunk, resamples - start)).astype(float)
        figure_a = np.mean([_resampled_map(truth, run, weights) for run in runs_a], axis=0)
        figure_b = np.mean([_resampled_map(truth, run, weights) for run in runs_b], axis=0)
        differences.append(figure_a - figure_b)
    ci_low, ci_high = np.percentile(np.concatenate(differences), [2.5, 97.5])
    plain = np.ones((1, count))
    map_a = float(np.mean([_resampled_map(truth, run, plain) for run in runs_a]))
    map_b = float(np.mean([_resampled_map(truth, run, plain) for run in runs_b]))
    difference = map_a - map_b
    significant = ci_low > 0 or ci_high < 0
    first = f"{group_a.label} (mAP {_mean_std(group_a)}, n={group_a.n})"
    second = f"{group_b.label} (mAP {_mean_std(group_b)}, n={group_b.n})"
    verb = "beats" if difference > 0 else "trails" if difference < 0 else "ties with"
    statement = (f"{first} {verb} {second} by {100 * abs(difference):.1f} mAP points, paired bootstrap over "
                 f"{count} images 95% CI [{100 * ci_low:.1f}, {100 * ci_high:.1f}]: "
                 + ("the difference is significant at the 5% level." if significant
                    else "the difference is not significant (the CI includes 0): treat them as equal."))
    if min(group_a.n, group_b.n) < 3:
        statement += " With fewer than 3 seeds per configuration, the std is not a reliable spread."
    return {"config_a": group_a.label, "config_b": group_b.label, "images": count, "metric": "map",
            "map_a": map_a, "map_b": map_b, "difference": difference, "ci_low": float(ci_low),
            "ci_high": float(ci_high), "resamples": resamples,
            "verdict": "significant" if significant else "not significant", "statement": statement}


def _mean_std(group: Group, metric: str | None = None) -> str:
    """`0.912 ± 0.004` (or `0.912` for one run, `-` when no run recorded the metric); default: the
    group's ranking metric."""
    metric = metric or group.ranking
    mean, std = group.mean[metric], group.std[metric]
    if mean is None:
        return "-"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _format_p(p_value: float) -> str:
    return "< 0.0001" if p_value < 1e-4 else f"= {p_value:.2g}"


def _statement(group_a: Group, group_b: Group, result: dict[str, Any]) -> tuple[str, str]:
    """(verdict, the paired test in plain words)."""
    difference, low, high = (100 * result[key] for key in ("difference", "ci_low", "ci_high"))  # points
    p_value = result["mcnemar"]["p_value"]
    first = f"{group_a.label} ({_mean_std(group_a)}, n={group_a.n})"
    second = f"{group_b.label} ({_mean_std(group_b)}, n={group_b.n})"
    verb = "beats" if difference > 0 else "trails" if difference < 0 else "ties with"
    text = f"{first} {verb} {second} by {abs(difference):.1f} points, 95% CI [{low:.1f}, {high:.1f}]"
    ci_excludes_zero, mcnemar_significant = low > 0 or high < 0, p_value < _SIGNIFICANCE
    pairs = len(result["mcnemar"]["pairs"])
    p_text = f"McNemar p {_format_p(p_value)}" + (f" over {pairs} seed pairs" if pairs > 1 else "")
    if ci_excludes_zero and mcnemar_significant:
        verdict, text = "significant", f"{text}; {p_text}: the difference is significant at the 5% level."
    elif not ci_excludes_zero and not mcnemar_significant:
        verdict = "not significant"
        text = f"{text}: the difference is not significant (the CI includes 0, {p_text}): treat them as equal."
    else:
        verdict = "borderline"
        agree, disagree = (("the bootstrap CI excludes 0", f"{p_text} is not below 0.05") if ci_excludes_zero
                           else (f"{p_text} is below 0.05", "the bootstrap CI includes 0"))
        text = (f"{text}; borderline: {agree} but {disagree}, so the two tests disagree: add seeds or test "
                "images before calling a winner.")
    if min(group_a.n, group_b.n) < 3:
        text += " With fewer than 3 seeds per configuration, the std is not a reliable spread."
    return verdict, text


# ----------------------------------------------------------------------------------------------------
# the table: console, CSV, Markdown


_COLUMNS = (("acc1", "top-1"), ("acc5", "top-5"), ("loss", "loss"), ("macro_f1", "macro-F1"), ("ece", "ECE"))
_MULTI_LABEL_COLUMNS = (("map", "mAP"), ("f1_micro", "micro-F1"), ("f1_macro", "macro-F1"),
                        ("subset_acc", "subset acc"), ("loss", "loss"))


def _columns(group: Group) -> tuple[tuple[str, str], ...]:
    return _MULTI_LABEL_COLUMNS if group.multi_label else _COLUMNS


def _table_cells(group: Group) -> list[str]:
    """configuration, n, seeds, the metrics as mean ± std, and the best run's top-1 (mAP) with its seed."""
    best = group.best
    best_figure = group.metrics[best].get(group.ranking)
    best_text = f"{best_figure:.3f} (seed {group.seeds[best]})" if best_figure is not None else "-"
    return [group.label, str(group.n), " ".join(str(seed) for seed in group.seeds),
            *(_mean_std(group, metric) for metric, _ in _columns(group)), best_text]


def _headers(group: Group) -> list[str]:
    return ["configuration", "n", "seeds", *(title for _, title in _columns(group)),
            f"best {'mAP' if group.multi_label else 'top-1'} (seed)"]


def _print_table(groups: list[Group], split: str, note: str) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{split} split: mean ± sample std over seeds")
    for index, header in enumerate(_headers(groups[0])):
        table.add_column(header, justify="left" if index in (0, 2) else "right")
    for group in groups:
        table.add_row(*(Text(cell) for cell in _table_cells(group)))  # Text: labels are not rich markup
    from imgcls.tracking import on_terminal

    # piped or logged: rich would squeeze the table into 80 columns; a log file can be wide
    console = Console() if on_terminal() else Console(width=200)
    console.print(table)
    console.print(note, markup=False, highlight=False)


def _write_csv(groups: list[Group], path: Path) -> None:
    rows = [group.row() for group in groups]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            row["seeds"] = " ".join(str(seed) for seed in row["seeds"])
            writer.writerow({key: "" if value is None else f"{value:.6g}" if isinstance(value, float) else value
                             for key, value in row.items()})


def _write_markdown(groups: list[Group], split: str, note: str, path: Path) -> None:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    headers = _headers(groups[0])
    lines = [f"Comparison on the {split} split: mean ± sample std over seeds, best first.", "",
             line(headers), "|" + "|".join("---" if index in (0, 2) else "---:" for index in range(len(headers))) + "|"]
    lines += [line(_table_cells(group)) for group in groups]
    lines += ["", note, ""]
    path.write_text("\n".join(lines))


def _default_outputs(paths: list[Path], csv_path: str | Path | None,
                     markdown_path: str | Path | None) -> tuple[Path | None, Path | None]:
    """Where the files go: where asked, else into the sweep folder when exactly one was given."""
    sweep = paths[0] if len(paths) == 1 and any((paths[0] / name).is_file() for name in SWEEP_FILES) else None
    if sweep is not None:
        csv_path = csv_path if csv_path is not None else sweep / "comparison.csv"
        markdown_path = markdown_path if markdown_path is not None else sweep / "comparison.md"
    return (Path(csv_path) if csv_path is not None else None,
            Path(markdown_path) if markdown_path is not None else None)


def compare(paths: Iterable[str | Path], split: str = "test", csv_path: str | Path | None = None,
            markdown_path: str | Path | None = None, ignore: Iterable[str] = (), quiet: bool = False) -> dict[str, Any]:
    """Find the runs, group them by configuration, test the best two against each other, and report.

    The table (best first) goes to the console, and to CSV (one row per configuration, the columns of
    `Group.row`) and Markdown (the table, then the paired test in words). Given one sweep, cv or tune
    folder (it has plan.json), comparison.csv and comparison.md are written into it unless other paths are given.
    When the best two configurations were tested on different images (e.g. different data.path),
    there is no paired test: a warning says why and the table is still written.

    Args:
        paths: run folders and folders of runs (sweeps, cross-validation folders, runs/).
        split: the evaluated split to compare.
        csv_path: where to write the CSV (None: only the sweep default).
        markdown_path: where to write the Markdown (None: only the sweep default).
        ignore: more config keys that do not define the experiment (see `group_runs`).
        quiet: do not print the table.
    Returns:
        groups: `Group.row()` per configuration, best first; paired: `paired_test` of the best two, or
        None (one configuration, or no common test images); files: the files written.
    Raises:
        ImgclsError: no completed runs, or an unreadable run folder (see `find_runs`, `group_runs`).
    """
    paths = [Path(path) for path in paths]
    groups = group_runs(find_runs(paths, split), split, ignore)
    paired, note = None, "One configuration only: nothing to test it against."
    if len(groups) > 1:
        try:
            paired = paired_test(groups[0], groups[1], split)
            note = paired["statement"]
        except ImgclsError as error:  # the table is still worth having, e.g. across datasets
            note = f"No paired test of the best two: {error}"
            log.warning(note)
    if not quiet:
        _print_table(groups, split, note)
    files = []
    csv_file, markdown_file = _default_outputs(paths, csv_path, markdown_path)
    if csv_file is not None:
        _write_csv(groups, csv_file)
        files.append(str(csv_file))
    if markdown_file is not None:
        _write_markdown(groups, split, note, markdown_file)
        files.append(str(markdown_file))
    return {"groups": [group.row() for group in groups], "paired": paired, "files": files}
