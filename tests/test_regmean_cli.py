"""RegMean through ``merge.py test``, offline on CPU: the Gram pass over unlabelled train images
and the merge inside one ``Trainer.test``.

The report must agree with an independent computation: the Gram matrices gathered here with
plain forward hooks on each fine-tuned ``ConvNextForImageClassification`` over the same train
rows (preprocessed by the project's ``ImagePreprocessor``), summed in float64, the closed form
with an explicit inverse, every other parameter averaged, the merged backbone evaluated with
``merge_fixtures.classify``. Two CPU processes must merge the same weights as one; no label is
read in the Gram pass; misconfigurations stop with one ``error:`` line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from torch import nn
from transformers import ConvNextForImageClassification

import merge_fixtures as mf
from datamodules.preprocessing import ImagePreprocessor
from datamodules.tasks import get_task
from merge import main
from merging.pool import read_pool_file
from merging.saved import load_merged

pytestmark = pytest.mark.usefixtures("quiet_cli", "one_thread")

TASKS = ("eurosat", "dtd")
# dtd has fewer train images than GRAM_IMAGES: it uses all 11, so the tasks' Grams average
# different numbers of rows (the mean, not the sum, is what matters then).
TRAIN = {"eurosat": 21, "dtd": 11}
TEST = {"eurosat": 30, "dtd": 13}
GRAM_IMAGES, GRAM_SEED, RATIO = 15, 3, 0.9
GRAM_COUNTS = {task: min(GRAM_IMAGES, TRAIN[task]) for task in TASKS}
MERGE_PY = str(mf.REPO_ROOT / "merge.py")
TIMEOUT = 300


@dataclass
class Setup:
    pool: dict[str, str]
    data: dict[str, str]


def make_train_test_set(directory: Path, task: str, finetuned: str, seed: int) -> str:
    """``train`` (seeded noise images, random labels) and ``test`` (two rows in three labelled
    with the fine-tuned model's prediction, as ``merge_fixtures.make_test_set``)."""
    classnames = list(get_task(task).classnames)
    rng = np.random.default_rng(seed)
    features = Features({"image": Image(), "label": ClassLabel(names=classnames)})
    train_images = mf.noise_images(TRAIN[task], seed + 100)
    test_images = mf.noise_images(TEST[task], seed + 200)
    predicted = mf.classify(finetuned, test_images).argmax(dim=1).tolist()
    test_labels = [predicted[i] if i % 3 else int(rng.integers(len(classnames))) for i in range(TEST[task])]
    train_labels = rng.integers(len(classnames), size=TRAIN[task]).tolist()
    DatasetDict({
        "train": Dataset.from_dict({"image": train_images, "label": train_labels}, features=features),
        "test": Dataset.from_dict({"image": test_images, "label": test_labels}, features=features),
    }).save_to_disk(str(directory))  # fmt: skip
    return str(directory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("regmean_cli")
    pool = mf.make_pool(root / "models", TASKS, seed=4)
    data = {task: make_train_test_set(root / "data" / task, task, pool[task], seed=40 + i) for i, task in enumerate(TASKS)}
    return Setup(pool, data)


def args(setup: Setup, out: Path, *extra: str, method: str = "RegMean", gram_images: int | None = GRAM_IMAGES) -> list[str]:
    command = mf.merge_test_args(out, {task: setup.data[task] for task in TASKS}, setup.pool[mf.PRETRAINED], 4) + [
        "--model", "lightning_modules.merged.MergedClassifier",
        "--model.models", json.dumps(setup.pool),
        "--model.method", method,
        "--model.report_dir", str(out / "report"),
        "--data.gram_seed", str(GRAM_SEED),
    ]  # fmt: skip
    if method == "RegMean":
        command += ["--model.method.reduce_non_diagonal_ratio", str(RATIO)]
    if gram_images is not None:
        command += ["--data.gram_images", str(gram_images)]
    return command + list(extra)


def read_report(out: Path) -> dict:
    return json.loads((out / "report" / "report.json").read_text())


# --- The independent reference ---------------------------------------------------------------


def gram_rows(num_rows: int) -> list[int]:
    """The documented choice: ``gram_images`` rows (all, if fewer) of a permutation seeded by ``gram_seed``, sorted."""
    return sorted(np.random.default_rng(GRAM_SEED).permutation(num_rows)[:GRAM_IMAGES].tolist())


def reference_grams(model_dir: str, images: list) -> dict[str, torch.Tensor]:
    """``X^T X / N`` in float64 of the inputs of every ``nn.Linear`` in the backbone."""
    model = ConvNextForImageClassification.from_pretrained(model_dir).eval()
    preprocess = ImagePreprocessor.from_pretrained(model_dir)
    sums, rows = {}, {}

    def record(key, module, inputs, output):
        flat = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        sums[key] = sums.get(key, 0) + flat.T @ flat
        rows[key] = rows.get(key, 0) + flat.shape[0]

    for name, module in model.convnext.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda m, i, o, key=f"convnext.{name}.weight": record(key, m, i, o))
    with torch.no_grad():
        model.convnext(pixel_values=torch.stack([preprocess(image) for image in images]))
    return {key: total / rows[key] for key, total in sums.items()}


def reference_regmean(setup: Setup, ratio: float) -> dict[str, torch.Tensor]:
    finetuned = [mf.backbone(mf.load_state(setup.pool[task])) for task in TASKS]
    merged = mf.reference_simple_average(finetuned)
    grams = []
    for task in TASKS:
        train = datasets.load_from_disk(setup.data[task])["train"]
        grams.append(reference_grams(setup.pool[task], [train[row]["image"] for row in gram_rows(len(train))]))
    assert len(grams[0]) == 2 * 4, "pwconv1 and pwconv2 of the four blocks"
    for key in grams[0]:
        shrunk = [ratio * g[key] + (1 - ratio) * torch.diag(torch.diagonal(g[key])) for g in grams]
        weighted = sum(g @ model[key].double().T for g, model in zip(shrunk, finetuned))
        merged[key] = (torch.from_numpy(np.linalg.inv(sum(shrunk).numpy())) @ weighted).T.float()
    return merged


def independent_results(setup: Setup, backbone: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    results = {}
    for task in TASKS:
        test = datasets.load_from_disk(setup.data[task])["test"]
        logits = mf.classify(setup.pool[task], list(test["image"]), backbone_state=backbone)
        results[task] = mf.evaluate(logits, torch.tensor(test["label"]))
    return results


def assert_row_matches(row: dict, expected: dict[str, dict[str, float]]) -> None:
    mf.assert_row_matches(row, expected, TEST, rel=1e-5)


# --- End to end ------------------------------------------------------------------------------


def test_the_report_equals_an_independent_regmean(setup, tmp_path):
    main(args(setup, tmp_path, "--trainer.devices", "1", "--model.evaluate_individual", "true"))
    report = read_report(tmp_path)
    label = f"regmean(reduce_non_diagonal_ratio={RATIO})"
    assert list(report["rows"]) == [label, "individual"]
    assert report["gram_images"] == GRAM_COUNTS
    expected = independent_results(setup, reference_regmean(setup, RATIO))
    assert_row_matches(report["rows"][label], expected)
    # RegMean is not the simple average here (whose linear weights it replaces).
    average = independent_results(setup, mf.reference_simple_average([mf.backbone(mf.load_state(setup.pool[t])) for t in TASKS]))
    assert all(abs(expected[task]["loss"] - average[task]["loss"]) > 1e-3 for task in TASKS)


def test_the_gram_pass_reads_images_and_never_a_label(setup, tmp_path, monkeypatch):
    original = datasets.Dataset.__getitem__
    train_reads = []

    def guarded(self, key):
        result = original(self, key)
        if any("/train/" in file["filename"] for file in self.cache_files):
            if key == "label" or (isinstance(result, dict) and "label" in result):
                raise AssertionError(f"a train label was read ({key!r})")
            train_reads.append(key)
        return result

    monkeypatch.setattr(datasets.Dataset, "__getitem__", guarded)
    main(args(setup, tmp_path, "--trainer.devices", "1"))
    # Every gram image read once, in batches of 4, from the train splits alone.
    read_rows = [row for key in train_reads if isinstance(key, list) for row in key]
    assert len(read_rows) == sum(GRAM_COUNTS.values())
    assert read_report(tmp_path)["gram_images"] == GRAM_COUNTS


def launch(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, MERGE_PY, *command],
            cwd=cwd,
            env=mf.subprocess_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"merge.py did not finish in {TIMEOUT} s:\n{str(error.stdout)[-4000:]}")


def test_two_processes_merge_the_one_process_weights(setup, tmp_path):
    """15 and 11 gram images split 8 + 7 and 6 + 5 over two ranks, test sets unevenly too: the Grams
    summed over the ranks give the one-process merge (to float32 rounding) and report."""
    main(args(setup, tmp_path / "one", "--trainer.devices", "1", "--model.save_dir", str(tmp_path / "one" / "saved")))
    done = launch(
        args(
            setup,
            tmp_path / "two",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--model.save_dir",
            str(tmp_path / "two" / "saved"),
        ),
        cwd=tmp_path,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "MEMBER: 2/2" in done.stdout + done.stderr  # really two processes
    one, two = load_merged(tmp_path / "one" / "saved"), load_merged(tmp_path / "two" / "saved")
    assert sorted(one.backbone) == sorted(two.backbone)
    for key, tensor in one.backbone.items():
        torch.testing.assert_close(two.backbone[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    reference, report = read_report(tmp_path / "one"), read_report(tmp_path / "two")
    assert report["gram_images"] == reference["gram_images"] == GRAM_COUNTS
    for name, row in reference["rows"].items():
        for task in TASKS:
            got, expected = report["rows"][name]["tasks"][task], row["tasks"][task]
            assert got["num_samples"] == expected["num_samples"] == TEST[task]
            assert got["accuracy"] == expected["accuracy"]
            assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6)


# --- Configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, gram_images, extra, message",
    [
        ("RegMean", None, [], "needs unlabelled train images for its Gram matrices: set data.gram_images"),
        ("SimpleAverage", 8, [], "data.gram_images is set, but MergedClassifier with these methods merges without data"),
        ("RegMean", 8, ["--trainer.limit_test_batches", "0", "--model.save_dir", "saved"], "limit_test_batches 0 reads no data"),
    ],
)
def test_misconfigurations_stop_with_one_error_line(setup, tmp_path, capsys, method, gram_images, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args(setup, tmp_path, "--trainer.devices", "1", *extra, method=method, gram_images=gram_images))
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "report").exists() and not (tmp_path / "saved").exists()


def test_the_quickstart_regmean_config_runs_as_it_is(tmp_path):
    """``configs/quickstart/regmean.yaml`` on the built-in digits and mnist5k data, only its
    model paths pointed at a tiny pool: the Gram pass reads 256 train images of each task."""
    path = mf.REPO_ROOT / "configs" / "quickstart" / "regmean.yaml"
    config = yaml.safe_load(path.read_text())
    init = config["model"]["init_args"]
    tasks = [name for name in read_pool_file(str(path)) if name != mf.PRETRAINED]
    pool = mf.make_pool(tmp_path / "models", tasks, seed=6)
    init["models"], init["report_dir"] = pool, str(tmp_path / "report")
    config["data"]["processor"] = pool[mf.PRETRAINED]
    config["trainer"]["default_root_dir"] = str(tmp_path / "root")
    (tmp_path / "regmean.yaml").write_text(yaml.safe_dump(config))
    main(["test", "--config", str(tmp_path / "regmean.yaml"), "--trainer.logger", "false", *mf.QUIET])
    report = read_report(tmp_path)
    assert report["method"] == "regmean(reduce_non_diagonal_ratio=0.95)" and "partial" not in report
    assert report["gram_images"] == {"digits": 256, "mnist5k": 256}
    assert list(report["rows"]) == [report["method"], "individual"]
    assert [report["rows"][report["method"]]["tasks"][task]["num_samples"] for task in ("digits", "mnist5k")] == [359, 1000]
