"""More bad input through the real CLIs, in-process, with ``test_bad_input``'s helpers: device
counts that do not split a batch (refused before any process starts), a merge method without
options, a broken second ``--config``, failures after Lightning wrote ``config.yaml``,
subcommands a module has no step for, and ``--help``. Each asserts the one ``error:`` line, the
exit status and that nothing was left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import test_bad_input
from conftest import write_dataset
from merge import main as merge_main
from test_bad_input import (
    METHOD_NAMES,
    assert_nothing_written,
    merge_args,
    merged_classifier,
    one_error_line,
    small_dataset,
    train_args,
)
from train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")
# test_bad_input's fixtures, here too: the empty working directory (autouse), its ConvNeXt and its pool
workdir, convnext, pool = test_bad_input.workdir, test_bad_input.convnext, test_bad_input.pool


@pytest.fixture
def no_launch(monkeypatch):
    """Lightning starts the other DDP processes with subprocess.Popen: here that fails the test."""

    def launched(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", launched)


@pytest.fixture
def mnist(tmp_path) -> Path:
    return write_dataset(small_dataset("mnist"), tmp_path / "mnist", "disk")


def train_run(convnext: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return train_args(
        convnext, data, "mnist", "--trainer.default_root_dir", str(out / "root"), "--export_dir", str(out / "exports"), *extra
    )


def assert_nothing_left(out: Path, workdir: Path) -> None:
    assert not (out / "root").exists() and not (out / "exports").exists()  # no config.yaml, no export
    assert not list(workdir.iterdir())


# --- device counts: one line, before Lightning starts the other processes ------------------------

DEVICE_CASES = {
    "3 devices, a batch of 4": (["--trainer.devices", "3"], "error: data.batch_size 4 (a global batch) does not split over 3 device(s)"),
    "2 devices x 3 accumulated": (["--trainer.devices", "2", "--trainer.accumulate_grad_batches", "3"],
                                  "error: data.batch_size 4 (a global batch) does not split over 2 device(s) x 3 accumulated batches"),
    "Lightning's sampler": (["--trainer.devices", "2", "--trainer.use_distributed_sampler", "true"],
                            "error: set trainer.use_distributed_sampler=false: the training data is ordered and sharded by its "
                            "DataModule (Lightning's sampler would replace the seeded order)"),
}  # fmt: skip


@pytest.mark.parametrize("case", DEVICE_CASES)
def test_a_device_count_that_does_not_fit_is_refused_before_launch(case, convnext, mnist, tmp_path, workdir, capsys, no_launch):
    extra, expected = DEVICE_CASES[case]
    assert (
        one_error_line(train_main, train_run(convnext, mnist, tmp_path, "--trainer.accelerator", "cpu", *extra), capsys)
        == expected
    )
    assert_nothing_left(tmp_path, workdir)


def adamerging_fit(pool, out: Path, *extra: str) -> list[str]:
    model = ["--model", "AdaMerging", "--model.output_dir", str(out / "coefficients")]
    return ["fit", *merge_args(pool, out, *model)[1:], *extra]


def test_an_adaptation_batch_that_does_not_split_is_refused_before_launch(pool, tmp_path, workdir, capsys, no_launch):
    args = adamerging_fit(
        pool, tmp_path, "--trainer.max_steps", "1", "--trainer.devices", "3", "--data.adaptation_batch_size", "4"
    )
    line = one_error_line(merge_main, args, capsys)
    assert line == "error: data.adaptation_batch_size 4 (a global batch) does not split over 3 device(s)"
    assert_nothing_written(tmp_path, workdir)


# --- a merge method's options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "expected"),
    [(["--model.method", "SimpleAverage"], "error: model.method: SimpleAverage has no options (given 'scaling_factor')"),
     ([], f"error: model.method: option 'scaling_factor' given before a class (choose from {METHOD_NAMES})")],
)  # fmt: skip
def test_an_option_of_no_method_is_one_line(method, expected, pool, tmp_path, workdir, capsys):
    args = merge_args(pool, tmp_path, *merged_classifier(tmp_path, *method, "--model.method.scaling_factor", "0.3"))
    assert one_error_line(merge_main, args, capsys) == expected
    assert_nothing_written(tmp_path, workdir)


# --- configuration files -----------------------------------------------------------------------------


def test_bad_yaml_in_a_second_config_is_named_by_its_path(pool, tmp_path, workdir, capsys):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("trainer:\n  max_steps: 1\n")
    second.write_text("trainer:\n  max_steps: [1\n")
    args = [*merge_args(pool, tmp_path, *merged_classifier(tmp_path)), "--config", str(first), "--config", str(second)]
    line = one_error_line(merge_main, args, capsys)
    assert line == (
        f"error: --config '{second}' is not valid YAML: did not find expected ',' or ']' "
        "(line 3, column 1; while parsing a flow sequence started at line 2, column 14)"
    )
    assert_nothing_written(tmp_path, workdir)


# --- failures after Lightning wrote config.yaml: it is taken back ---------------------------------------


def test_a_merge_refused_after_config_yaml_was_written_leaves_none(pool, tmp_path, workdir, capsys):
    # AdaMerging finds a missing max_steps when Lightning asks for its train loader, after config.yaml
    line = one_error_line(merge_main, adamerging_fit(pool, tmp_path), capsys)
    assert line == "error: test-time adaptation counts steps: set trainer.max_steps"
    assert_nothing_written(tmp_path, workdir)


def test_a_training_refused_after_config_yaml_was_written_puts_the_earlier_one_back(convnext, mnist, tmp_path, workdir, capsys):
    earlier = tmp_path / "root" / "config.yaml"
    earlier.parent.mkdir()
    earlier.write_text("# the config of an earlier run\n")
    # 12 training images: too few for one global batch of 16, found when Lightning asks for the train loader
    # (no export: one needs trainer.max_steps, which is refused first otherwise)
    extra = ["--trainer.max_steps", "-1", "--trainer.max_epochs", "1", "--data.batch_size", "16", "--export_dir", "null"]
    line = one_error_line(train_main, train_run(convnext, mnist, tmp_path, *extra), capsys)
    assert line.endswith("fewer training samples than one global batch of 16"), line
    assert [path.name for path in earlier.parent.iterdir()] == ["config.yaml"]
    assert earlier.read_text() == "# the config of an earlier run\n"
    assert not (tmp_path / "exports").exists() and not list(workdir.iterdir())


# --- subcommands a module has no step for ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("program", "subcommand", "expected"),
    [("train", "predict", "error: unknown subcommand 'predict' (choose from fit, validate, test)"),
     ("merge", "validate", "error: unknown subcommand 'validate' (choose from fit, test)"),
     ("merge", "predict", "error: unknown subcommand 'predict' (choose from fit, test)")],
)  # fmt: skip
def test_a_subcommand_without_a_step_is_not_offered(program, subcommand, expected, convnext, pool, tmp_path, workdir, capsys):
    main, args = (train_main, train_args(convnext, tmp_path, "digits")) if program == "train" else (
        merge_main, merge_args(pool, tmp_path, *merged_classifier(tmp_path)))  # fmt: skip
    assert one_error_line(main, [subcommand, *args[1:]], capsys) == expected
    assert not (tmp_path / "root").exists() and not list(workdir.iterdir())


def test_train_validate_runs(convnext, mnist, tmp_path, workdir, capsys):
    train_main(["validate", *train_run(convnext, mnist, tmp_path)[1:]])
    assert "val/accuracy" in capsys.readouterr().out
    assert (tmp_path / "root" / "config.yaml").is_file()  # a run that completed records its config


def test_optimizer_options_are_the_models_own(convnext, tmp_path, workdir, capsys):
    # The models configure their optimizer from their options; LightningCLI's --optimizer would replace it.
    line = one_error_line(train_main, [*train_args(convnext, tmp_path, "digits"), "--optimizer", "Adam"], capsys)
    assert line.startswith("error: unknown option --optimizer;"), line
    assert not list(workdir.iterdir())


# --- --help ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("program", "subcommand", "most_lines"), [("train", "fit", 450), ("merge", "test", 400), ("merge", "fit", 400)]
)
def test_help_leads_with_the_projects_options_and_keeps_the_trainers_brief(program, subcommand, most_lines, workdir, capsys):
    main = train_main if program == "train" else merge_main
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--help"])
    assert exit_info.value.code in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"usage: cli [options] {subcommand} [options]" and len(lines) <= most_lines, (lines[0], len(lines))
    first = {
        prefix: next(i for i, line in enumerate(lines) if line.lstrip().startswith(prefix))
        for prefix in ("--model", "--data", "--trainer")
    }
    assert first["--model"] < first["--data"] < first["--trainer"], first
    devices = next(i for i, line in enumerate(lines) if line.lstrip().startswith("--trainer.devices "))
    assert lines[devices + 1].strip().startswith("The devices to use. (type:"), lines[devices : devices + 3]
    assert not list(workdir.iterdir())
