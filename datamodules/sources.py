"""Find a task's data (hub id, local folder or built-in) and check it before use.

Every source ends as a ``datasets.DatasetDict`` with ``image`` and ``label`` columns, read
through one code path: ``load_from_disk`` for a ``save_to_disk`` folder, ``load_dataset``
for everything else (a hub id, or a local folder of parquet files or an image folder). A task
whose dataset names its columns otherwise (``fer2013``: ``jpg``, ``cls``) has them renamed
here, and its own split names (``food101`` tests on ``validation``) are looked up by
``get_split``, so a local copy of the hub dataset reads like the hub dataset.
"""

from __future__ import annotations

import difflib
import unicodedata
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value, load_dataset, load_from_disk
from lightning.pytorch.utilities import rank_zero_only

from common.names import plain_label
from datamodules.builtin import build_builtin_dataset
from datamodules.errors import DataError
from datamodules.tasks import TaskInfo

REQUIRED_COLUMNS = ("image", "label")


def _looks_local(path: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else is meant as a local path."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def check_path(task: TaskInfo, path: str | None) -> None:
    """A path meant as local must exist (checked before any model or data is loaded)."""
    if path and _looks_local(path) and not Path(path).expanduser().exists():
        raise DataError(f"task '{task.name}', path '{path}': the path does not exist")


def load_task_dataset(task: TaskInfo, path: str | None = None) -> DatasetDict:
    """Load all splits of ``task`` from ``path`` (default: the task's hub id)."""
    check_path(task, path)
    path = path or task.hub_dataset  # None: a built-in task
    if path is None:
        return build_builtin_dataset(task.name, task.classnames)
    where = f"task '{task.name}', path '{path}'"
    local = Path(path).expanduser()
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            loaded = load_from_disk(str(local))
        elif local.is_dir():
            loaded = load_dataset(str(local))
        else:
            loaded = load_dataset(path, task.hub_config)
    except Exception as error:  # any loader failure becomes one line naming task and path
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{where}: cannot load the dataset ({type(error).__name__}: {message})") from error
    if isinstance(loaded, Dataset):
        splits = f"'{task.train_split}' and '{task.test_split}'"
        raise DataError(f"{where}: holds a single split; expected a dataset with {splits} splits")
    return DatasetDict({name: standard_columns(data, task) for name, data in loaded.items()})


def standard_columns(data: Dataset, task: TaskInfo) -> Dataset:
    """``data`` with the task's own image and label columns renamed ``image`` and ``label`` (where
    those are absent) and the columns it drops removed (where present); other data as it is."""
    renames = {
        own: standard
        for own, standard in ((task.image_column, "image"), (task.label_column, "label"))
        if own != standard and own in data.column_names and standard not in data.column_names
    }
    dropped = [column for column in task.drop_columns if column in data.column_names and column not in renames]
    if dropped:
        data = data.remove_columns(dropped)
    return data.rename_columns(renames) if renames else data


#: The split name that ``load_dataset`` gives a split it finds by file or folder name
#: (``valid-00000-of-00001.parquet``, ``valid/``): ``validation``.
_INFERRED_SPLIT_NAMES = {"valid": "validation", "val": "validation", "dev": "validation"}


def _split_candidates(role: str, task: TaskInfo) -> list[str]:
    own = task.split_name(role)
    return list(dict.fromkeys(name for name in (own, _INFERRED_SPLIT_NAMES.get(own), role) if name))


def split_name(dataset: DatasetDict, role: str, task: TaskInfo) -> str:
    """The split of ``dataset`` that is the task's ``role`` (``train`` or ``test``): the task's own
    name for it (``food101``'s test split is ``validation``, ``tiny_imagenet``'s ``valid``); in a
    local copy without it, the name ``load_dataset`` gives that split when it finds it by file
    name (``valid`` -> ``validation``) or else the role itself (a copy written as ``train``/``test``)."""
    candidates = _split_candidates(role, task)
    return next((name for name in candidates if name in dataset), candidates[0])


def get_split(dataset: DatasetDict, split: str, task: TaskInfo, path: str | None) -> Dataset:
    """One split, checked: present, non-empty, with ``image`` and ``label`` columns. ``split`` is
    the task's ``train`` or ``test`` (found by ``split_name``) or any other split's name."""
    where = f"task '{task.name}', path '{path or task.hub_dataset or 'built-in'}'"
    own, *others = _split_candidates(split, task)
    split = split_name(dataset, split, task)
    if split not in dataset:
        nor = f", nor {' or '.join(map(repr, others))}" if others else ""
        raise DataError(f"{where}: no '{own}' split{nor} (found: {', '.join(dataset) or 'none'})")
    data = dataset[split]
    missing = [column for column in REQUIRED_COLUMNS if column not in data.column_names]
    if missing:
        raise DataError(
            f"{where}, split '{split}': missing column(s) {', '.join(missing)} (found: {', '.join(data.column_names)})"
        )
    if len(data) == 0:
        raise DataError(f"{where}: split '{split}' is empty")
    return data


def folder_name(classname: str) -> str:
    """The folder spelling of a class name: ``/`` cannot be in a folder name, ``_`` stands for it."""
    return classname.replace("/", "_")


def spelling_key(name: object) -> str:
    """A class name's letters and digits only, case folded: the spellings a dataset's own names
    differ from ours by (``T-shirt/top`` and ``T - shirt / top``, ``cheese_plate`` and
    ``cheese plate``, ``Polka dotted`` and ``polka-dotted``) all give one key."""
    return "".join(char for char in unicodedata.normalize("NFKC", str(name)).casefold() if char.isalnum())


def class_index(task: TaskInfo) -> dict[str, int]:
    """Every accepted spelling (see ``plain_label``, ``folder_name``, ``spelling_key``) of the task's
    class names -> label. Within a task no two class names share a spelling
    (``tests/test_tasks.py``), so a key names one class."""
    index = {}
    for label, name in enumerate(task.classnames):
        index[plain_label(name)] = label
        index.setdefault(plain_label(folder_name(name)), label)
    for label, name in enumerate(task.classnames):
        index.setdefault(spelling_key(name), label)
    return index


def lookup_class(index: dict[str, int], name: object) -> int | None:
    """The label of ``name`` in ``class_index``'s ``index``, or None."""
    label = index.get(plain_label(name))
    return index.get(spelling_key(name)) if label is None else label


def _examples(task: TaskInfo) -> str:
    return ", ".join(repr(folder_name(name)) for name in task.classnames[:3]) + ", ..."


def _first(names: list[str] | tuple[str, ...]) -> str:
    """The first three of ``names``, quoted, and ``...`` where there are more."""
    return ", ".join([*map(repr, names[:3]), *(["..."] if len(names) > 3 else [])])


def label_mapping(data: Dataset, task: TaskInfo, where: str) -> np.ndarray | dict[str, int] | None:
    """Map the dataset's labels to the task's class order, where they differ.

    A ``ClassLabel`` whose names are the task's class names, in any spelling (``plain_label``,
    ``spelling_key``), is matched by name: where the two orders agree, as the registry's
    follow each dataset's own (``food101``'s labels 16 and 17), that is the identity. A partial
    match (a misspelt folder) is an error rather than silently wrong labels. An image folder
    numbers its classes alphabetically by folder name (``10`` before ``2``), so there the
    folders must be the class names or all class numbers (matched by value), nothing else.
    Other sources' names that match none (``tiny_imagenet``'s WordNet ids, generic names) keep
    their integer labels, with one line saying so, if there are as many as the task's classes.
    A label column of strings must hold class names: the result then maps each to its label.
    Integers are class numbers; booleans (``pcam``) are 0 and 1, for a task that says it has them.
    """
    feature = data.features["label"]
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return _string_label_mapping(data, task, where)
    if isinstance(feature, Value) and feature.dtype == "bool":
        if task.label_type != "bool":
            raise DataError(
                f"{where}: the label column holds booleans, which name no class of '{task.name}' "
                "(only a task whose registry entry has label_type bool, such as pcam, reads them)"
            )
        return None  # False is class 0, True class 1
    if not isinstance(feature, ClassLabel):
        return None
    mapping = _class_label_mapping(feature.names, task, where, data.info.builder_name == "imagefolder")
    return None if mapping is None or np.array_equal(mapping, np.arange(len(mapping))) else mapping


def _class_label_mapping(names: list[str], task: TaskInfo, where: str, folders: bool) -> np.ndarray | None:
    """By name where every name is one of the task's classes, in some spelling; where none is, by
    index (said once) or, for an image folder, by class number; a partial match is an error."""
    index = class_index(task)
    labels = [lookup_class(index, name) for name in names]
    if all(label is not None for label in labels):
        return np.array(labels, dtype=np.int64)
    if any(label is not None for label in labels):
        unknown = [name for name, label in zip(names, labels) if label is None]
        raise DataError(
            f"{where}: class name(s) {', '.join(map(repr, unknown[:5]))} are not classes of '{task.name}' "
            f"({_closest(unknown[:3], task, set(labels))}; {len(names) - len(unknown)} of the {len(names)} names match)"
        )
    if not folders:
        if len(names) != task.num_classes:
            raise DataError(
                f"{where}: the dataset's {len(names)} class names ({_first(names)}) match none of the "
                f"{task.num_classes} class names of '{task.name}' ({_first(task.classnames)}), so its labels cannot be read by index"
            )
        _say_once(
            (where.split(", split '")[0], tuple(names)),  # once per dataset, whichever split is read first
            f"{where}: the dataset's class names ({_first(names)}) match none of the task's "
            f"({_first(task.classnames)}); labels are read by index (label i is class i of '{task.name}')",
        )
        return None
    if not all(name.isascii() and name.isdigit() for name in names):
        raise DataError(
            f"{where}: class folders {', '.join(map(repr, names[:5]))} match none of the class names of "
            f"'{task.name}' ({_examples(task)}) and are not all class numbers (0-{task.num_classes - 1})"
        )
    values = np.array([int(name) for name in names], dtype=np.int64)
    outside = [name for name, value in zip(names, values) if value >= task.num_classes]
    if outside:
        raise DataError(
            f"{where}: class folder(s) {', '.join(map(repr, outside[:5]))} are outside the "
            f"{task.num_classes} classes of '{task.name}' (0-{task.num_classes - 1})"
        )
    return values


def _closest(names: list[str], task: TaskInfo, matched: set[int | None]) -> str:
    """``'crystaline': closest class 'crystalline'`` for each of ``names``, among the task's classes
    that no name of the dataset matched (``matched``: the labels that were)."""
    keys = {spelling_key(name): name for label, name in enumerate(task.classnames) if label not in matched}
    hints = []
    for name in names:
        close = difflib.get_close_matches(spelling_key(name), keys, n=1, cutoff=0.6)
        hints.append(f"{name!r}: closest class {keys[close[0]]!r}" if close else f"{name!r}: no close class")
    return "; ".join(hints)


#: What ``_say_once`` said in this process.
_SAID: set[tuple] = set()


@rank_zero_only
def _say_once(key: tuple, line: str) -> None:
    """Print ``line`` once per process (and only on rank 0): a dataset is read split by split."""
    if key not in _SAID:
        _SAID.add(key)
        print(line, flush=True)


def _string_label_mapping(data: Dataset, task: TaskInfo, where: str) -> dict[str, int]:
    index = class_index(task)
    values = data.unique("label")
    unknown = [value for value in values if value is None or lookup_class(index, value) is None]
    if unknown:
        raise DataError(
            f"{where}: label {unknown[0]!r} is not a class name of '{task.name}' "
            f"({_examples(task)}); {len(unknown)} such value(s)"
        )
    return {value: lookup_class(index, value) for value in values}


def checked_label_mapping(data: Dataset, task: TaskInfo, where: str) -> np.ndarray | dict[str, int] | None:
    """``label_mapping`` after checking every label names one of the task's classes."""
    mapping = label_mapping(data, task, where)
    if not isinstance(mapping, dict):  # a name -> label dict was checked value by value
        check_labels(data, task, mapping, where)
    return mapping


def check_labels(data: Dataset, task: TaskInfo, mapping: np.ndarray | None, where: str) -> None:
    """Every label must name one of the task's classes: a whole number in range. A float column's
    whole values (``2.0``, as pandas writes integer labels next to a missing one) are class
    numbers like ints; ``2.6``, a missing value (NaN) or an infinity names no class."""
    # ``[:]`` reads the column as one array; ``data["label"]`` is a lazy column that numpy would
    # read row by row (0.3 s per 10,000 rows, on every run and every split).
    labels = np.asarray(data.select_columns(["label"]).with_format("numpy")[:]["label"])
    if labels.dtype.kind == "f":  # numpy reads a missing value of any numeric column as NaN
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if bad.size:
            row = int(bad[0])
            value = data.select_columns(["label"])[row]["label"]
            shown = "missing" if value is None or value != value else f"{value:g}"
            raise DataError(
                f"{where}: label {shown} at row {row} is not a class number (a whole number 0-{task.num_classes - 1} "
                f"of '{task.name}'); {bad.size} such row(s)"
            )
    bad = np.flatnonzero((labels < 0) | (labels >= (len(mapping) if mapping is not None else task.num_classes)))
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{where}: label {int(labels[row])} at row {row} is outside the {task.num_classes} classes "
            f"of '{task.name}' (0-{task.num_classes - 1}); {bad.size} such row(s)"
        )
