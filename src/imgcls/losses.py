"""Loss functions. Single-label: cross-entropy and focal loss, optionally weighted by class frequency;
both take class indices or, after mixup/cutmix, per-class target probabilities. Multi-label: binary
cross-entropy and the asymmetric loss (sigmoid focal loss is its symmetric case) on multi-hot targets
(mixed ones too), optionally with per-label positive weights.

A new loss: a class here, a branch in `build_loss`, its name in `LossConfig.name` (and in the `losses`
of the task it is for, imgcls.tasks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.config import LossConfig

__all__ = ["FocalLoss", "BinaryCrossEntropy", "AsymmetricLoss", "balanced_class_weights", "positive_weights", "build_loss"]


def balanced_class_weights(counts: Sequence[int]) -> torch.Tensor:
    """n_samples / (n_classes * count): scikit-learn's "balanced" weights (a class half as frequent
    weighs twice as much; a class with no training images gets weight 0)."""
    from sklearn.utils.class_weight import compute_class_weight
    import numpy as np

    counts = np.asarray(counts)
    present = np.flatnonzero(counts > 0)
    labels = np.repeat(present, counts[present])
    weights = np.zeros(len(counts))
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(weights, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al., 2017): cross-entropy scaled by (1 - p)^gamma, so confidently right
    examples count less and the rare, hard ones more. gamma=0 is cross-entropy."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probabilities = F.log_softmax(logits.float(), dim=1)
        if targets.ndim == 1:  # class indices -> (smoothed) one-hot probabilities
            classes = logits.shape[1]
            targets = F.one_hot(targets, classes).float() * (1 - self.label_smoothing) + self.label_smoothing / classes
        modulation = (1 - log_probabilities.exp()).pow(self.gamma)
        per_class = -targets * modulation * log_probabilities
        if self.weight is not None:
            per_class = per_class * self.weight
        # normalised like weighted cross-entropy: by the total weight of the targets
        normaliser = (targets * self.weight).sum() if self.weight is not None else targets.new_tensor(len(targets))
        return per_class.sum() / normaliser.clamp_min(1e-12)


def positive_weights(counts: Sequence[int], images: int) -> torch.Tensor:
    """negatives / positives of each label (BCE's pos_weight: a label on 1 image in 10 weighs its positives
    9 times), clipped to 1..100 so that a label with a handful of positives does not swamp the loss."""
    counts = torch.tensor(counts, dtype=torch.float32)
    return ((images - counts) / counts.clamp_min(1)).clamp(1.0, 100.0)


class BinaryCrossEntropy(nn.Module):
    """Binary cross-entropy on logits, one term per label, averaged over images and labels; label
    smoothing moves the targets towards 0.5 by half the amount."""

    def __init__(self, pos_weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float() * (1 - self.label_smoothing) + self.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=self.pos_weight)


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021) for multi-label data with many more negative labels
    than positive ones: negatives are focused more strongly (gamma_negative > gamma_positive) and their
    probability shifted down by `clip`, so easy negatives (p < clip) cost nothing. gamma_negative =
    gamma_positive = gamma and clip = 0 is the sigmoid focal loss. Averaged over images and labels like
    BinaryCrossEntropy; `pos_weight` weighs the positive terms."""

    def __init__(self, gamma_negative: float = 4.0, gamma_positive: float = 0.0, clip: float = 0.05,
                 pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma_negative, self.gamma_positive, self.clip = gamma_negative, gamma_positive, clip
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float()
        positive = torch.sigmoid(logits.float())
        negative = (1 - positive + self.clip).clamp(max=1) if self.clip > 0 else 1 - positive
        positive_terms = targets * torch.log(positive.clamp_min(1e-8)) * (1 - positive).pow(self.gamma_positive)
        negative_terms = (1 - targets) * torch.log(negative.clamp_min(1e-8)) * (1 - negative).pow(self.gamma_negative)
        if self.pos_weight is not None:
            positive_terms = positive_terms * self.pos_weight
        return -(positive_terms + negative_terms).mean()


def build_loss(loss_config: LossConfig, counts: Sequence[int], images: int = 0, task: str = "single") -> nn.Module:
    """The training loss that `loss_config` (the config's `loss` section) names.

    Args:
        counts: training images per class (for class_weights="auto").
        images: training images in all (multi-label positive weights).
        task: "single" or "multi" (see imgcls.tasks); loss.name=auto picks ce or bce by it.
    Raises:
        ValueError: an unknown loss name.
    """
    name = loss_config.name
    if name == "auto":
        name = "bce" if task == "multi" else "ce"
    # a run resolves label_smoothing=auto before it builds the loss; a loss built on its own smooths nothing
    smoothing = loss_config.label_smoothing or 0.0
    if task == "multi":
        weight = positive_weights(counts, images) if loss_config.class_weights == "auto" else None
        if name == "bce":
            return BinaryCrossEntropy(weight, smoothing)
        if name == "asl":
            return AsymmetricLoss(loss_config.asl_gamma_negative, loss_config.asl_gamma_positive, loss_config.asl_clip,
                                  weight)
        if name == "focal":
            return AsymmetricLoss(loss_config.focal_gamma, loss_config.focal_gamma, 0.0, weight)
        raise ValueError(f"loss {name!r} is not for multi-label data; use bce, asl or focal")
    weight = balanced_class_weights(counts) if loss_config.class_weights == "auto" else None
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)
    if name == "focal":
        return FocalLoss(loss_config.focal_gamma, weight, smoothing)
    raise ValueError(f"unknown loss {name!r} for single-label data; use ce or focal")
