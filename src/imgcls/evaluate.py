"""Metrics and per-sample predictions for a split: loss, top-1/top-5, balanced accuracy, macro-F1,
a per-class report, confusion matrices, and `predictions_<split>.csv`."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from imgcls.errors import ImgclsError
from imgcls.runtime import Runtime

__all__ = ["predict_loader", "compute_metrics", "per_class_report", "evaluate", "save_confusion_png"]

log = logging.getLogger("imgcls")


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader: DataLoader, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits as float32 on CPU, labels) over a whole loader, in eval mode."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        with runtime.autocast():
            logits = model(runtime.to_device(images))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of samples whose label is among the k highest logits (k clipped to the class count)."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return hits.float().mean().item()


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """loss, acc1, acc5, balanced_acc, macro_f1 and n for one split. Balanced accuracy and macro-F1
    average over the classes present in the labels (a split may hold a subset of the classes)."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    predicted = logits.argmax(dim=1).numpy()
    truth = labels.numpy()
    present = np.unique(truth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": expected on subsets
        balanced = balanced_accuracy_score(truth, predicted)
        macro_f1 = f1_score(truth, predicted, labels=present, average="macro", zero_division=0)
    return {
        "loss": torch.nn.functional.cross_entropy(logits, labels).item(),
        "acc1": topk_accuracy(logits, labels, 1),
        "acc5": topk_accuracy(logits, labels, 5),
        "balanced_acc": float(balanced),
        "macro_f1": float(macro_f1),
        "n": int(len(truth)),
    }


def per_class_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    """precision, recall, F1 and support of every class."""
    from sklearn.metrics import precision_recall_fscore_support

    indices = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels.numpy(), logits.argmax(dim=1).numpy(), labels=indices, zero_division=0
    )
    return [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
    ]


def save_confusion_png(matrix: np.ndarray, class_names: list[str], path: Path, normalized: bool, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    values = matrix.astype(float)
    if normalized:
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.45 * len(class_names) + 2.5)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    figure.colorbar(image, ax=axes, fraction=0.046)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(ticks, class_names, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title + (" (row-normalised)" if normalized else " (counts)"))
    if len(class_names) <= 25:
        threshold = values.max() / 2 if values.size else 0
        for i in ticks:
            for j in ticks:
                text = f"{values[i, j]:.2f}" if normalized else f"{int(matrix[i, j])}"
                axes.text(j, i, text, ha="center", va="center", fontsize=7,
                          color="white" if values[i, j] > threshold else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _print_report(report: list[dict[str, Any]], metrics: dict[str, float], title: str) -> None:
    """The per-class table and the summary line, on the console and in the run's log.txt."""
    import io

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in report:
        table.add_row(row["class"], f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    text = io.StringIO()
    Console(file=text, width=100).print(table)  # plain text: the same in a terminal and in log.txt
    log.info(text.getvalue().rstrip())
    log.info(
        f"{title}: acc1 {metrics['acc1']:.4f}  acc5 {metrics['acc5']:.4f}  balanced_acc {metrics['balanced_acc']:.4f}  "
        f"macro_f1 {metrics['macro_f1']:.4f}  loss {metrics['loss']:.4f}  n {metrics['n']}"
    )


def _write_outputs(run_dir: Path, tag: str, paths: list[str], logits: torch.Tensor, labels: torch.Tensor,
                   class_names: list[str], metrics: dict[str, float], report: list[dict[str, Any]]) -> None:
    from sklearn.metrics import confusion_matrix

    probabilities = torch.softmax(logits, dim=1)
    topk = min(5, len(class_names))
    values, indices = probabilities.topk(topk, dim=1)
    with open(run_dir / f"predictions_{tag}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["path", "true", "predicted", "confidence", "correct"]
        for rank in range(1, topk + 1):
            header += [f"label_{rank}", f"prob_{rank}"]
        writer.writerow(header)
        for path, label, top_values, top_indices in zip(paths, labels.tolist(), values.tolist(), indices.tolist()):
            row = [path, class_names[label], class_names[top_indices[0]], f"{top_values[0]:.6f}", int(label == top_indices[0])]
            for value, index in zip(top_values, top_indices):
                row += [class_names[index], f"{value:.6f}"]
            writer.writerow(row)
    with open(run_dir / f"classification_report_{tag}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["class", "precision", "recall", "f1", "support"])
        writer.writeheader()
        writer.writerows(report)
    matrix = confusion_matrix(labels.numpy(), logits.argmax(dim=1).numpy(), labels=list(range(len(class_names))))
    np.savetxt(run_dir / f"confusion_{tag}.csv", matrix, fmt="%d", delimiter=",")
    save_confusion_png(matrix, class_names, run_dir / f"confusion_{tag}.png", False, f"confusion, {tag}")
    save_confusion_png(matrix, class_names, run_dir / f"confusion_{tag}_normalized.png", True, f"confusion, {tag}")
    (run_dir / f"metrics_{tag}.json").write_text(json.dumps(metrics, indent=2))


def evaluate(run: str | Path, split: str = "test", data: str | None = None, device: str = "auto",
             batch_size: int = 256, quiet: bool = False) -> dict[str, float]:
    """Evaluate a run's model on one split of its own data, or of another dataset (`data`) with the
    same class names (distribution shift). Writes predictions, the per-class report and confusion
    matrices into the run folder, tagged `<split>` or `<dataset>_<split>`.

    Returns:
        metrics: loss, acc1, acc5, balanced_acc, macro_f1, n.
    Raises:
        ImgclsError: no such split, or class names the model does not know.
    """
    from imgcls.data import build_datasets, default_workers, make_loader, read_splits_csv, resolve_source
    from imgcls.data.sources import DataSource
    from imgcls.predict import load

    classifier = load(run, device)
    # outputs go to the run folder; for a bare model.safetensors, to the folder that holds it
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    config = classifier.metadata["config"]
    if data is None:
        splits_csv = run_dir / "splits.csv"
        source = read_splits_csv(splits_csv, config["data"]["path"]) if splits_csv.exists() else None
        if source is None:
            raise ImgclsError(f"{run_dir} has no splits.csv; pass --data to say what to evaluate")
        tag = split
    else:
        source = resolve_source(data)
        if source.unsplit:  # a plain folder of class folders: evaluate on all of it
            source = DataSource(name=source.name, splits={split: source.unsplit}, origin=source.origin)
        tag = f"{Path(source.name).name}_{split}"
    if split not in source.splits:
        available = ", ".join(sorted(source.splits)) or "none"
        raise ImgclsError(f"no '{split}' split in {source.origin or source.name}; available: {available}")
    samples = source.splits[split]
    unknown = sorted({label for _, label in samples} - set(classifier.class_names))
    if unknown:
        raise ImgclsError(
            f"class '{unknown[0]}' in {source.origin or source.name} is not one the model knows "
            f"({', '.join(classifier.class_names[:10])}{'...' if len(classifier.class_names) > 10 else ''}); "
            "the evaluation data must use the training class names"
        )
    # the run's own data: all its splits, so the decoded-image cache built for training is reused as is
    splits = source.splits if data is None else {split: samples}
    prepared = build_datasets(splits, classifier.class_names, classifier.image_size, classifier.resize, cache="auto")
    dataset = prepared.datasets[split]
    loader = make_loader(dataset, batch_size, workers=0 if prepared.cached else default_workers(False), shuffle=False)
    logits, labels = predict_loader(classifier.model, loader, classifier.runtime)
    metrics = compute_metrics(logits, labels)
    report = per_class_report(logits, labels, classifier.class_names)
    _write_outputs(run_dir, tag, dataset.paths, logits, labels, classifier.class_names, metrics, report)
    if not quiet:
        _print_report(report, metrics, f"{Path(source.name).name} {split}" if data else f"{split}")
    return metrics
