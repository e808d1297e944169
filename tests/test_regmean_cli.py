"""RegMean through ``merge.py test``, offline on CPU: the Gram pass over unlabelled train images
and the merge inside one ``Trainer.test``.

The merge must agree with an independent computation: the Gram matrices gathered here with
plain forward hooks on each fine-tuned ``ConvNextForImageClassification`` in float64 over the
same train rows (preprocessed by the project's ``ImagePreprocessor``), the closed form with an
explicit inverse, every other parameter averaged; the report with a float64 evaluation of the
merged weights (``merge_fixtures.score``). ``merge.py`` runs in float64 here (``mf.FLOAT64``):
its Gram sums are then float64 too, and the two computations of the weights differ by at most
``tolerances.float64_results_bound``. Two CPU processes must merge the same weights as one; no
label is read in the Gram pass; misconfigurations stop with one ``error:`` line.
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
import tolerances
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
        *mf.FLOAT64,
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
    """``X^T X / N`` of the inputs of every ``nn.Linear`` in the backbone, all in float64."""
    model = ConvNextForImageClassification.from_pretrained(model_dir).eval().double()
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
        model.convnext(pixel_values=torch.stack([preprocess(image) for image in images]).double())
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


def independent_results(setup: Setup, backbone: dict[str, torch.Tensor]) -> dict[str, mf.Scores]:
    results = {}
    for task in TASKS:
        test = datasets.load_from_disk(setup.data[task])["test"]
        results[task] = mf.score(setup.pool[task], list(test["image"]), torch.tensor(test["label"]), backbone_state=backbone)
    return results


def assert_row_matches(setup: Setup, row: dict, backbone: dict[str, torch.Tensor]) -> None:
    """The report's row against a float64 evaluation of the weights it evaluated."""
    for task, scores in independent_results(setup, backbone).items():
        mf.assert_scores(row["tasks"][task], scores, 4, task)


def assert_is_the_regmean(setup: Setup, saved: Path) -> dict[str, torch.Tensor]:
    """The saved merge against ``reference_regmean``: two float64 computations of the closed form
    rounded to float32 (``float64_results_bound``) for the Linear weights, the float64 average for
    the rest (the same additions in the same order, then one division: the same bits)."""
    merged = load_merged(saved).backbone
    expected = reference_regmean(setup, RATIO)
    linear = [key for key in expected if key.endswith(("pwconv1.weight", "pwconv2.weight"))]
    assert sorted(merged) == sorted(expected) and len(linear) == 2 * 4
    for key, tensor in expected.items():
        if key in linear:
            tolerances.assert_within(merged[key], tensor, tolerances.float64_results_bound(tensor), key)
        else:
            assert torch.equal(merged[key], tensor), key
    return merged


# --- End to end ------------------------------------------------------------------------------


def test_the_report_equals_an_independent_regmean(setup, tmp_path):
    saved = tmp_path / "saved"
    main(args(setup, tmp_path, "--trainer.devices", "1", "--model.evaluate_individual", "true", "--model.save_dir", str(saved)))
    report = read_report(tmp_path)
    label = f"regmean(reduce_non_diagonal_ratio={RATIO})"
    assert list(report["rows"]) == [label, "individual"]
    assert report["gram_images"] == GRAM_COUNTS
    merged = assert_is_the_regmean(setup, saved)
    assert_row_matches(setup, report["rows"][label], merged)
    # RegMean is not the simple average here (whose linear weights it replaces).
    expected = independent_results(setup, merged)
    average = independent_results(setup, mf.reference_simple_average([mf.backbone(mf.load_state(setup.pool[t])) for t in TASKS]))
    assert all(abs(expected[task].loss - average[task].loss) > 1e-3 for task in TASKS)


def test_the_gram_pass_reads_images_and_never_a_label(setup, tmp_path, monkeypatch):
    original = datasets.Dataset.__getitem__
    train_reads = []

    def guarded(self, key):
        result = original(self, key)
        if any("/train/" in file["filename"] for file in self.cache_files):
            if key == "label" or (isinstance(result, dict) and "label" in result):
                raise AssertionError(f"a train label was read ({key!r})")
            train_reads.append((key, self.format["type"]))
        return result

    monkeypatch.setattr(datasets.Dataset, "__getitem__", guarded)
    main(args(setup, tmp_path, "--trainer.devices", "1"))
    # Every gram image decoded once, in batches of 4, from the train splits alone; the up-front
    # image check (datamodules.images.check_images) reads the same rows' stored bytes, as Arrow.
    decoded = [row for key, kind in train_reads if isinstance(key, list) and kind != "arrow" for row in key]
    checked = [row for key, kind in train_reads if isinstance(key, list) and kind == "arrow" for row in key]
    assert len(decoded) == sum(GRAM_COUNTS.values())
    assert 0 < len(checked) <= sum(GRAM_COUNTS.values())
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
    # Each is the closed form of its Grams (float64 sums over the ranks' rows in other orders), so
    # each is within the bound of the independent RegMean, and each report scores its weights.
    for run in ("one", "two"):
        merged = assert_is_the_regmean(setup, tmp_path / run / "saved")
        report = read_report(tmp_path / run)
        assert report["gram_images"] == GRAM_COUNTS
        ((name, row),) = report["rows"].items()
        assert name == f"regmean(reduce_non_diagonal_ratio={RATIO})"
        assert_row_matches(setup, row, merged)


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
