"""Shared fixtures: tiny local datasets in the Hugging Face schema and image-processor folders.

A dataset row's image is a constant grey square whose value is the row's index in its split,
so a test can read back from a preprocessed tensor which row it came from (``decode_index``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from transformers import ConvNextConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

#: The test files that take longest (minutes: subprocess rehearsals, DDP, compilation), run first so
#: that `make test`'s pytest workers (``-n 2 --dist loadfile``: a file to a worker) finish together
#: instead of one of them starting the TALL20 rehearsal when the other is nearly done.
LONGEST_FIRST = (
    "test_reproduction.py",
    "test_train_cli.py",
    "test_python_api.py",
    "test_public_id_rehearsal.py",
    "test_regmean_cli.py",
    "test_merge_ddp.py",
    "test_task_rehearsal.py",
    "test_multitask_ddp.py",
    "test_reproduce_benchmarks.py",
    "test_families_flow.py",
    "test_merge_cli.py",
    "test_adamerging.py",
    "test_compare.py",
    "test_slurm.py",
    "test_family_rehearsal.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of ``LONGEST_FIRST`` first, in that order; the others after them, as collected."""
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


def tiny_config(classnames: Sequence[str] | None = None, **overrides) -> ConvNextConfig:
    """The tests' one tiny ConvNeXt: one block per stage, 8-64 channels; ``overrides`` set any
    other field (``image_size=32``, ``depths=[...]``), ``classnames`` the head's labels."""
    labels = {}
    if classnames is not None:
        names = {i: str(name) for i, name in enumerate(classnames)}
        labels = {"num_labels": len(names), "id2label": names, "label2id": {name: i for i, name in names.items()}}
    return ConvNextConfig(**{"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64], **overrides, **labels})


# The processor of facebook/convnext-base-224, exactly as it is on the hub.
CONVNEXT_BASE_PREPROCESSOR = {
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ConvNextFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 224,
}

# Each family's image processor, the ``preprocessor_config.json`` of the hub checkpoint in
# ``PREPROCESSOR_SOURCES`` (no hub here: written by hand). The legacy files (``feature_extractor_type``,
# an int ``size``) are the 2021-22 conversions' and were never rewritten on the hub; the others
# are what ``save_pretrained`` wrote: ConvNeXt-V2's conversion script
# (``convert_convnextv2_to_pytorch.py``: ``ConvNextImageProcessor(size=224, crop_pct=224 / 256,
# ImageNet mean/std, BICUBIC)`` for every 224-px checkpoint) and DINOv2's ``BitImageProcessor``.
PREPROCESSORS = {
    "convnext": CONVNEXT_BASE_PREPROCESSOR,
    "convnextv2": {
        "crop_pct": 0.875,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "ConvNextImageProcessor",
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 224},
    },
    # ResNet has no processor of its own: AutoImageProcessor maps it to ConvNextImageProcessor.
    "resnet": {
        "crop_pct": 0.875,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "ConvNextFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "size": 224,
    },
    # An int size with ViT's default_to_square: {"height": 224, "width": 224}, bilinear, mean and std 0.5.
    "vit": {
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
        "size": 224,
    },
    "dinov2": {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "BitImageProcessor",
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 256},
    },
    # ViTImageProcessor too, with ImageNet's mean and std and bicubic.
    "swin": {
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "size": 224,
    },
}

#: The hub checkpoint whose processor each entry of ``PREPROCESSORS`` is.
PREPROCESSOR_SOURCES = {
    "convnext": "facebook/convnext-base-224",
    "convnextv2": "facebook/convnextv2-tiny-1k-224",
    "resnet": "microsoft/resnet-50",
    "vit": "google/vit-base-patch16-224",
    "dinov2": "facebook/dinov2-base",
    "swin": "microsoft/swin-tiny-patch4-window7-224",
}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The real CLI in-process: W&B silent, pytest's own arguments hidden from it, and the
    working directory a scratch folder (``tmp_path``), where the configs' relative outputs land."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(sys, "argv", ["cli"])
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on shared cores: one intra-op thread avoids spinning threads fighting (10x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (real image samples, reference class names); skips where it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip("../shared is not present (a fresh clone)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def tiny_processor() -> str:
    """A 32-pixel ConvNeXt processor directory (crop_pct 1.0), for fast tests."""
    return str(REPO_ROOT / "configs" / "quickstart" / "convnext-tiny-32")


def write_preprocessor(directory: Path, config: dict) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return str(directory)


@pytest.fixture(scope="session")
def convnext_base_processor(tmp_path_factory) -> str:
    """A directory holding facebook/convnext-base-224's ``preprocessor_config.json``."""
    return write_preprocessor(tmp_path_factory.mktemp("convnext-base-224"), CONVNEXT_BASE_PREPROCESSOR)


def gray_image(value: int, size: int = 8) -> PILImage.Image:
    return PILImage.new("RGB", (size, size), (value, value, value))


def index_dataset(split_sizes: dict[str, int], classnames: Sequence[str]) -> DatasetDict:
    """Row ``i`` of every split: a grey image of value ``i`` and label ``i % len(classnames)``."""
    num_labels = len(classnames)
    features = Features({"image": Image(), "label": ClassLabel(names=list(classnames))})
    splits = {}
    for split, size in split_sizes.items():
        if size > 256:
            raise ValueError("pixel values encode the row index: at most 256 rows per split")
        rows = {"image": [gray_image(i) for i in range(size)], "label": [i % num_labels for i in range(size)]}
        splits[split] = Dataset.from_dict(rows, features=features)
    return DatasetDict(splits)


def write_dataset(dataset: DatasetDict, root: Path, form: str) -> str:
    """Write ``dataset`` as ``disk`` (save_to_disk), ``parquet`` (hub layout) or ``imagefolder``."""
    if form == "disk":
        dataset.save_to_disk(str(root))
    elif form == "parquet":
        (root / "data").mkdir(parents=True)
        for split, data in dataset.items():
            data.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    elif form == "imagefolder":
        for split, data in dataset.items():
            names = data.features["label"].names
            for row, item in enumerate(data):
                folder = root / split / names[item["label"]]
                folder.mkdir(parents=True, exist_ok=True)
                item["image"].save(folder / f"{row:04d}.png")
    else:
        raise ValueError(f"unknown dataset form {form!r}")
    return str(root)


@pytest.fixture
def make_local_dataset(tmp_path) -> Callable[..., str]:
    """Factory: ``make_local_dataset(form, {"train": 50, "test": 13}, classnames)`` -> path."""
    counter = iter(range(1_000_000))

    def make(form: str, split_sizes: dict[str, int], classnames: Sequence[str]) -> str:
        root = tmp_path / f"{form}-{next(counter)}"
        return write_dataset(index_dataset(split_sizes, classnames), root, form)

    return make


def _decode_index(pixel_values: torch.Tensor, mean: float = 0.485, std: float = 0.229) -> int:
    """The grey value (row index) of a preprocessed ``index_dataset`` image (ImageNet statistics)."""
    return int(round(float(pixel_values[0].mean()) * std * 255 + mean * 255))


@pytest.fixture(scope="session")
def decode_index() -> Callable[[torch.Tensor], int]:
    return _decode_index
