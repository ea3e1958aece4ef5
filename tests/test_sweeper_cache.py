"""The step-0 cache actor protocol, with small numpy states and concurrent acquirers (no TorchTrainer)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import ray.cloudpickle
import torch
from ray_fixtures import ray_session_fixture  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers need not import tests/


def _contender(sweep, key, owner, fail, root):
    import ray

    from csseg_core.state import save_state
    from sweeper.step0_cache import TRAIN, Lease, lookup_cache, state_path

    lease = Lease(lookup_cache(sweep), key, owner, poll_s=0.05, heartbeat_s=0.1)
    decision, refs, metrics = lease.wait()
    if decision == TRAIN:
        time.sleep(0.5)  # "training"
        if fail:
            lease.close(failed=True)
            return "failed", None
        state = {"step": 0, "model": {"w": torch.full((3,), 7.0)}, "history": [0.5]}
        save_state(state, state_path(root, key))
        arrays = {"step": 0, "model": {"w": state["model"]["w"].numpy()}, "history": [0.5]}
        ray.get(lookup_cache(sweep).put.remote(key, arrays, {"step": 0, "miou_all": 0.5}, owner))
        lease.close(failed=False)
        return "trained", None
    return "reused", refs  # the ref (owned by the actor) outlives this task


def _remote():
    import ray

    return ray.remote(num_cpus=0)(_contender)


def test_concurrent_acquirers_train_once_and_refs_outlive_them(tmp_path):
    import ray

    from sweeper.step0_cache import get_cache, kill_cache

    cache = get_cache("t-once", tmp_path)
    contender = _remote()
    results = ray.get([contender.remote("t-once", "k0", f"trial-{i}", False, str(tmp_path)) for i in range(4)])
    kinds = sorted(r[0] for r in results)
    assert kinds == ["reused", "reused", "reused", "trained"]
    stats = ray.get(cache.stats.remote())
    assert stats["trained"] == 1 and stats["hits"] == 3 and stats["keys"] == ["k0"]
    state = ray.get(next(r[1] for r in results if r[1])[0])  # the tasks are gone, the ref lives
    assert np.array_equal(state["model"]["w"], np.full(3, 7.0)) and not state["model"]["w"].flags.writeable
    from csseg_core.state import state_from_numpy

    assert state_from_numpy(state)["model"]["w"].add_(1).sum().item() == 24.0  # a writable copy
    kill_cache("t-once")


def test_a_failed_trainer_releases_the_key(tmp_path):
    import ray

    from sweeper.step0_cache import TRAIN, get_cache, kill_cache

    cache = get_cache("t-fail", tmp_path)
    contender = _remote()
    assert ray.get(contender.remote("t-fail", "k0", "first", True, str(tmp_path)))[0] == "failed"
    results = ray.get([contender.remote("t-fail", "k0", f"t{i}", False, str(tmp_path)) for i in range(3)])
    assert sorted(r[0] for r in results) == ["reused", "reused", "trained"]
    stats = ray.get(cache.stats.remote())
    assert stats["trained"] == 1 and stats["released"] == 1 and stats["grants"] == 2
    assert ray.get(cache.acquire.remote("k1", "a"))[0] == TRAIN
    assert kill_cache("t-fail")["trained"] == 1
    for _ in range(5):  # the name can outlive the killed actor for a moment: never an ActorDiedError
        assert kill_cache("t-fail") is None


def test_an_abandoned_lease_expires_and_heartbeats_keep_it(tmp_path):
    import ray

    from sweeper.step0_cache import READY, TRAIN, WAIT, get_cache, kill_cache

    cache = get_cache("t-lease", tmp_path, lease_s=0.5)
    assert ray.get(cache.acquire.remote("k", "a"))[0] == TRAIN
    assert ray.get(cache.acquire.remote("k", "a"))[0] == TRAIN  # re-entrant for its owner (a retried trial)
    assert ray.get(cache.acquire.remote("k", "b"))[0] == WAIT
    for _ in range(3):
        time.sleep(0.25)
        assert ray.get(cache.heartbeat.remote("k", "a"))
    assert ray.get(cache.acquire.remote("k", "b"))[0] == WAIT
    time.sleep(0.6)
    assert ray.get(cache.acquire.remote("k", "b"))[0] == TRAIN  # a's lease expired
    assert not ray.get(cache.heartbeat.remote("k", "a"))
    ray.get(cache.put.remote("k", {"step": 0, "model": {"w": np.zeros(2)}}, {"step": 0}, "b"))
    decision, refs, metrics = ray.get(cache.acquire.remote("k", "c"))
    assert decision == READY and isinstance(refs, list) and metrics == {"step": 0}
    kill_cache("t-lease")


def test_a_restarted_cache_reloads_from_files(tmp_path):
    import ray

    from sweeper.step0_cache import READY, get_cache, kill_cache

    contender = _remote()
    get_cache("t-reload", tmp_path)
    assert ray.get(contender.remote("t-reload", "k0", "x", False, str(tmp_path)))[0] == "trained"
    assert kill_cache("t-reload")["trained"] == 1
    cache = get_cache("t-reload", tmp_path)  # a new actor: empty memory, same folder
    decision, refs, metrics = ray.get(cache.acquire.remote("k0", "y"))
    assert decision == READY and metrics == {"step": 0, "miou_all": 0.5}
    assert np.array_equal(ray.get(refs[0])["model"]["w"], np.full(3, 7.0))
    stats = ray.get(cache.stats.remote())
    assert stats["loaded"] == 1 and stats["trained"] == 1  # the count survives the restart
    kill_cache("t-reload")
