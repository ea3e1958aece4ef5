"""Method contract tests driven by the registry: every method's step 1 of voc-15-5 from ONE
shared step-0 state, zero-weight equivalences with FT, step 0 = FT for every method.

Runtime: every step trains on a fixed 32-image list per step (``index_dir``) for one epoch (2
iterations) on the session's synthetic VOC, with one torch thread (2 shared cores).
"""

from __future__ import annotations

import math

import pytest
import torch
from faults import nan_loss

from csseg_core import engine
from csseg_core.config import resolve_config
from csseg_core.engine import run_step
from csseg_core.errors import ConfigError, TrainingError
from csseg_core.methods import (
    STATISTICS,
    build_method,
    get_method,
    list_methods,
    method_defaults,
    required_statistics,
    weight_terms,
)
from csseg_core.metrics import ConfusionMatrix
from csseg_core.scenario_run import shared_step0

pytestmark = pytest.mark.usefixtures("one_thread")

SCENARIO = "voc-15-5"



def _zero(method: str) -> dict[str, float]:
    """Every weight of ``method`` (the ``Params`` fields marked with ``weight``) set to 0."""
    return {k: 0.0 for k in weight_terms(method)}


STAT_KEYS = {"prototypes": {"prototypes", "prototype_counts"}, "fisher": {"fisher"}, "pi": {"pi"}, "rw": {"rw", "fisher"}}


# ----------------------------------------------------------------------------- shared setup
@pytest.fixture(scope="module")
def make_cfg(voc_root, micro_overrides):
    def make(method="ft", **params):
        return resolve_config(SCENARIO, method, profile="smoke", data_root=str(voc_root),
                              overrides={**micro_overrides, **params})
    return make


@pytest.fixture(scope="module")
def step0(csseg_home, make_cfg):
    """ONE step-0 state (trained with the FT config) used by every method's step 1."""
    state = shared_step0(make_cfg("ft"), collect=STATISTICS)  # every method continues from it
    snapshot = _clone(state)
    return state, snapshot


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def step1(step0, make_cfg):
    """Memoised step 1 of voc-15-5: ``step1(method, **params) -> (cfg, state, metrics)``."""
    cache: dict = {}
    state0, _ = step0

    def run(method: str, **params):
        key = (method, tuple(sorted(params.items())))
        if key not in cache:
            cfg = make_cfg(method, **params)
            state, metrics = run_step(cfg, 1, state0)
            cache[key] = (cfg, state, metrics)
        return cache[key]

    return run


# ----------------------------------------------------------------------------- registry
def test_registry_lists_ft_first_and_every_weight_is_a_positive_float():
    names = list_methods()
    assert names[0] == "ft" and names[1:] == sorted(names[1:]) and len(set(names)) == len(names)
    assert {"lwf", "lwf-mc", "ilt", "ewc", "pi", "rw", "mib", "cil", "sdr"} <= set(names)  # the built-in ones
    for name in names:
        defaults = method_defaults(name)
        assert all(isinstance(defaults[k], float) and defaults[k] > 0 for k in weight_terms(name)), name
        assert set(get_method(name).collects) <= set(STATISTICS)


# ----------------------------------------------------------------------------- step 1 contract
@pytest.mark.parametrize("method", list_methods())
def test_step1_runs_with_finite_method_terms(method, step1, step0):
    check_step1_contract(method, step1, step0)


def check_step1_contract(method, step1, step0):
    _, state, metrics = step1(method)
    _, _, zero = step1(method, **_zero(method))
    losses = metrics["losses"]
    # the terms: what is left at zero weights (the classification) and one per weight
    assert set(losses) == set(zero["losses"]) | set(weight_terms(method).values())
    assert not set(zero["losses"]) & set(weight_terms(method).values())
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert metrics["iterations"] == 2 and metrics["n_train_images"] == 32
    assert metrics["step"] == 1 and 0.0 <= metrics["miou_all"] <= 1.0
    assert len(metrics["class_iou"]) == 21
    # the state: step 1 over 21 classes, the history carried over, the method's statistics
    assert state["step"] == 1 and state["config"]["method"] == method
    assert state["history"][0] == step0[0]["history"][0] and len(state["history"]) == 2
    assert state["model"]["cls.1.weight"].shape[0] == 5
    expected_stats = set().union(*(STAT_KEYS[s] for s in get_method(method).collects))
    assert set(state["statistics"]) == expected_stats
    if "prototypes" in expected_stats:
        assert state["statistics"]["prototypes"].shape == (21, 128)
        assert torch.isfinite(state["statistics"]["prototypes"]).all()


def test_every_method_loads_the_same_step0_state_and_keys(step0, step1, make_cfg):
    state0, snapshot = step0
    cfgs = {m: make_cfg(m) for m in list_methods()}
    keys0 = {cfg.step_key(0) for cfg in cfgs.values()}
    assert keys0 == {make_cfg("ft").step_key(0)} and state0["config"]["method"] == "ft"
    keys1 = [cfg.step_key(1) for cfg in cfgs.values()]
    assert len(set(keys1)) == len(keys1), "step 1 keys must differ between methods"
    # a hyperparameter changes step 1's key, never step 0's
    for method, other in (("sdr", {"kd": 10.0}), ("sdr", {"pm": 0.1}), ("ewc", {"reg": 500.0}), ("lwf", {"alpha": 2.0})):
        a, b = make_cfg(method), make_cfg(method, **other)
        assert a.step_key(0) == b.step_key(0) and a.step_key(1) != b.step_key(1)
    # every method's step 1 ran from that very object, and none of them modified it
    for method in list_methods():
        step1(method)
    assert _same(state0, snapshot), "a step-1 run mutated the previous state"


def test_step0_state_holds_every_statistic(step0):
    state0, _ = step0
    stats = state0["statistics"]
    assert state0["collected"] == list(STATISTICS)
    assert set(stats) == {"prototypes", "prototype_counts", "fisher", "pi", "rw"}
    assert stats["prototypes"].shape == (16, 128) and stats["prototype_counts"].shape == (16,)
    assert stats["prototype_counts"][0] > 0  # step 0 labels define the background
    names = {n for n in state0["model"] if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    for key in ("fisher", "pi", "rw"):
        assert set(stats[key]) == names, key
        for n, t in stats[key].items():
            assert t.shape == state0["model"][n].shape and torch.isfinite(t).all(), (key, n)
    assert all(bool((t >= 0).all()) for t in stats["pi"].values())  # relu'd scores
    assert any(bool((t != 1).any()) for t in stats["fisher"].values())  # updated from the ones it starts at


# ----------------------------------------------------------------------------- zero weights
@pytest.mark.parametrize("method", list_methods())
def test_zero_weights_give_exactly_ft(method, step1):
    check_zero_weights(method, step1)


def check_zero_weights(method, step1):
    """A method whose classification is FT's cross-entropy is FT once its weights are 0: no other term
    is left (an unmarked weight would be). MiB and SDR (unbiased CE) and LwF-MC (BCE): see below."""
    _, ft_state, ft_metrics = step1("ft")
    _, state, metrics = step1(method, **_zero(method))
    if "ce" not in metrics["losses"]:
        return
    assert set(metrics["losses"]) == {"ce"}
    assert metrics["losses"]["ce"] == ft_metrics["losses"]["ce"]
    assert _weights_equal(state["model"], ft_state["model"])
    assert metrics["miou_all"] == ft_metrics["miou_all"] or (math.isnan(metrics["miou_all"]) and math.isnan(ft_metrics["miou_all"]))


def test_zero_weight_mib_equals_zero_weight_sdr_not_ft(step1):
    """MiB and SDR keep the unbiased CE by design: with every other weight at 0 they coincide."""
    _, mib, mib_m = step1("mib", **_zero("mib"), init_balanced=False)
    _, sdr, sdr_m = step1("sdr", **_zero("sdr"), init_balanced=False)
    _, ft, _ = step1("ft")
    assert set(mib_m["losses"]) == set(sdr_m["losses"]) == {"unce"}
    assert mib_m["losses"] == sdr_m["losses"]
    assert _weights_equal(mib["model"], sdr["model"])
    assert not _weights_equal(mib["model"], ft["model"])


def test_zero_weight_lwf_mc_is_plain_bce(step1):
    _, state, metrics = step1("lwf-mc", **_zero("lwf-mc"))
    _, ft, _ = step1("ft")
    assert set(metrics["losses"]) == {"bce"} and math.isfinite(metrics["losses"]["bce"])
    assert not _weights_equal(state["model"], ft["model"])


def test_nonzero_weights_change_the_update(step1):
    """Guards the equivalences above against a method whose terms are silently ignored."""
    _, ft, _ = step1("ft")
    for method in ("lwf", "ilt", "mib", "cil"):
        _, state, _ = step1(method)
        assert not _weights_equal(state["model"], ft["model"]), method


# ----------------------------------------------------------------------------- step 0 = FT
def test_step0_is_ft_for_every_method(make_cfg, step0, monkeypatch):
    # the training update is under test, not the evaluation: skip it (10 step-0 runs on 2 cores)
    monkeypatch.setattr(engine, "evaluate", lambda model, loader, num_classes, device, amp="off": ConfusionMatrix(num_classes))
    ref_state, ref_metrics = run_step(make_cfg("ft"), 0)
    assert _weights_equal(ref_state["model"], step0[0]["model"]), "the cached shared step 0 differs from a fresh one"
    for method in list_methods()[1:]:
        # hyperparameters do not matter at step 0 either (reg_alpha: see the test below)
        params = {k: v for k, v in method_defaults(method).items() if isinstance(v, float) and v > 0 and k != "reg_alpha"}
        cfg = make_cfg(method, **{k: 2 * v for k, v in params.items()})
        assert cfg.step_key(0) == make_cfg("ft").step_key(0)
        state, metrics = run_step(cfg, 0)
        assert set(metrics["losses"]) == {"ce"}, method
        assert metrics["losses"] == ref_metrics["losses"], method
        assert _weights_equal(state["model"], ref_state["model"]), method
        # it collects exactly what the method needs from it, nothing for the other methods
        assert state["config"]["method"] == method
        assert state["collected"] == list(required_statistics([method])), method
        expected = set().union(*(STAT_KEYS[s] for s in get_method(method).collects))
        assert set(state["statistics"]) == expected, method
        for key in expected:  # the very values of the all-statistics step 0
            assert _same(state["statistics"][key], step0[0]["statistics"][key]), (method, key)
    assert ref_state["collected"] == [] and ref_state["statistics"] == {}  # FT needs nothing


def test_required_statistics_are_the_union_closed_under_rw_needing_the_fisher():
    assert required_statistics(["ft", "lwf", "mib"]) == ()
    assert required_statistics(["sdr"]) == ("prototypes",)
    assert required_statistics(["rw"]) == required_statistics(extra=["rw"]) == ("fisher", "rw")
    assert required_statistics(["pi", "sdr", "ewc"]) == ("prototypes", "fisher", "pi")
    assert required_statistics(list_methods()) == STATISTICS
    with pytest.raises(ConfigError, match="unknown statistic 'hessian'"):
        required_statistics(extra=["hessian"])


def test_step0_state_does_not_depend_on_method_hyperparameters(make_cfg, step0):
    cfg = make_cfg("ewc", reg_alpha=0.5)
    assert cfg.step_key(0) == make_cfg("ft").step_key(0)
    state, _ = run_step(cfg, 0, collect=STATISTICS)
    stats, ref = state["statistics"], step0[0]["statistics"]
    assert _same({k: stats[k] for k in ("prototypes", "prototype_counts", "pi")},
                 {k: ref[k] for k in ("prototypes", "prototype_counts", "pi")})
    assert _same(stats["fisher"], ref["fisher"])


# ----------------------------------------------------------------------------- reference switches (DEPARTURES §1–4)
def test_reference_switches_run_steps_0_and_1_with_finite_losses(make_cfg, step0, step1):
    cfg = make_cfg("sdr", sdr_feature_gather="reference", attraction_reduce="reference", sync_prototypes=False)
    state0, _ = run_step(cfg, 0)
    ref = step0[0]
    # step 0 trains the same model (one process: sync_prototypes is a no-op); only the gathering of
    # the prototypes differs (batch 16: the reference's channel-major rows mix images)
    assert _weights_equal(state0["model"], ref["model"])
    stats = state0["statistics"]
    assert torch.equal(stats["prototype_counts"], ref["statistics"]["prototype_counts"])
    assert not torch.allclose(stats["prototypes"], ref["statistics"]["prototypes"])
    _, metrics = run_step(cfg, 1, state0)
    assert set(metrics["losses"]) == {"unce", *weight_terms("sdr").values()} and metrics["iterations"] == 2
    assert all(math.isfinite(v) for v in metrics["losses"].values()), metrics["losses"]
    assert math.isfinite(metrics["miou_all"])
    # attraction_reduce alone, from the shared step 0: the attraction term changes, the run stays finite
    _, _, ours = step1("sdr")
    _, _, reduced = step1("sdr", attraction_reduce="reference")
    assert math.isfinite(reduced["losses"]["attraction"])
    assert reduced["losses"]["attraction"] != pytest.approx(ours["losses"]["attraction"], rel=1e-3)


# ----------------------------------------------------------------------------- determinism, faults
def test_step1_is_deterministic_for_one_seed(step1, make_cfg, step0):
    _, state, metrics = step1("sdr")
    again_state, again = run_step(make_cfg("sdr"), 1, step0[0])
    for key in ("miou_all", "miou_old", "miou_new", "miou_avg", "val_miou_all", "val_miou_new", "val_class_iou", "losses", "class_iou", "iterations"):
        assert _same(again[key], metrics[key]), key
    assert _weights_equal(again_state["model"], state["model"])
    assert _same(again_state["statistics"], state["statistics"])


@pytest.mark.parametrize(("method", "term"), [("sdr", "unce"), ("ewc", "ce")])
def test_non_finite_loss_raises_training_error_naming_the_term(method, term, make_cfg, step0, tmp_path):
    cfg = make_cfg(method)
    with pytest.raises(TrainingError, match=rf"step 1, iteration 0: loss term '{term}' became nan"), nan_loss(method):
        run_step(cfg, 1, step0[0], log_dir=str(tmp_path / "tb"))


def test_step1_needs_a_step0_state(make_cfg, step1):
    _, state1, _ = step1("ft")
    with pytest.raises(ConfigError, match="needs the state of step 0, got the state of step 1"):
        run_step(make_cfg("sdr"), 1, state1)


@pytest.mark.parametrize("method", ["ewc", "pi", "rw"])
def test_regularizer_importances_are_normalised_per_tensor(method):
    """As the reference's utils/regularizer.py: (x − min) / (max − min + 1e-8) for each
    parameter tensor on its own, so a tensor of tiny importances still reaches 1."""
    from csseg_core.methods.base import StepContext

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    names = [n for n, _ in model.named_parameters()]
    scales = dict(zip(names, (1e-6, 1.0, 1e3, 5.0)))
    g = torch.Generator().manual_seed(0)
    table = {n: scales[n] * torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    stats = {"fisher": table, "pi": table, "rw": {n: 2 * v for n, v in table.items()}}
    old = {n: p.detach() - 1.0 for n, p in model.named_parameters()}  # θ − θ_old = 1 everywhere
    m = build_method(method, {"reg": 1.0})
    m.setup(StepContext(step=1, mode="disjoint", n_old=1, num_classes=2, model=model, old_model=None,
                        prev_statistics=stats, old_params=old))
    def per_tensor_of(tab):
        return {n: (v - v.min()) / (v.max() - v.min() + 1e-8) for n, v in tab.items()}

    per_tensor = per_tensor_of(table)
    sources = [per_tensor] + ([per_tensor_of(stats["rw"])] if method == "rw" else [])
    expected = sum(src[n].sum() for src in sources for n in names)
    penalty = m.penalty(StepContext(step=1, mode="disjoint", n_old=1, num_classes=2, model=model, old_model=None,
                                    prev_statistics=stats, old_params=old))
    assert torch.allclose(penalty, expected, rtol=1e-5)
    for n in names:  # every tensor spans [0, ~1], whatever its scale (the 1e-8 keeps 1e-6-wide ones at 0.99)
        imp = sum(src[n] for src in sources)
        assert torch.allclose(m._importance[n], imp, atol=1e-6) and imp.min() == 0 and imp.max() > 0.98 * len(sources)
    lo, hi = min(v.min() for v in table.values()), max(v.max() for v in table.values())
    one_min_max = sum(((v - lo) / (hi - lo)).sum() for v in table.values())  # one min/max over all tensors
    assert penalty > 2 * one_min_max * (2 if method == "rw" else 1)


# ----------------------------------------------------------------------------- a new method: one module
THROWAWAY_METHOD = '''"""A throw-away method: cross-entropy + a distillation of the old logits."""
from dataclasses import dataclass

from csseg_core import losses as L
from csseg_core.methods.base import Method, register_method, weight


@dataclass(frozen=True)
class ThrowawayParams:
    hint: float = weight(3.0, term="hint_kd")
    temperature: float = 2.0


@register_method
class Throwaway(Method):
    name = "throwaway"
    Params = ThrowawayParams

    def needs_old_model(self, step):
        return step > 0 and self.params.hint > 0

    def distillation(self, ctx, batch, out, old):
        if self.params.hint <= 0:
            return {}
        return {"hint_kd": self.params.hint * L.knowledge_distillation(out.logits, old.logits, 1 / self.params.temperature)}
'''
THROWAWAY_SPACE = '''from search_spaces import LogUniform

SPACE = {"hint": LogUniform(1, 10)}
'''


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    """``throwaway_method.py`` dropped into the methods package and ``throwaway.py`` into the search
    spaces (folders added to the packages' paths; the repository is not touched)."""
    import sys

    import csseg_core.methods as M
    import search_spaces as S
    from csseg_core.methods import base

    for folder, name, text in (("methods", "throwaway_method.py", THROWAWAY_METHOD),
                               ("spaces", "throwaway.py", THROWAWAY_SPACE)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text(text)
    modules = ("csseg_core.methods.throwaway_method", "search_spaces.throwaway")
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(M, "__path__", [*M.__path__, str(tmp_path / "methods")])
    monkeypatch.setattr(S, "__path__", [*S.__path__, str(tmp_path / "spaces")])
    assert "throwaway_method" in M.discover()
    yield "throwaway"
    for module in modules:
        sys.modules.pop(module, None)


def test_a_method_module_is_all_it_takes(throwaway, step1, step0, tmp_path):
    from typer.testing import CliRunner

    import cli
    import search_spaces as S
    from sweeper import SweepSpec
    from sweeper.spec import plan_sweep

    assert throwaway in list_methods() and weight_terms(throwaway) == {"hint": "hint_kd"}
    listed = CliRunner().invoke(cli.app, ["methods"])
    assert listed.exit_code == 0 and "throwaway" in listed.stdout and "hint=3.0" in listed.stdout
    spaces = CliRunner().invoke(cli.app, ["spaces", "throwaway"])
    assert spaces.exit_code == 0 and "hint" in spaces.stdout, spaces.output
    assert S.get_space(throwaway) == {"hint": S.LogUniform(1, 10)} and S.preset(throwaway) == {"hint": 3.0}
    plan = plan_sweep(SweepSpec(scenarios="voc-15-5", method=throwaway, storage=str(tmp_path / "sweeps")))
    assert plan.points[0] == {"hint": 3.0}
    # the contract tests every registered method passes
    check_step1_contract(throwaway, step1, step0)
    check_zero_weights(throwaway, step1)
    _, _, metrics = step1(throwaway)
    assert set(metrics["losses"]) == {"ce", "hint_kd"}


def test_sdr_teacher_prediction_equals_the_full_resolution_argmax_sampled_after():
    """SDR's pseudo-labels: argmax at full resolution then nearest-downsampled (the reference's order)
    equals nearest-sampling the logits then the argmax, ties included (the first maximum either way)."""
    import torch.nn.functional as F

    from csseg_core.methods.sdr import teacher_prediction

    torch.manual_seed(0)
    for shape, size in (((64, 64), (8, 8)), ((96, 96), (12, 12)), ((50, 61), (7, 8)), ((33, 20), (33, 20))):
        logits = torch.randint(0, 3, (2, 6, *shape)).float()  # few values: many tied maxima
        reference = F.interpolate(logits.argmax(1, keepdim=True).float(), size=size, mode="nearest")[:, 0].long()
        assert torch.equal(teacher_prediction(logits, size), reference)
