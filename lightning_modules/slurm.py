"""The reproduction as SLURM jobs (``python -m lightning_modules.reproduce --launcher slurm``).

Two batch scripts under ``<output_dir>/slurm/``:

- ``fine-tune.sbatch``, a job array with one element per task still to do when it was written
  (a task already exported is left out). Each element applies the local launcher's rules again
  when it starts: it skips its task if the export exists by then, and resumes from the task's
  ``last.ckpt`` if there is one (a rerun after a failure, or a requeue after preemption), then runs
  the same ``train.py fit --config configs/train/<task>.yaml`` as the local launcher, under
  ``srun``, its output in ``<output_dir>/logs/<task>.log``.
- ``merge.sbatch``: AdaMerging, then the comparison, each under ``srun`` on the nodes and GPUs its
  resolved config asks for (``--merge-args "--trainer.num_nodes=2 --trainer.devices=8
  --trainer.strategy=ddp"``: 2 nodes, 8 processes each), where Lightning's ``SLURMEnvironment``
  takes every process's rank from SLURM. Submitted with ``--dependency=afterok:<array>``, it
  starts once every element succeeded, and ``--kill-on-invalid-dep=yes`` cancels it if one failed.

``--submit`` submits both with ``sbatch`` (found on ``PATH``); without it the scripts are written
and the commands that submit them are printed. A mistake (``sbatch`` missing or refusing a job,
an allocation SLURM cannot be asked for) is a ``TrainingError``, one line from the command.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_modules.errors import TrainingError

if TYPE_CHECKING:
    from lightning_modules.reproduce import FineTune, MergeStep

#: What sbatch prints on success (``Submitted batch job 1234``, ``... on cluster c`` on a federation).
SUBMITTED = re.compile(r"Submitted batch job (\d+)")


@dataclass(frozen=True)
class Allocation:
    """What one run needs from SLURM: nodes, processes (one per GPU) per node, CPUs per process."""

    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    gpus: bool

    def srun(self) -> list[str]:
        """``srun`` for a step of this size: one process per GPU, ranks from SLURM."""
        return [
            "srun",
            f"--nodes={self.nodes}",
            f"--ntasks-per-node={self.tasks_per_node}",
            f"--cpus-per-task={self.cpus_per_task}",
        ]

    def directives(self) -> list[str]:
        return self.srun()[1:] + ([f"--gres=gpu:{self.tasks_per_node}"] if self.gpus else [])

    @staticmethod
    def largest(allocations: Sequence[Allocation]) -> Allocation | None:
        if not allocations:
            return None
        return Allocation(
            max(a.nodes for a in allocations), max(a.tasks_per_node for a in allocations),
            max(a.cpus_per_task for a in allocations), any(a.gpus for a in allocations),
        )  # fmt: skip


def allocation(config: Mapping[str, Any], what: str, option: str) -> Allocation:
    """The SLURM allocation of a resolved ``train.py``/``merge.py`` config: ``trainer.num_nodes`` nodes,
    one process per device of ``trainer.devices``, ``data.num_workers`` CPUs per process (at least one)."""
    trainer = config["trainer"]
    devices, accelerator = trainer.get("devices"), str(trainer.get("accelerator"))
    if isinstance(devices, list):
        count = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        count = int(devices)
    elif accelerator == "cpu":
        count = 1
    else:
        count = 0
    if count < 1:
        raise TrainingError(
            f"--launcher slurm: {what} runs on trainer.devices {devices!r}, and a SLURM job needs the number of GPUs per node "
            f"(e.g. {option} '--trainer.devices=1')"
        )
    nodes = int(trainer.get("num_nodes") or 1)
    return Allocation(nodes, count, max(1, int(config["data"].get("num_workers") or 0)), accelerator != "cpu")


@dataclass(frozen=True)
class Needs:
    """The allocations of the reproduction's jobs: each array element's, and each merge step's."""

    fine_tune: Allocation | None
    merges: list[Allocation]


@dataclass(frozen=True)
class Jobs:
    """The written scripts: the fine-tunes' job array (None when every task is exported) and the merges."""

    fine_tune: Path | None
    elements: tuple[FineTune, ...]
    merge: Path


def _header(name: str, allocation: Allocation, output: Path, comment: str, extra: Sequence[str] = ()) -> list[str]:
    directives = [f"--job-name={name}", *extra, *allocation.directives(), f"--chdir={Path.cwd()}", f"--output={output}"]
    return ["#!/bin/bash", *(f"# {line}" for line in comment.splitlines()), *(f"#SBATCH {line}" for line in directives),
            "set -eo pipefail", ""]  # fmt: skip


def _quoted(command: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(part)) for part in command)


def fine_tune_script(
    elements: Sequence[FineTune], needs: Allocation, train_args: Sequence[str], logs: Path, gpus: int | None, name: str
) -> str:
    """The job array: element ``i`` fine-tunes ``elements[i]``, with the local launcher's skip and resume rules."""
    throttle = f"%{gpus}" if gpus else ""
    lines = _header(
        f"{name}-fine-tune", needs, logs.absolute() / "slurm-%A_%a.out",
        "The fine-tunes still to do when lightning_modules.reproduce wrote this, one array element each. An element\n"
        "skips its task if the export exists by the time it starts, and resumes from its last.ckpt if there is one.",
        extra=[f"--array=0-{len(elements) - 1}{throttle}"],
    )  # fmt: skip
    lines.append('case "${SLURM_ARRAY_TASK_ID:?not an array element: submit this script with sbatch}" in')
    for index, plan in enumerate(elements):
        last = shlex.quote(str(plan.last_checkpoint)) if plan.last_checkpoint is not None else "''"
        lines.append(f"  {index}) task={plan.task} export={shlex.quote(str(plan.export))} last={last}")
        lines.append(f"     fine_tune=({_quoted(plan.command(train_args, resume=False))}) ;;")
    lines += [
        '  *) echo "error: no task for array element $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
        "esac",
        f'log={shlex.quote(str(logs))}/"$task".log',
        'if [[ -f "$export/config.json" ]]; then',
        '    echo "$task: export $export exists, skipped"',
        "    exit 0",
        "fi",
        'if [[ -n "$last" && -f "$last" ]]; then',
        '    echo "$task: fine-tuning, resuming from $last (log: $log)"',
        '    fine_tune+=(--ckpt_path "$last")',
        "else",
        '    echo "$task: fine-tuning (log: $log)"',
        "fi",
        'mkdir -p "$(dirname "$log")"',
        "status=",
        f'{_quoted(needs.srun())} "${{fine_tune[@]}}" >"$log" 2>&1 || status=$?',
        'if [[ -n "$status" || ! -f "$export/config.json" ]]; then',
        '    echo "$task: FAILED with exit status ${status:-0}; see $log"',
        "    exit 1",
        "fi",
        'echo "$task: exported $export"',
    ]
    return "\n".join(lines) + "\n"


def merge_script(
    steps: Sequence[MergeStep], needs: Sequence[Allocation], merge_args: Sequence[str], logs: Path, report: Path, name: str
) -> str:
    """AdaMerging, then the comparison, each under ``srun`` with the allocation its config asks for."""
    lines = _header(
        f"{name}-merge", Allocation.largest(needs), logs.absolute() / "slurm-merge-%j.out",
        "The merges of lightning_modules.reproduce on the exports, once every fine-tune has succeeded: AdaMerging,\n"
        "then the comparison. Under srun, Lightning's SLURMEnvironment takes each process's rank from SLURM.",
    )  # fmt: skip
    for step, needed in zip(steps, needs):
        lines += [
            f"log={shlex.quote(str(logs / step.log_name))}",
            f'echo "{step.label} on the reproduced pool (log: $log)"',
            f'{_quoted(needed.srun())} {_quoted(step.command(merge_args))} >"$log" 2>&1 ||',
            f'    {{ echo "{step.label} FAILED; see $log"; exit 1; }}',
        ]
    lines += [f"report={shlex.quote(str(report))}", 'cat "$report"', 'echo "done: $report"']
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    staging.chmod(0o755)
    staging.replace(path)
    return path


def write_jobs(
    elements: Sequence[FineTune], steps: Sequence[MergeStep], needs: Needs, train_args: Sequence[str],
    merge_args: Sequence[str], output_dir: Path, gpus: int | None, name: str, report: Path,
) -> Jobs:  # fmt: skip
    """Both scripts under ``<output_dir>/slurm/``, jobs named ``name-fine-tune`` and ``name-merge``: an
    array element per fine-tune of ``elements`` (none: no array), a merge job that prints ``report``."""
    logs, scripts = output_dir / "logs", output_dir / "slurm"
    logs.mkdir(parents=True, exist_ok=True)  # SLURM opens each job's --output there, and fails the job where it cannot
    merge = _write(scripts / "merge.sbatch", merge_script(steps, needs.merges, merge_args, logs, report, name))
    fine_tune = scripts / "fine-tune.sbatch"
    if elements:
        assert needs.fine_tune is not None
        _write(fine_tune, fine_tune_script(elements, needs.fine_tune, train_args, logs, gpus, name))
    else:
        fine_tune.unlink(missing_ok=True)  # an earlier call's array would fine-tune what is exported now
    return Jobs(fine_tune if elements else None, tuple(elements), merge)


def check_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise TrainingError(
            "--submit: no sbatch on PATH (run on a SLURM login node, or leave out --submit to only write the job scripts)"
        )


def sbatch(options: Sequence[str], script: Path) -> str:
    """Submit ``script``; its job id."""
    command = ["sbatch", *options, str(script)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = SUBMITTED.search(result.stdout)
    if result.returncode != 0 or found is None:
        said = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise TrainingError(f"{shlex.join(command)} failed (exit status {result.returncode}): {said}")
    return found.group(1)


def merge_options(sbatch_args: Sequence[str], after: str | None) -> list[str]:
    """The merge job's sbatch options: after every element of job ``after``, cancelled if one fails."""
    return [*sbatch_args, *([f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else [])]


def submit(jobs: Jobs, sbatch_args: Sequence[str]) -> tuple[str | None, str]:
    """Submit the array (if any), then the merges depending on it; both job ids."""
    array = sbatch(sbatch_args, jobs.fine_tune) if jobs.fine_tune is not None else None
    try:
        return array, sbatch(merge_options(sbatch_args, array), jobs.merge)
    except TrainingError as error:
        if array is None:
            raise
        raise TrainingError(
            f"{error}; the fine-tunes were submitted as job {array}: submit the merges with "
            f"sbatch {shlex.join(merge_options(sbatch_args, array))} {jobs.merge}"
        ) from None


def submit_commands(jobs: Jobs, sbatch_args: Sequence[str]) -> list[str]:
    """The shell commands that submit what ``write_jobs`` wrote, as ``submit`` does."""
    if jobs.fine_tune is None:
        return [shlex.join(["sbatch", *sbatch_args, str(jobs.merge)])]
    array = f"array=$({shlex.join(['sbatch', '--parsable', *sbatch_args, str(jobs.fine_tune)])})"
    merge = shlex.join(["sbatch", *merge_options(sbatch_args, "ARRAY"), str(jobs.merge)])
    return [array, merge.replace("afterok:ARRAY", 'afterok:"${array%%;*}"')]
