"""Reproduce a benchmark with one command: its reference fine-tunes, then the merges.

    make reproduce GPUS=8                       # the eight tasks (ta8)
    make reproduce TASKS=tall20 GPUS=8          # TALL20's twenty
    python -m lightning_modules.reproduce --tasks tall14 --gpus 8
    python -m lightning_modules.reproduce --tasks tall20 --launcher slurm --submit
    python -m lightning_modules.reproduce --help

1. ``train.py fit --config configs/train/<task>.yaml`` for every task. A task whose export
   already exists is skipped; one whose checkpoint directory holds a ``last.ckpt`` (an
   interrupted run) resumes from it. With ``--launcher local`` (the default) each runs in its
   own process with one GPU of its own (``CUDA_VISIBLE_DEVICES``), ``--gpus`` at a time, its
   output in ``<output_dir>/logs/<task>.log``; with ``--launcher slurm`` they are a SLURM job
   array, one element per task still to do, each applying the same rules when it starts
   (``lightning_modules/slurm.py``).
2. The exports become a model pool, and the benchmark's merge configs (``BENCHMARK_MERGES``)
   run on it unchanged but for that pool and their output folders (``outputs/...`` becomes
   ``<output_dir>/...``): the configs actually run are written to ``<output_dir>/configs/``,
   the pool beside them under the name of the repository's pool file. AdaMerging (``merge.py
   fit``), then the method comparison (``merge.py test``), whose report has a row per method and
   the individual fine-tuned models' row. The merges run again on every call (minutes, not
   hours); with SLURM they are one job that starts once every fine-tune has succeeded.

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
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from unittest import mock

import yaml

from datamodules.tasks import BENCHMARKS, TASKS, task_key
from lightning_modules import slurm
from lightning_modules.errors import TrainingError
from lightning_modules.export import check_export_steps, export_path
from lightning_modules.run_files import default_checkpoint_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"

#: Each benchmark's merges, configs of ``configs/merge/`` in the order they run: AdaMerging, then
#: the comparison (which reads AdaMerging's coefficients). Each lists the benchmark's tasks and
#: names its pool file (``tests/test_reproduce_benchmarks.py`` checks both against ``BENCHMARKS``).
BENCHMARK_MERGES: dict[str, tuple[str, str]] = {
    "ta8": ("adamerging.yaml", "compare.yaml"),
    "tall14": ("adamerging_tall14.yaml", "compare_tall14.yaml"),
    "tall20": ("adamerging_tall20.yaml", "compare_tall20.yaml"),
}
#: The tasks ``--tasks`` may name: those of the largest benchmark (every benchmark holds the one before it).
REPRODUCIBLE_TASKS = BENCHMARKS["tall20"]


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
    resolved: Mapping[str, Any]

    @property
    def done(self) -> bool:
        return (self.export / "config.json").is_file()

    def command(self, train_args: Sequence[str], resume: bool = True) -> list[str]:
        """``train.py fit`` for this task; ``resume``: from ``last.ckpt`` where there is one now."""
        command = [sys.executable, str(REPO_ROOT / "train.py"), "fit", "--config", str(self.config), *train_args]
        if resume and self.last_checkpoint is not None and self.last_checkpoint.is_file():
            command += ["--ckpt_path", str(self.last_checkpoint)]
        return command


def resolved_config(main: Callable[[list[str]], Any], args: Sequence[str]) -> dict[str, Any]:
    """A LightningCLI's ``args`` as they would run, every default filled in (``--print_config``)."""
    printed = io.StringIO()
    with redirect_stdout(printed), mock.patch.object(sys, "argv", [sys.argv[0]]):  # only args are for the CLI
        try:
            main([*args, "--print_config"])
        except SystemExit as exit_info:
            if exit_info.code not in (0, None):
                raise
    return yaml.safe_load(printed.getvalue())


def resolved_train_config(config: Path, train_args: Sequence[str]) -> dict[str, Any]:
    """``train.py fit --config <config> <train_args>`` as it would run, every default filled in."""
    from train import main

    return resolved_config(main, ["fit", "--config", str(config), *train_args])


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
    return FineTune(task, config_file, config["model"]["model_name_or_path"], export, last, config)


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


@dataclass(frozen=True)
class MergeStep:
    """One merge of the reproduction: a repository config (``source``), the subcommand it runs, and
    the copy this run writes and runs (``config``: its tasks, pool and output folders)."""

    label: str
    subcommand: str
    source: Path
    config: Path

    @property
    def log_name(self) -> str:
        return "adamerging.log" if self.subcommand == "fit" else "compare.log"

    def command(self, merge_args: Sequence[str]) -> list[str]:
        return [sys.executable, str(REPO_ROOT / "merge.py"), self.subcommand, "--config", str(self.config), *merge_args]

    def resolved(self, merge_args: Sequence[str]) -> dict[str, Any]:
        """The source config with ``merge_args``, resolved (the copy differs in tasks, pool and folders only)."""
        from merge import main

        return resolved_config(main, [self.subcommand, "--config", str(self.source), *merge_args])

    def report_dir(self, output_dir: Path) -> Path:
        return Path(reroot(yaml.safe_load(self.source.read_text())["model"]["init_args"]["report_dir"], output_dir))


def merge_steps(benchmark: str, output_dir: Path) -> list[MergeStep]:
    """The benchmark's merges (``BENCHMARK_MERGES``), their copies under ``<output_dir>/configs/``."""
    labels, subcommands = ("AdaMerging", "the comparison"), ("fit", "test")
    return [
        MergeStep(label, subcommand, CONFIGS / "merge" / name, output_dir / "configs" / name)
        for label, subcommand, name in zip(labels, subcommands, BENCHMARK_MERGES[benchmark])
    ]


def base_model(plans: Sequence[FineTune]) -> str:
    """The model every fine-tune starts from, the pool's ``_pretrained_``."""
    base_models = {plan.base_model for plan in plans}
    if len(base_models) != 1:
        fail(f"the fine-tunes start from different models ({', '.join(sorted(base_models))})")
    return base_models.pop()


def write_merge_configs(steps: Sequence[MergeStep], plans: Sequence[FineTune], output_dir: Path) -> None:
    """Each step's config with this run's output folders and tasks, and their pool file: under the
    repository's pool file name, beside the copies, naming this run's exports."""
    models = {"_pretrained_": base_model(plans), **{plan.task: str(plan.export) for plan in plans}}
    for step in steps:
        config = reroot(yaml.safe_load(step.source.read_text()), output_dir)
        config["data"]["tasks"] = [plan.task for plan in plans]
        pool = step.config.parent / config["model"]["init_args"]["models"]  # read from the config's folder
        pool.parent.mkdir(parents=True, exist_ok=True)
        pool.write_text(
            f"# configs/merge/{pool.parent.name}/{pool.name} for this reproduction: its exports, read from the current\n"
            f"# directory ('{Path.cwd()}'); written by lightning_modules.reproduce\n"
            + yaml.safe_dump({"models": models}, sort_keys=False)
        )
        step.config.parent.mkdir(parents=True, exist_ok=True)
        step.config.write_text(
            f"# configs/merge/{step.source.name} on the reproduced pool, written by lightning_modules.reproduce\n"
            + yaml.safe_dump(config, sort_keys=False)
        )


def run_merges(steps: Sequence[MergeStep], output_dir: Path, merge_args: Sequence[str]) -> int:
    for step in steps:
        log = output_dir / "logs" / step.log_name
        say(f"{step.label} on the reproduced pool (log: {log})")
        if run_logged(step.command(merge_args), log):
            say(f"{step.label} FAILED; see {log}")
            return 1
    report = steps[-1].report_dir(output_dir) / "report.md"
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
        value = next(rest, None) if arg in ("--train-args", "--merge-args", "--sbatch-args") else None
        attached.append(arg if value is None else f"{arg}={value}")
    return attached


def split_options(option: str, value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as error:  # an unclosed quote
        fail(f"{option} '{value}': {error}")


def selected_tasks(names: Sequence[str]) -> tuple[list[str], str]:
    """The tasks of ``--tasks`` (benchmark names and task names, space- or comma-separated, each
    task by its own spelling: ``Stanford-Cars`` is ``stanford_cars``), each once, and the benchmark
    whose merge configs run: the first of ``BENCHMARKS`` that holds them all. Checked before
    anything runs."""
    choices = f"a benchmark ({', '.join(BENCHMARKS)}) or tasks of tall20: {', '.join(REPRODUCIBLE_TASKS)}"
    tasks: list[str] = []
    for name in (part for arg in names for part in arg.split(",") if part.strip()):
        key = task_key(name)
        for task in BENCHMARKS.get(key) or [key]:
            if task not in REPRODUCIBLE_TASKS:
                known = TASKS.get(task)
                if known is None:
                    close = difflib.get_close_matches(key, [*BENCHMARKS, *REPRODUCIBLE_TASKS], n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    fail(f"--tasks: unknown task '{name}'; {hint}({choices})")
                alone = CONFIGS / "train" / f"{task}.yaml"
                where = f"fine-tune it alone with python train.py fit --config configs/train/{task}.yaml" if alone.is_file() else (
                    f"it has no configs/train/{task}.yaml"
                )  # fmt: skip
                fail(f"--tasks: '{name}' is in no benchmark, so no merge config lists it; {where} ({choices})")
            if task in tasks:
                fail(f"--tasks: {task} is given twice")
            tasks.append(task)
    if not tasks:
        fail(f"--tasks names no task ({choices})")
    benchmark = next(name for name, members in BENCHMARKS.items() if set(tasks) <= set(members))
    return tasks, benchmark


def write_slurm_jobs(
    plans: Sequence[FineTune], steps: Sequence[MergeStep], options: argparse.Namespace,
    train_args: Sequence[str], merge_args: Sequence[str], sbatch_args: Sequence[str], name: str,
) -> int:  # fmt: skip
    """``--launcher slurm``: the job array of the fine-tunes still to do and the merge job after it,
    written and, with ``--submit``, submitted."""
    to_do = [plan for plan in plans if not plan.done]
    try:  # what SLURM would be asked for, checked before anything is written
        needs = slurm.Needs(
            slurm.Allocation.largest([slurm.allocation(plan.resolved, "the fine-tune", "--train-args") for plan in to_do]),
            [slurm.allocation(step.resolved(merge_args), step.label, "--merge-args") for step in steps],
        )
    except TrainingError as error:
        fail(str(error))
    for plan in plans:
        if plan.done:
            say(f"{plan.task}: export {plan.export} exists, skipped")
    for index, plan in enumerate(to_do):
        resumes = plan.last_checkpoint is not None and plan.last_checkpoint.is_file()
        say(f"{plan.task}: array element {index}" + (f", resuming from {plan.last_checkpoint}" if resumes else ""))
    write_merge_configs(steps, plans, options.output_dir)
    report = steps[-1].report_dir(options.output_dir) / "report.md"
    jobs = slurm.write_jobs(to_do, steps, needs, train_args, merge_args, options.output_dir, options.gpus, name, report)
    if not options.submit:
        say(f"written: {', '.join(str(script) for script in (jobs.fine_tune, jobs.merge) if script)}; submit with:")
        print("\n".join(f"  {command}" for command in slurm.submit_commands(jobs, sbatch_args)), flush=True)
        print("or run this command again with --submit.", flush=True)
        return 0
    try:
        array, merge = slurm.submit(jobs, sbatch_args)
    except TrainingError as error:
        fail(str(error))
    if array is not None:
        say(f"fine-tunes: submitted job array {array} ({len(jobs.elements)} tasks: {jobs.fine_tune})")
    after = f", to start once every element of {array} succeeded" if array else ""
    say(f"merges: submitted job {merge}{after} ({jobs.merge})")
    return 0


def main(args: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m lightning_modules.reproduce", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument(
        "--tasks", nargs="+", default=["ta8"],
        help=f"a benchmark ({', '.join(BENCHMARKS)}) or tasks of tall20, space- or comma-separated: the tasks to fine-tune and merge",
    )  # fmt: skip
    parser.add_argument(
        "--gpus", type=int, default=None,
        help="local: fine-tunes at a time, one GPU each (GPU 0..N-1; default 1); slurm: array elements running at once "
        "(default: as many as the cluster runs)",
    )  # fmt: skip
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local", help="run here, or as SLURM jobs")
    parser.add_argument(
        "--fine-tune-only", action="store_true",
        help="only the fine-tunes (local launcher): merge later by running the command again without it",
    )  # fmt: skip
    parser.add_argument("--submit", action="store_true", help="slurm: submit the jobs with sbatch (else only write them)")
    parser.add_argument("--sbatch-args", default="", help="slurm: extra sbatch options for both jobs (one string)")
    parser.add_argument("--train-args", default="", help="extra options for every train.py fit (one string)")
    parser.add_argument("--merge-args", default="", help="extra options for merge.py fit/test (one string)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/reproduce"), help="merge configs and outputs, logs")
    options = parser.parse_args(with_option_values_attached(sys.argv[1:] if args is None else args))
    if options.gpus is not None and options.gpus < 1:
        fail(f"--gpus must be 1 or more, got {options.gpus}")
    if options.fine_tune_only and options.launcher == "slurm":
        fail("--fine-tune-only is for the local launcher: with --launcher slurm, submit fine-tune.sbatch alone")
    if options.launcher != "slurm":
        for given, option in ((options.submit, "--submit"), (options.sbatch_args, "--sbatch-args")):
            if given:
                fail(f"{option} is for SLURM jobs: give it with --launcher slurm")
    tasks, benchmark = selected_tasks(options.tasks)
    train_args, merge_args = split_options("--train-args", options.train_args), split_options("--merge-args", options.merge_args)
    sbatch_args = split_options("--sbatch-args", options.sbatch_args)
    if options.submit:
        try:
            slurm.check_sbatch()
        except TrainingError as error:
            fail(str(error))
    plans = [plan_fine_tune(task, train_args) for task in tasks]
    base_model(plans)
    steps = merge_steps(benchmark, options.output_dir)
    if options.launcher == "slurm":
        return write_slurm_jobs(plans, steps, options, train_args, merge_args, sbatch_args, f"reproduce-{benchmark}")
    failed = run_fine_tunes(plans, options.gpus or 1, train_args, options.output_dir / "logs")
    if failed:
        say(f"fine-tunes failed: {', '.join(failed)}; fix and rerun: finished tasks are skipped, interrupted ones resume")
        return 1
    if options.fine_tune_only:
        say(f"fine-tunes done ({len(plans)} tasks); --fine-tune-only: no merges")
        return 0
    write_merge_configs(steps, plans, options.output_dir)
    return run_merges(steps, options.output_dir, merge_args)


if __name__ == "__main__":
    sys.exit(main())
