"""imgcls export and what it makes possible: ONNX and .pt2 files that answer as the PyTorch model does
(checked by the export itself, and again here), `imgcls predict model.onnx` without torch, a plain
onnxruntime script that reproduces `imgcls predict`, int8 quantization, and test-time augmentation.

One tiny real run (small_resnet, 2 epochs, ~5 s) is shared by the module; the exports are real."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import imgcls
from imgcls.cli import main
from imgcls.errors import ImgclsError
from imgcls.prediction import OnnxClassifier, augmented_views, load
from tests.conftest import copy_tree, train_tiny_run

@pytest.fixture(scope="module")
def trained_run(shapes_folder, tmp_path_factory) -> Path:
    return train_tiny_run(shapes_folder, tmp_path_factory.mktemp("export") / "runs", tmp_path_factory)


@pytest.fixture(scope="module")
def exported(trained_run) -> Path:
    """The run's export/ folder after `imgcls export RUN --format all` (ONNX and .pt2)."""
    assert main(["export", str(trained_run), "--format", "all"]) == 0
    return trained_run / "export"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Real photos (scikit-learn's samples) as JPEG and PNG crops of several sizes."""
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, array in zip(("china", "flower"), load_sample_images().images):
        photo = Image.fromarray(array)
        for index, box in enumerate([(0, 0, 427, 320), (100, 50, 300, 400), (200, 100, 260, 150)]):
            path = folder / f"{name}_{index}.{'jpg' if index % 2 == 0 else 'png'}"
            photo.crop(box).save(path)
            paths.append(path)
    return paths


def held_out_paths(run: Path) -> list[str]:
    with open(run / "splits.csv", newline="") as handle:
        return [row["path"] for row in csv.DictReader(handle) if row["split"] == "test"]


# ----------------------------------------------------------------------------------------------------
# the export and its parity check


def test_export_writes_onnx_and_pt2_that_pass_parity(trained_run, exported):
    report = json.loads((exported / "export.json").read_text())
    test_count = len(held_out_paths(trained_run))
    assert report["parity_images"] == f"test split ({test_count} of {test_count} images)"
    for name in ("onnx", "pt2"):
        entry = report["formats"][name]
        assert Path(entry["path"]).is_file() and Path(entry["path"]).stat().st_size == entry["bytes"]
        parity = entry["parity"]
        assert parity["passed"] and parity["images"] == test_count
        assert parity["top1_agreement"] >= 0.999 and parity["max_abs_difference"] <= 1e-3
    assert not [path.name for path in exported.iterdir() if path.name.startswith(".")]  # no staging left


def test_onnx_graph_takes_uint8_batches_and_carries_the_metadata(trained_run, exported):
    model = onnx.load(exported / "model.onnx")
    (images,) = model.graph.input
    assert images.name == "images"
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dimensions = images.type.tensor_type.shape.dim
    assert dimensions[0].dim_param and [d.dim_value for d in dimensions[1:]] == [3, 32, 32]  # batch is dynamic
    assert [output.name for output in model.graph.output] == ["probabilities", "logits"]
    properties = {entry.key: entry.value for entry in model.metadata_props}
    run_model = load(trained_run)
    assert json.loads(properties["class_names"]) == run_model.class_names
    assert properties["image_size"] == "32" and properties["resize"] == "crop"
    assert float(properties["temperature"]) == pytest.approx(run_model.temperature)
    threshold = ((run_model.metadata.get("calibration") or {}).get("reject") or {}).get("threshold")
    assert json.loads(properties["reject_threshold"]) == threshold
    assert properties["imgcls_version"]


def test_onnx_probabilities_equal_the_run_for_any_batch_size(trained_run, exported):
    run_model, onnx_model = load(trained_run), OnnxClassifier(exported / "model.onnx")
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    for batch in (images[:1], images):
        np.testing.assert_allclose(onnx_model.forward(batch), run_model.forward(batch), atol=1e-5)


def test_pt2_program_answers_as_the_run(trained_run, exported):
    extra = {"imgcls.json": ""}
    program = torch.export.load(str(exported / "model.pt2"), extra_files=extra)
    assert json.loads(extra["imgcls.json"])["class_names"] == load(trained_run).class_names
    images = np.random.default_rng(1).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        probabilities, logits = program.module()(torch.from_numpy(images))
    np.testing.assert_allclose(probabilities.numpy(), load(trained_run).forward(images), atol=1e-5)
    assert logits.shape == (5, len(load(trained_run).class_names))


def test_failed_parity_is_an_error_and_keeps_no_file(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("imgcls.exporting.PARITY_MAX_DIFFERENCE", -1.0)  # no export can pass a bar below 0
    out = tmp_path / "out"
    assert main(["export", str(trained_run), "--out", str(out)]) == 2
    assert "export parity failed" in capsys.readouterr().err
    assert not (out / "model.onnx").exists()
    assert not list(out.glob(".model.onnx*"))
    entry = json.loads((out / "export.json").read_text())["formats"]["onnx"]
    assert entry["parity"]["passed"] is False and entry["kept"] is False


def test_export_of_a_run_whose_data_is_gone_uses_generated_images(shapes_folder, tmp_path, tmp_path_factory):
    data = copy_tree(shapes_folder, tmp_path / "data")
    run = train_tiny_run(data, tmp_path / "runs", tmp_path_factory)
    shutil.rmtree(data)
    result = imgcls.export(run)
    assert result["parity_images"] == "256 generated images"
    assert result["formats"]["onnx"]["parity"]["passed"]


def test_int8_export_is_smaller_and_reports_its_accuracy(trained_run, tmp_path, caplog):
    result = imgcls.export(trained_run, out=tmp_path, int8=True)
    entry = result["formats"]["onnx_int8"]
    assert (tmp_path / "model.int8.onnx").stat().st_size < 0.5 * (tmp_path / "model.onnx").stat().st_size
    accuracy = entry["accuracy"]
    assert accuracy["images"] == len(held_out_paths(trained_run))
    assert accuracy["points_lost"] == pytest.approx(100 * (accuracy["fp32"] - accuracy["int8"]))
    assert entry["calibration_images"].startswith("train split (")
    quantized = onnx.load(tmp_path / "model.int8.onnx")
    assert any(node.op_type == "DequantizeLinear" for node in quantized.graph.node)  # QDQ format
    rows = OnnxClassifier(tmp_path / "model.int8.onnx").predict(held_out_paths(trained_run)[:4])
    assert all(row["label"] and not row["error"] for row in rows)


def test_export_reads_a_run_not_an_exported_file(exported, capsys):
    assert main(["export", str(exported / "model.onnx")]) == 2
    assert "reads a run folder or its model.safetensors, not model.onnx" in capsys.readouterr().err


def test_int8_needs_the_onnx_format(trained_run):
    with pytest.raises(ImgclsError, match="--int8 quantizes the ONNX model"):
        imgcls.export(trained_run, formats=("pt2",), int8=True)


# ----------------------------------------------------------------------------------------------------
# using the exported file


def test_predict_with_the_onnx_file_matches_the_run(trained_run, exported, photos, tmp_path):
    paths = [str(path) for path in photos] + held_out_paths(trained_run)[:6]
    for model, name in ((trained_run, "run.csv"), (exported / "model.onnx", "onnx.csv")):
        assert main(["predict", str(model), *paths, "--out", str(tmp_path / name), "--reject", "0.6"]) == 0
    with open(tmp_path / "run.csv", newline="") as run_file, open(tmp_path / "onnx.csv", newline="") as onnx_file:
        for run_row, onnx_row in zip(csv.DictReader(run_file), csv.DictReader(onnx_file), strict=True):
            assert run_row["label"] == onnx_row["label"] and run_row["label_1"] == onnx_row["label_1"]
            assert float(run_row["prob_1"]) == pytest.approx(float(onnx_row["prob_1"]), abs=1e-5)


def test_onnx_prediction_imports_neither_torch_nor_timm(exported, photos, tmp_path):
    script = (
        "import sys\n"
        "from imgcls.cli import main\n"
        f"code = main(['predict', {str(exported / 'model.onnx')!r}, {str(photos[0])!r}, '--out', {str(tmp_path / 'p.csv')!r}])\n"
        "loaded = [name for name in ('torch', 'timm', 'torchvision') if name in sys.modules]\n"
        "print(code, loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "0 []", result.stderr
    assert (tmp_path / "p.csv").is_file()


# the "Deploy" section of the README: onnxruntime, numpy and Pillow, given only the file
PLAIN_SCRIPT = '''
import json, sys, numpy as np, onnxruntime
from PIL import Image, ImageOps
session = onnxruntime.InferenceSession(sys.argv[1])
metadata = session.get_modelmeta().custom_metadata_map
size, class_names = int(metadata["image_size"]), json.loads(metadata["class_names"])
for path in sys.argv[2:]:  # resize="crop": shorter side to `size`, centre square
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size))).transpose(2, 0, 1)[None]
    probabilities, logits = session.run(None, {"images": np.ascontiguousarray(pixels)})
    print(path, class_names[probabilities[0].argmax()])
'''


def test_a_plain_onnxruntime_script_reproduces_imgcls_predict(trained_run, exported, photos, tmp_path):
    paths = held_out_paths(trained_run) + [str(path) for path in photos]
    result = subprocess.run([sys.executable, "-c", PLAIN_SCRIPT, str(exported / "model.onnx"), *paths],
                            capture_output=True, text=True, timeout=120, check=True)
    plain = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    rows = load(exported / "model.onnx").predict(paths)
    assert [plain[row["path"]] for row in rows] == [row["label"] for row in rows]


def test_a_file_that_is_not_an_imgcls_onnx_model_is_refused(tmp_path):
    (tmp_path / "other.onnx").write_bytes(b"not a model")
    with pytest.raises(ImgclsError, match="cannot read ONNX model"):
        load(tmp_path / "other.onnx")


# ----------------------------------------------------------------------------------------------------
# test-time augmentation


def test_augmented_views_are_the_mirror_and_shifted_crops():
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    (plain,) = augmented_views(images, None)
    assert plain is images
    original, mirror = augmented_views(images, "flip")
    np.testing.assert_array_equal(mirror, images[..., ::-1])
    crops = augmented_views(images, "crops")
    assert len(crops) == 6 and all(view.shape == images.shape for view in crops)
    shift = 32 // 16
    np.testing.assert_array_equal(crops[2][..., shift:, :], images[..., :-shift, :])  # moved down by `shift`
    without_mirror = augmented_views(images, "flip", flip=False)  # the mirror left out: shifted crops instead
    assert len(without_mirror) == 5
    assert not any(np.array_equal(view, mirror) for view in without_mirror)


def test_predict_with_tta_averages_the_views(trained_run, photos):
    model = load(trained_run)
    paths = [str(path) for path in photos[:3]]
    rows = model.predict(paths, tta="flip")
    images = np.stack([model.read(path) for path in paths]).transpose(0, 3, 1, 2).copy()
    expected = (model.forward(images) + model.forward(images[..., ::-1].copy())) / 2
    for row, probabilities in zip(rows, expected):
        assert row["prob_1"] == pytest.approx(float(probabilities.max()), abs=1e-6)
        assert row["label"] == model.class_names[int(probabilities.argmax())]


def test_eval_with_tta_reports_both_and_the_report_shows_them(trained_run, tmp_path, capsys):
    run = copy_tree(trained_run, tmp_path / "run")
    assert main(["eval", str(run), "--tta", "--no-explain", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["tta"]["mode"] == "flip" and metrics["tta"]["views"] == 2
    assert 0 <= metrics["tta"]["acc1"] <= 1 and "acc1" in metrics
    assert json.loads((run / "metrics_test.json").read_text())["tta"] == metrics["tta"]
    page = imgcls.write_report(run).read_text(encoding="utf-8")
    assert 'id="tta"' in page and "with TTA (flip, 2 views)" in page


def test_a_model_trained_without_flips_is_never_mirrored(shapes_folder, tmp_path, tmp_path_factory):
    from imgcls.data.augment import build_augment

    config = imgcls.load_config(overrides=["data.augment=standard", "data.horizontal_flip=false"])
    modules = [type(module).__name__ for module in build_augment(config.data, 32).modules()]
    assert "RandomHorizontalFlip" not in modules and "RandomResizedCrop" in modules
    run = train_tiny_run(shapes_folder, tmp_path / "runs", tmp_path_factory, "data.horizontal_flip=false",
                         "train.epochs=1")
    model = load(run)
    assert model.flip_allowed is False
    metrics = imgcls.evaluate(run, explain=False, quiet=True, tta="flip")
    assert metrics["tta"]["flip"] is False and metrics["tta"]["views"] == 5


# ----------------------------------------------------------------------------------------------------
# flip TTA built into the model (model.tta)


@pytest.fixture(scope="module")
def mirroring_run(shapes_folder, tmp_path_factory) -> Path:
    """A run whose model averages each image with its mirror: model.tta=flip, trained on mirror images."""
    return train_tiny_run(shapes_folder, tmp_path_factory.mktemp("mirroring") / "runs", tmp_path_factory,
                          "data.augment=light", "train.epochs=1", "model.tta=flip")


@pytest.fixture(scope="module")
def cropping_run(shapes_folder, tmp_path_factory) -> Path:
    """A run whose model averages each image, its mirror and its shifted crops: model.tta=auto, trained on
    mirror images and shifted crops."""
    return train_tiny_run(shapes_folder, tmp_path_factory.mktemp("cropping") / "runs", tmp_path_factory,
                          "data.augment=light", "train.epochs=1")


def test_tta_auto_follows_the_augmentation_of_training():
    from imgcls.training import test_time_augmentation, test_time_views

    def tta(*overrides: str, augmented: bool = True) -> str:
        return test_time_augmentation(imgcls.load_config(overrides=["data.image_size=28", "data.horizontal_flip=true",
                                                                    *overrides]), augmented)

    assert tta() == tta("data.image_size=64") == "crops"
    assert tta(augmented=False) == "none"  # an unaugmented epoch never saw a mirror image or a shifted crop
    assert tta("data.horizontal_flip=false") == "none"
    assert tta("data.image_size=128") == "none"  # bigger images: not measured, and inference costs more
    assert tta("model.tta=none") == "none"
    assert tta("model.tta=flip", "data.image_size=224", augmented=False) == "flip"
    assert tta("model.tta=crops", "data.horizontal_flip=false") == "crops"
    assert [test_time_views(mode, True) for mode in ("none", "flip", "crops")] == [1, 2, 6]
    assert test_time_views("crops", False) == 5  # the image and its shifts, without the mirror image


def test_an_artifact_says_which_views_its_model_runs_itself():
    from imgcls.prediction import built_in_views

    def views(tta: str | None, flip: bool = True) -> tuple[bool, bool]:
        return built_in_views({"config": {"data": {"horizontal_flip": flip}}, **({"tta": tta} if tta else {})})

    assert views(None) == views("none") == (False, False)  # artifacts from before model.tta: the plain network
    assert views("flip") == (True, False)
    assert views("crops") == (True, True) and views("crops", flip=False) == (False, True)


def test_a_cropping_model_answers_the_mean_of_the_views_of_tta_crops(cropping_run, photos, tmp_path, capsys):
    from imgcls.explain import gradcam
    from imgcls.models import shifted_views

    model = load(cropping_run)
    assert model.metadata["tta"] == "crops" and model.test_time_shifts and model.test_time_flip
    assert model.model.test_time_views == 6
    assert "model.tta=auto: from epoch 1 the saved model answers with the mean of each image, its mirror image and " \
        "its shifts by 1/16 of the side" in (cropping_run / "log.txt").read_text()
    images = np.stack([model.read(str(path)) for path in photos[:4]]).transpose(0, 3, 1, 2).copy()
    batch = torch.from_numpy(images)
    normalised = (batch.float() / 255 - model.model.mean) / model.model.std
    shifts = shifted_views(normalised)
    with torch.no_grad():
        averaged = model.model(batch)
        by_hand = sum(model.model.backbone(view) for view in [normalised, normalised.flip(3), *shifts]) / 6
        plain = model.model.backbone(normalised)
    torch.testing.assert_close(averaged, by_hand, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(averaged, plain)  # the views answer differently: the mean is not a no-op
    # the views are the ones --tta crops makes of a plain model (a shift of 1/16 of 32 px: 2 px)
    crops = [torch.from_numpy(view) for view in augmented_views(images, "crops")]
    assert len(crops) == 6 and len(shifts) == 4
    for view, crop in zip([normalised, normalised.flip(3), *shifts], crops):
        torch.testing.assert_close(view, (crop.float() / 255 - model.model.mean) / model.model.std)
    # --tta on such a model adds nothing: the same probabilities
    paths = [str(path) for path in photos[:4]]
    assert model.predict(paths, tta="crops") == model.predict(paths) == model.predict(paths, tta="flip")
    run = copy_tree(cropping_run, tmp_path / "run")
    assert main(["eval", str(run), "--tta", "crops", "--no-explain", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["tta"]["views"] == 6 and metrics["tta"]["acc1"] == metrics["acc1"]
    # the ONNX graph averages the same six views; Grad-CAM sees the plain network
    assert main(["export", str(run)]) == 0
    onnx_model = OnnxClassifier(run / "export" / "model.onnx")
    assert onnx_model.test_time_shifts and onnx_model.test_time_flip
    assert dict((entry.key, entry.value) for entry in onnx.load(run / "export" / "model.onnx").metadata_props
                )["tta"].startswith("crops")
    for onnx_row, row in zip(onnx_model.predict(paths), model.predict(paths)):
        assert onnx_row["label"] == row["label"] and onnx_row["prob_1"] == pytest.approx(row["prob_1"], abs=1e-4)
    maps = gradcam(model.model, batch, [0, 1, 0, 1])
    assert model.model.test_time_flip and model.model.test_time_shifts  # restored after Grad-CAM
    model.model.test_time_flip = model.model.test_time_shifts = False
    np.testing.assert_allclose(gradcam(model.model, batch, [0, 1, 0, 1]), maps, atol=1e-5)


def test_a_mirroring_model_answers_the_mean_of_the_image_and_its_mirror(mirroring_run, photos):
    model = load(mirroring_run)
    assert model.metadata["tta"] == "flip" and model.test_time_flip and model.model.test_time_flip
    assert not model.test_time_shifts and model.model.test_time_views == 2
    assert "model.tta=flip: from epoch 1 the saved model answers with the mean of each image and its mirror image" \
        in (mirroring_run / "log.txt").read_text()
    images = np.stack([model.read(str(path)) for path in photos[:4]]).transpose(0, 3, 1, 2).copy()
    batch = torch.from_numpy(images)
    passes = []
    model.model.backbone.register_forward_hook(lambda *_: passes.append(1))
    with torch.no_grad():
        mirrored = model.model(batch)
        assert len(passes) == 2
        model.model.test_time_flip = False
        plain, mirror = model.model(batch), model.model(batch.flip(3))
        model.model.test_time_flip = True
        model.model.train()
        passes.clear()
        model.model(batch)
        assert len(passes) == 1  # training sees the plain network
        model.model.eval()
    torch.testing.assert_close(mirrored, (plain + mirror) / 2)
    assert not torch.allclose(plain, mirror)  # the mirror answers differently: the mean is not a no-op
    # --tta flip on such a model adds nothing: the same probabilities, one pass
    paths = [str(path) for path in photos[:4]]
    assert model.predict(paths, tta="flip") == model.predict(paths)
    assert len(augmented_views(images, "flip", mirrored=True)) == 1


def test_a_mirroring_model_exports_the_mean_and_explains_the_plain_network(mirroring_run, photos, tmp_path):
    from imgcls.explain import gradcam

    run = copy_tree(mirroring_run, tmp_path / "run")
    assert main(["export", str(run)]) == 0
    onnx_model = OnnxClassifier(run / "export" / "model.onnx")
    assert onnx_model.test_time_flip
    assert dict((entry.key, entry.value) for entry in onnx.load(run / "export" / "model.onnx").metadata_props
                )["tta"].startswith("flip")
    model = load(run)
    paths = [str(path) for path in photos]
    for onnx_row, row in zip(onnx_model.predict(paths), model.predict(paths)):
        assert onnx_row["label"] == row["label"] and onnx_row["prob_1"] == pytest.approx(row["prob_1"], abs=1e-4)
    images = torch.from_numpy(np.stack([model.read(path) for path in paths[:2]]).transpose(0, 3, 1, 2).copy())
    maps = gradcam(model.model, images, [0, 1])
    assert model.model.test_time_flip  # restored after Grad-CAM, which ran on the plain network
    model.model.test_time_flip = False
    np.testing.assert_allclose(gradcam(model.model, images, [0, 1]), maps, atol=1e-5)


def test_model_tta_flip_on_data_that_must_not_be_mirrored_is_refused(shapes_folder, tmp_path):
    with pytest.raises(ImgclsError, match="model.tta=flip .* data.horizontal_flip is false"):
        imgcls.train(imgcls.load_config(overrides=[f"data.path={shapes_folder}", f"run.dir={tmp_path / 'runs'}",
                                                   "model.tta=flip", "data.horizontal_flip=false", "train.epochs=1"]))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
