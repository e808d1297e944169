"""Bad input and faults on the merge and evaluation side, through the real CLIs in-process
(``merge.py``; ``train.py test`` for a checkpoint whose config disagrees with its head): a merge
whose logits overflow, an empty grid, one checkpoint twice in a pool, a config.json that
disagrees with its head's weights, a full disk, relative pool paths read from another
directory, pool tasks that are not evaluated, an AdaMerging start outside its clamp range; and
the modes of what a merge writes.

Every error case ends in one ``error:`` line naming what is wrong and where, exit status 1,
and nothing written (``test_bad_input.py``'s helpers and fixtures).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from safetensors import SafetensorError

import merge_fixtures as mf
import test_bad_input
from callbacks.report import summarize, write_report
from conftest import REPO_ROOT, write_dataset
from datamodules.tasks import get_task
from lightning_modules.adamerging import AdaMerging, prediction_entropy
from merge import main as merge_main
from test_bad_input import (
    MERGE_TASKS,
    assert_contains,
    assert_nothing_written,
    cli_or_yaml,
    merge_args,
    one_error_line,
    small_dataset,
    train_args,
)
from train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

# test_bad_input's fixtures, shared: its tiny pool and test sets (module-scoped), its ConvNeXt to
# fine-tune, and the empty working directory every test runs in (autouse), where leftovers show.
pool = test_bad_input.pool
convnext = test_bad_input.convnext
workdir = test_bad_input.workdir

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
#: What safetensors raises when the disk fills up (an I/O error inside its Rust writer).
SAFETENSORS_NO_SPACE = f"Error while serializing: I/O error: {NO_SPACE} (os error 28)"


def merged_classifier(*extra: str) -> list[str]:
    """MergedClassifier with no save_dir: what a failed evaluation leaves is the report alone."""
    return ["--model", "lightning_modules.merged.MergedClassifier", *extra]


def assert_nothing_of_the_run(out: Path, workdir: Path) -> None:
    """What a run stopped after its setup leaves: nothing. Lightning's ``config.yaml`` (written
    as the run starts, in ``trainer.default_root_dir``) is taken back with the folder made for it
    (``lightning_modules.run_files.SaveConfigOfCompletedRuns``), and there is no output."""
    assert not (out / "root").exists()
    assert not (out / "report").exists() and not (out / "merged").exists() and not (out / "coefficients").exists()
    assert not list(workdir.iterdir())


def assert_no_staging(*directories: Path) -> None:
    for directory in directories:
        if directory.exists():
            assert [path.name for path in directory.iterdir() if path.name.startswith(".")] == [], directory


# --- a merge whose weights make the logits overflow ------------------------------------------------


def test_non_finite_logits_are_one_error_line_naming_the_row_and_task(pool, tmp_path, workdir, capsys):
    exports = tmp_path / "exports"
    method = ["--model.method", "TaskArithmetic", "--model.method.scaling_factor", "1e30", "--model.export_dir", str(exports)]
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *merged_classifier(*method)), capsys)
    # Every test sample of the first task scored (6), each with NaN/Inf logits.
    assert line.startswith(
        "error: row 'task_arithmetic(scaling_factor=1e+30)' on task 'eurosat': 6 of 6 test samples give non-finite logits (NaN/Inf)"
    ), line
    assert_contains(line, "no accuracy to report")
    assert_nothing_of_the_run(tmp_path, workdir)
    assert not exports.exists()


def test_finite_logits_pass_the_check(pool, tmp_path):
    """The same run with a sane scaling factor writes its report (the check is not always on)."""
    method = ["--model.method", "TaskArithmetic", "--model.method.scaling_factor", "0.3"]
    merge_main(merge_args(pool, tmp_path, *merged_classifier(*method)))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert all(0.0 <= row["tasks"]["eurosat"]["accuracy"] <= 1.0 for row in report["rows"].values())


# --- an empty grid -----------------------------------------------------------------------------------


def comparison(grid: dict) -> dict:
    methods = [{"class_path": "merging.SimpleAverage"},
               {"class_path": "merging.TaskArithmetic", "init_args": {"scaling_factor": 0.3}}]  # fmt: skip
    return {"model": {"class_path": "lightning_modules.comparison.MethodComparison",
                      "init_args": {"methods": methods, "grid": grid}}}  # fmt: skip


def test_an_empty_grid_is_one_error_line(pool, tmp_path, workdir, capsys):
    config = cli_or_yaml(comparison({"TaskArithmetic": {"scaling_factor": []}}), tmp_path)
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *config), capsys)
    assert line == "error: grid TaskArithmetic: no values for scaling_factor; list at least one, or leave it out of the grid"
    assert_nothing_written(tmp_path, workdir)


# --- one checkpoint twice in a pool ------------------------------------------------------------------

DISTINCT = "each task needs its own fine-tuned model, and _pretrained_ the model they were all fine-tuned from"


@pytest.mark.parametrize("case", ["two tasks", "_pretrained_ and a task"])
def test_one_checkpoint_named_twice_in_the_pool_is_one_error_line(case, pool, tmp_path, workdir, capsys):
    if case == "two tasks":
        models, first, second, source = {**pool.models, "dtd": pool.models["eurosat"]}, "eurosat", "dtd", pool.models["eurosat"]
    else:
        models, first, second, source = (
            {**pool.models, mf.PRETRAINED: pool.models["dtd"]},
            mf.PRETRAINED,
            "dtd",
            pool.models["dtd"],
        )
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *merged_classifier(), models=models), capsys)
    assert line == f"error: the model pool's {first} and {second} are the same checkpoint ('{source}'): {DISTINCT}"
    # The same directory spelt another way is still the same checkpoint.
    models[second] = os.path.join(source, "..", Path(source).name)
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *merged_classifier(), models=models), capsys)
    assert (
        line
        == f"error: the model pool's {first} and {second} are the same checkpoint ('{source}' and '{models[second]}'): {DISTINCT}"
    )
    assert_nothing_written(tmp_path, workdir)


@pytest.mark.parametrize("case", ["two tasks", "_pretrained_ and a task"])
def test_a_copy_of_one_checkpoint_twice_in_the_pool_is_one_error_line(case, pool, tmp_path, workdir, capsys):
    if case == "two tasks":  # dtd scored with a copy of the eurosat model
        copy = mf.copy_checkpoint(pool.models["eurosat"], tmp_path / "copy")
        models, first, second = {**pool.models, "dtd": str(copy)}, "eurosat", "dtd"
    else:  # the "pretrained" model is dtd's fine-tune
        copy = mf.copy_checkpoint(pool.models["dtd"], tmp_path / "copy")
        models, first, second = {**pool.models, mf.PRETRAINED: str(copy)}, mf.PRETRAINED, "dtd"
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *merged_classifier(), models=models), capsys)
    assert line == (
        f"error: the model pool's {first} ('{models[first]}') and {second} ('{models[second]}') are copies of one "
        f"checkpoint (identical weight files): {DISTINCT}"
    )
    assert_nothing_written(tmp_path, workdir)


# --- a config.json whose class count is not its head's -----------------------------------------------


def misconfigured(source: str, target: Path, case: str) -> Path:
    """A copy of a 10-class checkpoint whose config.json says 7 classes, one way or the other."""
    copy = mf.copy_checkpoint(source, target)
    config = json.loads((copy / "config.json").read_text())
    if case == "id2label":
        config["id2label"] = {str(i): name for i, name in list(config["id2label"].items())[:7]}
        config["label2id"] = {name: int(i) for i, name in config["id2label"].items()}
    else:
        config["num_labels"] = 7
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def head_mismatch(copy: Path, case: str) -> str:
    return (
        f"error: checkpoint '{copy}': its config.json ('{copy / 'config.json'}') gives 7 classes ({case}), "
        f"but its head 'classifier.weight' in '{copy / 'model.safetensors'}' has 10 rows"
    )


@pytest.mark.parametrize("case", ["id2label", "num_labels"])
def test_a_config_that_disagrees_with_its_head_in_the_pool_is_one_error_line(case, pool, tmp_path, workdir, capsys):
    copy = misconfigured(pool.models["eurosat"], tmp_path / "eurosat", case)
    models = {**pool.models, "eurosat": str(copy)}
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *merged_classifier(), models=models), capsys)
    assert line == head_mismatch(copy, case)
    assert_nothing_written(tmp_path, workdir)


@pytest.mark.parametrize("case", ["id2label", "num_labels"])
def test_evaluating_a_checkpoint_whose_config_disagrees_with_its_head_is_one_error_line(case, pool, tmp_path, workdir, capsys):
    """``train.py test --model.new_head false``: transformers would stop with a size-mismatch RuntimeError."""
    copy = misconfigured(pool.models["eurosat"], tmp_path / "eurosat", case)
    data = write_dataset(small_dataset("eurosat"), tmp_path / "data", "disk")
    args = ["test", *train_args(copy, data, "eurosat", "--model.new_head", "false")[1:]]
    line = one_error_line(train_main, args, capsys)
    assert line == head_mismatch(copy, case)
    assert not list(workdir.iterdir())


# --- a full disk -------------------------------------------------------------------------------------


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, NO_SPACE)


@pytest.mark.parametrize("failing", ["report.md", "accuracy.png", "accuracy_heatmap.png"])
@pytest.mark.parametrize("before", ["no report", "an earlier report"])
def test_a_full_disk_while_writing_the_report_leaves_no_part_of_it(failing, before, pool, tmp_path, workdir, monkeypatch, capsys):
    report_dir = tmp_path / "report"
    if before == "an earlier report":
        merge_main(merge_args(pool, tmp_path, *merged_classifier()))
        earlier = {path.name: path.read_bytes() for path in report_dir.iterdir()}
        assert sorted(earlier) == mf.REPORT_FILES
    if failing == "accuracy.png":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    elif failing == "accuracy_heatmap.png":  # the last of the five files: the other four are staged by then
        savefig = matplotlib.figure.Figure.savefig

        def fail_on_heat_map(figure, path, *args, **kwargs):
            if Path(path).name.startswith(".accuracy_heatmap."):
                no_space()
            return savefig(figure, path, *args, **kwargs)

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail_on_heat_map)
    else:  # the second of the five files: report.json is written by then
        write_text = Path.write_text

        def fail_on_markdown(path: Path, *args, **kwargs):
            if path.name.startswith(".report.") and path.suffix == ".md":
                no_space()
            return write_text(path, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", fail_on_markdown)
    method = ["--model.method", "TaskArithmetic", "--model.method.scaling_factor", "0.3"]
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *merged_classifier(*method)), capsys)
    assert line == f"error: cannot write model.report_dir '{report_dir}' ({failing}): {NO_SPACE}; nothing was written there"
    if before == "no report":
        assert not report_dir.exists()
    else:  # the earlier report, whole and untouched
        assert {path.name: path.read_bytes() for path in report_dir.iterdir()} == earlier
    assert_no_staging(tmp_path, report_dir)


def test_a_full_disk_while_saving_the_merge_is_one_error_line(pool, tmp_path, workdir, monkeypatch, capsys):
    import merging.saved

    real_save_file = merging.saved.save_file

    def fill_the_disk(tensors, path, metadata=None):
        real_save_file(dict(list(tensors.items())[:1]), path, metadata=metadata)  # part of it, then no room
        raise SafetensorError(SAFETENSORS_NO_SPACE)

    monkeypatch.setattr(merging.saved, "save_file", fill_the_disk)
    save_dir = tmp_path / "saved" / "merged"
    model = merged_classifier("--model.save_dir", str(save_dir))
    line = one_error_line(merge_main, [*merge_args(pool, tmp_path, *model), "--trainer.limit_test_batches", "0"], capsys)
    assert line == f"error: cannot write model.save_dir '{save_dir}': {NO_SPACE} (os error 28); nothing was written there"
    assert not save_dir.parent.exists()  # no staging folder, nor the folder made for it
    assert not (tmp_path / "report").exists()


def test_a_full_disk_while_exporting_the_merge_is_one_error_line(pool, tmp_path, workdir, monkeypatch, capsys):
    import callbacks.merged_export

    monkeypatch.setattr(callbacks.merged_export, "save_file", lambda *args, **kwargs: no_safetensors_space())
    exports = tmp_path / "exports"
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *merged_classifier("--model.export_dir", str(exports))), capsys)
    first = exports / MERGE_TASKS[0]
    assert line == f"error: cannot write model.export_dir '{first}': {NO_SPACE} (os error 28); nothing was written there"
    assert not exports.exists()


def no_safetensors_space():
    raise SafetensorError(SAFETENSORS_NO_SPACE)


def test_a_full_disk_while_exporting_a_fine_tune_is_one_error_line(convnext, tmp_path, workdir, monkeypatch, capsys):
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", lambda *args, **kwargs: no_safetensors_space())
    data = write_dataset(small_dataset("mnist"), tmp_path / "mnist", "disk")
    exports = tmp_path / "exports"
    args = train_args(convnext, data, "mnist", "--trainer.max_steps", "1", "--export_dir", str(exports), "--export_name", "mnist")
    line = one_error_line(train_main, args, capsys)
    assert line == f"error: cannot write '{exports / 'mnist'}': {NO_SPACE} (os error 28); nothing was written there"
    assert not exports.exists()


def test_a_full_disk_while_writing_adamerging_coefficients_leaves_neither_file(pool, tmp_path, workdir, monkeypatch, capsys):
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)  # the heat map, after coefficients.json
    output = tmp_path / "coefficients"
    args = ["fit", *merge_args(pool, tmp_path, "--model", "AdaMerging", "--model.output_dir", str(output))[1:]]
    line = one_error_line(merge_main, [*args, "--trainer.max_steps", "1", "--trainer.enable_checkpointing", "false"], capsys)
    assert line == f"error: cannot write model.output_dir '{output}' (coefficients.png): {NO_SPACE}; nothing was written there"
    assert not output.exists()


# --- relative pool paths, read from the current directory ----------------------------------------------


def test_the_quickstart_pool_run_from_another_directory_names_the_entry_and_the_directory(workdir, capsys):
    config = REPO_ROOT / "configs" / "quickstart" / "merge.yaml"
    line = one_error_line(merge_main, ["test", "--config", str(config), "--trainer.logger", "false"], capsys)
    pool_file = REPO_ROOT / "configs" / "quickstart" / "pools" / "quickstart.yaml"
    assert line == (
        f"error: model pool entry '_pretrained_' of '{pool_file}': 'outputs/quickstart/base' is neither an existing "
        "checkpoint directory nor a Hugging Face hub id (owner/name); a relative path in a model pool is read from the "
        f"current directory ('{workdir}'): run from the directory it is relative to, or make it absolute"
    )
    assert not list(workdir.iterdir())


# --- pool tasks that would be merged but not evaluated --------------------------------------------------


@pytest.mark.parametrize("model", ["MergedClassifier", "AdaMerging", "MethodComparison"])
def test_a_pool_task_missing_from_data_tasks_is_one_error_line(model, pool, tmp_path, workdir, capsys):
    args = [
        *mf.merge_test_args(tmp_path, {"eurosat": pool.data["eurosat"]}, pool.models[mf.PRETRAINED], 4),
        *(cli_or_yaml(comparison({}), tmp_path) if model == "MethodComparison" else ["--model", model]),
        "--model.models", json.dumps(pool.models),
        "--model.report_dir", str(tmp_path / "report"),
    ]  # fmt: skip
    line = one_error_line(merge_main, args, capsys)
    assert line == (
        "error: the model pool's dtd would be merged but not evaluated: data.tasks is [eurosat]; "
        "add them to data.tasks, or remove them from the model pool"
    )
    assert_nothing_written(tmp_path, workdir)


# --- AdaMerging's start outside its clamp range -----------------------------------------------------------


@pytest.mark.parametrize("value", ["2.0", "-0.5"])
def test_an_adamerging_init_value_outside_the_clamp_range_is_one_error_line(value, pool, tmp_path, workdir, capsys):
    model = ["--model", "AdaMerging", "--model.init_value", value, "--model.output_dir", str(tmp_path / "coefficients")]
    line = one_error_line(merge_main, merge_args(pool, tmp_path, *model), capsys)
    assert line == (
        f"error: model.init_value must be within [model.clamp_min, model.clamp_max] = [0, 1] while model.clamp is on, "
        f"got {float(value)}"
    )
    assert_nothing_written(tmp_path, workdir)


def test_an_init_value_outside_the_range_stands_without_clamp(pool):
    classnames = {task: list(get_task(task).classnames) for task in MERGE_TASKS}
    unclamped = AdaMerging(list(MERGE_TASKS), classnames, pool.models, granularity="task", init_value=2.0, clamp=False)
    assert torch.equal(unclamped.coefficients.detach(), torch.full((2, 1), 2.0))


# --- what a merge writes: the modes the umask gives, strict JSON ------------------------------------------


def test_reports_saves_exports_and_coefficients_get_the_modes_of_the_umask(pool, tmp_path, monkeypatch):
    umask = os.umask(0o027)  # group may read, others nothing: not the 0600 of a private temporary file
    try:
        saved, exports = tmp_path / "saved", tmp_path / "exports"
        merge_main(
            merge_args(pool, tmp_path, *merged_classifier("--model.save_dir", str(saved), "--model.export_dir", str(exports)))
        )
        coefficients = tmp_path / "coefficients"
        args = ["fit", *merge_args(pool, tmp_path, "--model", "AdaMerging", "--model.output_dir", str(coefficients))[1:]]
        merge_main([*args, "--trainer.max_steps", "1", "--trainer.enable_checkpointing", "false"])
    finally:
        os.umask(umask)
    written = [tmp_path / "report", saved, exports / "eurosat", exports / "dtd", coefficients]
    for directory in written:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o750, directory
        files = list(directory.iterdir())
        assert files and all(stat.S_IMODE(path.stat().st_mode) == 0o640 for path in files), directory
    assert sorted(path.name for path in coefficients.iterdir()) == ["coefficients.json", "coefficients.png"]


def test_a_report_is_strict_json_where_a_ratio_is_undefined(tmp_path):
    """An individual model at 0% has no normalised accuracy: null, not a bare NaN."""
    values = {"accuracy": 0.5, "loss": 1.0, "num_samples": 4}
    results = {"merged": {"a": values, "b": values}, "individual": {"a": {**values, "accuracy": 0.0}, "b": values}}
    assert summarize(results)["rows"]["merged"]["tasks"]["a"]["normalized_accuracy"] is None
    write_report(results, tmp_path / "report", "title")

    def refuse(constant: str):
        raise AssertionError(f"{constant} in report.json")

    report = json.loads((tmp_path / "report" / "report.json").read_text(), parse_constant=refuse)
    assert report["rows"]["merged"]["average_normalized_accuracy"] is None
    assert report["rows"]["merged"]["tasks"]["b"]["normalized_accuracy"] == 1.0
    assert "| merged | 50.00 | 50.00 | 50.00 |  |" in (tmp_path / "report" / "report.md").read_text()


def test_prediction_entropy_keeps_float64_and_lifts_bfloat16():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    entropy = prediction_entropy(logits)
    assert entropy.dtype == torch.float64
    probabilities = torch.softmax(logits, dim=-1)
    assert entropy.item() == pytest.approx(float(-(probabilities * probabilities.log()).sum(-1).mean()), rel=1e-15)
    assert prediction_entropy(logits.to(torch.bfloat16)).dtype == torch.float32
