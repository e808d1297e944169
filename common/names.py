"""The spellings that name the same class or task, and each task's short column name."""

from __future__ import annotations

#: The column name of each hub task in a wide table (the report's Markdown table, the W&B table,
#: the heat map): short and fixed, as papers print the 8-, 14- and 20-task benchmarks. A task
#: without an entry (the offline quickstart tasks, a user's own) is printed as it is named.
TASK_ABBREVIATIONS = {
    "sun397": "SUN",
    "stanford_cars": "Cars",
    "resisc45": "RES",
    "eurosat": "EuSAT",
    "svhn": "SVHN",
    "gtsrb": "GTSRB",
    "mnist": "MNIST",
    "dtd": "DTD",
    "oxford_flowers102": "Flowers",
    "pcam": "PCAM",
    "fer2013": "FER",
    "oxford_iiit_pet": "Pets",
    "stl10": "STL10",
    "cifar100": "C100",
    "cifar10": "C10",
    "food101": "Food",
    "fashion_mnist": "FMNIST",
    "emnist_letters": "EMNIST",
    "kmnist": "KMNIST",
    "rendered_sst2": "SST2",
    "emnist_mnist": "EMNIST-D",
    "cub_200_2011": "CUB",
    "tiny_imagenet": "TinyIN",
    "mango_leaf_disease": "Mango",
}


def plain_label(name: object) -> str:
    """Class-name spellings that name the same class: ``Annual_Crop`` and ``annual crop``."""
    return " ".join(str(name).lower().replace("_", " ").split())


def task_key(name: str) -> str:
    """Task-name spellings that name the same task: ``Stanford-Cars`` and ``stanford_cars``."""
    return name.strip().lower().replace("-", "_")


def task_abbreviation(name: str) -> str:
    """The task's column name in a wide table (``TASK_ABBREVIATIONS``), or its name where it has none."""
    return TASK_ABBREVIATIONS.get(task_key(name), name)
