"""The merge side's models, built from tensors: a family's backbone from its checkpoint keys, a
fine-tuned backbone of the pool, and the per-task heads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from common.architectures import architecture_of
from merging.switch import SwitchModule


def backbone_from_state(config: PretrainedConfig, state: Mapping[str, torch.Tensor]) -> PreTrainedModel:
    """The backbone of ``config``'s family (``ConvNextModel``, ``ResNetModel``, ...) holding
    ``state`` (its checkpoint keys, behind the family's prefix), built without a random init
    (``common.architectures``)."""
    return architecture_of(config).backbone_from_state(config, state)


def load_backbone(pool: Any, task: str) -> PreTrainedModel:
    """Task ``task``'s fine-tuned backbone from ``pool``, frozen."""
    reader = pool.reader(task)
    state = {key: reader.read(key) for key in pool.backbone_keys}
    return backbone_from_state(pool.config(task), state).requires_grad_(False)


def heads_from_state(heads: Mapping[str, Mapping[str, torch.Tensor]]) -> SwitchModule:
    routes = {}
    for task, head in heads.items():
        linear = nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
        linear.load_state_dict({"weight": head["weight"], "bias": head["bias"]})
        routes[task] = linear
    return SwitchModule(routes)
