"""Training throughput: a plain PyTorch loop vs imgcls with its defaults, side by side.

(a) plain: the loop a seed author writes — torchvision ImageFolder + PIL transforms (RandomResizedCrop,
    flip, ToTensor, Normalize) + DataLoader(num_workers=2) + fp32 + timm resnet18 + AdamW.
(b) imgcls: `imgcls.train` with its defaults (same model, batch size and optimiser), nothing tuned.

Both train on the same generated photo-like JPEG folder (300-500 px) at each resolution; runs
alternate (plain, imgcls, plain, imgcls, ...) so that drift in the machine's speed hits both.
Steady state = epochs after the first. Prints images/s for both and their ratio.

    .venv/bin/python benchmarks/train_throughput.py                  # 64, 128, 224 px
    .venv/bin/python benchmarks/train_throughput.py --sizes 64 --repeats 1
    .venv/bin/python benchmarks/train_throughput.py --sizes 64 --repeats 1 --fashion-mnist
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter


def make_photo_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    """JPEGs of 300-500 px: smooth coloured noise with a class-specific shape, quality 90."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / "train" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            width, height = int(rng.integers(300, 500)), int(rng.integers(300, 500))
            noise = rng.integers(0, 255, size=(height // 8, width // 8, 3), dtype=np.uint8)
            image = Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC)
            draw = ImageDraw.Draw(image)
            box = [int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))]
            box += [box[0] + width // 3, box[1] + height // 3]
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if label % 2 else draw.rectangle)(box, fill=colour)
            image.filter(ImageFilter.GaussianBlur(1)).save(folder / f"{index:04d}.jpg", quality=90)
    return root


def plain_loop(data: Path, size: int, batch_size: int, epochs: int) -> list[float]:
    """Images/s of each epoch of the plain PyTorch loop."""
    import timm
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    dataset = datasets.ImageFolder(str(data / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2, drop_last=True)
    model = timm.create_model("resnet18", num_classes=len(dataset.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    speeds = []
    for _ in range(epochs):
        started, seen = time.perf_counter(), 0
        for images, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(labels)
        speeds.append(seen / (time.perf_counter() - started))
    return speeds


def imgcls_run(data: Path, size: int, batch_size: int, epochs: int, runs: Path) -> tuple[list[float], list[float]]:
    """Images/s and data-wait share of each epoch of `imgcls.train` with its defaults."""
    import imgcls

    config = imgcls.load_config(overrides=[
        f"data.path={data}", "model.name=resnet18", f"data.image_size={size}", f"train.batch_size={batch_size}",
        f"train.epochs={epochs}", f"run.dir={runs}", "data.test_fraction=0",
        "data.augment=light",  # what the plain loop does too (auto would skip it in a 2-epoch run at 64 px)
    ])
    run = imgcls.train(config)
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [float(r["train_images_per_s"]) for r in rows], [float(r["data_wait"]) for r in rows]


def plain_fashion_mnist(root: Path, epochs: int) -> tuple:
    """The plain loop's pieces for Fashion-MNIST at `root` (train/ and test/ class folders): ImageFolder +
    PIL padded crop and flip, 2 loader workers, batch 64, small_resnet, AdamW 2e-3 with a one-cycle
    schedule over `epochs`, fp32. Returns (train_loader, test_loader, model, optimizer, schedule)."""
    from torchvision import datasets, transforms

    from imgcls.models import create_model

    normalise = transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    train_set = datasets.ImageFolder(str(root / "train"), transforms.Compose([
        transforms.RandomCrop(28, padding=3, padding_mode="reflect"), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalise]))
    test_set = datasets.ImageFolder(str(root / "test"), transforms.Compose([transforms.ToTensor(), normalise]))
    train_loader = torch.utils.data.DataLoader(train_set, 64, shuffle=True, num_workers=2, drop_last=True)
    test_loader = torch.utils.data.DataLoader(test_set, 256, num_workers=2)
    model = create_model("small_resnet", 10, (0.0,) * 3, (1.0,) * 3).backbone  # normalised by the transform
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * len(train_loader))
    return train_loader, test_loader, model, optimizer, schedule


def fashion_mnist_time_to_accuracy(target: float, max_epochs: int, runs: Path) -> tuple[str, str]:
    """Wall-clock seconds until test accuracy >= target on Fashion-MNIST, for both loops.

    Both evaluate on the 10,000 test images after every epoch (imgcls by using them as its val split,
    through a folder of links), so the clocks stop at the same event. Times include imgcls's one-time
    decoding into its cache and exclude the evaluation passes of both.
    """
    import imgcls
    from imgcls.data import materialise

    root = materialise("fashion-mnist")
    linked = runs / "fashion-mnist-test-as-val"
    linked.mkdir(parents=True, exist_ok=True)
    for split, source in (("train", "train"), ("val", "test")):
        if not (linked / split).exists():
            (linked / split).symlink_to(root / source)

    # (a) plain loop: the same small_resnet, fp32, PIL transforms, 2 workers, batch 64, AdamW 2e-3
    train_loader, test_loader, model, optimizer, schedule = plain_fashion_mnist(root, max_epochs)
    clock, plain = 0.0, f"not reached in {max_epochs} epochs"
    for epoch in range(1, max_epochs + 1):
        started = time.perf_counter()
        model.train()
        for images, labels in train_loader:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        clock += time.perf_counter() - started
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test_loader)
        accuracy = correct / len(test_loader.dataset)
        print(f"  plain  epoch {epoch}: test acc {accuracy:.4f} at {clock:.0f} s", flush=True)
        if accuracy >= target:
            plain = f"{clock:.0f} s (epoch {epoch}, acc {accuracy:.4f})"
            break

    # (b) imgcls with its defaults (10 epochs, light augmentation, bf16 where supported)
    started = time.perf_counter()
    run = imgcls.train(imgcls.load_config(overrides=[f"data.path={linked}", f"run.dir={runs}"]))
    total = time.perf_counter() - started
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    training = sum(float(r["epoch_seconds"]) for r in rows)
    setup = total - training  # decoding into the cache, model set-up, final evaluation
    clock, ours = 0.0, "not reached in the default 10 epochs"
    for row in rows:
        clock += float(row["epoch_seconds"])
        print(f"  imgcls epoch {row['epoch']}: test acc {float(row['val_acc1']):.4f} at {clock:.0f} s", flush=True)
        if float(row["val_acc1"]) >= target and ours.startswith("not"):
            ours = f"{clock + setup:.0f} s incl. {setup:.0f} s set-up (epoch {row['epoch']}, acc {float(row['val_acc1']):.4f})"
    return plain, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--images", type=int, default=256, help="training images (4 classes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="per run; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=2, help="alternating plain/imgcls pairs per size")
    parser.add_argument("--fashion-mnist", action="store_true",
                        help="also time both loops to 0.92 test accuracy on Fashion-MNIST (~20 min)")
    args = parser.parse_args()

    import logging

    logging.getLogger("imgcls").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as temporary:
        root = make_photo_folder(Path(temporary) / "photos", classes=4, per_class=args.images // 4)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} JPEGs of 300-500 px, "
              f"resnet18, batch {args.batch_size}")
        lines = []
        for size in args.sizes:
            plain, ours, waits = [], [], []
            for repeat in range(args.repeats):
                plain += plain_loop(root, size, args.batch_size, args.epochs)[1:]
                speeds, wait = imgcls_run(root, size, args.batch_size, args.epochs, Path(temporary) / "runs")
                ours += speeds[1:]
                waits += wait[1:]
            ratio = statistics.mean(ours) / statistics.mean(plain)
            line = (f"{size:4d} px: plain {statistics.mean(plain):7.1f} img/s | imgcls {statistics.mean(ours):7.1f} img/s "
                    f"(data wait {statistics.mean(waits):.0%}) | ratio {ratio:.2f}x")
            print(line, flush=True)
            lines.append(line)
        if args.fashion_mnist:
            plain, ours = fashion_mnist_time_to_accuracy(0.92, 15, Path(temporary) / "fashion")
            lines.append(f"Fashion-MNIST to 0.92 test accuracy: plain {plain} | imgcls {ours}")
        print("\n".join(["", "summary:", *lines]))


if __name__ == "__main__":
    main()
