"""Configuration mistakes (an unknown option or key, an unknown class, a value of the wrong
type) as one ``error:`` line with the valid choices, instead of jsonargparse's usage text
and nested union report."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
import typing
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any, NoReturn

import yaml
from lightning.pytorch.cli import LightningArgumentParser

from lightning_modules.parser_help import ProjectHelpFormatter

#: Longest list of classes spelled out in full; beyond it, only the closest names. Above the
#: number of merge methods (14, and more to come), which an unknown ``--model.method`` lists in full.
MAX_LISTED = 24
#: Lines of jsonargparse's union report that say nothing about the mistake itself.
_NOISE = re.compile(r"^(Does not validate|Subtypes:|Errors:|Given value|- Expected a <class 'NoneType'>|"
                    r"Problem with given class_path|Subclass types expect|- a (class path|dict))")  # fmt: skip
#: The ``--config`` file being read (a nested ``config:`` relative to its parent's folder): its YAML
#: errors are named after it, where jsonargparse's loader calls every file "<unicode string>".
_CONFIG_BEING_READ: ContextVar[str | None] = ContextVar("config_being_read", default=None)


class ProjectArgumentParser(LightningArgumentParser):
    """Reports a parse error as one ``error:`` line and exit status 1, like every input error.
    Options are spelt out: argparse would take ``--trainer.max_step`` for ``--trainer.max_steps``
    on the command line while the same key in a YAML file is an error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", ProjectHelpFormatter)
        super().__init__(*args, **kwargs)
        #: name -> parser of each subcommand (``fit``, ``test``), as LightningCLI adds them.
        self.subcommand_parsers: dict[str, Any] = {}

    def add_subcommands(self, *args: Any, **kwargs: Any) -> Any:
        subcommands = super().add_subcommands(*args, **kwargs)
        self.subcommand_parsers = subcommands.choices  # argparse's name -> parser map, filled by add_subcommand
        return subcommands

    def parse_path(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        shown, parent = os.fspath(path), _CONFIG_BEING_READ.get()
        if parent is not None and not os.path.isabs(shown):  # jsonargparse reads it from the parent's folder
            shown = os.path.join(os.path.dirname(parent), shown)
        token = _CONFIG_BEING_READ.set(shown)
        try:
            return super().parse_path(path, *args, **kwargs)
        finally:
            _CONFIG_BEING_READ.reset(token)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        message = _name_the_config(message, ex)  # here, while the file is being read
        if not self.exit_on_error:  # jsonargparse's inner parsers: the outer one reports
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"error: {one_line(message, parser)}", file=sys.stderr)
        raise SystemExit(1)


def _name_the_config(message: str, ex: BaseException | None) -> str:
    """A YAML mistake in the ``--config`` being read, or a file that is not a mapping, named by its path."""
    path = _CONFIG_BEING_READ.get()
    if path is None:
        return message
    while ex is not None and not isinstance(ex, yaml.YAMLError):
        ex = ex.__cause__
    if isinstance(ex, yaml.MarkedYAMLError) and ex.problem_mark is not None:
        where = f"line {ex.problem_mark.line + 1}, column {ex.problem_mark.column + 1}"
        if ex.context and ex.context_mark is not None:
            where += f"; {ex.context} started at line {ex.context_mark.line + 1}, column {ex.context_mark.column + 1}"
        return f"--config '{path}' is not valid YAML: {ex.problem} ({where})"
    if isinstance(ex, yaml.YAMLError):
        return f"--config '{path}' is not valid YAML: {' '.join(str(ex).split())}"
    if message.startswith("Unexpected config:"):
        return f"--config '{path}' is not a mapping of options"
    return message


def one_line(message: str, parser: Any) -> str:
    """jsonargparse's ``message`` as one line naming the option, with a "did you mean"."""
    if match := re.match(r"argument subcommand: invalid choice: '([^']*)' \(choose from (.*)\)", message):
        return f"unknown subcommand '{match[1]}' (choose from {match[2].replace(chr(39), '')})"
    if match := re.match(r"unrecognized arguments: (\S+)", message):
        return _unknown_option(match[1], parser)
    if match := re.search(r"does not accept option '([^']+)'|Option '([^']+)' is not accepted before", message):
        return _unknown_key(match[1] or match[2], parser)
    keys = ".".join(re.findall(r'Parser key "([^"]+)"', message))
    if keys:
        return f"{keys}: {_leaf(message)}"
    return " ".join(message.split())


def _unknown_option(argument: str, parser: Any) -> str:
    if not argument.startswith("--"):
        return f"unexpected argument '{argument}' ({_see_help(parser)})"
    option = argument.split("=", 1)[0]
    match = closest_key(option[2:], parser_keys(parser))
    hint = f"did you mean --{match}?" if match else _see_help(parser)
    return f"unknown option {option}; {hint}"


def _unknown_key(key: str, parser: Any) -> str:
    match = closest_key(key, parser_keys(parser))
    hint = f"did you mean '{match}'?" if match else _see_help(parser)
    return f"unknown key '{key}'; {hint}"


def _see_help(parser: Any) -> str:
    return f"see {parser.prog.replace(' [options]', '')} --help"


def parser_keys(parser: Any) -> set[str]:
    """Every dotted key the parser accepts (``trainer.max_steps``, ``model``, ...)."""
    return set(parser.get_defaults(skip_validation=True).keys())


def closest_key(key: str, known: Iterable[str]) -> str | None:
    """The known dotted key nearest to ``key``, correcting one component at a time."""
    paths = [name.split(".") for name in known]
    parts, fixed = key.split("."), []
    for index, part in enumerate(parts):
        children = {path[len(fixed)] for path in paths if path[: len(fixed)] == fixed and len(path) > len(fixed)}
        if not children:  # below a class or dict option: its keys are not known here
            fixed += parts[index:]
            break
        if part not in children:
            close = difflib.get_close_matches(part, children, n=1)
            if not close:
                return None
            part = close[0]
        fixed.append(part)
    return ".".join(fixed) if fixed != parts else None


def _leaf(message: str) -> str:
    if match := re.search(r"Expected an instantiatable class, but (\S+) is abstract", message):
        return _abstract_class(match[1], message[match.end() :])
    if match := re.search(r"Problem with given class_path '([^']+)':\s*Option '([^']+)' is not accepted", message):
        return _unknown_init_arg(match[1], match[2])
    if match := re.search(r"Expected a dot import path string: (\S+)|Problem with given class_path '([^']+)':\s*"
                          r"(No module named|module '[^']+' has no attribute)", message):  # fmt: skip
        return _unknown_class(match[1] or match[2], message[: match.start()])
    if match := re.search(r"Expected a (.+?)\. Got value: (.*)", message):
        return f"expected {_type_name(match[1])}, got {match[2]!r}"
    lines = [re.sub(r'^(Parser key "[^"]+":\s*)+', "", line.strip()) for line in message.splitlines()]
    informative = [line for line in lines if line and not _NOISE.match(line)]
    return informative[-1].lstrip("- ") if informative else " ".join(message.split())


def _unknown_init_arg(class_path: str, option: str) -> str:
    cls = _import(class_path)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind in named][1:] if cls else []
    if cls and not params:
        if choices := class_choices([cls]):  # the declared base class: no subclass was chosen
            return f"option '{option}' given before a class (choose from {', '.join(choices)})"
        return f"{class_path.rsplit('.', 1)[-1]} has no options (given '{option}')"
    close = difflib.get_close_matches(option, params, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"it takes {', '.join(params)}"
    return f"{class_path.rsplit('.', 1)[-1]} has no option '{option}'; {hint}"


def _abstract_class(class_path: str, after: str) -> str:
    """No class chosen for an option whose declared class is abstract (``--model.method.top_k``
    without ``--model.method``), or that class named itself; ``after``: the rest of the report."""
    cls = _import(class_path)
    choices = ", ".join(class_choices([cls])) if cls else ""
    if nested := re.search(r"NestedArg\(key='([^']+)'", after):
        return f"option '{nested[1]}' given before a class (choose from {choices})"
    return f"{class_path.rsplit('.', 1)[-1]} is abstract (choose from {choices})"


def _unknown_class(name: str, before: str) -> str:
    """``before``: the report up to the mistake, which names the expected base class."""
    choices = class_choices(_expected_bases(before))
    close = _closest_class(name.rsplit(".", 1)[-1], choices)
    hint = f"; did you mean {close}?" if close else ""
    listed = ", ".join(choices) if len(choices) <= MAX_LISTED else f"{len(choices)} classes, see --help"
    return f"unknown class '{name}'{hint} (choose from {listed})"


def _expected_bases(before: str) -> list[type]:
    """The innermost option's declared classes: from the annotation of the class that takes it
    (jsonargparse reports no ``Subtypes`` for a list of classes), else the ``Subtypes`` line."""
    options = re.findall(r"""Problem with given class_path '([^']+)':\s*Parser key "([^"]+)":""", before)
    if options and (owner := _import(options[-1][0])):
        return _classes_in(typing.get_type_hints(owner.__init__).get(options[-1][1]))
    subtypes = re.findall(r"Subtypes: \[(.*)\]", before) or [""]
    return list(filter(None, map(_import, re.findall(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", subtypes[-1]))))


def _classes_in(hint: Any) -> list[type]:
    if inspect.isclass(hint):
        return [hint] if hint.__module__ != "builtins" else []
    return [cls for arg in typing.get_args(hint) for cls in _classes_in(arg)]


def class_choices(bases: Iterable[type]) -> list[str]:
    """Names of the concrete, public classes below ``bases`` that the parser accepts by name."""
    names: list[str] = []
    for base in bases:
        for cls in _subclasses(base):
            if not (inspect.isabstract(cls) or cls.__name__.startswith("_") or "<locals>" in cls.__qualname__):
                names += [cls.__name__] if cls.__name__ not in names else []
    return sorted(names)


def _subclasses(cls: type) -> list[type]:
    found = []
    for subclass in cls.__subclasses__():
        found += [subclass, *_subclasses(subclass)]
    return found


def _closest_class(name: str, choices: list[str]) -> str | None:
    """By prefix first (``Ties`` -> ``TiesMerging``), then by spelling."""
    prefixed = [choice for choice in choices if choice.lower().startswith(name.lower())]
    close = prefixed or difflib.get_close_matches(name, choices, n=1)
    return close[0] if close else None


def _type_name(typehint: str) -> str:
    if match := re.fullmatch(r"typing\.Literal\[(.*)\]", typehint):
        return f"one of {match[1]}"
    return re.sub(r"<class '([\w.]+)'>", r"\1", typehint)


def _import(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
