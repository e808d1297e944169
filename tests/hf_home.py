"""A Hugging Face home in a temporary folder that answers the real hub ids offline.

With ``HF_HOME`` pointed at it and ``HF_HUB_OFFLINE=1``, the project's configs run unchanged:
``facebook/convnext-base-224``, the eight public ``tanganke/convnext-base-224_<task>_...``
checkpoints and the eight datasets resolve to tiny stand-ins that carry what the real ones
carry:

- models: ``config.json`` (a ConvNeXt with 8-64 channels; ``id2label`` = the task's class
  names for a fine-tuned one, 1,000 labels for the pretrained one), ``model.safetensors``,
  ``preprocessor_config.json`` with facebook/convnext-base-224's real 224-pixel settings, laid
  out as the hub cache does (``hub/models--<owner>--<name>/snapshots/<rev>/`` and ``refs/main``);
- datasets: ``image`` (Image) and ``label`` (ClassLabel with the task's class names) columns,
  ``train`` and ``test`` splits, prepared by ``load_dataset("parquet", ...)`` and filed where
  ``load_dataset(<hub id>, <config>)`` looks for a cached copy offline
  (``datasets/<owner>___<name>/<config>/0.0.0/<fingerprint>/<name>-<split>.arrow``).

The ``datasets`` and ``huggingface_hub`` libraries read ``HF_HOME`` when imported, so the
stand-ins serve subprocesses started with ``env(home)``, not the test process itself.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset
from PIL import Image as PILImage
from transformers import ConvNextConfig, ConvNextForImageClassification

from conftest import CONVNEXT_BASE_PREPROCESSOR, REPO_ROOT, tiny_config
from datamodules.tasks import BENCHMARK_TASKS, get_task

PRETRAINED_ID = "facebook/convnext-base-224"
REVISION = "0" * 40


def finetuned_id(task: str) -> str:
    """The public checkpoint of ``task``, as the merge configs name it."""
    return f"tanganke/convnext-base-224_{get_task(task).hub_name}_sgd_batch-size-64_lr-0.01_steps-4000"


def _config(classnames: list[str]) -> ConvNextConfig:
    return tiny_config(classnames)


def _save_model(home: Path, repo_id: str, model: ConvNextForImageClassification) -> Path:
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    model.save_pretrained(snapshot)
    (snapshot / "preprocessor_config.json").write_text(json.dumps(CONVNEXT_BASE_PREPROCESSOR))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def add_models(home: Path, tasks: tuple[str, ...] = BENCHMARK_TASKS, seed: int = 0) -> None:
    """The pretrained stand-in and one fine-tuned stand-in per task (its backbone perturbed)."""
    torch.manual_seed(seed)
    pretrained = ConvNextForImageClassification(_config([f"imagenet class {i}" for i in range(1000)]))
    with torch.no_grad():  # layer scale starts at 1e-6, which would make every block a no-op
        for name, parameter in pretrained.named_parameters():
            if name.endswith("layer_scale_parameter"):
                parameter.fill_(0.5)
    _save_model(home, PRETRAINED_ID, pretrained)
    generator = torch.Generator().manual_seed(seed + 1)
    for task in tasks:
        finetuned = ConvNextForImageClassification(_config(list(get_task(task).classnames)))
        state = {key: value for key, value in finetuned.state_dict().items() if key.startswith("classifier.")}
        for key, value in pretrained.state_dict().items():
            if key.startswith("convnext."):
                state[key] = value + 0.05 * torch.randn(value.shape, generator=generator)
        finetuned.load_state_dict(state, strict=True)
        _save_model(home, finetuned_id(task), finetuned)


def _images(count: int, rng: np.random.Generator, mode: str) -> list[PILImage.Image]:
    channels = 1 if mode == "L" else 3
    pixels = rng.integers(0, 256, (count, 24, 32, channels), dtype=np.uint8)
    return [PILImage.fromarray(image.squeeze(-1) if mode == "L" else image, mode=mode) for image in pixels]


def add_datasets(home: Path, scratch: Path, sizes: dict[str, int], tasks: tuple[str, ...] = BENCHMARK_TASKS) -> None:
    """Each task's dataset under its hub id (``svhn`` under ``cropped_digits``); row ``i`` of
    a split is labelled ``i % num_classes``; MNIST's images are grayscale, as on the hub."""
    rng = np.random.default_rng(0)
    for task in tasks:
        info = get_task(task)
        features = Features({"image": Image(), "label": ClassLabel(names=list(info.classnames))})
        mode = "L" if task == "mnist" else "RGB"
        files = {}
        for split, size in sizes.items():
            rows = {"image": _images(size, rng, mode), "label": [i % info.num_classes for i in range(size)]}
            files[split] = str(scratch / task / f"{split}.parquet")
            Path(files[split]).parent.mkdir(parents=True, exist_ok=True)
            Dataset.from_dict(rows, features=features).to_parquet(files[split])
        cache = scratch / task / "cache"
        built = load_dataset("parquet", data_files=files, cache_dir=str(cache))
        assert isinstance(built, DatasetDict)
        _file_dataset(home, cache, info.hub_dataset, info.hub_config)


def _file_dataset(home: Path, cache: Path, hub_id: str, config: str | None) -> None:
    prepared = next((cache / "parquet").glob("*/0.0.0/*/"))
    owner, name = hub_id.split("/")
    target = home / "datasets" / f"{owner}___{name}" / (config or "default") / "0.0.0" / prepared.name
    target.mkdir(parents=True)
    for arrow in prepared.glob("parquet-*.arrow"):
        shutil.copy(arrow, target / arrow.name.replace("parquet-", f"{name}-", 1))
    info = json.loads((prepared / "dataset_info.json").read_text())
    info.update(dataset_name=name, config_name=config or "default")
    for split in info["splits"].values():
        split["dataset_name"] = name
    (target / "dataset_info.json").write_text(json.dumps(info))


def env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that finds everything in ``home`` and nothing online."""
    variables = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    for key in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        variables.pop(key, None)
    variables.update(extra)
    return variables
