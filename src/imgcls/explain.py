"""Explanations of what a trained model looks at: Grad-CAM overlays, a layer's activation maps, and
a 2-D projection (t-SNE or UMAP) of the penultimate-layer features.

Grad-CAM comes from pytorch-grad-cam (`pip install grad-cam`), a maintained implementation of
Selvaraju et al. 2017 and its variants; everything else here is a forward hook and a figure.
Every function leaves the model as it found it: train/eval mode of each module, `requires_grad` and
`.grad` of each parameter.

    model = imgcls.load(run).model
    save_gradcam_gallery(model, wrong_rows, class_names, 224, "crop", "wrong.png", "most confident mistakes")
    features, labels = penultimate_features(model, loader)
    points, kept = project_2d(features)
    save_projection(points, labels[kept], class_names, "tsne.png", "penultimate features (t-SNE)")
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgcls.analyze import read_thumbnail, short_name
from imgcls.errors import ImgclsError
from imgcls.models import SmallConvNet, SmallResNet

__all__ = [
    "target_layer", "gradcam", "choose_gallery_rows", "save_gradcam_gallery", "activation_maps",
    "save_activation_maps", "penultimate_features", "project_2d", "save_projection",
]

log = logging.getLogger("imgcls")

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]

_GRADCAM_HINT = "Grad-CAM needs the grad-cam package: pip install grad-cam"
_UNREADABLE_GREY = 0.5  # tile colour (0..1) standing in for an image file that cannot be decoded


# --------------------------------------------------------------------------------------------------
# Model state and layers
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore, on exit, every module's train/eval flag and every parameter's `requires_grad` and
    `.grad`: a model may mix modes on purpose (BatchNorm frozen in eval inside a training model)
    and carry gradients accumulated by a training loop, so a global `model.train()` is not enough.
    Inside, a model that averages several views of each image (`ImageClassifier.test_time_flip`,
    `test_time_shifts`) runs the plain network: a map or a feature vector describes the image as it is,
    from one forward pass."""
    modes = [(module, module.training) for module in model.modules()]
    parameters = [(parameter, parameter.requires_grad, parameter.grad) for parameter in model.parameters()]
    views = {name: getattr(model, name) for name in ("test_time_flip", "test_time_shifts") if hasattr(model, name)}
    try:
        for name in views:
            setattr(model, name, False)
        yield
    finally:
        for name, value in views.items():
            setattr(model, name, value)
        for module, training in modes:
            module.training = training
        for parameter, requires_grad, grad in parameters:
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _backbone_of(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def _is_vision_transformer(backbone: nn.Module) -> bool:
    """timm's ViT family (VisionTransformer, DeiT, EVA, ...): a token sequence through `blocks`,
    prefix tokens (class, registers) first, then the patch grid row by row."""
    blocks = getattr(backbone, "blocks", None)
    return (
        isinstance(getattr(backbone, "num_prefix_tokens", None), int)
        and hasattr(backbone, "patch_embed")
        and isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0
        and hasattr(blocks[-1], "norm1")
    )


def _token_grid_transform(backbone: nn.Module) -> ReshapeTransform:
    """N x tokens x C -> N x C x rows x columns: drop the prefix tokens, lay the patches out as a grid."""
    prefix = backbone.num_prefix_tokens
    grid = getattr(backbone.patch_embed, "grid_size", None)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3:  # a layer named by the user that is already a map (patch_embed.proj)
            return tokens
        patches = tokens[:, prefix:, :]
        count = patches.shape[1]
        if grid is not None and grid[0] * grid[1] == count:
            rows, columns = int(grid[0]), int(grid[1])
        else:  # dynamic image size: the grid is square for the square images imgcls feeds
            rows = columns = math.isqrt(count)
            if rows * columns != count:
                raise ImgclsError(f"cannot lay {count} patch tokens out as a square grid; use square images")
        return patches.reshape(patches.shape[0], rows, columns, patches.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _default_image_size(backbone: nn.Module) -> int:
    config = getattr(backbone, "pretrained_cfg", None) or {}
    input_size = config.get("input_size") if isinstance(config, dict) else None
    return int(input_size[-1]) if input_size else 224


def _last_feature_map(model: nn.Module, backbone: nn.Module, image_size: int) -> str:
    """Name (in `model`) of the last module of `forward_features` that outputs an NCHW map.

    Found by running a zero image through it with hooks on every module. Modules that return the
    very same tensor (a stage, its last block, that block's in-place ReLU) are one layer for
    Grad-CAM; the name reported is timm's `feature_info` stage when it is one of them, else the
    outermost."""
    prefix = "backbone." if backbone is not model else ""
    outputs: list[tuple[str, torch.Tensor]] = []

    def record(name: str) -> Callable:
        def hook(_module: nn.Module, _input: Any, output: Any) -> None:
            if torch.is_tensor(output):
                outputs.append((name, output))
        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in backbone.named_modules()
        if name and not isinstance(module, nn.Identity)
    ]
    forward = getattr(backbone, "forward_features", backbone)
    try:
        with _preserved_state(model), torch.no_grad():
            model.eval()  # a zero image in train mode would shift BatchNorm's running statistics
            forward(torch.zeros(1, 3, image_size, image_size, device=_device_of(model)))
    except Exception as error:
        raise ImgclsError(
            f"cannot find the Grad-CAM layer of {type(backbone).__name__}: a {image_size} px test image "
            f"failed ({str(error).splitlines()[0] if str(error) else type(error).__name__}); pass layer_name"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    maps = [(name, output) for name, output in outputs if output.dim() == 4]
    # a 1x1 map (a pooled head that forward_features runs) explains nothing spatially
    maps = [(name, output) for name, output in maps if output.shape[2] * output.shape[3] > 1] or maps
    if not maps:
        raise ImgclsError(
            f"{type(backbone).__name__} has no convolutional feature map for Grad-CAM; pass layer_name"
        )
    last = maps[-1][1]
    num_features = getattr(backbone, "num_features", None)
    if isinstance(num_features, int) and last.shape[1] != num_features and last.shape[-1] == num_features:
        raise ImgclsError(
            f"{type(backbone).__name__} keeps its feature maps channels-last (Swin-like); "
            "Grad-CAM here supports CNNs and ViT-style token models"
        )
    same = [name for name, output in maps if output is last]
    feature_info = getattr(backbone, "feature_info", None)
    stage = None
    if isinstance(feature_info, list) and feature_info and isinstance(feature_info[-1], dict):
        stage = feature_info[-1].get("module")
    chosen = stage if stage in same else min(same, key=lambda name: name.count("."))
    return prefix + chosen


def _layer_suggestions(model: nn.Module, count: int = 10) -> list[str]:
    """The last `count` names worth hooking: convolutions, modules holding one, transformer blocks
    and their norm1."""
    names = []
    for name, module in model.named_modules():
        convolutional = any(isinstance(inner, nn.Conv2d) for inner in module.modules())
        if name and (convolutional or re.search(r"(^|\.)blocks\.\d+(\.norm1)?$", name)):
            names.append(name)
    return names[-count:]


def _resolve_layer(model: nn.Module, layer_name: str | None,
                   image_size: int | None = None) -> tuple[str, nn.Module, ReshapeTransform | None]:
    """(name, module, reshape transform) of `layer_name`, or of the Grad-CAM layer when None."""
    backbone = _backbone_of(model)
    modules = dict(model.named_modules())
    vision_transformer = _is_vision_transformer(backbone)
    reshape = _token_grid_transform(backbone) if vision_transformer else None
    if layer_name is not None:
        for candidate in (layer_name, f"backbone.{layer_name}"):
            if candidate and candidate in modules:
                return candidate, modules[candidate], reshape
        raise ImgclsError(
            f"unknown layer '{layer_name}'; some valid names: {', '.join(_layer_suggestions(model))}"
        )
    prefix = "backbone." if backbone is not model else ""
    if isinstance(backbone, SmallResNet):
        name = f"{prefix}stages.{len(backbone.stages) - 1}"
    elif isinstance(backbone, SmallConvNet):
        name = f"{prefix}groups.{len(backbone.groups) - 1}"
    elif vision_transformer:
        # the last block's first LayerNorm: its output still holds one token per patch, and the class
        # token's prediction depends on them through the last attention (pytorch-grad-cam's ViT recipe)
        name = f"{prefix}blocks.{len(backbone.blocks) - 1}.norm1"
    else:
        name = _last_feature_map(model, backbone, image_size or _default_image_size(backbone))
    return name, modules[name], reshape


def target_layer(model: nn.Module, image_size: int | None = None) -> tuple[nn.Module, ReshapeTransform | None]:
    """The layer Grad-CAM should weigh, and the transform that makes its output an NCHW map.

    SmallResNet: its last residual block; SmallConvNet: its last group. timm CNNs: the last module of `forward_features` with a
    4-D output (e.g. `layer4` of a ResNet, `bn2` of an EfficientNet). timm Vision Transformers: the
    last block's `norm1`, with a transform that drops the class/register tokens and lays the patch
    tokens out as their 2-D grid.

    Args:
        model: an `ImageClassifier` (or a bare backbone).
        image_size: side of the square test image used to trace a CNN; default: the model's
            pretrained input size, else 224.

    Returns:
        (module, reshape_transform): reshape_transform is None for CNNs.

    Raises:
        ImgclsError: the model has no spatial feature map this function knows how to find.
    """
    _name, module, reshape = _resolve_layer(model, None, image_size)
    return module, reshape


# --------------------------------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------------------------------

def gradcam(model: nn.Module, images: torch.Tensor, target_classes: Sequence[int] | torch.Tensor,
            layer_name: str | None = None, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM maps: where in each image the evidence for its target class lies.

    Works on frozen models: gradients flow from an input that requires grad, so no parameter needs
    `requires_grad` (and none gets a `.grad`).

    Args:
        model: an `ImageClassifier`; it normalises the images itself.
        images: N x 3 x H x W, uint8 0..255 or float 0..1.
        target_classes: N class indices to explain (e.g. the predicted ones).
        layer_name: a module name from `model.named_modules()`; default: `target_layer(model)`.
        batch_size: images per forward/backward pass (memory: activations of the whole network).

    Returns:
        N x H x W float32, each map scaled to 0..1 (all zeros where no location supports the class).

    Raises:
        ImgclsError: grad-cam is not installed, shapes disagree, or no Grad-CAM layer is found.
    """
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as error:
        raise ImgclsError(_GRADCAM_HINT) from error

    targets = [int(index) for index in (target_classes.tolist() if torch.is_tensor(target_classes) else target_classes)]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ImgclsError(f"gradcam expects N x 3 x H x W images, got shape {tuple(images.shape)}")
    if len(targets) != images.shape[0]:
        raise ImgclsError(f"gradcam got {images.shape[0]} images but {len(targets)} target classes")
    if images.shape[0] == 0:
        return np.zeros((0, images.shape[2], images.shape[3]), dtype=np.float32)
    _name, layer, reshape = _resolve_layer(model, layer_name, images.shape[-1])
    device = _device_of(model)
    maps = []
    with _preserved_state(model):
        for parameter in model.parameters():
            # only the input needs a gradient; skipping the weight gradients halves the backward
            parameter.requires_grad_(False)
        cam = GradCAM(model=model, target_layers=[layer], reshape_transform=reshape)
        try:
            for start in range(0, images.shape[0], batch_size):
                batch = images[start: start + batch_size].to(device)
                batch = batch.float().div(255.0) if batch.dtype == torch.uint8 else batch.float()
                # an input that requires grad makes every activation carry a gradient, even when
                # every parameter is frozen (a frozen backbone would otherwise give no Grad-CAM)
                batch.requires_grad_(True)
                batch_targets = [ClassifierOutputTarget(index) for index in targets[start: start + batch_size]]
                maps.append(np.asarray(cam(input_tensor=batch, targets=batch_targets), dtype=np.float32))
        finally:
            # not `with GradCAM(...)`: its __exit__ swallows IndexError (e.g. a bad class index)
            cam.activations_and_grads.release()
            cam.outputs = None  # drops the retained autograd graph
    return np.concatenate(maps)


def choose_gallery_rows(rows: Sequence[dict[str, Any]], count: int = 8,
                        seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split prediction rows into a sample to draw: (correct, wrong).

    Wrong ones are the most confident mistakes (fastai's top losses: the ones worth a look);
    correct ones are a random sample, so the gallery shows typical successes, not only easy ones.

    Args:
        rows: dicts with at least `true`, `predicted` and `confidence`.
        count: most rows of each kind.
        seed: for the random sample of correct rows.

    Returns:
        (correct rows, wrong rows), each at most `count` long.
    """
    correct = [row for row in rows if row["true"] == row["predicted"]]
    wrong = sorted((row for row in rows if row["true"] != row["predicted"]),
                   key=lambda row: -float(row["confidence"]))
    picked = np.random.default_rng(seed).permutation(len(correct))[:count]
    return [correct[index] for index in sorted(picked)], wrong[:count]


def save_gradcam_gallery(model: nn.Module, rows: Sequence[dict[str, Any]], class_names: Sequence[str],
                         image_size: int, resize: str, path: str | Path, title: str, columns: int = 4) -> Path:
    """A figure of images next to their Grad-CAM overlay for the predicted class.

    Each caption reads "true → predicted (confidence)" (green when right, red when wrong) over the
    file name. A file that cannot be decoded becomes a grey tile. No rows: a figure that says so,
    so a report never links a missing image.

    Args:
        model: an `ImageClassifier`.
        rows: dicts with `path`, `true`, `predicted` (class names), `confidence` (0..1) and
            optionally `predicted_index` (else looked up in `class_names`).
        class_names: the model's classes, in output order.
        image_size: the model's input side in pixels.
        resize: how files become squares: crop, pad or squish (the run's `data.resize`).
        path: the PNG to write.
        title: figure title.
        columns: (image, overlay) pairs per line.

    Returns:
        `path`.

    Raises:
        ImgclsError: a predicted class is not in `class_names`, or grad-cam is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = Path(path)
    tiles = [read_thumbnail(row["path"], image_size, resize) for row in rows]
    indices = []
    for row in rows:
        index = row.get("predicted_index")
        if index is None or index == "":  # "" when the rows come from a CSV file
            if row["predicted"] not in class_names:
                raise ImgclsError(
                    f"predicted class '{row['predicted']}' of {row['path']} is not one of the model's classes"
                )
            index = list(class_names).index(row["predicted"])
        indices.append(int(index))
    readable = [position for position, tile in enumerate(tiles) if tile is not None]
    overlays: dict[int, np.ndarray] = {}
    if readable:
        from pytorch_grad_cam.utils.image import show_cam_on_image

        batch = torch.from_numpy(np.stack([tiles[position] for position in readable])).permute(0, 3, 1, 2)
        maps = gradcam(model, batch, [indices[position] for position in readable])
        for position, cam_map in zip(readable, maps):
            overlays[position] = show_cam_on_image(tiles[position].astype(np.float32) / 255.0, cam_map, use_rgb=True)

    columns = max(1, min(columns, len(rows)))
    lines = max(1, math.ceil(len(rows) / columns))
    figure, axes = plt.subplots(lines, 2 * columns, figsize=(3.6 * columns, 2.1 * lines + 0.6), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    if not rows:
        axes[0, 0].text(0, 0.5, "no images", fontsize=12)
    grey = np.full((image_size, image_size, 3), _UNREADABLE_GREY, dtype=np.float32)
    for position, row in enumerate(rows):
        image_axis, overlay_axis = axes[position // columns, 2 * (position % columns): 2 * (position % columns) + 2]
        tile = tiles[position]
        image_axis.imshow(tile if tile is not None else grey)
        overlay_axis.imshow(overlays.get(position, grey))
        correct = row.get("correct", row["true"] == row["predicted"])  # a multi-label row says it
        caption = f"{row['true']} → {row['predicted']} ({float(row['confidence']):.2f})"
        image_axis.set_title(f"{caption}\n{short_name(row['path'], 28)}", fontsize=7,
                             color="tab:green" if correct else "tab:red")
        overlay_axis.set_title("Grad-CAM" if tile is not None else "unreadable", fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------------
# Activation maps
# --------------------------------------------------------------------------------------------------

def activation_maps(model: nn.Module, images: torch.Tensor, layer_name: str | None = None,
                    channels: int = 16) -> tuple[np.ndarray, np.ndarray, str]:
    """The most active channels of one layer, per image.

    Args:
        model: an `ImageClassifier`.
        images: N x 3 x H x W, uint8 0..255 or float 0..1.
        layer_name: a module name from `model.named_modules()` (the `backbone.` prefix may be left
            out); default: the Grad-CAM layer (`target_layer`).
        channels: how many channels to keep per image: those with the highest mean activation.

    Returns:
        (maps, channel_indices, layer_name): maps N x K x h x w float32 (raw activations, K =
        min(channels, layer channels)), channel_indices N x K (most active first), and the name of
        the layer hooked.

    Raises:
        ImgclsError: unknown layer name (the message lists valid ones), or its output is not a map.
    """
    name, layer, reshape = _resolve_layer(model, layer_name, images.shape[-1])
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _input, output: captured.append(output))
    try:
        with _preserved_state(model), torch.no_grad():
            model.eval()
            model(images.to(_device_of(model)))
    finally:
        handle.remove()
    output = captured[-1] if captured else None
    if torch.is_tensor(output) and output.dim() == 3 and reshape is not None:
        output = reshape(output)
    if not torch.is_tensor(output) or output.dim() != 4:
        shape = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
        raise ImgclsError(f"layer '{name}' outputs {shape}, not an N x C x H x W feature map; pick another layer")
    output = output.float().cpu()
    keep = min(channels, output.shape[1])
    indices = output.mean(dim=(2, 3)).argsort(dim=1, descending=True)[:, :keep]
    maps = torch.gather(output, 1, indices[:, :, None, None].expand(-1, -1, *output.shape[2:]))
    return maps.numpy(), indices.numpy(), name


def save_activation_maps(model: nn.Module, paths: Sequence[str | Path], image_size: int, resize: str,
                         path: str | Path, layer_name: str | None = None, channels: int = 16) -> Path:
    """A figure per image: the image, then its `channels` most active channels of one layer
    (each channel on its own colour scale, so weak but structured channels stay visible).

    Args:
        model: an `ImageClassifier`.
        paths: a few image files (one block of the figure each; unreadable ones become grey tiles).
        image_size: the model's input side in pixels.
        resize: crop, pad or squish.
        path: the PNG to write.
        layer_name: see `activation_maps`.
        channels: channels shown per image.

    Returns:
        `path`.

    Raises:
        ImgclsError: unknown layer name, or a layer without a spatial output.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    path = Path(path)
    tiles = [read_thumbnail(file, image_size, resize) for file in paths]
    readable = [position for position, tile in enumerate(tiles) if tile is not None]
    grey = np.full((image_size, image_size, 3), _UNREADABLE_GREY, dtype=np.float32)
    maps, indices = {}, {}
    if readable:
        batch = torch.from_numpy(np.stack([tiles[position] for position in readable])).permute(0, 3, 1, 2)
        all_maps, all_indices, layer_name = activation_maps(model, batch, layer_name, channels)
        maps, indices = dict(zip(readable, all_maps)), dict(zip(readable, all_indices))
    else:
        layer_name = _resolve_layer(model, layer_name, image_size)[0]
    per_line = min(8, channels)
    lines_per_image = math.ceil(channels / per_line)
    rows_total = max(1, len(paths)) * lines_per_image
    figure = plt.figure(figsize=(1.3 * (per_line + 2), 1.3 * rows_total + 0.6))
    grid = GridSpec(rows_total, per_line + 2, figure=figure)  # 2 columns for the image itself
    for position, file in enumerate(paths):
        top = position * lines_per_image
        image_axis = figure.add_subplot(grid[top: top + lines_per_image, 0:2])
        image_axis.imshow(tiles[position] if tiles[position] is not None else grey)
        image_axis.set_title(short_name(file, 20) + ("" if position in maps else "\nunreadable"), fontsize=7)
        image_axis.axis("off")
        for channel in range(len(maps.get(position, []))):
            axis = figure.add_subplot(grid[top + channel // per_line, 2 + channel % per_line])
            axis.imshow(maps[position][channel], cmap="viridis")
            axis.set_title(f"ch {indices[position][channel]}", fontsize=6)
            axis.axis("off")
    figure.suptitle(f"most active channels of {layer_name}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------------
# Penultimate features and their 2-D projection
# --------------------------------------------------------------------------------------------------

def penultimate_features(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         device: torch.device | str | None = None,
                         limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The vector the classifier head receives (pooled features), for every image of a loader.

    Captured by a forward pre-hook on `backbone.get_classifier()`, so it is the head's input
    whatever the head is (a Linear, or a Sequential with hidden layers). Runs in eval mode without
    gradients and restores the train/eval mode afterwards.

    Args:
        model: an `ImageClassifier` (its backbone has `get_classifier()`, as timm models do).
        loader: yields (images, labels) batches; images uint8 NCHW.
        device: where to run; the model is moved there. None: where the model already is.
        limit: stop after this many images (None: the whole loader).

    Returns:
        (features N x D float32, labels N int64).

    Raises:
        ImgclsError: the backbone has no `get_classifier`, or the loader yields nothing.
    """
    backbone = _backbone_of(model)
    if not hasattr(backbone, "get_classifier"):
        raise ImgclsError(f"{type(backbone).__name__} has no get_classifier(); cannot find the penultimate layer")
    head = backbone.get_classifier()
    if isinstance(head, (tuple, list)):  # distilled ViTs return (head, head_dist): same input
        head = head[0]
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0].detach().flatten(1)))
    features, labels, seen = [], [], 0
    if device is None:
        device = _device_of(model)
    else:
        model.to(device)
    try:
        with _preserved_state(model), torch.no_grad():
            model.eval()  # dropout off, BatchNorm on its running statistics
            for images, batch_labels in loader:
                if limit is not None and seen >= limit:
                    break
                captured.clear()
                model(images.to(device))
                features.append(captured[-1].float().cpu())
                labels.append(torch.as_tensor(batch_labels).cpu())
                seen += len(images)
    finally:
        handle.remove()
    if not features:
        raise ImgclsError("penultimate_features: the loader yielded no images")
    features_array = torch.cat(features).numpy()
    labels_array = torch.cat(labels).numpy().astype(np.int64)
    if limit is not None:
        features_array, labels_array = features_array[:limit], labels_array[:limit]
    return features_array, labels_array


def project_2d(features: np.ndarray, method: str = "tsne", seed: int = 0,
               max_points: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """2-D embedding of feature vectors: t-SNE (scikit-learn) or UMAP (umap-learn).

    t-SNE costs O(N log N) per iteration and looks only at neighbourhoods, so at most `max_points`
    rows (a random subset) are embedded; distances between clusters in the result mean little.

    Args:
        features: N x D.
        method: "tsne" or "umap".
        seed: for the subset and the embedding.
        max_points: most rows embedded.

    Returns:
        (points K x 2 float32, indices K): `indices` are the rows of `features` embedded, in order,
        so `labels[indices]` colours them.

    Raises:
        ImgclsError: unknown method, fewer than 3 rows, or UMAP asked for without umap-learn.
    """
    features = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    if method not in ("tsne", "umap"):
        raise ImgclsError(f"unknown projection method '{method}'; use tsne or umap")
    if len(features) < 3:
        raise ImgclsError(f"a 2-D projection needs at least 3 feature vectors, got {len(features)}")
    rng = np.random.default_rng(seed)
    indices = np.arange(len(features))
    if len(features) > max_points:
        indices = np.sort(rng.choice(len(features), max_points, replace=False))
    subset = features[indices]
    if method == "umap":
        try:
            import umap
        except ImportError as error:
            raise ImgclsError("UMAP needs umap-learn: pip install umap-learn (or use method tsne)") from error
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(subset) - 1), random_state=seed)
        return reducer.fit_transform(subset).astype(np.float32), indices
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if subset.shape[1] > 50 and len(subset) > 50:
        # the usual t-SNE recipe: PCA to 50 dimensions first removes noise and makes the
        # neighbour search several times faster on 512-2048-D CNN features
        subset = PCA(n_components=50, random_state=seed).fit_transform(subset)
    # perplexity ~ the number of neighbours each point weighs; it must stay below N
    perplexity = float(max(1.0, min(30.0, (len(subset) - 1) / 3)))
    tsne = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed)
    return tsne.fit_transform(subset).astype(np.float32), indices


def save_projection(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str | Path,
                    title: str) -> Path:
    """Scatter of 2-D points coloured by class.

    Up to 20 classes: tab10/tab20 colours and a legend beside the plot. More: a continuous colour
    map and each class's name at its median point instead of a legend (which would not fit).

    Args:
        points: K x 2 (from `project_2d`).
        labels: K class indices.
        class_names: names for the indices.
        path: the PNG to write.
        title: figure title.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = Path(path)
    labels = np.asarray(labels)
    count = len(class_names)
    if count <= 10:
        colours = plt.get_cmap("tab10").colors
    elif count <= 20:
        colours = plt.get_cmap("tab20").colors
    else:
        colours = plt.get_cmap("turbo")(np.linspace(0, 1, count))
    legend = count <= 20
    figure, axes = plt.subplots(figsize=(8.5 if legend else 7.5, 6.5))
    marker_size = 12 if len(points) <= 2000 else 5
    for index, name in enumerate(class_names):
        chosen = labels == index
        if not chosen.any():
            continue
        axes.scatter(points[chosen, 0], points[chosen, 1], s=marker_size, color=colours[index],
                     label=name, alpha=0.8, linewidths=0)
        if not legend:
            centre = np.median(points[chosen], axis=0)
            axes.text(centre[0], centre[1], name, fontsize=6, ha="center", va="center")
    if legend:
        axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, frameon=False)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
