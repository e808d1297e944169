"""``merge.py test`` on several CPU processes gives the one-process report.

Each multi-process run is its own ``python merge.py`` subprocess (Lightning's DDP launcher
starts the second rank), on test sets of odd sizes so the two ranks get unequal shares. The
one-process reference runs in-process.

Batches of one image, on one thread in every process: each image's logits are then the same
computation (the same kernels on the same shapes) however the images are shared out, so they
are the same bits, and the accuracies are equal exactly. A larger batch would put an image in
other rows of the kernels' tiles depending on the process count, whose rounding differs with
the CPU. What still differs is only the order in which each row's mean loss adds the same
per-image losses (on each rank, then over ranks): ``tolerances.mean_rtol``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import merge_fixtures as mf
from merge import main
from merging.saved import load_merged
from tolerances import mean_rtol

TASKS = ("eurosat", "dtd")
SIZES = {"eurosat": 101, "dtd": 7}  # odd: 51 + 50 and 4 + 3 samples per rank
METHOD = ["--model.method", "TiesMerging", "--model.method.top_k", "0.3", "--model.method.scaling_factor", "0.6"]
MERGE_PY = str(mf.REPO_ROOT / "merge.py")
TIMEOUT = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_ddp")
    pool = mf.make_pool(root / "models", TASKS, seed=1)
    data = {
        task: str(mf.make_test_set(root / "data" / task, task, SIZES[task], pool[task], seed=20 + i))
        for i, task in enumerate(TASKS)
    }
    return pool, data


def args(setup, out: Path, *extra: str, pool: dict | None = None) -> list[str]:
    models, data = setup
    return [
        "test",
        "--trainer.logger", "false",
        "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(out / "root"),
        *mf.QUIET,
        "--model", "lightning_modules.merged.MergedClassifier",
        "--model.models", json.dumps(pool or models),
        *METHOD,
        "--model.evaluate_individual", "true",
        "--model.report_dir", str(out / "report"),
        "--data.tasks", json.dumps(list(TASKS)),
        "--data.paths", json.dumps(data),
        "--data.processor", models[mf.PRETRAINED],
        "--data.batch_size", "1",
        "--data.num_workers", "0",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory) -> tuple[dict, Path]:
    """The one-process run (in-process): its report and saved merged model."""
    out = tmp_path_factory.mktemp("single")
    saved = out / "saved"
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["merge.py"]
    torch.set_num_threads(1)  # as in the subprocesses (OMP_NUM_THREADS=1)
    try:
        main(args(setup, out, "--trainer.devices", "1", "--model.save_dir", str(saved)))
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return json.loads((out / "report" / "report.json").read_text()), saved


def launch(command: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, MERGE_PY, *command],
        cwd=cwd,
        env=mf.subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"merge.py did not finish in {TIMEOUT} s:\n{output[-4000:]}")
    return process.returncode, output


def assert_same_report(report: dict, reference: dict) -> None:
    assert list(report["rows"]) == list(reference["rows"])
    for name, row in reference["rows"].items():
        for task in TASKS:
            got, expected = report["rows"][name]["tasks"][task], row["tasks"][task]
            assert got["num_samples"] == expected["num_samples"] == SIZES[task], (name, task)
            assert got["accuracy"] == expected["accuracy"], (name, task)
            assert got["loss"] == pytest.approx(expected["loss"], rel=mean_rtol(SIZES[task]), abs=0), (name, task)


def test_two_processes_give_the_one_process_report(setup, single, tmp_path):
    reference, reference_saved = single
    saved, exports = tmp_path / "saved", tmp_path / "exports"
    process = launch(
        args(setup, tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.save_dir", str(saved),
             "--model.export_dir", str(exports)),
        cwd=tmp_path,
    )  # fmt: skip
    code, output = finish(process)
    assert code == 0, output[-4000:]
    assert "MEMBER: 2/2" in output  # really two processes
    assert_same_report(json.loads((tmp_path / "report" / "report.json").read_text()), reference)
    # Rank 0 saved the merged model; it is the one-process merge, bit for bit.
    merged, expected = load_merged(saved), load_merged(reference_saved)
    assert sorted(merged.backbone) == sorted(expected.backbone)
    assert all(torch.equal(merged.backbone[key], tensor) for key, tensor in expected.backbone.items())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Rank 0 exported each task's classifier after the evaluation, with the one-process accuracy
    # on its card (a second writer would have found the export there and failed).
    assert sorted(p.name for p in exports.iterdir()) == sorted(TASKS)
    merged_row = reference["rows"][reference["method"]]
    for task in TASKS:
        weights = mf.load_state(exports / task)
        assert all(torch.equal(weights[key], tensor) for key, tensor in expected.backbone.items())
        assert torch.equal(weights["classifier.weight"], expected.heads[task]["weight"])
        card = (exports / task / "README.md").read_text()
        assert f"**{100 * merged_row['tasks'][task]['accuracy']:.2f}%** ({SIZES[task]} images)" in card


def test_two_nodes_of_one_process_give_the_one_process_report(setup, single, tmp_path):
    reference, _ = single
    port = str(mf.free_port())
    nodes = [
        launch(
            args(
                setup, tmp_path / f"node{rank}", "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp"
            ),
            cwd=tmp_path,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            NODE_RANK=str(rank),
            WORLD_SIZE="2",
        )
        for rank in (0, 1)
    ]
    results = [finish(process) for process in nodes]
    for rank, (code, output) in enumerate(results):
        assert code == 0, f"node {rank}:\n{output[-4000:]}"
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in results[0][1] and "GLOBAL_RANK: 1, MEMBER: 2/2" in results[1][1]
    assert_same_report(json.loads((tmp_path / "node0" / "report" / "report.json").read_text()), reference)
    assert not (tmp_path / "node1" / "report").exists()  # only global rank 0 writes


def test_bad_input_on_two_processes_fails_on_every_rank_without_hanging(setup, tmp_path):
    """A NaN found while merging (in setup, after the second rank started): both ranks stop
    with the error line, exit non-zero, and nothing is written."""
    models, _ = setup
    copy = mf.copy_checkpoint(models["dtd"], tmp_path / "nan")
    key = "convnext.encoder.stages.3.layers.0.pwconv1.weight"

    def poison(state):
        tensor = state[key].clone()
        tensor[0, 0] = float("nan")
        return {**state, key: tensor}

    mf.rewrite_tensors(copy, poison)
    saved = tmp_path / "saved"
    process = launch(
        args(
            setup,
            tmp_path,
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--model.save_dir",
            str(saved),
            pool={**models, "dtd": str(copy)},
        ),
        cwd=tmp_path,
    )
    code, output = finish(process)
    assert code != 0
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors and all(key in line and str(copy / "model.safetensors") in line for line in errors), output[-4000:]
    assert not saved.exists()
    assert not (tmp_path / "report").exists()


def test_non_finite_logits_on_two_processes_stop_every_rank_without_hanging(setup, tmp_path):
    """Logits that overflow (a scaling factor of 1e30), found at the end of the evaluation from
    the count summed over both ranks: each rank stops with the same error line, nothing written."""
    exports = tmp_path / "exports"
    extra = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.export_dir", str(exports)]
    process = launch(args(setup, tmp_path, *extra, "--model.method.scaling_factor", "1e30"), cwd=tmp_path)
    code, output = finish(process)
    assert code != 0
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    expected = (
        "error: row 'ties(top_k=0.3, scaling_factor=1e+30)' on task 'eurosat': "
        f"{SIZES['eurosat']} of {SIZES['eurosat']} test samples give non-finite logits (NaN/Inf)"
    )
    assert errors and all(line.startswith(expected) for line in errors), output[-4000:]
    assert not (tmp_path / "report").exists() and not exports.exists()
