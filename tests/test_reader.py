"""Nothing that reads checkpoints keeps their files open once it is gone: a ``CheckpointReader``
closes its descriptors when closed or collected, and so does a ``ModelPool`` (whose readers
nothing closes by hand) after a merge, in the library and through ``merge.py``."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest

import merge_fixtures as mf
from common.reader import CheckpointReader
from merge import main as merge_main
from merging.engine import merge_backbone
from merging.methods import SimpleAverage
from merging.pool import ModelPool

TASKS = ("eurosat", "dtd")


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory) -> dict[str, str]:
    return mf.make_pool(tmp_path_factory.mktemp("pool"), TASKS)


def open_files(directory: str | Path) -> int:
    """Descriptors of this process open on files under ``directory``."""
    root = str(Path(directory).resolve())
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return sum(target.startswith(root + os.sep) for target in targets)


def test_a_dropped_reader_closes_its_file(pool_dirs):
    reader = CheckpointReader(pool_dirs["dtd"])
    reader.read(reader.keys()[0])
    assert open_files(pool_dirs["dtd"]) == 1
    del reader
    gc.collect()
    assert open_files(pool_dirs["dtd"]) == 0


def test_closing_twice_and_then_collecting_is_harmless(pool_dirs):
    reader = CheckpointReader(pool_dirs["dtd"])
    reader.close()
    reader.close()
    del reader
    gc.collect()
    assert open_files(pool_dirs["dtd"]) == 0


def test_a_sharded_checkpoint_with_a_bad_shard_closes_the_good_ones(pool_dirs, tmp_path):
    directory = mf.copy_checkpoint(pool_dirs["dtd"], tmp_path / "sharded")
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    (directory / "model-00002-of-00002.safetensors").write_bytes(b"not safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(Exception, match="model-00002-of-00002"):
        CheckpointReader(directory)
    assert open_files(directory) == 0  # without collecting: closed as the error was raised


def pool_root(pool_dirs: dict[str, str]) -> Path:
    """The folder ``mf.make_pool`` puts every checkpoint of the pool in."""
    return Path(os.path.commonpath(list(pool_dirs.values())))


def test_a_merged_pool_closes_its_checkpoints_once_dropped(pool_dirs):
    pool = ModelPool(pool_dirs)
    merge_backbone(pool, SimpleAverage(), progress=False)
    assert open_files(pool_root(pool_dirs)) == len(pool_dirs)  # one file per checkpoint, while the pool lives
    del pool
    gc.collect()
    assert open_files(pool_root(pool_dirs)) == 0


def test_merge_py_leaves_no_checkpoint_open(pool_dirs, tmp_path, quiet_cli):
    data = {
        task: str(mf.make_test_set(tmp_path / "data" / task, task, 4, pool_dirs[task], seed=index))
        for index, task in enumerate(TASKS)
    }
    args = [
        *mf.merge_test_args(tmp_path / "out", data, pool_dirs[mf.PRETRAINED], 4),
        "--model", "lightning_modules.merged.MergedClassifier",
        "--model.models", json.dumps(pool_dirs),
        "--model.report_dir", str(tmp_path / "out" / "report"),
    ]  # fmt: skip
    merge_main(args)
    assert (tmp_path / "out" / "report" / "report.json").is_file()
    gc.collect()
    assert open_files(pool_root(pool_dirs)) == 0
