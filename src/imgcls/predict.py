"""Load a model artifact and predict image files, folders and globs.

    classifier = imgcls.load("runs/fashion-mnist")
    rows = classifier.predict(["shirt.png", "more_images/"], topk=3)
"""

from __future__ import annotations

import contextlib
import csv
import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, TextIO

import numpy as np
import torch

from imgcls.checkpoint import load_artifact
from imgcls.data.images import is_image_file, load_square
from imgcls.errors import ImgclsError
from imgcls.models import ImageClassifier, create_model
from imgcls.runtime import Runtime

__all__ = ["Classifier", "load", "find_artifact", "expand_paths", "write_predictions_csv"]

log = logging.getLogger("imgcls")

UNKNOWN = "unknown"  # the label of a rejected prediction (`predict --reject`)


def find_artifact(run: str | Path) -> Path:
    """The model artifact of a run folder (or the artifact path itself)."""
    path = Path(run)
    if path.is_file():
        return path
    artifact = path / "checkpoints" / "model.safetensors"
    if not path.exists():
        raise ImgclsError(f"run not found: {path}")
    if not artifact.exists():
        raise ImgclsError(f"{path} has no checkpoints/model.safetensors; has a training epoch finished there?")
    return artifact


@dataclass
class Classifier:
    """A trained model with its class names and preprocessing, ready to predict."""

    model: ImageClassifier
    metadata: dict[str, Any]
    runtime: Runtime

    @property
    def class_names(self) -> list[str]:
        return self.metadata["class_names"]

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

    def reject_threshold(self, reject: str | float | None) -> float | None:
        """The confidence below which `predict` answers `unknown`: None (never), a number, or "auto":
        the threshold chosen on the validation split for the target precision, stored in the artifact.

        Raises:
            ImgclsError: "auto" for an artifact without a stored threshold, or a number outside (0, 1).
        """
        if reject is None:
            return None
        if reject == "auto":
            stored = (self.metadata.get("calibration") or {}).get("reject") or {}
            if stored.get("threshold") is None:
                reason = stored.get("reason", "it was trained before imgcls stored one")
                raise ImgclsError(f"--reject auto: this model has no stored threshold ({reason}); "
                                  "give a confidence instead, e.g. --reject 0.8")
            return float(stored["threshold"])
        try:
            threshold = float(reject)
        except ValueError:
            raise ImgclsError(f"--reject {reject}: use auto or a confidence between 0 and 1") from None
        if not 0 < threshold < 1:
            raise ImgclsError(f"--reject {reject}: use auto or a confidence between 0 and 1")
        return threshold

    def read(self, path: str | Path) -> np.ndarray:
        """Decode one file exactly as in evaluation: `image_size` square, uint8 HWC."""
        return load_square(path, self.image_size, self.resize)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities (float32, on CPU) for a uint8 NCHW batch: the softmax of the
        logits divided by the stored temperature."""
        with self.runtime.autocast():
            logits = self.model(self.runtime.to_device(images))
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu()

    def predict(self, paths: Iterable[str | Path], topk: int = 5, batch_size: int = 64,
                reject: str | float | None = None) -> list[dict[str, Any]]:
        """One row per file: path, label, confidence, top-k labels and probabilities; unreadable files
        get an `error` and no label, and the others are still predicted. With `reject` ("auto" or a
        confidence), a prediction less confident than the threshold gets the label `unknown` (its
        top-k columns still say what the model thought)."""
        threshold = self.reject_threshold(reject)
        topk = max(1, min(topk, len(self.class_names)))
        rows: list[dict[str, Any]] = []
        pending: list[tuple[dict, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            batch = torch.from_numpy(np.stack([image for _, image in pending])).permute(0, 3, 1, 2)
            probabilities = self.probabilities(batch)
            values, indices = probabilities.topk(topk, dim=1)
            for (row, _), top_values, top_indices in zip(pending, values.tolist(), indices.tolist()):
                row["confidence"] = top_values[0]
                accepted = threshold is None or top_values[0] >= threshold
                row["label"] = self.class_names[top_indices[0]] if accepted else UNKNOWN
                for rank, (value, index) in enumerate(zip(top_values, top_indices), start=1):
                    row[f"label_{rank}"], row[f"prob_{rank}"] = self.class_names[index], value
            pending.clear()

        for path in paths:
            row: dict[str, Any] = {"path": str(path), "label": "", "confidence": None, "error": ""}
            rows.append(row)
            try:
                pending.append((row, self.read(path)))
            except Exception as error:  # one bad file must not stop the others
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"
            if len(pending) >= batch_size:
                flush()
        flush()
        return rows


def load(run: str | Path, device: str = "auto") -> Classifier:
    """Load the model artifact of a run folder (or a `.safetensors` artifact file).

    Raises:
        ImgclsError: no artifact, or not an imgcls artifact.
    """
    state_dict, metadata = load_artifact(find_artifact(run))
    runtime = Runtime.create(device, "auto")
    # inference in fp32 on CPU: bf16 autocast changes low-order digits, and predictions are cheap
    if runtime.device.type == "cpu":
        runtime.precision = "fp32"
    preprocessing = metadata["preprocessing"]
    model = create_model(metadata["model_name"], len(metadata["class_names"]), tuple(preprocessing["mean"]),
                         tuple(preprocessing["std"]), drop_rate=metadata.get("drop_rate", 0.0),
                         head_hidden=metadata.get("head_hidden"))
    model.load_state_dict(state_dict)
    model = runtime.prepare_model(model).eval()
    return Classifier(model=model, metadata=metadata, runtime=runtime)


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


def write_predictions_csv(path: str | Path | TextIO, rows: list[dict[str, Any]], topk: int) -> None:
    """Columns: path, label, confidence, label_1, prob_1, ..., label_k, prob_k, error. `path` may be an
    open text file (e.g. sys.stdout)."""
    columns = ["path", "label", "confidence"]
    for rank in range(1, topk + 1):
        columns += [f"label_{rank}", f"prob_{rank}"]
    columns.append("error")
    with (open(path, "w", newline="") if isinstance(path, (str, Path)) else contextlib.nullcontext(path)) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
