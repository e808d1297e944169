"""Consensus task arithmetic (Wang et al., ICML 2024): exact values on hand-built tensors, the
streaming engine against the formula on loaded checkpoints, and bad input through ``merge.py``.

The expected values are worked out by hand (exact in binary where the text says so) or computed
here from the paper's formula on whole tensors with the same float32 operations as the project
(the same bits: the masks are comparisons of the same float32 numbers), never with the helpers of
the module under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import merge_fixtures as mf
import test_bad_input
from merge import main
from merging import METHODS, ConsensusTaskArithmetic, ModelPool, merge_backbone
from merging.errors import MergeError
from merging.tall_masks import consensus_task_arithmetic

pytestmark = pytest.mark.usefixtures("one_thread")
workdir = test_bad_input.workdir  # an empty working directory, where whatever a failed run writes shows

TASKS = ("eurosat", "dtd", "mnist")


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def one_buffer(vectors):
    """A stream that reuses one tensor, as the engine's reader with its scratch buffer does."""
    buffer = torch.empty_like(vectors[0])
    for vector in vectors:
        buffer.copy_(vector)
        yield buffer


# --- Consensus, by hand ----------------------------------------------------------------------

# tau_MTL = (4, 2, 0, 0); tau_MTL - tau_1 = tau_2 and back. At lambda = 0.5: m_1 = (3 >= 0.5, 1 >= 0.5,
# 2 >= 1, 0 >= 0) all true; m_2 = (1 >= 1.5 false, 1 >= 0.5, 2 >= 1, 0 >= 0). Consensus k = 2: (F, T, T, T).
TAUS = [[3.0, 1.0, -2.0, 0.0], [1.0, 1.0, 2.0, 0.0]]
THETA0 = [0.5, -1.0, 2.0, 0.25]


def test_consensus_by_hand_and_its_limits():
    taus = [t(tau) for tau in TAUS]
    consensus = consensus_task_arithmetic(t(THETA0), taus, k=2, tall_mask_lambda=0.5, scaling_factor=0.5)
    assert torch.equal(consensus, t(THETA0) + t([0.0, 1.0, 0.0, 0.0]))  # halves of powers of two: exact
    # k = 0 is task arithmetic; k above the number of tasks the pretrained model.
    arithmetic = consensus_task_arithmetic(t(THETA0), one_buffer(taus), k=0, tall_mask_lambda=0.5, scaling_factor=0.5)
    assert torch.equal(arithmetic, t(THETA0) + 0.5 * (taus[0] + taus[1]))
    assert torch.equal(consensus_task_arithmetic(t(THETA0), taus, k=3, tall_mask_lambda=0.5, scaling_factor=0.5), t(THETA0))


def test_a_tie_is_kept_as_the_paper_writes_it():
    # Three equal task vectors at lambda = 0.5: |tau| = 0.5 |3 tau - tau| everywhere. The paper's >= keeps
    # every entry in every mask (all three agree: theta_0 + 3 tau); the authors' code and FusionBench (>)
    # would keep none (theta_0).
    consensus = consensus_task_arithmetic(t([1.0, 0.0]), [t([1.0, -2.0])] * 3, k=3, tall_mask_lambda=0.5, scaling_factor=1.0)
    assert torch.equal(consensus, t([4.0, -6.0]))


def test_the_options_are_checked_and_described():
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(MergeError, match="tall_mask_lambda must be a finite number >= 0"):
            ConsensusTaskArithmetic(tall_mask_lambda=bad, scaling_factor=1.0)
    for bad in (-1, 1.5, True):
        with pytest.raises(MergeError, match=f"k must be an integer >= 0, got {bad}"):
            ConsensusTaskArithmetic(tall_mask_lambda=0.5, scaling_factor=1.0, k=bad)
    with pytest.raises(MergeError, match="scaling_factor must be a finite number"):
        ConsensusTaskArithmetic(tall_mask_lambda=0.5, scaling_factor=math.nan)
    method = ConsensusTaskArithmetic(tall_mask_lambda=0.4, scaling_factor=0.3)
    assert method.describe() == "consensus_task_arithmetic(tall_mask_lambda=0.4, k=2, scaling_factor=0.3)"
    assert METHODS[method.name] is ConsensusTaskArithmetic and method.elementwise


# --- The engine on loaded checkpoints --------------------------------------------------------


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory) -> dict[str, str]:
    return mf.make_pool(tmp_path_factory.mktemp("pool"), TASKS)


@pytest.fixture(scope="module")
def loaded(pool_dirs):
    """``theta_0`` and every task's vectors, key by key (float32, whole tensors)."""
    pretrained = mf.backbone(mf.load_state(pool_dirs[mf.PRETRAINED]))
    finetuned = [mf.backbone(mf.load_state(pool_dirs[task])) for task in TASKS]
    return pretrained, {key: [model[key] - theta_0 for model in finetuned] for key, theta_0 in pretrained.items()}


def reference_masks(taus, tall_mask_lambda):
    total = taus[0].clone()
    for tau in taus[1:]:
        total = total + tau
    return total, [tau.abs() >= tall_mask_lambda * (total - tau).abs() for tau in taus]


def test_consensus_through_the_engine_is_the_formula(pool_dirs, loaded):
    pretrained, taus = loaded
    merged = merge_backbone(
        ModelPool(pool_dirs), ConsensusTaskArithmetic(tall_mask_lambda=0.4, k=2, scaling_factor=0.7), progress=False
    )
    assert list(merged) == list(pretrained)
    dropped = 0
    for key, theta_0 in pretrained.items():
        total, masks = reference_masks(taus[key], 0.4)
        keep = sum(mask.int() for mask in masks) >= 2
        assert torch.equal(merged[key], theta_0 + 0.7 * torch.where(keep, total, 0.0)), key
        dropped += int((~keep).sum())
    assert dropped > 0  # the consensus drops entries: not task arithmetic


# --- merge.py ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks_cli")
    pool = mf.make_pool(root / "models", TASKS[:2], seed=4)
    data = {
        task: str(mf.make_test_set(root / "data" / task, task, 4, pool[task], seed=30 + i)) for i, task in enumerate(TASKS[:2])
    }
    return pool, data


BAD_INPUT = {
    "a negative consensus k": (
        ["--model.method", "ConsensusTaskArithmetic", "--model.method.tall_mask_lambda", "0.4",
         "--model.method.scaling_factor", "0.5", "--model.method.k", "-1"],
        "k must be an integer >= 0, got -1",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_error_line_and_nothing_written(cli_setup, workdir, capsys, case):
    method, message = BAD_INPUT[case]
    pool, data = cli_setup
    args = mf.merge_test_args(workdir, data, pool[mf.PRETRAINED], 4)
    args += ["--model", "lightning_modules.merged.MergedClassifier", "--model.models", json.dumps(pool), *method]
    args += ["--model.report_dir", str(workdir / "report"), "--model.export_dir", str(workdir / "exports")]
    test_bad_input.assert_contains(test_bad_input.one_error_line(main, args, capsys), message)
    assert not list(workdir.iterdir())
