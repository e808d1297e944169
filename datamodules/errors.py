"""The one exception type for bad data input, and the domain check of a setting that every
layer uses (with its own exception type)."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset, path, split or label that cannot be used, named in the message."""


def check_setting(valid: bool, option: str, domain: str, value: object, error: type[ValueError] = DataError) -> None:
    """Refuse a setting outside its domain in ``__init__``, before torch fails on it mid-run;
    ``option`` is spelt as the user types it (``data.batch_size``)."""
    if not valid:
        raise error(f"{option} must be {domain}, got {value!r}")
