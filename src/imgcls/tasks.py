"""What single-label and multi-label classification do differently, behind one small interface.

    task = get_task(config.task)        # "single" or "multi" (config.task=auto is resolved from the data)
    targets = task.targets(labels, class_names)     # what the dataset yields
    loss = task.build_loss(config.loss, targets, n)  # cross-entropy / binary cross-entropy / ...
    task.metrics(logits, targets)                   # acc1, ... / map, f1_micro, ...
    task.probabilities(logits)                      # softmax / sigmoid (numpy: prediction needs no torch)
    task.answers(probabilities, class_names, ...)   # the rows of `imgcls predict`

Single-label: one class per image, labels are class indices, softmax, argmax (or "unknown" below a
confidence). Multi-label: any number of classes per image (none included), labels are multi-hot rows,
one sigmoid per class, a label is predicted when its probability reaches that label's threshold
(chosen on val, stored in the artifact). The splits (iterative stratification) are in data/sources.py.

This module imports no torch at import time: `imgcls predict model.onnx` uses it without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from imgcls.errors import ImgclsError

if TYPE_CHECKING:
    import torch

    from imgcls.config import LossConfig

__all__ = ["Task", "SingleLabel", "MultiLabel", "get_task", "UNKNOWN"]

UNKNOWN = "unknown"  # the label of a rejected single-label prediction (`predict --reject`)


class Task:
    name: str
    title: str  # for messages: "single-label", "multi-label"
    exclusive: bool  # the classes exclude each other: softmax, else one sigmoid per class
    agreement_name: str  # what `agreement` measures, as export.json names it
    default_monitor: str
    monitors: tuple[str, ...]
    default_loss: str
    losses: tuple[str, ...]
    train_metric: str  # the training-set accuracy's column in metrics.csv
    headline: tuple[str, ...]  # the metrics of the epoch and evaluation log lines

    def targets(self, labels: Sequence, class_names: list[str]) -> list:
        """What the dataset yields for each sample's label (a class name, or a tuple of them)."""
        raise NotImplementedError

    def class_counts(self, targets: torch.Tensor, classes: int) -> list[int]:
        """Training images per class."""
        raise NotImplementedError

    def build_loss(self, loss_config: LossConfig, targets: torch.Tensor, classes: int) -> torch.nn.Module:
        """The training loss of `loss_config`, weighted by the training `targets` when it asks."""
        from imgcls.losses import build_loss

        return build_loss(loss_config, self.class_counts(targets, classes), len(targets), self.name)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """How many images of the batch are right (as a tensor: no CPU-GPU sync)."""
        raise NotImplementedError

    def average_views(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Logits whose probabilities are the average of the views' (test-time augmentation)."""
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor, thresholds: Sequence[float] | None = None
                ) -> dict[str, float]:
        raise NotImplementedError

    def probabilities(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        raise NotImplementedError

    def empty_row(self, path: str) -> dict[str, Any]:
        """A row of `predict` before (or without: an unreadable file) its answer."""
        raise NotImplementedError

    def calibrate(self, logits: torch.Tensor, targets: torch.Tensor, target_precision: float) -> dict[str, Any]:
        """What `imgcls.evaluation.calibrate` stores in the artifact, fitted on val's logits."""
        raise NotImplementedError

    def decision(self, metadata: dict[str, Any], reject: str | float | None, threshold: float | None):
        """What turns probabilities into answers for a model with `metadata`: a confidence below which a
        single-label prediction is `unknown` (None: never), or one threshold per label."""
        raise NotImplementedError

    def answers(self, probabilities: np.ndarray, class_names: list[str], topk: int, decision: Any
                ) -> list[dict[str, Any]]:
        raise NotImplementedError

    def prediction_columns(self, class_names: list[str], topk: int) -> list[str]:
        """The columns of `imgcls predict`'s CSV."""
        raise NotImplementedError

    def describe(self, target: Any, class_names: list[str]) -> str:
        """A target as text: the class name, or the label set joined by |."""
        raise NotImplementedError

    def right(self, probabilities: np.ndarray, targets: np.ndarray, decision: Any) -> np.ndarray:
        """Per image, whether the answer is right: the top class, or the whole label set."""
        raise NotImplementedError

    def agreement(self, probabilities: np.ndarray, others: np.ndarray, decision: Any) -> float:
        """Share of images two models answer alike (an export against its original)."""
        raise NotImplementedError

    def check_config(self, loss: str, monitor: str, sampler: str) -> None:
        """Settings that do not fit the task: one line naming the key."""
        if loss not in self.losses:
            raise ImgclsError(f"loss.name={loss} is not for {self.name}-label data; use one of {', '.join(self.losses)}")
        if monitor not in self.monitors:
            raise ImgclsError(f"train.monitor={monitor} is not measured for {self.name}-label data; use one of "
                              f"{', '.join(self.monitors)}")


class SingleLabel(Task):
    name = "single"
    title = "single-label"
    exclusive = True
    agreement_name = "top1_agreement"
    default_monitor = "val_acc1"
    monitors = ("val_acc1", "val_loss", "val_balanced_acc", "val_macro_f1")
    default_loss = "ce"
    losses = ("ce", "focal")
    train_metric = "train_acc1"
    headline = ("acc1", "acc5")

    def targets(self, labels: Sequence, class_names: list[str]) -> list[int]:
        index = {name: i for i, name in enumerate(class_names)}
        return [index[label] for label in labels]

    def class_counts(self, targets: torch.Tensor, classes: int) -> list[int]:
        import torch

        return torch.bincount(targets, minlength=classes).tolist()

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(dim=1) == targets).sum()

    def average_views(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        # log(mean_v softmax_v), in log space: a class every view finds unlikely must not give log(0)
        log_probabilities = torch.stack([torch.log_softmax(output, dim=1) for output in outputs])
        return torch.logsumexp(log_probabilities, dim=0) - np.log(len(outputs))

    def metrics(self, logits, targets, thresholds=None) -> dict[str, float]:
        from imgcls.evaluation import compute_metrics

        return compute_metrics(logits, targets)

    def probabilities(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        scaled = logits.astype(np.float64) / temperature
        scaled -= scaled.max(axis=1, keepdims=True)
        exponentials = np.exp(scaled)
        return (exponentials / exponentials.sum(axis=1, keepdims=True)).astype(np.float32)

    def empty_row(self, path: str) -> dict[str, Any]:
        return {"path": path, "label": "", "confidence": None, "error": ""}

    def calibrate(self, logits, targets, target_precision) -> dict[str, Any]:
        """A softmax temperature and the confidence threshold of `predict --reject auto`."""
        from imgcls.evaluation import temperature_calibration

        return temperature_calibration(logits, targets, target_precision)

    def decision(self, metadata, reject, threshold) -> float | None:
        if threshold is not None:
            raise ImgclsError("--threshold is for multi-label models; for a single-label one use --reject")
        if reject is None:
            return None
        if reject == "auto":
            stored = (metadata.get("calibration") or {}).get("reject") or {}
            if stored.get("threshold") is None:
                reason = stored.get("reason", "it was trained before imgcls stored one")
                raise ImgclsError(f"--reject auto: this model has no stored threshold ({reason}); "
                                  "give a confidence instead, e.g. --reject 0.8")
            return float(stored["threshold"])
        try:
            value = float(reject)
        except ValueError:
            raise ImgclsError(f"--reject {reject}: use auto or a confidence between 0 and 1") from None
        if not 0 < value < 1:
            raise ImgclsError(f"--reject {reject}: use auto or a confidence between 0 and 1")
        return value

    def answers(self, probabilities, class_names, topk, decision) -> list[dict[str, Any]]:
        """label, confidence and label_k/prob_k for each row (`unknown` below the `decision` confidence)."""
        topk = max(1, min(topk, len(class_names)))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :topk]
        rows = []
        for values, indices in zip(np.take_along_axis(probabilities, order, axis=1).tolist(), order.tolist()):
            accepted = decision is None or values[0] >= decision
            row: dict[str, Any] = {"label": class_names[indices[0]] if accepted else UNKNOWN, "confidence": values[0]}
            for rank, (value, index) in enumerate(zip(values, indices), start=1):
                row[f"label_{rank}"], row[f"prob_{rank}"] = class_names[index], value
            rows.append(row)
        return rows

    def describe(self, target, class_names) -> str:
        return class_names[int(target)]

    def right(self, probabilities, targets, decision) -> np.ndarray:
        return probabilities.argmax(axis=1) == targets

    def agreement(self, probabilities, others, decision) -> float:
        return float(np.mean(probabilities.argmax(axis=1) == others.argmax(axis=1)))

    def prediction_columns(self, class_names, topk) -> list[str]:
        columns = ["path", "label", "confidence"]
        for rank in range(1, topk + 1):
            columns += [f"label_{rank}", f"prob_{rank}"]
        return columns + ["error"]


class MultiLabel(Task):
    name = "multi"
    title = "multi-label"
    exclusive = False
    agreement_name = "label_set_agreement"
    default_monitor = "val_map"
    monitors = ("val_map", "val_loss", "val_f1_micro", "val_f1_macro", "val_subset_acc")
    default_loss = "bce"
    losses = ("bce", "asl", "focal")
    train_metric = "train_subset_acc"
    headline = ("map", "f1_micro", "f1_macro", "subset_acc")

    def targets(self, labels: Sequence, class_names: list[str]) -> list[list[int]]:
        index = {name: i for i, name in enumerate(class_names)}
        rows = []
        for label in labels:
            row = [0] * len(class_names)
            for name in label:
                row[index[name]] = 1
            rows.append(row)
        return rows

    def class_counts(self, targets: torch.Tensor, classes: int) -> list[int]:
        return targets.sum(dim=0).long().tolist()

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # the whole label set right (subset accuracy) at probability 0.5; mixed targets round to their majority
        return ((logits > 0) == (targets > 0.5)).all(dim=1).sum()

    def average_views(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        probabilities = torch.stack([torch.sigmoid(output) for output in outputs]).mean(dim=0)
        return torch.logit(probabilities.clamp(1e-7, 1 - 1e-7))

    def metrics(self, logits, targets, thresholds=None) -> dict[str, float]:
        from imgcls.multilabel import compute_metrics

        return compute_metrics(logits, targets, thresholds)

    def probabilities(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float64) / temperature))).astype(np.float32)

    def empty_row(self, path: str) -> dict[str, Any]:
        return {"path": path, "labels": "", "label_set": [], "error": ""}

    def calibrate(self, logits, targets, target_precision) -> dict[str, Any]:
        """One threshold per label, maximising its F1 on val (see imgcls.multilabel.choose_thresholds); the
        probabilities themselves are left as they are (temperature 1)."""
        from imgcls import multilabel

        thresholds = multilabel.choose_thresholds(logits, targets)
        return {"temperature": 1.0, "fitted_on": "val", "thresholds": thresholds,
                "val_f1_micro": {"at_0.5": multilabel.compute_metrics(logits, targets)["f1_micro"],
                                 "at_thresholds": multilabel.compute_metrics(logits, targets, thresholds)["f1_micro"]}}

    def decision(self, metadata, reject, threshold) -> np.ndarray:
        if reject is not None:
            raise ImgclsError("--reject is for single-label models; a multi-label model answers the labels whose "
                              "probability reaches their threshold (--threshold to set one for all)")
        classes = len(metadata["class_names"])
        if threshold is not None:
            if not 0 < float(threshold) < 1:
                raise ImgclsError(f"--threshold {threshold}: use a probability between 0 and 1")
            return np.full(classes, float(threshold), dtype=np.float32)
        stored = (metadata.get("calibration") or {}).get("thresholds")
        return np.asarray(stored if stored else [0.5] * classes, dtype=np.float32)

    def answers(self, probabilities, class_names, topk, decision) -> list[dict[str, Any]]:
        """labels (joined by |, possibly empty), a list of them, and one probability per class."""
        rows = []
        for values in probabilities.tolist():
            chosen = [name for name, value, threshold in zip(class_names, values, decision) if value >= threshold]
            rows.append({"labels": "|".join(chosen), "label_set": chosen,
                         **{f"prob_{name}": value for name, value in zip(class_names, values)}})
        return rows

    def prediction_columns(self, class_names, topk) -> list[str]:
        return ["path", "labels", *(f"prob_{name}" for name in class_names), "error"]

    def describe(self, target, class_names) -> str:
        return "|".join(name for name, bit in zip(class_names, np.asarray(target).tolist()) if bit > 0.5)

    def right(self, probabilities, targets, decision) -> np.ndarray:
        return ((probabilities >= decision) == (targets > 0.5)).all(axis=1)

    def agreement(self, probabilities, others, decision) -> float:
        return float(np.mean(((probabilities >= decision) == (others >= decision)).all(axis=1)))

    def check_config(self, loss: str, monitor: str, sampler: str) -> None:
        super().check_config(loss, monitor, sampler)
        if sampler == "balanced":
            raise ImgclsError("data.sampler=balanced draws by an image's one class: not for multi-label data; "
                              "use loss.class_weights=auto (per-label positive weights) instead")


_TASKS = {"single": SingleLabel(), "multi": MultiLabel()}


def get_task(name: str) -> Task:
    """The task of a resolved config or of a model's metadata ("single" for models from before tasks)."""
    if name not in _TASKS:
        raise ImgclsError(f"unknown task '{name}'; use single or multi")
    return _TASKS[name]
