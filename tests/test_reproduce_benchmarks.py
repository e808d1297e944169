"""The benchmarks as named task sets, defined once (``datamodules.tasks.BENCHMARKS``) and used by
the merge configs, their pools and the reproduction command: every config lists exactly its
benchmark's tasks in order, the 14- and 20-task ones have the eight-task ones' settings, their
pools name the exports the reproduction writes, and ``--tasks`` reads benchmark and task names.
(The runs themselves are rehearsed by ``tests/test_reproduction.py``.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import test_bad_input
from conftest import REPO_ROOT
from datamodules.tasks import BENCHMARKS, get_task
from lightning_modules import reproduce
from test_bad_input import one_error_line

MERGE_CONFIGS = REPO_ROOT / "configs" / "merge"
workdir = test_bad_input.workdir


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def pool_of(config: Path) -> Path:
    return config.parent / load(config)["model"]["init_args"]["models"]


def benchmark_pools() -> dict[str, Path]:
    """Each benchmark's pool file, as its reproduction's merge configs name it (both the same one)."""
    pools = {}
    for benchmark, names in reproduce.BENCHMARK_MERGES.items():
        (pool,) = {pool_of(MERGE_CONFIGS / name) for name in names}
        pools[benchmark] = pool
    return pools


def test_every_benchmark_has_its_merges_and_every_merge_config_its_benchmark() -> None:
    assert list(reproduce.BENCHMARK_MERGES) == list(BENCHMARKS)
    pools = benchmark_pools()
    assert len(set(pools.values())) == len(pools), "one pool file per benchmark"
    for config in sorted(MERGE_CONFIGS.glob("*.yaml")):
        benchmark = next((name for name, pool in pools.items() if pool == pool_of(config)), None)
        assert benchmark is not None, f"{config.name} names a pool of no benchmark"
        assert load(config)["data"]["tasks"] == list(BENCHMARKS[benchmark]), config.name


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_each_benchmark_pool_lists_exactly_its_tasks_in_order(benchmark: str) -> None:
    models = load(benchmark_pools()[benchmark])["models"]
    assert list(models)[0] == "_pretrained_" and models["_pretrained_"] == "facebook/convnext-base-224"
    assert [get_task(name).name for name in list(models)[1:]] == list(BENCHMARKS[benchmark])
    assert all(name == get_task(name).hub_name for name in list(models)[1:]), "FusionBench's spelling, as ta8's pool"


@pytest.mark.parametrize("benchmark", ["tall14", "tall20"])
def test_the_larger_pools_name_the_exports_the_reproduction_writes(benchmark: str, monkeypatch) -> None:
    # FusionBench publishes no 14- or 20-task ConvNeXt checkpoints: these pools are the
    # reproduction's exports, with the recipe of configs/train/, from the directory it ran in.
    monkeypatch.chdir(REPO_ROOT)
    models = load(benchmark_pools()[benchmark])["models"]
    for task in BENCHMARKS[benchmark]:
        plan = reproduce.plan_fine_tune(task, [])
        entry = models[get_task(task).hub_name]
        assert entry.startswith("./"), "a path, never read as a hub id"
        assert Path(entry) == plan.export and plan.base_model == models["_pretrained_"], task


def settings(config: dict[str, Any], benchmark: str) -> dict[str, Any]:
    """A merge config without what names its benchmark: its tasks, pool, and the benchmark's name in
    output folders and run names (``outputs/adamerging_tall14``, ``merge-8-tasks``)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items()}
        if isinstance(value, list):
            return [strip(item) for item in value]
        if isinstance(value, str):
            return value.replace(f"_{benchmark}", "").replace(f"-{benchmark}", "")
        return value

    stripped = strip(config)
    stripped["data"].pop("tasks")
    stripped["model"]["init_args"].pop("models")
    return stripped


@pytest.mark.parametrize("benchmark", ["tall14", "tall20"])
@pytest.mark.parametrize(("eight", "larger"), [("adamerging", "adamerging_{}"), ("compare", "compare_{}"),
                                               ("convnext-base-224_8-tasks", "convnext-base-224_{}")])  # fmt: skip
def test_the_larger_merge_configs_have_the_eight_task_settings(benchmark: str, eight: str, larger: str) -> None:
    base = load(MERGE_CONFIGS / f"{eight}.yaml")
    config = load(MERGE_CONFIGS / f"{larger.format(benchmark)}.yaml")
    assert settings(config, benchmark) == settings(base, "8-tasks")


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_the_comparison_reads_the_coefficients_its_adamerging_writes(benchmark: str) -> None:
    adamerging, compare = (load(MERGE_CONFIGS / name) for name in reproduce.BENCHMARK_MERGES[benchmark])
    learned = [m for m in compare["model"]["init_args"]["methods"] if m["class_path"].endswith("LearnedCoefficients")]
    assert [m["init_args"]["coefficients"] for m in learned] == [
        f"{adamerging['model']['init_args']['output_dir']}/coefficients.json"
    ]


@pytest.mark.parametrize(
    ("given", "tasks", "benchmark"),
    [
        (["tall20"], BENCHMARKS["tall20"], "tall20"),
        (["TALL14"], BENCHMARKS["tall14"], "tall14"),
        (["ta8"], BENCHMARKS["ta8"], "ta8"),
        (["sun397,dtd"], ("sun397", "dtd"), "ta8"),
        (["dtd", "Stanford-Cars"], ("dtd", "stanford_cars"), "ta8"),
        (["dtd,", "pcam"], ("dtd", "pcam"), "tall14"),  # the smallest benchmark that holds them all
        (["ta8", "rendered_sst2"], (*BENCHMARKS["ta8"], "rendered_sst2"), "tall20"),
    ],
)  # fmt: skip
def test_tasks_are_benchmarks_and_task_names(given: list[str], tasks: tuple[str, ...], benchmark: str) -> None:
    assert reproduce.selected_tasks(given) == (list(tasks), benchmark)


CHOICES = f"a benchmark (ta8, tall14, tall20) or tasks of tall20: {', '.join(BENCHMARKS['tall20'])}"
MISTAKES = {
    "a misspelt benchmark": (["--tasks", "tall21"], f"--tasks: unknown task 'tall21'; did you mean 'tall20'? ({CHOICES})"),
    "a task of no benchmark": (
        ["--tasks", "emnist_mnist"],
        "--tasks: 'emnist_mnist' is in no benchmark, so no merge config lists it; fine-tune it alone with "
        f"python train.py fit --config configs/train/emnist_mnist.yaml ({CHOICES})",
    ),
    "a task twice, once in a benchmark": (["--tasks", "ta8,dtd"], "--tasks: dtd is given twice"),
    "only commas": (["--tasks", ","], f"--tasks names no task ({CHOICES})"),
}  # fmt: skip


@pytest.mark.parametrize("case", MISTAKES)
def test_a_task_set_mistake_is_one_error_line(case: str, workdir: Path, capsys) -> None:
    args, expected = MISTAKES[case]
    assert one_error_line(reproduce.main, args, capsys) == f"error: {expected}"
    assert not list(workdir.iterdir())


def test_the_merge_configs_are_written_with_this_runs_pool_under_the_repositorys_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    plans = [reproduce.plan_fine_tune(task, ["--trainer.max_steps=3"]) for task in ("dtd", "pcam")]
    steps = reproduce.merge_steps("tall14", Path("out"))
    reproduce.write_merge_configs(steps, plans, Path("out"))
    assert [(step.subcommand, step.config) for step in steps] == [
        ("fit", Path("out/configs/adamerging_tall14.yaml")), ("test", Path("out/configs/compare_tall14.yaml")),
    ]  # fmt: skip
    for step, name in zip(steps, reproduce.BENCHMARK_MERGES["tall14"]):
        written, original = load(step.config), load(MERGE_CONFIGS / name)
        assert written["model"]["init_args"]["models"] == original["model"]["init_args"]["models"]
        assert written["data"]["tasks"] == ["dtd", "pcam"]
        assert written["trainer"]["default_root_dir"] == "out/" + original["trainer"]["default_root_dir"].removeprefix("outputs/")
    pool = load(pool_of(steps[0].config))["models"]
    assert pool == {
        "_pretrained_": "facebook/convnext-base-224",
        "dtd": "exports/convnext-base-224_dtd_sgd_batch-size-64_lr-0.01_steps-3",
        "pcam": "exports/convnext-base-224_pcam_sgd_batch-size-64_lr-0.01_steps-3",
    }


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ([], "--tasks ta8 --gpus 1"),
        (["TASKS=tall20", "GPUS=8"], "--tasks tall20 --gpus 8"),
        (["TASKS=sun397,dtd"], "--tasks sun397,dtd --gpus 1"),
    ],
)  # fmt: skip
def test_make_reproduce_names_the_benchmark(variables: list[str], expected: str) -> None:
    dry_run = subprocess.run(
        ["make", "-n", "-C", str(REPO_ROOT), "reproduce", *variables], capture_output=True, text=True, check=True
    )
    assert f"-m lightning_modules.reproduce {expected} --train-args" in dry_run.stdout
