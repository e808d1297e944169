"""Tiny model pools and test sets for the merge-side tests, built in ``tmp_path``.

A pool is a ``_pretrained_`` ConvNeXt (8-64 channels, 32x32 inputs) saved with
``save_pretrained`` plus one "fine-tuned" checkpoint per task: the pretrained backbone plus a
seeded perturbation of every tensor, and a fresh head sized for the task with the task's
class names in ``id2label``. Every checkpoint directory carries the 32-pixel processor.

A test set is a ``save_to_disk`` dataset (``test`` split) of seeded noise images for a
registered task, with the task's class names. Two rows in three are labelled with the
fine-tuned model's own prediction, so each individual model scores well above chance and a
merged model scores differently: accuracy numbers that tell rows apart.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_from_disk
from PIL import Image as PILImage
from safetensors.torch import load_file
from transformers import ConvNextConfig, ConvNextForImageClassification

import conftest
import tolerances
from conftest import REPO_ROOT
from datamodules.preprocessing import ImagePreprocessor
from datamodules.tasks import get_task

PROCESSOR_FILE = REPO_ROOT / "configs" / "quickstart" / "convnext-tiny-32" / "preprocessor_config.json"
#: The pools' models: the tests' tiny ConvNeXt (``conftest.tiny_config``) on 32-pixel images, patch 2.
TINY = dict(image_size=32, patch_size=2)
PRETRAINED = "_pretrained_"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
#: The files of a merge-side report (``callbacks.report.write_report``), sorted.
REPORT_FILES = ["accuracy.png", "accuracy_heatmap.png", "report.csv", "report.json", "report.md"]


def merge_test_args(out: Path, paths: Mapping[str, str], processor: str, batch_size: int) -> list[str]:
    """``merge.py test`` on one CPU process, quiet, without a logger, over the tasks of ``paths``
    (in that order); the model options follow."""
    return [
        "test",
        "--trainer.logger", "false",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.default_root_dir", str(out / "root"),
        *QUIET,
        "--data.tasks", json.dumps(list(paths)),
        "--data.paths", json.dumps(dict(paths)),
        "--data.processor", processor,
        "--data.batch_size", str(batch_size),
        "--data.num_workers", "0",
    ]  # fmt: skip


def assert_row_matches(row: dict, expected: Mapping[str, Mapping[str, float]], sizes: Mapping[str, int], rel: float) -> None:
    """A report row against an independent evaluation: every test sample counted once, the same
    number of correct answers, the mean loss to ``rel``, and the average of the accuracies."""
    for task, values in expected.items():
        got = row["tasks"][task]
        assert got["num_samples"] == sizes[task] == values["num_samples"], task
        # torchmetrics divides in float32: the same count gives the same float32 quotient.
        correct = round(values["accuracy"] * sizes[task])
        assert got["accuracy"] == float(torch.tensor(correct, dtype=torch.float32) / sizes[task]), task
        assert got["loss"] == pytest.approx(values["loss"], abs=1e-5, rel=rel), task
    accuracies = [row["tasks"][task]["accuracy"] for task in expected]
    assert row["average_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies), abs=1e-12)


def tiny_config(classnames: Sequence[str] | None = None, **overrides) -> ConvNextConfig:
    """``conftest.tiny_config`` with the pools' ``TINY`` settings."""
    return conftest.tiny_config(classnames, **{**TINY, **overrides})


def save_checkpoint(model: ConvNextForImageClassification, directory: Path) -> Path:
    model.save_pretrained(directory)
    shutil.copy(PROCESSOR_FILE, directory / "preprocessor_config.json")
    return directory


def make_pretrained(directory: Path, seed: int = 0, **overrides) -> Path:
    """A ``_pretrained_`` checkpoint (a 10-class head, like an ImageNet model's unused head)."""
    torch.manual_seed(seed)
    model = ConvNextForImageClassification(tiny_config([f"LABEL_{i}" for i in range(10)], **overrides))
    # layer_scale starts at 1e-6, which would make every block a no-op: give them weight.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layer_scale_parameter"):
                parameter.fill_(0.5)
    return save_checkpoint(model, directory)


def make_finetuned(
    pretrained: Path, directory: Path, task: str, seed: int, scale: float = 0.05, num_labels: int | None = None
) -> Path:
    """``pretrained``'s backbone plus ``scale * N(0, 1)`` on every tensor, and a task head."""
    classnames = list(get_task(task).classnames)
    if num_labels is not None:  # a head of the wrong size, still self-consistent
        classnames = [f"LABEL_{i}" for i in range(num_labels)]
    base = ConvNextForImageClassification.from_pretrained(pretrained)
    model = ConvNextForImageClassification(tiny_config(classnames))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in base.state_dict().items():
        if key.startswith("convnext."):
            state[key] = tensor + scale * torch.randn(tensor.shape, generator=generator)
    state["classifier.weight"] = 0.3 * torch.randn((len(classnames), 64), generator=generator)
    state["classifier.bias"] = 0.1 * torch.randn(len(classnames), generator=generator)
    model.load_state_dict(state, strict=True)
    return save_checkpoint(model, directory)


def make_pool(root: Path, tasks: Sequence[str], seed: int = 0) -> dict[str, str]:
    """``{"_pretrained_": dir, task: dir, ...}`` under ``root``."""
    pretrained = make_pretrained(root / "pretrained", seed)
    pool = {PRETRAINED: str(pretrained)}
    for index, task in enumerate(tasks):
        pool[task] = str(make_finetuned(pretrained, root / f"finetuned_{task}", task, seed=1000 * (seed + 1) + index))
    return pool


def load_state(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def backbone(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor for key, tensor in state.items() if key.startswith("convnext.")}


def noise_images(count: int, seed: int, size: int = 20) -> list[PILImage.Image]:
    rng = np.random.default_rng(seed)
    return [PILImage.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def load_classifier(
    model_dir: str | Path, backbone_state: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32
):
    """A checkpoint as a plain ``ConvNextForImageClassification`` in eval mode and ``dtype``,
    optionally with another backbone (whose values are copied into ``dtype``)."""
    state = load_state(model_dir)
    if backbone_state is not None:
        state = {**state, **backbone_state}
    model = ConvNextForImageClassification(ConvNextConfig.from_pretrained(model_dir)).to(dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def classify(
    model_dir: str | Path,
    images: Sequence[PILImage.Image],
    backbone_state: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Logits of a checkpoint (optionally with another backbone) in plain PyTorch and the
    project's preprocessing, independently of the Lightning modules under test."""
    model = load_classifier(model_dir, backbone_state)
    preprocess = ImagePreprocessor.from_pretrained(str(model_dir))
    logits = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([preprocess(image) for image in images[start : start + batch_size]])
            logits.append(model(pixel_values=pixels).logits)
    return torch.cat(logits)


def make_test_set(directory: Path, task: str, size: int, finetuned: str | Path, seed: int) -> Path:
    """A ``save_to_disk`` test split of ``size`` noise images; rows ``i % 3 != 0`` are
    labelled with ``finetuned``'s prediction, the others with a seeded random class."""
    classnames = list(get_task(task).classnames)
    images = noise_images(size, seed)
    predicted = classify(finetuned, images).argmax(dim=1).tolist()
    rng = np.random.default_rng(seed + 1)
    labels = [predicted[i] if i % 3 else int(rng.integers(len(classnames))) for i in range(size)]
    features = Features({"image": Image(), "label": ClassLabel(names=classnames)})
    DatasetDict({"test": Dataset.from_dict({"image": images, "label": labels}, features=features)}).save_to_disk(str(directory))
    return directory


def read_test_set(directory: str | Path) -> tuple[list[PILImage.Image], torch.Tensor]:
    data = load_from_disk(str(directory))["test"]
    return list(data["image"]), torch.tensor(data["label"])


def evaluate(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean cross-entropy, the way any reader would compute them."""
    return {
        "accuracy": (logits.argmax(dim=1) == labels).double().mean().item(),
        "loss": torch.nn.functional.cross_entropy(logits.double(), labels).item(),
        "num_samples": len(labels),
    }


@dataclass
class Scores:
    """An independent evaluation of one model on one task, in float64: its logits, an entrywise
    bound on how far the project's forward of the same weights may put them (``tolerances.logit_bound``,
    for the project's precision ``u``), and the labels; with its accuracy, loss and sample count."""

    logits: torch.Tensor
    error: torch.Tensor
    labels: torch.Tensor
    u: float

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> int:
        return int((self.logits.argmax(dim=1) == self.labels).sum())

    @property
    def loss(self) -> float:
        return float(torch.nn.functional.cross_entropy(self.logits, self.labels))

    def values(self) -> dict[str, float]:
        return {"accuracy": self.correct / self.num_samples, "loss": self.loss, "num_samples": self.num_samples}


#: ``--trainer.precision`` of the project's runs that a test compares with ``score``'s float64
#: reference: in float64 too, every rounding error of the forward is 2**29 times smaller than in
#: float32, so the comparison is as sharp as the metrics' own float32 sums allow.
FLOAT64 = ("--trainer.precision", "64-true")


def score(
    model_dir: str | Path, images, labels: torch.Tensor, backbone_state=None, batch_size: int = 64, u: float = tolerances.U64
) -> Scores:
    """The checkpoint (optionally with another backbone) on ``images`` in float64, with the bound of
    ``tolerances.logit_bound`` from the head's scale ``|W| |f| + |b|`` on the pooled features ``f``,
    for a project forward with unit roundoff ``u`` (``U64``: run with ``FLOAT64``; ``U32``: in float32)."""
    model = load_classifier(model_dir, backbone_state, torch.float64)
    preprocess = ImagePreprocessor.from_pretrained(str(model_dir))
    logits, scales = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([preprocess(image) for image in images[start : start + batch_size]]).double()
            features = model.convnext(pixel_values=pixels).pooler_output
            logits.append(model.classifier(features))
            scales.append(features.abs() @ model.classifier.weight.abs().T + model.classifier.bias.abs())
    logits = torch.cat(logits)
    return Scores(logits, tolerances.logit_bound(model.config, torch.cat(scales), u), labels, u)


def assert_scores(got: Mapping[str, float], expected: Scores, batch_size: int, what: str = "") -> None:
    """A report's numbers for one model and task (``accuracy``, ``loss``, ``num_samples``) against
    an independent evaluation of the same weights: every sample counted once; the same number of
    correct answers, give or take the samples whose two largest logits are within rounding of each
    other (``tolerances.ambiguous_predictions``; the same float32 quotient where there are none:
    torchmetrics divides in float32); the mean loss within ``tolerances.loss_bound``."""
    n = expected.num_samples
    assert got["num_samples"] == n, what
    ambiguous = tolerances.ambiguous_predictions(expected.logits, expected.error)
    if ambiguous == 0:
        assert got["accuracy"] == float(torch.tensor(expected.correct, dtype=torch.float32) / n), what
    else:
        assert abs(round(got["accuracy"] * n) - expected.correct) <= ambiguous, what
    batches = -(-n // batch_size)
    bound = tolerances.loss_bound(expected.logits, expected.error, expected.labels, batches, expected.u)
    assert abs(got["loss"] - expected.loss) <= bound, (what, got["loss"], expected.loss, bound)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOBAL_RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


# --- The merge formulas, written out over whole state dicts (the tests' reference) -------------


def task_vectors(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]):
    return [{key: model[key].float() - pretrained[key].float() for key in pretrained} for model in finetuned]


def reference_simple_average(finetuned: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``(1/T) sum_t theta_t``, summed in float64 (exact for float32 inputs of similar scale)."""
    return {key: (sum(model[key].double() for model in finetuned) / len(finetuned)).float() for key in finetuned[0]}


def reference_task_arithmetic(pretrained, vectors, scaling_factor: float) -> dict[str, torch.Tensor]:
    """``theta_0 + lambda * sum_t tau_t``."""
    return {key: pretrained[key].float() + scaling_factor * sum(tau[key] for tau in vectors) for key in pretrained}


def reference_thresholds(vectors, top_k: float) -> list[float]:
    """Per task, the TIES authors' threshold: the ``(k + 1)``-th largest ``|tau|`` over the whole
    task vector (their ``kthvalue(n - k)``), ``k = int(top_k * n)``; 0 where ``k = n``."""
    thresholds = []
    for tau in vectors:
        magnitudes = torch.cat([tensor.abs().reshape(-1) for tensor in tau.values()]).sort(descending=True).values
        k = int(top_k * magnitudes.numel())
        thresholds.append(0.0 if k >= magnitudes.numel() else float(magnitudes[k]))
    return thresholds


def reference_ties(pretrained, vectors, top_k: float, scaling_factor: float) -> dict[str, torch.Tensor]:
    """Trim each task to its top-k magnitudes, elect the sign of the summed trimmed values,
    average the trimmed values that carry that sign (0 where the sum is 0)."""
    thresholds = reference_thresholds(vectors, top_k)
    merged = {}
    for key in pretrained:
        trimmed = torch.stack([torch.where(tau[key].abs() >= t, tau[key], 0.0) for tau, t in zip(vectors, thresholds)])
        elected = torch.sign(trimmed.sum(dim=0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        mean = (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
        merged[key] = pretrained[key].float() + scaling_factor * torch.where(elected == 0, 0.0, mean)
    return merged


def reference_dare(vectors, drop_rate: float, seed: int) -> list[dict[str, torch.Tensor]]:
    """Each entry of task ``t``'s vector kept where the (seed, t, key) generator's uniform draw
    is ``>= p``, then divided by ``1 - p``."""
    from merging.methods import dare_generator

    out = []
    for index, tau in enumerate(vectors):
        dropped = {}
        for key, tensor in tau.items():
            keep = torch.rand(tensor.shape, generator=dare_generator(seed, index, key)) >= drop_rate
            dropped[key] = torch.where(keep, tensor / (1 - drop_rate), 0.0)
        out.append(dropped)
    return out


def reference_merge(method: str, params: Mapping[str, float], pretrained, finetuned) -> dict[str, torch.Tensor]:
    """The merged backbone for a method name of ``merging.methods.METHODS``."""
    if method == "simple_average":
        return reference_simple_average(finetuned)
    vectors = task_vectors(pretrained, finetuned)
    if method.startswith("dare_"):
        vectors = reference_dare(vectors, params["drop_rate"], params.get("seed", 0))
        method = method.removeprefix("dare_")
    if method == "task_arithmetic":
        return reference_task_arithmetic(pretrained, vectors, params["scaling_factor"])
    if method == "ties":
        return reference_ties(pretrained, vectors, params["top_k"], params["scaling_factor"])
    raise ValueError(method)


def merge_bound(method: str, params: Mapping[str, float], pretrained, finetuned) -> dict[str, torch.Tensor]:
    """Per key, the entrywise bound on the difference between the project's merge and
    ``reference_merge`` (two float32 evaluations of the same formula in other orders; see
    ``tolerances``). The discrete steps (DARE's draws, TIES' thresholds on the same float32 task
    vectors) are exact on both sides; TIES' sign election is too where no entry's trimmed sum lies
    within rounding of zero, which is checked here, so that a near-tie cannot flip on another CPU."""
    if method == "simple_average":  # summed in float64 on both sides, rounded to float32 once each
        total = {key: tolerances.sum_of_magnitudes(model[key] for model in finetuned) / len(finetuned) for key in finetuned[0]}
        return {
            key: 2 * tolerances.gamma(len(finetuned), tolerances.U64) * m + 2 * tolerances.U32 * m for key, m in total.items()
        }
    vectors, roundings = task_vectors(pretrained, finetuned), 3
    if method.startswith("dare_"):
        vectors = reference_dare(vectors, params["drop_rate"], params.get("seed", 0))
        method, roundings = method.removeprefix("dare_"), 4
    if method == "ties":
        check_ties_signs_are_determined(vectors, params["top_k"])
    elif method != "task_arithmetic":
        raise ValueError(method)
    return {
        key: tolerances.linear_merge_bound(pretrained[key], [tau[key] for tau in vectors], params["scaling_factor"], roundings)
        for key in pretrained
    }


def check_ties_signs_are_determined(vectors, top_k: float) -> None:
    """Every entry's elected sign (of the trimmed values' sum) is the same in any float32 order:
    the sum is 0 (nothing kept) or further from 0 than ``2 gamma_T`` of the kept magnitudes."""
    thresholds = reference_thresholds(vectors, top_k)
    for key in vectors[0]:
        trimmed = [torch.where(tau[key].abs() >= t, tau[key], 0.0).double() for tau, t in zip(vectors, thresholds)]
        total, magnitude = sum(trimmed), tolerances.sum_of_magnitudes(trimmed)
        near = (magnitude > 0) & (total.abs() <= 2 * tolerances.gamma(len(vectors)) * magnitude)
        assert not bool(near.any()), f"{key}: {int(near.sum())} TIES sign(s) within rounding of a tie"


def assert_merge_matches(merged: Mapping[str, torch.Tensor], method: str, params: Mapping[str, float], pretrained, finetuned):
    """The project's merged backbone against ``reference_merge``, within ``merge_bound``, key by key."""
    expected = reference_merge(method, params, pretrained, finetuned)
    bounds = merge_bound(method, params, pretrained, finetuned)
    assert sorted(merged) == sorted(expected)
    for key, tensor in expected.items():
        assert merged[key].dtype == tensor.dtype and merged[key].shape == tensor.shape, key
        tolerances.assert_within(merged[key], tensor, bounds[key], key)


# --- Damaged checkpoints ----------------------------------------------------------------------


def copy_checkpoint(source: str | Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite_tensors(directory: str | Path, change) -> Path:
    """Apply ``change(state) -> state`` to a checkpoint's ``model.safetensors``."""
    from safetensors.torch import save_file

    path = Path(directory) / "model.safetensors"
    state = change(load_file(str(path)))
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path), metadata={"format": "pt"})
    return Path(directory)


def truncate(directory: str | Path, keep_fraction: float = 0.6) -> Path:
    path = Path(directory) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def corrupt_header(directory: str | Path) -> Path:
    """Keep the length prefix, overwrite the JSON header's opening bytes."""
    path = Path(directory) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:24] = b"\x00not json at all"
    path.write_bytes(bytes(data))
    return path


def first_backbone_key(directory: str | Path, suffix: str = ".weight", ndim: int = 4) -> str:
    state = load_state(directory)
    return next(key for key, t in state.items() if key.startswith("convnext.") and key.endswith(suffix) and t.ndim == ndim)
