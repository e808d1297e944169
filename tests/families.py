"""Tiny models of every family of ``common.architectures``, for the tests that run each one.

One config per family on 32-pixel RGB images (8-16 channels, one or two blocks per stage), and
a pool builder: a "pretrained" checkpoint of the family (random weights, with ConvNeXt's layer
scale at 0.5 and ResNet's BatchNorm statistics drawn, as a trained model has them) and
"fine-tuned" copies with a seeded perturbation of every floating-point backbone tensor and a
fresh head sized for the task. Every checkpoint carries its family's own image processor, the
hub checkpoint's (``conftest.PREPROCESSORS``) at 32 pixels (``PROCESSORS``): ConvNeXt's,
ConvNeXt-V2's and ResNet's ``ConvNextImageProcessor`` (crop_pct 0.875: shorter side to 36,
centre crop 32), ViT's and Swin's ``ViTImageProcessor`` (resized to 32 x 32), DINOv2's
``BitImageProcessor`` (shorter side 36, centre crop 32), so a family's flow reads images as a
checkpoint of that family on the hub would have them read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import ConvNextV2Config, Dinov2Config, PretrainedConfig, ResNetConfig, SwinConfig, ViTConfig

import conftest
from common.architectures import ARCHITECTURES
from datamodules.tasks import get_task

PRETRAINED = "_pretrained_"

#: model_type -> the family's tiny config (no labels).
CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "convnext": lambda: conftest.tiny_config(image_size=32, patch_size=2),
    "convnextv2": lambda: ConvNextV2Config(num_stages=2, depths=[1, 1], hidden_sizes=[8, 16], image_size=32, patch_size=2),
    "resnet": lambda: ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
    "vit": lambda: ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8
    ),
    "dinov2": lambda: Dinov2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
    ),
    "swin": lambda: SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4),
}
#: Every family but the default, whose whole flow the rest of the suite runs.
OTHER_FAMILIES = tuple(model_type for model_type in CONFIGS if model_type != "convnext")


def _at_32_pixels(settings: dict) -> dict:
    """A hub processor's settings for 32-pixel images: 224 becomes 32 (256, DINOv2's shorter
    side before its crop, 36), whatever the format (an int ``size``, ``shortest_edge``, ``height``/``width``)."""
    settings = json.loads(json.dumps(settings))
    size = settings["size"]
    if isinstance(size, int):
        settings["size"] = 32
    elif "shortest_edge" in size:
        settings["size"] = {"shortest_edge": 36 if "crop_size" in settings else 32}
    else:
        settings["size"] = {"height": 32, "width": 32}
    if "crop_size" in settings:
        settings["crop_size"] = {"height": 32, "width": 32}
    return settings


#: model_type -> the ``preprocessor_config.json`` of its tiny checkpoints.
PROCESSORS = {model_type: _at_32_pixels(conftest.PREPROCESSORS[model_type]) for model_type in CONFIGS}


def family_config(model_type: str, classnames: Sequence[str] | None = None) -> PretrainedConfig:
    """The tiny config of ``model_type``, its head labelled with ``classnames`` where given."""
    config = CONFIGS[model_type]()
    if classnames is not None:
        config.num_labels = len(classnames)
        config.id2label = dict(enumerate(map(str, classnames)))
        config.label2id = {name: index for index, name in config.id2label.items()}
    return config


def save_checkpoint(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    processor = PROCESSORS[model.config.model_type]
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return directory


def as_if_trained(model: torch.nn.Module, generator: torch.Generator) -> None:
    """What a trained model has and an initialisation lacks: ConvNeXt's layer scale (1e-6 at init,
    every block a no-op) at 0.5; BatchNorm running statistics away from 0 and 1, and counters."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layer_scale_parameter"):
                parameter.fill_(0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(1000)


def make_pretrained(model_type: str, directory: Path, seed: int = 0) -> Path:
    """A ``_pretrained_`` checkpoint of the family (a 10-class head, like an ImageNet model's unused head)."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[model_type].classifier_class(family_config(model_type, [f"LABEL_{i}" for i in range(10)]))
    as_if_trained(model, torch.Generator().manual_seed(seed))
    return save_checkpoint(model, directory)


def make_finetuned(pretrained: Path, directory: Path, task: str, seed: int, scale: float = 0.05) -> Path:
    """``pretrained``'s backbone with ``scale * N(0, 1)`` added to every floating-point tensor (a
    BatchNorm variance scaled by ``exp`` of it, so it stays positive; its counter advanced by the
    seed), and a fresh head for ``task`` with the task's class names."""
    record = ARCHITECTURES[_model_type(pretrained)]
    base = record.classifier_class.from_pretrained(pretrained)
    classnames = list(get_task(task).classnames)
    torch.manual_seed(seed)
    model = record.classifier_class(family_config(record.model_type, classnames))
    generator = torch.Generator().manual_seed(seed)
    state = {key: tensor for key, tensor in model.state_dict().items() if record.is_head_key(key)}
    for key, tensor in base.state_dict().items():
        if record.is_head_key(key):
            continue
        if not tensor.is_floating_point():
            state[key] = tensor + 7 * (seed % 5 + 1)
        elif key.endswith("running_var"):
            state[key] = tensor * torch.exp(scale * torch.randn(tensor.shape, generator=generator))
        else:
            state[key] = tensor + scale * torch.randn(tensor.shape, generator=generator)
    model.load_state_dict(state, strict=True)
    return save_checkpoint(model, directory)


def make_pool(model_type: str, root: Path, tasks: Sequence[str], seed: int = 0) -> dict[str, str]:
    """``{"_pretrained_": dir, task: dir, ...}`` of one family under ``root``."""
    pretrained = make_pretrained(model_type, root / "pretrained", seed)
    pool = {PRETRAINED: str(pretrained)}
    for index, task in enumerate(tasks):
        pool[task] = str(make_finetuned(pretrained, root / f"finetuned_{task}", task, seed=1000 * (seed + 1) + index))
    return pool


def _model_type(directory: Path) -> str:
    return json.loads((Path(directory) / "config.json").read_text())["model_type"]
