"""Issue 4's training keys, each shown to change what training does: class weights, focal loss, the
balanced sampler, gradient accumulation, weight EMA, the time budget, the quick-try subset, freezing
and the backbone learning rate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import imgcls
from imgcls.config import LossConfig, load_config
from imgcls.data import balanced_sampler, subsample_train
from imgcls.data.sources import DataSource
from imgcls.losses import FocalLoss, balanced_class_weights, build_loss
from imgcls.models import create_model, head_parameters, set_backbone_trainable
from imgcls.runtime import Runtime
from imgcls.training import build_optimizer, train_one_epoch

FAST = ["model.name=small_resnet", "data.image_size=32", "train.batch_size=16", "seed=0", "data.augment=none"]


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def quick_run(shapes_folder, tmp_path, *overrides: str) -> Path:
    return imgcls.train(load_config(overrides=[f"data.path={shapes_folder}", f"run.dir={tmp_path}", *FAST, *overrides]))


# --- losses ----------------------------------------------------------------------------------------

def test_balanced_class_weights_follow_inverse_frequency():
    weights = balanced_class_weights([10, 30, 0])
    assert weights.tolist() == pytest.approx([2.0, 2 / 3, 0.0])  # 40 / (2 x count); an absent class weighs 0


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_gamma_discounts_easy_examples():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 4) * 3, torch.randint(0, 4, (16,))
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    assert FocalLoss(0.0, weight)(logits, labels) == pytest.approx(nn.CrossEntropyLoss(weight=weight)(logits, labels).item(), rel=1e-5)
    easy = torch.tensor([[8.0, 0.0, 0.0, 0.0]])
    hard = torch.tensor([[0.5, 0.0, 0.0, 0.0]])
    target = torch.tensor([0])
    ratio_easy = FocalLoss(2.0)(easy, target) / nn.functional.cross_entropy(easy, target)
    ratio_hard = FocalLoss(2.0)(hard, target) / nn.functional.cross_entropy(hard, target)
    assert ratio_easy < 0.01 < ratio_hard


def test_focal_loss_takes_soft_targets():
    logits = torch.randn(4, 3)
    hard = torch.tensor([0, 1, 2, 0])
    soft = nn.functional.one_hot(hard, 3).float()
    assert FocalLoss(2.0)(logits, soft) == pytest.approx(FocalLoss(2.0)(logits, hard).item(), rel=1e-6)


def test_build_loss_uses_class_weights_only_when_asked():
    assert build_loss(LossConfig(name="ce"), [1, 3]).weight is None
    assert build_loss(LossConfig(name="ce", class_weights="auto"), [1, 3]).weight.tolist() == pytest.approx([2.0, 2 / 3])
    assert isinstance(build_loss(LossConfig(name="focal", class_weights="auto"), [1, 3]), FocalLoss)


def test_class_weights_and_focal_change_training(shapes_folder, tmp_path):
    # a long-tailed manifest: 40 circles, 8 squares, 8 triangles
    manifest = tmp_path / "long_tail.csv"
    lines = ["path,label"] + [f"{path},{path.parent.name}" for name, keep in (("circle", 40), ("square", 8), ("triangle", 8))
                              for path in sorted((shapes_folder / name).iterdir())[:keep]]
    manifest.write_text("\n".join(lines) + "\n")
    runs = {}
    for name, extra in (("plain", []), ("weighted", ["loss.class_weights=auto"]), ("focal", ["loss.name=focal"])):
        runs[name] = imgcls.train(load_config(overrides=[
            f"data.path={manifest}", f"run.dir={tmp_path}", *FAST, "train.epochs=1", f"run.name={name}", *extra]))
    losses = {name: float(rows(run)[0]["train_loss"]) for name, run in runs.items()}
    assert losses["focal"] < 0.8 * losses["plain"]  # (1 - p)^2 shrinks every term
    assert abs(losses["weighted"] - losses["plain"]) > 1e-3  # same data and seed: only the weights differ


# --- sampling and subsets --------------------------------------------------------------------------

def test_balanced_sampler_draws_classes_equally_often():
    labels = torch.tensor([0] * 90 + [1] * 10)
    drawn = labels[list(balanced_sampler(labels, torch.Generator().manual_seed(0)))]
    share = (drawn == 1).float().mean().item()
    assert len(drawn) == 100 and 0.35 < share < 0.65  # about half, not 10%


def test_balanced_sampler_in_training(shapes_folder, tmp_path):
    run = quick_run(shapes_folder, tmp_path, "train.epochs=1", "data.sampler=balanced", "data.per_class_limit=4")
    assert float(rows(run)[0]["train_loss"]) > 0
    with pytest.raises(imgcls.ImgclsError, match="data.sampler"):
        load_config(overrides=["data.sampler=uniform"])


def test_fraction_and_per_class_limit_shrink_only_the_training_split():
    samples = [(f"{label}/{i}.png", label) for label in "abc" for i in range(40)] + [("d/0.png", "d")]
    source = DataSource(name="x", splits={"train": samples, "val": samples[:5]})
    quarter = subsample_train(source, fraction=0.25, seed=0)
    counts = quarter.counts("train")
    assert counts == {"a": 10, "b": 10, "c": 10, "d": 1}  # stratified; a 1-image class keeps its image
    assert quarter.splits["val"] == source.splits["val"]
    assert subsample_train(source, fraction=0.25, seed=0).splits == quarter.splits  # seeded
    limited = subsample_train(source, per_class_limit=3, seed=0)
    assert max(limited.counts("train").values()) == 3


def test_fraction_in_a_run_is_recorded_in_splits_csv(shapes_folder, tmp_path):
    run = quick_run(shapes_folder, tmp_path, "train.epochs=1", "data.fraction=0.5")
    with open(run / "splits.csv", newline="") as handle:
        train = [row for row in csv.DictReader(handle) if row["split"] == "train"]
    assert len(train) == 48  # half of 96


# --- the optimisation loop -------------------------------------------------------------------------

def test_accumulating_two_batches_equals_one_double_batch():
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 2, 2), torch.randint(0, 3, (8,))
    runtime = Runtime(torch.device("cpu"), "fp32", channels_last=False)
    results = []
    for batches, accumulate in (([(images, labels)], 1), ([(images[:4], labels[:4]), (images[4:], labels[4:])], 2)):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        train_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), runtime, runtime.grad_scaler(),
                        accumulate=accumulate)
        results.append(model[1].weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_ema_is_evaluated_checkpointed_and_can_become_best(shapes_folder, tmp_path):
    run = quick_run(shapes_folder, tmp_path, "train.epochs=3", "train.ema=true", "train.ema_decay=0.9")
    table = rows(run)
    assert "val_ema_acc1" in table[0] and "val_ema_loss" in table[0]
    assert any(row["val_ema_loss"] != row["val_loss"] for row in table)
    from imgcls.checkpoint import load_artifact, load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["ema"] is not None
    _, metadata = load_artifact(run / "checkpoints" / "model.safetensors")
    assert metadata["metrics"]["weights"] in ("ema", "raw")


def test_a_time_budget_too_short_for_one_epoch_still_trains_one_and_finishes(shapes_folder, tmp_path):
    run = quick_run(shapes_folder, tmp_path, "train.epochs=5", "train.max_minutes=0.0001")
    assert len(rows(run)) == 1
    assert "train.max_minutes" in (run / "log.txt").read_text()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


# --- transfer-learning controls --------------------------------------------------------------------

def test_backbone_learning_rate_ratio_makes_two_rates():
    model = create_model("small_resnet", 3, (0.5,) * 3, (0.5,) * 3)
    config = load_config(overrides=["optim.lr=0.01", "optim.backbone_lr_ratio=0.1"])
    optimizer = build_optimizer(model, config)
    head = head_parameters(model)
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # a group is all head or all backbone
        assert group["lr"] == pytest.approx(0.01 if in_head == {True} else 0.001)


def test_freezing_trains_only_the_head(shapes_folder, tmp_path):
    model = create_model("small_resnet", 3, (0.5,) * 3, (0.5,) * 3)
    set_backbone_trainable(model, False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == head_parameters(model) and trainable
    # in a run: after one frozen epoch the stem's weights are still the seeded initial ones
    run = quick_run(shapes_folder, tmp_path, "train.epochs=1", "model.freeze_epochs=1")
    from imgcls.checkpoint import load_checkpoint

    torch.manual_seed(0)
    initial = create_model("small_resnet", 3, (0.5,) * 3, (0.5,) * 3)
    trained = load_checkpoint(run / "checkpoints" / "last.ckpt")["model"]
    assert torch.equal(trained["backbone.stem.0.weight"], initial.state_dict()["backbone.stem.0.weight"])
    assert not torch.equal(trained["backbone.fc.weight"], initial.state_dict()["backbone.fc.weight"])


def test_mixup_and_cutmix_train_with_soft_targets(shapes_folder, tmp_path):
    plain = quick_run(shapes_folder, tmp_path, "train.epochs=1", "run.name=plain")
    mixed = quick_run(shapes_folder, tmp_path, "train.epochs=1", "run.name=mixed", "data.mixup_alpha=0.8",
                      "data.cutmix_alpha=1.0")
    # mixed targets cannot be fitted as sharply: the training loss is higher on the same data and seed
    assert float(rows(mixed)[0]["train_loss"]) > float(rows(plain)[0]["train_loss"])


def test_scratch_models_normalise_with_the_training_images_statistics(shapes_folder, tmp_path):
    from imgcls.data import ImageDataset, channel_statistics

    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    images[..., 0] = 51  # red 0.2 everywhere: std 0 -> 1
    images[:2, ..., 1] = 255  # green: half the images 1.0, half 0.0 -> mean 0.5, std 0.5
    dataset = ImageDataset([f"{i}.png" for i in range(4)], [0, 1, 0, 1], 8, "crop", images=images)
    mean, std = channel_statistics(dataset)
    assert mean == pytest.approx((0.2, 0.5, 0.0), abs=1e-4) and std == pytest.approx((1.0, 0.5, 1.0), abs=1e-4)
    run = quick_run(shapes_folder, tmp_path, "train.epochs=1")
    from imgcls.checkpoint import load_artifact

    _, metadata = load_artifact(run / "checkpoints" / "model.safetensors")
    assert metadata["preprocessing"]["mean"] != [0.5, 0.5, 0.5]  # dark noisy backgrounds: well below 0.5
    assert max(metadata["preprocessing"]["mean"]) < 0.45


@pytest.mark.parametrize("name", ["small_resnet", "resnet18", "tf_efficientnet_lite0"])
def test_hidden_head_layer_is_built_and_counts_as_head(name):
    model = create_model(name, 3, (0.5,) * 3, (0.5,) * 3, drop_rate=0.3, head_hidden=32)
    head = model.backbone.get_classifier()
    assert [type(layer) for layer in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert head[0].out_features == 32 and head[3].out_features == 3 and head[2].p == 0.3
    assert head_parameters(model) == {id(p) for p in head.parameters()}
    assert model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 3)


def test_hidden_head_in_a_run_reaches_the_artifact_and_predict(shapes_folder, tmp_path):
    run = quick_run(shapes_folder, tmp_path, "train.epochs=1", "model.head_hidden=16")
    state = load_checkpoint_model(run)
    assert state["backbone.fc.0.weight"].shape[0] == 16 and state["backbone.fc.3.weight"].shape == (3, 16)
    classifier = imgcls.load(run)  # rebuilt from the artifact alone: the hidden layer must come back
    assert isinstance(classifier.model.backbone.fc, nn.Sequential)
    assert len(classifier.predict([next(shapes_folder.glob("circle/*"))])) == 1


def test_a_narrower_deeper_small_resnet_reaches_the_artifact_and_predict(shapes_folder, tmp_path):
    run = quick_run(shapes_folder, tmp_path, "train.epochs=1", "model.width=8", "model.blocks=2")
    assert load_checkpoint_model(run)["backbone.stem.0.weight"].shape[0] == 8
    classifier = imgcls.load(run)  # rebuilt from the artifact alone: the shape must come back
    assert len(classifier.model.backbone.stages) == 6 and classifier.model.backbone.num_features == 32
    assert len(classifier.predict([next(shapes_folder.glob("circle/*"))])) == 1


def test_hidden_head_on_a_classifier_that_is_not_linear_is_refused():
    from imgcls.errors import ImgclsError

    with pytest.raises(ImgclsError, match="model.head_hidden"):
        create_model("dla34", 3, (0.5,) * 3, (0.5,) * 3, head_hidden=8)  # a 1x1 conv classifier


def load_checkpoint_model(run: Path) -> dict[str, torch.Tensor]:
    from imgcls.checkpoint import load_checkpoint

    return load_checkpoint(run / "checkpoints" / "last.ckpt")["model"]
