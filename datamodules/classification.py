"""The LightningDataModule for one task: train/val/test splits of a Hugging Face dataset."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

import numpy as np
from datasets import DatasetDict
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.errors import DataError, check_setting
from datamodules.images import check_images
from datamodules.loaders import distributed_context, evaluation_dataloader, step_stream_dataloader
from datamodules.preprocessing import ImagePreprocessor, load_image_processor
from datamodules.sources import check_path, checked_label_mapping, get_split, load_task_dataset, split_name
from datamodules.tasks import TaskInfo, get_task
from datamodules.torch_data import ImageClassificationDataset


def split_train_val(num_samples: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices of the train and validation parts, from a permutation seeded by ``seed``."""
    order = np.random.default_rng(seed).permutation(num_samples)
    num_val = round(num_samples * val_fraction)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def _fraction_for(num_rows: int, num_val: int) -> str:
    """The shortest fraction that ``split_train_val`` turns into ``num_val`` of ``num_rows`` rows."""
    for digits in range(1, 16):
        text = f"{num_val / num_rows:.{digits}g}"
        if round(num_rows * float(text)) == num_val:
            return text
    return repr(num_val / num_rows)


def check_holdout(num_rows: int, val_fraction: float, where: str, keeps_train: bool = True) -> None:
    """``val_fraction`` of ``num_rows`` training rows (as ``split_train_val`` rounds it) must hold
    out at least one row and, with ``keeps_train``, leave at least one to train on; otherwise a
    ``DataError`` names ``data.val_fraction`` and the fraction that would.

    Args:
        num_rows: rows of the train split.
        val_fraction: the share held out.
        where: the split, as error messages name it.
        keeps_train: the rows left over are used (for training, or a Gram pass).
    """
    num_val = round(num_rows * val_fraction)
    if num_val > 0 and (num_val < num_rows or not keeps_train):
        return
    if num_rows < (2 if keeps_train else 1):
        raise DataError(f"{where}: {num_rows} training row(s) are too few to hold out a validation part")
    if num_val == 0:
        raise DataError(
            f"{where}: data.val_fraction {val_fraction:g} holds out no row of the {num_rows} training rows "
            f"(round({num_rows} x {val_fraction:g}) = 0): it must be at least {_fraction_for(num_rows, 1)} to hold out one"
        )
    raise DataError(
        f"{where}: data.val_fraction {val_fraction:g} holds out all {num_rows} training rows, leaving none: "
        f"it must be at most {_fraction_for(num_rows, num_rows - 1)} to keep one"
    )


#: Where validation images come from: the task's ``test`` split (the reference recipe), a
#: seeded part of ``train`` held out from training, or nowhere.
ValSplit = Literal["test", "holdout", "none"]


class ImageClassificationDataModule(LightningDataModule):
    """One task of the benchmark: training images, validation images and the ``test`` split.

    ``train`` and ``test`` are the task's own splits of that name, or the ones its registry entry
    names instead (``food101`` tests on its ``validation`` split, ``tiny_imagenet`` on ``valid``).
    The reference recipe trains on every row of ``train`` and validates on ``test``
    (``val_split: test``); ``val_split: holdout`` trains on ``train`` minus a seeded
    ``val_fraction`` and validates on that part, the honest split for choosing
    hyper-parameters; ``val_split: none`` trains on all of ``train`` and never validates.

    Args:
        task: registry name, e.g. ``dtd``, ``stanford_cars`` or the offline ``digits``.
        path: where the data is: a hub dataset id (default: the task's own), a ``save_to_disk``
            folder, or a local folder of parquet files or of images (``<split>/<class>/<file>``).
        processor: model id or directory whose image processor defines the preprocessing.
        batch_size: global training batch per optimizer step. Each device gets
            ``batch_size / (devices * nodes * accumulate_grad_batches)``.
        eval_batch_size: per-device batch for validation and test (default: the per-device
            training batch).
        num_workers: DataLoader worker processes per device.
        val_split: where validation images come from: ``test`` (the task's test split, as
            the reference recipe), ``holdout`` (``val_fraction`` of train, held out from
            training) or ``none`` (no validation; all of train is trained on).
        val_fraction: share of the train split held out for validation with ``val_split: holdout``.
        split_seed: seed of the held-out part with ``val_split: holdout``.
        shuffle_seed: seed of the training order (independent of the global seed, so a resumed
            run sees exactly the samples an uninterrupted one would).
    """

    def __init__(
        self,
        task: str,
        path: str | None = None,
        processor: str = "facebook/convnext-base-224",
        *,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        val_split: ValSplit = "test",
        val_fraction: float = 0.1,
        split_seed: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        self.task: TaskInfo = get_task(task)
        check_path(self.task, path)
        if val_split not in ("test", "holdout", "none"):
            raise DataError(f"val_split must be test, holdout or none, got {val_split!r}")
        if val_split == "holdout" and not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must be between 0 and 1 for val_split holdout, got {val_fraction}")
        check_setting(batch_size > 0, "data.batch_size", "a positive integer", batch_size)
        check_setting(
            eval_batch_size is None or eval_batch_size > 0, "data.eval_batch_size", "a positive integer or null", eval_batch_size
        )
        check_setting(num_workers >= 0, "data.num_workers", "0 or more", num_workers)
        self.path = path
        self.processor = processor
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.datasets: dict[str, ImageClassificationDataset] = {}

    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    @property
    def classnames(self) -> list[str]:
        return list(self.task.classnames)

    @cached_property
    def image_processor(self) -> Any:
        """The Hugging Face image processor named by ``processor`` (saved with exports)."""
        return load_image_processor(self.processor)

    @cached_property
    def preprocess(self) -> ImagePreprocessor:
        return ImagePreprocessor.from_processor(self.image_processor)

    @cached_property
    def _dataset(self) -> DatasetDict:
        return load_task_dataset(self.task, self.path)

    @property
    def _where(self) -> str:
        return f"task '{self.task.name}', path '{self.path or self.task.hub_dataset or 'built-in'}'"

    def prepare_data(self) -> None:
        # Downloads once per machine; setup() on every other process then reads the local cache.
        # This process keeps what it loaded instead of loading it again in setup().
        self._dataset = load_task_dataset(self.task, self.path)

    def _make(self, split: str, indices: np.ndarray | None = None) -> ImageClassificationDataset:
        """Rows ``indices`` of ``split`` (``train`` or ``test``), their labels and images checked (in
        setup: before anything is written)."""
        data = get_split(self._dataset, split, self.task, self.path)
        where = f"{self._where}, split '{split_name(self._dataset, split, self.task)}'"
        mapping = checked_label_mapping(data, self.task, where)
        check_images(data, where, indices)
        return ImageClassificationDataset(data, self.preprocess, indices, mapping, where)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and "train" not in self.datasets:
            self._setup_train_and_val()
        if stage in ("test", None) and "test" not in self.datasets:
            self.datasets["test"] = self._make("test")

    def _setup_train_and_val(self) -> None:
        if self.val_split != "holdout":
            self.datasets["train"] = self._make("train")
            if self.val_split == "test":
                if "test" not in self.datasets:
                    self.datasets["test"] = self._make("test")
                self.datasets["val"] = self.datasets["test"]
            return
        num_train = len(get_split(self._dataset, "train", self.task, self.path))
        check_holdout(num_train, self.val_fraction, f"{self._where}, split '{self._split_name('train')}'")
        train_rows, val_rows = split_train_val(num_train, self.val_fraction, self.split_seed)
        self.datasets["train"] = self._make("train", train_rows)
        self.datasets["val"] = self._make("train", val_rows)

    def _split_name(self, role: str) -> str:
        """The dataset's name of the ``train`` or ``test`` split (before loading: the registry's)."""
        if "_dataset" in self.__dict__:  # loaded: the split actually read
            return split_name(self._dataset, role, self.task)
        return self.task.split_name(role)

    @property
    def recipe(self) -> dict[str, str | int]:
        """What the model card says about the data: training split, its size, validation split."""
        train, test = self._split_name("train"), self._split_name("test")
        if self.val_split == "holdout":
            held_out = f"{self.val_fraction:g} of {train} held out (seed {self.split_seed})"
            training, validation = f"{train} minus {held_out}", held_out
        else:
            training, validation = f"{train} (every row)", test if self.val_split == "test" else "none"
        recipe: dict[str, str | int] = {"training split": training}
        if "train" in self.datasets:
            recipe["training images"] = len(self.datasets["train"])
        recipe["validation split"] = validation
        return recipe

    def _per_device_batch(self) -> tuple[int, int]:
        """``(micro-batch per device, global batch per device and step)``."""
        _, world_size = distributed_context(self.trainer)
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        if self.batch_size % (world_size * accumulate):
            raise DataError(
                f"global batch_size {self.batch_size} does not split into {world_size} device(s) x "
                f"{accumulate} accumulated batch(es)"
            )
        per_step = self.batch_size // world_size
        return per_step // accumulate, per_step

    def _steps_per_epoch(self) -> int:
        """One Lightning epoch spans the whole step-based run, or one pass when only epochs are set."""
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        if max_steps is not None and max_steps > 0:
            return max_steps
        steps = len(self.datasets["train"]) // self.batch_size
        if steps == 0:
            raise DataError(f"{self._where}: fewer training samples than one global batch of {self.batch_size}")
        return steps

    def train_dataloader(self) -> DataLoader:
        micro_batch, _ = self._per_device_batch()
        return step_stream_dataloader(
            self.datasets["train"],
            self.batch_size,
            micro_batch,
            self._steps_per_epoch(),
            self.shuffle_seed,
            self.num_workers,
            self.trainer,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        batch = self.eval_batch_size or self._per_device_batch()[0]
        return evaluation_dataloader(self.datasets[split], batch, self.num_workers, self.trainer)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # No loader, no validation: Lightning skips the loop for an empty list.
        return self._eval_loader("val") if self.val_split != "none" else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
