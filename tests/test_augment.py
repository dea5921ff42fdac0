"""Batch augmentation (presets, auto-augment policies, colour jitter, random erasing) and MixUp /
CutMix: each key changes the batch the way it says, and every draw follows torch's global seed."""

import pytest
import torch

from imgcls.config import DataConfig, load_config
from imgcls.data.augment import ERASE_VALUE, build_augment, build_mixing
from imgcls.errors import ImgclsError


@pytest.fixture
def gradient_batch():
    """Sixteen copies of one 3 x 32 x 32 uint8 image with no symmetry: flips and crops change it."""
    rows = torch.arange(32).view(32, 1).expand(32, 32)
    columns = torch.arange(32).view(1, 32).expand(32, 32)
    image = torch.stack([rows * 8, columns * 8, (rows + columns) * 4]).to(torch.uint8)
    return image.expand(16, 3, 32, 32).contiguous()


def augmented(batch: torch.Tensor, seed: int = 0, **keys) -> torch.Tensor:
    augment = build_augment(DataConfig(**keys), 32)
    torch.manual_seed(seed)
    return augment(batch)


def distinct(images: torch.Tensor) -> int:
    return len({image.numpy().tobytes() for image in images})


def pixel_values(images: torch.Tensor) -> set[float]:
    return set(images[:, 0].unique().tolist())


# --- presets -------------------------------------------------------------------------------------

def test_no_augmentation():
    assert build_augment(DataConfig(augment="none"), 32) is None


@pytest.mark.parametrize("preset", ["light", "standard", "strong"])
def test_presets_keep_shape_give_unit_floats_and_change_images(gradient_batch, preset):
    output = augmented(gradient_batch, augment=preset)
    assert output.shape == (16, 3, 32, 32) and output.dtype == torch.float32
    assert 0.0 <= output.min() and output.max() <= 1.0
    original = gradient_batch[0].float() / 255
    assert sum(not torch.allclose(image, original) for image in output) >= 12
    # per-sample parameters: the copies of one image in a batch come out differently
    assert distinct(output) >= 12


def test_light_only_moves_pixels(gradient_batch):
    # flip + reflect-padded crop: no colour change, so every output value is one of the input's values
    assert pixel_values(augmented(gradient_batch, augment="light")) <= pixel_values(gradient_batch.float() / 255)


def test_standard_changes_colours(gradient_batch):
    assert not pixel_values(augmented(gradient_batch, augment="standard")) <= pixel_values(gradient_batch.float() / 255)


def test_strong_adds_to_standard(gradient_batch):
    # the same seed draws the same crops, flips and jitter; strong then adds RandAugment and erasing
    assert not torch.equal(augmented(gradient_batch, augment="strong"), augmented(gradient_batch, augment="standard"))


@pytest.mark.parametrize("preset", ["standard", "strong"])
def test_augmentation_is_reproducible_under_a_seed(gradient_batch, preset):
    # the loop's RNG state is saved in checkpoints, so resume replays the same augmentations
    assert torch.equal(augmented(gradient_batch, 3, augment=preset), augmented(gradient_batch, 3, augment=preset))


def test_unknown_names_are_rejected_by_the_builder():
    with pytest.raises(ValueError, match="heavy"):
        build_augment(DataConfig(augment="heavy"), 32)
    with pytest.raises(ValueError, match="randaug"):
        build_augment(DataConfig(auto_augment="randaug"), 32)


# --- extra keys ----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_auto_augment_policies_change_images_with_a_policy_per_group(gradient_batch, policy):
    output = augmented(gradient_batch, augment="none", auto_augment=policy)
    original = gradient_batch[0].float() / 255
    assert sum(not torch.allclose(image, original) for image in output) >= 8
    # torchvision draws one policy per call; imgcls calls it per group of 4 images: 4 draws for 16 images
    groups = [{image.numpy().tobytes() for image in group} for group in output.split(4)]
    assert len(set().union(*groups)) >= 3


def test_randaugment_keeps_the_brightness_of_the_images():
    """Regression: kornia's RandAugment at m=9 darkened images (brightness factor always below 1:
    mean 0.50 -> 0.43 over the policy); torchvision's draws the sign of each change."""
    torch.manual_seed(0)
    batch = (torch.rand(512, 3, 32, 32) * 0.6 + 0.2).mul(255).to(torch.uint8)  # mean pixel 0.5
    output = augmented(batch, augment="none", auto_augment="randaugment")
    assert abs(output.mean().item() - batch.float().div(255).mean().item()) < 0.05


def test_random_erasing_fills_one_rectangle(gradient_batch):
    original = gradient_batch.float() / 255
    output = augmented(gradient_batch, augment="none", random_erasing=1.0)
    for image, before in zip(output, original):
        changed = (image != before).any(dim=0)
        rows, columns = changed.nonzero().unbind(1)
        height, width = rows.max() - rows.min() + 1, columns.max() - columns.min() + 1
        assert changed.sum() == height * width  # the changed pixels fill their bounding box
        assert 0.02 * 32 * 32 <= changed.sum() <= 0.4 * 32 * 32
        assert (image[:, changed] == ERASE_VALUE).all()


def test_color_jitter_changes_colours(gradient_batch):
    original = pixel_values(gradient_batch.float() / 255)
    assert pixel_values(augmented(gradient_batch, augment="light")) <= original
    assert not pixel_values(augmented(gradient_batch, augment="light", color_jitter=0.4)) <= original
    # None: the preset's own strength
    assert torch.equal(augmented(gradient_batch, augment="standard"),
                       augmented(gradient_batch, augment="standard", color_jitter=0.3))


# --- mixing --------------------------------------------------------------------------------------

NUM_CLASSES = 8


@pytest.fixture
def flat_batch():
    """Eight images, each of one grey level of its own, and labels 0..7: who was mixed with whom shows."""
    levels = torch.linspace(0.1, 0.9, NUM_CLASSES)
    return levels.view(-1, 1, 1, 1).expand(NUM_CLASSES, 3, 16, 16).contiguous(), torch.arange(NUM_CLASSES)


def mixed(images, labels, seed: int = 0, **keys):
    mixing = build_mixing(DataConfig(**keys), NUM_CLASSES)
    torch.manual_seed(seed)
    return mixing(images, labels)


def test_no_mixing_by_default():
    assert build_mixing(DataConfig(), NUM_CLASSES) is None


def test_mixup_targets_are_the_blend_weights(flat_batch):
    images, labels = flat_batch
    output, targets = mixed(images, labels, mixup_alpha=0.4)
    assert targets.shape == (NUM_CLASSES, NUM_CLASSES) and (targets >= 0).all()
    assert torch.allclose(targets.sum(dim=1), torch.ones(NUM_CLASSES))
    levels = images[:, 0, 0, 0]
    two_classes = 0
    for image, target in zip(output, targets):
        # every pixel is the target-weighted blend of the two images' grey levels
        assert torch.allclose(image, (target * levels).sum().expand_as(image), atol=1e-5)
        two_classes += int((target > 0).sum() == 2)
    assert two_classes >= NUM_CLASSES - 2  # a random pairing may pair an image with itself


def test_cutmix_pastes_a_box_weighted_by_its_area(flat_batch):
    images, labels = flat_batch
    output, targets = mixed(images, labels, cutmix_alpha=1.0)
    assert torch.allclose(targets.sum(dim=1), torch.ones(NUM_CLASSES))
    pasted_any = False
    for index, (image, target) in enumerate(zip(output, targets)):
        pasted = image[0] != images[index, 0, 0, 0]
        assert torch.isclose(target[index], 1 - pasted.float().mean()) or (target[index] == 1 and not pasted.any())
        if pasted.any():
            pasted_any = True
            rows, columns = pasted.nonzero().unbind(1)
            assert pasted.sum() == (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
            partner = target.clone()
            partner[index] = 0
            assert partner.sum() == pytest.approx(pasted.float().mean().item())
            # the box holds the partner's grey level
            assert torch.allclose(image[0][pasted], images[partner.argmax(), 0, 0, 0])
    assert pasted_any


def test_both_alphas_switch_between_mixup_and_cutmix(flat_batch):
    images, labels = flat_batch
    mixing = build_mixing(DataConfig(mixup_alpha=0.4, cutmix_alpha=1.0), NUM_CLASSES)
    torch.manual_seed(0)
    kinds = []
    for _ in range(20):
        output, _ = mixing(images, labels)
        # CutMix keeps the original grey levels; MixUp makes new ones
        kinds.append("cutmix" if pixel_values(output) <= pixel_values(images) else "mixup")
    assert 5 <= kinds.count("cutmix") <= 15


def test_mix_probability_leaves_batches_unmixed(flat_batch):
    images, labels = flat_batch
    assert build_mixing(DataConfig(mixup_alpha=0.4, mix_probability=0.0), NUM_CLASSES) is None
    mixing = build_mixing(DataConfig(mixup_alpha=0.4, mix_probability=0.5), NUM_CLASSES)
    torch.manual_seed(0)
    unmixed = 0
    for _ in range(20):
        output, targets = mixing(images, labels)
        if torch.equal(output, images):
            assert torch.equal(targets, torch.eye(NUM_CLASSES))  # one-hot
            unmixed += 1
    assert 5 <= unmixed <= 15


def test_mixing_takes_uint8_and_follows_the_seed(flat_batch):
    images, labels = flat_batch
    as_bytes = (images * 255).round().to(torch.uint8)
    first = mixed(as_bytes, labels, seed=5, mixup_alpha=0.4, cutmix_alpha=1.0)
    again = mixed(as_bytes, labels, seed=5, mixup_alpha=0.4, cutmix_alpha=1.0)
    assert first[0].dtype == torch.float32 and first[0].max() <= 1.0
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# --- configuration -------------------------------------------------------------------------------

def test_augmentation_keys_load_and_bad_values_are_rejected():
    config = load_config(overrides=["data.augment=strong", "data.auto_augment=trivialaugment", "data.color_jitter=0.4",
                                    "data.random_erasing=0.5", "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0",
                                    "data.mix_probability=0.5"])
    assert (config.data.augment, config.data.auto_augment, config.data.mixup_alpha) == ("strong", "trivialaugment", 0.8)
    for override in ["data.augment=heavy", "data.auto_augment=randaug", "data.color_jitter=-0.1",
                     "data.random_erasing=1.5", "data.mixup_alpha=-1", "data.cutmix_alpha=-1", "data.mix_probability=2"]:
        with pytest.raises(ImgclsError, match=override.split("=")[0]):
            load_config(overrides=[override])
