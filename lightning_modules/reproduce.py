"""Reproduce the benchmark with one command: the eight reference fine-tunes, then the merges.

    make reproduce GPUS=8
    python -m lightning_modules.reproduce --gpus 8
    python -m lightning_modules.reproduce --help

1. ``train.py fit --config configs/train/<task>.yaml`` for every task, each in its own
   process with one GPU of its own (``CUDA_VISIBLE_DEVICES``), ``--gpus`` at a time. A task
   whose export already exists is skipped; one whose checkpoint directory holds a
   ``last.ckpt`` (an interrupted run) resumes from it. Each run's output goes to
   ``<output_dir>/logs/<task>.log``.
2. The eight exports become a model pool (``<output_dir>/pool.yaml``, beside
   ``_pretrained_``), and the merge configs run on it unchanged but for that pool and their
   output folders (``outputs/...`` becomes ``<output_dir>/...``; the configs actually run are
   written to ``<output_dir>/configs/``): AdaMerging (``merge.py fit``), then the method
   comparison (``merge.py test``), whose report has a row per method and the individual
   fine-tuned models' row. The merges run again on every call (minutes, not hours).

Fine-tunes and merges take extra options (``--train-args``, ``--merge-args``), e.g. for a
short rehearsal on a CPU: ``--train-args "--trainer.max_steps=20 --trainer.accelerator=cpu"``.
"""

from __future__ import annotations

import argparse
import difflib
import io
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from unittest import mock

import yaml

from datamodules.errors import DataError
from datamodules.tasks import BENCHMARK_TASKS, get_task, task_key
from lightning_modules.cli import default_checkpoint_dir
from lightning_modules.errors import TrainingError
from lightning_modules.export import check_export_steps, export_path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake (``--gpus abc``, an unknown option) is one ``error:`` line and exit status 1,
    as everywhere in the project, not argparse's usage text and exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


@dataclass(frozen=True)
class FineTune:
    """One task's fine-tune: its config, where it exports, where an interrupted run left off."""

    task: str
    config: Path
    base_model: str
    export: Path
    last_checkpoint: Path | None

    @property
    def done(self) -> bool:
        return (self.export / "config.json").is_file()

    def command(self, train_args: Sequence[str]) -> list[str]:
        command = [sys.executable, str(REPO_ROOT / "train.py"), "fit", "--config", str(self.config), *train_args]
        if self.last_checkpoint is not None and self.last_checkpoint.is_file():
            command += ["--ckpt_path", str(self.last_checkpoint)]
        return command


def resolved_train_config(config: Path, train_args: Sequence[str]) -> dict[str, Any]:
    """``train.py fit --config <config> <train_args>`` as it would run, every default filled in."""
    from train import main

    printed = io.StringIO()
    with redirect_stdout(printed), mock.patch.object(sys, "argv", [sys.argv[0]]):  # only args are for train.py
        try:
            main(["fit", "--config", str(config), *train_args, "--print_config"])
        except SystemExit as exit_info:
            if exit_info.code not in (0, None):
                raise
    return yaml.safe_load(printed.getvalue())


def plan_fine_tune(task: str, train_args: Sequence[str]) -> FineTune:
    config_file = CONFIGS / "train" / f"{task}.yaml"
    config = resolved_train_config(config_file, train_args)
    named = config_file.relative_to(REPO_ROOT)
    if config.get("export_dir") is None:
        fail(f"{named} exports nothing (export_dir: null); the merges need the exports")
    try:  # what train.py would refuse, refused before any fine-tune starts
        check_export_steps(config["trainer"]["max_steps"])
    except TrainingError as error:
        fail(f"{named} with --train-args '{shlex.join(train_args)}': {error}")
    export = export_path(config, config["trainer"]["max_steps"])
    checkpoints = [
        callback["init_args"].get("dirpath")
        or os.path.relpath(default_checkpoint_dir(config["trainer"]["default_root_dir"] or "."))
        for callback in config["trainer"].get("callbacks") or []
        if callback["class_path"].endswith("ModelCheckpoint")
    ]
    last = Path(checkpoints[0]) / "last.ckpt" if checkpoints else None
    return FineTune(task, config_file, config["model"]["model_name_or_path"], export, last)


def run_logged(command: list[str], log: Path, env: Mapping[str, str] | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as output:
        return subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env, check=False).returncode


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_fine_tunes(plans: Sequence[FineTune], gpus: int, train_args: Sequence[str], logs: Path) -> list[str]:
    """Run the fine-tunes that are not done, ``gpus`` at a time; the tasks that failed."""
    pending: queue.Queue[FineTune] = queue.Queue()
    for plan in plans:
        if plan.done:
            say(f"{plan.task}: export {plan.export} exists, skipped")
        else:
            pending.put(plan)
    failed: list[str] = []

    def worker(gpu: int) -> None:
        while True:
            try:
                plan = pending.get_nowait()
            except queue.Empty:
                return
            command = plan.command(train_args)
            resumed = " resuming from " + command[-1] if "--ckpt_path" in command else ""
            say(f"{plan.task}: fine-tuning on GPU {gpu}{resumed} (log: {logs / plan.task}.log)")
            start = time.monotonic()
            status = run_logged(command, logs / f"{plan.task}.log", {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)})
            minutes = (time.monotonic() - start) / 60
            if status == 0 and plan.done:
                say(f"{plan.task}: exported {plan.export} ({minutes:.1f} min)")
            else:
                failed.append(plan.task)
                say(f"{plan.task}: FAILED with exit status {status} after {minutes:.1f} min; see {logs / plan.task}.log")

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in range(gpus)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failed


def reroot(value: Any, output_dir: Path) -> Any:
    """Every ``outputs/...`` path in a config, moved to ``<output_dir>/...``."""
    if isinstance(value, dict):
        return {key: reroot(item, output_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [reroot(item, output_dir) for item in value]
    if isinstance(value, str) and value.startswith("outputs/"):
        return str(output_dir / value.removeprefix("outputs/"))
    return value


def write_merge_config(name: str, pool: Path, tasks: Sequence[str], output_dir: Path) -> Path:
    config = reroot(yaml.safe_load((CONFIGS / "merge" / f"{name}.yaml").read_text()), output_dir)
    target = output_dir / "configs" / f"{name}.yaml"
    config["model"]["init_args"]["models"] = os.path.relpath(pool, target.parent)  # read from the config's folder
    config["data"]["tasks"] = list(tasks)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"# configs/merge/{name}.yaml on the reproduced pool, written by lightning_modules.reproduce\n")
    with target.open("a") as file:
        yaml.safe_dump(config, file, sort_keys=False)
    return target


def write_pool(plans: Sequence[FineTune], output_dir: Path) -> Path:
    base_models = {plan.base_model for plan in plans}
    if len(base_models) != 1:
        fail(f"the fine-tunes start from different models ({', '.join(sorted(base_models))})")
    models = {"_pretrained_": base_models.pop(), **{plan.task: str(plan.export) for plan in plans}}
    pool = output_dir / "pool.yaml"
    pool.parent.mkdir(parents=True, exist_ok=True)
    pool.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return pool


def run_merges(pool: Path, tasks: Sequence[str], output_dir: Path, merge_args: Sequence[str]) -> int:
    merge = [sys.executable, str(REPO_ROOT / "merge.py")]
    adamerging = write_merge_config("adamerging", pool, tasks, output_dir)
    say(f"AdaMerging on the reproduced pool (log: {output_dir / 'logs' / 'adamerging.log'})")
    if run_logged([*merge, "fit", "--config", str(adamerging), *merge_args], output_dir / "logs" / "adamerging.log"):
        say(f"AdaMerging FAILED; see {output_dir / 'logs' / 'adamerging.log'}")
        return 1
    compare = write_merge_config("compare", pool, tasks, output_dir)
    say(f"comparing the merge methods (log: {output_dir / 'logs' / 'compare.log'})")
    if run_logged([*merge, "test", "--config", str(compare), *merge_args], output_dir / "logs" / "compare.log"):
        say(f"the comparison FAILED; see {output_dir / 'logs' / 'compare.log'}")
        return 1
    report = Path(yaml.safe_load(compare.read_text())["model"]["init_args"]["report_dir"]) / "report.md"
    print(report.read_text(), flush=True)
    say(f"done: {report}")
    return 0


def with_option_values_attached(args: Sequence[str]) -> list[str]:
    """``--train-args "--trainer.max_steps=20"`` as ``--train-args=--trainer.max_steps=20``: argparse
    takes a lone value starting with ``--`` for an option of its own, and ``make reproduce
    TRAIN_ARGS=--trainer.precision=bf16-mixed`` passes one so."""
    attached: list[str] = []
    rest = iter(args)
    for arg in rest:
        value = next(rest, None) if arg in ("--train-args", "--merge-args") else None
        attached.append(arg if value is None else f"{arg}={value}")
    return attached


def split_options(option: str, value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as error:  # an unclosed quote
        fail(f"{option} '{value}': {error}")


def benchmark_tasks(names: Sequence[str]) -> list[str]:
    """The tasks of ``--tasks`` by their own names (``Stanford-Cars`` is ``stanford_cars``), each
    one with a reference fine-tune (``configs/train/<task>.yaml``), each once: checked before
    anything runs."""
    choices = f"the benchmark's tasks: {', '.join(BENCHMARK_TASKS)}"
    tasks: list[str] = []
    for name in names:
        try:
            task = get_task(name).name
        except DataError:
            close = difflib.get_close_matches(task_key(name), BENCHMARK_TASKS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            fail(f"--tasks: unknown task '{name}'; {hint}({choices})")
        if task not in BENCHMARK_TASKS:
            fail(f"--tasks: '{name}' is not a benchmark task, it has no configs/train/{task}.yaml ({choices})")
        if task in tasks:
            fail(f"--tasks: {task} is given twice")
        tasks.append(task)
    return tasks


def main(args: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m lightning_modules.reproduce", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument("--gpus", type=int, default=1, help="fine-tunes at a time, one GPU each (GPU 0..N-1)")
    parser.add_argument("--tasks", nargs="+", default=list(BENCHMARK_TASKS), help="the tasks to fine-tune and merge")
    parser.add_argument("--train-args", default="", help="extra options for every train.py fit (one string)")
    parser.add_argument("--merge-args", default="", help="extra options for merge.py fit/test (one string)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/reproduce"), help="pool, merge outputs, logs")
    options = parser.parse_args(with_option_values_attached(sys.argv[1:] if args is None else args))
    if options.gpus < 1:
        fail(f"--gpus must be 1 or more, got {options.gpus}")
    tasks = benchmark_tasks(options.tasks)
    train_args, merge_args = split_options("--train-args", options.train_args), split_options("--merge-args", options.merge_args)
    plans = [plan_fine_tune(task, train_args) for task in tasks]
    failed = run_fine_tunes(plans, options.gpus, train_args, options.output_dir / "logs")
    if failed:
        say(f"fine-tunes failed: {', '.join(failed)}; fix and rerun: finished tasks are skipped, interrupted ones resume")
        return 1
    return run_merges(write_pool(plans, options.output_dir), tasks, options.output_dir, merge_args)


if __name__ == "__main__":
    sys.exit(main())
