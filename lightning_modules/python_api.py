"""The merge side from Python: a model pool that knows the tasks, and the evaluation of
``merge.py test`` as a function call.

    pool = model_pool("configs/merge/pools/convnext-base-224_8-tasks.yaml")
    model = pool.load_model("_pretrained_")           # a ConvNextForImageClassification (a pool's family)
    merged = merge_backbone(pool, SimpleAverage())    # the backbone's tensors by checkpoint key
    report = evaluate(merged, pool.task_names, pool)  # Trainer.test, every test sample once

``evaluate`` runs the modules ``merge.py test`` runs (``MultiTaskDataModule``, a
``MultiTaskEvaluation``), through ``Trainer.test``: the numbers are exact on one device or many.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch import nn
from transformers import PreTrainedModel

from common.architectures import ARCHITECTURES, architecture_of
from datamodules.multitask import MultiTaskDataModule
from datamodules.tasks import get_task
from lightning_modules.backbones import backbone_from_state, heads_from_state
from lightning_modules.evaluation import MultiTaskEvaluation
from merging.errors import MergeError
from merging.methods import MergeMethod
from merging.pool import PRETRAINED, ModelPool
from merging.saved import save_merged
from merging.switch import SwitchModule

#: What ``evaluate`` evaluates: a backbone state dict (``merge_backbone``'s), a family's backbone
#: (``ConvNextModel``, ``ResNetModel``, ...), or its ``*ForImageClassification`` (its backbone; its
#: ``classifier`` where that is a ``SwitchModule``).
Model = Mapping[str, torch.Tensor] | nn.Module


def task_classnames(task: str) -> tuple[str, ...]:
    """The task registry's class names of ``task`` (any spelling; an unknown name is a ``DataError``)."""
    return get_task(task).classnames


def model_pool(models: Mapping[str, str | Mapping[str, Any]] | str | Path) -> ModelPool:
    """``ModelPool(models)`` whose ``load_model`` sizes and labels a head for an entry's
    ``dataset_name`` with the task registry's class names (FusionBench's ``dataset_name`` keys:
    ``cifar10``, ``svhn``, ...), checked here for every entry.

    Args:
        models: the pool, as for ``ModelPool``: a mapping name -> hub id, directory or FusionBench
            entry (``config_path``, ``pretrained``, ``dataset_name``), or a pool YAML file.
    """
    return ModelPool(models if isinstance(models, Mapping) else str(models), classnames=task_classnames)


def merged_classifier(pool: ModelPool, task: str, backbone: Mapping[str, torch.Tensor]) -> PreTrainedModel:
    """``task``'s fine-tuned classifier from ``pool`` with ``backbone`` (the backbone's tensors by
    checkpoint key, as ``merge_backbone`` returns them) in place of its own: what
    ``merge.py --model.export_dir`` writes for the task; ``pool.save_model`` saves it."""
    model = pool.load_model(task)
    family = pool.architecture
    merged = family.backbone_from_state(model.config, backbone)
    family.backbone_of(model).load_state_dict(merged.state_dict())
    return model


def save_merged_model(
    directory: str | Path,
    backbone: Mapping[str, torch.Tensor],
    pool: ModelPool,
    method: MergeMethod | None = None,
    overwrite: bool = False,
) -> None:
    """The merged model as ``merge.py test --model.save_dir`` writes it (the backbone, every task's
    fine-tuned head, the config, the image processor and ``merge.json``), whole or not at all;
    ``merge.py test --model.merged_model <directory>`` evaluates it again.

    Args:
        directory: where it goes.
        backbone: the merged backbone's tensors (``merge_backbone``'s).
        pool: the model pool it was merged from (heads, config, image processor).
        method: the merge method, recorded in ``merge.json`` (None: recorded as ``merged``).
        overwrite: replace an existing ``directory``.
    """
    heads = {task: pool.head(task) for task in pool.task_names}
    info = {
        "method": method.describe() if method is not None else "merged",
        "method_name": method.name if method is not None else "merged",
        "hyperparameters": method.hyperparameters() if method is not None else {},
        "models": dict(pool.sources),
        "tasks": {task: {"classnames": _labels(pool, task)} for task in pool.task_names},
    }
    config, processor_dir = pool.config(PRETRAINED), pool.directory(PRETRAINED)
    save_merged(directory, backbone, heads, config, processor_dir, info, overwrite, flag="overwrite=True")


def _labels(pool: ModelPool, task: str) -> list[str]:
    """The class names of ``task``'s fine-tuned head, from its config."""
    config = pool.config(task)
    return [str(config.id2label[index]) for index in range(config.num_labels)]


class ModelEvaluation(MultiTaskEvaluation):
    """One given backbone with the given heads on every task: ``evaluate``'s LightningModule.

    Args:
        tasks: the evaluated tasks, in the DataModule's order.
        classnames: class names per task.
        backbone: the backbone evaluated (a family's base model, ``ConvNextModel``, ...).
        heads: one head per task.
        name: the report's row name.
        report_dir: where the report files go (None: none are written).
        report_title: the report's heading.
        models: the model pool's entries, recorded in the report (None: not recorded).
    """

    def __init__(
        self,
        tasks: list[str],
        classnames: dict[str, list[str]],
        backbone: nn.Module,
        heads: SwitchModule,
        name: str,
        report_dir: str | None,
        report_title: str,
        models: dict[str, str] | None = None,
    ) -> None:
        super().__init__(tasks, classnames, report_dir, report_title)
        _check_heads(heads, self.classnames, backbone)
        # Held outside the module tree until build() makes them the row and the heads.
        self._given = (backbone, heads)
        self.name = name
        self.models = models

    def build(self) -> None:
        self.check_test_does_something(self.trainer)
        backbone, heads = self._given
        self.verify_identical_across_ranks(backbone.state_dict(), f"weights of '{self.name}'")
        self.rows[self.name] = backbone
        self.heads = heads

    def report_extra(self) -> dict[str, Any]:
        return {"models": self.models} if self.models is not None else {}

    def final_report(self) -> dict[str, Any]:
        """The report (the same content on every process)."""
        return self.report


def _check_heads(heads: SwitchModule, classnames: Mapping[str, list[str]], backbone: nn.Module) -> None:
    """A head per task, and each ``Linear`` one of the task's class count on the backbone's features."""
    config = getattr(backbone, "config", None)
    features = architecture_of(config).feature_size(config) if config is not None else None
    for task, names in classnames.items():
        head = heads.route(task)
        if not isinstance(head, nn.Linear):
            continue
        if head.out_features != len(names):
            raise MergeError(f"the head for task '{task}' has {head.out_features} outputs, but the task has {len(names)} classes")
        if features is not None and head.in_features != features:
            raise MergeError(f"the head for task '{task}' takes {head.in_features} features, but the backbone gives {features}")


def _classifiers() -> tuple[type, ...]:
    return tuple(record.classifier_class for record in ARCHITECTURES.values())


def _backbone(model: Model, pool: ModelPool | None) -> nn.Module:
    if isinstance(model, _classifiers()):
        return architecture_of(model.config).backbone_of(model)
    if isinstance(model, tuple(record.backbone_class for record in ARCHITECTURES.values())):
        return model
    if isinstance(model, Mapping):
        if pool is None:
            raise MergeError("a backbone given as tensors needs its config: pass pool= (the model pool it was merged from)")
        return backbone_from_state(pool.config(PRETRAINED), model)
    names = ", ".join(
        f"{record.classifier_class.__name__}, {record.backbone_class.__name__}" for record in ARCHITECTURES.values()
    )
    raise MergeError(
        f"cannot evaluate a {type(model).__name__}: give an image classifier or backbone of a supported family "
        f"({names}) or a backbone state dict (merge_backbone's)"
    )


def _heads(model: Model, heads: SwitchModule | Mapping[str, nn.Module] | None, pool: ModelPool | None, data) -> SwitchModule:
    if heads is None and isinstance(model, _classifiers()) and isinstance(getattr(model, "classifier", None), SwitchModule):
        heads = model.classifier  # FusionBench's way: the merged model's classifier, switched per task
    if heads is None:
        if pool is None:
            raise MergeError(
                "no heads to evaluate with: pass heads= (a SwitchModule or task -> head) or pool= (its fine-tuned heads)"
            )
        pool.check_heads(data.classnames)
        return heads_from_state({task: pool.head(task) for task in data.task_names})
    if isinstance(heads, SwitchModule):
        return heads
    return SwitchModule({get_task(task).name: head for task, head in heads.items()})


def evaluate(
    model: Model,
    tasks: Sequence[str],
    pool: ModelPool | None = None,
    heads: SwitchModule | Mapping[str, nn.Module] | None = None,
    *,
    name: str = "merged",
    paths: Mapping[str, str] | None = None,
    processor: str | None = None,
    batch_size: int = 128,
    num_workers: int = 2,
    report_dir: str | Path | None = None,
    title: str | None = None,
    trainer: Trainer | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on every task of ``tasks`` with each task's own head, through
    ``Trainer.test`` with the DataModule and evaluation of ``merge.py test``: every test sample
    scored once, on one device or many (a ``trainer`` with ``devices``/``strategy``; with DDP
    every process runs the calling script, as Lightning launches it).

    Args:
        model: a backbone state dict (``merge_backbone``'s; built with ``pool``'s config), a family's
            backbone (``ConvNextModel``, ``ResNetModel``, ...), or its ``*ForImageClassification``
            (its backbone; its ``classifier`` is the heads where it is a ``SwitchModule``, as in
            FusionBench's example).
            Used as it is: the trainer moves it to its device.
        tasks: the tasks, in report order (registry names, any spelling).
        pool: the model pool: the config for a state dict, the fine-tuned heads where ``heads``
            is not given, the image processor where ``processor`` is not given.
        heads: a ``SwitchModule`` of one head per task, or a mapping task -> head.
        name: the report's row name.
        paths: data location per task where it differs from the task's hub id.
        processor: hub id or directory of the image processor (default: ``pool``'s pretrained model's).
        batch_size: images per device and batch.
        num_workers: DataLoader worker processes per device and task.
        report_dir: write ``report.json``, ``report.md``, ``report.csv`` and the two figures here
            (None: no file; the report is returned).
        title: the report's heading (default: ``Evaluated model: <name>``).
        trainer: the ``Trainer`` to test with (default: one device, no logger, no checkpoints).

    Returns:
        The content of ``report.json``: per row (``name``) and task accuracy, loss and number of
        samples, and the averages; the same dict on every process.
    """
    if processor is None:
        if pool is None:
            raise MergeError("no image processor: pass processor= (a hub id or directory) or pool= (its pretrained model's)")
        processor = pool.sources[PRETRAINED]
    data = MultiTaskDataModule(list(tasks), paths=dict(paths) if paths else None, processor=processor,
                               batch_size=batch_size, num_workers=num_workers)  # fmt: skip
    module = ModelEvaluation(
        data.task_names,
        data.classnames,
        _backbone(model, pool),
        _heads(model, heads, pool, data),
        name,
        str(report_dir) if report_dir is not None else None,
        title or f"Evaluated model: {name}",
        dict(pool.sources) if pool is not None else None,
    )
    if trainer is None:
        trainer = Trainer(devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.test(module, datamodule=data, verbose=False)
    return module.final_report()
