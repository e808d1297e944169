"""The mask-based methods (Consensus task arithmetic, TALL masks, EMR-Merging): exact values on
hand-built tensors, the streaming engine against the formulas on loaded checkpoints, one backbone
per task through ``merge.py test`` (each task scored with its own: the scores show which), the
comparison's rows, the per-task exports, and bad input.

The expected values are worked out by hand (exact in binary where the text says so) or computed
here from the papers' formulas on whole tensors with the same float32 operations as the project
(the same bits: masks and elections are comparisons of the same float32 numbers), never with the
helpers of the modules under test; EMR's rescalers, sums of many terms, are compared within
``gamma_n`` of float64.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import merge_fixtures as mf
import test_bad_input
from merge import main
from merging import (
    METHODS,
    ConsensusTaskArithmetic,
    EMRMerging,
    ModelPool,
    TallMasks,
    TaskArithmetic,
    merge_backbone,
    merge_per_task,
)
from merging.emr import emr_elect, emr_rescalers
from merging.errors import MergeError
from merging.per_task import BIT_BLOCK, pack_bits, unpack_bits
from merging.tall_masks import consensus_task_arithmetic
from tolerances import U64, assert_within, gamma

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


def per_task_backbones(method, pretrained, taus):
    """``theta_t`` of every task from the method's merge of one tensor (what ``PerTaskMerge`` builds),
    with ``s_t`` from this tensor alone."""
    part = method.merge_masked(pretrained, taus)
    scales = method.task_scales(part.sums)
    return [
        pretrained + torch.tensor(s, dtype=torch.float32) * torch.where(m, part.vector, 0.0) for m, s in zip(part.masks, scales)
    ]


# --- TALL masks and Consensus, by hand ------------------------------------------------------

# tau_MTL = (4, 2, 0, 0); tau_MTL - tau_1 = tau_2 and back. At lambda = 0.5: m_1 = (3 >= 0.5, 1 >= 0.5,
# 2 >= 1, 0 >= 0) all true; m_2 = (1 >= 1.5 false, 1 >= 0.5, 2 >= 1, 0 >= 0). Consensus k = 2: (F, T, T, T).
TAUS = [[3.0, 1.0, -2.0, 0.0], [1.0, 1.0, 2.0, 0.0]]
THETA0 = [0.5, -1.0, 2.0, 0.25]


def test_tall_masks_by_hand():
    backbones = per_task_backbones(TallMasks(tall_mask_lambda=0.5), t(THETA0), [t(tau) for tau in TAUS])
    assert torch.equal(backbones[0], t(THETA0) + t([4.0, 2.0, 0.0, 0.0]))
    assert torch.equal(backbones[1], t(THETA0) + t([0.0, 2.0, 0.0, 0.0]))
    part = TallMasks(tall_mask_lambda=0.5).merge_masked(t(THETA0), one_buffer([t(tau) for tau in TAUS]))
    assert part.masks.tolist() == [[True] * 4, [False, True, True, True]] and part.sums.shape == (2, 0)


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
    # every entry (theta_0 + 3 tau); the authors' code and FusionBench (>) would keep none (theta_0).
    taus = [t([1.0, -2.0])] * 3
    assert all(torch.equal(b, t([1.0, 0.0]) + t([3.0, -6.0])) for b in per_task_backbones(TallMasks(0.5), t([1.0, 0.0]), taus))
    consensus = consensus_task_arithmetic(t([1.0, 0.0]), taus, k=3, tall_mask_lambda=0.5, scaling_factor=1.0)
    assert torch.equal(consensus, t([4.0, -6.0]))


# --- EMR-Merging, by hand -------------------------------------------------------------------

# Sums (-1, 1, 3, 0.5): signs (-, +, +, +). tau_uni: entry 0 the negative -3 (task 2), entry 1 the
# positive 4 (task 3), entry 2 max(3, 1) = 3 (tasks 1, 2), entry 3 0.5 (tasks 1, 3): (-3, 4, 3, 0.5).
EMR_TAUS = [[1.0, -2.0, 3.0, 0.5], [-3.0, -1.0, 1.0, -0.5], [1.0, 4.0, -1.0, 0.5]]
EMR_MASKS = [[False, False, True, True], [True, False, True, False], [False, True, False, True]]
# lambda_t = sum |tau_t| / sum |M_t tau_uni|: 6.5 / 3.5, 5.5 / 6, 6.5 / 4.5
EMR_RESCALERS = [13 / 7, 11 / 12, 13 / 9]


def test_emr_elects_masks_and_rescales_by_hand():
    part = EMRMerging().merge_masked(t([0.0] * 4), one_buffer([t(tau) for tau in EMR_TAUS]))
    assert torch.equal(part.vector, t([-3.0, 4.0, 3.0, 0.5]))
    assert part.masks.tolist() == EMR_MASKS
    assert part.sums.tolist() == [[6.5, 3.5], [5.5, 6.0], [6.5, 4.5]]  # sums of binary fractions: exact
    assert emr_rescalers(part.sums) == EMR_RESCALERS  # one float64 division each: the correctly rounded quotient
    theta_0 = t([0.5, -1.0, 2.0, 0.25])
    for backbone, mask, rescaler in zip(
        per_task_backbones(EMRMerging(), theta_0, [t(tau) for tau in EMR_TAUS]), EMR_MASKS, EMR_RESCALERS
    ):
        expected = theta_0.double() + rescaler * torch.where(torch.tensor(mask), t([-3.0, 4.0, 3.0, 0.5]), 0.0).double()
        # lambda rounded to float32, one product, one sum: three roundings of |theta_0| + |lambda m tau|
        bound = gamma(3) * (theta_0.double().abs() + (expected - theta_0.double()).abs())
        assert_within(backbone, expected, bound)


def test_emr_a_sum_of_zero_elects_no_sign_and_a_task_that_agrees_nowhere_keeps_theta_0():
    # Entry 0 sums to exactly 0: sgn 0, no task kept (the code's (sum > 0) * 2 - 1 would elect -1).
    part = emr_elect([t([1.0, 2.0]), t([-1.0, -0.5]), t([0.0, 1.0])])
    assert torch.equal(part.vector, t([0.0, 2.0])) and part.masks[:, 0].tolist() == [False] * 3
    # Task 2 disagrees with both elections: its masked vector is 0, its rescaler 0, its backbone theta_0.
    assert part.masks[1].tolist() == [False, False] and emr_rescalers(part.sums)[1] == 0.0
    assert torch.equal(
        per_task_backbones(EMRMerging(), t([0.5, 0.5]), [t([1.0, 2.0]), t([-1.0, -0.5]), t([0.0, 1.0])])[1], t([0.5, 0.5])
    )


def test_bits_round_trip_and_a_slice_of_whole_blocks_packs_into_its_own_bytes():
    generator = torch.Generator().manual_seed(0)
    for count in (21, BIT_BLOCK, 2 * BIT_BLOCK + 21):
        masks = torch.rand((3, count), generator=generator) > 0.5
        packed = pack_bits(masks)
        assert packed.shape == (3, -(-count // 8)) and packed.dtype == torch.uint8, count
        assert torch.equal(unpack_bits(packed, count), masks), count
    for start in range(0, count, BIT_BLOCK):  # the engine packs slice by slice
        stop = min(start + BIT_BLOCK, count)
        assert torch.equal(pack_bits(masks[:, start:stop]), packed[:, start // 8 : -(-stop // 8)])
    # 9 entries in m = 2 bytes, entry e in bit e // 2 of byte e % 2: entries 0 and 8 in byte 0 (bits 0 and
    # 4: 17), entry 3 in byte 1 (bit 1: 2)
    assert pack_bits(torch.tensor([True, False, False, True, False, False, False, False, True])).tolist() == [17, 2]


def test_the_options_are_checked():
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(MergeError, match="tall_mask_lambda must be a finite number >= 0"):
            TallMasks(tall_mask_lambda=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(MergeError, match=f"k must be an integer >= 0, got {bad}"):
            ConsensusTaskArithmetic(tall_mask_lambda=0.5, scaling_factor=1.0, k=bad)
    with pytest.raises(MergeError, match="scaling_factor must be a finite number"):
        ConsensusTaskArithmetic(tall_mask_lambda=0.5, scaling_factor=math.nan)
    described = [ConsensusTaskArithmetic(tall_mask_lambda=0.4, scaling_factor=0.3), TallMasks(0.6), EMRMerging()]
    assert [m.describe() for m in described] == [
        "consensus_task_arithmetic(tall_mask_lambda=0.4, k=2, scaling_factor=0.3)", "tall_masks(tall_mask_lambda=0.6)", "emr_merging"
    ]  # fmt: skip
    assert [METHODS[m.name] for m in described] == [ConsensusTaskArithmetic, TallMasks, EMRMerging]
    assert [m.per_task for m in described] == [False, True, True]


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


def test_tall_masks_through_the_engine_are_the_formula(pool_dirs, loaded):
    pretrained, taus = loaded
    merged = merge_per_task(ModelPool(pool_dirs), TallMasks(tall_mask_lambda=0.4), progress=False)
    assert merged.tasks == list(TASKS) and merged.scales == [1.0] * 3 and merged.method == "tall_masks(tall_mask_lambda=0.4)"
    backbones = {task: merged.backbone(task) for task in TASKS}
    for key, theta_0 in pretrained.items():
        total, masks = reference_masks(taus[key], 0.4)
        assert torch.equal(merged.vectors[key], total), key
        for index, task in enumerate(TASKS):
            assert torch.equal(merged.mask(task, key), masks[index]), key
            assert torch.equal(backbones[task][key], theta_0 + torch.where(masks[index], total, 0.0)), key
        assert merged.masks[key].dtype == torch.uint8 and merged.masks[key].shape == (3, -(-theta_0.numel() // 8))
    assert not torch.equal(backbones["eurosat"][key], backbones["dtd"][key])  # one backbone per task


def reference_emr(taus):
    total = taus[0].clone()
    for tau in taus[1:]:
        total = total + tau
    sign = torch.sign(total)
    masks = [tau * sign > 0 for tau in taus]
    unified = sign * torch.stack([torch.where(mask, tau.abs(), 0.0) for tau, mask in zip(taus, masks)]).amax(0)
    return unified, masks


def test_emr_through_the_engine_is_the_formula_with_the_papers_rescaler(pool_dirs, loaded):
    pretrained, taus = loaded
    merged = merge_per_task(ModelPool(pool_dirs), EMRMerging(), progress=False)
    magnitude, masked, per_tensor_means = [0.0] * 3, [0.0] * 3, [[0.0, 0.0] for _ in TASKS]
    references = {}
    for key in pretrained:
        unified, masks = reference_emr(taus[key])
        references[key] = unified, masks
        assert torch.equal(merged.vectors[key], unified), key
        for index, task in enumerate(TASKS):
            assert torch.equal(merged.mask(task, key), masks[index]), key
            magnitude[index] += float(taus[key][index].double().abs().sum())
            masked[index] += float(torch.where(masks[index], unified, 0.0).double().abs().sum())
            per_tensor_means[index][0] += float(taus[key][index].abs().mean())
            per_tensor_means[index][1] += float(torch.where(masks[index], unified, 0.0).abs().mean())
    entries = sum(theta_0.numel() for theta_0 in pretrained.values())
    for index, task in enumerate(TASKS):
        expected = magnitude[index] / masked[index]
        # positive terms summed in float64 in two orders: each within gamma_n of the exact sum, n the entries
        assert abs(merged.scales[index] - expected) <= 4 * gamma(entries, U64) * expected
        # the paper's ratio of whole-backbone sums, not the code's sum of per-tensor means
        assert abs(per_tensor_means[index][0] / per_tensor_means[index][1] - expected) > 1e-3 * expected
        backbone = merged.backbone(task)
        scale = torch.tensor(merged.scales[index], dtype=torch.float32)
        for key, theta_0 in pretrained.items():
            unified, masks = references[key]
            assert torch.equal(backbone[key], theta_0 + scale * torch.where(masks[index], unified, 0.0)), key


def test_the_engine_refuses_the_wrong_kind_and_threads_give_the_same_bits(pool_dirs):
    pool = ModelPool(pool_dirs)
    with pytest.raises(MergeError, match=r"emr_merging gives one backbone per task .*merging.merge_per_task"):
        merge_backbone(pool, EMRMerging(), progress=False)
    with pytest.raises(MergeError, match=r"task_arithmetic\(scaling_factor=1\) gives one merged backbone .*merge_backbone"):
        merge_per_task(pool, TaskArithmetic(scaling_factor=1.0), progress=False)
    single = merge_per_task(pool, EMRMerging(), progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the keys on two merging threads: the same tensors, the sums in key order
    try:
        threaded = merge_per_task(pool, EMRMerging(), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert single.scales == threaded.scales
    assert all(torch.equal(tensor, threaded.tensors()[name]) for name, tensor in single.tensors().items())


# --- merge.py: one backbone per task, scored and exported -----------------------------------

SIZE = 12


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """Two tasks whose test labels are EMR's own backbone's predictions for the task (with its head):
    scored with the right backbone a task gets every sample right, with the other task's not."""
    root = tmp_path_factory.mktemp("masks_cli")
    pool = mf.make_pool(root / "models", TASKS[:2], seed=4)
    merged = merge_per_task(ModelPool(pool), EMRMerging(), progress=False)
    data, scores = {}, {}
    for index, task in enumerate(TASKS[:2]):
        images = mf.noise_images(SIZE, seed=30 + index)
        labels = mf.classify(pool[task], images, merged.backbone(task)).argmax(dim=1)
        data[task] = str(write_test_set(root / "data" / task, task, images, labels))
        scores[task] = {
            other: mf.score(pool[task], images, labels, merged.backbone(other), u=mf.tolerances.U32) for other in TASKS[:2]
        }
    return pool, data, merged, scores


def write_test_set(directory, task, images, labels):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    from datamodules.tasks import get_task

    features = Features({"image": Image(), "label": ClassLabel(names=list(get_task(task).classnames))})
    DatasetDict({"test": Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)}).save_to_disk(
        str(directory)
    )
    return directory


def test_each_task_is_scored_and_exported_with_its_own_backbone(cli_setup, tmp_path, quiet_cli):
    pool, data, merged, scores = cli_setup
    args = mf.merge_test_args(tmp_path, data, pool[mf.PRETRAINED], 5)
    args += ["--model", "lightning_modules.merged.MergedClassifier", "--model.models", json.dumps(pool)]
    args += [
        "--model.method",
        "EMRMerging",
        "--model.report_dir",
        str(tmp_path / "report"),
        "--model.export_dir",
        str(tmp_path / "exports"),
    ]
    main(args)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["title"] == "Merged model: emr_merging (one backbone per task)"
    assert report["per_task_backbones"] == ["emr_merging"]
    assert {task: values["scale"] for task, values in report["per_task"].items()} == merged.scale_of()
    assert "One backbone per task, which the task id picks at inference" in (tmp_path / "report" / "report.md").read_text()
    row = report["rows"]["emr_merging"]["tasks"]
    for own, other in (TASKS[:2], TASKS[1::-1]):
        right, wrong = scores[own][own], scores[own][other]
        mf.assert_scores(row[own], right, 5, own)  # every sample once, with the task's own backbone
        assert right.correct == SIZE > wrong.correct  # ... which the accuracy tells from the other task's
        assert row[own]["accuracy"] == 1.0
        exported = load_file(str(tmp_path / "exports" / own / "model.safetensors"))
        assert all(torch.equal(exported[key], tensor) for key, tensor in merged.backbone(own).items())
        assert not torch.equal(exported["convnext.encoder.stages.0.layers.0.pwconv1.weight"],
                               merged.backbone(other)["convnext.encoder.stages.0.layers.0.pwconv1.weight"])  # fmt: skip
        card = (tmp_path / "exports" / own / "README.md").read_text()
        assert f"this is the **{own}** backbone" in card and f"`s_t = {merged.scale_of()[own]:.6g}`" in card
        images, labels = mf.read_test_set(data[own])
        assert torch.equal(mf.classify(tmp_path / "exports" / own, images).argmax(dim=1), labels)  # the export alone


def test_the_comparison_scores_per_task_rows_beside_static_ones(cli_setup, tmp_path, quiet_cli):
    pool, data, merged, scores = cli_setup
    methods = [
        {"class_path": "merging.EMRMerging"},
        {"class_path": "merging.TallMasks", "init_args": {"tall_mask_lambda": 0.4}},
        {"class_path": "merging.ConsensusTaskArithmetic", "init_args": {"tall_mask_lambda": 0.4, "k": 1, "scaling_factor": 0.5}},
    ]
    args = mf.merge_test_args(tmp_path, data, pool[mf.PRETRAINED], 5)
    args += ["--model", "lightning_modules.comparison.MethodComparison", "--model.models", json.dumps(pool)]
    args += ["--model.methods", json.dumps(methods), "--model.report_dir", str(tmp_path / "report")]
    main(args)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    tall, consensus = (
        "tall_masks(tall_mask_lambda=0.4)",
        "consensus_task_arithmetic(tall_mask_lambda=0.4, k=1, scaling_factor=0.5)",
    )
    assert report["per_task_backbones"] == ["emr_merging", tall]
    assert list(report["rows"]) == ["emr_merging", tall, consensus, "individual"]
    tall_merge = merge_per_task(ModelPool(pool), TallMasks(tall_mask_lambda=0.4), progress=False)
    static = merge_backbone(
        ModelPool(pool), ConsensusTaskArithmetic(tall_mask_lambda=0.4, k=1, scaling_factor=0.5), progress=False
    )
    for task in TASKS[:2]:
        images, labels = mf.read_test_set(data[task])
        mf.assert_scores(report["rows"]["emr_merging"]["tasks"][task], scores[task][task], 5, task)
        for name, backbone in ((tall, tall_merge.backbone(task)), (consensus, static)):
            expected = mf.score(pool[task], images, labels, backbone, u=mf.tolerances.U32)
            mf.assert_scores(report["rows"][name]["tasks"][task], expected, 5, f"{name} {task}")


BAD_INPUT = {
    "a per-task method with model.save_dir": (
        ["--model.method", "EMRMerging", "--model.save_dir", "saved"],
        "emr_merging gives one backbone per task (the task id picks it at inference), and model.save_dir saves one "
        "merged backbone: use --model.export_dir for each task's classifier",
    ),
    "a negative TALL-mask lambda": (
        ["--model.method", "TallMasks", "--model.method.tall_mask_lambda", "-0.5"],
        "tall_mask_lambda must be a finite number >= 0, got -0.5",
    ),
    "a negative consensus k": (
        ["--model.method", "ConsensusTaskArithmetic", "--model.method.tall_mask_lambda", "0.4",
         "--model.method.scaling_factor", "0.5", "--model.method.k", "-1"],
        "k must be an integer >= 0, got -1",
    ),
}  # fmt: skip


def test_a_nan_in_a_checkpoint_is_one_error_line_naming_it(cli_setup, tmp_path, workdir, capsys):
    pool, data, _, _ = cli_setup
    key = mf.first_backbone_key(pool["dtd"])
    damaged = mf.copy_checkpoint(pool["dtd"], tmp_path / "dtd")
    mf.rewrite_tensors(damaged, lambda state: {**state, key: state[key].index_fill(0, torch.tensor([0]), math.nan)})
    args = mf.merge_test_args(workdir, data, pool[mf.PRETRAINED], 4)
    args += ["--model", "lightning_modules.merged.MergedClassifier", "--model.models", json.dumps({**pool, "dtd": str(damaged)})]
    args += [
        "--model.method",
        "EMRMerging",
        "--model.report_dir",
        str(workdir / "report"),
        "--model.export_dir",
        str(workdir / "exports"),
    ]
    line = test_bad_input.one_error_line(main, args, capsys)
    test_bad_input.assert_contains(line, f"non-finite values (NaN/Inf) in '{key}' of '{damaged}")
    assert not list(workdir.iterdir())


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_error_line_and_nothing_written(cli_setup, workdir, capsys, case):
    method, message = BAD_INPUT[case]
    pool, data, _, _ = cli_setup
    args = mf.merge_test_args(workdir, data, pool[mf.PRETRAINED], 4)
    args += ["--model", "lightning_modules.merged.MergedClassifier", "--model.models", json.dumps(pool), *method]
    args += ["--model.report_dir", str(workdir / "report"), "--model.export_dir", str(workdir / "exports")]
    test_bad_input.assert_contains(test_bad_input.one_error_line(main, args, capsys), message)
    assert not list(workdir.iterdir())
