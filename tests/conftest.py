"""Shared fixtures: tiny generated image folders that a small CNN separates in a few epochs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")


def draw_shape(shape: str, rng: np.random.Generator, size: tuple[int, int], shift: bool = False) -> Image.Image:
    """A noisy background with one large shape; each class has its own shape and dominant colour.

    shift=True draws the same classes in other colours on a brighter background: a
    distribution-shifted version of the same task."""
    width, height = size
    background = rng.integers(20, 90, size=(height, width, 3)) + (90 if shift else 0)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colours = {"circle": (230, 60, 60), "square": (60, 220, 60), "triangle": (70, 90, 240)}
    colour = tuple(int(c) for c in np.clip(np.array(colours[shape]) + rng.integers(-25, 25, 3), 0, 255))
    if shift:
        colour = colour[1:] + colour[:1]
    side = min(width, height)
    extent = int(side * rng.uniform(0.45, 0.8))
    left = int(rng.integers(0, width - extent + 1))
    top = int(rng.integers(0, height - extent + 1))
    box = (left, top, left + extent, top + extent)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left + extent // 2, top), (left, top + extent), (left + extent, top + extent)], fill=colour)
    return image


def write_class_folders(root: Path, per_class: int, seed: int, shift: bool = False) -> Path:
    """root/<class>/<n>.{png,jpg} with mixed sizes (40-90 px) and formats."""
    rng = np.random.default_rng(seed)
    for shape in CLASSES:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            image = draw_shape(shape, rng, size, shift)
            suffix = ".jpg" if index % 2 else ".png"
            image.save(root / shape / f"{shape}_{index:03d}{suffix}")
    return root


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    """One folder of class folders (no splits): 3 classes x 40 images."""
    return write_class_folders(tmp_path_factory.mktemp("shapes") / "shapes", per_class=40, seed=0)


@pytest.fixture(scope="session")
def shifted_folder(tmp_path_factory) -> Path:
    """The same classes in other colours: a distribution-shifted test set."""
    return write_class_folders(tmp_path_factory.mktemp("shifted") / "shifted", per_class=10, seed=1, shift=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Packaged datasets go to a per-session cache, never the user's ~/.cache (except when
    IMGCLS_TEST_CACHE_DIR points at a shared one, to reuse materialised datasets)."""
    shared = os.environ.get("IMGCLS_TEST_CACHE_DIR")
    monkeypatch.setenv("IMGCLS_CACHE_DIR", shared or str(tmp_path_factory.getbasetemp() / "cache"))


TINY_RUN = ["model.name=small_resnet", "data.image_size=32", "train.batch_size=16", "train.epochs=2", "seed=0",
            "data.augment=none"]


def train_tiny_run(data: Path, runs: Path, tmp_path_factory, *overrides: str) -> Path:
    """A real run of small_resnet (2 epochs at 32 px, ~5 s) on `data` into `runs`; its folder. For
    module-scoped fixtures, which the per-test cache fixture does not cover: the decoded-image cache
    stays in the test session's folders."""
    import imgcls

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGCLS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        imgcls.train(imgcls.load_config(overrides=[f"data.path={data}", f"run.dir={runs}", *TINY_RUN, *overrides]))
    (run,) = runs.iterdir()
    return run


def stop_after_epochs(command: list[str], metrics: Path, epochs: int) -> str:
    """Run `command` (an `imgcls train`), send it SIGTERM once `metrics` (its metrics.csv) holds `epochs`
    epochs, and return its stderr once it has stopped with the exit code of an interruption (130).
    SIGTERM is what a scheduler sends; Ctrl-C takes the same path, but a shell that starts CI in the
    background makes its children ignore SIGINT."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= epochs + 1:  # the header, then a line per epoch
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.005)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired as hung:  # seen once in CI, after "imgcls: interrupted": say where it waits
        raise AssertionError(f"imgcls train did not exit 120 s after SIGTERM; {_where_it_waits(process)}; "
                             f"stderr: {(hung.stderr or b'').decode()[-1500:]}") from None
    assert process.returncode == 130, stderr.decode()[-2000:]
    return stderr.decode()


def _where_it_waits(process: subprocess.Popen) -> str:
    """The threads of a hung process and the kernel function each waits in, and its child processes;
    then kills it (and them)."""
    tasks = Path(f"/proc/{process.pid}/task")
    threads = [f"{(task / 'comm').read_text().strip()}:{(task / 'wchan').read_text().strip()}"
               for task in tasks.iterdir()] if tasks.exists() else []
    children = subprocess.run(["ps", "--ppid", str(process.pid), "-o", "pid=,stat=,args="], capture_output=True,
                              text=True).stdout.strip()
    state = next((line for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
                  if line.startswith("State")), "?") if tasks.exists() else "gone"
    subprocess.run(["pkill", "-KILL", "-P", str(process.pid)])
    process.kill()
    process.communicate()
    return f"{state}; threads {threads}; children [{children}]"


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture
def small_disk(tmp_path_factory):
    """A factory of small real disks, to test what a full disk does: `small_disk(size_kib=2048)`
    mounts a tmpfs of that size on a new empty folder and returns the folder; every mount is undone
    when the test ends. Writes past the size fail as on a full disk: OSError ENOSPC, or SIGBUS
    through a memory map of a sparse file. Each file takes at least one 4 KiB page.

    Skips the test when it cannot mount (not root, not Linux, a container without CAP_SYS_ADMIN).
    """
    mounted = []

    def mount(size_kib: int = 2048) -> Path:
        if not sys.platform.startswith("linux") or os.geteuid() != 0:
            pytest.skip("small_disk mounts a tmpfs: needs root on Linux")
        folder = tmp_path_factory.mktemp("small_disk")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs for small_disk: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        # lazy: detached even while a memory map of a file on it is still open
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)
