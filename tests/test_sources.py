"""Finding images and labels: split folders, one folder of class folders, CSV manifests and packaged
datasets all become a DataSource; mistakes in the layout are ImgclsErrors that name the culprit."""

import csv
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from imgcls.data import (
    DataSource, assign_splits, cache_dir, materialise, read_splits_csv, resolve_source, write_splits_csv,
)
from imgcls.errors import ImgclsError


def make_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    """`count` tiny PNGs in `folder` (the content is irrelevant to finding files)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = folder / f"{index:03d}.png"
        Image.new("RGB", (8, 8), (index % 256, 0, 0)).save(path)
        paths.append(path)
    return paths


def make_class_folders(root: Path, counts: dict[str, int]) -> Path:
    for class_name, count in counts.items():
        make_images(root / class_name, count)
    return root


def write_manifest(path: Path, rows: list[tuple], header=("path", "label", "split")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def labels_of(samples):
    return Counter(label for _, label in samples)


# --- split folders -------------------------------------------------------------------------------

@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_split_folders(tmp_path, val_name):
    make_class_folders(tmp_path / "train", {"cat": 4, "dog": 3})
    make_class_folders(tmp_path / val_name, {"cat": 2, "dog": 1})
    make_class_folders(tmp_path / "test", {"cat": 1, "dog": 2})
    source = resolve_source(str(tmp_path))
    assert set(source.splits) == {"train", "val", "test"}
    assert source.class_names == ["cat", "dog"]
    assert labels_of(source.splits["train"]) == {"cat": 4, "dog": 3}
    assert labels_of(source.splits["val"]) == {"cat": 2, "dog": 1}
    assert labels_of(source.splits["test"]) == {"cat": 1, "dog": 2}
    assert all(Path(path).parent.parent.name == "test" for path, _ in source.splits["test"])
    # given splits are kept as they are
    assert assign_splits(source, 0.1, 0.1, seed=0).splits == source.splits


def test_split_folders_without_val_carve_val_out_of_train(tmp_path):
    make_class_folders(tmp_path / "train", {"cat": 10, "dog": 10})
    make_class_folders(tmp_path / "test", {"cat": 2, "dog": 2})
    source = assign_splits(resolve_source(str(tmp_path)), val_fraction=0.2, test_fraction=0.1, seed=0)
    assert labels_of(source.splits["val"]) == {"cat": 2, "dog": 2}
    assert labels_of(source.splits["train"]) == {"cat": 8, "dog": 8}
    assert labels_of(source.splits["test"]) == {"cat": 2, "dog": 2}  # the given test split is untouched


def test_images_in_subfolders_of_a_class_folder_are_found(tmp_path):
    make_images(tmp_path / "cat" / "indoor", 2)
    make_images(tmp_path / "cat" / "outdoor", 3)
    make_images(tmp_path / "dog", 2)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    source = resolve_source(str(tmp_path))
    assert labels_of(source.unsplit) == {"cat": 5, "dog": 2}


def test_two_folders_for_one_split_is_an_error(tmp_path):
    make_class_folders(tmp_path / "train", {"cat": 2, "dog": 2})
    make_class_folders(tmp_path / "val", {"cat": 1, "dog": 1})
    make_class_folders(tmp_path / "valid", {"cat": 1, "dog": 1})
    with pytest.raises(ImgclsError, match="two folders for the val split"):
        resolve_source(str(tmp_path))


def test_split_folders_without_train_is_an_error(tmp_path):
    make_class_folders(tmp_path / "val", {"cat": 1, "dog": 1})
    with pytest.raises(ImgclsError, match="no train/ folder"):
        resolve_source(str(tmp_path))


# --- one folder of class folders -----------------------------------------------------------------

@pytest.fixture
def class_folders(tmp_path):
    return make_class_folders(tmp_path / "animals", {"cat": 40, "dog": 30, "fox": 20})


def test_single_folder_is_split_stratified(class_folders):
    source = resolve_source(str(class_folders))
    assert source.splits == {}
    assert len(source.unsplit) == 90
    split = assign_splits(source, val_fraction=0.2, test_fraction=0.1, seed=1)
    assert set(split.splits) == {"train", "val", "test"}
    assert split.class_names == ["cat", "dog", "fox"]
    for name in ("train", "val", "test"):
        assert set(labels_of(split.splits[name])) == {"cat", "dog", "fox"}
    # per class: 10% test, 20% val, the rest train (rounded)
    assert labels_of(split.splits["test"]) == {"cat": 4, "dog": 3, "fox": 2}
    assert labels_of(split.splits["val"]) == {"cat": 8, "dog": 6, "fox": 4}
    assert labels_of(split.splits["train"]) == {"cat": 28, "dog": 21, "fox": 14}
    # every image is in exactly one split
    everything = [path for samples in split.splits.values() for path, _ in samples]
    assert sorted(everything) == sorted(path for path, _ in source.unsplit)


def test_split_is_reproducible_for_a_seed_and_differs_between_seeds(class_folders):
    source = resolve_source(str(class_folders))
    first = assign_splits(source, 0.2, 0.1, seed=5)
    again = assign_splits(resolve_source(str(class_folders)), 0.2, 0.1, seed=5)
    other = assign_splits(source, 0.2, 0.1, seed=6)
    assert first.splits == again.splits
    assert set(first.splits["val"]) != set(other.splits["val"])


def test_small_classes_still_reach_validation(tmp_path):
    # 3 images and a 10% fraction round to zero: every class with 3+ images still gives one to val
    make_class_folders(tmp_path, {"a": 3, "b": 3, "c": 30})
    split = assign_splits(resolve_source(str(tmp_path)), val_fraction=0.1, test_fraction=0.0, seed=0)
    assert set(labels_of(split.splits["val"])) == {"a", "b", "c"}
    assert set(labels_of(split.splits["train"])) == {"a", "b", "c"}
    assert "test" not in split.splits  # test_fraction=0: no test split


# --- CSV manifests -------------------------------------------------------------------------------

def test_manifest_with_split_column_resolves_relative_paths(tmp_path):
    images = make_images(tmp_path / "images", 6)
    manifest = write_manifest(tmp_path / "labels.csv", [
        ("images/000.png", "cat", "train"), ("images/001.png", "dog", "train"),
        ("images/002.png", "cat", "train"), ("images/003.png", "dog", "valid"),
        ("images/004.png", "cat", "val"), (str(images[5]), "dog", "test"),
    ])
    source = resolve_source(str(manifest))
    assert source.name == "labels"
    assert source.class_names == ["cat", "dog"]
    assert labels_of(source.splits["train"]) == {"cat": 2, "dog": 1}
    assert labels_of(source.splits["val"]) == {"cat": 1, "dog": 1}
    assert source.splits["test"] == [(str(images[5]), "dog")]  # absolute paths stay as given
    for samples in source.splits.values():
        assert all(Path(path).is_file() for path, _ in samples)
    assert Path(source.splits["train"][0][0]).resolve() == images[0].resolve()


def test_relative_paths_resolve_against_the_csv_folder_not_the_working_directory(tmp_path, monkeypatch):
    make_images(tmp_path / "data" / "images", 2)
    manifest = write_manifest(tmp_path / "data" / "labels.csv",
                              [("images/000.png", "a"), ("images/001.png", "b")], header=("path", "label"))
    monkeypatch.chdir(tmp_path)
    source = resolve_source("data/labels.csv")
    assert all(Path(path).is_file() for path, _ in source.unsplit)
    assert manifest.exists()


def test_manifest_without_split_column_is_split_by_seed(tmp_path):
    rows = []
    for class_name in ("cat", "dog"):
        for path in make_images(tmp_path / class_name, 10):
            rows.append((str(path.relative_to(tmp_path)), class_name))
    manifest = write_manifest(tmp_path / "labels.csv", rows, header=("path", "label"))
    source = resolve_source(str(manifest))
    assert source.splits == {} and len(source.unsplit) == 20
    split = assign_splits(source, 0.2, 0.2, seed=0)
    assert labels_of(split.splits["val"]) == {"cat": 2, "dog": 2}
    assert labels_of(split.splits["test"]) == {"cat": 2, "dog": 2}


def test_manifest_header_is_case_and_space_insensitive(tmp_path):
    make_images(tmp_path, 2)
    manifest = write_manifest(tmp_path / "labels.csv", [("000.png", "a"), ("001.png", "b")], header=(" Path", "LABEL "))
    assert labels_of(resolve_source(str(manifest)).unsplit) == {"a": 1, "b": 1}



def test_manifest_saved_by_excel_with_a_byte_order_mark_and_crlf(tmp_path):
    make_images(tmp_path / "images", 4)
    # Excel's "CSV UTF-8": a UTF-8 byte order mark before the header, CRLF line ends
    lines = ["path,label,split", "images/000.png,café,train", "images/001.png,thé,train",
             "images/002.png,café,val", "images/003.png,thé,val"]
    manifest = tmp_path / "labels.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    source = resolve_source(str(manifest))
    assert source.class_names == ["café", "thé"]
    assert labels_of(source.splits["val"]) == {"café": 1, "thé": 1}
    assert all(Path(path).is_file() for path, _ in source.splits["train"])
    # Excel's plain "CSV" is the Windows code page: one line that says how to save it instead
    manifest.write_bytes("\r\n".join(lines).encode("cp1252"))
    with pytest.raises(ImgclsError, match="is not UTF-8 text; save it as UTF-8"):
        resolve_source(str(manifest))

def test_manifest_missing_columns(tmp_path):
    manifest = write_manifest(tmp_path / "labels.csv", [("000.png", "cat")], header=("file", "class"))
    with pytest.raises(ImgclsError, match="path,label") as error:
        resolve_source(str(manifest))
    assert "labels.csv" in str(error.value)


def test_manifest_unknown_split_value(tmp_path):
    manifest = write_manifest(tmp_path / "labels.csv", [("000.png", "cat", "train"), ("001.png", "dog", "holdout")])
    with pytest.raises(ImgclsError, match="unknown split 'holdout'") as error:
        resolve_source(str(manifest))
    assert "line 3" in str(error.value)


def test_manifest_with_empty_label(tmp_path):
    manifest = write_manifest(tmp_path / "labels.csv", [("000.png", "cat"), ("001.png", "")], header=("path", "label"))
    with pytest.raises(ImgclsError, match="empty label for 001.png"):
        resolve_source(str(manifest))


def test_manifest_with_split_for_some_rows_only(tmp_path):
    manifest = write_manifest(tmp_path / "labels.csv", [("000.png", "cat", "train"), ("001.png", "dog", "")])
    with pytest.raises(ImgclsError, match="some rows have a split"):
        resolve_source(str(manifest))


def test_manifest_without_train_rows(tmp_path):
    manifest = write_manifest(tmp_path / "labels.csv", [("000.png", "cat", "val"), ("001.png", "dog", "test")])
    with pytest.raises(ImgclsError, match="no row has split 'train'"):
        resolve_source(str(manifest))


def test_empty_manifest(tmp_path):
    manifest = write_manifest(tmp_path / "labels.csv", [])
    with pytest.raises(ImgclsError, match="lists no images"):
        resolve_source(str(manifest))


# --- errors that name the culprit ----------------------------------------------------------------

@pytest.mark.parametrize("split_folder", ["val", "test"])
def test_class_missing_from_train(tmp_path, split_folder):
    make_class_folders(tmp_path / "train", {"cat": 3, "dog": 3})
    make_class_folders(tmp_path / split_folder, {"cat": 1, "dog": 1, "zebra": 1})
    if split_folder == "test":
        make_class_folders(tmp_path / "val", {"cat": 1, "dog": 1})
    with pytest.raises(ImgclsError, match=f"class 'zebra' appears in the {split_folder} split"):
        assign_splits(resolve_source(str(tmp_path)), 0.1, 0.1, seed=0)


def test_empty_class_folder(tmp_path):
    make_class_folders(tmp_path, {"cat": 3, "dog": 3})
    (tmp_path / "owl").mkdir()
    with pytest.raises(ImgclsError, match="class folder 'owl'.*has no images"):
        resolve_source(str(tmp_path))


def test_class_folder_with_only_non_images(tmp_path):
    make_class_folders(tmp_path, {"cat": 3})
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(ImgclsError, match="'dog'"):
        resolve_source(str(tmp_path))


def test_fewer_than_two_classes(tmp_path):
    make_class_folders(tmp_path, {"cat": 10})
    with pytest.raises(ImgclsError, match="found 1 class \\(cat\\); need at least two"):
        assign_splits(resolve_source(str(tmp_path)), 0.2, 0.1, seed=0)


def test_folder_without_class_folders(tmp_path):
    make_images(tmp_path, 3)  # loose images, no class folders
    with pytest.raises(ImgclsError, match="no class folders"):
        resolve_source(str(tmp_path))


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ImgclsError, match="data not found") as error:
        resolve_source(str(missing))
    assert str(missing) in str(error.value)
    assert "digits" in str(error.value)  # the message lists the packaged datasets


def test_empty_data_argument():
    with pytest.raises(ImgclsError, match="no data given"):
        resolve_source("")


def test_a_file_that_is_not_a_csv(tmp_path):
    image = make_images(tmp_path, 1)[0]
    with pytest.raises(ImgclsError, match="not a .csv manifest") as error:
        resolve_source(str(image))
    assert str(image) in str(error.value)


def test_empty_validation_split_is_an_error(tmp_path):
    # two images per class: training keeps at least one, and 10% of two rounds to none
    make_class_folders(tmp_path, {"cat": 2, "dog": 2})
    with pytest.raises(ImgclsError, match="validation split is empty"):
        assign_splits(resolve_source(str(tmp_path)), 0.1, 0.0, seed=0)


# --- splits.csv ----------------------------------------------------------------------------------

def test_splits_csv_round_trip(class_folders, tmp_path):
    split = assign_splits(resolve_source(str(class_folders)), 0.2, 0.1, seed=3)
    path = tmp_path / "run" / "splits.csv"
    path.parent.mkdir()
    write_splits_csv(split, path)
    again = read_splits_csv(path, "animals")
    assert again.name == "animals"
    assert again.splits == split.splits
    assert again.class_names == split.class_names


def test_splits_csv_of_relative_paths_is_read_back_from_another_folder(tmp_path, monkeypatch):
    # the data path is usually relative to the working directory, while splits.csv lives in the run folder
    make_class_folders(tmp_path / "data", {"cat": 5, "dog": 5})
    monkeypatch.chdir(tmp_path)
    split = assign_splits(resolve_source("data"), 0.2, 0.0, seed=0)
    run_folder = tmp_path / "runs" / "first"
    run_folder.mkdir(parents=True)
    write_splits_csv(split, run_folder / "splits.csv")
    again = read_splits_csv(run_folder / "splits.csv", "data")
    for name, samples in again.splits.items():
        assert all(Path(path).is_file() for path, _ in samples), name
        assert [os.path.realpath(p) for p, _ in samples] == [os.path.realpath(p) for p, _ in split.splits[name]]


def test_data_source_counts():
    source = DataSource(name="x", splits={"train": [("a.png", "cat"), ("b.png", "cat"), ("c.png", "dog")]})
    assert source.counts("train") == {"cat": 2, "dog": 1}
    assert source.counts("test") == Counter()


# --- packaged datasets ---------------------------------------------------------------------------

def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("IMGCLS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "imgcls"


def test_materialise_digits_once(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path))
    folder = materialise("digits")
    assert folder == tmp_path / "datasets" / "digits"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["test", "train"]
    files = {split: sorted((folder / split).rglob("*.png")) for split in ("train", "test")}
    assert len(files["train"]) + len(files["test"]) == 1797
    assert 0.18 < len(files["test"]) / 1797 < 0.22  # the fixed 80/20 split
    for split in ("train", "test"):
        assert sorted(p.name for p in (folder / split).iterdir()) == [str(digit) for digit in range(10)]
    with Image.open(files["train"][0]) as image:
        assert image.size == (8, 8)
    assert not [p for p in tmp_path.joinpath("datasets").iterdir() if p.name.startswith(".")]  # no staging left

    stamps = {path: path.stat().st_mtime_ns for path in files["train"][:50]}
    files["test"][0].unlink()  # a rewrite would bring it back
    assert materialise("digits") == folder
    assert not files["test"][0].exists()
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps

    # and the name resolves like a folder of split folders (from a folder with no "digits" in it)
    monkeypatch.chdir(tmp_path)
    source = resolve_source("digits")
    assert source.name == "digits"
    assert source.class_names == [str(digit) for digit in range(10)]
    assert len(source.splits["train"]) == len(files["train"])


def test_unknown_packaged_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path))
    with pytest.raises(ImgclsError, match="unknown packaged dataset 'cifar'.*digits"):
        materialise("cifar")
