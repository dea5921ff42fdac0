"""Multi-label evaluation: the metrics, the per-label thresholds chosen on val, and what `imgcls eval`
writes for a multi-label model (predictions, the per-label report, precision-recall curves of the
worst labels, label co-occurrence beside confusion, galleries of the worst false positives and false
negatives, Grad-CAM per predicted label). The single-label counterparts are in imgcls.evaluation.

Targets are multi-hot rows (images x labels); probabilities are the sigmoids of the logits.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["compute_metrics", "choose_thresholds", "per_label_report", "confused_labels", "evaluate_split",
           "write_predictions", "save_precision_recall_curves", "save_cooccurrence"]

log = logging.getLogger("imgcls")


def _arrays(logits: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, truth as 0/1 int) as numpy."""
    return torch.sigmoid(logits.float()).numpy(), (targets.numpy() > 0.5).astype(np.int64)


def _decide(probabilities: np.ndarray, thresholds: Sequence[float] | None) -> np.ndarray:
    limits = np.full(probabilities.shape[1], 0.5) if thresholds is None else np.asarray(thresholds)
    return (probabilities >= limits).astype(np.int64)


def average_precisions(probabilities: np.ndarray, truth: np.ndarray) -> list[float | None]:
    """Each label's average precision (area under its precision-recall curve); None without positives."""
    from sklearn.metrics import average_precision_score

    return [float(average_precision_score(truth[:, j], probabilities[:, j])) if truth[:, j].any() else None
            for j in range(truth.shape[1])]


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, thresholds: Sequence[float] | None = None
                    ) -> dict[str, float]:
    """map (macro average precision over the labels with a positive), f1_micro, f1_macro (over the
    labels with a positive, as single-label macro_f1), subset_acc (the whole label set right),
    hamming_loss (share of wrong image-label decisions), loss (binary cross-entropy) and n, deciding
    with `thresholds` (one per label; default 0.5)."""
    from sklearn.metrics import f1_score

    probabilities, truth = _arrays(logits, targets)
    predicted = _decide(probabilities, thresholds)
    present = truth.any(axis=0)
    precisions = [ap for ap in average_precisions(probabilities, truth) if ap is not None]
    return {
        "loss": torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float()).item(),
        "map": float(np.mean(precisions)) if precisions else 0.0,
        "f1_micro": float(f1_score(truth, predicted, average="micro", zero_division=0)),
        "f1_macro": float(f1_score(truth[:, present], predicted[:, present], average="macro", zero_division=0))
        if present.any() else 0.0,
        "subset_acc": float((predicted == truth).all(axis=1).mean()),
        "hamming_loss": float((predicted != truth).mean()),
        "n": int(len(truth)),
    }


def choose_thresholds(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """One threshold per label: the probability that maximises that label's F1 on these images (val);
    0.5 for a label without positives there (nothing to choose from)."""
    from sklearn.metrics import precision_recall_curve

    probabilities, truth = _arrays(logits, targets)
    thresholds = []
    for j in range(truth.shape[1]):
        if not truth[:, j].any():
            thresholds.append(0.5)
            continue
        precision, recall, candidates = precision_recall_curve(truth[:, j], probabilities[:, j])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        thresholds.append(float(candidates[int(np.argmax(f1))]))
    return thresholds


def per_label_report(logits: torch.Tensor, targets: torch.Tensor, class_names: list[str],
                     thresholds: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """ap, precision, recall, f1, support (images with the label) and threshold of every label."""
    from sklearn.metrics import precision_recall_fscore_support

    probabilities, truth = _arrays(logits, targets)
    predicted = _decide(probabilities, thresholds)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    limits = thresholds if thresholds is not None else [0.5] * len(class_names)
    return [{"class": name, "ap": ap, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s),
             "threshold": float(t)}
            for name, ap, p, r, f, s, t in zip(class_names, average_precisions(probabilities, truth), precision,
                                               recall, f1, support, limits)]


def confused_labels(truth: np.ndarray, predicted: np.ndarray, class_names: list[str], limit: int = 10
                    ) -> list[dict[str, Any]]:
    """Which labels are predicted in place of which: on an image where label a is missed and label b
    is wrongly predicted, (a, b) counts once. Most frequent pairs first."""
    missed, extra = (truth == 1) & (predicted == 0), (truth == 0) & (predicted == 1)
    counts = missed.T.astype(np.int64) @ extra.astype(np.int64)  # [a, b]: images missing a with b in its place
    pairs = [(int(counts[a, b]), a, b) for a in range(len(class_names)) for b in range(len(class_names))
             if counts[a, b] > 0]
    pairs.sort(key=lambda item: (-item[0], class_names[item[1]], class_names[item[2]]))
    return [{"missed": class_names[a], "predicted_instead": class_names[b], "images": count}
            for count, a, b in pairs[:limit]]


def _worst(probabilities: np.ndarray, truth: np.ndarray, paths: list[str], class_names: list[str],
           kind: str, limit: int = 16) -> list[dict[str, Any]]:
    """The most confident false positives ("fp": highest probability on an absent label) or the worst
    false negatives ("fn": lowest probability on a present label), as gallery rows."""
    if kind == "fp":
        scores = np.where(truth == 0, probabilities, -np.inf)
        order = np.argsort(-scores, axis=None, kind="stable")
    else:
        scores = np.where(truth == 1, probabilities, np.inf)
        order = np.argsort(scores, axis=None, kind="stable")
    rows = []
    for flat in order[:limit]:
        image, label = divmod(int(flat), truth.shape[1])
        if not np.isfinite(scores[image, label]):
            break
        true_names = "|".join(name for name, bit in zip(class_names, truth[image]) if bit) or "(none)"
        rows.append({"path": paths[image], "true": true_names,
                     "predicted": ("+" if kind == "fp" else "-") + class_names[label], "label": class_names[label],
                     "confidence": float(probabilities[image, label])})
    return rows


def write_predictions(path: Path, paths: list[str], probabilities: np.ndarray, truth: np.ndarray,
                      predicted: np.ndarray, class_names: list[str]) -> None:
    """predictions_<tag>.csv: path, true and predicted label sets (joined by |), correct (the whole set),
    and one probability per label (prob_<label>)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", "correct", *(f"prob_{name}" for name in class_names)])
        for image, values, true_row, predicted_row in zip(paths, probabilities.tolist(), truth, predicted):
            join = lambda bits: "|".join(name for name, bit in zip(class_names, bits) if bit)  # noqa: E731
            writer.writerow([image, join(true_row), join(predicted_row), int((true_row == predicted_row).all()),
                             *(f"{value:.6f}" for value in values)])


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(paths, probabilities, truth, class names) from a multi-label predictions_<tag>.csv."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    names = [column.removeprefix("prob_") for column in header[4:]]
    index = {name: i for i, name in enumerate(names)}
    truth = np.zeros((len(body), len(names)), dtype=np.int64)
    for row_number, row in enumerate(body):
        for name in filter(None, row[1].split("|")):
            truth[row_number, index[name]] = 1
    probabilities = np.array([[float(value) for value in row[4:]] for row in body]).reshape(len(body), len(names))
    return [row[0] for row in body], probabilities, truth, names


def save_precision_recall_curves(probabilities: np.ndarray, truth: np.ndarray, class_names: list[str],
                                 report: list[dict[str, Any]], path: Path, title: str, count: int = 6) -> None:
    """The precision-recall curves of the `count` labels with the lowest AP, their thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    worst = sorted((row for row in report if row["ap"] is not None), key=lambda row: (row["ap"], row["class"]))[:count]
    figure, axes = plt.subplots(figsize=(6.5, 5))
    for row in worst:
        j = class_names.index(row["class"])
        precision, recall, _ = precision_recall_curve(truth[:, j], probabilities[:, j])
        line, = axes.plot(recall, precision, label=f"{row['class']} (AP {row['ap']:.3f})")
        axes.plot([row["recall"]], [row["precision"]], "o", color=line.get_color())  # at the stored threshold
    if not worst:
        axes.text(0.5, 0.5, "no label has a positive image", ha="center")
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_title(title + " (dots: the stored thresholds)")
    axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_cooccurrence(truth: np.ndarray, predicted: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Two matrices side by side: how often labels occur together in the truth (row-normalised: of the
    images with label a, the share that also has b), and which labels are predicted in place of which
    (of the images missing a, the share with b wrongly predicted). A confusion that follows the
    co-occurrence is the model guessing from context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    together = truth.T.astype(float) @ truth.astype(float)
    np.fill_diagonal(together, 0)
    together /= np.maximum(truth.sum(axis=0)[:, None], 1)
    missed, extra = (truth == 1) & (predicted == 0), (truth == 0) & (predicted == 1)
    instead = missed.T.astype(float) @ extra.astype(float)
    instead /= np.maximum(missed.sum(axis=0)[:, None], 1)
    size = max(4.0, 0.4 * len(class_names) + 2)
    figure, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size))
    for axis, values, name in ((axes[0], together, "co-occurrence: with a, also b"),
                               (axes[1], instead, "confusion: a missed, b predicted instead")):
        image = axis.imshow(values, cmap="Blues", vmin=0, vmax=max(1e-9, values.max()))
        figure.colorbar(image, ax=axis, fraction=0.046)
        axis.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=8)
        axis.set_yticks(range(len(class_names)), class_names, fontsize=8)
        axis.set_xlabel("b")
        axis.set_ylabel("a")
        axis.set_title(name, fontsize=10)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def evaluate_split(classifier, run_dir: Path, tag: str, title: str, dataset, logits: torch.Tensor,
                   targets: torch.Tensor, explain: bool, quiet: bool) -> dict[str, Any]:
    """Everything `imgcls eval` writes for a multi-label model's split `tag`; returns the metrics."""
    from rich.console import Console
    from rich.table import Table

    from imgcls import analyze

    names = classifier.class_names
    thresholds = classifier.task.decision(classifier.metadata, None, None).tolist()
    metrics = compute_metrics(logits, targets, thresholds)
    metrics["at_0.5"] = {key: value for key, value in compute_metrics(logits, targets).items() if key != "n"}
    report = per_label_report(logits, targets, names, thresholds)
    probabilities, truth = _arrays(logits, targets)
    predicted = _decide(probabilities, thresholds)
    write_predictions(run_dir / f"predictions_{tag}.csv", dataset.paths, probabilities, truth, predicted, names)
    with open(run_dir / f"classification_report_{tag}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["class", "ap", "precision", "recall", "f1", "support", "threshold"])
        writer.writeheader()
        writer.writerows(report)
    save_precision_recall_curves(probabilities, truth, names, report, run_dir / f"pr_curves_{tag}.png",
                                 f"precision-recall of the worst labels, {tag}")
    save_cooccurrence(truth, predicted, names, run_dir / f"cooccurrence_{tag}.png", f"labels, {tag}")
    false_positives = _worst(probabilities, truth, dataset.paths, names, "fp")
    false_negatives = _worst(probabilities, truth, dataset.paths, names, "fn")
    size = max(64, min(128, classifier.image_size))
    analyze.save_gallery(false_positives, run_dir / f"false_positives_{tag}.png",
                         f"most confident false positives (+label: p), {tag}", size)
    analyze.save_gallery(false_negatives, run_dir / f"false_negatives_{tag}.png",
                         f"worst false negatives (-label: p), {tag}", size)
    analysis = {
        "split": tag, "task": "multi",
        "per_label": sorted(report, key=lambda row: (row["ap"] if row["ap"] is not None else 2.0, row["f1"], row["class"])),
        "confused": confused_labels(truth, predicted, names),
        "false_positives": false_positives, "false_negatives": false_negatives,
        "labels_per_image": {"true": float(truth.sum(axis=1).mean()), "predicted": float(predicted.sum(axis=1).mean())},
    }
    (run_dir / f"analysis_{tag}.json").write_text(json.dumps(analysis, indent=2))
    (run_dir / f"metrics_{tag}.json").write_text(json.dumps(metrics, indent=2))
    if explain:
        _explain(classifier, run_dir, tag, dataset.paths, probabilities, truth, thresholds)
    if not quiet:
        table = Table(title=f"{title}: per label, worst AP first")
        for column in ("label", "AP", "precision", "recall", "F1", "support", "threshold"):
            table.add_column(column, justify="left" if column == "label" else "right")
        for row in analysis["per_label"]:
            table.add_row(row["class"], "-" if row["ap"] is None else f"{row['ap']:.3f}", f"{row['precision']:.3f}",
                          f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]), f"{row['threshold']:.3f}")
        import io

        text = io.StringIO()
        Console(file=text, width=100).print(table)
        log.info(text.getvalue().rstrip())
        log.info(f"{title}: mAP {metrics['map']:.4f}  f1_micro {metrics['f1_micro']:.4f}  f1_macro {metrics['f1_macro']:.4f}  "
                 f"subset_acc {metrics['subset_acc']:.4f}  hamming_loss {metrics['hamming_loss']:.4f}  n {metrics['n']}")
        pairs = ", ".join(f"{row['missed']} -> {row['predicted_instead']} {row['images']}" for row in analysis["confused"][:3])
        if pairs:
            log.info(f"labels predicted in place of others (missed -> instead, images): {pairs}")
    return metrics


def _explain(classifier, run_dir: Path, tag: str, paths: list[str], probabilities: np.ndarray, truth: np.ndarray,
             thresholds: list[float], images: int = 6) -> None:
    """gradcam_<tag>.png: for a few images, one Grad-CAM per label the model predicts on them."""
    from imgcls import explain

    names = classifier.class_names
    rows = []
    for image in np.random.default_rng(0).permutation(len(paths))[:images]:
        true_names = "|".join(name for name, bit in zip(names, truth[image]) if bit) or "(none)"
        for label in np.flatnonzero(probabilities[image] >= np.asarray(thresholds)):
            rows.append({"path": paths[image], "true": true_names, "predicted": names[label],
                         "confidence": float(probabilities[image, label]), "predicted_index": int(label),
                         "correct": bool(truth[image, label])})
    explain.save_gradcam_gallery(classifier.model, rows[:16], names, classifier.image_size, classifier.resize,
                                 run_dir / f"gradcam_{tag}.png", f"Grad-CAM per predicted label, {tag}")
