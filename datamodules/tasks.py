"""The task registry: the 24 image-classification tasks FusionBench's ConvNeXt pool knows, the
benchmarks as named task sets, and the offline quickstart tasks.

Each hub task knows where its data lives on the Hugging Face hub (id, config, the names of its
train and test splits, its columns where they are not ``image`` and ``label``) and its class
names, in label order. The entries are the project's own copy (``classnames/<task>.json``), so a
user's fresh clone needs nothing else.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.names import task_key
from datamodules.builtin import SHAPE_NAMES
from datamodules.errors import DataError

_CLASSNAMES_DIR = Path(__file__).parent / "classnames"

#: The eight tasks of the task-arithmetic benchmark, in the order papers report them.
TA8_TASKS = ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
#: TALL14 = the eight and these six; TALL20 = TALL14 and the next six (Wang et al., 2024).
_TALL14_ADDED = ("oxford_flowers102", "pcam", "fer2013", "oxford_iiit_pet", "stl10", "cifar100")
_TALL20_ADDED = ("cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered_sst2")

#: The benchmarks, by name: each a task set in report order, each the one before it and more.
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "ta8": TA8_TASKS,
    "tall14": TA8_TASKS + _TALL14_ADDED,
    "tall20": TA8_TASKS + _TALL14_ADDED + _TALL20_ADDED,
}
#: The eight tasks, used wherever the project says "the benchmark" without naming one.
BENCHMARK_TASKS = BENCHMARKS["ta8"]
#: Every hub task of the registry: TALL20 and four more datasets FusionBench's ConvNeXt pool
#: sizes a head for (``dataset_name``), in none of the benchmarks.
FUSIONBENCH_TASKS = BENCHMARKS["tall20"] + ("emnist_mnist", "cub_200_2011", "tiny_imagenet", "mango_leaf_disease")
#: Offline tasks (data inside PyPI packages, or drawn): they never touch the network.
QUICKSTART_TASKS = ("digits", "mnist5k", "shapes")

_DIGIT_NAMES = tuple(str(i) for i in range(10))

#: What a hub dataset's label column holds: a ``ClassLabel``, class numbers, or booleans
#: (``False`` is ``classnames[0]``, ``True`` ``classnames[1]``).
LabelType = Literal["class_label", "int", "bool"]


@dataclass(frozen=True)
class TaskInfo:
    """What the project knows about one task.

    Attributes:
        name: registry name (``stanford_cars``); ``hub_name`` is the spelling of the public checkpoints.
        classnames: class names in label order.
        hub_dataset: Hugging Face dataset id, or None for a built-in offline task.
        hub_config: dataset config name on the hub (``svhn`` uses ``cropped_digits``).
        train_split: the dataset's split that is the task's train split.
        test_split: the dataset's split that is the task's test split (``food101``: ``validation``).
        image_column: the dataset's column of images, renamed ``image`` when read (``fer2013``: ``jpg``).
        label_column: the dataset's column of labels, renamed ``label`` when read (``fer2013``: ``cls``).
        drop_columns: the dataset's columns that are dropped when read (``fer2013``: ``__key__``, ``__url__``).
        label_type: what the hub dataset's label column holds; only a task that says ``bool`` (``pcam``)
            reads a boolean label column.
    """

    name: str
    classnames: tuple[str, ...]
    hub_dataset: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    drop_columns: tuple[str, ...] = ()
    label_type: LabelType = "class_label"

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def hub_name(self) -> str:
        """The task as spelled in the public checkpoint ids (``stanford-cars``)."""
        return self.name.replace("_", "-")

    @property
    def benchmarks(self) -> tuple[str, ...]:
        """The benchmarks that hold this task (``ta8``, ``tall14``, ``tall20``), smallest first."""
        return tuple(name for name, tasks in BENCHMARKS.items() if self.name in tasks)

    def split_name(self, role: str) -> str:
        """The dataset's name of the task's ``train`` or ``test`` split (another name: itself)."""
        return {"train": self.train_split, "test": self.test_split}.get(role, role)


def _load_hub_task(name: str) -> TaskInfo:
    entry = json.loads((_CLASSNAMES_DIR / f"{name}.json").read_text(encoding="utf-8"))
    columns = entry.get("columns", {})
    return TaskInfo(
        name,
        tuple(entry["classnames"]),
        entry["hub_dataset"],
        entry["hub_config"],
        train_split=entry.get("train_split", "train"),
        test_split=entry.get("test_split", "test"),
        image_column=columns.get("image", "image"),
        label_column=columns.get("label", "label"),
        drop_columns=tuple(columns.get("drop", ())),
        label_type=entry.get("label_type", "class_label"),
    )


TASKS: dict[str, TaskInfo] = {name: _load_hub_task(name) for name in FUSIONBENCH_TASKS}
TASKS.update({name: TaskInfo(name, _DIGIT_NAMES) for name in ("digits", "mnist5k")})
TASKS["shapes"] = TaskInfo("shapes", SHAPE_NAMES)


def get_task(name: str) -> TaskInfo:
    """Look a task up by name; an unknown name lists the known ones and the closest match."""
    key = task_key(name)
    if key in TASKS:
        return TASKS[key]
    close = difflib.get_close_matches(key, TASKS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DataError(f"unknown task '{name}'.{hint} Known tasks: {', '.join(TASKS)}")


def get_benchmark(name: str) -> tuple[str, ...]:
    """A benchmark's tasks by its name (``tall20``, ``TALL20``); an unknown name lists the known ones."""
    key = task_key(name)
    if key in BENCHMARKS:
        return BENCHMARKS[key]
    raise DataError(f"unknown benchmark '{name}'. Known benchmarks: {', '.join(BENCHMARKS)}")
