"""Confusion-matrix metrics: hand-computed values, ignored pixels, old/new split, all-reduce."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from csseg_core.metrics import ConfusionMatrix, format_percent, step_metrics


def _three_class_cm() -> ConfusionMatrix:
    # rows = ground truth, columns = prediction:
    #   gt 0: [2, 1, 0]   gt 1: [0, 1, 1]   gt 2: [0, 0, 1]; two pixels ignored (255).
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 0, 1], [1, 2, 255, 255]])
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 1]])
    cm.update(pred, target)
    return cm


def test_matrix_and_metrics_by_hand():
    cm = _three_class_cm()
    assert cm.mat.dtype == torch.int64
    assert cm.mat.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    res = cm.compute()
    assert res["class_iou"].tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert res["class_acc"].tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert res["overall_acc"] == pytest.approx(4 / 6)
    assert res["miou"] == pytest.approx(0.5)
    assert res["mean_acc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert res["present"].tolist() == [True, True, True]


def test_step_metrics_split_by_hand():
    res = step_metrics(_three_class_cm(), n_old=2)
    assert res["miou_all"] == pytest.approx(0.5)
    assert res["miou_old"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert res["miou_new"] == pytest.approx(0.5)
    assert isinstance(res["class_iou"], list) and isinstance(res["class_iou"][0], float)
    assert res["class_iou"] == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert res["overall_acc"] == pytest.approx(4 / 6)


def test_absent_classes_are_nan_and_excluded():
    cm = ConfusionMatrix(4)
    # class 3 is predicted once but absent from the ground truth; 7 (a future class) ignored
    cm.update(torch.tensor([0, 3, 1, 2, 0]), torch.tensor([0, 0, 1, 2, 7]))
    res = cm.compute()
    assert res["present"].tolist() == [True, True, True, False]
    assert math.isnan(res["class_iou"][3]) and math.isnan(res["class_acc"][3])
    assert res["class_iou"][0] == pytest.approx(0.5)  # 1 / (2 + 1 - 1)
    assert res["miou"] == pytest.approx((0.5 + 1 + 1) / 3)
    split = step_metrics(cm, n_old=3)
    assert math.isnan(split["miou_new"])  # no new class in the ground truth
    assert split["miou_old"] == pytest.approx(res["miou"])
    assert math.isnan(split["class_iou"][3])
    assert step_metrics(cm, n_old=2)["miou_new"] == pytest.approx(1.0)


def test_step_zero_has_no_new_classes():
    split = step_metrics(_three_class_cm(), n_old=3)
    assert math.isnan(split["miou_new"])
    assert split["miou_old"] == pytest.approx(split["miou_all"])


def test_empty_matrix_and_reset():
    cm = _three_class_cm()
    cm.reset()
    assert int(cm.mat.sum()) == 0
    res = cm.compute()
    assert math.isnan(res["miou"]) and math.isnan(res["overall_acc"])


def test_updates_accumulate_and_bad_inputs_raise():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert cm.mat.diagonal().tolist() == [2, 2, 0]
    with pytest.raises(ValueError):
        cm.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError):
        step_metrics(cm, n_old=4)


def test_format_percent():
    assert format_percent(0.6134) == "61.3"
    assert format_percent(1.0) == "100.0"
    assert format_percent(math.nan) == "–"
    assert format_percent(None) == "–"


def test_all_reduce_is_noop_without_process_group():
    cm = _three_class_cm()
    before = cm.mat.clone()
    cm.all_reduce()
    assert torch.equal(cm.mat, before)


def _fixed_batches(n: int = 6, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, classes, (n, 16, 16), generator=gen)
    target = torch.randint(0, classes, (n, 16, 16), generator=gen)
    target[:, :2] = 255
    return pred, target


def _reduce_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pred, target = _fixed_batches()
        cm = ConfusionMatrix(5)
        for i in range(rank, pred.shape[0], world):
            cm.update(pred[i], target[i])
        cm.all_reduce()
        torch.save(cm.mat, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    pred, target = _fixed_batches()
    single = ConfusionMatrix(5)
    single.update(pred, target)
    for rank in range(2):
        reduced = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(reduced, single.mat)


def test_rank_correlation_is_spearmans_with_average_ranks_for_ties():
    from csseg_core.evaluation import rank_correlation

    assert rank_correlation([1, 2, 3, 4], [10, 20, 35, 90]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: ranks [0, 1.5, 1.5, 3] against [0, 1, 2, 3] -> Pearson of the ranks = 0.9486832...
    assert rank_correlation([1, 2, 2, 3], [5, 6, 7, 8]) == pytest.approx(3 / math.sqrt(10), abs=1e-9)
    nan = float("nan")
    assert rank_correlation([1, nan, 2, 3], [1, 9, 2, 3]) == pytest.approx(1.0)  # NaN pairs dropped
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))  # a constant column has no ranking
    assert math.isnan(rank_correlation([1, 2], [2, 1]))  # fewer than three pairs
