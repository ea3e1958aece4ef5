"""Ray for a sweep: start or join it (``init_ray``), fail fast on a dead address, the job's runtime env.

    own_ray, dashboard_url = init_ray(spec)     # what ``csseg sweep`` (and bench/) call

* :func:`init_ray` joins ``spec.address`` / ``$RAY_ADDRESS`` (:func:`join_cluster`, after
  :func:`probe_address` checked that something listens there) or starts a local Ray on a pinned
  GCS port (:func:`pinned_gcs_port`) with the dashboard on 127.0.0.1;
* :func:`train_env` is the Ray Train settings every worker gets (poll interval, no
  ``PreemptionWatcher`` on a local cluster);
* :func:`log` prints the ``[csseg sweep]`` lines of the driver.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from csseg_core.errors import ConfigError

if TYPE_CHECKING:
    from .spec import SweepSpec


def log(message: str) -> None:
    print(f"[csseg sweep] {message}", flush=True)


#: Ray Train's controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by
#: default) and only notices a finished train function at the next poll: 0.5 s takes ~3 s off
#: every trial's teardown (bench/trial_overhead.py) for a negligible polling cost.
HEALTH_CHECK_INTERVAL_S = "0.5"


def train_env(local: bool = True) -> dict[str, str]:
    """Ray Train settings for every Ray worker (the job's runtime env); a value the user set wins.

    * the controller's poll interval (:data:`HEALTH_CHECK_INTERVAL_S`);
    * on a local, single-node cluster, no ``PreemptionWatcher``: Train starts one extra actor
      process per trial to watch for node drains, which cannot happen there (~3.5 CPU-seconds
      per trial on 2 cores, see BENCHMARKS.md). On a real cluster Ray's default stays.
    """
    wanted = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_INTERVAL_S}
    if local:
        wanted["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return {k: os.environ.get(k, v) for k, v in wanted.items()}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def pinned_gcs_port(env: dict):
    """Start the local Ray on a chosen GCS port and tell its workers that address (``RAY_ADDRESS``).

    Ray's own helper actors find their cluster through ``RAY_ADDRESS`` or by looking for Ray
    instances on the machine. Ray Train's ``PlacementGroupCleaner`` (one per trial) does, through
    the State API, to see whether the trial's Train controller still lives and then frees its
    placement group. When Tune stops a trial (ASHA) it kills the trial actor and with it the
    controller, so the cleaner must free the worker's CPU; with another Ray instance on the
    machine (a shared box) it fails ("Found multiple active Ray instances"), the CPU is never
    freed, and the next trial's worker group waits for it forever. ``env`` is the job's
    runtime env (changed in place); a ``RAY_GCS_SERVER_PORT`` the user set wins.
    """
    if os.environ.get("RAY_ADDRESS"):  # ray.init joins that cluster: nothing to pin
        yield
        return
    port = os.environ.get("RAY_GCS_SERVER_PORT") or str(_free_port())
    env.setdefault("env_vars", {})["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    saved = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = port
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = saved


def init_ray(spec: SweepSpec) -> tuple[bool, str | None]:
    """Start (or join) Ray; returns (True if this call connected and must shut it down, dashboard URL).

    It joins ``spec.address``, else ``$RAY_ADDRESS`` (what Ray sets for a job's entrypoint, so
    ``ray job submit -- csseg sweep ...`` runs on the job's cluster), else starts a local Ray.

    Workers print to the driver's terminal only with ``spec.verbose >= 1``; otherwise their output
    stays in Ray's session logs (see ``sweep.log``). They never repeat the synthetic-data note
    (``CSSEG_SYNTHETIC_NOTE=0``): the driver prints it once.
    """
    if ray.is_initialized():
        return False, None
    address = spec.address or os.environ.get("RAY_ADDRESS")  # set for the entrypoint of a Ray Job
    paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p), "CSSEG_SYNTHETIC_NOTE": "0",
                        **train_env(local=not address)}}
    quiet = {"log_to_driver": spec.verbose >= 1}
    if address:
        ctx = join_cluster(address, env, quiet)
    else:
        try:
            with pinned_gcs_port(env):
                ctx = ray.init(include_dashboard=spec.dashboard, dashboard_host="127.0.0.1", runtime_env=env, **quiet)
        except Exception as err:  # noqa: BLE001 - minimal ray: go on without the dashboard
            ray.shutdown()  # what the failed start left running (its GCS, raylet), before starting again
            log(f"Ray dashboard unavailable ({err}); starting without it")
            with pinned_gcs_port(env):
                ctx = ray.init(include_dashboard=False, runtime_env=env, **quiet)
        gcs = (getattr(ctx, "address_info", None) or {}).get("gcs_address")
        if gcs and gcs != env["env_vars"].get("RAY_ADDRESS"):
            log(f"Ray started at {gcs}, not at the pinned address: ASHA-stopped trials may keep their CPUs "
                "when other Ray instances run on this machine")
    url = getattr(ctx, "dashboard_url", None)
    if url:
        log(f"Ray dashboard: http://{url}  (token: `ray get-auth-token`)")
    return True, (f"http://{url}" if url else None)


#: seconds :func:`probe_address` waits for a TCP connection to a cluster's GCS port
PROBE_TIMEOUT_S = 5.0


def probe_address(address: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast (one line) when nothing listens at a cluster address, before ``ray.init``.

    ``ray.init(address=HOST:PORT)`` retries a GCS that does not answer for many minutes; this
    opens one TCP connection (``timeout_s``) to the address Ray would use (``auto`` resolved,
    ``localhost`` mapped to this node's IP as Ray does; ``ray://HOST:PORT`` probes that port) and
    checks that a gRPC (HTTP/2) server answers there, not some other service on a mistyped port
    (skipped under ``RAY_USE_TLS``).
    ``None``, ``local`` and an ``auto`` with no cluster to find are left to ``ray.init``.

    Raises:
        ConfigError: a malformed address, no answer at it, or an answer that is not gRPC.
    """
    import socket

    if not address or address == "local":
        return
    target = address.split("://", 1)[1] if address.startswith("ray://") else address
    try:
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(target)
    except ValueError:
        raise ConfigError(f"Ray address {address!r} is not HOST:PORT; pass --address HOST:PORT (the head's GCS port, "
                          "6379 by default) or auto") from None
    except Exception:  # noqa: BLE001 - a private helper of Ray: fall back to the address as given
        if target == "auto":  # e.g. "Found multiple active Ray instances": ray.init says which
            return
        resolved = target
    if resolved is None:
        return
    host, _, port = resolved.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not HOST:PORT; pass --address HOST:PORT (the head's GCS port, "
                          "6379 by default) or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            grpc = os.environ.get("RAY_USE_TLS", "0") not in ("0", "") or _speaks_http2(sock, timeout_s)
    except OSError as err:
        why = "no answer" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__).lower()
        raise ConfigError(f"no Ray cluster listens at {address} ({resolved}: {why} within {timeout_s:g} s); start one "
                          f"(`ray start --head --port={port}`) or fix --address / RAY_ADDRESS") from None
    if not grpc:  # ray.init would retry it for minutes, printing warnings
        raise ConfigError(f"{address} ({resolved}) answers but is not a Ray cluster (no gRPC server on that port); pass "
                          "the head's GCS port (`ray start --head` prints it; 6379 by default) or fix --address / RAY_ADDRESS")


# The HTTP/2 client connection preface followed by an empty SETTINGS frame (RFC 9113 §3.4, §6.5).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _speaks_http2(sock, timeout_s: float) -> bool:
    """Whether the server answers the HTTP/2 preface with a SETTINGS frame, as every gRPC server
    (Ray's GCS and its Ray Client server) must; a web server, a database, ... does not."""
    sock.settimeout(timeout_s)
    head = b""
    try:
        sock.sendall(_HTTP2_PREFACE)
        while len(head) < 9:  # a frame header: length (3), type (1), flags (1), stream id (4)
            chunk = sock.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:
        return False
    return head[3] == 0x04


def join_cluster(address: str, runtime_env: dict, quiet: dict):
    """``ray.init(address=...)`` with one-line errors for the usual reasons a join fails
    (nothing listening: :func:`probe_address`, in seconds instead of Ray's minutes of retries)."""
    from ray.exceptions import AuthenticationError

    probe_address(address)
    try:
        return ray.init(address=address, runtime_env=runtime_env, **quiet)
    except (AuthenticationError, ConnectionError) as err:
        if isinstance(err, AuthenticationError) or isinstance(err.__cause__, AuthenticationError):
            raise ConfigError(f"the Ray cluster at {address} rejected this client's auth token: export RAY_AUTH_MODE=token "
                              "and the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)") from None
        raise ConfigError(f"no Ray cluster answers at {address} ({str(err).splitlines()[0]}); start one "
                          "(`ray start --head`) or fix --address / RAY_ADDRESS") from None


def ray_logs_dir() -> str | None:
    """The Ray session's log folder (the workers' output), or None when it cannot be found."""
    try:
        return ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a private API: the path is a convenience only
        return None
