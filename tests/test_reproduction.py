"""The reference configs, rehearsed unchanged against a Hugging Face home of tiny stand-ins.

``tests/hf_home.py`` files tiny models and datasets under the real hub ids; every command runs
as a user runs it, in a subprocess with ``HF_HOME`` pointed there and ``HF_HUB_OFFLINE=1``.
Only steps, intervals, workers and the accelerator are overridden (outputs land in the
working directory, a temporary folder), never a model id or a data path. The loop closes:
the eight exports ``train.py`` writes become the pool that ``merge.py`` merges and evaluates.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hf_home
from conftest import REPO_ROOT
from datamodules.tasks import BENCHMARK_TASKS, get_task
from lightning_modules.export import export_name

SIZES = {"train": 64, "test": 8}
TRAIN_ARGS = [
    "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.callbacks.every_n_train_steps=2",
    "--data.num_workers=0", "--trainer.accelerator=cpu",
]  # fmt: skip
MERGE = str(REPO_ROOT / "merge.py")
MERGE_ARGS = ["--trainer.max_steps=2", "--data.num_workers=0", "--trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models and datasets under their real ids."""
    root = tmp_path_factory.mktemp("hf")
    hf_home.add_models(root / "home")
    hf_home.add_datasets(root / "home", root / "scratch", SIZES)
    return root / "home"


@pytest.fixture(scope="module")
def models_only_home(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same models, and no dataset anywhere."""
    bare = tmp_path_factory.mktemp("hf-models-only")
    (bare / "hub").symlink_to(home / "hub")
    return bare


def run(command: list[str], home: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *command], cwd=cwd, env=hf_home.env(home), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def report(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())


def assert_full_report(content: dict, rows: set[str], tasks=BENCHMARK_TASKS) -> None:
    assert set(content["rows"]) == rows
    for row in content["rows"].values():
        assert list(row["tasks"]) == list(tasks)
        assert all(values["num_samples"] == SIZES["test"] for values in row["tasks"].values())
    assert "partial" not in content


def reproduce(home: Path, cwd: Path, *options: str) -> subprocess.CompletedProcess:
    return run(
        ["-m", "lightning_modules.reproduce", *options,
         "--train-args", " ".join(TRAIN_ARGS), "--merge-args", " ".join(MERGE_ARGS)],
        home, cwd, timeout=1200,
    )  # fmt: skip


def test_reproduce_fine_tunes_the_eight_configs_and_merges_their_exports(home: Path, tmp_path: Path) -> None:
    printed = reproduce(home, tmp_path, "--gpus", "2").stdout
    pool = yaml.safe_load((tmp_path / "outputs" / "reproduce" / "pool.yaml").read_text())["models"]
    assert pool["_pretrained_"] == "facebook/convnext-base-224"
    for task in BENCHMARK_TASKS:
        info = get_task(task)
        export = tmp_path / "exports" / export_name("facebook/convnext-base-224", info.hub_name, 64, 0.01, 2)
        assert pool[task] == str(export.relative_to(tmp_path)), "the pool is what train.py exported"
        config = json.loads((export / "config.json").read_text())
        assert config["id2label"] == {str(i): name for i, name in enumerate(info.classnames)}
        card = (export / "README.md").read_text()
        for row in (
            "| training split | train (every row) |",
            "| training images | 64 |",
            "| validation split | test |",
            "| steps | 2 |",
        ):
            assert row in card, (task, row)
        assert (export / "preprocessor_config.json").is_file()
        assert f"{task}: exported" in printed
    compare = tmp_path / "outputs" / "reproduce" / "compare" / "convnext-base-224_8-tasks"
    methods = yaml.safe_load((REPO_ROOT / "configs" / "merge" / "compare.yaml").read_text())["model"]["init_args"]["methods"]
    content = report(compare)
    assert_full_report(content, {entry["label"] for entry in content["methods"]} | {"individual"})
    assert len(content["methods"]) > len(methods), "every grid point is a row"
    assert {entry["method"] for entry in content["selection"]} >= {"task_arithmetic", "ties"}
    assert all(
        row["tasks"]["dtd"]["num_samples"] == round(0.1 * SIZES["train"]) for row in content["validation"]["rows"].values()
    )
    assert content["models"] == pool
    assert (tmp_path / "outputs" / "reproduce" / "adamerging" / "coefficients.json").is_file()
    assert "| individual |" in printed

    # Interrupted: one task's export is not there, its last checkpoint (step 2) is. It resumes
    # from that checkpoint; the finished task is skipped.
    shutil.rmtree(tmp_path / "exports" / export_name("facebook/convnext-base-224", "dtd", 64, 0.01, 2))
    again = reproduce(home, tmp_path, "--tasks", "dtd", "eurosat", "--output-dir", "outputs/second")
    assert "dtd: fine-tuning on GPU 0 resuming from outputs/train/dtd/checkpoints/last.ckpt" in again.stdout
    assert "eurosat: export" in again.stdout and "skipped" in again.stdout
    log = (tmp_path / "outputs" / "second" / "logs" / "dtd.log").read_text()
    assert re.search(r"Restor\w+ .*checkpoint", log), log[-2000:]
    assert_full_report(
        report(tmp_path / "outputs" / "second" / "compare" / "convnext-base-224_8-tasks"),
        {entry["label"] for entry in content["methods"]} | {"individual"},
        tasks=("dtd", "eurosat"),
    )


def test_make_reproduce_runs_the_documented_command() -> None:
    dry_run = subprocess.run(
        ["make", "-n", "-C", str(REPO_ROOT), "reproduce", "GPUS=8", "TRAIN_ARGS=--trainer.precision=bf16-mixed"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert '-m lightning_modules.reproduce --gpus 8 --train-args "--trainer.precision=bf16-mixed"' in dry_run.stdout


def test_merge_configs_rehearsed_on_the_public_ids(home: Path, tmp_path: Path) -> None:
    merge_configs = REPO_ROOT / "configs" / "merge"
    run([MERGE, "test", "--config", str(merge_configs / "convnext-base-224_8-tasks.yaml"), *MERGE_ARGS], home, tmp_path)
    assert_full_report(report(tmp_path / "outputs" / "merge" / "convnext-base-224_8-tasks"), {"simple_average"})

    run([MERGE, "test", "--config", str(merge_configs / "regmean.yaml"), *MERGE_ARGS], home, tmp_path)
    content = report(tmp_path / "outputs" / "merge" / "regmean")
    assert_full_report(content, {"regmean(reduce_non_diagonal_ratio=0.95)"})
    assert content["gram_images"] == {get_task(task).name: SIZES["train"] for task in BENCHMARK_TASKS}  # fewer than 256

    run([MERGE, "fit", "--config", str(merge_configs / "adamerging.yaml"), *MERGE_ARGS], home, tmp_path)
    coefficients = tmp_path / "outputs" / "adamerging" / "coefficients.json"
    assert json.loads(coefficients.read_text())["tasks"] == [get_task(task).name for task in BENCHMARK_TASKS]
    run(
        [MERGE, "test", "--config", str(merge_configs / "adamerging.yaml"), f"--model.coefficients={coefficients}", *MERGE_ARGS],
        home, tmp_path,
    )  # fmt: skip
    assert_full_report(report(tmp_path / "outputs" / "adamerging" / "report"), {"adamerging(layer-wise)"})

    run([MERGE, "test", "--config", str(merge_configs / "compare.yaml"), *MERGE_ARGS], home, tmp_path)
    content = report(tmp_path / "outputs" / "compare" / "convnext-base-224_8-tasks")
    assert_full_report(content, {entry["label"] for entry in content["methods"]} | {"individual"})
    assert {entry["name"] for entry in content["methods"]} >= {"regmean"}
    # The Gram pass reads the train rows outside the 10% held out for validation.
    assert content["gram_images"] == {
        get_task(task).name: SIZES["train"] - round(0.1 * SIZES["train"]) for task in BENCHMARK_TASKS
    }


def test_merge_and_save_needs_no_data(home: Path, models_only_home: Path, tmp_path: Path) -> None:
    """The README's merge-and-save command with no dataset anywhere; then a second command,
    with the data, evaluates the saved merge."""
    config = str(REPO_ROOT / "configs" / "merge" / "convnext-base-224_8-tasks.yaml")
    saved = tmp_path / "merged" / "ta"
    run(
        [MERGE, "test", "--config", config, f"--model.save_dir={saved}", "--model.method=TaskArithmetic",
         "--model.method.scaling_factor=0.3", "--trainer.limit_test_batches=0", "--trainer.accelerator=cpu"],
        models_only_home, tmp_path,
    )  # fmt: skip
    assert (saved / "model.safetensors").is_file() and json.loads((saved / "merge.json").read_text())[
        "method_name"
    ] == "task_arithmetic"
    assert not (models_only_home / "datasets").exists() or not any((models_only_home / "datasets").iterdir())
    assert not (tmp_path / "outputs" / "merge" / "convnext-base-224_8-tasks" / "report.json").exists()

    run([MERGE, "test", "--config", config, f"--model.merged_model={saved}", *MERGE_ARGS], home, tmp_path)
    content = report(tmp_path / "outputs" / "merge" / "convnext-base-224_8-tasks")
    assert_full_report(content, {"task_arithmetic(scaling_factor=0.3)"})
    assert content["merged_model"] == str(saved)


def readme_python_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def is_fusionbench(block: str) -> bool:
    """A block written the way FusionBench is called, shown beside this project's equivalent; not run."""
    return block.startswith("# FusionBench")


def test_readme_python_examples_run(home: Path, tmp_path: Path) -> None:
    """Every Python block of the README but FusionBench's, one script, in a working directory where
    the README's relative paths (``configs/...``) resolve and its outputs land."""
    blocks = readme_python_blocks()
    fusionbench = [block for block in blocks if is_fusionbench(block)]
    ours = [block for block in blocks if not is_fusionbench(block)]
    assert ours, "the README has Python examples"
    # FusionBench's example is shown, its steps each with their equivalent in the block after it.
    (theirs,) = fusionbench
    equivalent = blocks[blocks.index(theirs) + 1]
    assert equivalent.startswith("# convnext-fusion")
    for call in ("load_model(", "load_processor()", "SwitchModule(", "evaluate("):
        assert call in theirs and call in equivalent, call
    assert "fusion_bench" not in "\n".join(ours)
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs")
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(ours))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=hf_home.env(home), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # What the convnext-fusion block wrote: the report of the simple average on the eight tasks (its
    # average, printed by the evaluation of FusionBench's route, is the same), and DTD's classifier
    # with the merged backbone.
    report = json.loads((tmp_path / "outputs" / "python" / "simple-average" / "report.json").read_text())
    assert_full_report(report, {"merged"})
    assert f"{100 * report['rows']['merged']['average_accuracy']:.2f}" in result.stdout
    config = json.loads((tmp_path / "outputs" / "python" / "dtd" / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(get_task("dtd").classnames)}
    assert (tmp_path / "outputs" / "python" / "dtd" / "preprocessor_config.json").is_file()
