"""Gram matrices of the inputs of a backbone's Linear layers, gathered while it runs (RegMean).

A forward pre-hook on every ``nn.Linear`` flattens the layer's input over every dimension but
the last (batch and spatial positions: ConvNeXt's ``pwconv1``/``pwconv2`` get
``(batch, height, width, channels)``, a ViT's layers ``(batch, tokens, channels)``), one row per input vector ``x``, and adds ``X^T X`` and
the number of rows to that layer's running sums, on the input's device, in float32 (float64
where the backbone runs in float64, ``--trainer.precision 64-true``). Sums, not
means, so that they add up over batches and, with ``all_reduce_sum``, over processes: N
processes that each see a disjoint part of the images hold, once reduced, the sums of one
process that saw them all. ``mean_grams`` divides by the row counts at the end.

This module is the math, with no Lightning; ``lightning_modules.gram_pass`` runs it over the
data inside ``merge.py test`` (its one entry: ``MultiTaskEvaluation.start_gram_pass``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.architectures import architecture_of
from merging.errors import MergeError


def linear_layers(backbone: nn.Module) -> dict[str, nn.Linear]:
    """``{checkpoint key of its weight: module}`` for every ``nn.Linear`` of a family's backbone
    (``Architecture.checkpoint_keys``: a ConvNeXt's ``pwconv1``/``pwconv2`` weights, a ViT's
    ``encoder.layer.<i>.attention.attention.query.weight`` and the rest, behind the family's prefix):
    the keys the weights have in the family's classifier checkpoints, in the network's order. A
    ResNet has none."""
    keys = {name: key for key, name in architecture_of(backbone.config).checkpoint_keys(backbone.config).items()}
    return {keys[f"{name}.weight"]: module for name, module in backbone.named_modules() if isinstance(module, nn.Linear)}


class GramAccumulator(nn.Module):
    """Runs ``backbone`` (a frozen backbone of a family, ``ConvNextModel``, ``ViTModel``, ...) and sums ``X^T X`` of each Linear layer's inputs.

    Args:
        backbone: the model whose Linear layers are hooked; it becomes a submodule (moved with it).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        layers = linear_layers(backbone)
        self.keys = list(layers)
        self.dims = [layer.in_features for layer in layers.values()]
        # Allocated on the first input, on its device: no host copy of gigabytes of zeros.
        self.sums: list[Tensor | None] = [None] * len(self.keys)
        self.rows = [0] * len(self.keys)
        self.images = 0
        # The hooks record during this module's own forward only: a backbone it shares with
        # another pass (Fisher merging's gradients, in a comparison with both) adds nothing then.
        self._recording = False
        for index, layer in enumerate(layers.values()):
            layer.register_forward_pre_hook(partial(self._record, index))

    def dtype(self) -> torch.dtype:
        """Of the sums: the backbone's, at least float32."""
        return torch.promote_types(next(self.backbone.parameters()).dtype, torch.float32)

    def _record(self, index: int, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if not self._recording:
            return
        inputs = args[0].detach()
        rows = inputs.reshape(-1, inputs.shape[-1]).to(self.dtype())
        if self.sums[index] is None:
            self.sums[index] = torch.zeros(self.dims[index], self.dims[index], dtype=rows.dtype, device=rows.device)
        self.sums[index].addmm_(rows.T, rows)
        self.rows[index] += rows.shape[0]

    def forward(self, images: Tensor) -> None:
        self.images += images.shape[0]
        self._recording = True
        try:
            self.backbone(pixel_values=images)
        finally:
            self._recording = False

    def reduced_sums(self, device: torch.device) -> tuple[list[Tensor], list[int], int]:
        """``(sums, rows, images)`` over every process (zeros where this one saw no image)."""
        dtype = self.dtype()
        sums = [s if s is not None else torch.zeros(d, d, dtype=dtype, device=device) for s, d in zip(self.sums, self.dims)]
        for total in sums:
            all_reduce_sum(total)
        counts = torch.tensor([*self.rows, self.images], dtype=torch.int64, device=device)
        all_reduce_sum(counts)
        *rows, images = counts.tolist()
        return sums, rows, images


def all_reduce_sum(tensor: Tensor) -> None:
    """In place: the sum over all processes (nothing to do on one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def mean_grams(sums: list[Tensor], rows: list[int], keys: list[str], task: str) -> list[Tensor]:
    """``X^T X / N`` per layer (in place); a layer that saw no input is an error naming it."""
    for key, total, count in zip(keys, sums, rows):
        if count == 0:
            raise MergeError(f"no input reached '{key}' in the Gram pass of task '{task}'")
        total.div_(count)
    return sums
