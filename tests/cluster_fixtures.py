"""A multi-node Ray cluster on one machine, for tests and ``bench/multinode.py``.

Token authentication is on (``RAY_AUTH_MODE=token``) with the cluster's own token in its temp
folder (``RAY_AUTH_TOKEN_PATH``); :attr:`LocalCluster.env` carries both, so run every client
(``csseg sweep --address``, ``ray job submit``) with that environment.

:class:`LocalCluster` starts a head and ``workers`` worker nodes with ``ray start --block``
(one subprocess each, in its own session): every node has its own raylet and object store,
its own ports (from ``base_port``), a distinct node id and a custom resource ``node:<name>``
(``head``, ``w1``, ...). :meth:`LocalCluster.stop` ends exactly those processes, by the pids
(process groups) it started — never a ``ray stop``, which would hit other users' Ray.

    with LocalCluster(base_port=27100, workers=1) as cluster:
        subprocess.run([sys.executable, "cli.py", "sweep", ..., "--address", cluster.address])
        cluster.kill_raylet("w1")          # node loss: SIGKILL that node's raylet

The fixture ``two_node_cluster`` (module scope) is such a cluster with the dashboard on the head
(Ray Jobs); a test module imports it like ``ray_fixtures``. The pytest process itself never
connects to it (the session may already run a local ``ray.init``): drive it from subprocesses.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: ports used from base_port: per node a block of 20 (+ 100 worker ports far above)
_PORTS = ("port", "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
          "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "dashboard-port",
          "ray-client-server-port")

_NODES_SCRIPT = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
want, deadline = int(sys.argv[2]), time.time() + float(sys.argv[3])
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= want or time.time() > deadline:
        break
    time.sleep(0.5)
print("NODES=" + json.dumps([{"node_id": n["NodeID"], "resources": n["Resources"]} for n in nodes]))
"""


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of every descendant of ``pid`` (from /proc; no psutil here)."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append((int(entry.name), comm))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


class NodeExited(RuntimeError):
    """A node's ``ray start`` process ended while the cluster was starting."""


class LocalCluster:
    """Head + ``workers`` worker nodes on this machine, each ``cpus`` CPUs (see the module docstring).

    Args:
        base_port: first port; node ``i`` (head = 0) uses ``base_port + 20 i ..`` and worker
            processes ``base_port + 1000 + 100 i ..``.
        workers: worker nodes besides the head.
        cpus: CPUs each node advertises.
        dashboard: start the dashboard on the head (needed for Ray Jobs).
        env: extra environment for every node (its workers inherit it).
    """

    def __init__(self, base_port: int = 27100, workers: int = 1, cpus: float = 1, dashboard: bool = False,
                 object_store_mb: int = 256, env: dict[str, str] | None = None) -> None:
        self.base_port, self.workers, self.cpus, self.dashboard = base_port, workers, cpus, dashboard
        self.object_store_mb = object_store_mb
        self.temp_dir = tempfile.mkdtemp(prefix=f"csseg-cluster-{base_port}-")
        token = Path(self.temp_dir) / "auth_token"  # the cluster's own token (never ~/.ray/auth_token)
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        from ray._private.services import get_node_ip_address

        self.ip = get_node_ip_address()
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    # a loaded 2-core machine: the dashboard agent may take a minute to come up, and
                    # a raylet that waits for it less long aborts (its default is ~30 s)
                    "RAY_agent_register_timeout_ms": "240000",
                    # stop() ends test nodes at once: no 30 s graceful drain of a SIGTERMed node
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                    "RAY_AUTH_TOKEN_PATH": str(token),
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
                    **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}

    @property
    def address(self) -> str:
        """GCS address (``--address`` of ``csseg sweep`` / ``ray start``)."""
        return f"{self.ip}:{self.base_port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard / Ray Jobs address (``ray job submit --address``)."""
        return f"http://127.0.0.1:{self.base_port + 7}"

    def names(self) -> list[str]:
        return ["head"] + [f"w{i}" for i in range(1, self.workers + 1)]

    def _ports(self, index: int) -> dict[str, int]:
        return {name: self.base_port + 20 * index + k for k, name in enumerate(_PORTS)}

    def _command(self, index: int, name: str) -> list[str]:
        ports = self._ports(index)
        lo = self.base_port + 1000 + 100 * index
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
               f"--node-ip-address={self.ip}", f"--num-cpus={self.cpus:g}", "--num-gpus=0",
               f"--resources={json.dumps({f'node:{name}': 1})}",
               f"--object-store-memory={self.object_store_mb * 2**20}",
               f"--min-worker-port={lo}", f"--max-worker-port={lo + 99}"]
        for key in ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"):
            cmd.append(f"--{key}={ports[key]}")
        if index == 0:
            cmd += ["--head", f"--port={ports['port']}", f"--temp-dir={self.temp_dir}",
                    f"--ray-client-server-port={ports['ray-client-server-port']}"]
            if self.dashboard:
                cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.base_port + 7}"]
            else:
                cmd += ["--include-dashboard=false"]
        else:
            cmd += [f"--address={self.address}"]
        return cmd

    def _spawn(self, index: int, name: str) -> None:
        log = open(Path(self.temp_dir) / f"ray-start-{name}.log", "w")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen(self._command(index, name), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=str(ROOT))

    def start(self, timeout_s: float = 240.0) -> LocalCluster:
        """Start every node and wait until the GCS sees them all alive (node ids in :attr:`node_ids`).

        Whatever goes wrong, the nodes started so far are stopped before the error propagates.
        """
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _gcs_listens(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.procs["head"].poll() is not None:
                return  # _wait reports the exit with the node's log
            with socket.socket() as sock:
                sock.settimeout(1.0)
                if sock.connect_ex((self.ip, self.base_port)) == 0:
                    return
            time.sleep(0.5)

    def _start(self, timeout_s: float, attempts: int = 3) -> LocalCluster:
        # `ray start` gives a node 30 s (hard-coded) to register; on a loaded machine it may miss
        # that and exit: start it again (up to `attempts` times)
        for attempt in range(attempts):
            self._spawn(0, "head")
            self._gcs_listens(timeout_s)
            try:
                self._wait(1, timeout_s)
                break
            except NodeExited:
                if attempt == attempts - 1:
                    raise
                self.stop()
        for i, name in enumerate(self.names()[1:], start=1):
            for attempt in range(attempts):
                self._spawn(i, name)
                try:
                    self._wait(1 + i, timeout_s)
                    break
                except NodeExited:
                    if attempt == attempts - 1:
                        raise
                    self.procs.pop(name).wait()
        nodes = self._wait(1 + self.workers, timeout_s)
        for node in nodes:
            for name in self.names():
                if node["resources"].get(f"node:{name}"):
                    self.node_ids[name] = node["node_id"]
        if len(self.node_ids) != 1 + self.workers:
            raise RuntimeError(f"local cluster: {len(self.node_ids)}/{1 + self.workers} nodes came up ({self.temp_dir})")
        return self

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = (Path(self.temp_dir) / f"ray-start-{name}.log").read_text()[-2000:]
                raise NodeExited(f"local cluster: `ray start` of {name} exited {proc.returncode}:\n{log}")

    def _wait(self, count: int, timeout_s: float) -> list[dict]:
        deadline = time.time() + timeout_s
        while True:
            self._check_alive()
            probe = subprocess.Popen([sys.executable, "-c", _NODES_SCRIPT, self.address, str(count), "30"], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                while probe.poll() is None:  # a node that dies meanwhile ends the wait at once
                    if time.time() > deadline or any(p.poll() is not None for p in self.procs.values()):
                        probe.kill()
                        break
                    time.sleep(0.5)
            finally:
                stdout, stderr = probe.communicate()
            self._check_alive()
            out = subprocess.CompletedProcess(probe.args, probe.returncode, stdout, stderr)
            found = [ln[len("NODES="):] for ln in (out.stdout or "").splitlines() if ln.startswith("NODES=")]
            nodes = json.loads(found[-1]) if out.returncode == 0 and found else []
            if len(nodes) >= count:
                return nodes
            if time.time() > deadline:
                raise RuntimeError(f"local cluster: {len(nodes)}/{count} nodes after {timeout_s:.0f} s: {out.stderr[-1500:]}")

    def raylet_pid(self, name: str) -> int | None:
        """Pid of node ``name``'s raylet (a child of its ``ray start`` process), None if gone."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return None
        return next((pid for pid, comm in _children(proc.pid) if comm == "raylet"), None)

    def kill_raylet(self, name: str) -> int:
        """SIGKILL node ``name``'s raylet (its ``ray start --block`` then ends the node's other processes)."""
        pid = self.raylet_pid(name)
        if pid is None:
            raise RuntimeError(f"node {name} has no raylet running")
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the nodes this object started (workers first): SIGTERM, then SIGKILL their process groups."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            try:  # anything of that node still alive (own session = own process group)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        self.procs.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _ports_free(base_port: int, nodes: int) -> bool:
    """Whether every port a LocalCluster of ``nodes`` nodes at ``base_port`` uses can be bound now."""
    ports = [base_port + 20 * i + k for i in range(nodes) for k in range(20)]
    ports += [base_port + 1000 + 100 * i + k for i in range(nodes) for k in range(100)]
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                return False
    return True


def free_base_port(start: int = 27100, nodes: int = 2, step: int = 400, tries: int = 20) -> int:
    """The first ``start + k * step`` whose whole port layout is free (another Ray on the box may hold some)."""
    for k in range(tries):
        if _ports_free(start + k * step, nodes):
            return start + k * step
    raise RuntimeError(f"no free port block for a {nodes}-node cluster from {start} (step {step})")


@pytest.fixture(scope="module", name="two_node_cluster")
def two_node_cluster_fixture():
    """A head (dashboard on) + 1 worker node, 1 CPU each, on the first free port block from 27100
    (``CSSEG_TEST_CLUSTER_PORT`` pins it), stopped by pid at the end."""
    port = os.environ.get("CSSEG_TEST_CLUSTER_PORT")
    with LocalCluster(base_port=int(port) if port else free_base_port(), workers=1, cpus=1,
                      dashboard=True) as cluster:
        yield cluster
