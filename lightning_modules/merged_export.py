"""A merged backbone with one task's own head, exported as a plain Hugging Face image
classifier (``--model.export_dir`` of ``merge.py``)."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig

from common.architectures import architecture_of
from common.checkpoints import is_hub_id
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
    lines = [
        f"# Merged {family} for {task}: {merge['method']}",
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
