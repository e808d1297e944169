"""The merge side's data: every task's test split, one DataLoader per task."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
from datasets import Dataset as HFDataset
from datasets import DatasetDict
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader, rank_zero_only
from torch.utils.data import DataLoader

from common.files import check_output_location
from datamodules.classification import check_holdout, split_train_val
from datamodules.crop_cache import CropCache, cache_key
from datamodules.errors import DataError, check_setting
from datamodules.images import check_image_column, check_images, image_digest
from datamodules.loaders import (
    CheckedDataLoader,
    collate,
    distributed_context,
    evaluates_nothing,
    evaluation_dataloader,
    step_stream_dataloader,
)
from datamodules.preprocessing import ImagePreprocessor, load_image_processor
from datamodules.sources import check_path, checked_label_mapping, get_split, load_task_dataset, split_name
from datamodules.tasks import TaskInfo, get_task
from datamodules.torch_data import (
    CachedImageClassificationDataset,
    ImageClassificationDataset,
    UnlabeledCrops,
    UnlabeledImageDataset,
)

#: The split of unlabelled train images that data-dependent merges (RegMean) read first.
GRAM_SPLIT = "gram"


class MultiTaskDataModule(LightningDataModule):
    """Test splits of several tasks: ``test_dataloader()`` returns one loader per task, in
    the order of ``tasks``, so ``dataloader_idx`` names the task. On several processes each
    test sample is seen exactly once in total (no padding). A task's test split is the one its
    registry entry names (``food101``: the dataset's ``validation`` split).

    With ``val_fraction``, a seeded part of each task's *train* split is held out as a
    ``validation`` split for choosing merge hyper-parameters without looking at the test
    set: ``test_dataloader()`` then returns the validation loaders first, then the test
    loaders (``splits`` names the order), each image read once per split.

    For test-time adaptation (AdaMerging), ``train_dataloader()`` gives the same test images
    *without labels*: the label column is removed before any loader exists.

    With ``gram_images``, ``test_dataloader()`` starts with one more loader per task, the
    ``gram`` split: a seeded subset of that many of the task's *train* images (outside the
    held-out validation rows), *without labels* (the label column is removed before any
    loader exists), for merges that gather statistics of the fine-tuned models' activations
    before merging (RegMean's Gram matrices). On several processes each image is seen once.

    Args:
        tasks: task names, in report order.
        paths: data location per task where it differs from the task's hub id,
            e.g. ``{dtd: /data/dtd}``.
        processor: model id or directory whose image processor defines the preprocessing.
        batch_size: per-device batch for testing.
        num_workers: DataLoader worker processes per device and task.
        adaptation_batch_size: images per task and step for test-time adaptation, over all devices.
        adaptation_seed: seed of the adaptation order.
        val_fraction: share of each task's train split held out as the ``validation`` split
            (None: the test split only). The rows are those ``train.py`` holds out with
            ``data.val_split: holdout`` and the same fraction and seed.
        split_seed: seed of the held-out part.
        adaptation_draw: how each step's adaptation images are drawn, per task: ``stream``
            takes the next ``adaptation_batch_size`` of one seeded stream of shuffles (every
            image once per pass); ``fresh`` the first ``adaptation_batch_size`` of a new seeded
            shuffle every step, as the AdaMerging authors' code does (a new shuffled DataLoader
            per step). Both are the same on any number of devices and resume exactly.
        gram_images: unlabelled train images per task read first, for RegMean's Gram matrices
            (None: no such pass). A task with fewer train images uses all of them.
        gram_seed: seed of the choice of those images.
        crop_cache: a directory for the evaluated splits' preprocessed uint8 crops (None: off),
            e.g. ``outputs/crop_cache``: each split's crops are written there once (its size in
            bytes printed first) and read back without decoding by every later run with the same
            images and preprocessing; the model's inputs are bit for bit the same. Keyed by a hash
            of the images' stored bytes, the split and every preprocessing setting that changes
            pixels (``datamodules.crop_cache``). 150,528 bytes a 224-pixel image.
    """

    def __init__(
        self,
        tasks: list[str],
        paths: dict[str, str] | None = None,
        processor: str = "facebook/convnext-base-224",
        batch_size: int = 128,
        num_workers: int = 2,
        adaptation_batch_size: int = 16,
        adaptation_seed: int = 0,
        val_fraction: float | None = None,
        split_seed: int = 0,
        adaptation_draw: Literal["stream", "fresh"] = "stream",
        gram_images: int | None = None,
        gram_seed: int = 0,
        crop_cache: str | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise DataError("no tasks given: list at least one task to evaluate")
        self.tasks: list[TaskInfo] = [get_task(name) for name in tasks]
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise DataError(f"a task is listed twice: {', '.join(names)}")
        self.paths = {get_task(name).name: path for name, path in (paths or {}).items()}
        unused = set(self.paths) - set(names)
        if unused:
            raise DataError(f"paths given for task(s) not evaluated: {', '.join(sorted(unused))}")
        for task in self.tasks:
            check_path(task, self.paths.get(task.name))
        check_setting(batch_size > 0, "data.batch_size", "a positive integer", batch_size)
        check_setting(num_workers >= 0, "data.num_workers", "0 or more", num_workers)
        check_setting(adaptation_batch_size > 0, "data.adaptation_batch_size", "a positive integer", adaptation_batch_size)
        self.processor = processor
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.adaptation_batch_size = adaptation_batch_size
        self.adaptation_seed = adaptation_seed
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise DataError(f"data.val_fraction must be between 0 and 1 (or null), got {val_fraction}")
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.adaptation_draw = adaptation_draw
        check_setting(gram_images is None or gram_images > 0, "data.gram_images", "a positive integer or null", gram_images)
        self.gram_images = gram_images
        self.gram_seed = gram_seed
        if crop_cache is not None:  # before any data is read, like every output location
            check_output_location(crop_cache, "data.crop_cache")
        self.crop_cache = CropCache(crop_cache) if crop_cache is not None else None
        self._loaded: dict[str, DatasetDict] = {}
        #: (task, split) -> the crop cache's crops file; the checked label mapping
        self._crop_files: dict[tuple[str, str], Path] = {}
        self._label_maps: dict[tuple[str, str], np.ndarray | dict[str, int] | None] = {}

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    @property
    def splits(self) -> list[str]:
        """The splits of ``test_dataloader()``'s loaders, in order: ``gram`` (unlabelled, where
        ``gram_images`` is set), then the evaluated ones."""
        return ([GRAM_SPLIT] if self.gram_images is not None else []) + self.evaluated_splits

    @property
    def evaluated_splits(self) -> list[str]:
        """The labelled splits that are scored."""
        return ["validation", "test"] if self.val_fraction is not None else ["test"]

    @property
    def classnames(self) -> dict[str, list[str]]:
        return {task.name: list(task.classnames) for task in self.tasks}

    @cached_property
    def preprocess(self) -> ImagePreprocessor:
        return ImagePreprocessor.from_processor(load_image_processor(self.processor))

    def _load(self, task: TaskInfo) -> DatasetDict:
        """A task's dataset, loaded once per process (downloaded once per machine)."""
        if task.name not in self._loaded:
            self._loaded[task.name] = load_task_dataset(task, self.paths.get(task.name))
        return self._loaded[task.name]

    @cached_property
    def test_splits(self) -> dict[str, HFDataset]:
        return {task.name: get_split(self._load(task), "test", task, self.paths.get(task.name)) for task in self.tasks}

    def prepare_data(self) -> None:
        """Load every task's dataset and, with ``crop_cache``, write the evaluated splits' crops the
        cache lacks (on one process per node, before any process builds its loaders)."""
        if evaluates_nothing(self.trainer):
            return
        for task in self.tasks:
            self._load(task)
        fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING  # adaptation reads no crops
        if self.crop_cache is not None and not fitting:
            self._prepare_crops()

    def setup(self, stage: str | None = None) -> None:
        """Build (and so check: labels, images) every split the stage reads, before the model is
        merged or anything is written; a run that evaluates nothing reads nothing."""
        if evaluates_nothing(self.trainer):
            return
        if stage in ("test", None):
            self.evaluation_datasets  # noqa: B018  (a cached property: built here, once)
            if self.gram_images is not None:
                self.gram_datasets  # noqa: B018
        if stage in ("fit", None):
            self.adaptation_datasets  # noqa: B018

    def _where(self, task: TaskInfo, split: str) -> str:
        """``split`` (``train`` or ``test``) as messages name it: the dataset's own name for it."""
        name = split_name(self._load(task), split, task)
        return f"task '{task.name}', path '{self.paths.get(task.name) or task.hub_dataset or 'built-in'}', split '{name}'"

    def _train_split(self, task: TaskInfo) -> HFDataset:
        return get_split(self._load(task), "train", task, self.paths.get(task.name))

    def _split_rows(self, task: TaskInfo, split: str) -> tuple[HFDataset, np.ndarray | None, str]:
        """An evaluated split's dataset, its rows (None: all) and its name in messages."""
        if split == "test":
            return self.test_splits[task.name], None, self._where(task, "test")
        data = self._train_split(task)  # validation: the held-out rows of train
        check_holdout(len(data), self.val_fraction, self._where(task, "train"), keeps_train=self.gram_images is not None)
        _, rows = split_train_val(len(data), self.val_fraction, self.split_seed)
        return data, rows, self._where(task, "train")

    def _label_mapping(self, task: TaskInfo, split: str) -> np.ndarray | dict[str, int] | None:
        """``checked_label_mapping`` of an evaluated split, once per process (it may print a line)."""
        if (task.name, split) not in self._label_maps:
            data, _, where = self._split_rows(task, split)
            self._label_maps[(task.name, split)] = checked_label_mapping(data, task, where)
        return self._label_maps[(task.name, split)]

    def _dataset(self, task: TaskInfo, split: str) -> ImageClassificationDataset:
        data, rows, where = self._split_rows(task, split)
        mapping = self._label_mapping(task, split)
        if self.crop_cache is not None:
            self._prepare_crops()
            return CachedImageClassificationDataset(
                self._crop_files[(task.name, split)], data, self.preprocess, rows, mapping, where
            )
        check_images(data, where, rows)
        return ImageClassificationDataset(data, self.preprocess, rows, mapping, where)

    def _crop_key(self, task: TaskInfo, split: str) -> dict:
        """The crop cache's key of an evaluated split (``datamodules.crop_cache.cache_key``)."""
        data, rows, where = self._split_rows(task, split)
        check_image_column(data, where)
        rows = np.arange(len(data)) if rows is None else rows
        digest = image_digest(data, rows)
        mode = data.features["image"].mode
        return cache_key(task.name, split, digest, mode, self.preprocess.pixel_settings, self.preprocess.output_size, len(rows))

    def _prepare_crops(self) -> None:
        """Every evaluated split's crops file: read from the cache where it has the split's key;
        the others written, after every split's labels and, for those to write, images are checked
        (so a bad image in the last task stops the run before anything is written). Once per
        process. A split found in the cache is not checked image by image (``check_images``): its
        stored bytes are those that were decoded, whole, when the entry was written."""
        missing = []
        for split in self.evaluated_splits:
            for task in self.tasks:
                if (task.name, split) in self._crop_files:
                    continue
                self._label_mapping(task, split)
                key = self._crop_key(task, split)
                crops = self.crop_cache.read(key)
                if crops is None:
                    data, rows, where = self._split_rows(task, split)
                    check_images(data, where, rows)  # every image readable, or one error naming it
                    missing.append((task, split, key))
                    continue
                _say(
                    f"crop cache: reading the {key['images']:,} crops of task '{task.name}', split '{split}' from '{crops.parent}'"
                )
                self._crop_files[(task.name, split)] = crops
        for task, split, key in missing:
            data, rows, where = self._split_rows(task, split)
            images = UnlabeledCrops(data, self.preprocess, rows, where)
            loader = CheckedDataLoader(images, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate)
            self._crop_files[(task.name, split)] = self.crop_cache.write(key, (batch.numpy() for batch in loader))

    @cached_property
    def evaluation_datasets(self) -> dict[str, dict[str, ImageClassificationDataset]]:
        """split -> task -> dataset, for every split of ``evaluated_splits``."""
        return {split: {task.name: self._dataset(task, split) for task in self.tasks} for split in self.evaluated_splits}

    def gram_rows(self, num_rows: int) -> np.ndarray:
        """Sorted rows of the train split read by the Gram pass: ``gram_images`` of the rows
        outside the validation part, drawn with ``gram_seed``."""
        rows = np.arange(num_rows)
        if self.val_fraction is not None:  # the validation rows stay unseen until they are scored
            rows, _ = split_train_val(num_rows, self.val_fraction, self.split_seed)
        return np.sort(np.random.default_rng(self.gram_seed).permutation(rows)[: self.gram_images])

    @cached_property
    def gram_datasets(self) -> dict[str, UnlabeledImageDataset]:
        """task -> the unlabelled train images of the ``gram`` split (``gram_images`` set)."""
        datasets = {}
        for task in self.tasks:
            data, where = self._train_split(task), self._where(task, "train")
            rows = self.gram_rows(len(data))
            check_images(data, where, rows)
            datasets[task.name] = UnlabeledImageDataset(data, self.preprocess, rows, where)
        return datasets

    @property
    def test_datasets(self) -> dict[str, ImageClassificationDataset]:
        return self.evaluation_datasets["test"]

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per split of ``splits`` and task, in that order."""
        gram = [self.gram_datasets[name] for name in self.task_names] if self.gram_images is not None else []
        labelled = [self.evaluation_datasets[split][name] for split in self.evaluated_splits for name in self.task_names]
        return [evaluation_dataloader(data, self.batch_size, self.num_workers, self.trainer) for data in gram + labelled]

    @cached_property
    def adaptation_datasets(self) -> dict[str, UnlabeledImageDataset]:
        """task -> the unlabelled test images of test-time adaptation, checked."""
        return {task.name: self._adaptation_dataset(task) for task in self.tasks}

    def train_dataloader(self) -> CombinedLoader:
        """Unlabelled test images for test-time adaptation: each step one batch of every task.

        Every task's order is seeded and shared by all devices (``StepStreamSampler``), so a
        step sees the same images whatever the device count.
        """
        _, world_size = distributed_context(self.trainer)
        if self.adaptation_batch_size % world_size:
            raise DataError(f"adaptation_batch_size {self.adaptation_batch_size} does not split over {world_size} devices")
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        if max_steps is None or max_steps <= 0:
            raise DataError("test-time adaptation counts steps: set trainer.max_steps")
        loaders = {
            task.name: step_stream_dataloader(
                self.adaptation_datasets[task.name],
                self.adaptation_batch_size,
                self.adaptation_batch_size // world_size,
                max_steps,
                self.adaptation_seed + index,
                self.num_workers,
                self.trainer,
                fresh_draws=self.adaptation_draw == "fresh",
            )
            for index, task in enumerate(self.tasks)
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _adaptation_dataset(self, task: TaskInfo) -> UnlabeledImageDataset:
        data, where = self.test_splits[task.name], self._where(task, "test")
        check_images(data, where)
        dataset = UnlabeledImageDataset(data, self.preprocess, where=where)
        if self.adaptation_draw == "fresh" and self.adaptation_batch_size > len(dataset):
            raise DataError(
                f"adaptation_batch_size {self.adaptation_batch_size} exceeds the {len(dataset)} test images of "
                f"task '{task.name}': a fresh draw takes distinct images"
            )
        return dataset


@rank_zero_only
def _say(line: str) -> None:
    print(line, flush=True)
