"""One backbone per task, held compactly: what a mask-based merge method gives.

TALL masks and EMR-Merging do not give one merged backbone for every task: each task ``t`` gets
its own, from one vector ``v`` shared by all tasks, a binary mask ``m_t`` and a scalar ``s_t``:

    theta_t = theta_0 + s_t * (m_t ⊙ v)              (per merged tensor; counters stay theta_0's)

so the task id must be known at inference (it picks ``theta_t``, as it picks the head). Held as
``T`` full backbones this is ``T`` times the memory of one; ``PerTaskMerge`` keeps ``theta_0``,
``v`` (float32), the masks as bits (``T`` bits a weight: 1/32 of a float32 backbone per task) and
the ``s_t``, and builds a task's backbone when it is asked for (``PerTaskMerge.backbone``): for a
convnext-base pool of eight tasks, 0.70 GB and 88 MB of bits, where eight backbones are 2.8 GB.

A method that works so subclasses ``PerTaskMethod``: ``merge_masked`` gives, for one parameter
tensor (or a flat slice of it, for an ``elementwise`` method), ``v``, the ``T`` masks and per-task
sums it needs over the whole backbone (``MaskedPart``), and ``task_scales`` turns those sums,
added over every tensor, into the ``s_t``. ``merging.engine.merge_per_task`` streams the pool
through it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods import MergeMethod

#: Entries per block of the bit layout (``pack_bits``): the merge engine's slices are whole blocks.
BIT_BLOCK = 1 << 16
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8).view(8, 1)


def _pack_planes(bits: Tensor) -> Tensor:
    """``(..., 8, m)`` zeros and ones (uint8) as ``(..., m)`` bytes, plane ``b`` in bit ``b``."""
    packed = bits[..., 0, :].clone()
    for bit in range(1, 8):
        packed.bitwise_or_(bits[..., bit, :].bitwise_left_shift(bit))
    return packed


def pack_bits(masks: Tensor) -> Tensor:
    """``(..., n)`` booleans as ``(..., ceil(n / 8))`` bytes (a block's bytes are ``BIT_BLOCK / 8``). In each
    block of ``BIT_BLOCK`` entries (the last one ``L <= BIT_BLOCK`` long), entry ``e`` is bit ``e // m`` of
    byte ``e % m``, ``m = ceil(L / 8)``: eight contiguous bit planes, packed by eight shifts (where
    consecutive entries in one byte take a strided pass per bit). A slice of whole blocks packs into
    its own bytes of the whole: the engine packs slice by slice."""
    count, lead = masks.shape[-1], masks.shape[:-1]
    full = count // BIT_BLOCK
    parts = []
    if full:
        head = masks[..., : full * BIT_BLOCK].to(torch.uint8).reshape(*lead, full, 8, BIT_BLOCK // 8)
        parts.append(_pack_planes(head).reshape(*lead, -1))
    rest = count - full * BIT_BLOCK
    if rest:
        width = -(-rest // 8)
        tail = torch.nn.functional.pad(masks[..., full * BIT_BLOCK :].to(torch.uint8), (0, 8 * width - rest))
        parts.append(_pack_planes(tail.reshape(*lead, 8, width)))
    return torch.cat(parts, dim=-1) if parts else torch.empty((*lead, 0), dtype=torch.uint8)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """``pack_bits``' inverse: the ``count`` booleans of ``(..., bytes)`` packed bits."""
    lead = packed.shape[:-1]
    full = count // BIT_BLOCK
    head_bytes = full * BIT_BLOCK // 8
    parts = []
    if full:
        head = packed[..., :head_bytes].reshape(*lead, full, 1, BIT_BLOCK // 8)
        parts.append(head.bitwise_right_shift(_BIT_SHIFTS).bitwise_and_(1).reshape(*lead, -1))
    rest = count - full * BIT_BLOCK
    if rest:
        tail = packed[..., head_bytes : head_bytes + -(-rest // 8)].unsqueeze(-2)
        parts.append(tail.bitwise_right_shift(_BIT_SHIFTS).bitwise_and_(1).reshape(*lead, -1)[..., :rest])
    if not parts:
        return torch.empty((*lead, 0), dtype=torch.bool)
    bits = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return bits.view(torch.bool)  # bytes of 0 and 1: booleans as torch stores them


@dataclass
class MaskedPart:
    """A per-task method's merge of one parameter tensor (or flat slice): ``vector`` the shared
    ``v`` (float32, the part's shape), ``masks`` the ``T`` masks (bool, ``(T, *shape)``), and
    ``sums`` (float64, ``(T, S)``): per task, ``S`` numbers that add up over the parts of the
    backbone, from which ``PerTaskMethod.task_scales`` computes the ``s_t`` (``S = 0`` where none)."""

    vector: Tensor
    masks: Tensor
    sums: Tensor


class PerTaskMethod(MergeMethod):
    """A merge method that gives one backbone per task, ``theta_t = theta_0 + s_t (m_t ⊙ v)``
    (see the module's docstring); ``merging.engine.merge_per_task`` merges a pool with it, and
    ``merge_backbone`` refuses it (there is no one backbone to give)."""

    per_task = True

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        raise MergeError(f"{self.describe()} gives one backbone per task: merge the pool with merging.merge_per_task")

    @abstractmethod  # abstract: not offered as a --model.method choice
    def merge_masked(self, pretrained: Tensor, task_vectors: Iterable[Tensor]) -> MaskedPart:
        """``v``, the masks and the per-task sums of one parameter tensor (or flat slice)."""

    def task_scales(self, sums: Tensor) -> list[float]:
        """The ``s_t`` from the per-task sums of ``merge_masked`` over the whole backbone (``(T, S)``)."""
        return [1.0] * sums.shape[0]


@dataclass
class PerTaskMerge:
    """One backbone per task: ``theta_t = theta_0 + s_t (m_t ⊙ v)`` on the merged keys, ``theta_0``
    on the integer counters (``ModelPool.counter_keys``), built when asked for (``backbone``).

    Attributes:
        method: the method as reports name it (``MergeMethod.describe``).
        tasks: the tasks, in the pool's order (mask ``t`` and scale ``t`` are ``tasks[t]``'s).
        pretrained: ``theta_0`` of every backbone key, as stored.
        vectors: per merged key, ``v`` (float32).
        masks: per merged key, every task's mask as bits, ``(T, ceil(n / 8))`` bytes (``pack_bits``).
        scales: ``s_t`` per task.
    """

    method: str
    tasks: list[str]
    pretrained: dict[str, Tensor]
    vectors: dict[str, Tensor]
    masks: dict[str, Tensor]
    scales: list[float]

    def index(self, task: str) -> int:
        if task not in self.tasks:
            raise MergeError(f"{self.method} has no backbone for task '{task}' (tasks: {', '.join(self.tasks)})")
        return self.tasks.index(task)

    def mask(self, task: str, key: str) -> Tensor:
        """Task ``task``'s mask of ``key``, in the tensor's shape."""
        shape = self.vectors[key].shape
        return unpack_bits(self.masks[key][self.index(task)], shape.numel()).view(shape)

    def backbone(self, task: str) -> dict[str, Tensor]:
        """``theta_t`` of ``task``, every backbone key, in the pretrained dtype: per merged key
        ``theta_0 + s_t (m_t ⊙ v)`` in float32 (``s_t`` rounded to float32, one product, one sum)."""
        scale = torch.tensor(self.scales[self.index(task)], dtype=torch.float32)
        state = {}
        for key, theta_0 in self.pretrained.items():
            if key not in self.vectors:
                state[key] = theta_0
                continue
            masked = torch.where(self.mask(task, key), self.vectors[key], 0.0)
            state[key] = masked.mul_(scale).add_(theta_0).to(theta_0.dtype)
        return state

    def tensors(self) -> dict[str, Tensor]:
        """Everything the backbones are built from, by name (for a digest: the same on every process)."""
        named = {f"pretrained/{key}": tensor for key, tensor in self.pretrained.items()}
        named.update({f"vector/{key}": tensor for key, tensor in self.vectors.items()})
        named.update({f"masks/{key}": tensor for key, tensor in self.masks.items()})
        named["scales"] = torch.tensor(self.scales, dtype=torch.float64)
        return named

    def scale_of(self) -> dict[str, float]:
        """``s_t`` by task."""
        return dict(zip(self.tasks, self.scales))

    def kept_fraction(self) -> dict[str, float]:
        """Per task, the share of the merged weights its mask keeps."""
        total = sum(vector.numel() for vector in self.vectors.values())
        kept = {task: 0 for task in self.tasks}
        for key in self.vectors:
            for index, task in enumerate(self.tasks):
                kept[task] += int(unpack_bits(self.masks[key][index], self.vectors[key].numel()).sum())
        return {task: count / total if total else 0.0 for task, count in kept.items()}
