"""The CLI's helpers that stand in for the libraries' private internals, each against what it
replaces or guards: the verified-version check and the pins, the int-first count-or-fraction
types, the last checkpoints Lightning resumes from, the config file a failed run takes back,
the training loader that refuses Lightning's sampler, the W&B logger's init arguments, the
brief Trainer help."""

from __future__ import annotations

import re
import tomllib
import typing
from datetime import timedelta

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DistributedSampler, TensorDataset

from conftest import REPO_ROOT
from datamodules.errors import DataError
from datamodules.loaders import StepStreamDataLoader, check_split_over_devices
from datamodules.samplers import StepStreamSampler
from lightning_modules import versions
from lightning_modules.parser_help import first_sentence
from lightning_modules.run_files import last_checkpoints, undo_writing
from lightning_modules.trainer_options import COUNT_OR_FRACTION, int_first
from lightning_modules.versions import VERIFIED, UnverifiedVersionError, check_verified_versions
from lightning_modules.wandb_logger import WandbLogger

# --- the verified versions ----------------------------------------------------------------------


def test_the_installed_versions_are_the_verified_ones():
    check_verified_versions()


def fake_versions(**releases: str):
    installed = {"jsonargparse": "4.53.0", "lightning": "2.6.6", **releases}
    return lambda package: installed[package]


@pytest.mark.parametrize(
    ("package", "release", "relation"),
    [("jsonargparse", "4.54.0", "newer"), ("jsonargparse", "5.0.0", "newer"), ("jsonargparse", "4.50.2", "older"),
     ("lightning", "2.7.0rc1", "newer"), ("lightning", "3.0", "newer"), ("lightning", "2.5.5", "older")],
)  # fmt: skip
def test_a_release_outside_the_verified_range_is_named(package, release, relation):
    oldest, newest, _ = VERIFIED[package]
    with pytest.raises(UnverifiedVersionError) as raised:
        check_verified_versions(fake_versions(**{package: release}))
    message = str(raised.value)
    assert message.startswith(
        f"{package} {release} is {relation} than the verified {oldest}-{newest} (pinned in pyproject.toml; "
    )
    assert "\n" not in message


@pytest.mark.parametrize("release", ["4.51.0", "4.52.3", "4.53.9"])
def test_a_release_inside_the_verified_range_passes(release):
    check_verified_versions(fake_versions(jsonargparse=release))


def test_the_pins_in_pyproject_are_the_verified_ranges():
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package, (oldest, newest, _) in VERIFIED.items():
        major, minor = (int(part) for part in newest.split("."))
        pins = [dependency for dependency in dependencies if re.match(rf"{package}(\[[^]]*\])?[<>=]", dependency)]
        assert [re.sub(r"^[\w-]+(\[[^]]*\])?", "", pin) for pin in pins] == [f">={oldest},<{major}.{minor + 1}"], pins


def test_the_cli_reports_an_unverified_release_as_one_error_line(monkeypatch, capsys, tmp_path):
    from train import main

    monkeypatch.setattr(versions, "version", fake_versions(jsonargparse="4.60.0"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: jsonargparse 4.60.0 is newer than the verified 4.51-4.53") and stderr.count("\n") == 1
    assert "pip install 'jsonargparse>=4.51,<4.54'" in stderr
    assert list(tmp_path.iterdir()) == []


# --- the count-or-fraction Trainer options ------------------------------------------------------------


def test_int_first_puts_int_first_whatever_the_cached_order():
    # typing's own unions on purpose: those are the ones its cache hands out in either order
    assert typing.get_args(int_first(typing.Union[float, int])) == (int, float)  # noqa: UP007
    assert typing.get_args(int_first(typing.Optional[typing.Union[float, int]])) == (int, float, type(None))  # noqa: UP007, UP045
    mixed = typing.Optional[typing.Union[float, str, int, timedelta, dict[str, int]]]  # noqa: UP007, UP045
    assert typing.get_args(int_first(mixed)) == (int, float, str, timedelta, dict[str, int], type(None))


def test_every_count_or_fraction_option_of_the_trainer_takes_an_int():
    import inspect

    parameters = inspect.signature(Trainer.__init__).parameters
    for name in COUNT_OR_FRACTION:
        members = typing.get_args(parameters[name].annotation)
        assert int in members and float in members, name


# --- the last checkpoints, as Lightning finds them ---------------------------------------------------


def test_last_checkpoints_are_the_ones_lightning_resumes_from(tmp_path):
    for name in ("last.ckpt", "last-v1.ckpt", "last-v12.ckpt", "epoch=0-step=5.ckpt", "last.txt", "lastly.ckpt"):
        (tmp_path / name).write_text("")
    callback = ModelCheckpoint(dirpath=tmp_path)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    ours = last_checkpoints(callback, trainer)
    assert {p.rsplit("/", 1)[-1] for p in ours} == {"last.ckpt", "last-v1.ckpt", "last-v12.ckpt", "lastly.ckpt"}
    # Lightning's own lookup (private; here only to pin that the two agree on this release)
    assert ours == callback._find_last_checkpoints(trainer)
    assert last_checkpoints(ModelCheckpoint(dirpath=tmp_path / "absent"), trainer) == set()


# --- the config file a failed run takes back ----------------------------------------------------------


def test_undo_writing_removes_a_new_file_and_the_folders_made_for_it(tmp_path):
    path = tmp_path / "a" / "b" / "config.yaml"
    undo = undo_writing(str(path))
    path.parent.mkdir(parents=True)
    path.write_text("new")
    undo()
    assert list(tmp_path.iterdir()) == []


def test_undo_writing_puts_back_an_earlier_file_and_keeps_folders_with_other_files(tmp_path):
    earlier = tmp_path / "root" / "config.yaml"
    earlier.parent.mkdir()
    earlier.write_text("the earlier run's")
    undo = undo_writing(str(earlier))
    earlier.write_text("the failed run's")
    undo()
    assert earlier.read_text() == "the earlier run's"
    path = tmp_path / "new" / "config.yaml"
    undo = undo_writing(str(path))
    path.parent.mkdir()
    path.write_text("x")
    (path.parent / "checkpoint.ckpt").write_text("kept")
    undo()
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["checkpoint.ckpt"]


# --- the training loader and the distributed sampler ---------------------------------------------------


def test_the_training_loader_refuses_a_sampler_lightning_put_in(tmp_path):
    dataset = TensorDataset(torch.arange(8.0))
    own = StepStreamDataLoader(dataset, batch_size=2, sampler=StepStreamSampler(8, 4, steps_per_epoch=2))
    assert len(list(own)) == 4 and own.state_dict()["global_batch_size"] == 4
    # What Lightning builds with use_distributed_sampler=True on two processes: the same loader class
    # around its own sampler (DistributedSamplerWrapper is a DistributedSampler).
    replaced = StepStreamDataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, num_replicas=2, rank=0))
    for use in (iter, StepStreamDataLoader.state_dict):
        with pytest.raises(DataError, match=r"^set trainer.use_distributed_sampler=false: "):
            use(replaced)


class FakeTrainer:
    global_rank, world_size = 0, 4


def test_a_global_batch_must_split_over_the_devices():
    check_split_over_devices(64, FakeTrainer(), "data.batch_size", accumulate=2)
    with pytest.raises(DataError, match=r"^data.batch_size 6 \(a global batch\) does not split over 4 device\(s\)$"):
        check_split_over_devices(6, FakeTrainer(), "data.batch_size")
    with pytest.raises(DataError, match=r"over 4 device\(s\) x 3 accumulated batches$"):
        check_split_over_devices(16, FakeTrainer(), "data.batch_size", accumulate=3)


# --- the W&B logger -----------------------------------------------------------------------------------


def test_the_wandb_logger_leaves_out_the_deprecated_anonymous_setting(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    wandb_init = vars(logger)["_wandb_init"]  # Lightning's private dict (pinned: lightning_modules/versions.py)
    assert "anonymous" not in wandb_init and wandb_init["project"] == "convnext-fusion"


# --- the brief help ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "first"),
    [("Number of GPU nodes for distributed training. Default: ``1``.", "Number of GPU nodes for distributed training."),
     ("The devices to use. Can be set to a positive number (int or str).", "The devices to use."),
     ("Runs n if set to ``n`` (int) else 1 if set to ``True``\n   batch(es) of train (ie: a sort of unit test).",
      "Runs n if set to ``n`` (int) else 1 if set to ``True`` batch(es) of train (ie: a sort of unit test)."),
     ("One sentence without a full stop", "One sentence without a full stop")],
)  # fmt: skip
def test_first_sentence(text, first):
    assert first_sentence(text) == first
