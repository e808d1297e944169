"""The whole flow, family by family (ConvNeXt-V2, ResNet, ViT, DINOv2, Swin; ConvNeXt's is the rest
of the suite), on tiny models of each (``tests/families.py``, each with its family's own image
processor at 32 pixels) and tiny stand-ins of two tasks.

Per family, through the real CLIs in-process:

1. ``train.py fit --config configs/train/<task>.yaml`` unchanged but for the one line that changes
   the family (``--model.model_name_or_path`` and ``--data.processor``: the tiny pretrained model)
   and the rehearsal's steps, batch, data path and accelerator: two tasks fine-tuned and exported
   (weights, config, card, the family's processor), and a run that ended at step 2 resumed with
   ``--ckpt_path last`` and two more steps ends with the uninterrupted run's export, bit for bit
   (Swin's stochastic depth included);
2. ``merge.py fit`` (AdaMerging) on the two exports: every backbone tensor's coefficient, BatchNorm's
   running statistics too, learned through the family's features;
3. ``merge.py test`` with ``MethodComparison``: simple average, task arithmetic, TIES, TSV-M,
   Iso-CTS, RegMean (after its Gram pass) and the AdaMerging coefficients, and each fine-tuned
   model alone, in one pass, in float64: every row scores every test image once, and each row
   that merges without data equals an independent float64 evaluation of the merged backbone
   through the Hugging Face classifier itself (the merged tensors written as a checkpoint and
   read back by ``from_pretrained``);
4. ``merge.py test --model.export_dir``: each task's classifier, loaded by
   ``pipeline("image-classification")``, is the merged backbone with the task's head.

For ResNet and ViT, a CNN with BatchNorm and a transformer, also:

5. the same comparison on two processes gives the one-process report. It costs a DDP subprocess
   (about 25 s on two cores) a family, which the suite's time allows for two; what differs between
   families there is the merged tensors' digest across ranks (ResNet's 0-d BatchNorm counters) and
   the features, which those two cover.

The whole file: about 90 s on two cores (``--durations``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, pipeline

import families
import hf_home
import merge_fixtures as mf
from common.architectures import architecture
from conftest import REPO_ROOT
from datamodules.preprocessing import ImagePreprocessor
from datamodules.tasks import get_task
from merge import main as merge_main
from merging import IsotropicCommonTask, LearnedCoefficients, SimpleAverage, TaskArithmetic, TaskSingularVectors, TiesMerging
from merging.engine import merge_backbone
from merging.pool import ModelPool
from tolerances import mean_rtol
from train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ("eurosat", "mnist")
SIZES = {"train": 24, "test": 13}  # 13 test images: 7 + 6 on two processes
GRAM_IMAGES = 8
STEPS = 4
TRAIN = [
    "--trainer.logger=false", "--trainer.accelerator=cpu", "--data.num_workers=0", "--data.batch_size=8",
    "--trainer.val_check_interval=2", "--trainer.callbacks.every_n_train_steps=2", *mf.QUIET,
]  # fmt: skip
#: The methods of the comparison that merge without data, as the CLI builds them.
METHODS = {
    "simple_average": SimpleAverage(),
    "task_arithmetic(scaling_factor=0.4)": TaskArithmetic(scaling_factor=0.4),
    "ties(top_k=0.3, scaling_factor=0.8)": TiesMerging(top_k=0.3, scaling_factor=0.8),
    "tsv_m(scaling_factor=1)": TaskSingularVectors(),
    "iso_cts(common_space_fraction=0.8, scaling_factor=1)": IsotropicCommonTask(),
}
REGMEAN = "regmean(reduce_non_diagonal_ratio=0.9)"
ADAMERGING = "adamerging(layer-wise)"


@dataclass
class Flow:
    model_type: str
    root: Path
    pretrained: Path
    data: dict[str, str]
    exports: dict[str, Path]
    resumed: Path
    coefficients: Path
    report: dict


def in_process(main, args: list[str], cwd: Path) -> None:
    """A CLI run as a user runs it, from ``cwd``, quiet."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["cli"])
        patch.setenv("WANDB_SILENT", "true")
        main(args)


def fine_tune(task: str, pretrained: Path, data: str, cwd: Path, steps: int, *extra: str) -> Path:
    config = REPO_ROOT / "configs" / "train" / f"{task}.yaml"
    change_family = [f"--model.model_name_or_path={pretrained}", f"--data.processor={pretrained}"]
    cwd.mkdir(parents=True, exist_ok=True)
    in_process(train_main, ["fit", "--config", str(config), *change_family, f"--data.path={data}", *TRAIN,
                            f"--trainer.max_steps={steps}", *extra], cwd)  # fmt: skip
    return cwd / "exports" / f"{pretrained.name}_{get_task(task).hub_name}_sgd_batch-size-8_lr-0.01_steps-{steps}"


def merge_args(pool: dict, data: dict, out: Path, *model: str, precision: str = "64-true") -> list[str]:
    """``merge.py``'s options but the subcommand: one CPU process, batches of one image (each
    image's logits the same computation however the images are shared out over processes)."""
    return [
        *mf.merge_test_args(out, data, pool[families.PRETRAINED], 1)[1:],
        "--trainer.precision", precision,
        *model,  # the class first, then its options
        "--model.models", json.dumps(pool),
    ]  # fmt: skip


def comparison(coefficients: Path, out: Path) -> list[str]:
    methods = [
        {"class_path": "merging.SimpleAverage"},
        {"class_path": "merging.TaskArithmetic", "init_args": {"scaling_factor": 0.4}},
        {"class_path": "merging.TiesMerging", "init_args": {"top_k": 0.3, "scaling_factor": 0.8}},
        {"class_path": "merging.TaskSingularVectors"},
        {"class_path": "merging.IsotropicCommonTask"},
        {"class_path": "merging.RegMean", "init_args": {"reduce_non_diagonal_ratio": 0.9}},
        {"class_path": "merging.LearnedCoefficients", "init_args": {"coefficients": str(coefficients), "label": ADAMERGING}},
    ]
    return [
        "--model", "lightning_modules.comparison.MethodComparison",
        "--model.methods", json.dumps(methods),
        "--model.evaluate_individual", "true",
        "--model.report_dir", str(out / "report"),
        "--data.gram_images", str(GRAM_IMAGES),
    ]  # fmt: skip


@pytest.fixture(scope="module", params=families.OTHER_FAMILIES)
def flow(request, tmp_path_factory) -> Flow:
    model_type = request.param
    root = tmp_path_factory.mktemp(f"flow-{model_type}")
    pretrained = families.make_pretrained(model_type, root / f"tiny-{model_type}")
    data = {}
    for index, task in enumerate(TASKS):
        data[task] = str(root / "data" / task)
        hf_home.standin(task, SIZES, seed=index).save_to_disk(data[task])
    exports = {task: fine_tune(task, pretrained, data[task], root / "train", STEPS) for task in TASKS}
    # Interrupted after two steps, resumed from its last checkpoint for the two others.
    fine_tune(TASKS[0], pretrained, data[TASKS[0]], root / "resume", 2)
    resumed = fine_tune(TASKS[0], pretrained, data[TASKS[0]], root / "resume", STEPS, "--ckpt_path=last")
    pool = {families.PRETRAINED: str(pretrained), **{task: str(path) for task, path in exports.items()}}
    ada = root / "adamerging"
    in_process(merge_main, [
        "fit", *merge_args(pool, data, ada, "--model", "lightning_modules.adamerging.AdaMerging"),
        "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false", "--data.adaptation_batch_size", "4",
        "--model.lr", "0.05", "--model.output_dir", str(ada / "coefficients"), "--model.report_dir", str(ada / "report"),
    ], root)  # fmt: skip
    coefficients = ada / "coefficients" / "coefficients.json"
    out = root / "compare"
    in_process(merge_main, ["test", *merge_args(pool, data, out, *comparison(coefficients, out))], root)
    report = json.loads((out / "report" / "report.json").read_text())
    return Flow(model_type, root, pretrained, data, exports, resumed, coefficients, report)


def pool_of(flow: Flow) -> dict[str, str]:
    return {families.PRETRAINED: str(flow.pretrained), **{task: str(path) for task, path in flow.exports.items()}}


def test_each_task_is_fine_tuned_and_exported_as_its_familys_classifier(flow: Flow) -> None:
    record = architecture(flow.model_type)
    for task in TASKS:
        export = flow.exports[task]
        config = json.loads((export / "config.json").read_text())
        assert config["model_type"] == flow.model_type
        assert config["architectures"] == [record.classifier_class.__name__]
        assert config["id2label"] == {str(i): name for i, name in enumerate(get_task(task).classnames)}
        weights = load_file(export / "model.safetensors")
        assert weights[record.head_keys[0]].shape == (
            len(get_task(task).classnames),
            record.feature_size(record.classifier_class.config_class.from_dict(config)),
        )
        card = (export / "README.md").read_text()
        assert f"base_model: {flow.pretrained}" in card and "| steps | 4 |" in card and "| training images | 24 |" in card
        # The family's own processor, as the pretrained checkpoint has it.
        processor = AutoImageProcessor.from_pretrained(export)
        assert type(processor) is type(AutoImageProcessor.from_pretrained(flow.pretrained))
        assert processor.to_dict() == AutoImageProcessor.from_pretrained(flow.pretrained).to_dict()


def test_a_resumed_fine_tune_ends_with_the_uninterrupted_runs_weights(flow: Flow) -> None:
    straight, resumed = load_file(flow.exports[TASKS[0]] / "model.safetensors"), load_file(flow.resumed / "model.safetensors")
    assert straight.keys() == resumed.keys()
    different = [key for key in straight if not torch.equal(straight[key], resumed[key])]
    assert not different, different[:3]
    if flow.model_type == "swin":  # randomness in the forward pass: stochastic depth
        assert json.loads((flow.pretrained / "config.json").read_text())["drop_path_rate"] > 0
    # The fine-tune moved the backbone (BatchNorm's statistics too, in a ResNet).
    pretrained = load_file(flow.pretrained / "model.safetensors")
    record = architecture(flow.model_type)
    moved = [key for key in pretrained if not record.is_head_key(key) and not torch.equal(pretrained[key], straight[key])]
    assert moved
    if flow.model_type == "resnet":
        assert any(key.endswith("running_mean") for key in moved) and any(key.endswith("num_batches_tracked") for key in moved)


def test_adamerging_learns_every_backbone_tensors_coefficients(flow: Flow) -> None:
    content = json.loads(flow.coefficients.read_text())
    assert content["tasks"] == list(TASKS)
    keys = ModelPool(pool_of(flow)).merge_keys
    assert sorted(content["keys"]) == sorted(keys)
    table = content["coefficients"]
    assert list(table) == list(TASKS) and all(sorted(table[task]) == sorted(keys) for task in TASKS)
    moved = {key for task in TASKS for key, value in table[task].items() if value != 0.3}
    assert moved  # the entropy's gradient reached them through the family's features
    if flow.model_type == "resnet":
        # Eval-mode BatchNorm is a function of the running statistics too: their coefficients learn.
        assert any(key.endswith("running_mean") for key in moved) and any(key.endswith("running_var") for key in moved)


def test_every_method_scores_every_test_image_once(flow: Flow) -> None:
    rows = set(METHODS) | {REGMEAN, ADAMERGING, "individual"}
    assert set(flow.report["rows"]) == rows
    for name, row in flow.report["rows"].items():
        assert [values["num_samples"] for values in row["tasks"].values()] == [SIZES["test"]] * len(TASKS), name
    assert flow.report["gram_images"] == dict.fromkeys(TASKS, GRAM_IMAGES)
    assert "partial" not in flow.report


def reference_scores(
    flow: Flow, backbone: dict[str, torch.Tensor], task: str, directory: Path, gap: float = 1e-9
) -> dict[str, float]:
    """The merged backbone with ``task``'s head, written as a Hugging Face checkpoint and read back by
    ``from_pretrained`` (its own key names, not the project's), in float64 on the task's test images.
    ``gap``: how far apart, relative to the largest logit, the two top logits of every image must be
    for the argmax to be the same in the project's evaluation of weights that close."""
    record = architecture(flow.model_type)
    head = {key: tensor for key, tensor in load_file(flow.exports[task] / "model.safetensors").items() if record.is_head_key(key)}
    directory.mkdir(parents=True)
    save_file({**backbone, **head}, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text((flow.exports[task] / "config.json").read_text())
    model, info = record.classifier_class.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model = model.double().eval()
    images, labels = mf.read_test_set(flow.data[task])
    preprocess = ImagePreprocessor.from_pretrained(str(flow.pretrained))
    with torch.no_grad():
        logits = model(pixel_values=torch.stack([preprocess(image) for image in images]).double()).logits
    top = logits.topk(2, dim=1).values
    assert bool((top[:, 0] - top[:, 1] > gap * logits.abs().amax()).all())
    return mf.evaluate(logits, labels)


def test_each_merge_without_data_equals_an_independent_evaluation(flow: Flow, tmp_path: Path) -> None:
    pool = ModelPool(pool_of(flow))
    for name, method in METHODS.items():
        merged = merge_backbone(pool, method, progress=False)
        expected = {task: reference_scores(flow, merged, task, tmp_path / f"{method.name}-{task}") for task in TASKS}
        mf.assert_row_matches(flow.report["rows"][name], expected, dict.fromkeys(TASKS, SIZES["test"]), rel=1e-9)
    # The coefficients' row: merged by the engine in float32 (LearnedCoefficients), as AdaMerging's own
    # test would merge them in the module's float64 from float32 task vectors: weights within a few
    # float32 roundings of each other, so top logits further apart than 1e-5 keep their order.
    adamerging = merge_backbone(pool, LearnedCoefficients(str(flow.coefficients)), progress=False)
    expected = {task: reference_scores(flow, adamerging, task, tmp_path / f"adamerging-{task}", gap=1e-5) for task in TASKS}
    mf.assert_row_matches(flow.report["rows"][ADAMERGING], expected, dict.fromkeys(TASKS, SIZES["test"]), rel=1e-5)


#: The families whose flow includes the two-process comparison (see the module's docstring).
FULL_FLOW = ("resnet", "vit")


@pytest.mark.parametrize("flow", FULL_FLOW, indirect=True)
def test_two_processes_give_the_one_process_report(flow: Flow, tmp_path: Path) -> None:
    pool = pool_of(flow)
    command = [
        "test", *merge_args(pool, flow.data, tmp_path, *comparison(flow.coefficients, tmp_path)),
        "--trainer.devices", "2", "--trainer.strategy", "ddp",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "merge.py"), *command],
        cwd=tmp_path, env=mf.subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "MEMBER: 2/2" in output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["gram_images"] == flow.report["gram_images"]
    for name, row in flow.report["rows"].items():
        for task in TASKS:
            got, expected = report["rows"][name]["tasks"][task], row["tasks"][task]
            assert got["num_samples"] == expected["num_samples"] == SIZES["test"], (name, task)
            if name == REGMEAN:
                # Its Grams are summed over the ranks in another order: weights within float64 rounding.
                assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6), (name, task)
                continue
            assert got["accuracy"] == expected["accuracy"], (name, task)
            # The mean loss is a torchmetrics state, float32 in a float64 run too (torchmetrics keeps
            # its states' dtype through ``.double()``), summed per rank and then over ranks.
            assert got["loss"] == pytest.approx(expected["loss"], rel=mean_rtol(SIZES["test"]), abs=0), (name, task)


def test_the_per_task_exports_load_in_a_pipeline(flow: Flow, tmp_path: Path) -> None:
    pool = pool_of(flow)
    exports = tmp_path / "exports"
    in_process(merge_main, [
        "test",
        *merge_args(pool, flow.data, tmp_path, "--model", "lightning_modules.merged.MergedClassifier", precision="32-true"),
        "--model.method", "TaskArithmetic", "--model.method.scaling_factor", "0.4",
        "--model.export_dir", str(exports), "--model.report_dir", str(tmp_path / "report"),
        "--trainer.limit_test_batches", "0",
    ], tmp_path)  # fmt: skip
    record = architecture(flow.model_type)
    merged = merge_backbone(ModelPool(pool), TaskArithmetic(scaling_factor=0.4), progress=False)
    images, _ = mf.read_test_set(flow.data[TASKS[0]])
    for task in TASKS:
        weights = load_file(exports / task / "model.safetensors")
        head = {key: t for key, t in load_file(flow.exports[task] / "model.safetensors").items() if record.is_head_key(key)}
        assert weights.keys() == merged.keys() | head.keys()
        assert all(torch.equal(weights[key], tensor) for key, tensor in {**merged, **head}.items())
        classify = pipeline("image-classification", model=str(exports / task), device="cpu")
        predicted = classify(images[:4], top_k=1)
        model = record.classifier_class.from_pretrained(exports / task).eval()
        pixels = AutoImageProcessor.from_pretrained(exports / task)(images[:4], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            probabilities = model(pixel_values=pixels).logits.softmax(dim=1)
        for answer, row in zip(predicted, probabilities):
            assert answer[0]["label"] == model.config.id2label[int(row.argmax())]
            assert answer[0]["score"] == pytest.approx(float(row.max()), rel=1e-5)
        assert f"# Merged {record.name} for {task}" in (exports / task / "README.md").read_text()
