"""MagMax (Marczak, Twardowski, Trzcinski and Cygert, "MagMax: Leveraging Model Merging for
Seamless Continual Learning", ECCV 2024, arXiv 2407.06322): of every entry, the task vector
that moved it most.

For each entry ``j`` of every parameter tensor (matrices, convolutions, LayerNorms, biases and
layer scales alike: the rule is the same for all), with ``tau_t = theta_t - theta_0``:

    t*(j)  = argmax_t |tau_t[j]|
    theta  = theta_0 + lambda * tau_{t*(j)}[j]

A tie of magnitudes goes to the later task (the authors' ``merge_max_abs`` and FusionBench
0.2.33's ``MagMaxAlgorithm`` replace the running choice where ``|tau_t| >= |current|``; two
entries of equal magnitude and opposite signs are the one case where that matters). The
paper merges sequentially fine-tuned models in continual learning; on independently fine-tuned
ones (its 8-dataset experiment, the setting here) the authors' script uses ``lambda = 0.5``.

One running choice per entry, whatever ``T``; entry by entry, so the engine merges it in
cache-sized slices. The arithmetic is float32: the selected task vector is an input, the
result ``theta_0 + lambda * tau`` one product and one sum, as FusionBench computes it.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from merging.errors import MergeError
from merging.methods import merge_function


@merge_function(elementwise=True)
def mag_max(pretrained: Tensor, task_vectors: Iterable[Tensor], *, scaling_factor: float) -> Tensor:
    """MagMax (Marczak et al., ECCV 2024, arXiv 2407.06322): ``theta_0 + lambda * tau_{t*}``,
    entry by entry the task vector of largest magnitude, ``t* = argmax_t |tau_t|`` (a tie to the
    later task); every tensor, matrix or not, the same rule (``merging.magmax``).

    Args:
        scaling_factor: lambda, applied to the selected task vector (the authors' 0.5 for
            independently fine-tuned models).
    """
    selected = None
    for tau in task_vectors:
        if selected is None:
            selected = tau.clone()  # the stream may reuse one buffer
        else:
            selected = tau.where(tau.abs() >= selected.abs(), selected)
    if selected is None:
        raise MergeError("nothing to merge: no fine-tuned model")
    return pretrained + scaling_factor * selected
