"""Reading one image file into a square RGB array, whatever its format, mode or orientation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from imgcls.errors import ImgclsError

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_SIZE", "check_image_size", "is_image_file", "load_image", "fit_to_square",
           "load_square", "image_size_of"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# The largest `data.image_size`, in pixels: a decoded image is 3 MiB there and a batch of 256 is 0.75 GiB
# (more as float in the model). Classifiers train at 224-600 px; far above, memory fails before the model.
MAX_IMAGE_SIZE = 1024

ResizePolicy = Literal["crop", "pad", "squish"]


def check_image_size(size: int) -> None:
    """Refuse a square side above `MAX_IMAGE_SIZE` before any image is decoded at it.

    Raises:
        ImgclsError: naming data.image_size, its value and the memory one decoded image would take.
    """
    if size > MAX_IMAGE_SIZE:
        needed = size * size * 3  # bytes: uint8 RGB
        amount = f"{needed / 2**30:.1f} GiB" if needed >= 2**30 else f"{needed / 2**20:.0f} MiB"
        raise ImgclsError(f"data.image_size={size}: decoding one image at that size takes {amount} of memory; "
                          f"use at most {MAX_IMAGE_SIZE} (classifiers train at 224-600 px)")


def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white, 16-bit is scaled to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit PNG/TIFF greyscale opens as I;16 or I (32-bit int): map the full 16-bit range to 0..255
        values = np.asarray(image, dtype=np.float32)
        # I;16 is 16-bit by definition (a dark image stays dark); 32-bit I may hold 8-bit values
        sixteen_bit = image.mode.startswith("I;16") or values.max(initial=0) > 255
        scale = 65535.0 if sixteen_bit else 255.0
        image = Image.fromarray(np.clip(values / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied.

    Args:
        path: any format PIL reads (JPEG, PNG, WebP, BMP, TIFF, GIF: first frame).
        draft_size: if given, let the JPEG decoder skip detail beyond this size (much faster for
            large photos; the result is still at least this large on its shorter side).

    Raises:
        OSError, ValueError, Image.DecompressionBombError: the file is not a readable image.
    """
    with Image.open(path) as image:
        if draft_size is not None and image.format == "JPEG":
            shorter = min(image.size)
            scale = max(1, shorter // draft_size)
            if scale > 1:
                image.draft("RGB", (image.size[0] // scale, image.size[1] // scale))
        image = ImageOps.exif_transpose(image)
        image.load()  # decode now, inside the `with`, so a truncated file fails here
        return _to_rgb(image)


def fit_to_square(image: Image.Image, size: int, policy: ResizePolicy = "crop") -> np.ndarray:
    """Resize an RGB image to `size` x `size` and return it as a uint8 HWC array.

    crop: shorter side to `size`, centre crop (cuts the edges of elongated images);
    pad: longer side to `size`, black borders (keeps the whole image);
    squish: stretch both sides to `size` (keeps everything, changes the aspect ratio).
    """
    width, height = image.size
    resample = Image.Resampling.BICUBIC
    if policy == "squish":
        resized = image.resize((size, size), resample, reducing_gap=3.0)
    elif policy == "crop":
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        resized = image.resize(new, resample, reducing_gap=3.0) if new != (width, height) else image
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        resized = resized.crop((left, top, left + size, top + size))
    elif policy == "pad":
        scale = size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        inner = image.resize(new, resample, reducing_gap=3.0) if new != (width, height) else image
        resized = Image.new("RGB", (size, size))
        resized.paste(inner, ((size - new[0]) // 2, (size - new[1]) // 2))
    else:
        raise ValueError(f"unknown resize policy {policy!r}; use crop, pad or squish")
    return np.array(resized, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def load_square(path: str | Path, size: int, policy: ResizePolicy = "crop") -> np.ndarray:
    """`load_image` then `fit_to_square`: the decode step shared by training, evaluation and prediction."""
    return fit_to_square(load_image(path, draft_size=size), size, policy)


def image_size_of(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding the pixels; None if unreadable."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:
        return None
