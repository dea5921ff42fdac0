"""Quick checks of a dataset, made before training from a sample of its images.

`mirror_check` decides whether horizontal flips are safe augmentation for the data (`data.horizontal_flip=auto`):
a mirrored 2 is no 2, and a mirrored left-turn sign is a right-turn sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgcls.data.images import load_square
from imgcls.data.sources import DataSource

__all__ = ["MirrorCheck", "mirror_check"]

CHECK_SIDE = 16  # pixels: enough for the shape of a digit or a garment, cheap for thousands of images
# flips hurt when mirror images are recognised less than half as often as the images (digits: 0.35 of it;
# Fashion-MNIST 0.73, generated shapes 1.1, Fashion-MNIST mosaics 0.70)
MIRROR_SHARE = 0.5


@dataclass
class MirrorCheck:
    """A nearest-neighbour classifier on small grey training images, each scored against the others, then
    each image's mirror image scored the same way. Where the mirror image of most images is no longer near
    their class (digits and letters: a mirrored 2 is no 2), flips would teach the model wrong labels.
    Mirror-symmetric data (most photos, clothes, cells) keeps most of its score, even where objects face
    one way (Fashion-MNIST's shoes keep 73% of it)."""

    images: int  # training images scored
    recognised: float  # share of the images whose nearest neighbour is of their class
    mirrors_recognised: float  # the same, for their mirror images

    @property
    def flips_hurt(self) -> bool:
        return self.mirrors_recognised < MIRROR_SHARE * self.recognised

    def describe(self) -> str:
        return (f"a nearest-neighbour check on {self.images} training images recognised "
                f"{self.mirrors_recognised:.0%} of their mirror images against {self.recognised:.0%} of the images")


def _grey_sample(samples: list, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    chosen = rng.choice(len(samples), size=min(count, len(samples)), replace=False)
    images, labels = [], []
    for index in chosen:
        path, label = samples[index]
        try:
            image = load_square(path, CHECK_SIDE)
        except Exception:  # an unreadable image: the data loader reports it; the check does without it
            continue
        images.append(image.reshape(CHECK_SIDE, CHECK_SIDE, -1).astype(np.float32).mean(-1))
        labels.append(str(label))
    return np.stack(images), np.array(labels)


def mirror_check(source: DataSource, sample: int = 3000, seed: int = 0) -> MirrorCheck | None:
    """How much less often mirror images are recognised, from up to `sample` training images, each scored
    against the others; None with fewer than 20 training images (too few to tell)."""
    from sklearn.neighbors import NearestNeighbors

    train = source.splits.get("train", [])
    if len(train) < 20:
        return None
    images, labels = _grey_sample(train, sample, np.random.default_rng(seed))
    count = len(labels)
    index = NearestNeighbors(n_neighbors=2).fit(images.reshape(count, -1))

    def recognised(queries: np.ndarray) -> float:
        """Share whose nearest training image, other than the image itself, has the image's label."""
        _, nearest = index.kneighbors(queries.reshape(count, -1))
        nearest = np.where(nearest[:, 0] == np.arange(count), nearest[:, 1], nearest[:, 0])
        return float((labels[nearest] == labels).mean())

    return MirrorCheck(count, recognised(images), recognised(images[:, :, ::-1]))
