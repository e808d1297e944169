"""A Hugging Face home in a temporary folder that answers the real hub ids offline.

With ``HF_HOME`` pointed at it and ``HF_HUB_OFFLINE=1``, the project's configs run unchanged:
``facebook/convnext-base-224``, the eight public ``tanganke/convnext-base-224_<task>_...``
checkpoints and the 24 datasets of the task registry resolve to tiny stand-ins that carry
what the real ones carry:

- models: ``config.json`` (a ConvNeXt with 8-64 channels; ``id2label`` = the task's class
  names for a fine-tuned one, 1,000 labels for the pretrained one), ``model.safetensors``,
  ``preprocessor_config.json`` with facebook/convnext-base-224's real 224-pixel settings, laid
  out as the hub cache does (``hub/models--<owner>--<name>/snapshots/<rev>/`` and ``refs/main``);
- another family (``add_resnet``): ``microsoft/resnet-50``, a ResNet with 8-16 channels
  (``tests/families.py``) and 1,000 labels, with the hub checkpoint's own ``preprocessor_config.json``
  (``ConvNextFeatureExtractor``: shorter side 224 / 0.875, centre crop 224, bicubic, ImageNet
  mean and std; ``conftest.PREPROCESSORS``);
- datasets (``standin``): the dataset's own split names (``food101``: ``train`` and
  ``validation``; ``pcam``: ``train``, ``valid``, ``test``), its own columns (``fer2013``'s
  webdataset: ``__key__``, ``__url__``, ``jpg`` and an integer ``cls``; ``oxford_iiit_pet``'s
  ``image_id`` and ``label_cat_dog`` next to ``image`` and ``label``), its label type (``pcam``:
  booleans) and class names spelt as the dataset spells them (``DATASET_CLASSNAMES``:
  ``food101``'s ``cheese_plate``, ``fashion_mnist``'s ``T-shirt/top``, ``tiny_imagenet``'s
  WordNet ids), grayscale where the real images are; prepared by ``load_dataset("parquet", ...)``
  and filed where ``load_dataset(<hub id>, <config>)`` looks for a cached copy offline
  (``datasets/<owner>___<name>/<config>/0.0.0/<fingerprint>/<name>-<split>.arrow``, the name
  folded by ``datasets.naming.camelcase_to_snakecase``: ``1aurent___patch_camelyon``).

The ``datasets`` and ``huggingface_hub`` libraries read ``HF_HOME`` when imported, so the
stand-ins serve subprocesses started with ``env(home)``, not the test process itself.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset
from datasets.naming import camelcase_to_snakecase
from PIL import Image as PILImage
from transformers import ConvNextConfig, ConvNextForImageClassification, PreTrainedModel, ResNetForImageClassification

import families
from conftest import CONVNEXT_BASE_PREPROCESSOR, PREPROCESSORS, REPO_ROOT, tiny_config
from datamodules.tasks import BENCHMARK_TASKS, FUSIONBENCH_TASKS, get_task

PRETRAINED_ID = "facebook/convnext-base-224"
RESNET_ID = "microsoft/resnet-50"
REVISION = "0" * 40


def finetuned_id(task: str) -> str:
    """The public checkpoint of ``task``, as the merge configs name it."""
    return f"tanganke/convnext-base-224_{get_task(task).hub_name}_sgd_batch-size-64_lr-0.01_steps-4000"


def _config(classnames: list[str]) -> ConvNextConfig:
    return tiny_config(classnames)


def _save_model(
    home: Path, repo_id: str, model: PreTrainedModel, processor: Mapping[str, object] = CONVNEXT_BASE_PREPROCESSOR
) -> Path:
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    model.save_pretrained(snapshot)
    (snapshot / "preprocessor_config.json").write_text(json.dumps(processor))
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


def add_resnet(home: Path, seed: int = 0) -> Path:
    """``microsoft/resnet-50``'s stand-in: the tiny ResNet of ``tests/families.py`` (BatchNorm
    statistics drawn, as a trained model has them) with an ImageNet-sized head and the hub
    checkpoint's image processor; returns its snapshot."""
    config = families.family_config("resnet", [f"imagenet class {i}" for i in range(1000)])
    torch.manual_seed(seed)
    model = ResNetForImageClassification(config)
    families.as_if_trained(model, torch.Generator().manual_seed(seed))
    return _save_model(home, RESNET_ID, model, PREPROCESSORS["resnet"])


#: Tasks whose real images are grayscale (the rest are RGB).
GRAYSCALE = frozenset({"mnist", "fashion_mnist", "kmnist", "emnist_letters", "emnist_mnist", "fer2013"})


def _dataset_classnames(task: str) -> list[str]:
    """The class names of a task's dataset as the dataset spells them (in its label order,
    which the registry follows): where the real one's differ from the registry's only in
    spelling, or match none of them (``tiny_imagenet``'s WordNet ids, ``n01443537`` first)."""
    names = list(get_task(task).classnames)
    if task == "food101":
        return [name.replace(" ", "_") for name in names]  # 16 cheesecake, 17 cheese_plate
    if task == "fashion_mnist":
        return ["T-shirt/top", *names[1:]]
    if task == "tiny_imagenet":
        return [f"n{1443537 + 1000 * label:08d}" for label in range(len(names))]
    return names


DATASET_CLASSNAMES = {task: _dataset_classnames(task) for task in FUSIONBENCH_TASKS}


def random_images(count: int, rng: np.random.Generator, mode: str) -> list[PILImage.Image]:
    channels = 1 if mode == "L" else 3
    pixels = rng.integers(0, 256, (count, 24, 32, channels), dtype=np.uint8)
    return [PILImage.fromarray(image.squeeze(-1) if mode == "L" else image, mode=mode) for image in pixels]


def _features(task: str) -> Features:
    info = get_task(task)
    label = {"bool": Value("bool"), "int": Value("int64")}.get(info.label_type) or ClassLabel(names=DATASET_CLASSNAMES[task])
    columns = {column: Value("string") for column in info.drop_columns}
    columns.update({info.image_column: Image(), info.label_column: label})
    if task == "oxford_iiit_pet":
        columns.update(image_id=Value("string"), label_cat_dog=ClassLabel(names=["cat", "dog"]))
    return Features(columns)


def _extra_splits(task: str) -> tuple[str, ...]:
    """Splits of the real dataset that the task does not read (``pcam``'s ``valid``)."""
    return ("valid",) if task == "pcam" else ()


def standin(
    task: str, sizes: dict[str, int], images: Callable[[int, str], list[PILImage.Image]] | None = None, seed: int = 0
) -> DatasetDict:
    """A tiny copy of ``task``'s hub dataset, as the module docstring lists: ``sizes`` rows in its
    ``train`` and ``test`` splits (under the dataset's own names; an extra split gets the test
    size), row ``i`` labelled ``i % num_classes`` (``True`` for odd rows of a boolean column);
    ``images(count, mode)`` draws them (default: seeded noise)."""
    info = get_task(task)
    rng = np.random.default_rng(seed)
    images = images or (lambda count, mode: random_images(count, rng, mode))
    mode = "L" if task in GRAYSCALE else "RGB"
    features = _features(task)
    splits = {info.split_name(role): size for role, size in sizes.items()}
    splits.update({split: sizes["test"] for split in _extra_splits(task)})
    result = {}
    for split, size in splits.items():
        labels = [row % info.num_classes for row in range(size)]
        rows = {info.image_column: images(size, mode), info.label_column: labels}
        if info.label_type == "bool":
            rows[info.label_column] = [bool(label) for label in labels]
        for column in info.drop_columns:  # the webdataset's sample key and shard URL
            rows[column] = [f"{split}/{row:05d}" if column == "__key__" else f"{split}.tar" for row in range(size)]
        if task == "oxford_iiit_pet":
            rows.update(image_id=[f"pet_{row}" for row in range(size)], label_cat_dog=[row % 2 for row in range(size)])
        result[split] = Dataset.from_dict(rows, features=features)
    return DatasetDict(result)


def add_datasets(home: Path, scratch: Path, sizes: dict[str, int], tasks: tuple[str, ...] = BENCHMARK_TASKS) -> None:
    """Each task's ``standin`` under its hub id and config (``svhn``: ``cropped_digits``, ``kmnist``:
    ``kmnist``); ``sizes`` are the rows of its ``train`` and ``test`` splits."""
    for index, task in enumerate(tasks):
        info = get_task(task)
        files = {}
        for split, data in standin(task, sizes, seed=index).items():
            files[split] = str(scratch / task / f"{split}.parquet")
            Path(files[split]).parent.mkdir(parents=True, exist_ok=True)
            data.to_parquet(files[split])
        cache = scratch / task / "cache"
        built = load_dataset("parquet", data_files=files, cache_dir=str(cache))
        assert isinstance(built, DatasetDict)
        _file_dataset(home, cache, info.hub_dataset, info.hub_config)


def _file_dataset(home: Path, cache: Path, hub_id: str, config: str | None) -> None:
    prepared = next((cache / "parquet").glob("*/0.0.0/*/"))
    owner, name = hub_id.split("/")
    name = camelcase_to_snakecase(name)  # where `datasets` looks: 1aurent/PatchCamelyon -> 1aurent___patch_camelyon
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
