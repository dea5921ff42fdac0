"""Train-time augmentation on whole batches, on the training device (kornia: per-sample random
parameters, one kernel launch per op for the batch).

Working on batches after the transfer, instead of on single images in loader processes, means the
decoded-image cache needs no loader processes at all, and on a GPU the augmentation costs the CPU
nothing. Evaluation never augments.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["build_augment", "PRESETS"]

PRESETS = ("none", "light", "standard")


def build_augment(preset: str, size: int) -> nn.Module | None:
    """A module mapping a uint8 NCHW batch (size x size) to an augmented float batch in [0, 1].

    none: no augmentation (returns None); light: horizontal flip + random crop of a reflect-padded image
    (shift by up to 1/8 of the side); standard: random resized crop (35-100% of the area) + flip +
    colour jitter (brightness, contrast, saturation +-30%).
    """
    import kornia.augmentation as K

    if preset == "none":
        return None
    if preset == "light":
        steps = [K.RandomCrop((size, size), padding=max(1, size // 8), padding_mode="reflect"), K.RandomHorizontalFlip()]
    elif preset == "standard":
        steps = [K.RandomResizedCrop((size, size), scale=(0.35, 1.0)), K.RandomHorizontalFlip(),
                 K.ColorJitter(0.3, 0.3, 0.3, p=1.0)]
    else:
        raise ValueError(f"unknown augmentation preset {preset!r}; use one of {', '.join(PRESETS)}")
    return _BatchAugment(K.AugmentationSequential(*steps))


class _BatchAugment(nn.Module):
    def __init__(self, pipeline: nn.Module):
        super().__init__()
        self.pipeline = pipeline

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # kornia's colour ops expect floats in [0, 1]; the model accepts those as well as uint8
        return self.pipeline(images.float().div_(255.0)).clamp_(0.0, 1.0)
