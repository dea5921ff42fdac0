"""Fashion-MNIST with planted problems, to measure what `imgcls doctor` finds: test images copied into the
training data (byte copies, JPEG re-encodes, rescaled-and-shifted copies) and training labels flipped.

    .venv/bin/python scripts/plant_problems.py /tmp/planted               # 200 copies of each kind, 300 flips
    .venv/bin/imgcls doctor /tmp/planted/manifest.csv --labels --name planted
    .venv/bin/python scripts/plant_problems.py /tmp/planted --score runs/doctor/planted/doctor.json

Writes <out>/copies/*.png|jpg (the planted copies), <out>/manifest.csv (path,label,split: the original files,
flipped labels and the copies in train) and <out>/planted.json (what was planted). The materialised
Fashion-MNIST files are only read. --score compares a doctor.json with planted.json: recall and precision of
the leakage found per kind of copy, and how many flipped labels are among the top 2 x (number flipped)
suspected label issues.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.data import materialise

KINDS = ("byte", "jpeg", "shifted")


def rescaled_and_shifted(image: Image.Image, rng: np.random.Generator, zoom: float = 1.0) -> Image.Image:
    """Zoomed in by up to `zoom` (cutting the edges off), shifted by 1-2 px (filled with the corner colour) and
    saved at 20, 36 or 56 px."""
    side = image.size[0]
    scale = rng.uniform(1.0, zoom)
    zoomed = image.resize((round(side * scale),) * 2, Image.Resampling.BICUBIC)
    margin = (zoomed.size[0] - side) // 2
    cut = zoomed.crop((margin, margin, margin + side, margin + side))
    dx, dy = 0, 0
    while dx == dy == 0:
        dx, dy = (int(rng.integers(-2, 3)) for _ in range(2))
    shifted = Image.new(image.mode, image.size, image.getpixel((0, 0)))
    shifted.paste(cut, (dx, dy))
    out = int(rng.choice([20, 36, 56]))
    return shifted.resize((out, out), Image.Resampling.BICUBIC)


def plant(out: Path, copies: int, flips: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    root = materialise("fashion-mnist")
    samples = {split: sorted((str(path), path.parent.name) for path in (root / split).rglob("*.png"))
               for split in ("train", "test")}
    classes = sorted({label for _, label in samples["train"]})
    (out / "copies").mkdir(parents=True, exist_ok=True)
    chosen = rng.choice(len(samples["test"]), size=copies * len(KINDS), replace=False)
    planted_copies, rows = [], []
    for number, index in enumerate(chosen):
        original, label = samples["test"][index]
        kind = KINDS[number // copies]
        stem = out / "copies" / f"{kind}-{number:04d}"
        if kind == "byte":
            copy = stem.with_suffix(".png")
            shutil.copyfile(original, copy)
        elif kind == "jpeg":
            copy = stem.with_suffix(".jpg")
            Image.open(original).save(copy, quality=int(rng.integers(70, 96)))
        else:
            copy = stem.with_suffix(".png")
            rescaled_and_shifted(Image.open(original), rng).save(copy)
        planted_copies.append({"kind": kind, "copy": str(copy), "original": original})
        rows.append((str(copy), label, "train"))
    flipped = {}
    for index in rng.choice(len(samples["train"]), size=flips, replace=False):
        path, label = samples["train"][index]
        flipped[path] = {"given": str(rng.choice([name for name in classes if name != label])), "true": label}
    rows += [(path, flipped[path]["given"] if path in flipped else label, split)
             for split in ("train", "test") for path, label in samples[split]]
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    (out / "planted.json").write_text(json.dumps({"copies": planted_copies, "flipped": flipped}, indent=1))
    print(f"{len(planted_copies)} copies ({copies} of each of {', '.join(KINDS)}) and {flips} flipped labels; "
          f"train with {out / 'manifest.csv'}")


def score(out: Path, report: Path) -> None:
    planted = json.loads((out / "planted.json").read_text())
    found = json.loads(report.read_text())
    copy_of = {item["copy"]: item for item in planted["copies"]}
    leaked_pairs = set()  # (copy, original) pairs the report puts in one cross-split group
    false_pairs, kinds_found = [], {kind: 0 for kind in KINDS}
    for group in found["duplicates"]:
        if len(set(group["splits"])) < 2:
            continue
        paths = group["paths"]
        for first in range(len(paths)):
            for second in range(first + 1, len(paths)):
                if group["splits"][first] == group["splits"][second]:
                    continue
                pair = {paths[first], paths[second]}
                planted_pair = next((item for path in pair if (item := copy_of.get(path))
                                     and item["original"] in pair), None)
                if planted_pair:
                    leaked_pairs.add(planted_pair["copy"])
                else:
                    false_pairs.append((group["kind"], sorted(pair), group.get("distance")))
    for path in leaked_pairs:
        kinds_found[copy_of[path]["kind"]] += 1
    per_kind = {kind: sum(item["kind"] == kind for item in planted["copies"]) for kind in KINDS}
    for kind in KINDS:
        print(f"leakage recall, {kind:8s} copies: {kinds_found[kind]}/{per_kind[kind]} = "
              f"{kinds_found[kind] / per_kind[kind]:.1%}")
    total = len(leaked_pairs) + len(false_pairs)
    print(f"leakage precision: {len(leaked_pairs)} planted of {total} cross-split pairs = "
          f"{len(leaked_pairs) / max(total, 1):.1%} (the other pairs, listed below, may be real duplicates "
          "that Fashion-MNIST has)")
    for kind, pair, distance in false_pairs[:30]:
        print(f"  {kind} {distance} {pair[0]} {pair[1]}")
    flipped = planted["flipped"]
    if found.get("label_issues"):
        top = [issue["path"] for issue in found["label_issues"][:2 * len(flipped)]]
        hits = sum(path in flipped for path in top)
        print(f"flipped labels among the top {2 * len(flipped)} suspected label issues: {hits}/{len(flipped)} = "
              f"{hits / len(flipped):.1%}; {sum(issue['path'] in flipped for issue in found['label_issues'])} "
              f"of them among all {len(found['label_issues'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the copies, manifest.csv and planted.json")
    parser.add_argument("--copies", type=int, default=200, help="copies of each kind (default 200)")
    parser.add_argument("--flips", type=int, default=300, help="training labels flipped (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score", type=Path, metavar="DOCTOR_JSON", help="score a doctor.json against planted.json")
    args = parser.parse_args()
    if args.score:
        score(args.out, args.score)
    else:
        plant(args.out, args.copies, args.flips, args.seed)


if __name__ == "__main__":
    main()
