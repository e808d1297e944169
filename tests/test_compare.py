"""``merge.py test`` with ``MethodComparison``: every method on the quickstart tasks in one pass.

The quickstart example config (``configs/quickstart/compare.yaml``) runs as it is, with only
its paths pointed at a tiny pool built here (``merge_fixtures``) and a learned-coefficients
file written here; the data are the built-in ``digits`` and ``mnist5k`` test splits (no
network). Every row of the comparison must equal a separate single-method
``MergedClassifier`` run on the same data: sharing one pass changes no number.
"""

from __future__ import annotations

import csv
import importlib
import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

import merge_fixtures as mf
from common.names import task_abbreviation
from datamodules import MultiTaskDataModule
from lightning_modules.comparison import MethodComparison, expand_grid
from lightning_modules.merged import MergedClassifier
from merge import main
from merging.coefficients import write_coefficients
from merging.engine import merge_backbone
from merging.errors import MergeError
from merging.methods import SimpleAverage, TaskArithmetic
from merging.pool import ModelPool, read_pool_file
from tolerances import assert_within, linear_merge_bound, rounded_once

pytestmark = pytest.mark.usefixtures("quiet_cli", "one_thread")

TASKS = ("digits", "mnist5k")
CONFIG = mf.REPO_ROOT / "configs" / "quickstart" / "compare.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("compare")
    models = mf.make_pool(root / "models", TASKS, seed=5)
    keys = [key for key in mf.load_state(models[mf.PRETRAINED]) if key.startswith("convnext.")]
    values = torch.rand(len(TASKS), len(keys), generator=torch.Generator().manual_seed(3))
    write_coefficients(root / "coefficients.json", values, TASKS, keys, "layer")
    return {**models, "coefficients": str(root / "coefficients.json")}


def example_config(pool: dict[str, str], out: Path) -> dict:
    """``compare.yaml`` with its ``outputs/quickstart`` paths replaced by this test's."""
    config = yaml.safe_load(CONFIG.read_text())
    init = config["model"]["init_args"]
    assert init["models"] == "pools/quickstart.yaml" and set(read_pool_file(str(CONFIG))) == {mf.PRETRAINED, *TASKS}
    init["models"] = {name: pool[name] for name in (mf.PRETRAINED, *TASKS)}
    init["report_dir"] = str(out / "report")
    for method in init["methods"]:
        if method["class_path"].endswith("LearnedCoefficients"):
            method["init_args"]["coefficients"] = pool["coefficients"]
    config["data"]["processor"] = pool[mf.PRETRAINED]
    config["trainer"]["default_root_dir"] = str(out / "root")
    return config


def run(config: dict, out: Path) -> None:
    path = out / "compare.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    main(["test", "--config", str(path), "--trainer.logger", "false", *mf.QUIET])


def instantiate(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def single_method_report(method, data: MultiTaskDataModule, out: Path, models: dict, individual: bool) -> dict:
    model = MergedClassifier(
        data.task_names, data.classnames, models, method, evaluate_individual=individual, report_dir=str(out), splits=data.splits
    )
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, use_distributed_sampler=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.test(model, datamodule=data, verbose=False)
    return model.report


def table(path: Path) -> list[list[str]]:
    """The rows (header first) of the first Markdown table in ``report.md`` (the test table)."""
    text = path.read_text()
    start = text.index("\n| ")
    lines = list(itertools.takewhile(lambda line: line.startswith("|"), text[start + 1 :].splitlines()))
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [row for row in rows if set(row) != {"---"}]


def test_the_quickstart_comparison_equals_separate_runs(pool, tmp_path):
    config = example_config(pool, tmp_path / "compare")
    run(config, tmp_path / "compare")
    report_dir = tmp_path / "compare" / "report"
    assert sorted(p.name for p in report_dir.iterdir()) == mf.REPORT_FILES
    assert (report_dir / "accuracy.png").read_bytes()[:8] == PNG
    assert (report_dir / "accuracy_heatmap.png").read_bytes()[:8] == PNG
    report = json.loads((report_dir / "report.json").read_text())

    specs = config["model"]["init_args"]["methods"]
    groups = expand_grid([instantiate(spec) for spec in specs], config["model"]["init_args"]["grid"])
    methods = [method for group in groups for method in group]
    labels = [method.describe() for method in methods]
    assert len(set(labels)) == len(methods) > len(specs) >= 8
    assert list(report["rows"]) == [*labels, "individual"]
    assert [m["label"] for m in report["methods"]] == labels

    # One row per method plus `individual`, with the average and the normalised average.
    # The Markdown table names the tasks by their abbreviations (the quickstart's have none), the CSV
    # by their own names; the cells are the same.
    header, *rows = table(report_dir / "report.md")
    assert header == ["model", *(task_abbreviation(task) for task in TASKS), "average", "normalized average"]
    assert [row[0] for row in rows] == [*labels, "individual"]
    with open(report_dir / "report.csv", newline="") as file:
        assert list(csv.reader(file)) == [["model", *TASKS, "average", "normalized average"], *rows]
    for row in rows:
        values = report["rows"][row[0]]
        expected = [f"{100 * values['tasks'][t]['accuracy']:.2f}" for t in TASKS] + [f"{100 * values['average_accuracy']:.2f}"]
        normalized = values.get("average_normalized_accuracy")
        assert row[1:] == expected + [f"{100 * normalized:.2f}" if normalized is not None else ""]
    individual = report["rows"]["individual"]
    for label in labels:
        for task in TASKS:
            got = report["rows"][label]["tasks"][task]
            assert got["normalized_accuracy"] == pytest.approx(got["accuracy"] / individual["tasks"][task]["accuracy"])
    # Distinct models, except that with two tasks the simple average is task arithmetic at 0.5:
    # an identity of the weights, checked there (the two merges are float32 evaluations of one
    # formula, within the linear-merge bound; their rows are forwards of weights that differ by
    # that rounding, which the network may amplify by an amount no bound here knows).
    # (Per task: a grid along one factor can meet the same average loss on both sides of its best.)
    model_pool = ModelPool(config["model"]["init_args"]["models"])
    average = merge_backbone(model_pool, SimpleAverage(), progress=False)
    half = merge_backbone(model_pool, TaskArithmetic(0.5), progress=False)
    pretrained = mf.backbone(mf.load_state(pool[mf.PRETRAINED]))
    finetuned = [mf.backbone(mf.load_state(pool[task])) for task in TASKS]
    for key, theta0 in pretrained.items():
        bound = linear_merge_bound(theta0, [model[key] - theta0 for model in finetuned], 0.5) + rounded_once(average[key])
        assert_within(average[key], half[key], bound, key)
    losses = {label: [report["rows"][label]["tasks"][task]["loss"] for task in TASKS] for label in labels}
    del losses["simple_average"]
    values = list(losses.values())
    assert all(max(abs(x - y) for x, y in zip(a, b)) > 1e-3 for i, a in enumerate(values) for b in values[i + 1 :])

    # Each method alone, on the same data (one DataModule, the config's batch size; the gram
    # split only for the methods that merge from it): the same numbers, on both splits. The
    # first and last grid point of every method.
    assert any(method.needs_grams for method in methods), "RegMean is compared too"
    data = MultiTaskDataModule(**config["data"])
    without_grams = MultiTaskDataModule(**{**config["data"], "gram_images": None})
    models = config["model"]["init_args"]["models"]
    checked = sorted(
        {labels.index(group[0].describe()) for group in groups} | {labels.index(group[-1].describe()) for group in groups}
    )
    for index in checked:
        method_data = data if methods[index].needs_grams else without_grams
        single = single_method_report(methods[index], method_data, tmp_path / f"single{index}", models, individual=index == 0)
        names = [labels[index], "individual"] if index == 0 else [labels[index]]
        assert list(single["rows"]) == names
        for split, got_rows, expected_rows in [
            ("test", report["rows"], single["rows"]),
            ("validation", report["validation"]["rows"], single["validation"]["rows"]),
        ]:
            for name in names:
                for task in TASKS:
                    got, expected = got_rows[name]["tasks"][task], expected_rows[name]["tasks"][task]
                    count = len(data.evaluation_datasets[split][task])
                    assert got["num_samples"] == expected["num_samples"] == count, (split, name, task)
                    # The same weights (one merge code), batches and kernels: the same bits, on any CPU.
                    assert got["accuracy"] == expected["accuracy"], (split, name, task)
                    assert got["loss"] == expected["loss"], (split, name, task)

    # Each method's grid point chosen on the validation averages, beside the best on test.
    def average(rows: dict, label: str) -> float:
        return sum(rows[label]["tasks"][task]["accuracy"] for task in TASKS) / len(TASKS)

    grids = [group for group in groups if len(group) > 1]
    assert [entry["method"] for entry in report["selection"]] == [group[0].name for group in grids]
    for entry, group in zip(report["selection"], grids):
        points = [method.describe() for method in group]
        chosen = max(points, key=lambda label: average(report["validation"]["rows"], label))
        best = max(points, key=lambda label: average(report["rows"], label))
        assert (entry["chosen_on_validation"], entry["best_on_test"], entry["grid_points"]) == (chosen, best, len(points))
        assert entry["test_accuracy"] == pytest.approx(average(report["rows"], chosen))
        assert entry["best_test_accuracy"] == pytest.approx(average(report["rows"], best))
        assert entry["best_test_accuracy"] >= entry["test_accuracy"]
        line = f"| {entry['method']} ({len(points)} points) | {chosen} | {100 * entry['validation_accuracy']:.2f} | "
        assert line in (report_dir / "report.md").read_text()


@pytest.mark.parametrize("case", ["duplicate", "duplicate label", "empty"])
def test_duplicate_or_no_methods_are_one_error_line(pool, tmp_path, capsys, case):
    config = example_config(pool, tmp_path)
    methods = config["model"]["init_args"]["methods"]
    if case == "duplicate":
        methods.append({"class_path": "merging.TaskArithmetic", "init_args": {"scaling_factor": 0.5}})
        fragments = ["listed twice", "task_arithmetic(scaling_factor=0.5)"]
    elif case == "duplicate label":
        methods.append({"class_path": "merging.LearnedCoefficients",
                        "init_args": {"coefficients": pool["coefficients"], "label": "simple_average"}})  # fmt: skip
        fragments = ["listed twice", "simple_average"]
    else:
        methods.clear()
        fragments = ["no methods to compare"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(config, tmp_path)
    assert exit_info.value.code not in (0, None)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert all(fragment in errors[0] for fragment in fragments), errors[0]
    assert not (tmp_path / "report").exists()


def test_method_comparison_refuses_duplicates_and_nothing_directly(pool):
    models = {name: pool[name] for name in (mf.PRETRAINED, *TASKS)}
    classnames = {task: [str(i) for i in range(10)] for task in TASKS}
    with pytest.raises(MergeError, match="no methods"):
        MethodComparison(list(TASKS), classnames, models, [])
    with pytest.raises(MergeError, match=r"listed twice: task_arithmetic\(scaling_factor=0.3\)"):
        MethodComparison(list(TASKS), classnames, models, [TaskArithmetic(0.3), TaskArithmetic(0.3)])


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("no validation split", ["grid is chosen on a validation split", "data.val_fraction"]),
        ("method not listed", ["grid for method(s) not in model.methods: Unlisted"]),
        ("unknown hyper-parameter", ["TiesMerging has no hyper-parameter scale", "top_k, scaling_factor"]),
    ],
)
def test_bad_grid_is_one_error_line(pool, tmp_path, capsys, case, fragments):
    config = example_config(pool, tmp_path)
    grid = config["model"]["init_args"]["grid"]
    if case == "no validation split":
        del config["data"]["val_fraction"]
    elif case == "method not listed":
        grid["Unlisted"] = {"scaling_factor": [0.1]}
    else:
        grid["TiesMerging"] = {"scale": [0.1]}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(config, tmp_path)
    assert exit_info.value.code not in (0, None)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(fragment in errors[0] for fragment in fragments), errors
    assert not (tmp_path / "report").exists()


def test_the_sample_count_is_checked_on_the_loaders_trainer_test_gets(pool, tmp_path):
    """No data module: ``Trainer.test`` gets the loaders themselves. The same loaders give
    the data module's numbers; one that reads a sample twice is refused, naming the task."""
    config = example_config(pool, tmp_path / "compare")
    data = MultiTaskDataModule(**{**config["data"], "gram_images": None, "val_fraction": None})
    models = config["model"]["init_args"]["models"]
    expected = single_method_report(TaskArithmetic(0.3), data, tmp_path / "with_data", models, individual=False)
    data.setup("test")
    loaders = data.test_dataloader()
    trainer = dict(accelerator="cpu", devices=1, logger=False, use_distributed_sampler=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip

    def model(out: str) -> MergedClassifier:
        return MergedClassifier(data.task_names, data.classnames, models, TaskArithmetic(0.3), report_dir=str(tmp_path / out))

    same = model("loaders")
    Trainer(**trainer).test(same, dataloaders=loaders, verbose=False)
    assert same.report["rows"] == expected["rows"]

    first = loaders[0]
    repeats = torch.utils.data.DataLoader(
        first.dataset, batch_size=first.batch_size, sampler=[0, *range(len(first.dataset))], collate_fn=first.collate_fn
    )
    with pytest.raises(
        RuntimeError,
        match=rf"on {data.task_names[0]}: {len(first.dataset) + 1} samples evaluated, its test split has {len(first.dataset)}",
    ):
        Trainer(**trainer).test(model("repeats"), dataloaders=[repeats, *loaders[1:]], verbose=False)
