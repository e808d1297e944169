"""The evaluation's arithmetic: Lightning's ``--trainer.precision``, TF32 (``--model.tf32``) and the
fp32 pass that counts the predictions a lower precision changes (``--model.compare_precision``).

``32-true`` is the default of every merge config, for numbers comparable across runs and machines.
On a GPU, ``model.tf32 false`` (the default) also turns off the TF32 that PyTorch allows cuDNN's
convolutions by default, so that ``32-true`` is IEEE float32 throughout; ``true`` runs matmuls and
convolutions in TF32 (NVIDIA's tensor-core format, 10 bits of mantissa). A CPU has no TF32:
``model.tf32 true`` there is refused. bf16 is Lightning's ``bf16-mixed`` (autocast, float32 weights)
or ``bf16-true`` (the weights and inputs converted), on a GPU or a CPU.

A precision other than IEEE float32 can change predictions. ``model.compare_precision true`` runs
every batch a second time in IEEE float32 (autocast off, TF32 off), on the same weights and images,
and the report counts the test predictions (argmax) that differ, per row and task. That needs the
float32 weights and images in the test step: ``-mixed`` precisions and TF32 keep them, ``-true``
ones convert both before it, and are refused with it. Without it, the report says the count was
not measured; it is never left out silently.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from merging.errors import MergeError

#: The reference precision: what the merge configs run, and what the fp32 pass is.
FP32 = "32-true"


def check_evaluation_precision(precision: str, device_type: str, tf32: bool, compare_precision: bool) -> None:
    """Refuse, before any model is merged, a precision setting that cannot do what it says.

    Args:
        precision: the trainer's (``trainer.precision``: ``32-true``, ``bf16-mixed``, ...).
        device_type: the device the evaluation runs on (``cpu``, ``cuda``).
        tf32: ``model.tf32``.
        compare_precision: ``model.compare_precision``.
    """
    if tf32 and device_type != "cuda":
        raise MergeError(
            f"model.tf32 true needs a CUDA device (TF32 is a format of NVIDIA's tensor cores), and this run is on "
            f"'{device_type}', whose float32 is IEEE float32: leave model.tf32 false, or run on a GPU"
        )
    if not compare_precision:
        return
    if precision == FP32 and not tf32:
        raise MergeError(
            "model.compare_precision true counts the predictions that change against an IEEE float32 pass, and this "
            "run is one (trainer.precision 32-true, model.tf32 false): set trainer.precision bf16-mixed (or model.tf32 "
            "true on a GPU), or leave model.compare_precision false"
        )
    if precision != FP32 and not precision.endswith("-mixed"):
        raise MergeError(
            f"model.compare_precision true needs the float32 weights and images in the test step, and trainer.precision "
            f"{precision} converts both before it: evaluate with a mixed precision (bf16-mixed: float32 weights, bf16 "
            "autocast), or run 32-true separately"
        )


def is_reference(precision: str, tf32: bool) -> bool:
    """Whether the evaluation is the reference, IEEE float32 (``32-true``, no TF32)."""
    return precision == FP32 and not tf32


@contextmanager
def tf32_mode(enabled: bool, device_type: str) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions on or off, set back afterwards; nothing to set
    on another device."""
    if device_type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextmanager
def reference_pass(device_type: str) -> Iterator[None]:
    """IEEE float32 inside a test step: autocast off (a mixed precision's) and TF32 off."""
    with torch.autocast(device_type, enabled=False), tf32_mode(False, device_type):
        yield


def precision_report(
    precision: str,
    tf32: bool,
    changed: Mapping[str, Mapping[str, int]] | None,
    predictions: Mapping[str, int] | None,
) -> dict[str, Any]:
    """``report.json``'s ``precision``: the trainer's precision, TF32, and for a precision other
    than the reference the test predictions that change against the fp32 pass (``changed``: row ->
    task -> count, out of ``predictions[task]``), or None where that pass was not run.

    Args:
        precision: the trainer's precision.
        tf32: ``model.tf32``.
        changed: row -> task -> predictions that differ from the fp32 pass's (None: not measured).
        predictions: task -> test predictions per row.
    """
    report: dict[str, Any] = {"trainer": precision, "tf32": tf32}
    if is_reference(precision, tf32):
        return report
    report["reference"] = f"{FP32}, TF32 off"
    if changed is None:
        report["changed_predictions"] = None
        report["not_measured"] = (
            "--model.compare_precision true counts them"
            if precision == FP32 or precision.endswith("-mixed")
            else f"{precision} converts the weights and images before the test step: compare with a 32-true run"
        )
        return report
    report["changed_predictions"] = {row: dict(tasks) for row, tasks in changed.items()}
    report["test_predictions"] = dict(predictions or {})
    return report
