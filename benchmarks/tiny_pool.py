"""The tiny ConvNeXt pools the FusionBench check scripts merge both ways (project side only:
the FusionBench side runs those scripts as plain files, without this package)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

NOISE = 0.05


def write_tiny_pool(
    dirs: Mapping[str, Path],
    architecture: Mapping[str, Any],
    seed: int,
    after_each: Callable[[int, Any], None] | None = None,
) -> None:
    """A pretrained ConvNeXt of ``architecture`` (layer scale 0.5, as a trained model has
    rather than its 1e-6 init) in ``dirs["_pretrained_"]`` and, for each other entry in order,
    a copy with ``NOISE`` Gaussian noise on every tensor. ``after_each(index, generator)``
    runs after each fine-tuned copy is saved, with the noise's generator, so that what it
    draws (a task's images) interleaves with the noise in a fixed order. The same ``seed``
    writes the same files."""
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    pretrained = ConvNextForImageClassification(ConvNextConfig(**architecture, num_labels=10))
    with torch.no_grad():
        for name, parameter in pretrained.named_parameters():
            if name.endswith("layer_scale_parameter"):
                parameter.fill_(0.5)
    pretrained.save_pretrained(dirs["_pretrained_"])
    generator = torch.Generator().manual_seed(seed + 1)
    for index, directory in enumerate(path for name, path in dirs.items() if name != "_pretrained_"):
        model = ConvNextForImageClassification(ConvNextConfig(**architecture, num_labels=10))
        state = pretrained.state_dict()
        model.load_state_dict(
            {key: tensor + NOISE * torch.randn(tensor.shape, generator=generator) for key, tensor in state.items()}
        )
        model.save_pretrained(directory)
        if after_each is not None:
            after_each(index, generator)
