"""Property-based tests (hypothesis) of the label remapping and of the metrics.

Label remapping (``csseg_core.data.label_lut`` / ``keep_mask``, semantics of
``sdr_reference.md`` §2.3), for random scenarios (every registered one, VOC and ADE), steps,
modes and splits:

* every output of a LUT lies in ``[0, num_classes(step)) ∪ {255}``;
* train: current classes map to their model index, and no other id maps to a current index;
  disjoint/overlapped send everything else (old, future, void) to 0; sequential keeps old
  classes and void;
* val/test never map an unseen (future or out-of-range) id to a seen index; test keeps every
  seen class, val (non-sequential) keeps only background and the current classes;
* image filters: test keeps exactly the images holding a seen class, val/overlapped those
  holding a current class, disjoint/sequential never keep an image holding a future class,
  and disjoint ⊆ overlapped.

Metrics (``csseg_core.metrics.ConfusionMatrix``): IoU in [0, 1] (NaN only for classes absent
from the ground truth), perfect prediction gives IoU 1, the matrix is invariant to the pixel
order and additive over batches, and its sum is the number of valid pixels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from csseg_core.data import keep_mask, label_lut
from csseg_core.metrics import ConfusionMatrix, step_metrics
from csseg_core.scenarios import MODES, list_scenarios

SCENARIOS = list_scenarios()
PROFILE = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def views(draw):
    """(scenario, mode, step, split)."""
    sc = draw(st.sampled_from(SCENARIOS))
    return sc, draw(st.sampled_from(MODES)), draw(st.integers(0, sc.num_steps - 1)), \
        draw(st.sampled_from(("train", "val", "test", "current")))


def _sets(sc, step):
    cur = set(sc.labels(step))
    old = set(sc.labels_old(step))
    inv = {c: i for i, c in enumerate(sc.order)}
    return cur, old, inv


# ---------------------------------------------------------------------------- label_lut
@PROFILE
@given(views())
def test_lut_outputs_are_valid_model_indices(view):
    sc, mode, step, split = view
    lut = label_lut(sc, mode, step, split)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    n = sc.num_classes(step)
    assert all(int(v) < n or int(v) == 255 for v in lut), (sc.name, mode, step, split)


@PROFILE
@given(views())
def test_train_lut_maps_current_classes_and_nothing_else_to_them(view):
    sc, mode, step, _ = view
    lut = label_lut(sc, mode, step, "train")
    cur, old, inv = _sets(sc, step)
    cur_idx = {inv[c] for c in cur}
    for c in cur:
        assert lut[c] == inv[c]
    others = [i for i in range(256) if i not in cur]
    assert not cur_idx & {int(lut[i]) for i in others}, "a non-current id landed on a current index"
    if mode == "sequential":
        assert all(lut[c] == inv[c] for c in old) and lut[255] == 255
        rest = [i for i in others if i not in old and i != 255]
        assert all(lut[i] == 0 for i in rest)
    else:  # the reference trains old, future and void pixels as background
        assert all(lut[i] == 0 for i in others)


@PROFILE
@given(views())
def test_eval_luts_never_map_unseen_ids_to_seen_indices(view):
    sc, mode, step, _ = view
    cur, old, inv = _sets(sc, step)
    seen = cur | old
    for split in ("val", "test", "current"):
        lut = label_lut(sc, mode, step, split)
        unseen = [i for i in range(1, 256) if i not in seen]
        assert all(lut[i] == 255 for i in unseen), (sc.name, mode, step, split)
        assert lut[0] == (255 if sc.dataset == "ade" else 0)
    test = label_lut(sc, mode, step, "test")
    assert all(test[c] == inv[c] for c in seen)
    assert np.array_equal(label_lut(sc, mode, step, "val"), test)  # held-out validation = test semantics
    current = label_lut(sc, mode, step, "current")
    assert all(current[c] == inv[c] for c in cur)
    if mode != "sequential":
        assert all(current[c] == 255 for c in old)


@PROFILE
@given(views(), st.data())
def test_lut_applied_to_a_label_map_stays_in_range(view, data):
    sc, mode, step, split = view
    n_ids = 21 if sc.dataset == "voc" else 151
    ids = st.one_of(st.integers(0, n_ids - 1), st.just(255))
    label = data.draw(hnp.arrays(np.uint8, (6, 7), elements=ids))
    out = label_lut(sc, mode, step, split)[label]
    assert out.shape == label.shape
    assert np.all((out < sc.num_classes(step)) | (out == 255))


# ---------------------------------------------------------------------------- keep_mask
@PROFILE
@given(views(), st.data())
def test_keep_mask_filters(view, data):
    sc, mode, step, split = view
    n_ids = 21 if sc.dataset == "voc" else 151
    cur, old, _ = _sets(sc, step)
    future = {c for s in sc.steps[step + 1:] for c in s} - {0}
    n_img = data.draw(st.integers(1, 12))
    sparse = st.sampled_from((False,) * 9 + (True,))  # images hold a few classes, as real ones do
    present = data.draw(hnp.arrays(np.bool_, (n_img, n_ids), elements=st.one_of(sparse, st.booleans())))
    presence = np.zeros((n_img, 256), dtype=bool)
    presence[:, :n_ids] = present
    presence[:, 255] = data.draw(st.booleans())
    keep = keep_mask(presence, sc, mode, step, split)
    assert keep.dtype == bool and keep.shape == (n_img,)
    has = lambda cls: presence[:, sorted(cls)].any(axis=1) if cls else np.zeros(n_img, bool)  # noqa: E731
    if split in ("test", "val"):
        assert np.array_equal(keep, has(cur | old))
    elif split == "current" or mode == "overlapped":
        assert np.array_equal(keep, has(cur))
    else:
        assert not np.any(keep & has(future)), "disjoint/sequential keep an image with a future class"
        assert np.all(keep <= has(cur))
        assert np.all(keep <= keep_mask(presence, sc, "overlapped", step, split))


# ---------------------------------------------------------------------------- metrics
@st.composite
def predictions(draw):
    n = draw(st.integers(1, 12))
    size = draw(st.integers(1, 300))
    target = draw(hnp.arrays(np.int64, size, elements=st.one_of(st.integers(0, n - 1), st.just(255))))
    pred = draw(hnp.arrays(np.int64, size, elements=st.integers(0, n - 1)))
    return n, torch.from_numpy(pred), torch.from_numpy(target)


@PROFILE
@given(predictions())
def test_iou_is_a_fraction_and_matrix_counts_valid_pixels(case):
    n, pred, target = case
    cm = ConfusionMatrix(n)
    cm.update(pred, target)
    valid = int(((target >= 0) & (target < n)).sum())
    assert int(cm.mat.sum()) == valid
    res = cm.compute()
    present = res["present"]
    for iou, acc, p in zip(res["class_iou"].tolist(), res["class_acc"].tolist(), present.tolist()):
        if p:
            assert 0.0 <= iou <= 1.0 and 0.0 <= acc <= 1.0
        else:
            assert math.isnan(iou)
    if valid:
        assert 0.0 <= res["miou"] <= 1.0 and 0.0 <= res["overall_acc"] <= 1.0
    else:
        assert math.isnan(res["miou"])


@PROFILE
@given(predictions())
def test_perfect_prediction_scores_one(case):
    n, _, target = case
    pred = torch.where(target == 255, torch.zeros_like(target), target)
    cm = ConfusionMatrix(n)
    cm.update(pred, target)
    res = cm.compute()
    assert all(v == 1.0 for v, p in zip(res["class_iou"].tolist(), res["present"].tolist()) if p)
    if bool(res["present"].any()):
        assert res["miou"] == 1.0 and res["overall_acc"] == 1.0
        m = step_metrics(cm, n_old=max(1, n // 2))
        assert m["miou_all"] == 1.0
        assert math.isnan(m["miou_old"]) or m["miou_old"] == 1.0


@PROFILE
@given(predictions(), st.randoms(use_true_random=False))
def test_matrix_is_invariant_to_pixel_order_and_additive(case, rnd):
    n, pred, target = case
    perm = list(range(pred.numel()))
    rnd.shuffle(perm)
    perm = torch.tensor(perm, dtype=torch.long)
    a, b, c = ConfusionMatrix(n), ConfusionMatrix(n), ConfusionMatrix(n)
    a.update(pred, target)
    b.update(pred[perm], target[perm])
    cut = rnd.randint(0, pred.numel())
    c.update(pred[:cut], target[:cut])
    c.update(pred[cut:], target[cut:])
    assert torch.equal(a.mat, b.mat) and torch.equal(a.mat, c.mat)
    # the same pixels as a 2-D batch give the same matrix
    d = ConfusionMatrix(n)
    d.update(pred.view(1, -1), target.view(1, -1))
    assert torch.equal(a.mat, d.mat)


@PROFILE
@given(predictions())
def test_out_of_range_prediction_is_refused(case):
    n, pred, target = case
    if not bool(((target >= 0) & (target < n)).any()):
        return
    bad = pred.clone()
    bad[((target >= 0) & (target < n)).nonzero()[0]] = n
    with pytest.raises(ValueError):
        ConfusionMatrix(n).update(bad, target)
