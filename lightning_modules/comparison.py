"""Compare merge methods: every method's merged model on the same data, in one pass per split.

With a hyper-parameter grid, each method's value is chosen on a validation split held out
from every task's *train* split, never on the test set; the report gives the test accuracy of
that choice beside the grid's best test accuracy (the optimistic number, chosen on test).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_modules.evaluation import ModelPoolSpec, MultiTaskEvaluation, check_pool_up_front
from lightning_modules.gram_pass import DataStatistics, data_purpose
from merging.errors import MergeError
from merging.methods import MergeMethod
from merging.pool import ModelPool

#: grid[method class name][hyper-parameter] = the values to try.
Grid = Mapping[str, Mapping[str, Sequence[float | int | bool]]]


def expand_grid(methods: Sequence[MergeMethod], grid: Grid) -> list[list[MergeMethod]]:
    """Each listed method with every combination of its grid's values (its other
    hyper-parameters as listed); a method without a grid stays as it is."""
    listed = {type(method).__name__ for method in methods}
    unknown = sorted(set(grid) - listed)
    if unknown:
        raise MergeError(f"grid for method(s) not in model.methods: {', '.join(unknown)} (listed: {', '.join(sorted(listed))})")
    groups = []
    for method in methods:
        values = grid.get(type(method).__name__)
        if not values:
            groups.append([method])
            continue
        current = method.hyperparameters()
        bad = sorted(set(values) - set(current))
        if bad:
            raise MergeError(
                f"{type(method).__name__} has no hyper-parameter {', '.join(bad)} (it has: {', '.join(current) or 'none'})"
            )
        empty = sorted(name for name, options in values.items() if len(options) == 0)
        if empty:  # no combination at all: the method's row would vanish from the table
            raise MergeError(
                f"grid {type(method).__name__}: no values for {', '.join(empty)}; list at least one, or leave it out of the grid"
            )
        names = [name for name in current if name in values]  # the method's own order, whatever the config's
        combos = itertools.product(*(values[name] for name in names))
        groups.append([type(method)(**{**current, **dict(zip(names, combo))}) for combo in combos])
    return groups


def average_accuracy(results: Mapping[str, Mapping[str, float]]) -> float:
    return sum(values["accuracy"] for values in results.values()) / len(results)


class MethodComparison(MultiTaskEvaluation):
    """Merge the pool once per method (and per grid point) and evaluate all merged models
    (and, optionally, each fine-tuned model on its own task) in a single pass over each
    split: each batch is decoded and preprocessed once and goes through every model.

    Writes one table (models x tasks, average, normalised accuracy) as ``report.md`` and
    ``report.csv``, ``report.json``, and a grouped bar chart ``accuracy.png``; with a grid,
    also each method's choice on the validation split and the test accuracy it gets.

    Args:
        tasks: evaluated tasks, in order (linked from ``data.task_names``).
        classnames: class names per task (linked from ``data.classnames``).
        models: the model pool, as for ``MergedClassifier``.
        methods: the merge methods to compare, e.g. ``SimpleAverage``, ``TaskArithmetic``,
            ``TiesMerging``, ``DareTies``, ``LearnedCoefficients`` (AdaMerging), ``RegMean``,
            ``FisherMerging``, ``RegMeanPlusPlus`` (merged after a pass over unlabelled train images: set
            ``data.gram_images``); a mask-based method (``TallMasks``, ``EMRMerging``) is a row of one
            backbone per task.
        grid: values to try per method class name and hyper-parameter, e.g.
            ``{TaskArithmetic: {scaling_factor: [0.1, 0.3, 0.5]}}``; every combination is
            evaluated and the one with the best average validation accuracy is the method's
            choice. Needs the validation split (``data.val_fraction``).
        evaluate_individual: also evaluate each fine-tuned model on its own task (the
            reference of the normalised accuracy).
        report_dir: where the table and chart go.
        splits: evaluated splits, in the DataModule's loader order (linked from ``data.splits``).
        tf32: on a GPU, run matmuls and convolutions in TF32; false (the default) keeps them IEEE
            float32, also the convolutions PyTorch would run in TF32. Refused on a CPU, which has none.
        compare_precision: with a precision other than IEEE float32 (``--trainer.precision
            bf16-mixed``, ``model.tf32 true``), run every batch in float32 too and report the test
            predictions that change (``lightning_modules.precision``).
    """

    def __init__(
        self,
        tasks: list[str],
        classnames: dict[str, list[str]],
        models: ModelPoolSpec,
        methods: list[MergeMethod],
        grid: dict[str, dict[str, list[float | int | bool]]] | None = None,
        evaluate_individual: bool = True,
        report_dir: str = "outputs/compare",
        splits: list[str] | None = None,
        tf32: bool = False,
        compare_precision: bool = False,
    ) -> None:
        title = "Merge methods compared"
        super().__init__(tasks, classnames, report_dir, title, splits, tf32=tf32, compare_precision=compare_precision)
        if not methods:
            raise MergeError("no methods to compare: list at least one in model.methods")
        self.groups = expand_grid(methods, grid or {})  # the grid itself first: its mistakes need no data to show
        if grid and "validation" not in self.splits:
            raise MergeError("a hyper-parameter grid is chosen on a validation split: set data.val_fraction (e.g. 0.1)")
        self.methods = [method for group in self.groups for method in group]
        names = [method.describe() for method in self.methods]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise MergeError(f"methods listed twice: {', '.join(duplicates)}")
        self.pool = ModelPool(models)
        check_pool_up_front(self.pool, self.tasks)
        self.evaluate_individual = evaluate_individual
        self.uses_grams = any(method.needs_data for method in self.methods)
        self.gram_purpose = data_purpose([method for method in self.methods if method.needs_data])

    def build(self) -> None:
        pool = self.pool
        self.check_pool(pool)
        for method in self.methods:
            if method.needs_data:  # merged in merge_with_data, after the data pass
                self.rows[method.describe()] = nn.Module()
            else:
                self.rows[method.describe()] = self._merged_backbone(method)
        self.set_heads_and_individual(pool, self.evaluate_individual)
        if self.uses_grams:
            self.start_gram_pass(pool, [method for method in self.methods if method.needs_data])

    def _merged_backbone(self, method: MergeMethod, statistics: DataStatistics | None = None) -> nn.Module:
        """The method's row: one merged backbone, or one per task for a mask-based method (``build_row``)."""
        return self.build_row(self.pool, method, statistics)

    def merge_with_data(self, statistics: DataStatistics) -> None:
        for method in self.methods:
            if method.needs_data:
                # In the module's dtype too (``--trainer.precision 64-true`` converted the module, and
                # the rows built before the Gram pass with it, before this merge).
                self.rows[method.describe()] = self._merged_backbone(method, statistics).to(self.device, self.dtype)

    def selection(self) -> list[dict[str, Any]]:
        """Per method with several grid points: the choice on validation and the best on test."""
        validation, test = self.results.get("validation"), self.results["test"]
        chosen = []
        for group in self.groups:
            if len(group) < 2 or validation is None:
                continue
            labels = [method.describe() for method in group]
            on_validation = max(labels, key=lambda label: average_accuracy(validation[label]))
            on_test = max(labels, key=lambda label: average_accuracy(test[label]))
            chosen.append({
                "method": group[0].name,
                "grid_points": len(group),
                "chosen_on_validation": on_validation,
                "validation_accuracy": average_accuracy(validation[on_validation]),
                "test_accuracy": average_accuracy(test[on_validation]),
                "best_on_test": on_test,
                "best_test_accuracy": average_accuracy(test[on_test]),
            })  # fmt: skip
        return chosen

    def report_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "methods": [{"name": method.name, "label": method.describe(), **method.hyperparameters()} for method in self.methods],
            "models": dict(self.pool.sources),
        }
        if any(len(group) > 1 for group in self.groups):
            extra["selection"] = self.selection()
        return extra

    def report_sections(self) -> list[str]:
        choices = self.selection()
        if not choices:
            return []
        lines = [
            "## Hyper-parameters chosen on the validation split",
            "",
            "Average accuracy (%) over the tasks. *Chosen on validation*: the grid point with the best average on "
            "the validation split (held out from each task's train split); its test accuracy is the honest "
            "number. *Best on test*: the grid point with the best test average, chosen by looking at the test "
            "set (optimistic).",
            "",
            "| method | chosen on validation | validation | test (chosen on validation) | best on test (optimistic) | test (optimistic) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in choices:
            lines.append(
                f"| {row['method']} ({row['grid_points']} points) | {row['chosen_on_validation']} | "
                f"{100 * row['validation_accuracy']:.2f} | {100 * row['test_accuracy']:.2f} | "
                f"{row['best_on_test']} | {100 * row['best_test_accuracy']:.2f} |"
            )
        return [*lines, ""]
