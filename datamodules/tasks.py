"""The task registry: the eight benchmark tasks plus two offline quickstart tasks.

Each task knows where its data lives on the Hugging Face hub and its class names,
in label order. The names are the project's own copy (``classnames/*.json``), so a
user's fresh clone needs nothing else.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from common.names import task_key
from datamodules.builtin import SHAPE_NAMES
from datamodules.errors import DataError

_CLASSNAMES_DIR = Path(__file__).parent / "classnames"

#: The eight tasks of the benchmark, in the order papers report them.
BENCHMARK_TASKS = ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
#: Offline tasks (data inside PyPI packages, or drawn): they never touch the network.
QUICKSTART_TASKS = ("digits", "mnist5k", "shapes")

_DIGIT_NAMES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class TaskInfo:
    """What the project knows about one task.

    Attributes:
        name: registry name (``stanford_cars``); ``hub_name`` is the spelling of the public checkpoints.
        classnames: class names in label order.
        hub_dataset: Hugging Face dataset id, or None for a built-in offline task.
        hub_config: dataset config name on the hub (``svhn`` uses ``cropped_digits``).
    """

    name: str
    classnames: tuple[str, ...]
    hub_dataset: str | None = None
    hub_config: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def hub_name(self) -> str:
        """The task as spelled in the public checkpoint ids (``stanford-cars``)."""
        return self.name.replace("_", "-")


def _load_benchmark_task(name: str) -> TaskInfo:
    entry = json.loads((_CLASSNAMES_DIR / f"{name}.json").read_text())
    return TaskInfo(name, tuple(entry["classnames"]), entry["hub_dataset"], entry["hub_config"])


TASKS: dict[str, TaskInfo] = {name: _load_benchmark_task(name) for name in BENCHMARK_TASKS}
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
