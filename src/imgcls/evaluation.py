"""Evaluation of a split: loss, top-1/top-5, balanced accuracy, macro-F1, AUROC, a per-class report,
confusion matrices, `predictions_<split>.csv`, the error analysis and calibration (imgcls.analyze),
explanations (imgcls.explain); and the temperature calibration stored in the model artifact."""

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
from imgcls.tracking import RunFolder

__all__ = ["predict_loader", "compute_metrics", "per_class_report", "evaluate", "calibrate", "save_curves",
           "predict_split",
           "save_confusion_png"]

log = logging.getLogger("imgcls")


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader: DataLoader, runtime: Runtime, tta: str | None = None,
                   flip: bool = True, task=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits as float32 on CPU, labels) over a whole loader, in eval mode.

    With `tta` ("flip" or "crops", see `imgcls.prediction.augmented_views`; `flip=False` leaves the mirror
    image out; a model with `test_time_flip` mirrors each view itself, one with `test_time_shifts` makes
    every view itself), the logits are the log of the softmax averaged over the views: their softmax is the
    test-time-augmented probability, and every metric reads them as it reads plain logits (for a multi-label `task`, the logits of the sigmoids
    averaged over the views)."""
    from imgcls.prediction import augmented_views
    from imgcls.tasks import SingleLabel

    task = task or SingleLabel()
    model.eval()
    mirrored, shifted = getattr(model, "test_time_flip", False), getattr(model, "test_time_shifts", False)
    all_logits, all_labels = [], []
    for images, labels in loader:
        views = [images] if tta is None else [torch.from_numpy(view) for view in augmented_views(images.numpy(), tta, flip, mirrored, shifted)]
        outputs = []
        for view in views:
            with runtime.autocast():
                outputs.append(model(runtime.to_device(view)).float().cpu())
        all_logits.append(outputs[0] if len(outputs) == 1 else task.average_views(outputs))
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


def _write_outputs(run_dir: Path, tag: str, paths: list[str], probabilities: torch.Tensor, labels: torch.Tensor,
                   class_names: list[str], metrics: dict[str, float], report: list[dict[str, Any]]) -> None:
    """predictions_<tag>.csv (calibrated probabilities: what `predict` answers), the per-class report,
    confusion matrices (CSV and PNG) and metrics_<tag>.json."""
    from sklearn.metrics import confusion_matrix

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
    matrix = confusion_matrix(labels.numpy(), probabilities.argmax(dim=1).numpy(), labels=list(range(len(class_names))))
    np.savetxt(run_dir / f"confusion_{tag}.csv", matrix, fmt="%d", delimiter=",")
    save_confusion_png(matrix, class_names, run_dir / f"confusion_{tag}.png", False, f"confusion, {tag}")
    save_confusion_png(matrix, class_names, run_dir / f"confusion_{tag}_normalized.png", True, f"confusion, {tag}")
    (run_dir / f"metrics_{tag}.json").write_text(json.dumps(metrics, indent=2))


def _analyse(run_dir: Path, tag: str, paths: list[str], logits: torch.Tensor, labels: torch.Tensor,
             class_names: list[str], report: list[dict[str, Any]], calibration: dict[str, Any],
             image_size: int) -> dict[str, Any]:
    """Error analysis and calibration of one evaluated split: writes analysis_<tag>.json, the
    reliability diagram and the two galleries of mistakes; returns the analysis."""
    from imgcls import analyze

    probabilities = torch.softmax(logits, dim=1)
    temperature = float(calibration.get("temperature") or 1.0)
    calibrated = analyze.calibrated_probabilities(logits, temperature)
    areas = analyze.auroc(probabilities, labels, len(class_names))
    per_class_auroc = dict(zip(class_names, areas["per_class"]))
    highest_loss = analyze.mistakes(logits, labels, paths, class_names, order="loss", limit=16)
    most_confident = analyze.mistakes(logits, labels, paths, class_names, order="confidence", limit=16)
    analysis = {
        "split": tag,
        "auroc": {"macro": areas["macro"], "per_class": per_class_auroc},
        "most_confused": analyze.most_confused(labels, probabilities.argmax(dim=1), class_names, limit=10),
        "errors": analyze.error_summary(logits, labels),
        "per_class": sorted(({**row, "auroc": per_class_auroc[row["class"]]} for row in report),
                            key=lambda row: (row["f1"], row["class"])),
        "highest_loss": highest_loss,
        "most_confident": most_confident,
        "calibration": {
            "temperature": temperature,
            "fitted_on": calibration.get("fitted_on"),
            "bins": 15,
            "before": {"nll": analyze.negative_log_likelihood(logits, labels),
                       "ece": analyze.expected_calibration_error(probabilities, labels)},
            "after": {"nll": analyze.negative_log_likelihood(logits, labels, temperature),
                      "ece": analyze.expected_calibration_error(calibrated, labels)},
            "reject": calibration.get("reject"),
        },
    }
    (run_dir / f"analysis_{tag}.json").write_text(json.dumps(analysis, indent=2))
    curves = {"before (T=1)": probabilities}
    if temperature != 1.0:
        curves[f"after (T={temperature:.2f})"] = calibrated
    analyze.save_reliability_diagram(curves, labels, run_dir / f"reliability_{tag}.png", title=f"reliability, {tag}")
    size = max(64, min(128, image_size))
    analyze.save_gallery(highest_loss, run_dir / f"mistakes_loss_{tag}.png", f"highest-loss mistakes, {tag}", size)
    analyze.save_gallery(most_confident, run_dir / f"mistakes_confident_{tag}.png",
                         f"most confident mistakes, {tag}", size)
    return analysis


def _explain(run_dir: Path, tag: str, classifier, dataset, logits: torch.Tensor, labels: torch.Tensor,
             layer: str | None, batch_size: int) -> None:
    """Grad-CAM of correct and wrong predictions, a layer's activation maps and a t-SNE of the
    penultimate features (gradcam_<tag>.png, activations_<tag>.png, projection_<tag>.png)."""
    from imgcls import explain
    from imgcls.data import make_loader

    model, names = classifier.model, classifier.class_names
    probabilities = torch.softmax(logits / classifier.temperature, dim=1)
    confidence, predicted = probabilities.max(dim=1)
    rows = [{"path": path, "true": names[t], "predicted": names[p], "confidence": float(c), "predicted_index": int(p)}
            for path, t, p, c in zip(dataset.paths, labels.tolist(), predicted.tolist(), confidence.tolist())]
    correct, wrong = explain.choose_gallery_rows(rows, count=8)
    chosen = correct + wrong
    explain.save_gradcam_gallery(model, chosen, names, classifier.image_size, classifier.resize,
                                 run_dir / f"gradcam_{tag}.png", f"Grad-CAM, {tag}: correct and wrong predictions")
    explain.save_activation_maps(model, [row["path"] for row in chosen[:3]], classifier.image_size, classifier.resize,
                                 run_dir / f"activations_{tag}.png", layer_name=layer)
    # a seeded shuffle: the split may be stored class by class, and the projection takes its first images
    loader = make_loader(dataset, batch_size, workers=0, shuffle=True, generator=torch.Generator().manual_seed(0))
    features, feature_labels = explain.penultimate_features(model, loader, classifier.runtime.device, limit=2000)
    points, kept = explain.project_2d(features, "tsne", seed=0)
    explain.save_projection(points, feature_labels[kept], names, run_dir / f"projection_{tag}.png",
                            f"t-SNE of penultimate features, {tag}")


def save_curves(run_dir: Path, monitor: str = "val_acc1") -> dict[str, Any] | None:
    """curves.png from the run's metrics.csv (None when the folder has none); returns best and
    overfitting epochs."""
    from imgcls.analyze import save_training_curves
    from imgcls.tracking import read_metrics

    if not RunFolder(run_dir).metrics.exists():
        return None
    rows = read_metrics(RunFolder(run_dir).metrics)
    if not rows:
        return None
    return save_training_curves(rows, run_dir / "curves.png", monitor=monitor)


def _run_folder(run: str | Path) -> Path:
    """Outputs go to the run folder; for a bare model.safetensors, to the folder that holds it."""
    return Path(run) if Path(run).is_dir() else Path(run).parent


def predict_split(classifier, run_dir: Path, split: str, data: str | None, batch_size: int):
    """Predict one split of the run's own data (its splits.csv) or of another dataset `data`.

    Returns:
        (dataset, logits, labels, tag, title).
    """
    from imgcls.data import build_datasets, default_workers, make_loader, read_splits_csv, resolve_source
    from imgcls.data.sources import as_task, labels_of

    config = classifier.metadata["config"]
    separator = config["data"].get("label_separator", "|")
    if data is None:
        splits_csv = RunFolder(run_dir).splits
        source = read_splits_csv(splits_csv, config["data"]["path"], separator) if splits_csv.exists() else None
        if source is None:
            raise ImgclsError(f"{run_dir} has no splits.csv; pass --data to say what to evaluate")
        tag = split
    else:
        source = as_task(resolve_source(data, separator), classifier.task.name)
        if source.unsplit:  # a plain folder of class folders: evaluate on all of it
            source = source.replace(splits={split: source.unsplit}, unsplit=[])
        tag = f"{Path(source.name).name}_{split}"
    if split not in source.splits:
        available = ", ".join(sorted(source.splits)) or "none"
        raise ImgclsError(f"no '{split}' split in {source.origin or source.name}; available: {available}")
    samples = source.splits[split]
    unknown = sorted({name for _, label in samples for name in labels_of(label)} - set(classifier.class_names))
    if unknown:
        raise ImgclsError(
            f"class '{unknown[0]}' in {source.origin or source.name} is not one the model knows "
            f"({', '.join(classifier.class_names[:10])}{'...' if len(classifier.class_names) > 10 else ''}); "
            "the evaluation data must use the training class names"
        )
    # the run's own data: all its splits, so the decoded-image cache built for training is reused as is
    splits = source.splits if data is None else {split: samples}
    prepared = build_datasets(splits, classifier.class_names, classifier.image_size, classifier.resize, cache="auto",
                              task=classifier.task.name)
    dataset = prepared.datasets[split]
    loader = make_loader(dataset, batch_size, workers=0 if prepared.cached else default_workers(False), shuffle=False)
    logits, labels = predict_loader(classifier.model, loader, classifier.runtime, task=classifier.task)
    title = f"{Path(source.name).name} {split}" if data else split
    return dataset, logits, labels, tag, title


def calibrate(run: str | Path, device: str = "auto", target_precision: float = 0.95,
              batch_size: int = 256) -> dict[str, Any]:
    """Fit a softmax temperature on the run's validation split (Guo et al. 2017: one number, so the
    predicted classes never change) and choose the confidence threshold of `predict --reject auto`
    for `target_precision` on the calibrated probabilities; both are stored in the model artifact.
    A multi-label model gets one decision threshold per label instead (the one maximising the label's
    F1 on val; 0.5 for a label without positives there).

    Returns:
        the stored calibration: temperature, val NLL/ECE before and after, reject {threshold,
        precision, coverage, target_precision}; multi-label: temperature 1, thresholds, val_f1_micro.
    """
    from imgcls.checkpoint import load_artifact, save_artifact
    from imgcls.prediction import find_artifact, load

    classifier = load(run, device)
    _, logits, labels, _, _ = predict_split(classifier, _run_folder(run), "val", None, batch_size)
    calibration = classifier.task.calibrate(logits, labels, target_precision)
    artifact = find_artifact(run)
    state_dict, metadata = load_artifact(artifact)
    metadata["calibration"] = calibration
    save_artifact(artifact, state_dict, metadata)
    return calibration


def temperature_calibration(logits: torch.Tensor, labels: torch.Tensor, target_precision: float) -> dict[str, Any]:
    """The single-label calibration that `calibrate` stores (see there)."""
    from imgcls import analyze

    errors = int((logits.argmax(dim=1) != labels).sum())
    # a temperature fitted on a split without errors only sharpens (T < 1): overconfident on new data
    temperature = analyze.fit_temperature(logits, labels) if errors and len(labels) >= 20 else 1.0
    calibrated = analyze.calibrated_probabilities(logits, temperature)
    calibration = {
        "temperature": temperature,
        "fitted_on": "val" if temperature != 1.0 else "none (val has fewer than 20 images or no errors)",
        "val_nll": {"before": analyze.negative_log_likelihood(logits, labels),
                    "after": analyze.negative_log_likelihood(logits, labels, temperature)},
        "val_ece": {"before": analyze.expected_calibration_error(torch.softmax(logits, dim=1), labels),
                    "after": analyze.expected_calibration_error(calibrated, labels)},
        "reject": analyze.rejection_threshold(calibrated, labels, target_precision),
    }
    return calibration


def evaluate(run: str | Path, split: str = "test", data: str | None = None, device: str = "auto",
             batch_size: int = 256, quiet: bool = False, explain: bool = True, layer: str | None = None,
             tta: str | None = None) -> dict[str, Any]:
    """Evaluate a run's model on one split of its own data, or of another dataset (`data`) with the
    same class names (distribution shift). Writes into the run folder, tagged `<split>` or
    `<dataset>_<split>`: predictions, the per-class report, confusion matrices, the error analysis
    and calibration (analysis_<tag>.json, galleries, reliability diagram), training curves and, with
    `explain`, Grad-CAM, the activation maps of `layer` and a t-SNE of the features. With `tta` ("flip"
    or "crops"), the split is predicted a second time with test-time augmentation, and the metrics
    gain a `tta` entry (mode, views, acc1, acc5, balanced_acc, macro_f1, loss) beside the plain ones.

    Returns:
        metrics: loss, acc1, acc5, balanced_acc, macro_f1, n, auroc_macro, ece, and with the stored
        temperature: temperature, nll_calibrated, ece_calibrated; with `tta`, tta.
    Raises:
        ImgclsError: no such split, class names the model does not know, or an unknown layer.
    """
    from imgcls.prediction import load

    classifier = load(run, device)
    run_dir = _run_folder(run)
    dataset, logits, labels, tag, title = predict_split(classifier, run_dir, split, data, batch_size)
    if classifier.task.name == "multi":
        from imgcls.multilabel import evaluate_split

        metrics = evaluate_split(classifier, run_dir, tag, title, dataset, logits, labels, explain, quiet)
        if tta:
            metrics["tta"] = _tta_metrics(classifier, dataset, batch_size, tta)
            (run_dir / f"metrics_{tag}.json").write_text(json.dumps(metrics, indent=2))
        save_curves(run_dir, classifier.metadata["config"]["train"]["monitor"])
        return metrics
    metrics = compute_metrics(logits, labels)
    report = per_class_report(logits, labels, classifier.class_names)
    calibration = classifier.metadata.get("calibration") or {}
    analysis = _analyse(run_dir, tag, dataset.paths, logits, labels, classifier.class_names, report, calibration,
                        classifier.image_size)
    metrics.update({
        "auroc_macro": analysis["auroc"]["macro"],
        "ece": analysis["calibration"]["before"]["ece"],
        "temperature": analysis["calibration"]["temperature"],
        "nll_calibrated": analysis["calibration"]["after"]["nll"],
        "ece_calibrated": analysis["calibration"]["after"]["ece"],
    })
    if tta:
        metrics["tta"] = _tta_metrics(classifier, dataset, batch_size, tta)
    probabilities = torch.softmax(logits / classifier.temperature, dim=1)
    _write_outputs(run_dir, tag, dataset.paths, probabilities, labels, classifier.class_names, metrics, report)
    save_curves(run_dir, classifier.metadata["config"]["train"]["monitor"])
    if explain:
        _explain(run_dir, tag, classifier, dataset, logits, labels, layer, batch_size)
    if not quiet:
        _print_report(report, metrics, title)
        _print_analysis(analysis)
        if tta:
            plain, augmented = metrics, metrics["tta"]
            log.info(f"with TTA ({tta}, {augmented['views']} views): acc1 {augmented['acc1']:.4f} (without "
                     f"{plain['acc1']:.4f})  macro_f1 {augmented['macro_f1']:.4f} (without {plain['macro_f1']:.4f})  "
                     f"loss {augmented['loss']:.4f} (without {plain['loss']:.4f})")
    return metrics


def _tta_metrics(classifier, dataset, batch_size: int, tta: str) -> dict[str, Any]:
    """The split's metrics with test-time augmentation (see `predict_loader`)."""
    from imgcls.data import make_loader
    from imgcls.prediction import augmented_views

    if not classifier.flip_allowed:
        log.info("TTA without the mirror image: the model was trained with data.horizontal_flip=false")
    if classifier.test_time_shifts:
        log.info("the model averages each image with its shifted crops itself (tta: crops in its artifact, "
                 f"model.tta): its plain figures are already crops TTA's, and --tta {tta} adds nothing")
    elif classifier.test_time_flip:
        log.info("the model averages each image with its mirror image itself (tta: flip in its artifact, "
                 "model.tta): its plain figures are already flip TTA's" + (", and --tta flip adds nothing" if tta == "flip" else ""))
    loader = make_loader(dataset, batch_size, workers=0, shuffle=False)
    task = classifier.task
    logits, labels = predict_loader(classifier.model, loader, classifier.runtime, tta, classifier.flip_allowed, task)
    views = len(augmented_views(np.zeros((1, 3, 4, 4), np.uint8), tta, classifier.flip_allowed, classifier.test_time_flip,
                                classifier.test_time_shifts))
    views *= classifier.model.test_time_views
    figures = task.metrics(logits, labels, task.decision(classifier.metadata, None, None))
    return {"mode": tta, "views": views, "flip": classifier.flip_allowed,
            **{key: value for key, value in figures.items() if key != "n"}}


def _print_analysis(analysis: dict[str, Any]) -> None:
    errors, calibration = analysis["errors"], analysis["calibration"]
    pairs = ", ".join(f"{row['class_a']} / {row['class_b']} {row['a_as_b']}+{row['b_as_a']}"
                      for row in analysis["most_confused"][:3])
    if pairs:
        log.info(f"most confused: {pairs}")
    if errors["errors"]:
        log.info(f"{errors['errors']} errors: {errors['errors_true_in_top5_share']:.0%} have the true class in the "
                 f"top 5, {errors['confident_errors_share']:.0%} were made with confidence >= 0.9")
    before, after = calibration["before"], calibration["after"]
    line = f"calibration: ECE {before['ece']:.4f}, NLL {before['nll']:.4f}"
    if calibration["temperature"] != 1.0:
        line += f"; with temperature {calibration['temperature']:.2f}: ECE {after['ece']:.4f}, NLL {after['nll']:.4f}"
    log.info(line)
