"""Stream the pool's checkpoints through a merge method, one parameter tensor at a time.

For each backbone key the engine reads that tensor from each fine-tuned checkpoint in
turn (``common.reader``) and hands the stream to the method, which keeps a running
result: memory holds the merged backbone, one pretrained tensor and one or two tensors in
flight, whatever the number of models. A method that works entry by entry
(``MergeMethod.elementwise``: simple average, task arithmetic, TIES) gets each tensor in
flat slices of ``SLICE`` entries instead, read straight from the files, so that every
model's slice and the running result stay in the CPU cache: the same values, several times
faster, and only slices in flight. Such a merge runs torch on one thread and spreads the keys
over as many Python threads as torch had. TIES's per-task thresholds need a first pass over
each whole task vector; it runs one model at a time. RegMean merges each Linear weight from
the stream of fine-tuned weights and the tasks' Gram matrices, which the caller gathered on
data (``grams``), on the Grams' device.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from rich.progress import track
from torch import Tensor

from common.errors import CheckpointError
from common.reader import CheckpointReader
from merging.errors import MergeError
from merging.methods import MergeMethod
from merging.pool import PRETRAINED, ModelPool

#: Entries per slice in the slice-wise merge of an elementwise method: a slice of every
#: model (256 KiB each in float32) and the method's temporaries stay in the CPU cache, where a
#: whole-tensor merge would stream each intermediate of the largest tensors through memory.
SLICE = 1 << 16


def _all_finite(tensor: Tensor) -> bool:
    """``torch.isfinite(tensor).all()`` in one pass without a mask (NaN propagates through
    ``aminmax``, +-Inf is its max or min): several times faster on CPU."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _check_finite(tensor: Tensor, reader: CheckpointReader, key: str) -> None:
    if tensor.is_floating_point() and not _all_finite(tensor):
        raise CheckpointError(f"non-finite values (NaN/Inf) in '{key}' of '{reader.path_of(key)}'")


class _Streams:
    """The tensors of one key, read lazily from each fine-tuned checkpoint."""

    def __init__(self, pool: ModelPool, method: MergeMethod, check_inputs: bool, grams: Mapping[str, Sequence[Tensor]]) -> None:
        self.method = method
        self.grams = grams
        self.check_inputs = check_inputs
        self.pretrained = pool.reader(PRETRAINED)
        self.finetuned = [pool.reader(task) for task in pool.task_names]
        self._largest = max(_numel(self.pretrained.shape(key)) for key in pool.backbone_keys)
        self._scratch: dict[torch.dtype, Tensor] = {}
        self._local = threading.local()  # each merging thread's slice buffers
        self._pretrained_checked: set[str] = set()

    def _buffer(self, reader: CheckpointReader, key: str) -> Tensor:
        dtype, shape = reader.dtype(key), reader.shape(key)
        if dtype not in self._scratch:
            self._scratch[dtype] = torch.empty(self._largest, dtype=dtype)
        return self._scratch[dtype][: _numel(shape)].view(shape)

    def pretrained_tensor(self, key: str) -> Tensor:
        tensor = self.pretrained.read(key).to(torch.float32)
        if self.check_inputs and key not in self._pretrained_checked:
            _check_finite(tensor, self.pretrained, key)
            self._pretrained_checked.add(key)
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

    def task_vector(self, index: int, keys: list[str], read_through: set[int]) -> Iterator[Tensor]:
        """Task ``index``'s whole vector, key by key; ``index`` joins ``read_through`` once
        every key was read (and checked). Each pretrained tensor is checked the first time it
        is read only: the file and key that fail first are those of checking it every time."""
        for key in keys:
            if self.method.elementwise:
                yield self._task_vector_of_key(index, key)
            else:
                yield next(self.task_vectors(key, self.pretrained_tensor(key), range(index, index + 1)))
        read_through.add(index)

    def _task_vector_of_key(self, index: int, key: str) -> Tensor:
        """``transform(theta_t - theta_0)`` of ``key``, computed a slice at a time."""
        reader = self.finetuned[index]
        check_pretrained = self.check_inputs and key not in self._pretrained_checked
        shape = self.pretrained.shape(key)
        vector: Tensor | None = None
        numel = _numel(shape)
        for start in range(0, numel, SLICE):
            stop = min(start + SLICE, numel)
            pretrained = self._slice(self.pretrained, key, start, stop, pretrained=True, check=check_pretrained)
            finetuned = self._slice(reader, key, start, stop, pretrained=False)
            part = self.method.transform(finetuned.to(torch.float32) - pretrained.to(torch.float32), index, key)
            if vector is None:
                vector = torch.empty(numel, dtype=part.dtype)
            vector[start:stop] = part
        if check_pretrained:
            self._pretrained_checked.add(key)
        return vector.view(shape) if vector is not None else torch.empty(shape)

    def _slice(
        self, reader: CheckpointReader, key: str, start: int, stop: int, pretrained: bool, check: bool | None = None
    ) -> Tensor:
        """Entries ``start:stop`` of ``key`` in a reused buffer (one for the pretrained model,
        one for the fine-tuned ones), checked where inputs are."""
        dtype = reader.dtype(key)
        buffers = self._local.__dict__.setdefault("slices", {})
        buffer = buffers.get((pretrained, dtype))
        if buffer is None or buffer.numel() < stop - start:
            buffer = buffers[(pretrained, dtype)] = torch.empty(max(SLICE, stop - start), dtype=dtype)
        out = buffer if buffer.numel() == stop - start else buffer[: stop - start]
        tensor = reader.read_slice(key, start, stop, out=out)
        if self.check_inputs if check is None else check:
            if tensor.is_floating_point() and not _all_finite(tensor):
                self.locate_non_finite(key)  # raises, naming the file a whole-tensor merge names first
        return tensor

    def _finetuned_slices(self, key: str, start: int, stop: int) -> Iterator[Tensor]:
        for reader in self.finetuned:
            yield self._slice(reader, key, start, stop, pretrained=False)

    def _task_vector_slices(self, key: str, pretrained: Tensor, start: int, stop: int) -> Iterator[Tensor]:
        for index, reader in enumerate(self.finetuned):
            finetuned = self._slice(reader, key, start, stop, pretrained=False)
            yield self.method.transform(finetuned.to(torch.float32) - pretrained, index, key)

    def merge(self, key: str, statistics: list[float]) -> Tensor:
        """The merged tensor of ``key``, in the pretrained dtype."""
        method = self.method
        if key in self.grams:
            result = self._merge_linear(key)
            self._check_result(key, result)
            return result.to(self.pretrained.dtype(key))
        if not method.elementwise:
            if method.uses_pretrained:
                pretrained = self.pretrained_tensor(key)
                result = method.merge(pretrained, self.task_vectors(key, pretrained), statistics)
            else:
                result = method.merge(None, self.finetuned_tensors(key), statistics)
            self._check_result(key, result)
            return result.to(self.pretrained.dtype(key))
        # Entry by entry, a flat slice at a time: the same values as the whole tensor at once.
        merged = torch.empty(self.pretrained.shape(key), dtype=self.pretrained.dtype(key))
        flat = merged.view(-1)
        for start in range(0, flat.numel(), SLICE):
            stop = min(start + SLICE, flat.numel())
            if method.uses_pretrained:
                pretrained = self._slice(self.pretrained, key, start, stop, pretrained=True).to(torch.float32)
                result = method.merge(pretrained, self._task_vector_slices(key, pretrained, start, stop), statistics)
            else:
                result = method.merge(None, self._finetuned_slices(key, start, stop), statistics)
            self._check_result(key, result)
            flat[start:stop].copy_(result)
        return merged

    def _merge_linear(self, key: str) -> Tensor:
        """A Linear weight from the fine-tuned weights and the tasks' Grams (on their device), back on the CPU."""
        try:
            return self.method.merge_linear(self.finetuned_tensors(key), self.grams[key]).cpu()
        except torch.linalg.LinAlgError as error:
            raise MergeError(
                f"merging '{key}' with {self.method.describe()}: the summed Gram matrix is singular ({error})"
            ) from error

    def _check_result(self, key: str, result: Tensor) -> None:
        if not _all_finite(result):
            self.locate_non_finite(key)
            raise CheckpointError(f"merging '{key}' gave non-finite values (overflow) with {self.method.describe()}")

    def locate_non_finite(self, key: str) -> None:
        """Name the checkpoint behind a non-finite merge result."""
        for reader in [self.pretrained, *self.finetuned] if self.method.uses_pretrained else self.finetuned:
            _check_finite(reader.read(key), reader, key)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def merge_backbone(
    pool: ModelPool, method: MergeMethod, progress: bool = True, grams: Mapping[str, Sequence[Tensor]] | None = None
) -> dict[str, Tensor]:
    """The merged ``convnext.*`` tensors of ``pool`` under ``method``, in the pretrained dtype.

    A method with ``needs_grams`` (RegMean) also takes ``grams``: per Linear weight key, the
    Gram matrix of that layer's inputs in each fine-tuned model, in the order of
    ``pool.task_names``; those keys go through ``method.merge_linear``, the others through
    ``method.merge``.

    Raises ``CheckpointError`` naming the file and key of any NaN/Inf input; the check runs
    on the outputs where the method is a plain sum (a non-finite input always shows there)
    and on every input otherwise.
    """
    pool.check_backbones()
    keys = pool.backbone_keys
    _check_grams(method, grams, keys, len(pool.task_names))
    streams = _Streams(pool, method, check_inputs=not method.propagates_non_finite, grams=grams or {})
    method.prepare(pool.task_names, keys)
    statistics: list[float] = []
    merged: dict[str, Tensor] = {}
    workers = torch.get_num_threads()
    in_order = partial(track, description=f"merging ({method.describe()})", transient=True, disable=not progress)
    with _one_thread() if method.elementwise else nullcontext():
        if method.needs_task_statistics:
            read_through: set[int] = set()
            for index in range(len(pool.task_names)):
                statistics.append(method.task_statistic(streams.task_vector(index, keys, read_through)))
            if len(read_through) == len(pool.task_names):
                # Every input passed the checks above: the merge reads the same tensors again.
                streams.check_inputs = False
        if not method.elementwise or workers == 1:
            for key in in_order(keys):
                merged[key] = streams.merge(key, statistics)
            return merged
        # Sliced, a key takes one core: torch's threads become as many merging threads, each
        # on its own keys (the reads and the arithmetic release the GIL). Results are taken in
        # key order, so the first key to fail raises, as in a merge one key after another.
        with ThreadPoolExecutor(workers, thread_name_prefix="merge") as executor:
            futures = [executor.submit(streams.merge, key, statistics) for key in keys]
            try:
                for key, future in zip(in_order(keys), futures):
                    merged[key] = future.result()
            finally:
                for future in futures:
                    future.cancel()
    return merged


def _check_grams(method: MergeMethod, grams: Mapping[str, Sequence[Tensor]] | None, keys: list[str], num_tasks: int) -> None:
    if method.needs_grams and grams is None:
        raise MergeError(
            f"{method.describe()} needs the Gram matrices of the Linear layers' inputs, gathered on each task's "
            "unlabelled train images: set data.gram_images"
        )
    if grams is not None and not method.needs_grams:
        raise MergeError(f"{method.describe()} merges without Gram matrices: none should be given")
    unknown = sorted(set(grams or {}) - set(keys))
    if unknown:
        raise MergeError(f"Gram matrices for keys the backbone lacks: {', '.join(unknown[:3])}")
    short = [key for key, per_task in (grams or {}).items() if len(per_task) != num_tasks]
    if short:
        raise MergeError(f"'{short[0]}' has {len(grams[short[0]])} Gram matrices for {num_tasks} fine-tuned models")


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread: a slice is too small to share out (the threads would spend more
    time meeting than adding, and far more on a busy machine), and the results are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
