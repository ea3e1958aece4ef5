"""ExperimentConfig: profiles < overrides < explicit arguments, validation, round trips, hashes."""

from __future__ import annotations

import dataclasses

import pytest

from csseg_core.config import PROFILES, ExperimentConfig, parse_set, resolve_config
from csseg_core.errors import ConfigError
from csseg_core.methods import list_methods, method_defaults


def test_profile_values_then_overrides_then_explicit_arguments():
    base = resolve_config("voc-15-1", "sdr", profile="paper")
    assert (base.backbone, base.crop_size, base.batch_size, base.lr) == ("resnet101", 512, 8, 1e-3)
    cfg = resolve_config("voc-15-1", "sdr", profile="paper",
                         overrides={"backbone": "tiny", "crop_size": "96", "kd": "10", "mode": "sequential", "seed": 3})
    assert (cfg.backbone, cfg.crop_size) == ("tiny", 96)       # overrides beat the profile (and are coerced)
    assert cfg.batch_size == 8 and cfg.epochs == 30            # untouched profile values stay
    assert cfg.method_params["kd"] == 10.0 and isinstance(cfg.method_params["kd"], float)
    assert cfg.method_params["pm"] == method_defaults("sdr")["pm"]
    assert (cfg.mode, cfg.seed) == ("sequential", 3)
    explicit = resolve_config("voc-15-1", "sdr", profile="paper", mode="overlapped", seed=5, data_root="/data/voc",
                              overrides={"mode": "sequential", "seed": 3, "data_root": "/elsewhere"})
    assert (explicit.mode, explicit.seed, explicit.data_root) == ("overlapped", 5, "/data/voc")
    # ADE scenarios take the ADE paper recipe, still below the overrides
    ade = resolve_config("ade-100-50", "ft", profile="paper")
    assert (ade.batch_size, ade.epochs, ade.lr) == (4, 60, 1e-2)
    assert resolve_config("ade-100-50", "ft", profile="paper", overrides={"batch_size": 2}).batch_size == 2
    # the smoke profile is the dataclass defaults
    smoke = resolve_config("voc-15-1")
    assert PROFILES["smoke"] == {} and smoke.backbone == ExperimentConfig.backbone and smoke.method == "ft"


def test_unknown_key_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"unknown key 'kdd'.*did you mean.*\bkd\b"):
        resolve_config("voc-15-1", "sdr", overrides={"kdd": 1})
    with pytest.raises(ConfigError, match=r"unknown key 'epoch'.*did you mean.*epochs"):
        resolve_config("voc-15-1", "ft", overrides={"epoch": 1})
    # a hyperparameter of another method is unknown for this one
    with pytest.raises(ConfigError, match="unknown key 'reg'"):
        resolve_config("voc-15-1", "lwf", overrides={"reg": 1})


@pytest.mark.parametrize(("method", "key", "value"), [
    ("ft", "epochs", "abc"),
    ("ft", "epochs", "1.5"),
    ("ft", "lr", "fast"),
    ("ft", "crop_val", "perhaps"),
    ("sdr", "kd", "x"),
    ("sdr", "pm_sum_after", "maybe"),
    ("mib", "init_balanced", "2"),
    ("ewc", "reg_normalize", "nope"),
])
def test_wrong_type_is_a_config_error_naming_key_and_value(method, key, value):
    with pytest.raises(ConfigError) as err:
        resolve_config("voc-15-1", method, overrides={key: value})
    assert key in str(err.value) and value in str(err.value)


@pytest.mark.parametrize("overrides", [{"epochs": 0}, {"crop_size": -1}, {"lr": 0}, {"output_stride": 32},
                                       {"epochs_incremental": -1}])
def test_out_of_range_values_are_config_errors(overrides):
    with pytest.raises(ConfigError):
        resolve_config("voc-15-1", "ft", overrides=overrides)


def test_coercion_of_command_line_strings():
    cfg = resolve_config("voc-15-1", "sdr", overrides=parse_set(["epochs=3", "lr=0.5", "crop_val=false", "pm_sum_after=no",
                                                                 "kd=7", "data_root=none", "sparsity_norm=L1"]))
    assert (cfg.epochs, cfg.lr, cfg.crop_val, cfg.data_root) == (3, 0.5, False, None)
    p = cfg.method_params
    assert (p["pm_sum_after"], p["kd"], p["sparsity_norm"]) == (False, 7.0, "L1")


@pytest.mark.parametrize(("args", "match"), [
    (("voc-15-x", "ft", "smoke", None), "unknown scenario 'voc-15-x'"),
    (("voc-15-1", "sdrr", "smoke", None), "unknown method 'sdrr'.*did you mean sdr"),
    (("voc-15-1", "ft", "huge", None), "unknown profile 'huge'"),
    (("voc-15-1", "ft", "smoke", "diagonal"), "diagonal"),
])
def test_unknown_names_are_config_errors(args, match):
    scenario, method, profile, mode = args
    with pytest.raises(ConfigError, match=match):
        resolve_config(scenario, method, profile=profile, mode=mode)


def test_aliases_resolve_to_canonical_names():
    cfg = resolve_config("voc-15-5s", "LWF_MC")
    assert (cfg.scenario, cfg.method, cfg.num_steps) == ("voc-15-1", "lwf-mc", 6)


@pytest.mark.parametrize("items", [["kd"], ["=3"], ["epochs3"]])
def test_parse_set_rejects_non_pairs(items):
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(items)


@pytest.mark.parametrize("method", list_methods())
def test_from_dict_of_to_dict_is_the_same_config(method):
    cfg = resolve_config("voc-15-1", method, profile="smoke", seed=7, overrides={"epochs": 2, "crop_size": 48})
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    tuned = {k: (not v if isinstance(v, bool) else v * 2 if isinstance(v, float) else v)
             for k, v in method_defaults(method).items()}
    cfg = resolve_config("voc-10-1", method, profile="paper", mode="overlapped", overrides=tuned)
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("method", list_methods())
def test_from_dict_keeps_every_value_and_hash(method):
    """What does hold today: the round trip keeps every value, the step keys and the run name."""
    cfg = resolve_config("voc-10-1", method, profile="small", mode="overlapped", seed=7, data_root="/d",
                         overrides={"epochs": 2, **({k: v for k, v in list(method_defaults(method).items())[:1]})})
    back = ExperimentConfig.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict()
    assert [back.step_key(s) for s in range(cfg.num_steps)] == [cfg.step_key(s) for s in range(cfg.num_steps)]
    assert back.run_name() == cfg.run_name()


def test_explicit_default_hyperparameter_gives_the_same_run():
    a = resolve_config("voc-15-1", "sdr")
    b = resolve_config("voc-15-1", "sdr", overrides={"kd": method_defaults("sdr")["kd"]})
    assert a == b and a.step_key(5) == b.step_key(5) and a.run_name() == b.run_name()


def test_step_keys_and_run_name():
    cfg = resolve_config("voc-15-1", "sdr")
    keys = [cfg.step_key(s) for s in range(cfg.num_steps)]
    assert len(set(keys)) == 6 and all(len(k) == 16 and int(k, 16) >= 0 for k in keys)
    assert cfg.run_name() == f"voc-15-1-disjoint-sdr-{keys[-1][:8]}"
    # step 0 is shared by voc-15-5 and voc-15-1 and by every method; later steps are not
    other = resolve_config("voc-15-5", "ft")
    assert other.step_key(0) == keys[0] and other.step_key(1) != keys[1]
    # settings that only matter for logging or I/O do not change a key; training settings do
    assert cfg.replace(num_samples=0, log_every=1, num_workers=3, cache_images=False).step_key(3) == keys[3]
    assert cfg.replace(seed=1).step_key(0) != keys[0]
    assert cfg.replace(epochs=1).step_key(2) != keys[2]           # step 2 depends on step 0's training
    assert cfg.replace(epochs_incremental=1).step_key(0) == keys[0]
    assert cfg.replace(mode="overlapped").step_key(0) != keys[0]


def test_config_is_frozen():
    cfg = resolve_config("voc-15-1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]


def test_invalid_choice_hyperparameter_is_rejected_up_front():
    for key in ("sparsity_norm", "sparsity_shrink", "sparsity_kind"):
        with pytest.raises(ConfigError, match=key):
            resolve_config("voc-15-1", "sdr", overrides={key: "bogus"})


def test_iteration_budget_of_the_smoke_profile_and_explicit_epochs():
    cfg = resolve_config("voc-15-1")
    assert cfg.iters > 0 and cfg.iters_incremental > 0 and cfg.lr_new_cls > 1  # the calibrated smoke profile
    assert resolve_config("voc-15-1", profile="paper").iters == 0            # paper/small count epochs
    explicit = resolve_config("voc-15-1", overrides={"epochs": 2})
    assert (explicit.epochs, explicit.iters, explicit.iters_incremental) == (2, 0, cfg.iters_incremental)
    both = resolve_config("voc-15-1", overrides={"epochs": 2, "iters": 7})
    assert both.iters == 7
    with pytest.raises(ConfigError, match="iters"):
        resolve_config("voc-15-1", overrides={"iters": -1})
    joint = resolve_config("voc-offline")  # the joint bound: the whole voc-15-1 run's updates
    assert joint.iters == cfg.iters + 5 * cfg.iters_incremental == 1000
    assert resolve_config("voc-offline", overrides={"iters": 30}).iters == 30
    assert resolve_config("voc-offline", overrides={"epochs": 2}).iters == 0
    assert resolve_config("voc-offline", profile="paper").iters == 0
    ade = resolve_config("ade-100-50", "sdr")  # ADE's 100 step-0 classes train 4x longer
    assert (ade.iters, ade.iters_incremental) == (2000, 200)
    assert resolve_config("ade-offline").iters == ade.iters + ade.iters_incremental
    assert resolve_config("ade-100-50", "sdr", overrides={"iters_incremental": 7}).iters_incremental == 7


# ----------------------------------------------------------------- reference-compatibility switches (DEPARTURES §1–4)
SWITCHES = {"sdr_feature_gather": ("pixel", "reference"), "attraction_reduce": ("mean", "reference"),
            "sync_prototypes": (True, False)}


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_profile_keeps_the_intended_maths_by_default(profile):
    cfg = resolve_config("voc-15-1", "sdr", profile=profile)
    assert {k: getattr(cfg, k) for k in SWITCHES} == {k: v[0] for k, v in SWITCHES.items()}


def test_switches_are_set_from_command_line_strings_and_round_trip():
    cfg = resolve_config("voc-15-1", "sdr", overrides=parse_set(
        ["sdr_feature_gather=reference", "attraction_reduce=reference", "sync_prototypes=false"]))
    assert {k: getattr(cfg, k) for k in SWITCHES} == {k: v[1] for k, v in SWITCHES.items()}
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("key, value, needle", [
    ("sdr_feature_gather", "channels", "sdr_feature_gather must be one of pixel, reference (got 'channels')"),
    ("attraction_reduce", "sum", "attraction_reduce must be one of mean, reference (got 'sum')"),
    ("sync_prototypes", "maybe", "sync_prototypes='maybe' is not a valid bool"),
])
def test_bad_switch_values_are_one_line_config_errors(key, value, needle):
    with pytest.raises(ConfigError) as err:
        resolve_config("voc-15-1", "sdr", overrides=parse_set([f"{key}={value}"]))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_switches_enter_the_step_keys_and_leave_existing_keys_unchanged():
    # keys computed before the switches existed: the defaults keep every cached state valid
    # (the smoke step-1 key changed with the profile's fix_bn_incremental=True and then its
    # grad_clip_incremental=3, step 0's did not; with the clip off it is the previous key)
    assert [resolve_config("voc-15-1", "sdr").step_key(s) for s in (0, 1)] == ["dde2f6948df5356a", "4273340db49adc0f"]
    assert resolve_config("voc-15-1", "sdr", overrides={"grad_clip_incremental": 0}).step_key(1) == "b0905010e8a9e307"
    assert [resolve_config("voc-15-1", "sdr", profile="paper").step_key(s) for s in (0, 1)] == \
        ["0eeca5214ddeb555", "5922f4e8ee134316"]
    base = resolve_config("voc-15-1", "sdr")
    explicit = resolve_config("voc-15-1", "sdr", overrides={k: v[0] for k, v in SWITCHES.items()})
    assert [explicit.step_key(s) for s in (0, 1)] == [base.step_key(s) for s in (0, 1)]
    gather = base.replace(sdr_feature_gather="reference")      # the step-0 prototypes change too
    assert gather.step_key(0) != base.step_key(0) and gather.step_key(1) != base.step_key(1)
    sync = base.replace(sync_prototypes=False)                 # idem under DDP
    assert sync.step_key(0) != base.step_key(0) and sync.step_key(1) != base.step_key(1)
    reduce = base.replace(attraction_reduce="reference")       # a loss of steps > 0 only
    assert reduce.step_key(0) == base.step_key(0) and reduce.step_key(1) != base.step_key(1)


def test_amp_is_validated_and_hashed_only_when_set():
    cfg = resolve_config("voc-15-1", "sdr")
    assert cfg.amp == "off" and resolve_config("voc-15-1", "sdr", profile="paper").amp == "off"
    bf16 = resolve_config("voc-15-1", "sdr", overrides={"amp": "bf16"})
    assert bf16.amp == "bf16" and bf16.step_key(0) != cfg.step_key(0)
    # "off" is not hashed: keys of states written before the field existed stay valid
    assert resolve_config("voc-15-1", "sdr", overrides={"amp": "off"}).step_key(3) == cfg.step_key(3)
    assert resolve_config("voc-15-1", "sdr", overrides={"amp": False}).amp == "off"  # YAML's unquoted `amp: off`
    with pytest.raises(ConfigError) as err:
        resolve_config("voc-15-1", "sdr", overrides={"amp": "fp8"})
    assert str(err.value) == "amp must be one of off, bf16, fp16 (got 'fp8'); e.g. --set amp=off"
    assert ExperimentConfig.from_dict(bf16.to_dict()) == bf16


# ---------------------------------------------------------------------------- config files
def test_config_file_and_best_yaml_accept_the_same_scenario_aliases(tmp_path):
    """`csseg train --config` (csseg_cli.runs.load_config_file) and sweeper.load_best read one format with one
    reader: an export-best file's cell is found by any alias of its scenario, on either side."""
    import yaml

    from csseg_cli.runs import load_config_file
    from sweeper import load_best

    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump({"cells": [
        {"scenario": "voc-15-1", "mode": "disjoint", "method": "lwf", "params": {"kd": 3.0}},
        {"scenario": "voc-15-5s_b", "mode": "disjoint", "method": "lwf", "params": {"kd": 5.0}},  # an alias in the file
        {"scenario": "voc-15-1", "mode": "overlapped", "method": "lwf", "params": {"kd": 7.0}},
        {"scenario": "voc-10-1", "method": "lwf", "params": {"kd": 9.0}},  # no mode: disjoint
    ]}))
    cases = [("voc-15-1", "disjoint", 3.0), ("voc-15-5s", "disjoint", 3.0), (" VOC-15-1 ", "disjoint", 3.0),
             ("voc-15-1b", "disjoint", 5.0), ("voc-15-5s_b", "disjoint", 5.0), ("voc-15-5s", "overlapped", 7.0),
             ("voc-10-10s", "disjoint", 9.0), ("voc-10-1", None, 9.0)]
    for scenario, mode, kd in cases:
        assert load_config_file(path, scenario, mode)["kd"] == kd, (scenario, mode)
        assert [e["params"]["kd"] for e in load_best(path, scenario=scenario, mode=mode)] == [kd], (scenario, mode)
    for scenario, mode in (("voc-19-1", None), ("voc-15-1", "sequential")):  # no such cell: both refuse
        with pytest.raises(ConfigError):
            load_config_file(path, scenario, mode)
        with pytest.raises(ConfigError):
            load_best(path, scenario=scenario, mode=mode)
    with pytest.raises(ConfigError, match="several cells"):  # two cells of voc-15-1: the CLI needs one
        load_config_file(path, "voc-15-5s", None)
    assert len(load_best(path, scenario="voc-15-5s")) == 2
    for bad in ("cells: [1, 2]\n", "cells: {a: 1}\n"):  # cells that are not mappings: one error, both sides
        path.write_text(bad)
        with pytest.raises(ConfigError):
            load_config_file(path, "voc-15-1", None)
        with pytest.raises(ConfigError):
            load_best(path)
