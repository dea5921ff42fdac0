"""Finding the images and their labels: split folders, one folder of class folders, a CSV manifest
or a packaged dataset, all turned into the same `DataSource` (class names + samples per split).

A sample is (path, label): the class name for single-label data, a tuple of class names (possibly
empty) for multi-label data, which comes from a manifest with a `labels` column."""

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

__all__ = ["DataSource", "resolve_source", "assign_splits", "subsample_train", "read_splits_csv", "write_splits_csv",
           "labels_of", "as_task"]

Label = str | tuple[str, ...]  # one class name, or the set of them of a multi-label image (sorted)

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def labels_of(label: Label) -> tuple[str, ...]:
    """The class names of one sample's label, single- or multi-label alike."""
    return label if isinstance(label, tuple) else (label,)


@dataclass
class DataSource:
    """Images grouped by split. Labels are class names (tuples of them with `multi_label`);
    `class_names` fixes their indices (sorted, taken from the training split, so every split is
    aligned by name)."""

    name: str
    splits: dict[str, list[tuple[str, Label]]]  # split -> [(path, label)]
    origin: str = ""  # where the data came from, for messages
    unsplit: list[tuple[str, Label]] = field(default_factory=list)  # images with no split yet
    multi_label: bool = False
    notes: list[str] = field(default_factory=list)  # choices made from the data, for the run's log

    @property
    def class_names(self) -> list[str]:
        return sorted({name for _, label in self.splits.get("train", self.unsplit) for name in labels_of(label)})

    def counts(self, split: str) -> Counter:
        """Images per class in `split` (a multi-label image counts for each of its classes)."""
        return Counter(name for _, label in self.splits.get(split, []) for name in labels_of(label))

    def replace(self, **changes) -> DataSource:
        import dataclasses

        return dataclasses.replace(self, **changes)


def as_task(source: DataSource, task: str) -> DataSource:
    """The source read as `task` asks ("auto": as the data says; "multi": every label a set; "single").

    Raises:
        ImgclsError: task=single on multi-label data where an image has no label or several.
    """
    if task == "multi" and not source.multi_label:
        wrap = lambda samples: [(path, (label,)) for path, label in samples]  # noqa: E731
        return source.replace(splits={k: wrap(v) for k, v in source.splits.items()}, unsplit=wrap(source.unsplit),
                              multi_label=True)
    if task == "single" and source.multi_label:
        for samples in [source.unsplit, *source.splits.values()]:
            for path, label in samples:
                if len(label) != 1:
                    raise ImgclsError(f"task=single, but {path} has {len(label)} labels in {source.origin}; "
                                      "use task=multi (or auto) for multi-label data")
        unwrap = lambda samples: [(path, label[0]) for path, label in samples]  # noqa: E731
        return source.replace(splits={k: unwrap(v) for k, v in source.splits.items()}, unsplit=unwrap(source.unsplit),
                              multi_label=False)
    return source


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


MANIFEST_COLUMNS = ("path", "label", "labels", "split")


def read_manifest(path: Path, separator: str = "|", strict: bool = True) -> DataSource:
    """A CSV with a header `path,label[,split]` (single-label) or `path,labels[,split]` (multi-label: the
    labels of an image joined by `separator`, an empty cell for none of the classes); relative paths
    are relative to the CSV's folder. UTF-8, with or without the byte order mark that Excel writes; any
    line ends. `strict` (a user's manifest, not a run's own splits.csv) also checks that every image
    exists and that no single label contains the separator.

    Raises:
        ImgclsError: one line naming the row (or the header) and what to do.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
            if unknown:
                raise ImgclsError(f"{path}: unknown column '{unknown[0]}' in the header; use path,label[,split] "
                                  "(single-label) or path,labels[,split] (multi-label)")
            if "path" not in columns or ("label" in columns) == ("labels" in columns):
                raise ImgclsError(f"{path} must have a header row with columns path,label[,split] (single-label) or "
                                  f"path,labels[,split] (multi-label); found {columns}")
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError:
        raise ImgclsError(f"{path} is not UTF-8 text; save it as UTF-8 (in Excel: CSV UTF-8)") from None
    if not rows:
        raise ImgclsError(f"{path} lists no images")
    multi_label = "labels" in columns
    splits: dict[str, list] = {}
    unsplit = []
    lines = []  # (line number, image path)
    for line, row in enumerate(rows, start=2):
        image = Path(row["path"])
        image = image if image.is_absolute() else path.parent / image
        lines.append((line, str(image)))
        if not row["path"]:
            raise ImgclsError(f"{path} line {line}: empty path")
        if multi_label:
            label: Label = tuple(sorted({name.strip() for name in row["labels"].split(separator) if name.strip()}))
        else:
            label = row["label"]
            if not label:
                raise ImgclsError(f"{path} line {line}: empty label for {row['path']}")
            if strict and separator in label:
                raise ImgclsError(f"{path} line {line}: label '{label}' contains the label separator '{separator}'; "
                                  f"for multi-label data name the column 'labels', or set data.label_separator")
        sample = (str(image), label)
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
    if strict:  # after the checks of the rows' contents, which need no disk access
        for line, image in lines:
            if not os.path.isfile(image):
                raise ImgclsError(f"{path} line {line}: image not found: {image}; fix the path (relative paths "
                                  f"start at {path.parent}) or remove the row")
    return DataSource(name=path.stem, splits=splits, unsplit=unsplit, origin=str(path), multi_label=multi_label)


def resolve_source(data: str, separator: str = "|") -> DataSource:
    """Turn the DATA argument into a DataSource (`separator`: of the labels in a multi-label manifest).

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
        return read_manifest(path, separator)
    split_dirs = _split_dirs(path)
    if split_dirs:
        if "train" not in split_dirs:
            raise ImgclsError(f"{path} has {', '.join(d.name for d in split_dirs.values())}/ but no train/ folder")
        splits = {split: _class_folders(folder, str(folder)) for split, folder in split_dirs.items()}
        return DataSource(name=path.name, splits=splits, origin=str(path))
    return DataSource(name=path.name, splits={}, unsplit=_class_folders(path, str(path)), origin=str(path))


def _stratified_take(samples: list, fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Split off `fraction` of each class (at least one image where the class has three or more);
    multi-label samples by iterative stratification."""
    if samples and isinstance(samples[0][1], tuple):
        return _multilabel_take(samples, fraction, rng)
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


def label_matrix(samples: list, class_names: list[str] | None = None) -> np.ndarray:
    """Multi-hot rows (images x classes) of multi-label samples."""
    names = class_names or sorted({name for _, label in samples for name in label})
    index = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(samples), len(names)), dtype=np.int8)
    for row, (_, label) in enumerate(samples):
        matrix[row, [index[name] for name in label if name in index]] = 1
    return matrix


def _multilabel_take(samples: list, fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Split off about `fraction` of the images so that every label keeps its share on both sides
    (iterative stratification, Sechidis et al. 2011, by the `iterative-stratification` package). An
    image whose label would be missing from the kept part stays there: training must see every class."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    count = int(round(len(samples) * fraction))
    if count == 0 or len(samples) < 3:
        return list(samples), []
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=count / len(samples),
                                                random_state=int(rng.integers(2**31 - 1)))
    kept_rows, taken_rows = next(splitter.split(np.zeros(len(samples)), label_matrix(samples)))
    kept = [samples[i] for i in sorted(kept_rows)]
    present = {name for _, label in kept for name in label}
    taken = []
    for i in sorted(taken_rows):
        if set(samples[i][1]) <= present:
            taken.append(samples[i])
        else:
            kept.append(samples[i])
            present.update(samples[i][1])
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
    result = DataSource(name=source.name, splits=splits, origin=source.origin, multi_label=source.multi_label)
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
        present = {name for _, label in train for name in labels_of(label)}
        for sample in source.splits["train"]:  # a class too small for the fraction keeps one image
            if not set(labels_of(sample[1])) <= present:
                train.append(sample)
                present.update(labels_of(sample[1]))
    if per_class_limit is not None:
        # an image is kept while one of its classes (or "none of them") is under the limit
        kept: dict[str, int] = {}
        limited = []
        for index in rng.permutation(len(train)):
            sample = train[index]
            names = labels_of(sample[1]) or ("",)
            if any(kept.get(name, 0) < per_class_limit for name in names):
                for name in names:
                    kept[name] = kept.get(name, 0) + 1
                limited.append(sample)
        train = sorted(limited)
    return source.replace(splits={**source.splits, "train": train}, unsplit=[])


def check_classes(source: DataSource) -> None:
    """Every split must use only classes seen in training, and there must be at least two."""
    names = set(source.class_names)
    if len(names) < 2:
        raise ImgclsError(f"{source.origin or source.name}: found {len(names)} class ({', '.join(names)}); need at least two")
    for split, samples in source.splits.items():
        extra = sorted({name for _, label in samples for name in labels_of(label)} - names)
        if extra:
            raise ImgclsError(
                f"class '{extra[0]}' appears in the {split} split of {source.origin or source.name} but not in train; "
                "add training images for it or remove it"
            )
    if not source.splits.get("val"):
        raise ImgclsError(f"{source.origin or source.name}: the validation split is empty; add images or raise data.val_fraction")


def write_splits_csv(source: DataSource, path: Path, separator: str = "|") -> None:
    """The exact split used by a run, so that resume and later evaluation see the same images.

    Paths are written absolute: `read_splits_csv` resolves relative ones against the CSV's folder
    (the run folder), not against the working directory they were relative to.
    """
    from imgcls.checkpoint import atomic_write

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "labels" if source.multi_label else "label", "split"])
    for split, samples in source.splits.items():
        writer.writerows((os.path.abspath(image), separator.join(label) if source.multi_label else label, split)
                         for image, label in samples)
    # atomic: a run killed while writing it must not resume on half its images
    atomic_write(path, text.getvalue().encode("utf-8"))  # what read_manifest reads, on any platform


def read_splits_csv(path: Path, name: str, separator: str = "|") -> DataSource:
    """A run's splits.csv (see `write_splits_csv`); its images may be gone since (export falls back)."""
    source = read_manifest(path, separator, strict=False)
    source.name = name
    return source
