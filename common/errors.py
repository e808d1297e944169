"""The exception both sides raise for a bad checkpoint or output location."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, corrupt or for another task, or an output
    location that cannot be written."""
