"""Error analysis, calibration and training-curve figures for an evaluated split.

Everything here is a pure function of what `imgcls.evaluation.predict_loader` returns (logits N x C,
labels N) plus the class names and image paths, so it is tested without a model. The vocabulary
follows fastai's ClassificationInterpretation (`most_confused`, top losses) and MMPretrain's
analysis tools; calibration follows Guo et al. 2017, "On Calibration of Modern Neural Networks".

Arguments a user can choose (an ordering, a bin count, a target precision, a monitored metric) raise
`ImgclsError` when invalid; inputs of mismatched shapes are programming errors and raise `ValueError`.
"""

from __future__ import annotations

import logging

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from imgcls.errors import ImgclsError

log = logging.getLogger("imgcls")

__all__ = [
    "read_thumbnail", "short_name",
    # error analysis
    "auroc", "most_confused", "error_summary", "mistakes", "save_gallery",
    # calibration
    "calibrated_probabilities", "expected_calibration_error", "reliability_curve", "fit_temperature",
    "negative_log_likelihood", "save_reliability_diagram",
    # open-set rejection
    "rejection_threshold",
    # training curves
    "overfitting_epoch", "save_training_curves",
]

TOP_K = 5  # "is the true class still among the top-5?" for errors (clipped to the class count)
CONFIDENT = 0.9  # a mistake made with a softmax confidence at or above this is a "confident error"
TEMPERATURE_RANGE = (0.05, 20.0)  # fitted temperatures are clamped here: beyond, the fit is degenerate
FIGURE_DPI = 110  # the same as the confusion matrices in evaluation.py

Array = np.ndarray | torch.Tensor


def _numpy(values: Array | list, dtype: type) -> np.ndarray:
    """A numpy copy of a tensor, array or list (tensors may live on any device)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _check_pair(scores: np.ndarray, labels: np.ndarray, what: str) -> None:
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"{what} must be N x C and labels N; got {scores.shape} and {labels.shape}")


def _check_bins(bins: int) -> None:
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ImgclsError(f"calibration bins must be a positive whole number, got {bins!r}; 15 is the usual choice")


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported here: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------------
# error analysis
# ----------------------------------------------------------------------------------------------------

def auroc(probabilities: Array, labels: Array, num_classes: int) -> dict[str, Any]:
    """One-vs-rest area under the ROC curve of every class, and their mean.

    Args:
        probabilities: N x C softmax outputs (any monotone score per class works: logits give the same AUROC).
        labels: N true class indices.
        num_classes: C; classes beyond the columns of `probabilities` are an error.

    Returns:
        {"per_class": [AUROC or None per class], "macro": mean of the defined ones or None}. A class is
        None when the labels hold no positives or no negatives for it (AUROC is undefined there), which
        is common on a small test split; the macro mean skips those classes rather than counting them as 0.5.
    """
    from sklearn.metrics import roc_auc_score

    scores, truth = _numpy(probabilities, np.float64), _numpy(labels, np.int64)
    _check_pair(scores, truth, "probabilities")
    if scores.shape[1] != num_classes:
        raise ValueError(f"probabilities have {scores.shape[1]} columns for {num_classes} classes")
    per_class: list[float | None] = []
    for index in range(num_classes):
        positives = truth == index
        if positives.all() or not positives.any():
            per_class.append(None)
        else:
            per_class.append(float(roc_auc_score(positives, scores[:, index])))
    defined = [value for value in per_class if value is not None]
    return {"per_class": per_class, "macro": float(np.mean(defined)) if defined else None}


def most_confused(labels: Array, predicted: Array, class_names: list[str],
                  limit: int | None = 10) -> list[dict[str, Any]]:
    """The class pairs the model mixes up most, both directions in one row (fastai's `most_confused`,
    which lists each direction separately).

    Args:
        labels: N true class indices.
        predicted: N predicted class indices (argmax of the logits).
        class_names: name of every class index.
        limit: at most this many rows; None for every pair that was confused at least once.

    Returns:
        Rows ordered by `total` (then by the larger direction, then by class index, so ties are
        deterministic): class_a, class_b, a_as_b (true a predicted b), a_as_b_rate (a_as_b / the number
        of true a), b_as_a, b_as_a_rate, total. In each row class_a is the class more often taken for
        the other (the lower index on a tie). Pairs never confused are left out.
    """
    truth, guesses = _numpy(labels, np.int64), _numpy(predicted, np.int64)
    if truth.shape != guesses.shape or truth.ndim != 1:
        raise ValueError(f"labels and predicted must both be N; got {truth.shape} and {guesses.shape}")
    count = len(class_names)
    # confusion[i, j]: true i predicted j
    confusion = np.bincount(truth * count + guesses, minlength=count * count).reshape(count, count)
    support = confusion.sum(axis=1)
    pairs = []
    for first in range(count):
        for second in range(first + 1, count):
            forward, backward = int(confusion[first, second]), int(confusion[second, first])
            if forward + backward == 0:
                continue
            # the direction with more confusions reads first: "a is taken for b 12 times (and b for a 3)"
            a, b = (first, second) if forward >= backward else (second, first)
            pairs.append((-(forward + backward), -max(forward, backward), first, second, a, b))
    rows = []
    for *_, a, b in sorted(pairs)[:limit]:
        a_as_b, b_as_a = int(confusion[a, b]), int(confusion[b, a])
        rows.append({
            "class_a": class_names[a], "class_b": class_names[b],
            "a_as_b": a_as_b, "a_as_b_rate": a_as_b / support[a] if support[a] else 0.0,
            "b_as_a": b_as_a, "b_as_a_rate": b_as_a / support[b] if support[b] else 0.0,
            "total": a_as_b + b_as_a,
        })
    return rows


def error_summary(logits: Array, labels: Array) -> dict[str, Any]:
    """How the errors of a split look: near misses (true class still in the top-5) and confident ones.

    Args:
        logits: N x C model outputs.
        labels: N true class indices.

    Returns:
        n, errors, error_rate; errors_true_in_top5 and errors_true_in_top5_share (of the errors, with
        top_k = min(5, C): with 5 classes or fewer the share is trivially 1.0); confident_errors and
        confident_errors_share (errors whose top softmax probability is >= 0.9). Shares and rates are
        None when there is nothing to divide by (no samples, or no errors).
    """
    scores, truth = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.int64)
    _check_pair(scores, truth, "logits")
    probabilities = torch.softmax(scores, dim=1)
    confidence, predicted = probabilities.max(dim=1)
    wrong = predicted != truth
    top_k = min(TOP_K, scores.shape[1])
    in_top_k = (scores.topk(top_k, dim=1).indices == truth[:, None]).any(dim=1)
    total, errors = len(truth), int(wrong.sum())
    near_misses = int((wrong & in_top_k).sum())
    confident = int((wrong & (confidence >= CONFIDENT)).sum())
    return {
        "n": total, "errors": errors, "error_rate": errors / total if total else None,
        "top_k": top_k,
        "errors_true_in_top5": near_misses, "errors_true_in_top5_share": near_misses / errors if errors else None,
        "confident_errors": confident, "confident_errors_share": confident / errors if errors else None,
    }


def mistakes(logits: Array, labels: Array, paths: list[str], class_names: list[str],
             order: Literal["loss", "confidence"] = "loss", limit: int | None = 16) -> list[dict[str, Any]]:
    """The wrong predictions, worst first (fastai's `top_losses`, restricted to errors).

    Args:
        logits: N x C model outputs.
        labels: N true class indices.
        paths: N image files, in the order of the logits.
        class_names: name of every class index.
        order: "loss": highest cross-entropy first (the true class got the least probability);
            "confidence": most confident wrong prediction first.
        limit: at most this many rows; None for all errors.

    Returns:
        Rows of index (position in the split), path, true, predicted, confidence (of the wrong
        prediction), true_probability and loss (cross-entropy, nats). Equal keys keep split order.

    Raises:
        ImgclsError: an unknown `order`.
    """
    if order not in ("loss", "confidence"):
        raise ImgclsError(f"unknown mistakes order '{order}'; use loss or confidence")
    scores, truth = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.int64)
    _check_pair(scores, truth, "logits")
    if len(paths) != len(truth):
        raise ValueError(f"{len(paths)} paths for {len(truth)} predictions")
    log_probabilities = torch.log_softmax(scores, dim=1)
    confidence, predicted = log_probabilities.exp().max(dim=1)
    true_log_probability = log_probabilities.gather(1, truth[:, None])[:, 0]
    wrong = torch.nonzero(predicted != truth)[:, 0].numpy()
    key = -true_log_probability if order == "loss" else confidence
    ranked = wrong[np.argsort(-key.numpy()[wrong], kind="stable")][:limit].tolist()
    truth, predicted, confidence = truth.tolist(), predicted.tolist(), confidence.tolist()
    true_log_probability = true_log_probability.tolist()
    return [
        {
            "index": index, "path": str(paths[index]),
            "true": class_names[truth[index]], "predicted": class_names[predicted[index]],
            "confidence": confidence[index], "true_probability": math.exp(true_log_probability[index]),
            "loss": -true_log_probability[index],
        }
        for index in ranked
    ]


def read_thumbnail(path: str | Path, image_size: int, resize: str) -> np.ndarray | None:
    """The image as the model sees it (HWC uint8), or None when the file cannot be decoded (moved,
    truncated): the figures draw a grey tile instead of failing."""
    from PIL import Image

    from imgcls.data.images import load_square

    try:
        return load_square(path, image_size, resize)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        log.warning("cannot read %s (%s); drawing a grey tile", path, error)
        return None


def short_name(path: str | Path, width: int = 24) -> str:
    """The file name, cut in the middle when long: the start and the numbered end are what people scan."""
    name = Path(path).name
    if len(name) <= width:
        return name
    keep = (width - 1) // 2
    return name[:keep] + "…" + name[-(width - 1 - keep):]


def save_gallery(rows: list[dict[str, Any]], path: str | Path, title: str, image_size: int = 96,
                 resize: Literal["crop", "pad", "squish"] = "pad", columns: int = 4) -> Path:
    """A PNG grid of images, each captioned "true → predicted", confidence and file name.

    Args:
        rows: dicts with path, true, predicted and confidence, such as `mistakes` returns.
        path: the PNG to write.
        title: shown above the grid.
        image_size: side of each thumbnail in pixels, before the figure's own scaling.
        resize: how thumbnails are made square ("pad" shows the whole image, as the model's preprocessing may not).
        columns: thumbnails per row.

    Returns:
        `path`. A file that cannot be read (moved, truncated) becomes a grey tile marked "unreadable",
        and an empty `rows` gives a figure that says so: a report should not fail on either.

    Raises:
        ImgclsError: an unknown `resize` (checked first: load_square's ValueError would otherwise
            turn every tile "unreadable").
    """
    if resize not in ("crop", "pad", "squish"):
        raise ImgclsError(f"unknown gallery resize '{resize}'; use crop, pad or squish")
    plt = _pyplot()
    columns = max(1, min(columns, len(rows)))
    lines = max(1, math.ceil(len(rows) / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(2.2 * columns, 2.6 * lines + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    if not rows:
        axes[0, 0].text(0.5, 0.5, "nothing to show", ha="center", va="center", fontsize=11)
    for axis, row in zip(axes.flat, rows):
        thumbnail = read_thumbnail(row["path"], image_size, resize)
        if thumbnail is None:
            thumbnail = np.full((image_size, image_size, 3), 128, dtype=np.uint8)
            axis.text(image_size / 2, image_size / 2, "unreadable", ha="center", va="center", color="white", fontsize=9)
        axis.imshow(thumbnail)
        caption = f"{row['true']} → {row['predicted']}\nconfidence {row['confidence']:.2f}\n"
        caption += short_name(row["path"])
        axis.set_title(caption, fontsize=7.5)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------------

def calibrated_probabilities(logits: Array, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) in float64: the one place temperature scaling is applied, so that
    evaluation, threshold selection and prediction see the same confidences to the last bit."""
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=1)


def _bin_statistics(probabilities: Array, labels: Array, bins: int) -> tuple[np.ndarray, ...]:
    """(edges, count, mean confidence, accuracy) per equal-width confidence bin; empty bins hold NaN."""
    _check_bins(bins)
    scores, truth = _numpy(probabilities, np.float64), _numpy(labels, np.int64)
    _check_pair(scores, truth, "probabilities")
    if len(truth) == 0:
        raise ValueError("calibration needs at least one sample")
    confidence = scores.max(axis=1)
    correct = (scores.argmax(axis=1) == truth).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin m holds confidences in (edge[m], edge[m+1]], as in Guo et al.; side="left" makes the upper edge inclusive
    which = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=bins) / count
    return edges, count, mean_confidence, accuracy


def expected_calibration_error(probabilities: Array, labels: Array, bins: int = 15) -> float:
    """Expected calibration error: sum over equal-width confidence bins of
    (samples in bin / N) x |accuracy in bin - mean confidence in bin| (Guo et al. 2017).

    Args:
        probabilities: N x C softmax outputs; confidence is the top probability, the prediction its class.
        labels: N true class indices.
        bins: number of equal-width bins over [0, 1].

    Returns:
        ECE in [0, 1]; 0 is perfectly calibrated.

    Raises:
        ImgclsError: `bins` is not a positive whole number.
    """
    _, count, confidence, accuracy = _bin_statistics(probabilities, labels, bins)
    filled = count > 0
    return float(np.sum(count[filled] / count.sum() * np.abs(accuracy[filled] - confidence[filled])))


def reliability_curve(probabilities: Array, labels: Array, bins: int = 15) -> dict[str, list]:
    """Accuracy against confidence per equal-width bin: the points of a reliability diagram.

    Args:
        probabilities: N x C softmax outputs.
        labels: N true class indices.
        bins: number of equal-width bins over [0, 1].

    Returns:
        {"lower", "upper", "count", "confidence", "accuracy"}: lists of `bins` entries, bin edges,
        samples per bin, mean confidence and accuracy (None for an empty bin).
    """
    edges, count, confidence, accuracy = _bin_statistics(probabilities, labels, bins)
    defined = lambda values: [float(value) if n else None for value, n in zip(values, count)]  # noqa: E731
    return {
        "lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "count": count.tolist(),
        "confidence": defined(confidence), "accuracy": defined(accuracy),
    }


def negative_log_likelihood(logits: Array, labels: Array, temperature: float = 1.0) -> float:
    """Mean cross-entropy (nats) of softmax(logits / temperature), in float64."""
    scores, truth = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.int64)
    _check_pair(scores, truth, "logits")
    return float(torch.nn.functional.cross_entropy(scores / temperature, truth))


def fit_temperature(logits: Array, labels: Array) -> float:
    """The temperature T that minimises the NLL of softmax(logits / T): temperature scaling (Guo et al. 2017).

    Fit it on the validation split and judge it on test; it never changes the predicted class.

    Args:
        logits: N x C model outputs on the validation split.
        labels: N true class indices.

    Returns:
        T clamped to [0.05, 20]; T > 1 softens an overconfident model, T < 1 sharpens an underconfident
        one. On a validation split the model classifies perfectly, sharper is always better: the fit
        returns a T below 1 where the loss stops changing (about 0.5 for margins of 10 logits), a value
        that says little about test data.

    Raises:
        ValueError: no samples.
    """
    scores, truth = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.int64)
    _check_pair(scores, truth, "logits")
    if len(truth) == 0:
        raise ValueError("fitting a temperature needs at least one sample")
    # optimise log T: T stays positive without constraints, and the NLL is far better conditioned in it
    log_temperature = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(scores / log_temperature.exp(), truth)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_temperature.detach().exp())
    if not math.isfinite(temperature):
        temperature = TEMPERATURE_RANGE[1] if log_temperature.item() > 0 else TEMPERATURE_RANGE[0]
    return min(max(temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])


def save_reliability_diagram(curves: dict[str, Array], labels: Array, path: str | Path, bins: int = 15,
                             title: str = "reliability") -> Path:
    """Accuracy against confidence for one or more sets of probabilities over the same labels, e.g.
    {"before (T=1)": p1, "after (T=1.73)": p2}, with the diagonal of perfect calibration, the ECE of
    each in the legend and, below, a histogram of the confidences (where the samples actually are).

    Args:
        curves: legend label -> N x C probabilities.
        labels: N true class indices.
        path: the PNG to write.
        bins: equal-width confidence bins, as in `expected_calibration_error`.
        title: shown above the plot.

    Returns:
        `path`.
    """
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    edges = np.linspace(0.0, 1.0, bins + 1)
    for name, probabilities in curves.items():
        curve = reliability_curve(probabilities, labels, bins)
        filled = [i for i, n in enumerate(curve["count"]) if n]
        ece = expected_calibration_error(probabilities, labels, bins)
        top.plot([curve["confidence"][i] for i in filled], [curve["accuracy"][i] for i in filled],
                 marker="o", markersize=4, label=f"{name}: ECE {ece:.3f}")
        confidence = _numpy(probabilities, np.float64).max(axis=1)
        bottom.hist(confidence, bins=edges, histtype="step", linewidth=1.5, label=name)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_xlabel(f"confidence (top softmax probability, {bins} bins)")
    bottom.set_ylabel("samples")
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# open-set rejection
# ----------------------------------------------------------------------------------------------------

def rejection_threshold(probabilities: Array, labels: Array, target_precision: float = 0.95) -> dict[str, Any]:
    """The lowest confidence threshold at which the accepted predictions reach a target precision.

    A prediction is accepted when its confidence (top probability) is >= threshold and answered
    "unknown" otherwise; the lowest such threshold keeps the most predictions (maximum coverage).
    Precision is not monotone in the threshold, so every distinct confidence is tried; samples of
    equal confidence are accepted or rejected together, which makes the answer deterministic.

    Args:
        probabilities: N x C softmax outputs on the validation split (after temperature scaling when
            prediction applies one: the threshold is a value of those probabilities).
        labels: N true class indices.
        target_precision: required accuracy of the accepted predictions, in (0, 1].

    Returns:
        {threshold, precision, coverage, target_precision, reason}: the threshold, the precision and
        share of samples accepted at it, and reason None. When no threshold reaches the target,
        threshold, precision and coverage are None and reason says what the best achievable was.

    Raises:
        ImgclsError: `target_precision` outside (0, 1].
    """
    if not 0 < target_precision <= 1:
        raise ImgclsError(f"target precision must be in (0, 1], got {target_precision}; 0.95 is the default")
    scores, truth = _numpy(probabilities, np.float64), _numpy(labels, np.int64)
    _check_pair(scores, truth, "probabilities")
    result: dict[str, Any] = {"threshold": None, "precision": None, "coverage": None,
                              "target_precision": target_precision, "reason": None}
    if len(truth) == 0:
        result["reason"] = "no samples to choose a threshold on"
        return result
    confidence = scores.max(axis=1)
    correct = scores.argmax(axis=1) == truth
    ordering = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[ordering], correct[ordering]
    accepted = np.arange(1, len(confidence) + 1)
    precision = np.cumsum(correct) / accepted
    # a threshold equal to a confidence accepts every sample tied with it: only the last of a tie counts
    last_of_tie = np.append(confidence[1:] != confidence[:-1], True)
    candidates = np.flatnonzero(last_of_tie)
    reaching = candidates[precision[candidates] >= target_precision - 1e-12]
    if len(reaching) == 0:
        best = candidates[np.argmax(precision[candidates])]
        result["reason"] = (
            f"no confidence threshold reaches precision {target_precision:g} on these {len(truth)} samples; "
            f"the best is {precision[best]:.3f}, accepting {accepted[best]} samples "
            f"at confidence >= {confidence[best]:.4f}"
        )
        return result
    chosen = reaching[-1]  # sorted by falling confidence: the last position is the lowest threshold
    result.update(threshold=float(confidence[chosen]), precision=float(precision[chosen]),
                  coverage=float(accepted[chosen] / len(truth)))
    return result


# ----------------------------------------------------------------------------------------------------
# training curves
# ----------------------------------------------------------------------------------------------------

def overfitting_epoch(val_losses: list[float], epochs: list[int], tolerance: float = 0.01) -> int | None:
    """The epoch after which validation loss rises and stays up: the onset of overfitting.

    Args:
        val_losses: validation loss per epoch (non-finite values, e.g. from a diverged epoch, are skipped).
        epochs: the epoch number of each loss.
        tolerance: relative margin; a later loss counts as higher only above minimum x (1 + tolerance),
            so noise around a plateau is not called overfitting.

    Returns:
        The epoch of the minimum validation loss (the first one on a tie) when at least the last two
        epochs after it are higher than it by the margin; None when the loss is still at or near
        its minimum at the end (or there are fewer than three epochs).
    """
    if len(val_losses) != len(epochs):
        raise ValueError(f"{len(val_losses)} losses for {len(epochs)} epochs")
    pairs = [(int(epoch), float(loss)) for epoch, loss in zip(epochs, val_losses) if math.isfinite(float(loss))]
    if len(pairs) < 3:
        return None
    losses = [loss for _, loss in pairs]
    lowest = int(np.argmin(losses))  # the first minimum on a tie
    after = losses[lowest + 1:]
    margin = losses[lowest] + tolerance * abs(losses[lowest])
    if len(after) >= 2 and all(loss > margin for loss in after[-2:]):
        return pairs[lowest][0]
    return None


def _metric_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Columns of metrics.csv rows as float arrays (NaN where a row has no value), plus "epoch"."""
    names = list(dict.fromkeys(key for row in rows for key in row))
    columns = {}
    for name in names:
        values = []
        for row in rows:
            value = row.get(name)
            try:
                values.append(float(value) if value not in (None, "") else math.nan)
            except (TypeError, ValueError):  # a text column (none today): not plottable
                values.append(math.nan)
        columns[name] = np.asarray(values)
    return columns


def save_training_curves(rows: list[dict[str, Any]], path: str | Path, monitor: str = "val_acc1",
                         best_epoch: int | None = None) -> dict[str, int | None]:
    """Loss and accuracy per epoch, train against val, with the best epoch and the onset of overfitting marked.

    Args:
        rows: metrics.csv rows (values as strings or numbers) with epoch, train_loss, train_acc1,
            val_loss, val_acc1 and optionally val_acc5, val_ema_loss, val_ema_acc1.
        path: the PNG to write.
        monitor: the column that chose the best epoch in training (max, or min for a *loss column);
            used only when `best_epoch` is not given.
        best_epoch: the best epoch as training recorded it (it may come from EMA weights).

    Returns:
        {"best_epoch", "overfit_epoch"}; overfit_epoch is None when validation loss has not risen (see
        `overfitting_epoch`).

    Raises:
        ImgclsError: no rows, or no `monitor` column when the best epoch must be found from it.
    """
    if not rows:
        raise ImgclsError("no epochs to plot: metrics.csv is empty; train for at least one epoch first")
    columns = _metric_columns(rows)
    epochs = columns["epoch"].astype(int)
    if best_epoch is None:
        if monitor not in columns or np.isnan(columns[monitor]).all():
            available = ", ".join(name for name in columns if name.startswith("val_"))
            raise ImgclsError(f"metrics.csv has no '{monitor}' values to find the best epoch; available: {available}")
        values = columns[monitor]
        # nanargmin/nanargmax return the first extreme: training also keeps the first on a tie
        best_epoch = int(epochs[np.nanargmin(values) if monitor.endswith("loss") else np.nanargmax(values)])
    overfit_epoch = overfitting_epoch(columns["val_loss"].tolist(), epochs.tolist()) if "val_loss" in columns else None

    plt = _pyplot()
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((loss_axis, ("train_loss", "val_loss", "val_ema_loss"), "loss"),
              (accuracy_axis, ("train_acc1", "val_acc1", "val_acc5", "val_ema_acc1",  # single-label
                               "train_subset_acc", "val_map", "val_f1_micro", "val_ema_map"), "accuracy / mAP"))
    for axis, names, label in panels:
        for name in names:
            if name in columns and not np.isnan(columns[name]).all():
                # markers: a one-epoch run is a single point, invisible as a line alone
                axis.plot(epochs, columns[name], marker="o", markersize=3, label=name)
        # colours outside the first four of the cycle, which the curves use
        axis.axvline(best_epoch, color="black", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
        if overfit_epoch is not None:
            axis.axvline(overfit_epoch, color="tab:purple", linestyle=":", linewidth=1.5,
                         label=f"val loss rises after epoch {overfit_epoch}")
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    # whole-number epoch ticks; a one-epoch run would otherwise get ticks at 0.96, 0.98 ...
    from matplotlib.ticker import MaxNLocator

    for axis in (loss_axis, accuracy_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs.min() == epochs.max():
            axis.set_xlim(epochs[0] - 1, epochs[0] + 1)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return {"best_epoch": best_epoch, "overfit_epoch": overfit_epoch}
