"""A merged backbone with one task's own head, exported as a plain Hugging Face image
classifier (``--model.export_dir`` of ``merge.py``), by the ``MergedModelExport`` callback."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from safetensors.torch import save_file
from transformers import PretrainedConfig

from common.architectures import architecture_of
from common.checkpoints import is_hub_id
from common.files import write_atomically
from datamodules.loaders import evaluates_nothing
from merging.pool import PRETRAINED


def classifier_config(config: PretrainedConfig, classnames: Sequence[str]) -> PretrainedConfig:
    """A copy of the backbone's ``config`` as its family's ``*ForImageClassification``
    (``ConvNextForImageClassification``, ...) for these classes."""
    config = copy.deepcopy(config)
    config.id2label = dict(enumerate(classnames))
    config.label2id = {name: index for index, name in enumerate(classnames)}
    config.architectures = [architecture_of(config).classifier_class.__name__]
    return config


def write_classifier(
    directory: Path,
    backbone: Mapping[str, torch.Tensor],
    head: Mapping[str, torch.Tensor],
    config: PretrainedConfig,
    processor_file: Path,
    card: str,
) -> None:
    """A Hugging Face image classifier in ``directory``: the backbone (under its checkpoint keys,
    behind the family's prefix) and the head (``{"weight", "bias"}``) under its family's head keys
    (``classifier.weight|bias``; ResNet's ``classifier.1.*``), ``config.json``, the image processor,
    ``README.md``."""
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in backbone.items()}
    head_state = architecture_of(config).head_state(head)
    tensors.update({key: tensor.detach().cpu().contiguous() for key, tensor in head_state.items()})
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(directory)
    shutil.copy(processor_file, directory / "preprocessor_config.json")
    (directory / "README.md").write_text(card)


def _accuracy_text(task: str, evaluation: Mapping[str, Any] | None) -> str:
    if evaluation is None:
        return "Not evaluated: exported without evaluating (`--trainer.limit_test_batches 0`)."
    text = (
        f"Top-1 accuracy on the {task} test split: **{100 * evaluation['accuracy']:.2f}%** "
        f"({int(evaluation['num_samples'])} images), measured by `merge.py test` in the run that exported this model."
    )
    if evaluation.get("partial"):
        text += " A partial run (`--trainer.limit_test_batches`): not the whole test split."
    return text


def merged_model_card(task: str, merge: Mapping[str, Any], evaluation: Mapping[str, Any] | None, family: str) -> str:
    """README.md of a merged model of ``family`` (``ConvNeXt``, ``ResNet``, ...) exported for
    ``task``: the method and its hyper-parameters
    and the model pool (``merge``: ``merge.json``'s fields), and the task's test accuracy
    (``evaluation``: ``accuracy``, ``num_samples``, ``partial``; None when not evaluated)."""
    models = dict(merge.get("models") or {})
    merged = [source for name, source in models.items() if name != PRETRAINED and is_hub_id(source)]
    front = ["---", "library_name: transformers", "pipeline_tag: image-classification"]
    if merged:
        front += ["base_model:", *(f"- {source}" for source in merged), "base_model_relation: merge"]
    front += ["tags:", "- convnext-fusion", "- model-merging", f"- {task}", "---", ""]
    per_task = (merge.get("per_task") or {}).get(task)
    lines = [
        f"# Merged {family} for {task}: {merge['method']}",
        "",
        f"A backbone merged by convnext-fusion (`merge.py`) from the model pool below, with the **{task}** "
        "model's own fine-tuned classification head.",
        "",
        *(
            [
                f"The method gives one backbone per task, which the task id picks at inference: this is the **{task}** "
                f"backbone, `theta_0 + s_t (m_t * v)` with this task's mask `m_t` (it keeps "
                f"{100 * per_task['kept_fraction']:.2f}% of the merged weights) and scale `s_t = {per_task['scale']:.6g}`.",
                "",
            ]
            if per_task
            else []
        ),
        "## Merge",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| method | {merge['method']} |",
        *(f"| {key} | {value} |" for key, value in (merge.get("hyperparameters") or {}).items()),
        "",
        "## Model pool",
        "",
        *(
            ["| model | checkpoint |", "| --- | --- |", *(f"| {name} | {source} |" for name, source in models.items())]
            if models
            else ["Not recorded."]
        ),  # fmt: skip
        "",
        "## Accuracy",
        "",
        _accuracy_text(task, evaluation),
        "",
    ]
    return "\n".join(front + lines)


class MergedModelExport(Callback):
    """Rank 0 writes, for every evaluated task, the merged backbone with that task's own head as a
    plain Hugging Face image classifier of the pool's family to ``<directory>/<task>``
    (``write_classifier``, each whole or absent: ``write_atomically``), with a model card giving the
    task's test accuracy from the module's ``report``; the other ranks wait for it. Written at the
    end of the test run; in a run that evaluates nothing (``evaluates_nothing``) at its teardown,
    right after merging, the card saying it was not evaluated.

    The module (``MergedClassifier``) gives what is written: ``tasks``, ``classnames``, ``heads``,
    ``merged_row()`` (the row's name), ``export_backbone(task)`` (the merged backbone, or the task's
    own where the method gives one backbone per task), ``backbone_config``, ``merge_info()`` (the
    method, its hyper-parameters, the pool) and ``processor_file()``. Its targets were checked
    before anything was merged.

    Args:
        directory: the root of the exports (``--model.export_dir``).
        overwrite: replace an existing ``<directory>/<task>``.
    """

    def __init__(self, directory: str, overwrite: bool) -> None:
        self.directory = directory
        self.overwrite = overwrite

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module, pl_module.report)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "test" and evaluates_nothing(trainer):
            self.export(trainer, pl_module, None)

    def export(self, trainer: Trainer, module: Any, report: Mapping[str, Any] | None) -> None:
        """Every task's classifier (with its accuracy from ``report``, None where not evaluated)."""
        if trainer.is_global_zero:
            name, _ = module.merged_row()
            config, info = module.backbone_config, module.merge_info()
            for task in module.tasks:
                backbone = module.export_backbone(task)  # under the checkpoint keys; a per-task method's own for the task
                evaluation = None
                if report is not None:
                    evaluation = {**report["rows"][name]["tasks"][task], "partial": bool(report.get("partial"))}
                card = merged_model_card(task, info, evaluation, architecture_of(config).name)
                target = Path(self.directory, task)
                head = module.heads.route(task).state_dict()
                classifier = classifier_config(config, module.classnames[task])
                write = partial(
                    write_classifier,
                    backbone=backbone,
                    head=head,
                    config=classifier,
                    processor_file=module.processor_file(),
                    card=card,
                )
                write_atomically(target, write, self.overwrite, flag="--model.overwrite true", what="model.export_dir")
                print(f"exported the merged model with the {task} head to {target}")
        trainer.strategy.barrier("export merged models")
