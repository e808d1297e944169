"""FusionBench's ConvNeXt pool and task pool, in this project's terms: ``ModelPool.load_model``,
``load_processor`` and ``save_model``, a pool of ``_pretrained_`` alone, and
``lightning_modules.python_api.evaluate``: the numbers of ``merge.py test``, on one process or two."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from transformers import AutoModelForImageClassification, ConvNextForImageClassification, ConvNextImageProcessor

import merge_fixtures as mf
from common.errors import CheckpointError
from datamodules.errors import DataError
from datamodules.tasks import get_task
from lightning_modules.python_api import evaluate, merged_classifier, model_pool, save_merged_model
from merge import main
from merging import MergeError, ModelPool, SimpleAverage, SwitchModule, TaskArithmetic, merge_backbone
from merging.saved import load_merged
from tolerances import mean_rtol

TASKS = ("eurosat", "dtd")
SIZES = {"eurosat": 11, "dtd": 7}  # odd: 6 + 5 and 4 + 3 images per process on two
SCRIPT = Path(__file__).parent / "ddp_scripts" / "python_evaluate.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[dict[str, str], dict[str, str]]:
    """A tiny pool (``_pretrained_`` with a 10-class head, a fine-tune per task) and a test set per task."""
    root = tmp_path_factory.mktemp("python_api")
    pool = mf.make_pool(root / "models", TASKS, seed=3)
    data = {
        task: str(mf.make_test_set(root / "data" / task, task, SIZES[task], pool[task], seed=40 + i))
        for i, task in enumerate(TASKS)
    }
    return pool, data


def seed_page_pool(directory: str, **entry) -> ModelPool:
    """FusionBench's seed-page pool: ``_pretrained_`` alone, as a ``config_path`` entry."""
    return model_pool({mf.PRETRAINED: {"config_path": directory, "pretrained": True, **entry}})


def backbone_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: tensor for key, tensor in model.state_dict().items() if key.startswith("convnext.")}


# --- ModelPool: load_model, load_processor, save_model -----------------------------------------


def test_a_pool_of_the_pretrained_model_alone_loads_it_with_a_head_for_dataset_name(setup):
    pool_dirs, _ = setup
    pretrained = pool_dirs[mf.PRETRAINED]
    pool = seed_page_pool(pretrained, dataset_name="dtd")
    assert pool.task_names == []
    model = pool.load_model("_pretrained_")
    assert type(model) is ConvNextForImageClassification and not model.training
    stored = mf.load_state(pretrained)
    assert all(torch.equal(tensor, stored[key]) for key, tensor in backbone_of(model).items())
    assert len(backbone_of(model)) == len(mf.backbone(stored))
    # A new head of DTD's 47 classes (the checkpoint's has 10), named by the task's class names.
    classnames = list(get_task("dtd").classnames)
    assert (model.classifier.in_features, model.classifier.out_features) == (64, 47)
    assert model.config.num_labels == 47
    assert model.config.id2label == dict(enumerate(classnames))
    assert model.config.label2id == {name: index for index, name in enumerate(classnames)}
    assert model(pixel_values=torch.zeros(2, 3, 32, 32)).logits.shape == (2, 47)

    processor = pool.load_processor()
    assert isinstance(processor, ConvNextImageProcessor)
    assert processor.size == json.loads(mf.PROCESSOR_FILE.read_text())["size"]

    # Without dataset_name (FusionBench's null), the checkpoint's own head and labels.
    own = seed_page_pool(pretrained, dataset_name=None).load_model("_pretrained_")
    assert torch.equal(own.classifier.weight, stored["classifier.weight"]) and own.config.num_labels == 10

    # Merging it is refused where the merge starts, in one line.
    with pytest.raises(MergeError) as error:
        merge_backbone(pool, SimpleAverage(), progress=False)
    assert str(error.value) == "the model pool has no fine-tuned models: add one entry per task besides _pretrained_"


def test_pretrained_false_builds_the_architecture_from_its_config(setup):
    pool_dirs, _ = setup
    pool = model_pool({
        mf.PRETRAINED: {"config_path": pool_dirs[mf.PRETRAINED], "pretrained": False, "dataset_name": "eurosat"},
        "dtd": pool_dirs["dtd"],
    })  # fmt: skip
    model = pool.load_model(mf.PRETRAINED)
    stored = mf.load_state(pool_dirs[mf.PRETRAINED])
    weights = backbone_of(model)
    assert {key: tensor.shape for key, tensor in weights.items()} == {
        key: tensor.shape for key, tensor in mf.backbone(stored).items()
    }
    assert not any(torch.equal(weights[key], stored[key]) for key in weights if key.endswith("pwconv1.weight"))
    assert model.classifier.out_features == 10 and model.config.id2label[0] == get_task("eurosat").classnames[0]
    # A merge reads checkpoint weights: an entry that asks for random ones is refused.
    with pytest.raises(MergeError) as error:
        merge_backbone(pool, SimpleAverage(), progress=False)
    assert str(error.value) == (
        "the model pool's _pretrained_ has pretrained: false (random weights from the config), but a merge reads "
        "each checkpoint's weights: remove pretrained: false to merge"
    )


def test_a_finetuned_entry_keeps_its_trained_head(setup):
    pool_dirs, _ = setup
    pool = model_pool({mf.PRETRAINED: pool_dirs[mf.PRETRAINED], "dtd": {"config_path": pool_dirs["dtd"], "dataset_name": "DTD"}})
    model = pool.load_model("dtd")
    stored = mf.load_state(pool_dirs["dtd"])
    assert torch.equal(model.classifier.weight, stored["classifier.weight"])
    assert torch.equal(model.classifier.bias, stored["classifier.bias"])
    assert model.config.id2label == dict(enumerate(get_task("dtd").classnames))
    # A plain entry loads as the checkpoint is (AutoModelForImageClassification's model, in eval mode).
    plain = ModelPool(pool_dirs).load_model("eurosat")
    reference = AutoModelForImageClassification.from_pretrained(pool_dirs["eurosat"])
    assert all(torch.equal(tensor, reference.state_dict()[key]) for key, tensor in plain.state_dict().items())


@pytest.mark.parametrize(
    "case",
    ["unknown dataset_name", "another task's head", "no class names", "not in the pool", "pretrained not a bool"],
)
def test_what_load_model_refuses_is_one_line(setup, case):
    pool_dirs, _ = setup
    pretrained = pool_dirs[mf.PRETRAINED]
    if case == "unknown dataset_name":  # checked when the pool is built, before any loading
        with pytest.raises(DataError, match=r"^unknown task 'eurosatt'\. Did you mean 'eurosat'\?"):
            seed_page_pool(pretrained, dataset_name="eurosatt")
        return
    if case == "pretrained not a bool":
        with pytest.raises(MergeError) as error:
            seed_page_pool(pretrained, pretrained="yes")
        assert str(error.value) == "pool entry '_pretrained_': pretrained must be true or false, got 'yes'"
        return
    if case == "another task's head":  # the DTD fine-tune declared a EuroSAT model
        pool = model_pool({mf.PRETRAINED: pretrained, "x": {"config_path": pool_dirs["dtd"], "dataset_name": "eurosat"}})
        with pytest.raises(CheckpointError) as error:
            pool.load_model("eurosat")
        assert str(error.value) == f"checkpoint '{pool_dirs['dtd']}' has a 47-class head, but the task has 10 classes"
        return
    if case == "no class names":  # merging.ModelPool does not know the tasks' class names
        pool = ModelPool({mf.PRETRAINED: {"config_path": pretrained, "dataset_name": "dtd"}})
        with pytest.raises(MergeError, match=r"^the model pool knows no class names to size a head for task 'dtd'"):
            pool.load_model(mf.PRETRAINED)
        # given as a mapping, they size it
        given = ModelPool({mf.PRETRAINED: {"config_path": pretrained, "dataset_name": "dtd"}}, classnames={"dtd": ["a", "b"]})
        assert given.load_model(mf.PRETRAINED).config.id2label == {0: "a", 1: "b"}
        return
    with pytest.raises(MergeError) as error:
        model_pool(pool_dirs).load_model("cifar10")
    assert str(error.value) == "no model 'cifar10' in the model pool (models: _pretrained_, eurosat, dtd)"


def test_save_model_writes_a_checkpoint_that_loads_whole(setup, tmp_path):
    pool_dirs, _ = setup
    pool = seed_page_pool(pool_dirs[mf.PRETRAINED], dataset_name="dtd")
    model = pool.load_model(mf.PRETRAINED)
    target = tmp_path / "saved"
    pool.save_model(model, target)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {path.name for path in target.iterdir()}
    again = AutoModelForImageClassification.from_pretrained(target)
    assert again.config.id2label == model.config.id2label
    assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in again.state_dict().items())
    assert ConvNextImageProcessor.from_pretrained(target).size == pool.load_processor().size
    with pytest.raises(CheckpointError) as error:
        pool.save_model(model, target)
    assert str(error.value) == f"output directory '{target}' already exists; pass overwrite=True to replace it"
    assert [path.name for path in tmp_path.iterdir()] == ["saved"], "no staging folder left"


# --- evaluate: merge.py test's numbers from Python ----------------------------------------------


class RecordingWandbLogger(WandbLogger):
    """Lightning's W&B logger that records tables and images instead of starting a run (the
    Trainer asks for ``experiment`` at setup, which would start one)."""

    def __init__(self) -> None:
        super().__init__(offline=True)
        self.tables, self.images, self.metrics = {}, {}, {}

    @property
    def experiment(self) -> SimpleNamespace:
        return SimpleNamespace()

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.update(metrics)

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None) -> None:
        self.tables[key] = (columns, data)

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.images[key] = [Path(image).read_bytes()[:8] for image in images]

    def save(self) -> None:
        pass

    def finalize(self, status) -> None:
        pass


def quiet_trainer(**options) -> Trainer:
    defaults = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    return Trainer(accelerator="cpu", devices=1, **{**defaults, **options})


@pytest.fixture(scope="module")
def cli_report(setup, tmp_path_factory) -> dict:
    """``merge.py test`` of the pool's task arithmetic (0.7) at batch 4: the reference."""
    pool_dirs, data = setup
    out = tmp_path_factory.mktemp("cli")
    argv = sys.argv
    sys.argv = ["merge.py"]
    try:
        main([
            *mf.merge_test_args(out, data, pool_dirs[mf.PRETRAINED], 4),
            "--model", "lightning_modules.merged.MergedClassifier", "--model.models", json.dumps(pool_dirs),
            "--model.method", "TaskArithmetic", "--model.method.scaling_factor", "0.7",
            "--model.report_dir", str(out / "report"),
        ])  # fmt: skip
    finally:
        sys.argv = argv
    return json.loads((out / "report" / "report.json").read_text())


def assert_rows_equal(got: dict, expected: dict) -> None:
    """The same weights, batches and kernels on the same machine: the same bits."""
    for task in TASKS:
        assert got["tasks"][task] == expected["tasks"][task], task
        assert got["tasks"][task]["num_samples"] == SIZES[task]
    assert got["average_accuracy"] == expected["average_accuracy"]


def test_evaluate_gives_merge_py_test_s_numbers(setup, cli_report, tmp_path):
    pool_dirs, data = setup
    pool = model_pool(pool_dirs)
    method = TaskArithmetic(scaling_factor=0.7)
    merged = merge_backbone(pool, method, progress=False)
    expected = cli_report["rows"][cli_report["method"]]

    # The merged tensors, the pool's fine-tuned heads, the report files and the W&B table.
    logger = RecordingWandbLogger()
    report = evaluate(
        merged, TASKS, pool, paths=data, batch_size=4, num_workers=0, report_dir=tmp_path / "report",
        trainer=quiet_trainer(logger=logger),
    )  # fmt: skip
    assert list(report["rows"]) == ["merged"] and "partial" not in report
    assert_rows_equal(report["rows"]["merged"], expected)
    assert report["models"] == pool_dirs
    assert sorted(path.name for path in (tmp_path / "report").iterdir()) == mf.REPORT_FILES
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == report
    columns, rows = logger.tables["test/report"]
    assert columns == ["model", "EuSAT", "DTD", "average"]
    assert rows == [["merged", *(f"{100 * report['rows']['merged']['tasks'][t]['accuracy']:.2f}" for t in TASKS),
                     f"{100 * report['rows']['merged']['average_accuracy']:.2f}"]]  # fmt: skip
    assert logger.images == {"test/accuracy_chart": [b"\x89PNG\r\n\x1a\n"], "test/accuracy_heatmap": [b"\x89PNG\r\n\x1a\n"]}
    assert logger.metrics["test/eurosat/accuracy"] == expected["tasks"]["eurosat"]["accuracy"]

    # FusionBench's way: every model loaded, the heads in a SwitchModule as the merged model's
    # classifier. No report_dir: nothing written, the numbers returned.
    models = {task: pool.load_model(task) for task in pool.task_names}
    fused = pool.load_model(mf.PRETRAINED)
    fused.convnext.load_state_dict({key.removeprefix("convnext."): tensor for key, tensor in merged.items()})
    fused.classifier = SwitchModule({task: model.classifier for task, model in models.items()})
    again = evaluate(fused, TASKS, paths=data, processor=pool_dirs[mf.PRETRAINED], batch_size=4, num_workers=0,
                     trainer=quiet_trainer())  # fmt: skip
    assert_rows_equal(again["rows"]["merged"], expected)
    assert "models" not in again

    # One task's classifier with the merged backbone, as --model.export_dir writes it.
    dtd = merged_classifier(pool, "dtd", merged)
    assert torch.equal(dtd.classifier.weight, models["dtd"].classifier.weight)
    assert all(torch.equal(dtd.state_dict()[key], tensor) for key, tensor in merged.items())

    # A partial run says so.
    partial = evaluate(merged, ["dtd"], pool, paths={"dtd": data["dtd"]}, batch_size=4, num_workers=0,
                       trainer=quiet_trainer(limit_test_batches=1))  # fmt: skip
    assert partial["partial"] is True and partial["rows"]["merged"]["tasks"]["dtd"]["num_samples"] == 4


def test_a_merge_saved_from_python_is_evaluated_again_by_merge_py(setup, cli_report, tmp_path, quiet_cli):
    pool_dirs, data = setup
    pool = model_pool(pool_dirs)
    method = TaskArithmetic(scaling_factor=0.7)
    saved = tmp_path / "merged"
    save_merged_model(saved, merge_backbone(pool, method, progress=False), pool, method)
    assert load_merged(saved).info["method"] == "task_arithmetic(scaling_factor=0.7)"
    main([
        *mf.merge_test_args(tmp_path, data, pool_dirs[mf.PRETRAINED], 4),
        "--model", "lightning_modules.merged.MergedClassifier", "--model.merged_model", str(saved),
        "--model.report_dir", str(tmp_path / "report"),
    ])  # fmt: skip
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert_rows_equal(report["rows"][cli_report["method"]], cli_report["rows"][cli_report["method"]])
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        save_merged_model(saved, {}, pool, method)


@pytest.mark.parametrize("case", ["tensors without a pool", "no heads", "a head of the wrong size", "nothing evaluated"])
def test_what_evaluate_refuses_is_one_line(setup, case):
    pool_dirs, data = setup
    pool = model_pool(pool_dirs)
    merged = mf.backbone(mf.load_state(pool_dirs["dtd"]))
    arguments = {"paths": data, "num_workers": 0, "trainer": quiet_trainer()}
    if case == "tensors without a pool":
        call, message = (
            lambda: evaluate(merged, TASKS, processor=pool_dirs[mf.PRETRAINED], **arguments),
            ("a backbone given as tensors needs its config: pass pool= (the model pool it was merged from)"),
        )
    elif case == "no heads":
        model = pool.load_model("dtd")
        call, message = (
            lambda: evaluate(model, TASKS, processor=pool_dirs[mf.PRETRAINED], **arguments),
            ("no heads to evaluate with: pass heads= (a SwitchModule or task -> head) or pool= (its fine-tuned heads)"),
        )
    elif case == "a head of the wrong size":
        heads = {"eurosat": torch.nn.Linear(64, 10), "dtd": torch.nn.Linear(64, 10)}
        call, message = (
            lambda: evaluate(merged, TASKS, pool, heads, **arguments),
            ("the head for task 'dtd' has 10 outputs, but the task has 47 classes"),
        )
    else:
        arguments["trainer"] = quiet_trainer(limit_test_batches=0)
        call, message = (
            lambda: evaluate(merged, TASKS, pool, **arguments),
            ("trainer.limit_test_batches 0 evaluates nothing, and ModelEvaluation saves nothing: nothing would be done"),
        )
    with pytest.raises(MergeError) as error:
        call()
    assert str(error.value) == message


def test_evaluate_on_two_processes_gives_the_one_process_numbers(setup, tmp_path, one_thread):
    """The script a user would write, with a DDP Trainer of two CPU processes (Lightning runs the
    script again for the second); one image a batch, as in tests/test_merge_ddp.py, so each
    image's logits are the same bits however the images are shared out."""
    pool_dirs, data = setup
    (tmp_path / "pool.json").write_text(json.dumps(pool_dirs))
    (tmp_path / "data.json").write_text(json.dumps(data))
    command = [sys.executable, str(SCRIPT), str(tmp_path), "2", str(tmp_path / "pool.json"), str(tmp_path / "data.json")]
    env = mf.subprocess_env(MASTER_PORT=str(mf.free_port()))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr  # really two processes
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0] == reports[1], "every process returns the same report"
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == reports[0]

    pool = model_pool(pool_dirs)
    single = evaluate(merge_backbone(pool, SimpleAverage(), progress=False), TASKS, pool, paths=data, batch_size=1,
                      num_workers=0, trainer=quiet_trainer())  # fmt: skip
    for task in TASKS:
        got, expected = reports[0]["rows"]["merged"]["tasks"][task], single["rows"]["merged"]["tasks"][task]
        assert got["num_samples"] == expected["num_samples"] == SIZES[task]
        assert got["accuracy"] == expected["accuracy"]
        # the same per-image losses, added in another order (per rank, then over ranks)
        assert got["loss"] == pytest.approx(expected["loss"], rel=mean_rtol(SIZES[task]), abs=0)
