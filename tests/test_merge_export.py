"""``merge.py test --model.export_dir``: one plain Hugging Face classifier per task.

Each export must load with ``AutoModelForImageClassification`` and ``pipeline()`` without a
word about missing or unexpected weights, hold the merged backbone (checked against the
method's formula) with the task's own fine-tuned head, and give that model's logits for its
task: a float64 forward in plain PyTorch (``merge_fixtures.score``), within the float32 bound.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForImageClassification

import merge_fixtures as mf
import tolerances
from datamodules.preprocessing import ImagePreprocessor
from datamodules.tasks import get_task
from merge import main
from merging import METHODS as METHOD_CLASSES
from merging.engine import merge_backbone
from merging.pool import ModelPool
from tolerances import U32, assert_within

TASKS = ("eurosat", "dtd")
SIZES = {"eurosat": 21, "dtd": 9}
TIES = {"top_k": 0.3, "scaling_factor": 0.6}
TIES_ARGS = ["--model.method", "TiesMerging", "--model.method.top_k", "0.3", "--model.method.scaling_factor", "0.6"]
EXPORT_FILES = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]


@dataclass
class Setup:
    pool: dict[str, str]
    data: dict[str, str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("merge_export")
    pool = mf.make_pool(root / "models", TASKS, seed=5)
    data = {
        task: str(mf.make_test_set(root / "data" / task, task, SIZES[task], pool[task], seed=50 + i))
        for i, task in enumerate(TASKS)
    }
    return Setup(pool, data)


pytestmark = pytest.mark.usefixtures("quiet_cli")


def cli(setup: Setup, out: Path, *extra: str, pool: bool = True) -> list[str]:
    args = mf.merge_test_args(out, {task: setup.data[task] for task in TASKS}, setup.pool[mf.PRETRAINED], 8) + [
        "--model", "lightning_modules.merged.MergedClassifier",
        "--model.report_dir", str(out / "report"),
    ]  # fmt: skip
    return args + (["--model.models", json.dumps(setup.pool)] if pool else []) + list(extra)


@contextmanager
def transformers_messages() -> Iterator[list[str]]:
    """Every message transformers logs (its logger does not propagate) or warns, at any level."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, logger = Collect(level=logging.DEBUG), logging.getLogger("transformers")
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_debug()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages += [str(warning.message) for warning in caught]
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(level)


def assert_loads_cleanly(messages: list[str]) -> None:
    words = ("missing", "unexpected", "newly initialized", "not initialized", "not used", "mismatch")
    complaints = [message for message in messages if any(word in message.lower() for word in words)]
    assert not complaints, complaints


def export_logits(directory: Path, images) -> torch.Tensor:
    with transformers_messages() as messages:
        model, info = AutoModelForImageClassification.from_pretrained(directory, output_loading_info=True)
    assert_loads_cleanly(messages)
    assert {kind: list(info[kind]) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")} == dict.fromkeys(
        ("missing_keys", "unexpected_keys", "mismatched_keys"), []
    )
    assert type(model).__name__ == "ConvNextForImageClassification"
    preprocess = ImagePreprocessor.from_pretrained(str(directory))
    with torch.no_grad():
        return model.eval()(pixel_values=torch.stack([preprocess(image) for image in images])).logits


def assert_export_is_the_merged_model(setup: Setup, directory: Path, task: str, method: str, params: dict) -> None:
    """The export holds the project's merged backbone and the task's own head, bit for bit (the
    merge is the same computation here as in merge.py, on the same machine), the backbone within
    the arithmetic's bound of the method's formula; loaded by transformers, it gives the logits
    of a float64 forward of those weights, within the float32 forward's bound."""
    assert sorted(p.name for p in directory.iterdir()) == EXPORT_FILES
    classnames = list(get_task(task).classnames)
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["ConvNextForImageClassification"]
    assert [config["id2label"][str(i)] for i in range(len(classnames))] == classnames
    assert config["label2id"] == {name: i for i, name in enumerate(classnames)}
    weights, head = mf.load_state(directory), mf.load_state(setup.pool[task])
    merged = merge_backbone(ModelPool(setup.pool), METHOD_CLASSES[method](**params), progress=False)
    assert sorted(weights) == sorted([*merged, "classifier.weight", "classifier.bias"])
    assert all(torch.equal(weights[key], tensor) for key, tensor in merged.items())
    assert all(torch.equal(weights[key], head[key]) for key in ("classifier.weight", "classifier.bias"))
    pretrained = mf.backbone(mf.load_state(setup.pool[mf.PRETRAINED]))
    mf.assert_merge_matches(merged, method, params, pretrained, [mf.backbone(mf.load_state(setup.pool[t])) for t in TASKS])
    images, labels = mf.read_test_set(setup.data[task])
    expected = mf.score(setup.pool[task], images, labels, backbone_state=merged, u=U32)
    got = export_logits(directory, images)
    assert_within(got, expected.logits, expected.error, f"{task} export logits")
    # The merge changed the model: these are not the fine-tuned model's logits.
    assert not torch.allclose(got, mf.classify(setup.pool[task], images), atol=1e-3)


def card_sections(directory: Path) -> str:
    return (directory / "README.md").read_text()


def test_every_task_exports_a_plain_classifier_with_the_merged_logits_and_its_accuracy(setup, tmp_path):
    main(cli(setup, tmp_path, *TIES_ARGS, "--model.export_dir", str(tmp_path / "exports")))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (row,) = report["rows"].values()
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == sorted(TASKS)  # no staging left
    for task in TASKS:
        directory = tmp_path / "exports" / task
        assert_export_is_the_merged_model(setup, directory, task, "ties", TIES)
        card = card_sections(directory)
        assert "pipeline_tag: image-classification" in card
        assert f"| method | {report['method']} |" in card
        assert "| top_k | 0.3 |" in card and "| scaling_factor | 0.6 |" in card
        assert all(f"| {name} | {source} |" in card for name, source in setup.pool.items())
        accuracy = row["tasks"][task]["accuracy"]
        assert f"test split: **{100 * accuracy:.2f}%** ({SIZES[task]} images)" in card
        assert "partial" not in card.lower() and "not evaluated" not in card.lower()


def test_pipeline_gives_the_task_labels(setup, tmp_path):
    task = "eurosat"
    main(cli(setup, tmp_path, "--model.export_dir", str(tmp_path / "exports"), "--trainer.limit_test_batches", "0"))
    directory = tmp_path / "exports" / task
    images, _ = mf.read_test_set(setup.data[task])
    classnames = list(get_task(task).classnames)
    with transformers_messages() as messages:
        classify = transformers.pipeline("image-classification", model=str(directory), device="cpu")
        results = classify(images[0], top_k=len(classnames))
    assert_loads_cleanly(messages)
    assert sorted(result["label"] for result in results) == sorted(classnames)
    # The export's own weights in float64; the pipeline's forward is float32. Softmax moves each
    # probability by at most half the largest logit change (its Jacobian's rows have 1-norm
    # 2 p (1 - p) <= 1/2), and its float32 evaluation adds gamma_{C+3}.
    expected = mf.score(directory, images[:1], torch.zeros(1, dtype=torch.long), u=U32)
    assert tolerances.ambiguous_predictions(expected.logits, expected.error) == 0
    assert results[0]["label"] == classnames[int(expected.logits[0].argmax())]
    probabilities = torch.softmax(expected.logits[0], dim=0)
    bound = 0.5 * float(expected.error.max()) + tolerances.gamma(len(classnames) + 3)
    for result in results:
        assert abs(result["score"] - float(probabilities[classnames.index(result["label"])])) <= bound


def test_merge_and_export_without_data_then_export_a_saved_merge(setup, tmp_path):
    saved, first, second = tmp_path / "saved", tmp_path / "first", tmp_path / "second"
    main(cli(setup, tmp_path / "a", "--model.save_dir", str(saved), "--model.export_dir", str(first),
             "--trainer.limit_test_batches", "0"))  # fmt: skip
    assert not (tmp_path / "a" / "report").exists()
    for task in TASKS:
        assert_export_is_the_merged_model(setup, first / task, task, "simple_average", {})
        card = card_sections(first / task)
        assert "Not evaluated" in card and "| method | simple_average |" in card
    # Again from the saved merge, evaluated this time: the same weights, and the accuracy.
    main(cli(setup, tmp_path / "b", "--model.merged_model", str(saved), "--model.export_dir", str(second), pool=False))
    (row,) = json.loads((tmp_path / "b" / "report" / "report.json").read_text())["rows"].values()
    for task in TASKS:
        assert_export_is_the_merged_model(setup, second / task, task, "simple_average", {})
        card = card_sections(second / task)
        assert f"**{100 * row['tasks'][task]['accuracy']:.2f}%**" in card
        assert all(f"| {name} | {source} |" in card for name, source in setup.pool.items())


def test_a_partial_evaluation_is_said_on_the_card(setup, tmp_path):
    main(cli(setup, tmp_path, "--model.export_dir", str(tmp_path / "exports"), "--trainer.limit_test_batches", "1"))
    card = card_sections(tmp_path / "exports" / "eurosat")
    assert "(8 images)" in card and "partial run" in card


def test_an_existing_export_is_refused_before_merging_and_replaced_with_overwrite(setup, tmp_path, capsys, monkeypatch):
    import lightning_modules.evaluation  # where the evaluation modules merge

    exports = tmp_path / "exports"
    (exports / "dtd").mkdir(parents=True)
    (exports / "dtd" / "stale.txt").write_text("from an earlier run")
    merges = []
    original = lightning_modules.evaluation.merge_backbone
    monkeypatch.setattr(lightning_modules.evaluation, "merge_backbone", lambda *a, **k: merges.append(1) or original(*a, **k))
    with pytest.raises(SystemExit) as exit_info:
        main(cli(setup, tmp_path, "--model.export_dir", str(exports)))
    assert exit_info.value.code != 0
    assert f"'{exports / 'dtd'}' already exists; pass --model.overwrite true" in capsys.readouterr().err
    assert merges == [] and sorted(p.name for p in exports.iterdir()) == ["dtd"]
    main(cli(setup, tmp_path, "--model.export_dir", str(exports), "--model.overwrite", "true"))
    assert merges == [1]
    assert sorted(p.name for p in (exports / "dtd").iterdir()) == EXPORT_FILES
    assert sorted(p.name for p in exports.iterdir()) == sorted(TASKS)


def test_a_failed_export_leaves_nothing_behind(setup, tmp_path, monkeypatch, capsys):
    import callbacks.merged_export

    def fail_after_weights(directory: Path, **kwargs) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(callbacks.merged_export, "write_classifier", fail_after_weights, raising=True)
    with pytest.raises(SystemExit) as exit_info:
        main(cli(setup, tmp_path, "--model.export_dir", str(tmp_path / "exports"), "--trainer.limit_test_batches", "0"))
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot write model.export_dir '{tmp_path / 'exports' / TASKS[0]}': disk full; nothing was written there"
    ]
    assert "Traceback" not in stderr
    assert not (tmp_path / "exports").exists() or list((tmp_path / "exports").iterdir()) == []  # no staging either
