"""Handing a ResNet-101 DeepLabV3 state (~240 MB) to another process: object store vs copy vs disk.

    python bench/handoff.py                 # ResNet-101, 5 repeats (~2 min on 2 cores)
    python bench/handoff.py --quick         # ResNet-18, 2 repeats, no row appended

The state is ``build_model("resnet101", (16,1,1,1,1,1), output_stride=16).state_dict()``
wrapped as a csseg step state. Paths timed (median over ``--repeats``):

* **object store** (what the sweeper does): ``state_to_numpy`` + ``ray.put`` in the driver,
  then, inside another process (a warm Ray actor), ``ray.get`` + ``state_from_numpy`` (which
  copies, object-store arrays being read-only). Reported per phase and end to end (driver
  clock from ``state_to_numpy`` to the actor's answer, i.e. including the call round trip);
* **in-process copy**: ``copy.deepcopy(state)`` and a ``clone()`` of every tensor;
* **object store, torch tensors as is** (the naive path, for comparison): ``ray.put(state)``
  then ``ray.get`` in the actor (tensors are pickled into the store and copied out on every get);
* **disk**: ``torch.save`` to a file (+ ``fsync``) then ``torch.load(weights_only=True)``
  (``csseg_core.state.save_state`` / ``load_state``; the load is from the page cache).

Ratios are relative to the in-process ``clone``.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import _common as C


def make_state(backbone: str) -> dict:
    import torch

    from csseg_core.models import build_model

    torch.manual_seed(0)
    model = build_model(backbone, (16, 1, 1, 1, 1, 1), output_stride=16, pretrained=None)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"step": 0, "config": {"backbone": backbone}, "model": sd, "statistics": {}, "history": [0.5]}


def nbytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state["model"].values())


def _receiver_cls():
    import ray

    @ray.remote(num_cpus=0)
    class Receiver:
        """Another process that receives a state through the object store."""

        def __init__(self) -> None:
            import torch  # noqa: F401  (warm: imports are not part of the handoff)

            from csseg_core.state import state_from_numpy  # noqa: F401

        def receive(self, ref_list: list) -> dict:
            import ray

            from csseg_core.state import state_from_numpy

            t0 = time.perf_counter()
            arrays = ray.get(ref_list[0])
            t1 = time.perf_counter()
            state = state_from_numpy(arrays)
            t2 = time.perf_counter()
            total = sum(v.numel() * v.element_size() for v in state["model"].values())
            return {"ray_get_s": t1 - t0, "from_numpy_s": t2 - t1, "bytes": total}

        def receive_torch(self, ref_list: list) -> dict:
            """The naive path: the torch state put as is (tensors pickled, copied on every get)."""
            import ray

            t0 = time.perf_counter()
            state = ray.get(ref_list[0])
            total = sum(v.numel() * v.element_size() for v in state["model"].values())
            return {"ray_get_s": time.perf_counter() - t0, "bytes": total}

    return Receiver


def _through_store(receive, payload, size: int):
    """``ray.put(payload)``, then ``receive`` (an actor method) gets it in the other process.

    Returns the ref, the put seconds, the receiver's answer and the seconds from put to answer."""
    import ray

    t0 = time.perf_counter()
    ref = ray.put(payload)
    t1 = time.perf_counter()
    got = ray.get(receive.remote([ref]))
    t2 = time.perf_counter()
    assert got["bytes"] == size, (got["bytes"], size)
    return ref, t1 - t0, got, t2 - t0


def run(backbone: str, repeats: int) -> dict:
    import ray
    import torch

    from csseg_core.state import load_state, save_state, state_to_numpy

    state = make_state(backbone)
    size = nbytes(state)
    print(f"[bench] {backbone} state: {size / 2**20:.0f} MiB in {len(state['model'])} tensors", flush=True)
    times: dict[str, list[float]] = {}

    def rec(name: str, value: float) -> None:
        times.setdefault(name, []).append(value)

    # ------------------------------------------------------------ in process
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy.deepcopy(state)
        rec("deepcopy", time.perf_counter() - t0)
        t0 = time.perf_counter()
        {**state, "model": {k: v.clone() for k, v in state["model"].items()}}
        rec("clone", time.perf_counter() - t0)

    # ------------------------------------------------------------ disk
    with tempfile.TemporaryDirectory(prefix="csseg-handoff-") as d:
        path = Path(d) / "state.pt"
        for _ in range(repeats):
            t0 = time.perf_counter()
            save_state(state, path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            t1 = time.perf_counter()
            loaded = load_state(path)
            t2 = time.perf_counter()
            key = next(iter(state["model"]))
            assert torch.equal(loaded["model"][key], state["model"][key])
            rec("torch.save+fsync", t1 - t0)
            rec("torch.load", t2 - t1)
            rec("disk total", t2 - t0)
            del loaded
        file_mb = path.stat().st_size / 2**20

    # ------------------------------------------------------------ object store
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=max(1 << 30, 6 * size))
    init_s = time.perf_counter() - t0
    try:
        receiver = _receiver_cls().remote()
        ray.get(receiver.__ray_ready__.remote())  # the actor process is up and has imported torch
        for _ in range(repeats):
            t0 = time.perf_counter()
            arrays = state_to_numpy(state)
            to_numpy_s = time.perf_counter() - t0
            ref, put_s, got, e2e_s = _through_store(receiver.receive, arrays, size)
            rec("state_to_numpy", to_numpy_s)
            rec("ray.put", put_s)
            rec("ray.get (other process)", got["ray_get_s"])
            rec("state_from_numpy (copy)", got["from_numpy_s"])
            rec("object store end to end", to_numpy_s + e2e_s)
            t0 = time.perf_counter()
            ray.get(ref)  # the driver's own view: zero-copy
            rec("ray.get (same process, zero-copy)", time.perf_counter() - t0)
            del ref, arrays
            # before: the torch tensors straight into the store
            ref, put_s, got, e2e_s = _through_store(receiver.receive_torch, state, size)
            rec("torch state: ray.put", put_s)
            rec("torch state: ray.get (other process)", got["ray_get_s"])
            rec("torch state: object store end to end", e2e_s)
            del ref
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"backbone": backbone, "state_mib": size / 2**20, "file_mib": file_mb, "tensors": len(state["model"]),
            "repeats": repeats, "ray_init_s": init_s, "median_s": med, "all_s": times,
            "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    backbone = "resnet18" if a.quick else a.backbone
    repeats = 2 if a.quick else a.repeats
    C.bench_home()
    load0 = C.wait_for_load(a.max_load, enabled=not (a.no_wait or a.quick))
    r = run(backbone, repeats)
    load1 = C.loadavg()
    med = r["median_s"]
    base = med["clone"]
    order = ["clone", "deepcopy", "torch.save+fsync", "torch.load", "disk total", "state_to_numpy", "ray.put",
             "ray.get (other process)", "state_from_numpy (copy)", "object store end to end",
             "ray.get (same process, zero-copy)", "torch state: ray.put", "torch state: ray.get (other process)",
             "torch state: object store end to end"]
    C.print_table(f"handoff of a {backbone} state ({r['state_mib']:.0f} MiB), median of {repeats} "
                  f"(load {load0:.2f} → {load1:.2f})", ["path", "seconds", "GB/s", "× clone"],
                  [[k, med[k], r["state_mib"] / 1024 / med[k] if med[k] > 0 else float("inf"), med[k] / base]
                   for k in order])
    print(f"object store end to end / clone = {med['object store end to end'] / base:.1f}x; "
          f"/ disk round trip = {med['object store end to end'] / med['disk total']:.2f}x")
    C.dump_json(a.json, r)
    if not (a.quick or a.no_append):
        figures = {"clone_s": med["clone"], "deepcopy_s": med["deepcopy"], "save_fsync_s": med["torch.save+fsync"],
                   "load_s": med["torch.load"], "to_numpy_s": med["state_to_numpy"], "put_s": med["ray.put"],
                   "get_other_proc_s": med["ray.get (other process)"],
                   "from_numpy_s": med["state_from_numpy (copy)"],
                   "store_e2e_s": med["object store end to end"],
                   "torch_store_e2e_s": med["torch state: object store end to end"],
                   "torch_get_other_proc_s": med["torch state: ray.get (other process)"],
                   "store/clone": med["object store end to end"] / base,
                   "store/deepcopy": med["object store end to end"] / med["deepcopy"],
                   "store/disk": med["object store end to end"] / med["disk total"]}
        settings = {"backbone": backbone, "state_MiB": r["state_mib"], "tensors": r["tensors"], "repeats": repeats,
                    "stat": "median", "torch_threads": r["threads"]}
        C.append_row("handoff", settings, figures, (load0, load1))
    return r


if __name__ == "__main__":
    main()
