"""``--help`` that a user can read: a one-line usage instead of every option twice, and the
Trainer's documentation cut to its first sentence (Lightning's own docs have the rest). With
the project's model and data options ahead of the Trainer's (``ProjectCLI``), they are the
first thing a user sees."""

from __future__ import annotations

import copy
import re
from argparse import Action
from typing import Any

from jsonargparse import DefaultHelpFormatter

#: Options whose help is cut to its first sentence.
BRIEF_PREFIXES = ("trainer.", "weights_only")


def first_sentence(text: str) -> str:
    """``"Number of nodes. Default: ``1``."`` -> ``"Number of nodes."`` (whitespace folded)."""
    text = " ".join(text.split())
    match = re.match(r"(.+?[.!?])\s+[A-Z`(]", text)
    return match[1] if match else text


class ProjectHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter (types, defaults) with a short usage line and brief Trainer options."""

    def add_usage(self, usage: str | None, actions: Any, groups: Any, prefix: str | None = None) -> None:
        if usage is None and prefix is None:  # the usage line (argparse also asks for a subcommand's prog prefix)
            subcommands = [action for action in actions if not action.option_strings and action.choices]
            usage = "%(prog)s [options]" + "".join(f" {{{','.join(a.choices)}}} ..." for a in subcommands)
        super().add_usage(usage, actions, groups, prefix)

    def add_argument(self, action: Action) -> None:
        if action.help and action.dest.startswith(BRIEF_PREFIXES):
            action = copy.copy(action)
            action.help = first_sentence(action.help)
        super().add_argument(action)
