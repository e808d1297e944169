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
each whole task vector; it runs one model at a time. PCB's weights mix the tasks and are
normalised over every entry of the backbone: its statistics take passes over the whole pool
(``MergeMethod.pool_statistics``, each key's task vectors at a time, torch on one thread) before
the merge. RegMean merges each Linear weight from
the stream of fine-tuned weights and the tasks' Gram matrices, which the caller gathered on
data (``grams``), on the Grams' device; Fisher merging each parameter from the fine-tuned
tensors and the tasks' diagonal Fishers (``fishers``), on theirs. ``TaskVectors`` is the one reader of the pool's
tensors and task vectors, for the merges here and for AdaMerging's stacked task vectors. A method
of one backbone per task (``MergeMethod.per_task``: TALL masks, EMR-Merging) goes through
``merge_per_task`` instead, the same way, into a ``PerTaskMerge``: the shared vector and each task's
mask (as bits) key by key, the tasks' scales from sums over the whole backbone.

What is merged is every floating-point backbone tensor (``ModelPool.merge_keys``: parameters and
BatchNorm's running statistics); integer counters (BatchNorm's ``num_batches_tracked``) are the
pretrained model's (``ModelPool.counter_keys``). Where a method treats some tensors by a rule of
its own (``MergeMethod.special_keys``: 2-D matrices, Linear weights) and the pool's family has none
(a ResNet's are all 4-D kernels), one line says, before merging, what the merge then is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from rich.progress import track
from torch import Tensor

from common.errors import CheckpointError
from common.reader import CheckpointReader
from merging.errors import MergeError
from merging.methods import MergeMethod
from merging.per_task import BIT_BLOCK, PerTaskMerge, pack_bits
from merging.pool import PRETRAINED, ModelPool

#: Entries per slice in the slice-wise merge of an elementwise method: a slice of every
#: model (256 KiB each in float32) and the method's temporaries stay in the CPU cache, where a
#: whole-tensor merge would stream each intermediate of the largest tensors through memory.
SLICE = 1 << 16
assert SLICE % BIT_BLOCK == 0  # a per-task merge packs each slice's mask bits on their own (merging.per_task.pack_bits)


def _all_finite(tensor: Tensor) -> bool:
    """``torch.isfinite(tensor).all()`` in one pass without a mask (NaN propagates through
    ``aminmax``, +-Inf is its max or min): several times faster on CPU."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


#: A part of one tensor: ``None`` for the whole tensor in its shape, or ``(start, stop)`` for
#: those entries of it flattened (row-major).
Region = tuple[int, int] | None


def _regions(numel: int) -> Iterator[tuple[int, int]]:
    """The slices of ``SLICE`` entries that cover a tensor of ``numel`` entries."""
    for start in range(0, numel, SLICE):
        yield start, min(start + SLICE, numel)


class TaskVectors:
    """The pool's tensors, read key by key when asked, each into a reused buffer: the
    pretrained one (``pretrained_tensor``) and, through ``of``, the fine-tuned ones or their
    task vectors, whole or a flat slice at a time (``Region``).

    With ``check`` on, every tensor read is checked for NaN/Inf (each pretrained key once) and
    a bad one raises ``CheckpointError`` naming its file and key. ``transform`` maps each task
    vector before it is handed over (``MergeMethod.transform``: DARE's drop-and-rescale);
    the identity when not given.
    """

    def __init__(
        self, pool: ModelPool, check: bool = True, transform: Callable[[Tensor, int, str], Tensor] | None = None
    ) -> None:
        self.check = check
        self.transform = transform
        self.pretrained = pool.reader(PRETRAINED)
        self.finetuned = [pool.reader(task) for task in pool.task_names]
        self._largest = max(_numel(self.pretrained.shape(key)) for key in pool.backbone_keys)
        self._scratch: dict[torch.dtype, Tensor] = {}
        self._local = threading.local()  # each merging thread's slice buffers
        self._pretrained_checked: set[str] = set()

    def pretrained_tensor(self, key: str, region: Region = None) -> Tensor:
        """``theta_0`` of ``key`` (or its ``region``) in float32."""
        tensor = self._read(self.pretrained, key, region, pretrained=True)
        if self.check and key not in self._pretrained_checked:
            self._check(tensor, key, include_pretrained=True)
            if region is None or region[1] == _numel(self.pretrained.shape(key)):
                self._pretrained_checked.add(key)  # its last slice: every entry was checked
        return tensor.to(torch.float32)

    def of(
        self, key: str, pretrained: Tensor | None, region: Region = None, tasks: Iterable[int] | None = None
    ) -> Iterator[Tensor]:
        """Task by task (all, or the indices ``tasks``): ``transform(theta_t - theta_0)`` in
        float32, or ``theta_t`` itself in its stored dtype where ``pretrained`` is ``None``;
        ``theta_t`` lives in a reused buffer, valid until the next one is read."""
        for index in tasks if tasks is not None else range(len(self.finetuned)):
            finetuned = self._read(self.finetuned[index], key, region, pretrained=False)
            if self.check:
                self._check(finetuned, key, include_pretrained=pretrained is not None)
            if pretrained is None:
                yield finetuned
            elif self.transform is None:
                yield finetuned.to(torch.float32) - pretrained
            else:  # no name holds the untransformed vector while the consumer works (DARE's is whole-tensor)
                yield self.transform(finetuned.to(torch.float32) - pretrained, index, key)

    def task_vector(self, index: int, key: str, sliced: bool) -> Tensor:
        """Task ``index``'s vector of ``key`` whole; ``sliced`` computes it a slice at a time
        (the same values: for a method that works entry by entry)."""
        if not sliced:
            return next(self.of(key, self.pretrained_tensor(key), tasks=[index]))
        shape = self.pretrained.shape(key)
        vector = torch.empty(_numel(shape), dtype=torch.float32)
        for start, stop in _regions(vector.numel()):
            region = (start, stop)
            vector[start:stop] = next(self.of(key, self.pretrained_tensor(key, region), region, [index]))
        return vector.view(shape)

    def _read(self, reader: CheckpointReader, key: str, region: Region, pretrained: bool) -> Tensor:
        """``key`` (or its ``region``) from ``reader``. Whole fine-tuned tensors share one
        buffer per dtype; slices have one per thread for the pretrained model and one for the
        fine-tuned ones; a whole pretrained tensor is a tensor of its own."""
        dtype = reader.dtype(key)
        if region is None:
            if pretrained:
                return reader.read(key)
            if dtype not in self._scratch:
                self._scratch[dtype] = torch.empty(self._largest, dtype=dtype)
            shape = reader.shape(key)
            return reader.read(key, out=self._scratch[dtype][: _numel(shape)].view(shape))
        start, stop = region
        buffers = self._local.__dict__.setdefault("slices", {})
        buffer = buffers.get((pretrained, dtype))
        if buffer is None or buffer.numel() < stop - start:
            buffer = buffers[(pretrained, dtype)] = torch.empty(max(SLICE, stop - start), dtype=dtype)
        return reader.read_slice(key, start, stop, out=buffer[: stop - start])

    def _check(self, tensor: Tensor, key: str, include_pretrained: bool) -> None:
        if tensor.is_floating_point() and not _all_finite(tensor):
            self.locate_non_finite(key, include_pretrained)

    def locate_non_finite(self, key: str, include_pretrained: bool) -> None:
        """Raise ``CheckpointError`` naming the first checkpoint (pretrained, then the
        fine-tuned ones in order) whose ``key`` holds a NaN/Inf: the one a check of whole
        tensors in reading order names, whatever part of the tensor showed it."""
        for reader in [self.pretrained, *self.finetuned] if include_pretrained else self.finetuned:
            tensor = reader.read(key)
            if tensor.is_floating_point() and not _all_finite(tensor):
                raise CheckpointError(f"non-finite values (NaN/Inf) in '{key}' of '{reader.path_of(key)}'")


class _Merge:
    """One method's merge of the pool, key by key, over the pool's ``TaskVectors``."""

    def __init__(
        self,
        pool: ModelPool,
        method: MergeMethod,
        grams: Mapping[str, Sequence[Tensor]],
        fishers: Mapping[str, Sequence[Tensor]] | None = None,
    ) -> None:
        self.method = method
        self.grams = grams
        self.fishers = fishers or {}
        # One weight per task from every key's Fisher (its norm over the whole backbone), once.
        self.fisher_coefficients = method.fisher_coefficients(self.fishers) if self.fishers else []
        self.inputs = TaskVectors(pool, check=not method.propagates_non_finite, transform=method.transform)
        self.pretrained = self.inputs.pretrained

    def task_vector(self, index: int, keys: list[str], read_through: set[int]) -> Iterator[Tensor]:
        """Task ``index``'s whole vector, key by key; ``index`` joins ``read_through`` once
        every key was read (and checked)."""
        for key in keys:
            yield self.inputs.task_vector(index, key, sliced=self.method.elementwise)
        read_through.add(index)

    def sweep(self, keys: list[str], progress: bool, description: str) -> Iterator[tuple[str, list[Tensor]]]:
        """One pass over the pool for ``MergeMethod.pool_statistics``: each key with its task
        vectors (whole, float32). Once a pass has read every key, every input was checked, and
        later reads (the other passes, the merge) skip the checks."""
        for key in track(keys, description=description, transient=True, disable=not progress):
            yield key, list(self.inputs.of(key, self.inputs.pretrained_tensor(key)))
        self.inputs.check = False

    def merge(self, key: str, statistics: Any) -> Tensor:
        """The merged tensor of ``key``, in the pretrained dtype."""
        dtype = self.pretrained.dtype(key)
        if key in self.grams:
            result = self._merge_linear(key)
            self._check_result(key, result)
            return result.to(dtype)
        if key in self.fishers:
            result = self.method.merge_fisher(self.inputs.of(key, None), self.fishers[key], self.fisher_coefficients).cpu()
            self._check_result(key, result)
            return result.to(dtype)
        if not self.method.elementwise:
            result = self._merge_region(key, None, statistics)
            self._check_result(key, result)
            return result.to(dtype)
        # Entry by entry, a flat slice at a time: the same values as the whole tensor at once.
        merged = torch.empty(self.pretrained.shape(key), dtype=dtype)
        flat = merged.view(-1)
        for start, stop in _regions(flat.numel()):
            result = self._merge_region(key, (start, stop), statistics)
            self._check_result(key, result)
            flat[start:stop].copy_(result)
        return merged

    def _merge_region(self, key: str, region: Region, statistics: Any) -> Tensor:
        pretrained = self.inputs.pretrained_tensor(key, region) if self.method.uses_pretrained else None
        return self.method.merge(pretrained, self.inputs.of(key, pretrained, region), statistics)

    def merge_masked(self, key: str) -> tuple[Tensor, Tensor, Tensor]:
        """A per-task method's merge of ``key`` (``PerTaskMethod.merge_masked``): the shared vector
        (float32, the key's shape), every task's mask as bits (``(T, ceil(n / 8))``) and the
        per-task sums over the whole tensor; an elementwise method's a flat slice at a time (the
        slices are whole blocks of the bit layout but for the last: each one's bits are its own bytes)."""
        shape = self.pretrained.shape(key)
        regions = list(_regions(_numel(shape))) if self.method.elementwise else [None]
        vector = torch.empty(_numel(shape), dtype=torch.float32)
        masks = torch.empty((len(self.inputs.finetuned), -(-_numel(shape) // 8)), dtype=torch.uint8)
        sums: Tensor | None = None
        for region in regions:
            pretrained = self.inputs.pretrained_tensor(key, region)
            part = self.method.merge_masked(pretrained, self.inputs.of(key, pretrained, region))
            start, stop = region if region is not None else (0, _numel(shape))
            self._check_result(key, part.vector)
            vector[start:stop] = part.vector.reshape(-1)
            masks[:, start // 8 : -(-stop // 8)] = pack_bits(part.masks.reshape(len(masks), -1))
            sums = part.sums.clone() if sums is None else sums.add_(part.sums)
        return vector.view(shape), masks, sums

    def _merge_linear(self, key: str) -> Tensor:
        """A Linear weight from the fine-tuned weights and the tasks' Grams (on their device), back on the CPU."""
        try:
            return self.method.merge_linear(self.inputs.of(key, None), self.grams[key]).cpu()
        except torch.linalg.LinAlgError as error:
            raise MergeError(
                f"merging '{key}' with {self.method.describe()}: the summed Gram matrix is singular ({error})"
            ) from error

    def _check_result(self, key: str, result: Tensor) -> None:
        if not _all_finite(result):
            self.inputs.locate_non_finite(key, include_pretrained=self.method.uses_pretrained)
            raise CheckpointError(f"merging '{key}' gave non-finite values (overflow) with {self.method.describe()}")


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def merge_backbone(
    pool: ModelPool,
    method: MergeMethod,
    progress: bool = True,
    grams: Mapping[str, Sequence[Tensor]] | None = None,
    fishers: Mapping[str, Sequence[Tensor]] | None = None,
    images: Any = None,
) -> dict[str, Tensor]:
    """The merged backbone tensors of ``pool`` under ``method`` (every key behind the family's
    backbone prefix: ``ModelPool.backbone_keys``), in the pretrained dtype; the
    integer counters are the pretrained model's (``ModelPool.counter_keys``).

    A method with ``needs_grams`` (RegMean) also takes ``grams``: per Linear weight key, the
    Gram matrix of that layer's inputs in each fine-tuned model, in the order of
    ``pool.task_names``; those keys go through ``method.merge_linear``, the others through
    ``method.merge``. A method with ``needs_fisher`` (Fisher merging) takes ``fishers`` instead:
    per parameter key, each fine-tuned model's diagonal Fisher (pool order); those keys go through
    ``method.merge_fisher``, with the per-task weights ``method.fisher_coefficients`` gives once. A
    method with ``needs_images`` (RegMean++) takes ``images`` (``merging.regmean_plusplus.ImageBatches``:
    each task's preprocessed train images) and merges the pool itself, block after block
    (``method.merge_with_images``).

    ``progress`` shows the progress bar and the line of ``MergeMethod.plain_merge_note`` where the
    family has none of the tensors the method treats specially (on the first process only).

    Raises ``CheckpointError`` naming the file and key of any NaN/Inf input; the check runs
    on the outputs where the method is a plain sum (a non-finite input always shows there)
    and on every input otherwise; a pool without fine-tuned models is a ``MergeError``
    (``ModelPool.check_mergeable``).
    """
    if method.per_task:
        raise MergeError(
            f"{method.describe()} gives one backbone per task (the task id picks it at inference), not one merged "
            "backbone: merge the pool with merging.merge_per_task"
        )
    pool.check_mergeable()
    pool.check_backbones()
    keys = pool.merge_keys
    linear_inputs = "the Gram matrices of the Linear layers' inputs"
    _check_per_key_statistics(method, grams, method.needs_grams, keys, len(pool.task_names), linear_inputs, "Gram matrices")
    fisher = "the diagonal Fisher of every fine-tuned model"
    _check_per_key_statistics(method, fishers, method.needs_fisher, keys, len(pool.task_names), fisher, "Fishers")
    if method.needs_images != (images is not None):
        raise MergeError(
            f"{method.describe()} runs the models on each task's unlabelled train images: set data.gram_images"
            if method.needs_images
            else f"{method.describe()} merges without images: none should be given"
        )
    if method.needs_images:
        return method.merge_with_images(pool, images, progress)
    run = _Merge(pool, method, grams or {}, fishers)
    method.prepare(pool.task_names, keys)
    if progress:
        _say_what_is_special(pool, method, keys, grams)
    merged = _merge_keys(pool, method, run, keys, progress)
    for key in pool.counter_keys:
        merged[key] = run.pretrained.read(key)
    return {key: merged[key] for key in pool.backbone_keys}


def _merge_keys(pool: ModelPool, method: MergeMethod, run: _Merge, keys: list[str], progress: bool) -> dict[str, Tensor]:
    """``keys`` merged by ``method`` over ``run``'s inputs."""
    statistics: Any = []
    workers = torch.get_num_threads()
    with _one_thread() if method.elementwise else nullcontext():
        if method.needs_pool_statistics:  # an elementwise method works in cache-sized blocks: one thread, as its merge
            statistics = method.pool_statistics(partial(run.sweep, keys, progress))
        if method.needs_task_statistics:
            read_through: set[int] = set()
            for index in range(len(pool.task_names)):
                statistics.append(method.task_statistic(run.task_vector(index, keys, read_through)))
            if len(read_through) == len(pool.task_names):
                # Every input passed the checks above: the merge reads the same tensors again.
                run.inputs.check = False
        return _map_keys(method, keys, partial(run.merge, statistics=statistics), progress, workers)


def _map_keys(
    method: MergeMethod, keys: list[str], merge_key: Callable[[str], Any], progress: bool, workers: int
) -> dict[str, Any]:
    """``merge_key(key)`` for every key, in key order; an elementwise method's on ``workers``
    threads (torch's own count, which the caller has set to one)."""
    in_order = partial(track, description=f"merging ({method.describe()})", transient=True, disable=not progress)
    merged: dict[str, Any] = {}
    if not method.elementwise or workers == 1:
        for key in in_order(keys):
            merged[key] = merge_key(key)
        return merged
    # Sliced, a key takes one core: torch's threads become as many merging threads, each
    # on its own keys (the reads and the arithmetic release the GIL). Results are taken in
    # key order, so the first key to fail raises, as in a merge one key after another.
    with ThreadPoolExecutor(workers, thread_name_prefix="merge") as executor:
        futures = [executor.submit(merge_key, key) for key in keys]
        try:
            for key, future in zip(in_order(keys), futures):
                merged[key] = future.result()
        finally:
            for future in futures:
                future.cancel()
    return merged


def merge_per_task(pool: ModelPool, method: MergeMethod, progress: bool = True) -> PerTaskMerge:
    """One backbone per task of ``pool`` under a per-task ``method`` (``MergeMethod.per_task``: TALL
    masks, EMR-Merging), held compactly (``PerTaskMerge``: ``theta_0``, the shared vector, each task's
    mask as bits and its scale; ``PerTaskMerge.backbone(task)`` builds ``theta_t``). Streamed as
    ``merge_backbone`` streams: one tensor's task vectors in flight (a slice of each, for an
    elementwise method), with the same checks (NaN/Inf inputs and results name the file and key)."""
    if not method.per_task:
        raise MergeError(f"{method.describe()} gives one merged backbone for every task: merge the pool with merge_backbone")
    pool.check_mergeable()
    pool.check_backbones()
    keys = pool.merge_keys
    run = _Merge(pool, method, {})
    method.prepare(pool.task_names, keys)
    if progress:
        _say_what_is_special(pool, method, keys, None)
    workers = torch.get_num_threads()
    with _one_thread() if method.elementwise else nullcontext():
        parts = _map_keys(method, keys, run.merge_masked, progress, workers)
    sums = None
    for _, _, key_sums in parts.values():  # in key order, whatever the threads: the same sums every run
        sums = key_sums.clone() if sums is None else sums.add_(key_sums)
    return PerTaskMerge(
        method=method.describe(),
        tasks=list(pool.task_names),
        pretrained={key: run.pretrained.read(key) for key in pool.backbone_keys},
        vectors={key: vector for key, (vector, _, _) in parts.items()},
        masks={key: masks for key, (_, masks, _) in parts.items()},
        scales=method.task_scales(sums),
    )


def _say_what_is_special(
    pool: ModelPool, method: MergeMethod, keys: list[str], grams: Mapping[str, Sequence[Tensor]] | None
) -> None:
    """One line, before merging, where ``method`` would treat some tensors by its own rule and the
    pool's backbone has none of them: the merge is then a plainer one, which the line names."""
    reader = pool.reader(PRETRAINED)
    special = method.special_keys({key: reader.shape(key) for key in keys}, grams)
    if special is not None and not special:
        print(f"{method.describe()} on this {pool.architecture.name} backbone: {method.plain_merge_note(len(pool.task_names))}")


def _check_per_key_statistics(
    method: MergeMethod,
    given: Mapping[str, Sequence[Tensor]] | None,
    needed: bool,
    keys: list[str],
    num_tasks: int,
    what: str,
    name: str,
) -> None:
    """``given`` (per key, one tensor per fine-tuned model: Gram matrices, Fishers) is there exactly
    when ``method`` needs it (``needed``), for keys of the backbone, for every model. ``what``: what
    the method needs, for its error line; ``name``: the statistics' plural."""
    if needed and given is None:
        raise MergeError(
            f"{method.describe()} needs {what}, gathered on each task's unlabelled train images: set data.gram_images"
        )
    if given is not None and not needed:
        raise MergeError(f"{method.describe()} merges without {name}: none should be given")
    unknown = sorted(set(given or {}) - set(keys))
    if unknown:
        raise MergeError(f"{name[0].upper()}{name[1:]} for keys the backbone lacks: {', '.join(unknown[:3])}")
    short = [key for key, per_task in (given or {}).items() if len(per_task) != num_tasks]
    if short:
        raise MergeError(f"'{short[0]}' has {len(given[short[0]])} {name} for {num_tasks} fine-tuned models")


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
