"""Stream the pool's checkpoints through a merge method, one parameter tensor at a time.

For each backbone key the engine reads that tensor from each fine-tuned checkpoint in
turn (``merging.reader``) and hands the stream to the method, which keeps a running
result: memory holds the merged backbone, one pretrained tensor and one or two tensors in
flight, whatever the number of models. TIES's per-task thresholds need a first pass over
each whole task vector; it runs one model at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from rich.progress import track
from torch import Tensor

from merging.errors import CheckpointError
from merging.methods import MergeMethod
from merging.pool import PRETRAINED, ModelPool
from merging.reader import CheckpointReader


def _check_finite(tensor: Tensor, reader: CheckpointReader, key: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"non-finite values (NaN/Inf) in '{key}' of '{reader.path_of(key)}'")


class _Streams:
    """The tensors of one key, read lazily from each fine-tuned checkpoint."""

    def __init__(self, pool: ModelPool, method: MergeMethod, check_inputs: bool) -> None:
        self.method = method
        self.check_inputs = check_inputs
        self.pretrained = pool.reader(PRETRAINED)
        self.finetuned = [pool.reader(task) for task in pool.task_names]
        self._largest = max(_numel(self.pretrained.shape(key)) for key in pool.backbone_keys)
        self._scratch: dict[torch.dtype, Tensor] = {}

    def _buffer(self, reader: CheckpointReader, key: str) -> Tensor:
        dtype, shape = reader.dtype(key), reader.shape(key)
        if dtype not in self._scratch:
            self._scratch[dtype] = torch.empty(self._largest, dtype=dtype)
        return self._scratch[dtype][: _numel(shape)].view(shape)

    def pretrained_tensor(self, key: str) -> Tensor:
        tensor = self.pretrained.read(key).to(torch.float32)
        if self.check_inputs:
            _check_finite(tensor, self.pretrained, key)
        return tensor

    def finetuned_tensors(self, key: str) -> Iterator[Tensor]:
        """``theta_t``, each in a reused buffer (valid until the next one is read)."""
        for reader in self.finetuned:
            tensor = reader.read(key, out=self._buffer(reader, key))
            if self.check_inputs:
                _check_finite(tensor, reader, key)
            yield tensor

    def task_vectors(self, key: str, pretrained: Tensor, tasks: range | None = None) -> Iterator[Tensor]:
        """``transform(theta_t - theta_0)`` for each task (DARE, or identity)."""
        for index in tasks if tasks is not None else range(len(self.finetuned)):
            reader = self.finetuned[index]
            finetuned = reader.read(key, out=self._buffer(reader, key))
            if self.check_inputs:
                _check_finite(finetuned, reader, key)
            yield self.method.transform(finetuned.to(torch.float32) - pretrained, index, key)

    def locate_non_finite(self, key: str) -> None:
        """Name the checkpoint behind a non-finite merge result."""
        for reader in [self.pretrained, *self.finetuned] if self.method.uses_pretrained else self.finetuned:
            _check_finite(reader.read(key), reader, key)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def merge_backbone(pool: ModelPool, method: MergeMethod, progress: bool = True) -> dict[str, Tensor]:
    """The merged ``convnext.*`` tensors of ``pool`` under ``method``, in the pretrained dtype.

    Raises ``CheckpointError`` naming the file and key of any NaN/Inf input; the check runs
    on the outputs where the method is a plain sum (a non-finite input always shows there)
    and on every input otherwise.
    """
    pool.check_backbones()
    streams = _Streams(pool, method, check_inputs=not method.propagates_non_finite)
    keys = pool.backbone_keys
    method.prepare(pool.task_names, keys)
    statistics: list[float] = []
    if method.needs_task_statistics:
        for index, task in enumerate(pool.task_names):
            vectors = (
                next(streams.task_vectors(key, streams.pretrained_tensor(key), range(index, index + 1)))
                for key in keys
            )
            statistics.append(method.task_statistic(vectors))
    merged: dict[str, Tensor] = {}
    for key in track(keys, description=f"merging ({method.describe()})", transient=True, disable=not progress):
        if method.uses_pretrained:
            pretrained = streams.pretrained_tensor(key)
            result = method.merge(pretrained, streams.task_vectors(key, pretrained), statistics)
        else:
            result = method.merge(None, streams.finetuned_tensors(key), statistics)
        if not torch.isfinite(result).all():
            streams.locate_non_finite(key)
            raise CheckpointError(f"merging '{key}' gave non-finite values (overflow) with {method.describe()}")
        merged[key] = result.to(pool.reader(PRETRAINED).dtype(key))
    return merged
