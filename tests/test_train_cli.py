"""``train.py`` end to end, offline on CPU: every config, export, resume, W&B offline, bad input.

Runs go through the real CLI in-process (``main([...])``) with the working directory in
``tmp_path``, so the configs' relative ``outputs/`` and ``exports`` land there. The models are
a tiny ConvNeXt built in ``tmp_path`` and the datasets tiny ``save_to_disk`` folders with the
task's class count.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import ConvNextForImageClassification

import train_cli_callbacks
from conftest import REPO_ROOT as REPO
from conftest import index_dataset, tiny_config, write_dataset
from datamodules import FUSIONBENCH_TASKS, get_task
from tolerances import assert_within, logit_bound
from train import main

TESTS = Path(__file__).resolve().parent
BASE_CONFIG = REPO / "configs" / "train" / "base.yaml"
TRAIN_CONFIGS = sorted(path for path in (REPO / "configs" / "train").glob("*.yaml") if path != BASE_CONFIG)
# configs/quickstart also holds merge.py's configs: those name several tasks (data.tasks).
QUICKSTART_CONFIGS = [
    path
    for path in sorted((REPO / "configs" / "quickstart").glob("*.yaml"))
    if "task" in yaml.safe_load(path.read_text()).get("data", {})
]
TINY_32 = REPO / "configs" / "quickstart" / "convnext-tiny-32"
#: The recipe's SGD settings, from the one file that holds them (the classifier has no defaults).
RECIPE_SGD = {name: yaml.safe_load(BASE_CONFIG.read_text())["model"][name] for name in ("lr", "momentum", "weight_decay")}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
RECORD = "--trainer.callbacks+=train_cli_callbacks.Record"


@pytest.fixture(autouse=True)
def fresh_records(quiet_cli: Path) -> None:
    """Every test runs the CLI from its own scratch folder and reads only its own records."""
    train_cli_callbacks.RECORDED.clear()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrained-style checkpoint directory: ConvNeXt with 8-64 channels, 32x32 inputs."""
    directory = tmp_path_factory.mktemp("models") / "tiny"
    torch.manual_seed(0)
    config = tiny_config(image_size=32, num_labels=10)
    ConvNextForImageClassification(config).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text((TINY_32 / "preprocessor_config.json").read_text())
    return directory


def make_dataset(directory: Path, task: str, num_train: int = 40, num_test: int = 8) -> Path:
    """A ``save_to_disk`` dataset with the task's class names, rows labelled ``i % num_classes``."""
    write_dataset(index_dataset({"train": num_train, "test": num_test}, get_task(task).classnames), directory, "disk")
    return directory


@pytest.fixture(scope="module")
def mnist_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "mnist", "mnist")


def tiny_args(model: Path, data: Path) -> list[str]:
    return [
        f"--model.model_name_or_path={model}",
        f"--data.processor={model}",
        f"--data.path={data}",
        "--data.batch_size=8",
        "--data.num_workers=0",
    ]


def short_run(steps: int, every: int) -> list[str]:
    """``steps`` optimizer steps, validating and checkpointing every ``every``."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": "checkpoints", "every_n_train_steps": every, "save_last": True, "save_top_k": -1},
    }
    return [
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={every}",
        f"--trainer.callbacks=[{json.dumps(checkpoint)}]",
    ]


def export_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


# --- 1. every config --------------------------------------------------------------------------


@pytest.mark.parametrize("config", TRAIN_CONFIGS + QUICKSTART_CONFIGS, ids=lambda path: path.stem)
def test_config_parses(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    if config.parent.name == "train":
        task = config.stem
        assert printed["data"]["task"] == task and printed["data"]["batch_size"] == 64
        assert printed["model"]["model_name_or_path"] == "facebook/convnext-base-224"
        assert (printed["model"]["lr"], printed["model"]["momentum"], printed["model"]["weight_decay"]) == (0.01, 0.9, 1e-4)
        assert printed["trainer"]["max_steps"] == 4000 and printed["trainer"]["precision"] == "32-true"
        assert printed["trainer"]["val_check_interval"] == 1000 and printed["seed_everything"] == 0
        checkpoint = printed["trainer"]["callbacks"][-1]["init_args"]
        # No dirpath: <default_root_dir>/checkpoints, as test_train_config_fast_dev_run sees it.
        assert checkpoint["dirpath"] is None and checkpoint["every_n_train_steps"] == 1000
        assert printed["trainer"]["default_root_dir"] == f"outputs/train/{task}"
        assert printed["trainer"]["logger"]["init_args"]["name"] == task == printed["trainer"]["logger"]["init_args"]["group"]


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=lambda path: path.stem)
def test_a_task_file_names_its_task_and_nothing_else(config: Path) -> None:
    # The recipe lives once, in base.yaml; a task's file only says which task and where its run goes.
    task = config.stem
    assert yaml.safe_load(config.read_text()) == {
        "config": "base.yaml",
        "data.task": task,
        "trainer.default_root_dir": f"outputs/train/{task}",
        "trainer.logger.init_args.name": task,
        "trainer.logger.init_args.group": task,
    }
    base = yaml.safe_dump(yaml.safe_load(BASE_CONFIG.read_text()))  # its values, not its comments
    assert not any(name in base for name in FUSIONBENCH_TASKS), "base.yaml holds no task's name"


def test_train_configs_cover_every_hub_task() -> None:
    # TALL20's twenty tasks (which hold the eight) and the four others of the registry.
    assert sorted(path.stem for path in TRAIN_CONFIGS) == sorted(FUSIONBENCH_TASKS)


@pytest.mark.parametrize("config", QUICKSTART_CONFIGS, ids=lambda path: path.stem)
def test_quickstart_config_fast_dev_run(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real built-in data; only the base model (made by the quickstart's base stage) is replaced.
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.logger=false",
            f"--model.model_name_or_path={TINY_32}", "--model.pretrained=false", f"--data.processor={TINY_32}",
            *QUIET,
        ]
    )  # fmt: skip


CHECKPOINTING_QUICKSTART_CONFIGS = [path for path in QUICKSTART_CONFIGS if "ModelCheckpoint" in path.read_text()]


@pytest.mark.parametrize("config", CHECKPOINTING_QUICKSTART_CONFIGS, ids=lambda path: path.stem)
def test_quickstart_checkpoints_follow_default_root_dir(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``dirpath`` in the config: ``--trainer.default_root_dir`` moves the checkpoints with the run."""
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit", "--config", str(config), "--trainer.default_root_dir=elsewhere", "--trainer.logger=false",
            "--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
            "--trainer.callbacks.every_n_train_steps=1", f"--model.model_name_or_path={TINY_32}", "--model.pretrained=false",
            f"--data.processor={TINY_32}", "--export_dir=null", *QUIET,
        ]
    )  # fmt: skip
    checkpoints = tmp_path / "elsewhere" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("task", [path.stem for path in TRAIN_CONFIGS])
def test_train_config_fast_dev_run(task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "data", task, num_train=20, num_test=4)
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit", "--config", str(REPO / "configs" / "train" / f"{task}.yaml"), "--trainer.fast_dev_run=true",
            "--trainer.logger=false", f"--model.model_name_or_path={TINY_32}", "--model.pretrained=false",
            f"--data.processor={TINY_32}", f"--data.path={data}", "--data.num_workers=0", "--data.batch_size=4",
            RECORD, *QUIET,
        ]
    )  # fmt: skip
    model = train_cli_callbacks.RECORDED["module"].model
    assert model.classifier.out_features == get_task(task).num_classes
    root = tmp_path / "outputs" / "train" / task
    assert Path(train_cli_callbacks.RECORDED["default_root_dir"]).resolve() == root
    assert [Path(d).resolve() for d in train_cli_callbacks.RECORDED["checkpoint_dirs"]] == [root / "checkpoints"]


@pytest.mark.parametrize(
    "config", sorted((REPO / "configs").glob("*/*.yaml")), ids=lambda path: f"{path.parent.name}/{path.stem}"
)
def test_configs_draw_a_progress_bar_every_10_steps(config: Path) -> None:
    # Lightning's default Rich bar redraws 100 times a second: 0.85x a bare training loop on 2 cores.
    if config in TRAIN_CONFIGS:
        config = BASE_CONFIG  # a task's file takes the callbacks of base.yaml
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    bars = [c for c in callbacks if c["class_path"] == "lightning.pytorch.callbacks.TQDMProgressBar"]
    assert len(bars) == 1 and bars[0]["init_args"] == {"refresh_rate": 10}
    if any(callback["class_path"].endswith("ModelCheckpoint") for callback in callbacks):
        assert callbacks[-1]["class_path"].endswith("ModelCheckpoint"), "--trainer.callbacks.<arg> changes the last one"


@pytest.mark.parametrize("enabled", [True, False])
def test_enable_progress_bar_false_drops_the_configs_bar(
    enabled: bool, tiny_model: Path, mnist_data: Path, tmp_path, monkeypatch
) -> None:
    from lightning.pytorch.callbacks import TQDMProgressBar

    monkeypatch.chdir(tmp_path)
    main(
        ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false",
         *tiny_args(tiny_model, mnist_data), "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
         f"--trainer.enable_progress_bar={str(enabled).lower()}", "--export_dir=null", RECORD]
    )  # fmt: skip
    bar = train_cli_callbacks.RECORDED["module"].trainer.progress_bar_callback
    if enabled:
        assert isinstance(bar, TQDMProgressBar) and bar.refresh_rate == 10
    else:
        assert bar is None


# --- 1b. the reference recipe: every train row, test split for validation, train mode --------


def test_reference_recipe_trains_on_every_row_once_per_epoch(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decode_index, recwarn: pytest.WarningsRecorder
) -> None:
    data = make_dataset(tmp_path / "data", "mnist", num_train=40, num_test=8)
    monkeypatch.chdir(tmp_path)
    main(
        ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false",
         *tiny_args(tiny_model, data), *short_run(5, 5), "--trainer.callbacks+=train_cli_callbacks.RecordTrainingRows",
         RECORD, *QUIET]
    )  # fmt: skip
    seen = [decode_index(image) for batch in train_cli_callbacks.RECORDED["train_images"] for image in batch]
    assert sorted(seen) == list(range(40)), "5 steps of 8 are one epoch: every train row exactly once"
    data_module = train_cli_callbacks.RECORDED["module"].trainer.datamodule
    assert data_module.datasets["val"] is data_module.datasets["test"] and len(data_module.datasets["val"]) == 8
    card = (tmp_path / "exports" / "tiny_mnist_sgd_batch-size-8_lr-0.01_steps-5" / "README.md").read_text()
    for row in ("| training split | train (every row) |", "| training images | 40 |", "| validation split | test |"):
        assert row in card
    assert not [warning for warning in recwarn if "eval mode" in str(warning.message)]


@pytest.mark.parametrize("val_split", ["holdout", "none"])
def test_other_validation_splits(val_split: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "data", "mnist", num_train=40, num_test=8)
    monkeypatch.chdir(tmp_path)
    main(
        ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false",
         *tiny_args(tiny_model, data), *short_run(2, 2), f"--data.val_split={val_split}", RECORD, *QUIET]
    )  # fmt: skip
    card = (tmp_path / "exports" / "tiny_mnist_sgd_batch-size-8_lr-0.01_steps-2" / "README.md").read_text()
    if val_split == "holdout":
        assert "| training images | 36 |" in card and "| validation split | 0.1 of train held out (seed 0) |" in card
        assert "val/accuracy" in train_cli_callbacks.RECORDED["validate"]
    else:
        assert "| training images | 40 |" in card and "| validation split | none |" in card
        assert "validate" not in train_cli_callbacks.RECORDED and "val/accuracy" not in card


def test_model_scheduler_steps_the_learning_rate_and_the_card_says_which(
    tiny_model: Path, mnist_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false",
         *tiny_args(tiny_model, mnist_data), *short_run(3, 3), "--model.scheduler=StepLR", "--model.scheduler.step_size=1",
         "--model.scheduler.gamma=0.5", RECORD, *QUIET]
    )  # fmt: skip
    optimizer = train_cli_callbacks.RECORDED["module"].trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    card = (tmp_path / "exports" / "tiny_mnist_sgd_batch-size-8_lr-0.01_steps-3" / "README.md").read_text()
    assert "| optimizer | SGD (lr 0.01, momentum 0.9, weight decay 0.0001) |" in card
    assert "| learning-rate schedule | StepLR (step_size 1, gamma 0.5), stepped every optimizer step |" in card


def test_train_mode_in_training_eval_mode_in_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With stochastic depth, two training forwards of one batch differ; two eval forwards do not."""
    model_dir = tmp_path / "drop-path"
    config = tiny_config(image_size=32, drop_path_rate=0.1)
    ConvNextForImageClassification(config).save_pretrained(model_dir)
    (model_dir / "preprocessor_config.json").write_text((TINY_32 / "preprocessor_config.json").read_text())
    data = make_dataset(tmp_path / "data", "mnist", num_train=16, num_test=8)
    monkeypatch.chdir(tmp_path)
    main(
        ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false",
         *tiny_args(model_dir, data), *short_run(2, 2), "--export_dir=null",
         "--trainer.callbacks+=train_cli_callbacks.CheckModes", *QUIET]
    )  # fmt: skip
    train, val = train_cli_callbacks.RECORDED["train_forwards"], train_cli_callbacks.RECORDED["val_forwards"]
    assert len(train) == 2 and all(not forward["equal"] and forward["modes"] == {True} for forward in train)
    assert val and all(forward["equal"] and forward["modes"] == {False} for forward in val)


def test_compile_trains_and_exports_the_same_weights_under_their_own_names(
    tiny_model: Path, mnist_data: Path, tmp_path, monkeypatch
) -> None:
    # --model.compile compiles the ConvNeXt in place: checkpoints and exports keep the plain keys.
    from lightning_modules.classifier import ImageClassifier

    compiled, compile_calls = [], []
    real_configure, real_compile = ImageClassifier.configure_model, ConvNextForImageClassification.compile

    def configure_and_record(module: ImageClassifier) -> None:
        real_configure(module)
        real_configure(module)  # Lightning calls the hook once per stage: compiling again would start over
        compiled.append(module)

    def compile_and_count(model: ConvNextForImageClassification, *args, **kwargs) -> None:
        compile_calls.append(model)
        real_compile(model, *args, **kwargs)

    monkeypatch.setattr(ImageClassifier, "configure_model", configure_and_record)
    monkeypatch.setattr(ConvNextForImageClassification, "compile", compile_and_count)
    monkeypatch.chdir(tmp_path)
    main(
        ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false",
         *tiny_args(tiny_model, mnist_data), *short_run(2, 2), "--model.compile=true", *QUIET]
    )  # fmt: skip
    module = compiled[0]
    assert compile_calls == [module.model] and module.model._compiled_call_impl is not None
    export = export_tensors(tmp_path / "exports" / "tiny_mnist_sgd_batch-size-8_lr-0.01_steps-2")
    assert set(export) == set(module.model.state_dict()) and not any("_orig_mod" in key for key in export)
    images = torch.rand(4, 3, 32, 32)
    module.eval()
    with torch.no_grad():
        compiled_logits = module(images)
        module.model._compiled_call_impl = None  # the same module, eager
        eager_logits = module(images)
        features = module.model.convnext(pixel_values=images).pooler_output
        classifier = module.model.classifier
        head_scale = features.abs() @ classifier.weight.abs().T + classifier.bias.abs()
    # Two float32 forwards of the same weights with other kernels: each within logit_bound of the
    # exact logits, so within twice that of each other.
    assert_within(compiled_logits, eager_logits, 2 * logit_bound(module.model.config, head_scale), "compiled logits")
    for key, tensor in module.model.state_dict().items():
        torch.testing.assert_close(export[key], tensor, rtol=0, atol=0)


def test_the_startup_objects_are_frozen_for_the_loops_and_released_after(
    tiny_model: Path, mnist_data: Path, tmp_path, monkeypatch
) -> None:
    # A full collection in the loops would walk the ~500,000 objects of the imports every time.
    monkeypatch.chdir(tmp_path)
    main(
        ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false",
         *tiny_args(tiny_model, mnist_data), *short_run(2, 2), "--export_dir=null",
         "--trainer.callbacks+=train_cli_callbacks.RecordFrozen", *QUIET]
    )  # fmt: skip
    assert train_cli_callbacks.RECORDED["frozen_at_fit"] > 10_000
    assert gc.get_freeze_count() == 0, "collectable again once main() returns"


# --- 2. export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model: Path, mnist_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 6-step fine-tune of the mnist recipe on the tiny model and data, shared by several tests."""
    run_dir = tmp_path_factory.mktemp("trained")
    old_cwd = os.getcwd()
    os.chdir(run_dir)
    try:
        train_cli_callbacks.RECORDED.clear()
        main(
            ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false",
             *tiny_args(tiny_model, mnist_data), *short_run(6, 3), RECORD, *QUIET]
        )  # fmt: skip
    finally:
        os.chdir(old_cwd)
    return {
        "dir": run_dir,
        "module": train_cli_callbacks.RECORDED["module"],
        "export": run_dir / "exports" / "tiny_mnist_sgd_batch-size-8_lr-0.01_steps-6",
        "checkpoint": run_dir / "checkpoints" / "last.ckpt",
    }


def test_export_is_a_complete_hf_checkpoint(trained: dict) -> None:
    export = trained["export"]
    assert sorted(path.name for path in trained["dir"].joinpath("exports").iterdir()) == [export.name]
    names = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "train_config.yaml"}
    assert names <= {path.name for path in export.iterdir()}
    config = json.loads((export / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(get_task("mnist").classnames)}
    assert config["finetuning_task"] == "mnist"
    card = (export / "README.md").read_text()
    for text in (
        "SGD (lr 0.01, momentum 0.9, weight decay 0.0001)",
        "| learning-rate schedule | constant |",
        "| steps | 6 |",
        "| global batch size | 8 |",
        "val/accuracy",
    ):
        assert text in card
    train_config = yaml.safe_load((export / "train_config.yaml").read_text())
    assert train_config["data"]["task"] == "mnist" and train_config["trainer"]["max_steps"] == 6


def test_export_reloads_with_identical_logits(trained: dict) -> None:
    reloaded = ConvNextForImageClassification.from_pretrained(trained["export"]).eval()
    trained_model = trained["module"].model.eval()
    assert reloaded.config.id2label == dict(enumerate(get_task("mnist").classnames))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, trained_model(pixel_values=pixels).logits)


# --- 3. resume ---------------------------------------------------------------------------------


def test_killed_run_resumes_bitwise(tiny_model: Path, mnist_data: Path, tmp_path: Path, monkeypatch) -> None:
    config = str(REPO / "configs" / "train" / "mnist.yaml")
    args = ["--trainer.logger=false", *tiny_args(tiny_model, mnist_data), *short_run(6, 2), *QUIET]
    python_path = [str(TESTS), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    # Bit for bit: the same computation, step by step, so the killed process runs on as many threads
    # as this one (a kernel may split its sums by thread).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", config, *args,
         "--trainer.callbacks+=train_cli_callbacks.KillAfterFirstCheckpoint"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert not (tmp_path / "exports").exists()

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", config, *args, "--ckpt_path", "last", RECORD])
    assert train_cli_callbacks.RECORDED["first_step"] == 2, "did not resume from the checkpoint"
    resumed = export_tensors(tmp_path / "exports" / "tiny_mnist_sgd_batch-size-8_lr-0.01_steps-6")

    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    monkeypatch.chdir(straight_dir)
    main(["fit", "--config", config, *args])
    straight = export_tensors(straight_dir / "exports" / "tiny_mnist_sgd_batch-size-8_lr-0.01_steps-6")
    assert resumed.keys() == straight.keys()
    different = [key for key in straight if not torch.equal(resumed[key], straight[key])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


# --- 4. W&B offline ----------------------------------------------------------------------------


def test_wandb_offline_run_directory(tiny_model: Path, mnist_data: Path, tmp_path: Path, monkeypatch) -> None:
    import wandb

    monkeypatch.chdir(tmp_path)
    try:
        main(
            ["fit", "--config", str(REPO / "configs" / "train" / "eurosat.yaml"), "--trainer.logger.save_dir=wandb_logs",
             *tiny_args(tiny_model, mnist_data), *short_run(2, 2), "--export_dir=null", *QUIET]
        )  # fmt: skip
    finally:
        wandb.finish()
    runs = list((tmp_path / "wandb_logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(path.is_file() for path in runs[0].rglob("*"))
    assert list(runs[0].glob("*.wandb"))


# --- 5. validate / test ------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluate_lightning_checkpoint(
    stage: str, trained: dict, tiny_model: Path, mnist_data: Path, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [stage, "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false",
         *tiny_args(tiny_model, mnist_data), "--ckpt_path", str(trained["checkpoint"]), RECORD, *QUIET]
    )  # fmt: skip
    metrics = train_cli_callbacks.RECORDED[stage]
    prefix = "val" if stage == "validate" else "test"
    assert {f"{prefix}/loss", f"{prefix}/accuracy", f"{prefix}/accuracy_top5"} <= metrics.keys()
    if stage == "validate":
        # The same weights on the same validation split: the score the fit ended with.
        card = (trained["export"] / "README.md").read_text()
        assert f"| val/accuracy | {metrics['val/accuracy']:.4f} |" in card


# --- 6. bad input ------------------------------------------------------------------------------


def assert_input_error(args: list[str], capsys: pytest.CaptureFixture, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize("source", ["./missing/model", "not//a hub id"])
def test_bad_model_source(source: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false"]
    assert_input_error([*args, f"--model.model_name_or_path={source}"], capsys, "neither an existing checkpoint directory")
    assert not list(tmp_path.iterdir())


def test_checkpoint_directory_without_config(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    args = ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false"]
    assert_input_error([*args, "--model.model_name_or_path=empty"], capsys, "has no config.json")
    assert [path.name for path in tmp_path.iterdir()] == ["empty"]


def test_existing_export_refused_then_overwritten(tiny_model: Path, mnist_data: Path, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "exports" / "tiny_mnist_sgd_batch-size-8_lr-0.01_steps-2"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("an earlier export")
    args = ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false",
            *tiny_args(tiny_model, mnist_data), *short_run(2, 2), *QUIET]  # fmt: skip
    assert_input_error(args, capsys, "already exists")
    assert [path.name for path in tmp_path.iterdir()] == ["exports"], "refused only after starting"
    assert [path.name for path in target.iterdir()] == ["old.txt"]

    main([*args, "--overwrite=true"])
    assert not (target / "old.txt").exists() and (target / "model.safetensors").is_file()
    assert sorted(path.name for path in (tmp_path / "exports").iterdir()) == [target.name], "staging left behind"


def test_export_for_another_task_refused(trained: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    gtsrb = make_dataset(tmp_path / "gtsrb", "gtsrb", num_train=20, num_test=4)
    assert_input_error(
        ["validate", "--config", str(REPO / "configs" / "train" / "gtsrb.yaml"), "--trainer.logger=false",
         f"--model.model_name_or_path={trained['export']}", "--model.new_head=false",
         f"--data.processor={trained['export']}", f"--data.path={gtsrb}"],
        capsys, "has a 10-class head, but the task has 43 classes",
    )  # fmt: skip
    # Same class count, other labels: eurosat's ten land-use classes are not mnist's digits.
    eurosat = make_dataset(tmp_path / "eurosat", "eurosat", num_train=20, num_test=4)
    assert_input_error(
        ["validate", "--config", str(REPO / "configs" / "train" / "eurosat.yaml"), "--trainer.logger=false",
         f"--model.model_name_or_path={trained['export']}", "--model.new_head=false",
         f"--data.processor={trained['export']}", f"--data.path={eurosat}"],
        capsys, "was trained for other labels",
    )  # fmt: skip
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eurosat", "gtsrb"]


def test_own_export_evaluates_with_its_head(trained: dict, mnist_data: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        ["validate", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.logger=false",
         *tiny_args(trained["export"], mnist_data), "--model.new_head=false", RECORD, *QUIET]
    )  # fmt: skip
    card = (trained["export"] / "README.md").read_text()
    assert f"| val/accuracy | {train_cli_callbacks.RECORDED['validate']['val/accuracy']:.4f} |" in card


# --- 7. precision and memory format ------------------------------------------------------------


@pytest.mark.parametrize("option", ["--trainer.precision=bf16-mixed", "--model.channels_last=true"])
def test_cpu_variants_fast_dev_run(option: str, tiny_model: Path, mnist_data: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        ["fit", "--config", str(REPO / "configs" / "train" / "mnist.yaml"), "--trainer.fast_dev_run=true",
         "--trainer.logger=false", *tiny_args(tiny_model, mnist_data), option, "--export_dir=null", RECORD, *QUIET]
    )  # fmt: skip
    assert train_cli_callbacks.RECORDED["module"].trainer.global_step == 1


# --- 8. the export is a callback: a plain Trainer.fit exports too ---------------------------------


def test_plain_trainer_fit_exports_with_the_callback(tiny_model: Path, mnist_data: Path, tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    from datamodules import ImageClassificationDataModule
    from lightning_modules.classifier import ImageClassifier
    from lightning_modules.export import HuggingFaceExport

    data = ImageClassificationDataModule("mnist", path=str(mnist_data), processor=str(tiny_model), batch_size=8, num_workers=0)
    model = ImageClassifier(data.num_classes, data.classnames, model_name_or_path=str(tiny_model), **RECIPE_SGD)
    trainer = Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path,
        callbacks=[HuggingFaceExport(str(tmp_path / "exports"))],
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    export = tmp_path / "exports" / "tiny_mnist_sgd_batch-size-8_lr-0.01_steps-3"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {p.name for p in export.iterdir()}
    assert not (export / "train_config.yaml").exists(), "no CLI, no resolved configuration to keep"
    reloaded = ConvNextForImageClassification.from_pretrained(export).eval()
    assert reloaded.config.id2label == dict(enumerate(get_task("mnist").classnames))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, model.model.eval()(pixel_values=pixels).logits)
    assert "| training images | 40 |" in (export / "README.md").read_text()

    # The same export again is refused when fit starts, before any step.
    again = Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    use_distributed_sampler=False, default_root_dir=tmp_path, callbacks=[HuggingFaceExport(str(tmp_path / "exports"))])  # fmt: skip
    with pytest.raises(Exception, match="already exists"):
        again.fit(
            ImageClassifier(data.num_classes, data.classnames, model_name_or_path=str(tiny_model), **RECIPE_SGD), datamodule=data
        )
    assert again.global_step == 0
