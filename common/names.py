"""The spellings that name the same class or task."""

from __future__ import annotations


def plain_label(name: object) -> str:
    """Class-name spellings that name the same class: ``Annual_Crop`` and ``annual crop``."""
    return " ".join(str(name).lower().replace("_", " ").split())


def task_key(name: str) -> str:
    """Task-name spellings that name the same task: ``Stanford-Cars`` and ``stanford_cars``."""
    return name.strip().lower().replace("-", "_")
