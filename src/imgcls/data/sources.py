"""Finding the images and their labels: split folders, one folder of class folders, a CSV manifest
or a packaged dataset, all turned into the same `DataSource` (class names + samples per split)."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls.data.images import is_image_file
from imgcls.errors import ImgclsError

__all__ = ["DataSource", "resolve_source", "assign_splits", "subsample_train", "read_splits_csv", "write_splits_csv"]

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class DataSource:
    """Images grouped by split. Labels are class names; `class_names` fixes their indices (sorted,
    taken from the training split, so every split is aligned by name)."""

    name: str
    splits: dict[str, list[tuple[str, str]]]  # split -> [(path, class name)]
    origin: str = ""  # where the data came from, for messages
    unsplit: list[tuple[str, str]] = field(default_factory=list)  # images with no split yet

    @property
    def class_names(self) -> list[str]:
        return sorted({label for _, label in self.splits.get("train", self.unsplit)})

    def counts(self, split: str) -> Counter:
        return Counter(label for _, label in self.splits.get(split, []))


def _class_folders(root: Path, where: str) -> list[tuple[str, str]]:
    """[(path, class)] for every image below each class folder of `root` (sub-folders included)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ImgclsError(f"{where} has no class folders; expected {where}/<class name>/<images>")
    samples = []
    for class_dir in class_dirs:
        files = sorted(str(p) for p in class_dir.rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            raise ImgclsError(
                f"class folder '{class_dir.name}' in {where} has no images; add images or remove the folder"
            )
        samples += [(path, class_dir.name) for path in files]
    return samples


def _split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for child in root.iterdir():
        split = SPLIT_ALIASES.get(child.name.lower())
        if child.is_dir() and split:
            if split in found:
                raise ImgclsError(f"{root} has two folders for the {split} split: {found[split].name} and {child.name}")
            found[split] = child
    return found


def read_manifest(path: Path) -> DataSource:
    """A CSV with a header `path,label[,split]`; relative paths are relative to the CSV's folder.
    UTF-8, with or without the byte order mark that Excel writes; any line ends."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            if "path" not in columns or "label" not in columns:
                raise ImgclsError(f"{path} must have a header row with columns path,label[,split]; found {columns}")
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError:
        raise ImgclsError(f"{path} is not UTF-8 text; save it as UTF-8 (in Excel: CSV UTF-8)") from None
    if not rows:
        raise ImgclsError(f"{path} lists no images")
    splits: dict[str, list] = {}
    unsplit = []
    for line, row in enumerate(rows, start=2):
        image = Path(row["path"])
        image = image if image.is_absolute() else path.parent / image
        if not row["label"]:
            raise ImgclsError(f"{path} line {line}: empty label for {row['path']}")
        sample = (str(image), row["label"])
        split_name = row.get("split", "")
        if split_name:
            split = SPLIT_ALIASES.get(split_name.lower())
            if split is None:
                raise ImgclsError(f"{path} line {line}: unknown split '{split_name}'; use train, val or test")
            splits.setdefault(split, []).append(sample)
        else:
            unsplit.append(sample)
    if splits and unsplit:
        raise ImgclsError(f"{path}: some rows have a split and some do not; fill the split column for every row or none")
    if splits and "train" not in splits:
        raise ImgclsError(f"{path}: no row has split 'train'")
    return DataSource(name=path.stem, splits=splits, unsplit=unsplit, origin=str(path))


def resolve_source(data: str) -> DataSource:
    """Turn the DATA argument into a DataSource.

    Raises:
        ImgclsError: the path does not exist, has no recognisable layout, or a class folder is empty.
    """
    from imgcls.data.packaged import PACKAGED, materialise

    if not data:
        raise ImgclsError("no data given: pass a folder, a CSV manifest or a packaged dataset name (fashion-mnist, digits)")
    path = Path(data).expanduser()
    if not path.exists() and data in PACKAGED:
        source = resolve_source(str(materialise(data)))
        source.name = data
        return source
    if not path.exists():
        raise ImgclsError(
            f"data not found: {data}; give a folder, a CSV manifest, or one of: {', '.join(sorted(PACKAGED))}"
        )
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise ImgclsError(f"{path} is a file but not a .csv manifest; give a folder of class folders or a CSV")
        return read_manifest(path)
    split_dirs = _split_dirs(path)
    if split_dirs:
        if "train" not in split_dirs:
            raise ImgclsError(f"{path} has {', '.join(d.name for d in split_dirs.values())}/ but no train/ folder")
        splits = {split: _class_folders(folder, str(folder)) for split, folder in split_dirs.items()}
        return DataSource(name=path.name, splits=splits, origin=str(path))
    return DataSource(name=path.name, splits={}, unsplit=_class_folders(path, str(path)), origin=str(path))


def _stratified_take(samples: list, fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Split off `fraction` of each class (at least one image where the class has three or more)."""
    by_class: dict[str, list] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    kept, taken = [], []
    for label in sorted(by_class):
        group = by_class[label]
        order = rng.permutation(len(group))
        count = int(round(len(group) * fraction))
        if fraction > 0 and count == 0 and len(group) >= 3:
            count = 1
        count = min(count, len(group) - 1)  # training keeps at least one image of every class
        taken += [group[i] for i in order[:count]]
        kept += [group[i] for i in order[count:]]
    return kept, taken


def assign_splits(source: DataSource, val_fraction: float, test_fraction: float, seed: int) -> DataSource:
    """Give the source train/val(/test) splits: a stratified, seeded split of what has none.

    A single folder (or a manifest without a split column) becomes train/val/test; a source with
    train but no val gets val carved out of train. Then every split is checked against train.
    """
    rng = np.random.default_rng(seed)
    splits = dict(source.splits)
    if source.unsplit:
        rest, test = _stratified_take(source.unsplit, test_fraction, rng)
        train, val = _stratified_take(rest, val_fraction / (1 - test_fraction), rng)
        splits = {"train": train, "val": val}
        if test:
            splits["test"] = test
    elif "val" not in splits:
        splits["train"], splits["val"] = _stratified_take(splits["train"], val_fraction, rng)
    result = DataSource(name=source.name, splits=splits, origin=source.origin)
    check_classes(result)
    return result


def subsample_train(source: DataSource, fraction: float = 1.0, per_class_limit: int | None = None,
                    seed: int = 0) -> DataSource:
    """Keep a stratified, seeded share of the training images (at least one per class), then at most
    `per_class_limit` per class: a quick first run. Other splits are untouched."""
    if fraction >= 1.0 and per_class_limit is None:
        return source
    rng = np.random.default_rng(seed + 1)  # not the split's stream: the subset does not move the split
    train = source.splits["train"]
    if fraction < 1.0:
        _, train = _stratified_take(train, fraction, rng)
        present = {label for _, label in train}
        for sample in source.splits["train"]:  # a class too small for the fraction keeps one image
            if sample[1] not in present:
                train.append(sample)
                present.add(sample[1])
    if per_class_limit is not None:
        kept: dict[str, int] = {}
        limited = []
        for index in rng.permutation(len(train)):
            sample = train[index]
            if kept.get(sample[1], 0) < per_class_limit:
                kept[sample[1]] = kept.get(sample[1], 0) + 1
                limited.append(sample)
        train = sorted(limited)
    return DataSource(name=source.name, splits={**source.splits, "train": train}, origin=source.origin)


def check_classes(source: DataSource) -> None:
    """Every split must use only classes seen in training, and there must be at least two."""
    names = set(source.class_names)
    if len(names) < 2:
        raise ImgclsError(f"{source.origin or source.name}: found {len(names)} class ({', '.join(names)}); need at least two")
    for split, samples in source.splits.items():
        extra = sorted({label for _, label in samples} - names)
        if extra:
            raise ImgclsError(
                f"class '{extra[0]}' appears in the {split} split of {source.origin or source.name} but not in train; "
                "add training images for it or remove it"
            )
    if not source.splits.get("val"):
        raise ImgclsError(f"{source.origin or source.name}: the validation split is empty; add images or raise data.val_fraction")


def write_splits_csv(source: DataSource, path: Path) -> None:
    """The exact split used by a run, so that resume and later evaluation see the same images.

    Paths are written absolute: `read_splits_csv` resolves relative ones against the CSV's folder
    (the run folder), not against the working directory they were relative to.
    """
    from imgcls.checkpoint import atomic_write

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "label", "split"])
    for split, samples in source.splits.items():
        writer.writerows((os.path.abspath(image), label, split) for image, label in samples)
    # atomic: a run killed while writing it must not resume on half its images
    atomic_write(path, text.getvalue().encode("utf-8"))  # what read_manifest reads, on any platform


def read_splits_csv(path: Path, name: str) -> DataSource:
    source = read_manifest(path)
    source.name = name
    return source
