"""Model registry: small_resnet, small_convnet and timm models take uint8 (or 0..1 float) images, one logit per class;
weights files start a model with a new head; wrong names and wrong weights are clear errors."""

import pytest
import torch
from safetensors.torch import save_file

from imgcls.errors import ImgclsError
from imgcls.models import ImageClassifier, create_model, default_preprocessing, list_models, load_weights

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def uint8_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def build(name: str, num_classes: int, **options) -> ImageClassifier:
    torch.manual_seed(0)
    return create_model(name, num_classes, MEAN, STD, **options).eval()


# --- building and running ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["small_resnet", "small_convnet"])
@pytest.mark.parametrize("size", [16, 28, 64])
def test_small_networks_on_uint8_images(name, size):
    model = build(name, 5)
    with torch.no_grad():
        logits = model(uint8_images(4, size))
    assert logits.shape == (4, 5)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_uint8_and_unit_float_pixels_give_the_same_logits():
    # torchvision's convention: uint8 in 0..255 or float in 0..1; normalisation is inside the model
    model = build("small_resnet", 3)
    images = uint8_images(2, 16)
    with torch.no_grad():
        assert torch.allclose(model(images), model(images.float() / 255), atol=1e-5)


def test_normalisation_uses_mean_and_std():
    torch.manual_seed(0)
    model = create_model("small_resnet", 3, mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3)).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    pixels = torch.tensor([51, 102, 153], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 8, 8)  # 0.2, 0.4, 0.6
    with torch.no_grad():
        model(pixels)
    assert torch.allclose(seen[0], torch.zeros_like(seen[0]), atol=1e-5)


@pytest.mark.parametrize(("name", "size"), [("resnet18", 64), ("efficientnet_b0", 64), ("vit_tiny_patch16_224", 224)])
def test_timm_models_build_with_num_classes(name, size):
    model = build(name, 7)
    with torch.no_grad():
        logits = model(uint8_images(1, size))
    assert logits.shape == (1, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["small_resnet", "small_convnet"])
def test_drop_rate_reaches_the_model(name):
    model = build(name, 3, drop_rate=0.25)
    assert model.backbone.drop.p == 0.25


def test_small_convnet_width_sets_its_three_groups_and_blocks_is_refused():
    convnet = build("small_convnet", 3)
    assert [group.conv2.out_channels for group in convnet.backbone.groups] == [64, 256, 256]
    narrow = build("small_convnet", 3, width=16)
    assert [group.conv2.out_channels for group in narrow.backbone.groups] == [16, 64, 64]
    assert narrow.backbone.get_classifier().in_features == 64
    assert "small_convnet" in list_models("small_*") and default_preprocessing("small_convnet")["image_size"] is None
    with pytest.raises(ImgclsError, match="model.blocks shapes small_resnet only: small_convnet has three groups"):
        create_model("small_convnet", 3, MEAN, STD, blocks=2)


def test_small_resnet_width_and_blocks_shape_the_network():
    from imgcls.models import training_flops_per_image

    narrow = build("small_resnet", 3, width=16, blocks=2)
    assert [block.conv2.out_channels for block in narrow.backbone.stages] == [16, 16, 32, 32, 64, 64]
    assert narrow.backbone.fc.in_features == 64
    # a quarter of the channels squared: about a quarter of the operations per block
    assert training_flops_per_image("small_resnet", 10, 28, width=16) == pytest.approx(
        training_flops_per_image("small_resnet", 10, 28) / 4, rel=0.1)
    with pytest.raises(ImgclsError, match="model.width and model.blocks shape small_resnet only, not 'resnet18'"):
        create_model("resnet18", 3, MEAN, STD, width=16)


def test_unknown_model_name():
    with pytest.raises(ImgclsError, match="unknown model 'resnet_eighteen'") as error:
        create_model("resnet_eighteen", 3, MEAN, STD)
    message = str(error.value)
    assert "imgcls models" in message
    assert "resnet" in message.split("similar:")[1]  # suggests real names


def test_default_preprocessing():
    assert default_preprocessing("small_resnet")["image_size"] is None
    vit = default_preprocessing("vit_tiny_patch16_224")
    assert vit["image_size"] == 224
    assert len(vit["mean"]) == len(vit["std"]) == 3


# --- listing -------------------------------------------------------------------------------------

def test_list_models():
    assert "resnet18" in list_models("resnet1*")
    assert "small_resnet" not in list_models("resnet1*")
    assert "small_resnet" in list_models("small*")
    everything = list_models()
    assert "small_resnet" in everything and "efficientnet_b0" in everything
    assert list_models("no_such_model_*") == []


# --- starting from weights -----------------------------------------------------------------------

@pytest.fixture
def source_model():
    """A trained-looking resnet18 with 10 classes whose weights differ from a fresh one."""
    torch.manual_seed(1)
    return create_model("resnet18", 10, MEAN, STD)


def assert_backbone_from(target: ImageClassifier, source: ImageClassifier):
    target_state, source_state = target.backbone.state_dict(), source.backbone.state_dict()
    assert torch.equal(target_state["conv1.weight"], source_state["conv1.weight"])
    assert torch.equal(target_state["layer4.1.conv2.weight"], source_state["layer4.1.conv2.weight"])
    assert torch.equal(target_state["layer1.0.bn1.running_var"], source_state["layer1.0.bn1.running_var"])
    # the head was left out: new shape, fresh weights
    assert target_state["fc.weight"].shape == (4, 512)


def test_load_safetensors_weights_with_another_head(tmp_path, source_model):
    path = tmp_path / "start.safetensors"
    save_file({key: value.contiguous() for key, value in source_model.backbone.state_dict().items()}, str(path))
    fresh = build("resnet18", 4)
    assert not torch.equal(fresh.backbone.conv1.weight, source_model.backbone.conv1.weight)
    target = build("resnet18", 4, pretrained=str(path))
    assert_backbone_from(target, source_model)


def test_load_torch_state_dict_saved_from_an_image_classifier(tmp_path, source_model):
    # the whole ImageClassifier's state_dict: every key carries a "backbone." prefix
    path = tmp_path / "start.pt"
    torch.save(source_model.state_dict(), path)
    assert_backbone_from(build("resnet18", 4, pretrained=str(path)), source_model)


def test_load_state_dict_inside_a_checkpoint_dict(tmp_path, source_model):
    path = tmp_path / "start.pth"
    torch.save({"state_dict": source_model.backbone.state_dict(), "epoch": 90}, path)
    assert_backbone_from(build("resnet18", 4, pretrained=str(path)), source_model)


def test_load_weights_into_a_backbone_directly(tmp_path, source_model):
    path = tmp_path / "start.safetensors"
    save_file({key: value.contiguous() for key, value in source_model.state_dict().items()}, str(path))
    backbone = build("resnet18", 10).backbone
    load_weights(backbone, path)
    # same number of classes: the head is loaded too
    assert torch.equal(backbone.fc.weight, source_model.backbone.fc.weight)


def test_weights_of_another_architecture(tmp_path, source_model):
    path = tmp_path / "resnet18.safetensors"
    save_file({key: value.contiguous() for key, value in source_model.backbone.state_dict().items()}, str(path))
    for name in ("efficientnet_b0", "small_resnet"):
        with pytest.raises(ImgclsError, match="different architecture") as error:
            create_model(name, 4, MEAN, STD, pretrained=str(path))
        assert str(path) in str(error.value)


def test_missing_weights_file(tmp_path):
    with pytest.raises(ImgclsError, match="file not found"):
        create_model("small_resnet", 3, MEAN, STD, pretrained=str(tmp_path / "missing.safetensors"))


def test_unreadable_weights_file(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_text("not weights")
    with pytest.raises(ImgclsError, match="cannot read") as error:
        create_model("small_resnet", 3, MEAN, STD, pretrained=str(path))
    assert "model.pretrained" in str(error.value)



class RunsWhenLoaded:
    """Unpickling this calls `function(*arguments)`, as a malicious weights file would."""

    def __init__(self, function, arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


class PlainObject:
    pass


@pytest.mark.parametrize("payload", ["print", "create a file", "another class"])
def test_a_pickle_of_objects_is_refused_without_running_it(tmp_path, capsys, payload):
    created = tmp_path / "created_by_the_payload"
    content = {"print": RunsWhenLoaded(print, ("pwned",)), "create a file": RunsWhenLoaded(open, (str(created), "w")),
               "another class": PlainObject()}[payload]
    path = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1), "x": content}, path)
    with pytest.raises(ImgclsError) as error:
        create_model("small_resnet", 3, MEAN, STD, pretrained=str(path))
    assert str(error.value) == (f"refusing to load model.pretrained file {path}: it is not a plain-tensor "
                                "checkpoint (loading it could run code)")
    assert "pwned" not in capsys.readouterr().out and not created.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert "pwned" in capsys.readouterr().out or created.exists() or payload == "another class"


def test_resume_refuses_a_last_ckpt_that_would_run_code(tmp_path, capsys):
    import imgcls

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 1\n")
    created = tmp_path / "created_by_the_payload"
    torch.save({"epoch": 1, "x": RunsWhenLoaded(open, (str(created), "w"))}, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ImgclsError) as error:
        imgcls.train(resume=run)
    assert str(error.value) == (f"refusing to load checkpoint {run / 'checkpoints' / 'last.ckpt'}: it is not a "
                                "plain-tensor checkpoint (loading it could run code)")
    assert not created.exists()


def test_checkpoints_load_through_the_same_safe_loader(tmp_path):
    from imgcls.checkpoint import load_tensors_safely

    path = tmp_path / "last.ckpt"
    torch.save({"model": {"weight": torch.ones(2)}, "epoch": 3, "rng": [torch.zeros(4, dtype=torch.uint8)]}, path)
    state = load_tensors_safely(path, "checkpoint")
    assert state["epoch"] == 3 and torch.equal(state["model"]["weight"], torch.ones(2))
    path.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(ImgclsError) as error:
        load_tensors_safely(path, "checkpoint")
    assert str(error.value).startswith(f"cannot read checkpoint {path}: not a complete file written by torch.save")


def test_training_flops_are_counted_without_running_the_model():
    from imgcls.models import training_flops_per_image

    # resnet18 at 224 px: 3.6 GFLOP forward, 3x that for forward + backward
    flops = training_flops_per_image("resnet18", 1000, 224)
    assert 10.0e9 < flops < 11.5e9
    assert training_flops_per_image("small_resnet", 10, 56) == pytest.approx(
        4 * training_flops_per_image("small_resnet", 10, 28), rel=0.05)
