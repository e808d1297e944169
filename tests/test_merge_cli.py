"""``merge.py test`` end to end, in-process, offline on CPU.

The report must agree with an independent evaluation: the merged backbone computed here with
the method's formula from the fully loaded checkpoints, put into a plain
``ConvNextForImageClassification`` with the task's own head, run over the test images with the
project's preprocessing. Saving and re-evaluating a merged model, and every kind of bad input
(one ``error:`` line, non-zero exit, nothing half-written), are checked too.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import merge_fixtures as mf
import train_cli_callbacks
from merge import main
from merging import METHODS as METHOD_CLASSES
from merging.engine import merge_backbone
from merging.pool import ModelPool
from merging.saved import load_merged

TASKS = ("eurosat", "dtd")
# Odd sizes, not multiples of the batch size: the last batch is partial.
SIZES = {"eurosat": 45, "dtd": 13}
BATCH_SIZE = 16


@dataclass
class Setup:
    pool: dict[str, str]
    data: dict[str, str]
    root: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("merge_cli")
    pool = mf.make_pool(root / "models", TASKS)
    data = {
        task: str(mf.make_test_set(root / "data" / task, task, SIZES[task], pool[task], seed=10 + i))
        for i, task in enumerate(TASKS)
    }
    return Setup(pool, data, root)


@pytest.fixture(scope="module")
def individual(setup) -> dict[str, dict[str, float]]:
    """Each fine-tuned checkpoint as it is, on its own task, evaluated independently."""
    return independent_results(setup, lambda task: None)


pytestmark = pytest.mark.usefixtures("quiet_cli")


def cli(setup: Setup, out: Path, *extra: str, models: dict | None = None, tasks=TASKS, model: bool = True) -> list[str]:
    """``merge.py test`` in float64 (``mf.FLOAT64``), which the reports are compared in."""
    args = mf.merge_test_args(out, {task: setup.data[task] for task in tasks}, setup.pool[mf.PRETRAINED], BATCH_SIZE)
    args += mf.FLOAT64
    if model:
        args += ["--model", "lightning_modules.merged.MergedClassifier", "--model.report_dir", str(out / "report")]
        if models is not False:
            args += ["--model.models", json.dumps(models if models is not None else setup.pool)]
    return args + list(extra)


def method_args(cls: str, params: dict) -> list[str]:
    args = ["--model.method", cls]
    for key, value in params.items():
        args += [f"--model.method.{key}", str(value)]
    return args


def read_report(out: Path) -> dict:
    return json.loads((out / "report" / "report.json").read_text())


def independent_results(setup: Setup, backbone_for_task) -> dict[str, mf.Scores]:
    """Per task: ``backbone_for_task(task)`` with the task's head, evaluated independently."""
    results = {}
    for task in TASKS:
        images, labels = mf.read_test_set(setup.data[task])
        results[task] = mf.score(setup.pool[task], images, labels, backbone_state=backbone_for_task(task))
    return results


def pretrained_and_finetuned(setup: Setup) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    return mf.backbone(mf.load_state(setup.pool[mf.PRETRAINED])), [mf.backbone(mf.load_state(setup.pool[t])) for t in TASKS]


def merged_backbone(setup: Setup, method: str, params: dict) -> dict[str, torch.Tensor]:
    """The project's merge, the weights ``merge.py`` evaluates (the same code on the same machine:
    the same bits), checked against the formula within the arithmetic's bound."""
    merged = merge_backbone(ModelPool(setup.pool), METHOD_CLASSES[method](**params), progress=False)
    mf.assert_merge_matches(merged, method, params, *pretrained_and_finetuned(setup))
    return merged


def assert_matches(row: dict, expected: dict[str, mf.Scores]) -> None:
    for task, scores in expected.items():
        mf.assert_scores(row["tasks"][task], scores, BATCH_SIZE, task)
    accuracies = [row["tasks"][task]["accuracy"] for task in expected]
    assert row["average_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies), abs=1e-12)


# --- The report against an independent evaluation -------------------------------------------

METHODS = [
    ("TiesMerging", "ties", {"top_k": 0.3, "scaling_factor": 0.6}),
    ("DareTaskArithmetic", "dare_task_arithmetic", {"drop_rate": 0.4, "seed": 3, "scaling_factor": 0.5}),
    ("SimpleAverage", "simple_average", {}),
]


@pytest.mark.parametrize("cls, name, params", METHODS, ids=[m[1] for m in METHODS])
def test_report_equals_an_independent_evaluation(setup, individual, tmp_path, cls, name, params):
    main(cli(setup, tmp_path, *method_args(cls, params)))
    report = read_report(tmp_path)
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == mf.REPORT_FILES
    assert (tmp_path / "report" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report" / "accuracy_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["method_name"] == name
    assert {key: report["hyperparameters"][key] for key in params} == params
    assert report["models"] == setup.pool
    ((row_name, row),) = report["rows"].items()  # one row: no individual models asked for
    assert row_name == report["method"] and row_name.startswith(name)
    merged = merged_backbone(setup, name, params)
    expected = independent_results(setup, lambda task: merged)
    assert_matches(row, expected)
    # The merged model is not any single fine-tuned model.
    assert any(row["tasks"][task]["loss"] != pytest.approx(individual[task].loss) for task in TASKS)
    # The Markdown and CSV tables carry the same numbers, in percent.
    lines = list(csv.reader((tmp_path / "report" / "report.csv").read_text().splitlines()))
    assert lines[0] == ["model", *TASKS, "average"]
    assert lines[1] == [
        row_name,
        *(f"{100 * row['tasks'][t]['accuracy']:.2f}" for t in TASKS),
        f"{100 * row['average_accuracy']:.2f}",
    ]
    markdown = (tmp_path / "report" / "report.md").read_text()
    # The Markdown table: the same cells, the tasks by their abbreviations, and a legend line.
    assert "| model | EuSAT | DTD | average |" in markdown
    assert f"| {' | '.join(lines[1])} |" in markdown
    assert "Tasks: EuSAT = eurosat, DTD = dtd." in markdown
    assert f"eurosat {SIZES['eurosat']}, dtd {SIZES['dtd']}" in markdown


def test_evaluate_individual_adds_the_individual_row_and_normalized_accuracy(setup, individual, tmp_path):
    params = {"scaling_factor": 0.4}
    main(cli(setup, tmp_path, *method_args("TaskArithmetic", params), "--model.evaluate_individual", "true"))
    report = read_report(tmp_path)
    assert list(report["rows"]) == ["task_arithmetic(scaling_factor=0.4)", "individual"]
    merged_row, individual_row = report["rows"].values()
    merged = merged_backbone(setup, "task_arithmetic", params)
    assert_matches(merged_row, independent_results(setup, lambda task: merged))
    assert_matches(individual_row, individual)
    assert all(scores.correct > 0 for scores in individual.values())  # the fixture's labels see to it
    for task in TASKS:
        ratio = merged_row["tasks"][task]["accuracy"] / individual_row["tasks"][task]["accuracy"]
        assert merged_row["tasks"][task]["normalized_accuracy"] == pytest.approx(ratio, rel=1e-12)
        assert "normalized_accuracy" not in individual_row["tasks"][task]
    average = sum(merged_row["tasks"][t]["normalized_accuracy"] for t in TASKS) / len(TASKS)
    assert merged_row["average_normalized_accuracy"] == pytest.approx(average, rel=1e-12)
    header = (tmp_path / "report" / "report.csv").read_text().splitlines()[0]
    assert header == "model,eurosat,dtd,average,normalized average"


def test_a_pool_given_as_a_fusionbench_yaml_file(setup, tmp_path):
    """``--model.models <file.yaml>`` and a YAML config give the same run as the JSON mapping."""
    import yaml

    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(yaml.safe_dump({"models": {name: {"config_path": path} for name, path in setup.pool.items()}}))
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "lightning_modules.merged.MergedClassifier",
                    "init_args": {
                        "models": str(pool_file),
                        "method": {"class_path": "merging.methods.TaskArithmetic", "init_args": {"scaling_factor": 0.4}},
                        "report_dir": str(tmp_path / "report"),
                    },
                }
            }
        )
    )
    main(cli(setup, tmp_path, "--config", str(config), model=False))
    (row,) = read_report(tmp_path)["rows"].values()
    merged = merged_backbone(setup, "task_arithmetic", {"scaling_factor": 0.4})
    assert_matches(row, independent_results(setup, lambda task: merged))


def test_a_merge_config_reads_its_pool_file_from_its_own_folder(setup, tmp_path, monkeypatch):
    """As ``configs/merge/*.yaml`` name ``pools/convnext-base-224_8-tasks.yaml``: a relative pool
    path in a config is read from that config's folder, whatever the working directory."""
    import yaml

    (tmp_path / "conf" / "pools").mkdir(parents=True)
    (tmp_path / "conf" / "pools" / "pool.yaml").write_text(yaml.safe_dump({"models": setup.pool}))
    config = tmp_path / "conf" / "merge.yaml"
    method = {"class_path": "merging.methods.TaskArithmetic", "init_args": {"scaling_factor": 0.4}}
    init = {"models": "pools/pool.yaml", "method": method, "report_dir": str(tmp_path / "report")}
    config.write_text(yaml.safe_dump({"model": {"class_path": "lightning_modules.merged.MergedClassifier", "init_args": init}}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    main(cli(setup, tmp_path, "--config", str(config), model=False))
    (row,) = read_report(tmp_path)["rows"].values()
    merged = merged_backbone(setup, "task_arithmetic", {"scaling_factor": 0.4})
    assert_matches(row, independent_results(setup, lambda task: merged))
    assert read_report(tmp_path)["models"] == setup.pool


MERGE_CONFIGS = sorted((mf.REPO_ROOT / "configs" / "merge").glob("*.yaml")) + [
    mf.REPO_ROOT / "configs" / "quickstart" / f"{name}.yaml" for name in ("merge", "adamerging", "compare", "regmean")
]


@pytest.mark.parametrize("config", MERGE_CONFIGS, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_every_merge_config_parses_through_merge_py(config, capsys):
    import yaml

    subcommand = "fit" if config.stem.startswith("adamerging") else "test"
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    benchmark = next((name for name in ("tall14", "tall20") if config.stem.endswith(f"_{name}")), "8-tasks")
    pool = f"pools/convnext-base-224_{benchmark}.yaml" if config.parent.name == "merge" else "pools/quickstart.yaml"
    assert printed["model"]["init_args"]["models"] == pool and (config.parent / pool).is_file()


# Registered once, a method stays among the classes the CLI offers (jsonargparse keeps a hold on
# it): defined in this process, it would change the method list the other tests expect.
ONE_FUNCTION_RUN = """
import sys

import example_methods
from merging import METHODS

method = example_methods.task_median.method
assert method.__name__ == "TaskMedian" and METHODS["task_median"] is method
assert method(scaling_factor=0.5).describe() == "task_median(scaling_factor=0.5)"

# An option without a default must be given.
from merging import merge_function

@merge_function
def shifted(pretrained, task_vectors, *, shift: float):
    return pretrained + shift

assert shifted.method(shift=2.0).hyperparameters() == {"shift": 2.0}
try:
    shifted.method()
except TypeError as error:
    assert "shift" in str(error), error
else:
    raise AssertionError("shifted.method() without its shift was accepted")
from merge import main

main(sys.argv[1:])
"""


def test_a_method_written_as_one_function_runs_through_merge_py(setup, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(mf.REPO_ROOT), str(mf.REPO_ROOT / "tests")])}

    def run(out: Path, *options: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", ONE_FUNCTION_RUN, *cli(setup, out, "--model.method", "TaskMedian", *options)]
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)

    done = run(tmp_path, "--model.method.scaling_factor", "0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    ((label, row),) = read_report(tmp_path)["rows"].items()
    assert label == "task_median(scaling_factor=0.5)"
    pretrained = mf.backbone(mf.load_state(setup.pool[mf.PRETRAINED]))
    finetuned = [mf.backbone(mf.load_state(setup.pool[task])) for task in TASKS]
    # The same float32 operations as task_median's (a subtraction, an exact median and halving, an
    # addition), each correctly rounded: the bits merge.py evaluated, on any CPU.
    merged = {
        key: value + 0.5 * torch.stack([state[key] - value for state in finetuned]).median(0).values
        for key, value in pretrained.items()
    }
    assert_matches(row, independent_results(setup, lambda task: merged))
    # Its keyword arguments are the options: a typo is the usual one-line error.
    typo = run(tmp_path / "typo", "--model.method.scaling", "0.5")
    assert typo.returncode == 1
    assert "did you mean 'scaling_factor'" in typo.stderr.strip().splitlines()[-1]


def test_a_merge_function_needs_typed_options():
    from merging import merge_function

    with pytest.raises(TypeError, match="'scale' needs a type"):

        @merge_function
        def untyped(pretrained, task_vectors, *, scale=1.0):
            return pretrained

    with pytest.raises(TypeError, match=r"takes \(pretrained, tensors, \*, <hyper-parameters>\)"):

        @merge_function
        def positional(pretrained, task_vectors, scale: float = 1.0):
            return pretrained


# --- Saving, re-evaluating, merging without evaluating ----------------------------------------


def test_save_then_evaluate_the_saved_model_again(setup, tmp_path):
    params = {"top_k": 0.5, "scaling_factor": 0.7}
    saved = tmp_path / "saved"
    main(cli(setup, tmp_path / "first", *method_args("TiesMerging", params), "--model.save_dir", str(saved)))
    first = read_report(tmp_path / "first")
    model = load_merged(saved)
    mf.assert_merge_matches(model.backbone, "ties", params, *pretrained_and_finetuned(setup))
    for task in TASKS:
        state = mf.load_state(setup.pool[task])
        assert torch.equal(model.heads[task]["weight"], state["classifier.weight"])
        assert torch.equal(model.heads[task]["bias"], state["classifier.bias"])
    assert model.info["method"] == first["method"] and model.info["models"] == setup.pool
    assert (saved / "preprocessor_config.json").is_file()

    main(cli(setup, tmp_path / "again", "--model.merged_model", str(saved), models=False))
    again = read_report(tmp_path / "again")
    assert again["merged_model"] == str(saved)
    assert again["rows"] == first["rows"]  # identical numbers, same row name


def test_merge_and_save_without_evaluating(setup, tmp_path):
    saved = tmp_path / "saved"
    main(cli(setup, tmp_path, "--model.save_dir", str(saved), "--trainer.limit_test_batches", "0"))
    assert not (tmp_path / "report").exists()
    model = load_merged(saved)
    # Both sum the models in the same order in float64 and divide: each operation correctly
    # rounded, elementwise, so the same bits on any CPU.
    expected = mf.reference_merge("simple_average", {}, *pretrained_and_finetuned(setup))
    assert all(torch.equal(model.backbone[key], tensor) for key, tensor in expected.items())
    assert sorted(model.heads) == sorted(TASKS)


def test_overwrite_replaces_an_existing_save_dir(setup, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "stale.txt").write_text("from an earlier run")
    main(cli(setup, tmp_path, "--model.save_dir", str(saved), "--model.overwrite", "true", "--trainer.limit_test_batches", "0"))
    assert sorted(p.name for p in saved.iterdir()) == [
        "config.json",
        "merge.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


# --- Bad input: one error line, non-zero exit, nothing written ---------------------------------


def poisoned(value: float):
    def change(state):
        key = "convnext.encoder.stages.2.layers.0.pwconv2.weight"
        tensor = state[key].clone()
        tensor[1, 2] = value
        return {**state, key: tensor}

    return change


def reshaped(state):
    return {**state, "convnext.encoder.stages.2.layers.0.pwconv2.weight": torch.zeros(32, 100)}


def bad_pool(setup: Setup, tmp_path: Path, case: str) -> tuple[dict, list[str], list[str]]:
    """The pool of a bad-input case, extra CLI arguments, and what the error must say."""
    pool = dict(setup.pool)
    copy = tmp_path / "damaged"
    file = str(copy / "model.safetensors")
    key = "convnext.encoder.stages.2.layers.0.pwconv2.weight"
    if case == "missing checkpoint":
        pool["dtd"] = str(tmp_path / "no" / "such" / "checkpoint")
        return pool, [], [pool["dtd"]]
    if case == "only pretrained":
        return {mf.PRETRAINED: setup.pool[mf.PRETRAINED]}, [], ["no fine-tuned models"]
    if case == "pretrained false":  # FusionBench's random weights: a merge reads the checkpoint's
        pool["dtd"] = {"config_path": setup.pool["dtd"], "pretrained": False}
        return pool, [], ["the model pool's dtd has pretrained: false", "remove pretrained: false to merge"]
    if case == "pretrained not a bool":
        pool["dtd"] = {"config_path": setup.pool["dtd"], "pretrained": "sometimes"}
        return pool, [], ["pool entry 'dtd': pretrained must be true or false, got 'sometimes'"]
    if case == "task without a model":
        del pool["dtd"]
        return pool, [], ["no fine-tuned model for task 'dtd'", "tasks: eurosat"]
    if case == "head of the wrong size":
        pool["dtd"] = str(mf.make_finetuned(setup.pool[mf.PRETRAINED], copy, "eurosat", seed=9))
        return pool, [], [str(copy), "[10, 64]", "task 'dtd' has 47 classes"]
    if case == "saved model without the task's head":
        pool = {mf.PRETRAINED: setup.pool[mf.PRETRAINED], "eurosat": setup.pool["eurosat"]}
        main(
            cli(
                setup,
                tmp_path / "saving",
                "--model.save_dir",
                str(copy),
                "--trainer.limit_test_batches",
                "0",
                models=pool,
                tasks=["eurosat"],
            )
        )
        return pool, ["--model.merged_model", str(copy)], [str(copy), "no head for dtd"]
    if case == "existing save_dir":
        existing = tmp_path / "existing"
        existing.mkdir()
        (existing / "stale.txt").write_text("from an earlier run")
        return pool, ["--model.save_dir", str(existing)], [str(existing), "already exists", "--model.overwrite true"]
    mf.copy_checkpoint(setup.pool["dtd"], copy)
    pool["dtd"] = str(copy)
    if case == "truncated safetensors":
        mf.truncate(copy)
        return pool, [], [file, "truncated"]
    if case == "corrupt header":
        mf.corrupt_header(copy)
        return pool, [], [file, "unreadable header"]
    if case == "different shapes":
        mf.rewrite_tensors(copy, reshaped)
        return pool, [], [key, "[32, 100]", "[32, 128]", file]
    value, method = case.split(" with ")
    mf.rewrite_tensors(copy, poisoned(float(value)))
    settings = {"TiesMerging": ["--model.method.top_k", "0.2", "--model.method.scaling_factor", "0.3"]}.get(method, [])
    return pool, ["--model.method", method, *settings], ["non-finite", key, file]


BAD_CASES = [
    "missing checkpoint",
    "truncated safetensors",
    "corrupt header",
    "different shapes",
    "nan with SimpleAverage",
    "inf with SimpleAverage",
    "nan with TiesMerging",
    "-inf with TiesMerging",
    "task without a model",
    "head of the wrong size",
    "only pretrained",
    "pretrained false",
    "pretrained not a bool",
    "existing save_dir",
    "saved model without the task's head",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line(setup, tmp_path, capsys, case):
    pool, extra, fragments = bad_pool(setup, tmp_path, case)
    save_dir = tmp_path / "merged"
    args = cli(setup, tmp_path, *extra, models=pool)
    if "--model.save_dir" not in extra:
        args += ["--model.save_dir", str(save_dir)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in stderr
    assert not save_dir.exists()
    assert not (tmp_path / "report" / "report.json").exists()
    if case == "existing save_dir":  # left as it was
        assert [p.name for p in (tmp_path / "existing").iterdir()] == ["stale.txt"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_an_unknown_method_is_refused(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(cli(setup, tmp_path, "--model.method", "NoSuchMethod"))
    assert exit_info.value.code not in (0, None)
    assert "NoSuchMethod" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_a_limited_test_run_is_reported_as_partial(setup, tmp_path):
    """--trainer.limit_test_batches evaluates a subset on purpose: no full-count error, a marked report."""
    main(cli(setup, tmp_path, "--trainer.limit_test_batches", "1"))
    report = read_report(tmp_path)
    assert report["partial"] is True and "PARTIAL" in report["title"]
    counts = [values["num_samples"] for values in next(iter(report["rows"].values()))["tasks"].values()]
    assert counts == [min(BATCH_SIZE, SIZES[task]) for task in TASKS]


#: The imports of this suite when the misreading was seen (one more merge method defined, the
#: fixtures' libraries), then merge.py's parse of each option and value: what it printed.
COUNT_PARSE = """
import contextlib, io, json, sys

import example_methods
import merge_fixtures
from merge import main

printed = {}
for option, value in json.loads(sys.argv[2]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["test", "--config", sys.argv[1], f"--trainer.{option}", value, "--print_config"])
    printed[f"{option}={value}"] = out.getvalue()
print(json.dumps(printed))
"""


def test_an_integer_is_a_count_whatever_was_imported_before(tmp_path):
    """``--trainer.limit_test_batches 1`` is one batch, ``1.0`` all of them. typing caches
    unions by equality (``Union[int, float] == Union[float, int]``), so which order jsonargparse
    tries Lightning's ``Optional[Union[int, float]]`` in depended on what was imported first:
    after these imports it read ``1`` as ``1.0``, every batch."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(mf.REPO_ROOT), str(mf.REPO_ROOT / "tests")])}
    config = str(mf.REPO_ROOT / "configs" / "quickstart" / "merge.yaml")
    cases = [(option, value) for option in ("limit_test_batches", "val_check_interval") for value in ("1", "1.0", "0.25")]
    done = subprocess.run([sys.executable, "-c", COUNT_PARSE, config, json.dumps(cases)], env=env, cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout.splitlines()[-1])
    for option, value in cases:
        assert str(yaml.safe_load(printed[f"{option}={value}"])["trainer"][option]) == value, (option, value)


def test_the_startup_objects_are_frozen_for_the_test_loop_and_released_after(setup, tmp_path):
    # A full collection in the loop would walk the ~500,000 objects of the imports every time.
    train_cli_callbacks.RECORDED.clear()
    main(cli(setup, tmp_path, "--trainer.callbacks+=train_cli_callbacks.RecordFrozen"))
    assert train_cli_callbacks.RECORDED["frozen_at_test"] > 10_000
    assert gc.get_freeze_count() == 0, "collectable again once main() returns"
    assert read_report(tmp_path)["rows"], "and the run is complete"


def test_the_loggers_get_every_number_of_the_report(setup, tmp_path):
    """Each row's per-task accuracy and loss and its average reach the logger (a CSVLogger here,
    W&B in the configs), equal to the report: the merged model as ``test/<task>/accuracy``, the
    other rows as ``test/<row>/<task>/accuracy``."""
    out = tmp_path / "logged"
    args = cli(setup, out, *method_args("TaskArithmetic", {"scaling_factor": 0.4}), "--model.evaluate_individual", "true")
    logger = [
        "--trainer.logger",
        json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out / "csv")}}),
    ]
    main([*args[: args.index("--trainer.logger")], *args[args.index("--trainer.logger") + 2 :], *logger])
    with open(next((out / "csv").rglob("metrics.csv")), newline="") as file:
        logged = {key: float(value) for row in csv.DictReader(file) for key, value in row.items() if value and key != "step"}
    report = read_report(out)
    assert list(report["rows"]) == ["task_arithmetic(scaling_factor=0.4)", "individual"]
    for name, row in report["rows"].items():
        prefix = "test" if name == "task_arithmetic(scaling_factor=0.4)" else f"test/{name}"
        # The same Python floats, written by the CSV logger as their repr: the same numbers.
        assert logged[f"{prefix}/average/accuracy"] == row["average_accuracy"]
        for task, values in row["tasks"].items():
            assert logged[f"{prefix}/{task}/accuracy"] == values["accuracy"]
            assert logged[f"{prefix}/{task}/loss"] == values["loss"]
    assert len(logged) == len(report["rows"]) * (2 * len(TASKS) + 1)
