"""Train-time augmentation on whole batches, on the training device (kornia: per-sample random
parameters, one kernel launch per op for the batch), and MixUp / CutMix of batches with their labels.

Working on batches after the transfer, instead of on single images in loader processes, means the
decoded-image cache needs no loader processes at all, and on a GPU the augmentation costs the CPU
nothing. Evaluation never augments. Every random draw comes from torch's global generators, which
checkpoints save: a resumed run replays the same augmentations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from imgcls.config import DataConfig

__all__ = ["build_augment", "build_mixing", "PRESETS", "AUTO_AUGMENT_POLICIES", "AUGMENT_MIN_EPOCHS"]

PRESETS = ("auto", "none", "light", "standard", "strong")
# data.augment=auto: images of 64 px or less are not augmented in runs shorter than this, which learn
# faster unaugmented (Fashion-MNIST, a quarter of it in 1.5 minutes: see the README's "Time budgets")
AUGMENT_MIN_EPOCHS = 10
AUTO_AUGMENT_POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment")

# The presets' strengths. `strong` follows timm's strong recipes (RandAugment m9 n2 + erasing 0.25 on top
# of random resized crop + flip); RandAugment is torchvision's, whose magnitude runs 0..30 (timm's 0..10).
STANDARD_COLOR_JITTER = 0.3  # brightness, contrast and saturation factors drawn from 1 +- this
STRONG_RANDOM_ERASING = 0.25  # share of images that get one erased rectangle
RANDAUGMENT_OPERATIONS = 2  # n: distinct operations per image
RANDAUGMENT_MAGNITUDE = 9  # m, of torchvision's 0..30 scale (its default)
ERASE_VALUE = 0.5  # mid-grey, close to the mean colour that timm's erasing to 0 after normalisation gives


def build_augment(data_config: DataConfig, size: int) -> nn.Module | None:
    """A module mapping a uint8 NCHW batch (size x size) to an augmented float batch in [0, 1].

    Presets (`data.augment`): none: nothing; light: horizontal flip + random crop of a reflect-padded
    image (shift by up to 1/8 of the side); standard: random resized crop (35-100% of the area) + flip +
    colour jitter (brightness, contrast, saturation +-30%); strong: standard + RandAugment (n=2, m=9 of
    30) + random erasing (a quarter of the images). The other keys add to or replace parts of the preset,
    in this order: colour jitter, the auto-augment policy (one drawn per image), random erasing.

    `data.horizontal_flip=false` leaves the flip out of every preset.

    Args:
        data_config: reads augment, horizontal_flip, auto_augment, color_jitter (None: the preset's own, 0: off) and
            random_erasing (0: the preset's own, i.e. 0.25 for strong and off otherwise).
        size: side of the square input and output images, pixels.

    Returns:
        The module, or None when nothing would change the images.

    Raises:
        ValueError: an unknown preset or policy name.
    """
    import kornia.augmentation as K

    preset, policy = data_config.augment, data_config.auto_augment
    if preset == "auto":  # training decides when to use it (AUGMENT_MIN_EPOCHS): the augmentation it would use
        preset = "light"
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; use one of {', '.join(PRESETS)}")
    if policy not in AUTO_AUGMENT_POLICIES:
        raise ValueError(f"unknown auto-augment policy {policy!r}; use one of {', '.join(AUTO_AUGMENT_POLICIES)}")
    color_jitter = data_config.color_jitter
    if color_jitter is None:
        color_jitter = STANDARD_COLOR_JITTER if preset in ("standard", "strong") else 0.0
    random_erasing = data_config.random_erasing or (STRONG_RANDOM_ERASING if preset == "strong" else 0.0)
    if preset == "strong" and policy == "none":
        policy = "randaugment"

    steps: list[nn.Module] = []
    if preset == "light":
        steps.append(K.RandomCrop((size, size), padding=max(1, size // 8), padding_mode="reflect"))
    elif preset in ("standard", "strong"):
        steps.append(K.RandomResizedCrop((size, size), scale=(0.35, 1.0)))
    if preset != "none" and data_config.horizontal_flip is not False:  # None (auto, unresolved): the usual flip
        steps.append(K.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(K.ColorJitter(color_jitter, color_jitter, color_jitter, p=1.0))
    if policy != "none":
        steps.append(_PerGroupPolicy(policy))
    if random_erasing > 0:
        steps.append(K.RandomErasing(p=random_erasing, value=ERASE_VALUE))
    # a plain Sequential: _PerGroupPolicy is not a kornia module, and kornia's containers only add
    # bookkeeping for masks and boxes, which classification has none of
    return _BatchAugment(nn.Sequential(*steps)) if steps else None


class _BatchAugment(nn.Module):
    def __init__(self, pipeline: nn.Module):
        super().__init__()
        self.pipeline = pipeline

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # kornia's colour ops expect floats in [0, 1]; the model accepts those as well as uint8
        return self.pipeline(images.float().div_(255.0)).clamp_(0.0, 1.0)


class _PerGroupPolicy(nn.Module):
    """RandAugment (n=2, m=9), TrivialAugmentWide or AutoAugment (ImageNet policy): torchvision's
    transforms.v2, the reference implementations, on float [0, 1] batches on the training device.

    torchvision draws one set of operations per call; calling it on the whole batch would give every
    image the same operations. It is called on groups of `GROUP` images instead, so a batch of 64 sees
    16 draws (~1 ms per call on a CPU core at 32 px; calling per image would cost 4x more). kornia's
    RandAugment was used before: its brightness and contrast operations map the magnitude to a factor
    below 1, so m=9 darkened every image they touched (mean pixel 0.50 -> 0.16 for brightness), where
    torchvision draws the sign of each change.
    """

    GROUP = 4

    def __init__(self, name: str):
        super().__init__()
        from torchvision.transforms import v2

        if name == "randaugment":
            self.policy = v2.RandAugment(num_ops=RANDAUGMENT_OPERATIONS, magnitude=RANDAUGMENT_MAGNITUDE)
        elif name == "trivialaugment":
            self.policy = v2.TrivialAugmentWide()
        elif name == "autoaugment":
            self.policy = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
        else:
            raise ValueError(f"unknown auto-augment policy {name!r}; use one of {', '.join(AUTO_AUGMENT_POLICIES)}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.policy(group) for group in images.split(self.GROUP)])


def build_mixing(data_config: DataConfig, num_classes: int) -> nn.Module | None:
    """MixUp / CutMix of a training batch and its labels, as timm's Mixup does it.

    A share `mix_probability` of the batches is mixed; when both alphas are positive, each mixed batch
    uses MixUp or CutMix with even odds. Every image is mixed with another image of the batch (a random
    pairing): MixUp blends the two with a weight drawn from Beta(mixup_alpha, mixup_alpha); CutMix
    (kornia) pastes a box of the other image, its area share drawn from Beta(cutmix_alpha, cutmix_alpha).
    The targets weight the two labels by the same shares.

    Args:
        data_config: reads mixup_alpha, cutmix_alpha and mix_probability.
        num_classes: length of the target vectors.

    Returns:
        None when no batch would be mixed; else a module mapping (images NCHW, float in [0, 1] or uint8;
        labels: long N, or multi-hot float N x num_classes) to (float images, targets float N x
        num_classes: rows summing to 1 for class indices, mixed multi-hot rows otherwise). An unmixed
        batch gets one-hot (or its own multi-hot) targets.
    """
    mixup_alpha, cutmix_alpha = data_config.mixup_alpha, data_config.cutmix_alpha
    if data_config.mix_probability <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return None
    return _Mixing(mixup_alpha, cutmix_alpha, data_config.mix_probability, num_classes)


class _Mixing(nn.Module):
    def __init__(self, mixup_alpha: float, cutmix_alpha: float, probability: float, num_classes: int):
        super().__init__()
        import kornia.augmentation as K

        self.mixup_alpha, self.probability, self.num_classes = mixup_alpha, probability, num_classes
        # kornia's RandomMixUpV2 draws its weights uniformly from a range, not from Beta(alpha, alpha):
        # MixUp is the two lines in forward. Its CutMix fits; use_correct_lambda: the weight it returns
        # is the original image's share (1 - the pasted area share).
        self.cutmix = (K.RandomCutMixV2(beta=cutmix_alpha, use_correct_lambda=True, data_keys=["input", "class"])
                       if cutmix_alpha > 0 else None)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not images.is_floating_point():  # `data.augment=none` leaves the batch uint8
            images = images.float().div_(255.0)
        # class indices become one-hot rows; multi-hot rows (multi-label) are mixed as they are
        targets = labels.float() if labels.ndim == 2 else F.one_hot(labels, self.num_classes).float()
        # CPU draws from the global generator: no CPU-GPU sync, and saved in checkpoints
        if torch.rand(()) >= self.probability:
            return images, targets
        if self.cutmix is not None and (self.mixup_alpha <= 0 or torch.rand(()) < 0.5):
            # kornia mixes the "class" it is given: the images' positions, so it names each one's partner
            positions = torch.arange(len(images), device=images.device)
            images, mixed = self.cutmix(images, positions)  # mixed: (1, N, 3) = own, partner's position, own share
            partners, own_share = mixed[0, :, 1].long(), mixed[0, :, 2]
        else:
            partners = torch.randperm(len(images)).to(images.device)
            alpha = torch.tensor(float(self.mixup_alpha))
            own_share = torch.distributions.Beta(alpha, alpha).sample((len(images),)).to(images.device)
            images = torch.lerp(images[partners], images, own_share.view(-1, 1, 1, 1).to(images.dtype))
        own_share = own_share.float().unsqueeze(1)
        return images, own_share * targets + (1 - own_share) * targets[partners]
