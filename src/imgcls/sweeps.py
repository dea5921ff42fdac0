"""Honest model selection: many runs instead of one lucky one.

- `sweep`: a config times a grid of values (`optim.lr=1e-3,3e-4`) times seeds;
- `cross_validate`: stratified k-fold, one run per fold, and out-of-fold predictions;
- `tune`: hyper-parameter search with Optuna (TPE, median pruning), the study in SQLite.

Every run is a normal run folder inside the sweep's folder (`runs/sweeps/NAME/`, `runs/cv/NAME/`,
`runs/tune/NAME/`), so `imgcls eval`, `report` and `compare` work on each. Doing it again resumes:
finished runs are kept, interrupted ones continue from their last checkpoint (imgcls.runner runs them,
in this process or, with `jobs` > 1, in parallel processes).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from imgcls.config import Config, load_config, save_config, valid_keys
from imgcls.errors import ImgclsError
from imgcls.runner import PlannedRun, run_all, start_process, worker_slots
from imgcls.tracking import console_level, create_run_dir, read_summary, setup_logging

__all__ = ["parse_grid", "plan_sweep", "sweep", "cross_validate", "tune", "load_search_space"]

log = logging.getLogger("imgcls")

DEFAULT_SEARCH_SPACE = {
    "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "optim.weight_decay": {"low": 1e-3, "high": 0.2, "log": True},
    "loss.label_smoothing": {"low": 0.0, "high": 0.2},
    "data.augment": ["none", "light", "standard"],
}


# ----------------------------------------------------------------------------------------------------
# sweep: config x grid x seeds


def parse_grid(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split `key=value` overrides into fixed ones and grid axes (`key=a,b,c`, as Hydra's multirun).
    A bracketed value (`[1,2]`) is one list value, not an axis."""
    fixed, grid = [], {}
    for override in overrides:
        key, _, value = override.partition("=")
        if "," in value and not value.strip().startswith(("[", "{")):
            grid[key] = [part.strip() for part in value.split(",") if part.strip()]
        else:
            fixed.append(override)
    return fixed, grid


def _value_label(value: str) -> str:
    return value.replace("/", "-").replace(" ", "")


def plan_sweep(grid: dict[str, list[str]], seeds: list[int]) -> list[PlannedRun]:
    """One run per (grid combination, seed), named by its values: `optim.lr=0.001_seed=42`."""
    runs = []
    for values in itertools.product(*grid.values()) if grid else [()]:
        pairs = [f"{key}={value}" for key, value in zip(grid, values)]
        label = "_".join(f"{key}={_value_label(value)}" for key, value in zip(grid, values))
        for seed in seeds:
            runs.append(PlannedRun(f"{label}_seed={seed}" if label else f"seed={seed}", [*pairs, f"seed={seed}"]))
    return runs


def _open_folder(kind: str, resume: str | Path | None, name: str | None, default_name: str, root: str,
                 plan: dict[str, Any]) -> Path:
    """The sweep's folder: a new one (with plan.json), or an existing one to resume, which must hold
    the same plan (resuming with other settings would mix two experiments in one table)."""
    if resume is not None:
        folder = Path(resume)
        if not (folder / "plan.json").is_file():
            raise ImgclsError(f"cannot resume {folder}: no plan.json there (is it an imgcls {kind} folder?)")
        return folder
    if name is not None and (Path(root) / kind / name / "plan.json").is_file():
        folder = Path(root) / kind / name
        stored = json.loads((folder / "plan.json").read_text())
        if stored != json.loads(json.dumps(plan)):
            raise ImgclsError(f"{folder} holds a different {kind}; choose another --name, or resume it with "
                              f"--resume {folder}")
        return folder
    folder = create_run_dir(Path(root) / kind, name, default_name)
    (folder / "plan.json").write_text(json.dumps(plan, indent=2))
    return folder


def sweep(config_file: str | None, overrides: list[str], seeds: list[int], name: str | None = None,
          jobs: int = 1, resume: str | Path | None = None, verbose: bool = False) -> Path:
    """Train the base config (file + fixed overrides) for every grid combination and seed, then
    compare the configurations. Returns the sweep folder.

    Raises:
        ImgclsError: a bad config or grid value (checked for every combination before any training).
    """
    if resume is not None:
        plan = json.loads((Path(resume) / "plan.json").read_text()) if (Path(resume) / "plan.json").is_file() else {}
    else:
        fixed, grid = parse_grid(overrides)
        plan = {"config": str(Path(config_file).resolve()) if config_file else None, "overrides": fixed,
                "grid": grid, "seeds": seeds}
    base_config = load_config(plan.get("config"), plan.get("overrides", []))
    runs = plan_sweep(plan.get("grid", {}), plan.get("seeds", []))
    for run in runs:  # every combination must be a valid config before hours of training start
        load_config(plan.get("config"), [*plan.get("overrides", []), *run.overrides])
    default_name = f"{Path(base_config.data.path or 'data').name}-{base_config.model.name}"
    folder = _open_folder("sweeps", resume, name, default_name, base_config.run.dir, plan)
    setup_logging(folder)
    base = folder / "base.yaml"
    save_config(base_config, base)
    log.info(f"sweep {folder}: {len(runs)} runs ({len(runs) // max(1, len(plan['seeds']))} configurations x "
             f"{len(plan['seeds'])} seeds)")
    statuses = run_all(base, folder, runs, jobs, verbose)
    _report_statuses(statuses)
    from imgcls.comparison import compare

    compare([folder])
    return folder


def _report_statuses(statuses: dict[str, str]) -> None:
    unfinished = {name: status for name, status in statuses.items() if status != "completed"}
    if unfinished:
        log.warning(f"{len(unfinished)} runs did not complete: "
                    + ", ".join(f"{name} ({status})" for name, status in list(unfinished.items())[:5])
                    + "; run the same command again to retry them")


# ----------------------------------------------------------------------------------------------------
# cross-validation


def _write_fold_manifests(config: Config, folds: int, folder: Path) -> list[Path]:
    """One manifest per fold (path,label[s],split): that fold is val, the other folds train, and the
    data's test split (kept out of every fold) is test. Stratified (multi-label data: iterative
    stratification), seeded by `data.split_seed`."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    from imgcls.data import assign_splits, resolve_source, write_splits_csv
    from imgcls.data.sources import DataSource, as_task, label_matrix

    source = as_task(resolve_source(config.data.path, config.data.label_separator), config.task)
    source = assign_splits(source, config.data.val_fraction, config.data.test_fraction, config.data.split_seed)
    pool = source.splits["train"] + source.splits.get("val", [])
    if source.multi_label:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        labels = label_matrix(pool, source.class_names)
        counts = labels.sum(axis=0)
        splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=config.data.split_seed)
    else:
        labels = np.array([label for _, label in pool])
        counts = np.unique(labels, return_counts=True)[1]
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.data.split_seed)
    if min(counts) < folds:
        raise ImgclsError(f"--folds {folds}: a class has only {min(counts)} training images; use --folds "
                          f"{max(2, min(counts))} or fewer")
    manifests = []
    (folder / "folds").mkdir(exist_ok=True)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(pool)), labels), start=1):
        held = set(held_out.tolist())
        splits = {"train": [sample for index, sample in enumerate(pool) if index not in held],
                  "val": [sample for index, sample in enumerate(pool) if index in held],
                  **({"test": source.splits["test"]} if source.splits.get("test") else {})}
        path = folder / "folds" / f"fold-{fold}.csv"
        write_splits_csv(DataSource(source.name, splits, multi_label=source.multi_label), path,
                         config.data.label_separator)
        manifests.append(path)
    return manifests


def cross_validate(data: str, config_file: str | None, overrides: list[str], folds: int = 5, name: str | None = None,
                   jobs: int = 1, resume: str | Path | None = None, verbose: bool = False) -> Path:
    """Stratified k-fold cross-validation: a run per fold (trained on the other folds, validated on
    its own), mean ± std over folds, and `oof_predictions.csv`: every training image predicted by the
    model that did not train on it (for label-error detection). Returns the cv folder.

    Raises:
        ImgclsError: fewer than 2 folds, or a class with fewer images than folds.
    """
    if folds < 2:
        raise ImgclsError(f"--folds {folds}: cross-validation needs at least 2 folds")
    plan = {"config": str(Path(config_file).resolve()) if config_file else None,
            "overrides": [f"data.path={data}", *overrides], "folds": folds}
    if resume is not None and (Path(resume) / "plan.json").is_file():
        plan = json.loads((Path(resume) / "plan.json").read_text())
    config = load_config(plan["config"], plan["overrides"])
    folder = _open_folder("cv", resume, name, f"{Path(config.data.path).name}-{config.model.name}",
                          config.run.dir, plan)
    setup_logging(folder)
    manifests = _write_fold_manifests(config, plan["folds"], folder)
    base = folder / "base.yaml"
    save_config(config, base)
    runs = [PlannedRun(f"fold-{fold}", [f"data.path={manifest}"]) for fold, manifest in enumerate(manifests, start=1)]
    log.info(f"cross-validation {folder}: {len(runs)} folds")
    statuses = run_all(base, folder, runs, jobs, verbose)
    _report_statuses(statuses)
    finished = [run.name for run in runs if statuses[run.name] == "completed"]
    if len(finished) < len(runs):
        raise ImgclsError(f"{len(runs) - len(finished)} folds did not complete; run the same command again "
                          f"(or --resume {folder}) to finish them")
    _summarise_folds(folder, finished)
    return folder


def _summarise_folds(folder: Path, fold_names: list[str]) -> dict[str, Any]:
    """oof_predictions.csv and cv_summary.json: per fold and mean ± std of val (the held-out fold) and
    test metrics."""
    import numpy as np

    from imgcls.evaluation import predict_split
    from imgcls.prediction import load

    rows, per_fold = [], []
    for fold, name in enumerate(fold_names, start=1):
        classifier = load(folder / name)
        task, names, decision = classifier.task, classifier.class_names, classifier.decision()
        dataset, logits, labels, _, _ = predict_split(classifier, folder / name, "val", None, 256)
        # the model's own probabilities, not temperature-scaled
        probabilities = task.probabilities(logits.numpy())
        right = task.right(probabilities, labels.numpy(), decision)
        answers = task.answers(probabilities, names, 1, decision)
        for path, target, probability, answer, correct in zip(dataset.paths, labels, probabilities.tolist(), answers, right):
            predicted = answer.get("labels", answer.get("label"))
            rows.append([path, task.describe(target, names), fold, predicted,
                         f"{answer['confidence']:.6f}" if "confidence" in answer else "", int(correct),
                         *(f"{value:.6f}" for value in probability)])
        summary = read_summary(folder / name)
        figures = task.metrics(logits, labels, decision)
        per_fold.append({"fold": fold, "run": name, **{f"val_{k}": v for k, v in figures.items()},
                         **{f"test_{k}": v for k, v in (summary.get("test_metrics") or {}).items()
                            if isinstance(v, (int, float))}})
    with open(folder / "oof_predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "fold", "predicted", "confidence", "correct", *(f"prob_{n}" for n in names)])
        writer.writerows(rows)
    keys = [key for key in per_fold[0] if key not in ("fold", "run") and isinstance(per_fold[0][key], (int, float))]
    statistics = {key: {"mean": float(np.mean([f[key] for f in per_fold])),
                        "std": float(np.std([f[key] for f in per_fold], ddof=1)) if len(per_fold) > 1 else None}
                  for key in keys if all(key in f for f in per_fold)}
    result = {"folds": per_fold, "mean_std": statistics, "oof_accuracy": float(np.mean([row[5] for row in rows])),
              "oof_images": len(rows)}
    (folder / "cv_summary.json").write_text(json.dumps(result, indent=2))
    _print_cv(result)
    return result


def _print_cv(result: dict[str, Any]) -> None:
    statistics = result["mean_std"]
    for key in ("val_acc1", "val_macro_f1", "test_acc1", "test_macro_f1", "test_ece",  # single-label
                "val_map", "val_f1_micro", "test_map", "test_f1_micro", "test_subset_acc"):  # multi-label
        if key in statistics:
            spread = statistics[key]["std"]
            log.info(f"{key:14s} {statistics[key]['mean']:.4f} ± {spread:.4f}" if spread is not None
                     else f"{key:14s} {statistics[key]['mean']:.4f}")
    log.info(f"out-of-fold accuracy (multi-label: the whole label set) {result['oof_accuracy']:.4f} on {result['oof_images']} training images "
             "(oof_predictions.csv)")


# ----------------------------------------------------------------------------------------------------
# tune: Optuna


def load_search_space(path: str | None) -> dict[str, Any]:
    """A YAML mapping of config keys to ranges: `{low, high[, log][, step]}` (ints when low and high
    are integers) or a list of choices. None: `DEFAULT_SEARCH_SPACE`.

    Raises:
        ImgclsError: unreadable file, unknown config key, or a range without low/high.
    """
    if path is None:
        return dict(DEFAULT_SEARCH_SPACE)
    try:
        space = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ImgclsError(f"cannot read search space {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(space, dict) or not space:
        raise ImgclsError(f"search space {path} must map config keys to ranges, e.g. 'optim.lr: {{low: 1e-4, high: 1e-2, log: true}}'")
    keys = valid_keys()
    for key, spec in space.items():
        if key not in keys:
            from imgcls.config import _closest

            raise ImgclsError(f"search space {path}: unknown config key '{key}'{_closest(key)}")
        if not isinstance(spec, list) and not (isinstance(spec, dict) and {"low", "high"} <= set(spec)):
            raise ImgclsError(f"search space {path}: '{key}' needs a list of choices or {{low, high}}")
    return space


def _suggest(trial, key: str, spec: Any) -> Any:
    if isinstance(spec, list):
        return trial.suggest_categorical(key, spec)
    low, high = spec["low"], spec["high"]
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(key, low, high, step=spec.get("step", 1), log=bool(spec.get("log", False)))
    return trial.suggest_float(key, float(low), float(high), log=bool(spec.get("log", False)),
                               step=spec.get("step"))


def _objective(base: Path, folder: Path, fixed: list[str], space: dict[str, Any], monitor: str, verbose: bool = False):
    import optuna

    from imgcls.training import RunStopped, train

    def objective(trial: optuna.Trial) -> float:
        values = {key: _suggest(trial, key, spec) for key, spec in space.items()}
        overrides = [*fixed, *(f"{key}={value}" for key, value in values.items()),
                     f"run.dir={folder}", f"run.name=trial-{trial.number:03d}"]

        def report(epoch: int, row: dict[str, float]) -> None:
            trial.report(row[monitor], epoch)
            if trial.should_prune():
                raise RunStopped(f"pruned by Optuna at epoch {epoch} ({monitor} {row[monitor]:.4f})")

        try:
            with console_level(logging.NOTSET if verbose else logging.WARNING):
                run = train(load_config(base, overrides), force=True, on_epoch=report)
        except RunStopped:
            raise optuna.TrialPruned() from None
        finally:
            setup_logging(folder)  # back to the tune folder's log.txt
        best = read_summary(run)["best"][monitor]
        if best is None or not math.isfinite(best):
            raise optuna.TrialPruned()  # diverged: nothing to learn from its value
        return best

    return objective


def _resolved_monitor(config: Config) -> str:
    """train.monitor, with `auto` decided by the data as training will (val_acc1; val_map when multi-label)."""
    if config.train.monitor != "auto":
        return config.train.monitor
    from imgcls.data import resolve_source
    from imgcls.data.sources import as_task
    from imgcls.training import resolve_task

    source = as_task(resolve_source(config.data.path, config.data.label_separator), config.task)
    return resolve_task(config, source).train.monitor


def tune(data: str | None, config_file: str | None, overrides: list[str], trials: int, space_file: str | None = None,
         name: str | None = None, jobs: int = 1, resume: str | Path | None = None, verbose: bool = False,
         worker: tuple[int, int] = (0, 1)) -> Path:
    """Search hyper-parameters with Optuna: TPE sampling, median pruning on the per-epoch validation
    metric (`train.monitor`), the study in `study.db` (SQLite) in the tune folder, so running again
    resumes it. Writes `best_config.yaml` (for `imgcls train -c`) and `trials.csv`. Returns the folder.
    `worker` = (index, count) of a process started by `jobs` > 1: its sampler seed and share of trials.

    Raises:
        ImgclsError: optuna missing, a bad search space, or no trial completed.
    """
    try:
        import optuna
    except ImportError:
        raise ImgclsError("imgcls tune needs Optuna: pip install optuna (or pip install 'imgcls[tune]')") from None
    if resume is not None and (Path(resume) / "plan.json").is_file():
        plan = json.loads((Path(resume) / "plan.json").read_text())
    else:
        plan = {"config": str(Path(config_file).resolve()) if config_file else None,
                "overrides": ([f"data.path={data}"] if data else []) + list(overrides),
                "space": load_search_space(space_file), "trials": trials}
    config = load_config(plan["config"], plan["overrides"])
    folder = _open_folder("tune", resume, name, f"{Path(config.data.path or 'data').name}-{config.model.name}",
                          config.run.dir, plan)
    setup_logging(folder)
    base = folder / "base.yaml"
    save_config(config, base)
    monitor = _resolved_monitor(config)
    study = optuna.create_study(
        storage=f"sqlite:///{folder.resolve() / 'study.db'}", study_name="imgcls", load_if_exists=True,
        direction="minimize" if monitor.endswith("loss") else "maximize",
        # each parallel worker its own seed: the same one would suggest the same parameters in every worker
        sampler=optuna.samplers.TPESampler(seed=config.seed + worker[0]),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
    )
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    stop_at_total = optuna.study.MaxTrialsCallback(plan["trials"], states=finished_states)
    log.info(f"tune {folder}: {plan['trials']} trials, {monitor}, study in {folder / 'study.db'}")
    if jobs > 1:
        _tune_in_parallel(folder, jobs)
    else:
        remaining = plan["trials"] - sum(trial.state in finished_states for trial in study.trials)
        remaining = math.ceil(remaining / worker[1])  # a parallel worker's share
        if remaining > 0:  # the callback stops parallel workers at the total; this never starts a surplus trial
            study.optimize(_objective(base, folder, [], plan["space"], monitor, verbose), n_trials=remaining,
                           callbacks=[stop_at_total], catch=(ImgclsError,))
        else:
            log.info(f"all {plan['trials']} trials are done")
    return _finish_tune(folder, config, plan, study, monitor)


def _tune_in_parallel(folder: Path, jobs: int) -> None:
    """`jobs` worker processes on the one SQLite study, each on its own cores (`imgcls tune --resume`)."""
    processes = []
    (folder / "logs").mkdir(exist_ok=True)
    for slot_index, slot in enumerate(worker_slots(jobs)):
        command = [sys.executable, "-m", "imgcls", "tune", "--resume", str(folder), "--worker", f"{slot_index}/{jobs}"]
        processes.append(start_process(command, slot, folder / "logs" / f"worker-{slot_index + 1}.txt"))
    try:
        for process in processes:
            process.wait()
    finally:
        for process in processes:
            process.terminate()


def _finish_tune(folder: Path, config: Config, plan: dict[str, Any], study, monitor: str) -> Path:
    import optuna

    study = optuna.load_study(storage=f"sqlite:///{folder.resolve() / 'study.db'}", study_name="imgcls")
    with open(folder / "trials.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", monitor, "last_epoch", *plan["space"]])
        for trial in study.trials:
            last = max(trial.intermediate_values) if trial.intermediate_values else ""
            writer.writerow([trial.number, trial.state.name, trial.value if trial.value is not None else "", last,
                             *(trial.params.get(key, "") for key in plan["space"])])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ImgclsError(f"no trial of {folder} completed; see trials.csv and the trial folders' log.txt")
    counts = {state: sum(t.state.name == state for t in study.trials) for state in ("COMPLETE", "PRUNED", "FAIL")}
    best = study.best_trial
    best_config = load_config(plan["config"], [*plan["overrides"], *(f"{k}={v}" for k, v in best.params.items()),
                                               "run.name=null"])
    save_config(best_config, folder / "best_config.yaml")
    log.info(f"{counts['COMPLETE']} trials completed, {counts['PRUNED']} pruned, {counts['FAIL']} failed; best: "
             f"trial {best.number} {monitor} {best.value:.4f} with "
             + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()))
    log.info(f"train it: imgcls train -c {folder / 'best_config.yaml'}")
    return folder
