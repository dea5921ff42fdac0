"""Explanations: Grad-CAM must point at the evidence a trained model uses, hooks must capture the
right tensors, the 2-D projection must keep clusters apart, and every figure must be a real PNG."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imgcls.errors import ImgclsError
from imgcls.explain import (
    activation_maps, choose_gallery_rows, gradcam, penultimate_features, project_2d, save_activation_maps,
    save_gradcam_gallery, save_projection, target_layer,
)
from imgcls.models import ImageClassifier, SmallResNet, create_model, set_backbone_trainable

# Grad-CAM comes from the optional grad-cam package; everything else here runs without it
needs_gradcam = pytest.mark.skipif(importlib.util.find_spec("pytorch_grad_cam") is None,
                                   reason="pip install grad-cam")

# one bright square per image; its colour is the class
COLOURS = np.array([(220, 40, 40), (40, 200, 40), (40, 60, 230)])
SIZE, SIDE = 32, 8  # image and square sides, pixels


def noise(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(20, 90, size=(count, SIZE, SIZE, 3))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def coloured_squares(rng: np.random.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training data: a square of the class colour anywhere on a dark noisy background."""
    images, labels = noise(rng, count), rng.integers(0, len(COLOURS), count)
    for image, label in zip(images, labels):
        top, left = rng.integers(0, SIZE - SIDE + 1, 2)
        image[top: top + SIDE, left: left + SIDE] = COLOURS[label]
    return to_tensor(images), torch.from_numpy(labels)


def two_squares(rng: np.random.Generator, count: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Test data: one class's square in the left half and another class's in the right half."""
    images = noise(rng, count)
    left_classes = rng.integers(0, len(COLOURS), count)
    right_classes = (left_classes + rng.integers(1, len(COLOURS), count)) % len(COLOURS)
    for image, left_class, right_class in zip(images, left_classes, right_classes):
        top_left, top_right = rng.integers(0, SIZE - SIDE + 1, 2)
        left = rng.integers(0, SIZE // 2 - SIDE + 1)
        right = rng.integers(SIZE // 2, SIZE - SIDE + 1)
        image[top_left: top_left + SIDE, left: left + SIDE] = COLOURS[left_class]
        image[top_right: top_right + SIDE, right: right + SIDE] = COLOURS[right_class]
    return to_tensor(images), left_classes, right_classes


def small_model(num_classes: int = 3) -> ImageClassifier:
    return create_model("small_resnet", num_classes=num_classes, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture(scope="module")
def trained_model() -> ImageClassifier:
    """A narrow SmallResNet that tells the square colours apart (~1 s of training on 2 cores)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = ImageClassifier(SmallResNet(len(COLOURS), widths=(8, 16, 32)), (0.5,) * 3, (0.5,) * 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        images, labels = coloured_squares(rng, 32)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def left_share(maps: np.ndarray) -> np.ndarray:
    """Share of each map's mass in the left half of the image."""
    return maps[:, :, : SIZE // 2].sum(axis=(1, 2)) / np.maximum(maps.sum(axis=(1, 2)), 1e-9)


# --------------------------------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------------------------------

@needs_gradcam
def test_gradcam_points_at_the_square_of_the_target_class(trained_model):
    rng = np.random.default_rng(1)
    images, labels = coloured_squares(rng, 120)
    with torch.no_grad():
        accuracy = (trained_model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95, "the model must have learned the task for its maps to mean anything"

    images, left_classes, right_classes = two_squares(rng, 24)
    # the same images, explained for two different classes: the map must move with the class
    left_maps = gradcam(trained_model, images, left_classes)
    right_maps = gradcam(trained_model, images, right_classes)
    assert left_share(left_maps).mean() > 0.8
    assert left_share(right_maps).mean() < 0.2
    assert (left_share(left_maps) > left_share(right_maps)).mean() > 0.9


@needs_gradcam
def test_gradcam_shapes_range_and_input_types(trained_model):
    images, _, right_classes = two_squares(np.random.default_rng(2), 5)
    maps = gradcam(trained_model, images, torch.from_numpy(right_classes), batch_size=2)
    assert maps.shape == (5, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert np.allclose(maps.max(axis=(1, 2)), 1, atol=1e-3)  # each map scaled to its own maximum
    from_floats = gradcam(trained_model, images.float() / 255, right_classes)
    assert np.allclose(maps, from_floats, atol=1e-4)
    assert gradcam(trained_model, images[:0], []).shape == (0, SIZE, SIZE)
    with pytest.raises(ImgclsError, match="target classes"):
        gradcam(trained_model, images, [0, 1])


@needs_gradcam
def test_gradcam_on_a_frozen_training_model_leaves_it_as_found(trained_model):
    model = ImageClassifier(SmallResNet(len(COLOURS), widths=(8, 16, 32)), (0.5,) * 3, (0.5,) * 3)
    model.load_state_dict(trained_model.state_dict())
    model.train()
    set_backbone_trainable(model, False)
    head = model.backbone.get_classifier()
    head.weight.grad = torch.ones_like(head.weight)  # as if mid-way through gradient accumulation
    batch_norm = model.backbone.stem[1]
    running_mean = batch_norm.running_mean.clone()
    flags = [parameter.requires_grad for parameter in model.parameters()]
    images, left_classes, _ = two_squares(np.random.default_rng(3), 8)

    maps = gradcam(model, images, left_classes)
    assert left_share(maps).mean() > 0.8  # frozen weights, same explanation
    assert [parameter.requires_grad for parameter in model.parameters()] == flags
    assert all(module.training for module in model.modules())
    assert torch.equal(batch_norm.running_mean, running_mean)  # ran in eval mode
    assert torch.equal(head.weight.grad, torch.ones_like(head.weight))
    assert all(parameter.grad is None for parameter in model.backbone.stages.parameters())

    for parameter in model.parameters():  # the head frozen too
        parameter.requires_grad_(False)
    assert gradcam(model, images, left_classes).max() > 0
    assert not any(parameter.requires_grad for parameter in model.parameters())


@needs_gradcam
def test_target_layer_of_the_small_networks_and_a_timm_cnn():
    model = small_model()
    layer, reshape = target_layer(model)
    assert layer is model.backbone.stages[-1] and reshape is None
    convnet = create_model("small_convnet", num_classes=3, mean=(0.5,) * 3, std=(0.5,) * 3, width=8)
    layer, reshape = target_layer(convnet)
    assert layer is convnet.backbone.groups[-1] and reshape is None
    maps = gradcam(convnet.eval(), torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8), [0, 2])
    assert maps.shape == (2, 28, 28) and np.isfinite(maps).all()

    resnet = create_model("resnet18", num_classes=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    layer, reshape = target_layer(resnet, image_size=64)
    assert layer is resnet.backbone.layer4 and reshape is None
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    maps = gradcam(resnet.eval(), images, [0, 2])
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()


@needs_gradcam
def test_target_layer_of_vision_transformers_drops_prefix_tokens():
    from timm.models.vision_transformer import VisionTransformer

    # a class token and 4 register tokens before a 4 x 4 grid of patches
    backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=4,
                                 num_classes=3)
    model = ImageClassifier(backbone, (0.5,) * 3, (0.5,) * 3)
    layer, reshape = target_layer(model)
    assert layer is backbone.blocks[-1].norm1
    tokens = torch.randn(2, 5 + 16, 32)
    grid = reshape(tokens)
    assert grid.shape == (2, 32, 4, 4)
    assert torch.equal(grid[:, :, 1, 2], tokens[:, 5 + 1 * 4 + 2])  # row-major patch order
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    maps = gradcam(model.eval(), images, [0, 1, 2])
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all()
    # a named block's tokens become a grid too; a named convolution is left as it is
    assert activation_maps(model, images, layer_name="blocks.0", channels=4)[0].shape == (3, 4, 4, 4)
    assert gradcam(model, images, [0, 1, 2], layer_name="patch_embed.proj").shape == (3, 32, 32)

    import timm

    vit = ImageClassifier(timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3), (0.5,) * 3, (0.5,) * 3)
    layer, reshape = target_layer(vit)
    assert layer is vit.backbone.blocks[-1].norm1
    assert reshape(torch.zeros(1, 1 + 16, 192)).shape == (1, 192, 4, 4)


def test_target_layer_of_an_unknown_structure_is_an_error():
    model = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3)), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ImgclsError, match="feature map"):
        target_layer(model, image_size=16)


@needs_gradcam
def test_gradcam_gallery_png(shapes_folder, tmp_path):
    files = sorted(shapes_folder.glob("*/*"))[::20][:5]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    class_names = ["circle", "square", "triangle"]
    rows = [{"path": str(file), "true": file.parent.name, "predicted": "square", "confidence": 0.93} for file in files]
    rows.append({"path": str(broken), "true": "circle", "predicted": "circle", "confidence": 0.5, "predicted_index": 0})
    path = save_gradcam_gallery(small_model(), rows, class_names, 48, "crop", tmp_path / "gallery.png", "sample")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 800
    empty = save_gradcam_gallery(small_model(), [], class_names, 48, "crop", tmp_path / "empty.png", "no mistakes")
    assert empty.is_file()
    rows[0]["predicted"] = "hexagon"
    with pytest.raises(ImgclsError, match="hexagon"):
        save_gradcam_gallery(small_model(), rows, class_names, 48, "crop", tmp_path / "bad.png", "sample")


def test_choose_gallery_rows_takes_the_most_confident_mistakes():
    rows = [{"true": "a", "predicted": "b", "confidence": c} for c in (0.6, 0.9, 0.7)]
    rows += [{"true": "a", "predicted": "a", "confidence": 0.99}] * 5
    correct, wrong = choose_gallery_rows(rows, count=2)
    assert [row["confidence"] for row in wrong] == [0.9, 0.7]
    assert len(correct) == 2 and all(row["true"] == row["predicted"] for row in correct)


# --------------------------------------------------------------------------------------------------
# Activation maps
# --------------------------------------------------------------------------------------------------

def test_activation_maps_are_the_most_active_channels():
    torch.manual_seed(0)
    model = small_model().eval()
    images = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    maps, channels, name = activation_maps(model, images, channels=5)
    assert name == "backbone.stages.2" and maps.shape == (3, 5, 8, 8) and channels.shape == (3, 5)
    with torch.no_grad():  # the last stage's output is forward_features' output
        expected = model.backbone.forward_features((images.float() / 255 - 0.5) / 0.5)
    top = expected.mean(dim=(2, 3)).argsort(dim=1, descending=True)[:, :5]
    assert np.array_equal(channels, top.numpy())
    assert np.allclose(maps[1, 0], expected[1, top[1, 0]].numpy(), atol=1e-5)

    maps, _, name = activation_maps(model, images, layer_name="stages.1", channels=500)
    assert name == "backbone.stages.1" and maps.shape == (3, 64, 16, 16)  # prefix optional, channels capped


def test_unknown_layer_name_lists_valid_names():
    with pytest.raises(ImgclsError, match=r"unknown layer 'stages\.9'.*backbone\.stages\.2"):
        activation_maps(small_model(), torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), layer_name="stages.9")


def test_activation_maps_of_a_layer_without_spatial_output_is_an_error():
    with pytest.raises(ImgclsError, match="not an N x C x H x W"):
        activation_maps(small_model(), torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), layer_name="backbone.fc")


def test_save_activation_maps_png(shapes_folder, tmp_path):
    files = sorted(shapes_folder.glob("*/*"))[:2] + [tmp_path / "missing.png"]
    path = save_activation_maps(small_model(), files, 40, "pad", tmp_path / "activations.png", channels=10)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.height > 300


# --------------------------------------------------------------------------------------------------
# Penultimate features and projection
# --------------------------------------------------------------------------------------------------

def loader_of(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 8):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=batch_size)


def test_penultimate_features_are_the_head_input():
    torch.manual_seed(0)
    model = small_model()
    model.train()
    images, labels = coloured_squares(np.random.default_rng(4), 20)
    features, captured_labels = penultimate_features(model, loader_of(images, labels))
    assert features.shape == (20, model.backbone.num_features) and np.array_equal(captured_labels, labels.numpy())
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        expected = model.backbone.forward_features((images.float() / 255 - 0.5) / 0.5).mean(dim=(2, 3))
    assert np.allclose(features, expected.numpy(), atol=1e-5)
    assert penultimate_features(model, loader_of(images, labels), limit=10)[0].shape == (10, 128)

    # a head with a hidden layer: still the pooled features, not the hidden layer's 16 values
    model.backbone.fc = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 3))
    hidden_head_features, _ = penultimate_features(model, loader_of(images, labels))
    assert np.allclose(hidden_head_features, features, atol=1e-5)


def test_penultimate_features_of_a_timm_model():
    resnet = create_model("resnet18", num_classes=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    features, _ = penultimate_features(resnet, loader_of(images, torch.zeros(4, dtype=torch.int64)))
    assert features.shape == (4, resnet.backbone.num_features) == (4, 512)


def nearest_neighbour_agreement(points: np.ndarray, labels: np.ndarray) -> float:
    distances = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    return float((labels[distances.argmin(1)] == labels).mean())


def test_tsne_keeps_separated_clusters_apart():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, size=(3, 64))  # 64-D: the PCA-to-50 step runs too
    labels = np.repeat(np.arange(3), 40)
    features = centres[labels] + rng.normal(0, 1, size=(120, 64))
    points, kept = project_2d(features, seed=0)
    assert points.shape == (120, 2) and np.array_equal(kept, np.arange(120))
    assert nearest_neighbour_agreement(points, labels) > 0.9
    # the same points with shuffled labels: the measure can fail
    assert nearest_neighbour_agreement(points, rng.permutation(labels)) < 0.6

    points, kept = project_2d(features, max_points=30)
    assert points.shape == (30, 2) and len(np.unique(kept)) == 30 and np.all(np.diff(kept) > 0)
    assert project_2d(features[:4])[0].shape == (4, 2)  # perplexity clipped for tiny N


def test_projection_errors():
    features = np.zeros((10, 4))
    with pytest.raises(ImgclsError, match="tsne or umap"):
        project_2d(features, method="pca")
    with pytest.raises(ImgclsError, match="at least 3"):
        project_2d(features[:2])
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ImgclsError, match="pip install umap-learn"):
            project_2d(features, method="umap")


@pytest.mark.parametrize("num_classes", [3, 25])
def test_save_projection_png(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, num_classes, 200)
    points = rng.normal(size=(200, 2)) + labels[:, None]
    names = [f"class_{index}" for index in range(num_classes)]
    path = save_projection(points, labels, names, tmp_path / "projection.png", "t-SNE")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 500


def test_gradcam_without_grad_cam_installed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # None: import fails
    with pytest.raises(ImgclsError, match="pip install grad-cam"):
        gradcam(small_model(), torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), [0])
