"""Load a model (a run's artifact, or an exported ONNX file) and predict image files, folders and globs.

    classifier = imgcls.load("runs/fashion-mnist")          # PyTorch
    classifier = imgcls.load("runs/fashion-mnist/export/model.onnx")   # ONNX Runtime: no torch, no timm
    rows = classifier.predict(["shirt.png", "more_images/"], topk=3, tta="flip")

This module imports neither torch nor timm: the PyTorch engine imports them when a run is loaded.
Both engines share everything but the forward pass (`Predictor`), so the two answer alike.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, TextIO

import numpy as np

from imgcls.data.images import is_image_file, load_square
from imgcls.errors import ImgclsError
from imgcls.tasks import UNKNOWN, Task, get_task
from imgcls.tracking import RunFolder

if TYPE_CHECKING:
    import torch

    from imgcls.models import ImageClassifier
    from imgcls.runtime import Runtime

__all__ = ["Predictor", "Classifier", "OnnxClassifier", "load", "predict", "find_artifact", "expand_paths",
           "write_predictions_csv", "augmented_views", "imgcls_version", "ONNX_METADATA_KEY"]

log = logging.getLogger("imgcls")

# The ONNX model's metadata_props key holding the artifact's metadata (class names, preprocessing,
# calibration, metrics) as JSON; the separate keys written beside it are for people reading the file.
ONNX_METADATA_KEY = "imgcls"

TestTimeAugmentation = Literal["flip", "crops"]


def imgcls_version() -> str:
    """The installed imgcls version ("unknown" when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imgcls")
    except PackageNotFoundError:
        return "unknown"


def find_artifact(run: str | Path) -> Path:
    """The model artifact of a run folder (or the artifact path itself)."""
    path = Path(run)
    if path.is_file():
        return path
    artifact = RunFolder(path).artifact
    if not path.exists():
        raise ImgclsError(f"run not found: {path}")
    if not artifact.exists():
        raise ImgclsError(f"{path} has no checkpoints/model.safetensors; has a training epoch finished there?")
    return artifact


def built_in_views(metadata: dict[str, Any]) -> tuple[bool, bool]:
    """(mirror, shifts): the test-time augmentation an artifact's model runs itself (`tta`, see
    `model.tta`; absent before 2026-12-02: none). crops mirrors only a model that may flip."""
    tta = metadata.get("tta") or "none"
    return tta == "flip" or (tta == "crops" and may_flip(metadata)), tta == "crops"


def may_flip(metadata: dict[str, Any]) -> bool:
    """False for an artifact trained with data.horizontal_flip=false (a mirror image may be another class)."""
    return ((metadata.get("config") or {}).get("data") or {}).get("horizontal_flip", True) is not False


def augmented_views(images: np.ndarray, tta: TestTimeAugmentation | None, flip: bool = True,
                    mirrored: bool = False, shifted: bool = False) -> list[np.ndarray]:
    """The views of a uint8 NCHW batch whose probabilities test-time augmentation averages.

    None: the batch itself. flip: the batch and its mirror image (left-right). crops: those two and the
    batch shifted by 1/16 of the side up, down, left and right, the uncovered border filled by
    reflection (the shifts of the `light` training augmentation, smaller). `flip=False` (a model trained
    with data.horizontal_flip=false, where a mirror image may be another class) leaves the mirror out:
    flip then means the shifted crops alone. `mirrored=True` (a model that averages each image with its
    mirror itself, `Predictor.test_time_flip`) leaves the mirror out too, with nothing in its place: flip then
    means the batch alone. `shifted=True` (a model with the crops built in, `Predictor.test_time_shifts`):
    every view is built in, and the batch alone remains.
    """
    views = [images]
    if tta is None or shifted:
        return views
    if tta not in ("flip", "crops"):
        raise ImgclsError(f"--tta {tta}: use flip or crops")
    if flip and not mirrored:
        views.append(np.ascontiguousarray(images[..., ::-1]))
    if tta == "crops" or not flip:
        size = images.shape[-1]
        shift = max(1, size // 16)
        padded = np.pad(images, ((0, 0), (0, 0), (shift, shift), (shift, shift)), mode="reflect")
        for top, left in ((0, shift), (2 * shift, shift), (shift, 0), (shift, 2 * shift)):
            views.append(np.ascontiguousarray(padded[..., top:top + size, left:left + size]))
    return views


class Predictor:
    """What every engine shares: the metadata, decoding, test-time augmentation, rejection and the
    rows. An engine implements `forward`: calibrated probabilities of a uint8 NCHW batch."""

    metadata: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return self.metadata["class_names"]

    @property
    def task(self) -> Task:
        """Single-label (softmax, one class) or multi-label (a sigmoid per class, a set of them)."""
        return get_task(self.metadata.get("task") or "single")

    @property
    def image_size(self) -> int:
        return self.metadata["preprocessing"]["image_size"]

    @property
    def resize(self) -> str:
        return self.metadata["preprocessing"]["resize"]

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted on the validation split at the end of training (1.0: none)."""
        return float((self.metadata.get("calibration") or {}).get("temperature") or 1.0)

    @property
    def flip_allowed(self) -> bool:
        """False for a model trained with data.horizontal_flip=false: flip TTA leaves the mirror out."""
        return may_flip(self.metadata)

    @property
    def test_time_flip(self) -> bool:
        """True when the model averages the logits of each image with its mirror image's (the artifact's
        `tta: flip`, or `tta: crops` of a model that may flip, see `model.tta`): flip TTA is then built in."""
        return built_in_views(self.metadata)[0]

    @property
    def test_time_shifts(self) -> bool:
        """True when the model averages the logits of each image and of its shifts (the artifact's `tta:
        crops`): the crops of `--tta crops` are then built in."""
        return built_in_views(self.metadata)[1]

    def reject_threshold(self, reject: str | float | None) -> float | None:
        """The confidence below which a single-label `predict` answers `unknown`: None (never), a number,
        or "auto": the threshold chosen on the validation split for the target precision, stored in the
        artifact.

        Raises:
            ImgclsError: "auto" for an artifact without a stored threshold, or a number outside (0, 1).
        """
        return self.task.decision(self.metadata, reject, None)

    def decision(self, reject: str | float | None = None, threshold: float | None = None):
        """What `answers` decides with (see `Task.decision`): the reject confidence of a single-label
        model, or the per-label thresholds of a multi-label one (the stored ones; all `threshold`)."""
        return self.task.decision(self.metadata, reject, threshold)

    def read(self, path: str | Path) -> np.ndarray:
        """Decode one file exactly as in evaluation: `image_size` square, uint8 HWC."""
        return load_square(path, self.image_size, self.resize)

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float32, N x classes) of a uint8 NCHW batch: a softmax, or one
        sigmoid per class for a multi-label model."""
        raise NotImplementedError

    def batch_probabilities(self, images: np.ndarray, tta: TestTimeAugmentation | None = None) -> np.ndarray:
        """`forward`, averaged over the test-time augmentation views when `tta` is given."""
        views = augmented_views(images, tta, self.flip_allowed, self.test_time_flip, self.test_time_shifts)
        if len(views) == 1:
            return self.forward(images)
        return np.mean([self.forward(view) for view in views], axis=0, dtype=np.float32)

    def answers(self, probabilities: np.ndarray, topk: int = 5, decision: Any = None) -> list[dict[str, Any]]:
        """Single-label: label, confidence and label_k/prob_k for each row of probabilities (`unknown`
        below the `decision` confidence). Multi-label: labels (joined by |), label_set and prob_<class>,
        deciding with `decision` (per-label thresholds; default: the stored ones)."""
        if decision is None:  # the stored thresholds of a multi-label model (no rejection: single-label)
            decision = self.decision()
        return self.task.answers(probabilities, self.class_names, topk, decision)

    def rows_for(self, images: np.ndarray, topk: int = 5, decision: Any = None,
                 tta: TestTimeAugmentation | None = None) -> list[dict[str, Any]]:
        """`answers` for a uint8 NHWC batch."""
        probabilities = self.batch_probabilities(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), tta)
        return self.answers(probabilities, topk, decision)

    def predict(self, paths: Iterable[str | Path], topk: int = 5, batch_size: int = 64,
                reject: str | float | None = None, tta: TestTimeAugmentation | None = None,
                threshold: float | None = None) -> list[dict[str, Any]]:
        """One row per file: path, label, confidence, top-k labels and probabilities (multi-label:
        path, labels, label_set, prob_<class>); unreadable files get an `error` and no label, and the
        others are still predicted. With `reject` ("auto" or a confidence), a single-label prediction
        less confident than the threshold gets the label `unknown` (its top-k columns still say what
        the model thought); `threshold` sets every label's threshold of a multi-label model (default:
        the ones chosen on val). `tta` averages the probabilities over the image and its mirror (flip),
        and shifted crops (crops): see `augmented_views`."""
        decision = self.decision(reject, threshold)
        rows: list[dict[str, Any]] = []
        pending: list[tuple[dict, np.ndarray]] = []

        def flush() -> None:
            if pending:
                predicted = self.rows_for(np.stack([image for _, image in pending]), topk, decision, tta)
                for (row, _), answer in zip(pending, predicted):
                    row.update(answer)
                pending.clear()

        for path in paths:
            row = self.task.empty_row(str(path))
            rows.append(row)
            try:
                pending.append((row, self.read(path)))
            except Exception as error:  # one bad file must not stop the others
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"
            if len(pending) >= batch_size:
                flush()
        flush()
        return rows


@dataclass
class Classifier(Predictor):
    """A trained PyTorch model with its class names and preprocessing, ready to predict."""

    model: ImageClassifier
    metadata: dict[str, Any]
    runtime: Runtime

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities (float32, on CPU) for a uint8 NCHW batch: the softmax of the
        logits divided by the stored temperature (multi-label: their sigmoids)."""
        import torch

        with torch.no_grad(), self.runtime.autocast():
            logits = self.model(self.runtime.to_device(images)).float() / self.temperature
        return (torch.softmax(logits, dim=1) if self.task.exclusive else torch.sigmoid(logits)).cpu()

    def forward(self, images: np.ndarray) -> np.ndarray:
        import torch

        return self.probabilities(torch.from_numpy(images)).numpy()


class OnnxClassifier(Predictor):
    """An ONNX model written by `imgcls export`, run by ONNX Runtime: needs neither torch nor timm.

    The graph takes uint8 RGB NCHW images and outputs `probabilities` (temperature-scaled softmax, or
    sigmoids for a multi-label model) and `logits`; the metadata (class names, preprocessing, calibration) is in the file's metadata_props.
    """

    def __init__(self, model: str | Path | bytes, threads: int | None = None, spinning: bool = True):
        """`model`: the .onnx file, or its bytes (a model exported in memory). `spinning=False` stops
        ONNX Runtime's threads from busy-waiting for the next run (they spin by default, which is fastest
        for back-to-back batches but takes CPU from a server's decoding and HTTP handling)."""
        try:
            import onnxruntime
        except ImportError:
            raise ImgclsError("an ONNX model needs ONNX Runtime: pip install 'imgcls[export]' "
                              "(or just onnxruntime)") from None
        self.path = Path("<memory>") if isinstance(model, bytes) else Path(model)
        if not isinstance(model, bytes) and not self.path.is_file():
            raise ImgclsError(f"ONNX model not found: {self.path}")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as error:
            raise ImgclsError(f"cannot read ONNX model {self.path}: {str(error).splitlines()[0]}") from None
        properties = self.session.get_modelmeta().custom_metadata_map
        if ONNX_METADATA_KEY not in properties:
            raise ImgclsError(f"{self.path} has no imgcls metadata (class names, preprocessing); "
                              "export it with `imgcls export RUN`")
        self.metadata = json.loads(properties[ONNX_METADATA_KEY])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: np.ndarray) -> np.ndarray:
        probabilities, _ = self.session.run(["probabilities", "logits"], {self.input_name: images})
        return probabilities


def load(run: str | Path, device: str = "auto") -> Predictor:
    """Load the model of a run folder, a `.safetensors` artifact, or an exported `.onnx` file (run by
    ONNX Runtime on the CPU; `device` is then ignored).

    Raises:
        ImgclsError: no artifact, or not an imgcls artifact.
    """
    if str(run).endswith(".onnx"):
        return OnnxClassifier(run)
    from imgcls.checkpoint import load_artifact
    from imgcls.models import create_model
    from imgcls.runtime import Runtime

    state_dict, metadata = load_artifact(find_artifact(run))
    runtime = Runtime.create(device, "auto")
    # inference in fp32 on CPU: bf16 autocast changes low-order digits, and predictions are cheap
    if runtime.device.type == "cpu":
        runtime.precision = "fp32"
    preprocessing = metadata["preprocessing"]
    flip, shifts = built_in_views(metadata)
    model = create_model(metadata["model_name"], len(metadata["class_names"]), tuple(preprocessing["mean"]),
                         tuple(preprocessing["std"]), drop_rate=metadata.get("drop_rate", 0.0),
                         head_hidden=metadata.get("head_hidden"), width=metadata.get("width"),
                         blocks=metadata.get("blocks"),  # absent before 2026-11-30: the default shape
                         test_time_flip=flip, test_time_shifts=shifts)
    model.load_state_dict(state_dict)
    model = runtime.prepare_model(model).eval()
    return Classifier(model=model, metadata=metadata, runtime=runtime)


def predict(run: str | Path, paths: Iterable[str | Path], topk: int = 5, device: str = "auto",
            reject: str | float | None = None, tta: TestTimeAugmentation | None = None,
            threshold: float | None = None) -> list[dict]:
    """Predict image files with a run's model (or an ONNX file): one dict per file (see
    `Predictor.predict`); `reject` ("auto" or a confidence) answers `unknown` below the threshold;
    `threshold` overrides a multi-label model's per-label thresholds."""
    return load(run, device).predict(paths, topk=topk, reject=reject, tta=tta, threshold=threshold)


def expand_paths(inputs: Iterable[str]) -> list[str]:
    """Files, folders (searched recursively for images) and glob patterns, in order, without repeats.

    Raises:
        ImgclsError: an input matches nothing.
    """
    found: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = sorted(str(p) for p in path.rglob("*") if p.is_file() and is_image_file(p))
        elif path.exists():
            matches = [str(path)]
        else:
            matches = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise ImgclsError(f"no images found at {item}")
        found += matches
    return list(dict.fromkeys(found))


def write_predictions_csv(path: str | Path | TextIO, rows: list[dict[str, Any]], topk: int,
                          predictor: Predictor | None = None) -> None:
    """Columns: path, label, confidence, label_1, prob_1, ..., label_k, prob_k, error; for a multi-label
    `predictor`: path, labels (joined by |, possibly empty), prob_<class> for every class, error. `path`
    may be an open text file (e.g. sys.stdout)."""
    columns = (predictor.task if predictor is not None else get_task("single")).prediction_columns(
        predictor.class_names if predictor is not None else [], topk)
    with (open(path, "w", newline="") if isinstance(path, (str, Path)) else contextlib.nullcontext(path)) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
