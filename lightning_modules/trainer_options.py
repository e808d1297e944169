"""The Trainer's options in the CLI: Lightning's, with the count-or-fraction ones typed ``int`` first."""

from __future__ import annotations

import functools
import inspect
import operator
import typing
from typing import Any

#: Trainer options where an int counts (batches, steps) and a float is a fraction.
COUNT_OR_FRACTION = (
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
    "val_check_interval", "overfit_batches",
)  # fmt: skip


#: Their help: added anew, these options do not get Lightning's docstring.
COUNT_OR_FRACTION_HELP = {
    "limit_train_batches": "How much of the training data to use: an int counts batches, a float is a fraction.",
    "limit_val_batches": "How much of the validation data to use: an int counts batches, a float is a fraction.",
    "limit_test_batches": "How much of the test data to use: an int counts batches, a float is a fraction.",
    "limit_predict_batches": "How much of the prediction data to use: an int counts batches, a float is a fraction.",
    "overfit_batches": "Train and validate on this much of the training data: an int counts batches, a float is a fraction.",
    "val_check_interval": "How often to validate within a training epoch: an int counts batches, a float is a fraction "
    "of the epoch (also a duration: a string, timedelta or dict).",
}


def int_first(hint: Any) -> Any:
    """``hint``, a union, as a ``types.UnionType`` with ``int`` first. Lightning types the options
    of ``COUNT_OR_FRACTION`` ``Optional[Union[int, float]]``, but typing caches unions by equality
    (``Union[int, float] == Union[float, int]``), so the union it hands out can be float first,
    depending on which libraries built which union first (Lightning itself annotates
    ``Union[float, int]``), and jsonargparse, which tries a union's types in order, then reads
    ``--trainer.limit_test_batches 1`` as ``1.0``: every batch. Seen once one more merge method and
    the test fixtures' libraries were imported before parsing (``tests/test_merge_cli.py``). A
    ``types.UnionType`` (``int | float``) is built anew, in the order given, outside that cache."""
    members = sorted(typing.get_args(hint), key=lambda member: member is not int)
    return functools.reduce(operator.or_, members)


def add_trainer_arguments(parser: Any, trainer_class: type) -> None:
    """The Trainer's options under ``trainer.`` as LightningCLI adds them, but for the count-or-fraction
    ones, typed ``int`` first (``int_first``) in the same group."""
    parser.add_class_arguments(
        trainer_class, "trainer", fail_untyped=False, instantiate=False, sub_configs=True, skip=set(COUNT_OR_FRACTION)
    )
    parameters = inspect.signature(trainer_class.__init__).parameters
    for name in COUNT_OR_FRACTION:
        parser.groups["trainer"].add_argument(
            f"--trainer.{name}",
            type=int_first(parameters[name].annotation),
            default=parameters[name].default,
            help=COUNT_OR_FRACTION_HELP[name],
        )
