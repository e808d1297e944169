"""The checkpoint reader, the model pool's checks, saved merged models and SwitchModule.

Every error must name what is wrong: the file, the key, the shapes, the task.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from torch import nn

import merge_fixtures as mf
from common.errors import CheckpointError
from common.reader import CheckpointReader
from merging.engine import merge_backbone
from merging.errors import MergeError
from merging.methods import METHODS, MergeMethod, SimpleAverage, TiesMerging, register_method
from merging.pool import ModelPool
from merging.saved import load_merged, save_merged
from merging.switch import SwitchModule

TASKS = ("eurosat", "dtd")
KEY = "convnext.encoder.stages.1.layers.0.pwconv1.weight"


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory) -> dict[str, str]:
    return mf.make_pool(tmp_path_factory.mktemp("pool"), TASKS)


@pytest.fixture
def damaged(pool_dirs, tmp_path):
    """A writable copy of the eurosat checkpoint and the pool that uses it."""
    directory = mf.copy_checkpoint(pool_dirs["eurosat"], tmp_path / "damaged")
    return directory, {**pool_dirs, "eurosat": str(directory)}


def merge(models, method=None):
    return merge_backbone(ModelPool(models), method or SimpleAverage(), progress=False)


# --- CheckpointReader -----------------------------------------------------------------------


def test_reader_reads_every_tensor_exactly(pool_dirs):
    expected = mf.load_state(pool_dirs["dtd"])
    with CheckpointReader(pool_dirs["dtd"]) as reader:
        assert sorted(reader.keys()) == sorted(expected)
        for key, tensor in expected.items():
            assert reader.shape(key) == tuple(tensor.shape) and reader.dtype(key) == tensor.dtype
            assert torch.equal(reader.read(key), tensor), key
            out = torch.full_like(tensor, float("nan"))
            assert reader.read(key, out=out) is not None and torch.equal(out, tensor), key


def test_reader_reads_sharded_and_legacy_checkpoints(pool_dirs, tmp_path):
    expected = mf.load_state(pool_dirs["dtd"])
    model = mf.ConvNextForImageClassification.from_pretrained(pool_dirs["dtd"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(expected, legacy / "pytorch_model.bin")
    for directory in (tmp_path / "sharded", legacy):
        with CheckpointReader(directory) as reader:
            assert sorted(reader.keys()) == sorted(expected)
            assert all(torch.equal(reader.read(key), tensor) for key, tensor in expected.items())


def test_reader_names_a_truncated_file(damaged):
    directory, _ = damaged
    path = mf.truncate(directory)
    with pytest.raises(CheckpointError, match="truncated") as error:
        CheckpointReader(directory)
    assert str(path) in str(error.value)


def test_reader_names_a_corrupt_header(damaged):
    directory, _ = damaged
    path = mf.corrupt_header(directory)
    with pytest.raises(CheckpointError, match="unreadable header") as error:
        CheckpointReader(directory)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "content", [b"", b"\x01\x02", (10**9).to_bytes(8, "little") + b"{}"], ids=["empty", "3-bytes", "huge-length"]
)
def test_reader_rejects_files_that_are_not_safetensors(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt checkpoint") as error:
        CheckpointReader(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(error.value)


@pytest.mark.parametrize(
    "header",
    [
        [1, 2],
        {"a": 1},
        {"a": {"dtype": "F32", "shape": [2]}},
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}},
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": ["x", 8]}},
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
    ],
    ids=["list", "entry-not-object", "no-offsets", "one-offset", "text-offset", "size-mismatch", "unknown-dtype"],
)
def test_reader_names_a_malformed_header_that_is_valid_json(tmp_path, header):
    encoded = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(encoded).to_bytes(8, "little") + encoded + bytes(16))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(CheckpointError, match="corrupt checkpoint") as error:
        CheckpointReader(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(error.value)
    assert len(os.listdir("/proc/self/fd")) == before  # the file was closed


def test_reader_accepts_the_smallest_valid_file(tmp_path):
    encoded = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    data = torch.tensor([1.5, -2.0]).numpy().tobytes()
    (tmp_path / "model.safetensors").write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    with CheckpointReader(tmp_path) as reader:
        assert torch.equal(reader.read("a"), torch.tensor([1.5, -2.0]))


def test_reader_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors") as error:
        CheckpointReader(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_reader_does_not_leak_file_descriptors_on_corrupt_files(damaged):
    directory, _ = damaged
    mf.corrupt_header(directory)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(CheckpointError):
            CheckpointReader(directory)
    assert len(os.listdir("/proc/self/fd")) == before


# --- ModelPool ------------------------------------------------------------------------------


def test_pool_needs_pretrained_and_a_merge_needs_a_finetuned_model(pool_dirs):
    with pytest.raises(MergeError, match="_pretrained_"):
        ModelPool({"eurosat": pool_dirs["eurosat"]})
    # A pool of the pretrained model alone is a pool (it loads: tests/test_python_api.py); the
    # merge refuses it where it starts, with the one line the CLI prints.
    alone = ModelPool({mf.PRETRAINED: pool_dirs[mf.PRETRAINED]})
    assert alone.task_names == []
    message = "the model pool has no fine-tuned models: add one entry per task besides _pretrained_"
    with pytest.raises(MergeError) as error:
        alone.check_mergeable()
    assert str(error.value) == message
    with pytest.raises(MergeError) as error:
        merge_backbone(alone, SimpleAverage(), progress=False)
    assert str(error.value) == message


def test_pool_names_a_missing_directory(pool_dirs, tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(CheckpointError) as error:
        ModelPool({**pool_dirs, "eurosat": str(missing)})
    assert str(missing) in str(error.value)


def test_pool_rejects_a_file_and_a_directory_without_config(pool_dirs, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        ModelPool({**pool_dirs, "eurosat": str(tmp_path / "file")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelPool({**pool_dirs, "eurosat": str(tmp_path / "empty")})


def test_pool_task_names_are_normalized_and_unique(pool_dirs):
    pool = ModelPool({mf.PRETRAINED: pool_dirs[mf.PRETRAINED], "Stanford-Cars": pool_dirs["dtd"]})
    assert pool.task_names == ["stanford_cars"]
    with pytest.raises(MergeError, match="appears twice"):
        ModelPool({**pool_dirs, "EuroSAT": pool_dirs["eurosat"]})


def test_pool_reads_a_fusionbench_yaml(pool_dirs, tmp_path):
    path = tmp_path / "pool.yaml"
    models = {
        mf.PRETRAINED: {"config_path": pool_dirs[mf.PRETRAINED]},
        "model_a": {"config_path": pool_dirs["eurosat"], "dataset_name": "eurosat"},
        "dtd": pool_dirs["dtd"],
    }
    path.write_text(yaml.safe_dump({"models": models}))
    pool = ModelPool(str(path))
    assert pool.sources == {mf.PRETRAINED: pool_dirs[mf.PRETRAINED], "eurosat": pool_dirs["eurosat"], "dtd": pool_dirs["dtd"]}
    with pytest.raises(MergeError, match="does not exist"):
        ModelPool(str(tmp_path / "missing.yaml"))


MERGE_CONFIGS = ["convnext-base-224_8-tasks", "regmean", "adamerging", "compare"]


@pytest.mark.parametrize("name", MERGE_CONFIGS)
def test_every_merge_config_reads_the_one_pool_file(name):
    # The eight public checkpoints are listed once, in configs/merge/pools/, named by every merge config.
    config = mf.REPO_ROOT / "configs" / "merge" / f"{name}.yaml"
    assert yaml.safe_load(config.read_text())["model"]["init_args"]["models"] == "pools/convnext-base-224_8-tasks.yaml"
    pool = ModelPool(str(config))  # from any working directory: the path is read from the config's folder
    assert pool.sources[mf.PRETRAINED] == "facebook/convnext-base-224"
    hub = {name: source for name, source in pool.sources.items() if name != mf.PRETRAINED}
    assert len(hub) == 8 and all(
        source == f"tanganke/convnext-base-224_{name.replace('_', '-')}_sgd_batch-size-64_lr-0.01_steps-4000"
        for name, source in hub.items()
    )


def test_a_pool_file_that_names_itself_is_refused(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump({"models": "pool.yaml"}))
    with pytest.raises(MergeError, match="names itself"):
        ModelPool(str(path))


def test_backbones_of_different_shapes_name_the_key_and_both_shapes(damaged):
    directory, models = damaged
    mf.rewrite_tensors(directory, lambda state: {**state, KEY: torch.zeros(7, 3)})
    with pytest.raises(MergeError) as error:
        merge(models)
    message = str(error.value)
    assert KEY in message and "[7, 3]" in message and "[64, 16]" in message
    assert str(directory / "model.safetensors") in message


def test_backbone_with_a_missing_key_is_named(damaged):
    directory, models = damaged
    mf.rewrite_tensors(directory, lambda state: {k: v for k, v in state.items() if k != KEY})
    with pytest.raises(MergeError, match="missing") as error:
        merge(models)
    assert KEY in str(error.value) and str(directory) in str(error.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", [SimpleAverage(), TiesMerging(top_k=0.2, scaling_factor=0.3)], ids=["simple_average", "ties"])
def test_non_finite_values_name_the_file_and_key(damaged, value, method):
    directory, models = damaged

    def poison(state):
        tensor = state[KEY].clone()
        tensor[3, 5] = value
        return {**state, KEY: tensor}

    mf.rewrite_tensors(directory, poison)
    with pytest.raises(CheckpointError, match="non-finite") as error:
        merge(models, method)
    assert KEY in str(error.value) and str(directory / "model.safetensors") in str(error.value)


def keep_pretrained_method() -> type[MergeMethod]:
    """A method that reads every task vector and returns the pretrained tensor: a NaN input
    never shows in its output, and it declares nothing about NaNs. Defined in a function, so
    the CLI's list of method classes in other tests does not offer it."""

    class KeepPretrained(MergeMethod):
        name = "keep_pretrained"

        def merge(self, pretrained, tensors, statistics):
            for _ in tensors:
                pass
            return pretrained.clone()

    return KeepPretrained


def test_a_new_method_gets_its_inputs_checked_by_default(damaged):
    directory, models = damaged

    def poison(state):
        tensor = state[KEY].clone()
        tensor[0, 0] = float("nan")
        return {**state, KEY: tensor}

    mf.rewrite_tensors(directory, poison)
    method = keep_pretrained_method()
    assert not method.propagates_non_finite
    with pytest.raises(CheckpointError, match="non-finite") as error:
        merge(models, method())
    assert KEY in str(error.value) and str(directory / "model.safetensors") in str(error.value)


def test_two_methods_cannot_share_a_name():
    class OtherTies(keep_pretrained_method()):
        name = "ties"

    with pytest.raises(ValueError, match="two merge methods are named 'ties'"):
        register_method(OtherTies)
    assert METHODS["ties"] is TiesMerging


def test_heads_are_checked_against_the_tasks(pool_dirs, damaged, tmp_path):
    classnames = {task: list(mf.get_task(task).classnames) for task in TASKS}
    ModelPool(pool_dirs).check_heads(classnames)  # the good pool passes
    with pytest.raises(MergeError, match="no fine-tuned model for task 'mnist'") as error:
        ModelPool(pool_dirs).check_heads({**classnames, "mnist": [str(i) for i in range(10)]})
    assert "eurosat, dtd" in str(error.value)
    wrong = mf.make_finetuned(pool_dirs[mf.PRETRAINED], tmp_path / "wrong", "eurosat", seed=5, num_labels=7)
    with pytest.raises(MergeError, match=r"\[7, 64\].*task 'eurosat' has 10 classes"):
        ModelPool({**pool_dirs, "eurosat": str(wrong)}).check_heads(classnames)
    other_labels = mf.make_finetuned(pool_dirs[mf.PRETRAINED], tmp_path / "labels", "mnist", seed=5)
    with pytest.raises(CheckpointError, match="other labels"):
        ModelPool({**pool_dirs, "eurosat": str(other_labels)}).check_heads(classnames)


def test_a_checkpoint_without_a_head_is_named(damaged):
    directory, models = damaged
    mf.rewrite_tensors(directory, lambda state: {k: v for k, v in state.items() if not k.startswith("classifier.")})
    pool = ModelPool(models)
    with pytest.raises(MergeError, match="missing") as error:
        pool.check_heads({"eurosat": list(mf.get_task("eurosat").classnames)})
    assert str(directory) in str(error.value)
    assert "pytorch_model.bin" not in str(error.value)  # a file that does not exist
    with pytest.raises(CheckpointError, match="classifier.weight"):
        pool.head("eurosat")


def test_a_non_finite_head_is_named(damaged):
    directory, models = damaged
    mf.rewrite_tensors(
        directory, lambda state: {**state, "classifier.bias": torch.full_like(state["classifier.bias"], float("nan"))}
    )
    with pytest.raises(CheckpointError, match="non-finite.*classifier.bias"):
        ModelPool(models).head("eurosat")


# --- Saved merged models --------------------------------------------------------------------


def test_save_and_load_merged_round_trip(pool_dirs, tmp_path):
    pool = ModelPool(pool_dirs)
    backbone = merge_backbone(pool, SimpleAverage(), progress=False)
    heads = {task: pool.head(task) for task in TASKS}
    info = {"method": "simple_average", "tasks": list(TASKS)}
    target = tmp_path / "merged"
    save_merged(target, backbone, heads, pool.config(), pool.directory(mf.PRETRAINED), info)
    loaded = load_merged(target)
    assert loaded.info == info
    assert sorted(loaded.backbone) == sorted(backbone)
    assert all(torch.equal(loaded.backbone[key], tensor) for key, tensor in backbone.items())
    assert {task: set(head) for task, head in loaded.heads.items()} == {task: {"weight", "bias"} for task in TASKS}
    assert all(torch.equal(loaded.heads[t][n], heads[t][n]) for t in TASKS for n in ("weight", "bias"))
    assert (target / "preprocessor_config.json").is_file()
    assert loaded.config.hidden_sizes == [8, 16, 32, 64]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging left behind


def test_save_merged_refuses_an_existing_directory_and_replaces_it_when_asked(pool_dirs, tmp_path):
    pool = ModelPool(pool_dirs)
    backbone = merge_backbone(pool, SimpleAverage(), progress=False)
    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.txt").write_text("old")
    args = (backbone, {"dtd": pool.head("dtd")}, pool.config(), None, {"method": "x"})
    with pytest.raises(CheckpointError, match="already exists.*--model.overwrite true"):
        save_merged(target, *args)
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    save_merged(target, *args, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "merge.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_failed_save_leaves_nothing(pool_dirs, tmp_path):
    pool = ModelPool(pool_dirs)
    backbone = merge_backbone(pool, SimpleAverage(), progress=False)
    with pytest.raises(TypeError):  # an info that cannot be written as JSON, after the weights
        save_merged(tmp_path / "merged", backbone, {}, pool.config(), None, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_load_merged_needs_merge_json(pool_dirs):
    with pytest.raises(CheckpointError, match="not a saved merged model"):
        load_merged(pool_dirs["dtd"])


# --- SwitchModule ---------------------------------------------------------------------------


def test_switch_routes_each_task_to_its_head():
    torch.manual_seed(0)
    heads = {"eurosat": nn.Linear(4, 10), "dtd": nn.Linear(4, 47)}
    switch = SwitchModule(heads)
    features = torch.randn(3, 4)
    assert switch.tasks == ["eurosat", "dtd"]
    for task, head in heads.items():
        assert torch.equal(switch(features, task), head(features))


def test_switch_unknown_task_suggests_the_closest_names():
    switch = SwitchModule({"eurosat": nn.Linear(4, 10), "dtd": nn.Linear(4, 47), "stanford_cars": nn.Linear(4, 196)})
    with pytest.raises(MergeError) as error:
        switch(torch.zeros(1, 4), "eurosta")
    message = str(error.value)
    assert "'eurosta'" in message and "did you mean 'eurosat'" in message
    assert "heads: eurosat, dtd, stanford_cars" in message
    with pytest.raises(MergeError, match="did you mean 'stanford_cars'"):
        switch.route("stanford-cars")
    with pytest.raises(MergeError) as error:
        switch.route("zzzz")
    assert "did you mean" not in str(error.value)


def test_check_distinct_finds_one_checkpoint_by_name_and_a_copy_by_its_bytes(pool_dirs, tmp_path):
    """The pool holds what it is given (the engine merges one model with itself); ``check_distinct``
    is what the merge-side modules ask: the same directory however spelt, then copies."""
    ModelPool(pool_dirs).check_distinct()  # distinct fine-tunes of one pretrained model pass
    spelt_otherwise = os.path.join(pool_dirs["eurosat"], "..", os.path.basename(pool_dirs["eurosat"]))
    same = ModelPool({**pool_dirs, "dtd": spelt_otherwise})
    with pytest.raises(MergeError, match="the model pool's eurosat and dtd are the same checkpoint"):
        same.check_distinct(contents=False)
    copy = ModelPool({**pool_dirs, "dtd": str(mf.copy_checkpoint(pool_dirs["eurosat"], tmp_path / "copy"))})
    copy.check_distinct(contents=False)  # other names: only the bytes tell
    with pytest.raises(MergeError, match=r"eurosat \('.*'\) and dtd \('.*copy'\) are copies of one checkpoint"):
        copy.check_distinct()
    # The head moved a little (the first tensor in the file): no longer a copy.
    changed = mf.rewrite_tensors(tmp_path / "copy", lambda state: {**state, "classifier.bias": state["classifier.bias"] + 1e-3})
    ModelPool({**pool_dirs, "dtd": str(changed)}).check_distinct()
