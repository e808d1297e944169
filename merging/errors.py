"""Exceptions for bad checkpoints and impossible merges; each message names file, key and shapes."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, corrupt or for another task, or an output
    location that cannot be written."""


class MergeError(ValueError):
    """Models that cannot be merged as asked (mismatched keys or shapes, no fine-tuned model, ...)."""
