"""Contract tests over every search space, plus the primitives and the scenario grid."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

import search_spaces as S
from csseg_core.config import resolve_config
from csseg_core.errors import ConfigError
from csseg_core.methods import list_methods, method_defaults

METHODS = S.list_spaces()


def test_every_registered_method_has_a_space():
    assert sorted(METHODS) == sorted(list_methods())


@pytest.mark.parametrize("method", METHODS)
def test_space_keys_are_method_hyperparameters(method):
    assert set(S.get_space(method)) <= set(method_defaults(method))


@pytest.mark.parametrize("method", METHODS)
def test_preset_is_the_reference_default_and_inside_its_space(method):
    space, point = S.get_space(method), S.preset(method)
    assert set(point) == set(space)
    defaults = method_defaults(method)
    for name, value in point.items():
        assert space[name].contains(value), (name, value)
        assert value == defaults[name], f"{method}.{name}: preset {value} != engine default {defaults[name]}"


@pytest.mark.parametrize("method", METHODS)
def test_space_converts_to_tune_and_samples_inside(method):
    space = S.get_space(method)
    tune_space = S.to_tune(space)
    assert set(tune_space) == set(space)
    for name, domain in tune_space.items():
        for _ in range(20):
            assert space[name].contains(domain.sample()), name


@pytest.mark.parametrize("method", METHODS)
def test_space_converts_to_optuna_and_samples_inside(method):
    space = S.get_space(method)
    dists = S.to_optuna(space)
    assert set(dists) == set(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(S.preset(method)) if space else None
    for _ in range(10):
        trial = study.ask(fixed_distributions=dists)
        for name, value in trial.params.items():
            assert space[name].contains(value), (name, value)
        study.tell(trial, 0.0)
    if space:
        assert study.trials[0].params == S.preset(method)


@pytest.mark.parametrize("method", METHODS)
def test_every_choice_and_bound_resolves_to_a_config(method):
    for name, param in S.get_space(method).items():
        values = param.options if isinstance(param, S.Choice) else (param.lo, param.hi)
        for value in values:
            cfg = resolve_config("voc-15-1", method, profile="smoke", overrides={name: value})
            assert cfg.method_params[name] == value


def test_sdr_published_ranges():
    space = S.get_space("sdr")
    assert space["kd"] == S.LogUniform(1, 100)
    assert space["pm"] == S.LogUniform(1e-3, 1e-1)
    assert space["attraction"] == space["repulsion"] == S.LogUniform(1e-3, 1e-2)
    assert space["sparsity"] == S.LogUniform(1e-5, 1e-3)
    assert isinstance(space["sparsity_norm"], S.Choice)
    assert S.get_space("ft") == {} and S.preset("ft") == {}


def test_primitives_validate():
    with pytest.raises(ConfigError):
        S.LogUniform(0, 1)
    with pytest.raises(ConfigError):
        S.Uniform(2, 1)
    with pytest.raises(ConfigError):
        S.Choice([])
    with pytest.raises(ConfigError):
        S.IntRange(1.5, 3)
    r = S.IntRange(1, 4)
    assert r.contains(4) and not r.contains(5) and not r.contains(True)
    c = S.Choice([True, False])
    assert c.contains(True) and not c.contains(1)
    assert S.to_optuna({"n": r})["n"].high == 4
    assert all(1 <= S.to_tune({"n": r})["n"].sample() <= 4 for _ in range(50))
    for p in (S.LogUniform(1, 10), S.Uniform(0, 1), S.IntRange(1, 8, log=True), S.Choice(["a", 1, None])):
        assert S.param_from_dict(S.param_to_dict(p)) == p


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="did you mean"):
        S.get_space("sdrr")
    assert S.canonical("LwF_MC") == "lwf-mc"


def test_describe_rows():
    rows = S.describe()
    assert {r["method"] for r in rows} == set(METHODS)
    assert all(set(r) == {"method", "param", "distribution", "range", "preset"} for r in rows)
    assert [r["param"] for r in S.describe("ilt")] == ["de", "kd"]


def test_grid_is_the_cartesian_product():
    cells = S.grid(["voc-15-1", "voc-19-1", "voc-15-5s"], ["disjoint", "overlapped"], seeds=[0, 1])
    assert len(cells) == 2 * 2 * 2  # voc-15-5s is an alias of voc-15-1
    assert len({c.name for c in cells}) == len(cells)
    assert cells[0] == S.GridCell("voc-15-1", "disjoint", 0)
    assert len(S.grid("voc-15-1,voc-10-1", "disjoint")) == 2
    assert S.grid(["voc-15-1"])[0].name == "voc-15-1-disjoint"
    with pytest.raises(ConfigError):
        S.grid(["voc-15-1"], ["sideways"])
    with pytest.raises(ConfigError):
        S.grid([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cells[0].mode = "x"
