"""Tiny models of every family of ``common.architectures``, for the tests that run each one.

One config per family on 32-pixel RGB images (8-16 channels, one or two blocks per stage), and
a pool builder: a "pretrained" checkpoint of the family (random weights, with ConvNeXt's layer
scale at 0.5 and ResNet's BatchNorm statistics drawn, as a trained model has them) and
"fine-tuned" copies with a seeded perturbation of every floating-point backbone tensor and a
fresh head sized for the task. Every checkpoint carries the 32-pixel ConvNeXt-style image
processor of the quickstart (``configs/quickstart/convnext-tiny-32``: shorter side 32, crop_pct
1.0): what ``datamodules.preprocessing`` reads today for every family (the families' own
processors, ViT's fixed-size resize and DINOv2's crop, come with the per-family preprocessing).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import ConvNextV2Config, Dinov2Config, PretrainedConfig, ResNetConfig, SwinConfig, ViTConfig

import conftest
from common.architectures import ARCHITECTURES
from conftest import REPO_ROOT
from datamodules.tasks import get_task

PROCESSOR_FILE = REPO_ROOT / "configs" / "quickstart" / "convnext-tiny-32" / "preprocessor_config.json"
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
    shutil.copy(PROCESSOR_FILE, directory / "preprocessor_config.json")
    return directory


def _give_weight(model: torch.nn.Module, generator: torch.Generator) -> None:
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
    _give_weight(model, torch.Generator().manual_seed(seed))
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
