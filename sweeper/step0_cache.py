"""The step-0 cache: a named, detached actor that trains each step-0 state once per sweep.

Step 0 is FT for every method, so every trial of a grid cell needs the same step-0 state
(``cfg.step_key(0)``). It collects the statistics of the sweep's method (a sweep searches one
method, so that is the union over its trials; ``state["collected"]`` records them). The actor maps that key to an ``ObjectRef`` of the state as numpy
arrays and to its file ``<sweep dir>/step0/<key>.pt``. The actor owns the refs it hands out
(it calls ``ray.put`` itself on the data it receives), so they outlive the trials that made
them. Refs travel wrapped in a list so Ray does not resolve them on the way.

Protocol (the actor runs one call at a time, so a decision is atomic)::

    acquire(key, owner) -> ("ready", [ref], metrics)  # use it
                         | ("train", None, None)      # you are first: train step 0, then put()
                         | ("wait", None, None)       # someone else is training it: poll again
    heartbeat(key, owner)   keeps a "train" lease alive (it expires after ``lease_s``)
    put(key, arrays, metrics, path)   publishes the state (the actor ray.put's it)
    release(key, owner)     gives a lease back after a failure: the next acquire trains it

After a restart (a resumed sweep) the actor reloads a key from its file on first use.
``stats()`` counts how often step 0 was trained (persisted in ``step0/stats.json``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

from .tables import write_json

READY, TRAIN, WAIT = "ready", "train", "wait"


def step0_dir(sweep_dir: str | os.PathLike) -> Path:
    """The cache folder of a sweep: ``<sweep dir>/step0``."""
    return Path(sweep_dir) / "step0"


def state_path(root: str | os.PathLike, key: str) -> Path:
    """File of the step-0 state ``key`` under the cache folder ``root``."""
    return Path(root) / f"{key}.pt"


def meta_path(root: str | os.PathLike, key: str) -> Path:
    """The metrics file of ``key`` (the cache loads a state from its folder only with it)."""
    return Path(root) / f"{key}.json"


def seed_state(root: str | os.PathLike, key: str, state_file: str | os.PathLike, metrics: dict, *,
               trained_by: str) -> None:
    """Put a step-0 state trained elsewhere where a sweep's cache loads it: its trials then find
    ``key`` ready and never train step 0. ``state_file`` is linked, not copied; ``metrics`` are the
    state's step-0 metrics (portable scalars); an existing state of ``key`` is kept."""
    Path(root).mkdir(parents=True, exist_ok=True)
    target = state_path(root, key)
    if not target.exists():
        target.symlink_to(Path(state_file).resolve())
    write_json(meta_path(root, key), {"key": key, "metrics": metrics, "trained_by": trained_by})


class Step0Cache:
    """Actor body (wrapped by :func:`get_cache`); see the module docstring for the protocol.

    Args:
        root: the cache folder (``<sweep dir>/step0``).
        lease_s: a "train" lease without heartbeat for this long is given to the next caller.
    """

    def __init__(self, root: str, lease_s: float = 300.0) -> None:
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._lease_s = float(lease_s)
        self._entries: dict[str, dict[str, Any]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._stats = {"trained": 0, "hits": 0, "loaded": 0, "grants": 0, "released": 0, "trained_by": {}}
        stats_file = self._root / "stats.json"
        if stats_file.exists():
            saved = json.loads(stats_file.read_text())
            self._stats["trained"] = int(saved.get("trained", 0))
            self._stats["trained_by"] = dict(saved.get("trained_by", {}))

    # -------------------------------------------------------------- protocol
    def acquire(self, key: str, owner: str) -> tuple[str, list | None, dict | None]:
        """Decide who provides ``key``: ready (with ``[ref]`` and the step-0 metrics), train or wait."""
        entry = self._entries.get(key) or self._load(key)
        if entry is not None:
            self._stats["hits"] += 1
            return READY, [entry["ref"]], entry["metrics"]
        now = time.monotonic()
        lease = self._leases.get(key)
        if lease is None or lease[0] == owner or now - lease[1] > self._lease_s:
            self._leases[key] = (owner, now)
            self._stats["grants"] += 1
            return TRAIN, None, None
        return WAIT, None, None

    def heartbeat(self, key: str, owner: str) -> bool:
        """Renew ``owner``'s lease on ``key``; False if it no longer holds it."""
        lease = self._leases.get(key)
        if lease is None or lease[0] != owner:
            return False
        self._leases[key] = (owner, time.monotonic())
        return True

    def put(self, key: str, arrays: dict, metrics: dict, owner: str = "") -> bool:
        """Publish the state of ``key`` (numpy arrays); the file must already be written."""
        if key not in self._entries:
            self._entries[key] = {"ref": ray.put(arrays), "metrics": dict(metrics)}
            self._stats["trained"] += 1
            self._stats["trained_by"][key] = owner
            write_json(meta_path(self._root, key), {"key": key, "metrics": metrics, "trained_by": owner})
            write_json(self._root / "stats.json", {"trained": self._stats["trained"],
                                                    "trained_by": self._stats["trained_by"]})
        self._leases.pop(key, None)
        return True

    def release(self, key: str, owner: str) -> bool:
        """Give back ``owner``'s lease (its training failed); the next acquire gets "train"."""
        lease = self._leases.get(key)
        if lease is not None and lease[0] == owner:
            del self._leases[key]
            self._stats["released"] += 1
            return True
        return False

    def node_id(self) -> str:
        """The node this actor runs on: it owns the refs it hands out, so their data lives there."""
        return ray.get_runtime_context().get_node_id()

    def stats(self) -> dict[str, Any]:
        """Counters: trained (step-0 trainings published), hits, loaded (from files), grants, released."""
        return {**self._stats, "trained_by": dict(self._stats["trained_by"]), "keys": sorted(self._entries)}

    # -------------------------------------------------------------- helpers
    def _load(self, key: str) -> dict[str, Any] | None:
        path, meta = state_path(self._root, key), meta_path(self._root, key)
        if not (path.exists() and meta.exists()):
            return None
        from csseg_core.state import load_state, state_to_numpy

        arrays = state_to_numpy(load_state(path))
        entry = {"ref": ray.put(arrays), "metrics": json.loads(meta.read_text())["metrics"]}
        self._entries[key] = entry
        self._stats["loaded"] += 1
        return entry


def cache_names(sweep: str) -> tuple[str, str]:
    """(actor name, namespace) of a sweep's cache actor."""
    return f"csseg-step0-{sweep}", f"csseg-{sweep}"


def get_cache(sweep: str, root: str | os.PathLike, lease_s: float = 300.0):
    """Get or create the sweep's cache actor (named, detached, ``num_cpus=0``).

    It is pinned to the caller's node (the sweep's driver): on a cluster the step-0 states then
    live where the sweep itself lives, and losing a worker node never loses them. The pin is hard:
    Ray 2.60 placed a detached actor with a *soft* affinity on another node 2 times in 6 on an idle
    two-node cluster, and the node-loss test then lost the cache with the worker node.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name, namespace = cache_names(sweep)
    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(Step0Cache)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return actor_cls.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
                             scheduling_strategy=here).remote(str(root), lease_s)


def lookup_cache(sweep: str):
    """Handle of an existing cache actor (inside trials and workers)."""
    name, namespace = cache_names(sweep)
    return ray.get_actor(name, namespace=namespace)


def kill_cache(sweep: str) -> dict[str, Any] | None:
    """Return the cache's stats and kill it (its states stay on disk); None if it is not running.

    Without a Ray connection (joining the cluster failed) it does nothing: ``ray.get_actor``
    would otherwise start a local Ray instance just to find no actor. An actor killed a moment
    ago can still be found by name; it counts as not running.
    """
    if not ray.is_initialized():
        return None
    try:
        actor = lookup_cache(sweep)
    except ValueError:
        return None
    try:
        stats = ray.get(actor.stats.remote())
    except RayActorError:  # killed a moment ago: its name outlives it briefly
        return None
    ray.kill(actor)
    return stats


class Lease:
    """Acquire a key for one owner, and keep a "train" lease alive from a background thread.

    Example:
        >>> lease = Lease(cache, key, owner)                # doctest: +SKIP
        >>> decision, ref_list, metrics = lease.wait()      # ready or train, never wait
        >>> ...; lease.close(failed=False)
    """

    def __init__(self, cache, key: str, owner: str, *, poll_s: float = 1.0, heartbeat_s: float = 10.0) -> None:
        self.cache, self.key, self.owner = cache, key, owner
        self.poll_s, self.heartbeat_s = poll_s, heartbeat_s
        self.training = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> tuple[str, list | None, dict | None]:
        """Poll ``acquire`` until the key is ready or this owner must train it (no heartbeat)."""
        while True:
            decision, ref_list, metrics = ray.get(self.cache.acquire.remote(self.key, self.owner))
            if decision != WAIT:
                return decision, ref_list, metrics
            time.sleep(self.poll_s)

    def wait(self) -> tuple[str, list | None, dict | None]:
        """:meth:`poll`, then keep a "train" lease alive until :meth:`close`."""
        decision, ref_list, metrics = self.poll()
        if decision == TRAIN:
            self.training = True
            self._thread = threading.Thread(target=self._beat, name="step0-lease", daemon=True)
            self._thread.start()
        return decision, ref_list, metrics

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not ray.get(self.cache.heartbeat.remote(self.key, self.owner)):
                    return  # published (put) or lost: nothing to keep alive
            except Exception:  # noqa: BLE001 - the cache is gone; the trial will notice
                return

    def close(self, *, failed: bool) -> None:
        """Stop the heartbeat; after a failure give the lease back so another trial trains it."""
        self._stop.set()
        if self.training and failed:
            try:
                ray.get(self.cache.release.remote(self.key, self.owner))
            except Exception:  # noqa: BLE001
                pass
