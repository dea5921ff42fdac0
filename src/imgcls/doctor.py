"""`imgcls doctor`: what is wrong with a dataset, found before training on it.

The data is read exactly as `imgcls train` reads it (the same layouts and the same splits for the same
data.split_seed), then checked for:
- unreadable and odd files: the bad images training would skip, tiny and huge images, extreme aspect
  ratios, greyscale mixed with colour, EXIF-rotated files, the formats and sizes in use;
- copies (data/duplicates.py): byte-identical, pixel-identical and near-duplicate images, within a split and
  across splits (leakage), and copies with different labels (conflicts);
- class balance: counts per split, the imbalance ratio, classes too small to validate on;
- label issues (`labels=True`): out-of-fold probabilities from a logistic regression on image embeddings
  (EfficientNet-Lite0's ImageNet features; or an `imgcls cv` folder's oof_predictions.csv), ranked by
  cleanlab; and outliers that fit no class.

It writes <run.dir>/doctor/NAME/: doctor.json (every finding), doctor.html (self-contained, with
thumbnails of every duplicate pair and suspected label issue) and cleaned.csv, a manifest without the
training copies of validation and test images, which `imgcls train` accepts. The user's files are only read.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.config import Config
from imgcls.data.sources import DataSource
from imgcls.errors import ImgclsError

__all__ = ["diagnose", "run_doctor", "FAIL_KINDS", "failures"]

log = logging.getLogger("imgcls")

TINY_SIDE = 32  # pixels: a shorter side below this is upscaled many times at any usual training size
HUGE_PIXELS = 40_000_000  # 40 MP: slow to decode every epoch; PIL refuses images above 179 MP
EXTREME_ASPECT = 4.0  # longer over shorter side: data.resize=crop keeps a quarter of such an image or less
MIN_VALIDATION_IMAGES = 5  # a class with fewer validation images has no meaningful per-class score
IMBALANCE_HINT = 3.0  # largest over smallest class from which the recipe keys help
LABEL_FOLDS = 5
OUTLIERS_SHOWN = 50
SHOWN = 200  # thumbnails per section of doctor.html (doctor.json has all)
# the kinds of finding --fail-on accepts
FAIL_KINDS = ("leakage", "conflicts", "unreadable", "duplicates", "label-issues", "imbalance")


@dataclass
class _Sample:
    path: str
    split: str
    label: str  # the class name, or the class names joined by the label separator (multi-label)


def _finding(kind: str, severity: str, count: int, message: str, fail_kind: str | None = None) -> dict:
    return {"kind": kind, "severity": severity, "count": count, "message": message, "fail_kind": fail_kind}


def _histogram(values: list[int]) -> dict | None:
    if not values:
        return None
    counts, edges = np.histogram(values, bins=min(30, len(set(values))))
    return {"counts": counts.tolist(), "edges": [round(float(edge), 1) for edge in edges]}


def _file_section(facts: list) -> tuple[dict, list[dict]]:
    readable = [item for item in facts if not item.error]
    unreadable = [{"path": item.path, "reason": item.error} for item in facts if item.error]
    tiny = [item.path for item in readable if min(item.width, item.height) < TINY_SIDE]
    huge = [item.path for item in readable if item.width * item.height > HUGE_PIXELS]
    extreme = [item.path for item in readable
               if max(item.width, item.height) > EXTREME_ASPECT * max(1, min(item.width, item.height))]
    rotated = [item.path for item in readable if item.exif_rotated]
    grey = [item.path for item in readable if item.grey]
    colour_count = len(readable) - len(grey)
    sides = [min(item.width, item.height) for item in readable]
    section = {
        "unreadable": unreadable, "tiny": tiny, "huge": huge, "extreme_aspect": extreme, "exif_rotated": rotated,
        "grey": len(grey), "colour": colour_count, "formats": dict(Counter(item.format or "?" for item in readable)),
        "sizes": dict(Counter(f"{item.width}x{item.height}" for item in readable).most_common(10)),
        "shorter_side": {"min": min(sides), "median": int(np.median(sides)), "max": max(sides)} if sides else None,
        "shorter_side_histogram": _histogram(sides),
    }
    findings = []
    if unreadable:
        findings.append(_finding("unreadable", "error", len(unreadable),
                                 f"{len(unreadable)} unreadable file(s), which training skips (e.g. "
                                 f"{unreadable[0]['path']}: {unreadable[0]['reason']})", "unreadable"))
    if tiny:
        findings.append(_finding("tiny", "warning", len(tiny), f"{len(tiny)} image(s) under {TINY_SIDE} px on a side "
                                 f"(e.g. {tiny[0]}); a model at data.image_size upscales them"))
    if huge:
        findings.append(_finding("huge", "warning", len(huge), f"{len(huge)} image(s) over 40 MP (e.g. {huge[0]}); "
                                 "decoding them is slow: `imgcls cache` decodes once"))
    if extreme:
        findings.append(_finding("aspect", "warning", len(extreme),
                                 f"{len(extreme)} image(s) more than {EXTREME_ASPECT:.0f} times as long as wide (e.g. "
                                 f"{extreme[0]}); data.resize=crop cuts most of them away: consider data.resize=pad"))
    if grey and colour_count:
        minority, what = (len(grey), "greyscale") if len(grey) <= colour_count else (colour_count, "colour")
        findings.append(_finding("grey_and_colour", "warning", minority,
                                 f"{len(grey)} greyscale and {colour_count} colour images: the {minority} {what} "
                                 "one(s) may come from another source; check they belong"))
    if rotated:
        findings.append(_finding("exif_rotated", "info", len(rotated),
                                 f"{len(rotated)} image(s) carry an EXIF rotation (e.g. {rotated[0]}); imgcls applies "
                                 "it everywhere, other tools may not"))
    return section, findings


def _balance_section(source: DataSource) -> tuple[dict, list[dict]]:
    names = source.class_names
    counts = {split: {name: source.counts(split).get(name, 0) for name in names} for split in source.splits}
    train = counts.get("train", {})
    largest, smallest = max(train.values(), default=0), min(train.values(), default=0)
    ratio = largest / smallest if smallest else float("inf")
    few = [name for name in names if counts.get("val", {}).get(name, 0) < MIN_VALIDATION_IMAGES]
    section = {"classes": names, "counts": counts, "imbalance_ratio": ratio if smallest else None,
               "few_validation_images": few}
    findings = []
    if smallest and ratio >= IMBALANCE_HINT:
        rarest = min(train, key=train.get)
        findings.append(_finding("imbalance", "warning", len(names),
                                 f"classes are imbalanced: {ratio:.1f}x more training images of "
                                 f"'{max(train, key=train.get)}' than of '{rarest}' ({smallest}); try "
                                 "loss.class_weights=auto or data.sampler=balanced", "imbalance"))
    if few:
        findings.append(_finding("few_validation", "warning", len(few),
                                 f"{len(few)} class(es) have under {MIN_VALIDATION_IMAGES} validation images (e.g. "
                                 f"'{few[0]}': {counts.get('val', {}).get(few[0], 0)}); their validation scores "
                                 "mean little: add images or raise data.val_fraction"))
    return section, findings


def _duplicate_findings(groups: list[dict]) -> list[dict]:
    leaks = [group for group in groups if len(set(group["splits"])) > 1]
    conflicts = [group for group in groups if len(set(group["labels"])) > 1]
    within = [group for group in groups if len(set(group["splits"])) == 1]
    findings = []
    if leaks:
        kinds = Counter(group["kind"] for group in leaks)
        example = leaks[0]
        findings.append(_finding(
            "leakage", "error", len(leaks),
            f"{len(leaks)} group(s) of copies span splits ({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
            f"e.g. {example['paths'][0]} ({example['splits'][0]}) = {example['paths'][1]} ({example['splits'][1]}): "
            "scores on them are not on unseen images; train on cleaned.csv", "leakage"))
    if conflicts:
        example = conflicts[0]
        findings.append(_finding(
            "conflicts", "error", len(conflicts),
            f"{len(conflicts)} group(s) of copies carry different labels, e.g. {example['paths'][0]} is "
            f"'{example['labels'][0]}' and {example['paths'][1]} is '{example['labels'][1]}': fix one label",
            "conflicts"))
    if within:
        copies = sum(len(group["paths"]) - 1 for group in within)
        findings.append(_finding("duplicates", "warning", len(within),
                                 f"{len(within)} group(s) of copies within a split ({copies} extra image(s)), which "
                                 "weigh those images more", "duplicates"))
    return findings


def _embeddings(samples: list[_Sample], thumbnails: np.ndarray, facts: list, processes: int) -> tuple[np.ndarray, str]:
    """Image features for the label check: EfficientNet-Lite0's pooled ImageNet features (64 px for images of
    64 px or less, else 160 px), or the grey thumbnails' pixels where its weights are not installed."""
    import torch

    from imgcls.data.loaders import decode_into
    from imgcls.tracking import progress

    try:
        import timm

        from imgcls.pretrained import load_imagenet_weights

        model = timm.create_model("tf_efficientnet_lite0")
        load_imagenet_weights("tf_efficientnet_lite0", model)
    except (ImportError, ImgclsError) as error:
        log.warning(f"label check on pixels, not on image features: {error}")
        return thumbnails.reshape(len(thumbnails), -1).astype(np.float32) / 255.0, "32 px grey pixels"
    model.reset_classifier(0)
    model.eval()
    sides = [min(item.width, item.height) for item in facts if not item.error]
    side = 64 if np.median(sides) <= 64 else 160
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "images.u8"
        paths = [sample.path for sample in samples]
        images = np.memmap(target, dtype=np.uint8, mode="w+", shape=(len(paths), side, side, 3))
        decode_into(target, paths, side, "crop", processes)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
        features = []
        starts = range(0, len(paths), 256)
        with torch.inference_mode():
            for start in progress(starts, total=len(starts), description=f"image features of {len(paths)} images"):
                batch = torch.from_numpy(np.array(images[start: start + 256])).permute(0, 3, 1, 2).float()
                features.append(model((batch - mean) / std).numpy())
        del images
    return np.concatenate(features), f"EfficientNet-Lite0 ImageNet features at {side} px"


def _out_of_fold(features: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Out-of-fold class probabilities of a logistic regression on standardised, PCA-reduced features."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(LABEL_FOLDS, np.bincount(labels, minlength=classes).min()))
    dimensions = min(256, features.shape[1], len(features) * (folds - 1) // folds - 1)  # a training fold's rank
    model = make_pipeline(StandardScaler(), PCA(dimensions, random_state=0),
                          LogisticRegression(max_iter=500, C=0.1))
    return cross_val_predict(model, features, labels, method="predict_proba",
                             cv=StratifiedKFold(folds, shuffle=True, random_state=0))


def _cv_probabilities(folder: Path, samples: list[_Sample], names: list[str]) -> np.ndarray:
    """Class probabilities of each sample from an `imgcls cv` folder's oof_predictions.csv (NaN rows where an
    image has none: those are left out of the check)."""
    table = folder / "oof_predictions.csv"
    if not table.is_file():
        raise ImgclsError(f"--from {folder}: no oof_predictions.csv there; give a folder made by `imgcls cv`")
    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [f"prob_{name}" for name in names]
        missing = [column for column in columns if column not in (reader.fieldnames or [])]
        if missing:
            raise ImgclsError(f"{table} has no column {missing[0]}: it was made for other classes than {names}")
        found = {str(Path(row["path"]).resolve()): [float(row[column]) for column in columns] for row in reader}
    probabilities = np.full((len(samples), len(names)), np.nan)
    for row, sample in enumerate(samples):
        if (values := found.get(str(Path(sample.path).resolve()))) is not None:
            probabilities[row] = values
    if np.isnan(probabilities[:, 0]).all():
        raise ImgclsError(f"none of the images in {table} are in this data; was the cv run on the same data?")
    return probabilities


def _label_section(source: DataSource, samples: list[_Sample], facts: list, thumbnails: np.ndarray,
                   from_cv: str | None, processes: int) -> tuple[dict, list[dict]]:
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.outlier import OutOfDistribution
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise ImgclsError("--labels needs cleanlab: pip install cleanlab (in a checkout: pip install -e "
                          "'.[doctor]')") from None

    if source.multi_label:
        raise ImgclsError("--labels checks single-label data only; multi-label data (a labels column) is not "
                          "supported yet: leave out --labels")
    names = source.class_names
    readable = [row for row, item in enumerate(facts) if not item.error]
    index_of = {name: number for number, name in enumerate(names)}
    labels = np.array([index_of[samples[row].label] for row in readable])
    features = None
    if from_cv:
        probabilities = _cv_probabilities(Path(from_cv), [samples[row] for row in readable], names)
        method = f"out-of-fold predictions of {from_cv}"
    else:
        features, method = _embeddings([samples[row] for row in readable], thumbnails[readable],
                                       [facts[row] for row in readable], processes)
        probabilities = _out_of_fold(features, labels, len(names))
    known = ~np.isnan(probabilities[:, 0])
    rows, labels, probabilities = np.array(readable)[known], labels[known], probabilities[known]
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    ranked = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probabilities)
    issues = [{"path": samples[rows[i]].path, "split": samples[rows[i]].split, "given": names[labels[i]],
               "suggested": names[int(probabilities[i].argmax())], "score": round(float(quality[i]), 5)}
              for i in ranked]
    outliers = []
    if features is not None:
        from sklearn.decomposition import PCA

        # nearest neighbours in 64 dimensions: the 1,280 of the features make the search minutes on 70,000 images
        reduced = PCA(min(64, len(rows) - 1, features.shape[1]), random_state=0).fit_transform(features[known])
        with contextlib.redirect_stdout(io.StringIO()):  # cleanlab prints its progress
            scores = OutOfDistribution().fit_score(features=reduced)
        for i in np.argsort(scores)[:min(OUTLIERS_SHOWN, max(1, len(scores) // 200))]:
            outliers.append({"path": samples[rows[i]].path, "split": samples[rows[i]].split,
                             "given": names[labels[i]], "score": round(float(scores[i]), 5)})
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    section = {"method": method, "checked": int(len(rows)), "out_of_fold_accuracy": round(accuracy, 4)}
    findings = []
    if issues:
        first = issues[0]
        findings.append(_finding("label_issues", "warning", len(issues),
                                 f"{len(issues)} suspected wrong label(s) of {len(rows)} (cleanlab; out-of-fold "
                                 f"accuracy {accuracy:.1%}), most suspicious {first['path']}: given "
                                 f"'{first['given']}', looks like '{first['suggested']}'", "label-issues"))
    if outliers:
        findings.append(_finding("outliers", "info", len(outliers),
                                 f"{len(outliers)} image(s) fit no class well (e.g. {outliers[0]['path']}); "
                                 "check they belong in the data"))
    return {"labels": section, "label_issues": issues, "outliers": outliers}, findings


SEVERITY = {"error": 0, "warning": 1, "info": 2}


def _cleaned(source: DataSource, groups: list[dict], unreadable: set[str]) -> tuple[DataSource, list[str]]:
    """The source without unreadable files and without training images that copy a validation or test image."""
    leaked = {path for group in groups if len(set(group["splits"])) > 1
              for path, split in zip(group["paths"], group["splits"]) if split == "train"}
    removed = sorted(leaked)
    splits = {split: [(path, label) for path, label in samples
                      if path not in unreadable and not (split == "train" and path in leaked)]
              for split, samples in source.splits.items()}
    return source.replace(splits=splits), removed


def diagnose(data: Config | str, labels: bool = False, from_cv: str | None = None,
             overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """Every check on `data` (a folder, manifest or packaged dataset name, read with the data.* `overrides`
    as training reads it; or a whole Config); the report as a dict, as doctor.json holds it (without the
    cleaned manifest, which `run_doctor` writes)."""
    return _diagnose(_config(data, overrides), labels, from_cv)[0]


def _config(data: Config | str, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    from imgcls.config import load_config

    return data if isinstance(data, Config) else load_config(overrides=[f"data.path={data}", *overrides])


def _diagnose(config: Config, labels: bool, from_cv: str | None) -> tuple[dict, DataSource]:
    from imgcls.data import _processes
    from imgcls.data.duplicates import find_duplicates, scan_files
    from imgcls.training import split_data

    started = time.monotonic()
    if from_cv:
        labels = True
    source = split_data(config)
    processes = _processes()
    separator = config.data.label_separator
    samples = [_Sample(path, split, separator.join(label) if source.multi_label else label)
               for split, items in source.splits.items() for path, label in items]
    paths = [sample.path for sample in samples]
    facts, thumbnails = scan_files(paths, processes)
    files, findings = _file_section(facts)
    balance, balance_findings = _balance_section(source)
    groups = find_duplicates(paths, [sample.split for sample in samples], [sample.label for sample in samples],
                             facts, thumbnails, processes)
    findings += balance_findings + _duplicate_findings(groups)
    report: dict[str, Any] = {"data": source.origin or source.name, "name": source.name, "images": len(samples),
                              "splits": {split: len(items) for split, items in source.splits.items()},
                              "files": files, "balance": balance, "duplicates": groups,
                              "conflicts": [group for group in groups if len(set(group["labels"])) > 1],
                              "label_issues": [], "outliers": []}
    if labels:
        section, label_findings = _label_section(source, samples, facts, thumbnails, from_cv, processes)
        report.update(section)
        findings += label_findings
    findings.sort(key=lambda finding: SEVERITY[finding["severity"]])
    report["findings"] = findings
    report["seconds"] = round(time.monotonic() - started, 1)
    return report, source


def failures(report: dict, kinds: list[str]) -> list[dict]:
    """The findings of the kinds --fail-on names."""
    return [finding for finding in report["findings"] if finding["fail_kind"] in kinds]


def parse_fail_on(text: str | None) -> list[str]:
    if not text:
        return []
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in FAIL_KINDS]
    if unknown:
        raise ImgclsError(f"--fail-on {unknown[0]}: unknown kind; use a comma-separated list of "
                          f"{', '.join(FAIL_KINDS)}")
    return kinds


def _thumbnail(path: str, side: int = 96) -> str | None:
    """A data: URI of a small PNG of the image, or None when it cannot be read."""
    from imgcls.data.images import load_image

    try:
        image = load_image(path)
    except Exception:  # noqa: BLE001 - an unreadable image shows as a missing thumbnail
        return None
    scale = side / max(image.size)
    if scale < 1 or max(image.size) < side // 2:  # tiny images are enlarged so that they can be seen
        from PIL import Image

        image = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
                             Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _size_histogram(histogram: dict | None) -> str | None:
    """The image-size histogram of doctor.html, as a data: URI."""
    if not histogram:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 2.4), dpi=100)
    edges = histogram["edges"]
    axes.stairs(histogram["counts"], edges, fill=True, color="#1f5fa8")
    axes.set_xlabel("shorter side (px)")
    axes.set_ylabel("images")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html(report: dict, path: Path) -> None:
    """doctor.html: the findings, the tables and thumbnails side by side, every image embedded."""
    import jinja2

    from imgcls.checkpoint import atomic_write

    groups = report["duplicates"]
    sections = {
        "leakage": [group for group in groups if len(set(group["splits"])) > 1],
        "conflicts": [group for group in groups if len(set(group["labels"])) > 1 and len(set(group["splits"])) == 1],
        "within": [group for group in groups if len(set(group["splits"])) == 1 and len(set(group["labels"])) == 1],
    }
    shown = {key: [{**group, "thumbnails": [_thumbnail(path) for path in group["paths"][:4]]} for group in items[:SHOWN]]
             for key, items in sections.items()}
    issues = [{**issue, "thumbnail": _thumbnail(issue["path"])} for issue in report["label_issues"][:SHOWN]]
    outliers = [{**item, "thumbnail": _thumbnail(item["path"])} for item in report["outliers"][:SHOWN]]
    environment = jinja2.Environment(loader=jinja2.PackageLoader("imgcls", "templates"),
                                     autoescape=jinja2.select_autoescape(["html", "j2"]))
    html = environment.get_template("doctor.html.j2").render(
        report=report, shown=shown, totals={key: len(items) for key, items in sections.items()}, issues=issues,
        outliers=outliers, histogram=_size_histogram(report["files"]["shorter_side_histogram"]), shown_limit=SHOWN)
    atomic_write(path, html.encode("utf-8"))


def run_doctor(data: Config | str, labels: bool = False, from_cv: str | None = None, name: str | None = None,
               force: bool = False, overrides: tuple[str, ...] | list[str] = ()) -> tuple[dict, Path]:
    """`diagnose`, then the folder <run.dir>/doctor/NAME (NAME: the data's name, -2, -3... when taken) with
    doctor.json, doctor.html and cleaned.csv; the report and the folder."""
    from imgcls.checkpoint import atomic_write
    from imgcls.data.sources import write_splits_csv
    from imgcls.tracking import create_run_dir

    config = _config(data, overrides)
    report, source = _diagnose(config, labels, from_cv)
    folder = create_run_dir(Path(config.run.dir) / "doctor", name, f"{source.name}", force)
    unreadable = {item["path"] for item in report["files"]["unreadable"]}
    cleaned, removed = _cleaned(source, report["duplicates"], unreadable)
    write_splits_csv(cleaned, folder / "cleaned.csv", config.data.label_separator)
    report["cleaned_manifest"] = {"path": str(folder / "cleaned.csv"), "removed_from_train": removed,
                                  "unreadable_left_out": sorted(unreadable),
                                  "images": sum(len(items) for items in cleaned.splits.values())}
    report["folder"] = str(folder)
    atomic_write(folder / "doctor.json", json.dumps(report, indent=1).encode("utf-8"))
    write_html(report, folder / "doctor.html")
    return report, folder


def summary_lines(report: dict) -> list[str]:
    """The console summary: a line per finding, worst first, then where the outputs are."""
    marks = {"error": "ERROR", "warning": "WARN ", "info": "info "}
    lines = [f"{report['data']}: {report['images']} images ("
             + ", ".join(f"{split} {count}" for split, count in report["splits"].items())
             + f"), {len(report['balance']['classes'])} classes, checked in {report['seconds']:.0f} s"]
    lines += [f"{marks[finding['severity']]} {finding['message']}" for finding in report["findings"]]
    if not report["findings"]:
        lines.append("no problems found")
    return lines

