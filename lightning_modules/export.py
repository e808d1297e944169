"""Export a fine-tuned or merged classifier as a self-describing Hugging Face checkpoint, atomically."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig

from datamodules.tasks import get_task
from merging.checkpoints import check_export_target, is_hub_id, write_atomically
from merging.pool import PRETRAINED

__all__ = [
    "check_export_target",
    "classifier_config",
    "export_name",
    "export_path",
    "merged_model_card",
    "model_card",
    "write_atomically",
    "write_classifier",
]


def export_name(model_name_or_path: str, task_hub_name: str, batch_size: int, lr: float, steps: int) -> str:
    """The public checkpoints' naming: ``convnext-base-224_dtd_sgd_batch-size-64_lr-0.01_steps-4000``."""
    base = Path(model_name_or_path.rstrip("/")).name
    return f"{base}_{task_hub_name}_sgd_batch-size-{batch_size}_lr-{lr:g}_steps-{steps}"


def export_path(config: Mapping[str, Any], steps: int) -> Path | None:
    """Where ``train.py fit`` with the resolved ``config`` (``fit``'s section, as a plain dict)
    exports after ``steps`` optimizer steps; None with ``export_dir: null``."""
    if config.get("export_dir") is None:
        return None
    model, data = config["model"], config["data"]
    name = config.get("export_name") or export_name(
        model["model_name_or_path"], get_task(data["task"]).hub_name, data["batch_size"], model["lr"], steps
    )
    return Path(config["export_dir"]) / name


def model_card(
    name: str, base_model: str, task: str, hub_dataset: str | None, recipe: Mapping[str, object], metrics: Mapping[str, float]
) -> str:
    """README.md of an exported checkpoint: what it is, how it was trained, how it scored."""
    front = ["---", "library_name: transformers", "pipeline_tag: image-classification", f"base_model: {base_model}"]
    if hub_dataset:
        front += ["datasets:", f"- {hub_dataset}"]
    front += ["tags:", "- convnext-fusion", f"- {task}", "---", ""]
    lines = [
        f"# {name}",
        "",
        f"`{base_model}` fine-tuned on **{task}** with convnext-fusion (`train.py fit`).",
        "",
        "## Recipe",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in recipe.items()),
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {key} | {value:.4f} |" for key, value in sorted(metrics.items())),
        "",
        "The resolved training configuration is in `train_config.yaml`.",
        "",
    ]
    return "\n".join(front + lines)


def classifier_config(config: PretrainedConfig, classnames: Sequence[str]) -> PretrainedConfig:
    """A copy of the backbone's ``config`` as a ``ConvNextForImageClassification`` for these classes."""
    config = copy.deepcopy(config)
    config.id2label = dict(enumerate(classnames))
    config.label2id = {name: index for index, name in enumerate(classnames)}
    config.architectures = ["ConvNextForImageClassification"]
    return config


def write_classifier(
    directory: Path,
    backbone: Mapping[str, torch.Tensor],
    head: Mapping[str, torch.Tensor],
    config: PretrainedConfig,
    processor_file: Path,
    card: str,
) -> None:
    """A Hugging Face image classifier in ``directory``: the ``convnext.*`` backbone and the
    head as ``classifier.weight|bias``, ``config.json``, the image processor, ``README.md``."""
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in backbone.items()}
    tensors.update({f"classifier.{name}": tensor.detach().cpu().contiguous() for name, tensor in head.items()})
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


def merged_model_card(task: str, merge: Mapping[str, Any], evaluation: Mapping[str, Any] | None) -> str:
    """README.md of a merged model exported for ``task``: the method and its hyper-parameters
    and the model pool (``merge``: ``merge.json``'s fields), and the task's test accuracy
    (``evaluation``: ``accuracy``, ``num_samples``, ``partial``; None when not evaluated)."""
    models = dict(merge.get("models") or {})
    merged = [source for name, source in models.items() if name != PRETRAINED and is_hub_id(source)]
    front = ["---", "library_name: transformers", "pipeline_tag: image-classification"]
    if merged:
        front += ["base_model:", *(f"- {source}" for source in merged), "base_model_relation: merge"]
    front += ["tags:", "- convnext-fusion", "- model-merging", f"- {task}", "---", ""]
    lines = [
        f"# Merged ConvNeXt for {task}: {merge['method']}",
        "",
        f"A backbone merged by convnext-fusion (`merge.py`) from the model pool below, with the **{task}** "
        "model's own fine-tuned classification head.",
        "",
        "## Merge",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| method | {merge['method']} |",
        *(f"| {key} | {value} |" for key, value in (merge.get("hyperparameters") or {}).items()),
        "",
        "## Model pool",
        "",
        *(["| model | checkpoint |", "| --- | --- |", *(f"| {name} | {source} |" for name, source in models.items())]
          if models else ["Not recorded."]),  # fmt: skip
        "",
        "## Accuracy",
        "",
        _accuracy_text(task, evaluation),
        "",
    ]
    return "\n".join(front + lines)
