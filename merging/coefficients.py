"""Merging coefficients per task (and per parameter tensor): the readable file AdaMerging
writes and its heat map, the coefficients read back and checked against a pool, and the
merge method that applies them."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from common.plots import pyplot, save_figure
from merging.errors import MergeError
from merging.methods import MergeMethod, register_method, task_arithmetic


def write_coefficients(path: Path, coefficients: Tensor, tasks: Sequence[str], keys: Sequence[str], granularity: str) -> None:
    """``{"granularity", "tasks", "keys", "coefficients": {task: {key: value}}}`` as JSON
    (task-wise: ``{task: value}``), written to ``path`` as it is (AdaMerging stages it with its
    heat map in ``common.files.write_files_atomically``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if granularity == "task":
        table = {task: float(row[0]) for task, row in zip(tasks, coefficients)}
    else:
        table = {task: dict(zip(keys, map(float, row))) for task, row in zip(tasks, coefficients)}
    content = {"granularity": granularity, "tasks": list(tasks), "keys": list(keys), "coefficients": table}
    path.write_text(json.dumps(content, indent=1, allow_nan=False))


class Coefficients:
    """Merging coefficients: per task one value (``granularity="task"``) or one value per
    backbone key (``"layer"``), as ``{task: value}`` or ``{task: {key: value}}``; the
    numbers themselves, checked against a pool by ``matrix``. ``source`` is how error
    messages name them (``read`` sets it to the file)."""

    def __init__(
        self, granularity: Literal["task", "layer"], coefficients: Mapping[str, object], source: str = "coefficients"
    ) -> None:
        if granularity not in ("task", "layer"):
            raise MergeError(f"{source}: granularity must be task or layer, got {granularity!r}")
        self.granularity = granularity
        self.table = coefficients
        self.source = source

    @classmethod
    def read(cls, path: str | Path) -> Coefficients:
        """The content of a file ``write_coefficients`` wrote; ``MergeError`` naming the file
        where it cannot be read."""
        try:
            content = json.loads(Path(path).read_text())
            return cls(content["granularity"], content["coefficients"], source=f"coefficients file '{path}'")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise MergeError(f"unreadable coefficients file '{path}': {error}") from error

    def matrix(
        self,
        tasks: Sequence[str],
        keys: Sequence[str],
        granularity: str | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> Tensor:
        """The ``(tasks, keys)`` (layer-wise) or ``(tasks, 1)`` (task-wise) matrix, checked
        against the tasks and keys it will be applied to: exactly those tasks and keys, every
        value a finite number, of ``granularity`` and within ``bounds`` (``(low, high)``) where
        given. Each failure is a ``MergeError`` naming the source, the task and the key."""
        source, table = self.source, self.table
        if granularity is not None and self.granularity != granularity:
            raise MergeError(f"{source} is {self.granularity}-wise, expected {granularity}-wise")
        if not isinstance(table, Mapping) or set(table) != set(tasks):
            found = sorted(table) if isinstance(table, Mapping) else type(table).__name__
            raise MergeError(f"{source} is for tasks {found}, the model pool has {sorted(tasks)}")
        if self.granularity == "task":
            matrix = torch.tensor([[_coefficient(table[task], source, task, "every key (task-wise)")] for task in tasks])
        else:
            matrix = torch.tensor([_layer_row(table[task], source, task, keys) for task in tasks])
        if bounds is not None:
            _check_bounds(matrix, bounds, source, tasks, keys)
        return matrix


def _layer_row(row: object, source: str, task: str, keys: Sequence[str]) -> list[float]:
    if not isinstance(row, Mapping):
        kind = type(row).__name__
        raise MergeError(f"{source}: the coefficients of {task} are a {kind}, not a key-value table")
    missing = [key for key in keys if key not in row]
    if missing:
        raise MergeError(f"{source} has no coefficient for '{missing[0]}' of {task}")
    # A key the pool lacks means the file was learned for other models: applying the rest would be a guess.
    extra = sorted(set(row) - set(keys))
    if extra:
        raise MergeError(
            f"{source} has a coefficient for '{extra[0]}' of {task}, which the model pool's "
            f"backbone does not have ({len(extra)} such key(s))"
        )
    return [_coefficient(row[key], source, task, f"'{key}'") for key in keys]


def _coefficient(value: object, source: str, task: str, key: str) -> float:
    """A finite number: JSON's NaN/Infinity (which Python reads) would merge into NaN weights."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeError(f"{source}: the coefficient of {task} for {key} is {value!r}, not a number")
    if not math.isfinite(value):
        raise MergeError(f"{source}: the coefficient of {task} for {key} is {value}, not finite")
    return float(value)


def _check_bounds(matrix: Tensor, bounds: tuple[float, float], source: str, tasks: Sequence[str], keys: Sequence[str]) -> None:
    # Compared in float32, the dtype the coefficients are clamped in, so a clamped value passes.
    outside = ((matrix < bounds[0]) | (matrix > bounds[1])).nonzero()
    if len(outside):
        row, column = outside[0].tolist()
        key = f"'{keys[column]}'" if matrix.shape[1] > 1 else "every key (task-wise)"
        raise MergeError(
            f"{source}: the coefficient of {tasks[row]} for {key} is {matrix[row, column].item():g}, "
            f"outside the clamp range [{bounds[0]:g}, {bounds[1]:g}] ({len(outside)} such value(s))"
        )


def coefficients_heatmap(
    path: Path, coefficients: Tensor, tasks: Sequence[str], keys: Sequence[str], network_keys: Sequence[str]
) -> None:
    """Tasks x parameter tensors (layers), one cell per coefficient: ``coefficients`` has a
    column per key of ``keys`` (or one, task-wise), drawn in the order of ``network_keys``
    (``ModelPool.network_keys``), so that the axis runs from the input to the output."""
    plt = pyplot()
    column = {key: index for index, key in enumerate(keys)}
    values = coefficients.expand(len(tasks), len(keys))[:, [column[key] for key in network_keys]].numpy()
    figure, axes = plt.subplots(figsize=(min(24.0, 4 + 0.05 * len(keys)), 1.2 + 0.45 * len(tasks)))
    image = axes.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_yticks(range(len(tasks)), tasks)
    axes.set_xlabel(f"backbone parameter tensor (0-{len(keys) - 1}, input to output)")
    axes.set_title("AdaMerging coefficients")
    figure.colorbar(image, ax=axes, fraction=0.03)
    figure.tight_layout()
    save_figure(figure, path)


@register_method
class LearnedCoefficients(MergeMethod):
    """Task arithmetic with a coefficient per task (and per parameter tensor), as AdaMerging
    learns them: ``theta_k = theta_0,k + sum_t lambda_{t,k} tau_{t,k}``.

    The coefficients must name exactly the pool's tasks and backbone keys, with finite
    numbers; they are applied as they are (no clamp range is known here, so none is enforced).

    Args:
        coefficients: the coefficients (``Coefficients``), or the path of a
            ``coefficients.json`` (``merge.py fit`` with AdaMerging), read here, when the
            method is built.
        label: name of the row in reports.
    """

    name = "adamerging"
    propagates_non_finite = True  # a weighted sum: a NaN input shows in the output

    def __init__(self, coefficients: str | Coefficients, label: str = "adamerging") -> None:
        self.coefficients = coefficients if isinstance(coefficients, Coefficients) else Coefficients.read(coefficients)
        self.label = label
        self._lambdas: dict[str, Tensor] = {}

    def prepare(self, tasks: Sequence[str], keys: Sequence[str]) -> None:
        matrix = self.coefficients.matrix(tasks, keys).expand(len(tasks), len(keys))
        self._lambdas = {key: matrix[:, index].clone() for index, key in enumerate(keys)}

    def transform(self, task_vector: Tensor, task_index: int, key: str) -> Tensor:
        return task_vector * float(self._lambdas[key][task_index])

    def merge(self, pretrained: Tensor | None, tensors, statistics) -> Tensor:
        return task_arithmetic(pretrained, tensors, 1.0)

    def describe(self) -> str:
        return self.label
