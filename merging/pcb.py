"""PCB-Merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
arXiv 2410.02396; authors' code ``duguodong7/pcb-merging``, not in FusionBench 0.2.33): every
entry of every task vector gets a weight from its importance in its own task and its agreement
with the other tasks; each task keeps its top ``r`` of weights, and the merge is the weighted
mean of the kept entries.

Notation: ``delta_i = theta_i - theta_0`` task ``i``'s task vector, ``N = T`` the number of
fine-tuned models, ``D`` the number of entries of the whole backbone (every floating-point
tensor: weights, biases, LayerNorms, layer scales, BatchNorm's running statistics, flattened
together), ``Norm(x) = (x - min x) / (max x - min x)`` min-max over the ``D`` entries (0 for a
constant vector) and ``Softmax`` over the ``D`` entries. The paper's equations (2)-(6), with
``*`` entrywise:

    intra_i = Softmax(N * Norm(delta_i * delta_i))                 (intra-balancing)
    inter_i = sum_{j=1..N} Softmax(Norm(delta_i * delta_j))        (inter-balancing, j = i included)
    beta_i  = intra_i * inter_i                                    (the PCB matrix)
    m_i     = [beta_i >= sorted(beta_i)[int((1 - r) D)]]           (drop: keep the top r of each task)
    delta   = sum_i m_i beta_i delta_i / sum_i m_i beta_i          (rescale; 0 where no task keeps the entry)
    theta   = theta_0 + lambda * delta

``sorted`` ascends, and the index is the authors' ``int(D * (1 - r))`` (at most ``D - 1``); entries
tied with the threshold are all kept. ``r`` is ``pcb_ratio``, ``lambda`` ``scaling_factor``; the
paper's optional search of one lambda per task by evolution strategies (on validation data) is
not part of this data-free method.

The authors' code, their ``PCB_merge`` in ``pcb-merging.py`` (the README's "details of our
method"), is not these equations: it clips each task's magnitudes to their 0.0001 and 0.9999
quantiles (and merges the clipped task vectors), squares the normalised magnitude instead of
normalising the square, takes ``exp`` without the softmax's denominator, has
``tanh(delta_i * sum_j delta_j)`` for the inter term (one activation of the summed product, no
normalisation), and min-max normalises each task's dropped scores ``clamp(beta_i, thr_i) - thr_i``
instead of keeping ``beta_i``, dividing by ``max(sum_i scale_i, 1e-12)``. Its vision code
(``vision_source_code/pcb.py``, ``pcb_ES.py``) has two more variants of the inter term and
clips at 1% and 99%. This module follows the paper (``formula="paper"``, the default);
``formula="authors"`` is ``PCB_merge`` as released (including its 0.0001 clipping), for
reproducing their numbers; ``benchmarks/authors_pcb.py`` runs their function against both.

Whole-backbone statistics, streamed. The authors flatten the models into one vector each, so
every ``Norm``, ``Softmax`` and threshold is over the whole backbone. Here the engine streams
the pool key by key (``MergeMethod.pool_statistics``), and the statistics take passes over it,
each holding one tensor's ``T`` task vectors at a time: (1) ``min`` and ``max`` of every
``delta_i * delta_j`` (``T (T + 1) / 2`` pairs), (2) the softmax denominators (sums of
``exp``), (3) and (4) the exact threshold of each task, an order statistic of ``beta_i`` found
by a two-level radix selection over the bits of the float32 values (``OrderStatistics``: a
count per value of the top 16 bits, then of the low 16 bits inside the bucket holding the rank;
no candidates kept, exact whatever the ties); then the merge, entry by entry. The authors'
formula takes the same four passes (two for the clipping quantiles, two for the threshold).

Numbers: the pair products of float32 task vectors are exact in float64, where everything is
computed; the PCB matrix ``beta`` is rounded once to float32 (the authors' dtype), on which the
drop and the weights work, so that the threshold is an exact order statistic of float32 values;
the weighted mean is float64, the result rounded once. The softmaxes are kept as
``D * Softmax`` (``exp(x - max) / mean exp(x - max)``): positive factors common to every task,
which change neither the order of ``beta_i`` nor the weighted mean, and keep ``beta`` near 1
instead of near ``1 / D**2``. ``beta`` lies in ``[N e^-(N+1), N e^(N+1)]``, so at most
``MAX_TASKS`` models are merged (float32's range). Cost: five reads of the pool, the inter term's
``T (T + 1) / 2`` products and ``exp`` per entry in four of them, all in cache-sized blocks on one
torch thread (8 base-sized models: about 2 min on a busy 2-core machine, ``benchmarks/README.md``).

Families: every floating-point tensor of the backbone is part of the one vector, on every family
(a ResNet's BatchNorm running statistics too); nothing is treated as a matrix; integer counters
are the pretrained model's (``merging.engine``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from merging.errors import MergeError
from merging.methods import MergeMethod, register_method

#: ``sweep(description)``: the backbone once, key by key, each key's ``T`` task vectors.
Sweep = Callable[[str], Iterator[tuple[str, list[Tensor]]]]

#: The most fine-tuned models: ``beta`` stays inside float32's normal range up to ``N = 83``.
MAX_TASKS = 80
#: The authors' ``PCB_merge`` clips each task's magnitudes at these quantiles (min_ratio, max_ratio).
AUTHORS_CLIP = 0.0001
#: The authors' floor on the sum of the scales (``torch.clamp(..., min=1e-12)``).
AUTHORS_FLOOR = 1e-12
#: float64 entries per block of the work (1 MiB: it stays in the CPU cache), whatever ``T``.
BLOCK = 1 << 17
FORMULAS = ("paper", "authors")


# ----------------------------------------------------------------------------- order statistics


def ordered_keys(values: Tensor) -> Tensor:
    """The float32 values as int32 keys that sort as the floats do (negative ones below
    positive ones, ``-0.0`` just below ``+0.0``, NaN above +Inf): the bits, with every bit
    but the sign flipped where the sign is set."""
    bits = _bits(values)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _bits(values: Tensor) -> Tensor:
    return values.detach().reshape(-1).to(torch.float32).contiguous().view(torch.int32)


def _float_of_key(key: int) -> float:
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return struct.unpack("<f", struct.pack("<i", bits))[0]


_HALF = 1 << 16


class OrderStatistics:
    """Exact order statistics of ``count`` long float32 vectors that arrive in parts (the same
    part of each at once, ``[count, n]``), without keeping them: ``add`` every part (first pass:
    a count per value of the keys' top 16 bits), ``choose`` the 0-based ranks wanted (as many for
    each vector), ``refine`` every part again (second pass: a count per value of the low 16 bits,
    of the entries in the bucket holding each rank), then ``values``: per vector
    ``sorted(vector)[rank]``, what ``torch.kthvalue(torch.cat(parts), rank + 1)`` gives, ties and
    all. Memory: ``65536`` counters per vector and per rank; a part is read in chunks of
    ``CHUNK`` entries, which stay in the CPU cache."""

    CHUNK = 1 << 18

    def __init__(self, count: int) -> None:
        self.count = count
        self.coarse = torch.zeros(count, _HALF, dtype=torch.int64)
        self.size = 0
        self.targets: list[list[tuple[int, int]]] | None = None  # per vector: (bucket, rank inside it)
        self.fine: Tensor | None = None  # [count, ranks, 65536]

    def _chunks(self, values: Sequence[Tensor], magnitudes: bool) -> Iterator[tuple[int, Tensor]]:
        """Per vector and chunk: the int32 keys (of the magnitudes: the bits without the sign)."""
        for index in range(self.count):
            row = values[index].reshape(-1)
            for start in range(0, row.numel(), self.CHUNK):
                part = row[start : start + self.CHUNK]
                yield index, (_bits(part) & 0x7FFFFFFF) if magnitudes else ordered_keys(part)

    def add(self, values: Sequence[Tensor], magnitudes: bool = False) -> None:
        """A part of each vector: ``values[i]`` of vector ``i`` (of its magnitudes with ``magnitudes``)."""
        for index, keys in self._chunks(values, magnitudes):
            self.coarse[index] += torch.bincount((keys >> 16) + _HALF // 2, minlength=_HALF)
        self.size += values[0].numel()

    def choose(self, ranks: Sequence[int]) -> None:
        """The 0-based ranks wanted, the same for every vector."""
        if not all(0 <= rank < self.size for rank in ranks):
            raise ValueError(f"ranks {list(ranks)} of vectors of {self.size} entries")
        self.targets = []
        for counts in self.coarse:
            below = counts.cumsum(0)
            buckets = [int(torch.searchsorted(below, rank + 1, side="left")) for rank in ranks]  # holds rank + 1 values
            self.targets.append(
                [(bucket, rank - (int(below[bucket - 1]) if bucket else 0)) for bucket, rank in zip(buckets, ranks)]
            )
        self.fine = torch.zeros(self.count, len(ranks), _HALF, dtype=torch.int64)

    def refine(self, values: Sequence[Tensor], magnitudes: bool = False) -> None:
        for index, keys in self._chunks(values, magnitudes):
            coarse = (keys >> 16) + _HALF // 2
            for slot, (bucket, _) in enumerate(self.targets[index]):
                self.fine[index, slot] += torch.bincount(keys[coarse == bucket] & 0xFFFF, minlength=_HALF)

    def values(self) -> list[list[float]]:
        """``[vector][rank]``."""
        if self.targets is None:
            raise RuntimeError("choose the ranks first")
        found = []
        for index, targets in enumerate(self.targets):
            row = []
            for slot, (bucket, rank) in enumerate(targets):
                low = int(torch.searchsorted(self.fine[index, slot].cumsum(0), rank + 1, side="left"))
                row.append(_float_of_key(((bucket - _HALF // 2) << 16) | low))
            found.append(row)
        return found


# ----------------------------------------------------------------------------- the PCB matrix


def _rows(vectors: Iterable[Tensor]) -> list[Tensor]:
    """The task vectors of one key as flat float32 rows (views where they are float32 already)."""
    return [vector.detach().reshape(-1).to(torch.float32) for vector in vectors]


def _blocks(rows: Sequence[Tensor]) -> Iterator[tuple[int, int, Tensor]]:
    """``(begin, end, block)``: the rows' columns ``begin:end`` as one ``[T, n]`` float64 block of
    at most ``BLOCK`` entries."""
    step = max(1, BLOCK // len(rows))
    for begin in range(0, rows[0].numel(), step):
        end = min(begin + step, rows[0].numel())
        yield begin, end, torch.stack([row[begin:end] for row in rows]).to(torch.float64)


@dataclass(frozen=True)
class PaperStatistics:
    """The paper's whole-backbone statistics, per pair ``(i, j)``, ``i <= j``, in row-major order
    (task ``i``'s pairs from ``start(i)``).

    With ``Norm(p) = (p - low) / span`` affine, each softmax factor is one ``exp`` of an affine
    function of the product ``p = delta_i delta_j``: ``exp(Norm(p) - 1) / mean = exp(a p + b)``.

    Attributes:
        low, span: ``min`` and ``max - min`` (1 where ``max = min``) of ``delta_i * delta_j``.
        pair_means: ``mean exp(Norm(delta_i * delta_j) - 1)``, so that ``Softmax = exp(x - 1) / (D mean)``.
        intra_means: ``mean exp(N (Norm(delta_i^2) - 1))``.
        thresholds: each task's ``sorted(beta_i)[int((1 - r) D)]`` (float32), once known.
    """

    num_tasks: int
    low: Tensor
    span: Tensor
    pair_means: Tensor | None = None
    intra_means: Tensor | None = None
    thresholds: Tensor | None = None

    def start(self, task: int) -> int:
        return task * self.num_tasks - task * (task - 1) // 2

    def products(self, block: Tensor) -> Iterator[tuple[int, Tensor]]:
        """Per task ``i``: ``delta_i * delta_j`` for ``j >= i`` (``[T - i, n]``, float64) of a block."""
        for task in range(self.num_tasks):
            yield task, block[task] * block[task:]

    def coefficients(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a, b)`` of the pairs and of the intra terms, ``exp(a p + b)`` each (without the means'
        division where they are not known yet)."""
        count = self.num_tasks
        scale = 1 / self.span
        shift = -self.low * scale - 1
        diagonal = torch.tensor([self.start(task) for task in range(count)])
        intra_scale, intra_shift = count * scale[diagonal], count * shift[diagonal]
        if self.pair_means is not None:
            shift = shift - self.pair_means.log()
            intra_shift = intra_shift - self.intra_means.log()
        return scale, shift, intra_scale, intra_shift

    def balance(self, rows: Sequence[Tensor]) -> Tensor:
        """``D^2 beta`` (``[T, n]``, rounded to float32) of the task vectors of some entries."""
        count = self.num_tasks
        scale, shift, intra_scale, intra_shift = self.coefficients()
        beta = torch.empty(count, rows[0].numel(), dtype=torch.float32)
        for begin, end, block in _blocks(rows):
            inter = torch.zeros_like(block)
            intra = torch.empty_like(block)
            for task, products in self.products(block):
                pairs = slice(self.start(task), self.start(task) + count - task)
                intra[task] = torch.exp(torch.addcmul(intra_shift[task], products[0], intra_scale[task]))
                shares = torch.addcmul(shift[pairs, None], products, scale[pairs, None]).exp_()
                inter[task] += shares.sum(0)
                inter[task + 1 :] += shares[1:]  # the pair (i, j) is the pair (j, i)
            beta[:, begin:end] = intra.mul_(inter)
        return beta


def paper_statistics(sweep: Sweep, ratio: float, label: str) -> PaperStatistics:
    """The four passes over the pool of the paper's formula (see the module's docstring)."""
    low = high = None
    numel = 0
    for _, vectors in sweep(f"{label}: pass 1 of 4 (ranges of the products)"):
        rows = _rows(vectors)
        count = len(rows)
        if low is None:
            low = torch.full((count * (count + 1) // 2,), math.inf, dtype=torch.float64)
            high = torch.full_like(low, -math.inf)
            pairs = PaperStatistics(count, low, low)  # their layout, before their statistics
        for _, _, block in _blocks(rows):
            for task, products in pairs.products(block):
                pair_rows = slice(pairs.start(task), pairs.start(task) + count - task)
                smallest, largest = torch.aminmax(products, dim=1)
                torch.minimum(low[pair_rows], smallest, out=low[pair_rows])
                torch.maximum(high[pair_rows], largest, out=high[pair_rows])
        numel += rows[0].numel()
    statistics = PaperStatistics(count, low, torch.where(high > low, high - low, 1.0))
    scale, shift, intra_scale, intra_shift = statistics.coefficients()
    pair_sums = torch.zeros_like(low)
    intra_sums = torch.zeros(count, dtype=torch.float64)
    for _, vectors in sweep(f"{label}: pass 2 of 4 (softmax sums)"):
        for _, _, block in _blocks(_rows(vectors)):
            for task, products in statistics.products(block):
                pair_rows = slice(statistics.start(task), statistics.start(task) + count - task)
                pair_sums[pair_rows] += torch.addcmul(shift[pair_rows, None], products, scale[pair_rows, None]).exp_().sum(1)
                intra_sums[task] += torch.addcmul(intra_shift[task], products[0], intra_scale[task]).exp_().sum()
    statistics = replace(statistics, pair_means=pair_sums / numel, intra_means=intra_sums / numel)
    select = OrderStatistics(count)
    for _, vectors in sweep(f"{label}: pass 3 of 4 (threshold)"):
        select.add(statistics.balance(_rows(vectors)))
    select.choose([drop_rank(numel, ratio)])
    for _, vectors in sweep(f"{label}: pass 4 of 4 (threshold)"):
        select.refine(statistics.balance(_rows(vectors)))
    thresholds = torch.tensor([found[0] for found in select.values()], dtype=torch.float32)
    return replace(statistics, thresholds=thresholds)


def paper_merge(pretrained: Tensor, task_vectors: Iterable[Tensor], statistics: PaperStatistics, scaling_factor: float) -> Tensor:
    """``theta_0 + lambda sum_i m_i beta_i delta_i / sum_i m_i beta_i`` for some entries of the
    backbone (any part of it: every entry on its own, given the statistics)."""
    stacked = torch.stack(_rows(task_vectors))  # a copy: the stream may reuse one buffer
    beta = statistics.balance(stacked)
    kept = torch.where(beta >= statistics.thresholds[:, None], beta, 0).to(torch.float64)
    return _weighted_mean(pretrained, stacked.to(torch.float64), kept, scaling_factor, floor=None)


def _weighted_mean(pretrained: Tensor, vectors: Tensor, weights: Tensor, scaling_factor: float, floor: float | None) -> Tensor:
    total = weights.sum(0)
    numerator = (weights * vectors).sum(0)
    if floor is None:  # the paper: no update where every task dropped the entry
        merged = torch.where(total > 0, numerator / torch.where(total > 0, total, 1.0), 0.0)
    else:
        merged = numerator / total.clamp(min=floor)
    flat = pretrained.detach().reshape(-1).to(torch.float64) + scaling_factor * merged
    return flat.to(torch.float32).view(pretrained.shape)


def drop_rank(numel: int, ratio: float) -> int:
    """The 0-based rank of the threshold, the authors' ``int(D * (1 - r))`` (at most ``D - 1``)."""
    return min(int(numel * (1 - ratio)), numel - 1)


# ----------------------------------------------------------------------------- the authors' formula


@dataclass(frozen=True)
class AuthorsStatistics:
    """The statistics of the authors' ``PCB_merge``, per task (float32 values of the backbone).

    Attributes:
        low, high: the clipping values, ``sorted(|delta_i|)`` at ``int(D c)`` and ``int(D (1 - c) - 1)``.
        largest: ``max beta_i``; thresholds: ``sorted(beta_i)[int(D (1 - r))]``.
    """

    low: Tensor
    high: Tensor
    largest: Tensor | None = None
    thresholds: Tensor | None = None

    def clipped(self, block: Tensor) -> Tensor:
        """``clamp(|delta_i|, low_i, high_i)`` of a ``[T, n]`` float64 block."""
        return torch.minimum(torch.maximum(block.abs(), self.low[:, None]), self.high[:, None])

    def balance(self, rows: Sequence[Tensor]) -> Tensor:
        """``exp(N Norm(clipped)^2) tanh(delta_i sum_j delta_j)`` (``[T, n]``, rounded to float32)."""
        count = len(rows)
        span = self.high - self.low
        span = torch.where(span > 0, span, 1.0)[:, None]
        beta = torch.empty(count, rows[0].numel(), dtype=torch.float32)
        for begin, end, block in _blocks(rows):
            normalised = (self.clipped(block) - self.low[:, None]) / span
            beta[:, begin:end] = torch.exp(count * normalised.square_()) * torch.tanh(block * block.sum(0))
        return beta


def authors_statistics(sweep: Sweep, ratio: float, label: str) -> AuthorsStatistics:
    """The four passes over the pool of the authors' formula."""
    select = None
    numel = 0
    for _, vectors in sweep(f"{label}: pass 1 of 4 (clipping quantiles)"):
        rows = _rows(vectors)
        select = select or OrderStatistics(len(rows))
        select.add(rows, magnitudes=True)
        numel += rows[0].numel()
    count = select.count
    select.choose([int(numel * AUTHORS_CLIP), max(0, int(numel * (1 - AUTHORS_CLIP) - 1))])
    for _, vectors in sweep(f"{label}: pass 2 of 4 (clipping quantiles)"):
        select.refine(_rows(vectors), magnitudes=True)
    bounds = torch.tensor(select.values(), dtype=torch.float64)
    statistics = AuthorsStatistics(bounds[:, 0], bounds[:, 1])
    select = OrderStatistics(count)
    largest = torch.full((count,), -math.inf)
    for _, vectors in sweep(f"{label}: pass 3 of 4 (threshold)"):
        beta = statistics.balance(_rows(vectors))
        torch.maximum(largest, beta.amax(1), out=largest)
        select.add(beta)
    select.choose([drop_rank(numel, ratio)])
    for _, vectors in sweep(f"{label}: pass 4 of 4 (threshold)"):
        select.refine(statistics.balance(_rows(vectors)))
    thresholds = torch.tensor([found[0] for found in select.values()], dtype=torch.float32)
    return replace(statistics, largest=largest, thresholds=thresholds)


def authors_merge(
    pretrained: Tensor, task_vectors: Iterable[Tensor], statistics: AuthorsStatistics, scaling_factor: float
) -> Tensor:
    """``theta_0 + lambda sum_i s_i clip(delta_i) / max(sum_i s_i, 1e-12)``, ``s_i`` the task's
    scores above its threshold, min-max normalised (``(max(beta_i, thr_i) - thr_i) / (max_i - thr_i)``)."""
    stacked = torch.stack(_rows(task_vectors))  # a copy: the stream may reuse one buffer
    beta = statistics.balance(stacked).to(torch.float64)
    thresholds = statistics.thresholds.to(torch.float64)[:, None]
    span = statistics.largest.to(torch.float64)[:, None] - thresholds
    scale = (torch.maximum(beta, thresholds) - thresholds) / torch.where(span > 0, span, 1.0)
    vectors = stacked.to(torch.float64)
    clipped = torch.sign(vectors) * statistics.clipped(vectors)
    return _weighted_mean(pretrained, clipped, scale, scaling_factor, floor=AUTHORS_FLOOR)


# ----------------------------------------------------------------------------- the method


@register_method
class PCBMerging(MergeMethod):
    """PCB-Merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
    arXiv 2410.02396): each entry of each task vector weighted by ``beta_i = intra_i * inter_i``,
    its importance in its task (``Softmax(N Norm(delta_i^2))``) times its agreement with every
    task (``sum_j Softmax(Norm(delta_i delta_j))``), softmaxes and norms over the whole backbone;
    each task keeps its top ``pcb_ratio`` of weights, ``theta_0 + lambda sum_i beta_i delta_i /
    sum_i beta_i`` over the kept ones (``merging.pcb``). Data-free; every floating-point tensor of
    every family alike; the statistics take four passes over the pool before the merge.

    Args:
        pcb_ratio: r, the fraction of each task's entries kept (by weight, over the whole
            backbone), in (0, 1] (the authors' 0.05 to 0.2).
        scaling_factor: lambda, applied to the merged task vector.
        formula: "paper" (equations 2-6) or "authors", the released ``PCB_merge`` (magnitudes
            clipped at the 0.0001 quantiles, ``exp`` and ``tanh`` activations, min-max scaled
            weights); see ``merging.pcb``.
    """

    name = "pcb"
    needs_pool_statistics = True
    elementwise = True  # given the statistics, each entry from the same entry of the task vectors

    def __init__(self, pcb_ratio: float, scaling_factor: float, formula: str = "paper") -> None:
        if not (math.isfinite(pcb_ratio) and 0 < pcb_ratio <= 1):
            raise MergeError(f"pcb_ratio must be in (0, 1], got {pcb_ratio}")
        if not math.isfinite(scaling_factor):
            raise MergeError(f"scaling_factor must be a finite number, got {scaling_factor}")
        if formula not in FORMULAS:
            raise MergeError(f"formula must be one of {', '.join(FORMULAS)}, got '{formula}'")
        self.pcb_ratio = pcb_ratio
        self.scaling_factor = scaling_factor
        self.formula = formula

    def hyperparameters(self) -> dict[str, float | int | bool | str]:
        return {"pcb_ratio": self.pcb_ratio, "scaling_factor": self.scaling_factor, "formula": self.formula}

    def prepare(self, tasks: Sequence[str], keys: Sequence[str]) -> None:
        if len(tasks) > MAX_TASKS:
            raise MergeError(
                f"PCB-Merging merges at most {MAX_TASKS} fine-tuned models (its weights exp(N x) leave float32), got {len(tasks)}"
            )

    def pool_statistics(self, sweep: Sweep) -> PaperStatistics | AuthorsStatistics:
        statistics = paper_statistics if self.formula == "paper" else authors_statistics
        return statistics(sweep, self.pcb_ratio, self.describe())

    def merge(
        self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: PaperStatistics | AuthorsStatistics
    ) -> Tensor:
        merge = paper_merge if self.formula == "paper" else authors_merge
        return merge(pretrained, tensors, statistics, self.scaling_factor)
