"""The merged model: pool -> merged backbone + every task's own head, evaluated by ``Trainer.test``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import nn
from transformers import PretrainedConfig

from callbacks.merged_export import MergedModelExport
from common.architectures import architecture_of
from common.files import check_export_target, check_output_location
from datamodules.loaders import evaluates_nothing
from lightning_modules.backbones import backbone_from_state, heads_from_state
from lightning_modules.evaluation import ModelPoolSpec, ModulatedBackbones, MultiTaskEvaluation, check_pool_up_front
from lightning_modules.gram_pass import DataStatistics, data_purpose
from merging.errors import MergeError
from merging.methods import MergeMethod, SimpleAverage
from merging.per_task import PerTaskMerge
from merging.pool import PRETRAINED, ModelPool
from merging.saved import load_merged, save_merged


class MergedClassifier(MultiTaskEvaluation):
    """Merge the fine-tuned backbones of a model pool and evaluate the result on every task
    with that task's own fine-tuned head.

    Args:
        tasks: evaluated tasks, in order (linked from ``data.task_names``).
        classnames: class names per task (linked from ``data.classnames``).
        models: the model pool: ``_pretrained_`` and one checkpoint per task (hub id or
            directory), as in FusionBench's pool YAML; or the path of such a YAML file (in a
            config file, relative to that config's folder).
        method: the merge method and its hyper-parameters, e.g. ``--model.method TiesMerging
            --model.method.top_k 0.2``. ``RegMean``, ``FisherMerging`` and ``RegMeanPlusPlus`` also need
            ``--data.gram_images``: they merge after a pass over unlabelled train images, in the same
            ``merge.py test``. A mask-based method (``TallMasks``, ``EMRMerging``) gives one backbone
            per task, each task scored (and exported) with its own.
        evaluate_individual: also evaluate each fine-tuned model on its own task, for the
            normalised accuracy (merged / individual).
        merged_model: evaluate this saved merged model (a ``save_dir``) instead of merging.
        save_dir: write the merged model (backbone + all heads) here; with
            ``--trainer.limit_test_batches 0`` it is merged and saved without evaluating. Not for a
            method of one backbone per task (``export_dir`` writes each task's).
        export_dir: write, for every evaluated task, a plain Hugging Face image classifier of the
            pool's family (``ConvNextForImageClassification``, ...) to ``<export_dir>/<task>``: the merged backbone
            (a per-task method's: the task's own) with that task's own head and class names, the image processor and a model card
            (method, hyper-parameters, model pool, the task's test accuracy). Written after the
            evaluation; with ``--trainer.limit_test_batches 0`` right after merging, not evaluated.
        overwrite: replace an existing ``save_dir`` or ``<export_dir>/<task>``.
        report_dir: where the report files go.
        splits: evaluated splits, in the DataModule's loader order (linked from ``data.splits``).
        channels_last: run the backbones in channels-last memory format (faster on GPUs).
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
        models: ModelPoolSpec | None = None,
        method: MergeMethod | None = None,
        evaluate_individual: bool = False,
        merged_model: str | None = None,
        save_dir: str | None = None,
        export_dir: str | None = None,
        overwrite: bool = False,
        report_dir: str = "outputs/merge",
        splits: list[str] | None = None,
        channels_last: bool = False,
        tf32: bool = False,
        compare_precision: bool = False,
    ) -> None:
        self.method = method if method is not None else SimpleAverage()
        title = f"Merged model: {self.method.describe()}" + (" (one backbone per task)" if self.method.per_task else "")
        super().__init__(tasks, classnames, report_dir, title, splits, tf32=tf32, compare_precision=compare_precision)
        if merged_model is None and models is None:
            raise MergeError("give the model pool (model.models) or a saved merged model (model.merged_model)")
        if save_dir is not None and self.method.per_task:
            raise MergeError(
                f"{self.method.describe()} gives one backbone per task (the task id picks it at inference), and "
                "model.save_dir saves one merged backbone: use --model.export_dir for each task's classifier"
            )
        if merged_model is not None and not Path(merged_model).is_dir():
            raise MergeError(f"saved merged model '{merged_model}' does not exist")
        if save_dir is not None:
            check_export_target(Path(save_dir), overwrite, flag="--model.overwrite true")
            check_output_location(save_dir, "model.save_dir", atomic=True)
        if export_dir is not None:  # checked before anything is merged, like save_dir
            for task in self.tasks:
                check_export_target(Path(export_dir, task), overwrite, flag="--model.overwrite true")
            check_output_location(export_dir, "model.export_dir")
        self.pool = ModelPool(models) if merged_model is None else None
        if self.pool is not None:
            check_pool_up_front(self.pool, self.tasks)
        if evaluate_individual and self.pool is None:
            raise MergeError("evaluate_individual needs the model pool (model.models)")
        self.evaluate_individual = evaluate_individual
        self.merged_model = merged_model
        self.save_dir = save_dir
        self.export_dir = export_dir
        self.overwrite = overwrite
        self.channels_last = channels_last
        self.uses_grams = merged_model is None and self.method.needs_data
        self.gram_purpose = data_purpose([self.method])
        self.backbone_config: PretrainedConfig | None = None  # set by build(), for the exports
        self.per_task: PerTaskMerge | None = None  # a per-task method's merge, set by build()
        self._saved_info: dict[str, Any] = {}  # merge.json of the saved merged model
        if merged_model is not None:
            self.report_title = f"Saved merged model: {merged_model}"

    def check_test_does_something(self, trainer: Any) -> None:
        if not evaluates_nothing(trainer):
            return
        if self.uses_grams:
            raise MergeError(
                f"{self.method.describe()} merges from a pass over train images, and trainer.limit_test_batches 0 reads "
                "no data: merge and save with --trainer.limit_test_batches 1.0 (and --model.save_dir)"
            )
        if self.save_dir is None and self.export_dir is None:
            raise MergeError(
                "trainer.limit_test_batches 0 evaluates nothing, and no model.save_dir or model.export_dir is given: "
                "nothing would be done (give --model.save_dir or --model.export_dir to merge and write only)"
            )

    def build(self) -> None:
        self.check_test_does_something(self.trainer)
        if self.export_dir is not None:
            self.processor_file()  # a missing image processor stops the run before merging
        if self.merged_model is not None:
            self._load_saved()
        else:
            self._merge()
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def configure_callbacks(self) -> list[Callback]:
        """The report's writers and, with ``export_dir``, the per-task exports (after the report)."""
        callbacks = super().configure_callbacks()
        if self.export_dir is not None:
            callbacks.append(MergedModelExport(self.export_dir, self.overwrite))
        return callbacks

    def merged_row(self) -> tuple[str, nn.Module]:
        """The row's name and the merged backbone (or ``ModulatedBackbones``), for the exports."""
        (name, row), *_ = self.rows.items()  # the one merged row
        return name, row

    def export_backbone(self, task: str) -> dict[str, torch.Tensor]:
        """The backbone the export for ``task`` carries, under its checkpoint keys: the merged one, or
        the task's own where the method gives one per task (the weights it was scored with)."""
        _, row = self.merged_row()
        if isinstance(row, ModulatedBackbones):
            return row.state_for(task)
        return architecture_of(row.config).backbone_state(row)

    def merge_info(self) -> dict[str, Any]:
        """What the exports' model cards say of the merge: the saved merge's ``merge.json``, or this one's."""
        return self._saved_info if self.merged_model is not None else self._info()

    def _merge(self) -> None:
        pool = self.pool
        self.check_pool(pool)
        self.backbone_config = pool.config(PRETRAINED)
        self.rows[self.method.describe()] = nn.Module()  # the merged backbone comes in _install
        if self.uses_grams:  # merged in merge_with_data, after the data pass
            pool.check_backbones()
            self.set_heads_and_individual(pool, self.evaluate_individual)
            self.start_gram_pass(pool, [self.method])
            return
        if self.method.per_task:  # one backbone per task: nothing to save (refused up front)
            self.per_task = self.per_task_merged(pool, self.method)
            row = ModulatedBackbones(self.backbone_config, self.per_task).to(self.device, self.dtype)
            self.rows[self.method.describe()] = row
            self.set_heads_and_individual(pool, self.evaluate_individual)
            return
        merged = self.merged_state(pool, self.method)
        self._install(merged)
        self.set_heads_and_individual(pool, self.evaluate_individual)
        self._save(merged)

    def merge_with_data(self, statistics: DataStatistics) -> None:
        merged = self.merged_state(self.pool, self.method, statistics)
        self._install(merged)
        self._save(merged)

    def _install(self, merged: dict[str, torch.Tensor]) -> None:
        """The merged backbone as the row, on the module's device, in its dtype (float64 with
        ``--trainer.precision 64-true``, which converted the module before a Gram pass merged) and
        memory format."""
        backbone = backbone_from_state(self.backbone_config, merged).to(self.device, self.dtype)
        self.rows[self.method.describe()] = backbone.to(memory_format=torch.channels_last) if self.channels_last else backbone

    def _save(self, merged: dict[str, torch.Tensor]) -> None:
        pool = self.pool
        if self.save_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            all_heads = {task: pool.head(task) for task in pool.task_names}
            directory = pool.directory(PRETRAINED)
            config, info = self.backbone_config, self._info()
            save_merged(self.save_dir, merged, all_heads, config, directory, info, self.overwrite, what="model.save_dir")
            print(f"saved the merged model to {self.save_dir}")
        if self.trainer is not None:
            self.trainer.strategy.barrier("save merged model")

    def _load_saved(self) -> None:
        saved = load_merged(self.merged_model)
        missing = [task for task in self.tasks if task not in saved.heads]
        if missing:
            raise MergeError(
                f"saved merged model '{self.merged_model}' has no head for {', '.join(missing)} (heads: {', '.join(saved.heads)})"
            )
        for task in self.tasks:
            rows = saved.heads[task]["weight"].shape[0]
            if rows != len(self.classnames[task]):
                raise MergeError(
                    f"head '{task}' of '{self.merged_model}' has {rows} classes, the task has {len(self.classnames[task])}"
                )
        self.backbone_config = saved.config
        self._saved_info = saved.info
        self.rows[saved.info.get("method", "merged")] = backbone_from_state(saved.config, saved.backbone)
        self.heads = heads_from_state({task: saved.heads[task] for task in self.tasks})

    def processor_file(self) -> Path:
        """The image processor the exports carry: the pretrained model's, or the saved merge's."""
        directory = Path(self.merged_model) if self.merged_model is not None else self.pool.directory(PRETRAINED)
        path = directory / "preprocessor_config.json"
        if not path.is_file():
            raise MergeError(f"no preprocessor_config.json in '{directory}': an export needs the image processor")
        return path

    def _info(self) -> dict[str, Any]:
        info = {
            "method": self.method.describe(),
            "method_name": self.method.name,
            "hyperparameters": self.method.hyperparameters(),
            "models": dict(self.pool.sources) if self.pool is not None else None,
            "tasks": {task: {"classnames": self.classnames[task]} for task in self.tasks},
        }
        if self.per_task is not None:
            info["per_task"] = self._per_task_info()
        return info

    def _per_task_info(self) -> dict[str, Any]:
        """What a per-task merge records: each task's scale ``s_t`` and the share of the weights its mask keeps."""
        kept = self.per_task.kept_fraction()
        return {task: {"scale": scale, "kept_fraction": kept[task]} for task, scale in self.per_task.scale_of().items()}

    def report_extra(self) -> dict[str, Any]:
        if self.merged_model is not None:
            return {"merged_model": self.merged_model}
        info = self._info()
        return {key: info[key] for key in ("method", "method_name", "hyperparameters", "models", "per_task") if key in info}
