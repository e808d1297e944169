"""``lightning_modules.parser_errors`` on real jsonargparse messages: each case runs a parser with
a bad argument and feeds the message jsonargparse wrote to ``one_line``. The rewriting reads
jsonargparse's English wording, so a release that changes it fails here (the installed one is
checked against the verified range by ``lightning_modules.versions``)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from argparse import ArgumentError
from pathlib import Path
from typing import Literal

import pytest
from jsonargparse import ActionConfigFile

from lightning_modules.parser_errors import ProjectArgumentParser, closest_key, one_line


class Method(ABC):
    """The declared (abstract) class of ``Model.method``."""

    @abstractmethod
    def merge(self) -> float: ...


class Scaled(Method):
    def __init__(self, scaling_factor: float) -> None:
        self.scaling_factor = scaling_factor

    def merge(self) -> float:
        return self.scaling_factor


class Plain(Method):
    def merge(self) -> float:
        return 1.0


class Model:
    def __init__(
        self, method: Method | None = None, lr: float = 0.1, steps: int = 1, split: Literal["test", "holdout"] = "test"
    ) -> None:
        self.method, self.lr, self.steps, self.split = method, lr, steps, split


def make_parser(exit_on_error: bool = False) -> ProjectArgumentParser:
    """Shaped like LightningCLI's: subcommands ``fit`` and ``test``, each with its ``--config``."""
    parser = ProjectArgumentParser(prog="prog", exit_on_error=exit_on_error)
    subcommands = parser.add_subcommands()
    for name in ("fit", "test"):
        subcommand = ProjectArgumentParser()
        subcommand.add_argument("--config", action=ActionConfigFile)
        subcommand.add_class_arguments(Model, "model")
        subcommands.add_subcommand(name, subcommand)
    return parser


def rewritten(args: list[str]) -> str:
    """The message jsonargparse raises for ``fit *args``, as ``one_line`` rewrites it."""
    parser = make_parser()
    with pytest.raises(ArgumentError) as raised:
        parser.parse_args(["fit", *args])
    return one_line(str(raised.value), parser.subcommand_parsers["fit"])


def config_file(tmp_path: Path, content: dict | str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(content if isinstance(content, str) else json.dumps(content))  # JSON is YAML
    return str(path)


CASES = {
    "an unknown option": (["--model.stepz", "3"], "unknown option --model.stepz; did you mean --model.steps?"),
    "an unknown option, nothing close": (["--nothing_like_it", "3"], "unknown option --nothing_like_it; see prog fit --help"),
    "a stray positional": (["stray"], "unexpected argument 'stray' (see prog fit --help)"),
    "not an int": (["--model.steps", "abc"], "model.steps: expected int, got 'abc'"),
    "not a choice": (["--model.split", "train"], "model.split: expected one of 'test', 'holdout', got 'train'"),
    "an unknown class": (["--model.method", "Scaledd"], "model.method: unknown class 'Scaledd'; did you mean Scaled? (choose from Plain, Scaled)"),
    "a class by its prefix": (["--model.method", "Sca"], "model.method: unknown class 'Sca'; did you mean Scaled? (choose from Plain, Scaled)"),
    "an unknown class option": (["--model.method", "Scaled", "--model.method.scaling_factr", "1"],
                                "model.method: Scaled has no option 'scaling_factr'; did you mean 'scaling_factor'?"),
    "an option of a class without options": (["--model.method", "Plain", "--model.method.scaling_factor", "1"],
                                             "model.method: Plain has no options (given 'scaling_factor')"),
    "an option before its class": (["--model.method.scaling_factor", "1"],
                                   "model.method: option 'scaling_factor' given before a class (choose from Plain, Scaled)"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_command_line_mistake_is_one_line(case):
    args, expected = CASES[case]
    assert rewritten(args) == expected


CONFIG_CASES = {
    "a misspelt key": ({"model": {"lrr": 0.2}}, "unknown key 'model.lrr'; did you mean 'model.lr'?"),
    "a misspelt section": ({"modle": {"lr": 0.2}}, "unknown key 'modle.lr'; did you mean 'model.lr'?"),
    "a value of the wrong type": ({"model": {"steps": "many"}}, "model.steps: expected int, got 'many'"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_a_config_file_mistake_is_one_line(case, tmp_path):
    content, expected = CONFIG_CASES[case]
    assert rewritten(["--config", config_file(tmp_path, content)]) == expected


def test_an_unknown_subcommand_lists_the_subcommands():
    parser = make_parser()
    assert list(parser.subcommand_parsers) == ["fit", "test"]  # what TrainCLI dumps the export's config with
    with pytest.raises(ArgumentError) as raised:
        parser.parse_args(["predict"])
    assert one_line(str(raised.value), parser) == "unknown subcommand 'predict' (choose from fit, test)"


def error_line(args: list[str], capsys) -> str:
    """The parser as the CLI runs it: one ``error:`` line on stderr and exit status 1."""
    with pytest.raises(SystemExit) as exit_info:
        make_parser(exit_on_error=True).parse_args(["fit", *args])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_yaml_is_named_by_its_path(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  lr: 0.2\n")
    bad = config_file(tmp_path, "model:\n  steps: [1\n")
    line = error_line(["--config", str(good), "--config", bad], capsys)
    assert line == (
        f"error: --config '{bad}' is not valid YAML: did not find expected ',' or ']' "
        "(line 3, column 1; while parsing a flow sequence started at line 2, column 10)"
    )


def test_bad_yaml_in_a_nested_config_is_named_from_its_parent(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text("model: {lr: 0.2\n")
    parent = config_file(tmp_path, "config: sub/base.yaml\n")
    line = error_line(["--config", parent], capsys)
    assert line.startswith(f"error: --config '{tmp_path / 'sub' / 'base.yaml'}' is not valid YAML: "), line


def test_a_config_that_is_not_a_mapping_is_named(tmp_path, capsys):
    path = config_file(tmp_path, "- 1\n- 2\n")
    assert error_line(["--config", path], capsys) == f"error: --config '{path}' is not a mapping of options"


def test_closest_key_corrects_one_component_at_a_time():
    known = {"trainer.max_steps", "trainer.max_epochs", "model.lr", "model.method"}
    assert closest_key("trainer.max_stepz", known) == "trainer.max_steps"
    assert closest_key("trainr.max_steps", known) == "trainer.max_steps"
    assert closest_key("modle.method.top_k", known) == "model.method.top_k"  # below a class: kept as given
    assert closest_key("model.lr", known) is None  # nothing to correct
    assert closest_key("zzz.lr", known) is None
