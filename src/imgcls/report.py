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

__all__ = ["write_report", "render_in_browser", "screenshot"]

log = logging.getLogger("imgcls")

SPLIT_ORDER = ("train", "val", "test")  # data table columns come in this order, other splits after
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
_BROWSER_HINT = ("rendering the report in a browser needs selenium and Chromium: "
                 "pip install selenium; apt-get install chromium chromium-driver")


# ----------------------------------------------------------------------------------------------------
# reading the run folder: every reader returns None (and records why) rather than raising
# ----------------------------------------------------------------------------------------------------

class _RunFolder:
    """Tolerant access to the files of one run folder; `problems` collects what could not be read."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
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
        path = self.run_dir / "checkpoints" / "model.safetensors"
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

def _choose_tag(run: _RunFolder, split: str | None, split_counts: dict[str, dict[str, int]] | None) -> str:
    """The evaluated split to report: as asked, else test, else val (train.py's own choice)."""
    if split is not None:
        return split
    for candidate in ("test", "val"):
        if (run.run_dir / f"metrics_{candidate}.json").is_file():
            return candidate
    if split_counts is not None and "test" not in split_counts and "val" in split_counts:
        return "val"
    return "test"


def _split_counts(rows: list[dict[str, str]] | None) -> dict[str, dict[str, int]] | None:
    """{split: {class: images}} from splits.csv rows (path,label,split)."""
    if rows is None:
        return None
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        split, label = row.get("split") or "unsplit", row.get("label") or "?"
        counts.setdefault(split, {})
        counts[split][label] = counts[split].get(label, 0) + 1
    return counts


def _tta_section(tta: Any) -> dict[str, Any] | None:
    """metrics_<tag>.json's `tta` entry (from `imgcls eval --tta`), numbers checked; None without one."""
    if not isinstance(tta, dict):
        return None
    figures = {key: _number(tta.get(key)) for key in ("acc1", "acc5", "balanced_acc", "macro_f1", "loss")}
    views = _number(tta.get("views"))
    return {"mode": str(tta.get("mode", "")), "views": None if views is None else int(views), "flip": tta.get("flip", True),
            **figures}


def _data_section(run: _RunFolder, counts: dict[str, dict[str, int]] | None,
                  class_names: list[str] | None) -> dict[str, Any]:
    bad_text = run.text("bad_images.txt")
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
    section["totals"] = [sum(counts[split].values()) for split in splits]
    train = counts.get("train") or counts.get(splits[0], {})
    if train and min(train.values()) > 0:
        section["imbalance"] = max(train.values()) / min(train.values())
        section["imbalance_split"] = "train" if "train" in counts else splits[0]
    return section


def _curves_section(run: _RunFolder, summary: dict[str, Any], analysis: dict[str, Any] | None) -> dict[str, Any]:
    rows = run.csv("metrics.csv")
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
    run = _RunFolder(run_dir)
    summary = run.json("summary.json") or {}
    metadata = run.artifact_metadata()
    config_text = run.text("config.yaml")
    config = _dict(_dict(metadata).get("config"))
    if not config and config_text:
        import yaml

        with contextlib.suppress(yaml.YAMLError):
            config = _dict(yaml.safe_load(config_text))
    class_names = _dict(metadata).get("class_names")
    if not isinstance(class_names, list):
        class_names = None
    counts = _split_counts(run.csv("splits.csv"))
    tag = _choose_tag(run, split, counts)

    metrics = run.json(f"metrics_{tag}.json")
    if metrics is None and isinstance(summary.get(f"{tag}_metrics"), dict):
        metrics = summary[f"{tag}_metrics"]  # train.py copies the final evaluation here
    analysis = run.json(f"analysis_{tag}.json")
    auroc_macro = _dict(_dict(analysis).get("auroc")).get("macro")
    per_class = _per_class_rows(analysis, run.csv(f"classification_report_{tag}.csv"))
    pairs = _pairs(analysis)
    calibration = _calibration(analysis, metrics, metadata)
    curves = _curves_section(run, summary, analysis)
    errors = _dict(analysis).get("errors")
    model_name = _first(_dict(metadata).get("model_name"), _dict(config.get("model")).get("name"))
    best = _dict(summary.get("best"))
    environment = run.json("env.json")
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
        "data": _data_section(run, counts, class_names),
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
    return context


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


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="imgcls">
<link rel="icon" href="data:,">
<title>{{ title }}</title>
<style>
  :root { --rule: #d6d9de; --muted: #5f6670; --accent: #1f5fa8; --note: #fff6e0; --note-rule: #e6c56b; }
  * { box-sizing: border-box; }
  body { margin: 0; background: #fff; color: #1b1e23;
         font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
  main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 64px; }
  h1 { font-size: 1.7rem; margin: 0 0 4px; }
  h2 { font-size: 1.3rem; margin: 40px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--rule); }
  h3 { font-size: 1.05rem; margin: 22px 0 6px; }
  p { margin: 6px 0 10px; }
  a { color: var(--accent); }
  code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 0.88em; }
  pre { background: #f6f7f9; border: 1px solid var(--rule); padding: 10px 12px; overflow-x: auto; white-space: pre-wrap; }
  .subtitle, .muted, figcaption { color: var(--muted); }
  nav.toc { border: 1px solid var(--rule); padding: 8px 14px; margin: 16px 0 8px; }
  nav.toc ol { margin: 4px 0; padding-left: 22px; columns: 3; }
  table { border-collapse: collapse; margin: 8px 0 14px; font-variant-numeric: tabular-nums; }
  th, td { padding: 4px 10px; border-bottom: 1px solid var(--rule); text-align: right; vertical-align: top; }
  th { border-bottom: 1.5px solid #8a9099; font-weight: 600; }
  th.text, td.text { text-align: left; }
  tr.total td { border-top: 1.5px solid #8a9099; font-weight: 600; }
  table.keyvalue td:first-child { text-align: left; color: var(--muted); }
  table.keyvalue td { text-align: left; }
  .cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0; }
  .card { border: 1px solid var(--rule); padding: 8px 14px; min-width: 128px; }
  .card .value { font-size: 1.35rem; font-weight: 600; }
  .card .label { color: var(--muted); font-size: 0.85rem; }
  .missing { background: var(--note); border-left: 4px solid var(--note-rule); padding: 8px 12px; }
  figure { margin: 12px 0 20px; break-inside: avoid; page-break-inside: avoid; }
  figure img { max-width: 100%; height: auto; border: 1px solid var(--rule); }
  details { margin: 6px 0 14px; }
  summary { cursor: pointer; color: var(--accent); }
  ul.highlights li { margin: 2px 0; }
  @media print {
    main { max-width: none; padding: 0; }
    nav.toc, details { display: none; }
    h2 { break-after: avoid; page-break-after: avoid; }
    a { color: inherit; text-decoration: none; }
  }
</style>
</head>
<body>
<main>
{%- macro missing(what, fix=None) -%}
<p class="missing">Not available: {{ what }}.{% if fix %} Run <code>{{ fix }}</code> to write it.{% endif %}</p>
{%- endmacro %}
{%- macro figure(image, alt, caption, fix) -%}
{% if image %}<figure><img src="{{ image }}" alt="{{ alt }}"><figcaption>{{ caption }}</figcaption></figure>
{% else %}{{ missing(alt ~ " (no image in the run folder)", fix) }}{% endif %}
{%- endmacro %}
{%- macro mistakes_table(rows) -%}
<table><tr><th class="text">file</th><th class="text">true</th><th class="text">predicted</th><th>confidence</th><th>p(true)</th><th>loss</th></tr>
{% for row in rows %}<tr><td class="text" title="{{ row.path }}"><code>{{ row.name }}</code></td><td class="text">{{ row.true }}</td><td class="text">{{ row.predicted }}</td><td>{{ row.confidence | fixed(3) }}</td><td>{{ row.true_probability | fixed(3) }}</td><td>{{ row.loss | fixed(3) }}</td></tr>
{% endfor %}</table>
{%- endmacro %}

<h1>{{ title }}</h1>
<p class="subtitle">Run folder <code>{{ run_dir }}</code>; evaluated split <strong>{{ tag }}</strong>.</p>

<nav class="toc"><strong>Contents</strong>
<ol>
  <li><a href="#summary">Summary</a></li>
  <li><a href="#data">Data</a></li>
  <li><a href="#curves">Training curves</a></li>
  <li><a href="#per-class">Per-class results</a></li>
  <li><a href="#confusion">Confusion matrix</a></li>
  <li><a href="#most-confused">Most-confused pairs</a></li>
  <li><a href="#errors">Errors</a></li>
  <li><a href="#calibration">Calibration</a></li>
  <li><a href="#explanations">Explanations</a></li>
  <li><a href="#config">Config</a></li>
  <li><a href="#environment">Environment</a></li>
</ol>
</nav>
{% if problems %}<p class="missing">Some files could not be read: {{ problems | join("; ") }}.</p>{% endif %}

<section id="summary">
<h2>Summary</h2>
<table class="keyvalue">
  <tr><td>run</td><td>{{ run_name }}</td></tr>
  <tr><td>model</td><td>{{ summary.model or "—" }}</td></tr>
  <tr><td>dataset</td><td>{{ summary.dataset or "—" }}{% if summary.num_classes %} ({{ summary.num_classes }} classes){% endif %}</td></tr>
  <tr><td>status</td><td>{{ summary.status or "—" }}{% if summary.error %}: {{ summary.error }}{% endif %}</td></tr>
  <tr><td>trained</td><td>{{ summary.started or "—" }} to {{ summary.ended or "—" }}{% if summary.train_minutes is not none %} ({{ summary.train_minutes | fixed(1) }} min){% endif %}</td></tr>
  <tr><td>best epoch</td><td>{{ summary.best_epoch if summary.best_epoch is not none else "—" }}{% for key, value in summary.best %} ({{ key }} {{ value | fixed }}){% endfor %}</td></tr>
</table>
{% if metrics %}
<div class="cards">
  <div class="card"><div class="value">{{ metrics.acc1 | percent(2) }}</div><div class="label">top-1 accuracy</div></div>
  <div class="card"><div class="value">{{ metrics.acc5 | percent(2) }}</div><div class="label">top-5 accuracy</div></div>
  <div class="card"><div class="value">{{ metrics.balanced_acc | percent(2) }}</div><div class="label">balanced accuracy</div></div>
  <div class="card"><div class="value">{{ metrics.macro_f1 | fixed(3) }}</div><div class="label">macro-F1</div></div>
  <div class="card"><div class="value">{{ metrics.auroc_macro | fixed(3) }}</div><div class="label">AUROC (macro, one-vs-rest)</div></div>
  <div class="card"><div class="value">{{ metrics.loss | fixed(3) }}</div><div class="label">loss (cross-entropy)</div></div>
  {% if calibration and calibration.temperature not in (none, 1.0) %}
  <div class="card"><div class="value">{{ calibration.ece_before | fixed(3) }} → {{ calibration.ece_after | fixed(3) }}</div><div class="label">ECE before → after temperature scaling</div></div>
  {% else %}
  <div class="card"><div class="value">{{ (calibration.ece_before if calibration else none) | fixed(3) }}</div><div class="label">ECE (no temperature fitted)</div></div>
  {% endif %}
</div>
<p class="muted">On {{ metrics.n | count }} {{ tag }} images.</p>
{% if metrics.tta %}
<table id="tta">
  <tr><th></th><th>top-1</th><th>top-5</th><th>balanced accuracy</th><th>macro-F1</th><th>loss</th></tr>
  <tr><td>without TTA</td><td>{{ metrics.acc1 | percent(2) }}</td><td>{{ metrics.acc5 | percent(2) }}</td><td>{{ metrics.balanced_acc | percent(2) }}</td><td>{{ metrics.macro_f1 | fixed(3) }}</td><td>{{ metrics.loss | fixed(3) }}</td></tr>
  <tr><td>with TTA ({{ metrics.tta.mode }}, {{ metrics.tta.views }} views{% if not metrics.tta.flip %}, no mirror image{% endif %})</td><td>{{ metrics.tta.acc1 | percent(2) }}</td><td>{{ metrics.tta.acc5 | percent(2) }}</td><td>{{ metrics.tta.balanced_acc | percent(2) }}</td><td>{{ metrics.tta.macro_f1 | fixed(3) }}</td><td>{{ metrics.tta.loss | fixed(3) }}</td></tr>
</table>
<p class="muted">Test-time augmentation averages the probabilities of each image's views (`imgcls eval RUN --tta`).</p>
{% endif %}
{% else %}{{ missing("metrics of the " ~ tag ~ " split (metrics_" ~ tag ~ ".json)", hint) }}{% endif %}
{% if highlights %}<h3>At a glance</h3>
<ul class="highlights">{% for line in highlights %}<li>{{ line }}</li>{% endfor %}</ul>{% endif %}
</section>

<section id="data">
<h2>Data</h2>
{% if data.missing %}{{ missing(data.missing) }}{% else %}
<p>Images per class and split, as training used them (<code>splits.csv</code>).</p>
<table>
  <tr><th class="text">class</th>{% for split in data.splits %}<th>{{ split }}</th>{% endfor %}</tr>
  {% for name, values in data.rows %}<tr><td class="text">{{ name }}</td>{% for value in values %}<td>{{ value | count }}</td>{% endfor %}</tr>
  {% endfor %}<tr class="total"><td class="text">total</td>{% for value in data.totals %}<td>{{ value | count }}</td>{% endfor %}</tr>
</table>
{% if data.imbalance is defined %}<p class="muted">Largest over smallest class in {{ data.imbalance_split }}: {{ data.imbalance | fixed(1) }}×.</p>{% endif %}
{% endif %}
<p>Unreadable images skipped: <strong>{{ data.bad_images | length }}</strong>{% if not data.bad_images %} (no <code>bad_images.txt</code>){% endif %}.</p>
{% if data.bad_images %}<details><summary>list the unreadable files</summary>
<table><tr><th class="text">file</th><th class="text">reason</th></tr>
{% for file, reason in data.bad_images[:200] %}<tr><td class="text"><code>{{ file }}</code></td><td class="text">{{ reason }}</td></tr>{% endfor %}
</table></details>{% endif %}
</section>

<section id="curves">
<h2>Training curves</h2>
<p>Best epoch: <strong>{{ curves.best_epoch if curves.best_epoch is not none else "—" }}</strong> (the weights evaluated here).
{% if curves.overfit_epoch is not none %}Overfitting: validation loss rises after epoch <strong>{{ curves.overfit_epoch }}</strong> and stays up.
{% elif curves.overfit_known %}Overfitting point: none, validation loss is still at or near its minimum at the last epoch.
{% else %}Overfitting point: not available (the error analysis was not run).{% endif %}</p>
{{ figure(curves.image, "training curves", "Loss and accuracy per epoch, train against validation; the dashed line marks the best epoch.", hint) }}
{% if curves.rows %}<details><summary>metrics per epoch ({{ curves.rows | length }} rows of metrics.csv)</summary>
<table><tr>{% for name in curves.columns %}<th>{{ name }}</th>{% endfor %}</tr>
{% for row in curves.rows %}<tr>{% for value in row %}<td>{{ value | general }}</td>{% endfor %}</tr>{% endfor %}
</table></details>{% elif curves.missing_metrics %}{{ missing("metrics.csv (one row per epoch, written during training)") }}{% endif %}
</section>

<section id="per-class">
<h2>Per-class results</h2>
{% if per_class %}
<p>Sorted by F1, worst first. AUROC is one-vs-rest from the softmax probabilities; "—" where a class has no positives or no negatives in the split.</p>
<table>
  <tr><th class="text">class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th><th>AUROC</th></tr>
  {% for row in per_class %}<tr><td class="text">{{ row["class"] }}</td><td>{{ row.precision | fixed(3) }}</td><td>{{ row.recall | fixed(3) }}</td><td>{{ row.f1 | fixed(3) }}</td><td>{{ row.support | count }}</td><td>{{ row.auroc | fixed(3) }}</td></tr>
  {% endfor %}
</table>
{% else %}{{ missing("the per-class report (classification_report_" ~ tag ~ ".csv)", hint) }}{% endif %}
</section>

<section id="confusion">
<h2>Confusion matrix</h2>
{% if confusion or confusion_normalized %}
<div>
{{ figure(confusion_normalized, "confusion matrix (row-normalised)", "Each row divided by the number of images of that true class: the diagonal is the recall.", hint) }}
{{ figure(confusion, "confusion matrix (counts)", "Rows: true class; columns: predicted class; counts of images.", hint) }}
</div>
{% else %}{{ missing("the confusion matrix (confusion_" ~ tag ~ ".png)", hint) }}{% endif %}
</section>

<section id="most-confused">
<h2>Most-confused pairs</h2>
{% if pairs %}
<p>Class pairs the model mixes up most, both directions in one row. A rate is the share of the true class's images that went to the other class.</p>
<table>
  <tr><th>#</th><th class="text">class A</th><th class="text">class B</th><th>A predicted as B</th><th>rate</th><th>B predicted as A</th><th>rate</th><th>total</th></tr>
  {% for row in pairs %}<tr><td>{{ loop.index }}</td><td class="text">{{ row.class_a }}</td><td class="text">{{ row.class_b }}</td><td>{{ row.a_as_b | count }}</td><td>{{ row.a_as_b_rate | percent }}</td><td>{{ row.b_as_a | count }}</td><td>{{ row.b_as_a_rate | percent }}</td><td>{{ row.total | count }}</td></tr>
  {% endfor %}
</table>
{% elif pairs is not none %}<p>No pair of classes was confused on this split: every image was classified correctly.</p>
{% else %}{{ missing("the error analysis (analysis_" ~ tag ~ ".json)", hint) }}{% endif %}
</section>

<section id="errors">
<h2>Errors</h2>
{% if errors %}
<table class="keyvalue">
  <tr><td>errors</td><td>{{ errors.errors | count }} of {{ errors.n | count }} images ({{ errors.error_rate | percent(2) }})</td></tr>
  {% if errors.errors %}<tr><td>true class still in the top-{{ (errors.top_k or 5) | int }}</td><td>{{ errors.errors_true_in_top5 | count }} errors ({{ errors.errors_true_in_top5_share | percent }} of the errors): near misses</td></tr>
  <tr><td>confident errors</td><td>{{ errors.confident_errors | count }} errors ({{ errors.confident_errors_share | percent }} of the errors) made with confidence ≥ {{ confident }}</td></tr>{% endif %}
</table>
{% else %}{{ missing("the error summary (analysis_" ~ tag ~ ".json)", hint) }}{% endif %}
<h3>Highest-loss mistakes</h3>
<p class="muted">Wrong predictions where the true class got the least probability: often mislabelled or ambiguous images.</p>
{{ figure(gallery_loss, "highest-loss mistakes", "Each image: true → predicted class, the confidence of the wrong prediction, the file name.", hint) }}
{% if highest_loss %}<details><summary>the files ({{ highest_loss | length }})</summary>{{ mistakes_table(highest_loss) }}</details>{% endif %}
<h3>Most confident mistakes</h3>
<p class="muted">Wrong predictions made with the highest confidence: the errors a confidence threshold cannot catch.</p>
{{ figure(gallery_confident, "most confident mistakes", "Each image: true → predicted class, the confidence of the wrong prediction, the file name.", hint) }}
{% if most_confident %}<details><summary>the files ({{ most_confident | length }})</summary>{{ mistakes_table(most_confident) }}</details>{% endif %}
</section>

<section id="calibration">
<h2>Calibration</h2>
<p>A calibrated model is right 80% of the time when it says 80%. Temperature scaling divides the logits by one number T, fitted on the validation split; it never changes the predicted class, only the confidences.</p>
{{ figure(reliability, "reliability diagram", "Accuracy against confidence in equal-width bins, before and after temperature scaling; the diagonal is perfect calibration. Below: how many images fall in each bin.", hint) }}
{% if calibration %}
<table>
  <tr><th class="text">on {{ tag }}</th><th>T</th><th>NLL</th><th>ECE ({{ calibration.bins }} bins)</th></tr>
  <tr><td class="text">before (softmax of the logits)</td><td>1</td><td>{{ calibration.nll_before | fixed(4) }}</td><td>{{ calibration.ece_before | fixed(4) }}</td></tr>
  <tr><td class="text">after temperature scaling</td><td>{{ calibration.temperature | fixed(3) }}</td><td>{{ calibration.nll_after | fixed(4) }}</td><td>{{ calibration.ece_after | fixed(4) }}</td></tr>
</table>
{% if calibration.fitted_on %}<p class="muted">Temperature fitted on: {{ calibration.fitted_on }}.</p>{% endif %}
{% if calibration.temperature is not none %}<p class="muted">{% if calibration.temperature > 1 %}T &gt; 1: the model was overconfident, scaling softens its probabilities.{% elif calibration.temperature < 1 %}T &lt; 1: the model was underconfident, scaling sharpens its probabilities.{% else %}T = 1: the probabilities are left as they are, so "after" equals "before".{% endif %}</p>{% endif %}
<h3>Rejection threshold (<code>imgcls predict RUN --reject auto</code>)</h3>
{% set reject = calibration.reject %}
{% if reject and reject.threshold is not none %}
<table class="keyvalue">
  <tr><td>threshold (calibrated confidence)</td><td>{{ reject.threshold | fixed(4) }}</td></tr>
  <tr><td>coverage (images answered)</td><td>{{ reject.coverage | percent }}</td></tr>
  <tr><td>precision of the answered images</td><td>{{ reject.precision | percent }} (target {{ reject.target_precision | percent(0) }})</td></tr>
</table>
<p>With <code>--reject auto</code>, <code>predict</code> answers "unknown" when the calibrated confidence is below {{ reject.threshold | fixed(3) }}. On the validation split that keeps {{ reject.coverage | percent }} of the images, and {{ reject.precision | percent }} of the kept ones are right.</p>
{% elif reject %}<p class="missing">No threshold reaches the target precision{% if reject.target_precision is not none %} of {{ reject.target_precision | percent(0) }}{% endif %}{% if reject.reason %}: {{ reject.reason }}{% endif %}. <code>--reject auto</code> is unavailable for this model; give a confidence instead, e.g. <code>--reject 0.8</code>.</p>
{% else %}{{ missing("the rejection threshold (stored in the model artifact by training, and in analysis_" ~ tag ~ ".json)", hint) }}{% endif %}
{% else %}{{ missing("the calibration results (analysis_" ~ tag ~ ".json)", hint) }}{% endif %}
</section>

<section id="explanations">
<h2>Explanations</h2>
<h3>Grad-CAM</h3>
<p class="muted">Where in the image the evidence for the predicted class lies (warm colours), for correct (green captions) and wrong (red) predictions.</p>
{{ figure(gradcam, "Grad-CAM of correct and wrong predictions", "Each image beside its Grad-CAM overlay for the predicted class.", hint) }}
<h3>Activation maps</h3>
<p class="muted">The most active channels of one layer for a few images: what the network responds to at that depth.</p>
{{ figure(activations, "activation maps", "Each row: an image, then its most active channels (each on its own colour scale).", hint) }}
<h3>Feature space (t-SNE)</h3>
<p class="muted">The penultimate-layer features of the {{ tag }} images in two dimensions, coloured by true class. Classes that overlap here are the ones the model finds hard to separate; distances between clusters mean little.</p>
{{ figure(projection, "t-SNE of the penultimate features", "t-SNE of the features the classifier head receives.", hint) }}
</section>

<section id="config">
<h2>Config</h2>
{% if config_text %}<p>The resolved config, re-runnable with <code>imgcls train -c {{ run_dir }}/config.yaml</code>.</p>
<pre>{{ config_text }}</pre>
{% else %}{{ missing("config.yaml (written when training starts)") }}{% endif %}
</section>

<section id="environment">
<h2>Environment</h2>
{% if environment %}
<table class="keyvalue">{% for key, value in environment %}<tr><td>{{ key }}</td><td>{{ value }}</td></tr>{% endfor %}</table>
{% else %}{{ missing("env.json (written when training starts)") }}{% endif %}
</section>

<p class="muted">Written by imgcls from the files of <code>{{ run_dir }}</code>.</p>
</main>
</body>
</html>
"""

def _render(context: dict[str, Any]) -> str:
    import jinja2

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                                     trim_blocks=False, lstrip_blocks=False)
    environment.filters.update(percent=_percent, fixed=_fixed, count=_count, general=_general)
    return environment.from_string(_TEMPLATE).render(**context)


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
