"""Bad input on the training side, through the real CLIs (``train.py`` in-process,
``python -m lightning_modules.reproduce``): optimizer options the export would not describe,
``--ckpt_path`` files that cannot be resumed from (several ``last*.ckpt``, a truncated file,
another model's checkpoint), a fit of no steps, and the reproduction command's own options.

Every error case ends in one ``error:`` line naming what is wrong and where, exit status 1,
and nothing written in the working directory or the output paths (``test_bad_input.py``'s
``workdir`` and ``one_error_line``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import merge_fixtures as mf
import test_bad_input
import train_cli_callbacks
from conftest import write_dataset
from datamodules.tasks import BENCHMARKS, get_task
from lightning_modules import reproduce
from merge import main as merge_main
from test_bad_input import checkpoint_callback, cli_or_yaml, merge_args, one_error_line, small_dataset, train_args
from train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

# test_bad_input.py's fixtures, shared: its tiny ConvNeXt, its merge pool, and the empty working directory (autouse).
convnext, pool, workdir = test_bad_input.convnext, test_bad_input.pool, test_bad_input.workdir


def run_cli(main, args: list[str], cwd: Path) -> None:
    """A CLI run that must succeed, from ``cwd``, for a module-scoped fixture."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["cli"])
        patch.setenv("WANDB_SILENT", "true")
        patch.chdir(cwd)
        main(args)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> str:
    return write_dataset(small_dataset("mnist"), tmp_path_factory.mktemp("data") / "mnist", "disk")


@pytest.fixture(scope="module")
def checkpoints(convnext, mnist, tmp_path_factory) -> Path:
    """A real ``train.py`` run's checkpoint folder: ``epoch=0-step=2.ckpt`` and ``last.ckpt``."""
    run = tmp_path_factory.mktemp("trained")
    callback = checkpoint_callback(run / "checkpoints")
    callback["trainer"]["callbacks"][0]["init_args"]["save_last"] = True
    args = train_args(convnext, mnist, "mnist", "--trainer.max_steps=2", "--trainer.default_root_dir", str(run),
                      "--trainer.callbacks", json.dumps(callback["trainer"]["callbacks"]), "--export_dir=null")  # fmt: skip
    run_cli(train_main, args, run)
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    return run / "checkpoints"


@pytest.fixture(scope="module")
def adamerging_checkpoint(pool, tmp_path_factory) -> Path:
    """A real ``merge.py fit`` AdaMerging run's ``last.ckpt``."""
    out = tmp_path_factory.mktemp("adamerging")
    callback = checkpoint_callback(out / "checkpoints")["trainer"]["callbacks"]
    callback[0]["init_args"]["save_last"] = True
    model = ["--model", "AdaMerging", "--model.output_dir", str(out / "coefficients")]
    args = ["fit", *merge_args(pool, out, *model)[1:], "--trainer.max_steps", "1", "--trainer.enable_checkpointing", "true",
            "--trainer.callbacks", json.dumps(callback)]  # fmt: skip
    run_cli(merge_main, args, out)
    return out / "checkpoints" / "last.ckpt"


def resume_args(convnext, mnist, tmp_path: Path, ckpt_path: str, *extra: str) -> list[str]:
    """``train.py fit`` resuming from ``ckpt_path``, checkpointing into ``tmp_path/checkpoints``."""
    callbacks = cli_or_yaml(checkpoint_callback(tmp_path / "checkpoints"), tmp_path)
    return train_args(convnext, mnist, "mnist", *callbacks, "--export_dir", str(tmp_path / "exports"),
                      "--ckpt_path", ckpt_path, *extra)  # fmt: skip


def assert_nothing_written(tmp_path: Path, workdir: Path, checkpoint_files: list[str]) -> None:
    assert not list(workdir.iterdir()) and not (tmp_path / "exports").exists()
    folder = tmp_path / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == sorted(checkpoint_files) if checkpoint_files else not folder.exists()


def save_with_step(source: Path, target: Path, step: int) -> None:
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["global_step"] = step
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)


# --- 1. optimizer options the export's name and card would not describe ---------------------------

OPTIMIZER_OPTIONS = {
    "--optimizer": (["--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.001"], "unknown option --optimizer; see "),
    "--lr_scheduler": (["--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"], "unknown option --lr_scheduler; see "),
    "optimizer in a config": ({"optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}},
                              "unknown key 'optimizer.init_args.lr'; see "),
    "lr_scheduler in a config": ({"lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR"}},
                                 "unknown key 'lr_scheduler.class_path'; see "),
}  # fmt: skip


@pytest.mark.parametrize("case", OPTIMIZER_OPTIONS)
def test_lightning_optimizer_options_are_one_error_line(case, convnext, mnist, tmp_path, workdir, capsys):
    """train.py trains with SGD and --model.lr/momentum/weight_decay/scheduler, as the export's name
    (``..._sgd_..._lr-0.01_...``) and card say: LightningCLI's --optimizer would train with Adam
    under that name, and its --lr_scheduler (without --optimizer) was silently ignored."""
    options, expected = OPTIMIZER_OPTIONS[case]
    args = train_args(convnext, mnist, "mnist", *cli_or_yaml(options, tmp_path), "--export_dir", str(tmp_path / "exports"))
    line = one_error_line(train_main, args, capsys)
    assert line.startswith(f"error: {expected}") and line.endswith(" fit --help"), line
    assert_nothing_written(tmp_path, workdir, [])


# --- 2. --ckpt_path last with several last checkpoints ------------------------------------------------


def test_several_last_checkpoints_are_one_error_line(checkpoints, convnext, mnist, tmp_path, workdir, capsys):
    """A run restarted from scratch beside an older one's ``last.ckpt`` (step 12) writes ``last-v1.ckpt``
    (step 2): Lightning resumed from the newest, at step 2, without a word."""
    folder = tmp_path / "checkpoints"
    save_with_step(checkpoints / "last.ckpt", folder / "last.ckpt", 12)
    save_with_step(checkpoints / "last.ckpt", folder / "last-v1.ckpt", 2)
    os.utime(folder / "last.ckpt", (1_000_000_000, 1_000_000_000))  # the older one
    line = one_error_line(train_main, resume_args(convnext, mnist, tmp_path, "last"), capsys)
    assert line == (
        f"error: --ckpt_path last: 2 files could be the last checkpoint, '{folder / 'last-v1.ckpt'}' (step 2, the newest), "
        f"'{folder / 'last.ckpt'}' (step 12); give the one to resume from as --ckpt_path <file>"
    )
    assert_nothing_written(tmp_path, workdir, ["last-v1.ckpt", "last.ckpt"])


def test_one_last_checkpoint_a_link_resumes(checkpoints, convnext, mnist, tmp_path, monkeypatch):
    """``save_last: link`` (configs/train/base.yaml): ``last.ckpt`` links to the newest checkpoint,
    which is not a ``last*`` file itself: one candidate, resumed from."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(checkpoints / "epoch=0-step=2.ckpt", folder / "epoch=0-step=2.ckpt")
    (folder / "last.ckpt").symlink_to("epoch=0-step=2.ckpt")
    monkeypatch.chdir(tmp_path)
    train_cli_callbacks.RECORDED.clear()
    train_main(
        resume_args(convnext, mnist, tmp_path, "last", "--trainer.max_steps=3", "--trainer.callbacks+=train_cli_callbacks.Record")
    )
    assert train_cli_callbacks.RECORDED["first_step"] == 2
    assert (tmp_path / "exports" / "convnext_mnist_sgd_batch-size-4_lr-0.01_steps-3" / "model.safetensors").is_file()


# --- 3. a --ckpt_path file that cannot be resumed from --------------------------------------------------


def truncate(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def corrupt(source: Path, target: Path) -> Path:
    """The archive's first entries overwritten: the zip index at the end still whole."""
    data = source.read_bytes()
    target.write_bytes(data[:1000] + b"x" * 50_000 + data[51_000:])
    return target


NOT_WHOLE = "cannot be loaded: truncated, or not a checkpoint (not a whole zip archive)"
UNLOADABLE = {
    "a truncated last.ckpt, --ckpt_path last": ("last", NOT_WHOLE),
    "a truncated file": ("file", NOT_WHOLE),
    "a text file": ("text", NOT_WHOLE),
    "a corrupt file": ("corrupt", "cannot be loaded: corrupt, or not a checkpoint (PytorchStreamReader failed reading file "),
    "a truncated file to validate": ("validate", NOT_WHOLE),
}


@pytest.mark.parametrize("case", UNLOADABLE)
def test_an_unloadable_checkpoint_is_one_error_line(case, checkpoints, convnext, mnist, tmp_path, workdir, capsys):
    """Refused where LightningCLI would first read the file (its hyper-parameters, after parsing, for
    any subcommand), or for ``--ckpt_path last`` before fit starts: not in torch's traceback."""
    kind, expected = UNLOADABLE[case]
    if kind == "text":
        path = tmp_path / "notes.ckpt"
        path.write_text("not a checkpoint")
    elif kind == "corrupt":
        path = corrupt(checkpoints / "last.ckpt", tmp_path / "corrupt.ckpt")
    else:
        path = truncate(checkpoints / "last.ckpt", tmp_path / ("checkpoints" if kind == "last" else "saved") / "last.ckpt")
    args = resume_args(convnext, mnist, tmp_path, "last" if kind == "last" else str(path))
    if kind == "validate":
        args[0] = "validate"
    line = one_error_line(train_main, args, capsys)
    named = f"--ckpt_path last: '{path}'" if kind == "last" else f"--ckpt_path '{path}'"
    assert line.startswith(f"error: {named} {expected}"), line
    assert_nothing_written(tmp_path, workdir, ["last.ckpt"] if kind == "last" else [])


def test_an_adamerging_checkpoint_is_one_error_line(adamerging_checkpoint, convnext, mnist, tmp_path, workdir, capsys):
    saved = torch.load(adamerging_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    line = one_error_line(train_main, resume_args(convnext, mnist, tmp_path, str(adamerging_checkpoint)), capsys)
    assert line.startswith(f"error: --ckpt_path '{adamerging_checkpoint}' is not a checkpoint of ImageClassifier: "), line
    assert "weights are not in it ('model.convnext.embeddings.patch_embeddings.weight', " in line, line
    assert f"{len(saved)} of its {len(saved)} are not the model's ('coefficients', " in line, line
    assert_nothing_written(tmp_path, workdir, [])


def test_another_tasks_checkpoint_is_one_error_line(checkpoints, convnext, mnist, tmp_path, workdir, capsys):
    """A checkpoint of the same classifier with GTSRB's 43-class head, resumed for MNIST's 10 classes."""
    checkpoint = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    state["model.classifier.weight"] = torch.zeros(43, state["model.classifier.weight"].shape[1])
    state["model.classifier.bias"] = torch.zeros(43)
    # Its hyper-parameters too, which LightningCLI reads into the configuration: the data's classes still win.
    checkpoint["hyper_parameters"].update(num_classes=43, classnames=list(get_task("gtsrb").classnames))
    path = tmp_path / "gtsrb.ckpt"
    torch.save(checkpoint, path)
    line = one_error_line(train_main, resume_args(convnext, mnist, tmp_path, str(path)), capsys)
    assert line == (
        f"error: --ckpt_path '{path}' is not a checkpoint of this ImageClassifier: 'model.classifier.weight' is [43, 64] there "
        "and [10, 64] here (another task's head, or another model?)"
    )
    assert_nothing_written(tmp_path, workdir, [])


def test_a_file_without_a_state_dict_is_one_error_line(convnext, mnist, tmp_path, workdir, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"model.classifier.weight": torch.zeros(10, 64)}, path)
    line = one_error_line(train_main, resume_args(convnext, mnist, tmp_path, str(path)), capsys)
    assert line == f"error: --ckpt_path '{path}' is not a Lightning checkpoint (it has no 'state_dict')"
    assert_nothing_written(tmp_path, workdir, [])


# --- 4. a fit of no steps, or of a count not known up front ----------------------------------------------

NO_STEP_COUNT = {
    "max_steps 0": (["--trainer.max_steps=0"], "error: trainer.max_steps 0 trains nothing, and the export would be the "
                                                "untrained model: give 1 or more"),
    "max_steps -1, max_epochs 1": (["--trainer.max_steps=-1", "--trainer.max_epochs=1"],
                                   "error: trainer.max_steps must be 1 or more to export, got -1: the export is named after "
                                   "its optimizer steps, which trainer.max_epochs leaves open until the data is read "
                                   "(set trainer.max_steps, or --export_dir null)"),
}  # fmt: skip


@pytest.mark.parametrize("case", NO_STEP_COUNT)
def test_a_fit_without_a_positive_max_steps_is_one_error_line(case, convnext, mnist, tmp_path, workdir, capsys):
    extra, expected = NO_STEP_COUNT[case]
    args = train_args(convnext, mnist, "mnist", *extra, "--export_dir", str(tmp_path / "exports"))
    assert one_error_line(train_main, args, capsys) == expected
    assert_nothing_written(tmp_path, workdir, [])


# --- 5. python -m lightning_modules.reproduce: its own options -------------------------------------------

PROGRAM = "python -m lightning_modules.reproduce"
CHOICES = f"a benchmark (ta8, tall14, tall20) or tasks of tall20: {', '.join(BENCHMARKS['tall20'])}"
REPRODUCE_MISTAKES = {
    "a misspelt task": (["--tasks", "dtd", "dtdd"], f"--tasks: unknown task 'dtdd'; did you mean 'dtd'? ({CHOICES})"),
    "a quickstart task": (["--tasks", "digits"],
                          f"--tasks: 'digits' is in no benchmark, so no merge config lists it; it has no configs/train/digits.yaml "
                          f"({CHOICES})"),
    "a task twice": (["--tasks", "Stanford-Cars", "stanford_cars"], "--tasks: stanford_cars is given twice"),
    "--gpus 0": (["--gpus", "0"], "--gpus must be 1 or more, got 0"),
    "--gpus not a number": (["--gpus", "two"], f"argument --gpus: invalid int value: 'two' (see {PROGRAM} --help)"),
    "an abbreviated option": (["--gpu", "2"], f"unrecognized arguments: --gpu 2 (see {PROGRAM} --help)"),
    "an unclosed quote": (["--train-args", '--trainer.max_steps="2'],
                          """--train-args '--trainer.max_steps="2': No closing quotation"""),
    "max_steps 0": (["--tasks", "dtd", "--train-args", "--trainer.max_steps=0"],
                    "configs/train/dtd.yaml with --train-args '--trainer.max_steps=0': trainer.max_steps 0 trains nothing, "
                    "and the export would be the untrained model: give 1 or more"),
}  # fmt: skip


@pytest.mark.parametrize("case", REPRODUCE_MISTAKES)
def test_a_reproduce_mistake_is_one_error_line(case, workdir, capsys):
    args, expected = REPRODUCE_MISTAKES[case]
    assert one_error_line(reproduce.main, args, capsys) == f"error: {expected}"
    assert not list(workdir.iterdir())


def test_reproduce_with_an_unknown_task_is_one_line_from_the_command(workdir):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_modules.reproduce", "--tasks", "dtdd"],
        cwd=workdir, env=mf.subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr == f"error: --tasks: unknown task 'dtdd'; did you mean 'dtd'? ({CHOICES})\n"
    assert result.stdout == "" and not list(workdir.iterdir())
