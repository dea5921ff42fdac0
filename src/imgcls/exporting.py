"""Export a trained model so that it leaves imgcls, each export proven to answer as the PyTorch model does.

    imgcls.export("runs/fashion-mnist", formats=("onnx", "pt2"), int8=True)   # -> runs/.../export/

ONNX: one graph from a batch of uint8 RGB NCHW images (batch dimension dynamic) to `probabilities`
(the temperature-scaled softmax that `predict` answers) and `logits`; the class names, preprocessing
and calibration are in its metadata_props, so onnxruntime + numpy + Pillow are all a user needs.
pt2: `torch.export`'s program (the same inputs and outputs), for users who stay in PyTorch: it is the
format PyTorch develops (AOTInductor compiles it for C++ servers) while TorchScript is in maintenance.

Every export is compared with the PyTorch model on up to 1,000 images of the run's test split (val
when there is none; generated images when the data is gone): top-1 agreement and the largest
absolute probability difference go to export.json, and an fp32 export that disagrees is an error. The
file appears under its final name only once it has passed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch
from torch import nn

from imgcls.checkpoint import atomic_write, default_file_mode
from imgcls.errors import ImgclsError
from imgcls.prediction import ONNX_METADATA_KEY, Classifier, OnnxClassifier, Predictor, find_artifact, imgcls_version, load
from imgcls.tracking import RunFolder

__all__ = ["export", "ExportedModel", "onnx_program", "onnx_in_memory", "quantize_int8", "generated_images",
           "PARITY_AGREEMENT", "PARITY_MAX_DIFFERENCE"]

log = logging.getLogger("imgcls")

Format = Literal["onnx", "pt2"]
FORMATS: tuple[Format, ...] = ("onnx", "pt2")

# fp32 exports must agree with the PyTorch model this well on the parity images, or the export fails
PARITY_AGREEMENT = 0.999  # share of images with the same top-1 class
PARITY_MAX_DIFFERENCE = 1e-3  # largest |probability difference| over all images and classes
PARITY_IMAGES = 1000
CALIBRATION_IMAGES = 256  # training images that set the int8 activation ranges
INT8_ACCURACY_IMAGES = 10_000  # test images the int8 accuracy is measured on (all of Fashion-MNIST's test)
INT8_WARN_POINTS = 1.0  # accuracy points the int8 model may lose before a warning
BATCH = 64


class ExportedModel(nn.Module):
    """The exported graph: uint8 RGB NCHW images -> (probabilities, logits), probabilities being the
    softmax of the logits divided by the calibrated temperature (what `predict` answers); for a
    multi-label model, their sigmoids."""

    def __init__(self, model: nn.Module, temperature: float, exclusive: bool = True):
        super().__init__()
        self.model, self.exclusive = model, exclusive
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images).float()
        if self.exclusive:
            return torch.softmax(logits / self.temperature, dim=1), logits
        # multi-label: one probability per label; the answer is the labels that reach their thresholds
        return torch.sigmoid(logits / self.temperature), logits


@dataclass
class ParityImages:
    """The images exports are checked on, with their labels (None for generated images)."""

    images: np.ndarray  # uint8 NCHW
    labels: np.ndarray | None
    source: str  # e.g. "test split (1000 of 10000 images)"


def export(run: str | Path, formats: Iterable[Format] = ("onnx",), out: str | Path | None = None,
           int8: bool = False, parity_images: int = PARITY_IMAGES) -> dict[str, Any]:
    """Export a run's model and check every export against the PyTorch model.

    Args:
        run: a run folder (or its model.safetensors).
        formats: "onnx" and/or "pt2".
        out: folder for the files and export.json (default: RUN/export).
        int8: also write model.int8.onnx, ONNX Runtime's static QDQ quantization (per-channel weights),
            calibrated on training images; its test accuracy is measured against the fp32 ONNX model.
        parity_images: how many images the parity check uses at most.

    Returns:
        what export.json holds: per format the file, its size and the parity figures.
    Raises:
        ImgclsError: an unknown format, a missing exporter, or an fp32 export that fails parity.
    """
    formats = tuple(dict.fromkeys(formats))
    for name in formats:
        if name not in FORMATS:
            raise ImgclsError(f"--format {name}: use onnx, pt2 or all")
    if int8 and "onnx" not in formats:
        raise ImgclsError("--int8 quantizes the ONNX model: add --format onnx (or all)")
    artifact = find_artifact(run)
    if artifact.suffix != ".safetensors":
        raise ImgclsError(f"imgcls export reads a run folder or its model.safetensors, not {artifact.name}")
    run_dir = artifact.parent.parent if artifact.parent.name == "checkpoints" else artifact.parent
    out = Path(out) if out else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    classifier = load(artifact, device="cpu")
    _plain_layout(classifier)
    parity = parity_image_set(classifier, run_dir, "test", parity_images)
    log.info(f"parity check on {parity.source}")
    reference = _probabilities(classifier, parity.images)
    result: dict[str, Any] = {
        "run": str(run_dir), "artifact": str(artifact), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "imgcls_version": imgcls_version(), "parity_images": parity.source,
        "parity_thresholds": {"top1_agreement": PARITY_AGREEMENT, "max_abs_difference": PARITY_MAX_DIFFERENCE},
        "formats": {},
    }
    failures = []
    for name in formats:
        write = _write_onnx if name == "onnx" else _write_pt2
        path = out / ("model.onnx" if name == "onnx" else "model.pt2")
        entry = write(classifier, path, parity, reference)
        result["formats"][name] = entry
        _say(name, entry)
        if not entry["parity"]["passed"]:
            failures.append(name)
    if int8 and "onnx" not in failures:
        entry = _write_int8(out / "model.onnx", out / "model.int8.onnx", classifier, run_dir, parity)
        result["formats"]["onnx_int8"] = entry
        _say("onnx_int8", entry)
    atomic_write(out / "export.json", (json.dumps(result, indent=2) + "\n").encode())
    log.info(f"wrote {out / 'export.json'}")
    if failures:
        figures = "; ".join(f"{name}: agreement {result['formats'][name]['parity']['agreement']:.4f}, "
                            f"max |Δp| {result['formats'][name]['parity']['max_abs_difference']:.2e}"
                            for name in failures)
        raise ImgclsError(f"export parity failed ({figures}; needs >= {PARITY_AGREEMENT} and <= "
                          f"{PARITY_MAX_DIFFERENCE:g}); nothing was written in its place; see {out / 'export.json'}")
    return result


def _say(name: str, entry: dict[str, Any]) -> None:
    parity = entry["parity"]
    line = (f"{name}: {entry['path']}{'' if entry['kept'] else ' NOT WRITTEN'} ({entry['bytes'] / 2**20:.1f} MiB); "
            f"{'top-1' if 'top1_agreement' in parity else 'label-set'} agreement with "
            f"{'the fp32 ONNX model' if name == 'onnx_int8' else 'PyTorch'} {parity['agreement']:.2%} of {parity['images']} images, max |Δp| {parity['max_abs_difference']:.1e}")
    if "accuracy" in entry:
        accuracy = entry["accuracy"]
        line += (f"; test accuracy {accuracy['int8']:.2%} vs fp32 {accuracy['fp32']:.2%} "
                 f"({-accuracy['points_lost']:+.2f} points, {accuracy['images']} images)")
    log.info(line)


# ----------------------------------------------------------------------------------------------------
# the images the exports are checked on


def parity_image_set(predictor: Predictor, run_dir: Path, split: str, limit: int, seed: int = 0) -> ParityImages:
    """Up to `limit` images of the run's `split` (val when it has none), drawn by a seeded shuffle and
    decoded as in evaluation; generated images when none of the files can be read (the data is gone)."""
    from imgcls.data import read_splits_csv
    from imgcls.data.sources import labels_of

    config = predictor.metadata.get("config") or {}
    source = None
    if RunFolder(run_dir).splits.is_file():
        data = config.get("data") or {}
        source = read_splits_csv(RunFolder(run_dir).splits, data.get("path", ""), data.get("label_separator", "|"))
    samples, used = [], split
    if source is not None:
        used = split if source.splits.get(split) else "val" if split == "test" and source.splits.get("val") else split
        samples = list(source.splits.get(used, []))
    order = np.random.default_rng(seed).permutation(len(samples))
    index = {name: i for i, name in enumerate(predictor.class_names)}
    images, labels = [], []
    for position in order:
        path, label = samples[position]
        try:
            images.append(predictor.read(path))
        except Exception:  # a moved or deleted file: the check uses the images that remain
            continue
        labels.append(predictor.task.targets([label], predictor.class_names)[0] if set(labels_of(label)) <= index.keys()
                      else -1)
        if len(images) >= limit:
            break
    if images:
        return ParityImages(np.stack(images).transpose(0, 3, 1, 2).copy(), np.array(labels),
                            f"{used} split ({len(images)} of {len(samples)} images)")
    count = min(limit, 256)
    log.warning(f"the run's {split} images cannot be read (moved or deleted?): the parity check uses "
                f"{count} generated images instead")
    return ParityImages(generated_images(count, predictor.image_size, seed), None, f"{count} generated images")


def generated_images(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth random colour fields with noise: not photos, but they drive every layer of a model,
    unlike constant images."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, 3, 4, 4)).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, -(-size // 4), axis=2), -(-size // 4), axis=3)[:, :, :size, :size]
    noisy = smooth + rng.normal(0, 24, smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _probabilities(predictor: Predictor, images: np.ndarray) -> np.ndarray:
    return np.concatenate([predictor.forward(images[start:start + BATCH]) for start in range(0, len(images), BATCH)])


def _parity(predictor: Predictor, reference: np.ndarray, probabilities: np.ndarray, bar: bool = True) -> dict[str, Any]:
    """How alike two models answer: the share of images with the same top-1 class (multi-label: the same
    label set at the stored thresholds) as `agreement` and under its own name, and the largest
    difference of a probability."""
    agreement = predictor.task.agreement(reference, probabilities, predictor.decision())
    difference = float(np.abs(reference - probabilities).max())
    figures = {"images": len(reference), "agreement": agreement, predictor.task.agreement_name: agreement,
               "max_abs_difference": difference}
    if bar:
        figures["passed"] = agreement >= PARITY_AGREEMENT and difference <= PARITY_MAX_DIFFERENCE
    return figures


def _publish(staging: Path, path: Path, parity: dict[str, Any], **more: Any) -> dict[str, Any]:
    """Rename the staged export to `path` when it passed parity (else leave any older file there as
    it was); its export.json entry."""
    size = staging.stat().st_size
    if parity["passed"]:
        os.replace(staging, path)
    return {"path": str(path), "bytes": size, "kept": parity["passed"], "parity": parity, **more}


def _staging(path: Path) -> Path:
    """A hidden file beside `path`: an export is written there and renamed once it has passed parity."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.fchmod(handle, default_file_mode())
    os.close(handle)
    return Path(name)


# ----------------------------------------------------------------------------------------------------
# ONNX


def onnx_metadata(predictor: Predictor) -> dict[str, str]:
    """The metadata_props of an exported model: the artifact's metadata as JSON (what `OnnxClassifier`
    reads), and the facts a person or another tool looks for, each under its own key."""
    calibration = predictor.metadata.get("calibration") or {}
    return {
        ONNX_METADATA_KEY: json.dumps(predictor.metadata, default=str),
        "class_names": json.dumps(predictor.class_names),
        "image_size": str(predictor.image_size),
        "resize": predictor.resize,
        "input": "images: uint8 RGB NCHW, 0..255 (normalised inside the graph)",
        "task": predictor.task.name,
        "outputs": ("probabilities (softmax of logits / temperature), logits" if predictor.task.exclusive else
                    "probabilities (sigmoid of each logit: multi-label; a label is answered when it reaches its "
                    "threshold), logits"),
        "thresholds": json.dumps(calibration.get("thresholds")),
        "temperature": repr(predictor.temperature),
        "tta": ("crops: the graph averages the logits of each image, " + ("of its mirror image " if predictor.test_time_flip
                                                                           else "") + "and of its shifts by 1/16 of the side"
                if predictor.test_time_shifts
                else "flip: the graph averages the logits of each image and of its mirror image" if predictor.test_time_flip
                else "none"),
        "reject_threshold": json.dumps((calibration.get("reject") or {}).get("threshold")),
        "imgcls_version": imgcls_version(),
    }


def onnx_program(classifier: Classifier):
    """torch.onnx's program of `ExportedModel` around the classifier, with the metadata set."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; fail here with the fix)
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ImgclsError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'imgcls[export]'") from None
    wrapped = ExportedModel(classifier.model, classifier.temperature, classifier.task.exclusive).eval()
    example = torch.zeros(2, 3, classifier.image_size, classifier.image_size, dtype=torch.uint8)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            wrapped, (example,), dynamo=True, input_names=["images"], output_names=["probabilities", "logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, optimize=True, verbose=False,
        )
    program.model.metadata_props.update(onnx_metadata(classifier))
    return program


def onnx_in_memory(classifier: Classifier, images: int = 64, spinning: bool = True) -> OnnxClassifier:
    """The classifier as an ONNX Runtime session, exported in memory (`imgcls serve` on a run folder),
    after the parity check on `images` generated images.

    Raises:
        ImgclsError: the exported model does not answer as the PyTorch model does.
    """
    _plain_layout(classifier)
    exported = OnnxClassifier(onnx_program(classifier).model_proto.SerializeToString(), spinning=spinning)
    generated = generated_images(images, classifier.image_size, seed=0)
    figures = _parity(classifier, _probabilities(classifier, generated), _probabilities(exported, generated))
    if not figures["passed"]:
        raise ImgclsError(f"the model exported to ONNX disagrees with PyTorch (agreement "
                          f"{figures['agreement']:.3f}, max |Δp| {figures['max_abs_difference']:.1e}); "
                          "serve it with --engine torch")
    return exported


def _plain_layout(classifier: Classifier) -> None:
    """NCHW (not channels_last) weights and inputs: the exported graph is plain; ONNX Runtime picks its own."""
    classifier.runtime.channels_last = False
    classifier.model.to(memory_format=torch.contiguous_format)


def _write_onnx(classifier: Classifier, path: Path, parity: ParityImages, reference: np.ndarray) -> dict[str, Any]:
    staging = _staging(path)
    try:
        program = onnx_program(classifier)
        program.save(str(staging))
        exported = OnnxClassifier(staging)
        figures = _parity(classifier, reference, _probabilities(exported, parity.images))
        return _publish(staging, path, figures, opset=_opset(program))
    finally:
        staging.unlink(missing_ok=True)


def _opset(program) -> int | None:
    return program.model.opset_imports.get("")


class _quiet_exporter:
    """torch.onnx prints its progress (✅ lines) on stdout and onnxscript's optimiser its passes on
    stderr: keep both for the CLI's own output (an exporter error still raises)."""

    def __enter__(self):
        import contextlib
        import io

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


# ----------------------------------------------------------------------------------------------------
# torch.export (.pt2)


def _write_pt2(classifier: Classifier, path: Path, parity: ParityImages, reference: np.ndarray) -> dict[str, Any]:
    wrapped = ExportedModel(classifier.model, classifier.temperature, classifier.task.exclusive).eval()
    example = torch.zeros(2, 3, classifier.image_size, classifier.image_size, dtype=torch.uint8)
    staging = _staging(path)
    try:
        with torch.no_grad():
            program = torch.export.export(wrapped, (example,), dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
        metadata = json.dumps(classifier.metadata, default=str)
        torch.export.save(program, str(staging), extra_files={"imgcls.json": metadata})
        loaded = torch.export.load(str(staging)).module()
        probabilities = []
        with torch.no_grad():
            for start in range(0, len(parity.images), BATCH):
                probabilities.append(loaded(torch.from_numpy(parity.images[start:start + BATCH]))[0].numpy())
        return _publish(staging, path, _parity(classifier, reference, np.concatenate(probabilities)))
    finally:
        staging.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# int8 (ONNX Runtime static quantization)


def quantize_int8(fp32_path: Path, path: Path, calibration_images: np.ndarray) -> None:
    """ONNX Runtime static quantization of `fp32_path` into `path` (written atomically), its activation
    ranges set by running `calibration_images` (uint8 NCHW) through the model."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibration_images[start:start + 32]}
                                 for start in range(0, len(calibration_images), 32)])

        def get_next(self):
            return next(self.batches, None)

    staging, prepared = _staging(path), _staging(path.with_suffix(".prepared.onnx"))
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        # weights of convolutions and linear layers, int8 per output channel; activations uint8 per
        # tensor (ONNX Runtime's recommended CPU pairing). The softmax stays in float: quantizing
        # probabilities would cost their calibration for no speed. reduce_range: 7-bit weights. x86 CPUs
        # without VNNI (AVX2, AVX-512 before Cascade Lake, AMD before Zen 4) add u8 x s8 products in 16-bit
        # registers that saturate: on such a CPU a small_resnet lost 22 points of accuracy with 8-bit
        # weights and none with 7-bit. The file may run anywhere, so it is always quantized this way.
        quantize_static(str(prepared), str(staging), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul", "Add", "Mul", "GlobalAveragePool",
                                              "MaxPool", "Relu", "Clip"])
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)


def _write_int8(fp32_path: Path, path: Path, classifier: Classifier, run_dir: Path,
                parity: ParityImages) -> dict[str, Any]:
    calibration = parity_image_set(classifier, run_dir, "train", CALIBRATION_IMAGES, seed=1)
    quantize_int8(fp32_path, path, calibration.images)
    fp32, int8 = OnnxClassifier(fp32_path), OnnxClassifier(path)
    figures = _parity(fp32, _probabilities(fp32, parity.images), _probabilities(int8, parity.images), bar=False)
    entry = {"path": str(path), "bytes": path.stat().st_size, "kept": True, "parity": figures,
             "calibration_images": calibration.source}
    test = parity_image_set(classifier, run_dir, "test", INT8_ACCURACY_IMAGES, seed=0)
    if test.labels is not None:
        truth, task, decision = test.labels, classifier.task, classifier.decision()
        # top-1 accuracy; multi-label: subset accuracy (the whole label set right) at the stored thresholds
        accuracy_fp32 = float(np.mean(task.right(_probabilities(fp32, test.images), truth, decision)))
        accuracy_int8 = float(np.mean(task.right(_probabilities(int8, test.images), truth, decision)))
        lost = 100 * (accuracy_fp32 - accuracy_int8)
        entry["accuracy"] = {"images": len(truth), "source": test.source, "fp32": accuracy_fp32, "int8": accuracy_int8,
                             "points_lost": lost}
        if lost > INT8_WARN_POINTS:
            log.warning(f"the int8 model loses {lost:.2f} points of test accuracy ({accuracy_int8:.2%} vs "
                        f"{accuracy_fp32:.2%}); keep model.onnx where accuracy matters")
    else:
        log.warning("no labelled test images could be read: the int8 model's accuracy was not measured")
    return entry
