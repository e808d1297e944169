"""Torch views of a Hugging Face split: decode, preprocess, map labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from datasets import Dataset as HFDataset
from torch.utils.data import Dataset

from datamodules.preprocessing import ImagePreprocessor


class ImageClassificationDataset(Dataset):
    """``(pixel_values, label)`` pairs from rows ``indices`` of a Hugging Face split.

    Args:
        data: a split with ``image`` and ``label`` columns.
        preprocess: turns a PIL image into the model input.
        indices: the rows to use (default: all), e.g. the train or validation part.
        label_map: dataset label id -> task label id, where the two orders differ.
    """

    def __init__(
        self,
        data: HFDataset,
        preprocess: ImagePreprocessor,
        indices: Sequence[int] | None = None,
        label_map: np.ndarray | None = None,
    ) -> None:
        self.data = data.select_columns(["image", "label"])
        self.preprocess = preprocess
        self.indices = np.arange(len(data)) if indices is None else np.asarray(indices)
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.indices)

    def _label(self, label: int) -> int:
        return int(self.label_map[label]) if self.label_map is not None else int(label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.data[int(self.indices[index])]
        return self.preprocess(row["image"]), self._label(row["label"])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        # One Arrow read per batch instead of one per sample.
        rows = self.data[[int(self.indices[i]) for i in indices]]
        return [(self.preprocess(image), self._label(label)) for image, label in zip(rows["image"], rows["label"])]


class UnlabeledImageDataset(Dataset):
    """Model inputs only. The label column is dropped when this is built, so nothing
    downstream (test-time adaptation such as AdaMerging) can read a label, even by mistake.
    """

    def __init__(self, data: HFDataset, preprocess: ImagePreprocessor) -> None:
        self.data = data.select_columns(["image"])
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(self.data[int(index)]["image"])

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return [self.preprocess(image) for image in self.data[[int(i) for i in indices]]["image"]]
