"""Session fixtures for tests that need Ray (import them into a test module, or let the lead's
``conftest.py`` do ``from ray_fixtures import ray_session, tiny_voc  # noqa: F401``).

One local Ray instance (``num_cpus=2``) per test session: starting Ray costs ~4 s and every
``TorchTrainer`` launch ~13–20 s on 2 cores, so the tests share the cluster and keep sweeps tiny.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance with 2 CPUs and no dashboard, shut down at the end of the session."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # someone else's session fixture started it
        yield ray
        return
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory):
    """A small synthetic VOC dataset (240 train / 60 val images of 64 px), made once per session."""
    from csseg_core.data.synth import generate

    return str(generate(tmp_path_factory.mktemp("tiny-voc"), "voc", n_train=240, n_val=60, size=64, seed=0))
