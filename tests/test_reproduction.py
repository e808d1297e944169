"""The reproduction (``python -m lightning_modules.reproduce``), rehearsed against a Hugging Face
home of tiny stand-ins. (The merge configs on the public fine-tunes: ``tests/test_public_id_rehearsal.py``.)

``tests/hf_home.py`` files tiny models and datasets under the real hub ids; every command runs
as a user runs it, in a subprocess with ``HF_HOME`` pointed there and ``HF_HUB_OFFLINE=1``.
Only steps, intervals, workers and the accelerator are overridden (outputs land in the
working directory, a temporary folder), never a model id or a data path. The loop closes:
the exports ``train.py`` writes become the pool that ``merge.py`` merges and evaluates.

The reproduction is rehearsed once at its largest, TALL20 (its twenty fine-tunes, which hold the
eight, and its merges), and the other runs share that working directory: the eight again as
SLURM jobs (``tests/slurm_standins.py``: the scripts run as SLURM would run them), skipping
seven exports and resuming the eighth, and two tasks again here, resuming one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import slurm_standins
import yaml
from rehearsal import MERGE_ARGS, assert_full_report, report, run

import hf_home
from conftest import REPO_ROOT
from datamodules.tasks import BENCHMARK_TASKS, BENCHMARKS, get_task
from lightning_modules.export import export_name

#: The reproduction's stand-ins: every fine-tune step draws its 64 images from whatever rows there
#: are, and the comparison scores every row with each of its ~40 models, for twenty tasks.
REPRODUCTION_SIZES = {"train": 10, "test": 2}
TRAIN_ARGS = [
    "--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.callbacks.every_n_train_steps=1",
    "--data.num_workers=0", "--trainer.accelerator=cpu",
]  # fmt: skip
TALL20 = BENCHMARKS["tall20"]


@pytest.fixture(scope="module")
def reproduction_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained model and TALL20's datasets (``REPRODUCTION_SIZES``) under their real ids."""
    root = tmp_path_factory.mktemp("hf-reproduction")
    hf_home.add_models(root / "home", tasks=())
    hf_home.add_datasets(root / "home", root / "scratch", REPRODUCTION_SIZES, tasks=TALL20)
    return root / "home"


def reproduce(home: Path, cwd: Path, *options: str, **env: str) -> subprocess.CompletedProcess:
    return run(
        ["-m", "lightning_modules.reproduce", *options,
         "--train-args", " ".join(TRAIN_ARGS), "--merge-args", " ".join(MERGE_ARGS)],
        home, cwd, timeout=1800, **env,
    )  # fmt: skip


def export_of(task: str) -> Path:
    return Path("exports") / export_name("facebook/convnext-base-224", get_task(task).hub_name, 64, 0.01, 1)


def methods_of(config: str) -> list[dict]:
    return yaml.safe_load((REPO_ROOT / "configs" / "merge" / config).read_text())["model"]["init_args"]["methods"]


def assert_compared(content: dict, config: str, tasks: tuple[str, ...], sizes=REPRODUCTION_SIZES) -> None:
    """A comparison of every method of ``config`` and every grid point, on ``tasks``."""
    assert_full_report(content, {entry["label"] for entry in content["methods"]} | {"individual"}, tasks=tasks, sizes=sizes)
    assert len(content["methods"]) > len(methods_of(config)), "every grid point is a row"
    assert {entry["name"] for entry in content["methods"]} >= {"regmean", "adamerging"}
    assert {entry["method"] for entry in content["selection"]} >= {"task_arithmetic", "ties", "regmean"}
    held_out = round(0.1 * sizes["train"])
    assert all(row["tasks"][task]["num_samples"] == held_out for row in content["validation"]["rows"].values() for task in tasks)
    # The Gram pass reads the train rows outside the 10% held out for validation.
    assert content["gram_images"] == {task: sizes["train"] - held_out for task in tasks}


#: The TALL20 fixture (twenty fine-tunes, then both merges) takes about 5 minutes on two idle cores;
#: the tests that use it get room for a loaded machine beyond pyproject's 600 s.
TALL20_TIMEOUT = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def tall20(reproduction_home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The working directory after ``--tasks tall20``, and what the command printed."""
    cwd = tmp_path_factory.mktemp("reproduction")
    return cwd, reproduce(reproduction_home, cwd, "--tasks", "tall20", "--gpus", "2").stdout


@TALL20_TIMEOUT
def test_reproduce_tall20_fine_tunes_the_twenty_configs_and_merges_their_exports(tall20: tuple[Path, str]) -> None:
    cwd, printed = tall20
    reproduced = cwd / "outputs" / "reproduce"
    pool = yaml.safe_load((reproduced / "configs" / "pools" / "convnext-base-224_tall20.yaml").read_text())["models"]
    assert list(pool) == ["_pretrained_", *TALL20] and pool["_pretrained_"] == "facebook/convnext-base-224"
    for task in TALL20:
        info = get_task(task)
        assert pool[task] == str(export_of(task)), "the pool is what train.py exported"
        export = cwd / export_of(task)
        config = json.loads((export / "config.json").read_text())
        assert config["id2label"] == {str(i): name for i, name in enumerate(info.classnames)}
        card = (export / "README.md").read_text()
        for row in (
            f"| training split | {info.train_split} (every row) |",
            f"| training images | {REPRODUCTION_SIZES['train']} |",
            f"| validation split | {info.test_split} |",  # food101: validation
            "| steps | 1 |",
            f"- {info.hub_dataset}",
        ):
            assert row in card, (task, row)
        assert (export / "preprocessor_config.json").is_file()
        assert (cwd / "outputs" / "train" / task / "checkpoints" / "last.ckpt").exists()
        assert f"{task}: exported" in printed
    assert "fine-tuning on GPU 0" in printed and "fine-tuning on GPU 1" in printed, "--gpus 2: two at a time"
    content = report(reproduced / "compare" / "convnext-base-224_tall20")
    assert_compared(content, "compare_tall20.yaml", TALL20)
    assert content["models"] == pool
    coefficients = json.loads((reproduced / "adamerging_tall20" / "coefficients.json").read_text())
    assert coefficients["tasks"] == list(TALL20)
    assert "| individual |" in printed


@TALL20_TIMEOUT
def test_the_eight_as_slurm_jobs_skip_the_finished_and_resume_the_interrupted(
    tall20: tuple[Path, str], reproduction_home: Path, tmp_path: Path
) -> None:
    """The default benchmark (ta8) in TALL20's directory, as SLURM jobs: dtd's export is gone, its
    last checkpoint is there; the array is dtd alone, its element resumes, the merge job merges."""
    cwd, _ = tall20
    shutil.rmtree(cwd / export_of("dtd"))
    bin_dir, record = slurm_standins.install(tmp_path)
    path = slurm_standins.path_with(bin_dir)
    printed = reproduce(reproduction_home, cwd, "--launcher", "slurm", "--submit", PATH=path).stdout
    for task in BENCHMARK_TASKS[:-1]:
        assert f"{task}: export {export_of(task)} exists, skipped" in printed
    assert "dtd: array element 0, resuming from outputs/train/dtd/checkpoints/last.ckpt" in printed
    (array_args, array), (merge_args, merge) = slurm_standins.submissions(record)
    assert "#SBATCH --array=0-0\n" in array and merge_args[0] == "--dependency=afterok:1234"

    def element(script: str, name: str) -> subprocess.CompletedProcess:
        (tmp_path / name).write_text(script)
        return subprocess.run(
            ["bash", str(tmp_path / name)], cwd=cwd, capture_output=True, text=True, timeout=1200,
            env=hf_home.env(reproduction_home, PATH=path, SLURM_ARRAY_TASK_ID="0", SRUN_STANDIN_RUN="1"),
        )  # fmt: skip

    resumed = element(array, "fine-tune.sbatch")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.splitlines() == [
        "dtd: fine-tuning, resuming from outputs/train/dtd/checkpoints/last.ckpt (log: outputs/reproduce/logs/dtd.log)",
        f"dtd: exported {export_of('dtd')}",
    ]
    log = (cwd / "outputs" / "reproduce" / "logs" / "dtd.log").read_text()
    assert re.search(r"Restor\w+ .*checkpoint", log), log[-2000:]
    again = element(array, "fine-tune.sbatch")  # a requeued element finds the export
    assert again.returncode == 0 and again.stdout == f"dtd: export {export_of('dtd')} exists, skipped\n"

    merged = element(merge, "merge.sbatch")
    assert merged.returncode == 0, merged.stdout[-3000:] + merged.stderr[-3000:]
    compare = cwd / "outputs" / "reproduce" / "compare" / "convnext-base-224_8-tasks"
    content = report(compare)
    assert_compared(content, "compare.yaml", BENCHMARK_TASKS)
    pool = yaml.safe_load((cwd / "outputs" / "reproduce" / "configs" / "pools" / "convnext-base-224_8-tasks.yaml").read_text())
    assert content["models"] == pool["models"] == {"_pretrained_": "facebook/convnext-base-224",
                                                   **{task: str(export_of(task)) for task in BENCHMARK_TASKS}}  # fmt: skip
    assert json.loads((cwd / "outputs" / "reproduce" / "adamerging" / "coefficients.json").read_text())["tasks"] == list(
        BENCHMARK_TASKS
    )
    assert merged.stdout.splitlines()[-1] == "done: outputs/reproduce/compare/convnext-base-224_8-tasks/report.md"
    assert "| individual |" in merged.stdout


@TALL20_TIMEOUT
def test_an_interrupted_task_resumes_and_a_finished_one_is_skipped(tall20: tuple[Path, str], reproduction_home: Path) -> None:
    """Two tasks, as a comma-separated list, in TALL20's directory: eurosat's export is gone, its
    last checkpoint (step 1) is there. It resumes from that checkpoint; dtd is skipped. With
    ``--fine-tune-only`` nothing is merged (the local launcher's merges ran in the TALL20 run)."""
    cwd, _ = tall20
    shutil.rmtree(cwd / export_of("eurosat"))
    again = reproduce(reproduction_home, cwd, "--tasks", "eurosat,dtd", "--output-dir", "outputs/second", "--fine-tune-only")
    assert "eurosat: fine-tuning on GPU 0 resuming from outputs/train/eurosat/checkpoints/last.ckpt" in again.stdout
    assert f"dtd: export {export_of('dtd')} exists, skipped" in again.stdout
    log = (cwd / "outputs" / "second" / "logs" / "eurosat.log").read_text()
    assert re.search(r"Restor\w+ .*checkpoint", log), log[-2000:]
    assert (cwd / export_of("eurosat") / "config.json").is_file()
    assert again.stdout.splitlines()[-1].endswith("fine-tunes done (2 tasks); --fine-tune-only: no merges")
    assert not (cwd / "outputs" / "second" / "configs").exists() and not (cwd / "outputs" / "second" / "compare").exists()


def test_make_reproduce_runs_the_documented_command() -> None:
    dry_run = subprocess.run(
        ["make", "-n", "-C", str(REPO_ROOT), "reproduce", "GPUS=8", "TRAIN_ARGS=--trainer.precision=bf16-mixed"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert '-m lightning_modules.reproduce --tasks ta8 --gpus 8 --train-args "--trainer.precision=bf16-mixed"' in dry_run.stdout
