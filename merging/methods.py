"""Merge methods: pure functions over tensors, and the small classes that name them.

Every function takes the tensors of *one* parameter (the same key in every model) as a
stream and keeps a running result, so memory does not grow with the number of models.
Notation: ``theta_0`` the pretrained tensor, ``theta_t`` task ``t``'s fine-tuned tensor,
``tau_t = theta_t - theta_0`` its task vector, ``T`` the number of fine-tuned models.

The classes hold the hyper-parameters (their ``__init__`` signatures are the CLI and YAML
schema: ``--model.method TiesMerging --model.method.top_k 0.2``) and are registered by name
in ``METHODS``. They never read checkpoints: ``merging.engine`` streams the tensors in.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from merging.errors import MergeError


def _running_sum(tensors: Iterable[Tensor], dtype: torch.dtype = torch.float32) -> tuple[Tensor, int]:
    total, count = None, 0
    for tensor in tensors:
        if total is None:
            total = tensor.to(dtype, copy=True)
        else:
            total.add_(tensor)
        count += 1
    if total is None:
        raise MergeError("nothing to merge: no fine-tuned model")
    return total, count


def simple_average(finetuned: Iterable[Tensor]) -> Tensor:
    """Uniform model soup (Wortsman et al., ICML 2022): ``theta = (1/T) sum_t theta_t``.

    The sum is kept in float64: a float32 running sum rounds (``3 * theta`` is not exact), so
    the average of identical models would not be that model."""
    total, count = _running_sum(finetuned, torch.float64)
    return total.div_(count).to(torch.float32)


def task_arithmetic(pretrained: Tensor, task_vectors: Iterable[Tensor], scaling_factor: float) -> Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023): ``theta = theta_0 + lambda * sum_t tau_t``."""
    total, _ = _running_sum(task_vectors)
    return total.mul_(scaling_factor).add_(pretrained)


def magnitude_threshold(task_vector: Iterable[Tensor], top_k: float) -> float:
    """TIES trim threshold of one task: the ``(k + 1)``-th largest ``|tau_t|`` over all its
    ``n`` parameters, ``k = int(top_k * n)``; trimming keeps ``|tau_t| >= threshold``, so
    ``k + 1`` entries (more where magnitudes tie). This is the TIES authors' ``topk_values_mask``,
    which FusionBench copies (``kthvalue(|tau|, n - k)``, then ``>=``): the same merge to the
    last element. ``top_k = 1`` keeps everything (threshold 0; theirs fails there)."""
    if not 0 < top_k <= 1:
        raise MergeError(f"top_k must be in (0, 1], got {top_k}")
    # The (n - k)-th smallest of the concatenated magnitudes, found as torch.kthvalue(cat, n - k)
    # would find it, without the concatenation nor kthvalue's sorted copy and int64 indices
    # of everything. The bits of a float with its sign bit clear, read as an int32, sort as
    # the float does (+Inf above every finite value, NaN above +Inf as kthvalue ranks it), so
    # the 15 bits below the sign bucket the values in order: count each bucket (as each part
    # arrives), find the bucket holding the wanted value, run kthvalue on that bucket alone.
    magnitudes, counts = [], torch.zeros(_BUCKETS, dtype=torch.int64)
    for tensor in task_vector:
        part = tensor.detach().abs().reshape(-1).to(torch.float32)
        counts += torch.bincount(_bucket(part), minlength=_BUCKETS)
        magnitudes.append(part)
    if not magnitudes:
        torch.cat(magnitudes)  # nothing to rank: torch's own error, as ever
    numel = sum(part.numel() for part in magnitudes)
    keep = int(top_k * numel)
    if keep >= numel:
        return 0.0
    # (k + 1)-th largest = (n - k)-th smallest; k = 0 keeps the largest magnitude(s)
    return _kth_smallest(magnitudes, counts, numel - keep)


_BUCKETS = 1 << 15


def _kth_smallest(parts: list[Tensor], counts: Tensor, k: int) -> float:
    """``torch.kthvalue(torch.cat(parts), k)`` given the bucket ``counts`` of ``parts``."""
    below = counts.cumsum(0)
    bucket = int(torch.searchsorted(below, k, side="left"))  # first bucket with at least k values up to it
    rank = k - (int(below[bucket - 1]) if bucket else 0)
    candidates = torch.cat([part[_bucket(part) == bucket] for part in parts])
    return float(torch.kthvalue(candidates, rank).values)


def _bucket(magnitudes: Tensor) -> Tensor:
    return magnitudes.view(torch.int32).bitwise_right_shift(16).bitwise_and_(0x7FFF)


def ties_merging(
    pretrained: Tensor, task_vectors: Iterable[Tensor], thresholds: Sequence[float], scaling_factor: float
) -> Tensor:
    """TIES-Merging (Yadav et al., NeurIPS 2023), for one parameter tensor.

    1. Trim: ``hat_tau_t = tau_t * [|tau_t| >= kappa_t]`` with ``kappa_t`` from
       ``magnitude_threshold`` (top-k of the whole task vector).
    2. Elect signs by total mass: ``gamma = sgn(sum_t hat_tau_t)``.
    3. Disjoint mean: ``tau_m = sum_{t in A} hat_tau_t / |A|`` with
       ``A = {t : sgn(hat_tau_t) = gamma}``, over the non-zero entries (0 where ``A`` is empty).
    4. ``theta = theta_0 + lambda * tau_m``.

    One pass: the positive and negative parts are summed and counted separately, so the
    elected side's mean is known without a second look at any task vector.
    """
    positive_sum = torch.zeros_like(pretrained, dtype=torch.float32)
    negative_sum = torch.zeros_like(positive_sum)
    positive_count = torch.zeros_like(positive_sum)
    negative_count = torch.zeros_like(positive_sum)
    for task_vector, threshold in zip(task_vectors, thresholds, strict=True):
        trimmed = torch.where(task_vector.abs() >= threshold, task_vector, 0).to(torch.float32)
        positive, negative = trimmed.clamp(min=0), trimmed.clamp(max=0)
        positive_sum += positive
        negative_sum += negative
        positive_count += positive > 0
        negative_count += negative < 0
    elected = torch.sign(positive_sum + negative_sum)
    merged = torch.where(
        elected > 0,
        positive_sum / positive_count.clamp(min=1),
        torch.where(elected < 0, negative_sum / negative_count.clamp(min=1), 0.0),
    )
    return merged.mul_(scaling_factor).add_(pretrained)


def dare(task_vector: Tensor, drop_rate: float, rescale: bool, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al., ICML 2024): drop each entry with probability ``p`` and rescale the
    survivors: ``tilde_tau = m * tau / (1 - p)``, ``m ~ Bernoulli(1 - p)``."""
    if not 0 <= drop_rate < 1:
        raise MergeError(f"drop_rate must be in [0, 1), got {drop_rate}")
    keep = torch.rand(task_vector.shape, generator=generator) >= drop_rate
    dropped = torch.where(keep, task_vector, 0)
    return dropped / (1 - drop_rate) if rescale else dropped


def dare_generator(seed: int, task_index: int, key: str) -> torch.Generator:
    """A generator per (seed, task, parameter): the same mask whatever the processing order or rank.

    The CPU generator (mt19937) keeps only the low 32 bits of its seed, so all three are
    hashed into those 32 bits (seed and task placed above them would be silently dropped)."""
    digest = hashlib.blake2b(f"{seed}/{task_index}/{key}".encode(), digest_size=4).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


#: Every method by name (``MergeMethod.name``): what ``register_method`` has seen.
METHODS: dict[str, type[MergeMethod]] = {}


class MergeMethod(ABC):
    """A merge method: hyper-parameters in ``__init__``, the merge of one parameter in ``merge``.

    ``merging.engine`` calls ``merge`` once per backbone tensor with a stream of fine-tuned
    tensors (``uses_pretrained = False``) or of task vectors already passed through
    ``transform``; methods with ``needs_task_statistics`` first get one ``task_statistic``
    per task, computed from the whole task vector, one task at a time; methods with
    ``needs_pool_statistics`` first compute, in ``pool_statistics``, what they need of the whole
    pool at once (every task's whole backbone: PCB's normalisations and thresholds).
    """

    #: The name in ``METHODS``, reports and tables.
    name: ClassVar[str]
    #: False: ``merge`` sees ``theta_t``; True: it sees ``tau_t`` and ``theta_0``.
    uses_pretrained: ClassVar[bool] = True
    #: The engine checks every input tensor for NaN/Inf. A method whose result is a plain
    #: weighted sum may say so here: a NaN/Inf input always shows in its output, and the
    #: engine then checks outputs only (faster).
    propagates_non_finite: ClassVar[bool] = False
    needs_task_statistics: ClassVar[bool] = False
    #: True where ``merge`` needs statistics over every task's whole backbone at once (an entry's
    #: weight that mixes the tasks, normalised over all entries): ``pool_statistics`` runs once
    #: before merging and what it returns is every ``merge`` call's ``statistics``.
    needs_pool_statistics: ClassVar[bool] = False
    #: True where ``transform`` and ``merge`` compute every entry from the same entry of their
    #: inputs alone (given the task statistics) and may run in several threads at once: the
    #: engine then hands them flat slices of each parameter tensor, which stay in the CPU
    #: cache, several keys at a time, for the same result entry by entry.
    elementwise: ClassVar[bool] = False
    #: True where the Linear weights are merged by ``merge_linear`` from the Gram matrices of
    #: their inputs (RegMean): ``merge_backbone`` then needs ``grams``, gathered on data.
    needs_grams: ClassVar[bool] = False
    #: True where the method gives one backbone per task, ``theta_t = theta_0 + s_t (m_t ⊙ v)`` (TALL
    #: masks, EMR-Merging: ``merging.per_task.PerTaskMethod``), which the task id picks at inference:
    #: ``merging.engine.merge_per_task`` merges the pool with it, ``merge_backbone`` refuses it.
    per_task: ClassVar[bool] = False
    #: True where the parameters are merged by ``merge_fisher`` from each task's diagonal Fisher
    #: (Fisher merging): ``merge_backbone`` then needs ``fishers``, gathered on data.
    needs_fisher: ClassVar[bool] = False
    #: True where the merge runs the models on each task's unlabelled train images itself, block after
    #: block (RegMean++): ``merge_backbone`` then needs ``images`` and hands the pool to ``merge_with_images``.
    needs_images: ClassVar[bool] = False

    def prepare(self, tasks: Sequence[str], keys: Sequence[str]) -> None:
        """Called once before merging with the fine-tuned tasks (in stream order) and the
        backbone keys; a method whose hyper-parameters are per task or per key checks them here."""

    def transform(self, task_vector: Tensor, task_index: int, key: str) -> Tensor:
        """Applied to each task vector before merging (DARE); identity by default."""
        return task_vector

    def task_statistic(self, task_vector: Iterator[Tensor]) -> float:
        """One number per task from its whole task vector (the TIES threshold)."""
        raise NotImplementedError

    def pool_statistics(self, sweep: Callable[[str], Iterator[tuple[str, list[Tensor]]]]) -> Any:
        """What ``merge`` needs to know of the whole pool (methods with ``needs_pool_statistics``).
        Each call of ``sweep(description)`` reads the backbone once, key by key in merge order,
        yielding the key and its ``T`` task vectors (float32, whole tensors, in stream order); call
        it once per pass the statistics take. Memory holds one key's task vectors at a time."""
        raise NotImplementedError

    @abstractmethod
    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        """The merged tensor of one parameter (``statistics``: the task statistics, or what
        ``pool_statistics`` returned)."""

    def merge_linear(self, weights: Iterable[Tensor], grams: Sequence[Tensor]) -> Tensor:
        """The merged weight of one Linear layer from each task's weight and input Gram matrix
        (methods with ``needs_grams``)."""
        raise NotImplementedError

    def fisher_coefficients(self, fishers: Mapping[str, Sequence[Tensor]]) -> list[float]:
        """One weight per task from every key's Fishers, computed once before merging (methods
        with ``needs_fisher``)."""
        raise NotImplementedError

    def merge_fisher(self, tensors: Iterable[Tensor], fishers: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
        """The merged tensor of one parameter from each task's tensor, its diagonal Fisher and the
        per-task ``coefficients`` (methods with ``needs_fisher``)."""
        raise NotImplementedError

    def merge_with_images(self, pool: Any, images: Any, progress: bool) -> dict[str, Tensor]:
        """The merged backbone of ``pool`` (a ``ModelPool``) from each task's preprocessed images
        (``merging.regmean_plusplus.ImageBatches``), for methods with ``needs_images``."""
        raise NotImplementedError

    @property
    def needs_data(self) -> bool:
        """True where the merge reads each task's unlabelled train images (``data.gram_images``):
        statistics gathered on them (Gram matrices, Fishers) or the images themselves."""
        return self.needs_grams or self.needs_fisher or self.needs_images

    def special_keys(
        self, shapes: Mapping[str, tuple[int, ...]], grams: Mapping[str, Sequence[Tensor]] | None
    ) -> list[str] | None:
        """The keys (of ``shapes``, the tensors to merge) that this method merges by a rule of its
        own, where it treats only some tensors so (the spectral methods' 2-D matrices, RegMean's
        Linear weights, which ``grams`` holds); None where every tensor gets the same rule. An empty
        list makes the engine print ``plain_merge_note`` before merging."""
        return None

    def plain_merge_note(self, num_tasks: int) -> str:
        """What this method's merge is where ``special_keys`` finds none (one line)."""
        return "every tensor gets the same rule"

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {}

    def describe(self) -> str:
        """``ties(top_k=0.2, scaling_factor=0.3)``: the method as it appears in reports."""
        args = ", ".join(
            f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in self.hyperparameters().items()
        )
        return f"{self.name}({args})" if args else self.name

    def __repr__(self) -> str:
        return self.describe()


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: the method becomes ``--model.method <ClassName>``, a row of the
    comparison and an entry of ``METHODS``. Two methods may not share a ``name``."""
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"two merge methods are named '{cls.name}': {METHODS[cls.name].__name__} and {cls.__name__}")
    METHODS[cls.name] = cls
    return cls


def merge_function(
    function: Callable[..., Tensor] | None = None,
    *,
    uses_pretrained: bool = True,
    elementwise: bool = False,
    propagates_non_finite: bool = False,
) -> Any:
    """Decorator: a pure function of one parameter's tensors becomes a registered merge method.

    The function takes the pretrained tensor and the stream of task vectors (or of fine-tuned
    tensors, with ``uses_pretrained=False``; the pretrained one is then ``None``) and returns the
    merged tensor; its keyword-only arguments, each with a type, are the hyper-parameters, and
    so the CLI and YAML options (one without a default must be given: a value a benchmark
    tunes belongs in its config). Its docstring (with an ``Args:`` section)
    is the method's help. For instance, in any module imported before the CLI parses::

        @merge_function(elementwise=True)
        def task_median(pretrained, task_vectors, *, scaling_factor: float = 1.0):
            \"\"\"``theta_0 + lambda * median_t tau_t``.

            Args:
                scaling_factor: lambda.
            \"\"\"
            return pretrained + scaling_factor * torch.stack(list(task_vectors)).median(0).values

    gives the class ``TaskMedian`` (module attribute, ``METHODS["task_median"]``): ``merge.py test
    --model.method TaskMedian --model.method.scaling_factor 0.5``, a row of the comparison, a grid
    over ``scaling_factor``. The function itself is returned unchanged (``task_median.method`` is
    the class). Inputs are checked for NaN/Inf unless ``propagates_non_finite``; ``elementwise``
    lets the engine hand it flat slices in several threads (only for entry-by-entry formulas)."""

    def build(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
        parameters = list(inspect.signature(function).parameters.values())
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        options = [p for p in parameters if p.kind is p.KEYWORD_ONLY]
        where = f"merge function {function.__module__}.{function.__name__}"
        if len(positional) != 2 or len(options) != len(parameters) - 2:
            raise TypeError(f"{where}: takes (pretrained, tensors, *, <hyper-parameters>)")
        for option in options:
            if option.annotation is option.empty:
                raise TypeError(f"{where}: hyper-parameter '{option.name}' needs a type (it is a CLI option)")
        schema = inspect.Signature(options)

        def __init__(self: MergeMethod, **values: Any) -> None:
            bound = schema.bind(**values)
            bound.apply_defaults()
            self._hyperparameters = dict(bound.arguments)
            vars(self).update(self._hyperparameters)

        __init__.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *options])

        def merge(self: MergeMethod, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
            return function(pretrained, tensors, **self._hyperparameters)

        def hyperparameters(self: MergeMethod) -> dict[str, float | int | bool]:
            return dict(self._hyperparameters)

        class_name = "".join(part[:1].upper() + part[1:] for part in function.__name__.split("_"))
        namespace = {
            "__init__": __init__, "merge": merge, "hyperparameters": hyperparameters, "__doc__": function.__doc__,
            "__module__": function.__module__, "__qualname__": class_name, "name": function.__name__,
            "uses_pretrained": uses_pretrained, "elementwise": elementwise, "propagates_non_finite": propagates_non_finite,
        }  # fmt: skip
        module = sys.modules[function.__module__]
        if getattr(module, class_name, None) is not None:
            raise TypeError(f"{where}: its class name {class_name} is taken in {function.__module__}")
        method = register_method(type(class_name, (MergeMethod,), namespace))
        setattr(module, class_name, method)  # importable as <module>.<ClassName>: class_path, pickling
        function.method = method
        return function

    return build if function is None else build(function)


@register_method
class SimpleAverage(MergeMethod):
    """Uniform average of the fine-tuned backbones (model soup); ignores the pretrained one."""

    name = "simple_average"
    propagates_non_finite = True
    uses_pretrained = False
    elementwise = True

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        return simple_average(tensors)


@register_method
class TaskArithmetic(MergeMethod):
    """``theta_0 + lambda * sum_t tau_t`` (Ilharco et al., ICLR 2023).

    Args:
        scaling_factor: lambda, applied to the sum of task vectors.
    """

    name = "task_arithmetic"
    propagates_non_finite = True
    elementwise = True

    def __init__(self, scaling_factor: float) -> None:
        self.scaling_factor = scaling_factor

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {"scaling_factor": self.scaling_factor}

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        return task_arithmetic(pretrained, tensors, self.scaling_factor)


@register_method
class TiesMerging(MergeMethod):
    """TIES-Merging: trim each task vector to its top-k magnitudes, elect signs by total
    mass, average the agreeing entries (Yadav et al., NeurIPS 2023).

    Args:
        top_k: fraction of each task vector's entries kept (by magnitude, over the whole backbone).
        scaling_factor: lambda, applied to the merged task vector.
    """

    name = "ties"
    needs_task_statistics = True
    elementwise = True

    def __init__(self, top_k: float, scaling_factor: float) -> None:
        if not 0 < top_k <= 1:
            raise MergeError(f"top_k must be in (0, 1], got {top_k}")
        self.top_k = top_k
        self.scaling_factor = scaling_factor

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {"top_k": self.top_k, "scaling_factor": self.scaling_factor}

    def task_statistic(self, task_vector: Iterator[Tensor]) -> float:
        return magnitude_threshold(task_vector, self.top_k)

    def merge(self, pretrained: Tensor | None, tensors: Iterable[Tensor], statistics: Sequence[float]) -> Tensor:
        return ties_merging(pretrained, tensors, statistics, self.scaling_factor)


class _Dare:
    """DARE in front of another method: every task vector is sparsified first."""

    propagates_non_finite = False
    elementwise = False  # one random mask per whole tensor
    drop_rate: float
    rescale: bool
    seed: int

    def _init_dare(self, drop_rate: float, rescale: bool, seed: int) -> None:
        if not 0 <= drop_rate < 1:
            raise MergeError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.drop_rate, self.rescale, self.seed = drop_rate, rescale, seed

    def transform(self, task_vector: Tensor, task_index: int, key: str) -> Tensor:
        return dare(task_vector, self.drop_rate, self.rescale, dare_generator(self.seed, task_index, key))

    def _dare_hyperparameters(self) -> dict[str, float | int | bool]:
        return {"drop_rate": self.drop_rate, "rescale": self.rescale, "seed": self.seed}


@register_method
class DareTaskArithmetic(_Dare, TaskArithmetic):
    """DARE, then task arithmetic.

    Args:
        drop_rate: probability p of dropping each task-vector entry.
        rescale: divide the kept entries by 1 - p.
        seed: seed of the drop masks.
        scaling_factor: lambda of task arithmetic.
    """

    name = "dare_task_arithmetic"

    def __init__(self, drop_rate: float, *, rescale: bool = True, seed: int = 0, scaling_factor: float) -> None:
        TaskArithmetic.__init__(self, scaling_factor)
        self._init_dare(drop_rate, rescale, seed)

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {**self._dare_hyperparameters(), **TaskArithmetic.hyperparameters(self)}


@register_method
class DareTies(_Dare, TiesMerging):
    """DARE, then TIES-Merging.

    Args:
        drop_rate: probability p of dropping each task-vector entry.
        rescale: divide the kept entries by 1 - p.
        seed: seed of the drop masks.
        top_k: TIES trim fraction.
        scaling_factor: lambda of TIES.
    """

    name = "dare_ties"

    def __init__(self, drop_rate: float, *, rescale: bool = True, seed: int = 0, top_k: float, scaling_factor: float) -> None:
        TiesMerging.__init__(self, top_k, scaling_factor)
        self._init_dare(drop_rate, rescale, seed)

    def hyperparameters(self) -> dict[str, float | int | bool]:
        return {**self._dare_hyperparameters(), **TiesMerging.hyperparameters(self)}
