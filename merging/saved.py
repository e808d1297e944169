"""A merged model on disk: the merged backbone and every task's head, evaluable again.

Layout: ``model.safetensors`` (the backbone under its checkpoint keys, behind the family's prefix,
``Architecture.prefix``; ``heads.<task>.weight|bias``), ``config.json`` (the pretrained
model's config, whose ``model_type`` names the family), ``preprocessor_config.json``,
``merge.json`` (method, hyper-parameters, model pool, tasks and their labels).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, PretrainedConfig

from common.errors import CheckpointError
from common.files import write_atomically
from common.reader import CheckpointReader

HEAD_PREFIX = "heads."
INFO_FILE = "merge.json"


@dataclass
class MergedModel:
    """What ``load_merged`` returns."""

    config: PretrainedConfig
    backbone: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    info: dict[str, Any]


def _write(
    directory: Path,
    backbone: Mapping[str, torch.Tensor],
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    config: PretrainedConfig,
    processor_dir: Path | None,
    info: Mapping[str, Any],
) -> None:
    tensors = {key: tensor.contiguous() for key, tensor in backbone.items()}
    for task, head in heads.items():
        for name, tensor in head.items():
            tensors[f"{HEAD_PREFIX}{task}.{name}"] = tensor.detach().contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(directory)
    if processor_dir is not None and (processor_dir / "preprocessor_config.json").is_file():
        shutil.copy(processor_dir / "preprocessor_config.json", directory / "preprocessor_config.json")
    (directory / INFO_FILE).write_text(json.dumps(dict(info), indent=2) + "\n")


def save_merged(
    directory: str | Path,
    backbone: Mapping[str, torch.Tensor],
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    config: PretrainedConfig,
    processor_dir: Path | None,
    info: Mapping[str, Any],
    overwrite: bool = False,
    what: str | None = None,
    flag: str = "--model.overwrite true",
) -> None:
    """Write the merged model to ``directory``, whole or not at all (``what``: the option that
    named it, for the message of a write the file system refuses; ``flag``: what replaces an
    existing ``directory``, for the message that refuses it)."""
    write = partial(_write, backbone=backbone, heads=heads, config=config, processor_dir=processor_dir, info=info)
    write_atomically(Path(directory), write, overwrite, flag=flag, what=what)


def load_merged(directory: str | Path) -> MergedModel:
    """Read a directory written by ``save_merged``."""
    directory = Path(directory)
    if not (directory / INFO_FILE).is_file():
        raise CheckpointError(f"'{directory}' is not a saved merged model (no {INFO_FILE})")
    info = json.loads((directory / INFO_FILE).read_text())
    backbone: dict[str, torch.Tensor] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    with CheckpointReader(directory) as reader:
        for key, tensor in reader.items():
            if key.startswith(HEAD_PREFIX):
                task, name = key[len(HEAD_PREFIX) :].rsplit(".", 1)
                heads.setdefault(task, {})[name] = tensor
            else:
                backbone[key] = tensor
    return MergedModel(AutoConfig.from_pretrained(directory), backbone, heads, info)
