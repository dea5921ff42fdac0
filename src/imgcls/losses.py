"""Loss functions: cross-entropy and focal loss, optionally weighted by class frequency. Both take
class indices or, after mixup/cutmix, per-class target probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

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


def build_loss(name: str, counts: Sequence[int], class_weights: str = "none", label_smoothing: float = 0.0,
               focal_gamma: float = 2.0) -> nn.Module:
    """The training loss. counts: training images per class (for class_weights="auto")."""
    weight = balanced_class_weights(counts) if class_weights == "auto" else None
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(focal_gamma, weight, label_smoothing)
    raise ValueError(f"unknown loss {name!r}; use ce or focal")
