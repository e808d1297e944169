"""The reproduction as SLURM jobs (``--launcher slurm``), with stand-ins for ``sbatch`` and ``srun``
on ``PATH`` that record what they were given (``tests/slurm_standins.py``; ``sbatch`` answers
``Submitted batch job <n>`` as the real one does). The array's elements and the merge job run here as SLURM would run them, ``bash``
in the job's directory with ``SLURM_ARRAY_TASK_ID`` set; the fine-tune itself is the stand-in
``srun``'s (the real one, on the Hugging Face stand-ins, is rehearsed in ``tests/test_reproduction.py``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import slurm_standins

import test_bad_input
from conftest import REPO_ROOT
from datamodules.tasks import BENCHMARKS, get_task
from lightning_modules import reproduce
from lightning_modules.export import export_name
from test_bad_input import one_error_line

workdir = test_bad_input.workdir


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``sbatch`` and ``srun`` stand-ins first on ``PATH``; the folder where they record their calls."""
    bin_dir, record = slurm_standins.install(tmp_path / "slurm")
    monkeypatch.setenv("PATH", slurm_standins.path_with(bin_dir))
    for variable in ("SBATCH_STANDIN_FAIL", "SRUN_STANDIN_RUN", "SRUN_STANDIN_EXPORTS", "SRUN_STANDIN_STATUS"):
        monkeypatch.delenv(variable, raising=False)
    return record


def export_of(task: str, steps: int = 4000) -> Path:
    """Where ``configs/train/<task>.yaml`` exports after ``steps`` steps (the public checkpoints' names)."""
    return Path("exports") / export_name("facebook/convnext-base-224", get_task(task).hub_name, 64, 0.01, steps)


def last_of(task: str) -> Path:
    return Path("outputs") / "train" / task / "checkpoints" / "last.ckpt"


def fake_export(export: Path) -> None:
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")


def run_element(script: Path, index: int, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script)], cwd=cwd, env={**os.environ, "SLURM_ARRAY_TASK_ID": str(index), **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


TALL20 = BENCHMARKS["tall20"]
TRAIN_ARGS = ["--trainer.max_steps=20", "--data.num_workers=2"]


def test_submit_writes_one_array_element_per_task_to_do_and_a_merge_job_after_them(cluster, workdir, capsys) -> None:
    cwd = workdir
    done = {"sun397", "pcam"}  # exported already: left out of the array
    for task in done:
        fake_export(export_of(task, 20))
    interrupted = last_of("dtd")
    interrupted.parent.mkdir(parents=True)
    interrupted.write_bytes(b"a checkpoint")

    status = reproduce.main([
        "--tasks", "tall20", "--launcher", "slurm", "--submit", "--gpus", "8",
        "--train-args", shlex.join(TRAIN_ARGS), "--sbatch-args", "--partition=gpu --time=4:00:00",
    ])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    (array_args, array), (merge_args, merge) = slurm_standins.submissions(cluster)
    fine_tune_script = Path("outputs/reproduce/slurm/fine-tune.sbatch")
    assert array_args == ["--partition=gpu", "--time=4:00:00", str(fine_tune_script)]
    assert array == fine_tune_script.read_text()
    to_do = [task for task in TALL20 if task not in done]
    assert "#SBATCH --array=0-17%8\n" in array and len(to_do) == 18
    assert "#SBATCH --gres=gpu:1\n" in array and "#SBATCH --ntasks-per-node=1\n" in array
    assert "#SBATCH --cpus-per-task=2\n" in array and f"#SBATCH --chdir={cwd}\n" in array
    for index, task in enumerate(to_do):
        assert f"  {index}) task={task} export={export_of(task, 20)} last={last_of(task)}\n" in array
        config = REPO_ROOT / "configs" / "train" / f"{task}.yaml"
        command = [sys.executable, str(REPO_ROOT / "train.py"), "fit", "--config", str(config), *TRAIN_ARGS]
        assert f"     fine_tune=({shlex.join(command)}) ;;\n" in array
    assert "task=sun397" not in array and "task=pcam" not in array
    assert "sun397: export exports/convnext-base-224_sun397_sgd_batch-size-64_lr-0.01_steps-20 exists, skipped" in printed
    assert to_do.index("dtd") == 6 and "dtd: array element 6, resuming from outputs/train/dtd/checkpoints/last.ckpt" in printed
    assert "fine-tunes: submitted job array 1234 (18 tasks" in printed

    merge_script = Path("outputs/reproduce/slurm/merge.sbatch")
    assert merge_args == [
        "--partition=gpu", "--time=4:00:00", "--dependency=afterok:1234", "--kill-on-invalid-dep=yes", str(merge_script)
    ]  # fmt: skip
    assert merge == merge_script.read_text() and "merges: submitted job 1235, to start once every element of 1234" in printed
    runs = [line for line in merge.splitlines() if line.startswith("srun ")]
    assert [line.split(" merge.py ")[0].split("/")[0] for line in runs] == [
        "srun --nodes=1 --ntasks-per-node=1 --cpus-per-task=4 ",
        "srun --nodes=1 --ntasks-per-node=1 --cpus-per-task=8 ",
    ]  # the data workers of adamerging_tall20.yaml and compare_tall20.yaml
    assert [shlex.split(line)[5:9] for line in runs] == [
        [str(REPO_ROOT / "merge.py"), "fit", "--config", "outputs/reproduce/configs/adamerging_tall20.yaml"],
        [str(REPO_ROOT / "merge.py"), "test", "--config", "outputs/reproduce/configs/compare_tall20.yaml"],
    ]
    assert 'cat "$report"' in merge and "report=outputs/reproduce/compare/convnext-base-224_tall20/report.md" in merge
    assert Path("outputs/reproduce/configs/pools/convnext-base-224_tall20.yaml").is_file()


def test_each_element_skips_or_resumes_when_it_starts(cluster, workdir, capsys) -> None:
    cwd = workdir
    tasks = ["dtd", "eurosat", "mnist"]
    assert reproduce.main(["--tasks", ",".join(tasks), "--launcher", "slurm", "--submit"]) == 0
    script = Path("outputs/reproduce/slurm/fine-tune.sbatch")

    # dtd was interrupted after the array was written: its element resumes from last.ckpt.
    last_of("dtd").parent.mkdir(parents=True)
    last_of("dtd").write_bytes(b"a checkpoint")
    resumed = run_element(script, 0, cwd, SRUN_STANDIN_EXPORTS=str(export_of("dtd")))
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines() == [
        "dtd: fine-tuning, resuming from outputs/train/dtd/checkpoints/last.ckpt (log: outputs/reproduce/logs/dtd.log)",
        f"dtd: exported {export_of('dtd')}",
    ]
    srun = (cluster / "srun-0.args").read_text().splitlines()
    assert srun[:4] == ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=8", sys.executable]
    config = str(REPO_ROOT / "configs" / "train" / "dtd.yaml")
    assert srun[4:] == [str(REPO_ROOT / "train.py"), "fit", "--config", config, "--ckpt_path", str(last_of("dtd"))]

    # eurosat was exported (by another run) since: its element skips it and runs nothing.
    fake_export(export_of("eurosat"))
    skipped = run_element(script, 1, cwd)
    assert skipped.returncode == 0 and not (cluster / "srun-1.args").exists()
    assert skipped.stdout == f"eurosat: export {export_of('eurosat')} exists, skipped\n"

    # mnist from the start; a fine-tune that ends without its export is a failed element.
    failed = run_element(script, 2, cwd)
    assert failed.returncode == 1
    assert "--ckpt_path" not in (cluster / "srun-2.args").read_text()
    assert failed.stdout.splitlines()[-1] == "mnist: FAILED with exit status 0; see outputs/reproduce/logs/mnist.log"
    crashed = run_element(script, 2, cwd, SRUN_STANDIN_STATUS="3")
    assert crashed.returncode == 1 and crashed.stdout.splitlines()[-1].startswith("mnist: FAILED with exit status 3")

    outside = run_element(script, 3, cwd)
    assert outside.returncode == 1 and outside.stderr == "error: no task for array element 3\n"
    assert run_element(script, 0, cwd, SLURM_ARRAY_TASK_ID="").returncode != 0  # run outside an array: refused


def test_with_every_task_exported_only_the_merges_are_submitted(cluster, workdir, capsys) -> None:
    stale = Path("outputs/reproduce/slurm/fine-tune.sbatch")
    stale.parent.mkdir(parents=True)
    stale.write_text("an earlier call's array")
    for task in ("dtd", "eurosat"):
        fake_export(export_of(task))
    assert reproduce.main(["--tasks", "dtd", "eurosat", "--launcher", "slurm", "--submit"]) == 0
    ((merge_args, merge),) = slurm_standins.submissions(cluster)
    assert merge_args == ["outputs/reproduce/slurm/merge.sbatch"] and "--dependency" not in merge
    assert not stale.exists(), "an array that would fine-tune what is exported is taken back"
    assert "merges: submitted job 1234 (outputs/reproduce/slurm/merge.sbatch)" in capsys.readouterr().out


def test_without_submit_the_scripts_are_written_and_the_commands_printed(cluster, workdir, capsys) -> None:
    assert reproduce.main(["--tasks", "dtd", "--launcher", "slurm", "--sbatch-args", "--account=lab"]) == 0
    assert slurm_standins.submissions(cluster) == []
    printed = capsys.readouterr().out
    assert "  array=$(sbatch --parsable --account=lab outputs/reproduce/slurm/fine-tune.sbatch)\n" in printed
    assert (
        '  sbatch --account=lab --dependency=afterok:"${array%%;*}" --kill-on-invalid-dep=yes outputs/reproduce/slurm/merge.sbatch\n'
        in printed
    )
    # The printed commands run as they are (here with the stand-in sbatch).
    commands = [line.strip() for line in printed.splitlines() if line.startswith("  ")]
    subprocess.run(["bash", "-c", "\n".join(["set -e", *commands])], check=True, capture_output=True)
    assert [args[-1] for args, _ in slurm_standins.submissions(cluster)] == [
        "outputs/reproduce/slurm/fine-tune.sbatch", "outputs/reproduce/slurm/merge.sbatch"
    ]  # fmt: skip
    assert slurm_standins.submissions(cluster)[1][0][1] == "--dependency=afterok:1234"


def test_a_multi_node_merge_asks_slurm_for_its_nodes_and_gpus(cluster, workdir) -> None:
    merge_args = "--trainer.num_nodes=2 --trainer.devices=4 --trainer.strategy=ddp"
    assert reproduce.main(["--tasks", "dtd", "--launcher", "slurm", "--merge-args", merge_args]) == 0
    merge = Path("outputs/reproduce/slurm/merge.sbatch").read_text()
    for directive in ("--nodes=2", "--ntasks-per-node=4", "--gres=gpu:4"):
        assert f"#SBATCH {directive}\n" in merge
    runs = [line for line in merge.splitlines() if line.startswith("srun ")]
    assert len(runs) == 2 and all(line.startswith("srun --nodes=2 --ntasks-per-node=4 ") for line in runs)
    assert all(line.endswith(f'{merge_args} >"$log" 2>&1 ||') for line in runs)


def test_the_merge_job_runs_its_steps_in_order_and_stops_at_a_failure(cluster, workdir) -> None:
    assert reproduce.main(["--tasks", "dtd", "--launcher", "slurm"]) == 0
    script = Path("outputs/reproduce/slurm/merge.sbatch")
    failed = run_element(script, 0, workdir, SRUN_STANDIN_STATUS="1")
    assert failed.returncode == 1
    assert failed.stdout.splitlines() == [
        "AdaMerging on the reproduced pool (log: outputs/reproduce/logs/adamerging.log)",
        "AdaMerging FAILED; see outputs/reproduce/logs/adamerging.log",
    ]
    report = Path("outputs/reproduce/compare/convnext-base-224_8-tasks/report.md")
    report.parent.mkdir(parents=True)
    report.write_text("| method | dtd |\n")
    done = run_element(script, 0, workdir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == [
        "the comparison on the reproduced pool (log: outputs/reproduce/logs/compare.log)", "| method | dtd |", f"done: {report}"
    ]  # fmt: skip
    last_srun = (cluster / "srun-0.args").read_text().splitlines()
    assert last_srun[4:] == [str(REPO_ROOT / "merge.py"), "test", "--config", "outputs/reproduce/configs/compare.yaml"]


MISTAKES = {
    "--submit without slurm": (["--tasks", "dtd", "--submit"], "--submit is for SLURM jobs: give it with --launcher slurm"),
    "--sbatch-args without slurm": (["--sbatch-args", "--partition=gpu"],
                                    "--sbatch-args is for SLURM jobs: give it with --launcher slurm"),
    "--fine-tune-only with slurm": (["--tasks", "dtd", "--launcher", "slurm", "--fine-tune-only"],
                                    "--fine-tune-only is for the local launcher: with --launcher slurm, submit fine-tune.sbatch alone"),
    "an unclosed quote in --sbatch-args": (["--launcher", "slurm", "--sbatch-args", "--comment='x"],
                                           "--sbatch-args '--comment='x': No closing quotation"),
    "devices left to Lightning": (["--tasks", "dtd", "--launcher", "slurm", "--train-args", "--trainer.devices=auto"],
                                  "--launcher slurm: the fine-tune runs on trainer.devices 'auto', and a SLURM job needs the "
                                  "number of GPUs per node (e.g. --train-args '--trainer.devices=1')"),
}  # fmt: skip


@pytest.mark.parametrize("case", MISTAKES)
def test_a_slurm_mistake_is_one_error_line(case: str, workdir: Path, capsys) -> None:
    args, expected = MISTAKES[case]
    assert one_error_line(reproduce.main, args, capsys) == f"error: {expected}"
    assert not list(workdir.iterdir())


def test_submit_without_sbatch_on_path_is_one_error_line(workdir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(workdir / "no-bin"))
    expected = (
        "error: --submit: no sbatch on PATH (run on a SLURM login node, or leave out --submit to only write the job scripts)"
    )
    assert one_error_line(reproduce.main, ["--tasks", "dtd", "--launcher", "slurm", "--submit"], capsys) == expected
    assert not list(workdir.iterdir())


def test_a_refused_submission_is_one_error_line_naming_what_was_submitted(cluster, workdir, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SBATCH_STANDIN_FAIL", "1")  # the array is accepted, the merge job refused
    line = one_error_line(reproduce.main, ["--tasks", "dtd", "--launcher", "slurm", "--submit"], capsys)
    assert line == (
        "error: sbatch --dependency=afterok:1234 --kill-on-invalid-dep=yes outputs/reproduce/slurm/merge.sbatch failed "
        "(exit status 1): sbatch: error: Batch job submission failed: Invalid partition name specified; the fine-tunes "
        "were submitted as job 1234: submit the merges with sbatch --dependency=afterok:1234 --kill-on-invalid-dep=yes "
        "outputs/reproduce/slurm/merge.sbatch"
    )
