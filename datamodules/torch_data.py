"""Torch views of a Hugging Face split: decode, preprocess, map labels.

An image that fails when it is decoded or preprocessed (data broken inside a file, which
``datamodules.images.check_images`` cannot see without decoding) is a ``DataError`` naming its
split and its file or row. In a DataLoader, the only caller of ``__getitems__``, it comes back
as an ``UnreadableBatch`` that the loader raises in the main process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset as HFDataset
from PIL import Image
from torch.utils.data import Dataset

from datamodules.errors import DataError
from datamodules.images import UnreadableBatch, unreadable
from datamodules.preprocessing import ImagePreprocessor


class ImageClassificationDataset(Dataset):
    """``(pixel_values, label)`` pairs from rows ``indices`` of a Hugging Face split.

    Args:
        data: a split with ``image`` and ``label`` columns.
        preprocess: turns a PIL image into the model input.
        indices: the rows to use (default: all), e.g. the train or validation part.
        label_map: dataset label id -> task label id, where the two orders differ.
        where: the split, as error messages name it (``task 'dtd', path '...', split 'train'``).
    """

    def __init__(
        self,
        data: HFDataset,
        preprocess: ImagePreprocessor,
        indices: Sequence[int] | None = None,
        label_map: np.ndarray | None = None,
        where: str = "dataset",
    ) -> None:
        self.data = data.select_columns(["image", "label"])
        self.preprocess = preprocess
        self.indices = np.arange(len(data)) if indices is None else np.asarray(indices)
        self.label_map = label_map
        self.where = where

    def __len__(self) -> int:
        return len(self.indices)

    def _label(self, label: int) -> int:
        return int(self.label_map[label]) if self.label_map is not None else int(label)

    def _sample(self, row: int) -> tuple[torch.Tensor, int]:
        try:
            item = self.data[row]
            pixels = self.preprocess(item["image"])
        except Exception as error:  # whatever decoding or converting this row's image raised
            raise DataError(unreadable(self.data, row, self.where, error)) from error
        return pixels, self._label(item["label"])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._sample(int(self.indices[index]))

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]] | UnreadableBatch:
        rows = [int(self.indices[i]) for i in indices]
        try:  # one Arrow read per batch instead of one per sample
            batch = self.data[rows]
            return [(self.preprocess(image), self._label(label)) for image, label in zip(batch["image"], batch["label"])]
        except Exception:  # find the row that failed
            try:
                return [self._sample(row) for row in rows]
            except DataError as error:
                return UnreadableBatch(str(error))


class UnlabeledImageDataset(Dataset):
    """Model inputs only, from rows ``indices`` of a split. The label column is dropped when this
    is built, so nothing downstream (test-time adaptation such as AdaMerging) can read a label,
    even by mistake.

    Args:
        data: a split with an ``image`` column.
        preprocess: turns a PIL image into the model input.
        indices: the rows to use (default: all).
        where: the split, as error messages name it.
    """

    def __init__(
        self, data: HFDataset, preprocess: ImagePreprocessor, indices: Sequence[int] | None = None, where: str = "dataset"
    ) -> None:
        self.data = data.select_columns(["image"])
        self.preprocess = preprocess
        self.indices = np.arange(len(data)) if indices is None else np.asarray(indices)
        self.where = where

    def __len__(self) -> int:
        return len(self.indices)

    def _input(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)

    def _sample(self, row: int) -> torch.Tensor:
        try:
            return self._input(self.data[row]["image"])
        except Exception as error:  # whatever decoding or converting this row's image raised
            raise DataError(unreadable(self.data, row, self.where, error)) from error

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._sample(int(self.indices[index]))

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor] | UnreadableBatch:
        rows = [int(self.indices[i]) for i in indices]
        try:  # one Arrow read per batch instead of one per sample
            return [self._input(image) for image in self.data[rows]["image"]]
        except Exception:  # find the row that failed
            try:
                return [self._sample(row) for row in rows]
            except DataError as error:
                return UnreadableBatch(str(error))


class UnlabeledCrops(UnlabeledImageDataset):
    """The uint8 crops (``(height, width, 3)``, before normalisation) of rows ``indices`` of a
    split, as the crop cache stores them (``ImagePreprocessor.to_uint8_array``); the cache is
    written from these."""

    def _input(self, image: Image.Image) -> np.ndarray:
        return self.preprocess.to_uint8_array(image)


class CachedImageClassificationDataset(ImageClassificationDataset):
    """``ImageClassificationDataset``'s ``(pixel_values, label)`` pairs with the pixels read from the
    crop cache instead of decoded: item ``i`` is crop ``i`` of ``crops`` (an ``.npy`` array of
    ``(len(indices), height, width, 3)`` uint8 crops of the same rows, in the same order), normalised
    by ``preprocess.normalize`` through the view a decoded crop gets (``ImagePreprocessor.array_to_tensor``):
    the same computation on the same pixels, so the same floats. No image is decoded; labels are
    read from the split's label column once.

    Args:
        crops: the entry's crops file (``datamodules.crop_cache.CropCache.read``).
        data: a split with ``image`` and ``label`` columns.
        preprocess: whose ``normalize`` makes a crop the model input.
        indices: the rows of ``data`` whose crops ``crops`` holds (default: all).
        label_map: dataset label id -> task label id, where the two orders differ.
        where: the split, as error messages name it.
    """

    def __init__(
        self,
        crops: str | Path,
        data: HFDataset,
        preprocess: ImagePreprocessor,
        indices: Sequence[int] | None = None,
        label_map: np.ndarray | None = None,
        where: str = "dataset",
    ) -> None:
        super().__init__(data, preprocess, indices, label_map, where)
        self.crops_file = str(crops)
        labels = data.select_columns(["label"]).with_format("numpy")[:]["label"]
        self.labels = np.asarray(labels)[self.indices]
        self._crops: np.ndarray | None = None  # mapped by each process that reads (a DataLoader worker)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_crops": None}  # a worker maps the file itself instead of a copy

    def _mapped(self) -> np.ndarray:
        if self._crops is None:
            self._crops = np.load(self.crops_file, mmap_mode="r")
        return self._crops

    def _pixels(self, crop: np.ndarray) -> torch.Tensor:
        return self.preprocess.normalize(self.preprocess.array_to_tensor(crop))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._pixels(np.array(self._mapped()[index])), self._label(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        crops = np.asarray(self._mapped()[np.asarray(indices)])  # one read of the batch's rows, a copy
        return [(self._pixels(crop), self._label(self.labels[index])) for crop, index in zip(crops, indices)]
