"""Tests of csseg_core.losses against hand-computed values and independent loop computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from csseg_core import losses as L

D64 = torch.float64
LN2 = math.log(2.0)


def t(x, dtype=D64):
    return torch.tensor(x, dtype=dtype)


def logits_px(vectors, dtype=D64):
    """Logits 1×C×1×N from a list of N per-pixel C-vectors."""
    return t(vectors, dtype).T.reshape(1, len(vectors[0]), 1, len(vectors))


def feats_px(vectors, shape=None):
    """Features B×D×h×w from per-pixel vectors given in (b, y, x) order."""
    arr = t(vectors)
    b, h, w = shape if shape else (1, 1, len(vectors))
    return arr.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- classification / output distillation

def test_cross_entropy_hand():
    x = logits_px([[0.0, math.log(3)], [5.0, -2.0]])
    y = torch.tensor([[[0, 255]]])
    assert L.cross_entropy(x, y).item() == pytest.approx(math.log(4) / 2)


def test_unbiased_ce_hand():
    # logits [0, 0, ln 6] at every pixel, n_old = 2: p_bg = 2/8, p_2 = 6/8
    x = logits_px([[0.0, 0.0, math.log(6)]] * 4)
    y = torch.tensor([[[0, 1, 2, 255]]])
    expected = (math.log(4) + math.log(4) + math.log(4 / 3) + 0.0) / 4
    assert L.unbiased_cross_entropy(x, y, n_old=2).item() == pytest.approx(expected)
    assert y.tolist() == [[[0, 1, 2, 255]]]  # target not modified in place


def _autograd_unce(x, y, n_old):  # the textbook form, differentiated by autograd: the oracle
    lsm = torch.log_softmax(x, dim=1)
    logp = torch.cat([torch.logsumexp(lsm[:, :n_old], dim=1, keepdim=True), lsm[:, n_old:]], 1)
    valid = y != 255
    idx = torch.where(valid & (y >= n_old), y - n_old + 1, torch.zeros_like(y))
    nll = -logp.gather(1, idx[:, None])[:, 0]
    return torch.where(valid, nll, torch.zeros_like(nll)).mean()


def _autograd_unkd(x, old, alpha):
    n_old = old.shape[1]
    lsm = torch.log_softmax(x, dim=1)
    logp_bg = torch.logsumexp(torch.cat([lsm[:, :1], lsm[:, n_old:]], 1), dim=1)
    q = torch.softmax(alpha * old, dim=1)
    return -(q[:, 0] * logp_bg + (q[:, 1:] * lsm[:, 1:n_old]).sum(dim=1)).mean() / n_old


@pytest.mark.parametrize("n_old", [1, 2, 4, 6])
@pytest.mark.parametrize("channels_last", [False, True])
def test_unbiased_ce_and_kd_values_and_gradients_equal_autograd_of_the_textbook_form(n_old, channels_last):
    """The hand-written backward passes (one pass, no slice fills) against autograd, in float64,
    with ignored pixels, every label kind, n_old from 1 (plain CE) to C (no new channel: plain KD)."""
    x = torch.randn(3, 6, 5, 7, generator=gen(31), dtype=D64) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (3, 5, 7), generator=gen(32))
    y[0, :2] = 255
    old = torch.randn(3, n_old, 5, 7, generator=gen(33), dtype=D64) * 2
    for ours, oracle in ((lambda t: L.unbiased_cross_entropy(t, y, n_old), lambda t: _autograd_unce(t, y, n_old)),
                         (lambda t: L.unbiased_knowledge_distillation(t, old, 0.7),
                          lambda t: _autograd_unkd(t, old, 0.7))):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        va, vb = ours(a), oracle(b)
        (2.5 * va).backward()
        (2.5 * vb).backward()
        assert torch.allclose(va, vb, rtol=1e-12, atol=1e-12)
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
        assert torch.autograd.gradcheck(ours, (x.clone().requires_grad_(),))
    none = torch.full_like(y, 255)  # nothing to learn: zero loss and zero gradient, never NaN
    z = x.clone().requires_grad_()
    L.unbiased_cross_entropy(z, none, n_old).backward()
    assert z.grad.abs().max().item() == 0.0


def test_unbiased_ce_equals_ce_when_one_old_class():
    x = torch.randn(2, 5, 3, 4, generator=gen(1), dtype=D64)
    y = torch.randint(0, 5, (2, 3, 4), generator=gen(2))
    y[0, 0, :2] = 255
    assert torch.allclose(L.unbiased_cross_entropy(x, y, n_old=1), L.cross_entropy(x, y))


def test_unbiased_ce_rejects_bad_n_old():
    with pytest.raises(ValueError, match="n_old"):
        L.unbiased_cross_entropy(torch.zeros(1, 3, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long), n_old=4)


def test_kd_hand_and_entropy_closed_form():
    old = logits_px([[0.0, math.log(3)]])
    # uniform student over old channels: KD = ln2 / C_old whatever the teacher (and alpha)
    x = logits_px([[0.0, 0.0, 7.0]])
    assert L.knowledge_distillation(x, old).item() == pytest.approx(LN2 / 2)
    assert L.knowledge_distillation(x, old, alpha=2.0).item() == pytest.approx(LN2 / 2)
    # student == teacher on the old channels: KD = H(softmax(x_old)) / C_old
    x = logits_px([[0.0, math.log(3), -3.0]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert L.knowledge_distillation(x, old).item() == pytest.approx(h / 2)


def test_kd_gradient_vanishes_when_student_equals_teacher():
    old = torch.randn(2, 3, 2, 2, generator=gen(3), dtype=D64)
    x = torch.cat([old, torch.randn(2, 2, 2, 2, generator=gen(4), dtype=D64)], 1).requires_grad_()
    L.knowledge_distillation(x, old).backward()
    assert torch.allclose(x.grad, torch.zeros_like(x.grad), atol=1e-12)


def test_unkd_hand():
    # x = [0, ln2, 0] (channel 2 new), C_old = 2: p_bg = (1+1)/4, p_1 = 2/4 -> both log = -ln2
    x = logits_px([[0.0, math.log(2), 0.0]])
    old = logits_px([[0.0, math.log(3)]])
    assert L.unbiased_knowledge_distillation(x, old).item() == pytest.approx(LN2 / 2)


def test_unkd_equals_kd_without_new_channels():
    x = torch.randn(2, 4, 3, 3, generator=gen(5), dtype=D64)
    old = torch.randn(2, 4, 3, 3, generator=gen(6), dtype=D64)
    for a in (1.0, 0.5):
        assert torch.allclose(L.unbiased_knowledge_distillation(x, old, a), L.knowledge_distillation(x, old, a))


def test_unkd_against_loop():
    x = torch.randn(1, 5, 2, 2, generator=gen(7), dtype=D64)
    old = torch.randn(1, 3, 2, 2, generator=gen(8), dtype=D64)
    xs, os_ = x.numpy()[0], old.numpy()[0]
    total = 0.0
    for i in range(2):
        for j in range(2):
            v, q = xs[:, i, j], np.exp(os_[:, i, j]) / np.exp(os_[:, i, j]).sum()
            den = np.exp(v).sum()
            lbg = np.log((np.exp(v[0]) + np.exp(v[3:]).sum()) / den)
            total += -(q[0] * lbg + sum(q[c] * (v[c] - np.log(den)) for c in (1, 2))) / 3
    assert L.unbiased_knowledge_distillation(x, old).item() == pytest.approx(total / 4)


def test_bce_with_ignore_hand():
    x = torch.zeros(1, 2, 1, 2, dtype=D64)
    y = torch.tensor([[[1, 255]]])
    assert L.bce_with_ignore(x, y).item() == pytest.approx(2 * LN2 / 2)


def test_icarl_distillation_hand():
    x = torch.zeros(1, 4, 2, 2, dtype=D64)
    x[:, 3] = 9.0  # new channel: not distilled
    old = torch.zeros(1, 3, 2, 2, dtype=D64)
    assert L.icarl_distillation(x, old).item() == pytest.approx(3 * LN2)


def test_feature_distillation_hand_and_zero_at_equality():
    f = feats_px([[1.0, 2.0]])
    assert L.feature_distillation(f, torch.zeros_like(f)).item() == pytest.approx(2.5)
    f = torch.randn(2, 3, 2, 2, generator=gen(9), dtype=D64, requires_grad=True)
    loss = L.feature_distillation(f, f.detach().clone())
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(f.grad) == 0


def test_cil_hand():
    x = torch.zeros(1, 2, 1, 4, dtype=D64)
    old = torch.zeros(1, 1, 1, 4, dtype=D64)  # padded to [0, 0]: uniform teacher, H = 1 bit
    y = torch.tensor([[[0, 1, 255, 0]]])
    assert L.cil_distillation(x, old, y, gradient_scale=0.0).item() == pytest.approx(2 * LN2 / 4)
    assert L.cil_distillation(x, old, y, gradient_scale=1.0).item() == pytest.approx(2 * 2 * LN2 / 4)
    assert L.cil_distillation(x, old, y, 0.0, temperature=2.0).item() == pytest.approx(4 * 2 * LN2 / 4)


def test_cil_against_loop():
    x = torch.randn(1, 4, 2, 3, generator=gen(10), dtype=D64)
    old = torch.randn(1, 2, 2, 3, generator=gen(11), dtype=D64)
    y = torch.tensor([[[0, 0, 3], [255, 0, 2]]])
    gs, temp = 0.7, 2.0
    total = 0.0
    for i in range(2):
        for j in range(3):
            if y[0, i, j] != 0:
                continue
            o = np.concatenate([old.numpy()[0, :, i, j], [0.0, 0.0]])
            p1 = np.exp(o) / np.exp(o).sum()
            w = 1 + gs * (-(p1 * np.log(p1)).sum()) / LN2
            q = np.exp(o / temp) / np.exp(o / temp).sum()
            v = x.numpy()[0, :, i, j] / temp
            logp = v - np.log(np.exp(v).sum())
            total += w * -(q * logp).sum()
    expected = temp ** 2 * total / 6
    assert L.cil_distillation(x, old, y, gs, temp).item() == pytest.approx(expected)


@pytest.mark.parametrize("name", ["ce", "unce", "kd", "unkd", "fd", "bce", "icarl", "cil"])
def test_pixel_mean_losses_are_batch_means(name):
    x = torch.randn(2, 5, 3, 4, generator=gen(12), dtype=D64)
    old = torch.randn(2, 3, 3, 4, generator=gen(13), dtype=D64)
    y = torch.randint(0, 5, (2, 3, 4), generator=gen(14))
    y[1, 0] = 255
    fn = {
        "ce": lambda a, o, b: L.cross_entropy(a, b),
        "unce": lambda a, o, b: L.unbiased_cross_entropy(a, b, n_old=3),
        "kd": lambda a, o, b: L.knowledge_distillation(a, o, alpha=0.5),
        "unkd": lambda a, o, b: L.unbiased_knowledge_distillation(a, o),
        "fd": lambda a, o, b: L.feature_distillation(a[:, :3], o),
        "bce": lambda a, o, b: L.bce_with_ignore(a, b),
        "icarl": lambda a, o, b: L.icarl_distillation(a, o),
        "cil": lambda a, o, b: L.cil_distillation(a, o, b, 0.5, 2.0),
    }[name]
    both = fn(x, old, y)
    halves = (fn(x[:1], old[:1], y[:1]) + fn(x[1:], old[1:], y[1:])) / 2
    assert torch.allclose(both, halves)


# ----------------------------------------------------------------- sparsity

ONE_HOT = [0.0, 0.0, 3.0, 0.0]


@pytest.mark.parametrize("shrinking,expected", [("squared", 1.0), ("power3", 1.0), ("exponential", 3 + math.e)])
@pytest.mark.parametrize("normalization", ["max_maskedforclass", "L1", "L2", "max_foreachfeature", "max_overall"])
def test_sparsity_one_hot_ratio(normalization, shrinking, expected):
    f = feats_px([ONE_HOT])
    y = torch.tensor([[[1]]])
    out = L.feature_sparsity(f, y, normalization, shrinking, "ratio")
    assert out.item() == pytest.approx(expected)


def test_sparsity_one_hot_softmax_entropy_lasso():
    f = feats_px([ONE_HOT])
    p = np.exp(ONE_HOT) / np.exp(ONE_HOT).sum()
    out = L.feature_sparsity(f, None, "softmax", "squared", "ratio")
    assert out.item() == pytest.approx((p ** 2).sum() / p.sum())
    out = L.feature_sparsity(f, None, "softmax", "exponential", "entropy")
    assert out.item() == pytest.approx(-(p * np.log(p + 1e-10)).sum())
    assert L.feature_sparsity(f, None, "max_overall", "squared", "entropy").item() == pytest.approx(0.0, abs=1e-8)
    assert L.feature_sparsity(f, None, "max_overall", "squared", "lasso").item() == pytest.approx(1.5)


def test_sparsity_max_masked_for_class_against_loop():
    f = torch.rand(2, 5, 3, 3, generator=gen(15), dtype=D64)
    y = torch.tensor([[[0, 0, 1], [1, 255, 0], [2, 2, 0]], [[1, 0, 0], [0, 0, 255], [255, 0, 0]]])
    fn, yn = f.numpy(), y.numpy()
    total = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                c = yn[b, i, j]
                m = max(fn[bb, :, ii, jj].max() for bb in range(2) for ii in range(3) for jj in range(3)
                        if yn[bb, ii, jj] == c)
                v = fn[b, :, i, j] / (m + 1e-15)
                total += np.exp(v).sum() / (v.sum() + 1e-15)
    out = L.feature_sparsity(f, y, "max_maskedforclass", "exponential", "ratio")
    assert out.item() == pytest.approx(total / 18)


def test_sparsity_only_background_is_zero_and_bad_options_raise():
    f = torch.rand(2, 4, 2, 2, generator=gen(16), dtype=D64, requires_grad=True)
    out = L.feature_sparsity(f, torch.zeros(2, 2, 2, dtype=torch.long))
    assert out.item() == 0.0
    out.backward()
    for kw, word in [({"normalization": "L3"}, "L1"), ({"shrinking": "cubic"}, "power3"),
                     ({"kind": "max_minus_ratio"}, "entropy")]:
        with pytest.raises(ValueError, match=word):
            L.feature_sparsity(f, None, **{"normalization": "L1", **kw})


def test_sparsity_all_options_finite_and_differentiable():
    f = torch.rand(2, 6, 3, 3, generator=gen(17), requires_grad=True)
    y = torch.randint(0, 3, (2, 3, 3), generator=gen(18))
    for n in L.NORMALIZATIONS:
        for s in L.SHRINKINGS:
            for k in L.SPARSITY_KINDS:
                out = L.feature_sparsity(f, y, n, s, k)
                assert torch.isfinite(out), (n, s, k)
                (g,) = torch.autograd.grad(out, f)
                assert torch.isfinite(g).all(), (n, s, k)


# ----------------------------------------------------------------- prototypes: attraction, repulsion, matching

def test_attraction_hand():
    protos = t([[0.0, 0.0], [1.0, 1.0]])
    f = feats_px([[1.0, 0.0], [0.0, 0.0], [1.0, 3.0]])
    y = torch.tensor([[[0, 0, 1]]])
    # class 0: (0.5 + 0)/2 = 0.25; class 1: (0 + 4)/2 = 2; divided by K = 2 once (reference: 1.0625)
    assert L.attraction(f, y, protos).item() == pytest.approx(1.125)


def test_attraction_zero_at_prototypes_and_prototypes_get_no_grad():
    protos = torch.randn(3, 4, generator=gen(19), dtype=D64, requires_grad=True)
    y = torch.tensor([[[0, 2], [2, 255]]])
    f = protos.detach()[y.clamp_max(2)].permute(0, 3, 1, 2).clone().requires_grad_()
    out = L.attraction(f, y, protos)
    out.backward()
    assert out.item() == 0.0 and protos.grad is None and torch.count_nonzero(f.grad) == 0


def test_repulsion_hand():
    one = feats_px([[1.0, 2.0], [1.0, 2.0]])
    assert L.repulsion(one, torch.tensor([[[3, 3]]])).item() == 0.0
    two = feats_px([[0.0, 0.0], [2.0, 4.0], [4.0, 4.0]])
    y = torch.tensor([[[0, 5, 5]]])  # means (0, 0) and (3, 4): distance 5
    assert L.repulsion(two, y).item() == pytest.approx(0.2)
    three = feats_px([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0], [9.0, 9.0]])
    y = torch.tensor([[[0, 1, 2, 255]]])
    assert L.repulsion(three, y).item() == pytest.approx((1 / 5 + 1 / 4 + 1 / 3) / 3)


def test_repulsion_leaves_out_coinciding_means():
    f = feats_px([[1.0, 1.0], [1.0, 1.0]]).requires_grad_()
    out = L.repulsion(f, torch.tensor([[[0, 1]]]))
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(f.grad) == 0
    f = feats_px([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]]).requires_grad_()
    out = L.repulsion(f, torch.tensor([[[0, 1, 2]]]))  # 4 remaining ordered pairs, all at distance 5
    out.backward()
    assert out.item() == pytest.approx(0.2) and torch.isfinite(f.grad).all()


def test_prototype_matching_hand():
    protos = t([[9.0, 9.0], [2.0, 2.0], [1.0, 1.0]])
    f = feats_px([[5.0, 5.0], [1.0, 1.0], [3.0, 1.0], [0.0, 0.0], [7.0, 7.0]])
    y = torch.tensor([[[0, 1, 1, 2, 255]]])
    # class 1: mean (2, 1) vs (2, 2) -> 0.5; class 2: (0, 0) vs (1, 1) -> 1
    assert L.prototype_matching(f, y, protos, sum_after=True).item() == pytest.approx(0.75)
    # per pixel: class 1 -> (1 + 1)/2 = 1, class 2 -> 1; summed over classes
    assert L.prototype_matching(f, y, protos, sum_after=False).item() == pytest.approx(2.0)


def test_prototype_matching_zero_when_means_equal_prototypes():
    protos = t([[0.0, 0.0], [2.0, 2.0], [5.0, 1.0]], ).requires_grad_()
    f = feats_px([[1.0, 3.0], [3.0, 1.0], [5.0, 1.0], [8.0, 8.0]]).requires_grad_()
    y = torch.tensor([[[1, 1, 2, 0]]])
    out = L.prototype_matching(f, y, protos)
    out.backward()
    assert out.item() == 0.0 and protos.grad is None


def test_class_feature_sums_against_loop_and_additive():
    f = torch.randn(2, 3, 4, 5, generator=gen(20), dtype=D64)
    y = torch.randint(0, 4, (2, 4, 5), generator=gen(21))
    y[0, 0] = 255
    y[1, 1, 1] = 7  # outside num_classes: skipped
    sums, counts = L.class_feature_sums(f, y, num_classes=5)
    exp_s, exp_c = np.zeros((5, 3)), np.zeros(5, dtype=np.int64)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                c = int(y[b, i, j])
                if c < 5:
                    exp_s[c] += f.numpy()[b, :, i, j]
                    exp_c[c] += 1
    assert np.allclose(sums.numpy(), exp_s) and counts.tolist() == exp_c.tolist()
    assert counts.dtype == torch.long
    s0, c0 = L.class_feature_sums(f[:1], y[:1], 5)
    s1, c1 = L.class_feature_sums(f[1:], y[1:], 5)
    assert torch.allclose(sums, s0 + s1) and torch.equal(counts, c0 + c1)


def _mixing_batch():
    """Batch of 2 where class 1 sits in different pixels of each image (channel mixing would show)."""
    f = torch.arange(2 * 3 * 2 * 2, dtype=D64).reshape(2, 3, 2, 2) ** 1.5 / 10
    y = torch.tensor([[[1, 1], [0, 2]], [[2, 0], [2, 1]]])
    return f, y


def _reference_style(f, y, protos):
    """The reference's boolean-mask gathering: (D, N) reshape for L_cl^a, (N, D) for L_pm."""
    d = f.shape[1]
    sel = {c: f[(y == c)[:, None].expand_as(f)] for c in (0, 1, 2)}
    att = np.mean([((sel[c].reshape(d, -1) - protos[c][:, None]) ** 2).mean().item() for c in (0, 1, 2)])
    pm = np.mean([((sel[c].reshape(-1, d).mean(0) - protos[c]) ** 2).mean().item() for c in (1, 2)])
    return att, pm


def test_batch2_gathers_per_pixel_vectors_not_mixed_channels():
    f, y = _mixing_batch()
    protos = t([[0.0, 1.0, 2.0], [1.0, 2.0, 0.5], [3.0, 0.0, 1.0]])
    vecs = {c: [f[b, :, i, j].numpy() for b in range(2) for i in range(2) for j in range(2) if y[b, i, j] == c]
            for c in (0, 1, 2)}
    exp_att = np.mean([np.mean([((v - protos[c].numpy()) ** 2).mean() for v in vecs[c]]) for c in (0, 1, 2)])
    exp_pm = np.mean([((np.mean(vecs[c], 0) - protos[c].numpy()) ** 2).mean() for c in (1, 2)])
    assert L.attraction(f, y, protos).item() == pytest.approx(exp_att)
    assert L.prototype_matching(f, y, protos).item() == pytest.approx(exp_pm)
    sums, _ = L.class_feature_sums(f, y, 3)
    assert np.allclose(sums[1].numpy(), np.sum(vecs[1], 0))
    # the construction discriminates: the reference's gathering gives other values on this batch
    ref_att, ref_pm = _reference_style(f, y, protos)
    assert abs(ref_att - exp_att) > 1e-3 and abs(ref_pm - exp_pm) > 1e-3


def test_batch2_attraction_matches_loop_on_random_batch():
    f = torch.randn(2, 4, 3, 3, generator=gen(22), dtype=D64)
    y = torch.randint(0, 3, (2, 3, 3), generator=gen(23))
    protos = torch.randn(3, 4, generator=gen(24), dtype=D64)
    per_class = []
    for c in y.unique().tolist():
        errs = [((f[b, :, i, j] - protos[c]) ** 2).mean().item()
                for b in range(2) for i in range(3) for j in range(3) if y[b, i, j] == c]
        per_class.append(np.mean(errs))
    assert L.attraction(f, y, protos).item() == pytest.approx(np.mean(per_class))


# ----------------------------------------------------------------- reference-compatibility options (DEPARTURES §1–3)

def _channel_major(f, mask, rows="channels"):
    """Independent rendering of the reference selection ``F[mask.expand(B, D, h, w)]``: loop over
    (b, c, y, x) in that order, keep the masked elements, reshape to D×N (or N×D)."""
    b, d, h, w = f.shape
    vals = [f[i, c, y, x].item() for i in range(b) for c in range(d) for y in range(h) for x in range(w)
            if bool(mask[i, y, x])]
    return np.array(vals).reshape((d, -1) if rows == "channels" else (-1, d))


def _mix_protos():
    return t([[0.0, 1.0, 2.0], [1.0, 2.0, 0.5], [3.0, 0.0, 1.0]])


def test_reference_gather_is_channel_major_and_per_pixel_only_at_batch1():
    f, y = _mixing_batch()
    for c in (0, 1, 2):
        for rows in ("channels", "pixels"):
            assert np.allclose(L.reference_gather(f, y == c, rows).numpy(), _channel_major(f, y == c, rows))
    # batch 1: the columns of D×N are the pixels' feature vectors; batch 2: they are not
    one = L.reference_gather(f[:1], y[:1] == 1).T.numpy()
    assert np.allclose(one, [f[0, :, 0, 0].numpy(), f[0, :, 0, 1].numpy()])
    two = L.reference_gather(f, y == 1).T.numpy()
    pixel = [f[b, :, i, j].numpy() for b in range(2) for i in range(2) for j in range(2) if y[b, i, j] == 1]
    assert not np.allclose(two, pixel)
    with pytest.raises(ValueError, match="rows"):
        L.reference_gather(f, y == 1, "cols")


def test_reference_class_feature_sums_are_row_sums_of_the_channel_major_matrix():
    f, y = _mixing_batch()
    sums, counts = L.class_feature_sums(f, y, 3, gather="reference")
    for c in (0, 1, 2):
        sel = _channel_major(f, y == c)
        assert np.allclose(sums[c].numpy(), sel.sum(1)) and counts[c].item() == sel.shape[1]
    pix_sums, pix_counts = L.class_feature_sums(f, y, 3)
    assert torch.equal(counts, pix_counts) and not torch.allclose(sums, pix_sums)     # they differ at batch 2
    s1, c1 = L.class_feature_sums(f[:1], y[:1], 3, gather="reference")               # and agree at batch 1
    p1, q1 = L.class_feature_sums(f[:1], y[:1], 3)
    assert torch.allclose(s1, p1) and torch.equal(c1, q1)
    y255 = y.clone()
    y255[0, 0, 0] = 255
    s, c = L.class_feature_sums(f, y255, 2, gather="reference")  # 255 and classes >= num_classes skipped
    assert c.tolist() == [2, 2] and np.allclose(s[1].numpy(), _channel_major(f, y255 == 1).sum(1))


def test_reference_attraction_against_the_reference_formula():
    f, y = _mixing_batch()
    protos = _mix_protos()
    terms = [((_channel_major(f, y == c) - protos[c].numpy()[:, None]) ** 2).mean() for c in (0, 1, 2)]
    assert L.attraction(f, y, protos, gather="reference").item() == pytest.approx(np.mean(terms))
    # the reference's loop: running sum divided by K = 3 inside the loop
    running = 0.0
    for term in terms:
        running = (running + term) / 3
    both = L.attraction(f, y, protos, gather="reference", reduce="reference").item()
    assert both == pytest.approx(running) == pytest.approx(terms[0] / 27 + terms[1] / 9 + terms[2] / 3)
    # ours (the default) is the per-pixel mean and differs on this batch
    ours = L.attraction(f, y, protos)
    assert ours.item() == pytest.approx(L.attraction(f, y, protos, gather="pixel", reduce="mean").item())
    assert abs(ours.item() - np.mean(terms)) > 1e-3


def test_reference_attraction_reduce_divides_inside_the_loop():
    protos = t([[0.0, 0.0], [1.0, 1.0]])
    f = feats_px([[1.0, 0.0], [0.0, 0.0], [1.0, 3.0]])
    y = torch.tensor([[[0, 0, 1]]])
    a, b = 0.25, 2.0  # per-class terms of test_attraction_hand
    assert L.attraction(f, y, protos).item() == pytest.approx(a / 2 + b / 2)       # default unchanged
    assert L.attraction(f, y, protos, reduce="reference").item() == pytest.approx(a / 4 + b / 2)
    # batch 1: the reference gathering gives per-pixel vectors, so only the reduction matters
    assert L.attraction(f, y, protos, gather="reference", reduce="reference").item() == pytest.approx(a / 4 + b / 2)
    assert L.attraction(f, y[:, :, :1].expand(1, 1, 3).clone(), protos, reduce="reference").item() == \
        pytest.approx(L.attraction(f, torch.zeros_like(y), protos).item())            # K = 1: the same
    with pytest.raises(ValueError, match="reduce"):
        L.attraction(f, y, protos, reduce="sum")
    with pytest.raises(ValueError, match="gather"):
        L.attraction(f, y, protos, gather="channels")


def test_reference_repulsion_uses_row_means_of_the_channel_major_matrix():
    f, y = _mixing_batch()
    means = [_channel_major(f, y == c).mean(1) for c in (0, 1, 2)]
    inv = [1 / np.linalg.norm(means[j] - means[k]) for j in range(3) for k in range(3) if j != k]
    assert L.repulsion(f, y, gather="reference").item() == pytest.approx(np.mean(inv))
    pix = [np.mean([f[b, :, i, j].numpy() for b in range(2) for i in range(2) for j in range(2) if y[b, i, j] == c], 0)
           for c in (0, 1, 2)]
    ours = np.mean([1 / np.linalg.norm(pix[j] - pix[k]) for j in range(3) for k in range(3) if j != k])
    assert L.repulsion(f, y).item() == pytest.approx(ours) and abs(ours - np.mean(inv)) > 1e-4
    assert L.repulsion(f[:1], y[:1], gather="reference").item() == pytest.approx(L.repulsion(f[:1], y[:1]).item())


def test_reference_prototype_matching_reshapes_the_selection_to_n_by_d():
    f, y = _mixing_batch()
    protos = _mix_protos()
    rows = {c: _channel_major(f, y == c, "pixels") for c in (1, 2)}
    after = np.mean([((rows[c].mean(0) - protos[c].numpy()) ** 2).mean() for c in (1, 2)])
    per_row = sum(np.mean([((r - protos[c].numpy()) ** 2).mean() for r in rows[c]]) for c in (1, 2))
    assert L.prototype_matching(f, y, protos, True, gather="reference").item() == pytest.approx(after)
    assert L.prototype_matching(f, y, protos, False, gather="reference").item() == pytest.approx(per_row)
    # even at batch 1 the N×D rows are not pixel vectors once a class has 2 pixels (class 1 of image 0)
    one_ref = L.prototype_matching(f[:1], y[:1], protos, gather="reference").item()
    assert abs(one_ref - L.prototype_matching(f[:1], y[:1], protos).item()) > 1e-3
    # the default stays the per-pixel class mean
    vecs = {c: [f[b, :, i, j].numpy() for b in range(2) for i in range(2) for j in range(2) if y[b, i, j] == c]
            for c in (1, 2)}
    exp = np.mean([((np.mean(vecs[c], 0) - protos[c].numpy()) ** 2).mean() for c in (1, 2)])
    assert L.prototype_matching(f, y, protos).item() == pytest.approx(exp) and abs(exp - after) > 1e-3


@pytest.mark.parametrize("all_ignored", [False, True])
def test_reference_options_finite_with_grad(all_ignored):
    f = torch.rand(2, 4, 3, 3, generator=gen(40), dtype=D64).requires_grad_()
    y = torch.randint(0, 3, (2, 3, 3), generator=gen(41))
    if all_ignored:
        y[:] = 255
    protos = torch.rand(3, 4, generator=gen(42), dtype=D64)
    for out in (L.attraction(f, y, protos, gather="reference", reduce="reference"),
                L.repulsion(f, y, gather="reference"),
                L.prototype_matching(f, y, protos, True, gather="reference"),
                L.prototype_matching(f, y, protos, False, gather="reference")):
        assert out.dim() == 0 and torch.isfinite(out) and out.requires_grad
        (grad,) = torch.autograd.grad(out, f)
        assert torch.isfinite(grad).all()
        if all_ignored:
            assert out.item() == 0.0


# ----------------------------------------------------------------- helpers, EWC, robustness

def test_downsample_labels_nearest():
    y = torch.arange(16).reshape(1, 4, 4)
    assert L.downsample_labels(y, (2, 2)).tolist() == [[[0, 2], [8, 10]]]
    assert L.downsample_labels(y, 2).dtype == y.dtype


def test_label_shape_mismatch_raises():
    with pytest.raises(ValueError, match="downsample_labels"):
        L.attraction(torch.zeros(1, 2, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long), torch.zeros(3, 2))


def test_ewc_penalty_and_min_max_normalize():
    p, o, imp = [t([1.0, 2.0]), t([[3.0]])], [t([0.0, 0.0]), t([[1.0]])], [t([1.0, 0.5]), t([[0.25]])]
    assert L.ewc_penalty(p, o, imp).item() == pytest.approx(1 + 0.5 * 4 + 0.25 * 4)
    named = {"a": p[0].clone().requires_grad_(), "new_cls": t([5.0])}
    out = L.ewc_penalty(named, {"a": o[0]}, {"a": imp[0]})
    out.backward()
    assert out.item() == pytest.approx(3.0) and torch.allclose(named["a"].grad, t([2.0, 2.0]))
    with pytest.raises(ValueError):
        L.ewc_penalty(p, o[:1], imp)
    assert torch.allclose(L.min_max_normalize(t([1.0, 2.0, 3.0])), t([0.0, 0.5, 1.0]))
    assert torch.equal(L.min_max_normalize(torch.ones(3)), torch.zeros(3))


def _all_losses(x, old, y, f, f_old, protos):
    return {
        "ce": L.cross_entropy(x, y), "unce": L.unbiased_cross_entropy(x, y, 3),
        "kd": L.knowledge_distillation(x, old), "unkd": L.unbiased_knowledge_distillation(x, old),
        "bce": L.bce_with_ignore(x, y), "icarl": L.icarl_distillation(x, old),
        "fd": L.feature_distillation(f, f_old), "cil": L.cil_distillation(x, old, y),
        "sp": L.feature_sparsity(f.relu(), L.downsample_labels(y, f.shape[-2:])),
        "pm": L.prototype_matching(f, L.downsample_labels(y, f.shape[-2:]), protos),
        "pm_pix": L.prototype_matching(f, L.downsample_labels(y, f.shape[-2:]), protos, sum_after=False),
        "att": L.attraction(f, L.downsample_labels(y, f.shape[-2:]), protos),
        "rep": L.repulsion(f, L.downsample_labels(y, f.shape[-2:])),
    }


@pytest.mark.parametrize("all_ignored", [False, True])
def test_every_loss_finite_scalar_with_grad(all_ignored):
    x = torch.randn(2, 5, 8, 8, generator=gen(25), requires_grad=True)
    old = torch.randn(2, 3, 8, 8, generator=gen(26))
    y = torch.randint(0, 5, (2, 8, 8), generator=gen(27))
    if all_ignored:
        y.fill_(255)
    f = torch.randn(2, 6, 4, 4, generator=gen(28), requires_grad=True)
    protos = torch.randn(5, 6, generator=gen(29))
    for name, value in _all_losses(x, old, y, f, torch.randn(2, 6, 4, 4, generator=gen(30)), protos).items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value.requires_grad, name
        grads = torch.autograd.grad(value, [x, f], allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads), name
        if all_ignored and name in ("ce", "unce", "bce", "cil", "pm", "pm_pix", "att", "rep"):
            assert value.item() == 0.0, name
    s, c = L.class_feature_sums(f, L.downsample_labels(y, (4, 4)), 5)
    assert torch.isfinite(s).all() and (c.sum() == 0) == all_ignored


@pytest.mark.parametrize("kd, q_bg, q_top, new_wins", [
    (24.0, 0.50, 0.40, True),   # w = 6 (SDR's kd 100 over 16 old classes): 1 + 3 > 2.4
    (24.0, 0.20, 0.70, False),  # w = 6: the teacher's old class leads its background by 0.5 > 1/6
    (4.0, 0.02, 0.97, True),    # w = 1 (kd = C_old): the new class wins whatever the teacher says
])
def test_unbiased_ce_plus_kd_gives_a_new_pixel_to_the_new_class_iff_1_plus_w_qbg_beats_w_max_qold(kd, q_bg, q_top,
                                                                                                  new_wins):
    """On a pixel labelled with the new class, UnCE + kd · UnKD is minimised by p_new = (1 + w q_bg) / (1 + w)
    and p_c = w q_c / (1 + w), w = kd / C_old (docs/CALIBRATION.md section l): the gradient vanishes there,
    and gradient descent from zero logits ends with the argmax the inequality predicts."""
    n_old = 4
    q = torch.tensor([q_bg, q_top, (1 - q_bg - q_top) * 0.6, (1 - q_bg - q_top) * 0.4], dtype=torch.float64)
    old_logits = q.log().view(1, n_old, 1, 1)
    target = torch.full((1, 1, 1), n_old)  # the new class's label

    def loss(x):
        return L.unbiased_cross_entropy(x, target, n_old) + kd * L.unbiased_knowledge_distillation(x, old_logits)

    w = kd / n_old
    p = torch.cat([torch.tensor([1e-12], dtype=torch.float64), w * q[1:] / (1 + w),
                   torch.tensor([(1 + w * q_bg) / (1 + w)], dtype=torch.float64)])
    x = p.log().view(1, n_old + 1, 1, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(x), x)
    assert grad.abs().max() < 1e-9
    assert (p[n_old] > p[1:n_old].max()).item() == new_wins == (1 + w * q_bg > w * q_top)

    x = torch.zeros(1, n_old + 1, 1, 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.2)
    for _ in range(300):
        opt.zero_grad()
        loss(x).backward()
        opt.step()
    probs = x.detach().softmax(1).flatten()
    assert (probs.argmax().item() == n_old) == new_wins
    assert probs[n_old].item() == pytest.approx(p[n_old].item(), abs=0.02)
