"""Loss functions: cross-entropy and focal loss, optionally weighted by class frequency. Both take
class indices or, after mixup/cutmix, per-class target probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.config import LossConfig

__all__ = ["FocalLoss", "balanced_class_weights", "build_loss"]


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


def build_loss(loss_config: LossConfig, counts: Sequence[int]) -> nn.Module:
    """The training loss that `loss_config` (the config's `loss` section) names.

    Args:
        counts: training images per class (for class_weights="auto").
    Raises:
        ValueError: an unknown loss name.
    """
    weight = balanced_class_weights(counts) if loss_config.class_weights == "auto" else None
    if loss_config.name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=loss_config.label_smoothing)
    if loss_config.name == "focal":
        return FocalLoss(loss_config.focal_gamma, weight, loss_config.label_smoothing)
    raise ValueError(f"unknown loss {loss_config.name!r}; use ce or focal")
