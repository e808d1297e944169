"""The fine-tuning recipe's SGD settings, read from ``configs/train/base.yaml``: the one place
they are written (the classifier has no defaults for them)."""

from __future__ import annotations

from pathlib import Path

import yaml

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "base.yaml"


def sgd_settings() -> dict[str, float]:
    """``{"lr", "momentum", "weight_decay"}`` of the recipe, as ``ImageClassifier`` takes them."""
    model = yaml.safe_load(BASE_CONFIG.read_text())["model"]
    return {name: float(model[name]) for name in ("lr", "momentum", "weight_decay")}
