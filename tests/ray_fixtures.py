"""Session fixtures for tests that need Ray. A test module imports the fixture *functions*
(``from ray_fixtures import ray_session_fixture, tiny_voc_fixture  # noqa: F401``) and then asks
for ``ray_session`` / ``tiny_voc`` by name; the lead's ``conftest.py`` may import them instead.

One local Ray instance (``num_cpus=2``) per test session: starting Ray costs ~4 s and every
``TorchTrainer`` launch ~13–20 s on 2 cores, so the tests share the cluster and keep sweeps tiny.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", name="ray_session")
def ray_session_fixture(tmp_path_factory):
    """A local Ray instance with 2 CPUs, shut down at the end of the session.

    Its workers get a private ``CSSEG_HOME`` (filter caches) unless one is already set. Started as
    the sweeper starts its own (``pinned_gcs_port``, with the dashboard): Ray Train frees the CPUs
    of a trial that ASHA stopped through the dashboard's State API; without it they stay taken
    and every later sweep of the session waits for them forever.
    """
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # another session fixture started it
        yield ray
        return
    from sweeper.ray_session import pinned_gcs_port, train_env

    home = os.environ.get("CSSEG_HOME") or str(tmp_path_factory.mktemp("ray-csseg-home"))
    env = {"env_vars": {"CSSEG_HOME": home, "RAY_USAGE_STATS_ENABLED": "0", **train_env()}}
    with pinned_gcs_port(env):
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=False, logging_level="WARNING", runtime_env=env)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session", name="tiny_voc")
def tiny_voc_fixture(tmp_path_factory):
    """A small synthetic VOC dataset (240 train / 60 val images of 64 px), made once per session."""
    from csseg_core.data.synth import generate

    return str(generate(tmp_path_factory.mktemp("tiny-voc"), "voc", n_train=240, n_val=60, size=64, seed=0))
