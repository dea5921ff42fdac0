"""The run report: one self-contained `report.html` that reads a run folder and nothing else.

Everything it shows was written by `imgcls train` (config, environment, curves, splits) and
`imgcls eval` (metrics, per-class table, confusion, error analysis, calibration, explanations); the
report computes nothing new, so it is fast and never disagrees with the files beside it. Figures are
embedded as base64 data URIs and the CSS is inline: the file opens from disk, in any browser, with no
server and no network. A part that is missing (an older run, an evaluation not done yet) becomes a
visible "not available" note that says which command writes it, never an exception.

    path = write_report("runs/fashion-mnist-resnet18")       # runs/.../report.html
    check = render_in_browser(path)                           # headless Chromium: images, console
    screenshot(path, "docs/report.png")                       # a full-page PNG, e.g. for the README

The browser helpers need selenium (`pip install selenium`) and Chromium with its driver
(`apt-get install chromium chromium-driver`); they are imported only when called.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgcls.errors import ImgclsError
from imgcls.tracking import RunFolder

__all__ = ["write_report", "render_in_browser", "screenshot"]

log = logging.getLogger("imgcls")

SPLIT_ORDER = ("train", "val", "test")  # data table columns come in this order, other splits after
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
_BROWSER_HINT = ("rendering the report in a browser needs selenium and Chromium: "
                 "pip install selenium; apt-get install chromium chromium-driver")


# ----------------------------------------------------------------------------------------------------
# reading the run folder: every reader returns None (and records why) rather than raising
# ----------------------------------------------------------------------------------------------------

class _RunReader:
    """Tolerant access to the files of one run folder (their names: `files`, a tracking.RunFolder);
    `problems` collects what could not be read."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.files = RunFolder(run_dir)
        self.problems: list[str] = []

    def text(self, name: str) -> str | None:
        path = self.run_dir / name
        if not path.is_file():
            return None
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            self.problems.append(f"{name}: {error.strerror or error}")
            return None

    def json(self, name: str) -> dict[str, Any] | None:
        text = self.text(name)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            self.problems.append(f"{name} is not valid JSON ({error.msg}, line {error.lineno})")
            return None
        return value if isinstance(value, dict) else None

    def csv(self, name: str) -> list[dict[str, str]] | None:
        text = self.text(name)
        if text is None:
            return None
        try:
            return list(csv.DictReader(text.splitlines()))
        except csv.Error as error:
            self.problems.append(f"{name} is not a readable CSV ({error})")
            return None

    def image(self, name: str) -> str | None:
        """The file as a data URI, or None when it is missing."""
        path = self.run_dir / name
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
        except OSError as error:
            self.problems.append(f"{name}: {error.strerror or error}")
            return None
        kind = _IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream")
        return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"

    def artifact_metadata(self) -> dict[str, Any] | None:
        path = self.files.artifact
        if not path.is_file():
            return None
        from imgcls.checkpoint import load_artifact

        try:
            return load_artifact(path)[1]
        except ImgclsError as error:
            self.problems.append(str(error))
            return None


def _number(value: Any) -> float | None:
    """A float from JSON/CSV values (strings included); None for missing, empty or non-numeric ones."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN reads as missing


def _dict(value: Any) -> dict[str, Any]:
    """`value` when it is a dict, else {}: a file of another shape reads as missing keys, not a crash."""
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The dict items of a list (rows of a table), else []."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _first(*values: Any) -> Any:
    """The first value that is not None (missing keys come in as None)."""
    return next((value for value in values if value is not None), None)


def _eval_hint(run_dir: Path, tag: str) -> str:
    """The command that writes the files of `tag`: the run's own split, or `<dataset>_<split>`."""
    if tag in SPLIT_ORDER:
        return f"imgcls eval {run_dir} --split {tag}"
    return f"imgcls eval {run_dir} --data FOLDER --split SPLIT"


# ----------------------------------------------------------------------------------------------------
# the parts of the report, each a dict the template shows (or a `missing` note)
# ----------------------------------------------------------------------------------------------------

def _choose_tag(run: _RunReader, split: str | None, split_counts: dict[str, dict[str, int]] | None) -> str:
    """The evaluated split to report: as asked, else test, else val (training's own choice)."""
    if split is not None:
        return split
    for candidate in ("test", "val"):
        if (run.run_dir / f"metrics_{candidate}.json").is_file():
            return candidate
    return RunFolder.final_split(split_counts or ())


def _split_counts(rows: list[dict[str, str]] | None, separator: str = "|") -> dict[str, dict[str, int]] | None:
    """{split: {class: images}} from splits.csv rows (path,label,split; multi-label: path,labels,split,
    where an image counts for each of its labels)."""
    if rows is None:
        return None
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        split = row.get("split") or "unsplit"
        if "labels" in row:
            labels = [name for name in (row["labels"] or "").split(separator) if name] or ["(none of the labels)"]
        else:
            labels = [row.get("label") or "?"]
        counts.setdefault(split, {})
        for label in labels:
            counts[split][label] = counts[split].get(label, 0) + 1
    return counts


def _image_totals(rows: list[dict[str, str]] | None) -> dict[str, int]:
    """Images per split of splits.csv."""
    totals: dict[str, int] = {}
    for row in rows or []:
        split = row.get("split") or "unsplit"
        totals[split] = totals.get(split, 0) + 1
    return totals


def _tta_section(tta: Any) -> dict[str, Any] | None:
    """metrics_<tag>.json's `tta` entry (from `imgcls eval --tta`), numbers checked; None without one."""
    if not isinstance(tta, dict):
        return None
    figures = {key: _number(tta.get(key)) for key in ("acc1", "acc5", "balanced_acc", "macro_f1", "loss")}
    views = _number(tta.get("views"))
    return {"mode": str(tta.get("mode", "")), "views": None if views is None else int(views), "flip": tta.get("flip", True),
            **figures}


def _data_section(run: _RunReader, counts: dict[str, dict[str, int]] | None,
                  class_names: list[str] | None, totals: dict[str, int] | None = None) -> dict[str, Any]:
    bad_text = run.text(run.files.bad_images.name)
    bad = [line.split("\t", 1) for line in (bad_text or "").splitlines() if line.strip()]
    section: dict[str, Any] = {
        "bad_images": [(parts[0], parts[1] if len(parts) > 1 else "") for parts in bad],
        "missing": None,
    }
    if counts is None:
        section["missing"] = "splits.csv is not in the run folder (it is written when training starts)"
        return section
    splits = [name for name in SPLIT_ORDER if name in counts] + sorted(set(counts) - set(SPLIT_ORDER))
    labels = {label for split_counts in counts.values() for label in split_counts}
    classes = [name for name in (class_names or []) if name in labels] + sorted(labels - set(class_names or []))
    section["splits"] = splits
    section["rows"] = [(name, [counts[split].get(name, 0) for split in splits]) for name in classes]
    # images, not labels: a multi-label image counts once here and once per label above
    section["totals"] = [totals[split] if totals else sum(counts[split].values()) for split in splits]
    train = counts.get("train") or counts.get(splits[0], {})
    if train and min(train.values()) > 0:
        section["imbalance"] = max(train.values()) / min(train.values())
        section["imbalance_split"] = "train" if "train" in counts else splits[0]
    return section


def _curves_section(run: _RunReader, summary: dict[str, Any], analysis: dict[str, Any] | None) -> dict[str, Any]:
    rows = run.csv(run.files.metrics.name)
    curves = dict(_dict(_dict(analysis).get("curves")))
    if "overfit_epoch" not in curves and rows and "val_loss" in rows[0]:
        from imgcls.analyze import overfitting_epoch

        epochs = [(_number(row.get("epoch")), _number(row.get("val_loss"))) for row in rows]
        epochs = [(int(epoch), loss) for epoch, loss in epochs if epoch is not None and loss is not None]
        if epochs:
            curves["overfit_epoch"] = overfitting_epoch([loss for _, loss in epochs], [epoch for epoch, _ in epochs])
    columns = ["epoch", "train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5", "val_macro_f1", "lr",
               "epoch_seconds", "train_images_per_s"]
    present = [name for name in columns if rows and name in rows[0]]
    return {
        "image": run.image("curves.png"),
        "best_epoch": _first(curves.get("best_epoch"), summary.get("best_epoch")),
        "overfit_epoch": curves.get("overfit_epoch"),
        "overfit_known": "overfit_epoch" in curves,
        "columns": present,
        "rows": [[_number(row.get(name)) for name in present] for row in rows or []],
        "missing_metrics": rows is None,
    }


def _per_class_rows(analysis: dict[str, Any] | None, report_rows: list[dict[str, str]] | None) -> list[dict[str, Any]] | None:
    """class, precision, recall, f1, support, auroc per class, worst F1 first."""
    auroc = _dict(_dict(_dict(analysis).get("auroc")).get("per_class"))  # {class: AUROC}
    source = _dicts(_dict(analysis).get("per_class")) or report_rows
    if not source:
        return None
    rows = [
        {
            "class": str(row.get("class", "?")),
            "precision": _number(row.get("precision")), "recall": _number(row.get("recall")),
            "f1": _number(row.get("f1")), "support": _number(row.get("support")),
            "auroc": _number(_first(row.get("auroc"), auroc.get(str(row.get("class"))))),
        }
        for row in source
    ]
    # worst first; classes without an F1 go last
    return sorted(rows, key=lambda row: (row["f1"] is None, row["f1"] if row["f1"] is not None else 0.0))


def _pairs(analysis: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The most-confused rows; None when the analysis (or its list) is missing, [] when nothing was confused."""
    if not isinstance(_dict(analysis).get("most_confused"), list):
        return None
    rows = _dicts(analysis["most_confused"])
    return [
        {
            "class_a": str(row.get("class_a", "?")), "class_b": str(row.get("class_b", "?")),
            "a_as_b": _number(row.get("a_as_b")), "a_as_b_rate": _number(row.get("a_as_b_rate")),
            "b_as_a": _number(row.get("b_as_a")), "b_as_a_rate": _number(row.get("b_as_a_rate")),
            "total": _number(row.get("total")),
        }
        for row in rows
    ]


def _mistake_rows(rows: Any) -> list[dict[str, Any]]:
    return [
        {
            "path": str(row.get("path", "")), "name": Path(str(row.get("path", ""))).name,
            "true": str(row.get("true", "?")), "predicted": str(row.get("predicted", "?")),
            "confidence": _number(row.get("confidence")), "true_probability": _number(row.get("true_probability")),
            "loss": _number(row.get("loss")),
        }
        for row in _dicts(rows)
    ]


def _calibration(analysis: dict[str, Any] | None, metrics: dict[str, Any] | None,
                 metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """Temperature, NLL/ECE before and after, and the rejection threshold: from the analysis, else
    from metrics_<tag>.json and the artifact (where `predict --reject auto` reads the threshold)."""
    from_analysis = _dict(_dict(analysis).get("calibration"))
    from_artifact = _dict(_dict(metadata).get("calibration"))
    metrics = _dict(metrics)
    before, after = _dict(from_analysis.get("before")), _dict(from_analysis.get("after"))
    calibration = {
        "temperature": _number(_first(from_analysis.get("temperature"), metrics.get("temperature"),
                                      from_artifact.get("temperature"))),
        "fitted_on": _first(from_analysis.get("fitted_on"), from_artifact.get("fitted_on")),
        "bins": int(_number(from_analysis.get("bins")) or 15),
        "nll_before": _number(_first(before.get("nll"), metrics.get("loss"))),
        "ece_before": _number(_first(before.get("ece"), metrics.get("ece"))),
        "nll_after": _number(_first(after.get("nll"), metrics.get("nll_calibrated"))),
        "ece_after": _number(_first(after.get("ece"), metrics.get("ece_calibrated"))),
    }
    reject = _first(from_analysis.get("reject"), from_artifact.get("reject"))
    if isinstance(reject, dict):
        calibration["reject"] = {
            "threshold": _number(reject.get("threshold")), "precision": _number(reject.get("precision")),
            "coverage": _number(reject.get("coverage")), "target_precision": _number(reject.get("target_precision")),
            "reason": reject.get("reason"),
        }
    else:
        calibration["reject"] = None
    measured = ("temperature", "nll_before", "ece_before", "nll_after", "ece_after")
    if all(calibration[key] is None for key in measured) and calibration["reject"] is None:
        return None
    return calibration


def _highlights(tag: str, metrics: dict[str, Any] | None, pairs: list[dict[str, Any]] | None,
                per_class: list[dict[str, Any]] | None, calibration: dict[str, Any] | None,
                curves: dict[str, Any]) -> list[str]:
    """A few sentences a reader can act on, each built from numbers shown in full further down."""
    lines = []
    if metrics and _number(metrics.get("acc1")) is not None:
        lines.append(f"Top-1 accuracy on {tag}: {_number(metrics['acc1']):.1%} of {int(_number(metrics.get('n')) or 0):,} images.")
    if pairs:
        pair = pairs[0]
        lines.append(
            f"Most confused pair: {pair['class_a']} taken for {pair['class_b']} {int(pair['a_as_b'] or 0)} times, "
            f"{pair['class_b']} for {pair['class_a']} {int(pair['b_as_a'] or 0)} times."
        )
    if per_class and per_class[0]["f1"] is not None:
        lines.append(f"Weakest class: {per_class[0]['class']} (F1 {per_class[0]['f1']:.3f}).")
    if calibration and calibration["ece_before"] is not None:
        temperature = calibration["temperature"]
        if temperature not in (None, 1.0) and calibration["ece_after"] is not None:
            lines.append(f"Calibration error (ECE) {calibration['ece_before']:.3f} before and "
                         f"{calibration['ece_after']:.3f} after temperature scaling (T = {temperature:.2f}).")
        else:
            lines.append(f"Calibration error (ECE) {calibration['ece_before']:.3f}; no temperature was fitted.")
    if curves["overfit_epoch"] is not None:
        lines.append(f"Validation loss rises after epoch {curves['overfit_epoch']}: later epochs overfit.")
    return lines


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """env.json as (dotted key, text) rows; lists (the command line) are joined with spaces."""
    if isinstance(value, dict):
        rows = []
        for key, item in value.items():
            rows += _flatten(item, f"{prefix}{key}.")
        return rows
    if isinstance(value, list):
        value = " ".join(str(item) for item in value)
    return [(prefix.rstrip("."), "—" if value is None else str(value))]


def _gather(run_dir: Path, split: str | None) -> dict[str, Any]:
    """Everything the template shows, read from the run folder."""
    run = _RunReader(run_dir)
    summary = run.json(run.files.summary.name) or {}
    metadata = run.artifact_metadata()
    config_text = run.text(run.files.config.name)
    config = _dict(_dict(metadata).get("config"))
    if not config and config_text:
        import yaml

        with contextlib.suppress(yaml.YAMLError):
            config = _dict(yaml.safe_load(config_text))
    class_names = _dict(metadata).get("class_names")
    if not isinstance(class_names, list):
        class_names = None
    split_rows = run.csv(run.files.splits.name)
    counts = _split_counts(split_rows, _dict(config.get("data")).get("label_separator") or "|")
    tag = _choose_tag(run, split, counts)

    metrics = run.json(f"metrics_{tag}.json")
    if metrics is None and isinstance(summary.get(f"{tag}_metrics"), dict):
        metrics = summary[f"{tag}_metrics"]  # training copies the final evaluation here
    analysis = run.json(f"analysis_{tag}.json")
    auroc_macro = _dict(_dict(analysis).get("auroc")).get("macro")
    per_class = _per_class_rows(analysis, run.csv(f"classification_report_{tag}.csv"))
    pairs = _pairs(analysis)
    calibration = _calibration(analysis, metrics, metadata)
    curves = _curves_section(run, summary, analysis)
    errors = _dict(analysis).get("errors")
    model_name = _first(_dict(metadata).get("model_name"), _dict(config.get("model")).get("name"))
    best = _dict(summary.get("best"))
    environment = run.json(run.files.environment.name)
    from imgcls.analyze import CONFIDENT  # the threshold of a "confident error", for the text
    context = {
        "title": f"imgcls report: {run_dir.name}",
        "run_name": run_dir.name, "run_dir": str(run_dir), "tag": tag,
        "hint": _eval_hint(run_dir, tag),
        "summary": {
            "model": model_name, "dataset": _dict(config.get("data")).get("path"),
            "status": summary.get("status"), "error": summary.get("error"),
            "started": summary.get("started"), "ended": summary.get("ended"),
            "train_minutes": _number(summary.get("train_minutes")),
            "best_epoch": _first(curves["best_epoch"], summary.get("best_epoch")),
            "best": [(key, _number(value)) for key, value in best.items()],
            "num_classes": len(class_names) if class_names else None,
        },
        "metrics": None if metrics is None else {
            "acc1": _number(metrics.get("acc1")), "acc5": _number(metrics.get("acc5")),
            "balanced_acc": _number(metrics.get("balanced_acc")), "macro_f1": _number(metrics.get("macro_f1")),
            "auroc_macro": _number(_first(metrics.get("auroc_macro"), auroc_macro)),
            "loss": _number(metrics.get("loss")), "n": _number(metrics.get("n")),
            "tta": _tta_section(metrics.get("tta")),
        },
        "data": _data_section(run, counts, class_names, _image_totals(split_rows)),
        "curves": curves,
        "per_class": per_class,
        "confusion": run.image(f"confusion_{tag}.png"),
        "confusion_normalized": run.image(f"confusion_{tag}_normalized.png"),
        "pairs": pairs,
        "errors": None if not isinstance(errors, dict) else {
            key: _number(errors.get(key)) for key in (
                "n", "errors", "error_rate", "errors_true_in_top5", "errors_true_in_top5_share",
                "confident_errors", "confident_errors_share", "top_k")
        },
        "confident": CONFIDENT,
        "gallery_loss": run.image(f"mistakes_loss_{tag}.png"),
        "gallery_confident": run.image(f"mistakes_confident_{tag}.png"),
        "highest_loss": _mistake_rows((analysis or {}).get("highest_loss")),
        "most_confident": _mistake_rows((analysis or {}).get("most_confident")),
        "calibration": calibration,
        "reliability": run.image(f"reliability_{tag}.png"),
        "gradcam": run.image(f"gradcam_{tag}.png"),
        "activations": run.image(f"activations_{tag}.png"),
        "projection": run.image(f"projection_{tag}.png"),
        "config_text": config_text,
        "environment": _flatten(environment) if environment else None,
    }
    context["highlights"] = _highlights(tag, metrics, pairs, per_class, calibration, curves)
    context["problems"] = run.problems
    context["multi_label"] = _dict(metadata).get("task") == "multi" or "map" in _dict(metrics)
    if context["multi_label"]:
        context.update(_multilabel_sections(run, tag, metrics, analysis, metadata))
        context["highlights"] = _multilabel_highlights(tag, context, curves)
    return context


def _multilabel_sections(run: _RunReader, tag: str, metrics: dict[str, Any] | None, analysis: dict[str, Any] | None,
                         metadata: dict[str, Any] | None) -> dict[str, Any]:
    """What report_multilabel.html.j2 shows instead of the single-label sections."""
    metrics = _dict(metrics)
    figures = {key: _number(metrics.get(key)) for key in ("map", "f1_micro", "f1_macro", "subset_acc", "hamming_loss",
                                                           "loss", "n")}
    half = _dict(metrics.get("at_0.5"))
    tta = _dict(metrics.get("tta"))
    stored = _dict(_dict(_dict(metadata).get("calibration")).get("val_f1_micro"))
    return {
        "metrics": None if not metrics else {
            **figures,
            "at_half": {key: _number(half.get(key)) for key in ("f1_micro", "subset_acc")} if half else None,
            "tta": {"mode": tta.get("mode"), "views": tta.get("views"),
                    **{key: _number(tta.get(key)) for key in ("map", "f1_micro", "f1_macro", "subset_acc", "loss")}}
            if tta else None,
        },
        "per_label": [{"class": row.get("class"), **{key: _number(row.get(key)) for key in
                                                     ("ap", "precision", "recall", "f1", "support", "threshold")}}
                      for row in _dicts(_dict(analysis).get("per_label"))] or None,
        "confused": _dicts(_dict(analysis).get("confused")) if analysis else None,
        "pr_curves": run.image(f"pr_curves_{tag}.png"),
        "cooccurrence": run.image(f"cooccurrence_{tag}.png"),
        "false_positives": run.image(f"false_positives_{tag}.png"),
        "false_negatives": run.image(f"false_negatives_{tag}.png"),
        "calibration_multilabel": {"at_half": _number(stored.get("at_0.5")),
                                   "at_thresholds": _number(stored.get("at_thresholds"))} if stored else None,
    }


def _multilabel_highlights(tag: str, context: dict[str, Any], curves: dict[str, Any]) -> list[str]:
    lines = []
    metrics = context["metrics"]
    if metrics and metrics["map"] is not None:
        lines.append(f"mAP on {tag}: {metrics['map']:.3f} over {int(metrics['n'] or 0):,} images; the whole label set "
                     f"is right on {metrics['subset_acc']:.1%} of them.")
    worst = [row for row in context["per_label"] or [] if row["ap"] is not None]
    if worst:
        lines.append(f"Weakest label: {worst[0]['class']} (AP {worst[0]['ap']:.3f}, F1 {worst[0]['f1']:.3f}).")
    if context["confused"]:
        pair = context["confused"][0]
        lines.append(f"Most often predicted in place of another: {pair.get('predicted_instead')} where "
                     f"{pair.get('missed')} was missed ({pair.get('images')} images).")
    if curves["overfit_epoch"] is not None:
        lines.append(f"Validation loss rises after epoch {curves['overfit_epoch']}: later epochs overfit.")
    return lines


# ----------------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------------

def _percent(value: Any, digits: int = 1) -> str:
    number = _number(value)
    return "—" if number is None else f"{number * 100:.{digits}f}%"


def _fixed(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.{digits}f}"


def _count(value: Any) -> str:
    number = _number(value)
    return "—" if number is None else f"{int(round(number)):,}"


def _general(value: Any) -> str:
    """Epoch-table cells: whole numbers as such, small ones (learning rates) in scientific notation."""
    number = _number(value)
    if number is None:
        return "—"
    if number.is_integer() and abs(number) < 1e9:
        return str(int(number))
    return f"{number:.2e}" if abs(number) < 1e-3 else f"{number:.4g}"


def _render(context: dict[str, Any]) -> str:
    import jinja2

    # templates/report.html.j2, shipped as package data
    environment = jinja2.Environment(loader=jinja2.PackageLoader("imgcls", "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=False, lstrip_blocks=False)
    environment.filters.update(percent=_percent, fixed=_fixed, count=_count, general=_general)
    template = "report_multilabel.html.j2" if context.get("multi_label") else "report.html.j2"
    return environment.get_template(template).render(**context)


def write_report(run_dir: str | Path, split: str | None = None, path: str | Path | None = None) -> Path:
    """Write one self-contained HTML report of a run folder.

    Args:
        run_dir: the run folder (what `imgcls train` created).
        split: the evaluated split (tag) to report: "test", "val", or "<dataset>_<split>" for an
            evaluation on other data. Default: test, or val for a run without a test split.
        path: where to write; default `<run_dir>/report.html`.

    Returns:
        The path of the report.

    Raises:
        ImgclsError: `run_dir` is not a folder. Missing or unreadable files inside it never raise:
            their sections say "not available" and which command writes them.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ImgclsError(f"run folder not found: {run_dir}; give a folder that `imgcls train` created")
    context = _gather(run_dir, split)
    html = _render(context)
    target = Path(path) if path is not None else run_dir / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    from imgcls.checkpoint import atomic_write

    atomic_write(target, html.encode("utf-8"))  # a browser reloading it never sees half a file
    tag = context["tag"]
    absent = [name for name in (f"metrics_{tag}.json", f"analysis_{tag}.json") if not (run_dir / name).is_file()]
    if absent:
        log.warning(f"report: no {' or '.join(absent)} in {run_dir}; those sections say 'not available' "
                    f"(run `{context['hint']}` first)")
    return target


# ----------------------------------------------------------------------------------------------------
# headless Chromium: the check the tests run, and screenshots for the docs
# ----------------------------------------------------------------------------------------------------

def _executable(variable: str, defaults: tuple[str, ...]) -> str | None:
    """An executable from an environment variable, else the first of `defaults` found (path or PATH name)."""
    if os.environ.get(variable):
        chosen = os.environ[variable]
        return chosen if os.access(chosen, os.X_OK) else None
    for candidate in defaults:
        found = candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else shutil.which(candidate)
        if found:
            return found
    return None


@contextlib.contextmanager
def _chromium(width: int = 1200, height: int = 900) -> Iterator[Any]:
    """A headless Chromium driven by selenium through the system chromedriver (no downloads).

    IMGCLS_CHROMIUM and IMGCLS_CHROMEDRIVER override where the two executables are looked for.
    """
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        raise ImgclsError(_BROWSER_HINT) from error
    browser = _executable("IMGCLS_CHROMIUM", ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"))
    driver_path = _executable("IMGCLS_CHROMEDRIVER", ("/usr/bin/chromedriver", "chromedriver"))
    if browser is None or driver_path is None:
        missing = "chromium" if browser is None else "chromedriver"
        raise ImgclsError(f"{_BROWSER_HINT} ({missing} not found; IMGCLS_CHROMIUM and IMGCLS_CHROMEDRIVER "
                          "name other executables)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--hide-scrollbars", f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages for get_log
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as error:
        message = (error.msg or str(error)).strip().splitlines()[0]
        raise ImgclsError(f"cannot start headless Chromium ({browser} with {driver_path}): {message}; "
                          "chromium and chromium-driver must be the same version") from error
    try:
        yield driver
    finally:
        driver.quit()


def _url(path: Path) -> str:
    return path.resolve().as_uri()


_IMAGES_SCRIPT = """
return Array.from(document.images).map(image => ({
  alt: image.alt, complete: image.complete, width: image.naturalWidth, height: image.naturalHeight,
  data_uri: image.getAttribute('src') !== null && image.getAttribute('src').startsWith('data:')
}));
"""


def _save_full_page(driver: Any, out_png: Path, width: int, max_height: int) -> None:
    """Grow the window to the page's height and save what it shows."""
    height = min(int(driver.execute_script("return document.documentElement.scrollHeight")), max_height)
    driver.set_window_size(width, height)
    # the window's height counts more than the viewport in some Chromium builds: grow it by the difference
    viewport = int(driver.execute_script("return window.innerHeight"))
    if viewport < height:
        driver.set_window_size(width, 2 * height - viewport)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(out_png)):
        raise ImgclsError(f"headless Chromium could not write the screenshot {out_png}")


def render_in_browser(path: str | Path, screenshot_png: str | Path | None = None, width: int = 1200,
                      max_height: int = 16000) -> dict[str, Any]:
    """Open an HTML file in headless Chromium and report what a reader would see break.

    Args:
        path: the report (a file; opened through a file:// URL, as a user opening it from disk).
        screenshot_png: also save a full-page screenshot here (after the checks).
        width: window width in CSS pixels.
        max_height: a screenshot stops here (Chromium cannot grab arbitrarily tall windows).

    Returns:
        {"ready_state": document.readyState, "title", "images": number of <img>, "broken_images":
        alt texts of images not loaded (not complete, or naturalWidth 0), "external_images": alt
        texts of images not embedded as data: URIs, "console_errors": SEVERE console messages,
        "sections": ids of the <section> elements, "height": page height in CSS pixels,
        "screenshot": the PNG path or None}.

    Raises:
        ImgclsError: selenium, Chromium or chromedriver missing, the browser does not start, or the
            screenshot cannot be written.
    """
    path = Path(path)
    if not path.is_file():
        raise ImgclsError(f"no such file: {path}")
    with _chromium(width) as driver:
        driver.get(_url(path))  # returns after the load event: every embedded image is decoded by then
        images = driver.execute_script(_IMAGES_SCRIPT)
        result = {
            "ready_state": driver.execute_script("return document.readyState"),
            "title": driver.title,
            "images": len(images),
            "broken_images": [image["alt"] for image in images if not image["complete"] or image["width"] == 0],
            "external_images": [image["alt"] for image in images if not image["data_uri"]],
            "console_errors": [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"],
            "sections": driver.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id)"),
            "height": driver.execute_script("return document.documentElement.scrollHeight"),
            "screenshot": None,
        }
        if screenshot_png is not None:
            _save_full_page(driver, Path(screenshot_png), width, max_height)
            result["screenshot"] = Path(screenshot_png)
    return result


def screenshot(path: str | Path, out_png: str | Path, width: int = 1200, max_height: int = 16000) -> Path:
    """A full-page PNG of an HTML file as headless Chromium renders it (see `render_in_browser`).

    Returns:
        `out_png`.

    Raises:
        ImgclsError: the browser is missing or the capture failed.
    """
    return render_in_browser(path, out_png, width, max_height)["screenshot"]
