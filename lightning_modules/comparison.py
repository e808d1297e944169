"""Compare merge methods: every method's merged model on the same test data, in one pass."""

from __future__ import annotations

from typing import Any

from lightning_modules.evaluation import MultiTaskEvaluation, backbone_from_state
from merging.engine import merge_backbone
from merging.errors import MergeError
from merging.methods import MergeMethod
from merging.pool import PRETRAINED, ModelPool


class MethodComparison(MultiTaskEvaluation):
    """Merge the pool once per method and evaluate all merged models (and, optionally, each
    fine-tuned model on its own task) in a single pass over the test data: each batch is
    decoded and preprocessed once and goes through every model.

    Writes one table (models x tasks, average, normalised accuracy) as ``report.md`` and
    ``report.csv``, ``report.json``, and a grouped bar chart ``accuracy.png``.

    Args:
        tasks: evaluated tasks, in order (linked from ``data.task_names``).
        classnames: class names per task (linked from ``data.classnames``).
        models: the model pool, as for ``MergedClassifier``.
        methods: the merge methods to compare, e.g. ``SimpleAverage``, ``TaskArithmetic`` at a
            few scaling factors, ``TiesMerging``, ``DareTies``, ``LearnedCoefficients`` (AdaMerging).
        evaluate_individual: also evaluate each fine-tuned model on its own task (the
            reference of the normalised accuracy).
        report_dir: where the table and chart go.
    """

    def __init__(
        self,
        tasks: list[str],
        classnames: dict[str, list[str]],
        models: dict[str, str | dict[str, Any]] | str,
        methods: list[MergeMethod],
        evaluate_individual: bool = True,
        report_dir: str = "outputs/compare",
    ) -> None:
        super().__init__(tasks, classnames, report_dir, report_title="Merge methods compared")
        if not methods:
            raise MergeError("no methods to compare: list at least one in model.methods")
        names = [method.describe() for method in methods]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise MergeError(f"methods listed twice: {', '.join(duplicates)}")
        self.pool = ModelPool(models)
        self.methods = list(methods)
        self.evaluate_individual = evaluate_individual

    def build(self) -> None:
        pool = self.pool
        pool.check_heads(self.classnames)
        config = pool.config(PRETRAINED)
        show_progress = self.trainer is None or self.trainer.is_global_zero
        for method in self.methods:
            merged = merge_backbone(pool, method, progress=show_progress)
            self.verify_identical_across_ranks(merged, f"merged weights ({method.describe()})")
            self.add_row(method.describe(), backbone_from_state(config, merged))
        self.set_heads_and_individual(pool, self.evaluate_individual)

    def report_extra(self) -> dict[str, Any]:
        return {
            "methods": [{"name": method.name, "label": method.describe(), **method.hyperparameters()} for method in self.methods],
            "models": dict(self.pool.sources),
        }
