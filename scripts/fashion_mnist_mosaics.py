"""Multi-label images from Fashion-MNIST: 2x2 mosaics (56x56 px) of 1-3 garments on a black ground, the
labels being the distinct classes present. Test mosaics are built from the test split only, so no
garment seen in training is ever tested on.

    .venv/bin/python scripts/fashion_mnist_mosaics.py /tmp/mosaics          # 24,000 train + 4,000 test
    .venv/bin/imgcls train /tmp/mosaics/manifest.csv                        # multi-label, no other flag

Writes <out>/train/*.png, <out>/test/*.png and <out>/manifest.csv (path,labels,split; labels joined by |).
Validation images are carved out of train by imgcls (iterative stratification).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.data.packaged import _fashion_mnist_arrays

CELL = 28


def mosaics(images: np.ndarray, labels: np.ndarray, class_names: list[str], count: int,
            rng: np.random.Generator) -> list[tuple[np.ndarray, list[str]]]:
    """`count` mosaics, each of 1, 2 or 3 garments (equally often) in random cells of a 2x2 grid."""
    made = []
    for _ in range(count):
        garments = int(rng.integers(1, 4))
        canvas = np.zeros((2 * CELL, 2 * CELL), dtype=np.uint8)
        chosen = rng.choice(len(images), size=garments, replace=False)
        for cell, index in zip(rng.permutation(4)[:garments], chosen):
            row, column = divmod(int(cell), 2)
            canvas[row * CELL:(row + 1) * CELL, column * CELL:(column + 1) * CELL] = images[index]
        made.append((canvas, sorted({class_names[labels[index]] for index in chosen})))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=24_000, help="training mosaics (val is carved out of them)")
    parser.add_argument("--test", type=int, default=4_000, help="test mosaics")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    for split, images, labels, class_names in _fashion_mnist_arrays():
        folder = args.out / split
        folder.mkdir(parents=True, exist_ok=True)
        for number, (canvas, names) in enumerate(mosaics(images, labels, class_names,
                                                         args.train if split == "train" else args.test, rng)):
            path = folder / f"{number:05d}.png"
            Image.fromarray(canvas).save(path)
            rows.append((f"{split}/{path.name}", "|".join(names), split))
    with open(args.out / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels", "split"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} mosaics and {args.out / 'manifest.csv'}")


if __name__ == "__main__":
    main()
