"""Multi-task evaluation of one or several backbones, each task with its own head.

``Trainer.test`` runs one DataLoader per task; ``dataloader_idx`` picks the task and its
head. Every row (a merged backbone, or each fine-tuned model on its own task) has one
accuracy and one mean-loss metric per task; they are computed once at the end with a sync
over processes, and the number of samples is checked against the test set, so each number
is the model's score on every test sample exactly once.

A merge that needs data (RegMean, Fisher merging, RegMean++) is finished inside the same ``Trainer.test``: the
DataModule's unlabelled ``gram`` loaders come first, their batches feed ``gram_pass``, and
when the first labelled batch arrives (or the epoch ends, on a process that has none) every
process reduces the statistics and ``merge_with_data`` builds the merged rows.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from jsonargparse.typing import Path_fr
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from callbacks.report import INDIVIDUAL, ReportFiles, build_report, summarize
from callbacks.wandb_report import WandbReport
from common.architectures import architecture_of, backbone_features
from common.files import check_output_location
from datamodules.loaders import evaluates_nothing
from datamodules.multitask import GRAM_SPLIT
from lightning_modules.backbones import backbone_from_state, heads_from_state, load_backbone
from lightning_modules.gram_pass import DataStatistics, GramPass, check_gram_split
from lightning_modules.precision import check_evaluation_precision, precision_report, reference_pass, tf32_mode
from merging.engine import merge_backbone, merge_per_task
from merging.errors import MergeError
from merging.per_task import PerTaskMerge
from merging.pool import PRETRAINED
from merging.switch import SwitchModule

#: ``model.models``: the pool as a mapping, or the path of a pool YAML. In a config file a
#: relative path is read from that config's folder (``Path_fr``, jsonargparse's existing-file
#: path); a path that names no file stays a string, for the pool's own one-line error.
ModelPoolSpec = dict[str, str | dict[str, Any]] | Path_fr | str


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of every tensor's bytes, to check that all processes hold the same weights."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(state):
        digest.update(key.encode())
        # Flattened first: a 0-d tensor (BatchNorm's counter) has no byte view of its own.
        digest.update(state[key].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_finite(row: str, task: str, split: str, values: Mapping[str, float], non_finite: int) -> None:
    """A row whose logits or loss are not finite on a task has no accuracy to report (an argmax
    over NaNs is a number, and a NaN is no JSON): one error naming the row and the task."""
    if non_finite:
        problem = f"{non_finite} of {int(values['num_samples'])} {split} samples give non-finite logits (NaN/Inf)"
    elif not math.isfinite(values["loss"]):
        problem = f"the mean {split} loss is {values['loss']}"
    else:
        return
    raise MergeError(
        f"row '{row}' on task '{task}': {problem}; its weights make the network overflow "
        "(a hyper-parameter far out of range?), so there is no accuracy to report"
    )


def check_pool_up_front(pool: Any, tasks: list[str]) -> None:
    """The model pool of a merge-side module, before any file is read: it holds fine-tuned models
    to merge (``ModelPool.check_mergeable``), no two entries name one checkpoint
    (``ModelPool.check_distinct`` without contents), and its fine-tuned models and the evaluated
    tasks (``data.tasks``) are the same set: a task of ``data.tasks`` without a model has no head,
    and a pool model whose task is not evaluated would be merged, changing the merged model, and
    appear nowhere in the report."""
    pool.check_mergeable()
    missing = [task for task in tasks if task not in pool.task_names]
    if missing:
        raise MergeError(f"no fine-tuned model for task '{missing[0]}' in the model pool (tasks: {', '.join(pool.task_names)})")
    unevaluated = [task for task in pool.task_names if task not in tasks]
    if unevaluated:
        raise MergeError(
            f"the model pool's {', '.join(unevaluated)} would be merged but not evaluated: data.tasks is "
            f"[{', '.join(tasks)}]; add them to data.tasks, or remove them from the model pool"
        )
    pool.check_distinct(contents=False)


class PerTaskBackbones(nn.ModuleDict):
    """A row of one backbone per task (task -> backbone): each task is scored with its own. The
    ``individual`` row (each fine-tuned model on its own task) is one; a mask-based method's model
    is one too, held compactly (``ModulatedBackbones``)."""


class ModulatedBackbones(nn.Module):
    """A row of one backbone per task held compactly, as a mask-based method gives it (TALL masks,
    EMR-Merging: ``merging.PerTaskMerge``, ``theta_t = theta_0 + s_t (m_t ⊙ v)``): one backbone module,
    whose weights become task ``t``'s when task ``t`` is scored (``backbone_for``), built from the
    shared vector, the task's bits and its scale. Memory: ``theta_0``, ``v`` and the module (three
    backbones) and ``T`` bits a weight, whatever ``T``; the test loaders run task by task, so each
    task's weights are built once a split.

    Args:
        config: the backbone's config (the pool's ``_pretrained_``).
        merged: the per-task merge.
    """

    def __init__(self, config: Any, merged: PerTaskMerge) -> None:
        super().__init__()
        self.merged = merged
        self._module_names = architecture_of(config).checkpoint_keys(config)
        self.current = merged.tasks[0]
        self.backbone = backbone_from_state(config, merged.backbone(self.current)).requires_grad_(False)

    def backbone_for(self, task: str) -> nn.Module:
        """The backbone with task ``task``'s weights (on the module's device, in its dtype and memory format)."""
        if task != self.current:
            # Normal tensors, not inference-mode ones, whatever mode the test step runs in: they
            # are written into the module's parameters.
            with torch.inference_mode(False), torch.no_grad():
                # Into the module's own tensors (their device, dtype, memory format); a buffer that no
                # checkpoint holds (Swin's relative position index) stays as it is.
                current = self.backbone.state_dict()
                for key, tensor in self.merged.backbone(task).items():
                    current[self._module_names[key]].copy_(tensor)
            self.current = task
        return self.backbone

    def state_for(self, task: str) -> dict[str, torch.Tensor]:
        """Task ``task``'s backbone under its checkpoint keys (``PerTaskMerge.backbone``), for its export."""
        return self.merged.backbone(task)


def row_backbone(row: nn.Module, task: str) -> nn.Module:
    """The backbone a row scores ``task`` with: its own for that task in a ``PerTaskBackbones`` or
    ``ModulatedBackbones`` row, otherwise the row's one backbone."""
    if isinstance(row, PerTaskBackbones):
        return row[task]
    if isinstance(row, ModulatedBackbones):
        return row.backbone_for(task)
    return row


def is_per_task(row: nn.Module) -> bool:
    """True for a row of one backbone per task."""
    return isinstance(row, (PerTaskBackbones, ModulatedBackbones))


class Rows(nn.Module):
    """The evaluated backbones by row name, in order: a mapping whose names may hold any
    character (a method's name with its hyper-parameters, ``ties(top_k=0.2)``), which
    ``nn.ModuleDict``'s keys may not ('.'). A row is one backbone for every task, or one per task
    (``PerTaskBackbones``). The backbones are submodules (``0``, ``1``, ...),
    so they follow the LightningModule to its device; setting a name again replaces its
    backbone in place."""

    def __init__(self) -> None:
        super().__init__()
        self._names: list[str] = []

    def __setitem__(self, name: str, backbone: nn.Module) -> None:
        if name not in self._names:
            self._names.append(name)
        self.add_module(str(self._names.index(name)), backbone)

    def __getitem__(self, name: str) -> nn.Module:
        if name not in self._names:
            raise KeyError(name)
        return self._modules[str(self._names.index(name))]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def items(self) -> list[tuple[str, nn.Module]]:
        return [(name, self[name]) for name in self._names]


class MultiTaskEvaluation(LightningModule, ABC):
    """Base of the merge-side LightningModules: subclasses fill ``rows`` (name -> backbone),
    ``heads`` and optionally ``individual`` (task -> fine-tuned backbone) in ``build()``.

    Args:
        tasks: the evaluated tasks, in the DataModule's order (linked from ``data.task_names``).
        classnames: class names per task (linked from ``data.classnames``).
        report_dir: where ``report.json``, ``report.md``, ``report.csv``, ``accuracy.png`` and
            ``accuracy_heatmap.png`` go; None writes no file (``report`` holds the numbers).
        report_title: heading of the report.
        splits: the splits in the DataModule's loader order (linked from ``data.splits``):
            ``test``, or ``validation`` and ``test``; first ``gram`` (unlabelled) for a merge
            that needs data.
        tf32: TF32 matmuls and convolutions on a GPU (``lightning_modules.precision``).
        compare_precision: also run every batch in IEEE float32 and report the test predictions
            that change.
    """

    def __init__(
        self,
        tasks: list[str],
        classnames: dict[str, list[str]],
        report_dir: str | None = "outputs/merge",
        report_title: str = "Merged model",
        splits: list[str] | None = None,
        tf32: bool = False,
        compare_precision: bool = False,
    ) -> None:
        super().__init__()
        self.tf32 = tf32
        self.compare_precision = compare_precision
        #: split -> row -> task -> predictions that differ from the fp32 pass's, after a compared test run
        self.changed_predictions: dict[str, dict[str, dict[str, int]]] = {}
        if report_dir is not None:
            check_output_location(report_dir, "model.report_dir")
        self.tasks = list(tasks)
        self.classnames = {task: list(classnames[task]) for task in self.tasks}
        self.splits = list(splits) if splits else ["test"]
        #: dataloader_idx -> (split, task): the DataModule's order, split by split.
        self.loaders = [(split, task) for split in self.splits for task in self.tasks]
        #: the scored (labelled) splits and loaders.
        self.evaluated_splits = [split for split in self.splits if split != GRAM_SPLIT]
        self.evaluated = [(split, task) for split, task in self.loaders if split != GRAM_SPLIT]
        #: split -> row -> task -> {accuracy, loss, num_samples}, after a test run; ``report`` the
        #: content of ``report.json``, which the callbacks (``configure_callbacks``) write.
        self.results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        self.report_dir = report_dir
        self.report_title = report_title
        self.rows = Rows()
        #: the ``individual`` row, last in the report (a ``PerTaskBackbones`` row of its own, kept
        #: apart from ``rows`` so that it follows every merged row whatever the order of ``build()``).
        self.individual = PerTaskBackbones()
        self.heads: SwitchModule | None = None
        self.report: dict[str, Any] | None = None
        #: True where a merge needs the data pass (subclasses set it in ``__init__``); ``build()``
        #: then sets ``gram_pass``, dropped once merged.
        self.uses_grams = False
        #: what the pass's images are for, as the error for a missing ``data.gram_images`` says it.
        self.gram_purpose = "for its Gram matrices"
        self.gram_pass: nn.Module | None = None
        #: task -> unlabelled images the Gram pass read (over all processes).
        self.gram_images: dict[str, int] = {}

    @abstractmethod  # abstract: not offered as a ``--model`` choice
    def build(self) -> None:
        """Fill ``rows``, ``heads`` and (optionally) ``individual``."""

    def check_pool(self, pool: Any) -> None:
        """Before merging: no two entries of ``pool`` are copies of one checkpoint, and every
        evaluated task has a fine-tuned head of its class count and labels."""
        pool.check_distinct()
        pool.check_heads(self.classnames)

    def check_test_does_something(self, trainer: Any) -> None:
        """A run that evaluates nothing (``datamodules.loaders.evaluates_nothing``: ``merge.py test
        --trainer.limit_test_batches 0``) is refused, unless the model writes something else
        (``MergedClassifier``'s ``save_dir``)."""
        if evaluates_nothing(trainer):
            name = type(self).__name__
            raise MergeError(f"trainer.limit_test_batches 0 evaluates nothing, and {name} saves nothing: nothing would be done")

    def check_precision(self, trainer: Any) -> None:
        """``model.tf32`` and ``model.compare_precision`` against the trainer's precision and device
        (``lightning_modules.precision.check_evaluation_precision``), before any checkpoint is read."""
        if trainer is not None:
            check_evaluation_precision(
                str(trainer.precision), trainer.strategy.root_device.type, self.tf32, self.compare_precision
            )

    def set_heads_and_individual(self, pool: Any, evaluate_individual: bool) -> None:
        """Each task's fine-tuned head from ``pool`` and, for the ``individual`` row, each
        task's whole fine-tuned backbone; all frozen."""
        self.heads = heads_from_state({task: pool.head(task) for task in self.tasks}).requires_grad_(False)
        if evaluate_individual:
            for task in self.tasks:
                self.individual[task] = load_backbone(pool, task)

    def setup(self, stage: str) -> None:
        data_splits = getattr(self.trainer.datamodule, "splits", None) if self.trainer is not None else None
        if data_splits is not None and list(data_splits) != self.splits:
            raise MergeError(
                f"the data module evaluates splits {data_splits}, the model expects {self.splits}: pass splits=data.splits"
            )
        check_gram_split(self.uses_grams, self.splits, type(self).__name__, self.gram_purpose)  # before build() loads any model
        self.check_precision(self.trainer)
        if self.heads is None:
            self.build()
            self._make_metrics()

    def start_gram_pass(self, pool: Any, methods: list[Any]) -> None:
        """The one entry to the data pass (``lightning_modules.gram_pass``) for the merges that need
        it (``methods``): the pool's fine-tuned models read the ``gram`` loaders' images first, and
        ``merge_with_data`` builds the waiting rows once they are read."""
        self.gram_pass = GramPass(pool, self.tasks, methods)

    def merge_with_data(self, statistics: DataStatistics) -> None:
        """Build the rows that wait for the data pass, from its ``statistics`` (Grams, Fishers, kept images)."""
        raise NotImplementedError

    def _finish_gram_pass(self) -> None:
        """Once, on every process at the same point: reduce the statistics and merge."""
        if self.gram_pass is None:
            return
        statistics = self.gram_pass.statistics(self.device, self.dtype)
        self.gram_images = statistics.images
        self.gram_pass = None  # the fine-tuned backbones of the pass are no longer needed
        # The merged weights become parameters: ordinary tensors, not inference-mode ones
        # (test steps run in inference mode, where the Gram sums were made and reduced).
        with torch.inference_mode(False), torch.no_grad():
            self.merge_with_data(statistics)

    def _evaluated_rows(self) -> list[tuple[str, nn.Module]]:
        """Every scored row, name and backbone(s): ``rows``, then ``individual`` where it is filled."""
        return [*self.rows.items(), *([(INDIVIDUAL, self.individual)] if len(self.individual) else [])]

    def _all_rows(self) -> list[str]:
        return [name for name, _ in self._evaluated_rows()]

    def _make_metrics(self) -> None:
        def per_task(factory: Any) -> nn.ModuleList:
            return nn.ModuleList(
                nn.ModuleDict({f"{split}/{task}": factory(task) for split, task in self.evaluated}) for _ in self._all_rows()
            )

        self.accuracy = per_task(lambda task: MulticlassAccuracy(len(self.classnames[task]), average="micro"))
        # A NaN loss comes from non-finite logits, which ``non_finite`` counts and the epoch's end
        # refuses: dropped here without a warning. (``nan_strategy="disable"`` would keep it, but
        # then torchmetrics 1.9 ignores the weights.) An infinite loss stays, and is refused too.
        self.mean_loss = per_task(lambda task: MeanMetric(nan_strategy="ignore"))
        self.samples = per_task(lambda task: SumMetric())
        #: samples whose logits hold a NaN or an infinity (a merge whose weights overflow); a count
        #: is never NaN, and without the NaN check an update does not wait for the device
        self.non_finite = per_task(lambda task: SumMetric(nan_strategy="disable"))
        if self.compare_precision:  # predictions that differ from the fp32 pass's
            self.changed = per_task(lambda task: SumMetric(nan_strategy="disable"))

    def merged_state(self, pool: Any, method: Any, statistics: DataStatistics | None = None) -> dict[str, torch.Tensor]:
        """``merge_backbone(pool, method)`` (with the data pass's ``statistics`` the method reads),
        its progress bar on the first process only, and checked to be the same on every process."""
        show_progress = self.trainer is None or self.trainer.is_global_zero
        data = statistics.for_method(method) if statistics is not None else {}
        merged = merge_backbone(pool, method, progress=show_progress, **data)
        self.verify_identical_across_ranks(merged, f"merged weights ({method.describe()})")
        return merged

    def per_task_merged(self, pool: Any, method: Any) -> PerTaskMerge:
        """``merge_per_task(pool, method)`` (one backbone per task, compactly), its progress bar on the
        first process only, and checked to be the same on every process."""
        show_progress = self.trainer is None or self.trainer.is_global_zero
        merged = merge_per_task(pool, method, progress=show_progress)
        self.verify_identical_across_ranks(merged.tensors(), f"per-task merge ({method.describe()})")
        return merged

    def build_row(self, pool: Any, method: Any, statistics: DataStatistics | None = None) -> nn.Module:
        """The row of ``method``'s merge of ``pool``: one backbone (``merged_state``), or one per task
        (``ModulatedBackbones``) for a method with ``per_task``."""
        if method.per_task:
            return ModulatedBackbones(pool.config(PRETRAINED), self.per_task_merged(pool, method))
        return backbone_from_state(pool.config(PRETRAINED), self.merged_state(pool, method, statistics))

    def verify_identical_across_ranks(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        """On several processes, every one must hold the same ``state``."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        digests: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, state_digest(state))
        if len(set(digests)) != 1:
            raise MergeError(f"processes hold different {what}: digests {digests}")

    def _backbones(self, task: str) -> list[nn.Module]:
        """Each row's backbone for ``task``, in the order of ``_all_rows``."""
        return [row_backbone(row, task) for _, row in self._evaluated_rows()]

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        with tf32_mode(self.tf32, self.device.type):  # set per step: nothing stays set after the run
            self._test_step(batch, dataloader_idx)

    def _test_step(self, batch: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, dataloader_idx: int) -> None:
        split, task = self.loaders[dataloader_idx]
        if split == GRAM_SPLIT:  # unlabelled images: a batch is the images alone
            if self.gram_pass is not None:  # (None in a second test run: already merged)
                self.gram_pass.step(batch, task)
            return
        self._finish_gram_pass()
        images, labels = batch
        key = f"{split}/{task}"
        for row, backbone in enumerate(self._backbones(task)):
            logits = self.heads(backbone_features(backbone, images), task)
            loss = nn.functional.cross_entropy(logits, labels)
            self.accuracy[row][key].update(logits, labels)
            self.mean_loss[row][key].update(loss, weight=labels.numel())
            self.samples[row][key].update(labels.numel())
            # Counted here, judged at the epoch's end on the synced count: every process stops
            # together, where a check per batch would stop only the one that saw it.
            self.non_finite[row][key].update((~torch.isfinite(logits)).any(dim=1).sum())
            if self.compare_precision:
                with reference_pass(self.device.type):
                    reference = self.heads(backbone_features(backbone, images.float()), task)
                self.changed[row][key].update((logits.argmax(dim=1) != reference.argmax(dim=1)).sum())

    def on_test_epoch_end(self) -> None:
        self._finish_gram_pass()  # a process without labelled batches merges here
        expected = self._expected_samples()
        self.results = {split: {} for split in self.evaluated_splits}
        self.changed_predictions = {}
        for row, name in enumerate(self._all_rows()):
            for split, task in self.evaluated:
                key = f"{split}/{task}"
                # compute() syncs over all processes (same order everywhere).
                values = {
                    "accuracy": float(self.accuracy[row][key].compute()),
                    "loss": float(self.mean_loss[row][key].compute()),
                    "num_samples": int(self.samples[row][key].compute()),
                }
                if expected and values["num_samples"] != expected[key]:
                    raise RuntimeError(
                        f"{name} on {task}: {values['num_samples']} samples evaluated, its {split} split has {expected[key]}"
                    )
                check_finite(name, task, split, values, int(self.non_finite[row][key].compute()))
                self.results[split].setdefault(name, {})[task] = values
                if self.compare_precision:
                    changed = int(self.changed[row][key].compute())
                    self.changed_predictions.setdefault(split, {}).setdefault(name, {})[task] = changed
        metrics = [
            self.accuracy,
            self.mean_loss,
            self.samples,
            self.non_finite,
            *([self.changed] if self.compare_precision else []),
        ]
        for metric in metrics:
            for per_task in metric:
                for task_metric in per_task.values():
                    task_metric.reset()
        for split, results in self.results.items():
            self._log_results(results, split)
        # On every process: the content is the same everywhere; the callbacks write it on rank 0.
        self.report = build_report(self.results["test"], *self.report_header())

    def _partial(self) -> bool:
        """A deliberately partial run (``fast_dev_run``, ``limit_test_batches``): no full count to check."""
        limit = self.trainer.limit_test_batches  # an int counts batches, a float is a fraction
        return bool(self.trainer.fast_dev_run) or isinstance(limit, int) or limit < 1.0

    def _expected_samples(self) -> dict[str, int]:
        """``split/task`` -> the size of the dataset its test loader reads (``Trainer.test``'s
        own loaders, in ``dataloader_idx`` order, whoever made them); none for a partial run."""
        loaders = self.trainer.test_dataloaders if self.trainer is not None else None
        if not loaders or self._partial():
            return {}
        sizes = {f"{split}/{task}": len(loader.dataset) for (split, task), loader in zip(self.loaders, loaders)}
        return {f"{split}/{task}": sizes[f"{split}/{task}"] for split, task in self.evaluated}

    def _log_results(self, results: Mapping[str, Mapping[str, Mapping[str, float]]], split: str = "test") -> None:
        """``<split>/<task>/accuracy|loss`` and ``<split>/average/accuracy`` per row (``<split>/<row>/...``
        where there are several) to every logger. Straight to the loggers, not through ``self.log``:
        the numbers are final and already synced, and Lightning's result collection copies itself
        per logged key, which took minutes for a comparison grid's thousand keys."""
        single = len(self.rows) == 1
        metrics: dict[str, float] = {}
        for name, per_task in results.items():
            prefix = split if single and name in self.rows else f"{split}/{name}"
            for task, values in per_task.items():
                metrics[f"{prefix}/{task}/accuracy"] = values["accuracy"]
                metrics[f"{prefix}/{task}/loss"] = values["loss"]
            metrics[f"{prefix}/average/accuracy"] = sum(values["accuracy"] for values in per_task.values()) / len(per_task)
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)

    def configure_callbacks(self) -> list[Callback]:
        """The writers of ``report`` at the end of a test run: the report files (with ``report_dir``),
        then the W&B table and figures."""
        writers: list[Callback] = [ReportFiles(self.report_dir)] if self.report_dir is not None else []
        return [*writers, WandbReport(self.report_dir)]

    def report_extra(self) -> dict[str, Any]:
        """More fields for ``report.json`` (method, pool, ...)."""
        return {}

    def report_sections(self) -> list[str]:
        """More Markdown for ``report.md``, after the test table."""
        return []

    def precision_info(self) -> dict[str, Any]:
        """``report.json``'s ``precision`` (``lightning_modules.precision.precision_report``): the
        trainer's precision, TF32 and, from a compared run, the test predictions that changed."""
        precision = str(self.trainer.precision) if self.trainer is not None else "32-true"
        changed = self.changed_predictions.get("test") if self.compare_precision else None
        first = next(iter(self.results.get("test", {}).values()), {})
        predictions = {task: int(values["num_samples"]) for task, values in first.items()}
        return precision_report(precision, self.tf32, changed, predictions)

    def report_header(self) -> tuple[str, dict[str, Any]]:
        """The report's title and its fields besides the test table, after a test run."""
        extra = {**self.report_extra(), **({"partial": True} if self._partial() else {})}
        per_task = [name for name, row in self.rows.items() if is_per_task(row)]
        if per_task:
            extra["per_task_backbones"] = per_task
        extra["precision"] = self.precision_info()
        if self.gram_images:
            extra["gram_images"] = dict(self.gram_images)
        if "validation" in self.results:
            extra["validation"] = summarize(self.results["validation"])
        title = f"{self.report_title} (PARTIAL: limited test batches)" if self._partial() else self.report_title
        return title, extra
