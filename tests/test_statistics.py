"""Statistics collected during a step: prototypes (also across 2 gloo processes), EWC Fisher,
PI and RW scores, checked against hand computations of their documented formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from csseg_core.collectors import Prototypes, build_collectors
from csseg_core.distributed import spawn
from csseg_core.methods.ewc import Fisher
from csseg_core.methods.pi import PathIntegral
from csseg_core.methods.rw import RWalk

pytestmark = pytest.mark.usefixtures("one_thread")

C, D = 5, 3  # classes, feature channels of the synthetic prototype batches


def _linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def _set(model, values: dict[str, torch.Tensor], grads: dict[str, torch.Tensor] | None) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(values[n])
            p.grad = None if grads is None or grads.get(n) is None else grads[n].clone()


# ---------------------------------------------------------------- Fisher (EWC)
def test_fisher_ema_matches_hand_computation():
    lin = _linear()
    alpha = 0.3
    g = torch.Generator().manual_seed(1)
    grads = [{n: torch.randn(p.shape, generator=g) for n, p in lin.named_parameters()} for _ in range(3)]
    grads[2]["bias"] = None  # a parameter without gradient keeps its Fisher
    fisher = Fisher(lin, None, alpha)
    expected = {n: torch.ones_like(p) for n, p in lin.named_parameters()}  # no previous state -> ones
    for gr in grads:
        for n, p in lin.named_parameters():
            p.grad = None if gr[n] is None else gr[n].clone()
        fisher.after_backward(lin)
        for n in expected:
            if gr[n] is not None:
                expected[n] = alpha * gr[n] ** 2 + (1 - alpha) * expected[n]
    out = fisher.finalize(lin)["fisher"]
    assert set(out) == {"weight", "bias"}
    for n in expected:
        torch.testing.assert_close(out[n], expected[n], rtol=1e-6, atol=1e-7)


def test_fisher_continues_from_previous_state_and_skips_frozen_parameters():
    lin = _linear()
    lin.bias.requires_grad_(False)
    prev = torch.full_like(lin.weight, 4.0)
    fisher = Fisher(lin, {"fisher": {"weight": prev}}, alpha=0.5)
    assert set(fisher.fisher) == {"weight"}  # frozen parameters have no importance
    lin.weight.grad = torch.full_like(lin.weight, 2.0)
    fisher.after_backward(lin)
    torch.testing.assert_close(fisher.finalize(lin)["fisher"]["weight"], 0.5 * 4.0 + 0.5 * torch.full_like(prev, 4.0))
    assert torch.equal(prev, torch.full_like(prev, 4.0)), "the previous state's tensor was modified in place"


# ---------------------------------------------------------------- PI
def test_path_integral_score_formula():
    lin = _linear()
    theta0 = {n: p.detach().clone() for n, p in lin.named_parameters()}
    g = torch.Generator().manual_seed(2)
    old_score = torch.rand(lin.weight.shape, generator=g)
    pi = PathIntegral(lin, {"pi": {"weight": old_score}})
    thetas, grads = [theta0], []
    delta = {n: torch.zeros_like(t) for n, t in theta0.items()}
    for _ in range(3):
        new = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in thetas[-1].items()}
        gr = {n: torch.randn(t.shape, generator=g) for n, t in new.items()}
        _set(lin, new, gr)
        pi.after_backward(lin)
        for n in delta:  # delta += g * (theta_prev - theta)
            delta[n] += gr[n] * (thetas[-1][n] - new[n])
        thetas.append(new)
        grads.append(gr)
    out = pi.finalize(lin)["pi"]
    for n, p in lin.named_parameters():
        expected = torch.relu(delta[n] / ((p.detach() - theta0[n]) ** 2 + 1e-20))
        if n == "weight":
            expected = expected + old_score
        torch.testing.assert_close(out[n], expected, rtol=1e-5, atol=1e-6)
    # the relu matters: some raw contributions are negative in this draw
    assert any((delta[n] < 0).any() for n in delta)


# ---------------------------------------------------------------- RW
def test_rwalk_score_uses_the_interval_and_the_current_fisher():
    lin = _linear()
    alpha = 0.5
    collectors = build_collectors(["rw"], model=lin, step=1, mode="disjoint", num_classes=2, dim=1, prev=None,
                                  device="cpu", alpha=alpha)
    assert list(collectors) == ["fisher", "rw"], "RW needs the Fisher, updated before its own update"
    rw = collectors["rw"]
    assert isinstance(rw, RWalk) and rw.fisher is collectors["fisher"] and rw.interval == 10
    g = torch.Generator().manual_seed(3)
    theta = {n: p.detach().clone() for n, p in lin.named_parameters()}
    tmp = {n: t.clone() for n, t in theta.items()}
    fisher = {n: torch.ones_like(t) for n, t in theta.items()}
    score = {n: torch.zeros_like(t) for n, t in theta.items()}
    updates = 0
    for it in range(1, 26):
        theta = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in theta.items()}
        gr = {n: torch.randn(t.shape, generator=g) for n, t in theta.items()}
        _set(lin, theta, gr)
        for c in collectors.values():  # the engine's order
            c.after_backward(lin)
        for n in fisher:
            fisher[n] = alpha * gr[n] ** 2 + (1 - alpha) * fisher[n]
        if it % 10 == 0:
            updates += 1
            for n in score:
                diff = theta[n] - tmp[n]
                score[n] += gr[n] * (-diff) / (0.5 * fisher[n] * diff**2 + 1e-8)
                tmp[n] = theta[n].clone()
        if it == 9:  # before the first interval nothing is accumulated
            assert all(not s.any() for s in rw.score.values())
    assert updates == 2
    out = rw.finalize(lin)["rw"]
    for n in score:
        torch.testing.assert_close(out[n], torch.relu(score[n]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rw.tmp[n], tmp[n])  # snapshot taken at iteration 20, not 25
    # with a previous score the stored one is the average of both
    prev = {n: torch.full_like(s, 2.0) for n, s in score.items()}
    rw2 = RWalk(lin, {"rw": prev}, collectors["fisher"])
    rw2.score = {n: s.clone() for n, s in score.items()}
    for n, s in rw2.finalize(lin)["rw"].items():
        torch.testing.assert_close(s, 0.5 * (torch.relu(score[n]) + 2.0))


# ---------------------------------------------------------------- prototypes
def _prev_prototypes():
    g = torch.Generator().manual_seed(10)
    return {"prototypes": torch.randn(C - 2, D, generator=g), "prototype_counts": torch.tensor([50.0, 7.0, 3.0])}


def _batches(n: int = 6):
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        feats = torch.randn(2, D, 4, 4, generator=g)
        labels = torch.randint(0, C, (2, 4, 4), generator=g)
        labels[0, 0, :2] = 255
        out.append((feats, labels))
    return out


def _brute_force_means(batches, skip_background: bool):
    sums, counts = torch.zeros(C, D, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    for feats, labels in batches:
        f = feats.permute(0, 2, 3, 1).reshape(-1, D).double()
        lab = labels.reshape(-1)
        for c in range(C):
            if skip_background and c == 0:
                continue
            sel = lab == c
            sums[c] += f[sel].sum(0)
            counts[c] += sel.sum()
    return sums, counts


def test_prototypes_are_running_means_per_pixel():
    batches = _batches()
    p0 = Prototypes(C, D, step=0, mode="disjoint", prev=None, device="cpu")
    for f, lab in batches:
        p0.observe(f, lab)
    sums, counts = _brute_force_means(batches, skip_background=False)
    out = p0.finalize(None)
    torch.testing.assert_close(out["prototype_counts"], counts)
    torch.testing.assert_close(out["prototypes"], (sums / counts[:, None]).float(), rtol=1e-5, atol=1e-6)
    # step 1 (disjoint): background is not updated, unseen rows keep the previous prototypes,
    # seen rows combine the previous running mean (with its count) and the new pixels
    prev = _prev_prototypes()
    p1 = Prototypes(C, D, step=1, mode="disjoint", prev=prev, device="cpu")
    for f, lab in batches[:2]:
        p1.observe(f, lab)
    sums, counts = _brute_force_means(batches[:2], skip_background=True)
    out = p1.finalize(None)
    prev_p = torch.zeros(C, D, dtype=torch.float64)
    prev_p[: C - 2] = prev["prototypes"].double()
    prev_c = torch.zeros(C, dtype=torch.float64)
    prev_c[: C - 2] = prev["prototype_counts"].double()
    expected = (prev_p * prev_c[:, None] + sums) / (prev_c + counts).clamp(min=1)[:, None]
    torch.testing.assert_close(out["prototypes"], expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["prototypes"][0], prev["prototypes"][0])  # background untouched
    torch.testing.assert_close(out["prototype_counts"], prev_c + counts)


def _proto_worker(out_dir: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    p = Prototypes(C, D, step=1, mode="disjoint", prev=_prev_prototypes(), device="cpu")
    for i, (f, lab) in enumerate(_batches()):
        if i % world == rank:
            p.observe(f, lab)
    own = Prototypes(C, D, step=1, mode="disjoint", prev=_prev_prototypes(), device="cpu", sync=False)
    for i, (f, lab) in enumerate(_batches()):
        if i % world == rank:
            own.observe(f, lab)
    torch.save({"final": p.finalize(None), "current": p.current.clone(), "unsynced": own.finalize(None)},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_prototypes(tmp_path_factory):
    """Prototypes of 6 fixed batches: 2 gloo processes (3 batches each) and one process (all 6)."""
    out = tmp_path_factory.mktemp("ddp-prototypes")
    spawn(2, _proto_worker, str(out))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = Prototypes(C, D, step=1, mode="disjoint", prev=_prev_prototypes(), device="cpu")
    for f, lab in _batches():
        single.observe(f, lab)
    return ranks, single


def test_prototypes_all_reduced_across_two_processes_equal_one_process(ddp_prototypes):
    ranks, single = ddp_prototypes
    expected = single.finalize(None)
    for r in ranks:
        torch.testing.assert_close(r["final"]["prototype_counts"], expected["prototype_counts"], rtol=0, atol=0)
        torch.testing.assert_close(r["final"]["prototypes"], expected["prototypes"], rtol=1e-6, atol=1e-6)


def test_running_prototypes_during_the_step_are_synchronised(ddp_prototypes):
    ranks, single = ddp_prototypes
    for r in ranks:
        torch.testing.assert_close(r["current"], single.current, rtol=1e-6, atol=1e-6)


def test_unsynchronised_prototypes_keep_one_running_mean_per_rank(ddp_prototypes):
    """sync_prototypes=false (the reference, DEPARTURES §4): each rank's prototypes see only its shard."""
    ranks, _ = ddp_prototypes
    for rank, r in enumerate(ranks):
        shard = Prototypes(C, D, step=1, mode="disjoint", prev=_prev_prototypes(), device="cpu")
        for i, (f, lab) in enumerate(_batches()):
            if i % 2 == rank:
                shard.observe(f, lab)
        expected = shard.finalize(None)
        torch.testing.assert_close(r["unsynced"]["prototype_counts"], expected["prototype_counts"], rtol=0, atol=0)
        torch.testing.assert_close(r["unsynced"]["prototypes"], expected["prototypes"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ranks[0]["unsynced"]["prototypes"], ranks[1]["unsynced"]["prototypes"])


def test_sync_prototypes_is_a_no_op_on_one_process():
    out = []
    for sync in (True, False):
        p = Prototypes(C, D, step=1, mode="disjoint", prev=_prev_prototypes(), device="cpu", sync=sync)
        for f, lab in _batches():
            p.observe(f, lab)
        out.append((p.finalize(None), p.current.clone()))
    (a, ca), (b, cb) = out
    assert torch.equal(a["prototypes"], b["prototypes"]) and torch.equal(a["prototype_counts"], b["prototype_counts"])
    assert torch.equal(ca, cb)


def test_reference_gathered_prototypes_are_running_means_of_channel_major_rows():
    """sdr_feature_gather=reference (DEPARTURES §1): row sums of the (b, c, h, w)-ordered selection."""
    batches = _batches(3)
    p = Prototypes(C, D, step=0, mode="disjoint", prev=None, device="cpu", gather="reference")
    ours = Prototypes(C, D, step=0, mode="disjoint", prev=None, device="cpu")
    sums, counts = torch.zeros(C, D, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    for f, lab in batches:
        p.observe(f, lab)
        ours.observe(f, lab)
        for c in range(C):
            vals = [f[b, ch, y, x].item() for b in range(f.shape[0]) for ch in range(D) for y in range(4) for x in range(4)
                    if lab[b, y, x] == c]
            sel = torch.tensor(vals, dtype=torch.float64).reshape(D, -1)
            sums[c] += sel.sum(1)
            counts[c] += sel.shape[1]
    out = p.finalize(None)
    torch.testing.assert_close(out["prototype_counts"], counts)
    torch.testing.assert_close(out["prototypes"], (sums / counts[:, None]).float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out["prototypes"], ours.finalize(None)["prototypes"])  # batch 2: channels mixed
    built = build_collectors(["prototypes"], model=None, step=0, mode="disjoint", num_classes=C, dim=D, prev=None,
                             device="cpu", gather="reference", sync_prototypes=False)["prototypes"]
    assert (built.gather, built.sync) == ("reference", False)
