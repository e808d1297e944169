"""Exceptions for bad checkpoints and impossible merges; each message names file, key and shapes."""

from common.errors import CheckpointError

__all__ = ["CheckpointError", "MergeError"]


class MergeError(ValueError):
    """Models that cannot be merged as asked (mismatched keys or shapes, no fine-tuned model, ...)."""
