"""The one exception type for bad data input."""


class DataError(ValueError):
    """A dataset, path, split or label that cannot be used, named in the message."""
