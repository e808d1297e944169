"""The reference merge configs and the README's Python examples, rehearsed unchanged on the public
ids: the pretrained model, the eight public fine-tunes and the eight datasets, as tiny stand-ins
under their real ids (``tests/hf_home.py``), every command in a subprocess with ``HF_HOME`` pointed
there and ``HF_HUB_OFFLINE=1``. (The reproduction, which fine-tunes its own pool, is
``tests/test_reproduction.py``.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rehearsal import MERGE, MERGE_ARGS, SIZES, assert_full_report, report, run

import hf_home
from conftest import REPO_ROOT
from datamodules.tasks import BENCHMARK_TASKS, get_task


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models (the pretrained one and the eight public fine-tunes) and the eight datasets under their real ids."""
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


def test_merge_configs_rehearsed_on_the_public_ids(home: Path, tmp_path: Path) -> None:
    merge_configs = REPO_ROOT / "configs" / "merge"
    run([MERGE, "test", "--config", str(merge_configs / "convnext-base-224_8-tasks.yaml"), *MERGE_ARGS], home, tmp_path)
    assert_full_report(report(tmp_path / "outputs" / "merge" / "convnext-base-224_8-tasks"), {"simple_average"})

    run([MERGE, "test", "--config", str(merge_configs / "regmean.yaml"), *MERGE_ARGS], home, tmp_path)
    content = report(tmp_path / "outputs" / "merge" / "regmean")
    assert_full_report(content, {"regmean(reduce_non_diagonal_ratio=0.95)"})
    assert content["gram_images"] == {get_task(task).name: SIZES["train"] for task in BENCHMARK_TASKS}  # fewer than 256

    # adamerging.yaml (merge.py fit) and compare.yaml, which reads its coefficients, run unchanged but for
    # their pool in the reproduction's merge job above (the eight tasks as SLURM jobs), on the same settings.


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
